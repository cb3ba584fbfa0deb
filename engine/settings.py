"""Helpers shared by the frozen settings dataclasses of dream and visualize."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict

import numpy as np

from onnxdream.errors import OnnxDreamError


def require(checks: Iterable[tuple[bool, str]]) -> None:
    """Raise the message of the first check that fails."""
    for ok, message in checks:
        if not ok:
            raise OnnxDreamError(message)


def random_seed() -> int:
    """A fresh seed in [0, 2^32), recorded so that the run can be reproduced."""
    return int(np.random.SeedSequence().generate_state(1)[0])


def describe(settings) -> dict[str, str]:
    """A settings dataclass as strings, for PNG metadata (None → "")."""
    return {k: ("" if v is None else str(v)) for k, v in asdict(settings).items()}
