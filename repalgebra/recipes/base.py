"""What every expansion recipe is built from: the conv being expanded, the block that replaces it, the recipe record.

A recipe turns one ``nn.Conv2d`` (and the ``nn.BatchNorm2d`` that reads it, if
any) into an :class:`ExpandedConv`: a sum of named parallel branches of plain
``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.AvgPool2d`` modules, every one of them
linear in eval mode, so :func:`repalgebra.fuse` folds the block back to one conv
with the original's geometry.

The first branch is the *main* branch: with ``init="preserve"`` it carries the
original kernel and a BN that computes, in eval mode, what the original BN (or
the original bias) computed; every other branch ends in a BN whose weight and
bias are 0, so it adds exactly zero until training moves it.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["Site", "ExpandedConv", "Recipe", "INITS", "silence", "conv_bn"]

INITS = ("preserve", "fresh")


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class Site:
    """One conv to expand, with the BN that reads its output (if any), and its geometry with padding resolved to numbers.

    ``padding`` is ``None`` when it cannot be written as numbers (``padding="same"`` with an even kernel).
    """

    path: str
    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | None
    dilation: tuple[int, int]

    @classmethod
    def of(cls, path: str, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> "Site":
        """The site of ``conv`` (at module path ``path``), followed by ``bn`` or not."""
        kernel, dilation = _pair(conv.kernel_size), _pair(conv.dilation)
        padding = conv.padding
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            padding = None if any(t % 2 for t in total) else (total[0] // 2, total[1] // 2)
        else:
            padding = _pair(padding)
        return cls(path, conv, bn, kernel, _pair(conv.stride), padding, dilation)

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    @property
    def groups(self) -> int:
        return self.conv.groups

    @property
    def centered(self) -> bool:
        """Odd kernel padded by half of it on each axis: the kernel's center tap reads the output pixel's own input pixel."""
        return all(k % 2 for k in self.kernel) and self.padding == (self.kernel[0] // 2, self.kernel[1] // 2)

    @property
    def has_identity(self) -> bool:
        """An identity branch fits: same channels in and out, stride 1, centered padding (output grid = input grid)."""
        return self.in_channels == self.out_channels and self.stride == (1, 1) and self.centered

    def new_conv(self, kernel=None, *, stride=None, padding=(0, 0), in_channels=None, out_channels=None) -> nn.Conv2d:
        """A bias-free conv of this site's groups, dtype and device (by default this site's channels and stride)."""
        w = self.conv.weight
        return nn.Conv2d(
            in_channels or self.in_channels, out_channels or self.out_channels, kernel or self.kernel,
            stride=stride or self.stride, padding=padding, groups=self.groups, bias=False, dtype=w.dtype, device=w.device,
        )

    def new_bn(self, channels: int | None = None) -> nn.BatchNorm2d:
        """A BN with the original BN's ``eps`` and ``momentum`` (PyTorch's defaults if there is none)."""
        w = self.conv.weight
        eps, momentum = (self.bn.eps, self.bn.momentum) if self.bn is not None else (1e-5, 0.1)
        return nn.BatchNorm2d(channels or self.out_channels, eps=eps, momentum=momentum, dtype=w.dtype, device=w.device)

    def main(self, init: str) -> nn.Sequential:
        """The main branch: a conv with this site's geometry, then a BN.

        ``preserve``: the original kernel, and a BN that in eval mode computes what
        followed the conv: a copy of the original BN with the conv's bias moved into
        its running mean, or (no BN) a pass-through whose bias is the conv's bias.
        ``fresh``: PyTorch's default initialization of both.
        """
        conv = self.new_conv(padding=self.padding)
        bn = self.new_bn()
        if init == "preserve":
            bias = self.conv.bias.detach() if self.conv.bias is not None else torch.zeros_like(bn.running_mean)
            with torch.no_grad():
                conv.weight.copy_(self.conv.weight)
                if self.bn is not None:
                    bn = copy.deepcopy(self.bn)
                    bn.running_mean.sub_(bias)
                else:  # BN(y) = (y - 0) / sqrt(1 + eps) * sqrt(1 + eps) + bias
                    bn.weight.fill_(math.sqrt(1.0 + bn.eps))
                    bn.bias.copy_(bias)
        return nn.Sequential(_named(conv=conv, bn=bn))


def conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Sequential:
    """``nn.Sequential`` with children ``conv`` and ``bn``."""
    return nn.Sequential(_named(conv=conv, bn=bn))


def _named(**modules: nn.Module) -> OrderedDict:
    return OrderedDict(modules)


def silence(branch: nn.Module) -> nn.Module:
    """``branch`` with its last BN's weight and bias set to 0, so it adds exactly zero (in eval and train mode)."""
    bns = [m for m in branch.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        bns[-1].weight.zero_()
        bns[-1].bias.zero_()
    return branch


class ExpandedConv(nn.Module):
    """One conv (and its BN) in expanded, trainable form: the sum of named parallel branches reading the same input.

    The branches are children under readable names (``kxk``, ``scale``,
    ``identity``, ...); the first is the main branch.  Called like the conv it
    replaces: one tensor in, one tensor out.
    """

    def __init__(self, recipe: str, branches: dict[str, nn.Module]) -> None:
        super().__init__()
        self.recipe = recipe
        self.branch_names = tuple(branches)
        for name, branch in branches.items():
            self.add_module(name, branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = getattr(self, self.branch_names[0])(x)
        for name in self.branch_names[1:]:
            out = out + getattr(self, name)(x)
        return out

    def extra_repr(self) -> str:
        return f"recipe={self.recipe!r}"


@dataclass(frozen=True)
class Recipe:
    """An expansion recipe: why it leaves a conv as is (``skip`` gives the reason, or None), and how it builds the block."""

    name: str
    skip: Callable[[Site], str | None]
    build: Callable[[Site, str], ExpandedConv]
    summary: str  # one line: the branches it adds

    def __str__(self) -> str:
        return f"{self.name}: {self.summary}"
