"""Swin checkpoints: the official, timm, torchvision and HF layouts, loading, pretrained weights."""

from .convert import (
    FORMATS,
    CheckpointMismatchError,
    detect_format,
    from_native,
    is_v2,
    to_native,
    unwrap,
)
from .hub import PRETRAINED_TAGS, pretrained_repo, resolve_pretrained
from .io import (
    CheckpointReadError,
    RawCheckpoint,
    open_checkpoint,
    read_checkpoint,
    resolve_weight_file,
    save_state_dict,
)
from .load import (
    LoadReport,
    SwinLayout,
    infer_layout,
    load_checkpoint,
    resize_bias_table,
)

__all__ = [
    "FORMATS",
    "PRETRAINED_TAGS",
    "CheckpointMismatchError",
    "CheckpointReadError",
    "LoadReport",
    "RawCheckpoint",
    "SwinLayout",
    "detect_format",
    "from_native",
    "infer_layout",
    "is_v2",
    "load_checkpoint",
    "open_checkpoint",
    "pretrained_repo",
    "read_checkpoint",
    "resize_bias_table",
    "resolve_pretrained",
    "resolve_weight_file",
    "save_state_dict",
    "to_native",
    "unwrap",
]
