"""ONNX export of winattn models with dynamic batch, height and width.

The windowed-attention operator switches to its shape-generic path while the exporter traces
(``winattn.ops.traceable``), and each block states its window decision as tensors of the traced
size, so one exported graph computes the model at any input size; see docs/export.md.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .models.swin import to_2tuple

#: The exporter's lowest supported opset: LayerNormalization is a native op from 17 on.
MIN_OPSET = 17


def stage_sizes(model: nn.Module, height: int, width: int) -> list[tuple[int, int]]:
    """The (height, width) of every stage's feature map for an input of ``height x width``."""
    config = model.config
    feature = (-(-height // config.patch_size), -(-width // config.patch_size))
    sizes = []
    for stage in range(len(config.depths)):
        if stage:
            feature = (-(-feature[0] // 2), -(-feature[1] // 2))
        sizes.append(feature)
    return sizes


def dynamic_graph_is_exact(model: nn.Module, height: int, width: int) -> bool:
    """Whether a ``dynamic=True`` export computes ``model`` exactly at ``height x width``.

    The graph makes each block's window decision at run time (``window_rule``), so it is exact
    at every size, except under ``window_rule="official"`` on a non-square stage map whose
    shorter side is below the window: the official rule then cuts the longer side into windows
    of the shorter side's extent (a window that depends on the input), where the graph shrinks
    each axis to its own extent instead.
    """
    config = model.config
    if getattr(config, "window_rule", "official") != "official":
        return True
    window = to_2tuple(config.window_size, "window_size")
    for h, w in stage_sizes(model, height, width):
        if h != w and (min(h, w) < window[0] or min(h, w) < window[1]):
            return False
    return True


def example_size(model: nn.Module) -> tuple[int, int]:
    """The (height, width) traced for a dynamic export: the model's own size, with the width
    one patch wider when it is square (equal sizes would be traced as one symbol)."""
    height, width = model.data_config["input_size"][1:]
    if height == width:
        width += model.config.patch_size
    return height, width


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = 18,
    dynamic: bool | str = True,
    example_input: torch.Tensor | None = None,
) -> str:
    """Export ``model`` (images -> outputs) to an ONNX file.

    With ``dynamic=True`` the batch, height and width axes of the input are symbolic: one file
    serves every input size. Patch, merge and window padding, each block's shift and window
    shrinking are computed from the size inside the graph; the one size range where the graph
    is not exact is a non-square map below the window under ``window_rule="official"``
    (:func:`dynamic_graph_is_exact`). The trace runs in eval mode on ``example_input``
    (default: batch 2 at :func:`example_size`).

    Args:
        model: a winattn model (``create_model``), or any module taking ``(B, C, H, W)`` images.
        path: the ``.onnx`` file to write.
        opset: ONNX opset, at least 17.
        dynamic: True: symbolic batch/height/width; ``"batch"``: symbolic batch, height and
            width fixed at the model's own size (``data_config``); False: fixed to
            ``example_input``'s shape.
        example_input: the tensor to trace with.

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: ``opset`` below 17.
        ImportError: onnx / onnxscript (the exporter's dependencies) are not installed.

    Example:
        >>> import winattn  # doctest: +SKIP
        >>> model = winattn.create_model("swinv2_tiny_window8_256")  # doctest: +SKIP
        >>> winattn.export_onnx(model, "swinv2_tiny.onnx")  # doctest: +SKIP
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(
            f"opset={opset!r} is not supported: expected an int >= {MIN_OPSET} (the exporter "
            f"needs LayerNormalization, native from opset 17); try opset=18"
        )
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "export_onnx needs the onnx and onnxscript packages (pip install onnx onnxscript)"
        ) from error
    if dynamic not in (True, False, "batch"):
        raise ValueError(f"dynamic must be True, False or 'batch', got {dynamic!r}")
    own_size = tuple(model.data_config["input_size"][1:])
    if example_input is None:
        size = example_size(model) if dynamic is True else own_size
        example_input = torch.randn(2, model.config.in_chans, *size)
    dynamic_shapes = None
    if dynamic:
        dim = torch.export.Dim.DYNAMIC
        dynamic_shapes = ({0: dim} if dynamic == "batch" else {0: dim, 2: dim, 3: dim},)
    was_training = model.training
    model.eval()
    try:
        program = torch.onnx.export(
            model,
            (example_input,),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            input_names=["images"],
            output_names=["outputs"],
            optimize=True,
            verbose=False,
        )
        program.save(str(path))
    finally:
        model.train(was_training)
    return str(path)




