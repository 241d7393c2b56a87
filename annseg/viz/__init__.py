"""Every picture a user looks at: overlays and legends (Pillow), training curves and benchmark
plots (matplotlib, an optional extra)."""

from annseg.viz.overlay import background_classes, blend, label_panel, legend, overlay_picture, panels_picture

__all__ = ["background_classes", "blend", "label_panel", "legend", "overlay_picture", "panels_picture"]
