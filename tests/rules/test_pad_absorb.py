"""pad_absorb: an explicit zero pad next to a conv becomes the conv's own padding.

    conv(pad(x, P); W, padding p) = conv(x; W, padding p + P)                      (any conv)
    pad(conv1x1(x; W, padding p), P) = conv1x1(x; W, padding p + P)                (1x1, stride 1, no bias)
    pad(x, (0, 0, 0, 0)) = x
    avg_pool(pad(x, (a, a, c, c)); padding (p, q)) = avg_pool(x; padding (p + a, q + c), count_include_pad=True)

Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

from dataclasses import replace

import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from rulecheck import fired, only, reasons, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.testing import (ConvSpec, add_conv, assert_graphs_equal, conv_params, conv_specs, float_dtypes,
                                random_input, seeds)


@st.composite
def pad_then_conv(draw, min_pad=0):
    """(conv spec on the padded input, pads, original input shape)."""
    spec = draw(conv_specs())
    t, b, l, r = pads = [draw(st.integers(min_pad, 3)) for _ in range(4)]
    h, w = spec.height - t - b, spec.width - l - r
    if h < 1 or w < 1:  # the padded input is the spec's input: grow it instead of rejecting
        spec = replace(spec, height=spec.height + max(0, 1 - h), width=spec.width + max(0, 1 - w))
        h, w = spec.height - t - b, spec.width - l - r
    return spec, tuple(pads), (draw(st.integers(1, 3)), spec.in_channels, h, w)


@given(case=pad_then_conv(), dtype=float_dtypes(), seed=seeds(), readers=st.integers(1, 2))
def test_zero_pad_becomes_conv_padding(case, dtype, seed, readers):
    spec, pads, shape = case
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    p = b.pad(x, pads=pads, source="pad")
    ys = [add_conv(b, p, spec, dtype, seed + k, f"conv{k}") for k in range(readers)]
    graph = b.build(*ys)

    fused, report = run_rules(graph, "pad_absorb")
    # A pad by nothing is removed once, as the identity; a real one is absorbed by each reader.
    assert report.rule_counts() == {"pad_absorb": readers if any(pads) else 1}
    assert fused.op_counts() == {"conv2d": readers}
    for conv in fused.nodes:
        assert conv.x is x
        assert conv.attrs["padding"] == tuple(a + q for a, q in zip(spec.padding, pads))
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed), dtype)


@given(case=pad_then_conv(), dtype=float_dtypes(), seed=seeds(), value=st.sampled_from([1.0, -0.5, 3.0]))
def test_refused_for_a_nonzero_pad_value(case, dtype, seed, value):
    spec, pads, shape = case
    assume(any(pads))
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    graph = b.build(add_conv(b, b.pad(x, pads=pads, value=value, source="pad"), spec, dtype, seed))
    for rules in (("pad_absorb",), ()):
        fused, report = run_rules(graph, *rules)
        assert fired(report, "pad_absorb") == 0 and fused.op_counts() == graph.op_counts()
        assert reasons(report, "pad") == [f"pad_absorb: pads with {value}, not zero"]
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed), dtype)


@given(case=pad_then_conv(), dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_refused_for_a_negative_pad(case, dtype, seed, data):
    spec, pads, shape = case
    # Make one side a crop (negative) and grow the input by as much, so the conv still sees its size.
    k = data.draw(st.integers(0, 3), label="cropped side")
    crop = data.draw(st.integers(1, 2), label="crop")
    n, c, h, w = shape
    if k < 2:
        h += pads[k] + crop
    else:
        w += pads[k] + crop
    pads = tuple(-crop if i == k else p for i, p in enumerate(pads))
    shape = (n, c, h, w)
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    graph = b.build(add_conv(b, b.pad(x, pads=pads, source="pad"), spec, dtype, seed))
    fused, report = run_rules(graph, "pad_absorb")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert reasons(report, "pad") == ["pad_absorb: a negative pad crops"]
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed), dtype)


@st.composite
def pointwise_then_pad(draw):
    """(1x1 stride-1 conv spec, its bias kind, pads after it)."""
    cin, cout = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    g = draw(st.sampled_from([d for d in range(1, cin + 1) if cin % d == 0 and cout % d == 0]))
    own = tuple(draw(st.integers(0, 2)) for _ in range(4))
    spec = ConvSpec(cin, cout, g, (1, 1), dilation=draw(st.sampled_from([(1, 1), (2, 3)])), padding=own,
                    height=draw(st.integers(1, 5)), width=draw(st.integers(1, 5)))
    pads = draw(st.tuples(*[st.integers(0, 3)] * 4).filter(any))
    return spec, draw(st.sampled_from(["none", "zeros", "random"])), pads


def pointwise_pad_graph(spec, bias_kind, pads, dtype, seed, value=0.0, extra_reader=False):
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(2), dtype)
    p = conv_params(spec, dtype, seed)
    p.pop("bias", None)
    if bias_kind == "zeros":
        p["bias"] = torch.zeros(spec.out_channels, dtype=dtype)
    elif bias_kind == "random":
        p["bias"] = torch.randn(spec.out_channels, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    y = b.conv2d(x, **p, **spec.attrs, source="blk.pw")
    out = b.pad(y, pads=pads, value=value, source="blk.pad")
    return b.build(out, y) if extra_reader else b.build(out)


@given(case=pointwise_then_pad(), dtype=float_dtypes(), seed=seeds())
def test_zero_pad_after_a_bias_free_1x1_becomes_its_padding(case, dtype, seed):
    spec, bias_kind, pads = case
    graph = pointwise_pad_graph(spec, bias_kind, pads, dtype, seed)
    fused, report = run_rules(graph, "pad_absorb")
    x = random_input(spec.input_shape(2), dtype, seed + 1)
    assert_graphs_equal(graph, fused, x, dtype)
    if bias_kind == "random":
        assert report.fired == [] and fused.op_counts() == {"conv2d": 1, "pad": 1}
        assert reasons(report, "pad") == ["pad_absorb: the 1x1 conv before it has a bias: its own border would be the bias, not 0"]
        return
    assert report.rule_counts() == {"pad_absorb": 1} and fused.op_counts() == {"conv2d": 1}
    conv = only(fused, "conv2d")
    assert conv.x is graph.inputs[0] and fused.outputs == [conv.out]
    assert conv.attrs["padding"] == tuple(a + q for a, q in zip(spec.padding, pads))
    assert conv.attrs["groups"] == spec.groups and conv.attrs["dilation"] == spec.dilation
    assert conv.source == "blk"


@given(case=pointwise_then_pad(), dtype=float_dtypes(), seed=seeds(), why=st.sampled_from(["shared", "stride", "kernel", "value"]))
def test_pad_after_a_conv_stays_unless_the_conv_commutes_with_it(case, dtype, seed, why):
    """The conv's output read elsewhere, a stride or a larger kernel (its border is no pad), or a non-zero pad value."""
    spec, _, pads = case
    if why == "stride":
        spec = replace(spec, stride=(1, 2))
    elif why == "kernel":
        spec = replace(spec, kernel=(1, 2), width=spec.width + spec.dilation[1])
    graph = pointwise_pad_graph(spec, "none", pads, dtype, seed, value=2.0 if why == "value" else 0.0, extra_reader=why == "shared")
    fused, report = run_rules(graph, "pad_absorb")
    assert report.fired == [] and fused.op_counts() == {"conv2d": 1, "pad": 1}
    (reason,) = reasons(report, "pad")
    assert reason == "pad_absorb: pads with 2.0, not zero" if why == "value" else reason.startswith("no rule applies")
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(2), dtype, seed + 1), dtype)


@given(dtype=float_dtypes(), value=st.sampled_from([0.0, 1.5]), after=st.sampled_from(["input", "conv", "relu"]), seed=seeds())
def test_a_pad_by_nothing_is_the_identity(dtype, value, after, seed):
    spec = ConvSpec(2, 3, 1, (3, 3), stride=(2, 1), height=5, width=4)
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(), dtype)
    y = {"input": x, "conv": None, "relu": None}[after]
    if after != "input":
        y = add_conv(b, x, spec, dtype, seed)
        y = b.relu(y) if after == "relu" else y
    graph = b.build(b.pad(y, pads=(0, 0, 0, 0), value=value, source="pad"))
    fused, report = run_rules(graph, "pad_absorb")
    assert report.rule_counts() == {"pad_absorb": 1} and "pad" not in fused.op_counts()
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(), dtype, seed), dtype)


@st.composite
def pad_then_pool(draw):
    """(pads, pool attrs, input shape) with an even pad the pool can take as padding."""
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    a, c = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    assume(a or c)
    ph, pw = draw(st.integers(0, kh // 2 - a)), draw(st.integers(0, kw // 2 - c))
    s = draw(st.sampled_from([1, 2]))
    h = draw(st.integers(max(1, kh - 2 * (ph + a)), kh + 4))
    w = draw(st.integers(max(1, kw - 2 * (pw + c)), kw + 4))
    cip = True if (ph or pw) else draw(st.booleans())
    attrs = dict(kernel=(kh, kw), stride=(s, draw(st.sampled_from([1, 2]))), padding=(ph, pw), count_include_pad=cip)
    return (a, a, c, c), attrs, (draw(st.integers(1, 2)), draw(st.integers(1, 4)), h, w)


def pool_graph(pads, attrs, shape, dtype, value=0.0):
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    return b.build(b.avg_pool2d(b.pad(x, pads=pads, value=value, source="blk.pad"), **attrs, source="blk.pool"))


@given(case=pad_then_pool(), dtype=float_dtypes(), seed=seeds())
def test_even_zero_pad_becomes_pool_padding(case, dtype, seed):
    """avg_pool(pad(x, (a, a, c, c)); padding (p, q)) = avg_pool(x; padding (p + a, q + c), count_include_pad=True)."""
    pads, attrs, shape = case
    graph = pool_graph(pads, attrs, shape, dtype)
    fused, report = run_rules(graph, "pad_absorb")
    assert report.rule_counts() == {"pad_absorb": 1} and fused.op_counts() == {"avg_pool2d": 1}
    pool = only(fused, "avg_pool2d")
    assert pool.x is graph.inputs[0] and pool.source == "blk"
    assert pool.attrs["padding"] == (attrs["padding"][0] + pads[0], attrs["padding"][1] + pads[2])
    assert pool.attrs["count_include_pad"] and pool.attrs["kernel"] == attrs["kernel"] and pool.attrs["stride"] == attrs["stride"]
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed), dtype)


POOL_REFUSALS = {
    "uneven": "the pad is uneven on an axis; a pool pads both sides alike",
    "ceil_mode": "the pool rounds its output size up (ceil_mode): where its last window starts depends on the padding",
    "not-counted": "the pool does not count its own padding (count_include_pad=False), and the pad's zeros count",
    "too-much": "the pool would pad more than half its kernel",
}


@given(dtype=float_dtypes(), seed=seeds(), why=st.sampled_from(sorted(POOL_REFUSALS)), k=st.sampled_from([3, 5]), hw=st.integers(5, 8))
def test_pad_before_a_pool_stays_where_the_pool_cannot_take_it(dtype, seed, why, k, hw):
    pads, attrs = (1, 1, 1, 1), dict(kernel=(k, k), stride=(2, 1), padding=(0, 0), count_include_pad=True)
    if why == "uneven":
        pads = (1, 0, 1, 1)
    elif why == "ceil_mode":
        attrs["ceil_mode"] = True
    elif why == "not-counted":
        attrs.update(padding=(1, 0), count_include_pad=False)
    else:
        attrs["padding"] = (k // 2, 0)
    graph = pool_graph(pads, attrs, (1, 3, hw, hw), dtype)
    fused, report = run_rules(graph, "pad_absorb")
    assert report.fired == [] and fused.op_counts() == {"avg_pool2d": 1, "pad": 1}
    assert reasons(report, "pad") == [f"pad_absorb: {POOL_REFUSALS[why]}"]
    assert_graphs_equal(graph, fused, random_input((1, 3, hw, hw), dtype, seed), dtype)


def test_a_pad_before_a_pool_beside_a_conv_folds_like_the_pool_padding():
    """``conv(x) + avg_pool(pad(x))`` and ``conv(x) + avg_pool(x, padding)`` both end as one conv, the same."""
    from repalgebra import rewrite

    ends = []
    for spelled in ("pad", "padding"):
        b = GraphBuilder()
        x = b.input("x", (1, 3, 6, 6), torch.float64)
        conv = add_conv(b, x, ConvSpec(3, 3, 1, (3, 3), padding=(1, 1, 1, 1), height=6, width=6), torch.float64, 0, "blk.conv")
        if spelled == "pad":
            pool = b.avg_pool2d(b.pad(x, pads=(1, 1, 1, 1), source="blk.pad"), kernel=(3, 3), stride=(1, 1), source="blk.pool")
        else:
            pool = b.avg_pool2d(x, kernel=(3, 3), stride=(1, 1), padding=(1, 1), source="blk.pool")
        graph = b.build(b.add(conv, pool, source="blk"))
        fused, _ = rewrite(graph)
        assert fused.op_counts() == {"conv2d": 1}
        assert_graphs_equal(graph, fused, random_input((1, 3, 6, 6), torch.float64, 1), torch.float64)
        ends.append(only(fused, "conv2d"))
    a, b_ = ends
    assert a.attrs == b_.attrs and torch.equal(a.params["weight"], b_.params["weight"]) and torch.equal(a.params["bias"], b_.params["bias"])
