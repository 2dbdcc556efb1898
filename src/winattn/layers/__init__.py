"""Building blocks of the Swin family: attention, MLP, patch embedding and merging."""

from .attention import WindowAttention
from .mlp import DropPath, Mlp
from .patch import PatchEmbed, PatchMerging, merge_2x2
from .position import relative_position_index

__all__ = [
    "DropPath",
    "Mlp",
    "PatchEmbed",
    "PatchMerging",
    "WindowAttention",
    "merge_2x2",
    "relative_position_index",
]
