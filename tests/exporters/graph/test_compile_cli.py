"""`onnxdream compile` and `layers` as a user runs them: outputs, contracts, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from helpers import run_cli, tiny_classifier


def tiny_model(path, op="Relu", extra_domain=None):
    """image → Conv → <op> → GlobalAveragePool → logits, with onnxdream layer metadata."""
    model = tiny_classifier(op, extra_domain)
    model.metadata_props.add(key="onnxdream.layers",
                             value=json.dumps({"conv": "conv", "act": "act", "logits": "logits"}))
    onnx.save(model, str(path))
    return path


def test_compile_writes_a_standard_op_gradient_graph(model_home, tmp_path):
    src = tiny_model(tmp_path / "tiny.onnx")
    out = tmp_path / "grad.onnx"
    run_cli("compile", str(src), "--layer", "act", "--objective", "channel:2", "-o", str(out),
            home=model_home)
    g = onnx.load(str(out))
    onnx.checker.check_model(g, full_check=True)
    assert {n.domain for n in g.graph.node} <= {""}
    assert [o.name for o in g.graph.output] == ["objective", "grad"]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for h, w in [(9, 13), (32, 17)]:
        obj, grad = sess.run(None, {"image": np.random.rand(2, 3, h, w).astype(np.float32)})
        assert obj.shape == (2,) and grad.shape == (2, 3, h, w)


def test_compile_works_without_any_framework(model_home, tmp_path):
    out = tmp_path / "lite0.onnx"
    proc = run_cli("compile", "efficientnet-lite0", "--layer", "blocks.9:2", "--layer",
                   "blocks.12", "--pre-relu", "-o", str(out), home=model_home)
    assert "wrote" in proc.stderr and out.exists()
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["onnxdream.compiled"])["objective"] == \
        "2*mean(blocks.9) + 1*mean(blocks.12)"


@pytest.mark.parametrize("setup,args,needles", [
    ("relu", ["--layer", "nope"], ["unknown layer 'nope'", "layers: conv, act, logits"]),
    ("relu", ["--layer", "ac"], ["unknown layer 'ac'", "closest: act"]),
    ("relu", ["--layer", "act", "--objective", "channel"], ["bad objective 'channel'",
                                                             "needs an index"]),
    ("relu", ["--layer", "act", "--objective", "neuron:x"], ["bad objective"]),
    ("relu", ["--layer", "act", "--objective", "channel:9"], ["out of range", "4 channels"]),
    ("custom", ["--layer", "logits"], ["no gradient rule for op com.example.Swish",
                                       "node 'act0'", "layer 'logits'"]),
    ("missing", ["--layer", "act"], ["m.onnx", "no such file"]),
    ("corrupt", ["--layer", "act"], ["not a valid ONNX model"]),
])
def test_user_errors_are_one_clear_line(model_home, tmp_path, setup, args, needles):
    path = tmp_path / "m.onnx"
    if setup == "relu":
        tiny_model(path)
    elif setup == "custom":
        tiny_model(path, op="Swish", extra_domain="com.example")
    elif setup == "corrupt":
        path.write_bytes(b"\x08\x07garbage" * 50)
    proc = run_cli("compile", str(path), *args, "-o", str(tmp_path / "g.onnx"), home=model_home,
                   check=False)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "g.onnx").exists()


def test_layers_lists_names_ops_and_shapes(model_home, tmp_path):
    src = tiny_model(tmp_path / "tiny.onnx")
    rows = json.loads(run_cli("layers", str(src), "--json", home=model_home).stdout)
    assert [(r["name"], r["op_type"], r["shape"]) for r in rows] == [
        ("conv", "Conv", [1, 4, 224, 224]), ("act", "Relu", [1, 4, 224, 224]),
        ("logits", "MatMul", [1, 5])]
    text = run_cli("layers", str(src), home=model_home).stdout
    assert "act" in text and "1x4x224x224" in text
