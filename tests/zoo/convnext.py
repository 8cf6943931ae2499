"""Large-kernel depthwise convnets: ConvNeXt (official layout) and ConvMixer.

Patterns reproduced (read in facebookresearch/ConvNeXt ``models/convnext.py``, huggingface/pytorch-image-models
``timm/models/convnext.py``, ``timm/layers/norm.py`` and locuslab/convmixer ``convmixer.py``): a hand-written
``LayerNorm`` with a ``data_format`` switch whose channels-first branch computes ``u = x.mean(1, keepdim=True)``,
``s = (x - u).pow(2).mean(1, keepdim=True)``, ``(x - u) / torch.sqrt(s + eps)`` and
``self.weight[:, None, None] * x + self.bias[:, None, None]``; the block's 7x7 depthwise conv, channels-last
``x.permute(0, 2, 3, 1)``, ``nn.LayerNorm``, ``nn.Linear`` MLP with GELU, layer scale ``self.gamma * x``, permute
back, ``input + self.drop_path(x)``; 4x4/4 patchify stem and LN + 2x2/2 downsampling in a ``ModuleList``;
``self.norm(x.mean([-2, -1]))`` head.  ConvMixer: one ``nn.Sequential`` holding a list comprehension of layers,
``Residual(fn)`` returning ``self.fn(x) + x``, ``padding="same"`` (string) depthwise conv, BatchNorm *after* GELU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import ZooModel, seeded
from .efficientnet import DropPath


class LayerNorm(nn.Module):
    def __init__(self, normalized_shape: int, eps: float = 1e-6, data_format: str = "channels_last") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        if self.data_format not in ["channels_last", "channels_first"]:
            raise NotImplementedError
        self.normalized_shape = (normalized_shape,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        x = self.weight[:, None, None] * x + self.bias[:, None, None]
        return x


class Block(nn.Module):
    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones((dim)), requires_grad=True) if layer_scale_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.pwconv2(x)
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        x = input + self.drop_path(x)
        return x


class ConvNeXt(nn.Module):
    def __init__(self, in_chans: int = 3, num_classes: int = 10, depths: tuple[int, ...] = (1, 1, 2, 1),
                 dims: tuple[int, ...] = (8, 16, 24, 32), drop_path_rate: float = 0.1, layer_scale_init_value: float = 0.5) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm(dims[0], eps=1e-6, data_format="channels_first")))
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm(dims[i], eps=1e-6, data_format="channels_first"),
                nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        self.stages = nn.ModuleList()
        dp_rates = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        cur = 0
        for i in range(4):
            self.stages.append(nn.Sequential(*[Block(dims[i], dp_rates[cur + j], layer_scale_init_value) for j in range(depths[i])]))
            cur += depths[i]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(4):
            x = self.downsample_layers[i](x)
            x = self.stages[i](x)
        return self.norm(x.mean([-2, -1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def _mixer_layer(dim: int, kernel_size: int) -> nn.Sequential:
    depthwise = nn.Sequential(nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"), nn.GELU(), nn.BatchNorm2d(dim))
    return nn.Sequential(Residual(depthwise), nn.Conv2d(dim, dim, kernel_size=1), nn.GELU(), nn.BatchNorm2d(dim))


class ConvMixer(nn.Sequential):
    def __init__(self, dim: int = 24, depth: int = 3, kernel_size: int = 9, patch_size: int = 7, n_classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size), nn.GELU(), nn.BatchNorm2d(dim),
            *[_mixer_layer(dim, kernel_size) for _ in range(depth)],
            nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(dim, n_classes))


ENTRIES = (
    ZooModel("convnext", "ConvNeXt (official layout: LayerNorm, layer scale)", seeded(ConvNeXt, 1001), (2, 3, 64, 64),
             "hand-written channels-first LayerNorm (mean/pow/sqrt, weight[:, None, None]); dw7x7 -> permute -> LN -> Linear/GELU/Linear -> self.gamma * x -> permute; input + drop_path(x); LN + 2x2/2 downsample"),
    ZooModel("convmixer", "ConvMixer", seeded(ConvMixer, 1002), (2, 3, 56, 56),
             "Sequential from a list comprehension; Residual fn(x) + x; padding='same' depthwise 9x9; BatchNorm after GELU (folds forward, not backward); patchify 7x7/7"),
)
