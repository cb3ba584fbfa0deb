"""What every batch worker runs: :class:`Dreamer` dreams one item (a photo or a video) with its
loaded models and returns its manifest row; an item's own failure is a ``failed`` row."""

from __future__ import annotations

import time
from pathlib import Path

from onnxdream.batch.items import (
    FAILED,
    HASH_KEY,
    OK,
    BatchItem,
    ManifestRow,
    image_hash,
    video_hash,
)
from onnxdream.core.errors import OnnxDreamError, first_line
from onnxdream.dream.frame import file_fingerprint
from onnxdream.runtime.model_cache import ModelCache

__all__ = ["Dreamer"]

# ---------------------------------------------------------------------------------------------
# The dreamer: what every worker runs


class Dreamer:
    """Dreams items with loaded models: one GradientModel (one onnxruntime session) per
    objective, the last ``max_models`` kept. :meth:`process` never raises for an item's own
    problem: it returns a ``failed`` row."""

    def __init__(self, device: str = "auto", threads: int | None = None, max_models: int = 4):
        self.models = ModelCache(device=device, threads=threads, size=max_models)

    def process(self, item: BatchItem) -> ManifestRow:
        t0 = time.perf_counter()
        digest = ""
        try:
            if item.kind == "video":
                digest = self._video(item)
            else:
                digest = self._image(item)
        except OnnxDreamError as exc:
            return ManifestRow.for_item(item, FAILED, settings_hash=digest,
                                        seconds=time.perf_counter() - t0,
                                        error=first_line(exc, 300))
        except Exception as exc:  # noqa: BLE001 - one item's bug must not stop the batch
            return ManifestRow.for_item(item, FAILED, settings_hash=digest,
                                        seconds=time.perf_counter() - t0,
                                        error=f"{type(exc).__name__}: {first_line(exc, 300)}")
        return ManifestRow.for_item(item, OK, settings_hash=digest,
                                    seconds=time.perf_counter() - t0)

    def _image(self, item: BatchItem) -> str:
        from onnxdream.dream.ascent import dream
        from onnxdream.media.imageio import load_image
        from onnxdream.media.imagewrite import save_image
        from onnxdream.settings.provenance import dream_metadata
        from onnxdream.settings.resolve import resolve

        loaded = load_image(item.input)
        gm, objective, params = self.models.get(item.settings)
        h, w = loaded.rgb.shape[:2]
        resolved = resolve(item.settings, h, w, gm.info)
        digest = image_hash(resolved, item.model_id, file_fingerprint(item.input))
        result = dream(gm, loaded.rgb, resolved, params=params)
        meta = dream_metadata(resolved, objective=objective, provider=gm.provider,
                              image=item.input, output=item.output)
        meta[HASH_KEY] = digest
        Path(item.output).parent.mkdir(parents=True, exist_ok=True)
        save_image(item.output, result, alpha=loaded.alpha, metadata=meta)
        return digest

    def _video(self, item: BatchItem) -> str:
        from onnxdream.dream.ascent import dream
        from onnxdream.video.clip import dream_video, frame_settings

        gm, _, weights = self.models.get(item.settings)
        digest = video_hash(item, file_fingerprint(item.input))

        def dream_frame(rgb, params):
            return dream(gm, rgb, frame_settings(item.settings, params), params=weights)

        Path(item.output).parent.mkdir(parents=True, exist_ok=True)
        dream_video(item.input, item.output, dream_frame,
                    dream_key={"batch": digest, "settings": item.settings})
        return digest
