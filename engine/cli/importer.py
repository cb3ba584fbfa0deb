"""``onnxdream import onnx``: make a foreign ONNX model dreamable (the library is
:mod:`onnxdream.exporters.graph.importer`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from onnxdream.cli.common import app, user_errors
from onnxdream.exporters.graph.preprocessing import PREPROCESS_HELP

import_app = typer.Typer(
    help="Make a model that onnxdream did not export dreamable (one file in, one file out).",
    no_args_is_help=True)
app.add_typer(import_app, name="import")


@import_app.command("onnx")
def import_onnx_cmd(
    model: Annotated[Path, typer.Argument(metavar="MODEL",
        help="The .onnx file: any image classifier or feature extractor (tf2onnx, "
        "paddle2onnx, torch.onnx, …).", show_default=False)],
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="The dreamable .onnx file to write.")],
    preprocess: Annotated[str, typer.Option(help=PREPROCESS_HELP)] = "unit",
    input: Annotated[str | None, typer.Option(  # noqa: A002 - the flag's name
        "--input", help="The image input's name. Default: the only float input.")] = None,
    layout: Annotated[str | None, typer.Option(
        help="nchw ([N,3,H,W]) or nhwc ([N,H,W,3], TensorFlow's). Default: read from the "
        "input's shape (the axis of size 3).", show_default=False)] = None,
    size: Annotated[str | None, typer.Option(
        help="The size the network was made for, H or HxW (e.g. 224, 48x192): required when "
        "the input fixes only one side; for a fixed input it is read from the shape. Default "
        "for any-size inputs: 224.", show_default=False)] = None,
    logits: Annotated[str | None, typer.Option(
        help="The tensor of class scores before softmax, [N, classes] (`none`: no classifier). "
        "Default: the single [N, K] output, or the input of a Softmax that produces it.",
        show_default=False)] = None,
    labels: Annotated[str | None, typer.Option(
        help="Class names, one per line in a text FILE, or `imagenet` (ImageNet's 1000 "
        "classes), for predict and --class NAME.", show_default=False)] = None,
    name: Annotated[str | None, typer.Option(
        help="The model's name in provenance and the server. Default: the output's file name.",
        show_default=False)] = None,
):
    """Wrap an ONNX image network into a dreamable model: input `image` [N,3,H,W] RGB in [0,1]
    with the network's preprocessing inside, `logits` as an output, its layers named.

    The network's weights are kept as they are. Tell it how the network expects its pixels
    (--preprocess); the rest is inferred and printed. Layers are the network's tensors, named
    as in the file (tf2onnx's `model/conv_pw_5_relu/Relu6:0`) or by a short alias
    (`conv_pw_5_relu`); `onnxdream layers OUT` lists them.

    A Keras model converted by tf2onnx (NHWC, expects [-1,1]):

        onnxdream import onnx mobilenet.onnx -o mobilenet-dream.onnx --preprocess tf

    PaddleOCR's text-direction classifier (BGR, (x-0.5)/0.5, 48x192; its output is a softmax,
    so its input linear_1.tmp_1 becomes the logits):

        onnxdream import onnx ppocr_cls.onnx -o ppocr-dream.onnx --size 48x192 \\
            --preprocess mean=0.5,0.5,0.5:std=0.5,0.5,0.5:bgr --labels labels.txt

    Then, as with any dreamable model:

        onnxdream dream photo.jpg --model mobilenet-dream.onnx --layer conv_pw_8_relu
    """
    with user_errors():
        from onnxdream.exporters.graph.importer import import_onnx

        result = import_onnx(model, output, input=input, layout=layout,
                             preprocess=preprocess, size=size, labels=labels, logits=logits,
                             name=name or output.stem)
        for line in summary(result):
            typer.echo(line, err=True)


def summary(result) -> list[str]:
    """What the import inferred, one line each."""
    h, w = result.native_size
    shape = "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else "?"
                            for d in result.input_shape) + "]"
    lines = [f"wrote {result.path}",
             f"  input       {result.input!r} {shape}, {result.layout.upper()}"
             f"{' (inferred)' if result.layout_inferred else ''}, {result.channels} channel"
             f"{'s' if result.channels != 1 else ''} -> image [N,3,H,W] RGB in [0,1]",
             f"  preprocess  {result.preprocess.describe()}",
             f"  size        {h}x{w}, " + ("any size runs" if result.dynamic_hw else
                                           "runs only at this size")
             + ("" if result.batch else ", one image at a time")]
    if result.logits is None:
        lines.append("  logits      none (no classifier: class objectives and predict do not "
                     "apply)")
    else:
        classes = f"{result.classes} classes" if result.classes else "classes"
        named = "no labels" if not result.labels else "labels " + ", ".join(
            result.labels[:4]) + (", …" if len(result.labels) > 4 else "")
        lines.append(f"  logits      {result.logits!r} ({classes}, {named})")
    default = ", ".join(result.default_layers) or "none"
    lines.append(f"  layers      {len(result.layers)}, default {default}  "
                 f"(onnxdream layers {result.path})")
    lines += [f"  note: {n}" for n in result.notes]
    if result.logits is not None and result.classes == 1000 and not result.labels:
        lines.append("  note: 1000 classes: `--labels imagenet` names them if they are "
                     "ImageNet's")
    lines.append(f"next: onnxdream dream photo.jpg --model {result.path}")
    return lines
