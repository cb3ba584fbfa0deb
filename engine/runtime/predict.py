"""Classify an image with a dreamable model (its ``logits`` output)."""

from __future__ import annotations

import os

import numpy as np

from onnxdream.exporters.graph.contract import (
    IMAGE,
    LOGITS,
)
from onnxdream.media.imageio import resize
from onnxdream.runtime.opening import open_model
from onnxdream.runtime.session import create_session


class Classifier:
    """A session on a dreamable model's ``logits``; images are resized to the native size."""

    def __init__(self, model: str | os.PathLike, device: str = "auto", threads: int | None = None):
        opened = open_model(model)
        path, info = opened.path, opened.info
        info.require_logits("it cannot classify")
        self.size = info.native_size
        self.labels: list[str] | None = info.labels
        self.session = create_session(path, device=device, threads=threads)

    def logits(self, rgb: np.ndarray) -> np.ndarray:
        x = resize(rgb, self.size).transpose(2, 0, 1)[None]
        x = np.ascontiguousarray(np.clip(x, 0.0, 1.0), dtype=np.float32)
        return self.session.run([LOGITS], {IMAGE: x})[0][0]

    def predict(self, rgb: np.ndarray, top: int = 5) -> list[dict]:
        """The ``top`` classes, best first: ``{"index", "label", "probability"}``."""
        z = self.logits(rgb).astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.argsort(-p)[:max(1, top)]
        return [{"index": int(i),
                 "label": self.labels[i] if self.labels and i < len(self.labels) else str(i),
                 "probability": float(p[i])} for i in order]
