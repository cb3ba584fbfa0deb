"""Building a dream's settings from a front end's options (the CLI's flags, the server's form,
a batch's or a video's options): explicit values over a preset's over a command's defaults over
:class:`~onnxdream.settings.options.DreamSettings`' own. Above both the settings and the presets,
so neither imports the other."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from onnxdream.settings.options import ASCENT_FIELDS, DreamSettings
from onnxdream.settings.presets import get_preset, resolve_preset

__all__ = ["from_options"]

def from_options(*, layers_of: Callable[[str], Collection[str]] | None = None,
                 defaults: Mapping[str, Any] | None = None,
                 **options: Any) -> DreamSettings:
    """Build and validate a dream from front-end options, ``None`` meaning "not given".

    Explicit values win over the ``preset``'s, which win over ``defaults`` (a command's
    own ascent defaults, e.g. zoom's few steps per frame), which win over the defaults
    above. ``layers_of(model)`` lists the model's layer names; it is called only when a
    preset must choose among its layer alternatives (no ``layers`` given). The seed is
    left as given (see :meth:`DreamSettings.with_seed`).
    """
    unknown = set(options) - set(DreamSettings.field_names())
    if unknown:
        raise TypeError(f"unknown dream settings {sorted(unknown)}")
    defaults = dict(defaults or {})
    if set(defaults) - set(ASCENT_FIELDS):
        raise TypeError(f"defaults may set only {ASCENT_FIELDS}, not "
                        f"{sorted(set(defaults) - set(ASCENT_FIELDS))}")
    given = {k: v for k, v in options.items() if v is not None}
    for name in ("layers", "mask_layers"):
        if name in given and not given[name]:
            del given[name]  # an empty list: not given
    if given.get("guide") and "objective" not in given:
        given["objective"] = "guide"  # over a preset's objective too
    preset = given.pop("preset", None)
    if preset is None:
        return DreamSettings(**{**defaults, **given}).validate()
    recipe = get_preset(preset)  # an unknown name fails before any model is read
    model = given.get("model", DreamSettings.model)
    needs_layers = "layers" not in given
    plan = resolve_preset(
        recipe, layers_of(model) if (needs_layers and layers_of is not None) else (),
        layers=list(given.pop("layers", ())) or None, objective=given.pop("objective", None),
        border=given.pop("border", None), pre_relu=given.pop("pre_relu", None),
        defaults=defaults, **{k: given.pop(k) for k in ASCENT_FIELDS if k in given})
    return plan.dream_settings(**given).validate()
