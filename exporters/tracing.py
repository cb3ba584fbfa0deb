"""The torch side of an export: making a module traceable with dynamic H/W, running torch's ONNX
exporter quietly, and checking what it wrote with onnxruntime against torch.

:func:`onnxdream.exporters.torch_export.export_module` drives these steps. torch is imported
lazily: importing this module does not need it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from onnxdream.core.errors import DependencyError, first_line
from onnxdream.core.fdredirect import output_to

__all__ = [
    "import_torch",
    "make_dynamic_adaptive_avg_pool",
    "odd_size",
    "prepare_for_export",
    "probe",
    "run_exporter",
]


def import_torch() -> Any:
    """Import torch, or raise DependencyError with the install hint."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DependencyError(
            'exporting needs PyTorch, which is not installed; install onnxdream[torch] '
            '(pip install "onnxdream[torch]")'
        ) from exc
    return torch


# --------------------------------------------------------------------------------------------
# Making a network exportable with dynamic H/W
# --------------------------------------------------------------------------------------------


def _pool_matrix(torch: Any, n: Any, out: int, dtype: Any, device: Any) -> Any:
    """[out, n] matrix whose rows average the adaptive-pool windows of a length-``n`` axis.

    ``n`` is a 0-d int64 tensor (traced, so the exported graph computes it from the input's
    shape). Window i spans [floor(i·n/out), ceil((i+1)·n/out)), as in torch's adaptive pooling.
    """
    i = torch.arange(out, device=device, dtype=torch.int64)
    start = torch.div(i * n, out, rounding_mode="floor")
    end = torch.div((i + 1) * n + (out - 1), out, rounding_mode="floor")
    pos = torch.arange(n, device=device, dtype=torch.int64)  # type: ignore[call-overload]
    inside = (pos.unsqueeze(0) >= start.unsqueeze(1)) & (pos.unsqueeze(0) < end.unsqueeze(1))
    return inside.to(dtype) / (end - start).unsqueeze(1).to(dtype)


def make_dynamic_adaptive_avg_pool(original: Any) -> Any:
    """An ``nn.Module`` equal to ``original`` (an AdaptiveAvgPool2d) that traces shape-generic."""
    torch = import_torch()
    size = original.output_size
    oh, ow = (size, size) if isinstance(size, int) or size is None else tuple(size)

    class DynamicAdaptiveAvgPool2d(torch.nn.Module):
        """Adaptive average pooling as ``Ph @ x @ Pwᵀ``; exports to MatMul with dynamic H/W."""

        def __init__(self) -> None:
            super().__init__()
            self.output_size = size

        def forward(self, x: Any) -> Any:
            shape = torch._shape_as_tensor(x)
            if oh is not None:
                ph = _pool_matrix(torch, shape[-2], oh, x.dtype, x.device)
                x = torch.matmul(ph, x)
            if ow is not None:
                pw = _pool_matrix(torch, shape[-1], ow, x.dtype, x.device)
                x = torch.matmul(x, pw.transpose(0, 1))
            return x

    return DynamicAdaptiveAvgPool2d()


def prepare_for_export(model: Any) -> tuple[Callable[[], None], dict[int, Any]]:
    """Turn off ``inplace`` flags and swap non-global adaptive average pools.

    Returns an undo function and the swaps as {id(original module): replacement}.
    """
    torch = import_torch()
    undo: list[Callable[[], None]] = []
    swapped: dict[int, Any] = {}
    for module in list(model.modules()):
        if isinstance(getattr(module, "inplace", None), bool) and module.inplace:
            module.inplace = False
            undo.append(lambda m=module: setattr(m, "inplace", True))
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.AdaptiveAvgPool2d):
                size = child.output_size
                sizes = (size, size) if isinstance(size, int) or size is None else tuple(size)
                if all(s == 1 for s in sizes):
                    continue  # exports as GlobalAveragePool already
                swapped[id(child)] = make_dynamic_adaptive_avg_pool(child)
                setattr(parent, child_name, swapped[id(child)])
                undo.append(lambda p=parent, n=child_name, c=child: setattr(p, n, c))

    def restore() -> None:
        for step in reversed(undo):
            step()

    return restore, swapped


# --------------------------------------------------------------------------------------------
# Export and probe
# --------------------------------------------------------------------------------------------


def odd_size(size: int) -> tuple[int, int]:
    """A non-square probe size different from ``size`` (224 → 179×211)."""

    def odd(v: float) -> int:
        n = int(round(v))
        return n if n % 2 else n + 1

    return odd(size * 0.8), odd(size * 0.94)


def run_exporter(
    wrapper: Any,
    example: Any,
    path: Path,
    output_names: list[str],
    opset: int,
    dynamic_hw: bool,
    dynamo: bool,
) -> None:
    torch = import_torch()
    axes: dict[str, dict[int, str]] = {"image": {0: "batch"}, output_names[0]: {0: "batch"}}
    if dynamic_hw:
        axes["image"].update({2: "height", 3: "width"})
    # no torch.no_grad(): without grad nn.MultiheadAttention takes its fused fast path
    # (aten::_native_multi_head_attention), which the TorchScript exporter cannot translate
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), output_to(os.devnull):  # C++ logs too
            warnings.simplefilter("ignore")
            if not dynamo:
                torch.onnx.export(
                    wrapper,
                    (example,),
                    str(path),
                    input_names=["image"],
                    output_names=output_names,
                    opset_version=opset,
                    dynamic_axes=axes,
                    do_constant_folding=True,
                    dynamo=False,
                )
            else:
                batch = torch.export.Dim("batch", min=1, max=1024)
                dims: dict[int, Any] = {0: batch}
                if dynamic_hw:
                    dims.update({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO})
                program = torch.onnx.export(
                    wrapper,
                    (example,),
                    input_names=["image"],
                    output_names=output_names,
                    opset_version=opset,
                    dynamic_shapes={"image": dims},
                    dynamo=True,
                    optimize=True,
                )
                program.save(str(path), external_data=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _relative_error(got: Any, want: Any) -> float:
    import numpy as np

    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return float("inf")
    scale = max(float(np.abs(want).max()), 1e-6)
    return float(np.abs(got - want).max()) / scale


def probe(
    path: Path, cases: Sequence[tuple[Any, Any]], rtol: float, output_name: str = "logits"
) -> str | None:
    """Run onnxruntime on each (image, torch output) case; None if all match, else why not."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover
        raise DependencyError(
            'probing the exported model needs onnxruntime; install onnxdream[cpu]'
        ) from exc
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failing case is returned as the reason, not logged
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable this way"
        return f"onnxruntime cannot load it ({first_line(exc)})"
    for image, want in cases:
        hw = "×".join(str(d) for d in image.shape[2:])
        try:
            (got,) = session.run([output_name], {"image": image})
        except Exception as exc:  # noqa: BLE001
            return f"onnxruntime fails at {hw} ({first_line(exc)})"
        err = _relative_error(got, want)
        if not err <= rtol:
            return f"{output_name} differ from torch at {hw} (relative error {err:.2e})"
    return None
