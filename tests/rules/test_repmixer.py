"""RepMixer (FastViT): ``x + ls * (BN_a(dwconv(x)) + BN_b(x) - BN_c(x))`` folds to one depthwise conv.

No rule is written for it: bn_fold, bn_to_conv, kernel_pad, branch_sum,
scale_fold and identity_to_conv compose to it.  Tolerances:
:func:`repalgebra.testing.assert_graphs_equal`.
"""

import torch
from hypothesis import given
from hypothesis import strategies as st
from rulecheck import only, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.testing import add_bn, assert_graphs_equal, bn_stats, float_dtypes, random_input, seeds


@given(
    c=st.integers(1, 16), k=st.sampled_from([1, 3, 5]), size=st.integers(1, 8), batch=st.integers(1, 3),
    scale_branch=st.booleans(), dtype=float_dtypes(), seed=seeds(), data=st.data(),
)
def test_repmixer_is_one_depthwise_conv(c, k, size, batch, scale_branch, dtype, seed, data):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    b = GraphBuilder()
    x = b.input("x", (batch, c, size, size), dtype)
    p = k // 2
    mixer = b.add(
        add_bn(b, b.conv2d(x, weight=rnd(c, 1, k, k), padding=(p, p, p, p), groups=c, source="m.conv.conv"), data.draw(bn_stats(c)), dtype, "m.conv.bn"),
        add_bn(b, x, data.draw(bn_stats(c)), dtype, "m.skip"),
        source="m",
    )
    if scale_branch:  # MobileOne's 1x1 scale branch, as in FastViT's mixer
        one = add_bn(b, b.conv2d(x, weight=rnd(c, 1, 1, 1), groups=c, source="m.scale.conv"), data.draw(bn_stats(c)), dtype, "m.scale.bn")
        mixer = b.add(mixer, one, source="m")
    diff = b.sub(mixer, add_bn(b, x, data.draw(bn_stats(c)), dtype, "norm"), source="tm")
    graph = b.build(b.add(x, b.scale(diff, scale=rnd(c), source="tm.layer_scale"), source="tm"))

    fused, report = run_rules(graph)
    assert fused.op_counts() == {"conv2d": 1}
    conv = only(fused, "conv2d")
    assert conv.attrs["groups"] == c and conv.params["weight"].shape == (c, 1, k, k) and "bias" in conv.params
    assert_graphs_equal(graph, fused, random_input((batch, c, size, size), dtype, seed + 1), dtype)
