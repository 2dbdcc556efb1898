"""Format detection and conversion of Swin V1/V2 state dicts.

winattn's native layout is timm's (``layers.{i}.downsample`` at the START of stage i, ``head.fc``),
so a timm checkpoint needs no conversion. The other three public layouts differ only by key
names and by how some tensors are split or fused; every conversion here renames, concatenates or
splits tensors and never changes a value (see the "Checkpoint facts" table in docs/DESIGN.md):

- ``official`` (microsoft/Swin-Transformer): patch merging at the END of stage i
  (``layers.{i}.downsample``), classifier ``head``, persistent index/mask buffers.
- ``torchvision``: ``features.0`` = patch embedding, ``features.{2i+1}.{j}`` = block j of stage
  i, ``features.{2i+2}`` = the patch merging after stage i, ``mlp.0``/``mlp.3``. Its V2 keeps a
  single ``qkv.bias`` of 3C whose key third is zeroed at run time.
- ``huggingface`` (transformers ``Swin*``/``Swinv2*``): prefix ``swin.``/``swinv2.``, split
  query/key/value, ``layernorm_before``/``layernorm_after``, merging at the end of stage i,
  ``classifier``. Both the published (transformers 4) names ``attention.self.query`` ... and the
  transformers 5 in-memory names ``attention.q_proj`` ... are read; the published names are
  written. V2 has no key bias.

Index maps, shift masks and coordinate tables are buffers that every library rebuilds; they are
dropped on the way in and never written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

FORMATS = ("official", "timm", "torchvision", "huggingface")

# Buffers rebuilt from the geometry: never carried across formats.
_REBUILT_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask", "attn.k_bias")

# Wrappers seen around state dicts: official/DeiT-style trainers save {"model": sd, ...}, timm's
# train script {"state_dict": sd, "state_dict_ema": ema, ...}, Lightning {"state_dict": sd}.
_WRAPPER_KEYS = ("model", "state_dict", "model_state", "module")
_EMA_KEYS = ("state_dict_ema", "model_ema")
# Tensors that trainers keep beside the weights, not weights: torch.optim.swa_utils.AveragedModel
# (torchvision's reference EMA) counts its updates in ``n_averaged``.
_BOOKKEEPING_KEYS = ("n_averaged",)

StateDict = dict[str, Tensor]


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model (or holds no Swin weights); the message says how."""


def unwrap(
    checkpoint: Mapping, *, prefer_ema: bool = False, source: str = "checkpoint"
) -> StateDict:
    """Return the bare state dict inside a training checkpoint.

    Tries, in order, ``model``, ``state_dict``, ``model_state`` and ``module`` (each may wrap the
    next); with ``prefer_ema=True`` the EMA weights (``state_dict_ema``, ``model_ema``) are taken
    first when present. The EMA copy is otherwise ignored: the plain weights are what every
    library's own loader picks. Bookkeeping tensors that are not weights (``n_averaged`` of
    ``torch.optim.swa_utils.AveragedModel``) are dropped, a ``module.`` prefix
    (DistributedDataParallel, AveragedModel, timm's ModelEma) is stripped, and of a SimMIM
    checkpoint only the ``encoder.`` backbone is kept (prefix stripped).

    Args:
        checkpoint: what ``torch.load`` returned, or a state dict already.
        prefer_ema: take the EMA weights (timm's ``state_dict_ema``, torchvision's reference
            ``model_ema``) when the checkpoint has them.
        source: what to call the checkpoint in error messages (e.g. ``checkpoint PATH``).

    Returns:
        A flat ``{name: tensor}`` dict (a new dict; tensors are not copied).

    Raises:
        CheckpointMismatchError: ``checkpoint`` is not a mapping, or holds no tensors.

    Example:
        >>> import torch
        >>> ema = {"n_averaged": torch.tensor(3), "module.head.weight": torch.zeros(1)}
        >>> list(unwrap({"model": {}, "model_ema": ema}, prefer_ema=True))
        ['head.weight']
    """
    obj = checkpoint
    order = (_EMA_KEYS + _WRAPPER_KEYS) if prefer_ema else _WRAPPER_KEYS
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in order if isinstance(obj.get(k), Mapping)), None)
        if inner is None or all(isinstance(v, Tensor) for v in obj.values()):
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(
            f"{source}: holds a {type(obj).__name__}; expected a state dict (names to tensors), "
            f"bare or under one of {', '.join(_WRAPPER_KEYS + _EMA_KEYS)}"
        )
    tensors = {
        k: v for k, v in obj.items()
        if isinstance(v, Tensor) and str(k).rpartition(".")[2] not in _BOOKKEEPING_KEYS
    }
    if not tensors:
        found = ", ".join(sorted(map(str, obj.keys()))[:10]) or "none, it is empty"
        raise CheckpointMismatchError(
            f"{source}: holds no tensors (keys: {found}); expected a Swin state dict, bare or "
            f"under one of {', '.join(_WRAPPER_KEYS + _EMA_KEYS)}"
        )
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    if "encoder.patch_embed.proj.weight" in tensors:
        # A SimMIM pre-training checkpoint (official): the backbone sits under "encoder.".
        tensors = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    return tensors


def detect_format(state_dict: Mapping[str, Tensor], *, source: str = "state_dict") -> str:
    """Name the layout of a Swin state dict: "official", "timm", "torchvision" or "huggingface".

    winattn's own layout is timm's and reads as "timm". A dict with neither a classifier nor a
    patch merging in stage 0 is the same in the official and timm layouts and reads as "timm".

    Example:
        >>> import torch
        >>> detect_format({"features.0.0.weight": torch.zeros(96, 3, 4, 4)})
        'torchvision'
    """
    keys = list(state_dict)
    if any(k.startswith("features.") for k in keys):
        return "torchvision"
    if any(
        k.startswith(("swin.", "swinv2.", "embeddings.patch_embeddings."))
        or k == "classifier.weight"
        or ".layernorm_before." in k
        for k in keys
    ):
        return "huggingface"
    if any(k.startswith("head.fc.") for k in keys):
        return "timm"
    official_markers = ("head.weight", "layers.0.downsample.reduction.weight")
    if any(k in state_dict for k in official_markers) or any(
        k.endswith(("relative_position_index", "attn_mask")) for k in keys
    ):
        return "official"
    if any(k.startswith(("patch_embed.", "layers.")) for k in keys):
        return "timm"
    sample = ", ".join(keys[:5])
    raise CheckpointMismatchError(
        f"{source}: not a Swin checkpoint in any known layout {FORMATS} (first keys: {sample}; "
        "expected patch_embed.*/layers.*, features.*, or swin.*/swinv2.* keys)"
    )


def is_v2(state_dict: Mapping[str, Tensor]) -> bool:
    """True for a Swin V2 state dict in any layout (cosine attention with a logit scale)."""
    return any(k.endswith("logit_scale") for k in state_dict)


def _drop_buffers(state_dict: Mapping[str, Tensor]) -> StateDict:
    return {k: v for k, v in state_dict.items() if not any(b in k for b in _REBUILT_BUFFERS)}


def _shift_downsample(key: str, step: int) -> str:
    return re.sub(
        r"^layers\.(\d+)\.downsample\.",
        lambda m: f"layers.{int(m.group(1)) + step}.downsample.",
        key,
    )


# --------------------------------------------------------------------------------------------
# official <-> native
# --------------------------------------------------------------------------------------------
def official_to_native(state_dict: Mapping[str, Tensor]) -> StateDict:
    out = {}
    for key, value in _drop_buffers(state_dict).items():
        key = _shift_downsample(key, +1)
        if key.startswith("head."):
            key = "head.fc." + key[len("head."):]
        out[key] = value
    return out


def native_to_official(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Official layout without its index/mask buffers (its loader rebuilds and ignores them)."""
    out = {}
    for key, value in _drop_buffers(state_dict).items():
        key = _shift_downsample(key, -1)
        if key.startswith("head.fc."):
            key = "head." + key[len("head.fc."):]
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# torchvision <-> native
# --------------------------------------------------------------------------------------------
_TV_MLP = {"mlp.0.": "mlp.fc1.", "mlp.3.": "mlp.fc2."}


def torchvision_to_native(state_dict: Mapping[str, Tensor]) -> StateDict:
    v2 = is_v2(state_dict)
    out = {}
    for key, value in _drop_buffers(state_dict).items():
        m = re.match(r"^features\.(\d+)\.(.*)$", key)
        if key.startswith("features.0.0."):
            out["patch_embed.proj." + key[len("features.0.0."):]] = value
        elif key.startswith("features.0.2."):
            out["patch_embed.norm." + key[len("features.0.2."):]] = value
        elif m and int(m.group(1)) % 2 == 1:
            stage = (int(m.group(1)) - 1) // 2
            block, _, rest = m.group(2).partition(".")
            for tv, native in _TV_MLP.items():
                if rest.startswith(tv):
                    rest = native + rest[len(tv):]
            prefix = f"layers.{stage}.blocks.{block}."
            if v2 and rest == "attn.qkv.bias":
                # torchvision zeroes the key third at run time: only q and v biases carry weight.
                q_bias, _, v_bias = value.chunk(3)
                out[prefix + "attn.q_bias"] = q_bias
                out[prefix + "attn.v_bias"] = v_bias
            else:
                out[prefix + rest] = value
        elif m:
            # features.{2i+2} merges the output of stage i: timm's stage i+1 starts with it.
            out[f"layers.{int(m.group(1)) // 2}.downsample.{m.group(2)}"] = value
        elif key.startswith("head."):
            out["head.fc." + key[len("head."):]] = value
        else:
            out[key] = value
    return out


def native_to_torchvision(state_dict: Mapping[str, Tensor]) -> StateDict:
    """torchvision layout without its index buffers (``load_state_dict(strict=False)`` there)."""
    out = {}
    q_biases = {}
    for key, value in _drop_buffers(state_dict).items():
        block = re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.(.*)$", key)
        down = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", key)
        if key.startswith("patch_embed.proj."):
            out["features.0.0." + key[len("patch_embed.proj."):]] = value
        elif key.startswith("patch_embed.norm."):
            out["features.0.2." + key[len("patch_embed.norm."):]] = value
        elif block:
            stage, index, rest = block.groups()
            for tv, native in _TV_MLP.items():
                if rest.startswith(native):
                    rest = tv + rest[len(native):]
            prefix = f"features.{2 * int(stage) + 1}.{index}."
            if rest in ("attn.q_bias", "attn.v_bias"):
                q_biases.setdefault(prefix, {})[rest] = value
            else:
                out[prefix + rest] = value
        elif down:
            out[f"features.{2 * int(down.group(1))}.{down.group(2)}"] = value
        elif key.startswith("head.fc."):
            out["head." + key[len("head.fc."):]] = value
        else:
            out[key] = value
    for prefix, biases in q_biases.items():
        q_bias, v_bias = biases["attn.q_bias"], biases["attn.v_bias"]
        out[prefix + "attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    return out


# --------------------------------------------------------------------------------------------
# Hugging Face <-> native
# --------------------------------------------------------------------------------------------
# Block-internal names: (published transformers-4 name, transformers-5 name, native name).
_HF_BLOCK = (
    ("layernorm_before.", None, "norm1."),
    ("layernorm_after.", None, "norm2."),
    ("attention.self.relative_position_bias_table",
     "attention.relative_position_bias.relative_position_bias_table",
     "attn.relative_position_bias_table"),
    ("attention.self.logit_scale", None, "attn.logit_scale"),
    ("attention.self.continuous_position_bias_mlp.", None, "attn.cpb_mlp."),
    ("attention.output.dense.", "attention.o_proj.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2.", "mlp.fc2."),
)
_HF_QKV = {
    "attention.self.query.": "q", "attention.self.key.": "k", "attention.self.value.": "v",
    "attention.q_proj.": "q", "attention.k_proj.": "k", "attention.v_proj.": "v",
}
_HF_TOP = (
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("embeddings.norm.", "patch_embed.norm."),
    ("layernorm.", "norm."),
    ("classifier.", "head.fc."),
)


def _strip_hf_prefix(key: str) -> str:
    for prefix in ("swinv2.", "swin."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def huggingface_to_native(state_dict: Mapping[str, Tensor]) -> StateDict:
    v2 = is_v2(state_dict)
    out: StateDict = {}
    qkv: dict[str, dict[str, Tensor]] = {}  # block prefix -> {"q.weight": ..., ...}
    for key, value in _drop_buffers(state_dict).items():
        key = _strip_hf_prefix(key)
        block = re.match(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.*)$", key)
        down = re.match(r"^encoder\.layers\.(\d+)\.downsample\.(.*)$", key)
        if block:
            stage, index, rest = block.groups()
            prefix = f"layers.{stage}.blocks.{index}."
            part = next((p for p in _HF_QKV if rest.startswith(p)), None)
            if part is not None:
                qkv.setdefault(prefix, {})[_HF_QKV[part] + "." + rest[len(part):]] = value
                continue
            for published, renamed, native in _HF_BLOCK:
                if rest.startswith(published):
                    rest = native + rest[len(published):]
                    break
                if renamed and rest.startswith(renamed):
                    rest = native + rest[len(renamed):]
                    break
            out[prefix + rest] = value
        elif down:
            # Hugging Face merges at the end of stage i, timm at the start of stage i+1.
            out[f"layers.{int(down.group(1)) + 1}.downsample.{down.group(2)}"] = value
        else:
            for hf, native in _HF_TOP:
                if key.startswith(hf):
                    key = native + key[len(hf):]
                    break
            out[key] = value
    for prefix, parts in qkv.items():
        missing = [p for p in ("q.weight", "k.weight", "v.weight") if p not in parts]
        if missing:
            raise ValueError(f"state_dict: {prefix} has no {', '.join(missing)} (split q/k/v)")
        out[prefix + "attn.qkv.weight"] = torch.cat([parts[p + ".weight"] for p in "qkv"])
        if v2:
            if "q.bias" in parts:
                out[prefix + "attn.q_bias"] = parts["q.bias"]
            if "v.bias" in parts:
                out[prefix + "attn.v_bias"] = parts["v.bias"]
        elif "q.bias" in parts:
            out[prefix + "attn.qkv.bias"] = torch.cat([parts[p + ".bias"] for p in "qkv"])
    return out


def native_to_huggingface(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Published Hugging Face layout (``swin.``/``swinv2.`` prefix, transformers-4 names).

    transformers 5 renames these on load itself, so the output loads with both versions.
    """
    v2 = is_v2(state_dict)
    root = "swinv2." if v2 else "swin."
    out = {}
    for key, value in _drop_buffers(state_dict).items():
        block = re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.(.*)$", key)
        down = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", key)
        if block:
            stage, index, rest = block.groups()
            prefix = f"{root}encoder.layers.{stage}.blocks.{index}."
            if rest.startswith("attn.qkv."):
                suffix = rest[len("attn.qkv."):]
                for name, part in zip(("query", "key", "value"), value.chunk(3)):
                    out[f"{prefix}attention.self.{name}.{suffix}"] = part
                continue
            if rest in ("attn.q_bias", "attn.v_bias"):
                name = "query" if rest == "attn.q_bias" else "value"
                out[f"{prefix}attention.self.{name}.bias"] = value
                continue
            for published, _, native in _HF_BLOCK:
                if rest.startswith(native):
                    rest = published + rest[len(native):]
                    break
            out[prefix + rest] = value
        elif down:
            out[f"{root}encoder.layers.{int(down.group(1)) - 1}.downsample.{down.group(2)}"] = value
        else:
            for hf, native in _HF_TOP:
                if key.startswith(native):
                    key = hf + key[len(native):]
                    break
            out[key if key.startswith("classifier.") else root + key] = value
    return out


_TO_NATIVE = {
    "official": official_to_native,
    "timm": _drop_buffers,
    "torchvision": torchvision_to_native,
    "huggingface": huggingface_to_native,
}
_FROM_NATIVE = {
    "official": native_to_official,
    "timm": _drop_buffers,
    "torchvision": native_to_torchvision,
    "huggingface": native_to_huggingface,
}


def to_native(
    state_dict: Mapping[str, Tensor], fmt: str | None = None, *, source: str = "state_dict"
) -> tuple[StateDict, str]:
    """Convert a Swin V1/V2 state dict of any layout to winattn's (timm's) layout.

    Args:
        state_dict: a bare state dict (see :func:`unwrap` for training checkpoints).
        fmt: the source layout; detected with :func:`detect_format` when None.
        source: what to call the state dict in error messages.

    Returns:
        ``(native_state_dict, fmt)``. Rebuilt buffers (index maps, masks, coordinate tables) are
        dropped; tensors are shared with the input, not copied.
    """
    fmt = detect_format(state_dict, source=source) if fmt is None else fmt
    if fmt not in _TO_NATIVE:
        raise ValueError(f"fmt: got {fmt!r}, expected one of {FORMATS}")
    return _TO_NATIVE[fmt](state_dict), fmt


def from_native(state_dict: Mapping[str, Tensor], fmt: str) -> StateDict:
    """Convert a native (timm-layout) Swin state dict to ``fmt`` (one of :data:`FORMATS`)."""
    if fmt not in _FROM_NATIVE:
        raise ValueError(f"fmt: got {fmt!r}, expected one of {FORMATS}")
    return _FROM_NATIVE[fmt](state_dict)
