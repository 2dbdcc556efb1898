"""Registered models (timm's names): Swin V1, and the registry functions."""

from . import swin  # noqa: F401  (registers the Swin V1 variants)
from .registry import create_model, list_models, register_model
from .swin import SwinConfig, SwinTransformer

__all__ = ["SwinConfig", "SwinTransformer", "create_model", "list_models", "register_model"]
