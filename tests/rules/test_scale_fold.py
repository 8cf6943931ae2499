"""scale_fold: a per-channel multiply after a conv (layer scale) folds into it.

    gamma * conv(x; W, b) = conv(x; W * gamma[o], b * gamma)

Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

import torch
from hypothesis import given
from hypothesis import strategies as st
from rulecheck import fired, only, reasons, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.testing import add_conv, assert_graphs_equal, conv_specs, float_dtypes, random_input, seeds


def _scale(n, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)


@given(
    spec=conv_specs(),
    dtype=float_dtypes(),
    axis=st.sampled_from([1, -3]),
    per_tensor=st.booleans(),
    batch=st.integers(1, 3),
    seed=seeds(),
)
def test_folds_layer_scale_into_conv(spec, dtype, axis, per_tensor, batch, seed):
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(batch), dtype)
    gamma = _scale(1 if per_tensor else spec.out_channels, seed, dtype)
    graph = b.build(b.scale(add_conv(b, x, spec, dtype, seed, "blk.conv"), scale=gamma, axis=axis, source="blk.ls"))

    fused, report = run_rules(graph, "scale_fold")
    assert report.rule_counts() == {"scale_fold": 1}
    assert fused.op_counts() == {"conv2d": 1}
    conv = only(fused, "conv2d")
    assert ("bias" in conv.params) == spec.bias  # no bias appears from nothing
    assert conv.params["weight"].shape == spec.weight_shape and conv.source == "blk"
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(batch), dtype, seed + 1), dtype)


@given(spec=conv_specs(), dtype=float_dtypes(), seed=seeds(), use=st.sampled_from(["output", "add"]))
def test_refused_when_conv_output_has_another_user(spec, dtype, seed, use):
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(), dtype)
    c = add_conv(b, x, spec, dtype, seed)
    y = b.scale(c, scale=_scale(spec.out_channels, seed, dtype), source="ls")
    graph = b.build(y, c) if use == "output" else b.build(b.add(y, c))
    fused, report = run_rules(graph, "scale_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert reasons(report, "scale") == ["scale_fold: the conv before it is also read elsewhere"]
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(), dtype, seed), dtype)


@given(spec=conv_specs(), dtype=float_dtypes(), seed=seeds(), case=st.sampled_from(["height_axis", "no_conv"]))
def test_not_fired_off_the_channel_axis_or_without_a_conv(spec, dtype, seed, case):
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(), dtype)
    if case == "height_axis":
        y = b.scale(add_conv(b, x, spec, dtype, seed), scale=_scale(spec.out_size[0], seed, dtype), axis=2)
    else:
        y = b.scale(x, scale=_scale(spec.in_channels, seed, dtype))
    graph = b.build(y)
    fused, report = run_rules(graph, "scale_fold")
    assert fired(report, "scale_fold") == 0 and fused.op_counts() == graph.op_counts()
    assert reasons(report, "scale")[0].startswith("no rule applies")
