"""Reading and writing state dicts: torch pickles, safetensors, Hugging Face repo/cache folders."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# File names a Hugging Face model repo (timm's or transformers') stores its weights under, in the
# order transformers prefers them.
HUB_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# transformers' config.json beside the weights names the model type; only Swin's are read.
HF_CONFIG_FILE = "config.json"
_HF_MODEL_TYPES = ("swin", "swinv2")


class CheckpointReadError(ValueError):
    """A checkpoint file or folder that cannot be read; the message names the path."""


@dataclass(frozen=True)
class RawCheckpoint:
    """A checkpoint as read, before unwrapping or conversion.

    Attributes:
        content: what the file held (a state dict, or a training checkpoint wrapping one).
        source: where it came from, for messages (the weight file's path, or ``<state dict>``).
        hf_config: the Hugging Face ``config.json`` beside the weights when it describes a Swin
            (``model_type`` ``swin``/``swinv2``): it holds the windows the weights were trained
            with, which the weights themselves do not. None otherwise.
        hf_config_path: where ``hf_config`` was read from.
    """

    content: object
    source: str
    hf_config: dict | None = None
    hf_config_path: str | None = None


def resolve_weight_file(path: str | os.PathLike) -> Path:
    """Find the weight file inside a file path, a hub-style repo folder or a hub cache folder.

    Accepts a file; a folder holding one of :data:`HUB_WEIGHT_FILES` (a downloaded repo or one
    ``snapshots/<rev>`` of the cache); or a cache folder ``models--org--name`` (the revision named
    by ``refs/main``, else its only snapshot).
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointReadError(f"checkpoint: {str(path)!r} does not exist")
    snapshots = path / "snapshots"
    if snapshots.is_dir():
        ref = path / "refs" / "main"
        revisions = sorted(p for p in snapshots.iterdir() if p.is_dir())
        if ref.is_file():
            path = snapshots / ref.read_text().strip()
        elif len(revisions) == 1:
            path = revisions[0]
        else:
            raise CheckpointReadError(
                f"checkpoint: {str(path)!r} is a hub cache folder without refs/main and with "
                f"{len(revisions)} snapshots; pass the snapshot folder you mean"
            )
    for name in HUB_WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise CheckpointReadError(
        f"checkpoint: folder {str(path)!r} holds none of {', '.join(HUB_WEIGHT_FILES)}"
    )


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types, and OSError
        raise CheckpointReadError(
            f"checkpoint: cannot read safetensors file {str(path)!r} (truncated or not "
            f"safetensors?): {err}"
        ) from err


def _load_torch(path: Path) -> Mapping:
    try:
        # From an open file: torch.load would pick its reader by a path's suffix.
        with path.open("rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt files raise RuntimeError, EOFError, UnpicklingError...
        if "weights only load failed" in str(err).lower():
            raise CheckpointReadError(
                f"checkpoint: {str(path)!r} holds Python objects besides tensors, which "
                "torch.load(weights_only=True) refuses to unpickle. If you trust the file, load "
                "it yourself with torch.load(path, weights_only=False) and pass the result"
            ) from err
        raise CheckpointReadError(
            f"checkpoint: cannot read {str(path)!r} with torch.load (truncated or not a "
            f"PyTorch file?): {type(err).__name__}: {err}"
        ) from err


def _load_index(path: Path) -> dict[str, Tensor]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointReadError(f"checkpoint: bad shard index {str(path)!r}: {err}") from err
    state_dict: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state_dict.update(read_file(path.parent / shard))
    return state_dict


def _sniff(path: Path) -> str | None:
    """Name a file's format from its first bytes: ``safetensors``, ``torch``, or None.

    safetensors starts with the little-endian length of its JSON header, then ``{``; torch.save
    writes a zip archive (``PK\\x03\\x04``) or, in the legacy format, a pickle (``\\x80``).
    """
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 2**32:
        # Also when the header is longer than the file (truncated): the safetensors reader
        # then says so. A header length's first byte can be 0x80, a pickle's first byte.
        return "safetensors"
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return "torch"
    return None


def read_file(path: str | os.PathLike) -> Mapping:
    """Read one checkpoint file onto the CPU: safetensors, a shard index, or a torch pickle.

    The contents decide how a file is read, not its suffix (a safetensors file saved as
    ``.pth`` reads as safetensors); the suffix only decides for files whose first bytes are
    neither format's (their reader then says why it failed).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"checkpoint: {str(path)!r} is not a file")
    if path.name.endswith(".index.json"):
        return _load_index(path)
    kind = _sniff(path)
    if kind == "safetensors" or (kind is None and path.suffix == ".safetensors"):
        return _load_safetensors(path)
    return _load_torch(path)


def _read_hf_config(weight_file: Path) -> tuple[dict | None, str | None]:
    """The transformers Swin ``config.json`` beside ``weight_file``, if there is one."""
    path = weight_file.parent / HF_CONFIG_FILE
    if not path.is_file():
        return None, None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointReadError(
            f"checkpoint: cannot read {str(path)!r} beside the weights {str(weight_file)!r} "
            f"(expected a JSON model config): {err}"
        ) from err
    if not isinstance(config, dict) or config.get("model_type") not in _HF_MODEL_TYPES:
        return None, None  # another library's config (timm's has no model_type)
    return config, str(path)


def open_checkpoint(source: str | os.PathLike | Mapping) -> RawCheckpoint:
    """Read any supported source: a state dict, a file, a hub-style repo or cache folder.

    Returns:
        A :class:`RawCheckpoint`: the file's contents, its path, and the Hugging Face model
        config beside it when there is one. ``load_checkpoint`` takes it as its source.

    Example:
        >>> ckpt = open_checkpoint("/data/hf/swinv2-tiny-patch4-window8-256")  # doctest: +SKIP
        >>> ckpt.source, ckpt.hf_config["window_size"]  # doctest: +SKIP
        ('/data/hf/swinv2-tiny-patch4-window8-256/model.safetensors', 8)
    """
    if isinstance(source, Mapping):
        return RawCheckpoint(source, "<state dict>")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source: expected a state dict, a file or a folder path, got {type(source).__name__}"
        )
    path = resolve_weight_file(source)
    content = read_file(path)
    return RawCheckpoint(content, str(path), *_read_hf_config(path))


def read_checkpoint(source: str | os.PathLike | Mapping) -> tuple[Mapping, str]:
    """Return ``(raw checkpoint, description of where it came from)`` for any supported source."""
    checkpoint = open_checkpoint(source)
    return checkpoint.content, checkpoint.source


def save_state_dict(
    path: str | os.PathLike,
    state_dict: Mapping[str, Tensor],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a state dict as safetensors (tensors copied to contiguous CPU memory).

    Tensors that share storage (tied or sliced weights) are written as independent copies, which
    safetensors requires.

    Args:
        path: destination file; its parent folder is created.
        state_dict: ``{name: tensor}``.
        metadata: extra string key/values for the file header (``format: pt`` is always set).

    Returns:
        The path written.

    Example:
        >>> import torch, tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> p = save_state_dict(os.path.join(folder, "w.safetensors"), {"a": torch.ones(2)})
        >>> p.name
        'w.safetensors'
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})
    return path
