"""The rewrite engine: fixpoint, dead nodes, the report, float64 folding, and whole blocks folding to one conv.

Equality uses :func:`repalgebra.testing.assert_graphs_equal`: elementwise
``|fused - reference| <= tol * magnitude`` with tol = eps(parameter dtype) +
1e-12 in a float64 run (the one rounding of each fused parameter) and 1e-5
(float32) / 1e-12 (float64) in a run in the graph's dtype.
"""

from __future__ import annotations

import importlib
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from repalgebra import RULES, rewrite
from repalgebra.builder import GraphBuilder
from repalgebra.examples import repmixer_graph
from repalgebra.interpret import run_graph
from repalgebra.ir import Node
from repalgebra.rewrite import Refusal, Rewrite, Rule, rule
from repalgebra.testing import (ConvSpec, add_bn, add_conv, assert_graphs_equal, assert_params_unchanged, bn_stats,
                                float_dtypes, random_input, seeds, snapshot_params)


# ``import repalgebra.rewrite`` would give the function (the package re-exports it under that name).
engine = importlib.import_module("repalgebra.rewrite")


def fold(graph):
    """Rewrite with every rule, checking the input graph is untouched."""
    snap = snapshot_params(graph)
    fused, report = rewrite(graph)
    assert_params_unchanged(graph, snap)
    return fused, report


def the_conv(fused):
    assert fused.op_counts() == {"conv2d": 1}, fused
    return fused.nodes[0]


def conv_bn(b, x, spec, dtype, seed, data, source):
    y = add_conv(b, x, spec, dtype, seed, source + ".conv")
    return add_bn(b, y, data.draw(bn_stats(spec.out_channels)), dtype, source + ".bn")


def sum_all(b, values, source="block"):
    y = values[0]
    for v in values[1:]:
        y = b.add(y, v, source=source)
    return y


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


# --------------------------------------------------------------------------- engine behaviour


def test_fixpoint_a_second_rewrite_changes_nothing():
    graph = repmixer_graph()
    fused, report = fold(graph)
    again, report2 = rewrite(fused)
    assert report.fired and report2.fired == []
    assert str(again) == str(fused)


def test_max_rewrites_guards_against_non_termination():
    with pytest.raises(RuntimeError, match="did not reach a fixpoint after 2 rewrites"):
        rewrite(repmixer_graph(), max_rewrites=2)


def test_dead_nodes_are_removed():
    b = GraphBuilder()
    x = b.input("x", (1, 4, 6, 6))
    b.sigmoid(b.relu(x), source="dead")  # never read
    y = b.batch_norm(b.conv2d(x, weight=torch.randn(4, 4, 3, 3), padding=(1, 1, 1, 1)), mean=torch.zeros(4),
                     var=torch.ones(4), weight=torch.ones(4), bias=torch.ones(4))
    graph = b.build(y)
    fused, report = fold(graph)
    assert fused.op_counts() == {"conv2d": 1}  # the dead relu/sigmoid went with the first rewrite
    assert report.before == {"batch_norm": 1, "conv2d": 1, "relu": 1, "sigmoid": 1}


def test_nodes_made_dead_by_rewrites_are_removed():
    """Every node of the result is read (dead-node removal after each rewrite, not only at the end)."""
    graph = repmixer_graph(channels=4, size=6)
    fused, _ = fold(graph)
    copy = fused.map_params(lambda p, n: p)
    assert copy.eliminate_dead() == 0


def test_report_contents_and_text():
    b = GraphBuilder()
    x = b.input("x", (1, 2, 5, 5))
    c = b.conv2d(x, weight=torch.randn(2, 2, 3, 3), padding=(1, 1, 1, 1), source="blk.conv")
    n = b.batch_norm(c, mean=torch.zeros(2), var=torch.ones(2), weight=torch.ones(2), bias=torch.ones(2), source="blk.bn")
    y = b.add(n, b.batch_norm(x, mean=torch.zeros(2), var=torch.ones(2), weight=torch.ones(2), bias=torch.ones(2), source="blk.skip"), source="blk")
    p = b.pad(x, pads=(1, 1, 1, 1), value=1.0, source="odd.pad")
    z = b.conv2d(p, weight=torch.randn(2, 2, 3, 3), source="odd.conv")
    graph = b.build(y, z)
    fused, report = fold(graph)

    assert report.before == {"add": 1, "batch_norm": 2, "conv2d": 2, "pad": 1}
    assert report.after == fused.op_counts() == {"conv2d": 2, "pad": 1}
    counts = report.rule_counts()
    assert counts == {"bn_fold": 1, "bn_to_conv": 1, "kernel_pad": 1, "branch_sum": 1}
    assert list(counts.values()) == sorted(counts.values(), reverse=True)
    assert [f.rule for f in report.fired][0] == "bn_fold" and report.fired[0].source == "blk.bn"
    assert len(report.left_alone) == 1
    la = report.left_alone[0]
    assert (la.op, la.source, la.reason) == ("pad", "odd.pad", "pad_absorb: pads with 1.0, not zero")
    assert report.seconds > 0

    text = str(report)
    lines = text.splitlines()
    assert re.fullmatch(r"rewrite: 4 rewrites in \d+\.\d{3}s", lines[0])
    assert re.fullmatch(r"  op\s+before  after", lines[1])
    table = {ln.split()[0]: (int(ln.split()[1]), int(ln.split()[2])) for ln in lines[2:6]}
    assert table == {"add": (1, 0), "batch_norm": (2, 0), "conv2d": (2, 2), "pad": (1, 1)}
    assert "  rules fired:" in lines
    assert any(re.fullmatch(r"    bn_fold\s+x1", ln) for ln in lines)
    assert lines[-2:] == ["  left alone:", "    pad at odd.pad: pad_absorb: pads with 1.0, not zero"]


def test_report_without_firings_or_leftovers():
    b = GraphBuilder()
    x = b.input("x", (1, 2, 3, 3))
    fused, report = fold(b.build(b.relu(x)))
    assert report.fired == [] and report.left_alone == []
    assert "rules fired" not in str(report) and "left alone" not in str(report)
    assert str(report).startswith("rewrite: 0 rewrites in ")


def test_left_alone_reason_names_the_refusing_rule_or_the_neighbours():
    b = GraphBuilder()
    x = b.input("x", (1, 3, 6, 6))
    bn = b.batch_norm(x, mean=torch.zeros(3), var=torch.ones(3), weight=torch.ones(3), bias=torch.ones(3), source="pre")
    y = b.conv2d(bn, weight=torch.randn(3, 3, 3, 3), padding=(1, 1, 1, 1), source="conv")
    s = b.scale(b.relu(y), scale=torch.ones(3), source="ls")
    fused, report = fold(b.build(s))
    reasons = {la.source: la.reason for la in report.left_alone}
    assert reasons == {
        "pre": "bn_before_conv: the conv after it zero-pads, and BN(0) != 0 at the border",
        "ls": "no rule applies (input from relu, used by graph output)",
    }


def test_left_alone_neighbours_are_named_as_the_model_writes_them():
    """Ops the model's code does not name (``reshape_dyn``, ``scale``) are named by what it wrote: reshape, mul."""
    b = GraphBuilder()
    x = b.input("x", (2, 3, 6, 6))
    bn = b.batch_norm(b.relu(x), mean=torch.zeros(3), var=torch.ones(3), weight=torch.ones(3), bias=torch.ones(3), source="bn")
    y = b.scale(b.reshape_dyn(bn, x, shape=(((0, 0),), 3, 36)), scale=torch.full((3,), 2.0), source="s")
    fused, report = fold(b.build(b.reshape_dyn(b.relu(y), x, shape=(((0, 0),), -1))))
    reasons = {la.source: la.reason for la in report.left_alone}
    assert reasons["bn"] == "no rule applies (input from relu, used by reshape)", reasons


def test_refusal_reasons_are_not_attributed_to_a_later_node_with_a_reused_id(monkeypatch):
    """``id()`` values are reused after objects die; a refusal must stay with its own node.

    Simulated deterministically: the engine sees the refused (then removed) BN
    and an identity created later with the same ``id``.
    """
    builtin_id = id
    monkeypatch.setattr(engine, "id", lambda o: 12345 if getattr(o, "source", None) in ("bn", "late") else builtin_id(o), raising=False)
    b = GraphBuilder()
    x = b.input("x", (1, 2, 3, 3))
    y = b.sigmoid(b.batch_norm(x, mean=torch.zeros(2), var=torch.ones(2), weight=torch.ones(2), bias=torch.zeros(2), source="bn"), source="act")
    graph = b.build(y)
    visits = {"bn": 0, "act": 0}

    def on_bn(g, node):  # refuse first, replace by a relu on the next pass
        visits["bn"] += 1
        if visits["bn"] == 1:
            return Refusal("the BN's own reason")
        new = Node.make("relu", [node.x], source="relu")
        return Rewrite(node.out, new.out, (new,))

    def on_sigmoid(g, node):  # first: force another pass; third: put an identity in front
        visits["act"] += 1
        if visits["act"] == 1:
            new = Node.make("sigmoid", [node.x], source="act")
            return Rewrite(node.out, new.out, (new,))
        if visits["act"] != 3:
            return None
        ident = Node.make("identity", [node.x], source="late")
        new = Node.make("sigmoid", [ident.out], source="act")
        return Rewrite(node.out, new.out, (ident, new))

    fused, report = rewrite(graph, [Rule("on_bn", ("batch_norm",), on_bn), Rule("on_sigmoid", ("sigmoid",), on_sigmoid)])
    assert fused.op_counts() == {"identity": 1, "relu": 1, "sigmoid": 1}
    assert [(la.source, la.reason) for la in report.left_alone] == [("late", "no rule applies (input from relu, used by sigmoid)")]


def test_custom_rules_and_registration_errors():
    with pytest.raises(ValueError, match="rule 'bn_fold' registered twice"):
        rule("bn_fold", on="batch_norm")(lambda g, n: None)
    with pytest.raises(KeyError, match="unknown op 'nope'"):
        rule("never_registered", on="nope")
    assert "never_registered" not in RULES

    def grow(g, node):  # a wrong rule: changes the shape
        new = Node.make("pad", [node.out], {"pads": (1, 1, 1, 1)})
        return Rewrite(node.out, new.out, (new,))

    b = GraphBuilder()
    x = b.input("x", (1, 1, 3, 3))
    with pytest.raises(AssertionError, match=r"rewrite changes shape \(1, 1, 3, 3\) -> \(1, 1, 5, 5\)"):
        rewrite(b.build(b.relu(x)), [Rule("grow", ("relu",), grow)])


def test_engine_never_touches_its_input():
    graph = repmixer_graph(channels=4, size=5)
    snap = snapshot_params(graph)
    text = str(graph)
    rewrite(graph)
    assert str(graph) == text
    assert_params_unchanged(graph, snap)


# --------------------------------------------------------------------------- float64 folding, cast back


def repvgg_like(dtype, channels=8, seed=0, small_var=True):
    """3x3+BN, 1x1+BN, BN identity with tiny running variances (large BN scales)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    c = channels
    stats = [(0.1 * r(c), (10 ** (-3 * torch.rand(c, generator=g, dtype=torch.float64))) if small_var else torch.ones(c, dtype=torch.float64), r(c), r(c)) for _ in range(3)]
    w3, w1 = r(c, c, 3, 3) / 6, r(c, c, 1, 1) / 3
    b = GraphBuilder()
    x = b.input("x", (1, c, 6, 6), dtype)

    def bn(v, k):
        m, var, gamma, beta = (t.to(dtype) for t in stats[k])
        return b.batch_norm(v, mean=m, var=var, weight=gamma, bias=beta, eps=1e-5)

    y = b.add(b.add(bn(b.conv2d(x, weight=w3.to(dtype), padding=(1, 1, 1, 1)), 0), bn(b.conv2d(x, weight=w1.to(dtype)), 1)), bn(x, 2))
    return b.build(y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_folding_happens_in_float64_and_params_are_cast_back_once(dtype):
    """The fused parameters are the float64 fold rounded once: the nearest ``dtype`` values to the truth.

    The truth is the same graph (same parameter values) with float64 inputs, so
    nothing is cast back.  Folding in ``dtype`` itself (``fold_dtype=dtype``)
    is never closer elementwise (round-to-nearest is optimal) and worse overall.
    """
    graph = repvgg_like(dtype)
    conv = the_conv(rewrite(graph)[0])
    truth = the_conv(rewrite(_rebuild_with_inputs(graph, torch.float64))[0])
    low = the_conv(rewrite(graph, fold_dtype=dtype)[0])
    for k in ("weight", "bias"):
        assert conv.params[k].dtype == low.params[k].dtype == dtype and truth.params[k].dtype == torch.float64
        assert torch.equal(conv.params[k], truth.params[k].to(dtype)), k  # exactly one rounding
        err_once = (conv.params[k].double() - truth.params[k]).abs()
        err_low = (low.params[k].double() - truth.params[k]).abs()
        assert bool((err_once <= err_low).all())
        assert err_once.sum() < err_low.sum()


def _rebuild_with_inputs(graph, dtype):
    """The same graph with ``dtype`` inputs and parameters (so nodes compute in ``dtype``)."""
    b = GraphBuilder()
    mapping = {}
    for v in graph.inputs:
        mapping[id(v)] = b.input(v.name, v.shape, dtype)
    for n in graph.nodes:
        params = {k: p.to(dtype) for k, p in n.params.items()}
        mapping[id(n.out)] = b.node(n.op, *[mapping[id(i)] for i in n.inputs], source=n.source, **n.attrs, **params)
    return b.build(*[mapping[id(o)] for o in graph.outputs])


def test_float16_graph_folds_closer_to_the_truth_than_float16_arithmetic():
    """End to end: the fused float16 conv's output error vs float64 truth is below folding in float16."""
    graph = repvgg_like(torch.float16, channels=16, seed=1)
    fused, _ = rewrite(graph)
    low, _ = rewrite(graph, fold_dtype=torch.float16)
    x = random_input((1, 16, 6, 6), torch.float64, 0)
    truth = run_graph(graph, x)  # float64 run of the float16 parameters
    err = lambda g: (run_graph(g, x) - truth).abs().max().item()  # noqa: E731
    assert err(fused) < err(low)
    assert_graphs_equal(graph, fused, x.to(torch.float16), torch.float64)  # float64 run: one float16 rounding


# --------------------------------------------------------------------------- composites: one conv each


def test_demo_repmixer_is_one_depthwise_conv_with_bias():
    graph = repmixer_graph(channels=8, size=16)
    fused, report = fold(graph)
    conv = the_conv(fused)
    assert conv.attrs["groups"] == 8 and conv.params["weight"].shape == (8, 1, 3, 3)
    assert "bias" in conv.params and conv.attrs["padding"] == (1, 1, 1, 1)
    assert report.left_alone == []
    assert_graphs_equal(graph, fused, random_input((1, 8, 16, 16), torch.float32, 0), torch.float32)


@given(c=st.integers(1, 16), k=st.sampled_from([3, 5, 7]), hw=st.integers(1, 9), dtype=float_dtypes(), seed=seeds(), data=st.data())
@settings(max_examples=25)
def test_repmixer(c, k, hw, dtype, seed, data):
    """FastViT RepMixer: x + ls * (BN(dwconv(x)) + BN(x) - BN(x))."""
    b = GraphBuilder()
    x = b.input("x", (data.draw(st.integers(1, 3)), c, hw, hw), dtype)
    dw = ConvSpec(c, c, c, (k, k), padding=(k // 2,) * 4, bias=False, height=hw, width=hw)
    mixer = b.add(conv_bn(b, x, dw, dtype, seed, data, "mixer.conv"), add_bn(b, x, data.draw(bn_stats(c)), dtype, "mixer.skip"))
    mixer = b.sub(mixer, add_bn(b, x, data.draw(bn_stats(c)), dtype, "norm"), source="mixer")
    gamma = random_input((c,), dtype, seed + 1)
    graph = b.build(b.add(x, b.scale(mixer, scale=gamma, source="layer_scale")))
    fused, _ = fold(graph)
    conv = the_conv(fused)
    assert conv.attrs["groups"] == c and conv.params["weight"].shape == (c, 1, k, k) and "bias" in conv.params
    assert_graphs_equal(graph, fused, random_input(x.shape, dtype, seed), dtype)


@given(c=st.integers(1, 16), hw=st.integers(1, 9), dtype=float_dtypes(), seed=seeds())
@settings(max_examples=25)
def test_conditional_positional_encoding(c, hw, dtype, seed):
    """CPE: x + dwconv7x7(x) (with bias) is one depthwise 7x7 conv."""
    b = GraphBuilder()
    x = b.input("x", (2, c, hw, hw), dtype)
    dw = ConvSpec(c, c, c, (7, 7), padding=(3, 3, 3, 3), bias=True, height=hw, width=hw)
    graph = b.build(b.add(x, add_conv(b, x, dw, dtype, seed, "pos.pe"), source="pos"))
    fused, _ = fold(graph)
    conv = the_conv(fused)
    assert conv.attrs["groups"] == c and conv.params["weight"].shape == (c, 1, 7, 7) and "bias" in conv.params
    assert_graphs_equal(graph, fused, random_input((2, c, hw, hw), dtype, seed), dtype)


@given(c=st.integers(1, 16), hw=st.integers(1, 9), stride=st.sampled_from([1, 2]), dtype=float_dtypes(), seed=seeds(), data=st.data())
@settings(max_examples=30)
def test_repvgg(c, hw, stride, dtype, seed, data):
    """RepVGG: 3x3+BN + 1x1+BN (+ BN identity at stride 1 with equal channels), also grouped."""
    cout = c if stride == 1 and data.draw(st.booleans(), label="identity") else data.draw(st.integers(1, 16))
    g = data.draw(st.sampled_from(_divisors(__import__("math").gcd(c, cout))), label="groups")
    s = (stride, stride)
    b = GraphBuilder()
    x = b.input("x", (1, c, hw, hw), dtype)
    k3 = ConvSpec(c, cout, g, (3, 3), s, padding=(1, 1, 1, 1), bias=False, height=hw, width=hw)
    k1 = ConvSpec(c, cout, g, (1, 1), s, bias=False, height=hw, width=hw)
    branches = [conv_bn(b, x, k3, dtype, seed, data, "rbr_dense"), conv_bn(b, x, k1, dtype, seed + 1, data, "rbr_1x1")]
    if stride == 1 and cout == c:
        branches.append(add_bn(b, x, data.draw(bn_stats(c)), dtype, "rbr_identity"))
    graph = b.build(sum_all(b, branches))
    fused, _ = fold(graph)
    conv = the_conv(fused)
    assert conv.params["weight"].shape == (cout, c // g, 3, 3) and conv.attrs["groups"] == g
    assert conv.attrs["stride"] == s and conv.attrs["padding"] == (1, 1, 1, 1)
    assert_graphs_equal(graph, fused, random_input((1, c, hw, hw), dtype, seed), dtype)


@given(c=st.integers(1, 16), hw=st.integers(1, 9), stride=st.sampled_from([1, 2]), dtype=float_dtypes(), seed=seeds(), data=st.data())
@settings(max_examples=25)
def test_acnet(c, hw, stride, dtype, seed, data):
    """ACNet: 3x3+BN + 1x3+BN + 3x1+BN is one 3x3 conv."""
    cout = data.draw(st.integers(1, 16))
    s = (stride, stride)
    b = GraphBuilder()
    x = b.input("x", (1, c, hw, hw), dtype)
    specs = [
        ConvSpec(c, cout, 1, (3, 3), s, padding=(1, 1, 1, 1), bias=False, height=hw, width=hw),
        ConvSpec(c, cout, 1, (1, 3), s, padding=(0, 0, 1, 1), bias=False, height=hw, width=hw),
        ConvSpec(c, cout, 1, (3, 1), s, padding=(1, 1, 0, 0), bias=False, height=hw, width=hw),
    ]
    graph = b.build(sum_all(b, [conv_bn(b, x, sp, dtype, seed + k, data, f"acb.{k}") for k, sp in enumerate(specs)]))
    fused, _ = fold(graph)
    conv = the_conv(fused)
    assert conv.params["weight"].shape == (cout, c, 3, 3) and conv.attrs["padding"] == (1, 1, 1, 1)
    assert_graphs_equal(graph, fused, random_input((1, c, hw, hw), dtype, seed), dtype)


@given(c=st.integers(1, 16), hw=st.integers(1, 9), dtype=float_dtypes(), seed=seeds(), data=st.data())
@settings(max_examples=20)
def test_replknet(c, hw, dtype, seed, data):
    """RepLKNet-style: 13x13 dw + 5x5 dw + dilated 3x3 dws (d = 2, 3, 5), each with BN: one 13x13 dw conv."""
    b = GraphBuilder()
    x = b.input("x", (1, c, hw, hw), dtype)
    specs = [
        ConvSpec(c, c, c, (13, 13), padding=(6,) * 4, bias=False, height=hw, width=hw),
        ConvSpec(c, c, c, (5, 5), padding=(2,) * 4, bias=False, height=hw, width=hw),
        ConvSpec(c, c, c, (3, 3), dilation=(2, 2), padding=(2,) * 4, bias=False, height=hw, width=hw),
        ConvSpec(c, c, c, (3, 3), dilation=(3, 3), padding=(3,) * 4, bias=False, height=hw, width=hw),
        ConvSpec(c, c, c, (3, 3), dilation=(5, 5), padding=(5,) * 4, bias=False, height=hw, width=hw),
    ]
    graph = b.build(sum_all(b, [conv_bn(b, x, sp, dtype, seed + k, data, f"lk.{k}") for k, sp in enumerate(specs)]))
    fused, _ = fold(graph)
    conv = the_conv(fused)
    assert conv.params["weight"].shape == (c, 1, 13, 13) and conv.attrs["groups"] == c
    assert conv.attrs["dilation"] == (1, 1) and conv.attrs["padding"] == (6,) * 4
    assert_graphs_equal(graph, fused, random_input((1, c, hw, hw), dtype, seed), dtype)


@given(c=st.integers(1, 16), hw=st.integers(1, 9), dtype=float_dtypes(), seed=seeds(), data=st.data())
@settings(max_examples=20)
def test_dbb_padded(c, hw, dtype, seed, data):
    """DiverseBranchBlock, k = 3, padding 1, internal channels = C:

    3x3+BN; 1x1+BN; 1x1 (no bias) -> 3x3 (padding 1) -> BN; 1x1 (no bias) -> avg pool 3x3 p1 -> BN.
    (The 1x1 branches have no bias before the padded ops: DBB's BNAndPad pads with the BN bias,
    which a zero-padded graph cannot express.)
    """
    cout = data.draw(st.integers(1, 16))
    b = GraphBuilder()
    x = b.input("x", (1, c, hw, hw), dtype)
    k3 = lambda cin: ConvSpec(cin, cout, 1, (3, 3), padding=(1,) * 4, bias=False, height=hw, width=hw)  # noqa: E731
    pw = lambda co, bias=False: ConvSpec(c, co, 1, (1, 1), bias=bias, height=hw, width=hw)  # noqa: E731
    dense = conv_bn(b, x, k3(c), dtype, seed, data, "dbb_origin")
    one = conv_bn(b, x, pw(cout), dtype, seed + 1, data, "dbb_1x1")
    seq = add_bn(b, add_conv(b, add_conv(b, x, pw(c), dtype, seed + 2, "dbb_1x1_kxk.idconv1"), k3(c), dtype, seed + 3, "dbb_1x1_kxk.conv2"),
                 data.draw(bn_stats(cout)), dtype, "dbb_1x1_kxk.bn2")
    avg = b.avg_pool2d(add_conv(b, x, pw(cout), dtype, seed + 4, "dbb_avg.conv"), kernel=(3, 3), stride=(1, 1), padding=(1, 1), source="dbb_avg.avg")
    avg = add_bn(b, avg, data.draw(bn_stats(cout)), dtype, "dbb_avg.avgbn")
    graph = b.build(sum_all(b, [dense, one, seq, avg]))
    fused, _ = fold(graph)
    conv = the_conv(fused)
    assert conv.params["weight"].shape == (cout, c, 3, 3) and conv.attrs["padding"] == (1, 1, 1, 1)
    assert_graphs_equal(graph, fused, random_input((1, c, hw, hw), dtype, seed), dtype)


@given(c=st.integers(1, 16), hw=st.integers(3, 10), dtype=float_dtypes(), seed=seeds(), data=st.data())
@settings(max_examples=20)
def test_dbb_unpadded(c, hw, dtype, seed, data):
    """DiverseBranchBlock without padding (k = 3, valid conv), biased 1x1s and BNs everywhere:

    3x3+BN; 1x1+BN -> 3x3 -> BN; 1x1+BN -> avg pool 3x3 -> BN.  Exact because nothing pads.
    """
    cout = data.draw(st.integers(1, 16))
    b = GraphBuilder()
    x = b.input("x", (1, c, hw, hw), dtype)
    k3 = lambda cin: ConvSpec(cin, cout, 1, (3, 3), bias=True, height=hw, width=hw)  # noqa: E731
    pw = lambda co: ConvSpec(c, co, 1, (1, 1), bias=True, height=hw, width=hw)  # noqa: E731
    dense = conv_bn(b, x, k3(c), dtype, seed, data, "dbb_origin")
    mid = conv_bn(b, x, pw(c), dtype, seed + 1, data, "dbb_1x1_kxk.1")
    seq = conv_bn(b, mid, k3(c), dtype, seed + 2, data, "dbb_1x1_kxk.2")
    pre = conv_bn(b, x, pw(cout), dtype, seed + 3, data, "dbb_avg.1")
    avg = add_bn(b, b.avg_pool2d(pre, kernel=(3, 3), stride=(1, 1), source="dbb_avg.avg"), data.draw(bn_stats(cout)), dtype, "dbb_avg.bn")
    graph = b.build(sum_all(b, [dense, seq, avg]))
    fused, _ = fold(graph)
    conv = the_conv(fused)
    assert conv.params["weight"].shape == (cout, c, 3, 3) and conv.attrs["padding"] == (0, 0, 0, 0)
    assert_graphs_equal(graph, fused, random_input((1, c, hw, hw), dtype, seed), dtype)


@given(c=st.integers(1, 16), hw=st.integers(1, 9), k=st.integers(1, 4), stride=st.sampled_from([1, 2]), dtype=float_dtypes(), seed=seeds(), data=st.data())
@settings(max_examples=25)
def test_mobileone_depthwise(c, hw, k, stride, dtype, seed, data):
    """MobileOne depthwise block: k (3x3 dw conv + BN) + (1x1 dw conv + BN) scale branch + BN skip (stride 1)."""
    s = (stride, stride)
    b = GraphBuilder()
    x = b.input("x", (1, c, hw, hw), dtype)
    branches = [
        conv_bn(b, x, ConvSpec(c, c, c, (3, 3), s, padding=(1,) * 4, bias=False, height=hw, width=hw), dtype, seed + i, data, f"rbr_conv.{i}")
        for i in range(k)
    ]
    branches.append(conv_bn(b, x, ConvSpec(c, c, c, (1, 1), s, bias=False, height=hw, width=hw), dtype, seed + k, data, "rbr_scale"))
    if stride == 1:
        branches.append(add_bn(b, x, data.draw(bn_stats(c)), dtype, "rbr_skip"))
    graph = b.build(sum_all(b, branches))
    fused, _ = fold(graph)
    conv = the_conv(fused)
    assert conv.params["weight"].shape == (c, 1, 3, 3) and conv.attrs["groups"] == c and conv.attrs["stride"] == s
    assert_graphs_equal(graph, fused, random_input((1, c, hw, hw), dtype, seed), dtype)


@given(c=st.integers(1, 16), hw=st.integers(1, 9), k=st.integers(1, 4), dtype=float_dtypes(), seed=seeds(), data=st.data())
@settings(max_examples=25)
def test_mobileone_pointwise(c, hw, k, dtype, seed, data):
    """MobileOne pointwise block: k (1x1 conv + BN) + BN skip (equal channels) is one 1x1 conv."""
    cout = c if data.draw(st.booleans(), label="skip") else data.draw(st.integers(1, 16))
    b = GraphBuilder()
    x = b.input("x", (1, c, hw, hw), dtype)
    branches = [conv_bn(b, x, ConvSpec(c, cout, 1, (1, 1), bias=False, height=hw, width=hw), dtype, seed + i, data, f"rbr_conv.{i}") for i in range(k)]
    if cout == c:
        branches.append(add_bn(b, x, data.draw(bn_stats(c)), dtype, "rbr_skip"))
    graph = b.build(sum_all(b, branches))
    fused, _ = fold(graph)
    conv = the_conv(fused)
    assert conv.params["weight"].shape == (cout, c, 1, 1) and conv.attrs["groups"] == 1
    assert_graphs_equal(graph, fused, random_input((1, c, hw, hw), dtype, seed), dtype)


def test_imports_run_one_way_engine_rules_registry():
    """The rules import the registry, never the engine; the registry imports neither; the engine re-exports the registry."""
    import ast
    import pathlib

    import repalgebra.rules
    from repalgebra.rules import registry

    def imported(path):
        tree = ast.parse(path.read_text())
        names = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module:
                names.add(n.module)
                names.update(f"{n.module}.{a.name}" for a in n.names)
            elif isinstance(n, ast.Import):
                names.update(a.name for a in n.names)
        return names

    folder = pathlib.Path(repalgebra.rules.__file__).parent
    for path in folder.glob("*.py"):
        mods = imported(path)
        assert not {"repalgebra.rewrite", "repalgebra", "repalgebra.fuse"} & mods, f"{path.name} imports the engine"
    assert not {m for m in imported(folder / "registry.py") if m.startswith("repalgebra.rules")}
    for name in ("RULES", "Rule", "Rewrite", "Refusal", "rule", "RuleFn"):
        assert getattr(engine, name) is getattr(registry, name), name
