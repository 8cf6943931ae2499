"""seq_merge: a pointwise 1x1 conv next to a kxk conv composes into one conv.

    kxk then 1x1:  conv1x1(conv(x; W1, b1); W2, b2) = conv(x; W2 W1, W2 b1 + b2)          (always exact)
    1x1 then kxk:  conv(conv1x1(x; W1, b1); W2, b2) = conv(x; W2 W1, b2 + sum W2 b1)      (exact iff unpadded or b1 = 0)

Refused: a biased 1x1 before a padded kxk; a merged kernel larger than the two
(unless a sibling conv in the following sum is at least as large); two
non-pointwise convs.  Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

from math import gcd

import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from rulecheck import SUM_RULES, fired, only, reasons, refusal_reason, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.testing import (ConvSpec, add_conv, assert_graphs_equal, conv_params, conv_specs, conv_specs_onto,
                                float_dtypes, random_input, seeds)


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def merged_cost(inner: ConvSpec, outer: ConvSpec) -> int:
    """Weights of the composed kernel: (O, I / gcd(g1, g2), taps of the non-1x1 conv)."""
    kernel = inner.kernel if outer.kernel == (1, 1) else outer.kernel
    return outer.out_channels * (inner.in_channels // gcd(inner.groups, outer.groups)) * kernel[0] * kernel[1]


def cost(spec: ConvSpec) -> int:
    return spec.out_channels * (spec.in_channels // spec.groups) * spec.kernel[0] * spec.kernel[1]


@st.composite
def pointwise(draw, cin, size, cout=None, bias=None):
    cout = cout or draw(st.integers(1, 16))
    g = draw(st.sampled_from(_divisors(gcd(cin, cout))))
    return ConvSpec(cin, cout, g, (1, 1), bias=draw(st.booleans()) if bias is None else bias, height=size[0], width=size[1])


@st.composite
def seq_pair(draw):
    """(inner, outer, inner bias kind) with one of them a pointwise 1x1, the other any conv."""
    if draw(st.booleans()):  # kxk then 1x1
        inner = draw(conv_specs())
        outer = draw(pointwise(inner.out_channels, inner.out_size))
    else:  # 1x1 then kxk
        outer = draw(conv_specs())
        # The 1x1 produces the kxk's input channels from any number of its own.
        inner = draw(pointwise(draw(st.integers(1, 16)), (outer.height, outer.width), cout=outer.in_channels))
    bias_kind = draw(st.sampled_from(["none", "zeros", "random"]))
    return inner, outer, bias_kind


def build(inner, outer, bias_kind, dtype, seed, batch=1):
    b = GraphBuilder()
    x = b.input("x", inner.input_shape(batch), dtype)
    p = conv_params(inner, dtype, seed)
    if bias_kind == "none":
        p.pop("bias", None)
    elif bias_kind == "zeros":
        p["bias"] = torch.zeros(inner.out_channels, dtype=dtype)
    elif "bias" not in p:
        p["bias"] = torch.randn(inner.out_channels, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    y = b.conv2d(x, **p, **inner.attrs, source="blk.inner")
    y = add_conv(b, y, outer, dtype, seed + 1, "blk.outer")
    return b.build(y)


def expected_refusal(inner, outer, bias_kind) -> str | None:
    if not outer.is_pointwise and inner.is_pointwise and bias_kind == "random" and any(outer.padding):
        return "the 1x1 conv has a bias and the kxk conv after it zero-pads: its border would see 0, not the bias"
    c = merged_cost(inner, outer)
    if c > cost(inner) + cost(outer):
        return f"the merged kernel would have {c} weights, more than the two convs together"
    return None


@given(pair=seq_pair(), dtype=float_dtypes(), batch=st.integers(1, 3), seed=seeds())
def test_merges_or_refuses_exactly_as_documented(pair, dtype, batch, seed):
    inner, outer, bias_kind = pair
    graph = build(inner, outer, bias_kind, dtype, seed, batch)
    refusal = expected_refusal(inner, outer, bias_kind)

    fused, report = run_rules(graph, "seq_merge")
    if refusal is None:
        assert report.rule_counts() == {"seq_merge": 1}
        conv = only(fused, "conv2d")
        geometry = inner if outer.is_pointwise else outer
        assert conv.attrs["stride"] == geometry.stride and conv.attrs["padding"] == geometry.padding
        assert conv.attrs["dilation"] == geometry.dilation
        assert conv.attrs["groups"] == gcd(inner.groups, outer.groups)
        assert conv.params["weight"].numel() == merged_cost(inner, outer)
        assert conv.source == "blk"
    else:
        assert report.fired == [] and fused.op_counts() == {"conv2d": 2}
        assert refusal_reason(graph, "seq_merge", graph.nodes[1]) == refusal
        # An exactness refusal is reported on the kxk conv; a cost refusal is a choice, not reported.
        exactness = refusal.startswith("the 1x1 conv has a bias")
        assert reasons(report, "conv2d") == ([f"seq_merge: {refusal}"] if exactness else [])
    assert_graphs_equal(graph, fused, random_input(inner.input_shape(batch), dtype, seed + 2), dtype)


@given(dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_refused_for_two_non_pointwise_convs(dtype, seed, data):
    inner = data.draw(conv_specs())
    assume(not inner.is_pointwise)
    h, w = inner.out_size
    outer = data.draw(conv_specs_onto((h, w), (h, w), 1, in_channels=inner.out_channels, out_channels=data.draw(st.integers(1, 16))))
    assume(not outer.is_pointwise)
    graph = build(inner, outer, "random", dtype, seed)
    fused, report = run_rules(graph, "seq_merge")
    assert report.fired == [] and fused.op_counts() == {"conv2d": 2}
    assert refusal_reason(graph, "seq_merge", graph.nodes[1]) == "neither conv is a pointwise 1x1"


@given(dtype=float_dtypes(), c=st.integers(2, 16), k=st.integers(2, 7), seed=seeds())
def test_refused_when_merged_kernel_is_larger(dtype, c, k, seed):
    """k x k conv C -> 1, then 1x1 1 -> C: the merged C x C x k x k kernel dwarfs both."""
    inner = ConvSpec(c, 1, 1, (k, k), padding=(k // 2, (k - 1) // 2, k // 2, (k - 1) // 2), height=6, width=6)
    outer = ConvSpec(1, c, 1, (1, 1), height=6, width=6)
    graph = build(inner, outer, "random", dtype, seed)
    fused, report = run_rules(graph, "seq_merge")
    assert report.fired == [] and fused.op_counts() == {"conv2d": 2}
    assert refusal_reason(graph, "seq_merge", graph.nodes[1]) == (
        f"the merged kernel would have {c * c * k * k} weights, more than the two convs together"
    )


@given(spec=conv_specs(), dtype=float_dtypes(), seed=seeds())
def test_not_fired_when_inner_output_has_another_user(spec, dtype, seed):
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(), dtype)
    y = add_conv(b, x, spec, dtype, seed)
    z = add_conv(b, y, ConvSpec(spec.out_channels, 3, 1, (1, 1), height=spec.out_size[0], width=spec.out_size[1]), dtype, seed + 1)
    graph = b.build(z, y)
    fused, report = run_rules(graph, "seq_merge")
    assert report.fired == [] and fused.op_counts() == {"conv2d": 2}


@given(dtype=float_dtypes(), c=st.integers(2, 16), mid=st.integers(1, 2), k=st.sampled_from([3, 5]), hw=st.integers(5, 9), seed=seeds())
def test_dbb_branch_merges_when_a_sibling_absorbs_it(dtype, c, mid, k, hw, seed):
    """DBB's 1x1 -> kxk branch (narrow mid) beside a dense kxk conv: larger alone, free inside the sum."""
    inner = ConvSpec(c, mid, 1, (1, 1), bias=True, height=hw, width=hw)
    outer = ConvSpec(mid, c, 1, (k, k), height=hw, width=hw)
    sib = ConvSpec(c, c, 1, (k, k), height=hw, width=hw)
    assume(merged_cost(inner, outer) > cost(inner) + cost(outer))
    b = GraphBuilder()
    x = b.input("x", (1, c, hw, hw), dtype)
    y = add_conv(b, add_conv(b, x, inner, dtype, seed, "pw"), outer, dtype, seed + 1, "kxk")
    graph = b.build(b.add(add_conv(b, x, sib, dtype, seed + 2, "dense"), y))
    fused, report = run_rules(graph, "seq_merge")
    assert fired(report, "seq_merge") == 1 and fused.op_counts() == {"add": 1, "conv2d": 2}
    xt = random_input((1, c, hw, hw), dtype, seed)
    assert_graphs_equal(graph, fused, xt, dtype)
    fused, _ = run_rules(graph, "seq_merge", *SUM_RULES)
    assert fused.op_counts() == {"conv2d": 1}
    assert_graphs_equal(graph, fused, xt, dtype)


@given(dtype=float_dtypes(), c=st.integers(2, 16), k=st.sampled_from([3, 5]), narrow=st.sampled_from([1, 2]), hw=st.integers(1, 8),
       bias_kind=st.sampled_from(["none", "zeros", "random"]), seed=seeds())
def test_depthwise_then_pointwise_merges_with_gcd_groups(dtype, c, k, narrow, hw, bias_kind, seed):
    """A depthwise kxk (C groups) then a 1x1 with ``narrow`` groups and outputs: one conv with gcd(C, narrow) groups.

    Every depthwise filter lands on its own input channel of the merged
    kernel; the merged conv has the 1x1's groups, not the depthwise conv's.
    """
    assume(c % narrow == 0)
    inner = ConvSpec(c, c, c, (k, k), padding=(k // 2,) * 4, height=hw, width=hw)
    outer = ConvSpec(c, narrow, narrow, (1, 1), height=hw, width=hw)
    graph = build(inner, outer, bias_kind, dtype, seed)
    fused, report = run_rules(graph, "seq_merge")
    assert report.rule_counts() == {"seq_merge": 1}
    conv = only(fused, "conv2d")
    assert conv.attrs["groups"] == narrow and conv.params["weight"].shape == (narrow, c // narrow, k, k)
    assert conv.attrs["padding"] == inner.padding
    assert_graphs_equal(graph, fused, random_input(inner.input_shape(), dtype, seed + 2), dtype)
