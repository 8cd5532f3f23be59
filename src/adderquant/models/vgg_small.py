"""VGG-Small (Cai et al. 2017), the CIFAR network of the AdderNet papers.

conv 3→128 (conventional) → five 3×3 body layers 128-128-256-256-512-512 with max-pooling after the
2nd, 4th and 6th → linear classifier (conventional). Each body layer is followed by BatchNorm + ReLU.
"""

from __future__ import annotations

from torch import nn

from .layers import body_conv, check_kind


class VGGSmall(nn.Module):
    def __init__(self, num_classes: int = 10, kind: str = "adder"):
        super().__init__()
        check_kind(kind)
        layers: list[nn.Module] = [nn.Conv2d(3, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128),
                                   nn.ReLU(inplace=True)]
        cin = 128
        for i, width in enumerate((128, 256, 256, 512, 512)):
            layers.append(body_conv(kind, cin, width, 3, 1, 1))
            if i % 2 == 0:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512 * 4 * 4, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))
