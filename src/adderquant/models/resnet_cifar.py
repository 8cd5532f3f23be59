"""CIFAR ResNets (20/32/56), layer-for-layer compatible with the official AdderNet ResNet-20.

Layout (the authors' ``resnet20.py``): conv1 3×3 (conventional) → bn1 → ReLU → three stages of
BasicBlocks (16/32/64 channels, stride 2 entering stages 2 and 3) whose 3×3 layers and 1×1
down-sampling shortcuts are adder layers → AvgPool(8) → head. The AdderNet head is a 1×1
convolution without bias followed by BatchNorm (``head="conv_bn"``); ``head="linear"`` gives the
common ``nn.Linear`` head (the APoT checkpoints use it).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import body_conv, check_kind


class BasicBlock(nn.Module):
    def __init__(self, kind: str, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = body_conv(kind, cin, cout, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = body_conv(kind, cout, cout, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(body_conv(kind, cin, cout, 1, stride, 0), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, kind: str = "adder", head: str = "conv_bn"):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if head not in ("conv_bn", "linear"):
            raise ValueError(f"head must be 'conv_bn' or 'linear', got {head!r}")
        check_kind(kind)
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        cin, stages = 16, []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            layers = []
            for i in range(blocks):
                layers.append(BasicBlock(kind, cin, width, stride if i == 0 else 1))
                cin = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = head
        if head == "conv_bn":
            self.fc = nn.Conv2d(64, num_classes, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(num_classes)
        else:
            self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        if self.head == "conv_bn":
            return self.bn2(self.fc(x)).flatten(1)
        return self.fc(x.flatten(1))
