"""Every picture a user looks at: overlays and legends (Pillow), training curves and benchmark
plots (matplotlib, an optional extra), where a pixel attends (Pillow)."""

from annseg.viz.attention import attention_picture
from annseg.viz.overlay import background_classes, blend, label_panel, legend, overlay_picture, panels_picture

__all__ = ["attention_picture", "background_classes", "blend", "label_panel", "legend", "overlay_picture",
           "panels_picture"]
