"""``--layer NAME[:WEIGHT]`` with names that themselves end in ``:N`` (tf2onnx's tensor names).

The rule: a trailing ``:WEIGHT`` is split off only when it parses as a number and the whole text
is not a layer name of the model.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from helpers import run_cli
from onnxdream.core.errors import LayerError
from onnxdream.exporters.graph import LayerSpec, Objective, compile_gradient

RELU = "model/block_1/Relu6:0"


@pytest.mark.parametrize("text,known,want", [
    ("mixed4", None, ("mixed4", 1.0)),
    ("mixed4:2.5", None, ("mixed4", 2.5)),
    ("mixed4:2.5", ["mixed4"], ("mixed4", 2.5)),
    ("inception_4c/output", None, ("inception_4c/output", 1.0)),
    ("a:b", ["x"], ("a:b", 1.0)),  # not a number: part of the name
    (RELU, [RELU], (RELU, 1.0)),
    (RELU + ":2", [RELU], (RELU, 2.0)),
    (RELU + ":-0.5", [RELU], (RELU, -0.5)),
    (RELU, None, ("model/block_1/Relu6", 0.0)),  # no names known: the old reading
    ("split:1", {"split": "split:0", "split:0": "split:0", "split:1": "split:1"},
     None),  # ambiguous: 'split' and 'split:1' are different tensors
    ("split:0", {"split": "split:0", "split:0": "split:0"}, ("split:0", 1.0)),  # one tensor
])
def test_parse_rule(text, known, want):
    if want is None:
        with pytest.raises(LayerError, match=r"ambiguous.*'split:1:1' for layer 'split:1'.*"
                                             r"'split:1.0' for layer 'split' at weight 1"):
            LayerSpec.parse(text, known)
        return
    spec = LayerSpec.parse(text, known)
    assert (spec.name, spec.weight) == want


def test_parse_errors():
    for text, needle in [("", "empty"), (":2", "no name"), ("x:inf", "finite")]:
        with pytest.raises(LayerError, match=needle):
            LayerSpec.parse(text, ["x"])


def test_objective_build_passes_the_names():
    obj = Objective.build([RELU, "model/block_2/add:0:0.5"], "l2",
                          known=[RELU, "model/block_2/add:0"])
    assert obj.describe() == f"1*l2({RELU}) + 0.5*l2(model/block_2/add:0)"


def tf2onnx_like(path):
    """A model named the way tf2onnx names tensors, without onnxdream metadata."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w:0")
    lo = numpy_helper.from_array(np.array(0, np.float32), "lo")
    hi = numpy_helper.from_array(np.array(6, np.float32), "hi")
    nodes = [helper.make_node("Conv", ["image", "w:0"], ["model/conv/Conv2D:0"],
                              auto_pad="SAME_UPPER", strides=[2, 2], name="model/conv/Conv2D"),
             helper.make_node("Clip", ["model/conv/Conv2D:0", "lo", "hi"], [RELU],
                              name="model/block_1/Relu6")]
    graph = helper.make_graph(
        nodes, "tf2onnx",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT,
                                       ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info(RELU, onnx.TensorProto.FLOAT, None)], [w, lo, hi])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_compile_takes_tensor_names_ending_in_colon_zero(model_home, tmp_path):
    src = tf2onnx_like(tmp_path / "tf.onnx")
    for spec, want in [(RELU, f"1*l2({RELU})"), (RELU + ":3", f"3*l2({RELU})")]:
        out = tmp_path / "g.onnx"
        run_cli("compile", str(src), "--layer", spec, "--objective", "l2", "-o", str(out),
                home=model_home)
        meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        assert json.loads(meta["onnxdream.compiled"])["objective"] == want


def test_gradient_model_reads_the_names_too(model_home, tmp_path):
    from onnxdream.runtime.gradient import GradientModel

    gm = GradientModel(tf2onnx_like(tmp_path / "tf.onnx"), [RELU + ":2"], "mean", cache=False)
    assert gm.objective.describe() == f"2*mean({RELU})"
    obj, grad = gm(np.random.default_rng(0).random((1, 3, 15, 16), np.float32))
    assert grad.shape == (1, 3, 15, 16)
    direct = compile_gradient(tf2onnx_like(tmp_path / "tf2.onnx"), [RELU], "mean")
    assert [o.name for o in direct.graph.output] == ["objective", "grad"]


def test_ambiguous_spec_is_one_line_in_the_cli(model_home, tmp_path):
    src = tf2onnx_like(tmp_path / "tf.onnx")
    m = onnx.load(str(src))
    # a second tensor named like the first without its ':0'
    m.graph.node.append(helper.make_node("Relu", [RELU], ["model/block_1/Relu6"]))
    onnx.save(m, str(src))
    proc = run_cli("compile", str(src), "--layer", RELU, "-o", str(tmp_path / "g.onnx"),
                   home=model_home, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "ambiguous" in proc.stderr and f"'{RELU}:1'" in proc.stderr
