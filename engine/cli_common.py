"""What every ``onnxdream`` command shares: the Typer app, errors → exit codes, progress bars,
option declarations, and the ``[dream options]`` turned into one DreamSettings.

A new command lives in its own module, ``engine/cli_<name>.py``, registered on the shared app
and listed in ``onnxdream.cli.COMMAND_MODULES``; ``@with_dream_options`` gives it every
``[dream options]`` flag (model, preset, layers, objective, octaves, steps, step size, …)::

    from pathlib import Path
    from typing import Annotated

    import typer

    from onnxdream.cli_common import (DeviceOpt, DreamOptions, QuietOpt, app, user_errors,
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from onnxdream import __version__
from onnxdream.errors import OnnxDreamError, SettingsError
from onnxdream.settings import DreamSettings

__all__ = ["DREAM_OPTION_NAMES", "DEVICE_HELP", "DeviceOpt", "DreamOptions", "JsonOpt",
           "LAYER_HELP", "LayersOpt", "MODEL_HELP", "ModelOpt", "OBJECTIVE_HELP", "QuietOpt",
           "app", "default_output", "err", "export_app", "flag_for", "maybe_progress",
           "progress_bar", "user_errors", "warn", "with_dream_options"]

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
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]

_D = DreamSettings()


def _default(value: Any) -> str:
    return f"  \\[default: {value}]"


# The [dream options], in --help order: name → (annotation, default). Defaults are None
# ("not given") so a --preset can fill them; the real defaults come from DreamSettings.
_DREAM_OPTIONS: dict[str, tuple[Any, Any]] = {
    "model": (ModelOpt, _D.model),
    "preset": (Annotated[str | None, typer.Option(
        help="A named recipe: keras-classic, keras-io, caffe-googlenet or tf-notebook (layers, "
        "objective, border, schedule, stop rule); options given explicitly override it.")], None),
    "layer": (LayersOpt, None),
    "objective": (Annotated[str | None, typer.Option(
        help=OBJECTIVE_HELP, show_default=False)], None),
    "pre_relu": (Annotated[bool | None, typer.Option(
        "--pre-relu/--no-pre-relu", help="Use layer values before their ReLU (stronger, more "
        "varied)  \\[default: no]", show_default=False)], None),
    "border": (Annotated[int | None, typer.Option(
        help="Pixels to drop at each edge of the layer before reducing" + _default(_D.border),
        min=0, show_default=False)], None),
    "octaves": (Annotated[int | None, typer.Option(
        help="Number of scales, smallest first" + _default(_D.octaves),
        show_default=False)], None),
    "octave_scale": (Annotated[float | None, typer.Option(
        help="Size ratio between octaves" + _default(_D.octave_scale),
        show_default=False)], None),
    "steps": (Annotated[int | None, typer.Option(
        help="Gradient-ascent steps per octave" + _default(_D.steps), show_default=False)], None),
    "step_size": (Annotated[float | None, typer.Option(
        help="Step length: mean pixel change per step, on the [0,1] scale"
        + _default(_D.step_size), show_default=False)], None),
    "jitter": (Annotated[int | None, typer.Option(
        help="Random shift in pixels each step (0: none)" + _default(_D.jitter),
        show_default=False)], None),
    "tile_size": (Annotated[int | None, typer.Option(
        help="Images larger than this are processed in tiles of this size (0: never)"
        + _default(_D.tile_size), show_default=False)], None),
    "normalize": (Annotated[str | None, typer.Option(
        help="Gradient normalisation: mean-abs, std or lapnorm (Laplacian pyramid)"
        + _default(_D.normalize), show_default=False)], None),
    "max_loss": (Annotated[float | None, typer.Option(
        help="Stop once the objective exceeds this value.")], None),
    "seed": (Annotated[int | None, typer.Option(
        help="Random seed for the jitter; the one used is stored in the PNG.")], None),
}
DREAM_OPTION_NAMES = tuple(_DREAM_OPTIONS)


def _layers_of(model: str) -> list[str]:
    from onnxdream.exporters.graph.layers import layer_table, load_model
    from onnxdream.gradient import resolve_model_path

    return list(layer_table(load_model(resolve_model_path(model))))


@dataclass(frozen=True)
class DreamOptions:
    """The [dream options] as given on the command line (None: not given)."""

    values: dict[str, Any]

    def settings(self) -> DreamSettings:
        """One validated DreamSettings: explicit options over the preset over the defaults
        (the model's layers are read only when a preset must choose them). Seed as given."""
        options = dict(self.values)
        options["layers"] = options.pop("layer", None)
        return DreamSettings.from_options(layers_of=_layers_of, **options)


def with_dream_options(func: Callable) -> Callable:
    """Give a command the shared [dream options] in place of its ``options`` parameter.

    The command declares ``options: DreamOptions = None`` where the options should appear in
    ``--help``; it is called with ``options=DreamOptions({...})``.
    """
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
                   for name, (annotation, default) in _DREAM_OPTIONS.items()]

    @functools.wraps(func)
    def command(**kwargs):
        values = {name: kwargs.pop(name, None) for name in _DREAM_OPTIONS}
        return func(options=DreamOptions(values), **kwargs)

    command.__signature__ = sig.replace(parameters=params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command
