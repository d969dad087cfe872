"""Model registry: one file per architecture family (imported below, which registers it); every model has
features()/head()."""

from ._common import MODELS, Classifier, ModelSpec, batchnorm_layers
from .factory import create_model
from . import backdoorbench, convnext, efficientnet, preact, resnet, torchvision_style, vgg, vit  # noqa: F401

__all__ = ["MODELS", "ModelSpec", "create_model", "Classifier", "batchnorm_layers"]
