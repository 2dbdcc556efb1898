"""ONNX export of winattn models with dynamic batch, height and width.

The windowed-attention operator switches to its shape-generic path while the exporter traces
(``winattn.ops.traceable``), so one exported graph computes the model at any input size in the
range the trace allows; see docs/export.md.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from .models.swin import to_2tuple

#: The exporter's lowest supported opset: LayerNormalization is a native op from 17 on.
MIN_OPSET = 17


def general_input_size(model: nn.Module) -> tuple[int, int]:
    """The smallest (height, width) at which every stage's map is larger than its window.

    Below it, Swin shrinks windows or drops shifts (``window_rule``), a different function of
    the input size; an exported graph covers one regime, this one.
    """
    config = model.config
    window = to_2tuple(config.window_size, "window_size")
    stride = config.patch_size * 2 ** (len(config.depths) - 1)
    return stride * window[0] + 1, stride * window[1] + 1


def example_size(model: nn.Module) -> tuple[int, int]:
    """A traceable (height, width) for export: above :func:`general_input_size`, height and
    width different (so the tracer keeps them independent), and every stage's map needing
    window padding (so a block that pads only when needed still puts its pad in the graph; a
    zero pad then serves sizes that need none)."""
    config = model.config
    window = to_2tuple(config.window_size, "window_size")
    base = general_input_size(model)
    stride = config.patch_size * 2 ** (len(config.depths) - 1)

    def pads_everywhere(size: int, w: int) -> bool:
        feature = -(-size // config.patch_size)
        for stage in range(len(config.depths)):
            if stage:
                feature = -(-feature // 2)
            if feature % w == 0:
                return False
        return True

    sizes = []
    for axis in range(2):
        size = base[axis] + axis * config.patch_size  # odd multiples keep H != W
        while not pads_everywhere(size, window[axis]) and size < base[axis] + 64 * stride:
            size += config.patch_size
        sizes.append(size)
    if sizes[0] == sizes[1]:
        sizes[1] += config.patch_size
    return sizes[0], sizes[1]


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
    serves every input size of at least :func:`general_input_size` (every stage's map larger
    than the window; smaller inputs follow another window rule, and the graph does not check).
    Patch, merge and window padding are traced as functions of the size. The trace runs in
    eval mode on ``example_input`` (default: batch 2 at :func:`example_size`).

    Args:
        model: a winattn model (``create_model``), or any module taking ``(B, C, H, W)`` images.
        path: the ``.onnx`` file to write.
        opset: ONNX opset, at least 17.
        dynamic: True: symbolic batch/height/width, exact for inputs of at least
            :func:`general_input_size` per side (a warning says so when that excludes the
            model's own size); ``"batch"``: symbolic batch, height and width fixed at the
            model's own size (``data_config``), exact there; False: fixed to
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
        size = own_size if dynamic == "batch" else example_size(model)
        example_input = torch.randn(2, model.config.in_chans, *size)
    dynamic_shapes = None
    if dynamic:
        dim = torch.export.Dim.DYNAMIC
        dynamic_shapes = ({0: dim} if dynamic == "batch" else {0: dim, 2: dim, 3: dim},)
    if dynamic is True:
        low = general_input_size(model)
        if own_size[0] < low[0] or own_size[1] < low[1]:
            warnings.warn(
                f"the exported graph is exact for inputs of at least {low[0]}x{low[1]} pixels; "
                f"the model's own size {own_size[0]}x{own_size[1]} is below that (a window "
                f"shrinks or a shift is dropped there) and would give other outputs: export "
                f"with dynamic='batch' for that size",
                stacklevel=2,
            )
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




