"""seq_merge: a pointwise 1x1 conv next to a kxk conv composes into one conv.

    kxk then 1x1:  conv1x1(conv(x; W1, b1); W2, b2) = conv(x; W2 W1, W2 b1 + b2)          (always exact)
    1x1 then kxk:  conv(conv1x1(x; W1, b1); W2, b2) = conv(x; W2 W1, b2 + sum W2 b1)      (exact iff unpadded or b1 = 0)

A bias-free 1x1 (stride 1) that zero-pads by P is pad(pointwise 1x1, P): before
a kxk its padding adds to the kxk's, after a kxk it becomes a pad after the
merged conv.  So a zero pad before or after a bias-free 1x1 gives one normal form.

Refused: a biased 1x1 before a padded kxk; a biased 1x1 that pads; a merged
kernel larger than the two (unless a sibling conv in the following sum is at
least as large); two convs neither of which is a 1x1 of stride 1.
Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

from math import gcd

import torch
import torch.nn.functional as F
from torch import nn
from hypothesis import assume, given
from hypothesis import strategies as st
from rulecheck import SUM_RULES, fired, only, reasons, refusal_reason, run_rules

import repalgebra
from repalgebra import rewrite
from repalgebra.builder import GraphBuilder
from repalgebra.testing import (ConvSpec, add_conv, assert_graphs_equal, conv_params, conv_specs, conv_specs_onto,
                                float_dtypes, random_input, seeds)


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def merged_cost(inner: ConvSpec, outer: ConvSpec) -> int:
    """Weights of the composed kernel: (O, I / gcd(g1, g2), on each axis the taps of the conv that has several)."""
    kh, kw = (max(a, b) for a, b in zip(inner.kernel, outer.kernel))
    return outer.out_channels * (inner.in_channels // gcd(inner.groups, outer.groups)) * kh * kw


def acting_axes(inner: ConvSpec, outer: ConvSpec) -> tuple[bool, bool] | None:
    """Per axis, whether the inner conv acts there (more than one tap, a stride or padding), where the two never act
    on one axis and each acts somewhere (a 1xk then a kx1); else None."""
    def acts(c: ConvSpec) -> tuple[bool, bool]:
        t, b, l, r = c.padding
        return c.kernel[0] > 1 or c.stride[0] > 1 or t + b > 0, c.kernel[1] > 1 or c.stride[1] > 1 or l + r > 0
    a, b = acts(inner), acts(outer)
    return None if any(x and y for x, y in zip(a, b)) or not any(a) or not any(b) else a


def cost(spec: ConvSpec) -> int:
    return spec.out_channels * (spec.in_channels // spec.groups) * spec.kernel[0] * spec.kernel[1]


@st.composite
def pointwise(draw, cin, size, cout=None, bias=None, padded=False):
    """A 1x1 stride-1 conv; with ``padded`` it zero-pads (0-2 per side) and ``size`` is its *output* size."""
    cout = cout or draw(st.integers(1, 16))
    g = draw(st.sampled_from(_divisors(gcd(cin, cout))))
    t, b, l, r = pads = tuple(draw(st.integers(0, 2)) for _ in range(4)) if padded else (0, 0, 0, 0)
    h, w = (size[0] - t - b, size[1] - l - r) if padded else size
    assume(h >= 1 and w >= 1)
    return ConvSpec(cin, cout, g, (1, 1), padding=pads, bias=draw(st.booleans()) if bias is None else bias, height=h, width=w)


@st.composite
def seq_pair(draw):
    """(inner, outer, inner bias kind) with one of them a 1x1 of stride 1 (often zero-padding), the other any conv."""
    padded = draw(st.booleans())
    if draw(st.booleans()):  # kxk then 1x1
        inner = draw(conv_specs())
        h, w = inner.out_size
        size = (h + 4, w + 4) if padded else (h, w)  # room for the padded 1x1's output
        outer = draw(pointwise(inner.out_channels, size, padded=padded))
        assume(outer.height == h and outer.width == w)
    else:  # 1x1 then kxk
        outer = draw(conv_specs())
        # The 1x1 produces the kxk's input channels from any number of its own.
        inner = draw(pointwise(draw(st.integers(1, 16)), (outer.height, outer.width), cout=outer.in_channels, padded=padded))
    bias_kind = draw(st.sampled_from(["none", "zeros", "random"]))
    return inner, outer, bias_kind


def pad_after(spec: ConvSpec, biased: bool):
    """P when ``spec`` is a pointwise 1x1 followed by a zero pad by P (1x1, stride 1, unpadded or bias-free), else None."""
    if spec.kernel != (1, 1) or spec.stride != (1, 1) or (any(spec.padding) and biased):
        return None
    return spec.padding


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


PADDED_BIASED = "the 1x1 conv zero-pads and has a bias: its border is the bias, not 0"
NEITHER = ("neither conv is a pointwise 1x1, nor do the two act on different axes (a 1xk then a kx1): "
           "a kxk after a kxk is a larger kernel, which is not made")
SEPARATE_BIASED = "the first conv has a bias and the second zero-pads: its border would see 0, not the bias"


def expected(inner, outer, bias_kind):
    """(refusal or None, merged conv's geometry, its padding, the pad after it) as the rule documents them."""
    inner_biased = bias_kind == "random"
    if (after := pad_after(outer, outer.bias)) is not None:  # kxk then 1x1
        geometry, padding = inner, inner.padding
    elif (before := pad_after(inner, inner_biased)) is not None:  # 1x1 then kxk
        if inner_biased and any(outer.padding):
            return "the 1x1 conv has a bias and the kxk conv after it zero-pads: its border would see 0, not the bias", None, None, None
        geometry, padding, after = outer, tuple(p + q for p, q in zip(outer.padding, before)), (0, 0, 0, 0)
    elif inner.kernel == (1, 1) and inner.stride == (1, 1) and not any(outer.padding):  # padded, biased 1x1 then unpadded kxk
        geometry, padding, after = outer, inner.padding, (0, 0, 0, 0)
    elif any(c.kernel == (1, 1) and c.stride == (1, 1) and any(c.padding) for c in (inner, outer)):
        return PADDED_BIASED, None, None, None
    elif (axes := acting_axes(inner, outer)) is not None:  # a 1xk then a kx1: each one's geometry on its axis
        if inner_biased and any(outer.padding):
            return SEPARATE_BIASED, None, None, None
        ph, pw = (inner if on else outer for on in axes)
        geometry = ConvSpec(1, 1, 1, (1, 1), (ph.stride[0], pw.stride[1]), (ph.dilation[0], pw.dilation[1]))
        padding, after = (*ph.padding[:2], *pw.padding[2:]), (0, 0, 0, 0)
    else:
        return NEITHER, None, None, None
    c = merged_cost(inner, outer)
    # The inner conv runs at its own resolution: per output pixel of a stride-s outer conv, s^2 of its pixels.
    per_output = max(1, (inner.out_size[0] * inner.out_size[1]) // (outer.out_size[0] * outer.out_size[1]))
    apart = cost(inner) * per_output + cost(outer)
    if c > apart:
        return f"the merged conv would take {c} multiply-adds per output pixel, more than the two convs ({apart})", None, None, None
    return None, geometry, padding, after


@st.composite
def separate_axes_pair(draw):
    """(inner, outer, inner bias kind): RepNeXt's ``conv_7_h(conv_7_w(x))``, a 1xk (stride, dilation, padding on the
    width) then a kx1 (on the height), or the other way round; sometimes both on one axis (refused)."""
    c = draw(st.sampled_from([1, 2, 4]))
    first_on = draw(st.sampled_from([0, 1]))
    second_on = draw(st.sampled_from([1 - first_on, 1 - first_on, first_on]))

    def along(axis, cin, size):
        k, s, d = draw(st.integers(1, 4)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
        p = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        kernel, stride, dilation = ((v, 1) if axis == 0 else (1, v) for v in (k, s, d))
        padding = (*p, 0, 0) if axis == 0 else (0, 0, *p)
        g = draw(st.sampled_from([1, cin]))
        extent = (k - 1) * d + 1
        assume(size[axis] + sum(p) >= extent)  # a non-empty output
        return ConvSpec(cin, cin, g, kernel, stride, dilation, padding, draw(st.booleans()), *size)

    size = (draw(st.integers(4, 9)), draw(st.integers(4, 9)))
    inner = along(first_on, c, size)
    outer = along(second_on, c, inner.out_size)
    return inner, outer, draw(st.sampled_from(["none", "zeros", "random"]))


@given(pair=st.one_of(seq_pair(), separate_axes_pair()), dtype=float_dtypes(), batch=st.integers(1, 3), seed=seeds())
def test_merges_or_refuses_exactly_as_documented(pair, dtype, batch, seed):
    inner, outer, bias_kind = pair
    graph = build(inner, outer, bias_kind, dtype, seed, batch)
    refusal, geometry, padding, after = expected(inner, outer, bias_kind)

    fused, report = run_rules(graph, "seq_merge")
    if refusal is None:
        assert report.rule_counts() == {"seq_merge": 1}
        conv = only(fused, "conv2d")
        assert conv.attrs["stride"] == geometry.stride and conv.attrs["padding"] == padding
        assert conv.attrs["dilation"] == geometry.dilation
        assert conv.attrs["groups"] == gcd(inner.groups, outer.groups)
        assert conv.params["weight"].numel() == merged_cost(inner, outer)
        assert conv.source == "blk" and conv.x is graph.inputs[0]
        if any(after):  # the 1x1's zero padding, now after the merged conv
            pad = only(fused, "pad")
            assert fused.op_counts() == {"conv2d": 1, "pad": 1} and pad.x is conv.out
            assert pad.attrs["pads"] == after and pad.attrs["value"] == 0 and fused.outputs == [pad.out]
        else:
            assert fused.op_counts() == {"conv2d": 1}
    else:
        assert report.fired == [] and fused.op_counts() == {"conv2d": 2}
        assert refusal_reason(graph, "seq_merge", graph.nodes[1]) == refusal
        # An exactness refusal, or a pair no form merges, is reported on the outer conv; a cost refusal is a choice.
        exactness = refusal.startswith("the 1x1 conv has a bias") or refusal in (PADDED_BIASED, NEITHER, SEPARATE_BIASED)
        assert reasons(report, "conv2d") == ([f"seq_merge: {refusal}"] if exactness else [])
    assert_graphs_equal(graph, fused, random_input(inner.input_shape(batch), dtype, seed + 2), dtype)


@given(dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_refused_for_two_non_pointwise_convs(dtype, seed, data):
    inner = data.draw(conv_specs())
    assume(not inner.is_pointwise)
    h, w = inner.out_size
    outer = data.draw(conv_specs_onto((h, w), (h, w), 1, in_channels=inner.out_channels, out_channels=data.draw(st.integers(1, 16))))
    assume(not outer.is_pointwise)
    assume(pad_after(inner, True) is None and pad_after(outer, outer.bias) is None and acting_axes(inner, outer) is None)
    graph = build(inner, outer, "random", dtype, seed)
    fused, report = run_rules(graph, "seq_merge")
    assert report.fired == [] and fused.op_counts() == {"conv2d": 2}
    assert refusal_reason(graph, "seq_merge", graph.nodes[1]) == expected(inner, outer, "random")[0]


@given(dtype=float_dtypes(), c=st.integers(2, 16), k=st.integers(2, 7), seed=seeds())
def test_refused_when_merged_kernel_is_larger(dtype, c, k, seed):
    """k x k conv C -> 1, then 1x1 1 -> C: the merged C x C x k x k kernel dwarfs both."""
    inner = ConvSpec(c, 1, 1, (k, k), padding=(k // 2, (k - 1) // 2, k // 2, (k - 1) // 2), height=6, width=6)
    outer = ConvSpec(1, c, 1, (1, 1), height=6, width=6)
    graph = build(inner, outer, "random", dtype, seed)
    fused, report = run_rules(graph, "seq_merge")
    assert report.fired == [] and fused.op_counts() == {"conv2d": 2}
    assert refusal_reason(graph, "seq_merge", graph.nodes[1]) == (
        f"the merged conv would take {c * c * k * k} multiply-adds per output pixel, more than the two convs ({c * k * k + c})"
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


# --------------------------------------------------------------------------- one normal form for a zero pad around a bias-free 1x1


@st.composite
def pad_pw_kxk(draw):
    """(pads, bias-free 1x1 spec on the unpadded input, kxk spec on the padded 1x1 output)."""
    outer = draw(conv_specs())
    t, b, l, r = pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    size = (outer.height - t - b, outer.width - l - r)
    assume(min(size) >= 1)
    pw = draw(pointwise(draw(st.integers(1, 8)), size, cout=outer.in_channels, bias=False))
    return pads, pw, outer


def pad_spellings(pads, pw, outer, dtype, seed, *, pad_first: bool):
    """``outer(pw(pad(x)))`` (``pad_first``) or ``outer(pad(pw(x)))``, with the same weights."""
    b = GraphBuilder()
    x = b.input("x", pw.input_shape(), dtype)
    if pad_first:
        y = add_conv(b, b.pad(x, pads=pads, source="blk.pad"), pw, dtype, seed, "blk.pw")
    else:
        y = b.pad(add_conv(b, x, pw, dtype, seed, "blk.pw"), pads=pads, source="blk.pad")
    return b.build(add_conv(b, y, outer, dtype, seed + 1, "blk.kxk"))


@given(case=pad_pw_kxk(), dtype=float_dtypes(), seed=seeds())
def test_a_zero_pad_before_or_after_a_bias_free_1x1_has_one_normal_form(case, dtype, seed):
    """conv(conv1x1(pad(x))) and conv(pad(conv1x1(x))) rewrite (all rules) to the same graph: one conv where it merges."""
    pads, pw, outer = case
    first, after = (pad_spellings(pads, pw, outer, dtype, seed, pad_first=f) for f in (True, False))
    (a, _), (b, _) = rewrite(first), rewrite(after)
    assert a.op_counts() == b.op_counts()
    for na, nb in zip(a.nodes, b.nodes):
        assert (na.op, dict(na.attrs)) == (nb.op, dict(nb.attrs))
        assert na.params.keys() == nb.params.keys() and all(torch.equal(na.params[k], nb.params[k]) for k in na.params)
    if merged_cost(pw, outer) <= cost(pw) + cost(outer):
        assert a.op_counts() == {"conv2d": 1}
    xt = random_input(pw.input_shape(), dtype, seed + 2)
    assert_graphs_equal(first, a, xt, dtype)
    assert_graphs_equal(after, b, xt, dtype)


@given(dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_kxk_then_padded_1x1_is_the_merged_conv_then_the_pad(dtype, seed, data):
    """conv1x1(conv(x), padding P) without bias and pad(conv1x1(conv(x)), P) both end as pad(one conv, P)."""
    inner = data.draw(conv_specs())
    h, w = inner.out_size
    pads = tuple(data.draw(st.integers(0, 2)) for _ in range(4))
    pw = ConvSpec(inner.out_channels, data.draw(st.integers(1, 4)), 1, (1, 1), bias=False, height=h, width=w)
    assume(merged_cost(inner, pw) <= cost(inner) + cost(pw))
    graphs = []
    for spelled in ("padding", "pad"):
        b = GraphBuilder()
        x = b.input("x", inner.input_shape(), dtype)
        y = add_conv(b, x, inner, dtype, seed, "blk.kxk")
        if spelled == "padding":
            y = b.conv2d(y, **conv_params(pw, dtype, seed + 1), padding=pads, source="blk.pw")
        else:
            y = b.pad(add_conv(b, y, pw, dtype, seed + 1, "blk.pw"), pads=pads, source="blk.pw")
        graphs.append(b.build(y))
    (a, _), (b, _) = rewrite(graphs[0]), rewrite(graphs[1])
    # The pad stays after the merged conv unless that is itself a bias-free 1x1 of stride 1 (pad_absorb).
    absorbed = inner.kernel == (1, 1) and inner.stride == (1, 1) and not inner.bias
    want = {"conv2d": 1, "pad": 1} if any(pads) and not absorbed else {"conv2d": 1}
    assert a.op_counts() == b.op_counts() == want
    assert torch.equal(only(a, "conv2d").params["weight"], only(b, "conv2d").params["weight"])
    xt = random_input(inner.input_shape(), dtype, seed + 2)
    for g, f in zip(graphs, (a, b)):
        assert_graphs_equal(g, f, xt, dtype)


@given(dtype=float_dtypes(), seed=seeds(), pads=st.tuples(*[st.integers(0, 2)] * 4).filter(any), k=st.sampled_from([(3, 3), (1, 3), (5, 3)]),
       outer_pad=st.sampled_from([(0, 0, 0, 0), (1, 1, 1, 1), (0, 1, 0, 0)]))
def test_a_biased_1x1_that_pads_merges_only_before_an_unpadded_kxk(dtype, seed, pads, k, outer_pad):
    """A biased 1x1 that zero-pads has the bias on its border, not 0: it is not a pad after a pointwise conv.

    Its output is pad(conv1x1(x; W1), P) + b1 everywhere, border included, so before a kxk conv that does
    not pad it merges into one conv padded by P (DBB's BN-and-pad); before a padded kxk it is refused.
    """
    pw = ConvSpec(3, 4, 1, (1, 1), padding=pads, bias=True, height=5, width=5)
    h, w = pw.out_size
    outer = ConvSpec(4, 2, 1, k, padding=outer_pad, height=h, width=w)
    graph = build(pw, outer, "random", dtype, seed)
    fused, report = run_rules(graph, "seq_merge")
    if any(outer_pad):
        assert report.fired == [] and fused.op_counts() == {"conv2d": 2}
        assert refusal_reason(graph, "seq_merge", graph.nodes[1]) == PADDED_BIASED
        assert reasons(report, "conv2d") == [f"seq_merge: {PADDED_BIASED}"]
        return
    assert report.rule_counts() == {"seq_merge": 1} and fused.op_counts() == {"conv2d": 1}
    assert only(fused, "conv2d").attrs["padding"] == pads
    assert_graphs_equal(graph, fused, random_input(pw.input_shape(), dtype, seed + 2), dtype)


@given(dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_refused_for_a_biased_1x1_before_a_zero_padding_kxk(dtype, seed, data):
    """The border of the padded kxk would read 0 where the unfused graph reads the 1x1's bias."""
    outer = data.draw(conv_specs().filter(lambda c: any(c.padding) and c.kernel != (1, 1)))
    inner = data.draw(pointwise(data.draw(st.integers(1, 8)), (outer.height, outer.width), cout=outer.in_channels, bias=True))
    graph = build(inner, outer, "random", dtype, seed)
    refusal = "the 1x1 conv has a bias and the kxk conv after it zero-pads: its border would see 0, not the bias"
    fused, report = run_rules(graph, "seq_merge")
    assert report.fired == [] and fused.op_counts() == {"conv2d": 2}
    assert reasons(report, "conv2d") == [f"seq_merge: {refusal}"]


class PadThen1x1(nn.Module):
    """A bias-free 1x1 conv then an unpadded 3x3 conv, with a zero pad before (``pad_first``) or after the 1x1."""

    def __init__(self, pad_first: bool) -> None:
        super().__init__()
        self.pad_first = pad_first
        self.pw = nn.Conv2d(4, 6, 1, bias=False)
        self.kxk = nn.Conv2d(6, 5, 3)

    def forward(self, x):
        if self.pad_first:
            return self.kxk(self.pw(F.pad(x, (1, 1, 1, 1))))
        return self.kxk(F.pad(self.pw(x), (1, 1, 1, 1)))


def test_both_spellings_fuse_to_one_conv_with_equal_weights():
    torch.manual_seed(0)
    first = PadThen1x1(pad_first=True).double().eval()
    after = PadThen1x1(pad_first=False).double().eval()
    after.load_state_dict(first.state_dict())
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    fused = [repalgebra.fuse(m, x) for m in (first, after)]
    convs = [[c for c in f.modules() if isinstance(c, nn.Conv2d)] for f in fused]
    assert [f.fuse_report.ops_after for f in fused] == [{"conv2d": 1}] * 2
    assert [len(c) for c in convs] == [1, 1]
    (a,), (b,) = convs
    assert a.padding == b.padding == (1, 1)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    for f, m in zip(fused, (first, after)):
        assert (f(x) - m(x)).abs().max().item() <= 1e-12
