"""avg_pool_to_conv: an average pool that meets a conv becomes a depthwise conv with weights 1/(kh kw).

    avg_pool(x; k, s, p, count_include_pad=True) = conv(x; ones(C, 1, kh, kw) / (kh kw), stride s, padding p, groups C)

Refused: ``count_include_pad=False`` with padding (border windows divide by
fewer elements) or ``ceil_mode``; a zero-padding pool after a biased 1x1 conv
it would merge with.  Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from rulecheck import SUM_RULES, fired, merges_if_it_pays, reasons, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.testing import (ConvSpec, add_bn, add_conv, assert_graphs_equal, bn_stats, conv_params, conv_specs_onto,
                                float_dtypes, random_input, seeds)

COUNT_PAD_REASON = (
    "avg_pool_to_conv: count_include_pad=False with padding (or ceil_mode): border windows divide by fewer elements"
)


@st.composite
def pools(draw, *, count_include_pad=None, ceil_mode=False):
    """(channels, input (H, W), pool attrs) for a valid avg pool; ints and pairs both drawn."""
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    s = draw(st.sampled_from([1, 2]))
    h = draw(st.integers(max(1, kh - 2 * ph), max(1, kh - 2 * ph) + 6))
    w = draw(st.integers(max(1, kw - 2 * pw), max(1, kw - 2 * pw) + 6))
    if count_include_pad is None:
        count_include_pad = True if (ph or pw) else draw(st.booleans())
    as_int = kh == kw and ph == pw and draw(st.booleans())
    attrs = dict(
        kernel=kh if as_int else (kh, kw),
        stride=s if as_int else (s, s),
        padding=ph if as_int else (ph, pw),
        count_include_pad=count_include_pad,
        ceil_mode=ceil_mode,
    )
    return draw(st.integers(1, 16)), (h, w), attrs


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _reach(attrs):
    """The pool's padding on both sides less its span (ConvSpec.reach): a conv summed with it needs the same one."""
    return tuple(2 * p - k + 1 for p, k in zip(_pair(attrs["padding"]), _pair(attrs["kernel"])))


def pool_beside_conv(data, c, size, attrs, dtype, seed, op, pool_first=True):
    b = GraphBuilder()
    x = b.input("x", (data.draw(st.integers(1, 3)), c, *size), dtype)
    pooled = b.avg_pool2d(x, **attrs, source="blk.pool")
    s = _pair(attrs["stride"])[0]
    spec = data.draw(conv_specs_onto(size, pooled.shape[2:], s, in_channels=c, out_channels=c, reach=_reach(attrs)))
    conv = add_conv(b, x, spec, dtype, seed, "blk.conv")
    operands = (pooled, conv) if pool_first else (conv, pooled)
    y = b.concat(*operands, axis=1) if op == "concat" else b.node(op, *operands, source="blk")
    return b.build(y), x.shape


@given(pool=pools(), dtype=float_dtypes(), op=st.sampled_from(["add", "sub", "concat"]), pool_first=st.booleans(), seed=seeds(), data=st.data())
def test_pool_summed_with_a_conv_becomes_a_depthwise_conv(pool, dtype, op, pool_first, seed, data):
    c, size, attrs = pool
    graph, shape = pool_beside_conv(data, c, size, attrs, dtype, seed, op, pool_first)

    fused, report = run_rules(graph, "avg_pool_to_conv")
    assert report.rule_counts() == {"avg_pool_to_conv": 1}
    assert fused.op_counts() == {"conv2d": 2, op: 1}
    conv = next(n for n in fused.nodes if n.source == "blk.pool")
    kh, kw = _pair(attrs["kernel"])
    ph, pw = _pair(attrs["padding"])
    assert conv.attrs["groups"] == c and conv.attrs["padding"] == (ph, ph, pw, pw)
    assert conv.attrs["stride"] == _pair(attrs["stride"])
    assert torch.equal(conv.params["weight"], torch.full((c, 1, kh, kw), 1.0 / (kh * kw), dtype=torch.float64).to(dtype))
    xt = random_input(shape, dtype, seed + 1)
    assert_graphs_equal(graph, fused, xt, dtype)

    if op != "concat":  # a concat of grouped convs stays a concat (concat_merge refuses to densify)
        branches = fused
        fused, report = run_rules(graph, "avg_pool_to_conv", *SUM_RULES)
        merges_if_it_pays(branches, fused, report, op)
        assert_graphs_equal(graph, fused, xt, dtype)


@given(pool=pools(), dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_pool_then_bn_summed_with_a_conv(pool, dtype, seed, data):
    """DiverseBranchBlock's pool branch: pool -> BN -> summed with a conv; the BN folds once the pool is a conv."""
    c, size, attrs = pool
    b = GraphBuilder()
    x = b.input("x", (data.draw(st.integers(1, 3)), c, *size), dtype)
    pooled = add_bn(b, b.avg_pool2d(x, **attrs, source="blk.pool"), data.draw(bn_stats(c)), dtype, "blk.bn")
    spec = data.draw(conv_specs_onto(size, pooled.shape[2:], _pair(attrs["stride"])[0], in_channels=c, out_channels=c, reach=_reach(attrs)))
    graph = b.build(b.add(pooled, add_conv(b, x, spec, dtype, seed, "blk.conv"), source="blk"))

    fused, report = run_rules(graph, "avg_pool_to_conv", "bn_fold", *SUM_RULES)
    assert fired(report, "avg_pool_to_conv") == 1 and fired(report, "bn_fold") == 1
    merges_if_it_pays(run_rules(graph, "avg_pool_to_conv", "bn_fold")[0], fused, report, "add")
    assert_graphs_equal(graph, fused, random_input(x.shape, dtype, seed + 1), dtype)


@given(pool=pools(), dtype=float_dtypes(), bias=st.sampled_from(["none", "zeros", "random"]), seed=seeds(), data=st.data())
def test_pool_after_a_pointwise_conv(pool, dtype, bias, seed, data):
    c, size, attrs = pool
    pads = any(_pair(attrs["padding"]))
    b = GraphBuilder()
    cin = data.draw(st.integers(1, 16))
    x = b.input("x", (1, cin, *size), dtype)
    spec = ConvSpec(cin, c, 1, (1, 1), bias=bias != "none", height=size[0], width=size[1])
    p = conv_params(spec, dtype, seed)
    if bias == "zeros":
        p["bias"] = torch.zeros(c, dtype=dtype)
    y = b.avg_pool2d(b.conv2d(x, **p, **spec.attrs, source="pw"), **attrs, source="pool")
    graph = b.build(y)

    fused, report = run_rules(graph, "avg_pool_to_conv")
    if pads and bias == "random":
        assert report.fired == [] and fused.op_counts() == graph.op_counts()
        assert reasons(report, "avg_pool2d") == [
            "avg_pool_to_conv: the conv before it has a bias and the pool zero-pads: the border would see 0, not the bias"
        ]
    else:
        assert report.rule_counts() == {"avg_pool_to_conv": 1} and fused.op_counts() == {"conv2d": 2}
    assert_graphs_equal(graph, fused, random_input((1, cin, *size), dtype, seed + 1), dtype)


@given(pool=pools(count_include_pad=False), dtype=float_dtypes(), op=st.sampled_from(["add", "sub"]), seed=seeds(), data=st.data())
def test_count_include_pad_false(pool, dtype, op, seed, data):
    """Refused with padding (the border divides by fewer elements); exact and fired without."""
    c, size, attrs = pool
    graph, shape = pool_beside_conv(data, c, size, attrs, dtype, seed, op)
    for rules in (("avg_pool_to_conv",), ()):
        fused, report = run_rules(graph, *rules)
        if any(_pair(attrs["padding"])):
            assert fired(report, "avg_pool_to_conv") == 0 and fused.op_counts()["avg_pool2d"] == 1
            assert reasons(report, "avg_pool2d") == [COUNT_PAD_REASON]
        else:
            assert fired(report, "avg_pool_to_conv") == 1 and "avg_pool2d" not in fused.op_counts()
        assert_graphs_equal(graph, fused, random_input(shape, dtype, seed), dtype)


@given(pool=pools(ceil_mode=True), dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_refused_with_ceil_mode(pool, dtype, seed, data):
    c, size, attrs = pool
    graph, shape = pool_beside_conv(data, c, size, attrs, dtype, seed, "add")
    fused, report = run_rules(graph, "avg_pool_to_conv")
    assert report.fired == [] and reasons(report, "avg_pool2d") == [COUNT_PAD_REASON]


@given(pool=pools(), dtype=float_dtypes())
def test_a_lone_pool_is_left_alone(pool, dtype):
    c, size, attrs = pool
    b = GraphBuilder()
    x = b.input("x", (1, c, *size), dtype)
    graph = b.build(b.avg_pool2d(x, **attrs))
    fused, report = run_rules(graph, "avg_pool_to_conv")
    assert report.fired == []
    assert reasons(report, "avg_pool2d") == ["no rule applies (input from graph input, used by graph output)"]


@given(pool=pools(), dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_refused_after_a_biased_pointwise_conv_when_the_pool_pads(pool, dtype, seed, data):
    """conv1x1(x; W, b) then a zero-padding pool: its border windows average in 0, not b, so they must not merge.

    (The case of ``test_pool_after_a_pointwise_conv`` that matters most, always drawn here.)
    """
    c, size, attrs = pool
    assume(any(_pair(attrs["padding"])))
    b = GraphBuilder()
    cin = data.draw(st.integers(1, 16))
    x = b.input("x", (data.draw(st.integers(1, 3)), cin, *size), dtype)
    spec = ConvSpec(cin, c, data.draw(st.sampled_from([g for g in range(1, 17) if cin % g == 0 and c % g == 0])), (1, 1), height=size[0], width=size[1])
    graph = b.build(b.avg_pool2d(add_conv(b, x, spec, dtype, seed, "pw"), **attrs, source="pool"))
    xt = random_input(x.shape, dtype, seed + 1)
    for rules in (("avg_pool_to_conv",), ()):
        fused, report = run_rules(graph, *rules)
        assert fired(report, "avg_pool_to_conv") == 0 and fused.op_counts() == {"avg_pool2d": 1, "conv2d": 1}
        assert reasons(report, "avg_pool2d") == [
            "avg_pool_to_conv: the conv before it has a bias and the pool zero-pads: the border would see 0, not the bias"
        ]
        assert_graphs_equal(graph, fused, xt, dtype)


@given(pool=pools(), dtype=float_dtypes(), bias=st.booleans(), conv_pad=st.tuples(*[st.integers(0, 2)] * 4).filter(any),
       seed=seeds(), data=st.data())
def test_pool_after_a_padded_pointwise_conv(pool, dtype, bias, conv_pad, seed, data):
    """A 1x1 conv that zero-pads, then the pool, summed with a kxk conv of the same input (DBB's 1x1 -> average branch
    as ``repalgebra.expand`` builds it, the BN folded into the 1x1): the pool becomes a conv, and the branch and the
    kxk fold into one conv; refused, as above, when the conv has a bias and the pool pads too."""
    c, size, attrs = pool
    (kh, kw), (ph, pw), (s, _) = _pair(attrs["kernel"]), _pair(attrs["padding"]), _pair(attrs["stride"])
    pads = bool(ph or pw)
    b = GraphBuilder()
    cin = data.draw(st.integers(1, 8))
    x = b.input("x", (1, cin, *size), dtype)
    pw_spec = ConvSpec(cin, c, 1, (1, 1), padding=conv_pad, bias=bias, height=size[0], width=size[1])
    pooled = b.avg_pool2d(add_conv(b, x, pw_spec, dtype, seed, "pw"), **attrs, source="pool")
    t, bt, l, r = conv_pad
    kxk = ConvSpec(cin, c, 1, (kh, kw), stride=(s, s), padding=(t + ph, bt + ph, l + pw, r + pw), height=size[0], width=size[1])
    graph = b.build(b.add(pooled, add_conv(b, x, kxk, dtype, seed + 1, "kxk"), source="blk"))
    xt = random_input((1, cin, *size), dtype, seed + 2)
    for rules in (("avg_pool_to_conv",), ()):
        fused, report = run_rules(graph, *rules)
        if pads and bias:
            assert fired(report, "avg_pool_to_conv") == 0 and fused.op_counts()["avg_pool2d"] == 1
        else:
            assert fired(report, "avg_pool_to_conv") == 1 and "avg_pool2d" not in fused.op_counts()
            if not rules:
                assert fused.op_counts() == {"conv2d": 1}
        assert_graphs_equal(graph, fused, xt, dtype)
