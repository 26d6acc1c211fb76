"""One execution path to a file: ONNX (for ONNX Runtime) or a ``torch.export`` program.

The path is first cut to a standalone module (``slice.path_module``), then traced for its fixed
config, so the file holds only the weights the path reads and a graph without knobs. The batch
dimension stays dynamic; every other shape is fixed by the path (token-reduction paths keep
``ceil(keep * n)`` tokens, or remove a constant ``r`` per block, whatever the image, so they
export with static token counts). A path
whose shapes depend on the image (``token_threshold``) has no such graph and is refused.

ONNX uses the TorchScript exporter (``dynamo=False``): it needs no extra packages and exports
every family's forward. PyTorch's antialiased bilinear resize (the ``resolution`` knob when it
shrinks the input) has no default ONNX translation; ``Resize`` with ``antialias=1`` and
``exclude_outside=1`` computes the same filter, and is registered for it here.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from dynavit.config import ExecConfig
from dynavit.deploy.slice import DeployError, PathModule, path_module

FORMATS = {"onnx": ".onnx", "torch.export": ".pt2"}
OPSET = 18
INPUT, OUTPUT = "pixel_values", "logits"


def _resize_aa(g: Any, x: Any, output_size: Any, align_corners: Any, scales: Any) -> Any:
    """ONNX for ``aten::_upsample_bilinear2d_aa`` (align_corners=False, which is all dynavit uses)."""
    shape = g.op("Shape", x)
    zero, two = g.op("Constant", value_t=torch.tensor([0])), g.op("Constant", value_t=torch.tensor([2]))
    lead = g.op("Slice", shape, zero, two)
    sizes = g.op("Concat", lead, g.op("Cast", output_size, to_i=7), axis_i=0)  # 7: int64
    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    return g.op("Resize", x, empty, empty, sizes, mode_s="linear", antialias_i=1, exclude_outside_i=1,
                coordinate_transformation_mode_s="half_pixel")


_registered: list[bool] = []


def _register_symbolics() -> None:
    """Once, at the first ONNX export (``torch.onnx`` is imported on first use, not with dynavit)."""
    if not _registered:
        torch.onnx.register_custom_op_symbolic("aten::_upsample_bilinear2d_aa", _resize_aa, OPSET)
        _registered.append(True)


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise DeployError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def export(dm: Any, path: str | Path, config: ExecConfig | dict | None = None, *, format: str = "onnx",
           sliced: bool = True) -> Path:
    """Write ``config`` (default: ``dm``'s current path) of ``dm`` to ``path`` as ``format``; returns the path.

    Raises ``DeployError`` saying why when the path has no fixed graph.
    """
    check_format(format)
    module = path_module(dm, config, sliced=sliced)
    return write(module, dm.example_input(2), path, format)


def write(module: PathModule, example: torch.Tensor, path: str | Path, fmt: str) -> Path:
    """Trace ``module`` on ``example`` (batch > 1: the batch stays dynamic) into ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            if fmt == "onnx":
                _onnx(module, example, path)
            else:
                batch = torch.export.Dim("batch", min=1, max=65536)
                program = torch.export.export(module, (example,), dynamic_shapes={INPUT: {0: batch}})
                torch.export.save(program, str(path))
    except DeployError:
        raise
    except Exception as e:  # a tracer's failure: say which path and why, keep the cause
        raise DeployError(f"path {module.config!r} could not be exported as {fmt}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return path


def _onnx(module: PathModule, example: torch.Tensor, path: Path) -> None:
    _register_symbolics()
    with warnings.catch_warnings():  # tracer warnings about Python ints are expected: shapes are fixed per path
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=OPSET, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})


def load_program(path: str | Path) -> torch.nn.Module:
    """A ``torch.export`` file back as a callable module."""
    return torch.export.load(str(path)).module()
