"""The rewrite engine on random foldable regions: float64 folding with one cast back, dead nodes removed, a fixpoint.

For each region (``linear_graphs``, float32 and float64): the fused graph is one conv (every rule that
applies was applied, in any order the engine walks), a second rewrite fires nothing, every node of the
result is read, parameters are in the dtype of the values they act on, and they are *exactly* the fold
of the same graph computed in float64 (inputs and all) rounded once.  The engine mutants run this file
with the engine tests of ``tests/test_rewrite.py``.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings

from repalgebra import rewrite
from repalgebra.builder import GraphBuilder
from repalgebra.testing import assert_graphs_equal, linear_graphs


def _in_float64(graph):
    """The same graph with float64 inputs and parameters (nothing to cast back)."""
    b = GraphBuilder()
    env = {id(v): b.input(v.name, v.shape, torch.float64) for v in graph.inputs}
    for n in graph.nodes:
        params = {k: p.to(torch.float64) for k, p in n.params.items()}
        env[id(n.out)] = b.node(n.op, *[env[id(i)] for i in n.inputs], source=n.source, **n.attrs, **params)
    return b.build(*[env[id(o)] for o in graph.outputs])


@given(ex=linear_graphs())
@settings(max_examples=40)
def test_engine_folds_in_float64_casts_back_once_and_leaves_no_dead_node(ex):
    fused, report = rewrite(ex.graph)
    assert fused.op_counts() == {"conv2d": 1}, f"{ex}\n{fused}"
    again, report2 = rewrite(fused)
    assert report2.fired == [] and str(again) == str(fused)
    assert fused.map_params(lambda p, n: p).eliminate_dead() == 0, "a node of the result is never read"
    truth, _ = rewrite(_in_float64(ex.graph))
    (conv,), (exact,) = fused.nodes, truth.nodes
    for k, p in conv.params.items():
        assert p.dtype == ex.dtype, f"{k} is {p.dtype}, its values are {ex.dtype}"
        assert torch.equal(p, exact.params[k].to(ex.dtype)), f"{k} is not the float64 fold rounded once"
    assert_graphs_equal(ex.graph, fused, ex.x, ex.dtype)
