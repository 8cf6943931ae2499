"""scale_into_conv: a per-channel scale before a conv folds into its kernel, zero padding or not.

    conv(s * x; W, b) = conv(x; W[o,i] * s[i], b)

Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

import torch
from hypothesis import given
from hypothesis import strategies as st
from rulecheck import only, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.testing import add_conv, assert_graphs_equal, conv_specs, float_dtypes, random_input, seeds


def _scale(n, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)


@given(spec=conv_specs(), dtype=float_dtypes(), axis=st.sampled_from([1, -3]), one_number=st.booleans(),
       batch=st.integers(1, 3), seed=seeds())
def test_folds_a_scale_before_any_conv(spec, dtype, axis, one_number, batch, seed):
    """Any stride, dilation, groups and zero padding: the padding of ``s * x`` is ``s * 0 = 0``."""
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(batch), dtype)
    s = _scale(spec.in_channels, seed, dtype)
    if one_number:
        s = s[:1].expand(spec.in_channels).clone()
    y = add_conv(b, b.scale(x, scale=s, axis=axis, source="blk.gamma"), spec, dtype, seed + 1, "blk.conv")
    graph = b.build(y)

    fused, report = run_rules(graph, "scale_into_conv")
    assert report.rule_counts() == {"scale_into_conv": 1}
    assert fused.op_counts() == {"conv2d": 1}
    conv = only(fused, "conv2d")
    assert conv.inputs[0] is fused.inputs[0] and conv.attrs == graph.nodes[1].attrs  # the window is unchanged
    assert ("bias" in conv.params) == spec.bias and conv.source == "blk"
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(batch), dtype, seed + 2), dtype)


@given(spec=conv_specs(), dtype=float_dtypes(), seed=seeds(), case=st.sampled_from(["read_twice", "height_axis"]))
def test_not_fired_when_the_scale_is_read_elsewhere_or_not_per_channel(spec, dtype, seed, case):
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(), dtype)
    if case == "height_axis":
        s = b.scale(x, scale=_scale(spec.input_shape()[2], seed, dtype), axis=2, source="s")
        graph = b.build(add_conv(b, s, spec, dtype, seed))
    else:
        s = b.scale(x, scale=_scale(spec.in_channels, seed, dtype), source="s")
        graph = b.build(add_conv(b, s, spec, dtype, seed), s)
    fused, report = run_rules(graph, "scale_into_conv")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(), dtype, seed + 1), dtype)
