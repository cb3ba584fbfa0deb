"""The ``onnxdream`` command line. The library raises; only the CLI prints and exits.

The app, the shared option declarations and the error → exit code mapping live in
:mod:`onnxdream.cli.common`; commands with a module of their own (``cli_<name>.py``) are listed
in :data:`COMMAND_MODULES` and register themselves on the shared app when imported here.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from onnxdream import __version__
from onnxdream.cli.common import (
    DEVICE_HELP,
    MODEL_HELP,
    OBJECTIVE_HELP,
    DeviceOpt,
    DreamOptions,
    JsonOpt,
    LayersOpt,
    MaxMemoryOpt,
    ModelOpt,
    QuietOpt,
    TargetOpt,
    app,
    default_output,
    err,
    export_app,
    maybe_progress,
    user_errors,
    warn,
    with_dream_options,
)
from onnxdream.settings.options import DEFAULT_STEP_SIZE, DreamSettings

#: The size of a dream from --init noise/grey when --size is not given (width, height).
INIT_SIZE = (512, 512)
CREATIVE = "Creative controls"


# -- dream ------------------------------------------------------------------------------------


@app.command()
@with_dream_options
def dream(
    image: Annotated[Path | None, typer.Argument(metavar="IMAGE",
        help="The photo to dream on (PNG, JPEG, WebP, …); leave it out with --init noise or "
        "grey.", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Where to write the dream; the extension picks the format "
        "(.png, .jpg, .webp). Default: IMAGE-dream.png in the current directory.")] = None,
    options: DreamOptions = None,
    max_memory: MaxMemoryOpt = None,
    guide: Annotated[str | None, typer.Option(
        rich_help_panel=CREATIVE, show_default=False,
        help="Dream toward this image: at each position the layer takes on the features of the "
        "guide's best-matching position (the Caffe notebook's guided dream; the objective "
        "becomes guide).")] = None,
    mask: Annotated[str | None, typer.Option(
        rich_help_panel=CREATIVE, show_default=False,
        help="Where to dream: an image (the photo's size) white where the dream goes, black "
        "where the photo stays exactly as it is, grey for part of the dream.")] = None,
    mask_layers: Annotated[list[str] | None, typer.Option(
        "--mask-layers", rich_help_panel=CREATIVE, show_default=False,
        help="Which layer dreams where: one mask per --layer, in order (repeat the option), or "
        "one mask for two layers (white: the first, black: the second).")] = None,
    feather: Annotated[int | None, typer.Option(
        rich_help_panel=CREATIVE, show_default=False, min=0,
        help="Fade the dream out over this many pixels before the --mask's black parts (0: a "
        f"hard edge)  \\[default: {DreamSettings.feather}]")] = None,
    keep_colors: Annotated[bool, typer.Option(
        "--keep-colors", rich_help_panel=CREATIVE,
        help="Keep the photo's colours: the dream changes luminance only.")] = False,
    init: Annotated[str | None, typer.Option(
        rich_help_panel=CREATIVE, show_default=False,
        help="Dream without a photo, from noise or grey (with --size; no IMAGE).")] = None,
    size: Annotated[str | None, typer.Option(
        rich_help_panel=CREATIVE, show_default=False,
        help=f"WIDTHxHEIGHT of a dream from --init  \\[default: {INIT_SIZE[0]}x{INIT_SIZE[1]}]"
        )] = None,
    seamless: Annotated[bool, typer.Option(
        "--seamless", rich_help_panel=CREATIVE,
        help="A tileable result: the network sees the image as one tile of a repeating plane "
        "(start from --init noise or grey for a texture; sizes that are multiples of 16 tile "
        "best).")] = False,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
):
    """Dream on IMAGE: amplify what a layer of the network sees in it.

    Example:  onnxdream dream cat.jpg -o cat-dream.png --layer blocks.9 --steps 20

    Guided, masked, keeping the photo's colours, from noise, tileable:

      onnxdream dream cat.jpg --guide flowers.jpg
      onnxdream dream cat.jpg --mask cat-mask.png --keep-colors
      onnxdream dream --init noise --size 512x512 --seamless -o texture.png
    """
    with user_errors():
        from onnxdream.core.errors import SettingsError
        from onnxdream.dream.ascent import dream as run_dream
        from onnxdream.dream.controls import Controls, init_image
        from onnxdream.media.imageio import load_image
        from onnxdream.media.imagewrite import check_output_path, save_image
        from onnxdream.runtime.gradient import GradientModel
        from onnxdream.settings.memory import budget_from_env
        from onnxdream.settings.provenance import dream_metadata
        from onnxdream.settings.resolve import resolve

        if init is not None and init not in ("noise", "grey"):  # a photo's path
            if image is not None:
                raise SettingsError("init", f"is a photo ({init}) and so is IMAGE: give one")
            image, init = Path(init), None
        if image is not None and init is not None:
            raise SettingsError("init", f"{init} starts a dream without a photo: leave IMAGE out")
        if image is None and init is None:
            raise SettingsError("init", "is needed without a photo: give IMAGE, or --init noise "
                                        "(or grey) and --size WIDTHxHEIGHT")
        settings = options.settings(
            guide=guide, mask=mask, mask_layers=mask_layers, feather=feather,
            keep_colors=keep_colors or None, init=init,
            size=(size or "x".join(map(str, INIT_SIZE))) if init else size,
            seamless=seamless or None).with_seed()
        out = output or (default_output(image, "dream") if image is not None else
                         Path.cwd() / f"{settings.init}-dream.png")
        check_output_path(out)
        controls = Controls.load(settings)
        if image is not None:
            loaded = load_image(image)
            rgb, alpha = loaded.rgb, loaded.alpha
        else:
            rgb, alpha = init_image(settings.init, settings.size[::-1], settings.seed), None
        gm = GradientModel.from_settings(settings, device=device)
        if gm.session.fallback_warning:
            warn(gm.session.fallback_warning)
        h, w = rgb.shape[:2]
        resolved = resolve(settings, h, w, gm.info, memory=gm.memory,
                           budget_mb=max_memory or budget_from_env())
        if resolved.work_size != (h, w):
            nh, nw = gm.info.native_size
            typer.echo(f"note: {gm.info.name} runs only at {nw}x{nh} pixels; the {w}x{h} photo is "
                       f"dreamed at {resolved.work_size[1]}x{resolved.work_size[0]} and scaled "
                       "back", err=True)
        params = controls.params(gm, settings, (h, w), note=warn)
        t0 = time.perf_counter()
        with maybe_progress(quiet) as bar:
            task = bar.add_task("dreaming", total=resolved.steps_total, info="") if bar else None

            def progress(p):
                if bar:
                    bar.update(task, completed=p.done, description=f"octave {p.octave}/{p.octaves}",
                               info=f"{p.size[1]}x{p.size[0]}  objective {p.objective:.3g}")

            result = run_dream(gm, rgb, resolved, progress, params)
        meta = dream_metadata(resolved, objective=gm.objective, provider=gm.provider,
                              image=str(image) if image is not None else "IMAGE",
                              output=str(out), hashes=controls.hashes)
        save_image(out, result, alpha=alpha, metadata=meta)
        typer.echo(f"wrote {out} ({w}x{h}, {time.perf_counter() - t0:.1f}s on {gm.provider}, "
                   f"seed {settings.seed})", err=True)


# -- predict ----------------------------------------------------------------------------------


@app.command()
def predict(
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="The photo to classify.")],
    model: ModelOpt = DreamSettings.model,
    top: Annotated[int, typer.Option(help="How many classes to show.", min=1, max=1000)] = 5,
    as_json: Annotated[bool, typer.Option(
        "--json",
        help='Print a JSON list of {"index", "label", "probability"}, best first.')] = False,
    device: DeviceOpt = "auto",
):
    """Classify IMAGE with the model: the top classes and their probabilities."""
    with user_errors():
        from onnxdream.media.imageio import load_image
        from onnxdream.runtime.predict import Classifier

        clf = Classifier(model, device=device)
        result = clf.predict(load_image(image).rgb, top)
        if as_json:
            typer.echo(json.dumps(result))
            return
        for r in result:
            typer.echo(f"{r['probability']:7.2%}  {r['index']:4d}  {r['label']}")


# -- models / layers / compile ----------------------------------------------------------------


@app.command()
def models(as_json: JsonOpt = False):
    """List the zoo: the built-in models, which are installed and which are cached."""
    with user_errors():
        from onnxdream.models import DEFAULT_MODEL, cached_models, list_zoo, model_home

        files = [p.name for p in cached_models()]  # <name>-<hash12>.onnx
        rows = []
        for e in list_zoo():
            cached = any(f.rsplit("-", 1)[0] == e.name for f in files)
            rows.append({"name": e.name, "default": e.name == DEFAULT_MODEL,
                         "installed": e.installed, "cached": cached,
                         "input_size": e.input_size, "layers": list(e.default_layers),
                         "recommended_layers": list(e.recommended_layers or e.default_layers),
                         "step_size": e.step_size if e.step_size is not None
                         else DEFAULT_STEP_SIZE,
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
                       f"  step {r['step_size']:g}  [{state}]\n    {r['description']}\n"
                       f"    recommended layers: {', '.join(r['recommended_layers'])}")
        typer.echo(f"\nmodel home: {model_home()}  (set ONNXDREAM_HOME to move it)")


@app.command()
def layers(
    model: Annotated[str, typer.Argument(metavar="MODEL", help=MODEL_HELP)],
    as_json: JsonOpt = False,
):
    """List a model's layers with their op types and output shapes (at its native size)."""
    with user_errors():
        from onnxdream.core.errors import UnwrappedModelError
        from onnxdream.exporters.graph import list_layers
        from onnxdream.exporters.graph.contract import require_dreamable
        from onnxdream.runtime.opening import open_model

        opened = open_model(model, dreamable=False)
        try:
            require_dreamable(opened.proto, model)
        except UnwrappedModelError as exc:  # the layers are still worth listing
            warn(str(exc))
        infos = list_layers(opened.proto)
        if as_json:
            typer.echo(json.dumps([{"name": i.name, "tensor": i.tensor, "op_type": i.op_type,
                                    "shape": list(i.shape) if i.shape else None}
                                   for i in infos], indent=1))
            return
        width = max((len(i.name) for i in infos), default=10)
        for i in infos:
            shape = "x".join(str(d) for d in i.shape) if i.shape else "?"
            tensor = f"  {i.tensor}" if i.tensor != i.name else ""  # an alias: its tensor
            typer.echo(f"{i.name:<{width}}  {i.op_type:<20} {shape:<16}{tensor}".rstrip())


@app.command("compile")
def compile_cmd(
    model: Annotated[str, typer.Argument(metavar="MODEL", help=MODEL_HELP)],
    output: Annotated[Path, typer.Option("-o", "--output", help="The gradient graph to write.")],
    layer: LayersOpt = None,
    objective: Annotated[str, typer.Option(help=OBJECTIVE_HELP)] = DreamSettings.objective,
    pre_relu: Annotated[bool, typer.Option(
        "--pre-relu", help="Use layer values before their ReLU/Clip activation.")]
        = DreamSettings.pre_relu,
    border: Annotated[int, typer.Option(
        help="Pixels to drop at each edge of the layer before reducing.", min=0)]
        = DreamSettings.border,
    target: TargetOpt = "default",
):
    """Compile MODEL's gradient graph: outputs `objective` [N] and `grad` [N,3,H,W].

    Standard ONNX ops only: runs on any onnxruntime (CPU, CUDA, TensorRT, web). --target
    portable avoids the ops some providers lack (WebGPU in the browser, OpenVINO).
    """
    with user_errors():
        from onnxdream.exporters.graph import compile_gradient, save_model
        from onnxdream.runtime.opening import open_model

        opened = open_model(model)
        names = layer or []
        if not names and not objective.startswith("class:"):
            names = opened.info.require_default_layers()
        graph = compile_gradient(opened.proto, names, objective, pre_relu=pre_relu, border=border,
                                 target=target)
        save_model(graph, output)
        ops = sorted({n.op_type for n in graph.graph.node})
        typer.echo(f"wrote {output}: {len(graph.graph.node)} nodes, ops {', '.join(ops)}",
                   err=True)


# -- export -----------------------------------------------------------------------------------


@export_app.command("torchvision")
def export_torchvision_cmd(
    name: Annotated[str, typer.Argument(metavar="NAME",
        help="A torchvision classifier, e.g. googlenet, resnet50.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The .onnx file to write.")],
    weights: Annotated[str, typer.Option(
        help="DEFAULT (torchvision's pretrained, needs internet once), none (random) or a "
        "state_dict FILE saved with torch.save.")] = "DEFAULT",
):
    r"""Export a torchvision classifier as a dreamable model (needs onnxdream\[torch])."""
    with user_errors():
        from onnxdream.exporters import export_torchvision

        result = export_torchvision(
            name, output, weights, progress=lambda msg: typer.echo(msg, err=True))
        size = "dynamic H/W" if result.dynamic_hw else "fixed size"
        typer.echo(f"wrote {result.path} ({len(result.layers)} layers, {size})", err=True)


@export_app.command("timm")
def export_timm_cmd(
    name: Annotated[str, typer.Argument(metavar="NAME",
        help="A timm model: resnet50, convnext_tiny, vit_small_patch16_224, … "
        "(timm.list_models()); NAME.TAG picks a pretrained config, like --pretrained-cfg.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The .onnx file to write.")],
    weights: Annotated[str, typer.Option(
        help="DEFAULT (timm's pretrained weights from the Hugging Face Hub, needs internet "
        "once), none (random) or a FILE: a state_dict saved with torch.save, or .safetensors."
        )] = "DEFAULT",
    pretrained_cfg: Annotated[str | None, typer.Option(
        "--pretrained-cfg", help="The pretrained config (tag) whose weights, mean/std and input "
        "size to use, e.g. augreg_in21k_ft_in1k (default: timm's first for the model).")] = None,
):
    r"""Export a timm classifier as a dreamable model (needs onnxdream\[timm]).

    Example:  onnxdream export timm convnext_tiny -o convnext.onnx --weights none
    """
    with user_errors():
        from onnxdream.exporters import export_timm

        result = export_timm(name, output, weights, pretrained_cfg=pretrained_cfg,
                             progress=lambda msg: typer.echo(msg, err=True))
        size = "dynamic H/W" if result.dynamic_hw else "fixed size"
        typer.echo(f"wrote {result.path} ({len(result.layers)} layers, {size}; default layer "
                   f"{', '.join(result.default_layers) or 'none'})", err=True)
        if not result.dynamic_hw and result.notes:
            typer.echo("fixed size because: " + "; ".join(n[:200] for n in result.notes[:3]),
                       err=True)


@export_app.command("keras")
def export_keras_cmd(
    model: Annotated[str, typer.Argument(metavar="MODEL",
        help="A keras.applications model (InceptionV3, VGG16, MobileNetV2, EfficientNetB0, …) "
        "or a .keras / .h5 model file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The .onnx file to write.")],
    preprocess: Annotated[str | None, typer.Option(
        help="How the model expects its input: tf (x/127.5-1), caffe (BGR minus the ImageNet "
        "mean, 0..255), torch (ImageNet mean/std), none (0..255; the model scales itself) or "
        "unit ([0,1]). Inferred for application names; required for files.")] = None,
    weights: Annotated[str | None, typer.Option(
        help="For names: imagenet (Keras' download, needs internet once; the default), none "
        "(random) or a .weights.h5 FILE. For model files: a weights FILE to load instead of "
        "the file's own.")] = None,
    include_top: Annotated[bool, typer.Option(
        "--include-top", help="Keep the classifier (needed for --objective class:K and "
        "`onnxdream predict`); VGG-style heads then fix the input size.")] = False,
):
    r"""Export a Keras 3 model as a dreamable model (needs onnxdream\[keras]; runs Keras on its
    torch backend, whatever KERAS_BACKEND says elsewhere)."""
    with user_errors():
        from onnxdream.exporters import export_keras

        result = export_keras(
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
    workers: Annotated[int | None, typer.Option(
        help="Dreams run at once (threads sharing the sessions). Default: 1 on a CPU with "
        "fewer than 8 cores, else 2 \\[env ONNXDREAM_WORKERS].", min=1, max=64)] = None,
    max_queue: Annotated[int | None, typer.Option(
        help="Dreams that may wait beyond the running ones; more get 503 + Retry-After "
        "(default 16) \\[env ONNXDREAM_MAX_QUEUE].", min=0)] = None,
    max_pixels: Annotated[int | None, typer.Option(
        help="Largest image accepted, width x height (default 16000000) "
        "\\[env ONNXDREAM_MAX_PIXELS].", min=1)] = None,
    max_body: Annotated[float | None, typer.Option(
        help="Largest request body in MB (default 32) \\[env ONNXDREAM_MAX_BODY_MB].",
        min=0.001)] = None,
    max_steps: Annotated[int | None, typer.Option(
        help="Most ascent steps (octaves x steps) per dream (default 1000) "
        "\\[env ONNXDREAM_MAX_STEPS].", min=1)] = None,
    max_memory: Annotated[int | None, typer.Option(
        "--max-memory", metavar="MB", min=1, help="Memory the running dreams may take "
        "together, shared by the workers; tiles shrink to fit, and a dream that cannot fit gets "
        "413 (default: half the machine's or the container's memory) "
        "\\[env ONNXDREAM_MAX_MEMORY_MB].")] = None,
    model_path: Annotated[list[Path] | None, typer.Option(
        "--model-path", help="A dreamable .onnx file to offer, by its file stem; repeatable "
        "\\[env ONNXDREAM_MODEL_PATHS]. Requests can name only these and the zoo.")] = None,
    device: Annotated[str | None, typer.Option(
        help=DEVICE_HELP + " \\[env ONNXDREAM_DEVICE]")] = None,
    cache_mb: Annotated[int | None, typer.Option(
        help="Disk budget of the compiled-graph cache in MB; the least recently used graphs "
        "are removed first (default 512) \\[env ONNXDREAM_CACHE_MB].", min=1)] = None,
    trusted_host: Annotated[list[str] | None, typer.Option(
        "--trusted-host", help="A Host header to serve (example.com, *.example.com); "
        "repeatable; others get 400. Default: localhost names when --host is a loopback "
        "address, else any \\[env ONNXDREAM_TRUSTED_HOSTS, comma-separated].")] = None,
    docs: Annotated[bool, typer.Option(
        "--docs", help="Serve the interactive API docs at /docs (Swagger UI, whose script "
        "comes from the jsDelivr CDN; that page's CSP allows it). /openapi.json is always "
        "served.")] = False,
    ort_dir: Annotated[Path | None, typer.Option(
        "--ort-dir", help="An unpacked onnxruntime-web npm package (`npm pack "
        "onnxruntime-web@1.30.0`, then tar xzf): the page then also offers \"dream in this "
        "browser\", which sends the compiled graphs (with the model's weights) to the page "
        "\\[env ONNXDREAM_ORT_DIR].", show_default=False)] = None,
    max_video_seconds: Annotated[float | None, typer.Option(
        help="Longest video a job may dream, in seconds; 0 turns video jobs off (default 60) "
        "\\[env ONNXDREAM_MAX_VIDEO_SECONDS].", min=0)] = None,
    max_video_mb: Annotated[float | None, typer.Option(
        help="Largest request body carrying a video, in MB (default 256) "
        "\\[env ONNXDREAM_MAX_VIDEO_MB].", min=0.001)] = None,
    max_video_disk_mb: Annotated[float | None, typer.Option(
        help="Disk all video jobs together may use, in MB: uploads, dreamed frames and "
        "results (default 4096) \\[env ONNXDREAM_MAX_VIDEO_DISK_MB; the folder: "
        "ONNXDREAM_JOBS_DIR, default $ONNXDREAM_HOME/jobs].", min=1)] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level.")] = "info",
):
    r"""Serve dreams over HTTP, with a web page at / (needs onnxdream\[serve]).

    POST /dream (multipart: image + fields named like dream's options) returns the image;
    POST /jobs, GET /jobs/ID, GET /jobs/ID/result, DELETE /jobs/ID for long dreams, and for
    videos (a 'video' file instead of the image; needs onnxdream\[video] on the server).
    """
    with user_errors():
        import importlib.util
        import os

        from onnxdream.core.errors import DependencyError

        missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
        if missing or not (importlib.util.find_spec("python_multipart")
                           or importlib.util.find_spec("multipart")):
            raise DependencyError(
                "the server needs the [serve] extra: pip install 'onnxdream[serve]'")
        from onnxdream.core.net import is_loopback
        from onnxdream.server.app import ServerConfig, run

        hosts = trusted_host or None
        if not hosts and not os.environ.get("ONNXDREAM_TRUSTED_HOSTS", "").strip() \
                and is_loopback(host):
            hosts = ["localhost", "127.0.0.1", "::1", "[::1]"]  # no DNS rebinding onto it
        config = ServerConfig.from_env(workers=workers, max_queue=max_queue,
                                       max_pixels=max_pixels, max_body_mb=max_body,
                                       max_steps=max_steps, device=device,
                                       model_paths=model_path, cache_mb=cache_mb,
                                       trusted_hosts=hosts, docs=docs, ort_dir=ort_dir,
                                       max_memory_mb=max_memory,
                                       max_video_seconds=max_video_seconds,
                                       max_video_mb=max_video_mb,
                                       max_video_disk_mb=max_video_disk_mb)
        typer.echo(f"onnxdream {__version__} serving on http://{host}:{port}/ "
                   f"({config.workers} worker{'s' if config.workers != 1 else ''}, queue "
                   f"{config.max_queue}, device {config.device}, memory "
                   f"{config.max_memory_mb} MB"
                   f"{', dreams in the browser too' if config.ort_dir else ''})", err=True)
        run(config, host=host, port=port, log_level=log_level)

# the commands with a module of their own join the app, in --help order after the ones here
from onnxdream.cli import visualize, video, importer, atlas, batch, web  # noqa: E402, F401, I001


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
