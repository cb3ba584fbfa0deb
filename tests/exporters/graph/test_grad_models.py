"""The compiled gradient of real torchvision architectures equals torch autograd.

Random weights (no downloads); BatchNorm layers get non-trivial running statistics so that the
exporter's BN folding is really exercised. Odd sizes where the model allows them.
"""

from __future__ import annotations

import pytest
import torch

from gradcheck import compare

CASES = [
    ("googlenet", "inception4c", (179, 211)),
    ("inception_v3", "Mixed_6b", (179, 211)),
    ("vgg16", "features.22", (179, 211)),
    ("resnet50", "layer3", (179, 211)),
    ("alexnet", "features.10", (179, 211)),
    ("squeezenet1_1", "features.9", (179, 211)),
    ("mobilenet_v3_large", "features.12", (179, 211)),
    ("efficientnet_b0", "features.5", (179, 211)),
    ("convnext_tiny", "features.5", (179, 211)),
    ("vit_b_16", "encoder.layers.encoder_layer_6", (224, 224)),
]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def random_model(name: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            elif isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
                # with the default (1, 0) the mean of its output is a constant
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def layer_output(model: torch.nn.Module, layer: str):
    """x in [0,1] → the layer's output, ImageNet normalisation in front (as in the export)."""
    captured = {}
    dict(model.named_modules())[layer].register_forward_hook(
        lambda mod, inp, out: captured.__setitem__("out", out))

    def run(x):
        model((x - MEAN) / STD)
        return captured["out"]

    return run


@pytest.mark.parametrize("name,layer,size", CASES, ids=[c[0] for c in CASES])
def test_compiled_gradient_equals_autograd(tmp_path, name, layer, size):
    import onnx

    from onnxdream.exporters import export_torchvision

    model = random_model(name)
    result = export_torchvision(name, tmp_path / f"{name}.onnx", "none", module=model)
    onnx_model = onnx.load(str(result.path))
    for m in model.modules():  # the exporter turned in-place activations off; keep it so
        if hasattr(m, "inplace"):
            m.inplace = False
    err = compare(None, [size], objective="mean", layers=[layer], batch=1, model=onnx_model,
                  torch_fn=layer_output(model, layer))
    assert err < 1e-4, f"{name}/{layer}: relative error {err:.2e}"
