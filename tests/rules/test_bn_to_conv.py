"""bn_to_conv: a BN branch joining a sum/concat beside a conv (or BN) of the same input becomes a 1x1 conv.

    BN(x) = conv(x; s[c] * I_G, t)      (I_G: identity kernel of a G-group conv)

Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

import torch
from hypothesis import given
from hypothesis import strategies as st
from rulecheck import SUM_RULES, converts_if_it_pays, fired, only, reasons, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.kernels import identity_kernel
from repalgebra.testing import (add_bn, add_conv, assert_graphs_equal, bn_stats, conv_specs_onto, float_dtypes,
                                random_input, seeds)


@st.composite
def bn_beside_conv(draw):
    """(graph, input shape, conv spec, join op, dtype): join(conv(x), BN(x)) in either order."""
    dtype = draw(float_dtypes())
    c = draw(st.integers(1, 16))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    join = draw(st.sampled_from(["add", "sub", "concat"]))
    cout = draw(st.integers(1, 16)) if join == "concat" else c
    spec = draw(conv_specs_onto((h, w), (h, w), 1, in_channels=c, out_channels=cout))
    shape = (draw(st.integers(1, 3)), c, h, w)
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    conv = add_conv(b, x, spec, dtype, draw(seeds()), "branch.conv")
    bn = add_bn(b, x, draw(bn_stats(c)), dtype, "branch.bn")
    operands = (conv, bn) if draw(st.booleans()) else (bn, conv)
    y = b.concat(*operands, axis=1) if join == "concat" else b.node(join, *operands, source="branch")
    return b.build(y), shape, spec, join, dtype


@given(case=bn_beside_conv(), seed=seeds())
def test_bn_branch_becomes_conv_with_sibling_groups(case, seed):
    graph, shape, spec, join, dtype = case
    fused, report = run_rules(graph, "bn_to_conv")
    x = random_input(shape, dtype, seed)
    if not converts_if_it_pays(graph, fused, report, join):
        return  # the 1x1 would not merge with the conv at no cost (off its lattice, or a grouped concat)

    assert report.rule_counts() == {"bn_to_conv": 1}
    assert fused.op_counts() == {"conv2d": 2, join: 1}
    new = next(n for n in fused.nodes if n.op == "conv2d" and n.source == "branch.bn")
    c = shape[1]
    assert new.attrs["groups"] == spec.groups  # the sibling's groups, so branch_sum keeps them
    assert new.params["weight"].shape == (c, c // spec.groups, 1, 1)
    assert new.attrs["padding"] == (0, 0, 0, 0) and new.attrs["stride"] == (1, 1)
    # Off the identity positions the kernel is exactly zero.
    off = identity_kernel(c, spec.groups, torch.float64) == 0
    assert bool((new.params["weight"][off] == 0).all())
    assert_graphs_equal(graph, fused, x, dtype)

    # With the rules that sum branches, the block is one conv.
    fused, report = run_rules(graph, "bn_to_conv", *SUM_RULES)
    assert fused.op_counts() == {"conv2d": 1}, report
    assert_graphs_equal(graph, fused, x, dtype)


@given(dtype=float_dtypes(), c=st.integers(1, 16), scalar=st.booleans(), join=st.sampled_from(["add", "sub"]), seed=seeds(), data=st.data())
def test_channel_scale_branch_becomes_a_conv_without_bias(dtype, c, scalar, join, seed, data):
    """YOLOv6's LinearAddBlock: ``conv(x) + x * w.view(1, C, 1, 1)`` (or one number for all channels)."""
    h, w = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    spec = data.draw(conv_specs_onto((h, w), (h, w), 1, in_channels=c, out_channels=c))
    shape = (data.draw(st.integers(1, 3)), c, h, w)
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    s = torch.randn(1 if scalar else c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    graph = b.build(b.node(join, add_conv(b, x, spec, dtype, seed, "blk.conv"), b.scale(x, scale=s, axis=1, source="blk.scale"), source="blk"))

    fused, report = run_rules(graph, "bn_to_conv")
    if not converts_if_it_pays(graph, fused, report, join):
        return  # the 1x1 would not merge with the conv at no cost (off its lattice)
    assert report.rule_counts() == {"bn_to_conv": 1} and fused.op_counts() == {"conv2d": 2, join: 1}
    new = next(n for n in fused.nodes if n.op == "conv2d" and n.source == "blk.scale")
    assert "bias" not in new.params and new.attrs["groups"] == spec.groups
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed + 1), dtype)
    fused, report = run_rules(graph, "bn_to_conv", *SUM_RULES)
    assert fused.op_counts() == {"conv2d": 1}, report
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed + 1), dtype)


@given(dtype=float_dtypes(), c=st.integers(1, 16), inner=st.sampled_from(["input", "scale", "bn"]), sign=st.sampled_from([1.0, -1.0]),
       per_channel=st.booleans(), join=st.sampled_from(["add", "sub"]), seed=seeds(), data=st.data())
def test_an_affine_branch_becomes_a_conv_with_bias(dtype, c, inner, sign, per_channel, join, seed, data):
    """torchvision's ``FrozenBatchNorm2d`` as the identity branch, ``conv(x) + (x * scale + bias)``, and the other
    affine maps per channel: ``sign * y + c`` with ``y`` the input itself, a channel scale or a BN of it, ``c`` one
    number or one per channel.  One conv with the sum rules (review R13a: scale, add_const and add were left)."""
    h, w = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    spec = data.draw(conv_specs_onto((h, w), (h, w), 1, in_channels=c, out_channels=c))
    shape = (data.draw(st.integers(1, 3)), c, h, w)
    gen = torch.Generator().manual_seed(seed)
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    conv = add_conv(b, x, spec, dtype, seed, "blk.conv")  # (first: converts_if_it_pays prices the first node of x)
    y = {"input": lambda: x, "scale": lambda: b.scale(x, scale=torch.randn(c, generator=gen, dtype=torch.float64).to(dtype),
                                                        axis=1, source="blk.scale"),
         "bn": lambda: add_bn(b, x, data.draw(bn_stats(c)), dtype, "blk.bn")}[inner]()
    shift = torch.randn((1, c, 1, 1) if per_channel else (1,), generator=gen, dtype=torch.float64).to(dtype)
    graph = b.build(b.node(join, conv, b.add_const(y, const=shift, sign=sign, source="blk.shift"), source="blk"))

    fused, report = run_rules(graph, "bn_to_conv")
    if not converts_if_it_pays(graph, fused, report, join):
        return  # the 1x1 would not merge with the conv at no cost (off its lattice)
    assert report.rule_counts() == {"bn_to_conv": 1}, report
    new = next(n for n in fused.nodes if n.op == "conv2d" and n.source == "blk.shift")
    assert "bias" in new.params and new.attrs["groups"] == spec.groups
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed + 1), dtype)
    fused, report = run_rules(graph, "bn_to_conv", *SUM_RULES)
    assert fused.op_counts() == {"conv2d": 1}, report
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed + 1), dtype)


def test_a_constant_that_is_not_per_channel_is_left():
    """``x + c`` with ``c`` varying along the width is no affine map per channel of ``x``: left as it is."""
    b = GraphBuilder()
    x = b.input("x", (1, 3, 5, 5), torch.float64)
    conv = add_conv(b, x, conv_specs_onto((5, 5), (5, 5), 1, in_channels=3, out_channels=3).example(), torch.float64, 0, "conv")
    graph = b.build(b.add(conv, b.add_const(x, const=torch.randn(1, 1, 1, 5, dtype=torch.float64), source="shift")))
    fused, report = run_rules(graph, "bn_to_conv")
    assert "bn_to_conv" not in report.rule_counts(), report


@given(dtype=float_dtypes(), c=st.integers(1, 16), join=st.sampled_from(["add", "sub", "concat"]), seed=seeds(), data=st.data())
def test_two_bn_branches_become_depthwise_convs(dtype, c, join, seed, data):
    b = GraphBuilder()
    x = b.input("x", (2, c, 4, 5), dtype)
    y1 = add_bn(b, x, data.draw(bn_stats(c)), dtype, "bn1")
    y2 = add_bn(b, x, data.draw(bn_stats(c)), dtype, "bn2")
    graph = b.build(b.node(join, y1, y2, **({"axis": 1} if join == "concat" else {})))
    fused, report = run_rules(graph, "bn_to_conv")
    x = random_input((2, c, 4, 5), dtype, seed)
    if not converts_if_it_pays(graph, fused, report, join):  # concatenated, two depthwise convs would densify
        assert join == "concat" and c > 1
        return
    assert fired(report, "bn_to_conv") == 2
    assert fused.op_counts() == {"conv2d": 2, join: 1}
    assert all(n.attrs["groups"] == c for n in fused.nodes if n.op == "conv2d")
    assert_graphs_equal(graph, fused, x, dtype)
    fused, _ = run_rules(graph, "bn_to_conv", *SUM_RULES)
    assert fused.op_counts() == {"conv2d": 1} and only(fused, "conv2d").attrs["groups"] == c
    assert_graphs_equal(graph, fused, x, dtype)


@given(dtype=float_dtypes(), c=st.integers(1, 16), other=st.sampled_from(["identity", "other_input", "relu"]), seed=seeds(), data=st.data())
def test_not_fired_without_a_conv_or_bn_of_the_same_input(dtype, c, other, seed, data):
    b = GraphBuilder()
    x = b.input("x", (1, c, 5, 5), dtype)
    z = b.input("z", (1, c, 5, 5), dtype)
    bn = add_bn(b, x, data.draw(bn_stats(c)), dtype, "bn")
    if other == "identity":
        sib = x
    elif other == "other_input":
        spec = data.draw(conv_specs_onto((5, 5), (5, 5), 1, in_channels=c, out_channels=c))
        sib = add_conv(b, z, spec, dtype, seed, "conv_of_z")
    else:
        sib = b.relu(x)
    graph = b.build(b.add(bn, sib, source="sum"))
    fused, report = run_rules(graph, "bn_to_conv")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert reasons(report, "batch_norm") == ["no rule applies (input from graph input, used by add)"]
    assert_graphs_equal(graph, fused, (random_input((1, c, 5, 5), dtype, seed), random_input((1, c, 5, 5), dtype, seed + 1)), dtype)
