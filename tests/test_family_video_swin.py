"""3-D shifted windows: window_attention on a 3-D grid against a literal transcription of Video
Swin's block (pad, roll, window_partition, WindowAttention3D with compute_mask's 27 regions,
window_reverse, roll back, crop)."""

from __future__ import annotations

from functools import reduce
from operator import mul

import pytest
import torch
import torch.nn.functional as F

from winattn.layers.local_attention import WindowAttentionND, relative_position_index_nd
from winattn.ops.geometry import plan_windows


# --- Video Swin (SwinTransformer/Video-Swin-Transformer, swin_transformer.py), transcribed ---
def window_partition(x, window_size):
    B, D, H, W, C = x.shape
    x = x.view(
        B,
        D // window_size[0],
        window_size[0],
        H // window_size[1],
        window_size[1],
        W // window_size[2],
        window_size[2],
        C,
    )
    windows = x.permute(0, 1, 3, 5, 2, 4, 6, 7).contiguous().view(-1, reduce(mul, window_size), C)
    return windows


def window_reverse(windows, window_size, B, D, H, W):
    x = windows.view(
        B,
        D // window_size[0],
        H // window_size[1],
        W // window_size[2],
        window_size[0],
        window_size[1],
        window_size[2],
        -1,
    )
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).contiguous().view(B, D, H, W, -1)
    return x


def compute_mask(D, H, W, window_size, shift_size, device):
    img_mask = torch.zeros((1, D, H, W, 1), device=device)  # 1 Dp Hp Wp 1
    cnt = 0
    for d in (
        slice(-window_size[0]),
        slice(-window_size[0], -shift_size[0]),
        slice(-shift_size[0], None),
    ):
        for h in (
            slice(-window_size[1]),
            slice(-window_size[1], -shift_size[1]),
            slice(-shift_size[1], None),
        ):
            for w in (
                slice(-window_size[2]),
                slice(-window_size[2], -shift_size[2]),
                slice(-shift_size[2], None),
            ):
                img_mask[:, d, h, w, :] = cnt
                cnt += 1
    mask_windows = window_partition(img_mask, window_size)  # nW, ws[0]*ws[1]*ws[2], 1
    mask_windows = mask_windows.squeeze(-1)  # nW, ws[0]*ws[1]*ws[2]
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(
        attn_mask == 0, float(0.0)
    )
    return attn_mask


def video_swin_relative_position_index(window_size):
    coords_d = torch.arange(window_size[0])
    coords_h = torch.arange(window_size[1])
    coords_w = torch.arange(window_size[2])
    coords = torch.stack(torch.meshgrid(coords_d, coords_h, coords_w, indexing="ij"))
    coords_flatten = torch.flatten(coords, 1)
    relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]
    relative_coords = relative_coords.permute(1, 2, 0).contiguous()
    relative_coords[:, :, 0] += window_size[0] - 1
    relative_coords[:, :, 1] += window_size[1] - 1
    relative_coords[:, :, 2] += window_size[2] - 1
    relative_coords[:, :, 0] *= (2 * window_size[1] - 1) * (2 * window_size[2] - 1)
    relative_coords[:, :, 1] *= 2 * window_size[2] - 1
    return relative_coords.sum(-1)


def video_swin_attention(layer, x, window_size, shift_size):
    """SwinTransformerBlock3D.forward_part1 without the norm, with WindowAttention3D.forward."""
    B, D, H, W, C = x.shape
    num_heads = layer.num_heads
    pad_d1 = (window_size[0] - D % window_size[0]) % window_size[0]
    pad_b = (window_size[1] - H % window_size[1]) % window_size[1]
    pad_r = (window_size[2] - W % window_size[2]) % window_size[2]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b, 0, pad_d1))
    _, Dp, Hp, Wp, _ = x.shape
    mask_matrix = compute_mask(Dp, Hp, Wp, window_size, shift_size, x.device)
    if any(i > 0 for i in shift_size):
        shifted_x = torch.roll(
            x, shifts=(-shift_size[0], -shift_size[1], -shift_size[2]), dims=(1, 2, 3)
        )
        attn_mask = mask_matrix
    else:
        shifted_x = x
        attn_mask = None
    x_windows = window_partition(shifted_x, window_size)
    # WindowAttention3D.forward
    B_, N, C = x_windows.shape
    qkv = layer.qkv(x_windows).reshape(B_, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * layer.scale
    attn = q @ k.transpose(-2, -1)
    index = video_swin_relative_position_index(window_size)
    relative_position_bias = layer.relative_position_bias_table[index[:N, :N].reshape(-1)].reshape(
        N, N, -1
    )
    relative_position_bias = relative_position_bias.permute(2, 0, 1).contiguous()
    attn = attn + relative_position_bias.unsqueeze(0)
    if attn_mask is not None:
        nW = attn_mask.shape[0]
        attn = attn.view(B_ // nW, nW, num_heads, N, N) + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, N, N)
    attn = attn.softmax(dim=-1)
    attn_windows = layer.proj((attn @ v).transpose(1, 2).reshape(B_, N, C))
    attn_windows = attn_windows.view(-1, *(window_size + (C,)))
    shifted_x = window_reverse(attn_windows, window_size, B, Dp, Hp, Wp)
    if any(i > 0 for i in shift_size):
        x = torch.roll(
            shifted_x, shifts=(shift_size[0], shift_size[1], shift_size[2]), dims=(1, 2, 3)
        )
    else:
        x = shifted_x
    return x[:, :D, :H, :W, :]


@pytest.mark.parametrize(
    "grid, window, shift",
    [
        ((16, 14, 14), (8, 7, 7), (4, 3, 3)),  # Video Swin's window, half-window shift
        ((16, 14, 14), (8, 7, 7), (0, 0, 0)),
        ((4, 6, 6), (2, 3, 3), (1, 1, 1)),
        ((4, 6, 9), (2, 3, 3), (1, 0, 1)),
    ],
)
def test_window_attention_3d_is_video_swin(grid, window, shift):
    torch.manual_seed(0)
    layer = WindowAttentionND(16, 2, window, shift).double()
    with torch.no_grad():
        layer.relative_position_bias_table.normal_()
    x = torch.randn(2, *grid, 16, dtype=torch.float64, requires_grad=True)
    ours = layer(x)
    theirs = video_swin_attention(layer, x, window, shift)
    torch.testing.assert_close(ours, theirs)
    grad_out = torch.randn_like(ours)
    g_ours = torch.autograd.grad(ours, [x, layer.relative_position_bias_table], grad_out)
    g_theirs = torch.autograd.grad(theirs, [x, layer.relative_position_bias_table], grad_out)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b)


def test_plan_mask_is_compute_mask_with_27_regions():
    grid, window, shift = (16, 14, 14), (8, 7, 7), (4, 3, 3)
    ours = plan_windows(grid, window, shift).mask
    theirs = compute_mask(*grid, window, shift, "cpu")
    assert torch.equal(ours, theirs)
    img = torch.zeros(1, *grid, 1)
    cnt = 0
    for d in slice(-8), slice(-8, -4), slice(-4, None):
        for h in slice(-7), slice(-7, -3), slice(-3, None):
            for w in slice(-7), slice(-7, -3), slice(-3, None):
                img[:, d, h, w] = cnt
                cnt += 1
    assert img.unique().numel() == 27


def test_padded_grid_masks_padded_keys_where_video_swin_does_not():
    """On a grid not divisible by the window, Video Swin attends to its zero-padded tokens; the
    operator excludes them (-inf) and agrees with compute_mask everywhere else."""
    grid, window, shift = (5, 8, 9), (2, 3, 3), (1, 1, 1)
    plan = plan_windows(grid, window, shift)
    theirs = compute_mask(*plan.padded, window, shift, "cpu")
    finite = torch.isfinite(plan.mask)
    assert torch.equal(plan.mask[finite], theirs[finite])
    assert (~finite).any()


def test_relative_position_index_is_video_swins():
    for window in [(8, 7, 7), (2, 3, 4), (1, 7, 7)]:
        assert torch.equal(
            relative_position_index_nd(window), video_swin_relative_position_index(window)
        )
