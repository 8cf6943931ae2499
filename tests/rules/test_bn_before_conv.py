"""bn_before_conv: an eval-mode BN feeding an unpadded conv folds into it.

    conv(BN(x); W, b) = conv(x; W[o,i] * s[i], b[o] + sum_{i,taps} W[o,i,taps] * t[i])

Refused when the conv zero-pads: its border would see 0 where the unfused graph sees BN(0) = t.
Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from rulecheck import fired, only, reasons, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.kernels import bn_affine
from repalgebra.testing import add_bn, add_conv, assert_graphs_equal, bn_stats, conv_specs, float_dtypes, random_input, seeds


@given(spec=conv_specs(padding="none"), dtype=float_dtypes(), batch=st.integers(1, 3), seed=seeds(), data=st.data())
def test_folds_bn_into_unpadded_conv(spec, dtype, batch, seed, data):
    stats = data.draw(bn_stats(spec.in_channels))
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(batch), dtype)
    graph = b.build(add_conv(b, add_bn(b, x, stats, dtype, "blk.bn"), spec, dtype, seed, "blk.conv"))

    fused, report = run_rules(graph, "bn_before_conv")
    assert report.rule_counts() == {"bn_before_conv": 1}
    assert report.before == {"batch_norm": 1, "conv2d": 1} and fused.op_counts() == {"conv2d": 1}
    conv = only(fused, "conv2d")
    assert conv.x is x and "bias" in conv.params
    assert {k: conv.attrs[k] for k in spec.attrs} == spec.attrs
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(batch), dtype, seed + 1), dtype)


@given(spec=conv_specs(), dtype=float_dtypes(), sign=st.sampled_from([1.0, -1.0]), scalar=st.booleans(), seed=seeds())
def test_a_constant_added_per_input_channel_folds_unless_the_conv_pads(spec, dtype, sign, scalar, seed):
    """YOLOv7's ImplicitA: ``conv(x + c)`` with ``c`` of shape (1, C, 1, 1) (or one number); ``c - x`` too."""
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(), dtype)
    c = torch.randn((1, 1 if scalar else spec.in_channels, 1, 1), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    graph = b.build(add_conv(b, b.add_const(x, const=c.to(dtype), sign=sign, source="blk.ia"), spec, dtype, seed, "blk.conv"))
    fused, report = run_rules(graph, "bn_before_conv")
    if any(spec.padding):
        assert fired(report, "bn_before_conv") == 0 and fused.op_counts() == graph.op_counts()
        assert reasons(report, "add_const") == ["bn_before_conv: the conv after it zero-pads: its border would see 0, not the added constant"]
    else:
        assert report.rule_counts() == {"bn_before_conv": 1} and fused.op_counts() == {"conv2d": 1}
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(), dtype, seed + 1), dtype)


@given(spec=conv_specs(), dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_refused_when_the_conv_pads(spec, dtype, seed, data):
    assume(any(spec.padding))
    stats = data.draw(bn_stats(spec.in_channels))
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(), dtype)
    graph = b.build(add_conv(b, add_bn(b, x, stats, dtype, "bn"), spec, dtype, seed))
    reason = "bn_before_conv: the conv after it zero-pads, and BN(0) != 0 at the border"
    for rules in (("bn_before_conv",), ()):
        fused, report = run_rules(graph, *rules)
        assert fired(report, "bn_before_conv") == 0 and fused.op_counts() == graph.op_counts()
        assert reasons(report, "batch_norm") == [reason]
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(), dtype, seed), dtype)


@given(spec=conv_specs(padding="none"), dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_refused_through_an_explicit_zero_pad(spec, dtype, seed, data):
    """BN -> pad(0) -> conv: pad_absorb makes the conv pad, so the BN must stay."""
    stats = data.draw(bn_stats(spec.in_channels))
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(), dtype)
    graph = b.build(add_conv(b, b.pad(add_bn(b, x, stats, dtype, "bn"), pads=(1, 0, 0, 1)), spec, dtype, seed))
    fused, report = run_rules(graph)
    assert fused.op_counts() == {"batch_norm": 1, "conv2d": 1}
    assert reasons(report, "batch_norm") == ["bn_before_conv: the conv after it zero-pads, and BN(0) != 0 at the border"]
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(), dtype, seed), dtype)


@given(spec=conv_specs(padding="none"), dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_not_fired_when_the_bn_has_another_user(spec, dtype, seed, data):
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(), dtype)
    y = add_bn(b, x, data.draw(bn_stats(spec.in_channels)), dtype, "bn")
    graph = b.build(add_conv(b, y, spec, dtype, seed), y)
    fused, report = run_rules(graph, "bn_before_conv")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert reasons(report, "batch_norm")[0].startswith("no rule applies")


@given(spec=conv_specs(padding="none", dilation=(1, 1), kernel=st.tuples(*[st.sampled_from([1, 2, 3, 5])] * 2),
                       height=st.integers(7, 10), width=st.integers(7, 10)),
       mode=st.sampled_from(["reflect", "replicate", "circular"]), pads=st.tuples(*[st.integers(0, 2)] * 4),
       dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_folds_bn_across_a_pad_that_copies_pixels(spec, mode, pads, dtype, seed, data):
    """mmcv's ConvModule(order=('norm', 'conv', 'act'), padding_mode='reflect'): BN -> F.pad(mode) -> unpadded conv.
    The pad copies pixels within each channel, so the BN's per-channel affine map commutes with it."""
    left, right, top, bottom = pads
    shape = (1, spec.in_channels, spec.height - top - bottom, spec.width - left - right)  # >= 3 > every pad: reflect works
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    y = b.pad_nd(add_bn(b, x, data.draw(bn_stats(spec.in_channels)), dtype, "blk.bn"), pads=pads, mode=mode)
    graph = b.build(add_conv(b, y, spec, dtype, seed, "blk.conv"))

    fused, report = run_rules(graph, "bn_before_conv")
    assert report.rule_counts() == {"bn_before_conv": 1} and fused.op_counts() == {"pad_nd": 1, "conv2d": 1}
    assert only(fused, "pad_nd").x is x
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed + 1), dtype)


@given(dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_a_constant_pad_between_is_not_crossed(dtype, seed, data):
    """A zero (constant) pad puts 0 where the unfused graph has BN's input 0 normalized: not a copy, not folded."""
    b = GraphBuilder()
    x = b.input("x", (1, 3, 4, 4), dtype)
    y = b.pad_nd(add_bn(b, x, data.draw(bn_stats(3)), dtype, "bn"), pads=(1, 1, 1, 1), mode="constant", value=0.0)
    w = torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    graph = b.build(b.conv2d(y, weight=w))
    fused, report = run_rules(graph, "bn_before_conv")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()


@given(spec=conv_specs(padding="none"), dtype=float_dtypes(), readers=st.integers(2, 3), padded=st.booleans(), seed=seeds(), data=st.data())
def test_a_bn_read_by_several_convs_folds_into_each_unless_one_pads(spec, dtype, readers, padded, seed, data):
    """The 1x1 branches of an Inception block after a shared BN: folded into every conv at once; refused when one
    of them (not the first) zero-pads."""
    stats = data.draw(bn_stats(spec.in_channels))
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(), dtype)
    n = add_bn(b, x, stats, dtype, "blk.bn")
    outs = [add_conv(b, n, spec, dtype, seed + k, f"blk.conv{k}") for k in range(readers)]
    if padded:
        outs[-1] = b.conv2d(n, weight=torch.ones(2, spec.in_channels, 3, 3, dtype=dtype), padding=(1, 1, 1, 1), source="blk.padded")
    graph = b.build(*outs)
    fused, report = run_rules(graph, "bn_before_conv")
    if padded:
        assert fired(report, "bn_before_conv") == 0 and fused.op_counts() == graph.op_counts()
        assert reasons(report, "batch_norm") == ["bn_before_conv: the conv after it zero-pads, and BN(0) != 0 at the border"]
    else:
        assert report.rule_counts() == {"bn_before_conv": 1} and fused.op_counts() == {"conv2d": readers}
        assert all(conv.x is x for conv in fused.nodes)
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(), dtype, seed + 1), dtype)


@given(dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_affine_maps_on_the_inputs_of_a_channel_concat_fold_into_the_conv_that_reads_it(dtype, seed, data):
    """PP-HGNetV2: every layer's output, after its LearnableAffineBlock (``scale * x + bias``, one number each), goes
    into ``torch.cat`` and the aggregation conv.  Each part's map (a BN, a constant added per channel or one for all,
    a scale) folds into the kernel's slice of input channels it feeds; a part that is none stays as it is.  With a
    zero-padding conv only scales fold (s * 0 = 0); a shift is refused."""
    n = data.draw(st.integers(2, 3), label="parts")
    kinds = [data.draw(st.sampled_from(["bn", "add", "scale", "scalar", "plain"]), label="kind") for _ in range(n)]
    gen = torch.Generator().manual_seed(seed)
    b = GraphBuilder()
    parts, channels = [], 0
    for k, kind in enumerate(kinds):
        c = data.draw(st.integers(1, 3), label="channels")
        y = b.relu(b.input(f"x{k}", (2, c, 5, 4), dtype))
        if kind == "bn":
            y = add_bn(b, y, data.draw(bn_stats(c)), dtype, f"blk.bn{k}")
        elif kind == "add":
            y = b.add_const(y, const=torch.randn(1, c, 1, 1, generator=gen, dtype=torch.float64).to(dtype), sign=data.draw(st.sampled_from([1.0, -1.0])))
        elif kind in ("scale", "scalar"):
            f = torch.randn(c if kind == "scale" else 1, generator=gen, dtype=torch.float64).to(dtype)
            y = b.scale(y, scale=f, axis=1, source=f"blk.lab{k}")
        parts.append(y)
        channels += c
    padded = data.draw(st.booleans(), label="padded")
    kernel = (3, 3) if padded else st.tuples(st.integers(1, 3), st.integers(1, 3))
    spec = data.draw(conv_specs(in_channels=channels, height=5, width=4, stride=1, dilation=1,
                                padding=(1, 1, 1, 1) if padded else "none", kernel=kernel), label="conv")
    graph = b.build(add_conv(b, b.concat(*parts, axis=1, source="blk.cat"), spec, dtype, seed, "blk.agg"))

    fused, report = run_rules(graph, "bn_before_conv")

    shifts = [bn_affine(n)[1] for n in graph.nodes if n.op == "batch_norm"] + [n.params["const"] for n in graph.nodes if n.op == "add_const"]
    shifted = any(bool(t.abs().max() > 0) for t in shifts)  # a BN's shift may be 0 (mean and beta drawn 0): then it folds
    if all(k == "plain" for k in kinds) or (padded and shifted):
        assert report.fired == [] and fused.op_counts() == graph.op_counts()
        if padded and shifted:
            assert any("zero-pads" in why for why in reasons(report, "batch_norm") + reasons(report, "add_const") + reasons(report, "scale"))
    else:
        assert report.rule_counts() == {"bn_before_conv": 1}, report
        assert not {"batch_norm", "add_const", "scale"} & set(fused.op_counts()), fused.op_counts()
    inputs = [random_input(v.shape, dtype, seed + 1 + k) for k, v in enumerate(graph.inputs)]
    assert_graphs_equal(graph, fused, inputs, dtype)


@given(dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_a_part_of_the_concat_read_elsewhere_keeps_its_map(dtype, seed, data):
    """A scaled part that is also returned: its other reader needs the scaled value, so folding it would compute the
    scale twice (once for that reader, once in the conv); it stays, the other part's scale folds."""
    gen = torch.Generator().manual_seed(seed)
    b = GraphBuilder()
    ys = [b.scale(b.relu(b.input(f"x{k}", (1, 2, 4, 4), dtype)), scale=(0.5 + torch.rand(2, generator=gen, dtype=torch.float64)).to(dtype),
                  axis=1, source=f"blk.lab{k}") for k in range(2)]
    spec = data.draw(conv_specs(in_channels=4, height=4, width=4, padding="none", kernel=(1, 1)))
    graph = b.build(add_conv(b, b.concat(*ys, axis=1, source="blk.cat"), spec, dtype, seed, "blk.agg"), ys[1])
    fused, report = run_rules(graph, "bn_before_conv")
    assert report.rule_counts() == {"bn_before_conv": 1} and fused.op_counts().get("scale") == 1
    assert [v.producer.op for v in only(fused, "concat").inputs] == ["relu", "scale"]  # the shared scale is still read
    inputs = [random_input(v.shape, dtype, seed + 1 + k) for k, v in enumerate(graph.inputs)]
    assert_graphs_equal(graph, fused, inputs, dtype)


def _group_norm_then_conv(spec, dtype, weight, bias, seed, data):
    c = spec.in_channels
    groups = data.draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    gen = torch.Generator().manual_seed(seed)
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(2), dtype)
    gamma = (0.5 + torch.rand(c, generator=gen, dtype=torch.float64)).to(dtype) if weight else None
    beta = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    n = b.group_norm(x, weight=gamma, bias=beta, num_groups=groups, eps=1e-5, source="norm")
    graph = b.build(add_conv(b, n, spec, dtype, seed, "mlp.fc1"))
    return graph, run_rules(graph, "bn_before_conv")


@given(spec=conv_specs(padding="none"), dtype=float_dtypes(), affine=st.sampled_from(["both", "weight", "bias", "none"]),
       seed=seeds(), data=st.data())
def test_a_group_norms_affine_folds_into_an_unpadded_conv(spec, dtype, affine, seed, data):
    """PoolFormer's ``GroupNorm(1, C)`` before its MLP's 1x1 conv: ``conv(gamma n(x) + beta) = conv'(n(x))``, the norm
    left with its normalization (a norm without an affine has nothing to fold)."""
    graph, (fused, report) = _group_norm_then_conv(spec, dtype, affine in ("both", "weight"), affine in ("both", "bias"), seed, data)
    if affine != "none":
        assert report.rule_counts() == {"bn_before_conv": 1} and only(fused, "group_norm").params == {}, report
        assert only(fused, "conv2d").x is only(fused, "group_norm").out
    else:
        assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(2), dtype, seed + 1), dtype)


@given(spec=conv_specs(padding="symmetric"), dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_a_group_norms_affine_stays_before_a_zero_padding_conv(spec, dtype, seed, data):
    """A zero-padding conv would see 0 at its border, not beta."""
    graph, (fused, report) = _group_norm_then_conv(spec, dtype, True, True, seed, data)
    if any(only(graph, "conv2d").attrs["padding"]):
        assert report.fired == [] and "beta" in reasons(report, "group_norm")[0], report
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(2), dtype, seed + 1), dtype)
