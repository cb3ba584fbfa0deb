"""Make ``tf2onnx_mobilenet025.onnx`` and its TensorFlow reference gradients (run ONCE, by hand).

This script is NOT run by ``make test``: it needs TensorFlow and tf2onnx, which the test venv
must never install. Run it in a separate venv outside the repository::

    python3.11 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu tf2onnx onnx
    /tmp/tfvenv/bin/python tests/data/make_tf2onnx.py

What it makes (see tests/data/README.md for every key):

- ``tf2onnx_mobilenet025.onnx``: what a TensorFlow user brings. ``keras.applications.MobileNet``
  (v1, alpha 0.25, random seeded weights) as the base of the standard Keras fine-tuning recipe
  (``include_top=False`` + GlobalAveragePooling2D + Dropout + Dense(10) logits, no softmax),
  converted by ``tf2onnx.convert.from_keras`` at dynamic N/H/W, opset 17: NHWC float input named
  ``input`` in the model's own scale ([-1, 1], no preprocessing in the graph), tensor names like
  ``…/conv_pw_5_relu_1/Relu6:0``, convs with ``auto_pad=SAME_UPPER`` (stride 2 too), depthwise
  convs (Conv group=C), Relu6 as Clip, explicit Pad before the stride-2 depthwise convs, and a
  [N, 10] output ``logits`` (GlobalAveragePool → Squeeze → MatMul → Add).
  The application's own classifier cannot be used: Keras refuses ``include_top=True`` with a
  dynamic ``input_shape``; a fine-tuned head on a dynamic-size base is the common case anyway.
- ``tf2onnx_mobilenet025_grads.npz``: two seeded inputs (96x128 and 131x97, odd sizes exercise
  SAME padding), TensorFlow's logits for them, and ``tf.GradientTape`` input gradients of four
  objectives (means of a pre-Relu6 tensor and two post-Relu6 tensors, and one logit) computed with
  the same weights cast to float64 (the oracle), plus how far TF's own float32 gradient is from it.

Random weights: conv/dense kernels keep Keras' seeded initialisers; every bias, BatchNorm gamma and
beta is drawn from a seeded generator, and the BatchNorm moving statistics are calibrated on a
seeded batch (one training-mode pass with momentum 0) so that activations neither vanish nor
explode: about 40% of each Relu6's outputs are 0 and about 1% sit at 6, so both clip edges matter.
Deterministic on one machine (CPU, TF_DETERMINISTIC_OPS=1).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402

HERE = Path(__file__).resolve().parent
NAME = "tf2onnx_mobilenet025"
SEED = 20240612
CLASSES = 10
OPSET = 17
SIZES = ((96, 128), (131, 97))
# (kind, keras layer, ONNX role): "pre" = the Clip's input, "post" = the Clip's output
OBJECTIVES = (
    ("mean", "conv_dw_3_relu", "pre"),   # depthwise conv + BN, before Relu6
    ("mean", "conv_pw_5_relu", "post"),  # after Relu6, 1/8 resolution
    ("mean", "conv_pw_11_relu", "post"),  # after Relu6, 1/16 resolution
    ("logit", "logits", 3),              # logit 3 of the [N, 10] output
)


def build(dtype: str) -> keras.Model:
    """The fine-tuning recipe on a dynamic-size MobileNet v1 (alpha 0.25); ``dtype`` = floatx."""
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)  # the global policy is cached from floatx at first use
    keras.utils.set_random_seed(SEED)
    inp = keras.Input((None, None, 3), name="input")
    base = keras.applications.MobileNet(input_tensor=inp, alpha=0.25, include_top=False,
                                        weights=None)
    h = keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    h = keras.layers.Dropout(0.2, name="dropout")(h)
    out = keras.layers.Dense(CLASSES, name="logits")(h)
    return keras.Model(inp, out, name="mobilenet025")


def smooth_images(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """uint8 [n, h, w, 3]: smooth random colour fields plus a little noise (photo-like)."""
    out = []
    for _ in range(n):
        coarse = rng.uniform(0, 1, size=(1, max(2, h // 16), max(2, w // 16), 3))
        img = tf.image.resize(coarse, (h, w), method="bicubic").numpy()[0]
        img = img + rng.normal(0, 0.06, size=img.shape)
        out.append(np.clip(np.round(img * 255), 0, 255).astype(np.uint8))
    return np.stack(out)


def to_model_scale(img: np.ndarray) -> np.ndarray:
    """uint8 RGB → the MobileNet input scale, float64: x/127.5 - 1 (keras 'tf' preprocessing)."""
    return img.astype(np.float64) / 127.5 - 1.0


def randomise(model: keras.Model, rng: np.random.Generator) -> None:
    """Seeded biases/gamma/beta, then BatchNorm moving stats calibrated on a seeded batch."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.gamma.assign(rng.uniform(1.0, 3.0, layer.gamma.shape).astype("float32"))
            layer.beta.assign(rng.uniform(-1.0, 2.0, layer.beta.shape).astype("float32"))
            layer.momentum = 0.0
        elif getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0, 0.2, layer.bias.shape).astype("float32"))
    calib = to_model_scale(smooth_images(rng, 8, 128, 128)).astype(np.float32)
    model(calib, training=True)  # momentum 0: moving stats := this batch's stats
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.99


def convert(model: keras.Model) -> onnx.ModelProto:
    spec = [tf.TensorSpec([None, None, None, 3], tf.float32, name="input")]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
    onnx.checker.check_model(proto)
    return proto


def onnx_names(proto: onnx.ModelProto) -> dict[str, str]:
    """Keras Relu6 layer → the ONNX tensor names of its Clip's input ("pre") and output ("post")."""
    names: dict[str, str] = {}
    for node in proto.graph.node:
        if node.op_type != "Clip":
            continue
        m = re.search(r"/(conv\w*?_relu)(?:_\d+)?/Relu6:0$", node.output[0])
        if m:
            names[m.group(1) + ":post"] = node.output[0]
            names[m.group(1) + ":pre"] = node.input[0]
    return names


def tf_references(m32: keras.Model, m64: keras.Model, images: list[np.ndarray]) -> dict:
    """Logits and GradientTape input gradients (float64 oracle, float32 for comparison)."""
    out: dict[str, np.ndarray] = {}

    def heads(model: keras.Model) -> keras.Model:
        tensors = []
        for kind, layer, role in OBJECTIVES:
            if kind == "logit":
                tensors.append(model.output)
            elif role == "pre":  # the Relu6's input is the BatchNorm before it
                tensors.append(model.get_layer(layer).input)
            else:
                tensors.append(model.get_layer(layer).output)
        return keras.Model(model.input, tensors)

    for dtype, model in (("64", m64), ("32", m32)):
        feats = heads(model)
        for i, img in enumerate(images):
            x = tf.Variable(to_model_scale(img).astype(f"float{dtype}"))
            out[f"logits{dtype}_{i}"] = model(x, training=False).numpy()
            for j, (kind, _layer, role) in enumerate(OBJECTIVES):
                with tf.GradientTape() as tape:
                    t = feats(x, training=False)[j]
                    if kind == "logit":
                        value = t[:, role]
                    else:
                        value = tf.reduce_mean(t, axis=list(range(1, len(t.shape))))
                    total = tf.reduce_sum(value)
                g = tape.gradient(total, x).numpy()
                out[f"value{dtype}_{j}_{i}"] = value.numpy()
                out[f"grad{dtype}_{j}_{i}"] = g
    return out


def main() -> int:
    rng = np.random.default_rng(SEED)
    m32 = build("float32")
    randomise(m32, rng)
    proto = convert(m32)
    names = onnx_names(proto)

    m64 = build("float64")
    m64.set_weights([w.astype(np.float64) for w in m32.get_weights()])
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")
    if m64.get_layer("conv1").kernel.dtype != "float64":
        raise SystemExit("the float64 copy is not float64")

    images = [smooth_images(np.random.default_rng(SEED + 1 + i), 1, h, w)
              for i, (h, w) in enumerate(SIZES)]
    ref = tf_references(m32, m64, images)

    onnx_tensor, keras_layer, kinds, index = [], [], [], []
    for kind, layer, role in OBJECTIVES:
        kinds.append(kind)
        keras_layer.append(layer if role != "pre" else f"{layer} (input: the BatchNorm before it)")
        if kind == "logit":
            onnx_tensor.append(proto.graph.output[0].name)
            index.append(role)
        else:
            onnx_tensor.append(names[f"{layer}:{role}"])
            index.append(-1)

    arrays: dict[str, np.ndarray] = {
        "sizes": np.array(SIZES, dtype=np.int64),
        "obj_kind": np.array(kinds),
        "obj_keras_layer": np.array(keras_layer),
        "obj_onnx_tensor": np.array(onnx_tensor),
        "obj_index": np.array(index, dtype=np.int64),
    }
    stats = {}
    for i in range(len(SIZES)):
        arrays[f"image_{i}"] = images[i]
        arrays[f"x_{i}"] = to_model_scale(images[i]).astype(np.float32)
        arrays[f"logits64_{i}"] = ref[f"logits64_{i}"]
        arrays[f"logits32_{i}"] = ref[f"logits32_{i}"].astype(np.float32)
        for j in range(len(OBJECTIVES)):
            g64, g32 = ref[f"grad64_{j}_{i}"], ref[f"grad32_{j}_{i}"]
            arrays[f"grad_{j}_{i}"] = g64.astype(np.float32)  # float64 oracle, stored as float32
            arrays[f"value64_{j}_{i}"] = ref[f"value64_{j}_{i}"]
            err = float(np.abs(g32 - g64).max() / np.abs(g64).max())
            arrays[f"tf32_relerr_{j}_{i}"] = np.array(err)
            stats[f"{j}_{i}"] = {"value": float(ref[f"value64_{j}_{i}"][0]),
                                 "grad_absmax": float(np.abs(g64).max()),
                                 "tf32_vs_tf64_max_rel": err}
    versions = {"tensorflow": tf.__version__, "keras": keras.__version__,
                "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__,
                "numpy": np.__version__, "python": sys.version.split()[0], "opset": OPSET,
                "seed": SEED}
    arrays["versions"] = np.array(json.dumps(versions))

    onnx.save(proto, str(HERE / f"{NAME}.onnx"))
    np.savez_compressed(HERE / f"{NAME}_grads.npz", **arrays)

    from collections import Counter
    ops = Counter(n.op_type for n in proto.graph.node)
    auto = Counter(next((a.s.decode() for a in n.attribute if a.name == "auto_pad"), "NOTSET")
                   for n in proto.graph.node if n.op_type == "Conv")
    print(json.dumps({"versions": versions, "ops": ops, "conv_auto_pad": auto,
                      "params": m32.count_params(),
                      "inputs": [i.name for i in proto.graph.input],
                      "outputs": [o.name for o in proto.graph.output],
                      "objectives": list(zip(kinds, keras_layer, onnx_tensor, index, strict=True)),
                      "logits64_0": ref["logits64_0"][0].round(4).tolist(),
                      "stats": stats}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
