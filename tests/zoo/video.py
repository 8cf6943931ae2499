"""Video models: R(2+1)D (torchvision's VideoResNet) and X3D (pytorchvideo), on ``(N, C, T, H, W)`` clips.

Patterns reproduced (read in pytorch/vision ``torchvision/models/video/resnet.py`` and facebookresearch/pytorchvideo
``pytorchvideo/models/x3d.py``, ``resnet.py`` and ``head.py``): the stem as an ``nn.Sequential`` subclass of a
``(1, 7, 7)`` spatial and a ``(3, 1, 1)`` temporal Conv3d, each with BatchNorm3d and ``ReLU(inplace=True)``;
``Conv2Plus1D`` as an ``nn.Sequential`` subclass with a ``@staticmethod get_downsample_stride`` and the midplanes
``(in * out * 27) // (in * 9 + 3 * out)``; blocks whose ``conv1`` is ``nn.Sequential(conv_builder(...),
nn.BatchNorm3d, nn.ReLU(inplace=True))``, ``out += residual`` and a ``downsample`` Conv3d 1x1x1 + BN;
``AdaptiveAvgPool3d((1, 1, 1))`` then ``x.flatten(1)`` and ``fc``.  X3D: a stem of a spatial Conv3d followed by a
depthwise temporal ``(5, 1, 1)`` Conv3d, bottlenecks ``conv_a`` 1x1x1 -> depthwise 3x3x3 ``conv_b`` -> SE
(``AdaptiveAvgPool3d(1)``, 1x1x1 convs, ``x * se``) -> Swish (``x * torch.sigmoid(x)``) -> ``conv_c``, residual
``branch1_conv`` + ``branch1_norm`` when the shape changes, ``x = self.activation(self.branch2(x) + shortcut)``;
a projected-pool head: 1x1x1 conv + BN + ReLU, ``AvgPool3d`` over the whole clip, a 1x1x1 conv, then
``x.permute((0, 2, 3, 4, 1))``, a Linear, ``x.permute((0, 4, 1, 2, 3))``, ``AdaptiveAvgPool3d(1)`` and
``x.view(x.shape[0], -1)``.
"""

from __future__ import annotations

import torch
from torch import nn

from ._base import ZooModel, seeded


class R2Plus1dStem(nn.Sequential):
    def __init__(self, width: int = 12, out: int = 16) -> None:
        super().__init__(
            nn.Conv3d(3, width, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
            nn.Conv3d(width, out, kernel_size=(3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
            nn.BatchNorm3d(out),
            nn.ReLU(inplace=True),
        )


class Conv2Plus1D(nn.Sequential):
    def __init__(self, in_planes: int, out_planes: int, midplanes: int, stride: int = 1, padding: int = 1) -> None:
        super().__init__(
            nn.Conv3d(in_planes, midplanes, kernel_size=(1, 3, 3), stride=(1, stride, stride), padding=(0, padding, padding),
                      bias=False),
            nn.BatchNorm3d(midplanes),
            nn.ReLU(inplace=True),
            nn.Conv3d(midplanes, out_planes, kernel_size=(3, 1, 1), stride=(stride, 1, 1), padding=(padding, 0, 0), bias=False),
        )

    @staticmethod
    def get_downsample_stride(stride: int) -> tuple[int, int, int]:
        return stride, stride, stride


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, conv_builder: type, stride: int = 1, downsample: nn.Module | None = None) -> None:
        midplanes = (inplanes * planes * 3 * 3 * 3) // (inplanes * 3 * 3 + 3 * planes)
        super().__init__()
        self.conv1 = nn.Sequential(conv_builder(inplanes, planes, midplanes, stride), nn.BatchNorm3d(planes), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(conv_builder(planes, planes, midplanes), nn.BatchNorm3d(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        out = self.conv1(x)
        out = self.conv2(out)
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        out = self.relu(out)
        return out


class VideoResNet(nn.Module):
    def __init__(self, layers: tuple[int, ...] = (1, 1), planes: tuple[int, ...] = (16, 24), num_classes: int = 10) -> None:
        super().__init__()
        self.inplanes = 16
        self.stem = R2Plus1dStem(out=self.inplanes)
        self.layer1 = self._make_layer(BasicBlock, Conv2Plus1D, planes[0], layers[0], stride=1)
        self.layer2 = self._make_layer(BasicBlock, Conv2Plus1D, planes[1], layers[1], stride=2)
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.fc = nn.Linear(planes[-1] * BasicBlock.expansion, num_classes)

    def _make_layer(self, block: type, conv_builder: type, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            ds_stride = conv_builder.get_downsample_stride(stride)
            downsample = nn.Sequential(
                nn.Conv3d(self.inplanes, planes * block.expansion, kernel_size=1, stride=ds_stride, bias=False),
                nn.BatchNorm3d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, conv_builder, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, conv_builder) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.avgpool(x)
        x = x.flatten(1)
        return self.fc(x)


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Conv3d(channels, reduced, 1), nn.ReLU(),
                                   nn.Conv3d(reduced, channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.block(x)


class BottleneckBlock(nn.Module):
    """X3D's bottleneck: ``conv_a`` 1x1x1, depthwise 3x3x3 ``conv_b`` with SE and Swish, ``conv_c`` 1x1x1."""

    def __init__(self, dim_in: int, dim_inner: int, dim_out: int, stride: int, use_se: bool) -> None:
        super().__init__()
        self.conv_a = nn.Conv3d(dim_in, dim_inner, kernel_size=(1, 1, 1), bias=False)
        self.norm_a = nn.BatchNorm3d(dim_inner, eps=1e-5, momentum=0.1)
        self.act_a = nn.ReLU()
        self.conv_b = nn.Conv3d(dim_inner, dim_inner, (3, 3, 3), stride=(1, stride, stride), padding=(1, 1, 1), groups=dim_inner,
                                bias=False)
        self.norm_b = nn.Sequential(nn.BatchNorm3d(dim_inner), SqueezeExcitation(dim_inner, max(dim_inner // 16, 4))) if use_se \
            else nn.BatchNorm3d(dim_inner)
        self.act_b = Swish()
        self.conv_c = nn.Conv3d(dim_inner, dim_out, kernel_size=(1, 1, 1), bias=False)
        self.norm_c = nn.BatchNorm3d(dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_a(x)
        x = self.norm_a(x)
        x = self.act_a(x)
        x = self.conv_b(x)
        x = self.norm_b(x)
        x = self.act_b(x)
        x = self.conv_c(x)
        return self.norm_c(x)


class ResBlock(nn.Module):
    def __init__(self, dim_in: int, dim_inner: int, dim_out: int, stride: int, use_se: bool) -> None:
        super().__init__()
        self.branch1_conv = None
        if dim_in != dim_out or stride != 1:
            self.branch1_conv = nn.Conv3d(dim_in, dim_out, kernel_size=(1, 1, 1), stride=(1, stride, stride), bias=False)
            self.branch1_norm = nn.BatchNorm3d(dim_out)
        self.branch2 = BottleneckBlock(dim_in, dim_inner, dim_out, stride, use_se)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.branch1_conv is not None:
            shortcut = self.branch1_norm(self.branch1_conv(x))
        x = self.branch2(x) + shortcut
        return self.activation(x)


class X3D(nn.Module):
    def __init__(self, clip: tuple[int, int, int] = (4, 32, 32), width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.ModuleDict({
            "conv_t": nn.Conv3d(3, width, kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False),
            "conv_xy": nn.Conv3d(width, width, kernel_size=(5, 1, 1), padding=(2, 0, 0), groups=width, bias=False),
            "norm": nn.BatchNorm3d(width),
            "act": nn.ReLU(),
        })
        self.blocks = nn.Sequential(ResBlock(width, 2 * width, width, 1, True), ResBlock(width, 3 * width, 2 * width, 2, False),
                                    ResBlock(2 * width, 4 * width, 2 * width, 1, True))
        t, h, w = clip[0], clip[1] // 4, clip[2] // 4
        self.head_pre_conv = nn.Conv3d(2 * width, 4 * width, kernel_size=(1, 1, 1), bias=False)
        self.head_pre_norm = nn.BatchNorm3d(4 * width)
        self.head_pre_act = nn.ReLU()
        self.head_pool = nn.AvgPool3d((t, h, w), stride=1)
        self.head_post_conv = nn.Conv3d(4 * width, 6 * width, kernel_size=(1, 1, 1), bias=False)
        self.head_post_act = nn.ReLU()
        self.proj = nn.Linear(6 * width, num_classes)
        self.output_pool = nn.AdaptiveAvgPool3d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem
        x = s["act"](s["norm"](s["conv_xy"](s["conv_t"](x))))
        x = self.blocks(x)
        x = self.head_pre_act(self.head_pre_norm(self.head_pre_conv(x)))
        x = self.head_post_act(self.head_post_conv(self.head_pool(x)))
        x = x.permute((0, 2, 3, 4, 1))
        x = self.proj(x)
        x = x.permute((0, 4, 1, 2, 3))
        x = self.output_pool(x)
        return x.view(x.shape[0], -1)


ENTRIES = (
    ZooModel("r2plus1d", "R(2+1)D video ResNet (torchvision)", seeded(VideoResNet, 2301), (2, 3, 4, 32, 32),
             "Conv2Plus1D(nn.Sequential) of (1,3,3) and (3,1,1) Conv3d with BatchNorm3d in between; out += residual with a strided 1x1x1 downsample; AdaptiveAvgPool3d then flatten(1) and fc"),
    ZooModel("x3d", "X3D (pytorchvideo: depthwise 3-D bottlenecks, SE, Swish)", seeded(X3D, 2302), (2, 3, 4, 32, 32),
             "spatial then depthwise temporal Conv3d stem; depthwise 3x3x3 conv_b + BatchNorm3d + SE (x * se) + Swish; branch1_conv/branch1_norm shortcut; AvgPool3d head, permute-Linear-permute, view(B, -1)"),
)
