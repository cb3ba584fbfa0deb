"""Feature visualisation: images that a class, a channel or a layer of the network responds to.

The render loop of Lucid (Olah et al. 2017, "Feature Visualization"), on onnxruntime and numpy:

1. an :class:`~onnxdream.dream.param.ImageParam` (by default a 1/f-scaled Fourier spectrum with
   decorrelated colours, squashed by a sigmoid) gives a batch of RGB images;
2. random transforms (:mod:`onnxdream.dream.transforms`: pad, jitter, scale, rotate) are applied;
3. onnxruntime computes each image's objective and its gradient with respect to the
   transformed pixels;
4. the gradient goes back through the transforms' and the parameterisation's exact adjoints in
   numpy, with an optional total-variation penalty and Laplacian-pyramid normalisation;
5. Adam (lr 0.05, as Lucid) moves the parameters up the objective.

Octaves render small first and continue at full size (the Fourier spectrum is embedded in the
larger one, so the image carries over exactly, band-limited).

Every image of a batch has its own target: the gradient graph is compiled once per layer with
a second input ``channel_weights`` (``[N,C]`` or ``[N,C,1,1]``) and the objective
``sum_c channel_weights[n,c] * mean_hw(layer[n,c])``. A class is a one-hot row at ``logits``, a
channel a one-hot row at its layer, a whole layer ``1/C`` everywhere; so ``--class 130,340,954``
is one batched run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from onnxdream.core.errors import ObjectiveError, OnnxDreamError, closest, first_line
from onnxdream.dream.normalize import lap_normalize
from onnxdream.dream.param import ImageParam, image
from onnxdream.dream.transforms import TRANSFORMS, Transform, compose
from onnxdream.exporters.graph.contract import CHANNEL_WEIGHTS, GRAD, IMAGE, LOGITS, OBJECTIVE
from onnxdream.settings.options import VisualizeSettings, describe

# -- targets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What one image maximises: ``kind`` is class, channel or layer (the mean of the layer)."""

    kind: str
    layer: str
    index: int | None = None
    label: str = ""

    @property
    def caption(self) -> str:
        if self.kind == "class":
            return f"{self.index} {self.label}".strip()
        if self.kind == "channel":
            return f"{self.layer}:{self.index}"
        return self.layer

    def describe(self) -> str:
        return f"{self.kind}:{self.index}" if self.kind == "class" else (
            f"channel:{self.layer}:{self.index}" if self.kind == "channel" else
            f"layer:{self.layer}")


def resolve_class(spec: str, labels: Sequence[str] | None) -> int:
    """A class index from ``"130"`` or a label (``"flamingo"``, ``"tabby"``, ``"tabby cat"``)."""
    text = spec.strip()
    if re.fullmatch(r"\d+", text):
        k = int(text)
        n = len(labels) if labels else 1000
        if k >= n and labels and text in labels:  # a numeric label (PaddleOCR's "0", "180")
            return list(labels).index(text)
        if k >= n:
            raise ObjectiveError(f"class {k} is out of range: "
                                 f"the model has {n} classes (0..{n - 1})")
        return k
    if not labels:
        raise ObjectiveError(f"this model has no class labels, so '{text}' cannot be looked up: "
                             "give the class as a number")
    want = text.lower()
    names = [lab.lower() for lab in labels]
    if want in names:
        return names.index(want)
    # a synonym in a label such as "tabby, tabby cat"
    hits = [i for i, lab in enumerate(names) if want in [s.strip() for s in lab.split(",")]]
    if len(hits) == 1:
        return hits[0]
    if hits:
        near = [labels[i] for i in hits]
    else:  # labels that contain the word first ("cat" → "tiger cat"), then similar spellings
        word = re.compile(rf"\b{re.escape(want)}\b")
        near = [lab for lab in labels if word.search(lab.lower())][:6]
        near += [n for n in closest(text, list(labels)) if n not in near][:max(0, 6 - len(near))]
    hint = ("; did you mean " + ", ".join(f"'{n}' ({list(labels).index(n)})" for n in near) + "?"
            if near else "; give the class as a number (0..999)")
    raise ObjectiveError(f"no class is called '{text}'{hint}")


def class_targets(spec: str, labels: Sequence[str] | None) -> list[Target]:
    """``"130,zebra,954"`` → class targets (labels from the model)."""
    parts = [p for p in (s.strip() for s in spec.split(",")) if p]
    if not parts:
        raise ObjectiveError("--class needs a class number or name, e.g. --class 130 or "
                             "--class flamingo")
    out = []
    for p in parts:
        k = resolve_class(p, labels)
        label = labels[k] if labels and k < len(labels) else ""
        out.append(Target("class", "logits", k, label))
    return out


def channel_target(spec: str) -> Target:
    """``"blocks.9:12"`` → channel 12 of layer blocks.9."""
    name, sep, k = spec.strip().rpartition(":")
    if not sep or not name or not re.fullmatch(r"\d+", k.strip()):
        raise ObjectiveError(f"bad channel '{spec}': use LAYER:K, e.g. blocks.9:12")
    return Target("channel", name, int(k))


def layer_target(name: str) -> Target:
    if not name.strip():
        raise ObjectiveError("empty layer name")
    return Target("layer", name.strip())


# -- a gradient graph with one objective per image -------------------------------------------


class BatchObjective:
    """objective[n] = sum_c weights[n,c] * mean(layer[n,c]), and its gradient, per image.

    The compiler emits it (a ``weighted_channels`` term): the per-image rows are the compiled
    graph's ``channel_weights`` input (see the contract).
    """

    def __init__(self, model: str | os.PathLike, layer: str, *, pre_relu: bool = True,
                 device: str = "auto", threads: int | None = None):
        from onnxdream.exporters.graph import compile_gradient
        from onnxdream.exporters.graph.contract import (
            graph_params,
        )
        from onnxdream.exporters.graph.objective import weighted_channels
        from onnxdream.runtime.opening import open_model
        from onnxdream.runtime.session import create_session

        opened = open_model(model)
        proto, info = opened.proto, opened.info
        self.labels: list[str] | None = info.labels
        self.info = info
        if layer == LOGITS and not info.has_logits:
            info.require_logits("class objectives do not apply; use --channel or --layer")
        graph = compile_gradient(proto, weighted_channels(layer),
                                 pre_relu=pre_relu and layer != LOGITS)
        #: the channel_weights input's shape past the batch axis: (C,), (C,1,1) or (1,1,C)
        self.row_shape = tuple(int(d) for d in graph_params(graph)[CHANNEL_WEIGHTS].shape[1:])
        self.layer, self.channels = layer, int(np.prod(self.row_shape))
        self.session = create_session(graph.SerializeToString(), device=device, threads=threads)

    @property
    def provider(self) -> str:
        return self.session.provider

    def weights(self, targets: Sequence[Target]) -> np.ndarray:
        """One weight row per target (each on this layer)."""
        w = np.zeros((len(targets), self.channels), np.float32)
        for n, t in enumerate(targets):
            if t.kind == "layer":
                w[n] = 1.0 / self.channels
                continue
            if t.index is None or not 0 <= t.index < self.channels:
                what = "classes" if t.kind == "class" else "channels"
                raise ObjectiveError(f"{t.kind} {t.index} is out of range for layer '{t.layer}', "
                                     f"which has {self.channels} {what} (0..{self.channels - 1})")
            w[n, t.index] = 1.0
        return w.reshape((len(targets),) + self.row_shape)

    def __call__(self, x: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        try:
            obj, grad = self.session.run([OBJECTIVE, GRAD], {IMAGE: x, CHANNEL_WEIGHTS: weights})
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            nh, nw = self.info.native_size
            why = (f"it has a fixed input size and runs only at {nw}x{nh} pixels"
                   if not self.info.dynamic_hw else first_line(exc))
            raise OnnxDreamError(f"the model cannot run at {x.shape[3]}x{x.shape[2]} pixels: "
                                 f"{why}") from None
        return obj, grad


# -- settings: VisualizeSettings lives in onnxdream.settings.options (re-exported here)
# ---------------


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    objective: np.ndarray  # per image
    size: int


ProgressFn = Callable[[Progress], None]


# -- pieces of the loop -----------------------------------------------------------------------


class Adam:
    """Adam (Kingma & Ba) on a list of arrays, ascending."""

    def __init__(self, params: list[np.ndarray], lr: float = 0.05, b1: float = 0.9,
                 b2: float = 0.999, eps: float = 1e-8):
        self.params, self.lr, self.b1, self.b2, self.eps = params, lr, b1, b2, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads: list[np.ndarray]) -> None:
        self.t += 1
        c1 = 1.0 - self.b1 ** self.t
        c2 = 1.0 - self.b2 ** self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m *= self.b1
            m += (1.0 - self.b1) * g
            v *= self.b2
            v += (1.0 - self.b2) * g * g
            p += self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)


def total_variation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image total variation (mean |difference| of neighbours, L1) and its gradient."""
    dy = x[:, :, 1:, :] - x[:, :, :-1, :]
    dx = x[:, :, :, 1:] - x[:, :, :, :-1]
    scale = 1.0 / (x.shape[1] * x.shape[2] * x.shape[3])
    tv = (np.abs(dy).sum(axis=(1, 2, 3)) + np.abs(dx).sum(axis=(1, 2, 3))) * scale
    sy, sx = np.sign(dy) * scale, np.sign(dx) * scale
    g = np.zeros_like(x)
    g[:, :, 1:, :] += sy
    g[:, :, :-1, :] -= sy
    g[:, :, :, 1:] += sx
    g[:, :, :, :-1] -= sx
    return tv, g


# -- the render loop --------------------------------------------------------------------------


def render_batch(objective: BatchObjective, targets: Sequence[Target],
                 settings: VisualizeSettings, rng: np.random.Generator,
                 progress: Callable[[int, np.ndarray, int], None] | None = None,
                 transforms: Sequence[Transform] | None = None) -> np.ndarray:
    """Render ``targets`` (all on ``objective``'s layer) as one batch → [N,H,W,3] in [0,1]."""
    weights = objective.weights(targets)
    n = len(targets)
    sizes, steps = settings.octave_sizes(), settings.octave_steps()
    param: ImageParam = image((n, 3, sizes[0], sizes[0]), rng, settings.param,
                              settings.decorrelate)
    done = 0
    for size, count in zip(sizes, steps):
        if param.shape[2] != size:
            param = param.resized(size, size)
        chain = compose(transforms if transforms is not None else
                        TRANSFORMS[settings.transforms](size / 224.0))
        opt = Adam(param.params, settings.lr)
        for _ in range(count):
            x = param.image()
            y, back = chain(x, rng)
            obj, g = objective(np.ascontiguousarray(y, dtype=np.float32), weights)
            g = back(g)
            if settings.tv:
                _, gtv = total_variation(x)
                g = g - settings.tv * gtv
            if settings.normalize == "lapnorm":
                g = np.stack([lap_normalize(gi) for gi in g])
            opt.step(param.backward(g))
            done += 1
            if progress is not None:
                progress(done, obj, size)
    return np.ascontiguousarray(param.image().transpose(0, 2, 3, 1))


def render(model: str | os.PathLike, targets: Sequence[Target],
           settings: VisualizeSettings | None = None, progress: ProgressFn | None = None,
           *, device: str = "auto", threads: int | None = None,
           objectives: dict[str, BatchObjective] | None = None) -> list[np.ndarray]:
    """Visualise each target; returns one H x W x 3 float32 image in [0,1] per target.

    Targets on the same layer render together in one batch (one session run per step).
    ``objectives`` caches the compiled graphs by layer across calls.
    """
    if settings is None:
        settings = VisualizeSettings()
    settings.validate()
    if not targets:
        raise ObjectiveError("nothing to visualise: give --class, --channel or --layer")
    settings = settings.with_seed()
    rng = np.random.default_rng(settings.seed)
    cache = objectives if objectives is not None else {}
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(targets):
        groups.setdefault(t.layer, []).append(i)
    for layer in groups:
        if layer not in cache:
            cache[layer] = BatchObjective(model, layer, pre_relu=settings.pre_relu, device=device,
                                          threads=threads)
    total = settings.steps * len(groups)
    out: list[np.ndarray | None] = [None] * len(targets)
    offset = 0
    for layer, idx in groups.items():
        def on_step(done: int, obj: np.ndarray, size: int, offset=offset) -> None:
            if progress is not None:
                progress(Progress(offset + done, total, obj, size))

        imgs = render_batch(cache[layer], [targets[i] for i in idx], settings, rng, on_step)
        for i, img in zip(idx, imgs):
            out[i] = img
        offset += settings.steps
    return [o for o in out if o is not None]


# -- a labelled grid --------------------------------------------------------------------------


def grid(images: Sequence[np.ndarray], captions: Sequence[str], columns: int | None = None,
         gap: int = 4) -> np.ndarray:
    """Images side by side (``columns`` per row) with a caption under each → H x W x 3 float."""
    from PIL import Image, ImageDraw, ImageFont

    from onnxdream.media.imageio import to_uint8

    if not images:
        raise OnnxDreamError("no images to put in a grid")
    h = max(i.shape[0] for i in images)
    w = max(i.shape[1] for i in images)
    cols = columns or min(len(images), 8)
    rows = -(-len(images) // cols)
    font_size = max(10, h // 16)
    try:
        font = ImageFont.load_default(font_size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        font = ImageFont.load_default()
    cap = font_size + 2 * gap
    canvas = Image.new("RGB", (cols * w + (cols + 1) * gap, rows * (h + cap) + gap),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (img, text) in enumerate(zip(images, captions)):
        r, c = divmod(i, cols)
        x0, y0 = gap + c * (w + gap), gap + r * (h + cap)
        canvas.paste(Image.fromarray(to_uint8(img)), (x0, y0))
        while len(text) > 3 and draw.textlength(text, font=font) > w:
            text = text[:-2] + "…"
        draw.text((x0 + w / 2, y0 + h + gap), text, fill=(0, 0, 0), font=font, anchor="mt")
    return np.asarray(canvas, np.float32) / 255.0


__all__ = ["Adam", "BatchObjective", "Progress", "Target", "VisualizeSettings", "channel_target",
           "class_targets", "describe", "grid", "layer_target", "render", "render_batch",
           "resolve_class", "total_variation"]
