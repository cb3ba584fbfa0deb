"""Sessions loaded once, shared and bounded: :class:`ModelCache` holds one GradientModel (one
onnxruntime session) per objective *structure* (layers and kinds, not weights), shared by every
job of a server, every item of a batch worker and every frame of a clip, each dream feeding its
own weights (:class:`Loaded`). The one model cache of the run time.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from onnxdream.core.errors import ModelError, did_you_mean
from onnxdream.models import ZOO
from onnxdream.runtime.gradient import GradientModel, objective_for
from onnxdream.runtime.graph_cache import CompiledCache
from onnxdream.runtime.opening import open_model, resolve_model_path
from onnxdream.runtime.session import resolve_providers
from onnxdream.settings.options import DreamSettings

__all__ = ["Loaded", "ModelCache", "ModelKey"]

log = logging.getLogger("onnxdream.jobs")



#: What a loaded GradientModel depends on: (model, the objective's structure (layer, kind,
#: index per term), pre_relu, border). Not the weights: one model serves every weighting.
ModelKey = tuple[str, tuple[tuple[str, str, "int | None"], ...], bool, int]


class Loaded(NamedTuple):
    """A shared GradientModel and what one dream feeds it: its objective and parameters."""

    model: Any  # GradientModel
    objective: Any  # the dream's Objective (its weights, for provenance)
    params: dict[str, np.ndarray]  # gm.params_for(objective): the dream's own, never gm's


class ModelCache:
    """GradientModels keyed by :data:`ModelKey`; thread-safe, bounded LRU.

    The key leaves out the term weights (they are the compiled graph's ``weights`` input): a
    dream with other weights gets the same model and its own parameters (:class:`Loaded`), and
    nothing shared is changed by a request. Compiled graphs go to ``compiled`` (a
    :class:`~onnxdream.runtime.graph_cache.CompiledCache` with the configured disk budget).

    One model is built at a time (a compile holds a few hundred MB while it runs); lookups of
    loaded models never wait for a build. A model dropped from the cache while a dream uses it
    lives until that dream ends. Models are named by zoo name or by the file stem of a model
    the operator allowed, never by a path from a request.

    ``device`` and ``threads`` open the sessions; ``size`` models stay loaded (least recently
    used dropped first); ``compiled`` is the compiled-graph cache (default: the home's, with
    ``ONNXDREAM_CACHE_MB``); ``allowed`` maps the names of the model files a server's operator
    allowed to their paths: with it, only zoo names and those names are models (a server);
    without it (None) any zoo name or dreamable file is (a batch, a clip).
    """

    def __init__(self, *, device: str = "auto", threads: int | None = None, size: int = 4,
                 compiled: CompiledCache | None = None,
                 allowed: Mapping[str, Path] | None = None):
        self.device, self.threads, self.size = device, threads, size
        self.compiled = compiled if compiled is not None else CompiledCache()
        self.allowed = dict(allowed) if allowed is not None else None
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._models: collections.OrderedDict[ModelKey, Any] = collections.OrderedDict()
        self._infos: dict[str, tuple[Any, dict[str, str]]] = {}  # name -> (ModelInfo, names)

    def source(self, name: str) -> str:
        """The zoo name or allowed file for ``name``; ModelError for anything else (any name
        or path when this cache has no ``allowed`` list)."""
        if name in ZOO or self.allowed is None:
            return name
        if name in self.allowed:
            return str(self.allowed[name])
        names = list(ZOO) + list(self.allowed)
        raise ModelError(f"unknown model '{name[:100]}': this server offers "
                         f"{', '.join(names)}{did_you_mean(name[:100], names)}", field="model")

    def _read(self, name: str) -> tuple[Any, dict[str, str]]:
        """(ModelInfo, its layer and tensor names) of model ``name``, read once."""
        with self._lock:
            if name in self._infos:
                return self._infos[name]
        with self._build_lock:
            with self._lock:  # read by another request while this one waited
                if name in self._infos:
                    return self._infos[name]
            source = self.source(name)
            # a raw ONNX file: the error says how to import it, naming the file, not its folder
            opened = open_model(source, name=Path(source).name)
            result = (opened.info, opened.layer_names())
        with self._lock:
            return self._infos.setdefault(name, result)

    def path(self, name: str) -> Path:
        """The file of model ``name`` (a zoo model is built on first use)."""
        return resolve_model_path(self.source(name))

    def info(self, name: str):
        """The contract's :class:`~onnxdream.exporters.graph.contract.ModelInfo` of model
        ``name`` (read once)."""
        return self._read(name)[0]

    def layer_names(self, name: str) -> dict[str, str]:
        """Every name a layer of model ``name`` may be given by (the layer table's and the
        tensors') → its tensor, for parsing ``layer`` fields (read once)."""
        return self._read(name)[1]

    def objective(self, settings: DreamSettings):
        """The dream's Objective (layer names checked against the model, weights in range)."""
        info, known = self._read(settings.model)
        return objective_for(info, known, list(settings.layers),
                             settings.objective).check_weights()

    def key(self, settings: DreamSettings, objective=None) -> ModelKey:
        objective = objective or self.objective(settings)
        return (settings.model, tuple(map(tuple, objective.structure())),
                bool(settings.pre_relu), int(settings.border))

    def get(self, settings: DreamSettings, *, keep: bool = True) -> Loaded:
        """The shared GradientModel for ``settings`` (built, and cached, on first use) and the
        parameters of this dream's weighting. ``keep=False`` builds one without caching it
        (atlas thumbnails: used once, they must not push the dreams' sessions out), unless it
        is cached already."""
        objective = self.objective(settings)
        key = self.key(settings, objective)
        with self._lock:
            gm = self._models.get(key)
            if gm is not None:
                self._models.move_to_end(key)
                return Loaded(gm, objective, gm.params_for(objective))
        with self._build_lock:
            with self._lock:
                gm = self._models.get(key)
            if gm is None:
                gm = self._build(key, objective)
                if not keep:
                    return Loaded(gm, objective, gm.params_for(objective))
            with self._lock:
                self._models[key] = gm
                self._models.move_to_end(key)
                while len(self._models) > self.size:
                    self._models.popitem(last=False)
        return Loaded(gm, objective, gm.params_for(objective))

    def _build(self, key: ModelKey, objective):
        model, _, pre_relu, border = key
        t0 = time.perf_counter()
        gm = GradientModel(self.source(model), objective, pre_relu=pre_relu, border=border,
                           device=self.device, threads=self.threads,
                           cache=self.compiled)
        if gm.session.fallback_warning:
            log.warning("%s", gm.session.fallback_warning)
        log.info("loaded %s %s on %s in %.1fs", model, gm.objective.describe(), gm.provider,
                 time.perf_counter() - t0)
        return gm

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)

    def loaded(self) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self._models.items())
        return [{"model": k[0], "objective": " + ".join(f"{kind}({layer})" if index is None
                                                        else f"{kind}:{index}({layer})"
                                                        for layer, kind, index in k[1]),
                 "pre_relu": k[2], "provider": gm.provider} for k, gm in items]

    def provider(self) -> str:
        with self._lock:
            for gm in self._models.values():
                return gm.provider
        first = resolve_providers(self.device)[0]
        return first[0] if isinstance(first, tuple) else first
