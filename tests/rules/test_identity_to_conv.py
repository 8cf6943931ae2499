"""identity_to_conv: the skip operand ``x`` of a sum/concat beside a conv or BN of ``x`` becomes a 1x1 conv.

    x = conv(x; I_G, 0)      (I_G: identity kernel; G the sibling conv's groups, C beside a BN)

Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

import torch
from hypothesis import given
from hypothesis import strategies as st
from rulecheck import SUM_RULES, converts_if_it_pays, reasons, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.kernels import identity_kernel
from repalgebra.testing import (add_bn, add_conv, assert_graphs_equal, bn_stats, conv_specs_onto, float_dtypes,
                                random_input, seeds)


@given(
    dtype=float_dtypes(),
    c=st.integers(1, 16),
    hw=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    join=st.sampled_from(["add", "sub", "concat"]),
    sibling=st.sampled_from(["conv", "bn"]),
    skip_first=st.booleans(),
    seed=seeds(),
    data=st.data(),
)
def test_skip_becomes_identity_conv(dtype, c, hw, join, sibling, skip_first, seed, data):
    shape = (data.draw(st.integers(1, 3)), c, *hw)
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    if sibling == "conv":
        cout = data.draw(st.integers(1, 16)) if join == "concat" else c
        spec = data.draw(conv_specs_onto(hw, hw, 1, in_channels=c, out_channels=cout))
        sib, groups = add_conv(b, x, spec, dtype, seed, "conv"), spec.groups
    else:
        sib, groups = add_bn(b, x, data.draw(bn_stats(c)), dtype, "bn"), c
    operands = (x, sib) if skip_first else (sib, x)
    y = b.concat(*operands, axis=1, source="block") if join == "concat" else b.node(join, *operands, source="block")
    graph = b.build(y)

    fused, report = run_rules(graph, "identity_to_conv")
    xt = random_input(shape, dtype, seed + 1)
    if not converts_if_it_pays(graph, fused, report, join):
        return  # the 1x1 would not merge at no cost (off the conv's lattice, or a concat of grouped kernels)
    assert report.rule_counts() == {"identity_to_conv": 1}
    assert report.fired[0].op == join
    assert fused.op_counts().get("conv2d", 0) == graph.op_counts().get("conv2d", 0) + 1
    ident = next(n for n in fused.nodes if n.op == "conv2d" and n.source == "block")
    assert ident.x is x and ident.attrs["groups"] == groups and "bias" not in ident.params
    assert torch.equal(ident.params["weight"], identity_kernel(c, groups, torch.float64).to(dtype))
    assert_graphs_equal(graph, fused, xt, dtype)

    fused, report = run_rules(graph, "identity_to_conv", "bn_to_conv", *SUM_RULES)
    assert fused.op_counts() == {"conv2d": 1}, report
    assert_graphs_equal(graph, fused, xt, dtype)


@given(dtype=float_dtypes(), c=st.integers(1, 16), case=st.sampled_from(["x+x", "x+conv(z)", "x+relu(x)"]), seed=seeds(), data=st.data())
def test_not_fired_without_a_sibling_of_the_same_input(dtype, c, case, seed, data):
    b = GraphBuilder()
    x = b.input("x", (1, c, 4, 4), dtype)
    z = b.input("z", (1, c, 4, 4), dtype)
    if case == "x+x":
        other = x
    elif case == "x+conv(z)":
        other = add_conv(b, z, data.draw(conv_specs_onto((4, 4), (4, 4), 1, in_channels=c, out_channels=c)), dtype, seed)
    else:
        other = b.relu(x)
    graph = b.build(b.add(x, other, source="sum"))
    fused, report = run_rules(graph, "identity_to_conv")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    if case == "x+x":  # two branches of one value that stay a sum: reported
        assert reasons(report, "add") and reasons(report, "add")[0].startswith("no rule applies")
    else:  # not a sum of branches of one value: nothing to report
        assert reasons(report, "add") == []
    xs = (random_input((1, c, 4, 4), dtype, seed), random_input((1, c, 4, 4), dtype, seed + 1))
    assert_graphs_equal(graph, fused, xs, dtype)
