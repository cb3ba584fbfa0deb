"""The ``ray`` backend of :mod:`onnxdream.batch.run`: a Ray Data pipeline over an actor pool.

``ray.data.from_items(items)`` (one item per block) → ``map_batches(RayDreamer, batch_size=1,
compute=ActorPoolStrategy(size=workers))``: each actor holds a :class:`~onnxdream.batch.run.Dreamer`
(its loaded models) for the whole batch and writes its outputs itself, so on a cluster the inputs
and the output folder must be on a filesystem every node sees at the same path. Rows stream back
to the driver as items finish (one progress bar, one manifest writer).

Where Ray runs (``address``): None starts a private instance on this machine (loopback only,
its own temporary folder and token, removed at the end); ``"auto"`` joins the cluster that
``ray start`` left running here; ``"HOST:PORT"`` joins that cluster's head (checked with a TCP
connect first: Ray itself waits minutes on a dead address).

Actors reserve ``cpus_per_worker`` CPUs, or ``gpus_per_worker`` GPUs (then no CPUs are asked
for), and choose the onnxruntime provider from what Ray assigned them: CUDA on their GPU when
they got one, the CPU otherwise (never "whatever GPUs this node has").

Failure handling: an item that raises is a ``failed`` row (the :class:`Dreamer` catches it); an
actor process that dies (a crash, the out-of-memory killer) restarts and retries its item once,
then the item is dropped and reported as failed (``max_errored_blocks=-1``): Ray's default is to
retry such an item forever.

This module only sets Ray's loggers and its DataContext; what Ray's processes print to the
terminal is the front end's business (the CLI folds it into a log file).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from onnxdream.batch.dreamer import Dreamer
from onnxdream.batch.items import DIED, FAILED, BatchItem, ManifestRow
from onnxdream.batch.local_backend import worker_threads
from onnxdream.core.errors import BatchError, DependencyError, SettingsError, first_line
from onnxdream.core.net import is_loopback
from onnxdream.settings.options import require

__all__ = ["RayDreamer", "check", "check_address", "check_ray", "ray_rows"]

#: Object store of a private instance: rows and items are small (paths, not pixels).
PRIVATE_OBJECT_STORE = 200 * 1024 * 1024
#: CPUs an actor reserves by default (its onnxruntime threads follow).
DEFAULT_CPUS = 1.0


def check_ray() -> None:
    """A DependencyError unless Ray Data is installed."""
    import importlib.util

    # find_spec("ray.data") would import ray, and Ray reads its environment once, on import
    spec = importlib.util.find_spec("ray")
    where = list(spec.submodule_search_locations or []) if spec is not None else []
    if not any(os.path.isdir(os.path.join(d, "data")) for d in where):
        raise DependencyError("the ray backend needs the [ray] extra: "
                              "pip install 'onnxdream[ray]'")


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError("address", "must be auto or HOST:PORT (the head's `ray start "
                            f"--head --port`), not {address[:100]!r}")
    return host.strip("[]"), int(port)


def check_address(address: str | None, timeout: float = 3.0) -> None:
    """For ``HOST:PORT``: a BatchError unless something listens there (fast, unlike Ray)."""
    if address is None or address == "auto":
        return
    host, port = _split(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise BatchError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start "
                         "one with `ray start --head`, or leave out --address for a private "
                         "one", field="address") from None


@contextlib.contextmanager
def _environment(address: str | None):
    """Environment for the driver (and a private instance's processes), restored afterwards.

    Ray swaps a loopback node address for the machine's first interface unless
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and a private instance gets a token of its own (so
    nothing is written to ~/.ray, and no other local user can join it). Ray reads these when it
    is imported: this must run before the process's first ``import ray``.
    """
    change = {"RAY_USAGE_STATS_ENABLED": "0"}
    host = None if address in (None, "auto") else _split(address)[0]
    if address is None or (host is not None and is_loopback(host)):
        change["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if address is None and not os.environ.get("RAY_AUTH_MODE") and "ray" not in sys.modules:
        change.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    change = {k: v for k, v in change.items() if k not in os.environ}  # the user's win
    old = {k: os.environ.get(k) for k in change}
    os.environ.update(change)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _quiet_ray_logging() -> None:
    """Ray Data's console handlers off (its log file under the session folder keeps all)."""
    warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray")
    for h in logging.getLogger("ray.data").handlers:
        if type(h).__name__ != "SessionFileHandler":
            h.setLevel(logging.CRITICAL)


def check(address: str | None, *, device: str = "auto", gpus_per_worker: float = 0.0,
          cpus_per_worker: float | None = None) -> float:
    """What can be checked before a Ray run starts: the extra, the options, and that a
    ``HOST:PORT`` answers. Returns the CPUs each actor reserves."""
    check_ray()
    cpus = cpus_per_worker if cpus_per_worker is not None else DEFAULT_CPUS
    require([
        (not (gpus_per_worker and device == "cpu"), "gpus_per_worker",
         "asks for GPUs, and the device setting says cpu: drop one"),
        (device != "cuda" or gpus_per_worker > 0, "gpus_per_worker",
         "must be > 0 for CUDA on the ray backend (actors use CUDA when Ray gives them a GPU; "
         "1: a GPU each, 0.5: two per GPU)"),
        (cpus > 0, "cpus_per_worker", "must be > 0"),
    ])
    check_address(address)
    return cpus


class RayDreamer:
    """The ``map_batches`` actor: one :class:`Dreamer` for the actor's life, one item per call.

    The provider follows the assignment: CUDA (device 0 is the GPU Ray gave this actor) when
    ``ray.get_gpu_ids()`` is not empty, else the CPU.
    """

    def __init__(self, threads: int = 1):
        import ray

        gpu = bool(ray.get_gpu_ids())
        self.dreamer = Dreamer("cuda" if gpu else "cpu", threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        rows = [self.dreamer.process(BatchItem.from_json(str(text))).to_json()
                for text in batch["item"]]
        return {"row": np.array(rows, dtype=object)}


def _init(address: str | None, temp_dir: str | None) -> None:
    import ray

    common = dict(log_to_driver=False, logging_level="ERROR")
    try:
        if address is None:
            from onnxdream.runtime.session import cpu_cores

            ray.init(address="local", num_cpus=cpu_cores(), num_gpus=_local_gpus(),
                     object_store_memory=PRIVATE_OBJECT_STORE, include_dashboard=False,
                     _temp_dir=temp_dir, **common)
        else:
            ray.init(address=address, **common)
    except ConnectionError as exc:
        raise BatchError(f"cannot join the Ray cluster ({address}): "
                         f"{first_line(exc).rstrip('.')}; start "
                         "one with `ray start --head`, or leave out --address for a private "
                         "one", field="address") from None
    except Exception as exc:  # noqa: BLE001 - Ray raises many types (auth, version mismatch)
        raise BatchError(f"Ray did not start ({address or 'private instance'}): "
                         f"{type(exc).__name__}: {first_line(exc)}", field="address") from None


def _local_gpus() -> int | None:
    """GPUs for a private instance: let Ray detect them (None), or 0 without CUDA here."""
    from onnxdream.runtime.session import available_devices

    return None if "cuda" in available_devices() else 0


def _pool_size(workers: int | None, cpus: float, gpus: float, items: int) -> int:
    import ray

    if workers is None:
        res = ray.cluster_resources()
        have = res.get("GPU", 0.0) / gpus if gpus else res.get("CPU", 1.0) / cpus
        workers = max(1, int(have + 1e-9))
    return max(1, min(workers, items))


def ray_rows(items: Sequence[BatchItem], *, address: str | None = None,
             workers: int | None = None, gpus_per_worker: float = 0.0,
             cpus_per_worker: float | None = None, device: str = "auto",
             threads: int | None = None) -> Iterator[ManifestRow]:
    """Dream ``items`` on a Ray actor pool; yields rows as items finish (see the module doc).

    ``threads``: onnxruntime threads per actor (default ``$ONNXDREAM_THREADS``, else the CPUs
    it reserves, at least 1).
    """

    if not items:
        return
    cpus = check(address, device=device, gpus_per_worker=gpus_per_worker,
                 cpus_per_worker=cpus_per_worker)
    threads = threads if threads is not None else worker_threads(1, cpus)
    temp_dir = tempfile.mkdtemp(prefix="odr", dir="/tmp") if address is None else None
    with _environment(address):
        import ray
        import ray.data

        try:
            _init(address, temp_dir)
            _quiet_ray_logging()
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            ctx.max_errored_blocks = -1  # an item whose actor died is dropped, not fatal
            size = _pool_size(workers, cpus, gpus_per_worker, len(items))
            resources: dict[str, Any] = (
                {"num_gpus": gpus_per_worker} if gpus_per_worker else {"num_cpus": cpus})
            ds = ray.data.from_items([{"item": it.to_json()} for it in items],
                                     override_num_blocks=len(items))
            ds = ds.map_batches(
                RayDreamer, fn_constructor_kwargs={"threads": threads},
                batch_size=1, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1),
                max_task_retries=1, **resources)
            seen: set[str] = set()
            try:
                for rec in ds.iter_rows():
                    row = ManifestRow.from_dict(json.loads(str(rec["row"])))
                    seen.add(row.output)
                    yield row
            except Exception as exc:  # noqa: BLE001 - the pipeline itself failed
                raise BatchError(f"the Ray pipeline failed: {type(exc).__name__}: "
                                 f"{first_line(exc)}", field="backend") from None
            for item in items:  # dropped after its actor died twice
                if item.output not in seen:
                    yield ManifestRow.for_item(item, FAILED, error=DIED)
        finally:
            with contextlib.suppress(Exception):
                ray.shutdown()
            if temp_dir is not None:
                shutil.rmtree(temp_dir, ignore_errors=True)
