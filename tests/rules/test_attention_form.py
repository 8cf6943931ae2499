"""attention_form: softmax(c * q k^T) v written out becomes one attention op (F.scaled_dot_product_attention).

    matmul(softmax(c * matmul(q, transpose(k, -2, -1)), -1), v) = attention(q, k, v; scale = c)

Tolerances: relative to the largest output, float64 1e-9, float32 1e-5 (one fused kernel against
three ops: different summation orders).
"""

import torch
from hypothesis import given
from hypothesis import strategies as st
from rulecheck import only, run_rules

from repalgebra import run_graph
from repalgebra.builder import GraphBuilder
from repalgebra.testing import float_dtypes, random_input, seeds

RTOL = {torch.float64: 1e-9, torch.float32: 1e-5}


@st.composite
def sizes(draw):
    """(batch dims, L queries, S keys, E features, Ev value features)."""
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    return lead, draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.integers(1, 4))


def attention_graph(sz, dtype, *, scale=None, permute=False, softmax_axis=-1, scores_out=False, k_layout="bse"):
    """q (.., L, E), k (.., S, E), v (.., S, Ev) -> softmax(scale * q k^T) v, written out.

    ``k_layout="sbe"``: k arrives as (S, B, E) and a permute (1, 2, 0) makes it (B, E, S): a matmul
    operand of the right shape that is not k with its last two axes swapped.
    """
    lead, L, S, E, Ev = sz
    b = GraphBuilder()
    q = b.input("q", (*lead, L, E), dtype)
    v = b.input("v", (*lead, S, Ev), dtype)
    if k_layout == "sbe":
        k = b.input("k", (S, *lead, E), dtype)
        kt = b.permute(k, dims=(1, 2, 0), source="attn")
    else:
        k = b.input("k", (*lead, S, E), dtype)
        rank = len(lead) + 2
        kt = b.permute(k, dims=(*range(rank - 2), rank - 1, rank - 2), source="attn") if permute else b.transpose(k, dim0=-2, dim1=-1, source="attn")
    scores = b.matmul(q, kt, source="attn")
    s = scores
    if scale is not None:
        s = b.scale(s, scale=scale.to(dtype), axis=-1, source="attn")
    out = b.matmul(b.softmax(s, axis=softmax_axis, source="attn"), v, source="attn")
    graph = b.build(out, scores) if scores_out else b.build(out)
    return graph, k.shape


def _inputs(graph, seed, dtype):
    return [random_input(i.shape, dtype, seed + k) for k, i in enumerate(graph.inputs)]


def _close(a, b, dtype):
    a, b = (a if torch.is_tensor(a) else a[0]), (b if torch.is_tensor(b) else b[0])
    err = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
    assert err <= RTOL[dtype], f"relative error {err:.2e} > {RTOL[dtype]}"


@given(sz=sizes(), dtype=float_dtypes(), scaled=st.booleans(), permute=st.booleans(), seed=seeds())
def test_becomes_one_attention_op(sz, dtype, scaled, permute, seed):
    E = sz[3]
    scale = torch.full((sz[2],), E**-0.5, dtype=torch.float64) if scaled else None
    graph, _ = attention_graph(sz, dtype, scale=scale, permute=permute)
    fused, report = run_rules(graph, "attention_form")
    assert report.rule_counts() == {"attention_form": 1}
    assert set(fused.op_counts()) == {"attention"}
    node = only(fused, "attention")
    assert node.attrs["scale"] == (float(torch.tensor(E**-0.5, dtype=dtype)) if scaled else 1.0) and not node.attrs["causal"]
    xs = _inputs(graph, seed, dtype)
    _close(run_graph(fused, *xs), run_graph(graph, *xs), dtype)


@given(sz=sizes(), dtype=float_dtypes(), seed=seeds())
def test_not_fired_for_a_softmax_over_the_queries(sz, dtype, seed):
    graph, _ = attention_graph(sz, dtype, softmax_axis=-2)
    fused, report = run_rules(graph, "attention_form")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()


@given(sz=sizes(), dtype=float_dtypes(), seed=seeds())
def test_not_fired_when_the_scores_are_read_elsewhere(sz, dtype, seed):
    graph, _ = attention_graph(sz, dtype, scores_out=True)
    fused, report = run_rules(graph, "attention_form")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()


@given(sz=sizes(), dtype=float_dtypes(), seed=seeds())
def test_not_fired_for_a_scale_with_different_factors(sz, dtype, seed):
    S = sz[2]
    graph, _ = attention_graph(sz, dtype, scale=torch.arange(1, S + 1, dtype=torch.float64))
    fused, report = run_rules(graph, "attention_form")
    if S == 1:  # one factor after all
        assert report.rule_counts() == {"attention_form": 1}
        return
    assert report.fired == [] and fused.op_counts() == graph.op_counts()


@given(sz=sizes().filter(lambda s: len(s[0]) == 1), dtype=float_dtypes(), seed=seeds())
def test_not_fired_when_the_second_operand_is_not_k_transposed(sz, dtype, seed):
    """k as (S, B, E) permuted to (B, E, S): the right shape for the matmul, but not k^T of a (B, S, E) key."""
    graph, _ = attention_graph(sz, dtype, k_layout="sbe")
    fused, report = run_rules(graph, "attention_form")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
