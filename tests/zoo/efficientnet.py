"""Mobile inverted bottlenecks: RegNetY, EfficientNet MBConv with squeeze-excite, TF-ported "SAME" EfficientNet,
MobileNetV3.

Patterns reproduced (read in huggingface/pytorch-image-models ``timm/models/regnet.py``,
``timm/models/_efficientnet_blocks.py``, ``timm/layers/conv2d_same.py``, ``timm/layers/padding.py`` and
``timm/layers/drop.py``, and pytorch/vision ``torchvision/models/mobilenetv3.py``, ``torchvision/ops/misc.py``):
ConvNormAct modules (conv, BN, activation), group width -> ``groups = chs // group_size``, SE whose reduced
width is taken from the block *input* width, ``x = x + self.downsample(shortcut)`` then the activation;
MBConv with ``nn.SiLU(inplace=True)``, ``x.mean((2, 3), keepdim=True)`` SE and ``x * self.gate(x_se)``,
``if self.has_skip: x = self.drop_path(x) + shortcut`` (drop path written out with ``x.new_empty(...).bernoulli_``,
identity in eval); ``Conv2dSame`` whose ``F.pad`` amounts come from ``x.size()[-2:]`` with ``math.ceil``
(asymmetric padding on even sizes), BN ``eps=1e-3``; MobileNetV3's ``_make_divisible``, hard-sigmoid SE
``scale * input``, ``nn.Hardswish(inplace=True)`` and a ``use_res_connect`` flag.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._base import ZooModel, seeded


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    return x * random_tensor.div_(keep_prob)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


class ConvNormAct(nn.Module):
    def __init__(self, cin: int, cout: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 act_layer: type[nn.Module] | None = nn.ReLU, eps: float = 1e-5, conv: type[nn.Conv2d] = nn.Conv2d) -> None:
        super().__init__()
        pad = kernel_size // 2 if conv is nn.Conv2d else 0
        self.conv = conv(cin, cout, kernel_size, stride=stride, padding=pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=eps)
        self.act = act_layer(inplace=True) if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SqueezeExcite(nn.Module):
    def __init__(self, in_chs: int, rd_channels: int, act_layer: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(in_chs, rd_channels, 1, bias=True)
        self.act1 = act_layer(inplace=True)
        self.conv_expand = nn.Conv2d(rd_channels, in_chs, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.conv_reduce(x_se)
        x_se = self.act1(x_se)
        x_se = self.conv_expand(x_se)
        return x * self.gate(x_se)


# ---------------------------------------------------------------- RegNetY
class RegBottleneck(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, group_size: int = 4, se_ratio: float = 0.25) -> None:
        super().__init__()
        bottleneck_chs = int(round(out_chs * 1.0))
        groups = bottleneck_chs // group_size
        self.conv1 = ConvNormAct(in_chs, bottleneck_chs, 1)
        self.conv2 = ConvNormAct(bottleneck_chs, bottleneck_chs, 3, stride=stride, groups=groups)
        self.se = SqueezeExcite(bottleneck_chs, int(round(in_chs * se_ratio))) if se_ratio else nn.Identity()
        self.conv3 = ConvNormAct(bottleneck_chs, out_chs, 1, act_layer=None)
        self.act3 = nn.ReLU()
        if in_chs != out_chs or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs))
        else:
            self.downsample = nn.Identity()
        self.drop_path = DropPath(0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv1(x)
        x = self.conv2(x)
        x = self.se(x)
        x = self.conv3(x)
        x = self.drop_path(x)
        x = x + self.downsample(shortcut)
        x = self.act3(x)
        return x


class RegNetY(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (8, 16, 32), depths: tuple[int, ...] = (1, 2, 1), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvNormAct(3, 8, 3, stride=2)
        stages, cin = [], 8
        for w, d in zip(widths, depths):
            stages.append(nn.Sequential(*[RegBottleneck(cin if i == 0 else w, w, 2 if i == 0 else 1) for i in range(d)]))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(x.mean((2, 3)))


# ---------------------------------------------------------------- EfficientNet
def get_same_padding(x: int, kernel_size: int, stride: int, dilation: int) -> int:
    return max((math.ceil(x / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - x, 0)


def pad_same(x: torch.Tensor, kernel_size: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...] = (1, 1)) -> torch.Tensor:
    ih, iw = x.size()[-2:]
    pad_h = get_same_padding(ih, kernel_size[0], stride[0], dilation[0])
    pad_w = get_same_padding(iw, kernel_size[1], stride[1], dilation[1])
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


class Conv2dSame(nn.Conv2d):
    """TensorFlow-like 'SAME' convolution: padding decided from the input size at run time."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class DepthwiseSeparableConv(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, conv: type[nn.Conv2d], eps: float) -> None:
        super().__init__()
        self.conv_dw = conv(in_chs, in_chs, 3, stride=1, padding=1 if conv is nn.Conv2d else 0, groups=in_chs, bias=False)
        self.bn1 = nn.BatchNorm2d(in_chs, eps=eps)
        self.act1 = nn.SiLU(inplace=True)
        self.se = SqueezeExcite(in_chs, max(1, in_chs // 4), act_layer=nn.SiLU)
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs, eps=eps)
        self.has_skip = in_chs == out_chs
        self.drop_path = DropPath(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv_dw(x)))
        x = self.se(x)
        x = self.bn2(self.conv_pw(x))
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class InvertedResidual(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, dw_kernel_size: int, stride: int, exp_ratio: float,
                 conv: type[nn.Conv2d], eps: float) -> None:
        super().__init__()
        mid_chs = int(in_chs * exp_ratio)
        pad = dw_kernel_size // 2 if conv is nn.Conv2d else 0
        self.has_skip = in_chs == out_chs and stride == 1
        self.conv_pw = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_chs, eps=eps)
        self.act1 = nn.SiLU(inplace=True)
        self.conv_dw = conv(mid_chs, mid_chs, dw_kernel_size, stride=stride, padding=pad, groups=mid_chs, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_chs, eps=eps)
        self.act2 = nn.SiLU(inplace=True)
        self.se = SqueezeExcite(mid_chs, max(1, int(in_chs * 0.25)), act_layer=nn.SiLU)
        self.conv_pwl = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs, eps=eps)
        self.drop_path = DropPath(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_pw(x)
        x = self.act1(self.bn1(x))
        x = self.conv_dw(x)
        x = self.act2(self.bn2(x))
        x = self.se(x)
        x = self.conv_pwl(x)
        x = self.bn3(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class EfficientNet(nn.Module):
    # (kernel, stride, expansion, out_chs, repeats), a slice of B0's table at small width
    arch = ((3, 1, 1, 8, 1), (3, 2, 4, 12, 2), (5, 2, 4, 16, 2), (3, 2, 4, 24, 1))

    def __init__(self, tf_same: bool = False, num_classes: int = 10) -> None:
        super().__init__()
        conv = Conv2dSame if tf_same else nn.Conv2d
        eps = 1e-3 if tf_same else 1e-5
        self.conv_stem = conv(3, 16, 3, stride=2, padding=0 if tf_same else 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16, eps=eps)
        self.act1 = nn.SiLU(inplace=True)
        blocks, cin = [], 16
        for k, s, e, c, n in self.arch:
            stage = []
            for i in range(n):
                if e == 1:
                    stage.append(DepthwiseSeparableConv(cin, c, conv, eps))
                else:
                    stage.append(InvertedResidual(cin, c, k, s if i == 0 else 1, e, conv, eps))
                cin = c
            blocks.append(nn.Sequential(*stage))
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = nn.Conv2d(cin, 64, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64, eps=eps)
        self.act2 = nn.SiLU(inplace=True)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        x = self.act2(self.bn2(self.conv_head(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def tf_efficientnet() -> nn.Module:
    return EfficientNet(tf_same=True)


# ---------------------------------------------------------------- MobileNetV3
def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class SqueezeExcitation(nn.Module):
    def __init__(self, input_channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def _scale(self, input: torch.Tensor) -> torch.Tensor:
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        scale = self._scale(input)
        return scale * input


class MV3Block(nn.Module):
    def __init__(self, cin: int, k: int, exp: int, cout: int, use_se: bool, use_hs: bool, stride: int) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        act = nn.Hardswish if use_hs else nn.ReLU
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(ConvNormAct(cin, exp, 1, act_layer=act, eps=0.001))
        layers.append(ConvNormAct(exp, exp, k, stride=stride, groups=exp, act_layer=act, eps=0.001))
        if use_se:
            layers.append(SqueezeExcitation(exp, _make_divisible(exp // 4, 8)))
        layers.append(ConvNormAct(exp, cout, 1, act_layer=None, eps=0.001))
        self.block = nn.Sequential(*layers)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class MobileNetV3(nn.Module):
    cfg = ((16, 3, 16, 16, True, False, 2), (16, 3, 48, 16, False, False, 1), (16, 5, 48, 24, True, True, 2),
           (24, 5, 72, 24, True, True, 1), (24, 3, 72, 32, False, True, 2))

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvNormAct(3, 16, 3, stride=2, act_layer=nn.Hardswish, eps=0.001)]
        layers += [MV3Block(*c) for c in self.cfg]
        layers.append(ConvNormAct(32, 96, 1, act_layer=nn.Hardswish, eps=0.001))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(96, 64), nn.Hardswish(inplace=True), nn.Dropout(p=0.2, inplace=True),
                                        nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


ENTRIES = (
    ZooModel("regnety", "RegNetY (group width, SE)", seeded(RegNetY, 301), (2, 3, 48, 48),
             "ConvNormAct modules; groups = chs // group_size; SE width from block input; x = x + self.downsample(shortcut) then act; DropPath (eval identity)"),
    ZooModel("efficientnet", "EfficientNet-B0 MBConv with squeeze-excite", seeded(EfficientNet, 302), (2, 3, 48, 48),
             "depthwise-separable + inverted residual; SiLU(inplace=True); SE x.mean((2,3), keepdim=True) -> x * sigmoid; if has_skip: drop_path(x) + shortcut"),
    ZooModel("tf_efficientnet_same", "TF-ported EfficientNet (Conv2dSame)", seeded(tf_efficientnet, 303), (2, 3, 60, 60),
             "Conv2dSame: F.pad from x.size()[-2:] with math.ceil, asymmetric on even sizes (k3/s2 on 60, k5/s2 on 30); BN eps=1e-3"),
    ZooModel("mobilenetv3", "MobileNetV3 (torchvision)", seeded(MobileNetV3, 304), (2, 3, 64, 64),
             "Hardswish/ReLU ConvNormAct; hard-sigmoid SE scale * input; _make_divisible; result += input when use_res_connect; Hardswish(inplace=True) + Dropout(inplace=True) head"),
)
