"""bn_into_linear: a BN before a Linear folds into it, through layout ops that keep the channel axis whole.

    Linear(L(BN(x)); W, b) = Linear(L(x); W[o,c] s[c], b + W t)

(``L`` may start with a mean over axes after the channels: a global average pool.)

Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

import torch
from hypothesis import given
from hypothesis import strategies as st
from rulecheck import linear_params, only, reasons, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.kernels import bn_affine
from repalgebra.testing import add_bn, assert_graphs_equal, bn_stats, float_dtypes, random_input, seeds

# Layout chains from an NCHW BN output to tokens with the channel axis last (FastViT attention),
# and chains that leave the channels elsewhere (the rule must not fire).
CARRYING = {
    "flatten_transpose": lambda b, y: b.transpose(b.flatten(y, start=2), dim0=-2, dim1=-1),
    "permute": lambda b, y: b.permute(y, dims=(0, 2, 3, 1)),
    "permute_flatten": lambda b, y: b.flatten(b.permute(y, dims=(0, 2, 3, 1)), start=1, end=2),
    # A classifier head: channels and space merged, channel c owning features [c H W, (c + 1) H W).
    "flatten_all": lambda b, y: b.flatten(y, start=1),
    # RepLKNet's head: BN, a global average pool (a mean that keeps its dims), flatten.  Or a mean of the rows.
    "pool_flatten": lambda b, y: b.flatten(b.node("mean", y, dims=(2, 3), keepdim=True), start=1),
    "mean_rows_permute": lambda b, y: b.permute(b.node("mean", y, dims=(-2,), keepdim=False), dims=(0, 2, 1)),
    # A torchvision-style head: ``x.view(x.size(0), -1)`` after the pool, the sizes read from the value it reshapes.
    "pool_view_own_size": lambda b, y: _view_own_batch(b, b.node("mean", y, dims=(2, 3), keepdim=True)),
    "view_own_size": lambda b, y: _view_own_batch(b, y),  # the classifier head's flatten, written so
    # EfficientFormerV2's head: the positions flattened first, then their mean.
    "flatten_mean": lambda b, y: b.node("mean", b.flatten(y, start=2), dims=(-1,), keepdim=False),
    # A sequence head's last step: one row, then one column (``y[:, :, -1][:, :, 0]``), the channels left last.
    "select_last_steps": lambda b, y: b.select(b.select(y, axis=2, index=-1), axis=-1, index=0),
}
MIXING = {
    "flatten_only": lambda b, y: b.flatten(y, start=2),  # the Linear reads spatial positions
    "permute_flatten_space_major": lambda b, y: b.flatten(b.permute(y, dims=(0, 2, 3, 1)), start=1),  # channel minor
    # A mean over the channels too: each output mixes every channel's s[c] and t[c].
    "mean_over_channels": lambda b, y: b.permute(b.node("mean", y, dims=(1, 2), keepdim=False), dims=(0, 1)),
    "select_a_channel": lambda b, y: b.select(b.flatten(y, start=2), axis=1, index=0),  # one channel's positions as features
    # Each channel's positions a row of their own (``y.view(-1, H * W)``): the Linear reads positions.
    "view_rows_per_channel": lambda b, y: b.node("reshape", y, shape=(-1, y.shape[2] * y.shape[3])),
    # Channels and positions flattened together, then their mean: every feature mixes every channel.
    "flatten_all_mean": lambda b, y: b.node("mean", b.flatten(y, start=1), dims=(-1,), keepdim=True),
}


def _view_own_batch(b, y):
    """``y.view(y.size(0), -1)``: a reshape whose size is read from its own input."""
    return b.node("reshape_dyn", y, y, shape=(((0, 0),), -1))


@st.composite
def cases(draw, chains):
    c = draw(st.integers(1, 16))
    shape = (draw(st.integers(1, 3)), c, draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    return shape, draw(bn_stats(c)), draw(st.sampled_from(sorted(chains))), draw(st.integers(1, 16)), draw(st.booleans())


@given(case=cases(CARRYING), dtype=float_dtypes(), seed=seeds())
def test_folds_through_layout(case, dtype, seed):
    _check_fold(case, dtype, seed, square=False)


@given(case=cases(CARRYING), dtype=float_dtypes(), seed=seeds())
def test_folds_into_a_square_linear(case, dtype, seed):
    """C -> C (an attention's proj): the one shape where a scale on the wrong axis of W still fits."""
    _check_fold(case, dtype, seed, square=True)


def _check_fold(case, dtype, seed, square):
    shape, stats, chain, c_out, bias = case
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    y = CARRYING[chain](b, add_bn(b, x, stats, dtype, "blk.norm"))
    c_out = y.shape[-1] if square else c_out
    graph = b.build(b.linear(y, **linear_params(y.shape[-1], c_out, bias, seed, dtype), source="blk.qkv"))
    fused, report = run_rules(graph, "bn_into_linear")
    assert report.rule_counts() == {"bn_into_linear": 1}
    assert "batch_norm" not in fused.op_counts() and fused.op_counts()["linear"] == 1
    assert "bias" in only(fused, "linear").params  # t moves into the bias
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed + 1), dtype)


@given(case=cases(MIXING), dtype=float_dtypes(), seed=seeds())
def test_not_fired_when_channels_do_not_arrive_last(case, dtype, seed):
    shape, stats, chain, c_out, bias = case
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    y = MIXING[chain](b, add_bn(b, x, stats, dtype, "norm"))
    graph = b.build(b.linear(y, **linear_params(y.shape[-1], c_out, bias, seed, dtype), source="lin"))
    fused, report = run_rules(graph, "bn_into_linear")
    bn = only(graph, "batch_norm")  # as the rule sees it: the statistics in the graph's dtype, folded in float64
    s, t = bn_affine(bn.replace(params={k: p.to(torch.float64) for k, p in bn.params.items()}))
    if shape[2] * shape[3] == 1 or shape[1] == 1 or (bool((s == s[0]).all()) and bool((t == t[0]).all())):
        # At a 1x1 spatial size the channels arrive last whole, and one channel (or one affine map for every
        # channel) is a scalar affine: folding is right, and fires.
        return
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert reasons(report, "batch_norm") and reasons(report, "batch_norm")[0].startswith("no rule applies")


@given(case=cases(CARRYING), dtype=float_dtypes(), seed=seeds())
def test_not_fired_when_the_bn_output_is_read_elsewhere(case, dtype, seed):
    shape, stats, chain, c_out, bias = case
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    n = add_bn(b, x, stats, dtype, "norm")
    moved = CARRYING[chain](b, n)
    y = b.linear(moved, **linear_params(moved.shape[-1], c_out, bias, seed, dtype), source="lin")
    graph = b.build(y, n)
    fused, report = run_rules(graph, "bn_into_linear")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()


@given(case=cases({**CARRYING, **MIXING}), uniform=st.booleans(), dtype=float_dtypes(), seed=seeds())
def test_a_constant_scale_folds_like_a_bn_without_shift(case, uniform, dtype, seed):
    """A per-channel scale (a layer scale before the tokens' Linear) folds where a BN would, leaving the Linear's bias
    as it was; a scale by one number (StyleGAN2's ``* sqrt(2)`` before the next layer) folds through any layout, the
    channel-mixing ones too, since every element meets the same factor."""
    shape, _, chain, c_out, bias = case
    gen = torch.Generator().manual_seed(seed)
    gamma = torch.full((shape[1],), 2**0.5) if uniform else 0.5 + torch.rand(shape[1], generator=gen)
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    y = {**CARRYING, **MIXING}[chain](b, b.scale(x, scale=gamma.to(dtype), source="blk.gamma"))
    graph = b.build(b.linear(y, **linear_params(y.shape[-1], c_out, bias, seed, dtype), source="blk.fc"))
    fused, report = run_rules(graph, "bn_into_linear")
    if chain in CARRYING or uniform:
        assert report.rule_counts() == {"bn_into_linear": 1} and "scale" not in fused.op_counts()
        assert ("bias" in only(fused, "linear").params) == bias
    elif shape[1] > 1 and shape[2] * shape[3] > 1:  # distinct factors on channels the Linear does not read as features
        assert report.fired == []
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed + 1), dtype)


@given(readers=st.integers(2, 3), last_axis=st.booleans(), is_bn=st.booleans(), bias=st.booleans(), dtype=float_dtypes(), seed=seeds(),
       data=st.data())
def test_a_bn_or_scale_read_by_several_linears_folds_into_each(readers, last_axis, is_bn, bias, dtype, seed, data):
    """LLaMA's RMSNorm weight before ``q_proj``, ``k_proj`` and ``v_proj`` (a scale on the features), or a BN1d on
    ``(N, C)`` before two heads: folded into every Linear at once.  On another axis than the features the Linears
    read (a BN of ``(N, C, L)``, a scale on the tokens), nothing folds."""
    shape = (2, 6) if is_bn and last_axis else (2, 6, 5)
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    if is_bn:
        n = add_bn(b, x, data.draw(bn_stats(6)), dtype, "norm")
    else:
        gamma = 0.5 + torch.rand(shape[-1] if last_axis else shape[1], generator=torch.Generator().manual_seed(seed))
        n = b.scale(x, scale=gamma.to(dtype), axis=-1 if last_axis else 1, source="norm.weight")
    outs = [b.linear(n, **linear_params(shape[-1], 4 + k, bias, seed + k, dtype), source=f"proj.{k}") for k in range(readers)]
    graph = b.build(*outs)
    fused, report = run_rules(graph, "bn_into_linear")
    s, t = bn_affine(n.producer) if is_bn else (n.producer.params["scale"], None)
    one = bool((s == s[0]).all()) and (t is None or bool((t == t[0]).all()))  # one number: every element meets it
    if last_axis or one:
        assert report.rule_counts() == {"bn_into_linear": 1}, report
        assert fused.op_counts() == {"linear": readers} and all(lin.x is x for lin in fused.nodes)
    else:
        assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed + 1), dtype)


@given(sign=st.sampled_from([1.0, -1.0]), per=st.sampled_from(["feature", "one", "token"]), bias=st.booleans(),
       dtype=float_dtypes(), seed=seeds())
def test_a_constant_added_per_feature_folds_into_the_bias(sign, per, bias, dtype, seed):
    """UniRepLKNet's GRN tail ``pwconv2(x + beta)`` (``beta`` (1, 1, 1, C)), or ``beta - x``: ``Linear(x; sign W,
    b + W beta)``.  A constant that changes along the tokens is no bias of the Linear: left alone."""
    shape = (2, 3, 3, 6)
    gen = torch.Generator().manual_seed(seed)
    const_shape = {"feature": (1, 1, 1, 6), "one": (1,), "token": (1, 3, 1, 6)}[per]
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    shifted = b.add_const(b.relu(x), const=torch.randn(const_shape, generator=gen, dtype=torch.float64).to(dtype), sign=sign, source="grn")
    graph = b.build(b.linear(shifted, **linear_params(6, 4, bias, seed, dtype), source="pwconv2"))
    fused, report = run_rules(graph, "bn_into_linear")
    if per == "token":
        assert report.fired == [] and fused.op_counts() == graph.op_counts()
    else:
        assert report.rule_counts() == {"bn_into_linear": 1} and fused.op_counts() == {"relu": 1, "linear": 1}
        assert only(fused, "linear").params["bias"].shape == (4,)
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed + 1), dtype)


@given(dtype=float_dtypes(), seed=seeds())
def test_a_constant_that_broadcasts_the_input_up_stays(dtype, seed):
    """``x (2, 6) + c (1, 1, 6)``: one value per feature, but the sum has a leading axis x lacks; a Linear of x would
    drop it."""
    gen = torch.Generator().manual_seed(seed)
    b = GraphBuilder()
    x = b.input("x", (2, 6), dtype)
    shifted = b.add_const(x, const=torch.randn(1, 1, 6, generator=gen, dtype=torch.float64).to(dtype), sign=1.0)
    graph = b.build(b.linear(shifted, **linear_params(6, 4, True, seed, dtype)))
    fused, report = run_rules(graph, "bn_into_linear")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert_graphs_equal(graph, fused, random_input((2, 6), dtype, seed + 1), dtype)


def _norm(b, x, kind: str, weight: bool, bias: bool, axes: int, seed: int, dtype):
    """A LayerNorm or RMSNorm of ``x`` over its last ``axes`` axes, with a random affine where asked."""
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(x.shape[-axes:])
    gamma = (0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype) if weight else None
    if kind == "rms_norm":
        return b.rms_norm(x, weight=gamma, normalized_shape=shape, eps=1e-6, source="norm")
    beta = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    return b.layer_norm(x, weight=gamma, bias=beta, normalized_shape=shape, eps=1e-5, source="norm")


@given(kind=st.sampled_from(["layer_norm", "rms_norm"]), weight=st.booleans(), bias=st.booleans(), readers=st.integers(1, 3),
       shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), features=st.integers(1, 12),
       dtype=float_dtypes(), seed=seeds())
def test_a_norms_affine_folds_into_the_linears_reading_it(kind, weight, bias, readers, shape, features, dtype, seed):
    """``Linear(gamma n(x) + beta) = Linear(n(x); W gamma, b + W beta)``: a ViT's ``norm1`` before ``qkv``, LLaMA's
    ``nn.RMSNorm`` before ``q_proj``, ``k_proj``, ``v_proj``.  The norm keeps its normalization and loses its affine."""
    shape = (*shape, features)
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    n = _norm(b, x, kind, weight, bias, 1, seed, dtype)
    outs = [b.linear(n, **linear_params(features, 3 + k, k % 2 == 0, seed + k, dtype), source=f"proj.{k}") for k in range(readers)]
    graph = b.build(*outs)
    fused, report = run_rules(graph, "bn_into_linear")
    affine = weight or (bias and kind == "layer_norm")
    assert report.rule_counts() == ({"bn_into_linear": 1} if affine else {}), report
    assert fused.op_counts() == {kind: 1, "linear": readers}
    assert only(fused, kind).params == {} if affine else only(fused, kind).params.keys() == n.producer.params.keys()
    assert all(lin.x is only(fused, kind).out for lin in fused.nodes if lin.op == "linear")
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed + 1), dtype)


@given(kind=st.sampled_from(["layer_norm", "rms_norm"]), case=st.sampled_from(["two_axes", "also_relu", "also_output"]),
       dtype=float_dtypes(), seed=seeds())
def test_a_norms_affine_stays_where_not_every_reader_takes_it(kind, case, dtype, seed):
    """A norm over the last two axes has a ``gamma`` per token and feature, which no Linear's columns hold; a norm also
    read by a ReLU, or also an output of the graph, must keep its affine for that reader."""
    shape = (2, 3, 4)
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    n = _norm(b, x, kind, True, True, 2 if case == "two_axes" else 1, seed, dtype)
    y = b.linear(n, **linear_params(4, 5, True, seed, dtype), source="fc")
    graph = b.build(y, b.relu(n)) if case == "also_relu" else b.build(y, n) if case == "also_output" else b.build(y)
    fused, report = run_rules(graph, "bn_into_linear")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed + 1), dtype)


# Token layouts after a norm of (B, N, C): the features stay last (a ViT head's ``x[:, 0]`` or mean over the tokens,
# Swin's tokens viewed as a (B, H, W, C) map), or they do not (a transpose that puts the tokens last).
TOKEN_CARRYING = {
    "class_token": lambda b, y: b.select(y, axis=1, index=0),
    "mean_of_tokens": lambda b, y: b.node("mean", y, dims=(1,), keepdim=False),
    "as_map": lambda b, y: b.reshape(y, shape=(y.shape[0], 2, y.shape[1] // 2, y.shape[2])),
    "batch_first_swap": lambda b, y: b.transpose(y, dim0=0, dim1=1),
}
TOKEN_MIXING = {
    "tokens_last": lambda b, y: b.transpose(y, dim0=1, dim1=2),
}


@given(kind=st.sampled_from(["layer_norm", "rms_norm"]), chain=st.sampled_from(sorted({**TOKEN_CARRYING, **TOKEN_MIXING})),
       bias=st.booleans(), tokens=st.sampled_from([2, 4, 6]), features=st.integers(2, 8), dtype=float_dtypes(), seed=seeds())
def test_a_norms_affine_folds_through_layout_that_keeps_the_features_last(kind, chain, bias, tokens, features, dtype, seed):
    """A ViT's final norm, then ``x[:, 0]`` (or the tokens' mean), then the head: the norm's affine folds into the head
    through the select, as a BN's does.  A transpose that leaves the tokens last would meet gamma on the wrong axis:
    nothing folds."""
    shape = (2, tokens, features)
    b = GraphBuilder()
    x = b.input("x", shape, dtype)
    y = {**TOKEN_CARRYING, **TOKEN_MIXING}[chain](b, _norm(b, x, kind, True, True, 1, seed, dtype))
    graph = b.build(b.linear(y, **linear_params(y.shape[-1], 3, bias, seed, dtype), source="head"))
    fused, report = run_rules(graph, "bn_into_linear")
    if chain in TOKEN_CARRYING:
        assert report.rule_counts() == {"bn_into_linear": 1} and only(fused, kind).params == {}, report
    else:
        assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed + 1), dtype)


@given(widths=st.lists(st.integers(1, 4), min_size=2, max_size=4), normed=st.data(), axis=st.sampled_from(["features", "batch"]),
       tokens=st.booleans(), bias=st.booleans(), dtype=float_dtypes(), seed=seeds())
def test_a_bn_of_some_features_folds_through_a_concat(widths, normed, axis, tokens, bias, dtype, seed):
    """fastai's tabular model: ``bn_cont`` on the continuous features, concatenated after the embeddings, then the
    first Linear: each operand a BN1d or a scale makes per feature, read by the concat alone, folds into the columns
    it fills.  Joined on the batch axis (rows of one and of the other), the Linear's columns meet every row:
    nothing folds; nor does a BN1d of ``(N, C, L)`` tokens, whose channels are not the features the Linear reads."""
    kinds = [normed.draw(st.sampled_from(["bn", "scale", "plain", "twice"])) for _ in widths]
    gen = torch.Generator().manual_seed(seed)
    b = GraphBuilder()
    joined_on = -1 if axis == "features" else 0
    shapes = [(2, w) if axis == "features" else (1 + k, widths[0]) for k, w in enumerate(widths)]
    shapes = [(s[0], 3, s[1]) for s in shapes] if tokens else shapes
    xs = [b.input(f"x{k}", s, dtype) for k, s in enumerate(shapes)]
    parts, folds, kept = [], 0, 0
    for k, (x, kind) in enumerate(zip(xs, kinds)):
        if kind == "bn":
            parts.append(add_bn(b, x, normed.draw(bn_stats(x.shape[1])), dtype, f"bn{k}"))
            s, t = bn_affine(parts[-1].producer)
            uniform = bool((s == s[0]).all() and (t == t[0]).all())  # one number: every element meets it
        elif kind == "scale":
            parts.append(b.scale(x, scale=(0.5 + torch.rand(x.shape[-1], generator=gen)).to(dtype), axis=-1, source=f"s{k}"))
        else:
            parts.append(x)
        kept += kind == "bn" and tokens and not uniform
        folds += kind == "scale" or (kind == "bn" and (not tokens or uniform))
    if "twice" in kinds:  # an operand that is also an output: read by the concat and by the graph
        shared = xs[kinds.index("twice")]
        extra = add_bn(b, shared, normed.draw(bn_stats(shared.shape[1])), dtype, "shared")
        parts[kinds.index("twice")] = extra
    joined = b.concat(*parts, axis=joined_on)
    features = joined.shape[-1]
    out = b.linear(joined, **linear_params(features, 3, bias, seed, dtype), source="head")
    graph = b.build(out, *([extra] if "twice" in kinds else []))
    fused, report = run_rules(graph, "bn_into_linear")
    if axis == "features" and folds:
        assert report.rule_counts() == {"bn_into_linear": 1}, report
        left = kept + ("twice" in kinds)
        assert fused.op_counts().get("batch_norm", 0) + fused.op_counts().get("scale", 0) == left, fused.op_counts()
    else:
        assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert_graphs_equal(graph, fused, tuple(random_input(s, dtype, seed + 1 + k) for k, s in enumerate(shapes)), dtype)
