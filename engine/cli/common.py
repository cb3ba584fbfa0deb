"""What every ``onnxdream`` command shares: the Typer app, errors → exit codes, progress bars,
option declarations, and the ``[dream options]`` turned into one DreamSettings.

A new command lives in its own module, ``engine/cli/<name>.py``, registered on the shared app
and imported at the end of :mod:`onnxdream.cli.main`; ``@with_dream_options`` gives it every
``[dream options]`` flag (model, preset, layers, objective, octaves, steps, step size, …)::

    from pathlib import Path
    from typing import Annotated

    import typer

    from onnxdream.cli.common import (DeviceOpt, DreamOptions, QuietOpt, app, user_errors,
                                      with_dream_options)

    @app.command()
    @with_dream_options
    def zoom(image: Annotated[Path, typer.Argument(help="The photo to start from.")],
             options: DreamOptions = None, device: DeviceOpt = "auto", quiet: QuietOpt = False):
        # the docstring is the command's --help
        with user_errors():
            settings = options.settings().with_seed()  # validated, preset applied
            ...

The library raises typed errors; only the CLI prints them: :func:`user_errors` gives one red
line and the error's exit code (2), naming a setting by the command's own flag
(``SettingsError(field="step_size")`` → ``--step-size``), and 130 for Ctrl-C.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from onnxdream import __version__
from onnxdream.core.errors import MemoryBudgetError, OnnxDreamError, SettingsError
from onnxdream.settings.build import from_options
from onnxdream.settings.options import DEFAULT_STEP_SIZE, DreamSettings

if TYPE_CHECKING:
    from onnxdream.settings.schedule import Schedule

__all__ = ["DREAM_OPTION_NAMES", "DEVICE_HELP", "DeviceOpt", "DreamOptions", "JsonOpt",
           "LAYER_HELP", "LayersOpt", "MODEL_HELP", "MaxMemoryOpt", "ModelOpt", "OBJECTIVE_HELP",
           "QuietOpt", "SCHEDULE_HELP", "TARGET_HELP", "TargetOpt",
           "app", "default_output", "err", "export_app", "flag_for", "maybe_progress",
           "progress_bar", "slug", "user_errors", "warn", "with_dream_options"]

app = typer.Typer(
    name="onnxdream",
    help="DeepDream and feature visualisation on onnxruntime alone.\n\n"
         "Start with:  onnxdream dream photo.jpg -o dream.png",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
export_app = typer.Typer(help="Turn a framework's classifier into a dreamable .onnx model.",
                         no_args_is_help=True)
app.add_typer(export_app, name="export")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"onnxdream {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool | None, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None):
    pass


# -- errors -----------------------------------------------------------------------------------

# settings fields whose option is spelled otherwise than the field
_FIELD_PARAMS = {"layers": "layer"}


def err(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)


def warn(message: str) -> None:
    typer.secho(f"warning: {message}", err=True, fg=typer.colors.YELLOW)


def flag_for(field: str) -> str:
    """The running command's option for a settings field (``step_size`` → ``--step-size``)."""
    name = _FIELD_PARAMS.get(field, field)
    ctx = _current_context()
    if ctx is not None:
        for p in ctx.command.params:
            if p.name == name and getattr(p, "opts", None):
                longs = [o for o in p.opts if o.startswith("--")]
                return longs[0] if longs else p.opts[0]
    return "--" + name.replace("_", "-")


def _current_context():
    """The running command's click context: Typer >= 0.22 runs commands on a vendored copy of
    click (``typer._click``) whose context stack ``click.get_current_context`` cannot see."""
    import importlib

    for module in ("typer._click.globals", "click"):
        try:
            ctx = importlib.import_module(module).get_current_context(silent=True)
        except (ImportError, AttributeError):
            continue
        if ctx is not None:
            return ctx
    return None


@contextlib.contextmanager
def user_errors():
    """One clear line and the error's exit code (2) for a user's mistake; 130 for Ctrl-C."""
    try:
        yield
    except SettingsError as exc:
        err(exc.named(flag_for(exc.field)))
        raise typer.Exit(exc.exit_code) from None
    except MemoryBudgetError as exc:
        err(f"{exc}; raise it with {flag_for(exc.field)} MB, or dream a smaller image")
        raise typer.Exit(exc.exit_code) from None
    except OnnxDreamError as exc:
        err(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err("interrupted; nothing was written")
        raise typer.Exit(130) from None


# -- progress ---------------------------------------------------------------------------------


def progress_bar(file=None):
    """A rich progress bar on stderr (or the text file ``file``): description, bar, done/total,
    info, elapsed, ETA."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), transient=False,
                    console=Console(stderr=True) if file is None else Console(file=file))


@contextlib.contextmanager
def maybe_progress(quiet: bool):
    """A :func:`progress_bar`, or None when ``quiet``."""
    if quiet:
        yield None
        return
    with progress_bar() as bar:
        yield bar


def default_output(image: Path, suffix: str) -> Path:
    return Path.cwd() / f"{image.stem}-{suffix}.png"


def slug(text: str, default: str) -> str:
    """``text`` as a file-name part (letters, digits and dots; at most 60), else ``default``."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:60] or default


# -- shared options ---------------------------------------------------------------------------

MODEL_HELP = "A zoo name (see `onnxdream models`) or a path to a dreamable .onnx file."
LAYER_HELP = ("Layer to dream on, NAME or NAME:WEIGHT; repeat to mix layers "
              "(`onnxdream layers MODEL` lists them). A name that ends in :N, like tf2onnx's "
              "model/block_1/Relu6:0, is that layer (weigh it: …/Relu6:0:2). Default: the "
              "model's recommended layer.")
OBJECTIVE_HELP = ("What to maximise at the layer(s): mean (default), l2 (mean of squares), "
                  "channel:K, neuron:K (channel K at the centre) or class:K (logit K).")
DEVICE_HELP = "auto (CUDA when onnxruntime-gpu sees a GPU, else CPU), cpu or cuda."

ModelOpt = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
LayersOpt = Annotated[list[str] | None, typer.Option("--layer", "-l", help=LAYER_HELP)]
DeviceOpt = Annotated[str, typer.Option(help=DEVICE_HELP)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
MaxMemoryOpt = Annotated[int | None, typer.Option(
    "--max-memory", metavar="MB", min=1, show_default=False,
    help="Most memory the dream may take, in MB: the tiles are the largest that fit, and a "
    "dream that cannot fit is refused before it starts  \\[default: half the memory of the "
    "machine or the container] \\[env ONNXDREAM_MAX_MEMORY_MB].")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
TARGET_HELP = ("The compiled graph's op profile: default (fastest on onnxruntime's CPU and CUDA) "
               "or portable (no MaxPool Indices or ScatterElements(add): for WebGPU in the "
               "browser and OpenVINO; same values).")
TargetOpt = Annotated[str, typer.Option(help=TARGET_HELP)]

_D = DreamSettings()


def _default(value: Any) -> str:
    return f"  \\[default: {value}]"


# how --help states a default that the model decides (the settings hold None for it)
_DEFAULT_TEXT = {"step_size": "the model's recommendation (`onnxdream models` shows it), else "
                              f"{DEFAULT_STEP_SIZE}"}


# Keyframes for the options a command lets change over a clip (video, zoom): how --help says it.
SCHEDULE_HELP = {
    "layer": " In a clip, keyframes: `0:blocks.5,120:blocks.9` cuts to blocks.9 at frame 120 "
             "(`5s:` at 5 seconds; `+` mixes layers in one key: `0:blocks.5+blocks.9:0.5`).",
    "steps": " In a clip, keyframes: `0:5,10s:15` (held until the next key).",
    "step_size": " In a clip, keyframes: `0:0.004,120:0.012` (ramped between keys).",
}
# the settings field each schedulable option keyframes
_SCHEDULE_FIELDS = {"layer": "layers", "steps": "steps", "step_size": "step_size"}


def _dream_options(defaults: Mapping[str, Any] | None = None,
                   scheduled: Collection[str] = ()) -> dict[str, tuple[Any, Any]]:
    """The [dream options], in --help order: name → (annotation, default).

    Defaults are None ("not given") so a --preset can fill them; the real defaults come from
    DreamSettings, or from ``defaults`` (a command's own, shown in its --help). Options named in
    ``scheduled`` take keyframe text (a ``str``) instead of one number.
    """
    d = {**asdict(_D), **(defaults or {})}

    def opt(name: str, kind: Any, help: str, *flags: str, default: bool = True,
            **kw: Any) -> Any:
        if name in scheduled:
            kind, help = str, help + "." + SCHEDULE_HELP[name]
        help += _default(_DEFAULT_TEXT.get(name, d[name]) if d[name] is None else d[name]) \
            if default else ""
        return Annotated[kind | None, typer.Option(*flags, help=help, show_default=False,
                                                   **kw)]

    layer_help = LAYER_HELP + (SCHEDULE_HELP["layer"] if "layer" in scheduled else "")
    return {
        "model": (ModelOpt, _D.model),
        "preset": (Annotated[str | None, typer.Option(
            help="A named recipe: keras-classic, keras-io, caffe-googlenet or tf-notebook "
            "(layers, objective, border, schedule, stop rule); options given explicitly "
            "override it.")], None),
        "layer": (Annotated[list[str] | None, typer.Option(
            "--layer", "-l", help=layer_help)], None),
        "objective": (opt("objective", str, OBJECTIVE_HELP, default=False), None),
        "pre_relu": (opt("pre_relu", bool, "Use layer values before their ReLU (stronger, "
                         "more varied)  \\[default: no]", "--pre-relu/--no-pre-relu",
                         default=False), None),
        "border": (opt("border", int, "Pixels to drop at each edge of the layer before "
                       "reducing", min=0), None),
        "octaves": (opt("octaves", str, "Number of scales, smallest first; auto: as many as "
                        "bring the smallest near the model's native size (4 for a 512-px photo, "
                        "8 for 2048 px)", metavar="N|auto"), None),
        "octave_scale": (opt("octave_scale", float, "Size ratio between octaves"), None),
        "steps": (opt("steps", int, "Gradient-ascent steps per octave"), None),
        "step_size": (opt("step_size", float, "Step length: mean pixel change per step, on "
                          "the [0,1] scale"), None),
        "jitter": (opt("jitter", int, "Random shift in pixels each step (0: none)"), None),
        "tile_size": (opt("tile_size", int, "Largest tile side: bigger images are processed "
                          "in tiles, made smaller when --max-memory requires (0: as large as "
                          "fits)"), None),
        "normalize": (opt("normalize", str, "Gradient normalisation: mean-abs, std or lapnorm "
                          "(Laplacian pyramid)"), None),
        "grad_floor": (opt("grad_floor", float, "Divide the gradient by max(size, F) instead of "
                           "size + 1e-8, size being what --normalize measures (keras.io's Deep "
                           "Dream uses 1e-6; the keras-io preset sets it)  \\[default: none]",
                           default=False), None),
        "max_loss": (Annotated[float | None, typer.Option(
            help="Stop once the objective exceeds this value.")], None),
        "seed": (Annotated[int | None, typer.Option(
            help="Random seed for the jitter; the one used is stored in the PNG.")], None),
    }


DREAM_OPTION_NAMES = tuple(_dream_options())


def _layers_of(model: str) -> list[str]:
    from onnxdream.exporters.graph.layers import layer_table, load_model
    from onnxdream.runtime.opening import resolve_model_path

    return list(layer_table(load_model(resolve_model_path(model))))


@dataclass(frozen=True)
class DreamOptions:
    """The [dream options] as given on the command line (None: not given).

    ``defaults``: the command's own ascent defaults (below a --preset, above DreamSettings');
    ``scheduled``: the options given as keyframe text (see :meth:`schedules`).
    """

    values: dict[str, Any]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    scheduled: tuple[str, ...] = ()

    def _keyframed(self) -> tuple[dict[str, Any], dict[str, Schedule]]:
        from onnxdream.dream.frame import keyframed_settings

        return keyframed_settings({_SCHEDULE_FIELDS[n]: self.values.get(n)
                                   for n in self.scheduled})

    def schedules(self) -> dict[str, Schedule]:
        """The keyframed options whose value changes over the clip, as settings field →
        :class:`~onnxdream.settings.schedule.Schedule` (``{"layers": ..., "step_size": ...}``); one
        given as a single value is not here (:meth:`settings` holds it). Every key's value is
        checked as a setting (ScheduleError naming the field)."""
        return self._keyframed()[1]

    def settings(self, **controls: Any) -> DreamSettings:
        """One validated DreamSettings: explicit options over the preset over the command's
        defaults over DreamSettings' (the model's layers are read only when a preset must
        choose them). A keyframed option contributes its first key's value. Seed as given.
        ``controls``: further DreamSettings fields the command has options for (``dream``'s
        creative controls: guide, mask, keep_colors, ...), None meaning not given."""
        options = dict(self.values)
        first, _ = self._keyframed()
        for name in self.scheduled:
            if _SCHEDULE_FIELDS[name] in first:
                options[name] = first[_SCHEDULE_FIELDS[name]]
        options["layers"] = options.pop("layer", None)
        return from_options(layers_of=_layers_of, defaults=self.defaults,
                                          **options, **controls)


def with_dream_options(func: Callable | None = None, *,
                       defaults: Mapping[str, Any] | None = None,
                       schedules: Collection[str] = ()) -> Callable:
    """Give a command the shared [dream options] in place of its ``options`` parameter.

    The command declares ``options: DreamOptions = None`` where the options should appear in
    ``--help``; it is called with ``options=DreamOptions({...})``. Used bare
    (``@with_dream_options``) or with arguments:

    - ``defaults``: the command's own ascent defaults (``{"steps": 5}``), shown in its --help;
      a --preset still overrides them, explicit options override both;
    - ``schedules``: which of ``layer``, ``steps``, ``step_size`` accept keyframes
      (``"0:blocks.5,120:blocks.9"``); the command gets them from ``options.schedules()``.
    """
    if func is None:
        return functools.partial(with_dream_options, defaults=defaults, schedules=schedules)
    unknown = set(schedules) - set(SCHEDULE_HELP)
    if unknown:
        raise TypeError(f"only {', '.join(SCHEDULE_HELP)} can be keyframed, not {unknown}")
    table = _dream_options(defaults, schedules)
    sig = inspect.signature(func, eval_str=True)
    if "options" not in sig.parameters:
        raise TypeError(f"{func.__name__} needs an 'options: DreamOptions = None' parameter")
    # all keyword-only (click passes every parameter by name), so the order stays as declared
    kw = inspect.Parameter.KEYWORD_ONLY
    params: list[inspect.Parameter] = []
    for p in sig.parameters.values():
        if p.name != "options":
            params.append(p.replace(kind=kw))
            continue
        params += [inspect.Parameter(name, kw, default=default, annotation=annotation)
                   for name, (annotation, default) in table.items()]
    frozen_defaults = dict(defaults or {})
    scheduled = tuple(schedules)

    @functools.wraps(func)
    def command(**kwargs):
        values = {name: kwargs.pop(name, None) for name in table}
        return func(options=DreamOptions(values, frozen_defaults, scheduled), **kwargs)

    command.__signature__ = sig.replace(parameters=params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command
