"""pad_share: a conv with no padding of its own reads a padded copy of its input, beside a conv of that copy.

    conv(x; W) = conv(pad_m(x; t, b, l, r); pad_0(W; t, b, l, r))      (m: reflect, replicate, circular, constant)

Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from rulecheck import fired, merge_weights, reasons, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.testing import (ConvSpec, add_conv, assert_graphs_equal, bn_stats, add_bn, float_dtypes, random_input,
                                seeds)

MODES = ("reflect", "replicate", "circular", "constant")


@st.composite
def shared_pad(draw, strides=(1, 2)):
    """(mode, pads (t, b, l, r), spec of the conv of the copy, spec of the conv of x): both map to one output grid,
    and the conv of x, padded by the pads, lies inside the other's window."""
    mode = draw(st.sampled_from(MODES))
    t, b, l, r = pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    s = (draw(st.sampled_from(strides)), draw(st.sampled_from(strides)))
    extra = (draw(st.integers(0, s[0] - 1)), draw(st.integers(0, s[1] - 1)))  # a wider window on a strided axis (left apart)
    h = draw(st.integers(max(kh, t + 1, b + 1) + extra[0], 9))  # reflect needs a pad smaller than the side
    w = draw(st.integers(max(kw, l + 1, r + 1) + extra[1], 9))
    cin, cout = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    div = [g for g in range(1, 7) if cin % g == 0 and cout % g == 0]
    big = ConvSpec(cin, cout, draw(st.sampled_from(div)), (kh + t + b + extra[0], kw + l + r + extra[1]), s,
                   height=h + t + b, width=w + l + r, bias=draw(st.booleans()))
    small = ConvSpec(cin, cout, draw(st.sampled_from(div)), (kh, kw), s, height=h, width=w, bias=draw(st.booleans()))
    assume(big.out_size == small.out_size)
    return mode, pads, big, small


def shared_pad_graph(mode, pads, big, small, dtype, seed, join="add", small_first=False):
    t, b, l, r = pads
    g = GraphBuilder()
    x = g.input("x", small.input_shape(2), dtype)
    copy = g.node("pad_nd", x, pads=(l, r, t, b), mode=mode, value=0.5 if mode == "constant" else 0.0, source="blk.pad")
    a = add_conv(g, copy, big, dtype, seed, "blk.big")
    c = add_conv(g, x, small, dtype, seed + 1, "blk.small")
    return g.build(g.node(join, *((c, a) if small_first else (a, c)), source="blk"))


@given(case=shared_pad(), dtype=float_dtypes(), seed=seeds(), join=st.sampled_from(["add", "sub"]), small_first=st.booleans())
def test_a_conv_of_x_moves_onto_the_padded_copy_where_the_sum_pays(case, dtype, seed, join, small_first):
    mode, pads, big, small = case
    graph = shared_pad_graph(mode, pads, big, small, dtype, seed, join, small_first)
    xt = random_input(small.input_shape(2), dtype, seed)
    convs = [n for n in graph.nodes if n.op == "conv2d"]
    merged, apart = merge_weights(convs, join)  # both windows start at the copy's origin once moved

    fused, report = run_rules(graph, "pad_share")
    assert_graphs_equal(graph, fused, xt, dtype)
    t, b, l, r = pads
    if big.kernel != (small.kernel[0] + t + b, small.kernel[1] + l + r):
        # A window wider than the moved one on a strided axis: the two outputs agree at the example's size only (at
        # another size one is a row shorter, and the model's sum broadcasts it or fails), so nothing moves.
        assert report.fired == [] and fused.op_counts() == graph.op_counts()
        return
    if merged > apart:
        assert report.fired == [] and fused.op_counts() == graph.op_counts()
        assert any(f"more than the 2 convs together ({apart})" in why for why in reasons(report, join))
        return
    assert fired(report, "pad_share") == 1 and fused.op_counts() == graph.op_counts()
    copy = next(n for n in fused.nodes if n.op == "pad_nd")
    moved = next(n for n in fused.nodes if n.source == "blk.small")
    assert moved.x is copy.out and moved.params["weight"].shape[2:] == (small.kernel[0] + pads[0] + pads[1],
                                                                         small.kernel[1] + pads[2] + pads[3])

    fused, report = run_rules(graph)  # with kernel_pad and branch_sum: one conv of the copy
    assert fused.op_counts() == {"pad_nd": 1, "conv2d": 1}
    assert_graphs_equal(graph, fused, xt, dtype)


@given(mode=st.sampled_from(MODES), dtype=float_dtypes(), seed=seeds(), branch=st.sampled_from(["bn", "identity", "scale"]),
       data=st.data())
def test_a_bn_identity_or_scale_beside_a_conv_of_the_copy_merges_into_it(mode, dtype, seed, branch, data):
    """RepVGG with ``padding_mode='reflect'``: the identity branch (a BN, a skip or a channel scale) is a 1x1 first."""
    c = data.draw(st.integers(1, 6))
    k, d = data.draw(st.sampled_from([3, 5])), data.draw(st.sampled_from([1, 2]))  # a dilated 3x3: its centre is a tap
    p = d * (k // 2)
    h, w = data.draw(st.integers(p + 1, 8)), data.draw(st.integers(p + 1, 8))
    groups = data.draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    g = GraphBuilder()
    x = g.input("x", (2, c, h, w), dtype)
    copy = g.node("pad_nd", x, pads=(p, p, p, p), mode=mode, value=0.0, source="blk.pad")
    y = add_conv(g, copy, ConvSpec(c, c, groups, (k, k), dilation=(d, d), height=h + 2 * p, width=w + 2 * p), dtype, seed, "blk.conv")
    if branch == "bn":
        skip = add_bn(g, x, data.draw(bn_stats(c)), dtype, "blk.bn")
    elif branch == "scale":
        gen = torch.Generator().manual_seed(seed)
        skip = g.node("scale", x, scale=torch.randn(c, generator=gen, dtype=torch.float64).to(dtype), axis=1, source="blk.scale")
    else:
        skip = x
    graph = g.build(g.node("add", y, skip, source="blk"))
    fused, report = run_rules(graph)
    assert fused.op_counts() == {"pad_nd": 1, "conv2d": 1}
    assert fired(report, "pad_share") == 1
    assert_graphs_equal(graph, fused, random_input((2, c, h, w), dtype, seed), dtype)


def _moved_or_not(graph, dtype, seed):
    fused, report = run_rules(graph)
    assert fired(report, "pad_share") == 0
    assert fused.op_counts()["conv2d"] == 2
    assert_graphs_equal(graph, fused, random_input(graph.inputs[0].shape, dtype, seed), dtype)


@given(mode=st.sampled_from(MODES[:3]), dtype=float_dtypes(), seed=seeds(), h=st.sampled_from([5, 7, 9]))
def test_not_moved_with_padding_of_its_own(mode, dtype, seed, h):
    """Stride 2: a 1x1 padded at the bottom and a 3x3 of the copy padded by 1 give the same output grid; the 1x1's
    bottom row reads its zero padding, which the copy holds as a copied row."""
    g = GraphBuilder()
    x = g.input("x", (1, 3, h, h), dtype)
    copy = g.node("pad_nd", x, pads=(1, 1, 1, 1), mode=mode, value=0.0, source="blk.pad")
    a = add_conv(g, copy, ConvSpec(3, 3, 1, (3, 3), (2, 2), height=h + 2, width=h + 2), dtype, seed, "blk.big")
    c = add_conv(g, x, ConvSpec(3, 3, 1, (1, 1), (2, 2), padding=(0, 1, 0, 1), height=h, width=h), dtype, seed + 1, "blk.small")
    assert a.shape == c.shape
    _moved_or_not(g.build(g.node("add", a, c, source="blk")), dtype, seed)


@given(mode=st.sampled_from(MODES[:3]), dtype=float_dtypes(), seed=seeds(), h=st.sampled_from([3, 4, 6]))
def test_not_moved_with_padding_of_its_own_at_stride_one(mode, dtype, seed, h):
    """A 1x1 with a zero padding of 1 beside a 3x3 (padding 1) of a copy padded by 1: one output size at every
    size, and moved, the 1x1 would lie inside the 3x3's window; but its first row reads its own zero padding,
    where on the copy it would read the copied border row."""
    g = GraphBuilder()
    x = g.input("x", (1, 3, h, h), dtype)
    copy = g.node("pad_nd", x, pads=(1, 1, 1, 1), mode=mode, value=0.0, source="blk.pad")
    a = add_conv(g, copy, ConvSpec(3, 3, 1, (3, 3), padding=(1, 1, 1, 1), height=h + 2, width=h + 2), dtype, seed, "blk.big")
    c = add_conv(g, x, ConvSpec(3, 3, 1, (1, 1), padding=(1, 1, 1, 1), height=h, width=h), dtype, seed + 1, "blk.small")
    assert a.shape == c.shape
    _moved_or_not(g.build(g.node("add", a, c, source="blk")), dtype, seed)


@given(mode=st.sampled_from(MODES[:3]), dtype=float_dtypes(), seed=seeds(), dilation=st.sampled_from([(2, 1), (1, 2), (2, 2)]))
def test_not_moved_when_dilated(mode, dtype, seed, dilation):
    """A 2x2 of dilation 2 beside a pad of 1: no whole number of its taps fills the pad."""
    g = GraphBuilder()
    x = g.input("x", (1, 2, 6, 6), dtype)
    copy = g.node("pad_nd", x, pads=(1, 1, 1, 1), mode=mode, value=0.0, source="blk.pad")
    eh, ew = (2 - 1) * dilation[0] + 1, (2 - 1) * dilation[1] + 1
    a = add_conv(g, copy, ConvSpec(2, 2, 1, (eh + 2, ew + 2), height=8, width=8), dtype, seed, "blk.big")
    c = add_conv(g, x, ConvSpec(2, 2, 1, (2, 2), dilation=dilation, height=6, width=6), dtype, seed + 1, "blk.small")
    assert a.shape == c.shape
    _moved_or_not(g.build(g.node("add", a, c, source="blk")), dtype, seed)


@pytest.mark.parametrize("crop", [(-1, 1, 0, 0), (0, 0, 1, -1)])
def test_not_moved_onto_a_crop(crop):
    """A constant pad cropping one side and padding the other keeps the size but shifts every pixel."""
    t, b, l, r = crop
    dtype, seed = torch.float64, 0
    g = GraphBuilder()
    x = g.input("x", (1, 2, 5, 5), dtype)
    copy = g.node("pad_nd", x, pads=(l, r, t, b), mode="constant", value=0.5, source="blk.pad")
    a = add_conv(g, copy, ConvSpec(2, 2, 1, (2, 2), height=5, width=5), dtype, seed, "blk.big")
    c = add_conv(g, x, ConvSpec(2, 2, 1, (2, 2), height=5, width=5), dtype, seed + 1, "blk.small")
    _moved_or_not(g.build(g.node("add", a, c, source="blk")), dtype, seed)


def test_moved_beside_a_conv_padding_of_its_own_and_dilated_by_as_much():
    """A 7x7 of dilation 2 on a reflect pad of 2 and zero padding of 2 of its own; a 3x3 of x with dilation 2, moved,
    is that conv's centre taps."""
    dtype, seed = torch.float64, 0
    g = GraphBuilder()
    x = g.input("x", (1, 2, 7, 7), dtype)
    copy = g.node("pad_nd", x, pads=(2, 2, 2, 2), mode="reflect", value=0.0, source="blk.pad")
    a = add_conv(g, copy, ConvSpec(2, 2, 1, (7, 7), dilation=(2, 2), padding=(2, 2, 2, 2), height=11, width=11), dtype, seed, "blk.big")
    c = add_conv(g, x, ConvSpec(2, 2, 1, (3, 3), dilation=(2, 2), height=7, width=7), dtype, seed + 1, "blk.small")
    assert a.shape == c.shape
    graph = g.build(g.node("sub", a, c, source="blk"))
    fused, report = run_rules(graph)
    assert fired(report, "pad_share") == 1 and fused.op_counts() == {"pad_nd": 1, "conv2d": 1}
    assert_graphs_equal(graph, fused, random_input((1, 2, 7, 7), dtype, seed), dtype)


@given(mode=st.sampled_from(MODES[:3]), dtype=float_dtypes(), seed=seeds())
def test_not_moved_when_the_dilation_does_not_divide_the_pad_even_where_a_stride_hides_it(mode, dtype, seed):
    """Stride 2: a 2x1 of dilation 2 on x (7 rows) and one on a copy padded by 1 row on top (8 rows) both give 3
    rows; no whole number of dilated taps fills the pad, so the first reads x[2p], the second x[2p - 1]."""
    g = GraphBuilder()
    x = g.input("x", (1, 2, 7, 4), dtype)
    copy = g.node("pad_nd", x, pads=(0, 0, 1, 0), mode=mode, value=0.0, source="blk.pad")
    spec = dict(kernel=(2, 1), stride=(2, 1), dilation=(2, 1), width=4)
    a = add_conv(g, copy, ConvSpec(2, 2, 1, height=8, **spec), dtype, seed, "blk.big")
    c = add_conv(g, x, ConvSpec(2, 2, 1, height=7, **spec), dtype, seed + 1, "blk.small")
    assert a.shape == c.shape
    _moved_or_not(g.build(g.node("add", a, c, source="blk")), dtype, seed)


@given(mode=st.sampled_from(MODES[:3]), dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_a_bn_stays_beside_a_conv_of_the_copy_whose_taps_miss_its_pixel(mode, dtype, seed, data):
    """A 3x3 of dilation 2 on a copy padded by 1 on top and 3 below: its taps are rows 0, 2, 4 of the copy, x's pixel
    is row 1. The BN as a 1x1 would never move onto the copy: it stays a BN."""
    g = GraphBuilder()
    x = g.input("x", (1, 3, 6, 6), dtype)
    copy = g.node("pad_nd", x, pads=(1, 3, 1, 3), mode=mode, value=0.0, source="blk.pad")
    y = add_conv(g, copy, ConvSpec(3, 3, 1, (3, 3), dilation=(2, 2), height=10, width=10), dtype, seed, "blk.conv")
    skip = add_bn(g, x, data.draw(bn_stats(3)), dtype, "blk.bn")
    assert y.shape == skip.shape
    graph = g.build(g.node("add", y, skip, source="blk"))
    fused, report = run_rules(graph)
    assert fused.op_counts() == graph.op_counts() and report.fired == []
    assert_graphs_equal(graph, fused, random_input((1, 3, 6, 6), dtype, seed), dtype)
