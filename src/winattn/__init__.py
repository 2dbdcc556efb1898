"""winattn: exact, fast local-window self-attention and the Swin Transformer family."""

from .models import SwinConfig, SwinTransformer, create_model, list_models
from .models import SwinFeatures, SwinTransformerV2, SwinV2Config
from .ops import WindowAttentionOp, window_attention
from .export import export_onnx

__version__ = "0.1.0"

__all__ = [
    "SwinConfig",
    "SwinFeatures",
    "SwinTransformerV2",
    "SwinV2Config",
    "SwinTransformer",
    "WindowAttentionOp",
    "__version__",
    "create_model",
    "export_onnx",
    "list_models",
    "window_attention",
]
