"""repalgebra.expand: the expanded model folds back, with fuse, to the original architecture and (init="preserve") function.

The two guarantees, for every recipe, over random plain nets (``repalgebra.testing.plain_conv_nets``)
and zoo models:

1. ``fuse(expand(m))`` has exactly ``m``'s convs (kernel shapes, strides, paddings, dilations,
   groups) and, with ``init="preserve"``, computes ``m``'s function in float64 (rel <= 1e-9);
2. after a few optimizer steps in train mode (BN on batch statistics, running statistics
   updated), ``fuse(expanded)`` computes ``expanded``'s eval-mode function in float64 and
   still has ``m``'s convs.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import repalgebra
from repalgebra.expand import ExpandError, conv_uses
from repalgebra.recipes import RECIPES, ExpandedConv, mobileone
from repalgebra.testing import plain_conv_nets

sys.path.insert(0, str(Path(__file__).parent))
from zoo import zoo_model  # noqa: E402

RECIPE_NAMES = sorted(RECIPES)
RTOL = 1e-9  # float64


def conv_signature(model: nn.Module) -> list[tuple]:
    """Every conv of ``model`` as (weight shape, stride, padding, dilation, groups), sorted."""
    return sorted(
        (tuple(c.weight.shape), tuple(c.stride), tuple(c.padding), tuple(c.dilation), c.groups)
        for c in model.modules() if isinstance(c, nn.Conv2d)
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-300)).item()


def state_bits(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def train_steps(model: nn.Module, shape: tuple[int, ...], steps: int = 3, seed: int = 0) -> None:
    """A few SGD steps in train mode on random data (BN on batch statistics), then eval mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def silenced_moved(expanded: nn.Module) -> bool:
    """Whether training moved some branch that started at zero (its last BN's weight is no longer 0)."""
    for block in expanded.modules():
        if isinstance(block, ExpandedConv):
            for name in block.branch_names[1:]:
                bns = [m for m in getattr(block, name).modules() if isinstance(m, nn.BatchNorm2d)]
                if bool(bns[-1].weight.detach().abs().max() > 0):
                    return True
    return False


# ---------------------------------------------------------------- guarantee 1: fuse(expand(m)) == m


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
@settings(max_examples=15)
@given(net=plain_conv_nets())
def test_fuse_of_expanded_plain_net_is_the_original(recipe, net):
    m, x = net.model, torch.randn(net.input_shape, dtype=torch.float64)
    before = state_bits(m)
    expanded = repalgebra.expand(m, recipe, x)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items()), "expand changed the user's model"
    assert not any(t.training for t in m.modules())
    report = expanded.expand_report
    convs = [p for p, c in m.named_modules() if isinstance(c, nn.Conv2d)]
    assert sorted([*(e.path for e in report.expanded), *(s.path for s in report.skipped)]) == sorted(convs)
    assert all(s.reason for s in report.skipped)
    fused = repalgebra.fuse(expanded, x)
    assert conv_signature(fused) == conv_signature(m), f"{fused.fuse_report}"
    with torch.no_grad():
        assert rel_err(m(x), fused(x)) <= RTOL
        assert rel_err(m(x), expanded(x)) <= RTOL


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
@settings(max_examples=8)
@given(net=plain_conv_nets(max_convs=3), init=st.sampled_from(["preserve", "fresh"]), seed=st.integers(0, 2**16))
def test_trained_expanded_plain_net_fuses_exactly_to_the_original_architecture(recipe, net, init, seed):
    m, x = net.model, torch.randn(net.input_shape, dtype=torch.float64)
    expanded = repalgebra.expand(m, recipe, init=init)
    train_steps(expanded, net.input_shape, seed=seed)  # (the zoo test below checks that training moves the added branches)
    fused = repalgebra.fuse(expanded, x)
    assert conv_signature(fused) == conv_signature(m), f"{fused.fuse_report}"
    with torch.no_grad():
        assert rel_err(expanded(x), fused(x)) <= RTOL


ZOO_MODELS = ["resnet_basic", "mobilenetv3", "regnety", "pvt_v2"]


@pytest.mark.parametrize("name", ZOO_MODELS)
@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_zoo_model_expands_and_fuses_back(name, recipe):
    entry = zoo_model(name)
    m = entry.build().double()
    x = torch.randn(entry.input_shape, dtype=torch.float64)
    expanded = repalgebra.expand(m, recipe, x)
    assert expanded.expand_report.expanded
    assert expanded.expand_report.params_after > expanded.expand_report.params_before
    fused = repalgebra.fuse(expanded, x)
    assert conv_signature(fused) == conv_signature(repalgebra.fuse(m, x)), f"{fused.fuse_report}"
    with torch.no_grad():
        assert rel_err(m(x), fused(x)) <= RTOL


@pytest.mark.parametrize("name,recipe", [("resnet_basic", "dbb"), ("mobilenetv3", "mobileone")])
def test_trained_zoo_model_fuses_exactly(name, recipe):
    entry = zoo_model(name)
    m = entry.build().double()
    x = torch.randn(entry.input_shape, dtype=torch.float64)
    expanded = repalgebra.expand(m, recipe)
    train_steps(expanded, entry.input_shape, steps=2)
    assert silenced_moved(expanded)
    fused = repalgebra.fuse(expanded, x)
    assert conv_signature(fused) == conv_signature(repalgebra.fuse(m, x))
    with torch.no_grad():
        assert rel_err(expanded(x), fused(x)) <= RTOL


class ReadsItsShape(nn.Module):
    """A strided conv whose output's ``.shape`` the forward reads (PVT's patch embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 3, stride=2, padding=1)

    def forward(self, x):
        y = self.proj(x)
        _, _, h, w = y.shape
        tokens = y.flatten(2).transpose(1, 2)
        return tokens.transpose(1, 2).reshape(-1, 8, h, w).relu()


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_a_read_of_the_blocks_shape_does_not_keep_a_branch_alive(recipe):
    """The shape read sits on the sum of the branches and moves with the fold (frontend/shapes.py), not on a branch."""
    m = ReadsItsShape().double().eval()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    fused = repalgebra.fuse(repalgebra.expand(m, recipe), x)
    assert conv_signature(fused) == conv_signature(m), f"{fused.fuse_report}"
    with torch.no_grad():
        assert rel_err(m(x), fused(x)) <= RTOL


# ---------------------------------------------------------------- what expand builds


def test_preserve_is_the_same_function_in_train_mode_where_every_conv_had_a_bn():
    entry = zoo_model("resnet_basic")
    m = entry.build().double()
    expanded = repalgebra.expand(m, "repvgg")
    assert all(e.bn for e in expanded.expand_report.expanded), "ResNet's convs are each read by their BN"
    x = torch.randn(entry.input_shape, dtype=torch.float64)
    a, b = copy.deepcopy(m).train(), copy.deepcopy(expanded).train()
    assert rel_err(a(x), b(x)) <= RTOL


def test_blocks_have_readable_branches_and_the_bn_moves_in():
    m = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()).double()
    e = repalgebra.expand(m, "repvgg")
    assert isinstance(e[0], ExpandedConv) and isinstance(e[1], nn.Identity)
    assert e[0].branch_names == ("kxk", "scale", "identity")
    assert [k for k in e.state_dict() if k.endswith("weight")] == ["0.kxk.conv.weight", "0.kxk.bn.weight", "0.scale.conv.weight",
                                                                    "0.scale.bn.weight", "0.identity.weight"]
    assert torch.equal(e[0].kxk.conv.weight, m[0].weight) and e[0].kxk.conv.weight is not m[0].weight
    assert e[0].scale.bn.weight.abs().max() == 0 and e[0].identity.weight.abs().max() == 0
    d = repalgebra.expand(m, "dbb")[0]
    assert d.branch_names == ("kxk", "scale", "one_kxk", "one_avg")
    assert d.one_kxk.conv1.padding == (1, 1) and d.one_kxk.conv2.padding == (0, 0) and d.one_avg.avg.padding == 0
    a = repalgebra.expand(m, "acnet")[0]
    assert (a.horizontal.conv.kernel_size, a.vertical.conv.kernel_size) == ((1, 3), (3, 1))


def test_a_model_that_is_one_conv_becomes_one_block():
    conv = nn.Conv2d(4, 4, 3, padding=1).double()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    e = repalgebra.expand(conv, "acnet", x)
    assert isinstance(e, ExpandedConv) and [x.path for x in e.expand_report.expanded] == [""]
    assert conv_signature(repalgebra.fuse(e, x)) == conv_signature(conv)


@pytest.mark.parametrize("k", [1, 4])
def test_mobileone_k_branches(k):
    m = nn.Sequential(nn.Conv2d(3, 5, 3, 2, 1)).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    e = repalgebra.expand(m, mobileone.recipe(k), x)
    assert e[0].branch_names == ("kxk", *(f"kxk_{j}" for j in range(1, k)), "scale")  # no identity: 3 -> 5 channels
    assert conv_signature(repalgebra.fuse(e, x)) == conv_signature(m)
    with pytest.raises(ValueError, match="positive integer"):
        mobileone.recipe(0)


def test_skips_name_their_reason():
    class Same(nn.Conv2d):
        pass

    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=0),  # 0: not centered
        nn.Conv2d(4, 4, 3, padding=2, dilation=2),  # 1: dilated
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),  # 2
        Same(4, 4, 3, padding=1),  # 3: a subclass
        nn.Conv2d(4, 4, 2, padding="same"),  # 4: even kernel, same padding
        nn.Conv2d(4, 4, 1),  # 5: 1x1 (repvgg)
        nn.Conv2d(4, 4, 3, padding="same"),  # 6: expanded
    )
    report = repalgebra.expand(m, "repvgg").expand_report
    reasons = {s.path: s.reason for s in report.skipped}
    assert [e.path for e in report.expanded] == ["6"]
    assert "not half the kernel" in reasons["0"] and "dilation" in reasons["1"] and "padding_mode='reflect'" in reasons["2"]
    assert "Same is a Conv2d subclass" in reasons["3"] and "unevenly" in reasons["4"] and "1x1 kernel" in reasons["5"]
    text = str(report)
    assert "1 of 7 convs expanded with repvgg" in text and "left as is:" in text and "6 (3x3)" in text


def test_a_bn_is_taken_in_only_when_it_alone_reads_the_conv():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y + self.bn2(self.conv2(x))

    uses = conv_uses(Residual())
    assert uses.pairs == {"conv2": "bn2"} and uses.notes == ()
    m = Residual().double().eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    e = repalgebra.expand(m, "acnet", x)
    assert isinstance(e.bn, nn.BatchNorm2d) and isinstance(e.bn2, nn.Identity)
    assert [x.bn for x in e.expand_report.expanded] == ["", "bn2"]


def test_pairs_found_inside_parts_when_the_model_does_not_trace():
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # control flow on values: torch.fx cannot trace it
                return self.body(x)
            return self.body(-x)

    uses = conv_uses(Untraceable())
    assert uses.pairs == {"body.0": "body.1"} and "could not trace" in uses.notes[0]


def test_bad_input_and_a_forward_reading_the_conv():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    with pytest.raises(TypeError, match="nn.Module"):
        repalgebra.expand("model")
    with pytest.raises(ValueError, match="unknown recipe 'vgg'"):
        repalgebra.expand(m, "vgg")
    with pytest.raises(ValueError, match="init must be"):
        repalgebra.expand(m, init="zeros")

    class ReadsWeight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return F.conv2d(x, self.conv.weight, padding=1)

    class ReadsWeightUntraceably(ReadsWeight):
        def forward(self, x):
            assert x.sum() != 0  # a value in Python control flow: torch.fx cannot see the weight read
            return super().forward(x)

    with pytest.raises(ExpandError, match="does not run on the example inputs"):
        repalgebra.expand(ReadsWeightUntraceably(), "repvgg", torch.randn(1, 3, 5, 5))


def test_modules_whose_tensors_the_forward_reads_are_left_in_place():
    class ReadsBias(nn.Module):  # DBB's BN-and-pad layer reads self.bn.bias; this one reads self.conv2.weight
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return self.conv2(y) + self.bn.bias.view(1, -1, 1, 1) + self.conv2.weight.sum()

    m = ReadsBias().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    e = repalgebra.expand(m, "repvgg", x)
    assert conv_uses(m).read_directly == {"bn", "conv2"}
    assert isinstance(e.bn, nn.BatchNorm2d) and isinstance(e.conv, ExpandedConv) and isinstance(e.conv2, nn.Conv2d)
    assert [s.path for s in e.expand_report.skipped] == ["conv2"]
    assert "reads the conv's weight or bias itself" in e.expand_report.skipped[0].reason


def test_report_counts_and_check():
    entry = zoo_model("resnet_basic")
    m = entry.build()
    e = repalgebra.expand(m, "repvgg", torch.randn(entry.input_shape))
    r = e.expand_report
    assert r.params_before == sum(p.numel() for p in m.parameters())
    assert r.params_after == sum(p.numel() for p in e.parameters())
    assert "same function as the original" in r.check and "float32" in r.check
    fresh = repalgebra.expand(m, "repvgg", torch.randn(entry.input_shape), init="fresh")
    assert fresh.expand_report.check == "runs on the example inputs" and fresh.expand_report.init == "fresh"
