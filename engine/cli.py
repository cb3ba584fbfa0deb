"""The ``onnxdream`` command line. The library raises; only this module prints and exits."""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from onnxdream import __version__
from onnxdream.errors import OnnxDreamError

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

MODEL_HELP = "A zoo name (see `onnxdream models`) or a path to a dreamable .onnx file."
LAYER_HELP = ("Layer to dream on, NAME or NAME:WEIGHT; repeat to mix layers "
              "(`onnxdream layers MODEL` lists them). Default: the model's recommended layer.")
OBJECTIVE_HELP = ("What to maximise at the layer(s): mean (default), l2 (mean of squares), "
                  "channel:K, neuron:K (channel K at the centre) or class:K (logit K).")
DEVICE_HELP = "auto (CUDA when onnxruntime-gpu sees a GPU, else CPU), cpu or cuda."


def _err(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)


@contextlib.contextmanager
def _user_errors():
    """One clear line and exit code 2 for a user's mistake; 130 for Ctrl-C."""
    try:
        yield
    except OnnxDreamError as exc:
        _err(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _err("interrupted; nothing was written")
        raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"onnxdream {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None):
    pass


def _progress_bar():
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), transient=False,
                    console=_stderr_console())


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _default_output(image: Path, suffix: str) -> Path:
    return Path.cwd() / f"{image.stem}-{suffix}.png"


# -- dream ------------------------------------------------------------------------------------

# dream's defaults where neither an option nor --preset sets a value
DREAM_DEFAULTS = {"octaves": 4, "octave_scale": 1.4, "steps": 10, "step_size": 0.006,
                  "jitter": 32, "tile_size": 512, "normalize": "mean-abs", "max_loss": None}


@app.command()
def dream(
    image: Annotated[Path, typer.Argument(help="The photo to dream on (PNG, JPEG, WebP, …).")],
    output: Annotated[Optional[Path], typer.Option(
        "-o", "--output", help="Where to write the dream; the extension picks the format "
        "(.png, .jpg, .webp). Default: IMAGE-dream.png in the current directory.")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)] = "efficientnet-lite0",
    preset: Annotated[Optional[str], typer.Option(
        help="A named recipe: keras-classic, keras-io, caffe-googlenet or tf-notebook (layers, "
        "objective, border, schedule, stop rule); options given explicitly override it.")] = None,
    layer: Annotated[Optional[list[str]], typer.Option("--layer", "-l", help=LAYER_HELP)] = None,
    objective: Annotated[Optional[str], typer.Option(
        help=OBJECTIVE_HELP, show_default=False)] = None,
    pre_relu: Annotated[Optional[bool], typer.Option(
        "--pre-relu/--no-pre-relu", help="Use layer values before their ReLU (stronger, more "
        "varied)  \\[default: no]", show_default=False)] = None,
    border: Annotated[Optional[int], typer.Option(
        help="Pixels to drop at each edge of the layer before reducing  \\[default: 0]",
        min=0, show_default=False)] = None,
    octaves: Annotated[Optional[int], typer.Option(
        help="Number of scales, smallest first  \\[default: 4]", show_default=False)] = None,
    octave_scale: Annotated[Optional[float], typer.Option(
        help="Size ratio between octaves  \\[default: 1.4]", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(
        help="Gradient-ascent steps per octave  \\[default: 10]", show_default=False)] = None,
    step_size: Annotated[Optional[float], typer.Option(
        help="Step length: mean pixel change per step, on the [0,1] scale  \\[default: 0.006]",
        show_default=False)] = None,
    jitter: Annotated[Optional[int], typer.Option(
        help="Random shift in pixels each step (0: none)  \\[default: 32]",
        show_default=False)] = None,
    tile_size: Annotated[Optional[int], typer.Option(
        help="Images larger than this are processed in tiles of this size (0: never)  "
        "\\[default: 512]", show_default=False)] = None,
    normalize: Annotated[Optional[str], typer.Option(
        help="Gradient normalisation: mean-abs, std or lapnorm (Laplacian pyramid)  "
        "\\[default: mean-abs]", show_default=False)] = None,
    max_loss: Annotated[Optional[float], typer.Option(
        help="Stop once the objective exceeds this value.")] = None,
    seed: Annotated[Optional[int], typer.Option(
        help="Random seed for the jitter; the one used is stored in the PNG.")] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Dream on IMAGE: amplify what a layer of the network sees in it.

    Example:  onnxdream dream cat.jpg -o cat-dream.png --layer blocks.9 --steps 20
    """
    with _user_errors():
        from onnxdream.ascent import describe, dream as run_dream, steps_total
        from onnxdream.gradient import GradientModel
        from onnxdream.imageio import check_output_path, load_image, save_image
        from onnxdream.presets import resolve_preset

        out = output or _default_output(image, "dream")
        check_output_path(out)
        model_layers: list[str] = []
        if preset is not None and not layer:
            from onnxdream.exporters.graph.layers import layer_table, load_model
            from onnxdream.gradient import resolve_model_path

            model_layers = list(layer_table(load_model(resolve_model_path(model))))
        plan = resolve_preset(
            preset, model_layers, layers=layer, objective=objective, border=border,
            pre_relu=pre_relu, defaults=DREAM_DEFAULTS, octaves=octaves,
            octave_scale=octave_scale, steps=steps, step_size=step_size, jitter=jitter,
            tile_size=tile_size, normalize=normalize, max_loss=max_loss)
        objective, pre_relu, border = plan.objective, plan.pre_relu, plan.border
        settings = plan.dream_settings(seed=seed).validate().with_seed()
        octaves, octave_scale, steps = settings.octaves, settings.octave_scale, settings.steps
        step_size, jitter, tile_size = settings.step_size, settings.jitter, settings.tile_size
        normalize, max_loss = settings.normalize, settings.max_loss
        loaded = load_image(image)
        gm = GradientModel(model, plan.layers, objective, pre_relu=pre_relu, border=border,
                           device=device)
        if gm.session.fallback_warning:
            typer.secho(f"warning: {gm.session.fallback_warning}", err=True,
                        fg=typer.colors.YELLOW)
        h, w = loaded.rgb.shape[:2]
        total = steps_total(h, w, settings)
        t0 = time.perf_counter()
        with _maybe_progress(quiet) as bar:
            task = bar.add_task("dreaming", total=total, info="") if bar else None

            def progress(p):
                if bar:
                    bar.update(task, completed=p.done, description=f"octave {p.octave}/{p.octaves}",
                               info=f"{p.size[1]}x{p.size[0]}  objective {p.objective:.3g}")

            result = run_dream(gm, loaded.rgb, settings, progress)
        meta = {
            "onnxdream:version": __version__,
            "onnxdream:model": model,
            "onnxdream:objective": gm.objective.describe(),
            "onnxdream:layers": json.dumps([t.layer for t in gm.objective.terms]),
            "onnxdream:pre_relu": str(pre_relu),
            "onnxdream:border": str(border),
            "onnxdream:preset": preset or "",
            "onnxdream:provider": gm.provider,
            "onnxdream:command": "onnxdream " + shlex.join(
                ["dream", str(image), "-o", str(out), "--model", model]
                + [a for t in gm.objective.terms for a in ("--layer", f"{t.layer}:{t.weight:g}")]
                + ["--objective", objective, "--octaves", str(octaves), "--octave-scale",
                   str(octave_scale), "--steps", str(steps), "--step-size", str(step_size),
                   "--jitter", str(jitter), "--tile-size", str(tile_size), "--normalize",
                   normalize, "--seed", str(settings.seed)]
                + (["--pre-relu"] if pre_relu else [])
                + (["--border", str(border)] if border else [])
                + (["--max-loss", str(max_loss)] if max_loss is not None else [])),
        }
        meta.update({f"onnxdream:{k}": v for k, v in describe(settings).items()})
        save_image(out, result, alpha=loaded.alpha, metadata=meta)
        typer.echo(f"wrote {out} ({w}x{h}, {time.perf_counter() - t0:.1f}s on {gm.provider}, "
                   f"seed {settings.seed})", err=True)


@contextlib.contextmanager
def _maybe_progress(quiet: bool):
    if quiet:
        yield None
        return
    with _progress_bar() as bar:
        yield bar


# -- predict ----------------------------------------------------------------------------------


@app.command()
def predict(
    image: Annotated[Path, typer.Argument(help="The photo to classify.")],
    model: Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)] = "efficientnet-lite0",
    top: Annotated[int, typer.Option(help="How many classes to show.", min=1, max=1000)] = 5,
    as_json: Annotated[bool, typer.Option(
        "--json", help='Print a JSON list of {"index", "label", "probability"}, best first.')] = False,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
):
    """Classify IMAGE with the model: the top classes and their probabilities."""
    with _user_errors():
        from onnxdream.imageio import load_image
        from onnxdream.predict import Classifier

        clf = Classifier(model, device=device)
        result = clf.predict(load_image(image).rgb, top)
        if as_json:
            typer.echo(json.dumps(result))
            return
        for r in result:
            typer.echo(f"{r['probability']:7.2%}  {r['index']:4d}  {r['label']}")


# -- models / layers / compile ----------------------------------------------------------------


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False):
    """List the zoo: the built-in models, which are installed and which are cached."""
    with _user_errors():
        from onnxdream.models import DEFAULT_MODEL, cached_models, list_zoo, model_home

        files = [p.name for p in cached_models()]  # <name>-<hash12>.onnx
        rows = []
        for e in list_zoo():
            cached = any(f.rsplit("-", 1)[0] == e.name for f in files)
            rows.append({"name": e.name, "default": e.name == DEFAULT_MODEL,
                         "installed": e.installed, "cached": cached,
                         "input_size": e.input_size, "layers": list(e.default_layers),
                         "license": e.license, "description": e.description,
                         "install": None if e.installed else e.pip_hint})
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        for r in rows:
            state = "cached" if r["cached"] else ("installed" if r["installed"] else
                                                  f"not installed: {r['install']}")
            mark = " (default)" if r["default"] else ""
            typer.echo(f"{r['name']}{mark}  {r['input_size']}px  layer {', '.join(r['layers'])}"
                       f"  [{state}]\n    {r['description']}")
        typer.echo(f"\nmodel home: {model_home()}  (set ONNXDREAM_HOME to move it)")


@app.command()
def layers(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """List a model's layers with their op types and output shapes (at its native size)."""
    with _user_errors():
        from onnxdream.exporters.graph import list_layers
        from onnxdream.gradient import resolve_model_path

        infos = list_layers(resolve_model_path(model))
        if as_json:
            typer.echo(json.dumps([{"name": i.name, "tensor": i.tensor, "op_type": i.op_type,
                                    "shape": list(i.shape) if i.shape else None}
                                   for i in infos], indent=1))
            return
        width = max((len(i.name) for i in infos), default=10)
        for i in infos:
            shape = "x".join(str(d) for d in i.shape) if i.shape else "?"
            typer.echo(f"{i.name:<{width}}  {i.op_type:<20} {shape}")


@app.command("compile")
def compile_cmd(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    output: Annotated[Path, typer.Option("-o", "--output", help="The gradient graph to write.")],
    layer: Annotated[Optional[list[str]], typer.Option("--layer", "-l", help=LAYER_HELP)] = None,
    objective: Annotated[str, typer.Option(help=OBJECTIVE_HELP)] = "mean",
    pre_relu: Annotated[bool, typer.Option(
        "--pre-relu", help="Use layer values before their ReLU/Clip activation.")] = False,
    border: Annotated[int, typer.Option(
        help="Pixels to drop at each edge of the layer before reducing.", min=0)] = 0,
):
    """Compile MODEL's gradient graph: outputs `objective` [N] and `grad` [N,3,H,W].

    Standard ONNX ops only: runs on any onnxruntime (CPU, CUDA, TensorRT, web).
    """
    with _user_errors():
        from onnxdream.exporters.graph import compile_gradient, save_model
        from onnxdream.exporters.graph.contract import ModelInfo
        from onnxdream.gradient import resolve_model_path

        path = resolve_model_path(model)
        names = layer or []
        if not names and not objective.startswith("class:"):
            names = ModelInfo.load(path).require_default_layers()
        graph = compile_gradient(path, names, objective, pre_relu=pre_relu, border=border)
        save_model(graph, output)
        ops = sorted({n.op_type for n in graph.graph.node})
        typer.echo(f"wrote {output}: {len(graph.graph.node)} nodes, ops {', '.join(ops)}",
                   err=True)


# -- export -----------------------------------------------------------------------------------


@export_app.command("torchvision")
def export_torchvision_cmd(
    name: Annotated[str, typer.Argument(help="A torchvision classifier, e.g. googlenet, resnet50.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The .onnx file to write.")],
    weights: Annotated[str, typer.Option(
        help="DEFAULT (torchvision's pretrained, needs internet once), none (random) or a "
        "state_dict FILE saved with torch.save.")] = "DEFAULT",
):
    """Export a torchvision classifier as a dreamable model (needs onnxdream[torch])."""
    with _user_errors():
        from onnxdream.exporters.torchvision import export_torchvision_result

        result = export_torchvision_result(
            name, output, weights, progress=lambda msg: typer.echo(msg, err=True))
        typer.echo(f"wrote {result.path}", err=True)


@export_app.command("keras")
def export_keras_cmd(
    model: Annotated[str, typer.Argument(
        help="A keras.applications model (InceptionV3, VGG16, MobileNetV2, EfficientNetB0, …) "
        "or a .keras / .h5 model file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The .onnx file to write.")],
    preprocess: Annotated[Optional[str], typer.Option(
        help="How the model expects its input: tf (x/127.5-1), caffe (BGR minus the ImageNet "
        "mean, 0..255), torch (ImageNet mean/std), none (0..255; the model scales itself) or "
        "unit ([0,1]). Inferred for application names; required for files.")] = None,
    weights: Annotated[Optional[str], typer.Option(
        help="For names: imagenet (Keras' download, needs internet once; the default), none "
        "(random) or a .weights.h5 FILE. For model files: a weights FILE to load instead of "
        "the file's own.")] = None,
    include_top: Annotated[bool, typer.Option(
        "--include-top", help="Keep the classifier (needed for --objective class:K and "
        "`onnxdream predict`); VGG-style heads then fix the input size.")] = False,
):
    """Export a Keras 3 model as a dreamable model (needs onnxdream[keras]; runs Keras on its
    torch backend, whatever KERAS_BACKEND says elsewhere)."""
    with _user_errors():
        from onnxdream.exporters.keras import export_keras_result

        result = export_keras_result(
            model, output, weights=weights, preprocess=preprocess, include_top=include_top,
            progress=lambda msg: typer.echo(msg, err=True))
        size = "dynamic H/W" if result.dynamic_hw else "fixed size"
        typer.echo(f"wrote {result.path} ({len(result.layers)} layers, {size})", err=True)


# -- serve ------------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")]
        = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8000,
    workers: Annotated[Optional[int], typer.Option(
        help="Dreams run at once (threads sharing the sessions). Default: 1 on a CPU with "
        "fewer than 8 cores, else 2 \\[env ONNXDREAM_WORKERS].", min=1, max=64)] = None,
    max_queue: Annotated[Optional[int], typer.Option(
        help="Dreams that may wait beyond the running ones; more get 503 + Retry-After "
        "(default 16) \\[env ONNXDREAM_MAX_QUEUE].", min=0)] = None,
    max_pixels: Annotated[Optional[int], typer.Option(
        help="Largest image accepted, width x height (default 16000000) "
        "\\[env ONNXDREAM_MAX_PIXELS].", min=1)] = None,
    max_body: Annotated[Optional[float], typer.Option(
        help="Largest request body in MB (default 32) \\[env ONNXDREAM_MAX_BODY_MB].",
        min=0.001)] = None,
    max_steps: Annotated[Optional[int], typer.Option(
        help="Most ascent steps (octaves x steps) per dream (default 1000) "
        "\\[env ONNXDREAM_MAX_STEPS].", min=1)] = None,
    model_path: Annotated[Optional[list[Path]], typer.Option(
        "--model-path", help="A dreamable .onnx file to offer, by its file stem; repeatable "
        "\\[env ONNXDREAM_MODEL_PATHS]. Requests can name only these and the zoo.")] = None,
    device: Annotated[Optional[str], typer.Option(
        help=DEVICE_HELP + " \\[env ONNXDREAM_DEVICE]")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level.")] = "info",
):
    r"""Serve dreams over HTTP, with a web page at / (needs onnxdream\[serve]).

    POST /dream (multipart: image + fields named like dream's options) returns the image;
    POST /jobs, GET /jobs/ID, GET /jobs/ID/result, DELETE /jobs/ID for long dreams.
    """
    with _user_errors():
        import importlib.util

        from onnxdream.errors import DependencyError

        missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
        if missing or not (importlib.util.find_spec("python_multipart")
                           or importlib.util.find_spec("multipart")):
            raise DependencyError("the server needs the [serve] extra: pip install 'onnxdream[serve]'")
        from onnxdream.server import ServerConfig, run

        config = ServerConfig.from_env(workers=workers, max_queue=max_queue,
                                       max_pixels=max_pixels, max_body_mb=max_body,
                                       max_steps=max_steps, device=device,
                                       model_paths=model_path)
        typer.echo(f"onnxdream {__version__} serving on http://{host}:{port}/ "
                   f"({config.workers} worker{'s' if config.workers != 1 else ''}, queue "
                   f"{config.max_queue}, device {config.device})", err=True)
        run(config, host=host, port=port, log_level=log_level)

# -- visualize --------------------------------------------------------------------------------


@app.command()
def visualize(
    class_: Annotated[Optional[str], typer.Option(
        "--class", "-c", help="Class(es) to render: numbers or names from the model's labels, "
        "comma-separated (--class 130,zebra,banana).")] = None,
    channel: Annotated[Optional[list[str]], typer.Option(
        help="A channel to render, LAYER:K (e.g. blocks.9:12); repeatable.")] = None,
    layer: Annotated[Optional[list[str]], typer.Option(
        "--layer", "-l", help="A whole layer to render (the mean of its channels); repeatable.")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "-o", "--output", help="Where to write; with several targets and no --grid, one file "
        "each (OUT-1-NAME.png, …). Default: visualize-NAME.png in the current directory.")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)] = "efficientnet-lite0",
    size: Annotated[int, typer.Option(help="Side of the square image in pixels.")] = 224,
    steps: Annotated[int, typer.Option(help="Optimisation steps (in all octaves together).")] = 128,
    seed: Annotated[Optional[int], typer.Option(
        help="Random seed; the one used is stored in the PNG.")] = None,
    grid: Annotated[bool, typer.Option(
        "--grid", help="Put all targets in one labelled image.")] = False,
    columns: Annotated[Optional[int], typer.Option(help="Images per row with --grid.", min=1)] = None,
    param: Annotated[str, typer.Option(
        help="Image parameterisation: fft (1/f Fourier spectrum) or pixel.")] = "fft",
    decorrelate: Annotated[bool, typer.Option(
        "--decorrelate/--no-decorrelate", help="Decorrelated (ImageNet) colour space.")] = True,
    transforms: Annotated[str, typer.Option(
        help="Random transforms each step: standard (pad, jitter, scale, rotate) or none.")] = "standard",
    octaves: Annotated[int, typer.Option(help="Render small first, then enlarge: how many sizes.")] = 2,
    octave_scale: Annotated[float, typer.Option(help="Size ratio between octaves.")] = 1.4,
    tv: Annotated[float, typer.Option(
        help="Total-variation penalty weight (0: none; try 0.5 to 5).")] = 0.0,
    normalize: Annotated[str, typer.Option(
        help="Gradient normalisation before the optimiser: none or lapnorm.")] = "none",
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 0.05,
    pre_relu: Annotated[bool, typer.Option(
        "--pre-relu/--post-relu", help="Channels and layers before their ReLU/Clip.")] = True,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Feature visualisation: render an image that a class, channel or layer responds to.

    Example:  onnxdream visualize --class flamingo -o flamingo.png
    """
    with _user_errors():
        import re

        from onnxdream.errors import ObjectiveError
        from onnxdream.imageio import check_output_path, save_image
        from onnxdream.visualize import (BatchObjective, VisualizeSettings, channel_target,
                                         class_targets, describe, grid as make_grid,
                                         layer_target, render)

        settings = VisualizeSettings(size=size, steps=steps, lr=lr, param=param,
                                     decorrelate=decorrelate, transforms=transforms,
                                     octaves=octaves, octave_scale=octave_scale, tv=tv,
                                     normalize=normalize, pre_relu=pre_relu, seed=seed
                                     ).validate().with_seed()
        if not (class_ or channel or layer):
            raise ObjectiveError("say what to visualise: --class K|NAME, --channel LAYER:K or "
                                 "--layer LAYER")
        cache: dict = {}
        targets = []
        if class_:
            cache["logits"] = BatchObjective(model, "logits", pre_relu=pre_relu, device=device)
            targets += class_targets(class_, cache["logits"].labels)
        targets += [channel_target(c) for c in channel or []]
        targets += [layer_target(n) for n in layer or []]

        def slug(t) -> str:
            return re.sub(r"[^A-Za-z0-9.]+", "-", t.caption).strip("-")[:60] or "target"

        single = grid or len(targets) == 1
        name = slug(targets[0]) if len(targets) == 1 else "grid"
        out = output or Path.cwd() / f"visualize-{name}.png"
        outs = [out] if single else [out.with_name(f"{out.stem}-{i + 1}-{slug(t)}{out.suffix}")
                                     for i, t in enumerate(targets)]
        for o in outs:
            check_output_path(o)
        t0 = time.perf_counter()
        groups = len({t.layer for t in targets})
        with _maybe_progress(quiet) as bar:
            task = bar.add_task("rendering", total=settings.steps * groups, info="") if bar else None

            def progress(p):
                if bar:
                    bar.update(task, completed=p.done,
                               info=f"{p.size}px  objective {float(p.objective.mean()):.3g}")

            images = render(model, targets, settings, progress, device=device, objectives=cache)
        provider = next(iter(cache.values())).provider
        argv = ["visualize", "-o", str(out), "--model", model]
        argv += ["--class", ",".join(str(t.index) for t in targets if t.kind == "class")] \
            if class_ else []
        argv += [a for c in channel or [] for a in ("--channel", c)]
        argv += [a for n in layer or [] for a in ("--layer", n)]
        argv += ["--size", str(size), "--steps", str(steps), "--seed", str(settings.seed),
                 "--param", param, "--transforms", transforms, "--octaves", str(octaves),
                 "--octave-scale", str(octave_scale), "--tv", str(tv), "--normalize", normalize,
                 "--lr", str(lr), "--decorrelate" if decorrelate else "--no-decorrelate",
                 "--pre-relu" if pre_relu else "--post-relu"] + (["--grid"] if grid else [])
        meta = {
            "onnxdream:version": __version__,
            "onnxdream:model": model,
            "onnxdream:provider": provider,
            "onnxdream:command": "onnxdream " + shlex.join(argv),
        }
        meta.update({f"onnxdream:{k}": v for k, v in describe(settings).items()})
        if single:
            img = (make_grid(images, [t.caption for t in targets], columns) if grid
                   else images[0])
            meta["onnxdream:targets"] = json.dumps([t.describe() for t in targets])
            save_image(out, img, metadata=meta)
        else:
            for o, t, img in zip(outs, targets, images):
                save_image(o, img, metadata={**meta, "onnxdream:targets": json.dumps([t.describe()])})
        elapsed = time.perf_counter() - t0
        for o in outs:
            typer.echo(f"wrote {o}", err=True)
        typer.echo(f"{len(targets)} image(s) at {size}px in {elapsed:.1f}s on {provider}, "
                   f"seed {settings.seed}", err=True)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        _err("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
