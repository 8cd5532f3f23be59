"""ImageNet ResNet-18/50 in the AdderNet layout: 7×7 stem and classifier conventional, every layer
inside the residual stages (3×3, 1×1 and the down-sampling shortcuts) an adder layer. The head is a
1×1 convolution + BatchNorm as in the authors' ImageNet models."""

from __future__ import annotations

from torch import nn

from .layers import body_conv, check_kind


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, kind, cin, width, stride, downsample):
        super().__init__()
        self.conv1, self.bn1 = body_conv(kind, cin, width, 3, stride, 1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = body_conv(kind, width, width, 3, 1, 1), nn.BatchNorm2d(width)
        self.relu, self.downsample = nn.ReLU(inplace=True), downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, kind, cin, width, stride, downsample):
        super().__init__()
        self.conv1, self.bn1 = body_conv(kind, cin, width, 1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = body_conv(kind, width, width, 3, stride, 1), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = body_conv(kind, width, width * 4, 1), nn.BatchNorm2d(width * 4)
        self.relu, self.downsample = nn.ReLU(inplace=True), downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ImageNetResNet(nn.Module):
    def __init__(self, block, counts, num_classes=1000, kind="adder"):
        super().__init__()
        check_kind(kind)
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin, stages = 64, []
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), counts, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                s = stride if j == 0 else 1
                down = None
                if j == 0 and (s != 1 or cin != width * block.expansion):
                    down = nn.Sequential(body_conv(kind, cin, width * block.expansion, 1, s),
                                         nn.BatchNorm2d(width * block.expansion))
                blocks.append(block(kind, cin, width, s, down))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(cin, num_classes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.bn2(self.fc(self.avgpool(x))).flatten(1)
