"""ShiftViT: attention replaced by a zero-parameter spatial shift written with slice assignments.

Patterns reproduced (read in microsoft/SPACH ``models/shiftvit.py``): ``shift_feat`` as a ``@staticmethod``
that fills ``out = torch.zeros_like(x)`` by five **slice assignments** (``out[:, g*0:g*1, :, :-1] =
x[:, g*0:g*1, :, 1:]`` shifts left, then right, up, down, and the untouched remainder), i.e. a linear map
equal to a one-hot depthwise 3x3 convolution with zero padding; ``shortcut + self.drop_path(self.mlp(self.norm2(x)))``
with a BatchNorm pre-norm and a 1x1-conv MLP; patch embedding ``Conv2d(k=4, s=4)`` + BN; patch merging that applies
a BN *before* a ``(2, 2)``/2 conv (a BN that folds forward into the next conv); the ``norm_layer='BN'``
configuration throughout, so the head is BN -> ``AdaptiveAvgPool2d(1)`` -> flatten -> Linear.
"""

from __future__ import annotations

import torch
from torch import nn

from ._base import ZooModel, seeded
from .efficientnet import DropPath


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_features, in_features, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ShiftViTBlock(nn.Module):
    def __init__(self, dim: int, n_div: int = 12, mlp_ratio: float = 4.0, drop_path: float = 0.1) -> None:
        super().__init__()
        self.dim = dim
        self.mlp_ratio = mlp_ratio
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.n_div = n_div

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shift_feat(x, self.n_div)
        shortcut = x
        x = shortcut + self.drop_path(self.mlp(self.norm2(x)))
        return x

    @staticmethod
    def shift_feat(x: torch.Tensor, n_div: int) -> torch.Tensor:
        B, C, H, W = x.shape
        g = C // n_div
        out = torch.zeros_like(x)
        out[:, g * 0:g * 1, :, :-1] = x[:, g * 0:g * 1, :, 1:]  # shift left
        out[:, g * 1:g * 2, :, 1:] = x[:, g * 1:g * 2, :, :-1]  # shift right
        out[:, g * 2:g * 3, :-1, :] = x[:, g * 2:g * 3, 1:, :]  # shift up
        out[:, g * 3:g * 4, 1:, :] = x[:, g * 3:g * 4, :-1, :]  # shift down
        out[:, g * 4:, :, :] = x[:, g * 4:, :, :]  # no shift
        return out


class PatchMerging(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, (2, 2), stride=2, bias=False)
        self.norm = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.reduction(x)


class ShiftViT(nn.Module):
    def __init__(self, embed_dim: int = 12, depths: tuple[int, ...] = (2, 2), n_div: int = 6, num_classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Sequential(nn.Conv2d(3, embed_dim, kernel_size=4, stride=4), nn.BatchNorm2d(embed_dim))
        layers: list[nn.Module] = []
        dim = embed_dim
        for i, depth in enumerate(depths):
            layers += [ShiftViTBlock(dim, n_div=n_div) for _ in range(depth)]
            if i < len(depths) - 1:
                layers.append(PatchMerging(dim))
                dim *= 2
        self.layers = nn.Sequential(*layers)
        self.norm = nn.BatchNorm2d(dim)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.patch_embed(x))
        x = self.norm(x)
        x = self.avgpool(x)
        return self.head(torch.flatten(x, 1))


ENTRIES = (
    ZooModel("shiftvit", "ShiftViT (slice-assignment shift)", seeded(ShiftViT, 2101), (2, 3, 40, 40),
             "HAZARD: out = torch.zeros_like(x) then five slice assignments out[:, a:b, :, :-1] = x[:, a:b, :, 1:] (a one-hot dw 3x3 in disguise); BN pre-norm 1x1 MLP; BN before a 2x2/2 conv; BN -> avgpool -> Linear head"),
)
