"""EfficientViT (MIT): ReLU linear attention with multi-scale token aggregation, MBConv local blocks.

Patterns reproduced (read in huggingface/pytorch-image-models ``timm/models/efficientvit_mit.py``): ``ConvNormAct``
with optional norm/activation (``nn.Identity`` otherwise) and a dropout in front; ``LiteMLA``: a 1x1 qkv conv, an
``nn.ModuleList`` of aggregation branches (depthwise 5x5 conv then grouped 1x1 with ``groups=3 * heads``) appended
to a list and ``torch.cat``-ed, ``reshape(B, -1, 3 * dim, H * W).transpose(-1, -2)``, ``chunk(3, dim=-1)``, ReLU
kernel, ``F.pad(v, (0, 1), mode="constant", value=1.)`` to carry the normalizer, the attention computed after
``q.float(), k.float(), v.float()`` (a float32 round trip even for a float64 model) inside ``torch.autocast(...,
enabled=False)`` with ``out[..., :-1] / (out[..., -1:] + self.eps)`` and ``.to(dtype)``; ``ResidualBlock(main,
shortcut)`` with ``res = self.main(self.pre_norm(x)); res = res + self.shortcut(x)``; MBConv with
``nn.Hardswish(inplace=True)``; a stem registered through ``add_module(f'res{i}', ...)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import ZooModel, seeded


class ConvNormAct(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 bias: bool = False, dropout: float = 0.0, norm_layer: type[nn.Module] | None = nn.BatchNorm2d,
                 act_layer: type[nn.Module] | None = nn.Hardswish) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout, inplace=False)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias)
        self.norm = norm_layer(num_features=out_channels) if norm_layer else nn.Identity()
        self.act = act_layer(inplace=True) if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        x = self.conv(x)
        x = self.norm(x)
        return self.act(x)


class MBConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, expand_ratio: float = 4) -> None:
        super().__init__()
        mid_channels = round(in_channels * expand_ratio)
        self.inverted_conv = ConvNormAct(in_channels, mid_channels, 1, bias=True, norm_layer=None)
        self.depth_conv = ConvNormAct(mid_channels, mid_channels, 3, stride=stride, groups=mid_channels, bias=True, norm_layer=None)
        self.point_conv = ConvNormAct(mid_channels, out_channels, 1, act_layer=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inverted_conv(x)
        x = self.depth_conv(x)
        return self.point_conv(x)


class LiteMLA(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, heads: int | None = None, heads_ratio: float = 1.0,
                 dim: int = 8, scales: tuple[int, ...] = (5,), eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        heads = heads or int(in_channels // dim * heads_ratio)
        total_dim = heads * dim
        self.dim = dim
        self.qkv = ConvNormAct(in_channels, 3 * total_dim, 1, bias=False, norm_layer=None, act_layer=None)
        self.aggreg = nn.ModuleList([
            nn.Sequential(
                nn.Conv2d(3 * total_dim, 3 * total_dim, scale, padding=scale // 2, groups=3 * total_dim, bias=False),
                nn.Conv2d(3 * total_dim, 3 * total_dim, 1, groups=3 * heads, bias=False))
            for scale in scales])
        self.kernel_func = nn.ReLU(inplace=False)
        self.proj = ConvNormAct(total_dim * (1 + len(scales)), out_channels, 1, bias=False, act_layer=None)

    def _attn(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dtype = v.dtype
        q, k, v = q.float(), k.float(), v.float()
        kv = k.transpose(-1, -2) @ v
        out = q @ kv
        out = out[..., :-1] / (out[..., -1:] + self.eps)
        return out.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        qkv = self.qkv(x)
        multi_scale_qkv = [qkv]
        for op in self.aggreg:
            multi_scale_qkv.append(op(qkv))
        multi_scale_qkv = torch.cat(multi_scale_qkv, dim=1)
        multi_scale_qkv = multi_scale_qkv.reshape(B, -1, 3 * self.dim, H * W).transpose(-1, -2)
        q, k, v = multi_scale_qkv.chunk(3, dim=-1)
        q = self.kernel_func(q)
        k = self.kernel_func(k)
        v = F.pad(v, (0, 1), mode="constant", value=1.0)
        with torch.autocast(device_type=v.device.type, enabled=False):
            out = self._attn(q, k, v)
        out = out.transpose(-1, -2).reshape(B, -1, H, W)
        return self.proj(out)


class ResidualBlock(nn.Module):
    def __init__(self, main: nn.Module | None, shortcut: nn.Module | None = None, pre_norm: nn.Module | None = None) -> None:
        super().__init__()
        self.pre_norm = pre_norm if pre_norm is not None else nn.Identity()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.main(self.pre_norm(x))
        if self.shortcut is not None:
            res = res + self.shortcut(x)
        return res


class EfficientVitBlock(nn.Module):
    def __init__(self, in_channels: int, heads_ratio: float = 1.0, head_dim: int = 8, expand_ratio: float = 4) -> None:
        super().__init__()
        self.context_module = ResidualBlock(LiteMLA(in_channels, in_channels, heads_ratio=heads_ratio, dim=head_dim), nn.Identity())
        self.local_module = ResidualBlock(MBConv(in_channels, in_channels, expand_ratio=expand_ratio), nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.context_module(x)
        return self.local_module(x)


class Stem(nn.Sequential):
    def __init__(self, in_chs: int, out_chs: int, depth: int) -> None:
        super().__init__()
        self.add_module("in_conv", ConvNormAct(in_chs, out_chs, kernel_size=3, stride=2))
        for i in range(depth):
            self.add_module(f"res{i}", ResidualBlock(MBConv(out_chs, out_chs, expand_ratio=1), nn.Identity()))


class EfficientVit(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (8, 16, 24, 32), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = Stem(3, widths[0], depth=1)
        self.stages = nn.Sequential(
            ResidualBlock(MBConv(widths[0], widths[1], stride=2), None),
            ResidualBlock(MBConv(widths[1], widths[2], stride=2), None),
            EfficientVitBlock(widths[2]),
            ResidualBlock(MBConv(widths[2], widths[3], stride=2), None),
            EfficientVitBlock(widths[3]))
        self.head = nn.Sequential(ConvNormAct(widths[3], 64, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


ENTRIES = (
    ZooModel("efficientvit", "EfficientViT-MIT (ReLU linear attention, LiteMLA)", seeded(EfficientVit, 1801), (2, 3, 64, 64),
             "qkv 1x1 -> [dw5x5 -> grouped 1x1] aggregation + cat; reshape/transpose/chunk(3); ReLU kernel; F.pad(v, (0, 1), value=1.); q.float() round trip under autocast(enabled=False); out[..., :-1] / (out[..., -1:] + eps); ResidualBlock with Identity shortcut"),
)
