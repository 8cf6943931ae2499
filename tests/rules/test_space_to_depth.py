"""space_to_depth: a conv of the r x r phases of its input, stacked as channels, is one strided conv of the input.

    conv(cat_g x[:, :, a_g::r, b_g::r]; W, stride s, padding p) = conv(x; W', stride r s, padding r p)

Refused: a grouped conv of the phases (as one conv of the full grid it reads every phase), a dilated one.  Not matched: a phase missing or repeated, phases of two values, a slice that stops
short.  Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

import torch
from hypothesis import given
from hypothesis import strategies as st
from rulecheck import fired, only, reasons, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.testing import assert_graphs_equal, float_dtypes, random_input, seeds


def focus(r, order, size, cin, cout, k, stride, padding, dtype, seed, *, bias=True, groups=1, dilation=1, stop=None):
    """``conv(cat([x[:, :, a::r, b::r] for (a, b) in order], 1))`` (YOLOv5's Focus for r = 2); each phase sliced along
    height then width; ``stop``: the height slices end there (None: at the end)."""
    gen = torch.Generator().manual_seed(seed)
    b = GraphBuilder()
    x = b.input("x", (2, cin, *size), dtype)
    parts = [b.slice(b.slice(x, axis=2, start=a, end=stop, step=r, source="focus"), axis=3, start=c, step=r, source="focus")
             for a, c in order]
    cat = b.concat(*parts, axis=1, source="focus")
    weight = torch.randn(cout, len(order) * cin // groups, k, k, generator=gen, dtype=torch.float64) / (len(order) * cin * k * k) ** 0.5
    params = {"weight": weight.to(dtype)} | ({"bias": torch.randn(cout, generator=gen, dtype=torch.float64).to(dtype)} if bias else {})
    y = b.conv2d(cat, **params, stride=(stride, stride), padding=padding, groups=groups, dilation=(dilation, dilation),
                 source="focus.conv")
    return b.build(y), x.shape


@st.composite
def cases(draw):
    r = draw(st.sampled_from([2, 3]))
    order = draw(st.permutations([(a, c) for a in range(r) for c in range(r)]))
    k = draw(st.integers(1, 3))
    padding = tuple(draw(st.integers(0, k // 2)) for _ in range(4))
    size = (r * draw(st.integers(k, k + 3)), r * draw(st.integers(k, k + 3)))
    return r, order, size, draw(st.integers(1, 3)), draw(st.integers(1, 4)), k, draw(st.sampled_from([1, 2])), padding


@given(case=cases(), dtype=float_dtypes(), bias=st.booleans(), seed=seeds())
def test_a_conv_of_the_phases_is_one_strided_conv_of_the_input(case, dtype, bias, seed):
    r, order, size, cin, cout, k, stride, padding = case
    graph, shape = focus(r, order, size, cin, cout, k, stride, padding, dtype, seed, bias=bias)
    fused, report = run_rules(graph, "space_to_depth")
    assert fired(report, "space_to_depth") == 1 and set(fused.op_counts()) == {"conv2d"}, str(fused)
    conv = only(fused, "conv2d")
    assert conv.params["weight"].shape == (cout, cin, r * k, r * k)
    assert conv.attrs["stride"] == (r * stride,) * 2 and conv.attrs["padding"] == tuple(r * p for p in padding)
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed + 1), dtype)


@given(dtype=float_dtypes(), seed=seeds())
def test_refused_for_a_grouped_conv_and_a_dilated_one(dtype, seed):
    order = [(0, 0), (1, 0), (0, 1), (1, 1)]
    for kwargs, why in ((dict(groups=2), "in 2 groups"), (dict(dilation=2), "a dilated conv")):
        graph, _ = focus(2, order, (8, 8), 2, 4, 3, 1, (1, 1, 1, 1), dtype, seed, **kwargs)
        fused, report = run_rules(graph, "space_to_depth")
        assert report.fired == [] and fused.op_counts() == graph.op_counts()
        assert any(why in reason for reason in reasons(report, "concat")), (why, reasons(report, "concat"))


@given(dtype=float_dtypes(), seed=seeds(), which=st.sampled_from(["missing", "repeated", "short", "two inputs"]))
def test_not_matched_unless_every_phase_of_one_value_is_read_once_whole(dtype, seed, which):
    order = [(0, 0), (1, 0), (0, 1), (1, 1)]
    if which == "missing":
        graph, _ = focus(2, order[:3], (8, 8), 2, 4, 3, 1, (1, 1, 1, 1), dtype, seed)
    elif which == "repeated":
        graph, _ = focus(2, order[:3] + order[:1], (8, 8), 2, 4, 3, 1, (1, 1, 1, 1), dtype, seed)
    elif which == "short":
        graph, _ = focus(2, order, (8, 8), 2, 4, 3, 1, (1, 1, 1, 1), dtype, seed, stop=6)
    else:  # the phases of two values (a second input) concatenated
        b = GraphBuilder()
        xs = [b.input(f"x{i}", (1, 2, 8, 8), dtype) for i in range(2)]
        parts = [b.slice(b.slice(xs[k % 2], axis=2, start=a, step=2), axis=3, start=c, step=2) for k, (a, c) in enumerate(order)]
        graph = b.build(b.conv2d(b.concat(*parts, axis=1), weight=torch.ones(4, 8, 1, 1, dtype=dtype)))
    fused, report = run_rules(graph, "space_to_depth")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
