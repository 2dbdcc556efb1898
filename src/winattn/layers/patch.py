"""Patch embedding (pixels -> tokens) and patch merging (2x2 tokens -> 1), channels-last."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.traceable import is_tracing
from . import fused


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` convolution, then LayerNorm; returns ``(B, H/p, W/p, C)``.

    Images whose sides are not multiples of the patch are padded with zeros at the bottom and
    right (as Hugging Face does), never cropped.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"images must be laid out (batch, channels, height, width), got rank {x.dim()} "
                f"with shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"images have {x.shape[1]} channels, the model expects in_chans={self.in_chans} "
                f"(input shape {tuple(x.shape)})"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"images must be a floating tensor, normalised as the model's data_config says, "
                f"got {x.dtype} (e.g. uint8 pixels: convert with x.float() / 255, then normalise)"
            )
        height, width = x.shape[-2:]
        p = self.patch_size
        if height < p or width < p:
            raise ValueError(
                f"image of {height}x{width} pixels is smaller than one {p}x{p} patch"
            )
        # While tracing, pad by the traced amounts (a no-op when zero) rather than branch on them.
        if is_tracing() or height % p or width % p:
            x = F.pad(x, (0, (p - width % p) % p, 0, (p - height % p) % p))
        if self._embeds_by_matmul(x):
            return self.norm(self._embed_patches(x))
        if x.device.type == "cpu" and not is_tracing():
            # oneDNN's stride-p convolution reads channels-last pixels faster, and its output
            # is then channels-last too, so the permute below is a contiguous view. Swin-T,
            # batch 8, float32: 5.1 against 1.0 ms forward, 10.5-12.7 against 5.1 ms forward
            # and backward with the norm; bit for bit the same output (docs/fast-path.md, item 14).
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.proj(x)  # (B, C, H/p, W/p)
        return self.norm(x.permute(0, 2, 3, 1))  # (B, H/p, W/p, C)

    def _embeds_by_matmul(self, x: torch.Tensor) -> bool:
        """bfloat16 on the CPU (autocast, or a bf16 model): there the matmul measured 1.02-1.04x
        faster for a whole Swin-T forward. float32 was no faster, so it keeps the
        convolution, and with it timm's and torchvision's rounding."""
        return (
            x.device.type == "cpu"
            and not is_tracing()
            and fused.compute_dtype(x) == torch.bfloat16
        )

    def _embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution as one matmul: each patch gathered (and cast to the compute dtype)
        in one copy, then the oneDNN linear with the kernel as its weight, which keeps the
        cast kernel between no-grad calls. Writes ``(B, H/p, W/p, C)`` directly, where the
        convolution's channels-first output needed a permuting copy (Swin-T, batch 1, bf16:
        1.2 ms of convolution, casts and copies)."""
        batch, channels, height, width = x.shape
        p = self.patch_size
        patches = x.view(batch, channels, height // p, p, width // p, p)
        patches = patches.permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C_in, p, p)
        gathered = x.new_empty(patches.shape, dtype=fused.compute_dtype(x))
        gathered.copy_(patches)  # one copy, casting on the way
        gathered = gathered.view(batch, height // p, width // p, channels * p * p)
        return fused.linear(gathered, self.proj)


def merge_2x2(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B, ceil(H/2), ceil(W/2), 4C)``, odd sides zero-padded.

    Neighbour order, the same in all four checkpoint formats: (even row, even col), (odd row,
    even col), (even row, odd col), (odd row, odd col).
    """
    batch, height, width, channels = x.shape
    if is_tracing() or height % 2 or width % 2:
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        height, width = x.shape[1:3]
    x = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
    x = x.permute(0, 1, 3, 4, 2, 5)  # (B, H/2, W/2, col parity, row parity, C)
    return x.reshape(batch, height // 2, width // 2, 4 * channels)


class PatchMerging(nn.Module):
    """Swin V1 merging: 2x2 neighbours concatenated, LayerNorm, then a bias-free 4C -> 2C linear.

    Swin V2 reverses the order (reduction, then norm): ``norm_first=False``.
    """

    def __init__(self, dim: int, out_dim: int | None = None, norm_first: bool = True) -> None:
        super().__init__()
        out_dim = out_dim or 2 * dim
        self.norm_first = norm_first
        self.norm = nn.LayerNorm(4 * dim if norm_first else out_dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = merge_2x2(x)
        if self.norm_first:
            return self._reduce(self.norm(x))
        return self.norm(self._reduce(x))

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        # Exporters trace the module; eager runs take the oneDNN linear (packed bf16 weights).
        return self.reduction(x) if is_tracing() else fused.linear(x, self.reduction)
