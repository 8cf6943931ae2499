"""bn_fold: ``BN(conv(x; W, b)) = conv(x; W * s[o], b * s + t)`` for any conv geometry.

Tolerances: :func:`repalgebra.testing.assert_graphs_equal` (float64 run: one
rounding of each fused parameter to the graph dtype, eps(dtype) x magnitude;
float32 run 1e-5 x magnitude; float64 1e-12 x magnitude).
"""

from hypothesis import given
from hypothesis import strategies as st
from rulecheck import fired, only, reasons, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.testing import (add_bn, add_conv, assert_graphs_equal, bn_stats, conv_specs, float_dtypes,
                                random_input, seeds)


@given(spec=conv_specs(), dtype=float_dtypes(), batch=st.integers(1, 3), seed=seeds(), data=st.data())
def test_folds_bn_into_any_conv(spec, dtype, batch, seed, data):
    stats = data.draw(bn_stats(spec.out_channels), label="bn")
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(batch), dtype)
    y = add_bn(b, add_conv(b, x, spec, dtype, seed, "block.conv"), stats, dtype, "block.bn")
    graph = b.build(y)

    fused, report = run_rules(graph, "bn_fold")

    assert report.rule_counts() == {"bn_fold": 1}
    assert report.fired[0].source == "block.bn" and report.fired[0].op == "batch_norm"
    assert report.before == {"batch_norm": 1, "conv2d": 1} and report.after == {"conv2d": 1}
    assert report.left_alone == []
    conv = only(fused, "conv2d")
    assert "bias" in conv.params  # b * s + t: a BN always leaves a bias
    assert {k: conv.attrs[k] for k in spec.attrs} == spec.attrs
    assert conv.params["weight"].shape == spec.weight_shape
    assert conv.source == "block"
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(batch), dtype, seed + 1), dtype)


@given(spec=conv_specs(), dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_folds_a_chain_of_bns(spec, dtype, seed, data):
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(), dtype)
    y = add_conv(b, x, spec, dtype, seed)
    n = data.draw(st.integers(2, 3), label="bns")
    for k in range(n):
        y = add_bn(b, y, data.draw(bn_stats(spec.out_channels)), dtype, f"bn{k}")
    graph = b.build(y)
    fused, report = run_rules(graph, "bn_fold")
    assert fired(report, "bn_fold") == n and fused.op_counts() == {"conv2d": 1}
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(), dtype, seed + 1), dtype)


@given(spec=conv_specs(), dtype=float_dtypes(), seed=seeds(), use=st.sampled_from(["output", "add"]), data=st.data())
def test_refused_when_conv_output_has_another_user(spec, dtype, seed, use, data):
    stats = data.draw(bn_stats(spec.out_channels))
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(), dtype)
    c = add_conv(b, x, spec, dtype, seed, "conv")
    y = add_bn(b, c, stats, dtype, "bn")
    graph = b.build(y, c) if use == "output" else b.build(b.add(y, c, source="sum"))

    fused, report = run_rules(graph, "bn_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert reasons(report, "batch_norm") == ["bn_fold: the conv before it is also read elsewhere"]

    # With every rule: a conv that is also a graph output must stay, so the BN stays too.  Summed
    # with the conv instead, the pair legitimately folds through other rules (c + BN(c) is one
    # conv of c, which then merges with the conv computing c when one of them is 1x1).
    fused, report = run_rules(graph)
    if use == "output":
        assert fused.op_counts() == {"batch_norm": 1, "conv2d": 1}
        assert reasons(report, "batch_norm") == ["bn_fold: the conv before it is also read elsewhere"]
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(), dtype, seed + 1), dtype)


@given(dtype=float_dtypes(), channels=st.integers(1, 16), data=st.data())
def test_bn_without_conv_is_left_alone(dtype, channels, data):
    b = GraphBuilder()
    x = b.input("x", (2, channels, 5, 5), dtype)
    y = add_bn(b, b.relu(x), data.draw(bn_stats(channels)), dtype, "norm")
    graph = b.build(y)
    fused, report = run_rules(graph, "bn_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert reasons(report, "batch_norm") == ["no rule applies (input from relu, used by graph output)"]
