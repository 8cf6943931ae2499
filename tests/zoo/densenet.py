"""Dense connectivity: DenseNet (pre-activation, concatenation) and DPN (dual path: residual + dense).

Patterns reproduced (read in pytorch/vision ``torchvision/models/densenet.py`` and
huggingface/pytorch-image-models ``timm/models/densenet.py``, ``timm/models/dpn.py``): a layer that takes
the *list* of earlier features and concatenates it before a pre-activation BN/ReLU(inplace)/1x1 conv, a
``nn.ModuleDict`` block whose forward appends to that list and concatenates at the end, transitions with
``AvgPool2d(2, 2)``, ``F.relu(features, inplace=True)`` before the head; DPN's tuple-typed block input
(``isinstance(x, tuple)``), channel slicing ``x[:, :n, :, :]`` of one projection into a residual part and a
dense part, ``resid = x_s1 + out1`` beside ``dense = torch.cat([x_s2, out2], dim=1)``, and a 1x1-conv classifier.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ._base import ZooModel, seeded


class DenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float = 0.1) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def bn_function(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        concated_features = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated_features)))

    def forward(self, input: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        prev_features = [input] if isinstance(input, torch.Tensor) else input
        bottleneck_output = self.bn_function(prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size))

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for name, layer in self.items():
            new_features = layer(features)
            features.append(new_features)
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    def __init__(self, growth_rate: int = 8, block_config: tuple[int, ...] = (2, 2, 2), num_init_features: int = 16,
                 bn_size: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(num_layers, num_features, bn_size, growth_rate))
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(num_features, num_features // 2))
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


class BnActConv2d(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_chs, eps=0.001)
        self.act = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.bn(x)))


class CatBnAct(nn.Module):
    def __init__(self, in_chs: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_chs, eps=0.001)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if isinstance(x, tuple):
            x = torch.cat(x, dim=1)
        return self.act(self.bn(x))


class DualPathBlock(nn.Module):
    def __init__(self, in_chs: int, num_1x1_a: int, num_3x3_b: int, num_1x1_c: int, inc: int, groups: int,
                 block_type: str = "normal") -> None:
        super().__init__()
        self.num_1x1_c = num_1x1_c
        assert block_type in ("proj", "down", "normal")
        self.key_stride = 2 if block_type == "down" else 1
        self.c1x1_w = None
        if block_type != "normal":
            self.c1x1_w = BnActConv2d(in_chs, num_1x1_c + 2 * inc, kernel_size=1, stride=self.key_stride)
        self.c1x1_a = BnActConv2d(in_chs, num_1x1_a, kernel_size=1)
        self.c3x3_b = BnActConv2d(num_1x1_a, num_3x3_b, kernel_size=3, stride=self.key_stride, groups=groups)
        self.c1x1_c = BnActConv2d(num_3x3_b, num_1x1_c + inc, kernel_size=1)

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(x, tuple):
            x_in = torch.cat(x, dim=1)
        else:
            x_in = x
        if self.c1x1_w is None:
            x_s1 = x[0]
            x_s2 = x[1]
        else:
            x_s = self.c1x1_w(x_in)
            x_s1 = x_s[:, :self.num_1x1_c, :, :]
            x_s2 = x_s[:, self.num_1x1_c:, :, :]
        x_in = self.c1x1_a(x_in)
        x_in = self.c3x3_b(x_in)
        x_in = self.c1x1_c(x_in)
        out1 = x_in[:, :self.num_1x1_c, :, :]
        out2 = x_in[:, self.num_1x1_c:, :, :]
        resid = x_s1 + out1
        dense = torch.cat([x_s2, out2], dim=1)
        return resid, dense


class DPN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        blocks["conv1_1"] = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16, eps=0.001), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        # stage 1: bw=16, inc=4 ; stage 2: bw=24, inc=4 (groups=4)
        blocks["conv2_1"] = DualPathBlock(16, 8, 8, 16, 4, 4, "proj")
        blocks["conv2_2"] = DualPathBlock(16 + 12, 8, 8, 16, 4, 4, "normal")
        blocks["conv3_1"] = DualPathBlock(16 + 16, 12, 12, 24, 4, 4, "down")
        blocks["conv3_2"] = DualPathBlock(24 + 12, 12, 12, 24, 4, 4, "normal")
        blocks["conv5_bn_ac"] = CatBnAct(24 + 16)
        self.features = nn.Sequential(blocks)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Conv2d(24 + 16, num_classes, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.global_pool(x)
        x = self.classifier(x)
        return x.flatten(1)


ENTRIES = (
    ZooModel("densenet", "DenseNet-121 style (pre-activation dense blocks)", seeded(DenseNet, 201), (2, 3, 64, 64),
             "list of features -> torch.cat -> BN/ReLU(inplace)/1x1; ModuleDict block appending to a list; AvgPool transition; F.relu(inplace=True) before the head"),
    ZooModel("dpn", "DPN (dual path network)", seeded(DPN, 202), (2, 3, 48, 48),
             "tuple-typed block input with isinstance; channel slices x[:, :n] of one projection; residual add beside dense torch.cat; grouped 3x3; conv classifier + flatten"),
)
