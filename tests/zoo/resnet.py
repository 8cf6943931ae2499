"""ResNet family: basic and bottleneck blocks, ResNeXt, SE-ResNet-D, Wide ResNet, pre-activation ResNet.

Patterns reproduced (read in pytorch/vision ``torchvision/models/resnet.py``, huggingface/pytorch-image-models
``timm/models/resnet.py`` and ``timm/layers/squeeze_excite.py``, and the Wide ResNet reference code
xternalz/WideResNet-pytorch ``wideresnet.py``): ``nn.ReLU(inplace=True)`` reused within a block,
``out += identity`` after a ``downsample`` Sequential, grouped 3x3 (ResNeXt), a deep stem and an average-pool
downsample with ``ceil_mode=True, count_include_pad=False`` (ResNet-D), squeeze-excite as ``x * self.gate(x_se)``,
the Wide ResNet ``equalInOut`` branch that rebinds ``x`` to its pre-activation and ends with ``torch.add``,
and a pre-activation block whose in-place ReLU rewrites the BN output that the shortcut reads afterwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import ZooModel, seeded


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class SEModule(nn.Module):
    def __init__(self, channels: int, rd_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.bn = nn.BatchNorm2d(rd_channels)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.fc1(x_se)
        x_se = self.act(self.bn(x_se))
        x_se = self.fc2(x_se)
        return x * self.gate(x_se)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, **_: object) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, se: bool = False, norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.se = SEModule(planes * self.expansion, max(planes // 4, 4)) if se else None
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's layout (or timm's deep stem and average-pool downsample with ``deep=True``)."""

    def __init__(self, block: type[nn.Module], layers: tuple[int, ...], widths: tuple[int, ...] = (8, 16, 24, 32),
                 num_classes: int = 10, deep: bool = False, **block_kw: object) -> None:
        super().__init__()
        self.inplanes = widths[0]
        self.deep = deep
        if deep:  # ResNet-D: three 3x3 convs
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                nn.Conv2d(8, self.inplanes, 3, padding=1, bias=False))
        else:
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.block_kw = block_kw
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            if self.deep and stride != 1:
                downsample = nn.Sequential(
                    nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False),
                    conv1x1(self.inplanes, planes * block.expansion), nn.BatchNorm2d(planes * block.expansion))
            else:
                downsample = nn.Sequential(
                    conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, **self.block_kw)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, **self.block_kw))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class WideBasic(nn.Module):
    """Wide ResNet block: the pre-activation rebinds ``x`` when the widths differ."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.3) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.conv_shortcut = (not self.equal_in_out) and nn.Conv2d(in_planes, out_planes, 1, stride, bias=False) or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.equal_in_out:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equal_in_out else x)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return torch.add(x if self.equal_in_out else self.conv_shortcut(x), out)


class WideResNet(nn.Module):
    def __init__(self, depth: int = 10, widen: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        ch = [8, 8 * widen, 16 * widen, 32 * widen]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = nn.Sequential(*[WideBasic(i == 0 and ch[0] or ch[1], ch[1], 1) for i in range(n)])
        self.block2 = nn.Sequential(*[WideBasic(i == 0 and ch[1] or ch[2], ch[2], i == 0 and 2 or 1) for i in range(n)])
        self.block3 = nn.Sequential(*[WideBasic(i == 0 and ch[2] or ch[3], ch[3], i == 0 and 2 or 1) for i in range(n)])
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.n_channels = ch[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, out.size(-1))
        out = out.view(-1, self.n_channels)
        return self.fc(out)


class PreActBlock(nn.Module):
    """Pre-activation block.  ``self.relu`` is in place, so ``x`` (the BN output) is already
    rectified when the shortcut reads it: the shortcut sees relu(bn1(x)), not bn1(x)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(x)
        out = self.relu(x)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        out += shortcut
        return out


class PreActResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (8, 16, 32), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [PreActBlock(cin, w, 1 if i == 0 else 2), PreActBlock(w, w)]
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.conv1(x))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(out.view(out.size(0), -1))


def resnet_basic() -> nn.Module:
    return ResNet(BasicBlock, (1, 1, 1, 1))


def resnet_bottleneck() -> nn.Module:
    return ResNet(Bottleneck, (1, 1, 1, 1), widths=(4, 8, 8, 8))


def resnext() -> nn.Module:
    return ResNet(Bottleneck, (1, 1, 1, 1), widths=(4, 8, 8, 8), groups=4, base_width=16)


def seresnet_d() -> nn.Module:
    return ResNet(Bottleneck, (1, 1, 1, 1), widths=(4, 8, 8, 8), deep=True, se=True)


ENTRIES = (
    ZooModel("resnet_basic", "ResNet-18 basic block (torchvision)", seeded(resnet_basic, 101), (2, 3, 64, 64),
             "ReLU(inplace=True) reused; out += identity; downsample Sequential(conv1x1, BN); 7x7/2 stem + maxpool; flatten + fc"),
    ZooModel("resnet_bottleneck", "ResNet-50 bottleneck (torchvision)", seeded(resnet_bottleneck, 102), (2, 3, 64, 64),
             "1x1-3x3-1x1 bottleneck with BN after each; strided 3x3; projection shortcut; out += identity; in-place ReLU"),
    ZooModel("resnext", "ResNeXt bottleneck (grouped 3x3)", seeded(resnext, 103), (2, 3, 48, 48),
             "grouped 3x3 conv (groups=4) + BN; width = int(planes * base_width / 64) * groups; out += identity"),
    ZooModel("seresnet_d", "SE-ResNet-D (timm deep stem, avg_down)", seeded(seresnet_d, 104), (2, 3, 57, 57),
             "deep 3-conv stem; AvgPool2d(ceil_mode=True, count_include_pad=False) on odd sizes before 1x1+BN; SE x.mean((2,3)) -> fc/BN/ReLU/fc -> x * sigmoid"),
    ZooModel("wide_resnet", "Wide ResNet (pre-activation, equalInOut)", seeded(WideResNet, 105), (2, 3, 32, 32),
             "pre-activation rebinding x when widths differ; `a and b or c` module choice; F.dropout(training=self.training); torch.add; F.avg_pool2d(out, out.size(-1)); view(-1, C)"),
    ZooModel("preact_resnet", "Pre-activation ResNet (in-place hazard)", seeded(PreActResNet, 106), (2, 3, 32, 32),
             "HAZARD: in-place ReLU on the BN output x, then the shortcut reads x (sees relu(bn(x))); out += shortcut"),
)
