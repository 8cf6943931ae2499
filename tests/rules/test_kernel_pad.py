"""kernel_pad: summed convs of one input, stride and tap lattice are padded to the union window.

    conv(x; W, padding p) = conv(x; pad(W, a, b, c, e), padding p + d * (a, b, c, e))

Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

from hypothesis import assume, given
from hypothesis import strategies as st
from rulecheck import fired, merges_if_it_pays, reasons, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.match import window
from repalgebra.testing import ConvSpec, add_conv, assert_graphs_equal, conv_specs_onto, float_dtypes, random_input, seeds


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
    # Each lies on the first one's lattice; a first one with one tap on an axis takes any step there, so the others
    # must also agree with each other (a 1x2 of dilation 1 and one of dilation 2 beside a 1x1 do not).
    assume(all(len({sp.dilation[a] for sp in specs if sp.kernel[a] > 1}) <= 1 for a in (0, 1)))
    # and their first taps lie a multiple of that dilation apart (a 1x1 padded by one beside a 1x3 of dilation 2
    # padded by none is on the 1x1's lattice, but not on the 1x3's; Hypothesis found it in CI)
    for a in (0, 1):
        step = next((sp.dilation[a] for sp in specs if sp.kernel[a] > 1), 1)
        assume(all((sp.padding[2 * a] - specs[0].padding[2 * a]) % step == 0 for sp in specs))
    shape = (data.draw(st.integers(1, 3)), c, *size)
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    graph = b.build(join_of(b, join, [add_conv(b, x, sp, dtype, seed + k, f"b{k}") for k, sp in enumerate(specs)]))

    xt = random_input(shape, dtype, seed)
    fused, report = run_rules(graph, "kernel_pad", "branch_sum", "concat_merge")
    assert_graphs_equal(graph, fused, xt, dtype)
    if not merges_if_it_pays(graph, fused, report, join):
        return  # the union kernel would cost more than the convs: left as they are, with that reason

    fused, report = run_rules(graph, "kernel_pad")
    assert report.rule_counts() == {"kernel_pad": 1}
    assert fused.op_counts() == graph.op_counts()
    convs = [nd for nd in fused.nodes if nd.op == "conv2d"]
    assert len({window(cv) for cv in convs}) == 1  # one window now
    assert_graphs_equal(graph, fused, xt, dtype)


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


@given(groups=st.sampled_from([1, 2, 4]), dtype=float_dtypes(), seed=seeds())
def test_a_concat_in_a_sum_merges_only_where_the_sum_absorbs_its_dense_kernel(groups, dtype, seed):
    """``cat(conv1x1(x), conv3x3(x)) + main3x3(x)``, 8 channels, every conv with ``groups``.  A concat's one conv
    is dense (its channels interleave the groups), and so is the sum's.  Dense convs: the main 3x3 (576
    multiply-adds a pixel) absorbs the concat, and all is one conv.  Grouped: the sum's one dense 3x3 (576) costs
    more than the three convs (448 with 2 groups, 224 with 4), so the concat's halves stay as they are."""
    shape = (1, 8, 5, 5)
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    conv = lambda cout, k, s: add_conv(b, x, ConvSpec(8, cout, groups, (k, k), padding=(k // 2,) * 4, bias=True, height=5, width=5), dtype, s)  # noqa: E731
    cat = b.concat(conv(4, 1, seed), conv(4, 3, seed + 1), axis=1, source="block.cat")
    graph = b.build(b.add(cat, conv(8, 3, seed + 2), source="block"))
    fused, report = run_rules(graph, "kernel_pad", "branch_sum", "concat_merge")
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed), dtype)
    if groups == 1:
        assert fused.op_counts() == {"conv2d": 1}, report
        return
    assert fired(report, "kernel_pad") == 0 and fused.op_counts() == graph.op_counts(), report
    assert any(f"more than the 2 convs together ({(4 + 36) * 8 // groups})" in r for r in reasons(report, "concat")), report


@given(long=st.sampled_from([11, 13, 15]), small=st.sampled_from([1, 3, 5]), depthwise=st.booleans(), outer_first=st.booleans(),
       outer=st.sampled_from(["add", "sub"]), dtype=float_dtypes(), seed=seeds())
def test_a_small_kernel_beside_two_that_do_not_merge_joins_one_of_them(long, small, depthwise, outer_first, outer, dtype, seed):
    """SLaK's decomposed kernel, ``(L x 5 + 5 x L) + small``: the L x 5 and 5 x L would merge into one L x L (dearer
    from L = 11 on: L^2 > 10 L taps),
    but the small kernel fits in either at no cost: the sum is regrouped and it joins one, 3 convs become 2 (or 1
    where the whole sum's L x L is no dearer than the three).  Only a sum of a sum is regrouped."""
    c, size = 4, 2 * long
    shape = (2, c, size, size)
    groups = c if depthwise else 1
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    conv = lambda kh, kw, s: add_conv(b, x, ConvSpec(c, c, groups, (kh, kw), padding=(kh // 2, kh // 2, kw // 2, kw // 2), height=size, width=size), dtype, s)  # noqa: E731
    pair = b.add(conv(long, 5, seed), conv(5, long, seed + 1), source="lk")
    s = conv(small, small, seed + 2)
    graph = b.build(b.node(outer, *((s, pair) if outer_first else (pair, s)), source="lk"))
    fused, report = run_rules(graph, "kernel_pad", "branch_sum")
    if long * long <= 10 * long + small * small:  # the whole sum's one L x L is no dearer than the three: one conv
        assert fused.op_counts() == {"conv2d": 1}, report
    elif outer == "sub":  # ``(a + b) - c`` is not regrouped (only sums of sums are)
        assert fired(report, "kernel_pad") == 0 and fused.op_counts() == graph.op_counts(), report
    else:
        assert fused.op_counts() == {"conv2d": 2, "add": 1}, report
        assert any("more than the 2 convs together" in r for r in reasons(report, "add")), report
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed + 3), dtype)
