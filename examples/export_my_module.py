"""Export your own PyTorch network as a dreamable model, then dream on it.

    python examples/export_my_module.py my_net.onnx
    onnxdream layers my_net.onnx
    onnxdream dream examples/chelsea.png --model my_net.onnx --layer block2 -o my-dream.png

Needs onnxdream[torch]. The network here has random weights so that the example runs anywhere;
load your trained weights (``net.load_state_dict(torch.load("weights.pt"))``) before exporting
and the dream shows what *your* network has learnt.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from onnxdream.exporters import export_module


class TinyNet(nn.Module):
    """A small classifier: two conv blocks and a linear head over 3 classes."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block2 = nn.Sequential(
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.block2(self.block1(x))).flatten(1))


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "my_net.onnx"
    torch.manual_seed(0)
    net = TinyNet()  # here: net.load_state_dict(torch.load("weights.pt", weights_only=True))
    result = export_module(
        net,
        out,
        name="tinynet",
        preprocess="torch",  # the network was trained on ImageNet mean/std normalised input
        layers=["block1", "block2", "block2.0"],  # module paths, as net.named_modules() names them
        default_layers=["block2"],  # what `dream` uses without --layer
        labels=["cat", "dog", "teapot"],  # one per logit: `predict` and class:K use them
        input_size=64,  # the size it was trained at; the export still runs at any size
        progress=print,
    )
    size = "any size" if result.dynamic_hw else "its native size only"
    print(f"{result.path}: layers {', '.join(result.layers)}; runs at {size}")


if __name__ == "__main__":
    main()
