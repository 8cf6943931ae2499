"""pad_absorb: an explicit zero pad before a conv becomes the conv's own padding.

    conv(pad(x, (a, b, c, e)); W, padding p) = conv(x; W, padding p + (a, b, c, e))

Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st
from rulecheck import fired, reasons, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.testing import add_conv, assert_graphs_equal, conv_specs, float_dtypes, random_input, seeds


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
    assert report.rule_counts() == {"pad_absorb": readers}
    assert fused.op_counts() == {"conv2d": readers}
    for conv in fused.nodes:
        assert conv.x is x
        assert conv.attrs["padding"] == tuple(a + q for a, q in zip(spec.padding, pads))
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed), dtype)


@given(case=pad_then_conv(), dtype=float_dtypes(), seed=seeds(), value=st.sampled_from([1.0, -0.5, 3.0]))
def test_refused_for_a_nonzero_pad_value(case, dtype, seed, value):
    spec, pads, shape = case
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
