"""Creative controls (issue 17): guided dreams, region masks, original colours, dreams from
noise, seamless textures — the compiler's terms against torch autograd, the engine's promises
as numbers, the CLI's and the server's front doors."""

from __future__ import annotations

import asyncio
import hashlib
import io

import numpy as np
import onnx
import pytest
from PIL import Image

from helpers import photo, run_cli, tiny_classifier
from onnxdream.exporters.graph import (
    channel,
    compile_features,
    compile_gradient,
    graph_params,
    guide,
    l2,
    mean,
)
from onnxdream.exporters.graph.contract import MASK, STEP_MASK
from onnxdream.media.imageio import load_image, read_png_metadata
from onnxdream.runtime.session import create_session
from onnxdream.settings.build import from_options

LUMA = np.array([0.299, 0.587, 0.114])


def _run(graph: onnx.ModelProto, feeds: dict, outputs=("objective", "grad")):
    return create_session(graph.SerializeToString(), device="cpu", threads=1).run(
        list(outputs), feeds)


# -- the compiler's terms -----------------------------------------------------------------------


def test_guide_and_mask_terms_match_torch_autograd():
    """mean_p max_j <x_p, g_j> (guide) and region-masked mean, l2, channel terms: value and
    input gradient equal torch's float64 autograd; the guide has no default, the mask does."""
    torch = pytest.importorskip("torch")
    from onnx import numpy_helper

    model = tiny_classifier()
    graph = compile_gradient(model, guide("act") + 0.5 * mean("conv") + l2("act")
                             + channel("conv", 2))
    params = graph_params(graph)
    assert params["guide.0"].default is None and params["guide.0"].shape[1] == 4
    assert params[MASK].spatial and params[MASK].default.shape == (1, 1, 1, 1)
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 20, 24), dtype=np.float32)
    g = rng.normal(size=(7, 4)).astype(np.float32)
    mask = rng.random((1, 4, 20, 24), dtype=np.float32)  # one mask per term
    obj, grad = _run(graph, {"image": x, "guide.0": g, MASK: mask})

    w = torch.tensor(numpy_helper.to_array(model.graph.initializer[0]), dtype=torch.float64)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    conv = torch.nn.functional.conv2d(xt, w, padding=1)
    act = torch.relu(conv)
    m = torch.tensor(mask, dtype=torch.float64)
    gt = torch.tensor(g, dtype=torch.float64)
    guided = torch.einsum("mc,ncp->nmp", gt, (act * m[:, 0:1]).reshape(2, 4, -1))
    want = (guided.amax(1).mean(1) + 0.5 * (conv * m[:, 1:2]).mean((1, 2, 3))
            + (act * act * m[:, 2:3]).mean((1, 2, 3)) + (conv * m[:, 3:4])[:, 2].mean((1, 2)))
    want.sum().backward()
    np.testing.assert_allclose(obj, want.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-4, atol=1e-7)
    # one mask for every term broadcasts; the default (ones) is the unmasked objective
    o1, _ = _run(graph, {"image": x, "guide.0": g, MASK: mask[:, :1]})
    o0, _ = _run(graph, {"image": x, "guide.0": g})
    o_plain, _ = _run(compile_gradient(model, guide("act") + 0.5 * mean("conv") + l2("act")
                                       + channel("conv", 2)), {"image": x, "guide.0": g})
    assert not np.allclose(o1, obj) and np.array_equal(o0, o_plain)
    # the features graph reads the layers as the gradient graph does
    feats = create_session(compile_features(model, ["act", "conv"]).SerializeToString(),
                           device="cpu", threads=1).run(None, {"image": x})
    np.testing.assert_allclose(feats[0], act.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats[1], conv.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_region_mask_is_resized_to_the_layer(model_home):
    """On a strided layer (Lite0 blocks.5, stride 16) a mask that is black on the right half
    takes those positions out of the objective: no gradient there beyond the receptive field."""
    from onnxdream.runtime.gradient import GradientModel

    gm = GradientModel("efficientnet-lite0", ["blocks.5"], device="cpu", threads=1)
    x = np.random.default_rng(1).random((1, 3, 128, 256), dtype=np.float32)
    mask = np.zeros((1, 1, 128, 256), np.float32)
    mask[..., :128] = 1
    _, full = gm(x)
    _, half = gm(x, {**gm.params, MASK: mask})
    assert np.abs(half[..., 128 + 96:]).max() == 0  # 96 px: the layer's receptive field
    assert np.abs(half[..., :64]).mean() > 0.3 * np.abs(full[..., :64]).mean()


def test_guide_and_layer_masks_tile_like_the_image(model_home):
    """The tiler passes the guide's features whole and cuts the region masks per tile: with
    halos covering the receptive field, the tiled gradient is the untiled one."""
    from onnxdream.dream.controls import guide_params
    from onnxdream.runtime.gradient import GradientModel

    # one layer: the tiler rescales tiles by one stride's position count
    gm = GradientModel("efficientnet-lite0", guide("blocks.5") + 0.5 * mean("blocks.5"),
                       device="cpu", threads=1)
    rng = np.random.default_rng(5)
    img = rng.random((3, 400, 520), dtype=np.float32)
    yy, xx = np.mgrid[:400, :520] / 520.0  # masks are smooth (a noise mask would alias)
    masks = np.stack([0.5 + 0.5 * np.sin(9 * xx) * np.cos(7 * yy), xx])[None].astype(np.float32)
    params = {**gm.params, **guide_params(gm, rng.random((90, 120, 3), dtype=np.float32)),
              MASK: masks}
    assert params["guide.0"].shape[1] == 80 and "guide.1" not in params
    for shift in [(0, 0), (17, -29)]:
        _, whole = gm.gradient(img, 0, shift, params=params)
        _, tiled = gm.gradient(img, 384, shift, params=params)
        np.testing.assert_allclose(tiled, whole, rtol=1e-3, atol=1e-4 * np.abs(whole).max())


# -- the engine -----------------------------------------------------------------------------------


def _small(name: str, width: int = 224) -> np.ndarray:
    rgb = load_image(photo(name)).rgb
    h = round(rgb.shape[0] * width / rgb.shape[1])
    from onnxdream.media.imageio import resize

    return np.clip(resize(rgb, (h, width)), 0, 1)


def _pooled(gm, rgb: np.ndarray) -> np.ndarray:
    return gm.features(np.ascontiguousarray(rgb.transpose(2, 0, 1)[None]))[0].mean((0, 2, 3))


def _cos(a, b) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("pair", [("chelsea.png", "coffee.png"), ("rocket.jpg", "chelsea.png")])
def test_guided_dream_moves_features_toward_the_guide(model_home, pair):
    """Cosine similarity of the dream's pooled layer features with the guide's: higher guided
    than unguided at the same settings (Python API: Controls + dream(params=...))."""
    from onnxdream.dream.ascent import dream
    from onnxdream.dream.controls import Controls
    from onnxdream.runtime.gradient import GradientModel
    from onnxdream.settings.options import DreamSettings

    src, guide_rgb = _small(pair[0]), _small(pair[1])
    plain = DreamSettings(layers=("blocks.5",), octaves=2, steps=10, seed=0)
    guided = DreamSettings(layers=("blocks.5",), octaves=2, steps=10, seed=0, guide=pair[1])
    assert guided.objective == "guide"
    gm_plain = GradientModel.from_settings(plain, device="cpu", threads=1)
    gm_guided = GradientModel.from_settings(guided, device="cpu", threads=1)
    params = Controls(guide=guide_rgb).params(gm_guided, guided, src.shape[:2])
    assert params["guide.0"].shape[1] == 80 and len(params["guide.0"]) <= 4096
    with pytest.raises(Exception, match="guide"):  # a guided graph needs its guide
        gm_guided(src.transpose(2, 0, 1)[None].copy())
    target = _pooled(gm_plain, guide_rgb)
    cos_plain = _cos(_pooled(gm_plain, np.array(dream(gm_plain, src, plain))), target)
    cos_guided = _cos(_pooled(gm_plain, np.array(dream(gm_guided, src, guided, None, params))),
                      target)
    cos_before = _cos(_pooled(gm_plain, src), target)
    print(f"{pair}: cosine with the guide before {cos_before:.3f}, unguided {cos_plain:.3f}, "
          f"guided {cos_guided:.3f}")
    assert cos_guided > cos_plain + 0.02, (cos_before, cos_plain, cos_guided)


def _mask(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (min(h, w) / 3) ** 2).astype(np.float32)


@pytest.mark.parametrize("tile_size", [0, 96])
def test_mask_keeps_black_pixels(model_home, tile_size):
    """Where the mask is black the photo stays as it was (<= 1/255), untiled and in tiles;
    inside it the dream is as strong as an unmasked dream's."""
    from onnxdream.dream.ascent import dream
    from onnxdream.dream.controls import Controls
    from onnxdream.runtime.gradient import GradientModel
    from onnxdream.settings.options import DreamSettings

    src = _small("chelsea.png", 192)
    h, w = src.shape[:2]
    m = _mask(h, w)
    s = DreamSettings(octaves=3, steps=6, seed=1, tile_size=tile_size, mask="m.png")
    gm = GradientModel.from_settings(s, device="cpu", threads=1)
    params = Controls(mask=m).params(gm, s, (h, w))
    assert params[STEP_MASK].shape == (1, 1, h, w)
    out = np.array(dream(gm, src, s, None, params))
    plain = np.array(dream(gm, src, DreamSettings(octaves=3, steps=6, seed=1,
                                                  tile_size=tile_size)))
    change = np.abs(np.round(out * 255) - np.round(src * 255)).max(-1)
    assert change[m == 0].max() <= 1
    inner = _mask(h, w) * 0
    inner[h // 2 - 15:h // 2 + 15, w // 2 - 15:w // 2 + 15] = 1  # far from the feathered edge
    assert np.abs(out - src)[inner > 0].mean() > 0.6 * np.abs(plain - src)[inner > 0].mean()


def test_step_graph_takes_the_step_mask(model_home):
    """The CUDA loop's step graph (run here on the CPU) multiplies the step by step_mask."""
    from onnxdream.runtime.gradient import GradientModel

    gm = GradientModel("efficientnet-lite0", ["blocks.5"], device="cpu", threads=1)
    img = np.ascontiguousarray(_small("chelsea.png", 128).transpose(2, 0, 1))
    m = _mask(*img.shape[1:])
    for static in (False, True):
        dev = gm.device_ascent()
        dev.static_shapes = static
        out = dev.run(img.copy(), 3, 0.02, iter([(5, -3), (0, 7), (-9, 2)]),
                      params={**gm.params, STEP_MASK: m[None, None]})
        assert np.array_equal(out[:, m == 0], img[:, m == 0])
        assert np.abs(out - img)[:, m > 0].mean() > 0.01


def test_keep_colors_keeps_the_chroma_exactly():
    from onnxdream.dream.controls import keep_colors

    rng = np.random.default_rng(2)
    photo_ = np.round(rng.random((3, 40, 50)) * 255).astype(np.float32) / 255
    dreamed = np.clip(photo_ + rng.normal(0, 0.3, photo_.shape).astype(np.float32), 0, 1)
    out = keep_colors(dreamed, photo_)
    assert out.min() >= 0 and out.max() <= 1 + 1e-6
    chroma = out - (out * LUMA[:, None, None]).sum(0)
    want = photo_ - (photo_ * LUMA[:, None, None]).sum(0)
    np.testing.assert_allclose(chroma, want, atol=1e-6)


# -- the CLI --------------------------------------------------------------------------------------


def _ycc(rgb: np.ndarray) -> np.ndarray:
    y = rgb @ LUMA
    return np.stack([0.564 * (rgb[..., 2] - y), 0.713 * (rgb[..., 0] - y)], -1)


def test_cli_mask_keep_colors_and_provenance(model_home, tmp_path):
    """dream --mask (another size, same shape: resized with a note) --keep-colors: black keeps
    the photo, the chroma is the photo's within 2/255, the PNG records the mask's hash."""
    src = photo("chelsea.png")
    rgb = np.asarray(Image.open(src).convert("RGB"), np.float64)
    h, w = rgb.shape[:2]
    m = _mask(h, w)
    mask_file = tmp_path / "mask.png"
    Image.fromarray((m * 255).astype(np.uint8)).resize((w * 2, h * 2), Image.NEAREST).save(
        mask_file)
    out = tmp_path / "out.png"
    proc = run_cli("dream", str(src), "-o", str(out), "--mask", str(mask_file), "--keep-colors",
                   "--octaves", "2", "--steps", "5", "--seed", "4", "-q", home=model_home)
    assert "resized to the image's 451x300" in proc.stderr
    got = np.asarray(Image.open(out).convert("RGB"), np.float64)
    assert np.abs(got - rgb).max(-1)[m == 0].max() <= 1
    assert np.abs(got - rgb)[m > 0].mean() > 2  # it dreamed inside
    assert np.abs(_ycc(got) - _ycc(rgb)).max() <= 2
    meta = read_png_metadata(out)
    assert meta["onnxdream:mask_sha256"] == hashlib.sha256(mask_file.read_bytes()).hexdigest()
    assert meta["onnxdream:keep_colors"] == "True"
    assert "--mask" in meta["onnxdream:command"] and "--keep-colors" in meta["onnxdream:command"]


def test_cli_mask_layers(model_home, tmp_path):
    """--mask-layers: one mask for two layers; the PNG records its hash."""
    half = tmp_path / "half.png"
    im = np.zeros((300, 451), np.uint8)
    im[:, :225] = 255
    Image.fromarray(im).save(half)
    out = tmp_path / "ml.png"
    run_cli("dream", str(photo("chelsea.png")), "-o", str(out), "-l", "blocks.3", "-l",
            "blocks.5", "--mask-layers", str(half), "--octaves", "1", "--steps", "2", "-q",
            home=model_home)
    meta = read_png_metadata(out)
    assert meta["onnxdream:mask_layers_sha256"] == hashlib.sha256(half.read_bytes()).hexdigest()
    assert meta["onnxdream:mask_layers"] == f'["{half}"]'


def _seam(x: np.ndarray, stride: int = 16) -> list[float]:
    """Wrap-around boundary difference / median of the interior boundaries at the same phase
    of the layer's stride, across columns and rows (1: no seam)."""
    out = []
    for a in (x, x.transpose(1, 0, 2)):
        cols = np.abs(np.diff(np.concatenate([a, a[:, :1]], axis=1), axis=1)).mean(axis=(0, 2))
        n = len(cols)
        out.append(float(cols[-1] / np.median(cols[(n - 1) % stride:n - 1:stride])))
    return out


def test_cli_seamless_texture_from_grey(model_home, tmp_path):
    """dream --init grey --size --seamless (no IMAGE): the result tiled 2x2 has no seam (the
    wrap-around edge differs like interior neighbours); without --seamless it has one."""
    ratios = {}
    for seamless in (True, False):
        out = tmp_path / f"t{seamless}.png"
        run_cli("dream", "--init", "grey", "--size", "128x128", "-o", str(out), "--seed", "1",
                "--steps", "8", "--octaves", "4", "-q", *(["--seamless"] if seamless else []),
                home=model_home)
        img = np.asarray(Image.open(out).convert("RGB"), np.float64)
        assert img.shape == (128, 128, 3)
        ratios[seamless] = _seam(img)
    print("seam ratios (x, y):", ratios)
    assert all(0.75 < r < 1.3 for r in ratios[True]), ratios
    assert max(ratios[False]) > 1.3, ratios
    meta = read_png_metadata(out)
    assert meta["onnxdream:init"] == "grey" and meta["onnxdream:size"] == "128x128"
    assert meta["onnxdream:command"].startswith("onnxdream dream -o ")


@pytest.mark.parametrize("args, needle", [
    (["--guide", "NOTIMAGE"], "guide image"),
    (["--guide", "missing.png"], "does not exist"),
    (["--mask", "WRONGSHAPE"], "another shape"),
    (["--objective", "guide"], "--guide is needed"),
    (["--size", "64x64"], "--size applies to a dream from noise"),
    (["--init", "noise"], "leave IMAGE out"),
    (["-l", "blocks.3", "-l", "blocks.5", "--mask-layers", "SQUARE", "--mask-layers", "SQUARE",
      "--mask-layers", "SQUARE"], "one mask per layer"),
])
def test_cli_bad_control_inputs_are_one_line(model_home, tmp_path, args, needle):
    (tmp_path / "NOTIMAGE").write_text("not an image")
    Image.new("L", (40, 10)).save(tmp_path / "WRONGSHAPE.png")
    Image.new("L", (451, 300), 255).save(tmp_path / "SQUARE.png")
    args = [str(tmp_path / (a + ".png")) if a in ("WRONGSHAPE", "SQUARE") else
            str(tmp_path / a) if a == "NOTIMAGE" else a for a in args]
    proc = run_cli("dream", str(photo("chelsea.png")), "-o", str(tmp_path / "o.png"),
                   "--octaves", "1", "--steps", "1", *args, home=model_home, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o.png").exists()


def test_settings_controls_round_trip():
    from onnxdream.core.errors import SettingsError
    from onnxdream.settings.options import DreamSettings

    s = from_options(guide="g.png", mask="m.png", mask_layers=["a.png", "b.png"],
                                   feather=3, keep_colors=True, seamless=True, seed=5)
    assert s.objective == "guide"
    argv = s.to_argv("photo.jpg", "out.png")
    for flag in ("--guide", "--mask", "--mask-layers", "--feather", "--keep-colors",
                 "--seamless"):
        assert flag in argv
    assert argv.count("--mask-layers") == 2 and "--init" not in argv
    noise = DreamSettings(init="noise", size="320x200")
    assert noise.size == (320, 200) and noise.validate()
    argv = noise.to_argv("IMAGE", "t.png")
    assert argv[:3] == ["dream", "-o", "t.png"] and argv[-4:] == ["--init", "noise", "--size",
                                                                  "320x200"]
    for bad, field in [(dict(guide="g.png", objective="l2"), "objective"),
                       (dict(init="fog"), "init"), (dict(size=(10, 10), init="grey"), "size"),
                       (dict(feather=-1), "feather"), (dict(objective="guide"), "guide")]:
        with pytest.raises(SettingsError) as exc:
            DreamSettings(**bad).validate()
        assert exc.value.field == field


# -- the server -----------------------------------------------------------------------------------


def test_server_control_fields(model_home):
    """guide and mask uploads, keep_colors, init/size without an image; a guide that is not an
    image is a 400 naming it; the PNG records the uploads' hashes."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from onnxdream.server.app import ServerConfig, create_app

    with Image.open(photo("chelsea.png")) as im:
        small = im.convert("RGB").crop((150, 40, 278, 136))
        buf = io.BytesIO()
        small.save(buf, "PNG")
        image = buf.getvalue()
    with Image.open(photo("coffee.png")) as im:
        buf = io.BytesIO()
        im.convert("RGB").resize((120, 80)).save(buf, "PNG")
        guide_png = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray((_mask(96, 128) * 255).astype(np.uint8)).save(buf, "PNG")
    mask_png = buf.getvalue()
    app = create_app(ServerConfig(workers=1, device="cpu"))
    fast = {"steps": "2", "octaves": "1", "seed": "3"}

    async def requests():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://test", timeout=120) as c:
            files = {"image": ("p.png", image, "image/png"),
                     "guide": ("g.png", guide_png, "image/png"),
                     "mask": ("m.png", mask_png, "image/png")}
            return (await c.post("/dream", files=files, data={**fast, "keep_colors": "true"}),
                    await c.post("/dream", files={k: (None, v) for k, v in  # multipart
                                                  {**fast, "init": "noise", "size": "64x48"}
                                                  .items()}),
                    await c.post("/dream", files={"image": ("p.png", image, "image/png"),
                                                  "guide": ("g.txt", b"text", "text/plain")},
                                 data=fast))

    try:
        ok, noise, bad = asyncio.run(requests())
    finally:
        app.state.jobs.stop()
    assert ok.status_code == 200, ok.text
    got = np.asarray(Image.open(io.BytesIO(ok.content)).convert("RGB"), np.float64)
    src = np.asarray(small, np.float64)
    assert np.abs(got - src).max(-1)[_mask(96, 128) == 0].max() <= 1
    assert np.abs(_ycc(got) - _ycc(src)).max() <= 2
    meta = Image.open(io.BytesIO(ok.content)).text
    assert meta["onnxdream:guide_sha256"] == hashlib.sha256(guide_png).hexdigest()
    assert meta["onnxdream:mask_sha256"] == hashlib.sha256(mask_png).hexdigest()
    assert meta["onnxdream:objective"].startswith("1*guide(")
    assert noise.status_code == 200, noise.text
    assert Image.open(io.BytesIO(noise.content)).size == (64, 48)
    assert bad.status_code == 400 and "guide" in bad.json()["error"], bad.text
