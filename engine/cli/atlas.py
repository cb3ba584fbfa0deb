"""``onnxdream atlas``: what each layer dreams, in one labelled grid (the library is
:mod:`onnxdream.dream.atlas`)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from onnxdream.cli.common import (
    DeviceOpt,
    DreamOptions,
    QuietOpt,
    app,
    maybe_progress,
    slug,
    user_errors,
    with_dream_options,
)
from onnxdream.dream.atlas import DEFAULT_CELL, DEFAULT_COUNT, INITS, MAX_CELLS


@app.command()
@with_dream_options
def atlas(
    photo: Annotated[Path | None, typer.Argument(metavar="PHOTO",
        help="The photo every cell dreams on (its centre square). Default: the bundled "
        "example, a cat.", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="The grid to write (.png, .jpg, .webp). Default: "
        "PHOTO-atlas.png (or LAYER-channels.png) in the current directory.",
        show_default=False)] = None,
    layers: Annotated[str | None, typer.Option(
        "--layers", help="Layers to show, comma-separated (A,B,…); --layer works too. "
        "Default: the model's recommended layers.", show_default=False)] = None,
    every: Annotated[bool, typer.Option(
        "--all", help=f"One cell per feature layer of the model (at most {MAX_CELLS}).")]
        = False,
    channels: Annotated[str | None, typer.Option(
        "--channels", help="Show LAYER's channels instead, the feature-visualisation way "
        "(like `onnxdream visualize --channel LAYER:K`, with its settings; of the \\[dream "
        "options] only --model, --steps and --seed apply); ignores PHOTO.", show_default=False,
        metavar="LAYER")] = None,
    count: Annotated[int, typer.Option(
        help="How many channels --channels shows (the first N).", min=1, max=MAX_CELLS)]
        = DEFAULT_COUNT,
    cell: Annotated[int, typer.Option(
        help="Side of one cell in pixels: each cell is dreamed at this size.", min=64,
        max=1024)] = DEFAULT_CELL,
    columns: Annotated[int | None, typer.Option(
        help="Cells per row. Default: up to 8.", min=1, show_default=False)] = None,
    init: Annotated[str, typer.Option(
        help="What each cell starts from: photo, or noise (grey with faint noise).")]
        = "photo",
    options: DreamOptions = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
):
    r"""A layer atlas: the same photo dreamed at each recommended layer, side by side.

    The cells share settings and seed, so they differ only by layer: pick one, then dream it.

    The \[dream options] apply to every cell; --layer names cells like --layers.

    Examples: onnxdream atlas (the bundled cat); onnxdream atlas photo.jpg --all --cell 160;
    onnxdream atlas --channels blocks.9 --count 16
    """
    with user_errors():
        from onnxdream.core.errors import ObjectiveError
        from onnxdream.dream.visualize import grid
        from onnxdream.media.imagewrite import save_image

        if init not in INITS:
            raise ObjectiveError(f"--init must be {' or '.join(INITS)}, got {init!r}")
        t0 = time.perf_counter()
        if channels:
            images, captions, meta, out, provider = _channels(channels, count, cell, columns,
                                                              options, output, device, quiet)
        else:
            images, captions, meta, out, provider = _layers(photo, layers, every, cell, init,
                                                            columns, options, output, device,
                                                            quiet)
        save_image(out, grid(images, captions, columns), metadata=meta)  # out checked up front
        typer.echo(f"wrote {out} ({len(images)} cells of {cell}px, "
                   f"{time.perf_counter() - t0:.1f}s on {provider})", err=True)


def _layers(photo, layers, every, cell, init, columns, options, output, device, quiet):
    from onnxdream.dream.atlas import atlas_layers, dream_atlas, start_image
    from onnxdream.media.imagewrite import check_output_path
    from onnxdream.runtime.opening import resolve_model_path
    from onnxdream.settings.provenance import atlas_metadata

    settings = options.settings().with_seed()
    given = [n.strip() for n in (layers or "").split(",") if n.strip()]
    given += [spec for spec in settings.layers if spec not in given]  # --layer, or a preset's
    names = atlas_layers(resolve_model_path(settings.model), given or None, every=every)
    stem = photo.stem if photo is not None and init == "photo" else (
        "noise" if init == "noise" else "chelsea")
    out = output or Path.cwd() / f"{stem}-atlas.png"
    check_output_path(out)  # before minutes of work
    start = start_image(photo, init, cell, settings.seed)
    providers = []

    def make(cell_settings):
        from onnxdream.cli.common import warn
        from onnxdream.runtime.gradient import GradientModel

        gm = GradientModel.from_settings(cell_settings, device=device)
        if gm.session.fallback_warning and not providers:
            warn(gm.session.fallback_warning)
        providers.append((gm.provider, gm.info))
        return gm

    with maybe_progress(quiet) as bar:
        task = bar.add_task("atlas", total=None, info="") if bar else None

        def progress(p):
            if bar:
                bar.update(task, completed=p.done, total=p.total,
                           description=f"cell {p.cell}/{p.cells}",
                           info=f"{p.layer}  objective {p.objective:.3g}")

        images = dream_atlas(settings.model, start, names, settings, progress=progress,
                             gradient_model=make, device=device)
    provider, info = providers[-1]
    from onnxdream.settings.resolve import resolve

    resolved = resolve(replace(settings, layers=(names[0],)), cell, cell, info)
    meta = atlas_metadata(resolved, layers=names, cell=cell, init=init, provider=provider,
                          image=str(photo) if photo is not None and init == "photo" else None,
                          output=str(out), columns=columns)
    return images, names, meta, out, provider


def _channels(layer, count, cell, columns, options, output, device, quiet):
    from onnxdream.dream.atlas import channel_atlas
    from onnxdream.media.imagewrite import check_output_path
    from onnxdream.settings.options import VisualizeSettings
    from onnxdream.settings.provenance import channel_atlas_metadata

    dream_settings = options.settings()
    steps = options.values.get("steps")  # visualize's own default unless given
    settings = VisualizeSettings(size=cell, seed=dream_settings.seed,
                                 **({"steps": steps} if steps else {})).validate().with_seed()
    out = output or Path.cwd() / f"{slug(layer, 'atlas')}-channels.png"
    check_output_path(out)
    with maybe_progress(quiet) as bar:
        task = bar.add_task("channels", total=None, info="") if bar else None

        def progress(done, total, objective):
            if bar:
                bar.update(task, completed=done, total=total, info=f"objective {objective:.3g}")

        images, captions, provider = channel_atlas(dream_settings.model, layer, count, settings,
                                                   progress=progress, device=device)
    meta = channel_atlas_metadata(settings, model=dream_settings.model, layer=layer,
                                  channels=[int(c.rpartition(":")[2]) for c in captions],
                                  provider=provider, output=str(out), columns=columns)
    return images, captions, meta, out, provider
