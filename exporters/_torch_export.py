"""Shared torch → ONNX machinery for the framework exporters (torchvision now, Keras 3 later).

A *dreamable model* (see ``onnxdream.exporters.graph.contract``) is produced in five steps:

1. ``prepare_for_export``: make the network traceable with dynamic H/W and without aliasing —
   every ``inplace`` flag is turned off and each ``nn.AdaptiveAvgPool2d`` whose output is not 1×1
   is swapped for :class:`DynamicAdaptiveAvgPool2d` (two matmuls with pooling matrices built from
   the runtime H and W). The changes are undone afterwards, so a caller's module is left as it was.
2. ``DreamWrapper``: the model's own preprocessing (ImageNet mean/std by default) in front of the
   network, and forward hooks that copy (``clone``) each layer's output into an extra output.
3. ``torch.onnx.export`` with the TorchScript exporter (fast); dynamo only as a last resort.
4. A probe with onnxruntime at the native size and at an odd size; if the odd size fails or does
   not match torch, the model is exported again with a fixed H/W.
5. The layer outputs are dropped from the graph outputs (the tensors stay, named, inside the graph),
   metadata is written, and the file is saved atomically.

torch is imported lazily: importing this module does not need it.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxdream.errors import DependencyError, ModelError
from onnxdream.exporters.graph.contract import model_metadata

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYER_PREFIX = "layer:"
# protobuf cannot serialise a message over 2 GiB; above this the weights go to OUT.onnx.data
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

Progress = Callable[[str], None] | None


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


def _say(progress: Progress, message: str) -> None:
    if progress is not None:
        progress(message)


# --------------------------------------------------------------------------------------------
# 1. Making a network exportable with dynamic H/W
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
# 2. Wrapper: preprocessing in front, layer outputs captured by hooks
# --------------------------------------------------------------------------------------------


def imagenet_preprocess(x: Any) -> Any:
    """[0,1] RGB → ImageNet mean/std normalised (torchvision's convention)."""
    torch = import_torch()
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def tensor_name_for(path: str, taken: set[str]) -> str:
    """A unique graph tensor name for the layer at module path ``path``."""
    base = LAYER_PREFIX + re.sub(r"[^A-Za-z0-9_.]", "_", path)
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


@dataclass
class LayerInfo:
    path: str
    tensor: str
    shape: tuple[int, ...]  # at the native size, batch 1


def _logits_of(output: Any) -> Any:
    torch = import_torch()
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelError(f"the model's output is a {type(output).__name__}, not a logits tensor")


def make_wrapper(model: Any, preprocess: Callable[[Any], Any], layers: Mapping[str, Any]) -> Any:
    """``image`` → (logits, *captured layer outputs); ``wrapper.capture`` lists the paths."""
    torch = import_torch()

    class DreamWrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.capture: list[str] = []
            self.seen: dict[str, Any] = {}
            self._handles: list[Any] = []

        def attach(self) -> None:
            for path, module in layers.items():
                self._handles.append(module.register_forward_hook(self._hook(path)))

        def detach(self) -> None:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

        def _hook(self, path: str) -> Callable[..., None]:
            def hook(_module: Any, _inputs: Any, output: Any) -> None:
                if isinstance(output, torch.Tensor) and output.is_floating_point():
                    # clone: a later in-place op (resnet's `out += identity`) must not change it
                    self.seen[path] = output.clone()

            return hook

        def forward(self, image: Any) -> Any:
            self.seen = {}
            logits = _logits_of(self.model(preprocess(image)))
            if not self.capture:
                return logits
            return (logits, *[self.seen[p] for p in self.capture])

    return DreamWrapper()


# --------------------------------------------------------------------------------------------
# 3./4. Export and probe
# --------------------------------------------------------------------------------------------


def odd_size(size: int) -> tuple[int, int]:
    """A non-square probe size different from ``size`` (224 → 179×211)."""

    def odd(v: float) -> int:
        n = int(round(v))
        return n if n % 2 else n + 1

    return odd(size * 0.8), odd(size * 0.94)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence what the exporters print (C++ logs included) by pointing fds 1 and 2 elsewhere."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _torch_export(
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
        with warnings.catch_warnings(), _quiet():
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
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable this way"
        return f"onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})"
    for image, want in cases:
        hw = "×".join(str(d) for d in image.shape[2:])
        try:
            (got,) = session.run([output_name], {"image": image})
        except Exception as exc:  # noqa: BLE001
            return f"onnxruntime fails at {hw} ({str(exc).splitlines()[0][:200]})"
        err = _relative_error(got, want)
        if not err <= rtol:
            return f"{output_name} differ from torch at {hw} (relative error {err:.2e})"
    return None


# --------------------------------------------------------------------------------------------
# 5. Finishing the model: outputs, metadata, atomic save
# --------------------------------------------------------------------------------------------


def finalize(
    model: Any,
    layers: Mapping[str, str],
    metadata: Mapping[str, str],
    output_name: str = "logits",
) -> Any:
    """Keep only ``output_name`` as graph output (layer tensors stay inside) and set metadata."""
    graph = model.graph
    keep = [o for o in graph.output if o.name == output_name]
    if not keep:
        raise ModelError(f"the exported graph has no {output_name!r} output")
    del graph.output[:]
    graph.output.extend(keep)
    produced = {out for node in graph.node for out in node.output}
    missing = [t for t in layers.values() if t not in produced]
    if missing:
        raise ModelError(f"exported graph lacks the layer tensors {missing[:5]}")
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "onnxdream"
    return model


def _weight_bytes(model: Any) -> int:
    total = 0
    for init in model.graph.initializer:
        total += len(init.raw_data) if init.HasField("raw_data") else 4 * max(
            len(init.float_data), len(init.int64_data), len(init.int32_data)
        )
    return total


def save_atomic(model: Any, out: Path) -> Path:
    """Write ``out`` (and ``out.data`` for models over ~2 GB) via a temp dir and os.replace."""
    import onnx

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    external = _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = out.name + ".data"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if external:
            onnx.save_model(
                model,
                str(tmp / out.name),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            os.replace(tmp / data_name, out.parent / data_name)
        else:
            onnx.save_model(model, str(tmp / out.name))
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------
# The whole export
# --------------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    path: Path
    dynamic_hw: bool
    exporter: str
    layers: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def default_layer(model: Any, layer_paths: Sequence[str], fraction: float = 0.6) -> str | None:
    """A mid-network layer: descend the trunk, then the child at ``fraction`` of its weights.

    "Weight" is the count of descendant modules that own parameters (conv, bn, linear, norm), so
    stems of a few modules count little and big stages count a lot.
    """
    known = set(layer_paths)

    def weight(module: Any) -> int:
        return sum(1 for m in module.modules() if any(True for _ in m.parameters(recurse=False)))

    prefix, node = "", model
    while True:
        # containers that are never called (ModuleList) are not layers but may hold the trunk
        everything = [(f"{prefix}{n}", c) for n, c in node.named_children()]
        if not everything:
            break
        weights = [weight(c) for _, c in everything]
        total = sum(weights) or 1
        heaviest = max(range(len(everything)), key=lambda i: weights[i])
        child_path, child = everything[heaviest]
        if weights[heaviest] >= 0.8 * total and any(True for _ in child.children()):
            prefix, node = child_path + ".", child
            continue
        children = [(p, c) for p, c in everything if p in known]
        weights = [w for (p, _), w in zip(everything, weights) if p in known]
        total = sum(weights) or 1
        if not children:
            break
        acc = 0
        for (path, _), w in zip(children, weights):
            acc += w
            if acc >= fraction * total:
                return path
        return children[-1][0]
    return layer_paths[len(layer_paths) * 6 // 10] if layer_paths else None


def export_module(
    module: Any,
    out: str | os.PathLike[str],
    *,
    name: str,
    input_size: int | tuple[int, int],
    source: str = "",
    license: str = "",
    labels: Sequence[str] | None = None,
    default_layers: Sequence[str] | None = None,
    preprocess: Callable[[Any], Any] | None = None,
    layers: Mapping[str, Any] | None = None,
    opset: int = 18,
    progress: Progress = None,
    rtol: float = 1e-3,
    dynamic: bool = True,
    extra_metadata: Mapping[str, str] | None = None,
    output_name: str = "logits",
) -> ExportResult:
    """Export a torch classifier as a dreamable model (see the contract) at ``out``.

    ``module`` maps a preprocessed [N,3,H,W] tensor to logits; ``preprocess`` maps the [0,1] RGB
    image to the module's input (default: ImageNet mean/std). ``layers`` maps layer names to the
    modules whose outputs are exposed (default: every non-root entry of ``named_modules()``);
    entries that do not output a float tensor are left out. ``input_size`` is the native size
    used to trace and probe (square, or (H, W)). With ``dynamic`` the export first tries
    symbolic H/W and keeps it only if onnxruntime matches torch at an odd size too. The module
    is put in eval mode; other changes made for the export are undone. ``output_name`` names the module's output in
    the graph: ``logits`` for classifiers; a headless network (a Keras application built without
    its top) exports its last feature map under another name, so nothing mistakes it for logits.
    """
    torch = import_torch()
    import onnx

    out = Path(out)
    preprocess = preprocess or imagenet_preprocess
    if layers is None:
        layers = {path: m for path, m in module.named_modules() if path}
    module.eval()
    restore, swapped = prepare_for_export(module)
    layers = {path: swapped.get(id(m), m) for path, m in layers.items()}
    wrapper = make_wrapper(module, preprocess, layers)
    wrapper.eval()
    try:
        generator = torch.Generator().manual_seed(0)
        ih, iw = (input_size, input_size) if isinstance(input_size, int) else input_size
        native = torch.rand(1, 3, ih, iw, generator=generator)
        oh, ow = odd_size(ih)[0], odd_size(iw)[1]
        odd = torch.rand(2, 3, oh, ow, generator=generator)
        native2 = torch.rand(2, 3, ih, iw, generator=generator)

        _say(progress, f"tracing {name} at {ih}×{iw}")
        wrapper.attach()
        with torch.no_grad():
            want_native = wrapper(native).numpy()
            shapes = {p: tuple(t.shape) for p, t in wrapper.seen.items()}
            can_odd = dynamic
            want_odd = want_native2 = None
            if dynamic:
                try:
                    want_odd = wrapper(odd).numpy()
                except Exception:  # noqa: BLE001 - the network itself needs its native size
                    can_odd = False
            want_native2 = wrapper(native2).numpy()
        module_order = {path: i for i, path in enumerate(layers)}
        captured = sorted(shapes, key=lambda p: module_order[p])
        taken: set[str] = {"image", output_name}
        infos = [LayerInfo(p, tensor_name_for(p, taken), shapes[p]) for p in captured]
        wrapper.capture = [i.path for i in infos]
        output_names = [output_name, *[i.tensor for i in infos]]

        attempts: list[tuple[str, bool, bool]] = []  # (label, dynamic_hw, dynamo)
        if can_odd:
            attempts.append(("torchscript, dynamic H/W", True, False))
        attempts += [("torchscript, fixed H/W", False, False), ("dynamo, fixed H/W", False, True)]
        notes: list[str] = []
        if dynamic and not can_odd:
            notes.append(f"torch itself cannot run {name} at {oh}×{ow}")
        with tempfile.TemporaryDirectory(prefix="onnxdream-export-") as tmpdir:
            for label, dyn, dynamo in attempts:
                path = Path(tmpdir) / f"{len(notes)}.onnx"
                _say(progress, f"exporting {name} ({label})")
                try:
                    example = native2 if dynamo else native  # export specialises a batch of 1
                    _torch_export(wrapper, example, path, output_names, opset, dyn, dynamo)
                except Exception as exc:  # noqa: BLE001
                    notes.append(f"{label}: export failed ({str(exc).splitlines()[0][:200]})")
                    continue
                _say(progress, f"checking {name} with onnxruntime")
                cases = [(native.numpy(), want_native), (native2.numpy(), want_native2)]
                if dyn:
                    cases.append((odd.numpy(), want_odd))
                why = probe(path, cases, rtol, output_name)
                if why is None:
                    model = onnx.load(str(path))
                    break
                notes.append(f"{label}: {why}")
            else:
                raise ModelError(
                    f"could not export {name} to ONNX: " + "; ".join(notes[-3:])
                )
    finally:
        wrapper.detach()
        restore()

    layer_map = {i.path: i.tensor for i in infos}
    if default_layers is None:
        guess = default_layer(module, captured)
        default_layers = [guess] if guess else []
    metadata = model_metadata(name=name, source=source, license=license, input_size=(ih, iw),
                              dynamic_hw=dyn, layers=layer_map, default_layers=default_layers,
                              labels=labels)
    metadata.update(extra_metadata or {})
    finalize(model, layer_map, metadata, output_name)
    _say(progress, f"writing {out}")
    save_atomic(model, out)
    exporter = label.split(",")[0]
    return ExportResult(out, dyn, exporter, layer_map, notes)
