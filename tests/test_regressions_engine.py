"""Regressions found by fusing real models: each model here once failed to fuse or to run once fused.

Every test fuses in float64 and checks the fused module against the original
to 1e-12, at the traced input size and at another one (sizes read from shapes
are read again at run time).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repalgebra

D = torch.float64


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in float64, eval mode, with random weights and BN statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.num_features, generator=g))
    return model.to(D).eval()


def fused_equal(model: nn.Module, *shapes: tuple[int, ...]) -> nn.Module:
    """Fuse at the first shape; the fused module equals the model to 1e-12 at every shape (and fusing again keeps it so)."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(s, generator=g, dtype=D) for s in shapes]
    fused = repalgebra.fuse(model, xs[0])
    again = repalgebra.fuse(fused, xs[0])
    with torch.no_grad():
        for x in xs:
            want = model(x)
            for m in (fused, again):
                assert (m(x) - want).abs().max().item() <= 1e-12
    return fused


# --------------------------------------------------------------------------- 1: no lowering may need a contiguous input


class TokensAndBack(nn.Module):
    """Image to tokens (``flatten(2).transpose(1, 2)``), a Linear, tokens back to an image with ``reshape``."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.mix = nn.Linear(c, c)
        self.conv2 = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        y = self.bn(self.conv(x))
        t = self.mix(y.flatten(2).transpose(1, 2))
        z = t.transpose(1, 2).reshape(B, -1, H, W)  # non-contiguous input: reshape copies
        return self.conv2(z) + y


class ViewAfterContiguous(nn.Module):
    """``t.transpose(1, 2).contiguous().view(...)``: the front end maps ``contiguous`` to the identity.

    ``how`` picks how the sizes are written: read from shapes (the IR's
    ``reshape_dyn``), ``view_as``, or an expression the IR does not model
    (``//``: the call is carried through as it is).
    """

    def __init__(self, how: str, c: int = 8) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.mix = nn.Linear(c, c)
        self.conv2 = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.conv(x)
        t = self.mix(y.flatten(2).transpose(1, 2))
        B, N, C = t.shape
        u = t.transpose(1, 2).contiguous()
        if self.how == "shape":
            flat = u.view(B, C * N)
        elif self.how == "view_as":
            flat = u.view_as(y).flatten(1)
        else:
            flat = u.view(B, (C * N) // 1)
        return flat.sum(1, keepdim=True) + self.conv2(y).flatten(1)


def test_tokens_back_to_image_by_reshape_runs():
    fused = fused_equal(randomized(TokensAndBack()), (2, 3, 6, 6), (1, 3, 4, 5))
    assert fused.fuse_report.ops_after.get("batch_norm") is None


@pytest.mark.parametrize("how", ["shape", "view_as", "floordiv"])
def test_view_after_contiguous_runs(how):
    fused_equal(randomized(ViewAfterContiguous(how)), (2, 3, 6, 6), (1, 3, 4, 5))


def test_view_as_a_bit_cast_stays_a_view():
    class BitCast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x).view(torch.int64).view(torch.float64) * 2

    fused_equal(randomized(BitCast()), (2, 3, 4, 4))
