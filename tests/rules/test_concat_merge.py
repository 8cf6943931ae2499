"""concat_merge: convs of one input with one window, concatenated on channels, are one conv.

    cat(conv(x; W_1, b_1), ..., conv(x; W_n, b_n)) = conv(x; cat(W_1..W_n), cat(b_1..b_n))

Refused when a kernel is grouped: written densely the merged kernel would be
larger than the grouped ones.  Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

from dataclasses import replace

from hypothesis import assume, given
from hypothesis import strategies as st
from rulecheck import fired, only, refusal_reason, run_rules
from test_kernel_pad import grid

from repalgebra.builder import GraphBuilder
from repalgebra.testing import add_conv, assert_graphs_equal, conv_specs_onto, float_dtypes, random_input, seeds


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def same_window_convs(draw, grouped=False):
    """2-3 conv specs reading one input with one window; out channels and bias drawn per conv.

    With ``grouped``, at least one of them (not necessarily the first) has groups > 1.
    """
    c, size, out, s = draw(grid())
    if grouped:
        assume(c > 1)
    first = draw(conv_specs_onto(size, out, s, in_channels=c, out_channels=draw(st.integers(1, 16)), groups=1))
    specs = [first]
    for k in range(draw(st.integers(1, 2))):
        if grouped and k == 0:
            g = draw(st.sampled_from([d for d in range(2, c + 1) if c % d == 0]))
            cout = g * draw(st.integers(1, 16 // g))
        else:
            cout = draw(st.integers(1, 16))
            g = draw(st.sampled_from([d for d in range(1, c + 1) if c % d == 0 and cout % d == 0])) if grouped else 1
        specs.append(replace(first, out_channels=cout, groups=g, bias=draw(st.booleans())))
    return draw(st.permutations(specs)) if grouped else specs


def build(specs, dtype, seed, axis=1, batch=1):
    b = GraphBuilder()
    x = b.input("x", specs[0].input_shape(batch), dtype)
    ys = [add_conv(b, x, sp, dtype, seed + k, f"blk.b{k}") for k, sp in enumerate(specs)]
    return b.build(b.concat(*ys, axis=axis, source="blk"))


@given(specs=same_window_convs(), dtype=float_dtypes(), batch=st.integers(1, 3), seed=seeds())
def test_merges_dense_convs(specs, dtype, batch, seed):
    graph = build(specs, dtype, seed, batch=batch)
    fused, report = run_rules(graph, "concat_merge")
    assert report.rule_counts() == {"concat_merge": 1}
    conv = only(fused, "conv2d")
    assert fused.op_counts() == {"conv2d": 1}
    assert conv.attrs["groups"] == 1 and conv.out.shape[1] == sum(sp.out_channels for sp in specs)
    assert ("bias" in conv.params) == any(sp.bias for sp in specs)
    assert conv.source == "blk"
    assert_graphs_equal(graph, fused, random_input(specs[0].input_shape(batch), dtype, seed), dtype)


@given(specs=same_window_convs(grouped=True), dtype=float_dtypes(), seed=seeds())
def test_refused_for_grouped_convs(specs, dtype, seed):
    graph = build(specs, dtype, seed)
    fused, report = run_rules(graph, "concat_merge")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    taps = specs[0].kernel[0] * specs[0].kernel[1]
    c = specs[0].in_channels
    dense = sum(sp.out_channels * c * taps for sp in specs)
    grouped = sum(sp.out_channels * (c // sp.groups) * taps for sp in specs)
    assert refusal_reason(graph, "concat_merge", graph.nodes[-1]) == (
        f"the merged dense kernel would have {dense} weights, more than the {grouped} of the grouped convs"
    )


@given(specs=same_window_convs(), dtype=float_dtypes(), case=st.sampled_from(["window", "input", "identity", "axis"]), seed=seeds(), data=st.data())
def test_not_fired(specs, dtype, case, seed, data):
    a = specs[0]
    if case == "identity":  # the skip x beside a conv keeping the grid (identity_to_conv's job, not this rule's)
        a = data.draw(conv_specs_onto((a.height, a.width), (a.height, a.width), 1, in_channels=a.in_channels, out_channels=3))
    b = GraphBuilder()
    x = b.input("x", a.input_shape(), dtype)
    z = b.input("z", a.input_shape(), dtype)
    ya = add_conv(b, x, a, dtype, seed)
    axis = 1
    if case == "window":
        other = data.draw(conv_specs_onto((a.height, a.width), a.out_size, a.stride, in_channels=a.in_channels, out_channels=3))
        assume((other.kernel, other.dilation, other.padding[0], other.padding[2]) != (a.kernel, a.dilation, a.padding[0], a.padding[2]))
        yb = add_conv(b, x, other, dtype, seed + 1)
    elif case == "input":
        yb = add_conv(b, z, a, dtype, seed + 1)
    elif case == "identity":
        yb = x
    else:  # spatial concat of two convs of one input with one window
        yb, axis = add_conv(b, x, a, dtype, seed + 1), 2
    graph = b.build(b.concat(ya, yb, axis=axis))
    fused, report = run_rules(graph, "concat_merge")
    assert fired(report, "concat_merge") == 0 and fused.op_counts() == graph.op_counts()


@given(specs=same_window_convs(), dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_not_fired_for_equal_kernel_sizes_with_other_windows(specs, dtype, seed, data):
    """Same kernel size and output grid, another padding or dilation: the taps read other pixels, no merge."""
    a = specs[0]
    other = data.draw(conv_specs_onto((a.height, a.width), a.out_size, a.stride, in_channels=a.in_channels, out_channels=3, kernel=a.kernel, groups=1))
    assume((other.dilation, other.padding[0], other.padding[2]) != (a.dilation, a.padding[0], a.padding[2]))
    b = GraphBuilder()
    x = b.input("x", a.input_shape(), dtype)
    graph = b.build(b.concat(add_conv(b, x, a, dtype, seed), add_conv(b, x, other, dtype, seed + 1), axis=1))
    fused, report = run_rules(graph, "concat_merge")
    assert fired(report, "concat_merge") == 0 and fused.op_counts() == graph.op_counts()
    assert_graphs_equal(graph, fused, random_input(a.input_shape(), dtype, seed), dtype)


@given(dtype=float_dtypes(), c=st.integers(1, 4), half=st.tuples(st.integers(1, 3), st.integers(1, 3)), seed=seeds())
def test_refused_for_other_end_padding(dtype, c, half, seed):
    """A 1x1 stride-2 conv grown to 2x2 (one row and column of end padding) beside a 2x2 stride-2 conv: one
    window, outputs of one size at even input sizes only.  At an odd size the model's concat fails; one merged
    conv would return a result."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    w_short, w_patch = (torch.randn(c, c, 2, 2, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    b = GraphBuilder()
    x = b.input("x", (1, c, 2 * half[0], 2 * half[1]), dtype)
    short = b.conv2d(x, weight=w_short, stride=(2, 2), padding=(0, 1, 0, 1), source="blk.short")
    patch = b.conv2d(x, weight=w_patch, stride=(2, 2), source="blk.patch")
    graph = b.build(b.concat(short, patch, axis=1, source="blk"))
    fused, report = run_rules(graph, "concat_merge")
    assert fired(report, "concat_merge") == 0 and fused.op_counts() == graph.op_counts()
    assert "pad the input's end differently" in refusal_reason(graph, "concat_merge", graph.nodes[-1])


@given(dtype=float_dtypes(), c=st.integers(1, 4), seed=seeds())
def test_not_merged_for_equal_kernels_shifted(dtype, c, seed):
    """Two 3x3 convs, one padded (1, 1, 1, 1) and one (0, 2, 0, 2): one output size at every input size, equal
    kernel sizes, but the second's window starts a row and a column later."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    w1, w2 = (torch.randn(c, c, 3, 3, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    b = GraphBuilder()
    x = b.input("x", (1, c, 5, 4), dtype)
    graph = b.build(b.concat(b.conv2d(x, weight=w1, padding=(1, 1, 1, 1)), b.conv2d(x, weight=w2, padding=(0, 2, 0, 2)), axis=1))
    fused, report = run_rules(graph, "concat_merge")
    assert fired(report, "concat_merge") == 0 and fused.op_counts() == graph.op_counts()
    assert_graphs_equal(graph, fused, random_input((1, c, 5, 4), dtype, seed), dtype)
