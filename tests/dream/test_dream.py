"""`onnxdream dream` and `predict` as a user runs them, against PyTorch where it matters."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import photo, run_cli
from onnxdream.media.imageio import load_image, read_png_metadata


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_default_dream_without_frameworks(model_home, tmp_path):
    """The front door: only onnxruntime/numpy/Pillow underneath, same size, clearly dreamed."""
    src = photo("chelsea.png")
    out = tmp_path / "out.png"
    proc = run_cli("dream", str(src), "-o", str(out), "--seed", "3", home=model_home)
    assert "CPUExecutionProvider" in proc.stderr
    before = np.asarray(Image.open(src).convert("RGB"), np.float64)
    after = np.asarray(Image.open(out).convert("RGB"), np.float64)
    assert after.shape == before.shape
    assert np.abs(after - before).mean() > 8, "the dream barely changed the photo"
    meta = read_png_metadata(out)
    assert meta["onnxdream:seed"] == "3"
    assert meta["onnxdream:model"] == "efficientnet-lite0"
    assert "blocks.5" in meta["onnxdream:objective"]
    assert meta["onnxdream:command"].startswith("onnxdream dream ")
    # the same seed reproduces the dream exactly
    out2 = tmp_path / "out2.png"
    run_cli("dream", str(src), "-o", str(out2), "--seed", "3", "-q", home=model_home)
    assert np.array_equal(np.asarray(Image.open(out2)), np.asarray(Image.open(out)))


def torch_lite0():
    torch = pytest.importorskip("torch")
    from onnxdream.models.registry import ZOO
    from torch_efficientnet_lite import load

    sd = torch.load(ZOO["efficientnet-lite0"].checkpoint_path(), map_location="cpu",
                    weights_only=True)
    model = load("efficientnet-lite0", sd)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_dream_equals_the_same_loop_in_pytorch(model_home, tmp_path):
    """`dream --octaves 1 --jitter 0` is exactly the DESIGN loop, step for step, as in PyTorch.

    The loop is ill-conditioned in float32: the ascent drives Lite0's ReLU6 units onto their
    ceiling at 6, so after one step a single float32 rounding of the image (2e-7) switches a unit
    and moves the gradient by 2e-3 of its maximum; ten normalised steps amplify that until any
    two float32 implementations part (torch in float32 vs float64 on this very loop: PSNR 29.6
    dB). So torch takes its ReLU6 on/off decisions from onnxruntime's forward on the engine's
    image at the same step; every value and gradient is still computed by torch, on its own
    image, and the trajectories must agree to 8-bit precision.
    """
    torch = pytest.importorskip("torch")
    import onnx

    from gradcheck import onnx_decisions, shared_decisions
    from onnxdream.dream.ascent import DreamSettings, ascend
    from onnxdream.media.imageio import to_uint8
    from onnxdream.models import zoo_model_path
    from onnxdream.runtime.gradient import GradientModel

    src = photo("chelsea.png")
    out = tmp_path / "onnx.png"
    run_cli("dream", str(src), "-o", str(out), "--layer", "blocks.9", "--octaves", "1",
            "--steps", "10", "--step-size", "0.01", "--jitter", "0", "-q", home=model_home)
    got = np.asarray(Image.open(out).convert("RGB"))

    # the engine's loop in process, one step at a time, keeping each step's image
    gm = GradientModel("efficientnet-lite0", ["blocks.9"])
    settings = DreamSettings(octaves=1, steps=1, step_size=0.01, jitter=0)
    rgb = load_image(src).rgb
    engine_images = [rgb.transpose(2, 0, 1).copy()]
    for _ in range(10):
        engine_images.append(ascend(gm, engine_images[-1].copy(), settings,
                                    np.random.default_rng(0), 1))
    assert np.array_equal(to_uint8(engine_images[-1].transpose(1, 2, 0)), got)

    model = torch_lite0()
    zoo = onnx.load(str(zoo_model_path("efficientnet-lite0")))
    x = torch.from_numpy(engine_images[0][None].copy())
    for step in range(10):
        x.requires_grad_(True)
        with shared_decisions(onnx_decisions(zoo, engine_images[step][None])):
            obj = model.features(x)["blocks.9"].mean()
        (g,) = torch.autograd.grad(obj, x)
        with torch.no_grad():
            x = torch.clamp(x + 0.01 * g / (g.abs().mean() + 1e-8), 0, 1)
    ref = np.round(x[0].numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
    assert psnr(got, ref) >= 40, f"PSNR {psnr(got, ref):.1f} dB"
    assert psnr(got, np.asarray(Image.open(src).convert("RGB"))) < 30  # and it did dream


@pytest.mark.parametrize("name,accept,top", [
    ("chelsea.png", range(281, 286), 1),
    ("coffee.png", (967, 968), 1),
    ("rocket.jpg", (657, 744), 5),
])
def test_predict_json(model_home, name, accept, top):
    proc = run_cli("predict", str(photo(name)), "--json", home=model_home)
    result = json.loads(proc.stdout)
    assert [sorted(r) for r in result] == [["index", "label", "probability"]] * 5
    assert all(a["probability"] >= b["probability"] for a, b in zip(result, result[1:]))
    assert any(r["index"] in accept for r in result[:top]), result


def test_compile_class_objective_matches_autograd(model_home, tmp_path):
    torch = pytest.importorskip("torch")
    import onnx

    from gradcheck import relative_error, session

    out = tmp_path / "class285.onnx"
    run_cli("compile", "efficientnet-lite0", "--objective", "class:285", "-o", str(out),
            home=model_home)
    sess = session(onnx.load(str(out)))
    model = torch_lite0()
    x = torch.rand(2, 3, 179, 211, generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    logit = model(x)[:, 285]
    (g,) = torch.autograd.grad(logit.sum(), x)
    obj, grad = sess.run(None, {"image": x.detach().numpy()})
    np.testing.assert_allclose(obj, logit.detach().numpy(), rtol=1e-4, atol=1e-4)
    assert relative_error(grad, g.numpy()) < 1e-4


def test_tiles_join_without_seams(model_home):
    """Where the halo covers the receptive field, the tiled gradient equals the untiled one."""
    from onnxdream.runtime.gradient import GradientModel

    gm = GradientModel("efficientnet-lite0", ["blocks.2"])
    assert (gm.tile_info.receptive_field, gm.tile_info.stride) == (19, 4)
    img = load_image(photo("chelsea.png")).rgb[:200, :260].transpose(2, 0, 1).copy()
    obj, full = gm.gradient(img, tile_size=0)
    _, tiled = gm.gradient(img, tile_size=96)  # 20 tiles: a 56-px core in a 20-px halo
    err = np.abs(tiled - full).max() / np.abs(full).max()
    assert err < 1e-4, f"tiles differ from the whole image by {err:.2e} of max|g|"


def test_huge_image_dreams_in_bounded_memory(model_home, tmp_path):
    """4096x4096, one octave, two steps: peak RSS of the whole CLI process under 1.5 GB."""
    big = tmp_path / "big.png"
    rng = np.random.default_rng(0)
    small = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(small).resize((4096, 4096), Image.BICUBIC).save(big)
    out = tmp_path / "big-dream.jpg"
    code = (
        "import resource, subprocess, sys\n"
        "p = subprocess.run(sys.argv[1:])\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(p.returncode)\n"
    )
    import os

    env = {**os.environ, "ONNXDREAM_HOME": str(model_home)}
    proc = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "onnxdream.cli",
                           "dream", str(big), "-o", str(out), "--octaves", "1", "--steps", "2",
                           "-q"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr
    peak_kb = int(proc.stdout.strip().splitlines()[-1])
    assert peak_kb < 1.5 * 1024 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB"
    assert Image.open(out).size == (4096, 4096)


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00trunc"])
def test_bad_input_is_one_line_exit_2_and_no_output(model_home, tmp_path, content):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    out = tmp_path / "never.png"
    proc = run_cli("dream", str(bad), "-o", str(out), home=model_home, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


def test_truncated_photo_is_refused(model_home, tmp_path):
    data = photo("chelsea.png").read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    proc = run_cli("dream", str(cut), "-o", str(tmp_path / "o.png"), home=model_home, check=False)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("args,needle", [
    (["--layer", "blocks.99"], "unknown layer 'blocks.99'; closest: blocks.9"),
    (["--objective", "chanel:3"], "bad objective 'chanel:3'"),
    (["--objective", "channel:5000"], "out of range"),
    (["--model", "efficientnet-lite9"], "efficientnet-lite0"),
    (["--steps", "0"], "--steps must be between"),
    (["-o", "out.gif"], "gif"),
    (["--device", "tpu"], "tpu"),
])
def test_user_errors_are_one_clear_line(model_home, tmp_path, args, needle):
    proc = run_cli("dream", str(photo("chelsea.png")), *(["-o", str(tmp_path / "o.png")]
                   if "-o" not in args else []), *args, home=model_home, check=False,
                   cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert needle.lower() in proc.stderr.lower(), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o.png").exists()


def test_rgba_keeps_alpha(model_home, tmp_path):
    src = Image.open(photo("chelsea.png")).convert("RGBA").resize((120, 80))
    a = np.zeros((80, 120), np.uint8)
    a[:, 60:] = 255
    src.putalpha(Image.fromarray(a))
    path = tmp_path / "rgba.png"
    src.save(path)
    out = tmp_path / "rgba-dream.png"
    run_cli("dream", str(path), "-o", str(out), "--octaves", "1", "--steps", "2", "-q",
            home=model_home)
    got = Image.open(out)
    assert got.mode == "RGBA" and got.size == (120, 80)
    assert np.array_equal(np.asarray(got)[..., 3], a)


def test_models_and_layers_listing(model_home):
    proc = run_cli("models", "--json", home=model_home)
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["efficientnet-lite0"]["default"] and rows["efficientnet-lite0"]["installed"]
    proc = run_cli("layers", "efficientnet-lite0", "--json", home=model_home)
    layers = {r["name"]: r for r in json.loads(proc.stdout)}
    assert list(layers)[:2] == ["stem", "blocks.0"] and "logits" in layers
    assert layers["blocks.5"]["shape"] == [1, 80, 14, 14]
    assert layers["stem"]["op_type"] == "Clip"


def test_corrupt_compiled_graph_is_rebuilt(model_home):
    from onnxdream.runtime.gradient import GradientModel
    from onnxdream.runtime.graph_cache import CompiledCache

    GradientModel("efficientnet-lite0", ["blocks.3"])
    cached = [p for p in CompiledCache().directory.glob("*.onnx")]
    assert cached
    for p in cached:
        p.write_bytes(b"\x00garbage")
    gm = GradientModel("efficientnet-lite0", ["blocks.3"])
    obj, grad = gm(np.random.rand(1, 3, 64, 64).astype(np.float32))
    assert grad.shape == (1, 3, 64, 64) and np.isfinite(grad).all()


def test_border_larger_than_the_layer_is_explained(model_home, tmp_path):
    small = tmp_path / "small.png"
    Image.open(photo("chelsea.png")).resize((64, 48)).save(small)
    proc = run_cli("dream", str(small), "-o", str(tmp_path / "o.png"), "--layer", "blocks.12",
                   "--objective", "l2", "--border", "4", "--octaves", "1", "-q", home=model_home,
                   check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--border 4" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()
