"""``onnxdream batch``: many dreams at once, on worker processes or a Ray cluster (the library is
:mod:`onnxdream.batch.run`).

Exit codes: 0 when every item succeeded (or was already done), 3 when some failed (each is in
the manifest with its error), 2 for a mistake in the command, 130 for Ctrl-C (finished items
stay; the same command finishes the rest).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from onnxdream.cli.common import (
    DeviceOpt,
    DreamOptions,
    QuietOpt,
    app,
    err,
    maybe_progress,
    progress_bar,
    user_errors,
    with_dream_options,
)
from onnxdream.core.errors import SettingsError
from onnxdream.core.fdredirect import output_to

#: Exit code when some items failed.
SOME_FAILED = 3


@contextlib.contextmanager
def _folded_console(log: Path):
    """Everything written to fds 1 and 2 (Ray's C++ logs, its "(raylet)" messages, warnings)
    goes to ``log``; yields a text file on the real terminal for our own bar and lines."""
    sys.stderr.flush()
    term = os.fdopen(os.dup(2), "w", buffering=1)
    try:
        with output_to(log):
            yield term
    finally:
        term.close()


@app.command()
@with_dream_options
def batch(
    inputs: Annotated[list[str], typer.Argument(metavar="INPUTS",
        help="Images, videos, folders (searched recursively; sub-folders are mirrored in the "
        "output), glob patterns ('photos/**/*.jpg', quoted) or .txt files listing them.",
        show_default=False)],
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="The folder to write into: OUT/<sub-folders>/<stem>--<layer>"
        "--s<seed>.png (.mp4 for videos).", show_default=False)],
    options: DreamOptions = None,
    layer_list: Annotated[str | None, typer.Option(
        "--layers", help="One output per layer: A,B,C (A+B mixes two layers in one dream). "
        "Default: the --layer mix, else the model's recommended layer.",
        show_default=False)] = None,
    seed_list: Annotated[str | None, typer.Option(
        "--seeds", help="One output per seed: 1,2,3 or a range 1-8. Default: --seed, else 0 "
        "(so a batch is reproducible and resumable).", show_default=False)] = None,
    backend: Annotated[str, typer.Option(
        help="local: worker processes on this machine; ray: a Ray Data pipeline (needs "
        "onnxdream\\[ray]) on a private Ray instance, or on a cluster with --address.")]
        = "local",
    address: Annotated[str | None, typer.Option(
        help="Ray only: auto (the cluster `ray start` runs here) or HOST:PORT of a cluster's "
        "head. Default: a private Ray instance on this machine.", show_default=False)] = None,
    workers: Annotated[int | None, typer.Option(
        help="Worker processes (local) or Ray actors, each holding its loaded model. Default: "
        "local, as many as the cores and memory allow; ray, the cluster's CPUs (or GPUs) "
        "shared out.", min=1, max=1024, show_default=False)] = None,
    gpus_per_worker: Annotated[float, typer.Option(
        help="Ray only: GPUs each actor reserves; it runs on CUDA when it gets one (1: a GPU "
        "each, 0.5: two actors per GPU).", min=0.0)] = 0.0,
    cpus_per_worker: Annotated[float | None, typer.Option(
        help="Ray only: CPUs each CPU actor reserves (its onnxruntime threads follow) "
        "\\[default: 1].", min=0.01, show_default=False)] = None,
    manifest: Annotated[Path | None, typer.Option(
        help="The JSON-lines manifest (input, settings hash, output, status, seconds, error). "
        "Default: OUT/manifest.jsonl.", show_default=False)] = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
):
    """Dream many images (and videos) into a folder: every input x layer x seed.

    Resumable: an output that exists with the same settings is skipped, so
    after an interruption the same command finishes the rest. A failed item
    (a corrupt image, say) is recorded in the manifest and the batch goes on;
    the exit code is then 3.

    Examples:
      onnxdream batch photos/ -o dreams/ --layers blocks.5,blocks.9 --seeds 1-3
      onnxdream batch 'shots/*.jpg' -o out/ --backend ray --address auto
    """
    from onnxdream.batch import run as lib

    with user_errors():
        if options.values.get("layer") and layer_list is not None:
            raise SettingsError("layer_list", "makes one output per layer and --layer one "
                                "mixed objective: give one of them")
        if options.values.get("seed") is not None and seed_list is not None:
            raise SettingsError("seed_list", "makes one output per seed: leave out --seed")
        try:
            layers, seeds = lib.parse_layers(layer_list), lib.parse_seeds(seed_list)
        except SettingsError as exc:  # the library's field names → this command's options
            raise SettingsError({"layers": "layer_list", "seeds": "seed_list"}[exc.field],
                                exc.reason) from None
        settings = options.settings()
        log = output / ".onnxdream-ray.log"
        counts: Counter[str] = Counter()
        failed: list[lib.ManifestRow] = []
        t0 = time.perf_counter()
        state = {"bar": None, "task": None}

        def on_start(todo: int, skipped: int) -> None:
            bar = state["bar"]
            if bar is not None:
                state["task"] = bar.add_task("dreaming", total=todo + skipped,
                                             info="starting the workers" if todo else "")

        def progress(row: lib.ManifestRow, done: int, total: int) -> None:
            counts[row.status] += 1
            if row.status == lib.FAILED:
                failed.append(row)
            bar = state["bar"]
            if bar is not None and state["task"] is not None:
                info = " ".join(f"{k} {counts[k]}" for k in ("ok", "failed", "skipped")
                                if counts[k])
                bar.update(state["task"], completed=done, info=info)

        def go(bar) -> list:
            state["bar"] = bar
            return lib.run(inputs, settings, backend, output_dir=output, layers=layers,
                           seeds=seeds, manifest=manifest, workers=workers, device=device,
                           address=address, gpus_per_worker=gpus_per_worker,
                           cpus_per_worker=cpus_per_worker, progress=progress,
                           on_start=on_start)

        try:
            if backend == "ray":
                output.mkdir(parents=True, exist_ok=True)
                with _folded_console(log) as term:
                    if quiet:
                        rows = go(None)
                    else:
                        with progress_bar(term) as bar:
                            rows = go(bar)
            else:
                with maybe_progress(quiet) as bar:
                    rows = go(bar)
        except KeyboardInterrupt:
            err(f"interrupted: {sum(counts.values())} items finished and are in the manifest; "
                "run the same command again to do the rest")
            raise typer.Exit(130) from None
        except Exception:
            if backend == "ray" and _has_text(log):
                err(f"Ray's console output is in {log}")
            elif backend == "ray":
                log.unlink(missing_ok=True)
            raise
        died = any(r.error.startswith(lib.DIED) for r in failed)
        if backend == "ray" and not (died and _has_text(log)):
            log.unlink(missing_ok=True)
    _summary(rows, failed, time.perf_counter() - t0, output,
             manifest or output / lib.MANIFEST_NAME, log if backend == "ray" else None)
    if failed:
        raise typer.Exit(SOME_FAILED)


def _has_text(p: Path) -> bool:
    try:
        return p.stat().st_size > 0
    except OSError:
        return False


def _summary(rows, failed, seconds: float, output: Path, manifest: Path,
             log: Path | None) -> None:
    c = Counter(r.status for r in rows)
    made = c["ok"]
    rate = f", {made / seconds:.2f} items/s" if made and seconds > 0 else ""
    typer.echo(f"batch: {len(rows)} items: {made} dreamed, {c['skipped']} already done, "
               f"{c['failed']} failed in {seconds:.1f}s{rate}; outputs in {output}, manifest "
               f"{manifest}", err=True)
    for r in failed[:10]:
        typer.secho(f"  failed: {r.input} (layer {r.layer}, seed {r.seed}): {r.error}",
                    err=True, fg=typer.colors.RED)
    if len(failed) > 10:
        typer.secho(f"  ... and {len(failed) - 10} more (see the manifest)", err=True,
                    fg=typer.colors.RED)
    if failed and log is not None and log.exists():
        typer.echo(f"  Ray's console output (workers that died): {log}", err=True)
