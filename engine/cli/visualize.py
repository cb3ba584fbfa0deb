"""``onnxdream visualize``: feature visualisation from the command line (the library is
:mod:`onnxdream.dream.visualize`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from onnxdream.cli.common import (
    DeviceOpt,
    ModelOpt,
    QuietOpt,
    app,
    maybe_progress,
    slug,
    user_errors,
)
from onnxdream.settings.options import DreamSettings, VisualizeSettings

_V = VisualizeSettings()


@app.command()
def visualize(
    class_: Annotated[str | None, typer.Option(
        "--class", "-c", help="Class(es) to render: numbers or names from the model's labels, "
        "comma-separated (--class 130,zebra,banana).")] = None,
    channel: Annotated[list[str] | None, typer.Option(
        help="A channel to render, LAYER:K (e.g. blocks.9:12); repeatable.")] = None,
    layer: Annotated[list[str] | None, typer.Option(
        "--layer", "-l",
        help="A whole layer to render (the mean of its channels); repeatable.")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Where to write; with several targets and no --grid, one file "
        "each (OUT-1-NAME.png, …). Default: visualize-NAME.png in the current directory.")] = None,
    model: ModelOpt = DreamSettings.model,
    size: Annotated[int, typer.Option(help="Side of the square image in pixels.")] = _V.size,
    steps: Annotated[int, typer.Option(help="Optimisation steps (in all octaves together).")]
        = _V.steps,
    seed: Annotated[int | None, typer.Option(
        help="Random seed; the one used is stored in the PNG.")] = None,
    grid: Annotated[bool, typer.Option(
        "--grid", help="Put all targets in one labelled image.")] = False,
    columns: Annotated[int | None, typer.Option(help="Images per row with --grid.", min=1)] = None,
    param: Annotated[str, typer.Option(
        help="Image parameterisation: fft (1/f Fourier spectrum) or pixel.")] = _V.param,
    decorrelate: Annotated[bool, typer.Option(
        "--decorrelate/--no-decorrelate", help="Decorrelated (ImageNet) colour space.")]
        = _V.decorrelate,
    transforms: Annotated[str, typer.Option(
        help="Random transforms each step: standard (pad, jitter, scale, rotate) or none.")]
        = _V.transforms,
    octaves: Annotated[int, typer.Option(help="Render small first, then enlarge: how many sizes.")]
        = _V.octaves,
    octave_scale: Annotated[float, typer.Option(help="Size ratio between octaves.")]
        = _V.octave_scale,
    tv: Annotated[float, typer.Option(
        help="Total-variation penalty weight (0: none; try 0.5 to 5).")] = _V.tv,
    normalize: Annotated[str, typer.Option(
        help="Gradient normalisation before the optimiser: none or lapnorm.")] = _V.normalize,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = _V.lr,
    pre_relu: Annotated[bool, typer.Option(
        "--pre-relu/--post-relu", help="Channels and layers before their ReLU/Clip.")]
        = _V.pre_relu,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
):
    """Feature visualisation: render an image that a class, channel or layer responds to.

    Example:  onnxdream visualize --class flamingo -o flamingo.png
    """
    with user_errors():

        from onnxdream.core.errors import ObjectiveError
        from onnxdream.dream.visualize import (
            BatchObjective,
            channel_target,
            class_targets,
            layer_target,
            render,
        )
        from onnxdream.dream.visualize import grid as make_grid
        from onnxdream.media.imagewrite import check_output_path, save_image
        from onnxdream.settings.provenance import visualize_metadata

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

        single = grid or len(targets) == 1
        name = slug(targets[0].caption, "target") if len(targets) == 1 else "grid"
        out = output or Path.cwd() / f"visualize-{name}.png"
        outs = [out] if single else [
            out.with_name(f"{out.stem}-{i + 1}-{slug(t.caption, 'target')}{out.suffix}")
            for i, t in enumerate(targets)]
        for o in outs:
            check_output_path(o)
        t0 = time.perf_counter()
        groups = len({t.layer for t in targets})
        with maybe_progress(quiet) as bar:
            task = (bar.add_task("rendering", total=settings.steps * groups, info="")
                    if bar else None)

            def progress(p):
                if bar:
                    bar.update(task, completed=p.done,
                               info=f"{p.size}px  objective {float(p.objective.mean()):.3g}")

            images = render(model, targets, settings, progress, device=device, objectives=cache)
        provider = next(iter(cache.values())).provider

        def metadata(shown):
            return visualize_metadata(settings, model=model, provider=provider, targets=targets,
                                      output=str(out), grid=grid, file_targets=shown)

        if single:
            img = (make_grid(images, [t.caption for t in targets], columns) if grid
                   else images[0])
            save_image(out, img, metadata=metadata(targets))
        else:
            for o, t, img in zip(outs, targets, images):
                save_image(o, img, metadata=metadata([t]))
        elapsed = time.perf_counter() - t0
        for o in outs:
            typer.echo(f"wrote {o}", err=True)
        typer.echo(f"{len(targets)} image(s) at {size}px in {elapsed:.1f}s on {provider}, "
                   f"seed {settings.seed}", err=True)
