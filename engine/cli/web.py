"""``onnxdream web``: dream in the browser (the library is :mod:`onnxdream.browser.site`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from onnxdream.browser.site import ORT_DIR_ENV, ORT_WEB_VERSION
from onnxdream.cli.common import (
    OBJECTIVE_HELP,
    TARGET_HELP,
    LayersOpt,
    ModelOpt,
    app,
    user_errors,
)
from onnxdream.settings.options import DreamSettings

web_app = typer.Typer(
    help="Dream in the browser: a static site running the compiled graphs on onnxruntime-web.",
    no_args_is_help=True)
app.add_typer(web_app, name="web")


@web_app.command("export")
def export_cmd(
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="The folder to write the site to (new, empty, or a previous "
        "export, which is replaced).")],
    model: ModelOpt = DreamSettings.model,
    layer: LayersOpt = None,
    objective: Annotated[str, typer.Option(help=OBJECTIVE_HELP)] = DreamSettings.objective,
    ort_dir: Annotated[Path | None, typer.Option(
        "--ort-dir", help="An unpacked onnxruntime-web npm package (the folder with dist/ "
        f"inside): `npm pack onnxruntime-web@{ORT_WEB_VERSION} && tar xzf "
        f"onnxruntime-web-{ORT_WEB_VERSION}.tgz` makes ./package \\[env {ORT_DIR_ENV}].",
        show_default=False)] = None,
    webgpu: Annotated[bool, typer.Option(
        "--webgpu", help="Also ship the WebGPU runtime (27 MB more) and offer it where the "
        "browser has WebGPU; compiles --target portable unless told otherwise.")] = False,
    target: Annotated[str | None, typer.Option(
        help=TARGET_HELP + " Default: portable with --webgpu, else default.",
        show_default=False)] = None,
):
    """Write a static site that dreams in the browser: index.html, one ES module, the step
    graph of each --layer (each a choice in the page; default: the model's layers), a
    manifest and onnxruntime-web's runtime files.

    The photo never leaves the browser. Serve the folder from any static host; with the
    headers Cross-Origin-Opener-Policy: same-origin and Cross-Origin-Embedder-Policy:
    require-corp, WebAssembly runs on several threads (without them, on one). To try it:

        onnxdream web export -o site --ort-dir package --layer blocks.5 --layer blocks.9
        onnxdream web serve site
    """
    with user_errors():
        from onnxdream.browser.site import export_site

        result = export_site(output, model=model, layers=layer or [], objective=objective,
                             ort_dir=ort_dir, webgpu=webgpu, target=target,
                             progress=lambda msg: typer.echo(msg, err=True))
        typer.echo(f"wrote {result.path}: {len(result.files)} files, "
                   f"{result.bytes / 1e6:.1f} MB, layers {', '.join(result.layers)} "
                   f"({result.target} graphs{', WebGPU' if result.webgpu else ''}); "
                   f"try: onnxdream web serve {result.path}", err=True)


@web_app.command("serve")
def serve_cmd(
    site: Annotated[Path, typer.Argument(
        metavar="SITE", help="A folder written by `onnxdream web export`.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free one).", min=0,
                                      max=65535)] = 8080,
    isolation: Annotated[bool, typer.Option(
        "--isolation/--no-isolation", help="Leave out COOP/COEP: what a static host without custom "
        "headers gives (WebAssembly on one thread).")] = True,
):
    """Serve an exported site locally with the headers that enable WebAssembly threads."""
    with user_errors():
        from onnxdream.browser.site import serve_site

        try:
            serve_site(site, host, port, isolation,
                       ready=lambda url: typer.echo(f"serving {site} on {url}", err=True))
        except KeyboardInterrupt:
            pass
