"""The ``local`` backend of :mod:`onnxdream.batch.run`: worker processes on this machine.

Each worker is a spawned process holding a :class:`~onnxdream.batch.run.Dreamer` (its loaded models)
for the whole batch; the driver hands each one item at a time over its own pipe and gets the
manifest row back. A worker that dies on an item (a crash, the out-of-memory killer) fails that
item only and is replaced.
"""

from __future__ import annotations

import collections
import contextlib
import json
import signal
import time
from collections.abc import Iterator, Sequence
from typing import Any

from onnxdream.batch.dreamer import Dreamer
from onnxdream.batch.items import DIED, FAILED, BatchItem, ManifestRow
from onnxdream.settings.memory import system_memory_bytes

__all__ = ["WORKER_MEMORY", "default_workers", "local_rows", "worker_threads"]

#: Memory one local worker may need (model, session arenas, a large image's octaves).
WORKER_MEMORY = 1536 * 1024 * 1024



def default_workers(device: str = "auto", items: int | None = None) -> int:
    """Local workers that fit: one per physical core, as many as memory allows (about 1.5 GB
    each, within a container's memory limit), one on a GPU (the GPU is the bottleneck), never
    more than the items."""
    from onnxdream.runtime.session import available_devices, cpu_cores

    if device == "cuda" or (device == "auto" and "cuda" in available_devices()):
        n = 1
    else:
        n = cpu_cores()
        avail = _available_memory()
        if avail is not None:
            n = min(n, max(1, avail // WORKER_MEMORY))
    return max(1, min(n, items if items else n))


def _available_memory() -> int | None:
    """What the workers may take: the machine's available memory, within the container's
    limit (the cgroup-aware figure of the memory budget, :func:`system_memory_bytes`)."""
    found = [v for v in (_mem_available(), system_memory_bytes()) if v]
    return min(found) if found else None


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def worker_threads(workers: int, cpus: float | None = None) -> int:
    """onnxruntime threads per worker: ``$ONNXDREAM_THREADS`` if set, else the cores shared
    out (``cpus`` each when given)."""
    from onnxdream.runtime.session import cpu_cores, env_threads

    env = env_threads()
    if env is not None:
        return env
    if cpus is not None:
        return max(1, int(cpus))
    return max(1, cpu_cores() // max(1, workers))


def _worker_main(conn, device: str, threads: int) -> None:
    """A local worker: items in, rows out, over its pipe, until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver stops us; Ctrl-C is its business
    dreamer = Dreamer(device, threads)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        row = dreamer.process(BatchItem.from_json(msg))
        try:
            conn.send(row.to_json())
        except (BrokenPipeError, OSError):
            return


def local_rows(items: Sequence[BatchItem], *, workers: int, device: str = "auto",
               threads: int | None = None) -> Iterator[ManifestRow]:
    """Dream ``items`` on ``workers`` processes; yields rows as items finish.

    Each worker holds its models for the whole batch and gets one item at a time. A worker that
    dies (a crash, the out-of-memory killer) fails its item and is replaced, so a poison item
    cannot stop the batch; the workers are stopped when the generator is closed.
    """
    import multiprocessing
    from multiprocessing.connection import wait

    if not items:
        return
    ctx = multiprocessing.get_context("spawn")
    threads = threads if threads is not None else worker_threads(workers)
    queue = collections.deque(items)
    procs: dict[int, tuple[Any, Any]] = {}  # slot -> (process, connection)
    busy: dict[int, BatchItem] = {}
    restarts = 0

    def start(slot: int) -> None:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker_main, args=(child, device, threads), daemon=True,
                        name=f"onnxdream-batch-{slot}")
        p.start()
        child.close()
        procs[slot] = (p, parent)

    def retire(slot: int) -> int | None:
        p, conn = procs.pop(slot)
        with contextlib.suppress(OSError):
            conn.close()
        p.join(1)
        if p.is_alive():
            p.kill()
            p.join(1)
        return p.exitcode

    def replace(slot: int) -> bool:
        """A new worker in ``slot``, unless workers keep dying (then the slot stays empty)."""
        nonlocal restarts
        restarts += 1
        if restarts > len(items):
            return False
        start(slot)
        return True

    def feed(slot: int) -> None:
        while queue and slot in procs and slot not in busy:
            item = queue.popleft()
            try:
                procs[slot][1].send(item.to_json())
                busy[slot] = item
            except (OSError, ValueError):  # it died between items: the item goes back
                queue.appendleft(item)
                retire(slot)
                replace(slot)

    try:
        for slot in range(min(workers, len(items))):
            start(slot)
            feed(slot)
        while busy:
            waitables = {}
            for slot in busy:
                p, conn = procs[slot]
                waitables[conn] = slot
                waitables[p.sentinel] = slot
            for ready in wait(list(waitables)):
                slot = waitables[ready]
                if slot not in busy or ready not in (procs[slot][1], procs[slot][0].sentinel):
                    continue  # handled with its pair already (and maybe replaced) this round
                conn = procs[slot][1]
                row = None
                with contextlib.suppress(EOFError, OSError):
                    if conn.poll():
                        row = ManifestRow.from_dict(json.loads(conn.recv()))
                item = busy.pop(slot)
                if row is None:  # the process ended without an answer: it died on this item
                    code = retire(slot)
                    row = ManifestRow.for_item(item, FAILED, error=f"{DIED}, exit code {code}")
                    replace(slot)
                yield row
                feed(slot)
        for item in queue:  # only when workers kept dying
            yield ManifestRow.for_item(item, FAILED, error=f"not dreamed: {DIED} again and again")
    finally:
        for _p, conn in procs.values():
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
        deadline = time.monotonic() + 2.0
        for p, conn in procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(2)
            if p.is_alive():
                p.kill()
                p.join(1)
            with contextlib.suppress(OSError):
                conn.close()
