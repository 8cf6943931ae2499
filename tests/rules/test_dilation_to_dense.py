"""dilation_to_dense: summed convs whose taps are not on one lattice get dense (undilated) kernels.

    conv(x; W, dilation d) = conv(x; D_d(W), dilation 1),  D_d(W) spreads the taps d apart with zeros

Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import repalgebra
from rulecheck import SUM_RULES, merges_if_it_pays, reasons, run_rules
from test_kernel_pad import grid, join_of

from repalgebra.builder import GraphBuilder
from repalgebra.testing import ConvSpec, add_conv, assert_graphs_equal, conv_specs, conv_specs_onto, float_dtypes, random_input, seeds


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

    xt = random_input(shape, dtype, seed)
    fused, report = run_rules(graph, *SUM_RULES)
    assert_graphs_equal(graph, fused, xt, dtype)
    if not merges_if_it_pays(graph, fused, report, join):
        return  # the dense kernel would cost more than the branches: left as they are, with that reason

    fused, report = run_rules(graph, "dilation_to_dense")
    assert report.rule_counts() == {"dilation_to_dense": 1}
    assert fused.op_counts() == graph.op_counts()
    convs = {nd.source: nd for nd in fused.nodes if nd.op == "conv2d"}
    for sp, name in ((a, "a"), (bb, "b")):
        conv = convs[name]
        assert conv.attrs["dilation"] == (1, 1)
        assert conv.params["weight"].shape[2:] == sp.extent  # (k - 1) * d + 1 per axis
        assert conv.attrs["padding"] == sp.padding and conv.attrs["stride"] == sp.stride
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


class DilatedSum(nn.Module):
    """Parallel convs of one input, summed: ``(kernel, dilation)`` each, padded to keep the size, depthwise or not."""

    def __init__(self, c: int, branches: list[tuple[int, int]], depthwise: bool) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, k, padding=d * (k - 1) // 2, dilation=d, groups=c if depthwise else 1)
                                   for k, d in branches)

    def forward(self, x):
        return sum(conv(x) for conv in self.convs)


def test_wide_dilations_stay_apart_and_a_large_kernel_absorbs_dilated_ones():
    """DeepLabV2's ASPP sums 3 x 3 convs of rates 6, 12, 18 and 24 (``sum()``: the first add sums rates 6 and 12):
    as one dense kernel the first two alone are 25 x 25, 35 times their weights, so all four stay apart and the
    report says why.  UniRepLKNet's dilated reparam block sums a
    13 x 13 depthwise kernel with 5 x 5 of rate 2, 3 x 3 of rate 3 and 3 x 3 of rate 4, all inside its window: one
    13 x 13 kernel, fewer weights than the four."""
    x = torch.randn(1, 4, 30, 30, dtype=torch.float64)
    aspp = DilatedSum(4, [(3, 6), (3, 12), (3, 18), (3, 24)], depthwise=False).double().eval()
    fused = repalgebra.fuse(aspp, x)
    assert fused.fuse_report.ops_after.get("conv2d") == 4
    assert "the one conv they would become has 10000 multiply-adds per output pixel, more than the 2 convs together (288)" in str(fused.fuse_report)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in aspp.parameters())

    # Written with the large kernel first or last, one conv: sum_regroup adds the dilated ones after it (the
    # sum rules alone, in the model's order, absorb them into it: the next test).
    for order in ([(13, 1), (5, 2), (3, 3), (3, 4)], [(5, 2), (3, 3), (3, 4), (13, 1)]):
        lk = DilatedSum(4, order, depthwise=True).double().eval()
        fused = repalgebra.fuse(lk, x)
        assert fused.fuse_report.ops_after == {"conv2d": 1}, str(fused.fuse_report)
        assert next(m for m in fused.modules() if isinstance(m, nn.Conv2d)).weight.shape == (4, 1, 13, 13)
        with torch.no_grad():
            assert float((fused(x) - lk(x)).abs().max()) <= 1e-12 * float(lk(x).abs().max())


@given(dtype=float_dtypes(), seed=seeds())
def test_a_large_kernel_read_elsewhere_absorbs_nothing(dtype, seed):
    """``(a3x3(x) + b3x3_rate2(x)) + main5x5(x)``, with ``main`` also a graph output.  Merged, a and b are a dense
    5x5 (25 weights a channel pair for 18); the 5x5 main would absorb that, but it stays for its other reader, so
    the merge would add a second 5x5 conv: nothing merges, and the convs keep their 43 weights a channel pair."""
    shape = (1, 3, 6, 6)
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    conv = lambda k, d, s: add_conv(b, x, ConvSpec(3, 3, 1, (k, k), dilation=(d, d), padding=(d * (k // 2),) * 4, height=6, width=6), dtype, s)  # noqa: E731
    main = conv(5, 1, seed + 2)
    graph = b.build(b.add(b.add(conv(3, 1, seed), conv(3, 2, seed + 1), source="sum"), main, source="block"), main)
    fused, report = run_rules(graph, *SUM_RULES)
    assert fused.op_counts() == graph.op_counts(), report
    assert any("the one conv they would become has 225 multiply-adds" in r for r in reasons(report, "add")), report
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed), dtype)


@given(dtype=float_dtypes(), seed=seeds())
def test_small_dilated_kernels_met_first_merge_where_a_large_kernel_of_the_sum_absorbs_them(dtype, seed):
    """UniRepLKNet's block written with its small dilated kernels first, as the sum rules see it (``sum_regroup`` would
    put the dilated ones last): ``5x5 rate 2 + 3x3 rate 3`` alone would be a dense 9x9, 81 weights a channel for
    their 34, but the 13x13 of the same sum absorbs it, so the merge is made and the sum becomes one 13x13 conv."""
    c, shape = 2, (1, 2, 16, 16)
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    conv = lambda k, d, s: add_conv(b, x, ConvSpec(c, c, c, (k, k), dilation=(d, d), padding=(d * (k // 2),) * 4, height=16, width=16), dtype, s)  # noqa: E731
    total = conv(5, 2, seed)
    for k, d, s in ((3, 3, seed + 1), (3, 4, seed + 2), (13, 1, seed + 3)):
        total = b.add(total, conv(k, d, s), source="block")
    graph = b.build(total)
    fused, report = run_rules(graph, *SUM_RULES)
    assert fused.op_counts() == {"conv2d": 1}, report
    assert next(n for n in fused.nodes if n.op == "conv2d").params["weight"].shape == (c, 1, 13, 13)
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed), dtype)
