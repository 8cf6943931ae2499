"""identity_elim: ``identity(x) = x``, no preconditions.

Tolerances: :func:`repalgebra.testing.assert_graphs_equal` (here the fused
graph does exactly the same arithmetic, so any difference would be a bug).
"""

import torch
from hypothesis import given
from hypothesis import strategies as st
from rulecheck import run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.interpret import run_graph
from repalgebra.testing import add_conv, assert_graphs_equal, conv_specs, float_dtypes, random_input, seeds


@given(
    spec=conv_specs(),
    dtype=float_dtypes(),
    before=st.integers(0, 3),
    after=st.integers(0, 3),
    shared=st.booleans(),
    seed=seeds(),
)
def test_identities_vanish(spec, dtype, before, after, shared, seed):
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(2), dtype)
    y = x
    for k in range(before):
        y = b.identity(y, source=f"pre{k}")
    y = add_conv(b, y, spec, dtype, seed)
    for k in range(after):
        y = b.identity(y, source=f"post{k}")
    n = before + after
    if shared:  # an identity read twice
        i = b.identity(y, source="shared")
        y = b.add(i, i)
        n += 1
    graph = b.build(y)

    fused, report = run_rules(graph, "identity_elim")
    assert report.rule_counts() == ({"identity_elim": n} if n else {})
    assert "identity" not in fused.op_counts()
    assert fused.op_counts() == {k: v for k, v in graph.op_counts().items() if k != "identity"}
    xt = random_input(spec.input_shape(2), dtype, seed + 1)
    assert_graphs_equal(graph, fused, xt, dtype)
    assert torch.equal(run_graph(graph, xt), run_graph(fused, xt))  # same ops, same arithmetic


@given(dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]), depth=st.integers(1, 4))
def test_graph_of_only_identities_returns_its_input(dtype, depth):
    b = GraphBuilder()
    x = b.input("x", (1, 3, 2, 2), dtype)
    y = x
    for _ in range(depth):
        y = b.identity(y)
    graph = b.build(y)
    fused, report = run_rules(graph, "identity_elim")
    assert fused.nodes == [] and fused.outputs == [x]
    assert report.rule_counts() == {"identity_elim": depth}
    xt = random_input((1, 3, 2, 2), dtype, 0)
    assert torch.equal(run_graph(fused, xt), xt)
