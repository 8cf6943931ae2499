"""NFNet / NF-ResNet: normalizer-free blocks with scaled weight standardization computed in forward.

Patterns reproduced (read in huggingface/pytorch-image-models ``timm/models/nfnet.py``,
``timm/layers/std_conv.py``): ``ScaledStdConv2d``, a ``nn.Conv2d`` subclass whose forward standardizes its own
weight with ``F.batch_norm(self.weight.reshape(1, out_channels, -1), None, None, weight=(self.gain *
self.scale).view(-1), training=True, momentum=0., eps=self.eps).reshape_as(self.weight)`` (a *training-mode* batch
norm over parameters, not activations) before ``F.conv2d``; ``GammaAct`` as ``F.gelu(x).mul_(self.gamma)`` (in place
on a fresh value); blocks computing ``out = self.act1(x) * self.beta`` and reading it for both the downsample
shortcut and the residual branch, SE with ``attn_gain * self.attn(out)``, ``out.mul_(self.skipinit_gain)`` and ``out
* self.alpha + shortcut``; an ``AvgPool2d(2, ceil_mode=True, count_include_pad=False)`` + 1x1 downsample; no
BatchNorm module at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import ZooModel, seeded


class ScaledStdConv2d(nn.Conv2d):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int | None = None,
                 groups: int = 1, bias: bool = True, gamma: float = 1.0, eps: float = 1e-6, gain_init: float = 1.0) -> None:
        if padding is None:
            padding = ((stride - 1) + (kernel_size - 1)) // 2
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups, bias=bias)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), gain_init))
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None,
            weight=(self.gain * self.scale).view(-1),
            training=True, momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class GammaAct(nn.Module):
    def __init__(self, gamma: float = 1.7015043497085999) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x).mul_(self.gamma)


class SEModule(nn.Module):
    def __init__(self, channels: int, rd_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.fc2(self.act(self.fc1(x_se)))
        return x * x_se.sigmoid()


class DownsampleAvg(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
        self.conv = ScaledStdConv2d(in_chs, out_chs, 1, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class NormFreeBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, alpha: float = 0.2, beta: float = 1.0,
                 group_size: int = 8, attn_gain: float = 2.0) -> None:
        super().__init__()
        mid_chs = out_chs // 2
        groups = mid_chs // group_size
        self.alpha = alpha
        self.beta = beta
        self.attn_gain = attn_gain
        self.downsample = DownsampleAvg(in_chs, out_chs, stride) if in_chs != out_chs or stride != 1 else None
        self.act1 = GammaAct()
        self.conv1 = ScaledStdConv2d(in_chs, mid_chs, 1)
        self.act2 = GammaAct()
        self.conv2 = ScaledStdConv2d(mid_chs, mid_chs, 3, stride=stride, groups=groups)
        self.act2b = GammaAct()
        self.conv2b = ScaledStdConv2d(mid_chs, mid_chs, 3, stride=1, groups=groups)
        self.act3 = GammaAct()
        self.conv3 = ScaledStdConv2d(mid_chs, out_chs, 1, gain_init=1.0)
        self.attn_last = SEModule(out_chs, max(4, out_chs // 4))
        self.drop_path = nn.Identity()
        self.skipinit_gain = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(x) * self.beta
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.act2(out))
        out = self.conv2b(self.act2b(out))
        out = self.conv3(self.act3(out))
        out = self.attn_gain * self.attn_last(out)
        out = self.drop_path(out)
        out.mul_(self.skipinit_gain)
        out = out * self.alpha + shortcut
        return out


class NFNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            ScaledStdConv2d(3, 8, 3, stride=2), GammaAct(), ScaledStdConv2d(8, 16, 3, stride=1), GammaAct(),
            ScaledStdConv2d(16, 16, 3, stride=2))
        expected_var = 1.0
        blocks = []
        for i, (cin, cout, s) in enumerate(((16, 32, 1), (32, 32, 1), (32, 48, 2))):
            beta = 1.0 / expected_var ** 0.5
            blocks.append(NormFreeBlock(cin, cout, s, alpha=0.2, beta=beta))
            expected_var = 1.0 if s != 1 or cin != cout else expected_var + 0.2 ** 2
        self.stages = nn.Sequential(*blocks)
        self.final_conv = ScaledStdConv2d(48, 64, 1)
        self.final_act = GammaAct()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final_act(self.final_conv(self.stages(self.stem(x))))
        return self.fc(x.mean((2, 3)))


ENTRIES = (
    ZooModel("nfnet", "NFNet (scaled weight standardization, no BN)", seeded(NFNet, 2201), (2, 3, 45, 45),
             "Conv2d subclass computing its weight in forward via F.batch_norm(weight.reshape(1, O, -1), None, None, training=True); F.gelu(x).mul_(gamma); out.mul_(skipinit_gain); out * alpha + shortcut; ceil_mode avg-pool downsample on odd sizes"),
)
