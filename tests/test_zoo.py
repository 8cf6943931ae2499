"""``repalgebra.fuse`` on every model of the zoo (``tests/zoo/``): it fuses, it is exact, it folds what a conv can absorb.

Each model runs in float64, so the fused model must equal it to ``1e-9`` relative (the float64 tolerance of
``repalgebra.verify``), on the example input and on a second random input of the same shape (a capture with
shapes fixed at the example input is valid at that shape only).  BatchNorms left anywhere in the fused module
(also inside parts kept whole) must be no more than ``torch.fx.experimental.optimization.fuse`` leaves, where
that runs at all.  Fusing must not add work: the fused model's FLOPs (PyTorch's count) are at most the model's.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from repalgebra import fuse, verify
from zoo import ZOO, count_bn, fx_fused_bn_count

D = torch.float64


def flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward in convolutions, matrix products and attention (PyTorch's own count; pools and
    elementwise ops are not counted)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
def test_zoo_model_fuses_exactly(entry):
    model = entry.build().to(D).eval()
    x = torch.randn(entry.input_shape, dtype=D, generator=torch.Generator().manual_seed(0))
    fused = fuse(model, x)
    report = fused.fuse_report
    assert verify(model, fused, x, n=2), str(report)  # float64: 1e-9 relative
    left = count_bn(fused)
    baseline = fx_fused_bn_count(model)
    assert baseline is None or left <= baseline, f"{left} BatchNorms left, torch.fx's fuse leaves {baseline}\n{report}"
    assert left <= count_bn(model)
    # Fusing never adds work: no more multiply-adds in convs and matrix products than the model has.
    assert flops(fused, x) <= flops(model, x), f"{flops(fused, x)} FLOPs fused, {flops(model, x)} before\n{report}"
    # Every zoo model is captured whole by fx or torch.export: a part kept whole is a regression (a hazard check
    # grown too cautious, a capture that stopped holding), even where the result is still exact.
    assert not [p.path for p in report.parts if p.how == "kept whole"], str(report)


def test_frozen_batch_norms_fold_into_their_convs():
    """torchvision's ``FrozenBatchNorm2d`` is arithmetic on buffers (``x * scale + bias``), not a BatchNorm layer:
    ``count_bn`` does not see it, so this checks its ops are gone (``scale_fold`` and ``bias_fold``)."""
    entry = next(e for e in ZOO if e.name == "backbone_fpn")
    model = entry.build().to(D)
    x = torch.randn(entry.input_shape, dtype=D, generator=torch.Generator().manual_seed(0))
    report = fuse(model, x).fuse_report
    frozen = sum(type(m).__name__ == "FrozenBatchNorm2d" for m in model.modules())
    assert report.ops_before["scale"] == report.ops_before["add_const"] == frozen, str(report)
    assert "scale" not in report.ops_after and "add_const" not in report.ops_after, str(report)
    assert report.capture == "fx", str(report)  # the OrderedDict output no longer keeps the model whole


def test_weight_standardization_is_computed_once():
    """NFNet's ``ScaledStdConv2d`` standardizes its weight parameter in every forward: the fused model holds the
    standardized weight in a plain conv, and carries nothing opaque."""
    entry = next(e for e in ZOO if e.name == "nfnet")
    model = entry.build().to(D)
    x = torch.randn(entry.input_shape, dtype=D, generator=torch.Generator().manual_seed(0))
    fused = fuse(model, x)
    assert "opaque" not in fused.fuse_report.ops_after and not fused.fuse_report.opaque, str(fused.fuse_report)
    convs = sum(type(m).__name__ == "ScaledStdConv2d" for m in model.modules())
    assert fused.fuse_report.ops_after["conv2d"] >= convs, str(fused.fuse_report)


def test_diverse_branch_blocks_fold_to_one_conv_each():
    """DBB's BNAndPadLayer writes bn(0) into a zero pad's border (border_fill), its pool branch has a BN after the
    pool (avg_pool_to_conv through the BN): each block ends as the one conv its own switch_to_deploy gives."""
    entry = next(e for e in ZOO if e.name == "dbb")
    model = entry.build().to(D)
    x = torch.randn(entry.input_shape, dtype=D, generator=torch.Generator().manual_seed(0))
    fused = fuse(model, x)
    blocks = sum(type(m).__name__ == "DiverseBranchBlock" for m in model.modules())
    assert fused.fuse_report.ops_after.get("conv2d") == blocks, str(fused.fuse_report)
    assert count_bn(fused) == 0 and not fused.fuse_report.left_alone, str(fused.fuse_report)
