"""kernel_pad: summed convs of one input, stride and tap lattice are padded to the union window.

    conv(x; W, padding p) = conv(x; pad(W, a, b, c, e), padding p + d * (a, b, c, e))

Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

from hypothesis import assume, given
from hypothesis import strategies as st
from rulecheck import fired, reasons, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.match import window
from repalgebra.testing import add_conv, assert_graphs_equal, conv_specs_onto, float_dtypes, random_input, seeds


@st.composite
def grid(draw, strides=(1, 2)):
    """(channels, input (H, W), output (Ho, Wo), stride) with the output reachable by a conv."""
    c = draw(st.integers(1, 16))
    h, w = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    s = draw(st.sampled_from(strides))
    out = (draw(st.integers(1, (h - 1) // s + 1)), draw(st.integers(1, (w - 1) // s + 1)))
    return c, (h, w), out, s


def join_of(b, join, values):
    if join == "concat":
        return b.concat(*values, axis=1, source="block")
    y = values[0]
    for v in values[1:]:
        y = b.node(join, y, v, source="block")
    return y


@given(g=grid(), dtype=float_dtypes(), join=st.sampled_from(["add", "sub", "concat"]), seed=seeds(), data=st.data())
def test_pads_windows_on_one_lattice_to_their_union(g, dtype, join, seed, data):
    c, size, out, s = g
    n = 2 if join != "concat" else data.draw(st.integers(2, 3))
    cout = lambda: data.draw(st.integers(1, 16)) if join == "concat" else c  # noqa: E731
    first = data.draw(conv_specs_onto(size, out, s, in_channels=c, out_channels=cout(), groups=1 if join == "concat" else None))
    specs = [first] + [
        data.draw(conv_specs_onto(size, out, s, in_channels=c, out_channels=cout(), groups=1 if join == "concat" else None, lattice_of=first)) for _ in range(n - 1)
    ]
    assume(len({(sp.kernel, sp.padding[0], sp.padding[2]) for sp in specs}) > 1)  # windows differ
    shape = (data.draw(st.integers(1, 3)), c, *size)
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    graph = b.build(join_of(b, join, [add_conv(b, x, sp, dtype, seed + k, f"b{k}") for k, sp in enumerate(specs)]))

    if join == "concat" or n == 2:
        fused, report = run_rules(graph, "kernel_pad")
        assert report.rule_counts() == {"kernel_pad": 1}
        assert fused.op_counts() == graph.op_counts()
        convs = [nd for nd in fused.nodes if nd.op == "conv2d"]
        assert len({window(cv) for cv in convs}) == 1  # one window now
        xt = random_input(shape, dtype, seed)
        assert_graphs_equal(graph, fused, xt, dtype)

    fused, report = run_rules(graph, "kernel_pad", "branch_sum", "concat_merge")
    assert fused.op_counts() == {"conv2d": 1}
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed), dtype)


@given(g=grid(strides=(1,)), dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_not_fired_when_strides_differ(g, dtype, seed, data):
    """A stride-1 and a stride-2 conv can land on the same output grid; their taps do not line up."""
    c, size, _, _ = g
    out = (data.draw(st.integers(1, (size[0] - 1) // 2 + 1)), data.draw(st.integers(1, (size[1] - 1) // 2 + 1)))
    s1 = data.draw(conv_specs_onto(size, out, 1, in_channels=c, out_channels=c))
    s2 = data.draw(conv_specs_onto(size, out, 2, in_channels=c, out_channels=c))
    shape = (1, c, *size)
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    graph = b.build(b.add(add_conv(b, x, s1, dtype, seed), add_conv(b, x, s2, dtype, seed + 1), source="sum"))
    for rules in (("kernel_pad",), ()):
        fused, report = run_rules(graph, *rules)
        assert report.fired == [] and fused.op_counts() == graph.op_counts()
        assert reasons(report, "add") == ["no rule applies (input from conv2d, used by graph output)"]
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed), dtype)


@given(g=grid(), dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_not_fired_off_lattice_or_on_different_inputs(g, dtype, seed, data):
    c, size, out, s = g
    a = data.draw(conv_specs_onto(size, out, s, in_channels=c, out_channels=c))
    case = data.draw(st.sampled_from(["off_lattice", "other_input"]))
    bb = data.draw(conv_specs_onto(size, out, s, in_channels=c, out_channels=c, lattice_of=a, on_lattice=case != "off_lattice"))
    shape = (1, c, *size)
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    z = b.input("z", shape, dtype)
    graph = b.build(b.add(add_conv(b, x, a, dtype, seed), add_conv(b, x if case == "off_lattice" else z, bb, dtype, seed + 1)))
    fused, report = run_rules(graph, "kernel_pad")
    assert fired(report, "kernel_pad") == 0 and fused.op_counts() == graph.op_counts()
