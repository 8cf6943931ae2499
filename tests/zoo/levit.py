"""LeViT: a conv stem, then attention on tokens with BatchNorm everywhere (Linear + BatchNorm1d).

Patterns reproduced (read in facebookresearch/LeViT ``levit.py`` and huggingface/pytorch-image-models
``timm/models/levit.py``): ``Conv2d_BN`` / ``Linear_BN`` as ``nn.Sequential`` subclasses with ``add_module('c'|'bn')``,
``Linear_BN.forward`` applying ``BatchNorm1d`` to ``x.flatten(0, 1)`` and ``reshape_as(x)``; a Hardswish conv
stem then ``x.flatten(2).transpose(1, 2)``; ``Residual(m)`` returning ``x + self.m(x)`` (a stochastic-depth mask
only in training); attention with ``qkv.view(B, N, heads, -1).split([key_dim, key_dim, d], dim=3)``, learned
biases indexed by a buffer of point offsets built from ``itertools.product`` and a dict, and the official
``train()`` override that caches ``self.ab = self.attention_biases[:, self.attention_bias_idxs]`` as a plain
attribute when switching to eval (so it is stale after ``.double()``); Hardswish before the output projection;
``Subsample`` via ``x.view(B, res, res, C)[:, ::stride, ::stride]``; an ``AttentionSubsample`` whose queries
come from the subsampled grid; a ``BN_Linear`` head (BatchNorm1d then Linear) on ``x.mean(1)``.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from ._base import ZooModel, seeded


class Conv2d_BN(nn.Sequential):
    def __init__(self, a: int, b: int, ks: int = 1, stride: int = 1, pad: int = 0, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, bias=False))
        bn = nn.BatchNorm2d(b)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0)
        self.add_module("bn", bn)


class Linear_BN(nn.Sequential):
    def __init__(self, a: int, b: int, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.add_module("c", nn.Linear(a, b, bias=False))
        bn = nn.BatchNorm1d(b)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0)
        self.add_module("bn", bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        l, bn = self._modules.values()
        x = l(x)
        return bn(x.flatten(0, 1)).reshape_as(x)


class BN_Linear(nn.Sequential):
    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(a))
        self.add_module("l", nn.Linear(a, b, bias=True))


class Residual(nn.Module):
    def __init__(self, m: nn.Module, drop: float = 0.0) -> None:
        super().__init__()
        self.m = m
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop > 0:
            return x + self.m(x) * torch.rand(x.size(0), 1, 1, device=x.device).ge_(self.drop).div(1 - self.drop).detach()
        return x + self.m(x)


def _bias_idxs(points_q: list[tuple[int, int]], points_k: list[tuple[int, int]], stride: int) -> tuple[int, torch.Tensor]:
    attention_offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for p1 in points_q:
        for p2 in points_k:
            offset = (abs(p1[0] * stride - p2[0]), abs(p1[1] * stride - p2[1]))
            if offset not in attention_offsets:
                attention_offsets[offset] = len(attention_offsets)
            idxs.append(attention_offsets[offset])
    return len(attention_offsets), torch.LongTensor(idxs).view(len(points_q), len(points_k))


class Attention(nn.Module):
    def __init__(self, dim: int, key_dim: int, num_heads: int = 2, attn_ratio: int = 2, resolution: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.nh_kd = nh_kd = key_dim * num_heads
        self.d = int(attn_ratio * key_dim)
        self.dh = int(attn_ratio * key_dim) * num_heads
        self.qkv = Linear_BN(dim, self.dh + nh_kd * 2)
        self.proj = nn.Sequential(nn.Hardswish(), Linear_BN(self.dh, dim, bn_weight_init=0))
        points = list(itertools.product(range(resolution), range(resolution)))
        n_offsets, idxs = _bias_idxs(points, points, 1)
        self.attention_biases = nn.Parameter(0.1 * torch.randn(num_heads, n_offsets))
        self.register_buffer("attention_bias_idxs", idxs)

    @torch.no_grad()
    def train(self, mode: bool = True) -> None:  # returns None, as the reference does
        super().train(mode)
        if mode and hasattr(self, "ab"):
            del self.ab
        else:
            self.ab = self.attention_biases[:, self.attention_bias_idxs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, N, C)
        B, N, C = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv.view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
        q = q.permute(0, 2, 1, 3)
        k = k.permute(0, 2, 1, 3)
        v = v.permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)) * self.scale + (
            self.attention_biases[:, self.attention_bias_idxs] if self.training else self.ab)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.dh)
        return self.proj(x)


class Subsample(nn.Module):
    def __init__(self, stride: int, resolution: int) -> None:
        super().__init__()
        self.stride = stride
        self.resolution = resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        x = x.view(B, self.resolution, self.resolution, C)[:, ::self.stride, ::self.stride]
        return x.reshape(B, -1, C)


class AttentionSubsample(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, key_dim: int, num_heads: int = 4, attn_ratio: int = 2,
                 stride: int = 2, resolution: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.nh_kd = nh_kd = key_dim * num_heads
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.resolution_ = (resolution - 1) // stride + 1
        self.resolution_2 = self.resolution_ ** 2
        self.kv = Linear_BN(in_dim, self.dh + nh_kd)
        self.q = nn.Sequential(Subsample(stride, resolution), Linear_BN(in_dim, nh_kd))
        self.proj = nn.Sequential(nn.Hardswish(), Linear_BN(self.dh, out_dim))
        points = list(itertools.product(range(resolution), range(resolution)))
        points_ = list(itertools.product(range(self.resolution_), range(self.resolution_)))
        n_offsets, idxs = _bias_idxs(points_, points, stride)
        self.attention_biases = nn.Parameter(0.1 * torch.randn(num_heads, n_offsets))
        self.register_buffer("attention_bias_idxs", idxs)

    @torch.no_grad()
    def train(self, mode: bool = True) -> None:  # returns None, as the reference does
        super().train(mode)
        if mode and hasattr(self, "ab"):
            del self.ab
        else:
            self.ab = self.attention_biases[:, self.attention_bias_idxs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.d], dim=3)
        k = k.permute(0, 2, 1, 3)
        v = v.permute(0, 2, 1, 3)
        q = self.q(x).view(B, self.resolution_2, self.num_heads, self.key_dim).permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)) * self.scale + (
            self.attention_biases[:, self.attention_bias_idxs] if self.training else self.ab)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, -1, self.dh)
        return self.proj(x)


class LeViT(nn.Module):
    def __init__(self, embed_dim: tuple[int, ...] = (16, 24), key_dim: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        n = embed_dim[0]
        self.patch_embed = nn.Sequential(
            Conv2d_BN(3, n // 8, 3, 2, 1), nn.Hardswish(),
            Conv2d_BN(n // 8, n // 4, 3, 2, 1), nn.Hardswish(),
            Conv2d_BN(n // 4, n // 2, 3, 2, 1), nn.Hardswish(),
            Conv2d_BN(n // 2, n, 3, 2, 1))

        def mlp(ed: int, h: int) -> nn.Module:
            return Residual(nn.Sequential(Linear_BN(ed, h), nn.Hardswish(), Linear_BN(h, ed, bn_weight_init=0)), 0.1)

        self.blocks = nn.Sequential(
            Residual(Attention(embed_dim[0], key_dim, 2, 2, resolution=4), 0.1), mlp(embed_dim[0], 2 * embed_dim[0]),
            AttentionSubsample(embed_dim[0], embed_dim[1], key_dim, num_heads=embed_dim[0] // key_dim, stride=2, resolution=4),
            mlp(embed_dim[1], 2 * embed_dim[1]),
            Residual(Attention(embed_dim[1], key_dim, 3, 2, resolution=2), 0.1), mlp(embed_dim[1], 2 * embed_dim[1]))
        self.head = BN_Linear(embed_dim[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x.flatten(2).transpose(1, 2)
        x = self.blocks(x)
        x = x.mean(1)
        return self.head(x)


ENTRIES = (
    ZooModel("levit", "LeViT (BN attention, subsampling attention)", seeded(LeViT, 1301), (2, 3, 64, 64),
             "Linear_BN: BatchNorm1d(x.flatten(0, 1)).reshape_as(x); Sequential subclasses; Residual x + m(x); qkv view/split; self.ab cached by train() override (stale after .double()); view(B, r, r, C)[:, ::s, ::s]; BN_Linear head"),
)
