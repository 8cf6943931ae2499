"""Mamba's decoding step as a model library writes it: a cache the caller passes, written in place and returned.

Shared by the tests of ``fuse`` (the caller's example must come back untouched) and of ``export_onnx`` (the file
writes the cache as the model does).
"""

from __future__ import annotations

import torch
from torch import nn


class StreamingConv(nn.Module):
    """Mamba's decoding step: a depthwise conv over a cache of the last 3 inputs, shifted and written in place
    (``cache.copy_(torch.roll(cache, -1, -1)); cache[:, :, -1] = x``) and returned."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.proj, self.norm = nn.Linear(c, c), nn.BatchNorm1d(c)
        self.norm.running_mean.normal_(), self.norm.running_var.uniform_(0.5, 2)
        self.norm.weight.data.uniform_(0.5, 1.5), self.norm.bias.data.normal_()
        self.w = nn.Parameter(torch.randn(c, 3))

    def forward(self, x, cache):
        x = self.norm(self.proj(x))
        cache.copy_(torch.roll(cache, shifts=-1, dims=-1))
        cache[:, :, -1] = x
        return torch.sum(cache * self.w, dim=-1), cache


class StreamingBlock(nn.Module):
    """The cache-writing conv as a child, as Mamba's block calls its mixer."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.scale = nn.Parameter(1 + 0.3 * torch.randn(c))
        self.mixer = StreamingConv(c)

    def forward(self, x, cache):
        out, cache = self.mixer(x * self.scale, cache)
        return x + out, cache
