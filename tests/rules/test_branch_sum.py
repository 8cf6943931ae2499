"""branch_sum: convs of one input with the same window add (or subtract) into one conv.

    conv(x; W_a, b_a) +- conv(x; W_b, b_b) = conv(x; W_a +- W_b, b_a +- b_b)   (regrouped to gcd(g_a, g_b))

where that gcd does not make more multiply-adds than the two convs (:func:`rulecheck.merge_weights`).

Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

import operator
from dataclasses import replace
from math import gcd

import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from rulecheck import fired, merge_weights, only, reasons, run_rules
from test_kernel_pad import grid

from repalgebra.builder import GraphBuilder
from repalgebra.match import window
from repalgebra.testing import add_conv, assert_graphs_equal, conv_specs_onto, float_dtypes, random_input, seeds


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def equal_window_pair(draw, other_ends: bool = False):
    """Two convs of one input with one window: same kernel, stride, dilation, top/left padding.

    Groups and bias are drawn independently.  ``other_ends``: the trailing padding differs where the stride
    leaves room for it at the example's size (the same output grid there, another at some other size).
    """
    c, size, out, s = draw(grid())
    a = draw(conv_specs_onto(size, out, s, in_channels=c, out_channels=c))
    t, bot, l, r = a.padding
    eh, ew = a.extent
    bottoms = [p for p in range(bot + s) if (a.height + t + p - eh) // s == (a.height + t + bot - eh) // s and a.height + t + p >= eh]
    rights = [p for p in range(r + s) if (a.width + l + p - ew) // s == (a.width + l + r - ew) // s and a.width + l + p >= ew]
    ends = (bot, r)
    if other_ends:
        others = [(p, q) for p in bottoms for q in rights if (p, q) != (bot, r)]
        assume(others)
        ends = draw(st.sampled_from(others))
    b = replace(a, groups=draw(st.sampled_from(_divisors(c))), bias=draw(st.booleans()), padding=(t, ends[0], l, ends[1]))
    return a, b


@given(pair=equal_window_pair(), dtype=float_dtypes(), op=st.sampled_from(["add", "sub"]), batch=st.integers(1, 3), seed=seeds())
def test_sums_equal_window_convs(pair, dtype, op, batch, seed):
    a, b_spec = pair
    bld = GraphBuilder()
    x = bld.input("x", a.input_shape(batch), dtype)
    ya, yb = add_conv(bld, x, a, dtype, seed, "block.a"), add_conv(bld, x, b_spec, dtype, seed + 1, "block.b")
    graph = bld.build(bld.node(op, ya, yb, source="block"))

    fused, report = run_rules(graph, "branch_sum")
    merged, apart = merge_weights(graph.nodes[:2], op)
    if merged > apart:  # groups 2 and 5 of 10 channels: gcd 1 is a dense kernel, more weights than both
        assert report.fired == [] and f"has {merged} multiply-adds per output pixel" in reasons(report, op)[0]
        return
    assert report.rule_counts() == {"branch_sum": 1}
    assert fused.op_counts() == {"conv2d": 1}
    conv = only(fused, "conv2d")
    assert conv.attrs["groups"] == gcd(a.groups, b_spec.groups)
    assert ("bias" in conv.params) == (a.bias or b_spec.bias)
    assert window(conv) == window(graph.nodes[0])
    assert conv.source == "block"
    assert_graphs_equal(graph, fused, random_input(a.input_shape(batch), dtype, seed), dtype)


@given(pair=equal_window_pair(), dtype=float_dtypes(), seed=seeds())
def test_conv_added_to_itself_and_a_conv_with_another_user(pair, dtype, seed):
    """``c + c`` is one conv with 2W; a conv also read elsewhere stays for that reader (still exact)."""
    a, b_spec = pair
    bld = GraphBuilder()
    x = bld.input("x", a.input_shape(), dtype)
    ya, yb = add_conv(bld, x, a, dtype, seed), add_conv(bld, x, b_spec, dtype, seed + 1)
    graph = bld.build(bld.add(ya, ya), bld.sub(ya, yb))
    fused, report = run_rules(graph, "branch_sum")
    pays = operator.le(*merge_weights(graph.nodes[:2], "sub"))
    assert fired(report, "branch_sum") == 1 + pays
    assert fused.op_counts() == ({"conv2d": 2} if pays else {"conv2d": 3, "sub": 1})
    assert_graphs_equal(graph, fused, random_input(a.input_shape(), dtype, seed), dtype)


@given(g=grid(), dtype=float_dtypes(), case=st.sampled_from(["windows_differ", "other_input", "conv_and_input"]), seed=seeds(), data=st.data())
def test_not_fired_without_two_equal_window_convs_of_one_input(g, dtype, case, seed, data):
    c, size, out, s = g
    a = data.draw(conv_specs_onto(size, out, s, in_channels=c, out_channels=c))
    bld = GraphBuilder()
    x = bld.input("x", a.input_shape(), dtype)
    z = bld.input("z", a.input_shape(), dtype)
    ya = add_conv(bld, x, a, dtype, seed)
    if case == "conv_and_input":
        other = bld.input("y", a.output_shape(), dtype)
    else:
        b_spec = data.draw(conv_specs_onto(size, out, s, in_channels=c, out_channels=c))
        if case == "windows_differ":
            from hypothesis import assume

            assume(window_of(b_spec) != window_of(a))
        other = add_conv(bld, x if case == "windows_differ" else z, b_spec, dtype, seed + 1)
    graph = bld.build(bld.add(ya, other))
    fused, report = run_rules(graph, "branch_sum")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    if case == "windows_differ":  # two branches of one value that did not sum: reported
        assert reasons(report, "add")[0].startswith("no rule applies")
    else:  # an add of two different values is not a branch join: nothing to report
        assert reasons(report, "add") == []


def window_of(spec):
    return (spec.kernel, spec.dilation, spec.stride, spec.padding[0], spec.padding[2])


@given(dtype=float_dtypes(), c=st.integers(1, 8), kw=st.integers(1, 3), seed=seeds(), op=st.sampled_from(["add", "sub"]))
def test_refused_when_the_add_broadcasts(dtype, c, kw, seed, op):
    """Equal windows, different bottom padding: a 1-row output broadcast over a 3-row one.

    ``conv_b`` computes one row that the add repeats; a merged conv would
    instead slide ``W_b`` over every row.  (A bug: the rule used to fire here.)
    """
    gen = torch.Generator().manual_seed(seed)
    w_tall, w_flat = (torch.randn(c, c, 3, kw, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    for tall_first in (True, False):
        bld = GraphBuilder()
        x = bld.input("x", (1, c, 3, 4), dtype)
        tall = bld.conv2d(x, weight=w_tall, padding=(0, 2, 0, kw - 1), source="tall")  # 3 x 4 output
        flat = bld.conv2d(x, weight=w_flat, padding=(0, 0, 0, kw - 1), source="flat")  # 1 x 4 output
        operands = (tall, flat) if tall_first else (flat, tall)
        graph = bld.build(bld.node(op, *operands, source="sum"))
        assert graph.outputs[0].shape == (1, c, 3, 4)
        for rules in (("branch_sum",), ()):
            fused, report = run_rules(graph, *rules)
            assert fired(report, "branch_sum") == 0
            assert len(reasons(report, op)) == 1 and "pad the input's end differently" in reasons(report, op)[0]
            assert_graphs_equal(graph, fused, random_input((1, c, 3, 4), dtype, seed), dtype)


@given(pair=equal_window_pair(other_ends=True), dtype=float_dtypes(), op=st.sampled_from(["add", "sub"]), seed=seeds())
def test_refused_for_other_end_padding_whatever_the_examples_shapes(pair, dtype, op, seed):
    """Equal windows, equal output shapes at the example, different trailing padding: at a stride above 1 the
    outputs have other sizes at some other input size, where the add broadcasts one of them (or fails)."""
    a, b_spec = pair
    bld = GraphBuilder()
    x = bld.input("x", a.input_shape(), dtype)
    ya, yb = add_conv(bld, x, a, dtype, seed), add_conv(bld, x, b_spec, dtype, seed + 1)
    assert ya.shape == yb.shape
    graph = bld.build(bld.node(op, ya, yb, source="block"))
    fused, report = run_rules(graph, "branch_sum")
    assert fired(report, "branch_sum") == 0 and fused.op_counts() == graph.op_counts()
    assert "pad the input's end differently" in reasons(report, op)[0]


@given(dtype=float_dtypes(), c=st.integers(1, 4), half=st.tuples(st.integers(1, 3), st.integers(1, 3)), seed=seeds(),
       op=st.sampled_from(["add", "sub"]))
def test_refused_when_the_outputs_agree_at_the_examples_size_only(dtype, c, half, seed, op):
    """A 1x1 stride-2 shortcut (grown to 2x2 by kernel_pad: one row and column of end padding) beside a 2x2
    stride-2 patch conv: equal windows, outputs of one size at even input sizes only.  At an odd size where
    one output is one column wide, the model's add broadcasts it, and a merged conv would compute something else;
    at the example the shapes agree, so the end padding decides."""
    gen = torch.Generator().manual_seed(seed)
    w_short, w_patch = (torch.randn(c, c, 2, 2, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    w_short[:, :, 1:, :] = 0
    w_short[:, :, :, 1:] = 0
    size = (2 * half[0], 2 * half[1])
    bld = GraphBuilder()
    x = bld.input("x", (1, c, *size), dtype)
    short = bld.conv2d(x, weight=w_short, stride=(2, 2), padding=(0, 1, 0, 1), source="short")
    patch = bld.conv2d(x, weight=w_patch, stride=(2, 2), source="patch")
    assert short.shape == patch.shape
    graph = bld.build(bld.node(op, short, patch, source="sum"))
    fused, report = run_rules(graph, "branch_sum")
    assert fired(report, "branch_sum") == 0 and fused.op_counts() == graph.op_counts()
    assert "pad the input's end differently" in reasons(report, op)[0]


@given(dtype=float_dtypes(), n=st.integers(1, 3), cin=st.integers(1, 8), cout=st.integers(1, 8),
       join=st.sampled_from(["add", "sub"]), bias=st.sampled_from(["both", "a", "b", "none"]), seed=seeds())
def test_two_linears_of_one_input_sum_into_one(dtype, n, cin, cout, join, bias, seed):
    """RepViT's distillation head: ``(head(x) + head_dist(x)) / 2``."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    b = GraphBuilder()
    x = b.input("x", (n, cin), dtype)
    la = b.linear(x, weight=r(cout, cin), bias=r(cout) if bias in ("both", "a") else None, source="head")
    lb = b.linear(x, weight=r(cout, cin), bias=r(cout) if bias in ("both", "b") else None, source="head_dist")
    graph = b.build(b.node(join, la, lb, source=""))
    fused, report = run_rules(graph, "branch_sum")
    assert report.rule_counts() == {"branch_sum": 1} and fused.op_counts() == {"linear": 1}
    assert ("bias" in only(fused, "linear").params) == (bias != "none")
    assert_graphs_equal(graph, fused, random_input((n, cin), dtype, seed + 1), dtype)
