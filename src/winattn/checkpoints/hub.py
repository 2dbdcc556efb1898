"""Pretrained weights: timm's published Swin checkpoints on the Hugging Face hub."""

from __future__ import annotations

import os
from pathlib import Path

# Published tags per model, the default first (timm 1.0 ``default_cfgs``; repo
# ``timm/{model}.{tag}`` holds ``model.safetensors`` in timm's layout, which is winattn's).
# ms_in22k heads have 21841 classes, the others 1000.
PRETRAINED_TAGS: dict[str, tuple[str, ...]] = {
    "swin_tiny_patch4_window7_224": ("ms_in1k", "ms_in22k_ft_in1k", "ms_in22k"),
    "swin_small_patch4_window7_224": ("ms_in22k_ft_in1k", "ms_in1k", "ms_in22k"),
    "swin_base_patch4_window7_224": ("ms_in22k_ft_in1k", "ms_in1k", "ms_in22k"),
    "swin_base_patch4_window12_384": ("ms_in22k_ft_in1k", "ms_in1k", "ms_in22k"),
    "swin_large_patch4_window7_224": ("ms_in22k_ft_in1k", "ms_in22k"),
    "swin_large_patch4_window12_384": ("ms_in22k_ft_in1k", "ms_in22k"),
    "swinv2_tiny_window8_256": ("ms_in1k",),
    "swinv2_tiny_window16_256": ("ms_in1k",),
    "swinv2_small_window8_256": ("ms_in1k",),
    "swinv2_small_window16_256": ("ms_in1k",),
    "swinv2_base_window8_256": ("ms_in1k",),
    "swinv2_base_window16_256": ("ms_in1k",),
    "swinv2_base_window12_192": ("ms_in22k",),
    "swinv2_base_window12to16_192to256": ("ms_in22k_ft_in1k",),
    "swinv2_base_window12to24_192to384": ("ms_in22k_ft_in1k",),
    "swinv2_large_window12_192": ("ms_in22k",),
    "swinv2_large_window12to16_192to256": ("ms_in22k_ft_in1k",),
    "swinv2_large_window12to24_192to384": ("ms_in22k_ft_in1k",),
}
WEIGHTS_FILENAME = "model.safetensors"


def pretrained_repo(model_name: str, tag: str | None = None) -> str:
    """Hub repo of a model's published weights, e.g. ``timm/swinv2_tiny_window8_256.ms_in1k``."""
    if model_name not in PRETRAINED_TAGS:
        raise ValueError(
            f"model_name: no published weights for {model_name!r}; models with weights: "
            f"{', '.join(sorted(PRETRAINED_TAGS))}"
        )
    tags = PRETRAINED_TAGS[model_name]
    if tag is None:
        tag = tags[0]
    elif tag not in tags:
        raise ValueError(f"tag: {model_name} has no tag {tag!r}; published tags: {', '.join(tags)}")
    return f"timm/{model_name}.{tag}"


def resolve_pretrained(
    model_name: str, tag: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Download (or find in the hub cache) a model's published weights and return the file path.

    Uses ``huggingface_hub.hf_hub_download``, so the usual hub settings apply: ``HF_HOME`` /
    ``cache_dir`` for the cache, ``HF_HUB_OFFLINE=1`` to use only what is cached, ``HF_TOKEN``.

    Args:
        model_name: a registered model name with weights (a key of :data:`PRETRAINED_TAGS`).
        tag: which weights (e.g. ``ms_in22k``); the model's default tag when None.
        cache_dir: hub cache folder; huggingface_hub's default when None.

    Returns:
        Path of the cached ``model.safetensors`` (timm layout).

    Example:
        >>> path = resolve_pretrained("swin_tiny_patch4_window7_224")  # doctest: +SKIP
    """
    repo_id = pretrained_repo(model_name, tag)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:
        raise ImportError(
            "pretrained weights need huggingface_hub: pip install huggingface_hub"
        ) from err
    try:
        path = hf_hub_download(repo_id=repo_id, filename=WEIGHTS_FILENAME, cache_dir=cache_dir)
    except Exception as err:  # network, offline-mode and missing-repo errors alike
        raise RuntimeError(
            f"pretrained weights {repo_id}/{WEIGHTS_FILENAME} could not be fetched or found in "
            f"the hub cache ({type(err).__name__}: {err}). Without network, download the file "
            "elsewhere and pass it as checkpoint=PATH."
        ) from err
    return Path(path)
