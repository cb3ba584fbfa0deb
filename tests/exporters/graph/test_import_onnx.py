"""`onnxdream import onnx`: foreign ONNX models made dreamable, checked against independent
oracles (tests/data/README.md): TensorFlow's GradientTape for a tf2onnx MobileNet, onnx2torch's
float64 autograd for PaddleOCR's text-direction classifier; and the one-line hint for a model
used without the import."""

from __future__ import annotations

import asyncio
import io
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from helpers import DATA, photo, run_cli

TF2ONNX = DATA / "tf2onnx_mobilenet025.onnx"
TF_GRADS = DATA / "tf2onnx_mobilenet025_grads.npz"
PPOCR = DATA / "ppocr_cls.onnx"
PPOCR_FLAGS = ["--preprocess", "mean=0.5,0.5,0.5:std=0.5,0.5,0.5:bgr", "--size", "48x192",
               "--logits", "linear_1.tmp_1"]
os.environ.setdefault("ONNXDREAM_THREADS", "1")


def session(path_or_proto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    data = path_or_proto.SerializeToString() if isinstance(path_or_proto, onnx.ModelProto) \
        else str(path_or_proto)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def gradient(model: Path, layer: str, objective: str, image: np.ndarray):
    """(objective, d objective / d image) through onnxdream's compiled gradient graph."""
    from onnxdream.exporters.graph import compile_gradient

    graph = compile_gradient(model, [layer], objective)
    obj, grad = session(graph).run(["objective", "grad"], {"image": image})
    return obj, grad


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# ---------------------------------------------------------------------------------------------
# tf2onnx MobileNet (NHWC, [-1,1], SAME_UPPER convs, ':0' names) against TensorFlow


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory) -> Path:
    from onnxdream.exporters.graph.importer import import_onnx

    out = tmp_path_factory.mktemp("tf2onnx") / "mobilenet.onnx"
    result = import_onnx(TF2ONNX, out, preprocess="tf")
    assert (result.input, result.layout, result.layout_inferred) == ("input", "nhwc", True)
    assert result.dynamic_hw and result.batch and result.logits == "logits"
    assert result.classes == 10
    return out


def test_tf2onnx_gradients_match_tensorflow(mobilenet):
    """d/dimage = transpose(dTF/dx) * 2: TF's gradients are w.r.t. the NHWC input in the
    model's [-1,1] scale, ours w.r.t. the [0,1] NCHW image (x = 2 * image - 1)."""
    ref = np.load(TF_GRADS)
    worst = 0.0
    for j in range(4):
        kind, tensor, index = (str(ref["obj_kind"][j]), str(ref["obj_onnx_tensor"][j]),
                               int(ref["obj_index"][j]))
        layer, objective = (("logits", f"class:{index}") if kind == "logit" else (tensor, "mean"))
        from onnxdream.exporters.graph import compile_gradient

        graph = compile_gradient(mobilenet, [layer], objective)  # names with ':0' work
        run = session(graph)
        for i in range(2):
            image = np.ascontiguousarray(
                (ref[f"image_{i}"].astype(np.float32) / 255).transpose(0, 3, 1, 2))
            obj, grad = run.run(["objective", "grad"], {"image": image})
            want = 2 * ref[f"grad_{j}_{i}"].astype(np.float64).transpose(0, 3, 1, 2)
            err = rel_err(grad, want)
            worst = max(worst, err)
            assert err < 1e-4, (layer, tuple(ref["sizes"][i]), err)
            value = float(ref[f"value64_{j}_{i}"][0])
            assert abs(obj[0] - value) <= 1e-4 * max(1.0, abs(value)), (layer, obj, value)
    print(f"tf2onnx MobileNet vs TensorFlow float64: max relative error {worst:.2e}")


def test_tf2onnx_aliases_and_tensor_names_are_the_same_layer(mobilenet):
    from onnxdream.exporters.graph.contract import ModelInfo

    info = ModelInfo.load(mobilenet)
    tensor = "mobilenet025_1/conv_pw_5_relu_1/Relu6:0"
    assert info.layers["conv_pw_5_relu"] == tensor  # Keras' layer name, the "_1" scope dropped
    assert info.layers["conv_dw_3_bn"] == "mobilenet025_1/conv_dw_3_bn_1/batchnorm/add_1:0"
    assert len(set(info.layers)) == len(info.layers) and "image" not in info.layers
    assert info.default_layers and info.default_layers[0] in info.layers
    assert info.native_size == (224, 224) and info.dynamic_hw
    image = np.random.default_rng(1).random((1, 3, 75, 61), dtype=np.float32)
    _, by_alias = gradient(mobilenet, "conv_pw_5_relu", "mean", image)
    _, by_name = gradient(mobilenet, tensor, "mean", image)
    _, weighted = gradient(mobilenet, tensor + ":2", "mean", image)  # NAME:WEIGHT still parses
    np.testing.assert_array_equal(by_alias, by_name)
    np.testing.assert_allclose(weighted, 2 * by_name, rtol=1e-6, atol=1e-12)


def test_tf2onnx_logits_and_predict_match_tensorflow(tmp_path):
    """The wrapped model's logits equal TF's; `predict` at the model's native size too."""
    from onnxdream.exporters.graph.importer import import_onnx
    from onnxdream.runtime.predict import Classifier

    ref = np.load(TF_GRADS)
    h, w = (int(v) for v in ref["sizes"][0])
    out = tmp_path / "mobilenet-96x128.onnx"
    import_onnx(TF2ONNX, out, preprocess="tf", size=f"{h}x{w}", labels=[f"c{k}" for k in range(10)])
    run = session(out)
    for i in range(2):
        image = np.ascontiguousarray(
            (ref[f"image_{i}"].astype(np.float32) / 255).transpose(0, 3, 1, 2))
        (logits,) = run.run(["logits"], {"image": image})
        np.testing.assert_allclose(logits, ref[f"logits64_{i}"], atol=1e-4)
    clf = Classifier(out, device="cpu", threads=1)
    assert clf.size == (h, w)
    rgb = ref["image_0"][0].astype(np.float32) / 255
    np.testing.assert_allclose(clf.logits(rgb), ref["logits64_0"][0], atol=1e-4)
    top = clf.predict(rgb, 3)
    assert top[0]["index"] == int(np.argmax(ref["logits64_0"][0]))
    assert top[0]["label"] == f"c{top[0]['index']}"


def test_tf2onnx_cli_import_then_dream(model_home, tmp_path):
    out = tmp_path / "mobilenet.onnx"
    proc = run_cli("import", "onnx", str(TF2ONNX), "-o", str(out), "--preprocess", "tf",
                   home=model_home)
    for needle in ("'input' [?, ?, ?, 3], NHWC (inferred)", "tf: x*2 - 1", "224x224, any size",
                   "'logits' (10 classes", "default conv_pw_8_relu"):
        assert needle in proc.stderr, proc.stderr
    dream = tmp_path / "dream.png"
    proc = run_cli("dream", str(photo("chelsea.png")), "--model", str(out), "-o", str(dream),
                   "--steps", "2", "--octaves", "2", "-q", "--layer",
                   "mobilenet025_1/conv_pw_5_relu_1/Relu6:0", "--layer", "conv_pw_11_relu:0.5",
                   home=model_home)
    assert dream.exists() and "Traceback" not in proc.stderr
    listing = run_cli("layers", str(out), home=model_home).stdout
    assert "conv_pw_5_relu " in listing and "mobilenet025_1/conv_pw_5_relu_1/Relu6:0" in listing


# ---------------------------------------------------------------------------------------------
# PaddleOCR's direction classifier (BGR, (x-0.5)/0.5, Constant weights, softmax output)


def ppocr_reference(layer: str, image: np.ndarray, logit: int | None = None):
    """(objective, d objective / d image) in float64 by onnx2torch on the *original* file."""
    torch = pytest.importorskip("torch")
    onnx2torch = pytest.importorskip("onnx2torch")
    from onnx.utils import Extractor

    from onnxdream.exporters.graph.importer import constants_to_initializers

    m = onnx.load(str(PPOCR))
    constants_to_initializers(m)
    m = onnx.shape_inference.infer_shapes(m)
    net = onnx2torch.convert(Extractor(m).extract_model(["x"], [layer])).eval().double()
    img = torch.from_numpy(image.astype(np.float64)).requires_grad_(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float64 convs on a shared 2-core machine: one thread is 10x faster
    try:
        x = (img.flip(1) - 0.5) / 0.5  # RGB [0,1] -> BGR, (v - 0.5) / 0.5
        y = net(x)
        value = y[:, logit] if logit is not None else y.flatten(1).mean(1)
        value.sum().backward()
    finally:
        torch.set_num_threads(threads)
    return value.detach().numpy(), img.grad.numpy()


@pytest.fixture(scope="module")
def ppocr(tmp_path_factory) -> Path:
    from onnxdream.exporters.graph.importer import import_onnx

    out = tmp_path_factory.mktemp("ppocr") / "ppocr.onnx"
    result = import_onnx(PPOCR, out, preprocess="mean=0.5,0.5,0.5:std=0.5,0.5,0.5:bgr",
                         size="48x192", logits="linear_1.tmp_1", labels=["0", "180"])
    assert (result.input, result.layout, result.native_size) == ("x", "nchw", (48, 192))
    assert result.dynamic_hw and result.classes == 2
    return out


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")  # onnx2torch's Slice
@pytest.mark.parametrize("hw", [(48, 192), (61, 97)])
def test_ppocr_gradients_match_onnx2torch_float64(ppocr, hw):
    pytest.importorskip("onnx2torch")
    image = np.random.default_rng(hw[0]).random((2, 3, *hw), dtype=np.float32)
    worst = 0.0
    for layer, objective, logit in [("relu_3.tmp_0", "mean", None),
                                    ("elementwise_add_5", "mean", None),
                                    ("logits", "class:1", 1)]:
        obj, grad = gradient(ppocr, layer, objective, image)
        ref_layer = "linear_1.tmp_1" if layer == "logits" else layer
        want_obj, want = ppocr_reference(ref_layer, image, logit)
        err = rel_err(grad, want)
        worst = max(worst, err)
        assert err < 1e-4, (layer, hw, err)
        np.testing.assert_allclose(obj, want_obj, rtol=1e-4, atol=1e-5)
    print(f"ppocr_cls {hw} vs onnx2torch float64: max relative error {worst:.2e}")


def test_ppocr_softmax_output_gives_its_input_as_logits(tmp_path):
    from onnxdream.exporters.graph.importer import import_onnx

    result = import_onnx(PPOCR, tmp_path / "auto.onnx",
                         preprocess="mean=0.5,0.5,0.5:std=0.5,0.5,0.5:bgr")
    assert result.logits == "linear_1.tmp_1"
    assert any("softmax" in n and "linear_1.tmp_1" in n for n in result.notes)
    assert result.native_size == (224, 224)  # no --size: assumed, any size runs


def test_ppocr_cli_predict_labels_and_dream_at_another_size(model_home, tmp_path):
    from PIL import Image

    labels = tmp_path / "labels.txt"
    labels.write_text("0\n180\n")
    out = tmp_path / "ppocr.onnx"
    proc = run_cli("import", "onnx", str(PPOCR), "-o", str(out), *PPOCR_FLAGS,
                   "--labels", str(labels), home=model_home)
    assert "48x192, any size runs" in proc.stderr and "labels 0, 180" in proc.stderr
    # a line of "text" and the same turned upside down: the classifier's two labels
    img = np.full((48, 192, 3), 235, np.uint8)
    img[14:34, 10:180:12] = 20
    img[14:20, 10:180] = 20
    up, down = tmp_path / "up.png", tmp_path / "down.png"
    Image.fromarray(img).save(up)
    Image.fromarray(img[::-1, ::-1].copy()).save(down)
    for path in (up, down):
        rows = json.loads(run_cli("predict", str(path), "--model", str(out), "--json",
                                  home=model_home).stdout)
        assert {r["label"] for r in rows} == {"0", "180"}
        assert all(r["label"] == ["0", "180"][r["index"]] for r in rows)
        assert abs(sum(r["probability"] for r in rows) - 1) < 1e-6
    dream = tmp_path / "dream.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 150, 3), np.uint8)).save(
        tmp_path / "in.png")
    run_cli("dream", str(tmp_path / "in.png"), "--model", str(out), "-o", str(dream),
            "--steps", "2", "--octaves", "2", "-q", home=model_home)  # the default layer
    with Image.open(dream) as im:
        assert im.size == (150, 70)
    run_cli("visualize", "--model", str(out), "--class", "180", "--size", "64", "--steps", "3",
            "-o", str(tmp_path / "v.png"), home=model_home)
    run_cli("compile", str(out), "-o", str(tmp_path / "g.onnx"), "--objective", "class:1",
            home=model_home)


def test_server_dreams_on_an_imported_model_and_explains_an_unwrapped_one(ppocr, tmp_path):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from PIL import Image

    from onnxdream.server.app import ServerConfig, create_app

    raw = tmp_path / "rawocr.onnx"
    raw.write_bytes(PPOCR.read_bytes())
    config = ServerConfig.from_env(model_paths=[ppocr, raw], workers=1)
    app = create_app(config)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 100, 3), np.uint8)).save(
        buf, "PNG")
    files = {"image": ("p.png", buf.getvalue(), "image/png")}

    async def requests():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://test", timeout=60) as c:
            data = {"steps": "2", "octaves": "1"}
            return (await c.post("/dream", files=files, data={**data, "model": "ppocr"}),
                    await c.post("/dream", files=files, data={**data, "model": "rawocr"}))

    try:
        ok, unwrapped = asyncio.run(requests())
    finally:
        app.state.jobs.stop()
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png", ok.text[:300]
    assert unwrapped.status_code in (400, 422), unwrapped.text[:300]
    assert "onnxdream import onnx" in unwrapped.json()["error"]
    assert str(tmp_path) not in unwrapped.json()["error"]  # no server paths in errors


# ---------------------------------------------------------------------------------------------
# an unwrapped model: one line naming the import and its flags


@pytest.mark.parametrize("command", [
    ["dream", "{photo}", "--model", "{model}", "-o", "{tmp}/d.png", "-q"],
    ["predict", "{photo}", "--model", "{model}"],
    ["compile", "{model}", "-o", "{tmp}/g.onnx", "--layer", "logits"],
    ["visualize", "--model", "{model}", "--class", "1", "-o", "{tmp}/v.png"],
])
def test_unwrapped_model_says_how_to_import_it(model_home, tmp_path, command):
    args = [a.format(photo=photo("chelsea.png"), model=TF2ONNX, tmp=tmp_path) for a in command]
    proc = run_cli(*args, home=model_home, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "is not a dreamable model" in lines[0]
    assert "onnxdream import onnx" in lines[0] and "--layout nhwc --preprocess tf" in lines[0]


def test_layers_of_an_unwrapped_nhwc_model_have_shapes(model_home):
    proc = run_cli("layers", str(TF2ONNX), "--json", home=model_home)
    assert "onnxdream import onnx" in proc.stderr  # a warning, and the listing all the same
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["mobilenet025_1/conv_pw_5_relu_1/Relu6:0"]["shape"] == [1, 64, 28, 28]
    assert rows["logits"]["shape"] == [1, 10]


# ---------------------------------------------------------------------------------------------
# flags: one-line errors, preprocessing that means what the exporters mean


def tiny_network(path: Path, dims, *, flatten_to: int | None = None, softmax: bool = False,
                 name: str = "input", channels_last: bool = False) -> Path:
    """input (dims) → [Transpose] → Conv 3x3 → Relu → Conv → GlobalAveragePool / Reshape → fc."""
    rng = np.random.default_rng(0)
    c = dims[3] if channels_last else dims[1]
    inits = [numpy_helper.from_array(rng.normal(size=(8, c, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(8, 8, 3, 3)).astype(np.float32), "w2")]
    nodes = []
    x = name
    if channels_last:
        nodes.append(helper.make_node("Transpose", [x], ["nchw"], perm=[0, 3, 1, 2]))
        x = "nchw"
    nodes += [helper.make_node("Conv", [x, "w1"], ["model/block1/conv:0"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["model/block1/conv:0"], ["model/block1/relu:0"]),
              helper.make_node("Conv", ["model/block1/relu:0", "w2"], ["model/block2/conv:0"],
                               pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["model/block2/conv:0"], ["model/block2/relu:0"])]
    if flatten_to:  # runs only where 8 * H * W == flatten_to
        inits += [numpy_helper.from_array(np.array([0, flatten_to], np.int64), "shape"),
                  numpy_helper.from_array(rng.normal(size=(flatten_to, 5)).astype(np.float32),
                                          "fc")]
        nodes += [helper.make_node("Reshape", ["model/block2/relu:0", "shape"], ["flat"])]
    else:
        inits.append(numpy_helper.from_array(rng.normal(size=(8, 5)).astype(np.float32), "fc"))
        nodes += [helper.make_node("GlobalAveragePool", ["model/block2/relu:0"], ["gap"]),
                  helper.make_node("Flatten", ["gap"], ["flat"])]
    nodes.append(helper.make_node("MatMul", ["flat", "fc"], ["scores"]))
    out = "scores"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["scores"], ["prob"], axis=-1))
        out = "prob"
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [dims[0], 5])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("dims,flags,needles", [
    (["n", 3, "h", "w"], ["--input", "nope"], ["--input names no input", "'nope'", "'input'"]),
    (["n", 3, "h", "w"], ["--preprocess", "mean=1,2"], ["--preprocess", "1 or 3 numbers"]),
    (["n", 3, "h", "w"], ["--preprocess", "imagenet"], ["--preprocess 'imagenet' is not",
                                                        "tf, torch, caffe"]),
    (["n", 3, "h", "w"], ["--preprocess", "std=0"], ["must not be 0"]),
    (["n", 3, "h", "w"], ["--layout", "chw"], ["--layout must be nchw or nhwc"]),
    (["n", 3, "h", "w"], ["--size", "big"], ["--size 'big' is not a size"]),
    (["n", 3, "h", "w"], ["--logits", "scorez"], ["--logits names no tensor", "'scores'"]),
    (["n", 3, "h", "w"], ["--logits", "model/block1/relu:0"], ["[N, classes]"]),
    (["n", 3, "h", "w"], ["--labels", "missing.txt"], ["--labels file", "does not exist"]),
    (["n", 3, 32, "w"], [], ["--size is needed", "fixes one side"]),
    (["n", 3, 32, 32], ["--size", "48"], ["--size is 48x48", "fixed at 32x32"]),
    (["n", 3, 3, 3], [], ["--layout is needed"]),
    (["n", 5, "h", "w"], ["--layout", "nchw"], ["5 channels"]),
])
def test_bad_flags_are_one_line_errors(model_home, tmp_path, dims, flags, needles):
    src = tiny_network(tmp_path / "net.onnx", dims)
    proc = run_cli("import", "onnx", str(src), "-o", str(tmp_path / "out.onnx"), *flags,
                   home=model_home, check=False, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_missing_or_corrupt_file_is_one_line(model_home, tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    for name, needle in [("missing.onnx", "no such model file"),
                         ("junk.onnx", "not a valid ONNX model")]:
        proc = run_cli("import", "onnx", str(tmp_path / name), "-o", str(tmp_path / "o.onnx"),
                       home=model_home, check=False)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_model_that_runs_at_one_size_needs_size(tmp_path):
    """Symbolic H/W in the file, but a Reshape that only fits 16x16: --size says which."""
    from onnxdream.core.errors import ModelError
    from onnxdream.exporters.graph.importer import import_onnx

    src = tiny_network(tmp_path / "net.onnx", ["n", 3, "h", "w"], flatten_to=8 * 16 * 16)
    with pytest.raises(ModelError, match=r"does not run at 224x224 \(the size was assumed: "
                                         r"give the size the network runs at with --size"):
        import_onnx(src, tmp_path / "out.onnx")
    result = import_onnx(src, tmp_path / "out.onnx", size="16")
    assert result.native_size == (16, 16) and not result.dynamic_hw
    assert any("runs only at 16x16" in n for n in result.notes)
    info_meta = {p.key: p.value for p in onnx.load(str(tmp_path / "out.onnx")).metadata_props}
    assert info_meta["onnxdream.dynamic_hw"] == "0" and info_meta["onnxdream.input_size"] == "16"


def test_fixed_batch_one_becomes_any_batch_where_it_runs(tmp_path):
    from onnxdream.exporters.graph.contract import ModelInfo
    from onnxdream.exporters.graph.importer import import_onnx

    src = tiny_network(tmp_path / "net.onnx", [1, 32, 40, 3], channels_last=True, softmax=True)
    result = import_onnx(src, tmp_path / "out.onnx", preprocess="torch")
    assert result.batch and result.layout == "nhwc" and not result.dynamic_hw
    assert result.native_size == (32, 40) and result.logits == "scores"
    info = ModelInfo.load(tmp_path / "out.onnx")
    assert info.native_size == (32, 40) and not info.dynamic_hw and info.has_logits
    assert info.layers["block1"] == "model/block1/relu:0"  # the alias of scope model/block1
    assert info.default_layers
    x = np.random.default_rng(0).random((3, 3, 32, 40), dtype=np.float32)
    (logits,) = session(tmp_path / "out.onnx").run(["logits"], {"image": x})
    assert logits.shape == (3, 5)


def test_a_network_whose_own_input_is_called_image(tmp_path):
    """Its NHWC input `image` is renamed inside; `--logits none` keeps it headless."""
    from onnxdream.exporters.graph.contract import ModelInfo
    from onnxdream.exporters.graph.importer import import_onnx

    src = tiny_network(tmp_path / "net.onnx", ["n", "h", "w", 3], name="image",
                       channels_last=True)
    result = import_onnx(src, tmp_path / "out.onnx", preprocess="none", logits="none")
    assert result.logits is None and result.layout == "nhwc"
    info = ModelInfo.load(tmp_path / "out.onnx")
    assert not info.has_logits and info.outputs == ["scores"]
    x = np.random.default_rng(0).random((1, 3, 20, 24), dtype=np.float32)
    (got,) = session(tmp_path / "out.onnx").run(["scores"], {"image": x})
    (want,) = session(src).run(["scores"], {"image": x.transpose(0, 2, 3, 1) * 255})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["tf", "torch", "caffe", "none", "unit"])
def test_named_preprocessing_means_what_the_exporters_mean(tmp_path, kind):
    """The wrapper's graph equals exporters/preprocess.py's torch function for each name."""
    torch = pytest.importorskip("torch")
    from onnxdream.exporters.graph.importer import import_onnx
    from onnxdream.exporters.preprocess import preprocess_fn

    # a "network" that returns its input: Identity after a 1x1 Conv with the identity matrix
    eye = numpy_helper.from_array(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), "eye")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "eye"], ["y"])], "id",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])], [eye])
    src = tmp_path / "id.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(src))
    result = import_onnx(src, tmp_path / "out.onnx", preprocess=kind)
    image = np.random.default_rng(0).random((2, 3, 5, 7), dtype=np.float32)
    (got,) = session(tmp_path / "out.onnx").run(["y"], {"image": image})
    want = preprocess_fn(kind)(torch.from_numpy(image).double()).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(result.preprocess.apply(image), want, rtol=1e-6, atol=1e-5)


def test_custom_preprocessing_spec():
    from onnxdream.exporters.graph.preprocessing import parse_preprocess

    image = np.random.default_rng(0).random((1, 3, 2, 2))
    caffe = parse_preprocess("caffe").apply(image)
    spelled = parse_preprocess("mean=103.939,116.779,123.68:std=1:scale=255:bgr").apply(image)
    np.testing.assert_allclose(spelled, caffe)  # means in the network's channel order (BGR)
    tf = parse_preprocess("mean=127.5:std=127.5:scale=255").apply(image)
    np.testing.assert_allclose(tf, parse_preprocess("tf").apply(image))


def test_grey_nhwc_network(tmp_path):
    from onnxdream.exporters.graph.importer import import_onnx

    src = tiny_network(tmp_path / "grey.onnx", ["n", 28, 28, 1], channels_last=True)
    result = import_onnx(src, tmp_path / "out.onnx", preprocess="unit")
    assert result.channels == 1 and result.layout == "nhwc" and not result.dynamic_hw
    image = np.random.default_rng(0).random((2, 3, 28, 28), dtype=np.float32)
    (got,) = session(tmp_path / "out.onnx").run(["logits"], {"image": image})
    grey = np.einsum("nchw,c->nhw", image, [0.299, 0.587, 0.114])[..., None].astype(np.float32)
    (want,) = session(src).run(["scores"], {"input": grey})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_aliases_are_short_unique_and_never_shadow_a_tensor():
    from onnxdream.exporters.graph.import_layers import layer_aliases

    tensors = ["m/a/conv:0", "m/a/relu:0", "m/b/bn/mul:0", "m/b/bn/add:0", "m/b/relu:0",
               "m/c/x/relu:0", "m/d/x/relu:0", "relu", "m/relu/Relu:0"]
    aliases = layer_aliases(tensors, taken={"image", "logits"})
    assert aliases["m/a/relu:0"] == "a" and aliases["m/b/relu:0"] == "b"
    assert aliases["m/b/bn/add:0"] == "bn"  # the output of scope m/b/bn (m/b ends later)
    assert aliases["m/c/x/relu:0"] == "c" and aliases["m/d/x/relu:0"] == "d"
    assert "m/a/conv:0" not in aliases  # no scope ends with it: its tensor name only
    assert "m/relu/Relu:0" not in aliases  # "relu" is another tensor's name
    assert len(set(aliases.values())) == len(aliases)
    assert not set(aliases.values()) & set(tensors)
    keras3 = [f"net_1/{n}_1/Relu:0" for n in ("conv1", "conv2", "conv3")]
    assert list(layer_aliases(keras3, taken=set()).values()) == ["conv1", "conv2", "conv3"]
    stripped = layer_aliases(keras3, taken={"conv1"})
    assert stripped["net_1/conv2_1/Relu:0"] == "conv2"
    assert stripped["net_1/conv1_1/Relu:0"] == "conv1_1"  # "conv1" names something else


def test_reimporting_a_dreamable_model_is_refused(tmp_path, mobilenet):
    from onnxdream.core.errors import ModelError
    from onnxdream.exporters.graph.importer import import_onnx

    with pytest.raises(ModelError, match="already a dreamable model"):
        import_onnx(mobilenet, tmp_path / "again.onnx")
