"""Registered models (timm's names): Swin V1, and the registry functions."""

from . import swin  # noqa: F401  (registers the Swin V1 variants)
from . import swin_v2  # noqa: F401  (registers the Swin V2 variants)
from .features import FeatureInfo, SwinFeatures
from .registry import create_model, list_models, register_model
from .swin import SwinConfig, SwinTransformer
from .swin_v2 import SwinTransformerV2, SwinV2Config

__all__ = [
    "FeatureInfo",
    "SwinConfig",
    "SwinFeatures",
    "SwinTransformer",
    "SwinTransformerV2",
    "SwinV2Config",
    "create_model",
    "list_models",
    "register_model",
]
