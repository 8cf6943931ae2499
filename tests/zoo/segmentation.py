"""Segmentation networks built on dilated convolutions: ESPNet and DeepLabV2, and YOLOv3's Darknet backbone.

Patterns reproduced (read in sacmehta/ESPNet ``train/Model.py``, kazuto1011/deeplab-pytorch
``libs/models/deeplabv2.py`` and ``resnet.py``, and eriklindernoren/PyTorch-YOLOv3's Darknet config):

* ESPNet: ``CBR`` (conv, ``BatchNorm2d(eps=1e-3)``, ``nn.PReLU(n_out)``), ``BR`` (BN + PReLU), ``C`` and
  ``CDilated`` (a bare conv of padding ``((k - 1) // 2) * d``); the ESP module reduces with a 1x1, runs 3x3 convs of
  dilations 1, 2, 4, 8 and 16 on the one reduced map, fuses them hierarchically (``add2 = add1 + d4``,
  ``add3 = add2 + d8``: sums of dilated convs of one input), concatenates all five, adds the input back and ends
  with ``BR``; the input image is average-pooled (``InputProjectionA``) and concatenated back in.
* DeepLabV2: a ResNet stem (7x7 conv, ``_BatchNorm`` with ``eps=1e-5, momentum=1 - 0.999``, ReLU, a ceil-mode
  max pool), a bottleneck whose 3x3 has ``dilation`` and ``padding`` equal, and ``_ASPP``, whose ``c0`` .. ``c3``
  are biased 3x3 convs of rates 6, 12, 18, 24 added with ``sum([stage(x) for stage in self.children()])``.
* Darknet-53 (YOLOv3): conv + ``BatchNorm2d(momentum=0.01, eps=1e-5)`` + ``nn.LeakyReLU(0.1)`` everywhere,
  stride-2 3x3 convs to downsample, residual blocks of a 1x1 halving the channels and a 3x3 restoring them,
  ``x = x + self.block(x)``, and a route that concatenates an upsampled map with an earlier one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import ZooModel, seeded


class CBR(nn.Module):
    def __init__(self, n_in: int, n_out: int, k: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, (k, k), stride=stride, padding=((k - 1) // 2, (k - 1) // 2), bias=False)
        self.bn = nn.BatchNorm2d(n_out, eps=1e-03)
        self.act = nn.PReLU(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class BR(nn.Module):
    def __init__(self, n_out: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(n_out, eps=1e-03)
        self.act = nn.PReLU(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))


class C(nn.Module):
    def __init__(self, n_in: int, n_out: int, k: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, (k, k), stride=stride, padding=((k - 1) // 2, (k - 1) // 2), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class CDilated(nn.Module):
    def __init__(self, n_in: int, n_out: int, k: int, stride: int = 1, d: int = 1) -> None:
        super().__init__()
        pad = ((k - 1) // 2) * d
        self.conv = nn.Conv2d(n_in, n_out, (k, k), stride=stride, padding=(pad, pad), bias=False, dilation=d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DilatedParallelResidualBlockB(nn.Module):
    """The ESP module: reduce, split into five dilated branches, fuse them hierarchically, merge."""

    def __init__(self, n_in: int, n_out: int, add: bool = True) -> None:
        super().__init__()
        n = n_out // 5
        n1 = n_out - 4 * n
        self.c1 = C(n_in, n, 1, 1)
        self.d1 = CDilated(n, n1, 3, 1, 1)
        self.d2 = CDilated(n, n, 3, 1, 2)
        self.d4 = CDilated(n, n, 3, 1, 4)
        self.d8 = CDilated(n, n, 3, 1, 8)
        self.d16 = CDilated(n, n, 3, 1, 16)
        self.bn = BR(n_out)
        self.add = add

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the public code's name
        output1 = self.c1(input)
        d1 = self.d1(output1)
        d2 = self.d2(output1)
        d4 = self.d4(output1)
        d8 = self.d8(output1)
        d16 = self.d16(output1)
        add1 = d2
        add2 = add1 + d4
        add3 = add2 + d8
        add4 = add3 + d16
        combine = torch.cat([d1, add1, add2, add3, add4], 1)
        if self.add:
            combine = input + combine
        return self.bn(combine)


class InputProjectionA(nn.Module):
    def __init__(self, sampling_times: int) -> None:
        super().__init__()
        self.pool = nn.ModuleList(nn.AvgPool2d(3, stride=2, padding=1) for _ in range(sampling_times))

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        for pool in self.pool:
            input = pool(input)
        return input


class ESPNetEncoder(nn.Module):
    def __init__(self, classes: int = 5, p: int = 1) -> None:
        super().__init__()
        self.level1 = CBR(3, 16, 3, 2)
        self.sample1 = InputProjectionA(1)
        self.sample2 = InputProjectionA(2)
        self.b1 = BR(16 + 3)
        self.level2_0 = CBR(16 + 3, 32, 3, 2)
        self.level2 = nn.ModuleList(DilatedParallelResidualBlockB(32, 32) for _ in range(p))
        self.b2 = BR(64 + 3)
        self.classifier = C(64 + 3, classes, 1, 1)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        output0 = self.level1(input)
        inp1 = self.sample1(input)
        inp2 = self.sample2(input)
        output0_cat = self.b1(torch.cat([output0, inp1], 1))
        output1_0 = self.level2_0(output0_cat)
        output1 = output1_0
        for layer in self.level2:
            output1 = layer(output1)
        output1_cat = self.b2(torch.cat([output1, output1_0, inp2], 1))
        return self.classifier(output1_cat)


class _ASPP(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        for i, rate in enumerate(rates):
            self.add_module(f"c{i}", nn.Conv2d(in_ch, out_ch, 3, 1, padding=rate, dilation=rate, bias=True))
        for m in self.children():
            nn.init.normal_(m.weight, mean=0, std=0.01)
            nn.init.constant_(m.bias, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum([stage(x) for stage in self.children()])


class _ConvBnReLU(nn.Sequential):
    BATCH_NORM = nn.BatchNorm2d

    def __init__(self, in_ch: int, out_ch: int, k: int, s: int, p: int, d: int, relu: bool = True) -> None:
        super().__init__()
        self.add_module("conv", nn.Conv2d(in_ch, out_ch, k, s, p, d, bias=False))
        self.add_module("bn", self.BATCH_NORM(out_ch, eps=1e-5, momentum=1 - 0.999))
        if relu:
            self.add_module("relu", nn.ReLU())


class _Bottleneck(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, dilation: int, downsample: bool) -> None:
        super().__init__()
        mid_ch = out_ch // 4
        self.reduce = _ConvBnReLU(in_ch, mid_ch, 1, stride, 0, 1, True)
        self.conv3x3 = _ConvBnReLU(mid_ch, mid_ch, 3, 1, dilation, dilation, True)
        self.increase = _ConvBnReLU(mid_ch, out_ch, 1, 1, 0, 1, False)
        self.shortcut = _ConvBnReLU(in_ch, out_ch, 1, stride, 0, 1, False) if downsample else (lambda x: x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.reduce(x)
        h = self.conv3x3(h)
        h = self.increase(h)
        h += self.shortcut(x)
        return F.relu(h)


class _Stem(nn.Sequential):
    def __init__(self, out_ch: int) -> None:
        super().__init__()
        self.add_module("conv1", _ConvBnReLU(3, out_ch, 7, 2, 3, 1))
        self.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))


class DeepLabV2(nn.Sequential):
    def __init__(self, n_classes: int = 5, rates: tuple[int, ...] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.add_module("layer1", _Stem(16))
        self.add_module("layer2", _Bottleneck(16, 32, 1, 1, True))
        self.add_module("layer3", _Bottleneck(32, 32, 1, 2, False))
        self.add_module("aspp", _ASPP(32, n_classes, rates))


class DarknetConv(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, bias=False),
            nn.BatchNorm2d(c_out, momentum=0.01, eps=1e-5),
            nn.LeakyReLU(0.1),
        )


class DarknetResidual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.block = nn.Sequential(DarknetConv(c, c // 2, 1), DarknetConv(c // 2, c, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Darknet(nn.Module):
    """Darknet-53's stages at small width, and a YOLOv3 route: upsample the deepest map and concatenate."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        w = width
        self.stem = DarknetConv(3, w, 3)
        self.stage1 = nn.Sequential(DarknetConv(w, 2 * w, 3, 2), DarknetResidual(2 * w))
        self.stage2 = nn.Sequential(DarknetConv(2 * w, 4 * w, 3, 2), *[DarknetResidual(4 * w) for _ in range(2)])
        self.stage3 = nn.Sequential(DarknetConv(4 * w, 8 * w, 3, 2), DarknetResidual(8 * w))
        self.lateral = DarknetConv(8 * w, 2 * w, 1)
        self.head = nn.Sequential(DarknetConv(6 * w, 4 * w, 3), nn.Conv2d(4 * w, 3 * (5 + 2), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.stem(x))
        route = self.stage2(x)
        deep = self.stage3(route)
        up = F.interpolate(self.lateral(deep), scale_factor=2, mode="nearest")
        return self.head(torch.cat([up, route], 1))


ENTRIES = (
    ZooModel("espnet", "ESPNet encoder (ESP modules: hierarchical sums of dilated convs, PReLU)",
             seeded(ESPNetEncoder, 1101), (2, 3, 48, 48),
             "five dilated 3x3 convs of one map summed hierarchically (add2 = add1 + d4) then concatenated; input + combine; "
             "BatchNorm2d(eps=1e-3) + nn.PReLU(n) after concats; AvgPool2d input projections concatenated back"),
    ZooModel("deeplabv2", "DeepLabV2 (dilated ResNet, ASPP of rates 6-24 summed)", seeded(DeepLabV2, 1102), (1, 3, 64, 64),
             "sum([stage(x) for stage in self.children()]) of biased 3x3 convs of rates 6, 12, 18, 24 (one dense 49x49 "
             "if merged); bottleneck h += shortcut(x) with a lambda shortcut; ceil-mode max pool; BN momentum 1 - 0.999"),
    ZooModel("darknet", "Darknet-53 / YOLOv3 (LeakyReLU(0.1), residual 1x1-3x3, route)", seeded(Darknet, 1103), (2, 3, 64, 64),
             "conv + BatchNorm2d(momentum=0.01) + nn.LeakyReLU(0.1); x + self.block(x); stride-2 3x3 downsampling; "
             "F.interpolate(scale_factor=2) then torch.cat route"),
)
