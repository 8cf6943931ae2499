"""border_fill: a zero pad whose border is then written with a 1x1 conv's bias (or a BN's output at 0) is its padding.

    fill(pad(conv1x1(x; W, b, padding P), Q), b) = conv1x1(x; W, b, padding P + Q)
    fill(pad(bn(x), Q), bn(0))                   = bn(pad(x, Q))

The fills are written as ``torch.export`` records DiverseBranchBlock's ``BNAndPadLayer``: one
``slice_scatter`` per side, its source a constant broadcast to the side, sometimes with a whole-tensor
``slice_scatter`` between them.  Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

import torch
from hypothesis import given
from hypothesis import strategies as st
from rulecheck import only, refusal_reason, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.testing import (add_bn, add_conv, assert_graphs_equal, bn_stats, conv_specs, float_dtypes, input_shapes,
                                random_input, seeds)

SIDES = ("top", "bottom", "left", "right")


@st.composite
def pads(draw):
    """(top, bottom, left, right), 0-2 each, not all 0; and the order the sides are filled in."""
    q = draw(st.tuples(*[st.integers(0, 2)] * 4).filter(any))
    return q, draw(st.permutations(SIDES))


def fill(b: GraphBuilder, y, value: torch.Tensor, q, order, artifacts: bool, skip: str | None = None, narrow: str | None = None):
    """``y`` with each padded side overwritten by ``value`` per channel, as one ``slice_scatter`` per side
    (but side ``skip``, and side ``narrow`` one row or column short)."""
    n, c, h, w = y.shape
    for side in order:
        width = q[SIDES.index(side)] - (side == narrow)
        if width == 0 or side == skip:
            continue
        axis = 2 if side in ("top", "bottom") else 3
        start, end = (0, width) if side in ("top", "left") else (-width, None)
        shape = (n, c, width, w) if axis == 2 else (n, c, h, width)
        src = b.expand(b.constant(value=value.reshape(1, -1, 1, 1).clone(), dtype=value.dtype), shape=shape)
        filled = b.slice_scatter(y, src, axis=axis, start=start, end=end, step=1, source="blk.bn")
        y = b.slice_scatter(y, filled, axis=0, start=0, end=None, step=1) if artifacts else filled  # y[:] = y'
    return y


def at_zero(stats, dtype):
    """bn(0) of the BN's parameters as the model holds them (in ``dtype``), computed in float64 and rounded once.

    From the float64 statistics instead, the fill would differ from what the fused graph computes from the
    rounded parameters by the rounding of three factors (mean, weight, var) on top of the fill's own: up to
    ~3.5 u of the terms, more than the comparison's 2 u of the magnitude (a draw hit 2.2 u on one term)."""
    p = {k: v.to(torch.float64) for k, v in stats.params(dtype).items()}
    return (p["bias"] - p["mean"] * p["weight"] / torch.sqrt(p["var"] + stats.eps)).to(dtype)


@given(spec=conv_specs(kernel=(1, 1), stride=(1, 1), bias=True), q=pads(), dtype=float_dtypes(), artifacts=st.booleans(),
       seed=seeds(), batch=st.integers(1, 3))
def test_a_border_filled_with_the_bias_is_the_conv_padding(spec, q, dtype, artifacts, seed, batch):
    q, order = q
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(batch), dtype)
    y = add_conv(b, x, spec, dtype, seed, "blk.conv")
    bias = b.nodes[-1].params["bias"]
    graph = b.build(fill(b, b.pad(y, pads=q, value=0.0, source="blk.bn"), bias, q, order, artifacts))

    fused, report = run_rules(graph, "border_fill")
    assert fused.op_counts() == {"conv2d": 1}
    conv = only(fused, "conv2d")
    assert conv.attrs["padding"] == tuple(p + a for p, a in zip(spec.padding, q))
    assert report.rule_counts()["border_fill"] == 1 + artifacts * sum(1 for a in q if a)
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(batch), dtype, seed + 1), dtype)


@given(shape=input_shapes(max_size=6), q=pads(), dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_a_border_filled_with_bn_at_zero_moves_the_pad_before_the_bn(shape, q, dtype, seed, data):
    q, order = q
    stats = data.draw(bn_stats(shape[1]))
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    y = b.pad(add_bn(b, x, stats, dtype, "blk.bn.bn"), pads=q, value=0.0, source="blk.bn")
    graph = b.build(fill(b, y, at_zero(stats, dtype), q, order, artifacts=False))

    fused, report = run_rules(graph, "border_fill")
    assert report.rule_counts() == {"border_fill": 1}
    assert [n.op for n in fused.nodes] == ["pad", "batch_norm"]
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed + 1), dtype)


@given(spec=conv_specs(kernel=(1, 1), stride=(1, 1), bias=True), q=pads(), dtype=float_dtypes(), seed=seeds(),
       case=st.sampled_from(["other_values", "side_left_zero", "narrower_fill"]))
def test_not_fired_unless_every_padded_side_is_filled_with_the_bias(spec, q, dtype, seed, case):
    """Values off the bias by more than rounding, a padded side left at 0, and a fill narrower than the pad all stay."""
    q, order = q
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(), dtype)
    y = add_conv(b, x, spec, dtype, seed, "blk.conv")
    bias = b.nodes[-1].params["bias"]
    value = bias + 1e-3 * (1 + bias.abs()) if case == "other_values" else bias
    padded = b.pad(y, pads=q, value=0.0, source="blk.bn")
    first = next(s for s in order if q[SIDES.index(s)])
    if case == "narrower_fill" and q[SIDES.index(first)] == 1:
        return  # narrower than 1 is no fill at all: the side-left-at-zero case
    out = fill(b, padded, value, q, order, artifacts=False, skip=first if case == "side_left_zero" else None,
               narrow=first if case == "narrower_fill" else None)
    graph = b.build(out)
    fused, report = run_rules(graph, "border_fill")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    if case == "other_values":
        assert "other values than the bias" in refusal_reason(graph, "border_fill", graph.nodes[-1])
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(), dtype, seed + 1), dtype)


def test_not_fired_after_a_3x3_conv():
    """A 3x3 conv's padded border reads the image's edge, not only its bias."""
    b = GraphBuilder()
    x = b.input("x", (1, 2, 5, 5), torch.float64)
    y = b.conv2d(x, weight=torch.randn(2, 2, 3, 3, dtype=torch.float64), bias=torch.randn(2, dtype=torch.float64),
                 stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1)
    bias = b.nodes[-1].params["bias"]
    q = (1, 1, 1, 1)
    graph = b.build(fill(b, b.pad(y, pads=q, value=0.0), bias, q, SIDES, artifacts=False))
    fused, report = run_rules(graph, "border_fill")
    assert report.fired == [] and "not 1x1" in refusal_reason(graph, "border_fill", graph.nodes[-1])


@given(shape=input_shapes(), dtype=float_dtypes(), axis=st.integers(0, 3), seed=seeds())
def test_a_whole_tensor_slice_scatter_is_its_source(shape, dtype, axis, seed):
    b = GraphBuilder()
    x, s = b.input("x", shape, dtype), b.input("s", shape, dtype)
    graph = b.build(b.slice_scatter(x, b.relu(s), axis=axis, start=0, end=None, step=1))
    fused, report = run_rules(graph, "border_fill")
    assert fused.op_counts() == {"relu": 1}
    assert_graphs_equal(graph, fused, (random_input(shape, dtype, seed), random_input(shape, dtype, seed + 1)), dtype)
