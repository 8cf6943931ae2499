"""torchvision's detection backbone: a ResNet with ``FrozenBatchNorm2d``, its layers picked by
``IntermediateLayerGetter``, and a ``FeaturePyramidNetwork`` on top (Faster/Mask R-CNN, RetinaNet).

Patterns reproduced (read in pytorch/vision ``torchvision/ops/misc.py``, ``torchvision/ops/feature_pyramid_network.py``,
``torchvision/models/_utils.py`` and ``torchvision/models/detection/backbone_utils.py``): the norm layer is
``FrozenBatchNorm2d``, whose statistics and affine parameters are *buffers* and whose forward is arithmetic,
``x * scale + bias`` with ``scale = w * (rv + eps).rsqrt()`` and ``bias = b - rm * scale`` from ``reshape(1, -1, 1,
1)`` views (no ``nn.BatchNorm2d``, no ``F.batch_norm``); the ResNet's ``norm_layer`` argument; an ``nn.ModuleDict``
subclass whose forward walks ``self.items()`` and collects the returned layers into an ``OrderedDict``; the FPN
taking and returning a dict, picking its lateral and output convs by index with a loop over the whole ModuleList
(``for i, module in enumerate(self.inner_blocks): if i == idx: out = module(x)``, written that way for
TorchScript), ``F.interpolate(last_inner, size=inner_lateral.shape[-2:], mode="nearest")``, ``results.insert(0,
...)``, and ``LastLevelMaxPool``'s ``F.max_pool2d(x[-1], 1, 2, 0)`` with its name appended.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ._base import ZooModel, seeded
from .resnet import Bottleneck  # torchvision's, with its norm_layer argument


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with its statistics and affine parameters fixed, as buffers."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


class ResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (4, 6, 8, 8), norm_layer: type[nn.Module] = FrozenBatchNorm2d) -> None:
        super().__init__()
        self._norm_layer = norm_layer
        self.inplanes = 8
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(widths[0], 1)
        self.layer2 = self._make_layer(widths[1], 2)
        self.layer3 = self._make_layer(widths[2], 2)
        self.layer4 = self._make_layer(widths[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, 10)

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False), self._norm_layer(planes * 4))
        block = Bottleneck(self.inplanes, planes, stride, downsample, norm_layer=self._norm_layer)
        self.inplanes = planes * Bottleneck.expansion
        return nn.Sequential(block)


class IntermediateLayerGetter(nn.ModuleDict):
    """The model's children up to the last returned one, run in order; the returned ones collected by name."""

    def __init__(self, model: nn.Module, return_layers: dict[str, str]) -> None:
        wanted = dict(return_layers)
        layers = OrderedDict()
        for name, module in model.named_children():
            layers[name] = module
            wanted.pop(name, None)
            if not wanted:
                break
        super().__init__(layers)
        self.return_layers = return_layers

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


class LastLevelMaxPool(nn.Module):
    def forward(self, x: list[torch.Tensor], y: list[torch.Tensor], names: list[str]) -> tuple[list[torch.Tensor], list[str]]:
        names.append("pool")
        x.append(F.max_pool2d(x[-1], 1, 2, 0))
        return x, names


class FeaturePyramidNetwork(nn.Module):
    def __init__(self, in_channels_list: list[int], out_channels: int) -> None:
        super().__init__()
        self.inner_blocks = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels_list)
        self.layer_blocks = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels_list)
        self.extra_blocks = LastLevelMaxPool()

    @staticmethod
    def _result_from(blocks: nn.ModuleList, x: torch.Tensor, idx: int) -> torch.Tensor:
        """``blocks[idx](x)``, written as a loop over the whole list (TorchScript cannot index a ModuleList)."""
        if idx < 0:
            idx += len(blocks)
        out = x
        for i, module in enumerate(blocks):
            if i == idx:
                out = module(x)
        return out

    def get_result_from_inner_blocks(self, x: torch.Tensor, idx: int) -> torch.Tensor:
        return self._result_from(self.inner_blocks, x, idx)

    def get_result_from_layer_blocks(self, x: torch.Tensor, idx: int) -> torch.Tensor:
        return self._result_from(self.layer_blocks, x, idx)

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = list(x.keys())
        x = list(x.values())
        last_inner = self.get_result_from_inner_blocks(x[-1], -1)
        results = [self.get_result_from_layer_blocks(last_inner, -1)]
        for idx in range(len(x) - 2, -1, -1):
            inner_lateral = self.get_result_from_inner_blocks(x[idx], idx)
            inner_top_down = F.interpolate(last_inner, size=inner_lateral.shape[-2:], mode="nearest")
            last_inner = inner_lateral + inner_top_down
            results.insert(0, self.get_result_from_layer_blocks(last_inner, idx))
        results, names = self.extra_blocks(results, x, names)
        return OrderedDict([(k, v) for k, v in zip(names, results)])


class BackboneWithFPN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        backbone = ResNet()
        self.body = IntermediateLayerGetter(backbone, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"})
        self.fpn = FeaturePyramidNetwork([16, 24, 32, 32], 8)
        self.out_channels = 8

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def frozen_statistics(model: nn.Module) -> nn.Module:
    """Realistic buffers for every FrozenBatchNorm2d (as loaded from a trained checkpoint): the zoo's BN ranges."""
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.normal_(0.0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5).mul_(torch.where(torch.rand(m.weight.shape) < 0.125, -1.0, 1.0))
            m.bias.normal_(0.0, 0.2)
    return model


def backbone_fpn() -> nn.Module:
    return frozen_statistics(BackboneWithFPN())


ENTRIES = (
    ZooModel("backbone_fpn", "torchvision detection backbone (ResNet + FrozenBatchNorm2d + FPN)", seeded(backbone_fpn, 2301),
             (2, 3, 64, 64),
             "FrozenBatchNorm2d as buffer arithmetic x * scale + bias; IntermediateLayerGetter ModuleDict -> OrderedDict; "
             "FPN dict in/out, ModuleList picked by enumerate loop, interpolate to shape[-2:], insert(0), LastLevelMaxPool"),
)
