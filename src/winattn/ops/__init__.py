"""The windowed-attention operator: geometry planning, backends and the dispatcher."""

from .backends import BACKENDS, NoBackendError, backend_names, register_backend, select_backend
from .call import AttentionCall
from .functional import make_call, window_attention
from .geometry import WindowPlan, normalize_tuple, plan_windows
from .modules import WindowAttentionOp

__all__ = [
    "BACKENDS",
    "AttentionCall",
    "NoBackendError",
    "WindowAttentionOp",
    "WindowPlan",
    "backend_names",
    "make_call",
    "normalize_tuple",
    "plan_windows",
    "register_backend",
    "select_backend",
    "window_attention",
]
