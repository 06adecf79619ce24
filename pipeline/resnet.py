"""`resnet`: a ResNet-18/34-style network for 32x32 images (CIFAR layout), split at block boundaries.

Layers: 0 the stem (3x3 conv, BatchNorm, ReLU); then one layer per residual BasicBlock (two 3x3 convs with
BatchNorm, added to an identity shortcut, or to a 1x1 conv + BatchNorm where the block changes stride or
width); last the head (global average pooling, flatten, Linear). Stage k (k = 0..3) has blocks[k] blocks of
width * 2**k channels, the first block of stages 1-3 with stride 2 (32x32 -> 16, 8, 4).

BatchNorm's running statistics are buffers in each layer's state dict: they move with the layer in a swap.
In training mode a BatchNorm layer normalises over the samples it is given, so a split run equals plain
PyTorch only when each forward sees the whole batch (one microbatch per step); evaluation uses eval mode.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

DEPTHS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


def stem(in_channels: int, width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()   # identity
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def head(channels: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


def _layout(depth: int | None, blocks: str | list | None) -> list[int]:
    from pipeline.models import SpecError

    if blocks is not None:
        if depth is not None:
            raise SpecError("resnet takes depth or blocks, not both")
        try:
            counts = [int(b) for b in (blocks.split(",") if isinstance(blocks, str) else blocks)]
        except (TypeError, ValueError):
            counts = []
        if len(counts) != 4 or min(counts) < 1:
            raise SpecError(f"resnet blocks must be 4 positive integers (e.g. '2,2,2,2' or [3, 4, 6, 3]), "
                            f"got {blocks!r}")
        return counts
    depth = 18 if depth is None else depth
    if depth not in DEPTHS:
        raise SpecError(f"resnet depth must be one of {sorted(DEPTHS)}, got {depth!r}")
    return DEPTHS[depth]


def resnet(depth: int | None = None, width: int = 16, classes: int = 10, in_channels: int = 3,
           blocks: str | list | None = None) -> list:
    """Options:
    depth: 18 (blocks 2,2,2,2: ResNet-18's layout) or 34 (3,4,6,3: ResNet-34's); default 18.
    blocks: instead of depth, the blocks per stage, 4 positive integers ("2,2,2,2" or a list; from the
        command line use depth, as --model-options splits on commas).
    width: channels of the stem and of stage 0, doubled at each later stage (ResNet proper: 64; 16 here).
    classes: outputs of the final Linear layer.
    in_channels: channels of the input images, (N, in_channels, 32, 32) float32.
    The model has 1 + sum(blocks) + 1 layers: stem, one per block, head."""
    from pipeline.models import SpecError

    counts = _layout(depth, blocks)
    if min(width, classes, in_channels) < 1:
        raise SpecError(f"resnet needs width, classes and in_channels >= 1, got {width}, {classes}, {in_channels}")
    layers = [lambda: stem(in_channels, width)]
    cin = width
    for k, count in enumerate(counts):
        cout = width * 2 ** k
        for b in range(count):
            stride = 2 if k > 0 and b == 0 else 1
            layers.append(lambda cin=cin, cout=cout, stride=stride: BasicBlock(cin, cout, stride))
            cin = cout
    layers.append(lambda c=cin: head(c, classes))
    return layers


def resnet_input_shape(options: dict) -> tuple[int, int, int]:
    """One sample's shape: (in_channels, 32, 32)."""
    return (options.get("in_channels", 3), 32, 32)
