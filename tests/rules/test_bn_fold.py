"""bn_fold: ``BN(conv(x; W, b)) = conv(x; W * s[o], b * s + t)`` for any conv geometry.

Tolerances: :func:`repalgebra.testing.assert_graphs_equal` (float64 run: one
rounding of each fused parameter to the graph dtype, eps(dtype) x magnitude;
float32 run 1e-5 x magnitude; float64 1e-12 x magnitude).
"""

import torch
from hypothesis import given
from hypothesis import strategies as st
from rulecheck import fired, only, reasons, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.testing import (add_bn, add_conv, assert_graphs_equal, bn_stats, conv_specs, float_dtypes,
                                random_input, seeds)


@given(spec=conv_specs(), dtype=float_dtypes(), batch=st.integers(1, 3), seed=seeds(), data=st.data())
def test_folds_bn_into_any_conv(spec, dtype, batch, seed, data):
    stats = data.draw(bn_stats(spec.out_channels), label="bn")
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(batch), dtype)
    y = add_bn(b, add_conv(b, x, spec, dtype, seed, "block.conv"), stats, dtype, "block.bn")
    graph = b.build(y)

    fused, report = run_rules(graph, "bn_fold")

    assert report.rule_counts() == {"bn_fold": 1}
    assert report.fired[0].source == "block.bn" and report.fired[0].op == "batch_norm"
    assert report.before == {"batch_norm": 1, "conv2d": 1} and report.after == {"conv2d": 1}
    assert report.left_alone == []
    conv = only(fused, "conv2d")
    assert "bias" in conv.params  # b * s + t: a BN always leaves a bias
    assert {k: conv.attrs[k] for k in spec.attrs} == spec.attrs
    assert conv.params["weight"].shape == spec.weight_shape
    assert conv.source == "block"
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(batch), dtype, seed + 1), dtype)


@given(spec=conv_specs(), dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_folds_a_chain_of_bns(spec, dtype, seed, data):
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(), dtype)
    y = add_conv(b, x, spec, dtype, seed)
    n = data.draw(st.integers(2, 3), label="bns")
    for k in range(n):
        y = add_bn(b, y, data.draw(bn_stats(spec.out_channels)), dtype, f"bn{k}")
    graph = b.build(y)
    fused, report = run_rules(graph, "bn_fold")
    assert fired(report, "bn_fold") == n and fused.op_counts() == {"conv2d": 1}
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(), dtype, seed + 1), dtype)


@given(spec=conv_specs(), dtype=float_dtypes(), seed=seeds(), use=st.sampled_from(["output", "add"]), data=st.data())
def test_refused_when_conv_output_has_another_user(spec, dtype, seed, use, data):
    stats = data.draw(bn_stats(spec.out_channels))
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(), dtype)
    c = add_conv(b, x, spec, dtype, seed, "conv")
    y = add_bn(b, c, stats, dtype, "bn")
    graph = b.build(y, c) if use == "output" else b.build(b.add(y, c, source="sum"))

    fused, report = run_rules(graph, "bn_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert reasons(report, "batch_norm") == ["bn_fold: the conv before it is also read elsewhere"]

    # With every rule: a conv that is also a graph output must stay, so the BN stays too.  Summed
    # with the conv instead, the pair legitimately folds through other rules (c + BN(c) is one
    # conv of c, which then merges with the conv computing c when one of them is 1x1).
    fused, report = run_rules(graph)
    if use == "output":
        assert fused.op_counts() == {"batch_norm": 1, "conv2d": 1}
        assert reasons(report, "batch_norm") == ["bn_fold: the conv before it is also read elsewhere"]
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(), dtype, seed + 1), dtype)


@given(dtype=float_dtypes(), channels=st.integers(1, 16), data=st.data())
def test_bn_without_conv_is_left_alone(dtype, channels, data):
    b = GraphBuilder()
    x = b.input("x", (2, channels, 5, 5), dtype)
    y = add_bn(b, b.relu(x), data.draw(bn_stats(channels)), dtype, "norm")
    graph = b.build(y)
    fused, report = run_rules(graph, "bn_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert reasons(report, "batch_norm") == ["no rule applies (input from relu, used by graph output)"]


@st.composite
def transposed_convs(draw, axes: int = 2) -> dict:
    """An ``nn.ConvTranspose2d``'s geometry (``axes`` 3: an ``nn.ConvTranspose3d``'s): channels 1-12, groups
    dividing both, kernel 1-5, stride 1-3, dilation 1-2, padding up to the dilated kernel, output padding below
    max(stride, dilation), input 1-6 (3-D: kernel 1-3, input 1-4)."""
    g = draw(st.sampled_from([1, 1, 2, 3]))
    cin, cout = (g * draw(st.integers(1, 12 // g)) for _ in range(2))
    kernel, stride, dilation = (tuple(draw(st.integers(1, hi)) for _ in range(axes)) for hi in ((5 if axes == 2 else 3), 3, 2))
    padding = tuple(draw(st.integers(0, d * (k - 1))) for k, d in zip(kernel, dilation))
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    size = []
    for k, s, d, p, o in zip(kernel, stride, dilation, padding, output_padding):
        lo = 1  # the smallest input with a non-empty output: (n - 1) s - 2p + d (k - 1) + o + 1 >= 1
        while (lo - 1) * s - 2 * p + d * (k - 1) + o + 1 < 1:
            lo += 1
        size.append(draw(st.integers(lo, lo + (5 if axes == 2 else 3))))
    return dict(cin=cin, cout=cout, groups=g, kernel=kernel, stride=stride, dilation=dilation, padding=padding,
                output_padding=output_padding, bias=draw(st.booleans()), size=tuple(size))


@given(spec=transposed_convs(), dtype=float_dtypes(), batch=st.integers(1, 3), seed=seeds(), data=st.data())
def test_folds_bn_into_any_transposed_conv(spec, dtype, batch, seed, data):
    """``nn.ConvTranspose2d`` + BN (decoders, GAN generators): the weight is ``(C_in, C_out / g, kh, kw)``, so the
    scale of output channel ``o`` multiplies column ``o mod (C_out / g)`` of the rows of ``o``'s group."""
    cin, cout, g = spec["cin"], spec["cout"], spec["groups"]
    w = torch.randn(cin, cout // g, *spec["kernel"], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    folds_into_one(spec, "conv_transpose2d", (w / (cin // g) ** 0.5).to(dtype), ("stride", "padding", "output_padding", "dilation", "groups"),
                   dtype, batch, seed, data)


@given(spec=transposed_convs(axes=3), dtype=float_dtypes(), batch=st.integers(1, 2), seed=seeds(), data=st.data())
def test_folds_bn_into_any_transposed_conv3d(spec, dtype, batch, seed, data):
    """``nn.ConvTranspose3d`` + ``BatchNorm3d`` (a volume decoder's upsampling, V-Net's up transition): the weight
    is ``(C_in, C_out / g, kd, kh, kw)``, the scale laid out over its first two axes as in 2-D."""
    cin, cout, g = spec["cin"], spec["cout"], spec["groups"]
    w = torch.randn(cin, cout // g, *spec["kernel"], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    folds_into_one(spec, "conv_transpose3d", (w / (cin // g) ** 0.5).to(dtype), ("stride", "padding", "output_padding", "dilation", "groups"),
                   dtype, batch, seed, data)


def folds_into_one(spec: dict, op: str, w: torch.Tensor, attr_names: tuple[str, ...], dtype, batch: int, seed: int, data) -> None:
    """``op`` (weight ``w``, with a bias where ``spec`` says) then a BN: one ``op`` with the same attributes and
    weight shape, and a bias, computing the same."""
    params = {"weight": w}
    if spec["bias"]:
        params["bias"] = torch.randn(spec["cout"], generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64).to(dtype)
    attrs = {k: spec[k] for k in attr_names}
    b = GraphBuilder()
    x = b.input("x", (batch, spec["cin"], *spec["size"]), dtype)
    y = add_bn(b, b.node(op, x, **params, **attrs, source="blk.conv"), data.draw(bn_stats(spec["cout"])), dtype, "blk.bn")
    graph = b.build(y)

    fused, report = run_rules(graph, "bn_fold")

    assert report.rule_counts() == {"bn_fold": 1} and report.after == {op: 1}
    conv = only(fused, op)
    assert conv.attrs == attrs and conv.params["weight"].shape == w.shape and "bias" in conv.params
    assert conv.source == "blk"
    assert_graphs_equal(graph, fused, random_input((batch, spec["cin"], *spec["size"]), dtype, seed + 1), dtype)


@given(dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_refused_when_the_transposed_conv_output_has_another_user(dtype, seed, data):
    b = GraphBuilder()
    x = b.input("x", (1, 4, 3, 3), dtype)
    w = torch.randn(4, 2, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    c = b.conv_transpose2d(x, weight=w, stride=(2, 2), groups=2, source="up")
    graph = b.build(add_bn(b, c, data.draw(bn_stats(4)), dtype, "bn"), c)
    fused, report = run_rules(graph, "bn_fold")
    assert report.fired == [] and reasons(report, "batch_norm") == ["bn_fold: the transposed conv before it is also read elsewhere"]


@given(dtype=float_dtypes(), batch=st.integers(1, 2), seed=seeds(), data=st.data())
def test_folds_a_bn_after_a_channel_concat_of_convs_slice_by_slice(dtype, batch, seed, data):
    """MixConv: each conv reads its own input, the BN normalizes their concat; slice k of the BN folds into conv k.
    Kernels 1, 3, 5 with 'same' padding (transposed convs too), so every output has the input's size."""
    n = data.draw(st.integers(2, 3), label="convs")
    h, w = data.draw(st.integers(1, 6), label="h"), data.draw(st.integers(1, 6), label="w")
    gen = torch.Generator().manual_seed(seed)
    b = GraphBuilder()
    outs, total = [], 0
    for k in range(n):
        g = data.draw(st.sampled_from([1, 2]), label="groups")
        cin, cout = (g * data.draw(st.integers(1, 4)) for _ in range(2))
        ks = data.draw(st.sampled_from([1, 3, 5]), label="kernel")
        transposed = data.draw(st.booleans(), label="transposed")
        shape = (cin, cout // g, ks, ks) if transposed else (cout, cin // g, ks, ks)
        params = {"weight": (torch.randn(*shape, generator=gen, dtype=torch.float64) / ks).to(dtype)}
        if data.draw(st.booleans(), label="bias"):
            params["bias"] = torch.randn(cout, generator=gen, dtype=torch.float64).to(dtype)
        x = b.input(f"x{k}", (batch, cin, h, w), dtype)
        if transposed:
            outs.append(b.conv_transpose2d(x, **params, padding=(ks // 2, ks // 2), groups=g, source=f"mix.convs.{k}"))
        else:
            p = ks // 2
            outs.append(b.conv2d(x, **params, padding=(p, p, p, p), groups=g, source=f"mix.convs.{k}"))
        total += cout
    y = add_bn(b, b.concat(*outs, axis=1, source="mix"), data.draw(bn_stats(total), label="bn"), dtype, "mix.bn")
    graph = b.build(y)

    fused, report = run_rules(graph, "bn_fold")

    assert report.rule_counts() == {"bn_fold": 1} and "batch_norm" not in report.after, report.after
    inputs = [random_input(v.shape, dtype, seed + 1 + k) for k, v in enumerate(graph.inputs)]
    assert_graphs_equal(graph, fused, inputs, dtype)


@given(dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_a_bn_after_a_concat_with_an_operand_that_is_not_a_conv_is_left_alone(dtype, seed, data):
    b = GraphBuilder()
    x = b.input("x", (1, 4, 3, 3), dtype)
    c = b.conv2d(x, weight=torch.randn(4, 4, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype))
    graph = b.build(add_bn(b, b.concat(c, b.relu(x), axis=1), data.draw(bn_stats(8)), dtype, "bn"))
    fused, report = run_rules(graph, "bn_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()


@st.composite
def conv3d_geometries(draw) -> dict:
    """An ``nn.Conv3d``'s geometry (video models): channels 1-8, groups dividing both, kernel 1-3 per axis,
    stride 1-2, dilation 1-2, zero padding up to the dilated kernel, an input the conv covers, 1-5 past it."""
    g = draw(st.sampled_from([1, 1, 2]))
    cin, cout = (g * draw(st.integers(1, 8 // g)) for _ in range(2))
    kernel, stride, dilation = (tuple(draw(st.integers(1, hi)) for _ in range(3)) for hi in (3, 2, 2))
    padding = tuple(draw(st.integers(0, d * (k - 1))) for k, d in zip(kernel, dilation))
    size = tuple(max(1, d * (k - 1) + 1 - 2 * p) + draw(st.integers(0, 4)) for k, d, p in zip(kernel, dilation, padding))
    return dict(cin=cin, cout=cout, groups=g, kernel=kernel, stride=stride, dilation=dilation, padding=padding,
                bias=draw(st.booleans()), size=size)


@given(spec=conv3d_geometries(), dtype=float_dtypes(), batch=st.integers(1, 2), seed=seeds(), data=st.data())
def test_folds_bn_into_any_3d_conv(spec, dtype, batch, seed, data):
    """``nn.Conv3d`` + ``BatchNorm3d`` (video models): the scale of output channel ``o`` multiplies row ``o`` of the
    ``(C_out, C_in / g, kd, kh, kw)`` weight."""
    cin, cout, g = spec["cin"], spec["cout"], spec["groups"]
    w = torch.randn(cout, cin // g, *spec["kernel"], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    folds_into_one(spec, "conv3d", (w / (cin // g) ** 0.5).to(dtype), ("stride", "padding", "dilation", "groups"), dtype, batch, seed, data)


def _sum_of_convs(b, dtype, seed, data, n, h, w, cout, batch=1):
    """``n`` convs (kernels 1, 3, 5 with 'same' padding, some grouped, some with bias), each reading its own input or
    the one before (RepNeXt's conv_7x1(conv_1x7(x))), summed as add/sub in a random nesting."""
    gen = torch.Generator().manual_seed(seed)
    outs = []
    for k in range(n):
        g = data.draw(st.sampled_from([1, 2]), label="groups") if cout % 2 == 0 else 1
        cin = g * data.draw(st.integers(1, 3), label="cin")
        kh, kw = data.draw(st.sampled_from([1, 3, 5]), label="kh"), data.draw(st.sampled_from([1, 3, 5]), label="kw")
        params = {"weight": (torch.randn(cout, cin // g, kh, kw, generator=gen, dtype=torch.float64) / kh).to(dtype)}
        if data.draw(st.booleans(), label="bias"):
            params["bias"] = torch.randn(cout, generator=gen, dtype=torch.float64).to(dtype)
        x = b.input(f"x{k}", (batch, cin, h, w), dtype)
        if data.draw(st.booleans(), label="after a conv"):
            x = b.conv2d(x, weight=torch.randn(cin, 1, 1, 3, generator=gen, dtype=torch.float64).to(dtype), padding=(0, 0, 1, 1),
                         groups=cin, source=f"blk.pre{k}")
        outs.append(b.conv2d(x, **params, padding=(kh // 2, kh // 2, kw // 2, kw // 2), groups=g, source=f"blk.convs.{k}"))
    while len(outs) > 1:
        i = data.draw(st.integers(0, len(outs) - 2), label="pair")
        op = data.draw(st.sampled_from(["add", "sub"]), label="op")
        outs[i:i + 2] = [b.node(op, outs[i], outs[i + 1], source="blk")]
    return outs[0]


@given(dtype=float_dtypes(), batch=st.integers(1, 2), seed=seeds(), data=st.data())
def test_folds_a_bn_after_a_sum_of_convs_of_different_inputs(dtype, batch, seed, data):
    """RepNeXt's norm(conv_a(x) + conv_b(conv_c(x))): every conv folds the scale, the first (added) one the shift."""
    n, cout = data.draw(st.integers(2, 4), label="convs"), data.draw(st.integers(1, 6), label="cout")
    h, w = data.draw(st.integers(1, 6), label="h"), data.draw(st.integers(1, 6), label="w")
    b = GraphBuilder()
    total = _sum_of_convs(b, dtype, seed, data, n, h, w, cout, batch)
    graph = b.build(add_bn(b, total, data.draw(bn_stats(cout), label="bn"), dtype, "blk.norm"))

    fused, report = run_rules(graph, "bn_fold")

    assert report.rule_counts() == {"bn_fold": 1} and "batch_norm" not in report.after, report.after
    assert fused.op_counts() == {k: v for k, v in graph.op_counts().items() if k != "batch_norm"}
    inputs = [random_input(v.shape, dtype, seed + 1 + k) for k, v in enumerate(graph.inputs)]
    assert_graphs_equal(graph, fused, inputs, dtype)


@given(dtype=float_dtypes(), seed=seeds(), data=st.data(), read=st.sampled_from(["conv", "sum"]))
def test_a_bn_after_a_sum_stays_where_a_conv_or_the_sum_is_read_elsewhere(dtype, seed, data, read):
    b = GraphBuilder()
    total = _sum_of_convs(b, dtype, seed, data, 2, 4, 4, 4)
    other = total.producer.inputs[1] if read == "conv" else total
    graph = b.build(add_bn(b, total, data.draw(bn_stats(4)), dtype, "blk.norm"), other)
    fused, report = run_rules(graph, "bn_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert reasons(report, "batch_norm") == ["bn_fold: the sum before it, or a conv in it, is also read elsewhere"]


@given(dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_a_bn_after_a_sum_with_an_operand_that_is_not_a_conv_is_left_alone(dtype, seed, data):
    b = GraphBuilder()
    x = b.input("x", (1, 4, 3, 3), dtype)
    c = b.conv2d(x, weight=torch.randn(4, 4, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype))
    graph = b.build(add_bn(b, b.node("add", c, b.relu(x)), data.draw(bn_stats(4)), dtype, "bn"))
    fused, report = run_rules(graph, "bn_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()


@given(dtype=float_dtypes(), batch=st.integers(1, 2), seed=seeds(), data=st.data())
def test_folds_a_bn_after_a_sum_of_convs_and_a_per_channel_term(dtype, batch, seed, data):
    """A diffusion ResBlock written with a BN, ``BN(conv(x) + time_mlp(t)[:, :, None, None])``: the convs fold the
    BN's scale, the first its shift (negated where the sum subtracts it), and the term of one value per channel
    (per sample, or one for all) is scaled."""
    n, cout = data.draw(st.integers(1, 3), label="convs"), data.draw(st.integers(1, 6), label="cout")
    h, w = data.draw(st.integers(2, 6), label="h"), data.draw(st.integers(1, 6), label="w")  # (a 1 x 1 map: see below)
    b = GraphBuilder()
    convs = _sum_of_convs(b, dtype, seed, data, n, h, w, cout, batch)
    term = b.input("e", (data.draw(st.sampled_from([1, batch]), label="rows"), cout, 1, 1), dtype)
    op = data.draw(st.sampled_from(["broadcast_add", "broadcast_sub"]), label="op")
    first = data.draw(st.booleans(), label="term first")
    total = b.node(op, term, convs) if first else b.node(op, convs, term)
    graph = b.build(add_bn(b, total, data.draw(bn_stats(cout), label="bn"), dtype, "blk.norm"))

    fused, report = run_rules(graph, "bn_fold")

    assert report.rule_counts() == {"bn_fold": 1} and "batch_norm" not in report.after, report.after
    assert fused.op_counts() == {**{k: v for k, v in graph.op_counts().items() if k != "batch_norm"}, "scale": 1}
    inputs = [random_input(v.shape, dtype, seed + 1 + k) for k, v in enumerate(graph.inputs)]
    assert_graphs_equal(graph, fused, inputs, dtype)


@given(dtype=float_dtypes(), seed=seeds(), data=st.data())
def test_a_bn_after_a_sum_of_a_conv_and_a_term_of_another_shape_is_left_alone(dtype, seed, data):
    """A term that varies over the map, or holds one channel for all, or has the sum's own shape (on a 1 x 1 map a
    conv's output would be one, and the scale would stop the convs of the sum from merging first), is no
    per-channel term: left alone."""
    b = GraphBuilder()
    x = b.input("x", (2, 4, 3, 3), dtype)
    c = b.conv2d(x, weight=torch.randn(4, 4, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype))
    shape = data.draw(st.sampled_from([(2, 1, 3, 3), (2, 4, 3, 1), (2, 1, 1, 1), (2, 4, 1, 1)]), label="term")
    if shape == (2, 4, 1, 1):  # the sum's own shape, on a 1 x 1 map
        x = b.input("x1", (2, 4, 1, 1), dtype)
        c = b.conv2d(x, weight=torch.randn(4, 4, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype))
    graph = b.build(add_bn(b, b.node("broadcast_add", c, b.input("e", shape, dtype)), data.draw(bn_stats(4)), dtype, "bn"))
    fused, report = run_rules(graph, "bn_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()


def _conv_then_shuffle(b, dtype, seed, data, batch=1):
    """A conv (or transposed conv) to ``C r²`` channels, then ``pixel_shuffle(r)``: EDSR's upsampler, a conv to
    ``4 n_feats`` channels and ``PixelShuffle(2)``.  Returns the shuffle's output and ``C``."""
    r, c = data.draw(st.integers(1, 3), label="r"), data.draw(st.integers(1, 3), label="C")
    cout, transposed = c * r * r, data.draw(st.booleans(), label="transposed")
    g = data.draw(st.sampled_from([1, 2]), label="groups") if cout % 2 == 0 else 1
    cin, k = g * data.draw(st.integers(1, 2), label="cin"), data.draw(st.sampled_from([1, 2, 3]), label="k")
    gen = torch.Generator().manual_seed(seed)
    shape = (cin, cout // g, k, k) if transposed else (cout, cin // g, k, k)
    params = {"weight": (torch.randn(*shape, generator=gen, dtype=torch.float64) / k).to(dtype)}
    if data.draw(st.booleans(), label="bias"):
        params["bias"] = torch.randn(cout, generator=gen, dtype=torch.float64).to(dtype)
    x = b.input("x", (batch, cin, data.draw(st.integers(k, 5), label="h"), data.draw(st.integers(k, 5), label="w")), dtype)
    if transposed:
        y = b.conv_transpose2d(x, **params, stride=(2, 2), groups=g, source="up.conv")
    else:
        y = b.conv2d(x, **params, padding=(k // 2,) * 4, groups=g, source="up.conv")
    return b.pixel_shuffle(y, factor=r, source="up.shuffle"), c


@given(dtype=float_dtypes(), batch=st.integers(1, 2), seed=seeds(), data=st.data())
def test_folds_a_bn_after_a_pixel_shuffle_of_a_conv(dtype, batch, seed, data):
    """EDSR's upsampler with ``bn=True`` (conv, ``PixelShuffle(r)``, ``BatchNorm2d``) kept its BN ("no rule applies
    (input from pixel_shuffle)"): the shuffle's channel ``c`` is the conv's channels ``[c r², (c + 1) r²)``, so the
    conv folds the BN repeated ``r²`` times and the shuffle follows it."""
    b = GraphBuilder()
    y, c = _conv_then_shuffle(b, dtype, seed, data, batch)
    graph = b.build(add_bn(b, y, data.draw(bn_stats(c), label="bn"), dtype, "up.bn"))

    fused, report = run_rules(graph, "bn_fold")

    assert report.rule_counts() == {"bn_fold": 1}
    assert fused.op_counts() == {k: v for k, v in graph.op_counts().items() if k != "batch_norm"}
    assert_graphs_equal(graph, fused, random_input(graph.inputs[0].shape, dtype, seed + 1), dtype)


@given(dtype=float_dtypes(), seed=seeds(), data=st.data(), read=st.sampled_from(["conv", "shuffle"]))
def test_a_bn_after_a_pixel_shuffle_stays_where_the_conv_or_the_shuffle_is_read_elsewhere(dtype, seed, data, read):
    b = GraphBuilder()
    y, c = _conv_then_shuffle(b, dtype, seed, data)
    other = y.producer.x if read == "conv" else y
    graph = b.build(add_bn(b, y, data.draw(bn_stats(c)), dtype, "up.bn"), other)
    fused, report = run_rules(graph, "bn_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert reasons(report, "batch_norm") == ["bn_fold: the conv before the pixel shuffle, or the shuffle, is also read elsewhere"]


@given(dtype=float_dtypes(), seed=seeds(), data=st.data(), before=st.sampled_from(["input", "relu", "conv3d"]))
def test_a_bn_after_a_pixel_shuffle_of_something_else_is_left_alone(dtype, seed, data, before):
    """A shuffle of an input, or of a relu of a conv: no conv right before it to fold into.  A shuffle of a 3-D
    conv's ``(B, C, D, H, W)`` output shuffles ``D`` (it reads the last three axes as channels, height, width), not
    the conv's channels, which a BatchNorm3d then normalizes: not the pattern either."""
    gen = torch.Generator().manual_seed(seed)
    b = GraphBuilder()
    if before == "conv3d":
        x = b.input("x", (1, 2, 4, 3, 3), dtype)
        y = b.conv3d(x, weight=torch.randn(2, 2, 1, 1, 1, generator=gen, dtype=torch.float64).to(dtype), source="conv")
    else:
        y = b.input("x", (1, 8, 3, 3), dtype)
        if before == "relu":
            y = b.relu(b.conv2d(y, weight=torch.randn(8, 8, 1, 1, generator=gen, dtype=torch.float64).to(dtype), source="conv"))
    graph = b.build(add_bn(b, b.pixel_shuffle(y, factor=2), data.draw(bn_stats(2)), dtype, "bn"))
    fused, report = run_rules(graph, "bn_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()


def _channel_pieces(b, y, channels, data):
    """Pieces of ``y``'s channels that share none, as a model cuts them: ``torch.split`` into sizes, ``chunk``, or
    the even and odd channels (``h[:, 0::2]``, ``h[:, 1::2]``); returns the pieces' values."""
    how = data.draw(st.sampled_from(["split", "chunk", "strided"]), label="pieces")
    if how == "strided":
        return [b.slice(y, axis=1, start=k, end=None, step=2) for k in range(min(2, channels))]
    if how == "chunk":
        k = data.draw(st.integers(1, channels), label="chunks")
        return [b.chunk(y, chunks=k, index=i, axis=1) for i in range(len(torch.arange(channels).chunk(k)))]
    cuts = sorted(data.draw(st.sets(st.integers(1, channels - 1), max_size=3), label="cuts")) if channels > 1 else []
    sizes = tuple(e - s for s, e in zip([0, *cuts], [*cuts, channels]))
    return [b.piece(y, how="split", size=sizes, index=i, axis=1, count=len(sizes)) for i in range(len(sizes))]


@given(dtype=float_dtypes(), batch=st.integers(1, 2), seed=seeds(), data=st.data())
def test_folds_a_bn_on_a_channel_piece_of_a_conv(dtype, batch, seed, data):
    """IBN-Net's ``cat(IN(h[:, :c]), BN(h[:, c:]))`` after one conv kept its BN ("no rule applies (input from
    piece)"): the BN folds into the conv's rows that its piece reads, and the other pieces read the same rows as
    before.  Pieces by split sizes, chunks or strides; a plain or transposed conv; every piece but the BN's is read
    by a ReLU (the instance norm's place), a BN on any one of them."""
    transposed = data.draw(st.booleans(), label="transposed")
    channels, g = data.draw(st.integers(2, 8), label="channels"), 1
    gen = torch.Generator().manual_seed(seed)
    b = GraphBuilder()
    x = b.input("x", (batch, 3, 4, 5), dtype)
    if transposed:
        y = b.conv_transpose2d(x, weight=torch.randn(3, channels, 2, 2, generator=gen, dtype=torch.float64).to(dtype),
                               stride=(2, 2), groups=g, source="conv1")
    else:
        y = b.conv2d(x, weight=torch.randn(channels, 3, 3, 3, generator=gen, dtype=torch.float64).to(dtype),
                     padding=(1, 1, 1, 1), source="conv1")
    pieces = _channel_pieces(b, y, channels, data)
    normed = data.draw(st.integers(0, len(pieces) - 1), label="normed")
    outs = [add_bn(b, p, data.draw(bn_stats(p.shape[1]), label="bn"), dtype, "bn1.BN") if i == normed else b.relu(p)
            for i, p in enumerate(pieces)]
    graph = b.build(b.concat(*outs, axis=1))

    fused, report = run_rules(graph, "bn_fold")

    assert report.rule_counts() == {"bn_fold": 1}
    assert fused.op_counts() == {k: v for k, v in graph.op_counts().items() if k != "batch_norm"}
    assert_graphs_equal(graph, fused, random_input(graph.inputs[0].shape, dtype, seed + 1), dtype)


@given(dtype=float_dtypes(), seed=seeds(), data=st.data(), read=st.sampled_from(["overlap", "whole", "piece", "height"]))
def test_a_bn_on_a_channel_piece_stays_where_its_channels_are_read_elsewhere(dtype, seed, data, read):
    """Rows that fold the BN must be read by the BN's piece alone: a piece sharing channels with it (``h[:, :5]``
    beside ``h[:, 4:]``), the conv also read whole, or the BN's piece read elsewhere keep the BN (the conv would be
    computed twice).  A piece along the height is no channel piece: no rule applies."""
    gen = torch.Generator().manual_seed(seed)
    b = GraphBuilder()
    x = b.input("x", (1, 3, 6, 6), dtype)
    y = b.conv2d(x, weight=torch.randn(8, 3, 1, 1, generator=gen, dtype=torch.float64).to(dtype), source="conv1")
    axis, start = (2, 0) if read == "height" else (1, 4)
    mine = b.slice(y, axis=axis, start=start, end=None, step=1)
    bn = add_bn(b, mine, data.draw(bn_stats(8 if read == "height" else 4)), dtype, "bn")
    other = {"overlap": lambda: b.relu(b.slice(y, axis=1, start=0, end=5, step=1)), "whole": lambda: y,
             "piece": lambda: mine, "height": lambda: b.slice(y, axis=1, start=0, end=4, step=1)}[read]()
    graph = b.build(bn, other)
    fused, report = run_rules(graph, "bn_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    expected = {"overlap": ["bn_fold: another piece of the conv before it reads some of the same channels"],
                "whole": ["bn_fold: the conv before the channel piece is also read whole elsewhere, or the piece is"],
                "piece": ["bn_fold: the conv before the channel piece is also read whole elsewhere, or the piece is"],
                "height": []}[read]
    assert [r for r in reasons(report, "batch_norm") if r.startswith("bn_fold")] == expected
