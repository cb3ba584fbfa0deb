"""torch → dreamable ONNX model: the machinery behind every exporter (torchvision, Keras on its
torch backend, and a user's own ``nn.Module`` through :func:`export_module`).

A *dreamable model* follows the contract documented in :mod:`onnxdream.exporters.graph.contract`
(``exporters/graph/contract.py``): input ``image`` float32 [N,3,H,W] RGB in [0,1], the model's
preprocessing inside the graph, its layers named in the metadata. It is produced in five steps
(1, 3 and 4 live in :mod:`onnxdream.exporters.tracing`):

1. ``prepare_for_export``: make the network traceable with dynamic H/W and without aliasing —
   every ``inplace`` flag is turned off and each ``nn.AdaptiveAvgPool2d`` whose output is not 1×1
   is swapped for a dynamic one (two matmuls with pooling matrices built from the runtime H and
   W). The changes are undone afterwards, so a caller's module is left as it was.
2. ``make_wrapper``: the model's own preprocessing (ImageNet mean/std by default) in front of the
   network, and forward hooks that copy (``clone``) each layer's output into an extra output.
3. ``torch.onnx.export`` with the TorchScript exporter (fast); dynamo when the TorchScript graph
   does not serve other sizes (it keeps shape-dependent branches symbolic), and as a last resort.
4. A probe with onnxruntime at the native size and at an odd size; if the odd size fails or does
   not match torch, the model is exported again with a fixed H/W.
5. The layer outputs are dropped from the graph outputs (the tensors stay, named, inside the graph),
   metadata is written, and the file is saved atomically.

torch is imported lazily: importing this module does not need it.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxdream.core.errors import ModelError, OnnxDreamError, closest, first_line
from onnxdream.exporters.graph import onnxfile
from onnxdream.exporters.graph.contract import PREPROCESS_KEY, model_metadata
from onnxdream.exporters.graph.layers import recommend_layers
from onnxdream.exporters.preprocess import PREPROCESSING, imagenet_preprocess, preprocess_fn
from onnxdream.exporters.tracing import (
    import_torch,
    odd_size,
    prepare_for_export,
    probe,
    run_exporter,
)

LAYER_PREFIX = "layer:"
#: protobuf cannot serialise a message over 2 GiB; above this the weights go to OUT.onnx.data
EXTERNAL_DATA_THRESHOLD = onnxfile.EXTERNAL_DATA_THRESHOLD

Progress = Callable[[str], None] | None


def say(progress: Progress, message: str) -> None:
    """Report a short status line to ``progress`` (an exporter's callback), if there is one."""
    if progress is not None:
        progress(message)


class ExportError(ModelError):
    """Exporting ``model`` failed in a way no check foresaw; the original is ``__cause__``."""

    field = "model"

    def __init__(self, model: str, message: str) -> None:
        super().__init__(message)
        self.model = model


@contextmanager
def export_errors(name: str) -> Iterator[None]:
    """Turn any unexpected exception into an :class:`ExportError`: one line naming ``name``.

    onnxdream's own errors pass through unchanged (they already say what to do); so do
    KeyboardInterrupt and SystemExit, which are not ``Exception``s.
    """
    try:
        yield
    except OnnxDreamError:
        raise
    except MemoryError as exc:
        raise ExportError(name, f"ran out of memory exporting {name}") from exc
    except Exception as exc:  # noqa: BLE001 - anything else becomes one sentence
        raise ExportError(
            name, f"could not export {name}: {type(exc).__name__}: {first_line(exc)}"
        ) from exc


# --------------------------------------------------------------------------------------------
# 2. Wrapper: preprocessing in front, layer outputs captured by hooks
# --------------------------------------------------------------------------------------------


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


def save_atomic(model: Any, out: Path) -> Path:
    """Write an exported model with :func:`onnxdream.exporters.graph.onnxfile.save_model`:
    atomically, its directory made if missing, the weights in ``out.data`` beside it above
    :data:`EXTERNAL_DATA_THRESHOLD` bytes."""
    return onnxfile.save_model(model, out, parents=True, external_above=EXTERNAL_DATA_THRESHOLD)


# --------------------------------------------------------------------------------------------
# The whole export
# --------------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    """What an export wrote, and how it went.

    ``path`` is the .onnx file written (a result is also path-like: ``os.fspath(result)``);
    ``dynamic_hw`` whether it runs at any height and width (else only at its native size);
    ``exporter`` the torch exporter that succeeded (``torchscript`` or ``dynamo``); ``layers``
    maps each layer name to its tensor in the graph; ``default_layers`` are the layers a dream
    uses when none is named, ``recommended_layers`` the ones worth dreaming (the atlas's);
    ``notes`` say, one sentence each, what was tried and did not work.
    """

    path: Path
    dynamic_hw: bool
    exporter: str
    layers: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    default_layers: list[str] = field(default_factory=list)
    recommended_layers: list[str] = field(default_factory=list)

    def __fspath__(self) -> str:
        return os.fspath(self.path)


def _weight(module: Any) -> int:
    """A module's "weight": the count of its descendant modules that own parameters (conv, bn,
    linear, norm), so stems of a few modules count little and big stages count a lot."""
    return sum(1 for m in module.modules() if any(True for _ in m.parameters(recurse=False)))


def _trunk(model: Any) -> tuple[list[tuple[str, Any]], list[int]]:
    """The children (path, module) and weights of the trunk's level that branches: descend
    while one child holds >= 80 % of the weight and has children of its own. Containers that
    are never called (ModuleList) are not layers but may hold the trunk. ([], []) when the
    descent ends at a module without children."""
    prefix, node = "", model
    while True:
        children = [(f"{prefix}{n}", c) for n, c in node.named_children()]
        if not children:
            return [], []
        weights = [_weight(c) for _, c in children]
        heaviest = max(range(len(children)), key=lambda i: weights[i])
        path, child = children[heaviest]
        if weights[heaviest] >= 0.8 * (sum(weights) or 1) and any(True for _ in child.children()):
            prefix, node = path + ".", child
            continue
        return children, weights


def default_layer(model: Any, layer_paths: Sequence[str], fraction: float = 0.6) -> str | None:
    """A mid-network layer: descend the trunk, then the child at ``fraction`` of its weights
    (see :func:`_weight`)."""
    known = set(layer_paths)
    everything, weights = _trunk(model)
    children = [(p, c) for p, c in everything if p in known]
    weights = [w for (p, _), w in zip(everything, weights) if p in known]
    total = sum(weights) or 1
    if not children:
        return layer_paths[len(layer_paths) * 6 // 10] if layer_paths else None
    acc = 0
    for (path, _), w in zip(children, weights):
        acc += w
        if acc >= fraction * total:
            return path
    return children[-1][0]


def trunk_blocks(model: Any, layer_paths: Sequence[str]) -> list[tuple[str, int]]:
    """The trunk's blocks with their weights, in order: descend the trunk as
    :func:`default_layer` does; a sequential child (Sequential, ModuleList) holding two or more
    layers with weights (a ResNet stage, a stage of MBConv blocks, VGG's features) counts as
    its layers. Pools are left out; only ``layer_paths`` are returned."""
    torch = import_torch()
    known = set(layer_paths)
    sequential = (torch.nn.Sequential, torch.nn.ModuleList)
    children, _ = _trunk(model)

    def pool(module: Any) -> bool:  # a pool's output is its input, smaller
        return "Pool" in type(module).__name__

    blocks: list[tuple[str, int]] = []
    children = [(p, c) for p, c in children if not pool(c)]
    for path, child in children:
        inner = [(f"{path}.{n}", _weight(c)) for n, c in child.named_children()
                 if f"{path}.{n}" in known and not pool(c)]
        if isinstance(child, sequential) and sum(w > 0 for _, w in inner) >= 2:
            blocks += inner
        elif path in known:
            blocks.append((path, _weight(child)))
    return blocks


def recommended_layers(model: Any, layer_paths: Sequence[str], default: Sequence[str],
                       order: Sequence[str] = ()) -> list[str]:
    """The recommended layers of an exported module: its trunk's blocks (those of
    ``layer_paths``, which should be the feature maps) spread over the middle of the network
    (:func:`~onnxdream.exporters.graph.layers.recommend_layers`) plus the default layers, in
    network ``order``."""
    blocks = trunk_blocks(model, layer_paths)
    return recommend_layers([p for p, _ in blocks], default, weights=[w for _, w in blocks],
                            order=order)


def _export_module(
    module: Any,
    out: Path,
    *,
    name: str,
    input_size: int | tuple[int, int],
    source: str,
    license: str,
    labels: Sequence[str] | None,
    default_layers: Sequence[str] | None,
    recommended: Sequence[str] | None,
    preprocess: Callable[[Any], Any],
    layers: Mapping[str, Any],
    opset: int,
    progress: Progress,
    rtol: float,
    dynamic: bool,
    extra_metadata: Mapping[str, str],
    output_name: str,
    transform: Callable[[Any], object] | None,
) -> ExportResult:
    """:func:`export_module` once its arguments are checked and resolved."""
    torch = import_torch()
    import onnx

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

        say(progress, f"tracing {name} at {ih}×{iw}")
        wrapper.attach()
        with torch.no_grad():
            want_native = wrapper(native).numpy()
            if labels is not None and want_native.ndim == 2 and want_native.shape[1] != len(labels):
                raise ModelError(f"{len(labels)} labels for {name}, but it outputs "
                                 f"{want_native.shape[1]} {output_name}: give one label each")
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
        silent = [p for p in default_layers or () if p not in shapes]
        if silent:
            raise ModelError(f"default layer {silent[0]!r} of {name} does not output a float "
                             "tensor (a module that is never called, or returns a tuple)")
        taken: set[str] = {"image", output_name}
        infos = [LayerInfo(p, tensor_name_for(p, taken), shapes[p]) for p in captured]
        wrapper.capture = [i.path for i in infos]
        output_names = [output_name, *[i.tensor for i in infos]]

        attempts: list[tuple[str, bool, bool]] = []  # (label, dynamic_hw, dynamo)
        if can_odd:
            # dynamo second: it keeps shape-dependent branches symbolic (timm's ViTs resample
            # their position embedding only while torch.export runs) but is slower
            attempts += [("torchscript, dynamic H/W", True, False),
                         ("dynamo, dynamic H/W", True, True)]
        attempts += [("torchscript, fixed H/W", False, False), ("dynamo, fixed H/W", False, True)]
        notes: list[str] = []
        if dynamic and not can_odd:
            notes.append(f"torch itself cannot run {name} at {oh}×{ow}")
        with tempfile.TemporaryDirectory(prefix="onnxdream-export-") as tmpdir:
            for label, dyn, dynamo in attempts:
                path = Path(tmpdir) / f"{len(notes)}.onnx"
                say(progress, f"exporting {name} ({label})")
                try:
                    example = native2 if dynamo else native  # export specialises a batch of 1
                    run_exporter(wrapper, example, path, output_names, opset, dyn, dynamo)
                except Exception as exc:  # noqa: BLE001
                    notes.append(f"{label}: export failed ({first_line(exc)})")
                    continue
                say(progress, f"checking {name} with onnxruntime")
                cases = [(native.numpy(), want_native), (native2.numpy(), want_native2)]
                if dyn:
                    cases.append((odd.numpy(), want_odd))
                why = probe(path, cases, rtol, output_name)
                if why is None:
                    model = onnx.load(str(path))
                    break
                notes.append(f"{label}: {why}")
            else:
                tried = "; ".join(notes[-3:])
                raise ExportError(name, f"could not export {name} to ONNX: {tried}")
    finally:
        wrapper.detach()
        restore()

    layer_map = {i.path: i.tensor for i in infos}
    if default_layers is None:
        guess = default_layer(module, captured)
        default_layers = [guess] if guess else []
    if recommended is None:  # in the order layers finish in a forward pass (a stage last)
        maps = [p for p in captured if len(shapes[p]) == 4]  # feature maps, not vectors
        recommended = recommended_layers(module, maps, default_layers, order=list(shapes))
    recommended = [p for p in recommended if p in layer_map]  # those that output a tensor
    metadata = model_metadata(name=name, source=source, license=license, input_size=(ih, iw),
                              dynamic_hw=dyn, layers=layer_map, default_layers=default_layers,
                              recommended_layers=recommended, labels=labels)
    metadata.update(extra_metadata or {})
    finalize(model, layer_map, metadata, output_name)
    if transform is not None:
        transform(model)
    say(progress, f"writing {out}")
    save_atomic(model, out)
    exporter = label.split(",")[0]
    return ExportResult(out, dyn, exporter, layer_map, notes, list(default_layers), recommended)


def _resolve_layers(module: Any, layers: Any, name: str) -> dict[str, Any]:
    """{layer name: module} from None (every submodule), module paths, or such a mapping."""
    if layers is None:
        return {path: m for path, m in module.named_modules() if path}
    if isinstance(layers, Mapping):
        return dict(layers)
    if isinstance(layers, str):
        layers = [layers]
    named = list(module.named_modules())
    order = {path: i for i, (path, _) in enumerate(named)}
    modules = dict(named)
    for path in layers:
        if not path or path not in modules:
            near = closest(str(path), [p for p in modules if p])
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ModelError(f"{name} has no submodule {path!r} (layers are module paths "
                             f"from named_modules()){hint}")
    return {path: modules[path] for path in sorted(set(layers), key=order.__getitem__)}


def export_module(
    module: Any,
    out: str | os.PathLike[str],
    *,
    preprocess: str | Callable[[Any], Any] | None = None,
    layers: Sequence[str] | Mapping[str, Any] | None = None,
    labels: Sequence[str] | None = None,
    input_size: int | tuple[int, int] = 224,
    default_layers: Sequence[str] | None = None,
    recommended_layers: Sequence[str] | None = None,
    name: str | None = None,
    source: str = "",
    license: str = "",
    dynamic: bool = True,
    opset: int = 18,
    rtol: float = 1e-3,
    progress: Progress = None,
    extra_metadata: Mapping[str, str] | None = None,
    output_name: str = "logits",
    transform: Callable[[Any], object] | None = None,
) -> ExportResult:
    """Export a PyTorch image network (your own ``nn.Module``) as a dreamable model at ``out``.

    The file then works with every onnxdream command (``dream``, ``visualize``, ``predict``,
    ``layers``, ``compile``) and with onnxruntime alone. ``module`` maps its preprocessed input
    [N,3,H,W] to logits [N,K] (a tensor, a tuple whose first item is one, or an object with
    ``.logits``); a headless network returning a feature map sets ``output_name="features"``.

    - ``preprocess``: how the [0,1] RGB image becomes the module's input, traced into the graph:
      None (ImageNet mean/std, as torchvision), a name from
      :data:`onnxdream.exporters.preprocess.PREPROCESSING` (``torch``, ``tf``, ``caffe``,
      ``none``, ``unit``), or a function of a torch tensor.
    - ``layers``: the modules whose outputs become dreamable layers: module paths as
      ``named_modules()`` spells them (``["layer3", "layer4.1.conv2"]``), a {name: module}
      mapping, or None for every submodule. Modules that do not output one float tensor are
      left out.
    - ``labels``: the class names, one per logit (for ``predict`` and ``class:K`` objectives).
    - ``input_size``: the native size to trace and check at: an int (square) or (H, W).
    - ``default_layers``: the layers a dream uses when none is named (default: a layer ~60% into
      the network's trunk). The recommended layers (``onnxdream atlas``) are the trunk's blocks
      at 30, 45, 60 and 75% of its depth plus these, unless ``recommended_layers`` says.
    - ``name``, ``source``, ``license``: written into the model's metadata (``name`` defaults to
      the module's class name and appears in messages).
    - ``dynamic``: try symbolic height and width first, kept only if onnxruntime matches torch at
      an odd size too; False exports at ``input_size`` only.
    - ``progress``: called with short status lines; ``opset``, ``rtol`` (the accepted relative
      error of onnxruntime against torch) and ``extra_metadata`` rarely need changing.
    - ``transform``: called with the finished ``onnx.ModelProto`` (metadata written) to change
      it in place before the one write (the Keras exporter drops its no-op Casts there).

    The module is put in eval mode; every other change made for the export (in-place flags,
    adaptive pools) is undone. Returns an :class:`ExportResult`. Raises ``ModelError`` for a
    mistake in the arguments, and an :class:`ExportError` naming the model when the export
    fails for any other reason. The file is written atomically: never half.

    Example, a small network of your own (random weights here; load yours first)::

        import torch
        from onnxdream.exporters import export_module

        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 2),
        )
        result = export_module(net, "mine.onnx", layers=["1", "3"], labels=["cat", "dog"],
                               input_size=64, name="mine")
        print(result.layers)  # {'1': 'layer:1', '3': 'layer:3'}

    and then ``onnxdream dream photo.jpg --model mine.onnx --layer 3``.
    """
    torch = import_torch()
    label = name or type(module).__name__
    with export_errors(label):
        if not isinstance(module, torch.nn.Module):
            raise ModelError(
                f"export_module takes a torch.nn.Module, not a {type(module).__name__}"
            )
        sizes = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if len(sizes) != 2 or not all(isinstance(v, int) and v > 0 for v in sizes):
            raise ModelError(f"input_size must be a positive int or (height, width), not "
                             f"{input_size!r}")
        resolved = _resolve_layers(module, layers, label)
        for what, names in (("default", default_layers), ("recommended", recommended_layers)):
            for layer in names or ():
                if layer not in resolved:
                    near = closest(str(layer), list(resolved))
                    hint = f"; did you mean {', '.join(near)}?" if near else ""
                    raise ModelError(f"{what} layer {layer!r} is not one of {label}'s "
                                     f"layers{hint}")
        if isinstance(preprocess, str):
            described = f"{preprocess}: {PREPROCESSING.get(preprocess, '')} (inside the graph)"
            preprocess = preprocess_fn(preprocess)
        elif preprocess is None:
            described, preprocess = "imagenet mean/std (inside the graph)", imagenet_preprocess
        else:
            described = "the exporter's own function (inside the graph)"
        return _export_module(
            module,
            Path(out),
            name=label,
            input_size=input_size if isinstance(input_size, int) else sizes,
            source=source,
            license=license,
            labels=labels,
            default_layers=default_layers,
            recommended=recommended_layers,
            preprocess=preprocess,
            layers=resolved,
            opset=opset,
            progress=progress,
            rtol=rtol,
            dynamic=dynamic,
            extra_metadata={PREPROCESS_KEY: described, **(extra_metadata or {})},
            output_name=output_name,
            transform=transform,
        )
