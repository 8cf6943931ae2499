"""The branch rules on conv3d (3-D RepVGG blocks of video and volume models): ``bn_to_conv``,
``identity_to_conv``, ``kernel_pad`` and ``branch_sum`` apply to 5-D values as to 4-D ones.

    BN(x) = conv3d(x; s[c] I_G, t)        x = conv3d(x; I_G, 0)
    conv3d(x; W, padding p) = conv3d(x; pad(W, a), padding p + a d)     (a on both sides of each axis)
    conv3d(x; W_a, b_a) +- conv3d(x; W_b, b_b) = conv3d(x; W_a +- W_b, b_a +- b_b)

Random kernels (odd per axis, centred with padding ``d (k - 1) / 2``), strides, dilations, groups, widths,
biases and dtypes; ``scale_fold`` and ``bias_fold`` fold a frozen BatchNorm3d written as arithmetic
(``x * scale.view(1, -1, 1, 1, 1) + shift.view(...)``, PySlowFast's SubBatchNorm3d) into the conv3d before it.
Refused: a kernel that would have to grow on one side of an axis only (a conv3d pads both sides alike).  Not matched: a concat (only 2-D convs merge in one).  Tolerances:
:func:`repalgebra.testing.assert_graphs_equal`.
"""

import torch
from hypothesis import given
from hypothesis import strategies as st
from rulecheck import SUM_RULES, fired, only, reasons, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.testing import assert_graphs_equal, float_dtypes, random_input, seeds


@st.composite
def block3d(draw):
    """``(groups, channels, kernel, stride, dilation, size)`` of a 3-D RepVGG-style block."""
    groups = draw(st.sampled_from([1, 2]))
    c = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.sampled_from([1, 3, 5])) for _ in range(3))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(3))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(3))
    size = tuple(draw(st.integers(2, 7)) for _ in range(3))
    return groups, c, kernel, stride, dilation, size


def _weight(gen, cout, cin_per_group, kernel, dtype):
    return (torch.randn(cout, cin_per_group, *kernel, generator=gen, dtype=torch.float64) / (cin_per_group * 8) ** 0.5).to(dtype)


def _bn(gen, c, dtype):
    return dict(mean=torch.randn(c, generator=gen, dtype=torch.float64).to(dtype),
                var=(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype),
                weight=torch.randn(c, generator=gen, dtype=torch.float64).to(dtype),
                bias=torch.randn(c, generator=gen, dtype=torch.float64).to(dtype))


def _dense(b, x, case, gen, dtype, *, bias, source):
    """The case's kxkxk conv3d (centred) of ``x``, with a bias or not."""
    groups, c, kernel, stride, dilation, _ = case
    padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel))
    extra = {"bias": torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)} if bias else {}
    return b.conv3d(x, weight=_weight(gen, c, c // groups, kernel, dtype), **extra, stride=stride, padding=padding,
                    dilation=dilation, groups=groups, source=source)


def repvgg3d(case, dtype, seed, *, bias, join="add", skip="bn"):
    """``dense(x) +- pw(x) (+- skip(x))``: a kxkxk conv3d (centred), a 1x1x1 one, and at stride 1 a BN3d or the
    identity; ``skip`` None for none."""
    groups, c, kernel, stride, dilation, size = case
    gen = torch.Generator().manual_seed(seed)
    b = GraphBuilder()
    x = b.input("x", (2, c, *size), dtype)
    dense = _dense(b, x, case, gen, dtype, bias=bias, source="block.dense")
    pw = b.conv3d(x, weight=_weight(gen, c, c // groups, (1, 1, 1), dtype), stride=stride, groups=groups, source="block.pw")
    op = getattr(b, join)
    y = op(dense, pw, source="block")
    if skip is not None and stride == (1, 1, 1):
        other = b.batch_norm(x, **_bn(gen, c, dtype), eps=1e-5, source="block.idn") if skip == "bn" else x
        y = op(y, other, source="block")
    return b.build(y), (2, c, *size)


@given(case=block3d(), dtype=float_dtypes(), bias=st.booleans(), join=st.sampled_from(["add", "sub"]),
       skip=st.sampled_from(["bn", "identity", None]), seed=seeds())
def test_a_3d_repvgg_block_sums_to_one_conv3d(case, dtype, bias, join, skip, seed):
    if skip is not None:  # a skip branch needs stride 1
        case = (*case[:3], (1, 1, 1), *case[4:])
    graph, shape = repvgg3d(case, dtype, seed, bias=bias, join=join, skip=skip)
    fused, report = run_rules(graph, "bn_to_conv", "identity_to_conv", *SUM_RULES)
    assert fused.op_counts() == {"conv3d": 1}, str(fused)
    assert fired(report, "kernel_pad") >= (case[2] != (1, 1, 1)) and fired(report, "branch_sum") >= 1
    assert fired(report, "bn_to_conv") == (skip == "bn") and fired(report, "identity_to_conv") == (skip == "identity")
    conv = only(fused, "conv3d")
    assert conv.params["weight"].shape[2:] == case[2] and conv.attrs["groups"] == case[0]
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed + 1), dtype)


@given(case=block3d(), dtype=float_dtypes(), seed=seeds())
def test_two_conv3d_with_one_window_add_into_one(case, dtype, seed):
    groups, c, kernel, stride, dilation, size = case
    gen = torch.Generator().manual_seed(seed)
    b = GraphBuilder()
    x = b.input("x", (1, c, *size), dtype)
    padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel))
    convs = [b.conv3d(x, weight=_weight(gen, c, c // groups, kernel, dtype), stride=stride, padding=padding, dilation=dilation,
                      groups=groups) for _ in range(2)]
    graph = b.build(b.sub(*convs))
    fused, report = run_rules(graph, "branch_sum")
    assert fused.op_counts() == {"conv3d": 1} and fired(report, "branch_sum") == 1
    assert_graphs_equal(graph, fused, random_input((1, c, *size), dtype, seed + 1), dtype)


@given(dtype=float_dtypes(), seed=seeds())
def test_left_apart_where_a_conv3d_kernel_would_grow_on_one_side(dtype, seed):
    """A stride-2 3x3x3 (padding 1) beside a 2x2x2 (padding 0): at even sizes their outputs agree, and the 2x2x2's
    window is the 3x3x3's without its first taps.  Their reaches differ (at odd sizes so do their outputs), so
    they are not one group: the 2x2x2 is not grown, and nothing merges."""
    gen = torch.Generator().manual_seed(seed)
    b = GraphBuilder()
    x = b.input("x", (1, 2, 4, 6, 6), dtype)
    y = b.add(b.conv3d(x, weight=_weight(gen, 2, 2, (3, 3, 3), dtype), stride=(2, 2, 2), padding=(1, 1, 1)),
              b.conv3d(x, weight=_weight(gen, 2, 2, (2, 2, 2), dtype), stride=(2, 2, 2)))
    graph = b.build(y)
    fused, report = run_rules(graph, *SUM_RULES)
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert any("at the example's size only" in r for r in reasons(report, "add")), reasons(report, "add")


@given(dtype=float_dtypes(), seed=seeds(), kernel=st.sampled_from([1, 3]))
def test_not_matched_in_a_concat(dtype, seed, kernel):
    """Only 2-D convs merge in a channel concat: a BN3d or a skip beside a conv3d there is left alone (with one
    channel and a 1x1x1 conv the merge would cost no more, so only the rank stops it)."""
    gen = torch.Generator().manual_seed(seed)
    b = GraphBuilder()
    x = b.input("x", (1, 1, 4, 5, 5), dtype)
    conv = b.conv3d(x, weight=_weight(gen, 1, 1, (kernel,) * 3, dtype), padding=(kernel // 2,) * 3)
    graph = b.build(b.concat(conv, b.batch_norm(x, **_bn(gen, 1, dtype), eps=1e-5), x, axis=1))
    fused, report = run_rules(graph, "bn_to_conv", "identity_to_conv", *SUM_RULES)
    assert report.fired == [] and fused.op_counts() == graph.op_counts()


@given(case=block3d(), dtype=float_dtypes(), bias=st.booleans(), axis=st.sampled_from([1, -4]), sign=st.sampled_from([1.0, -1.0]),
       seed=seeds())
def test_a_frozen_bn3d_written_as_arithmetic_folds_into_the_conv3d(case, dtype, bias, axis, sign, seed):
    c, size = case[1], case[5]
    gen = torch.Generator().manual_seed(seed)
    b = GraphBuilder()
    x = b.input("x", (2, c, *size), dtype)
    conv = _dense(b, x, case, gen, dtype, bias=bias, source="block.conv")
    scaled = b.scale(conv, scale=torch.randn(c, generator=gen, dtype=torch.float64).to(dtype), axis=axis, source="block.bn")
    shift = torch.randn(1, c, 1, 1, 1, generator=gen, dtype=torch.float64).to(dtype)
    graph = b.build(b.add_const(scaled, const=shift, sign=sign, source="block.bn"))
    fused, report = run_rules(graph, "scale_fold", "bias_fold")
    assert fused.op_counts() == {"conv3d": 1}, str(fused)
    assert fired(report, "scale_fold") == 1 and fired(report, "bias_fold") == 1
    assert_graphs_equal(graph, fused, random_input((2, c, *size), dtype, seed + 1), dtype)
