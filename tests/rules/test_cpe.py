"""Conditional positional encoding (FastViT RepCPE): ``x + dwconv(x)`` folds to one depthwise conv.

identity_to_conv, kernel_pad and branch_sum compose to it.  Tolerances:
:func:`repalgebra.testing.assert_graphs_equal`.
"""

import torch
from hypothesis import given
from hypothesis import strategies as st
from rulecheck import only, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.testing import assert_graphs_equal, float_dtypes, random_input, seeds


@given(
    c=st.integers(1, 16), k=st.sampled_from([1, 3, 5, 7]), size=st.integers(1, 8), batch=st.integers(1, 3),
    bias=st.booleans(), skip_first=st.booleans(), dtype=float_dtypes(), seed=seeds(),
)
def test_cpe_is_one_depthwise_conv(c, k, size, batch, bias, skip_first, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    b = GraphBuilder()
    x = b.input("x", (batch, c, size, size), dtype)
    p = k // 2
    pe = b.conv2d(x, weight=rnd(c, 1, k, k), bias=rnd(c) if bias else None, padding=(p, p, p, p), groups=c, source="pe")
    graph = b.build(b.add(x, pe, source="cpe") if skip_first else b.add(pe, x, source="cpe"))

    fused, report = run_rules(graph)
    assert fused.op_counts() == {"conv2d": 1}
    assert report.rule_counts() == {"identity_to_conv": 1, "branch_sum": 1, **({"kernel_pad": 1} if k > 1 else {})}
    conv = only(fused, "conv2d")
    assert conv.attrs["groups"] == c and conv.params["weight"].shape == (c, 1, k, k) and ("bias" in conv.params) == bias
    assert_graphs_equal(graph, fused, random_input((batch, c, size, size), dtype, seed + 1), dtype)
