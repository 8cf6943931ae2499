"""Python tests of sizes and sizes read as numbers, taken as at the example and checked on every call.

``if D > 3:`` (PointNet), ``int(c) ** -0.5`` (the Stable Diffusion VAE's attention), ``range(x.shape[1])``:
torch.fx had no Python value to give, and the model went to torch.export with every size fixed.  The trace now
takes them as at the example, and the fused model checks them per call (:mod:`repalgebra.frontend.size_tests`).
Tolerances: float64 models, folded in float64, compared to 1e-9 relative.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repalgebra import fuse
from zoo import count_bn, seeded

D = torch.float64


def same(fused: nn.Module, model: nn.Module, *xs: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(fused(*xs), model(*xs), rtol=1e-9, atol=1e-12)


class PointFeatures(nn.Module):
    """PointNet's encoder (yanx27's): extra features past xyz split off where the input has them, ``if D > 3:``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv1d(6, 16, 1), nn.BatchNorm1d(16)

    def forward(self, x):
        B, D, N = x.size()
        h = F.relu(self.bn(self.conv(x)))
        if D > 3:
            xyz, extra = x[:, :3], x[:, 3:]
            return torch.cat([h, xyz * 2, extra], 1)
        return h


class VAEAttention(nn.Module):
    """The Stable Diffusion VAE's attention block (taming-transformers' AttnBlock): ``w_ * (int(c) ** -0.5)``, and a
    loop over the channels read as a number."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(2, c)
        self.q, self.k, self.v = (nn.Conv2d(c, c, 1) for _ in range(3))
        self.out = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)
        w_ = torch.bmm(q, k.reshape(b, c, hh * ww)) * (int(c) ** (-0.5))
        h = torch.bmm(v.reshape(b, c, hh * ww), F.softmax(w_, dim=2).permute(0, 2, 1)).reshape(b, c, hh, ww)
        scaled = sum(h[:, i : i + 1] * (i + 1) for i in range(x.shape[1]))
        return x + self.out(h) + scaled


@pytest.mark.parametrize("make, example, others", [
    (PointFeatures, (2, 6, 32), [(3, 6, 32), (1, 6, 50)]),
    (VAEAttention, (2, 8, 6, 6), [(3, 8, 5, 7), (1, 8, 4, 4)]),
])
def test_a_test_of_sizes_is_taken_as_at_the_example_and_the_rest_stays_free(make, example, others):
    """The channel count is the same for every input: the fused model runs at any batch and length, as the model."""
    model = seeded(make, 0)().to(D)
    fused = fuse(model, torch.randn(*example, dtype=D))
    assert fused.fuse_report.capture == "fx" and count_bn(fused) == 0, str(fused.fuse_report)
    assert any("taken as at the example" in n and "sizes answer otherwise" in n for n in fused.fuse_report.notes)
    for shape in others:
        same(fused, model, torch.randn(*shape, dtype=D))


class PoolsWide(nn.Module):
    """A branch on the input's width: pooled where it is wider than 12."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        y = self.body(x)
        if x.shape[-1] > 12:
            y = F.avg_pool2d(y, 2)
        return y


def test_inputs_whose_sizes_take_the_other_branch_are_refused_by_name():
    """The fused graph holds the example's branch only: a call whose sizes answer otherwise raises, naming the test,
    rather than compute the pooled branch where the model does not pool."""
    model = seeded(PoolsWide, 0)().to(D)
    fused = fuse(model, torch.randn(2, 3, 16, 16, dtype=D))
    assert fused.fuse_report.capture == "fx", str(fused.fuse_report)
    same(fused, model, torch.randn(3, 3, 14, 20, dtype=D))
    with pytest.raises(ValueError, match=r"a test of sizes \(if D > 3:\) gave True at the example input.*these inputs give False"):
        fused(torch.randn(1, 3, 8, 8, dtype=D))


class PoolsWideInside(PoolsWide):
    """The same branch on the width of a value computed inside (a strided conv's output)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        y = self.body(x)
        if y.shape[-1] > 6:
            y = F.avg_pool2d(y, 2)
        return y


def test_a_test_of_a_size_computed_inside_is_not_taken():
    """The fused graph's checks read its inputs: a test of the size of a value computed inside cannot be made per
    call, so the trace does not take it, and the model is captured at its example's sizes as before."""
    model = seeded(PoolsWideInside, 0)().to(D)
    fused = fuse(model, torch.randn(2, 3, 16, 16, dtype=D))
    assert "tests the size of a value computed inside the model" in str(fused.fuse_report), str(fused.fuse_report)
    same(fused, model, torch.randn(2, 3, 16, 16, dtype=D))
    with pytest.raises(ValueError):
        fused(torch.randn(2, 3, 8, 8, dtype=D))
