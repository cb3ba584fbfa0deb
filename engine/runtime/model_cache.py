"""Sessions loaded once, shared and bounded: :class:`ModelCache` holds one GradientModel (one
onnxruntime session) per objective *structure* (layers and kinds, not weights), shared by every
job of a server or a batch worker, each dream feeding its own weights (:class:`Loaded`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, NamedTuple

import numpy as np

from onnxdream.core.errors import ModelError, did_you_mean
from onnxdream.jobs.config import ServerConfig
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
    """

    def __init__(self, config: ServerConfig):
        from onnxdream.runtime.graph_cache import CompiledCache

        self.config = config
        self.compiled = CompiledCache(budget_mb=config.cache_mb)
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._models: collections.OrderedDict[ModelKey, Any] = collections.OrderedDict()
        self._infos: dict[str, tuple[Any, dict[str, str]]] = {}  # name -> (ModelInfo, names)

    def source(self, name: str) -> str:
        """The zoo name or allowed file for ``name``; ModelError for anything else."""
        from onnxdream.models import ZOO

        if name in ZOO:
            return name
        if name in self.config.model_paths:
            return str(self.config.model_paths[name])
        names = list(ZOO) + list(self.config.model_paths)
        raise ModelError(f"unknown model '{name[:100]}': this server offers "
                         f"{', '.join(names)}{did_you_mean(name[:100], names)}", field="model")

    def _read(self, name: str) -> tuple[Any, dict[str, str]]:
        """(ModelInfo, its layer and tensor names) of model ``name``, read once."""
        with self._lock:
            if name in self._infos:
                return self._infos[name]
        from onnxdream.exporters.graph.contract import ModelInfo, load_model, require_dreamable
        from onnxdream.exporters.graph.layers import layer_names
        from onnxdream.runtime.gradient import resolve_model_path

        with self._build_lock:
            with self._lock:  # read by another request while this one waited
                if name in self._infos:
                    return self._infos[name]
            path = resolve_model_path(self.source(name))
            proto = load_model(path)
            require_dreamable(proto, path.name)  # a raw ONNX file: say how to import it
            info = ModelInfo.load(proto)
            result = (info, layer_names(proto, info.layers))
        with self._lock:
            return self._infos.setdefault(name, result)

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
        from onnxdream.runtime.gradient import objective_for

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
                while len(self._models) > self.config.cache_size:
                    self._models.popitem(last=False)
        return Loaded(gm, objective, gm.params_for(objective))

    def _build(self, key: ModelKey, objective):
        from onnxdream.runtime.gradient import GradientModel

        model, _, pre_relu, border = key
        t0 = time.perf_counter()
        gm = GradientModel(self.source(model), objective, pre_relu=pre_relu, border=border,
                           device=self.config.device, threads=self.config.threads,
                           cache=self.compiled)
        if gm.session.fallback_warning:
            log.warning("%s", gm.session.fallback_warning)
        log.info("loaded %s %s on %s in %.1fs", model, gm.objective.describe(), gm.provider,
                 time.perf_counter() - t0)
        return gm

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
        from onnxdream.runtime.session import resolve_providers

        first = resolve_providers(self.config.device)[0]
        return first[0] if isinstance(first, tuple) else first
