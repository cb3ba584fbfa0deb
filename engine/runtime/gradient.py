"""A compiled gradient graph in an onnxruntime session, and tiled gradients for big images.

``GradientModel(model, objective)`` resolves a zoo name or .onnx path, compiles the gradient
graph once (cached on disk beside the zoo models, keyed by content), opens one session, and
answers ``objective, grad = gm(x)`` for any image size the model allows. ``tiled(x)`` computes
the same gradient tile by tile: each tile is evaluated with a halo of real context around its
core and only the core's gradient is kept, so where the halo covers twice the layer's receptive
radius the tiles join without seams (equal to the untiled gradient up to float rounding).

Every run feeds the compiled graph's objective parameters with the image
(``{"image": x, **gm.params}``, see :mod:`onnxdream.exporters.graph.contract`): the term
``weights`` are an input, not part of the compiled graph nor of its cache key, and spatial
parameters are cut per tile and rolled by the jitter like the image.
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from onnxdream.core.errors import ModelError, ObjectiveError, OnnxDreamError, first_line
from onnxdream.exporters.graph import LayerSpec, Objective, compile_gradient
from onnxdream.exporters.graph.contract import (
    GRAD,
    GUIDE_PREFIX,
    IMAGE,
    OBJECTIVE,
    WEIGHTS,
    ModelInfo,
    cut_spatial,
    is_spatial,
    load_model,
)
from onnxdream.exporters.graph.layers import resolve_layer
from onnxdream.exporters.graph.receptive_field import receptive_field
from onnxdream.runtime.graph_cache import CompiledCache, graph_key
from onnxdream.runtime.opening import open_model
from onnxdream.runtime.session import Session, create_session
from onnxdream.settings.memory import MemoryProfile


def objective_for(info: ModelInfo, known: Collection[str],
                  layers: Sequence[str | LayerSpec] | Objective = (),
                  objective: str = "mean") -> Objective:
    """The Objective of ``--layer`` specs (the model's default layers when none) and an
    ``--objective`` spec; ``known``: the model's layer and tensor names
    (``layer_names(proto, info.layers)``), so that a name ending in ``:0`` reads as a layer."""
    if isinstance(layers, Objective):
        return layers
    if not layers and not objective.startswith("class"):
        layers = info.require_default_layers()  # class objectives read the logits
    return Objective.build(list(layers), objective, known=known)


@dataclass(frozen=True)
class TileInfo:
    """How a layer may be tiled: receptive field and stride in pixels (None: global)."""

    receptive_field: int | None
    stride: int

    def halo(self, tile_size: int) -> int:
        """Context kept around each tile's core: 2x the receptive radius, within reason."""
        want = self.receptive_field if self.receptive_field is not None else tile_size // 4
        limit = tile_size // 4
        h = min(want, limit)
        return int(np.ceil(h / self.stride) * self.stride)


class GradientModel:
    """objective(image) and its gradient, for one model and one objective."""

    def __init__(self, model: str | os.PathLike, layers: Sequence[str | LayerSpec] | Objective = (),
                 objective: str = "mean", *, pre_relu: bool = False, border: int = 0,
                 device: str = "auto", threads: int | None = None,
                 cache: bool | CompiledCache = True):
        opened = open_model(model)
        proto, self.model_path, self.info = opened.proto, opened.path, opened.info
        self.metadata = self.info.metadata
        self.objective = objective_for(self.info, opened.layer_names(), layers,
                                       objective).check_weights()
        #: the objective parameters every run feeds by default (see the contract): the term
        #: weights. Never changed after construction: a dream with other weights passes its own
        #: (:meth:`params_for`), so that threads can share this model.
        self.params: dict[str, np.ndarray] = {
            WEIGHTS: np.asarray(self.objective.weights, np.float32)}
        self._cache = (cache if isinstance(cache, CompiledCache) else
                       CompiledCache() if cache else None)
        graph, fresh = self._compiled(proto, pre_relu, border)
        try:
            self.session: Session = create_session(graph, device=device, threads=threads)
        except ModelError:
            if not isinstance(graph, str):
                raise
            self._cache.remove(Path(graph))  # corrupt or unusable: compile it again (once)
            if fresh:
                raise
            graph, fresh = self._compiled(proto, pre_relu, border)
            try:
                self.session = create_session(graph, device=device, threads=threads)
            except ModelError:
                if isinstance(graph, str):
                    self._cache.remove(Path(graph))  # a graph no session takes: not kept
                raise
        if isinstance(graph, str):
            CompiledCache.hold(Path(graph))  # not evicted while this model lives
            weakref.finalize(self, CompiledCache.release, Path(graph))
        self._graph, self._threads, self._device_ascent = graph, threads, None
        self._features: Session | None = None
        self.border, self.pre_relu = border, pre_relu
        self.tile_info = self._tile_info(proto)
        self.labels = self.info.labels

    def params_for(self, objective: Objective) -> dict[str, np.ndarray]:
        """The objective parameters that dream ``objective`` with this model: another weighting
        of the same terms (ObjectiveError otherwise). A new dict; this model is not changed."""
        if objective.structure() != self.objective.structure():
            raise ObjectiveError(f"this model dreams {self.objective.describe()}, not "
                                 f"{objective.describe()}: only the weights may differ")
        objective.check_weights()
        return {**self.params, WEIGHTS: np.asarray(objective.weights, np.float32)}

    @classmethod
    def from_settings(cls, settings, *, device: str = "auto", threads: int | None = None,
                      cache: bool = True) -> GradientModel:
        """The GradientModel of a :class:`~onnxdream.settings.options.DreamSettings` (its model,
        layers, objective, pre_relu and border)."""
        model, layers, objective, pre_relu, border = settings.gradient_key()
        return cls(model, list(layers), objective, pre_relu=pre_relu, border=border,
                   device=device, threads=threads, cache=cache)

    @functools.cached_property
    def memory(self) -> MemoryProfile:
        """What the compiled graph costs in memory per pixel (see
        :mod:`onnxdream.settings.memory`)."""
        try:
            profile = MemoryProfile.of_graph(self._graph, self.info.native_size)
        except OSError:  # evicted by another process
            profile = MemoryProfile.of_graph(self._graph_proto(), self.info.native_size)
        return replace(profile, model_bytes=self.model_path.stat().st_size)

    @property
    def required(self) -> list[str]:
        """Parameters without a default, which every run must pass: guide terms' features."""
        return [f"{GUIDE_PREFIX}{k}" for k, t in enumerate(self.objective.terms)
                if t.kind == "guide"]

    @property
    def provider(self) -> str:
        return self.session.provider

    def _compiled(self, proto, pre_relu: bool, border: int) -> tuple[str | bytes, bool]:
        """(the compiled graph: a cached file's path, or the serialized graph; whether it was
        compiled just now). Nothing is written when the compile fails."""
        # not the weights: they are the graph's `weights` input, fed on every run
        def compile_now():
            return compile_gradient(proto, self.objective, pre_relu=pre_relu, border=border)

        if self._cache is None:
            return compile_now().SerializeToString(), True
        name = graph_key(self.model_path, self.objective, pre_relu, border)
        found, fresh = self._cache.get_or_compile(name, compile_now)
        return (str(found) if isinstance(found, Path) else found), fresh

    def _tile_info(self, proto) -> TileInfo:
        table = self.info.layers
        fields, strides = [], []
        for term in self.objective.terms:
            if term.kind in ("class", "neuron"):
                return TileInfo(None, 1)
            rf = receptive_field(proto, resolve_layer(table, term.layer, proto))
            if rf is None:
                return TileInfo(None, 1)
            fields.append(rf[0])
            strides.append(rf[1])
        return TileInfo(max(fields), int(np.lcm.reduce(strides)))

    def device_ascent(self):
        """The step graph on this model's device (built on first use); see device_loop.py."""
        if self._device_ascent is None:
            from onnxdream.runtime.device_loop import DeviceAscent

            self._device_ascent = DeviceAscent(self._graph_proto(), device=self.session.device,
                                               threads=self._threads, params=self.params)
        return self._device_ascent

    def _graph_proto(self) -> onnx.ModelProto:
        """The compiled graph this model's session runs, loaded (compiled again in memory when
        another process evicted its cached file)."""
        graph = self._graph
        try:
            return onnx.load(graph) if isinstance(graph, str) else onnx.load_from_string(graph)
        except OSError:
            return compile_gradient(load_model(self.model_path), self.objective,
                                    pre_relu=self.pre_relu, border=self.border)

    def features(self, x: np.ndarray) -> list[np.ndarray]:
        """The activations of the objective's layers (in ``objective.layers`` order) for x
        (float32 [N,3,H,W]), read as the gradient graph reads them (``pre_relu`` included): a
        forward-only graph (:func:`~onnxdream.exporters.graph.compiler.compile_features`) in a
        session made on first use. The guided dream reads its guide's features with it."""
        if self._features is None:
            from onnxdream.exporters.graph import compile_features

            graph = compile_features(load_model(self.model_path), self.objective,
                                     pre_relu=self.pre_relu)
            self._features = create_session(graph.SerializeToString(), device=self.session.device,
                                            threads=self._threads)
        return self._features.run(None, {IMAGE: x})

    # -- evaluation ---------------------------------------------------------------------------
    def __call__(self, x: np.ndarray, params: dict[str, np.ndarray] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """x: float32 [N,3,H,W] in [0,1] → (objective [N], grad [N,3,H,W]).

        ``params`` are the objective parameters to feed (default: :attr:`params`), already cut
        to x's extent where spatial. A fixed-size model takes only its native size (a
        ModelError naming it otherwise).
        """
        if not self.info.dynamic_hw and tuple(x.shape[2:]) != tuple(self.info.native_size):
            raise self._size_error(x.shape[3], x.shape[2])
        feeds = {IMAGE: x, **(self.params if params is None else params)}
        missing = [name for name in self.required if name not in feeds]
        if missing:
            raise ObjectiveError(f"this objective needs {', '.join(missing)}: a guided dream "
                                 "needs its guide's features (onnxdream.guide.guide_params)")
        try:
            obj, grad = self.session.run([OBJECTIVE, GRAD], feeds, _quiet_run_options())
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            hint = (f" (with --border {self.border}, the layer must be more than "
                    f"{2 * self.border} positions wide: use a larger image, fewer octaves or a "
                    "smaller border)" if self.border else "")
            raise OnnxDreamError(f"the model cannot run at {x.shape[3]}x{x.shape[2]} pixels"
                                 f"{hint}: {first_line(exc, 160)}") from None
        return obj, grad

    def _size_error(self, width: int, height: int) -> ModelError:
        nh, nw = self.info.native_size
        return ModelError(f"{self.info.name} has a fixed input size and runs only at {nw}x{nh} "
                          f"pixels, not {width}x{height}; dream() works at that size or larger "
                          "(in tiles of that size)")

    def gradient(self, img: np.ndarray, tile_size: int | tuple[int, int] = 0,
                 shift: tuple[int, int] = (0, 0), out: np.ndarray | None = None,
                 params: Mapping[str, np.ndarray] | None = None,
                 batch_pixels: int = 512 * 512, wrap: bool = False) -> tuple[float, np.ndarray]:
        """img: float32 [3,H,W] → (objective, grad [3,H,W]); tiled when larger than the tile.

        ``tile_size``: a side, or (h, w); 0 for no tiles. A fixed-size model is always tiled
        at its native size (whatever ``tile_size`` says), since it runs at no other; every
        objective is then taken per tile. ``shift`` evaluates the network on the image rolled
        by (dy, dx) pixels (the jitter) and returns the gradient in the unrolled frame; big
        images are never copied whole for it. ``out``, if given, receives the gradient (no new
        full-size array). ``params``: the objective parameters at image size (default
        :attr:`params`; see :meth:`params_for`). ``batch_pixels`` bounds a batch of tiles (see
        :meth:`tiled`). ``wrap``: the image is one tile of a periodic plane (a seamless
        texture): every tile, the image's edges included, sees the wrapped-around pixels as its
        halo (see
        :meth:`tiled`).
        """
        base = self.params if params is None else params
        _, h, w = img.shape
        dy, dx = shift[0] % h, shift[1] % w
        th, tw = (tile_size, tile_size) if isinstance(tile_size, (int, np.integer)) else tile_size
        fixed = not self.info.dynamic_hw
        if fixed:
            if wrap:
                raise ModelError(f"{self.info.name} has a fixed input size: a seamless dream "
                                 "needs a model that runs at any size")
            th, tw = self.info.native_size
        tileable = fixed or all(t.kind not in ("class", "neuron") for t in self.objective.terms)
        if wrap and tileable:
            return self.tiled(img, (th, tw), (dy, dx), out, batch_pixels, params=base, wrap=True)
        if not tileable or th <= 0 or (h <= th and w <= tw):
            x = np.roll(img, (dy, dx), axis=(1, 2)) if (dy or dx) else img
            params = {k: np.roll(v, (dy, dx), axis=(-2, -1)) if (dy or dx) and is_spatial(k)
                      else v for k, v in base.items()}  # spatial ones roll with it
            obj, grad = self(x[None], params)
            g = np.roll(grad[0], (-dy, -dx), axis=(1, 2)) if (dy or dx) else grad[0]
            if out is None:
                return float(obj[0]), g
            out[...] = g
            return float(obj[0]), out
        return self.tiled(img, (th, tw), (dy, dx), out, batch_pixels, params=base)

    def tiled(self, img: np.ndarray, tile_size: int | tuple[int, int],
              shift: tuple[int, int] = (0, 0), out: np.ndarray | None = None,
              budget: int = 512 * 512, params: Mapping[str, np.ndarray] | None = None,
              wrap: bool = False) -> tuple[float, np.ndarray]:
        """The gradient assembled from tiles of at most ``tile_size`` (a side or (h, w)) pixels
        (core + halo).

        Tiles of one shape run in batches of at most ``budget`` pixels. The gradient is exact
        where the halo covers the receptive field; the objective returned is an estimate (each
        tile's mean, weighted by its core's share of the image), since a tile's mean also counts
        its halo. With a shift, tiles are cut from the rolled image by index arithmetic; spatial
        objective parameters (see the contract) are cut the same way. For a fixed-size model
        every tile is exactly ``tile_size``: the tiles along the bottom and right edges shift
        inward (more context on their inner side) instead of being cut short.

        ``wrap``: halos are never clipped at the image's edges but wrap around (the rows above
        the first are the last ones, ...), so the gradient is that of the image repeated
        periodically: a seamless texture. An image that fits in ``tile_size`` (or with
        ``tile_size`` 0) is then one tile, the whole image plus a halo.
        """
        _, h, w = img.shape
        dy, dx = shift
        th, tw = (tile_size, tile_size) if isinstance(tile_size, (int, np.integer)) else tile_size
        exact = not self.info.dynamic_hw
        if exact and (h < th or w < tw):
            raise self._size_error(w, h)
        stride = self.tile_info.stride
        if wrap and (th <= 0 or (h <= th and w <= tw)):  # one tile: the image and its halo
            halo_h = halo_w = self.tile_info.halo(max(h, w))
            core_h, core_w = h, w
        else:
            th, tw = min(th, h), min(tw, w)
            halo_h, halo_w = self.tile_info.halo(th), self.tile_info.halo(tw)
            core_h = max(stride, (th - 2 * halo_h) // stride * stride)
            core_w = max(stride, (tw - 2 * halo_w) // stride * stride)
        base = self.params if params is None else params
        grad = np.zeros_like(img) if out is None else out
        total = 0.0
        spatial = [k for k in base if is_spatial(k)]
        tiles: dict[tuple[int, int], list[tuple[int, int, int, int, int, int]]] = {}

        def window(c0: int, c1: int, halo: int, size: int, n: int) -> tuple[int, int]:
            if wrap:  # the halo wraps around the image's edges
                return c0 - halo, c1 + halo
            if exact:  # exactly `size`, shifted inward at the far edge
                start = min(max(0, c0 - halo), n - size)
                return start, start + size
            return max(0, c0 - halo), min(n, c1 + halo)

        for y0 in range(0, h, core_h):
            for x0 in range(0, w, core_w):
                y1, x1 = min(y0 + core_h, h), min(x0 + core_w, w)
                ty0, ty1 = window(y0, y1, halo_h, th, h)
                tx0, tx1 = window(x0, x1, halo_w, tw, w)
                tiles.setdefault((ty1 - ty0, tx1 - tx0), []).append((y0, y1, x0, x1, ty0, tx0))

        def positions(a: int, b: int) -> float:  # layer positions over an a x b window
            return float(-(-a // stride) * -(-b // stride))

        def rows(a: int, b: int) -> np.ndarray:  # rolled-frame rows a..b-1 in the image frame
            return (np.arange(a, b) - dy) % h

        def cols(a: int, b: int) -> np.ndarray:
            return (np.arange(a, b) - dx) % w

        area = positions(h, w)
        for (th, tw), group in tiles.items():
            batch = max(1, budget // (th * tw))
            for i in range(0, len(group), batch):
                chunk = group[i:i + batch]
                xb = np.stack([img[:, rows(ty0, ty0 + th)[:, None], cols(tx0, tx0 + tw)]
                               for (_, _, _, _, ty0, tx0) in chunk])
                feeds = dict(base)
                for k in spatial:
                    feeds[k] = np.concatenate([
                        cut_spatial(base[k], rows(ty0, ty0 + th), cols(tx0, tx0 + tw))
                        for (_, _, _, _, ty0, tx0) in chunk])
                obj, gb = self(xb, feeds)
                # each tile's objective is a mean over its own extent: rescale to the image's
                scale = positions(th, tw) / area
                for (y0, y1, x0, x1, ty0, tx0), o, g in zip(chunk, obj, gb):
                    core_g = g[:, y0 - ty0:y1 - ty0, x0 - tx0:x1 - tx0] * scale
                    grad[:, rows(y0, y1)[:, None], cols(x0, x1)] = core_g
                    total += float(o) * scale * (y1 - y0) * (x1 - x0) / (th * tw)
        return total, grad


@functools.cache
def _quiet_run_options():
    """Run options that keep onnxruntime from logging errors we report ourselves (made once)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4
    return options
