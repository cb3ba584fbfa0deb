"""A video's options and their defaults, in one place: the CLI's ``video`` and ``zoom``, the
server's video jobs, batches of clips and the library (:func:`onnxdream.video.clip.dream_video`)
all read them from here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_BLEND", "ZOOM_DEFAULTS", "VideoOptions"]

#: Weight of the previous frame's prediction when blending. Measured on the synthetic clip with
#: the default model (benchmarks/bench_video.py): the temporal error falls with the blend but
#: flattens past 0.6 (0.0346, 0.0327, 0.0314, 0.0305, 0.0302 at 0.4-0.8; 0.0557 without flow)
#: while the carried-over detail grows faster past it (0.064, 0.069, 0.075, 0.084, 0.096; 0.052
#: for one frame alone): 0.6 is the knee.
DEFAULT_BLEND = 0.6

#: The zoom's dream settings (the CLI's defaults for ``onnxdream zoom``): few steps and octaves,
#: so each frame is quick and the feedback loop (not one frame's ascent) does the work. Each frame
#: builds on the last, so a still's strength saturates the colours within ~10 frames (5 steps of
#: 0.006 at 216x144, zoom 1.04); 3 steps of 0.004 keep the picture recognisable for ~2 s.
ZOOM_DEFAULTS = {"steps": 3, "octaves": 2, "step_size": 0.004}


@dataclass(frozen=True)
class VideoOptions:
    """What a video dream does besides the dream settings (the CLI's ``video`` options): the
    output format, the flow, the blend (a value or keyframes, 0..1; None: :data:`DEFAULT_BLEND`
    with flow, 0 without), and the frames selected (resize ``width``, ``start``, ``duration``,
    every N-th frame)."""

    fmt: str = "mp4"
    flow: bool = True
    blend: str | None = None
    width: int | None = None
    start: float = 0.0
    duration: float | None = None
    every: int = 1

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> VideoOptions:
        """The options of a form's typed fields (``format`` is :attr:`fmt`); defaults for the
        fields not given."""
        given = {("fmt" if k == "format" else k): v for k, v in fields.items()
                 if k in ("format", "flow", "blend", "width", "start", "duration", "every")}
        if "fmt" in given:
            given["fmt"] = str(given["fmt"]).lower()
        return cls(**given)
