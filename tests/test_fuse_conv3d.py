"""3-D RepVGG blocks (video and volume backbones): each block folds to one ``conv3d``.

The block is written as public 3-D RepVGG backbones write it (a port of RepVGG's ``conv_bn`` with ``nn.Conv3d`` and
``nn.BatchNorm3d``): a kxkxk conv + BN, a 1x1x1 conv + BN (padding ``k // 2`` less) and, at stride 1 with equal
widths, an identity BatchNorm3d, summed, then ReLU.  ``bn_fold`` folds the BNs, ``bn_to_conv`` makes the identity
BN a 1x1x1 conv, ``kernel_pad`` grows the 1x1x1 kernels to kxkxk and ``branch_sum`` adds them.  Exactness in float64
to 1e-9 relative (``verify``'s float64 tolerance) at the example input and at other batches, depths and sizes (the fx
capture runs at any size).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from test_fuse_conv1d import assert_exact_at  # float64, to 1e-9 relative, at each shape

from repalgebra import fuse
from zoo import count_bn, seeded
from zoo.vnet import ContBatchNorm3d, VNet

D = torch.float64


def conv_bn(cin: int, cout: int, k: int, stride: int, padding: int, groups: int = 1) -> nn.Sequential:
    block = nn.Sequential()
    block.add_module("conv", nn.Conv3d(cin, cout, k, stride, padding, groups=groups, bias=False))
    block.add_module("bn", nn.BatchNorm3d(cout))
    return block


class RepVGGBlock3d(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        padding = k // 2
        self.rbr_identity = nn.BatchNorm3d(cin) if cout == cin and stride == 1 else None
        self.rbr_dense = conv_bn(cin, cout, k, stride, padding, groups)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, padding - k // 2, groups)
        self.nonlinearity = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.nonlinearity(self.rbr_dense(x) + self.rbr_1x1(x) + id_out)


@given(k=st.sampled_from([3, 5]), groups=st.sampled_from([1, 2]), stride=st.sampled_from([1, 2]), widths=st.sampled_from([(4, 4), (4, 8)]))
def test_a_3d_repvgg_stack_folds_to_one_conv3d_per_block(k, groups, stride, widths):
    cin, cout = widths

    def make() -> nn.Module:
        return nn.Sequential(RepVGGBlock3d(cin, cout, k, stride, groups), RepVGGBlock3d(cout, cout, k, 1, groups))

    model = seeded(make, 0)().to(D)
    fused = fuse(model, torch.randn(2, cin, 5, 7, 6, dtype=D))
    after = fused.fuse_report.ops_after
    assert count_bn(fused) == 0 and after == {"conv3d": 2, "relu": 2}, str(fused.fuse_report)
    assert_exact_at(model, fused, [(2, cin, 5, 7, 6), (1, cin, 8, 5, 9), (3, cin, 3, 4, 4)])


class UnevenBranches(nn.Module):
    """A stride-2 3x3x3 conv (padding 1) beside a 2x2x2 one (padding 0), equal in size at even sizes: the 2x2x2
    would have to grow on the first side of each axis only, which a conv3d's padding (both sides alike) cannot
    say.  The two stay apart, each with its BN folded."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(4, 4, 3, 2, 1), conv_bn(4, 4, 2, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def test_3d_branches_whose_kernels_would_grow_unevenly_stay_apart():
    model = seeded(UnevenBranches, 0)().to(D)
    fused = fuse(model, torch.randn(2, 4, 4, 6, 6, dtype=D))
    r = fused.fuse_report
    assert count_bn(fused) == 0 and r.ops_after == {"conv3d": 2, "add": 1}, str(r)
    assert any("at the example's size only" in la.reason for la in r.left_alone), str(r)
    assert_exact_at(model, fused, [(2, 4, 4, 6, 6), (1, 4, 8, 4, 6)])


def test_a_vnet_folds_its_transposed_convs_and_keeps_batch_statistics_norms_whole():
    """V-Net's up transitions are a ``ConvTranspose3d`` + BN: with ``nn.BatchNorm3d`` every BN folds, the two after
    the transposed convs too (they were left as BatchNorms: there was no ``conv_transpose3d`` op).  With the
    original's ``ContBatchNorm3d``, which normalizes with the batch's own statistics in eval mode too, nothing may
    fold: the fused model must still follow each batch."""
    model = seeded(VNet, 5)().to(D)
    fused = fuse(model, torch.randn(2, 1, 8, 8, 8, dtype=D))
    assert count_bn(fused) == 0 and fused.fuse_report.ops_after.get("conv_transpose3d") == 2
    assert_exact_at(model, fused, [(2, 1, 8, 8, 8), (1, 1, 16, 8, 24)])

    batch_stats = seeded(VNet, 5, norm=ContBatchNorm3d)().to(D)
    x = torch.randn(2, 1, 8, 8, 8, dtype=D)
    fused = fuse(batch_stats, x)
    assert count_bn(fused) == count_bn(batch_stats)
    for shape in [(2, 1, 8, 8, 8), (3, 1, 8, 16, 8)]:
        x = torch.randn(shape, dtype=D)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), batch_stats(x), rtol=1e-9, atol=1e-12)  # float64: the same ops


@pytest.mark.parametrize("kernel, dilation", [((2, 3, 3), 1), ((3, 4, 2), 1), ((2, 2, 2), (1, 2, 3))])
def test_a_same_padded_conv3d_of_an_even_kernel_folds_its_batchnorm(kernel, dilation):
    """``Conv3d(padding='same')`` with an even kernel (a video net's 2-frame temporal conv) pads the end of an axis
    one more, which ``conv3d``'s symmetric padding cannot say: the conv was carried whole and its BatchNorm3d stayed
    (found by a probe).  The extra row is a ``pad_nd`` before the conv now, and the BatchNorm folds."""
    model = seeded(lambda: nn.Sequential(nn.Conv3d(4, 6, kernel, padding="same", dilation=dilation), nn.BatchNorm3d(6),
                                         nn.ReLU()), 0)().double()
    fused = fuse(model, torch.randn(1, 4, 6, 7, 8, dtype=D))
    assert count_bn(fused) == 0, str(fused.fuse_report)
    assert_exact_at(model, fused, [(1, 4, 6, 7, 8), (2, 4, 5, 9, 6), (1, 4, 8, 8, 8)])
