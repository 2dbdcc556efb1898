"""Helpers shared by the checkpoint and parity tests: peers' Swin models with random weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

# A tiny Swin: 32x32 input, patch 4 -> 8x8 tokens, window 4 (shifted in stage 0), two stages.
TINY = dict(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)
TINY_CLASSES = 10


def randomize_(model: nn.Module, seed: int = 0, straddle_clamp: bool = False) -> nn.Module:
    """Give every parameter non-trivial random values (LN gains, biases, tables, logit scales).

    Default inits leave biases at zero and norms at one, which would hide a swapped bias or norm
    in a conversion; this does not. ``straddle_clamp`` draws V2's logit scales uniformly in
    [0, 5.5), across the log(100) = 4.6 clamp, instead of near log(10). Eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("logit_scale") and straddle_clamp:
                param.copy_(torch.rand(param.shape, generator=gen) * 5.5)
            elif name.endswith("logit_scale"):
                param.copy_(math.log(10.0) + 0.3 * noise)
            elif param.ndim >= 2:
                fan_in = param[0].numel()
                param.copy_(noise / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.2 * noise)
    return model.eval()


def timm_tiny(version: int = 1, window_size: int = TINY["window_size"], **kw) -> nn.Module:
    timm = pytest.importorskip("timm")
    cls = (timm.models.swin_transformer.SwinTransformer if version == 1
           else timm.models.swin_transformer_v2.SwinTransformerV2)
    args = {**TINY, "window_size": window_size, "num_classes": TINY_CLASSES, **kw}
    return cls(**args).eval()


def torchvision_tiny(version: int = 1) -> nn.Module:
    pytest.importorskip("torchvision")
    from torchvision.models import swin_transformer as tvs

    extra = {} if version == 1 else dict(block=tvs.SwinTransformerBlockV2,
                                         downsample_layer=tvs.PatchMergingV2)
    return tvs.SwinTransformer(
        patch_size=[TINY["patch_size"]] * 2, embed_dim=TINY["embed_dim"],
        depths=list(TINY["depths"]), num_heads=list(TINY["num_heads"]),
        window_size=[TINY["window_size"]] * 2, num_classes=TINY_CLASSES, **extra,
    ).eval()


def hf_config(version: int, *, img_size: int, embed_dim: int, depths, num_heads, window_size: int,
              num_classes: int, patch_size: int = 4):
    transformers = pytest.importorskip("transformers")
    cls = transformers.SwinConfig if version == 1 else transformers.Swinv2Config
    return cls(image_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depths=list(depths),
               num_heads=list(num_heads), window_size=window_size, num_labels=num_classes,
               drop_path_rate=0.0)


def hf_model(config) -> nn.Module:
    import transformers

    cls = (transformers.SwinForImageClassification if config.model_type == "swin"
           else transformers.Swinv2ForImageClassification)
    return cls(config).eval()


def hf_tiny(version: int = 1) -> nn.Module:
    return hf_model(hf_config(version, img_size=TINY["img_size"], embed_dim=TINY["embed_dim"],
                              depths=TINY["depths"], num_heads=TINY["num_heads"],
                              window_size=TINY["window_size"], num_classes=TINY_CLASSES))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


# ------------------------------------------------------------------ the native (target) model
def create_named(name: str, **kw) -> nn.Module:
    """winattn's registered model ``name`` in eval mode."""
    import winattn

    return winattn.create_model(name, **kw).eval()


def native_tiny(version: int = 1, window_size: int = TINY["window_size"], **kw) -> nn.Module:
    """The tiny Swin in the native layout: winattn's (V2: timm's while winattn has no V2)."""
    import winattn

    name = "swin_tiny_patch4_window7_224" if version == 1 else "swinv2_tiny_window8_256"
    if name not in winattn.list_models():
        return timm_tiny(version, window_size, **kw)
    args = {**TINY, "window_size": window_size, "num_classes": TINY_CLASSES, **kw}
    return create_named(name, **args)
