"""Multi-scale features of the Swin family: ``forward_intermediates`` and a feature model.

Both follow timm: stage outputs (after each stage's blocks, before the next merging) at strides
4, 8, 16 and 32 for the standard patch size 4; the final norm only on request for the last one.
The feature model is what ``create_model(name, features_only=True)`` returns, ready for a
feature pyramid (torchvision's ``FeaturePyramidNetwork``, detectron-style necks).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Sequence

import torch
from torch import nn

OUTPUT_FORMATS = ("NCHW", "NHWC")


def take_indices(num_stages: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """Absolute stage indices to return, and the largest, as timm's ``feature_take_indices``.

    Args:
        num_stages: how many stages the model has.
        indices: None: every stage; an int n: the last n stages; a sequence: those stages
            (negative values count from the end).
    """
    if indices is None:
        indices = num_stages
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 0 < indices <= num_stages:
            raise ValueError(
                f"indices={indices} asks for the last {indices} stages; expected 1 to {num_stages}"
            )
        taken = list(range(num_stages - indices, num_stages))
    else:
        taken = []
        for index in indices:
            absolute = num_stages + index if index < 0 else index
            if not 0 <= absolute < num_stages:
                raise ValueError(
                    f"stage index {index} is out of range for a model with {num_stages} stages "
                    f"(expected -{num_stages} to {num_stages - 1})"
                )
            taken.append(absolute)
        if not taken:
            raise ValueError("indices is empty; expected at least one stage index")
    return taken, max(taken)


def _check_format(output_fmt: str) -> None:
    if output_fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output_fmt must be one of {OUTPUT_FORMATS}, got {output_fmt!r}")


def forward_intermediates(
    model: nn.Module,
    x: torch.Tensor,
    indices: int | Sequence[int] | None = None,
    norm: bool = False,
    stop_early: bool = False,
    output_fmt: str = "NCHW",
    intermediates_only: bool = False,
) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
    """Run a Swin model and collect stage outputs, as timm's ``forward_intermediates``.

    Args:
        model: a Swin V1 or V2 model (``patch_embed``, ``layers``, ``norm``).
        x: ``(B, C_in, H, W)`` images.
        indices: stages to return (see :func:`take_indices`).
        norm: apply the final norm to the last stage's output when it is returned.
        stop_early: stop after the last requested stage (only with ``intermediates_only``, as
            the final features need every stage).
        output_fmt: ``"NCHW"`` (timm's only choice) or ``"NHWC"``.
        intermediates_only: return only the list of maps.

    Returns:
        The list of maps (``(B, C_i, H/s_i, W/s_i)`` for NCHW), or ``(final_features, maps)``
        with ``final_features`` as ``forward_features`` returns them ``(B, H/32, W/32, C)``.
    """
    _check_format(output_fmt)
    num_stages = len(model.layers)
    taken, last = take_indices(num_stages, indices)
    stages = model.layers[: last + 1] if stop_early and intermediates_only else model.layers
    intermediates = []
    x = model.patch_embed(x)  # (B, H/4, W/4, C)
    for i, stage in enumerate(stages):
        x = stage(x)  # (B, H_i, W_i, C_i)
        if i in taken:
            out = model.norm(x) if norm and i == num_stages - 1 else x
            if output_fmt == "NCHW":
                out = out.permute(0, 3, 1, 2).contiguous()  # (B, C_i, H_i, W_i)
            intermediates.append(out)
    if intermediates_only:
        return intermediates
    return model.norm(x), intermediates


class FeatureInfo:
    """Channels, stride and module name of each returned feature map (timm's ``FeatureInfo``).

    Example:
        >>> info = FeatureInfo([{"num_chs": 96, "reduction": 4, "module": "layers.0"}], (0,))
        >>> info.channels(), info.reduction()
        ([96], [4])
    """

    def __init__(self, stage_info: list[dict], out_indices: Sequence[int]) -> None:
        self.info = [dict(stage_info[i]) for i in out_indices]
        self.out_indices = tuple(out_indices)

    def get(self, key: str) -> list:
        return [entry[key] for entry in self.info]

    def channels(self) -> list[int]:
        return self.get("num_chs")

    def reduction(self) -> list[int]:
        return self.get("reduction")

    def module_name(self) -> list[str]:
        return self.get("module")

    def get_dicts(self) -> list[dict]:
        return [dict(entry) for entry in self.info]

    def __len__(self) -> int:
        return len(self.info)

    def __getitem__(self, index: int) -> dict:
        return self.info[index]

    def __repr__(self) -> str:
        return f"FeatureInfo({self.info})"


class SwinFeatures(nn.Module):
    """A Swin backbone that returns stage feature maps instead of logits.

    Holds the model's patch embedding and the stages up to the last one requested; the head and
    the final norm are dropped (timm's ``features_only``). State-dict keys are the model's
    (``patch_embed.*``, ``layers.{i}.*``), so a full checkpoint loads with
    ``load_checkpoint(backbone, path, strict=False)`` (the stages it holds; the rest are reported
    as unexpected keys), with the same checks as the full model (V2 pretrained windows included).

    The maps come in the order of ``out_indices``, as ``feature_info`` lists them and
    ``forward_dict`` keys them: ``out_indices=(3, 0)`` gives the stride-32 map first. A stage may
    be listed once.

    Args:
        model: a Swin V1 or V2 model.
        out_indices: stages to return (None: all); negative values count from the end.
        output_fmt: ``"NCHW"`` (for convolutional necks) or ``"NHWC"`` (the models' own layout).

    Example:
        >>> import winattn
        >>> backbone = winattn.create_model("swin_tiny_patch4_window7_224", features_only=True)
        >>> [tuple(f.shape[1:]) for f in backbone(torch.randn(1, 3, 224, 224))]
        [(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)]
    """

    def __init__(
        self,
        model: nn.Module,
        out_indices: Sequence[int] | None = None,
        output_fmt: str = "NCHW",
    ) -> None:
        super().__init__()
        _check_format(output_fmt)
        num_stages = len(model.layers)
        if out_indices is not None and not isinstance(out_indices, int):
            out_indices = list(out_indices)
        taken, last = take_indices(num_stages, out_indices)  # an int n: the last n stages
        repeated = sorted({i for i in taken if taken.count(i) > 1})
        if repeated:
            raise ValueError(
                f"out_indices={tuple(out_indices)} lists stage {repeated[0]} more than once; "
                f"expected each of the {num_stages} stages at most once"
            )
        self.out_indices = tuple(taken)
        self.output_fmt = output_fmt
        self.config = model.config
        self.feature_info = FeatureInfo(model.feature_info, self.out_indices)
        self.patch_embed = model.patch_embed
        self.layers = model.layers[: last + 1]
        # The model's class, for its checkpoint checks (which read only config and layers).
        self._family = type(model)

    @property
    def data_config(self) -> dict:
        height, width = self.config.img_size if isinstance(self.config.img_size, tuple) else (
            (self.config.img_size,) * 2
        )
        return {
            "input_size": (self.config.in_chans, height, width),
            "mean": self.config.mean,
            "std": self.config.std,
            "interpolation": "bicubic",
            "crop_pct": self.config.crop_pct,
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def check_checkpoint_buffers(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """The full model's check of a checkpoint's V2 coordinate tables (none for V1).

        See ``SwinTransformerV2.check_checkpoint_buffers``; ``load_checkpoint`` calls it.
        """
        check = getattr(self._family, "check_checkpoint_buffers", None)
        if check is not None:
            check(self, state_dict)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C_in, H, W)`` -> one map per ``out_indices`` entry, in that order and
        ``output_fmt``."""
        maps = {}
        x = self.patch_embed(x)  # (B, H/4, W/4, C)
        for i, stage in enumerate(self.layers):
            x = stage(x)  # (B, H_i, W_i, C_i)
            if i in self.out_indices and self.output_fmt == "NCHW":
                maps[i] = x.permute(0, 3, 1, 2).contiguous()  # (B, C_i, H_i, W_i)
            elif i in self.out_indices:
                maps[i] = x
        return [maps[i] for i in self.out_indices]

    def forward_dict(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """The maps keyed by stage index ``"0"``, ``"1"``, ... in ``out_indices`` order (what
        torchvision's FeaturePyramidNetwork takes)."""
        return OrderedDict((str(i), f) for i, f in zip(self.out_indices, self.forward(x)))
