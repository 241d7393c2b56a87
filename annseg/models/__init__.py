"""The segmentation network, its backbones and the named model zoo."""

from annseg.models.ann import ANN, VARIANTS
from annseg.models.backbones import Backbone, load_backbone_weights
from annseg.models.zoo import BACKBONES, MMSEG_OPTIONS, MODELS, create_model, list_models

__all__ = ["ANN", "VARIANTS", "Backbone", "load_backbone_weights", "BACKBONES", "MMSEG_OPTIONS", "MODELS", "create_model", "list_models"]
