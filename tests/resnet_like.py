"""A resnet18-like user module (conv-bn-relu basic blocks) for tests and the advice examples."""

import torch
from torch import nn


class BasicBlock(nn.Module):
    """conv-bn-relu, conv-bn, plus the (downsampled) input, relu."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.down = None
        if stride != 1 or in_channels != out_channels:
            self.down = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                      nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.down is None else self.down(x)
        return self.relu(out + skip)


class ResNetLike(nn.Module):
    """ResNet-18's layout: a stem, four stages of two basic blocks, pooling and a classifier."""

    def __init__(self, widths=(64, 128, 256, 512), classes=1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        blocks, channels = [], widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks += [BasicBlock(channels, width, stride), BasicBlock(width, width)]
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def resnet_like_graph(batch=1, size=224):
    """The cachefit graph of `ResNetLike` for a `batch` of `size`×`size` images (fp32)."""
    import cachefit

    torch.manual_seed(0)
    return cachefit.graphs.from_torch(ResNetLike().eval(), (torch.randn(batch, 3, size, size),))
