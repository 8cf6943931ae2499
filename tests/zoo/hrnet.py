"""HRNet: parallel multi-resolution branches exchanging information through fuse layers (segmentation head).

Patterns reproduced (read in HRNet/HRNet-Semantic-Segmentation ``lib/models/seg_hrnet.py`` and
huggingface/pytorch-image-models ``timm/models/hrnet.py``): a module taking and returning a *list* of tensors,
``x[i] = self.branches[i](x[i])`` mutating that list, fuse layers held in ``nn.ModuleList`` of ``ModuleList`` with
``None`` on the diagonal, upsampling via ``F.interpolate(..., size=[x[i].shape[-2], x[i].shape[-1]],
mode='bilinear', align_corners=False)`` (odd sizes: 13 <- 7 <- 4), downsampling via chains of strided 3x3
conv+BN (ReLU between, not after the last), ``y = y + ...`` accumulation and ``self.relu(y)``; transition
``ModuleList`` entries that are ``None`` (pass through); the segmentation head that interpolates every branch to
the finest size and ``torch.cat``s them before a 1x1 conv-BN-ReLU-1x1 classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import ZooModel, seeded
from .resnet import BasicBlock

ALIGN_CORNERS = False


class HighResolutionModule(nn.Module):
    def __init__(self, num_channels: tuple[int, ...], num_blocks: int = 1) -> None:
        super().__init__()
        self.num_branches = len(num_channels)
        self.branches = nn.ModuleList(
            nn.Sequential(*[BasicBlock(c, c) for _ in range(num_blocks)]) for c in num_channels)
        self.fuse_layers = self._make_fuse_layers(num_channels)
        self.relu = nn.ReLU(False)

    def _make_fuse_layers(self, ch: tuple[int, ...]) -> nn.ModuleList:
        fuse_layers = []
        for i in range(self.num_branches):
            fuse_layer: list[nn.Module | None] = []
            for j in range(self.num_branches):
                if j > i:
                    fuse_layer.append(nn.Sequential(nn.Conv2d(ch[j], ch[i], 1, 1, 0, bias=False), nn.BatchNorm2d(ch[i])))
                elif j == i:
                    fuse_layer.append(None)
                else:
                    conv3x3s = []
                    for k in range(i - j):
                        if k == i - j - 1:
                            conv3x3s.append(nn.Sequential(nn.Conv2d(ch[j], ch[i], 3, 2, 1, bias=False), nn.BatchNorm2d(ch[i])))
                        else:
                            conv3x3s.append(nn.Sequential(nn.Conv2d(ch[j], ch[j], 3, 2, 1, bias=False), nn.BatchNorm2d(ch[j]),
                                                          nn.ReLU(False)))
                    fuse_layer.append(nn.Sequential(*conv3x3s))
            fuse_layers.append(nn.ModuleList(fuse_layer))
        return nn.ModuleList(fuse_layers)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        for i in range(self.num_branches):
            x[i] = self.branches[i](x[i])
        x_fuse = []
        for i in range(len(self.fuse_layers)):
            y = x[0] if i == 0 else self.fuse_layers[i][0](x[0])
            for j in range(1, self.num_branches):
                if i == j:
                    y = y + x[j]
                elif j > i:
                    width_output = x[i].shape[-1]
                    height_output = x[i].shape[-2]
                    y = y + F.interpolate(self.fuse_layers[i][j](x[j]), size=[height_output, width_output],
                                          mode="bilinear", align_corners=ALIGN_CORNERS)
                else:
                    y = y + self.fuse_layers[i][j](x[j])
            x_fuse.append(self.relu(y))
        return x_fuse


def _transition(pre: tuple[int, ...], cur: tuple[int, ...]) -> nn.ModuleList:
    layers: list[nn.Module | None] = []
    for i, c in enumerate(cur):
        if i < len(pre):
            layers.append(None if c == pre[i] else nn.Sequential(
                nn.Conv2d(pre[i], c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)))
        else:
            layers.append(nn.Sequential(nn.Conv2d(pre[-1], c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)))
    return nn.ModuleList(layers)


class HRNetSeg(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(16, 16)
        self.transition1 = _transition((16,), (8, 16))
        self.stage2 = HighResolutionModule((8, 16))
        self.transition2 = _transition((8, 16), (8, 16, 24))
        self.stage3 = HighResolutionModule((8, 16, 24))
        last_inp_channels = 8 + 16 + 24
        self.last_layer = nn.Sequential(
            nn.Conv2d(last_inp_channels, last_inp_channels, 1, 1, 0), nn.BatchNorm2d(last_inp_channels),
            nn.ReLU(inplace=True), nn.Conv2d(last_inp_channels, num_classes, 1, 1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.layer1(x)
        x_list = []
        for i in range(2):
            if self.transition1[i] is not None:
                x_list.append(self.transition1[i](x))
            else:
                x_list.append(x)
        y_list = self.stage2(x_list)
        x_list = []
        for i in range(3):
            if self.transition2[i] is not None:
                x_list.append(self.transition2[i](y_list[-1] if i >= len(y_list) else y_list[i]))
            else:
                x_list.append(y_list[i])
        x = self.stage3(x_list)
        x0_h, x0_w = x[0].size(2), x[0].size(3)
        x1 = F.interpolate(x[1], size=(x0_h, x0_w), mode="bilinear", align_corners=ALIGN_CORNERS)
        x2 = F.interpolate(x[2], size=(x0_h, x0_w), mode="bilinear", align_corners=ALIGN_CORNERS)
        x = torch.cat([x[0], x1, x2], 1)
        return self.last_layer(x)


ENTRIES = (
    ZooModel("hrnet", "HRNet (multi-resolution branches, segmentation head)", seeded(HRNetSeg, 801), (2, 3, 50, 50),
             "list in/list out module; x[i] = branch(x[i]) list mutation; ModuleList-of-ModuleList fuse layers with None; F.interpolate(size=x[i].shape[-2:], bilinear) on odd sizes; strided conv chains; y = y + ...; cat head"),
)
