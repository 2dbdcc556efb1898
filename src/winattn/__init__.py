"""winattn: exact, fast local-window self-attention and the Swin Transformer family."""

from .models import SwinConfig, SwinTransformer, create_model, list_models
from .ops import WindowAttentionOp, window_attention

__version__ = "0.1.0"

__all__ = [
    "SwinConfig",
    "SwinTransformer",
    "WindowAttentionOp",
    "__version__",
    "create_model",
    "list_models",
    "window_attention",
]
