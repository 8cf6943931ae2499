"""bias_fold: a constant added per output feature after a conv or a Linear folds into its bias.

    sign * L(P(x; W, b)) + c = L(P(x; sign * W, sign * b + c[o]))

Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

import torch
from hypothesis import given
from hypothesis import strategies as st
from rulecheck import only, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.testing import add_conv, assert_graphs_equal, conv_specs, float_dtypes, random_input, seeds


def _const(shape, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(dtype)


@st.composite
def per_channel_shapes(draw, channels: int, rank: int = 4):
    """How model code writes a per-channel constant for an NCHW value: (1, C, 1, 1), (C, 1, 1), or one number
    as (), (1,) or (1, 1, 1, 1)."""
    return draw(st.sampled_from([(1, channels, 1, 1), (channels, 1, 1), (), (1,), (1,) * rank]))


@given(spec=conv_specs(), dtype=float_dtypes(), sign=st.sampled_from([1.0, -1.0]), batch=st.integers(1, 3), seed=seeds(), data=st.data())
def test_folds_a_per_channel_constant_into_the_conv_bias(spec, dtype, sign, batch, seed, data):
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(batch), dtype)
    shape = data.draw(per_channel_shapes(spec.out_channels))
    y = b.add_const(add_conv(b, x, spec, dtype, seed, "blk.conv"), const=_const(shape, seed + 1, dtype), sign=sign, source="blk.bias")
    graph = b.build(y)

    fused, report = run_rules(graph, "bias_fold")
    assert report.rule_counts() == {"bias_fold": 1}
    assert fused.op_counts() == {"conv2d": 1}
    conv = only(fused, "conv2d")
    assert conv.params["weight"].shape == spec.weight_shape and conv.params["bias"].shape == (spec.out_channels,)
    assert conv.source == "blk"
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(batch), dtype, seed + 2), dtype)


@st.composite
def tokens(draw):
    """(B, H, W, C_in, C_out): tokens (B, H*W, C_in) from an H x W map, C_out output features."""
    return (draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 8)), draw(st.integers(1, 8)))


def _linear(b, x, cin, cout, bias, seed, dtype):
    p = {"weight": _const((cout, cin), seed, dtype) / cin**0.5}
    if bias:
        p["bias"] = _const((cout,), seed + 1, dtype)
    return b.linear(x, **p, source="blk.fc")


@given(t=tokens(), dtype=float_dtypes(), sign=st.sampled_from([1.0, -1.0]), bias=st.booleans(),
       layout=st.sampled_from(["tokens", "back_to_nchw"]), seed=seeds())
def test_folds_after_a_linear_through_layout_ops(t, dtype, sign, bias, layout, seed):
    """ResMLP's ``Affine`` shift on tokens, or a bias added after the projection is reshaped back to NCHW."""
    bsz, h, w, cin, cout = t
    b = GraphBuilder()
    x = b.input("x", (bsz, h * w, cin), dtype)
    y = _linear(b, x, cin, cout, bias, seed, dtype)
    if layout == "back_to_nchw":
        y = b.reshape(b.transpose(y, dim0=-2, dim1=-1), shape=(bsz, cout, h, w))
        c = _const((1, cout, 1, 1), seed + 2, dtype)
    else:
        c = _const((cout,), seed + 2, dtype)
    graph = b.build(b.add_const(y, const=c, sign=sign, source="blk.shift"))

    fused, report = run_rules(graph, "bias_fold")
    assert report.rule_counts() == {"bias_fold": 1}
    assert "add_const" not in fused.op_counts() and "bias" in only(fused, "linear").params
    assert_graphs_equal(graph, fused, random_input((bsz, h * w, cin), dtype, seed + 3), dtype)


@given(spec=conv_specs(), dtype=float_dtypes(), seed=seeds(), case=st.sampled_from(["spatial", "height", "no_producer", "read_twice"]))
def test_not_fired_unless_the_constant_is_per_feature_and_the_conv_read_once(spec, dtype, seed, case):
    """A positional embedding (one value per position), a constant along the height, an add on the input,
    and a conv whose output is also read elsewhere (folding would change that reader) all stay."""
    b = GraphBuilder()
    x = b.input("x", spec.input_shape(), dtype)
    conv = add_conv(b, x, spec, dtype, seed)
    oh, ow = spec.out_size
    shape = {"spatial": (1, spec.out_channels, oh, ow), "height": (1, 1, oh, 1)}.get(case, (1, spec.out_channels, 1, 1))
    src = x if case == "no_producer" else conv
    if case == "no_producer":
        shape = (1, spec.in_channels, 1, 1)
    y = b.add_const(src, const=_const(shape, seed + 1, dtype), source="pos")
    graph = b.build(b.add(y, conv) if case == "read_twice" else y)
    if (case == "spatial" and oh * ow == 1) or (case == "height" and oh == 1):
        return  # the constant *is* one number per channel (or one in all), and folding it is right
    fused, report = run_rules(graph, "bias_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert_graphs_equal(graph, fused, random_input(spec.input_shape(), dtype, seed + 2), dtype)


@given(t=tokens(), dtype=float_dtypes(), seed=seeds())
def test_not_fired_when_the_reshape_mixes_features(t, dtype, seed):
    """reshape (B, N, C) -> (B, C, N) without a transpose splits each token's features over channels."""
    bsz, h, w, cin, cout = t
    b = GraphBuilder()
    x = b.input("x", (bsz, h * w, cin), dtype)
    y = b.reshape(_linear(b, x, cin, cout, True, seed, dtype), shape=(bsz, cout, h * w))
    graph = b.build(b.add_const(y, const=_const((1, cout, 1), seed + 2, dtype), source="shift"))
    if cout == 1 or h * w == 1:
        return  # the reshape keeps whole features: folding is right, and fires
    fused, report = run_rules(graph, "bias_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
