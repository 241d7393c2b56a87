"""The segmentation network, its backbones and the named model zoo."""

from annseg.models.ann import ANN, VARIANTS
from annseg.models.backbones import RESNETS, Backbone, load_backbone_weights, resolve_backbone
from annseg.models.zoo import MMSEG_OPTIONS, MODELS, create_model, list_models

__all__ = ["ANN", "VARIANTS", "Backbone", "RESNETS", "load_backbone_weights", "resolve_backbone", "MMSEG_OPTIONS", "MODELS", "create_model", "list_models"]
