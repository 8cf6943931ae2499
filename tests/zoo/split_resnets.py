"""ResNets that split channels inside the block: Res2Net (hierarchical scales) and ResNeSt (split attention).

Patterns reproduced (read in huggingface/pytorch-image-models ``timm/models/res2net.py``, ``timm/models/resnest.py``,
``timm/layers/split_attn.py`` and zhanghang1989/ResNeSt ``resnest/torch/models/splat.py``): ``torch.split(out,
self.width, 1)`` into scales, a loop where each scale adds the previous scale's output (``sp = sp + spx[i]``)
except in the first block of a stage, which instead average-pools the last split (``AvgPool2d(3, stride,
padding=1)``, count_include_pad); ``torch.cat(spo, 1)``; ResNeSt's grouped conv with ``groups * radix``,
``gap = sum(splited)`` (Python's builtin ``sum`` starting from the int 0), ``F.adaptive_avg_pool2d(gap, 1)``,
the radix softmax ``x.view(batch, cardinality, radix, -1).transpose(1, 2)``, and
``out = sum([att * split for (att, split) in zip(attens, splited)])``; ``avd`` average-pool downsampling
after the split-attention conv and an ``avg_down`` shortcut.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._base import ZooModel, seeded


class Bottle2neck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 base_width: int = 26, scale: int = 4) -> None:
        super().__init__()
        self.scale = scale
        self.is_first = stride > 1 or downsample is not None
        self.num_scales = max(1, scale - 1)
        width = int(math.floor(planes * (base_width / 64.0)))
        self.width = width
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width * scale, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList([nn.Conv2d(width, width, 3, stride, padding=1, bias=False) for _ in range(self.num_scales)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(width) for _ in range(self.num_scales)])
        self.pool = nn.AvgPool2d(kernel_size=3, stride=stride, padding=1) if self.is_first else None
        self.conv3 = nn.Conv2d(width * scale, outplanes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        out = self.relu(self.bn1(self.conv1(x)))
        spx = torch.split(out, self.width, 1)
        spo = []
        sp = spx[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            if i == 0 or self.is_first:
                sp = spx[i]
            else:
                sp = sp + spx[i]
            sp = conv(sp)
            sp = bn(sp)
            sp = self.relu(sp)
            spo.append(sp)
        if self.scale > 1:
            if self.pool is not None:
                spo.append(self.pool(spx[-1]))
            else:
                spo.append(spx[-1])
        out = torch.cat(spo, 1)
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            shortcut = self.downsample(x)
        out += shortcut
        return self.relu(out)


class RSoftMax(nn.Module):
    def __init__(self, radix: int, cardinality: int) -> None:
        super().__init__()
        self.radix = radix
        self.cardinality = cardinality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.size(0)
        if self.radix > 1:
            x = x.view(batch, self.cardinality, self.radix, -1).transpose(1, 2)
            x = F.softmax(x, dim=1)
            x = x.reshape(batch, -1)
        else:
            x = torch.sigmoid(x)
        return x


class SplAtConv2d(nn.Module):
    def __init__(self, in_channels: int, channels: int, kernel_size: int, stride: int = 1, padding: int = 1,
                 groups: int = 1, radix: int = 2, reduction_factor: int = 4) -> None:
        super().__init__()
        inter_channels = max(in_channels * radix // reduction_factor, 8)
        self.radix = radix
        self.cardinality = groups
        self.conv = nn.Conv2d(in_channels, channels * radix, kernel_size, stride, padding, groups=groups * radix, bias=False)
        self.bn0 = nn.BatchNorm2d(channels * radix)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(channels, inter_channels, 1, groups=self.cardinality)
        self.bn1 = nn.BatchNorm2d(inter_channels)
        self.fc2 = nn.Conv2d(inter_channels, channels * radix, 1, groups=self.cardinality)
        self.rsoftmax = RSoftMax(radix, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.bn0(x)
        x = self.relu(x)
        batch, rchannel = x.shape[:2]
        if self.radix > 1:
            splited = torch.split(x, rchannel // self.radix, dim=1)
            gap = sum(splited)
        else:
            gap = x
        gap = F.adaptive_avg_pool2d(gap, 1)
        gap = self.relu(self.bn1(self.fc1(gap)))
        atten = self.fc2(gap)
        atten = self.rsoftmax(atten).view(batch, -1, 1, 1)
        if self.radix > 1:
            attens = torch.split(atten, rchannel // self.radix, dim=1)
            out = sum([att * split for (att, split) in zip(attens, splited)])
        else:
            out = atten * x
        return out.contiguous()


class ResNestBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        group_width = planes
        self.conv1 = nn.Conv2d(inplanes, group_width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(group_width)
        self.avd = stride > 1
        if self.avd:
            self.avd_layer = nn.AvgPool2d(3, stride, padding=1)
            stride = 1
        self.conv2 = SplAtConv2d(group_width, group_width, kernel_size=3, stride=stride, padding=1, groups=2, radix=2)
        self.conv3 = nn.Conv2d(group_width, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        if self.avd:
            out = self.avd_layer(out)
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class SplitResNet(nn.Module):
    def __init__(self, block: type[nn.Module], widths: tuple[int, ...] = (4, 8, 8), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 16
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            if block is ResNestBottleneck:  # avg_down shortcut
                down = nn.Sequential(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                                     nn.Conv2d(cin, w * 4, 1, bias=False), nn.BatchNorm2d(w * 4))
            else:
                down = nn.Sequential(nn.Conv2d(cin, w * 4, 1, stride, bias=False), nn.BatchNorm2d(w * 4))
            layers += [block(cin, w, stride, down), block(w * 4, w)]
            cin = w * 4
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def res2net() -> nn.Module:
    return SplitResNet(Bottle2neck, widths=(8, 12, 16))


def resnest() -> nn.Module:
    return SplitResNet(ResNestBottleneck)


ENTRIES = (
    ZooModel("res2net", "Res2Net (hierarchical multi-scale bottleneck)", seeded(res2net, 601), (2, 3, 50, 50),
             "torch.split(out, width, 1); sp = sp + spx[i] loop over ModuleList pairs; AvgPool2d(3, s, padding=1) on the last split in first blocks; torch.cat(spo, 1); out += shortcut"),
    ZooModel("resnest", "ResNeSt (split attention)", seeded(resnest, 602), (2, 3, 50, 50),
             "grouped conv groups*radix; gap = sum(splited) (builtin sum from int 0); radix softmax view/transpose; out = sum([att * split ...]); avd AvgPool2d; avg_down ceil_mode shortcut"),
)
