"""A real Ray cluster on the loopback address for a test, stopped by its process group.

``ray start --head --block`` runs as its own session leader, so its children (GCS, raylet, ...)
share its process group and ``os.killpg`` reaches exactly this cluster (never ``ray stop``,
which kills every Ray process on the machine, other people's too). Per cluster: a free port, a
private temporary folder (short: Unix socket paths live under it), a random token, and the
environment that keeps Ray on 127.0.0.1; the driver must be started with the same ``env``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1


def needs_ray() -> None:
    """Skip without Ray Data, WITHOUT importing it here: Ray reads its environment once, when
    imported, and a test that starts a private instance needs its own token set before that."""
    import importlib.util

    import pytest

    spec = importlib.util.find_spec("ray")
    if spec is None or not any((Path(d) / "data").is_dir()
                               for d in spec.submodule_search_locations or []):
        pytest.skip("ray[data] is not installed (the [ray] extra)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a loopback cluster and of the drivers that join it."""
    env = dict(os.environ if base is None else base)
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # keep 127.0.0.1 (not eth0's address)
               RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # stop in ~1 s, not 30
    return env


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Cluster:
    address: str
    env: dict[str, str]
    log: str


@contextlib.contextmanager
def ray_cluster(num_cpus: int = 2, timeout: float = 60.0,
                env: dict[str, str] | None = None) -> Iterator[Cluster]:
    """Start a head on 127.0.0.1 with ``num_cpus`` CPUs; yield its address and environment."""
    env = ray_env(env)
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    log_path = os.path.join(temp_dir, "ray-start.log")
    head = None
    try:
        port = free_port()
        with open(log_path, "w") as log:
            head = subprocess.Popen(
                [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                 "--node-ip-address", "127.0.0.1", "--port", str(port),
                 "--num-cpus", str(num_cpus), "--num-gpus", "0", "--include-dashboard=false",
                 "--object-store-memory", "500000000", "--disable-usage-stats",
                 "--temp-dir", temp_dir, "--min-worker-port", "0", "--max-worker-port", "0",
                 "--dashboard-agent-listen-port", "0"],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while True:
            with open(log_path, errors="replace") as fh:
                text = fh.read()
            if "Ray runtime started" in text:
                break
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed (exit {head.poll()}):\n{text[-3000:]}")
            time.sleep(0.2)
        yield Cluster(f"127.0.0.1:{port}", env, log_path)
    finally:
        if head is not None:
            head.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                head.wait(15)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(head.pid, signal.SIGKILL)  # leftovers of this cluster only
            with contextlib.suppress(subprocess.TimeoutExpired):
                head.wait(5)
        shutil.rmtree(temp_dir, ignore_errors=True)
