"""timm (PyTorch Image Models) classifiers → dreamable models.

``export_timm("convnext_atto", "convnext.onnx", weights="none")`` builds timm's model (a name from
``timm.list_models()``, optionally with a pretrained tag: ``vit_small_patch16_224.augreg_in1k`` or
``pretrained_cfg="augreg_in1k"``), loads weights (timm's download from the Hugging Face Hub,
none, or a user's state_dict / safetensors file) and hands it to
:func:`onnxdream.exporters.torch_export.export_module` with

- the **preprocessing** of the model's pretrained config (``timm.data.resolve_data_config``):
  ``(x - mean) / std`` inside the graph, at the config's native input size. The config's
  interpolation and crop are how timm resizes photos for evaluation; a dream works on the photo
  at its own size, so they are recorded in the metadata but not applied;
- **layer names** = module paths from ``named_modules()`` (``stages.2``, ``blocks.7``);
- a **default layer**: from the model's ``feature_info`` — the last stage at stride 16 for
  hierarchical networks (ResNet's ``layer3``, ConvNeXt's ``stages.2``), the block 60% of the way
  through for isotropic ones (ViT's ``blocks.7`` of 12) — else a layer ~60% into the trunk;
- **labels** where timm knows them: the pretrained config's own, or the ImageNet subset timm
  infers from the class count (1k, 12k, 21k, 22k; ``timm.data.ImageNetInfo``, shipped with timm);
- **any image size** where the model allows it: models with ``dynamic_img_size`` (most ViTs,
  DeiT, EVA, Swin) are built with it, which interpolates the position embedding at run time;
  networks that need multiples of their patch size or stride are padded in the graph
  (:func:`pad_multiple`). Others are probed at an odd size and exported at a fixed size when
  they cannot take it; the result's ``notes`` say why.

timm and torch are imported lazily: importing this module needs neither.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from onnxdream.core.errors import DependencyError, ModelError, OnnxDreamError, closest, first_line
from onnxdream.exporters.graph.contract import LAYOUTS_KEY, PREPROCESS_KEY
from onnxdream.exporters.torch_export import (
    ExportResult,
    Progress,
    export_errors,
    export_module,
    say,
)
from onnxdream.exporters.tracing import import_torch, odd_size
from onnxdream.exporters.weights import load_weights_file, mismatches, read_state_dict

__all__ = ["build_timm", "export_timm", "pad_multiple", "pad_to_multiple", "timm_data_config",
           "timm_labels", "timm_models"]

CODE_LICENSE = "Apache-2.0 (timm code)"
# strides tried when telling a channels-last [1, H, W, C] layer from a channels-first one
_STRIDES = (1, 2, 4, 8, 16, 32, 64)


def import_timm() -> Any:
    """The timm module; DependencyError naming the extra when it is not installed."""
    import_torch()
    try:
        import timm
    except ImportError as exc:
        raise DependencyError(
            'exporting timm models needs timm, which is not installed; install onnxdream[timm] '
            '(pip install "onnxdream[timm]")'
        ) from exc
    return timm


def timm_models(pretrained: bool = False) -> list[str]:
    """timm's architecture names (``timm.list_models()``); with ``pretrained``, the
    ``architecture.tag`` names that have pretrained weights."""
    return list(import_timm().list_models(pretrained=pretrained))


def _split_name(name: str, pretrained_cfg: str | None) -> tuple[str, str | None]:
    """(architecture, tag or None) for ``name`` (``arch`` or ``arch.tag``) and the option."""
    timm = import_timm()
    from timm.models import is_model, list_pretrained, split_model_name_tag

    arch, tag = split_model_name_tag(str(name).strip())
    if not is_model(arch):
        lowered = {n.lower(): n for n in timm.list_models()}
        if arch.lower() in lowered:
            arch = lowered[arch.lower()]
        else:
            near = closest(arch, list(lowered.values()))
            hint = f"; did you mean {', '.join(near)}?" if near else "; see timm.list_models()"
            raise ModelError(f"timm has no model named {arch!r}{hint}")
    if pretrained_cfg:
        if tag and tag != pretrained_cfg:
            raise ModelError(f"{name!r} names the pretrained config {tag!r} but "
                             f"--pretrained-cfg says {pretrained_cfg!r}: give one of them")
        tag = pretrained_cfg
    if tag:
        tags = [n.split(".", 1)[1] for n in list_pretrained(f"{arch}.*") if "." in n]
        if tag not in tags:
            near = closest(tag, tags)
            hint = (f"; did you mean {', '.join(near)}?" if near else
                    f"; its configs: {', '.join(tags[:8])}" if tags else
                    "; it has no pretrained configs")
            raise ModelError(f"timm's {arch} has no pretrained config {tag!r}{hint}")
    return arch, tag or None


def _network_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a failed connection or a missing cached file."""
    import socket
    import urllib.error

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        kind = type(cur).__name__
        if isinstance(cur, (urllib.error.URLError, socket.gaierror, socket.timeout,
                            ConnectionError, TimeoutError)) or kind in (
                "LocalEntryNotFoundError", "ConnectError", "ConnectTimeout", "ReadTimeout",
                "TimeoutException", "OfflineModeIsEnabled"):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _download_error(name: str, exc: BaseException) -> OnnxDreamError:
    text = first_line(exc, 160)
    if _network_error(exc):
        return ModelError(f"could not download the pretrained weights for {name} (no internet?); "
                          f"pass --weights none or --weights FILE")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is not None:
        return ModelError(f"could not download the pretrained weights for {name} (HTTP "
                          f"{status}); pass --weights none or --weights FILE")
    if "No pretrained weights exist" in text:
        return ModelError(f"timm has no pretrained weights for {name}; pass --weights none or "
                          f"--weights FILE")
    return ModelError(f"could not load the pretrained weights for {name} ({text})")


def _create(arch: str, tag: str | None, pretrained: bool, dynamic: bool, **kwargs: Any) -> Any:
    timm = import_timm()
    options: dict[str, Any] = {"pretrained": pretrained, "exportable": True, "no_jit": True,
                               **kwargs}
    if tag:
        options["pretrained_cfg"] = tag
    if dynamic:
        # any size: the position embedding interpolated at run time, the image padded to a
        # multiple of the patch size (each option only where the model has it)
        for extra in ({"dynamic_img_size": True, "dynamic_img_pad": True},
                      {"dynamic_img_size": True}):
            try:
                return timm.create_model(arch, **extra, **options)
            except TypeError as exc:  # the model has no such option
                if not any(k in str(exc) for k in extra):
                    raise
    return timm.create_model(arch, **options)


def _classifier_prefixes(model: Any) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names)


def _fit_head(model: Any, state: Mapping[str, Any], path: Path, progress: Progress) -> bool:
    """Give ``model`` the file's classifier when only the head differs (a fine-tuned model):
    True when the class count changed (then the pretrained labels no longer apply)."""
    prefixes = _classifier_prefixes(model)
    if not prefixes or not hasattr(model, "reset_classifier") or not mismatches(model, state):
        return False
    own = model.state_dict()
    differing = [k for k in set(own) | set(state) if k not in own or k not in state
                 or tuple(own[k].shape) != tuple(state[k].shape)]
    differing = [k for k in differing if not k.endswith("num_batches_tracked")]
    if not differing or not all(k.startswith(prefixes) for k in differing):
        return False
    weight = next((state[p + "weight"] for p in prefixes if p + "weight" in state), None)
    classes = int(weight.shape[0]) if weight is not None and weight.dim() >= 1 else 0
    model.reset_classifier(classes)
    if mismatches(model, state):
        return False  # not a plain head swap after all: report the original problems
    say(progress, f"{path.name} has a {classes}-class head: exported with it, without labels"
        if classes else
        f"{path.name} has no classifier: exported headless (its logits are the pooled features)")
    return True


def build_timm(name: str, weights: str = "DEFAULT", pretrained_cfg: str | None = None,
               progress: Progress = None, dynamic: bool = True) -> tuple[Any, str, bool]:
    """(eval-mode nn.Module, weights label, whether the head differs from the config's).

    ``weights``: "DEFAULT" (timm's pretrained weights for the config, downloaded from the
    Hugging Face Hub and cached by timm), "none" (random init) or a path to a state_dict saved
    with ``torch.save`` or a ``.safetensors`` file. ``dynamic`` builds the model with
    ``dynamic_img_size`` where it has that option.
    """
    arch, tag = _split_name(name, pretrained_cfg)
    label_name = f"{arch}.{tag}" if tag else arch
    choice = str(weights)
    if choice.upper() == "DEFAULT" and not Path(choice).is_file():
        say(progress, f"loading timm's pretrained {label_name}")
        try:
            model = _create(arch, tag, True, dynamic)
        except (OnnxDreamError, MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - translated into one sentence
            raise _download_error(label_name, exc) from exc
        return model.eval(), "DEFAULT", False
    model = _create(arch, tag, False, dynamic)
    if choice.lower() in ("none", "random"):
        return model.eval(), "none", False
    path = Path(os.path.expanduser(choice))
    if not path.exists() and not re.search(r"[./\\]", choice):
        raise ModelError(f"unknown weights {choice!r} for {label_name}: use DEFAULT, none or a "
                         f"file path (choose timm's pretrained weights with --pretrained-cfg)")
    say(progress, f"loading weights from {path}")
    state = read_state_dict(path)
    head_changed = _fit_head(model, state, path, progress)
    load_weights_file(model, f"timm's {label_name}", path, state=state)
    return model.eval(), path.name, head_changed


def timm_data_config(model: Any) -> dict[str, Any]:
    """The model's evaluation preprocessing: ``input_size`` (3, H, W), ``mean``, ``std``,
    ``interpolation``, ``crop_pct`` (``timm.data.resolve_data_config``)."""
    import_timm()
    from timm.data import resolve_data_config

    return dict(resolve_data_config({}, model=model))


def timm_labels(model: Any) -> list[str] | None:
    """One class name per logit, where timm knows them; None otherwise."""
    import_timm()
    from timm.data import ImageNetInfo, infer_imagenet_subset

    classes = int(getattr(model, "num_classes", 0) or 0)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if not classes or cfg.get("num_classes") not in (None, classes):
        return None
    for key in ("label_descriptions", "label_names"):
        names = cfg.get(key)
        if isinstance(names, Mapping):
            names = list(names.values())
        if names and len(names) == classes:
            return [str(n).split(",")[0].strip() for n in names]
    subset = infer_imagenet_subset(model)
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    if info.num_classes() != classes:
        return None
    # the first lemma of each synset ("tench", "goldfish"): torchvision's style of label
    return [d.split(",")[0].strip() for d in info.label_descriptions()]


def _feature_modules(model: Any) -> list[tuple[str, int]]:
    info = getattr(model, "feature_info", None) or []
    out = []
    for entry in info:
        if isinstance(entry, Mapping) and entry.get("module") and entry.get("reduction"):
            out.append((str(entry["module"]), int(entry["reduction"])))
    return out


def default_timm_layers(model: Any, shapes: Mapping[str, tuple[int, ...]]) -> list[str] | None:
    """The layer a dream uses by default: the last ``feature_info`` stage at stride 16 for a
    hierarchical network, the feature block 60% of the way through an isotropic one (a ViT);
    None (export_module's ~60%-into-the-trunk rule) when timm lists no usable features.
    ``shapes`` are the layers that output a float tensor."""
    features = [(m, r) for m, r in _feature_modules(model) if m in shapes]
    if not features:
        return None
    reductions = {r for _, r in features}
    if len(reductions) > 1:
        at16 = [m for m, r in features if r == 16]
        if at16:
            return [at16[-1]]
        below = [m for m, r in features if r < 16]
        return [below[-1] if below else features[0][0]]
    return [features[int(len(features) * 0.6)][0]]


def _channels_last(shape: Sequence[int], hw: tuple[int, int]) -> bool:
    """Whether a [1, A, B, C] layer at input size ``hw`` is [N, H, W, C] rather than NCHW:
    (A, B) is the input grid at some stride and (B, C) is not."""
    if len(shape) != 4:
        return False

    def grid(a: int, b: int) -> bool:
        return any(a in (hw[0] // s, -(-hw[0] // s)) and b in (hw[1] // s, -(-hw[1] // s))
                   for s in _STRIDES)

    return grid(shape[1], shape[2]) and not grid(shape[2], shape[3])


def _pad_multiple(model: Any) -> tuple[int, int] | None:
    """The patch size to pad the input to, for a model built with ``dynamic_img_size`` whose
    patch embedding cannot pad itself (timm's Swin: no ``dynamic_img_pad`` option)."""
    embed = getattr(model, "patch_embed", None)
    if not getattr(model, "dynamic_img_size", False) or embed is None:
        return None
    if getattr(embed, "dynamic_img_pad", False):
        return None
    size = getattr(embed, "patch_size", None)
    size = (size, size) if isinstance(size, int) else tuple(size or ())
    if len(size) != 2 or size == (1, 1):
        return None
    return int(size[0]), int(size[1])


def _runs_at(model: Any, size: tuple[int, int]) -> bool:
    torch = import_torch()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *size))
    except Exception:  # noqa: BLE001 - any failure: the network cannot take this size
        return False
    return True


def pad_multiple(model: Any, size: tuple[int, int]) -> tuple[int, int] | None:
    """What the exported graph pads its (preprocessed) input to a multiple of, so that the model
    runs at any size; None where it runs at any size as it is, or cannot at all.

    A patch-embedded model built with ``dynamic_img_size`` but without ``dynamic_img_pad``
    (Swin) takes multiples of its patch size. A network whose branches must meet at equal sizes
    (DLA's trees, HRNet's fusions) takes multiples of its total stride: when torch cannot run it
    at an odd size near its native ``size`` but can at the multiples of its largest
    ``feature_info`` reduction (32 without one) just above, that reduction is the multiple. The
    padding is zeros after the mean/std normalisation (the mean colour), as ``dynamic_img_pad``
    pads, at the bottom and right; at sizes that are already multiples nothing changes.
    """
    patch = _pad_multiple(model)
    if patch is not None:
        return patch
    odd = (odd_size(size[0])[0], odd_size(size[1])[1])
    if _runs_at(model, odd):
        return None
    stride = max((r for _, r in _feature_modules(model)), default=32)
    padded = (-(-odd[0] // stride) * stride, -(-odd[1] // stride) * stride)
    return (stride, stride) if _runs_at(model, padded) else None


def pad_to_multiple(x: Any, multiple: tuple[int, int]) -> Any:
    """``x`` [N,C,H,W] with zero rows/columns appended up to multiples of ``multiple``, as
    timm's ``dynamic_img_pad`` does; traced with the sizes computed from the input's shape."""
    torch = import_torch()
    mh, mw = multiple
    shape = torch._shape_as_tensor(x)
    h = torch.div(shape[2] + (mh - 1), mh, rounding_mode="floor") * mh
    w = torch.div(shape[3] + (mw - 1), mw, rounding_mode="floor") * mw
    padded = torch.nn.functional.pad(x, (0, mw - 1, 0, mh - 1))
    return padded[:, :, :h, :w]


class _Captured(Exception):
    """Raised by the stand-in conv2d once it has the weight a module computed."""


@contextmanager
def frozen_weight_standardization(model: Any) -> Iterator[int]:
    """Let timm's weight-standardised convolutions (``StdConv2d``, ``ScaledStdConv2d`` and their
    ``Same`` variants: NFNets, BiT ResNet-V2, hybrid ViTs) use their standardised weight as a
    constant while the context lasts; yields how many there are.

    They standardise their weight in every forward (a training-mode batch norm over the weight),
    which exports as a weight computed in the graph; the gradient compiler needs a convolution's
    weight shape static. In eval mode the standardised weight is fixed: each module's own
    forward computes it once here (its ``F.conv2d`` call is intercepted), and the module then
    convolves with it. The modules are restored afterwards.
    """
    torch = import_torch()
    functional = torch.nn.functional
    try:
        from timm.layers import std_conv
    except ImportError:  # pragma: no cover - a timm without weight standardisation
        yield 0
        return
    kinds = tuple(getattr(std_conv, n) for n in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d",
                                                  "ScaledStdConv2dSame") if hasattr(std_conv, n))
    modules = [m for m in model.modules() if isinstance(m, kinds)]
    original = functional.conv2d
    frozen: list[Any] = []
    try:
        for m in modules:
            seen: list[Any] = []

            def capture(x: Any, weight: Any, *args: Any, seen: list = seen, **kwargs: Any) -> Any:
                seen.append(weight.detach().clone())
                raise _Captured

            functional.conv2d = capture
            try:
                kh, kw = m.kernel_size
                with torch.no_grad():
                    m(torch.zeros(1, m.in_channels, kh * m.dilation[0], kw * m.dilation[1]))
            except _Captured:
                pass
            finally:
                functional.conv2d = original
            if not seen:
                raise ModelError(f"could not read the standardised weight of {type(m).__name__}")

            def forward(x: Any, m: Any = m, weight: Any = seen[0]) -> Any:
                if getattr(m, "same_pad", False):
                    from timm.layers.padding import pad_same

                    x = pad_same(x, m.kernel_size, m.stride, m.dilation)
                return original(x, weight, m.bias, m.stride, m.padding, m.dilation, m.groups)

            m.forward = forward
            frozen.append(m)
        yield len(frozen)
    finally:
        functional.conv2d = original
        for m in frozen:
            del m.forward


def _layer_shapes(model: Any, size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """{module path: output shape} at ``size`` for the submodules that output a float tensor."""
    torch = import_torch()
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for path, module in model.named_modules():
        if not path:
            continue

        def hook(_m: Any, _i: Any, out: Any, path: str = path) -> None:
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                shapes.setdefault(path, tuple(out.shape))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *size))
    finally:
        for h in handles:
            h.remove()
    return shapes


def export_timm(
    name: str,
    out: str | os.PathLike[str],
    weights: str = "DEFAULT",
    *,
    pretrained_cfg: str | None = None,
    opset: int = 18,
    progress: Progress = None,
    module: Any = None,
) -> ExportResult:
    """Export timm's classifier ``name`` as a dreamable model at ``out``.

    ``name``: a timm architecture (``resnet50``, ``vit_small_patch16_224``, ``convnext_tiny``),
    optionally with a pretrained tag (``vit_small_patch16_224.augreg_in1k``), which may also be
    given as ``pretrained_cfg``: it chooses the weights and the preprocessing (mean/std, native
    size). ``weights``: "DEFAULT" (timm's pretrained weights for that config, downloaded from the
    Hugging Face Hub and cached by timm), "none" (random init) or a path to a state_dict saved
    with ``torch.save`` (possibly under a 'state_dict' or 'model' key) or a ``.safetensors``
    file; a file whose classifier has another class count is exported with that head (and
    without labels). ``progress``, if given, is called with short status lines. ``module``, if
    given, is exported instead of building one (tests use it to set weights); it must be timm's
    ``name``. Returns an :class:`ExportResult` (its ``notes`` say why a model is fixed-size); an
    unexpected failure is an ``ExportError`` naming the model.
    """
    with export_errors(name):
        return _export(name, out, weights, pretrained_cfg, opset, progress, module)


def _export(name: str, out: str | os.PathLike[str], weights: str, pretrained_cfg: str | None,
            opset: int, progress: Progress, module: Any) -> ExportResult:
    arch, tag = _split_name(name, pretrained_cfg)
    head_changed = False
    if module is None:
        module, label, head_changed = build_timm(name, weights, pretrained_cfg, progress)
    else:
        label = str(weights)
    module.eval()
    cfg = getattr(module, "pretrained_cfg", None) or {}
    tag = tag or cfg.get("tag")
    full = f"{arch}.{tag}" if tag else arch
    data = timm_data_config(module)
    _, ih, iw = (int(v) for v in data["input_size"])
    mean, std = tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"])

    multiple = pad_multiple(module, (ih, iw))

    def preprocess(x: Any) -> Any:
        torch = import_torch()
        m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
        x = (x - m) / s
        return x if multiple is None else pad_to_multiple(x, multiple)

    described = (f"RGB, (x - mean) / std with mean={list(mean)}, std={list(std)} on [0,1], from "
                 f"timm's pretrained config {full} (which evaluates at {ih}x{iw}, "
                 f"{data.get('interpolation', '?')} resize, crop {data.get('crop_pct', '?')})")
    if multiple is not None:
        described += (f"; then zero-padded at the bottom and right to multiples of "
                      f"{multiple[0]}x{multiple[1]} pixels")
    described += " (inside the graph)"
    say(progress, f"probing {full}'s layers at {ih}×{iw}")
    shapes = _layer_shapes(module, (ih, iw))
    layouts = {p: "NHWC" for p, s in shapes.items() if _channels_last(s, (ih, iw))}
    if label == "none":
        license_text = CODE_LICENSE + "; weights: random"
    elif label == "DEFAULT":
        license_text = CODE_LICENSE + f"; weights: {cfg.get('license') or 'see the model card'}"
    else:
        license_text = CODE_LICENSE + "; weights: supplied by the user"
    extra = {PREPROCESS_KEY: described}
    if layouts:
        extra[LAYOUTS_KEY] = json.dumps(layouts)
    dynamic_option = bool(getattr(module, "dynamic_img_size", False))
    with frozen_weight_standardization(module):
        result = export_module(
            module,
            out,
            name=full,
            input_size=(ih, iw) if ih != iw else ih,
            source=f"timm:{full} (weights: {label})",
            license=license_text,
            labels=None if head_changed else timm_labels(module),
            default_layers=default_timm_layers(module, shapes),
            preprocess=preprocess,
            opset=opset,
            progress=progress,
            extra_metadata=extra,
        )
    fixed_embedding = getattr(module, "pos_embed", None) is not None and not dynamic_option
    if not result.dynamic_hw and fixed_embedding:
        result.notes.insert(0, f"timm's {arch} has no dynamic_img_size option (its position "
                               f"embedding is fixed to {ih}x{iw})")
    return result
