"""Model registry: one file per architecture family; every model has features()/head()."""

from ._common import MODELS, Classifier, ModelSpec, batchnorm_layers, create_model
from . import backdoorbench, preact, resnet, torchvision_style, vgg  # noqa: F401  (registration)

__all__ = ["MODELS", "ModelSpec", "create_model", "Classifier", "batchnorm_layers"]
