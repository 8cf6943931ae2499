"""linear_seq_merge: a Linear after a Linear is one Linear, where that is no more work (or a sum absorbs it).

    Linear(Linear(x; W1, b1); W2, b2) = Linear(x; W2 W1, W2 b1 + b2)

Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

import torch
from hypothesis import given
from hypothesis import strategies as st
from rulecheck import linear_params, only, refusal_reason, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.testing import assert_graphs_equal, float_dtypes, random_input, seeds


@st.composite
def token_shapes(draw):
    """Leading axes of rank 0-2 (a batch, tokens), then the features."""
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    return lead + (draw(st.integers(1, 12)),)


@given(shape=token_shapes(), mid=st.integers(1, 12), out=st.integers(1, 12), biases=st.tuples(st.booleans(), st.booleans()),
       dtype=float_dtypes(), seed=seeds())
def test_merges_a_pair_exactly_where_it_is_no_more_work(shape, mid, out, biases, dtype, seed):
    """``I -> M -> O``: merged where ``O I <= M I + O M``, else refused with both costs; exact either way."""
    i = shape[-1]
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    y = b.linear(x, **linear_params(i, mid, biases[0], seed, dtype), source="head.fc1")
    graph = b.build(b.linear(y, **linear_params(mid, out, biases[1], seed + 1, dtype), source="head.fc2"))
    fused, report = run_rules(graph, "linear_seq_merge")
    if out * i <= mid * i + out * mid:
        assert report.rule_counts() == {"linear_seq_merge": 1}
        merged = only(fused, "linear")
        assert tuple(merged.params["weight"].shape) == (out, i) and ("bias" in merged.params) == any(biases)
        assert merged.source == "head"
    else:
        assert report.fired == [] and fused.op_counts() == {"linear": 2}
        assert f"{out * i} multiply-adds per token, more than the two ({mid * i + out * mid})" in refusal_reason(graph, "linear_seq_merge", graph.nodes[-1])
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed + 2), dtype)


@given(shape=token_shapes().filter(lambda s: s[-1] >= 5), rank=st.integers(1, 2), out=st.integers(5, 12), join=st.sampled_from(["add", "sub"]),
       base_bias=st.booleans(), dtype=float_dtypes(), seed=seeds())
def test_a_low_rank_adapter_merges_into_its_base(shape, rank, out, join, base_bias, dtype, seed):
    """LoRA: ``base(x) + s B(A(x))``.  ``B A`` alone is dearer than the pair (``O I`` against ``r (I + O)``: here
    ``I, O >= 5 > 2 r``), but the sum with ``base`` absorbs it: linear_affine_fold, linear_seq_merge and branch_sum
    leave one Linear."""
    i = shape[-1]
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    base = b.linear(x, **linear_params(i, out, base_bias, seed, dtype), source="attn.q.base_layer")
    low = b.linear(b.linear(x, **linear_params(i, rank, False, seed + 1, dtype), source="attn.q.lora_A"),
                   **linear_params(rank, out, False, seed + 2, dtype), source="attn.q.lora_B")
    low = b.scale(low, scale=torch.full((out,), 2.0, dtype=dtype), axis=-1, source="attn.q")  # alpha / r
    graph = b.build(getattr(b, join)(base, low, source="attn.q"))
    fused, report = run_rules(graph, "linear_affine_fold", "linear_seq_merge", "branch_sum")
    assert report.rule_counts() == {"linear_affine_fold": 1, "linear_seq_merge": 1, "branch_sum": 1}
    assert fused.op_counts() == {"linear": 1}
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed + 3), dtype)


def test_an_adapter_of_another_input_is_not_absorbed():
    """The sum absorbs ``B A`` only where the sibling Linear reads the adapter's own input with the merged shape."""
    b = GraphBuilder()
    x, z = b.input("x", (2, 8)), b.input("z", (2, 8))
    low = b.linear(b.linear(x, **linear_params(8, 1, False, 0, torch.float32)), **linear_params(1, 8, False, 1, torch.float32))
    graph = b.build(b.add(b.linear(z, **linear_params(8, 8, True, 2, torch.float32)), low))
    fused, report = run_rules(graph, "linear_seq_merge")
    assert report.fired == [] and fused.op_counts() == {"linear": 3, "add": 1}


def test_an_inner_output_read_elsewhere_is_left_alone():
    b = GraphBuilder()
    x = b.input("x", (3, 4))
    y = b.linear(x, **linear_params(4, 2, True, 0, torch.float32))
    graph = b.build(b.linear(y, **linear_params(2, 3, True, 1, torch.float32)), b.relu(y))
    fused, report = run_rules(graph, "linear_seq_merge")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
