"""dilation_to_dense: summed convs whose taps are not on one lattice get dense (undilated) kernels.

    conv(x; W, dilation d) = conv(x; D_d(W), dilation 1),  D_d(W) spreads the taps d apart with zeros

Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

from hypothesis import given
from hypothesis import strategies as st
from rulecheck import SUM_RULES, reasons, run_rules
from test_kernel_pad import grid, join_of

from repalgebra.builder import GraphBuilder
from repalgebra.testing import add_conv, assert_graphs_equal, conv_specs, conv_specs_onto, float_dtypes, random_input, seeds


@given(g=grid(), dtype=float_dtypes(), join=st.sampled_from(["add", "sub", "concat"]), seed=seeds(), data=st.data())
def test_densifies_convs_off_one_lattice(g, dtype, join, seed, data):
    c, size, out, s = g
    cout = lambda: data.draw(st.integers(1, 16)) if join == "concat" else c  # noqa: E731
    a = data.draw(conv_specs_onto(size, out, s, in_channels=c, out_channels=cout(), groups=1 if join == "concat" else None))
    bb = data.draw(conv_specs_onto(size, out, s, in_channels=c, out_channels=cout(), groups=1 if join == "concat" else None, lattice_of=a, on_lattice=False))
    shape = (data.draw(st.integers(1, 3)), c, *size)
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    graph = b.build(join_of(b, join, [add_conv(b, x, a, dtype, seed, "a"), add_conv(b, x, bb, dtype, seed + 1, "b")]))

    fused, report = run_rules(graph, "dilation_to_dense")
    assert report.rule_counts() == {"dilation_to_dense": 1}
    assert fused.op_counts() == graph.op_counts()
    convs = {nd.source: nd for nd in fused.nodes if nd.op == "conv2d"}
    for sp, name in ((a, "a"), (bb, "b")):
        conv = convs[name]
        assert conv.attrs["dilation"] == (1, 1)
        assert conv.params["weight"].shape[2:] == sp.extent  # (k - 1) * d + 1 per axis
        assert conv.attrs["padding"] == sp.padding and conv.attrs["stride"] == sp.stride
    xt = random_input(shape, dtype, seed)
    assert_graphs_equal(graph, fused, xt, dtype)

    fused, _ = run_rules(graph, *SUM_RULES)
    assert fused.op_counts() == {"conv2d": 1}
    assert_graphs_equal(graph, fused, xt, dtype)


@given(spec=conv_specs(), dtype=float_dtypes(), seed=seeds(), case=st.sampled_from(["alone", "beside_identity"]))
def test_a_lone_dilated_conv_stays_dilated(spec, dtype, seed, case):
    """Alone (or beside a non-conv) a dilated conv is cheaper than its dense form."""
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(), dtype)
    y = add_conv(b, x, spec, dtype, seed)
    if case == "beside_identity":
        z = b.input("z", spec.output_shape(), dtype)
        y = b.add(y, z)
    graph = b.build(y)
    fused, report = run_rules(graph, "dilation_to_dense")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert reasons(report, "add") == []  # conv(x) + z is no sum of branches of one value


@given(g=grid(), dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_not_fired_on_one_lattice(g, dtype, seed, data):
    c, size, out, s = g
    a = data.draw(conv_specs_onto(size, out, s, in_channels=c, out_channels=c))
    bb = data.draw(conv_specs_onto(size, out, s, in_channels=c, out_channels=c, lattice_of=a))
    b = GraphBuilder()
    x = b.input("x", (1, c, *size), dtype)
    graph = b.build(b.add(add_conv(b, x, a, dtype, seed), add_conv(b, x, bb, dtype, seed + 1)))
    fused, report = run_rules(graph, "dilation_to_dense")
    assert report.fired == []
