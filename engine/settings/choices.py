"""The names a setting may take, owned here so that settings validate without importing what
implements them: the gradient normalisers (:mod:`onnxdream.dream.normalize`), the image
parameterisations (:mod:`onnxdream.dream.param`), the transform sets
(:mod:`onnxdream.dream.transforms`), the creative controls' starting images
(:mod:`onnxdream.dream.controls`), and the ``size`` option's syntax. Each implementation imports
its names from here, and a test checks that it implements every one."""

from __future__ import annotations

from onnxdream.core.errors import SettingsError

__all__ = ["INITS", "NORMALIZERS", "PARAMS", "TRANSFORM_SETS", "parse_size"]

#: Gradient normalisers of a dream step (:mod:`onnxdream.dream.normalize`).
NORMALIZERS = ("mean-abs", "std", "lapnorm")
#: Image parameterisations of ``visualize`` (:mod:`onnxdream.dream.param`).
PARAMS = ("fft", "pixel")
#: Transform sets of ``visualize`` (:data:`onnxdream.dream.transforms.TRANSFORMS`).
TRANSFORM_SETS = ("standard", "none")
#: Starting images of a dream from nothing (``--init``, :mod:`onnxdream.dream.controls`).
INITS = ("noise", "grey")

def parse_size(text: str) -> tuple[int, int]:
    """``"512x384"`` → (512, 384) (width, height); ``"512"`` → (512, 512). SettingsError
    (``size``) when malformed."""
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2:
        raise SettingsError("size", f"must be WIDTHxHEIGHT (e.g. 512x384) or one number, got "
                                    f"{str(text)[:40]!r}")
    return values[0], values[1]
