"""winattn: exact, fast local-window self-attention and the Swin Transformer family."""

from .ops import WindowAttentionOp, window_attention

__version__ = "0.1.0"

__all__ = ["WindowAttentionOp", "__version__", "window_attention"]
