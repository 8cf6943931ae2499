"""Kernels a forward computes from its parameters on every call: folded once, at capture.

ECBSR's eval forward (and OREPA's, and DBB's ``get_equivalent_kernel_bias`` called in forward) builds its one
kernel from the training branches each call: a conv of one kernel by another (the 1x1-3x3 merge), a kernel
filled in item by item (``K = torch.zeros(...)``, ``K[i, i, 1, 1] = 1``), then sums.  torch.fx records that
arithmetic; the front end computes it on the constants once, so the fused graph holds one conv, as the
model's own deploy form would.  Compared in float64 to 1e-9 relative.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repalgebra

D = torch.float64


class EvalFormBlock(nn.Module):
    """A 3x3 conv, a 1x1-then-3x3 branch and an identity, merged into one kernel in ``forward`` (ECBSR's ECB)."""

    def __init__(self, c: int, how: str) -> None:
        super().__init__()
        self.how = how
        self.k3, self.b3 = nn.Parameter(torch.randn(c, c, 3, 3)), nn.Parameter(torch.randn(c))
        self.k0, self.b0 = nn.Parameter(torch.randn(2 * c, c, 1, 1)), nn.Parameter(torch.randn(2 * c))
        self.k1, self.b1 = nn.Parameter(torch.randn(c, 2 * c, 3, 3)), nn.Parameter(torch.randn(c))
        self.act = nn.PReLU(c)

    def kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        k = F.conv2d(self.k1, self.k0.permute(1, 0, 2, 3))  # the 1x1-3x3 sequence as one 3x3
        b = F.conv2d(torch.ones(1, self.k0.shape[0], 3, 3, dtype=self.k0.dtype) * self.b0.view(1, -1, 1, 1), self.k1)
        k, b = k + self.k3, b.view(-1) + self.b1 + self.b3
        if self.how == "identity":
            eye = torch.zeros(k.shape[0], k.shape[0], 3, 3, dtype=k.dtype)
            for i in range(k.shape[0]):
                eye[i, i, 1, 1] = 1.0
            k = k + eye
        return k, b

    def forward(self, x):
        k, b = self.kernel()
        return self.act(F.conv2d(x, k, b, padding=1))


@pytest.mark.parametrize("how", ["branches", "identity"])
def test_a_kernel_made_from_the_weights_in_forward_folds_into_one_conv(how):
    torch.manual_seed(0)
    model = EvalFormBlock(4, how).to(D).eval()
    x = torch.randn(2, 4, 8, 8, dtype=D)
    fused = repalgebra.fuse(model, x)
    assert fused.fuse_report.capture == "fx" and fused.fuse_report.ops_after == {"conv2d": 1, "prelu": 1}, str(fused.fuse_report)
    # The deploy form: one kernel and its bias, and the PReLU's slopes (a copy of the block, which no rule changes,
    # was returned and built its kernel on every call, found by a probe).
    assert sum(p.numel() for p in fused.parameters()) == 4 * 4 * 9 + 4 + 4
    with torch.no_grad():
        for shape in ((2, 4, 8, 8), (1, 4, 5, 7)):
            y = torch.randn(*shape, dtype=D)
            want, got = model(y), fused(y)
            assert float((want - got).abs().max() / want.abs().max()) < 1e-9



class SizedFromWeights(nn.Module):
    """OREPA's kernel generation: sizes read from weights (``t, ig = w.size()``) and computed with in Python
    (``int(t / g)``), then a grouped 1x1-kxk merge by einsum and a BN after the conv."""

    def __init__(self, c: int = 4, g: int = 2) -> None:
        super().__init__()
        self.g = g
        self.w1 = nn.Parameter(torch.randn(c, c // g, 1, 1))
        self.w2 = nn.Parameter(torch.randn(c, c // g, 3, 3))
        self.bn = nn.BatchNorm2d(c)

    def weight(self) -> torch.Tensor:
        t, ig = self.w1.squeeze().size()
        o, tg, h, w = self.w2.size()
        w1 = self.w1.squeeze().view(self.g, int(t / self.g), ig)
        w2 = self.w2.view(self.g, int(o / self.g), tg, h, w)
        return torch.einsum("gti,gothw->goihw", w1, w2).reshape(o, ig, h, w)

    def forward(self, x):
        return self.bn(F.conv2d(x, self.weight(), padding=1, groups=self.g))


def test_sizes_read_from_the_weights_are_numbers_and_the_capture_stays_free():
    torch.manual_seed(0)
    model = SizedFromWeights().to(D).eval()
    fused = repalgebra.fuse(model, torch.randn(1, 4, 8, 8, dtype=D))
    assert fused.fuse_report.capture == "fx" and fused.fuse_report.ops_after == {"conv2d": 1}, str(fused.fuse_report)
    with torch.no_grad():
        for shape in ((2, 4, 5, 9), (1, 4, 16, 16)):  # not the example's: an fx capture holds at any size
            y = torch.randn(*shape, dtype=D)
            want, got = model(y), fused(y)
            assert float((want - got).abs().max() / want.abs().max()) < 1e-9


class FakeQuantConvBN(nn.Module):
    """A QAT conv: its weight fake-quantized in every forward (by hand, LSQ-style, or torch's op), then a BatchNorm."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.register_buffer("scale", torch.full((8,), 0.05))

    def forward(self, x):
        w = self.conv.weight
        if self.how == "round":
            w = (w / 0.05).round().clamp(-8, 7) * 0.05
        else:
            w = torch.fake_quantize_per_channel_affine(w, self.scale, torch.zeros(8, dtype=torch.int32), 0, -8, 7)
        return self.bn(F.conv2d(x, w, None, 1, 1))


@pytest.mark.parametrize("how", ["round", "fake_quantize"])
def test_a_weight_fake_quantized_in_forward_folds_with_its_batch_norm(how):
    """The quantized weight is a function of the weights alone: its BatchNorm folds into one conv (it was left, the
    rounding a call the front end did not compute)."""
    model = FakeQuantConvBN(how).eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.running_mean.normal_(0, 0.1)
    x = torch.randn(2, 3, 16, 16)
    fused = repalgebra.fuse(model, x)
    assert fused.fuse_report.ops_after.get("batch_norm", 0) == 0 and fused.fuse_report.ops_after["conv2d"] == 1, str(fused.fuse_report)
    for other in (x, torch.randn(3, 3, 12, 20)):
        with torch.no_grad():
            torch.testing.assert_close(fused(other), model(other), rtol=1e-5, atol=1e-5)


class UnmergedLoRA(nn.Module):
    """loralib's layers with ``merge_weights=False``: a conv whose weight is ``W + (B @ A).view(...) * s``
    (``ConvLoRA``), and a Linear whose delta is scattered into ``x.new_zeros`` and applied transposed with ``.T``
    (``MergedLinear``), each followed by a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv_a, self.conv_b = nn.Parameter(torch.randn(6, 9) * 0.3), nn.Parameter(torch.randn(24, 6) * 0.3)
        self.lin, self.bn1 = nn.Linear(8, 12), nn.BatchNorm1d(12)
        self.lin_a, self.lin_b = nn.Parameter(torch.randn(2, 8) * 0.3), nn.Parameter(torch.randn(8, 1) * 0.3)

    def forward(self, x):
        w = self.conv.weight + (self.conv_b @ self.conv_a).view(self.conv.weight.shape) * 2.0
        y = self.bn(self.conv._conv_forward(x, w, None)).mean((2, 3))
        delta = self.lin_a.new_zeros(12, 8)
        delta[:8] = self.lin_b @ self.lin_a[:1]
        return self.bn1(y @ (self.lin.weight.T + delta.T) + self.lin.bias)


def test_a_low_rank_update_written_with_matmul_operators_folds():
    """``B @ A``, ``.T`` and ``new_zeros`` were not taken for functions of the weights: the conv and the Linear were
    carried as calls and the BatchNorms after them stayed (found by a probe)."""
    torch.manual_seed(0)
    model = UnmergedLoRA().to(D).eval()
    with torch.no_grad():
        for bn in (model.bn, model.bn1):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    fused = repalgebra.fuse(model, x)
    assert "batch_norm" not in fused.fuse_report.ops_after, str(fused.fuse_report)
    with torch.no_grad():
        y = torch.randn(3, 3, 6, 6, dtype=D)
        want, got = model(y), fused(y)
        assert float((want - got).abs().max() / want.abs().max()) < 1e-9


class HoldsFewerWeights(nn.Module):
    """Graphs holding fewer weights than the module, with no kernel made: a buffer read for its dtype only
    (``x.to(self.dummy.dtype)``), or a branch on a size the example does not take."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.small, self.big = how, nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 5, padding=2)
        self.register_buffer("dummy", torch.zeros(1))

    def forward(self, x):
        if self.how == "dtype":
            return self.small(x.to(self.dummy.dtype))
        return self.big(x) if x.shape[-1] > 8 else self.small(x)


@pytest.mark.parametrize("how", ["dtype", "size"])
def test_a_graph_holding_fewer_weights_without_a_kernel_made_is_not_taken(how):
    """Taken for a made kernel, such a graph held the cast at float32 (``fused.double()`` rounded the input) or the
    example's branch (other sizes refused), where a copy of the part, returned before, runs as the model does
    (found by a review)."""
    torch.manual_seed(0)
    model = HoldsFewerWeights(how).eval()
    fused = repalgebra.fuse(model, torch.randn(2, 3, 8, 8))
    assert type(fused) is HoldsFewerWeights, str(fused.fuse_report)
    with torch.no_grad():
        x = torch.randn(1, 3, 16, 16, dtype=D) * 1e3
        torch.testing.assert_close(fused.double()(x), model.double()(x), rtol=1e-12, atol=1e-12)


def _bn_folded_conv(bn: nn.BatchNorm2d, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The conv with the BN's eval transform folded into its kernel on the fly (mmcv's efficient conv-BN eval)."""
    scale = (bn.weight * torch.rsqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_var)
    return conv._conv_forward(x, conv.weight * scale, bn.bias + scale.flatten() * (bias - bn.running_mean))


class SwapsConvForward(nn.Module):
    """A conv, a BN and a ReLU that in eval sets ``self.conv.forward`` to a function of the BN and the conv for one
    call, then deletes it (mmcv's ``ConvModule(efficient_conv_bn_eval=True)``, an mmdet/mmseg config option)."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout)

    def forward(self, x):
        if not self.bn.training:
            self.conv.forward = functools.partial(_bn_folded_conv, self.bn, self.conv)
            x = self.conv(x)
            del self.conv.forward
        else:
            x = self.bn(self.conv(x))
        return torch.relu(x)


def test_a_forward_set_on_a_conv_for_one_call_is_traced_and_folds():
    """The trace took the conv for a layer of torch's and recorded a plain conv; the check caught the missing BN, and
    the model came back unfused ("nothing to fold"), its kernel folded again on every call (review R9).  The
    function set on the instance is what runs: traced, it folds to one conv with no BatchNorm left."""
    torch.manual_seed(0)
    model = nn.Sequential(SwapsConvForward(4, 8, 3), SwapsConvForward(8, 8, 1)).to(D).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
    x = torch.randn(2, 4, 8, 8, dtype=D)
    fused = repalgebra.fuse(model, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules()), str(fused.fuse_report)
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 2, str(fused.fuse_report)
    with torch.no_grad():
        other = torch.randn(3, 4, 10, 12, dtype=D)
        torch.testing.assert_close(fused(other), model(other), rtol=1e-9, atol=1e-12)
