"""winattn: exact, fast local-window self-attention and the Swin Transformer family."""

from .checkpoints import load_checkpoint
from .models import SwinConfig, SwinTransformer, create_model, list_models
from .ops import WindowAttentionOp, window_attention
from .ops.global_tokens import window_attention_with_globals
from .ops.neighborhood import neighborhood_attention
from .ops.sequence import sequence_window_attention
from .ops.stripes import cross_shaped_window_attention
from .ops.tiles import LocalAttentionSettings

__version__ = "0.1.0"

__all__ = [
    "SwinConfig",
    "SwinTransformer",
    "WindowAttentionOp",
    "__version__",
    "create_model",
    "list_models",
    "load_checkpoint",
    "window_attention",
]
__all__ += [
    "LocalAttentionSettings",
    "cross_shaped_window_attention",
    "neighborhood_attention",
    "sequence_window_attention",
    "window_attention_with_globals",
]
