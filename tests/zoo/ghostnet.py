"""GhostNet (V1) and GhostNetV3 (re-parameterizable branches, DFC attention).

Patterns reproduced (read in huggingface/pytorch-image-models ``timm/models/ghostnet.py`` and
``timm/layers/activations.py``): a ghost module that concatenates a primary conv with a cheap depthwise conv of
its own output and trims with ``out[:, :self.out_chs, :, :]`` (the concatenation is wider than ``out_chs``
when ``ceil(out / ratio)`` rounds up), a hard-sigmoid SE ``F.relu6(x + 3.) / 6.``, ``x += self.shortcut(shortcut)``
with an empty ``nn.Sequential()`` as identity shortcut; V3's training-time form: ``x1 = 0`` then
``x1 += conv(x)`` over a ModuleList of conv+BN branches (the first ``+=`` on an int, then in place on a tensor),
a BN skip and a 1x1 scale branch, and the DFC attention branch ``F.avg_pool2d(x, 2, 2)`` -> (1,5)/(5,1)
depthwise convs -> ``F.interpolate(sigmoid(res), size=out.shape[-2:], mode='nearest')`` on odd sizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._base import ZooModel, seeded


def hard_sigmoid(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    if inplace:
        return x.add_(3.0).clamp_(0.0, 6.0).div_(6.0)
    return F.relu6(x + 3.0) / 6.0


class SqueezeExcite(nn.Module):
    def __init__(self, in_chs: int, se_ratio: float = 0.25, divisor: int = 4) -> None:
        super().__init__()
        reduced_chs = max(divisor, int(in_chs * se_ratio + divisor / 2) // divisor * divisor)
        self.conv_reduce = nn.Conv2d(in_chs, reduced_chs, 1, bias=True)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced_chs, in_chs, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = self.conv_reduce(x.mean((2, 3), keepdim=True))
        x_se = self.conv_expand(self.act1(x_se))
        return x * hard_sigmoid(x_se)


class GhostModule(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, ratio: int = 2, dw_size: int = 3,
                 stride: int = 1, use_act: bool = True) -> None:
        super().__init__()
        self.out_chs = out_chs
        init_chs = math.ceil(out_chs / ratio)
        new_chs = init_chs * (ratio - 1)
        self.primary_conv = nn.Sequential(
            nn.Conv2d(in_chs, init_chs, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(init_chs),
            nn.ReLU(inplace=True) if use_act else nn.Identity())
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_chs, new_chs, dw_size, 1, dw_size // 2, groups=init_chs, bias=False),
            nn.BatchNorm2d(new_chs),
            nn.ReLU(inplace=True) if use_act else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)
        return out[:, :self.out_chs, :, :]


class GhostBottleneck(nn.Module):
    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, dw_kernel_size: int = 3, stride: int = 1,
                 se_ratio: float = 0.0) -> None:
        super().__init__()
        self.stride = stride
        self.ghost1 = GhostModule(in_chs, mid_chs, use_act=True)
        if self.stride > 1:
            self.conv_dw = nn.Conv2d(mid_chs, mid_chs, dw_kernel_size, stride=stride, padding=(dw_kernel_size - 1) // 2,
                                     groups=mid_chs, bias=False)
            self.bn_dw = nn.BatchNorm2d(mid_chs)
        else:
            self.conv_dw = None
            self.bn_dw = None
        self.se = SqueezeExcite(mid_chs, se_ratio) if se_ratio > 0.0 else None
        self.ghost2 = GhostModule(mid_chs, out_chs, use_act=False)
        if in_chs == out_chs and self.stride == 1:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, in_chs, dw_kernel_size, stride=stride, padding=(dw_kernel_size - 1) // 2,
                          groups=in_chs, bias=False),
                nn.BatchNorm2d(in_chs),
                nn.Conv2d(in_chs, out_chs, 1, stride=1, padding=0, bias=False),
                nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.ghost1(x)
        if self.conv_dw is not None:
            x = self.conv_dw(x)
            x = self.bn_dw(x)
        if self.se is not None:
            x = self.se(x)
        x = self.ghost2(x)
        x += self.shortcut(shortcut)
        return x


class GhostNet(nn.Module):
    # k, mid, out, se_ratio, stride
    cfgs = ((3, 16, 16, 0.0, 1), (3, 24, 15, 0.0, 2), (5, 36, 15, 0.25, 1), (5, 40, 24, 0.25, 2))

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 16, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = nn.ReLU(inplace=True)
        blocks, cin = [], 16
        for k, mid, out, se, s in self.cfgs:
            blocks.append(nn.Sequential(GhostBottleneck(cin, mid, out, k, s, se_ratio=se)))
            cin = out
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = nn.Conv2d(cin, 64, 1, 1, 0, bias=True)
        self.act2 = nn.ReLU(inplace=True)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        x = self.act2(self.conv_head(x))
        return self.classifier(x.flatten(1))


# ---------------------------------------------------------------- GhostNetV3
class ConvBn(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class GhostModuleV3(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, ratio: int = 2, dw_size: int = 3,
                 stride: int = 1, use_act: bool = True, mode: str = "original", num_conv_branches: int = 3) -> None:
        super().__init__()
        self.gate_fn = nn.Sigmoid()
        self.out_chs = out_chs
        self.mode = mode
        init_chs = math.ceil(out_chs / ratio)
        new_chs = init_chs * (ratio - 1)
        self.primary_rpr_skip = nn.BatchNorm2d(in_chs) if in_chs == init_chs and stride == 1 else None
        self.primary_rpr_conv = nn.ModuleList([ConvBn(in_chs, init_chs, kernel_size, stride) for _ in range(num_conv_branches)])
        self.primary_rpr_scale = ConvBn(in_chs, init_chs, 1, stride) if kernel_size > 1 else None
        self.primary_activation = nn.ReLU(inplace=True) if use_act else nn.Identity()
        self.cheap_rpr_skip = nn.BatchNorm2d(init_chs)
        self.cheap_rpr_conv = nn.ModuleList([ConvBn(init_chs, new_chs, dw_size, 1, groups=init_chs) for _ in range(num_conv_branches)])
        self.cheap_rpr_scale = ConvBn(init_chs, new_chs, 1, 1, groups=init_chs)
        self.cheap_activation = nn.ReLU(inplace=True) if use_act else nn.Identity()
        self.short_conv = nn.Sequential(
            nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False), nn.BatchNorm2d(out_chs),
            nn.Conv2d(out_chs, out_chs, kernel_size=(1, 5), stride=1, padding=(0, 2), groups=out_chs, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.Conv2d(out_chs, out_chs, kernel_size=(5, 1), stride=1, padding=(2, 0), groups=out_chs, bias=False),
            nn.BatchNorm2d(out_chs)) if mode == "shortcut" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = 0
        for primary_rpr_conv in self.primary_rpr_conv:
            x1 += primary_rpr_conv(x)
        if self.primary_rpr_scale is not None:
            x1 += self.primary_rpr_scale(x)
        if self.primary_rpr_skip is not None:
            x1 += self.primary_rpr_skip(x)
        x1 = self.primary_activation(x1)
        x2 = self.cheap_rpr_scale(x1) + self.cheap_rpr_skip(x1)
        for cheap_rpr_conv in self.cheap_rpr_conv:
            x2 += cheap_rpr_conv(x1)
        x2 = self.cheap_activation(x2)
        out = torch.cat([x1, x2], dim=1)
        if self.mode not in ["shortcut"]:
            return out[:, :self.out_chs, :, :]
        res = self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2))
        return out[:, :self.out_chs, :, :] * F.interpolate(self.gate_fn(res), size=(out.shape[-2], out.shape[-1]), mode="nearest")


class GhostBottleneckV3(nn.Module):
    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, dw_kernel_size: int = 3, stride: int = 1,
                 mode: str = "original") -> None:
        super().__init__()
        self.stride = stride
        self.ghost1 = GhostModuleV3(in_chs, mid_chs, use_act=True, mode=mode)
        if stride > 1:
            self.dw_rpr_scale = ConvBn(mid_chs, mid_chs, 1, stride, groups=mid_chs)
            self.dw_rpr_conv = nn.ModuleList([ConvBn(mid_chs, mid_chs, dw_kernel_size, stride, groups=mid_chs) for _ in range(3)])
        self.ghost2 = GhostModuleV3(mid_chs, out_chs, use_act=False)
        if in_chs == out_chs and stride == 1:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(ConvBn(in_chs, in_chs, dw_kernel_size, stride, groups=in_chs), ConvBn(in_chs, out_chs, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.ghost1(x)
        if self.stride > 1:
            x1 = self.dw_rpr_scale(x)
            for dw_rpr_conv in self.dw_rpr_conv:
                x1 += dw_rpr_conv(x)
            x = x1
        x = self.ghost2(x)
        x += self.shortcut(shortcut)
        return x


class GhostNetV3(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 16, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = nn.ReLU(inplace=True)
        self.blocks = nn.Sequential(
            GhostBottleneckV3(16, 16, 16, 3, 1),
            GhostBottleneckV3(16, 24, 15, 3, 2, mode="shortcut"),
            GhostBottleneckV3(15, 30, 15, 5, 1, mode="shortcut"))
        self.classifier = nn.Linear(15, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act1(self.bn1(self.conv_stem(x))))
        return self.classifier(x.mean((2, 3)))


ENTRIES = (
    ZooModel("ghostnet", "GhostNet (ghost modules)", seeded(GhostNet, 401), (2, 3, 48, 48),
             "torch.cat([primary, cheap dw of primary]) then out[:, :out_chs] trim (16 -> 15); hard-sigmoid SE; x += self.shortcut(shortcut) with empty Sequential identity"),
    ZooModel("ghostnetv3", "GhostNetV3 (re-parameterizable branches, DFC attention)", seeded(GhostNetV3, 402), (2, 3, 50, 50),
             "x1 = 0; x1 += branch(x) over a ModuleList (int then in-place tensor adds); BN skip + 1x1 scale branches; avg_pool2d -> (1,5)/(5,1) dw convs -> F.interpolate(nearest, size=out.shape[-2:]) gate on odd sizes"),
)
