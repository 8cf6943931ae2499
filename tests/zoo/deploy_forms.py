"""Networks trained with branches their own code folds at deploy time: VanillaNet and SLaK.

Patterns reproduced (read in huawei-noah/VanillaNet ``models/vanillanet.py`` and VITA-Group/SLaK
``models/SLaK.py``).  VanillaNet: an ``activation`` that subclasses ``nn.ReLU``, holds its depthwise kernel as a bare
``nn.Parameter`` and runs ``self.bn(F.conv2d(super().forward(x), self.weight, self.bias, padding=..., groups=dim))``;
blocks of 1x1 conv-BN, ``F.leaky_relu(x, self.act_learn)``, 1x1 conv-BN, ``MaxPool2d``; a 4x4 stride-4 stem; a head of
pool, dropout, 1x1 conv-BN, leaky ReLU, 1x1 conv and ``x.view(x.size(0), -1)``.  ``act_learn`` is annealed from 0 to 1
during training (``change_act``); at 1 the leaky ReLU is the identity and VanillaNet's deploy code merges each
pair of 1x1 convs.  SLaK: the decomposed large kernel ``out = self.LoRA1(inputs) + self.LoRA2(inputs)`` (a
``(K, s)`` and an ``(s, K)`` depthwise conv-BN) then ``if hasattr(self, 'small_conv'): out += self.small_conv(inputs)``
(an ``s x s`` one); ConvNeXt-style blocks (``permute(0, 2, 3, 1)``, LayerNorm, two Linears with GELU, a layer scale
``gamma``, ``permute(0, 3, 1, 2)``, residual).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import ZooModel, seeded


class VanillaActivation(nn.ReLU):
    """A ReLU, then a learned depthwise ``(2 n + 1)^2`` conv written with ``F.conv2d`` and its BN."""

    def __init__(self, dim: int, act_num: int = 3) -> None:
        super().__init__()
        self.dim, self.act_num = dim, act_num
        self.weight = nn.Parameter(torch.randn(dim, 1, 2 * act_num + 1, 2 * act_num + 1) * 0.02)
        self.bias = None
        self.bn = nn.BatchNorm2d(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.conv2d(super().forward(x), self.weight, self.bias, padding=(self.act_num * 2 + 1) // 2, groups=self.dim))


class VanillaBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, stride: int) -> None:
        super().__init__()
        self.act_learn = 1.0
        self.conv1 = nn.Sequential(nn.Conv2d(dim, dim, kernel_size=1), nn.BatchNorm2d(dim, eps=1e-6))
        self.conv2 = nn.Sequential(nn.Conv2d(dim, dim_out, kernel_size=1), nn.BatchNorm2d(dim_out, eps=1e-6))
        self.pool = nn.Identity() if stride == 1 else nn.MaxPool2d(stride)
        self.act = VanillaActivation(dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = F.leaky_relu(x, self.act_learn)
        x = self.conv2(x)
        return self.act(self.pool(x))


class VanillaNet(nn.Module):
    """At the end of training (``act_learn = 1``), or mid-way (``act_learn`` below 1: nothing merges across it)."""

    def __init__(self, dims: tuple[int, ...] = (16, 32, 48), strides: tuple[int, ...] = (2, 2), num_classes: int = 10,
                 act_learn: float = 1.0) -> None:
        super().__init__()
        self.stem1 = nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), nn.BatchNorm2d(dims[0], eps=1e-6))
        self.stem2 = nn.Sequential(nn.Conv2d(dims[0], dims[0], kernel_size=1), nn.BatchNorm2d(dims[0], eps=1e-6), VanillaActivation(dims[0]))
        self.stages = nn.ModuleList(VanillaBlock(dims[k], dims[k + 1], s) for k, s in enumerate(strides))
        self.cls1 = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Dropout(0.0), nn.Conv2d(dims[-1], num_classes, 1),
                                  nn.BatchNorm2d(num_classes, eps=1e-6))
        self.cls2 = nn.Sequential(nn.Conv2d(num_classes, num_classes, 1))
        self.change_act(act_learn)

    def change_act(self, m: float) -> None:
        for stage in self.stages:
            stage.act_learn = m
        self.act_learn = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem2(F.leaky_relu(self.stem1(x), self.act_learn))
        for stage in self.stages:
            x = stage(x)
        x = self.cls2(F.leaky_relu(self.cls1(x), self.act_learn))
        return x.view(x.size(0), -1)


def depthwise_bn(channels: int, kernel: tuple[int, int]) -> nn.Sequential:
    result = nn.Sequential()
    result.add_module("conv", nn.Conv2d(channels, channels, kernel, padding=(kernel[0] // 2, kernel[1] // 2), groups=channels, bias=False))
    result.add_module("bn", nn.BatchNorm2d(channels))
    return result


class DecomposedLargeKernel(nn.Module):
    """SLaK's ``ReparamLargeKernelConv`` with ``Decom=True``: ``(K, s) + (s, K)``, then ``+= small``."""

    def __init__(self, channels: int, kernel: int, small: int) -> None:
        super().__init__()
        self.LoRA1 = depthwise_bn(channels, (kernel, small))
        self.LoRA2 = depthwise_bn(channels, (small, kernel))
        self.small_conv = depthwise_bn(channels, (small, small))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.LoRA1(inputs) + self.LoRA2(inputs)
        if hasattr(self, "small_conv"):
            out += self.small_conv(inputs)
        return out


class SLaKBlock(nn.Module):
    def __init__(self, dim: int, kernel: int, small: int) -> None:
        super().__init__()
        self.large_kernel = DecomposedLargeKernel(dim, kernel, small)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim) + torch.rand(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.large_kernel(x)
        x = x.permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = self.gamma * x
        return shortcut + x.permute(0, 3, 1, 2)


class SLaK(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 2, kernel: int = 13, small: int = 5, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, kernel_size=4, stride=4), nn.BatchNorm2d(dim))
        self.blocks = nn.Sequential(*(SLaKBlock(dim, kernel, small) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(self.norm(x.mean([-2, -1])))


ENTRIES = (
    ZooModel("vanillanet", "VanillaNet at act_learn = 1 (its 1x1 conv pairs merge)", seeded(VanillaNet, 2601), (2, 3, 64, 64),
             "nn.ReLU subclass with a bare depthwise Parameter run by F.conv2d + BN; F.leaky_relu(x, self.act_learn) between 1x1 conv-BNs; MaxPool2d; 4x4/4 stem; x.view(x.size(0), -1)"),
    ZooModel("slak", "SLaK decomposed large kernels (13x5 + 5x13, += 5x5)", seeded(SLaK, 2602), (2, 3, 64, 64),
             "out = LoRA1(x) + LoRA2(x); if hasattr(self, 'small_conv'): out += small_conv(x); permute + LayerNorm + Linear GELU Linear; gamma layer scale; residual"),
)
