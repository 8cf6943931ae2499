"""linear_affine_fold: a BN or layer scale after a Linear folds into it, through layout ops.

    A(L(Linear(x; W, b))) = L(Linear(x; s[o] W[o,:], s b + t))

and after a sum of Linears of their own inputs, every Linear folds the scale and the first one the shift.

Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from rulecheck import linear_params, only, reasons, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.testing import BNStats, add_bn, assert_graphs_equal, bn_stats, float_dtypes, random_input, seeds


def _affine(b, y, affine, channels, dtype, seed, data, prefix):
    """A layer scale (``affine == "scale"``) or a BN on ``y``'s channels."""
    if affine == "scale":
        gamma = torch.randn(channels, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype)
        return b.scale(y, scale=gamma, source=f"{prefix}.layer_scale")
    return add_bn(b, y, data.draw(bn_stats(channels)), dtype, f"{prefix}.bn")


@st.composite
def tokens(draw):
    """(B, H, W, C_in, C_out): tokens (B, H*W, C_in) from an H x W map, C_out output features."""
    return (draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 16)), draw(st.integers(1, 16)))


@given(t=tokens(), dtype=float_dtypes(), affine=st.sampled_from(["scale", "bn"]), bias=st.booleans(), seed=seeds(), data=st.data())
def test_folds_after_projection_back_to_nchw(t, dtype, affine, bias, seed, data):
    """FastViT: proj(tokens) -> transpose -> reshape to (B, C, H, W) -> layer scale (or a BN)."""
    bsz, h, w, cin, cout = t
    b = GraphBuilder()
    x = b.input("x", (bsz, h * w, cin), dtype)
    y = b.linear(x, **linear_params(cin, cout, bias, seed, dtype), source="blk.proj")
    y = b.reshape(b.transpose(y, dim0=-2, dim1=-1), shape=(bsz, cout, h, w))
    graph = b.build(_affine(b, y, affine, cout, dtype, seed, data, "blk"))
    fused, report = run_rules(graph, "linear_affine_fold")
    assert report.rule_counts() == {"linear_affine_fold": 1}
    assert set(fused.op_counts()) == {"linear", "transpose", "reshape"}
    assert ("bias" in only(fused, "linear").params) == (bias or affine == "bn")
    assert_graphs_equal(graph, fused, random_input((bsz, h * w, cin), dtype, seed + 2), dtype)


@given(t=tokens(), dtype=float_dtypes(), bias=st.booleans(), seed=seeds(), data=st.data())
def test_folds_levit_bn1d_across_flatten(t, dtype, bias, seed, data):
    bsz, h, w, cin, cout = t
    b = GraphBuilder()
    x = b.input("x", (bsz, h * w, cin), dtype)
    y = b.linear(x, **linear_params(cin, cout, bias, seed, dtype), source="lin")
    y = b.reshape(add_bn(b, b.flatten(y, start=0, end=1), data.draw(bn_stats(cout)), dtype, "bn"), shape=(bsz, h * w, cout))
    graph = b.build(y)
    fused, report = run_rules(graph, "linear_affine_fold")
    assert report.rule_counts() == {"linear_affine_fold": 1} and "batch_norm" not in fused.op_counts()
    assert_graphs_equal(graph, fused, random_input((bsz, h * w, cin), dtype, seed + 2), dtype)


@given(t=tokens(), dtype=float_dtypes(), seed=seeds())
def test_not_fired_when_the_reshape_mixes_features(t, dtype, seed):
    """reshape (B, N, C) -> (B, C, N) without a transpose splits the feature axis: no fold."""
    bsz, h, w, cin, cout = t
    b = GraphBuilder()
    x = b.input("x", (bsz, h * w, cin), dtype)
    y = b.reshape(b.linear(x, **linear_params(cin, cout, True, seed, dtype), source="lin"), shape=(bsz, cout, h * w))
    gamma = torch.randn(cout, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    graph = b.build(b.scale(y, scale=gamma, source="ls"))
    fused, report = run_rules(graph, "linear_affine_fold")
    if cout == 1 or h * w == 1:
        return  # the reshape is a no-op or keeps whole features: folding is right, and fires
    assert report.fired == [] and fused.op_counts() == graph.op_counts()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", ["scale", "bn"])
def test_not_fired_on_another_axis_of_the_same_size(dtype, affine):
    """4 tokens of 4 features, ``reshape(B, C, N)`` without a transpose (here the same shape), then an affine map on
    axis 1: it acts on the tokens, not on the Linear's features, so nothing folds, although every size fits."""
    b = GraphBuilder()
    x = b.input("x", (2, 4, 4), dtype)
    y = b.reshape(b.linear(x, **linear_params(4, 4, True, 0, dtype), source="lin"), shape=(2, 4, 4))
    if affine == "scale":
        graph = b.build(b.scale(y, scale=torch.tensor([0.5, 2.0, -1.0, 3.0], dtype=dtype), axis=1, source="ls"))
    else:
        f64 = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        stats = BNStats(f64(0.1, -0.2, 0.3, 0.0), f64(0.5, 1.0, 2.0, 1.5), f64(1.5, 0.5, -1.0, 2.0), f64(0.2, 0.0, -0.3, 0.1), 1e-5)
        graph = b.build(add_bn(b, y, stats, dtype, "bn"))
    fused, report = run_rules(graph, "linear_affine_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()


@given(t=tokens(), dtype=float_dtypes(), seed=seeds())
def test_not_fired_when_the_projection_is_read_elsewhere(t, dtype, seed):
    bsz, h, w, cin, cout = t
    b = GraphBuilder()
    x = b.input("x", (bsz, h * w, cin), dtype)
    y = b.linear(x, **linear_params(cin, cout, True, seed, dtype), source="lin")
    gamma = torch.randn(cout, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    graph = b.build(b.scale(y, scale=gamma, axis=-1, source="ls"), y)
    fused, report = run_rules(graph, "linear_affine_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()


@given(t=tokens(), dtype=float_dtypes(), affine=st.sampled_from(["scale", "bn"]), bias=st.booleans(), seed=seeds(), data=st.data())
def test_folds_a_generator_input_layer_through_the_reshape_to_a_map(t, dtype, affine, bias, seed, data):
    """DCGAN: Linear(z) -> view(-1, C, H, W) -> BN2d (or a layer scale): channel c is the rows [c H W, (c+1) H W)."""
    bsz, h, w, cin, c = t
    b = GraphBuilder()
    x = b.input("z", (bsz, cin), dtype)
    y = b.reshape(b.linear(x, **linear_params(cin, c * h * w, bias, seed, dtype), source="gen.fc"), shape=(-1, c, h, w))
    graph = b.build(_affine(b, y, affine, c, dtype, seed, data, "gen"))
    fused, report = run_rules(graph, "linear_affine_fold")
    assert report.rule_counts() == {"linear_affine_fold": 1}
    assert set(fused.op_counts()) == {"linear", "reshape"}
    assert_graphs_equal(graph, fused, random_input((bsz, cin), dtype, seed + 2), dtype)


# Where a sum of Linears meets the affine: (features, then the layout L and the affine A on its axis).  A BatchNorm1d
# reads (N, C) or (N, C, L) with the channels on axis 1, so (N, L, C) tokens reach it transposed or flattened.
_SUM_LAYOUTS = {
    "(N, C), BN1d": ("bn", 1),
    "(N, C), layer scale": ("scale", -1),
    "(N, L, C), layer scale": ("scale", -1),
    "(N, L, C) -> transpose(1, 2) -> BN1d": ("bn", 1),
    "(N, L, C) -> flatten(0, 1) -> BN1d": ("bn", 1),
    "(N, C H W) -> view(N, C, H, W) -> BN2d": ("bn", 1),  # a generator's input layer: channel c is rows [c H W, (c+1) H W)
}


def _sum_of_linears(b, dtype, seed, data, n, shape, cout):
    """``n`` Linears to ``cout`` features, each reading its own input of ``shape[:-1]`` rows, some with a bias, summed
    as add/sub in a random nesting (PyG's SAGEConv ``lin_l(aggr) + lin_r(x)``, DLRM's ``fc1(a) + fc2(b)``)."""
    outs = []
    for k in range(n):
        cin = data.draw(st.integers(1, 5), label="cin")
        x = b.input(f"x{k}", (*shape, cin), dtype)
        bias = data.draw(st.booleans(), label="bias")
        outs.append(b.linear(x, **linear_params(cin, cout, bias, seed + k, dtype), source=f"conv.lins.{k}"))
    while len(outs) > 1:
        i = data.draw(st.integers(0, len(outs) - 2), label="pair")
        op = data.draw(st.sampled_from(["add", "sub"]), label="op")
        outs[i:i + 2] = [b.node(op, outs[i], outs[i + 1], source="conv")]
    return outs[0]


def _affine_after(b, total, layout, dtype, seed, data):
    """``layout``'s L and A after the sum ``total`` (the flatten is reshaped back, as LeViT does)."""
    affine, axis = _SUM_LAYOUTS[layout]
    shape, cout = total.shape, total.shape[-1]
    if "transpose" in layout:
        total = b.transpose(total, dim0=1, dim1=2)
    elif "flatten" in layout:
        total = b.flatten(total, start=0, end=1)
    elif "view" in layout:
        h, w = data.draw(st.sampled_from([(1, 2), (2, 1), (2, 2)]), label="H, W")
        total = b.reshape(total, shape=(-1, cout // (h * w), h, w))
        cout //= h * w
    if affine == "scale":
        gamma = torch.randn(cout, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype)
        y = b.scale(total, scale=gamma, axis=axis, source="ls")
    else:
        y = add_bn(b, total, data.draw(bn_stats(cout), label="bn"), dtype, "bn")
    return b.reshape(y, shape=tuple(shape)) if "flatten" in layout else y


@given(dtype=float_dtypes(), layout=st.sampled_from(list(_SUM_LAYOUTS)), seed=seeds(), data=st.data())
def test_folds_an_affine_after_a_sum_of_linears(dtype, layout, seed, data):
    """PyG's SAGEConv then a BatchNorm1d, ``bn(lin_l(aggr) + lin_r(x))``, kept its BN ("no rule applies (input from
    add)"; a probe): every Linear folds the scale, the first (added) one the shift, on every layout A can read the
    features in."""
    n, cout = data.draw(st.integers(2, 4), label="linears"), data.draw(st.integers(1, 6), label="cout")
    if "view" in layout:
        cout *= 4  # C H W features for any H W of 4 or 2
    rows = (data.draw(st.integers(1, 3), label="N"),)
    if "(N, L, C)" in layout:
        rows += (data.draw(st.integers(1, 4), label="L"),)
    b = GraphBuilder()
    total = _sum_of_linears(b, dtype, seed, data, n, rows, cout)
    graph = b.build(_affine_after(b, total, layout, dtype, seed, data))

    fused, report = run_rules(graph, "linear_affine_fold")

    affine = _SUM_LAYOUTS[layout][0].replace("bn", "batch_norm")
    assert report.rule_counts() == {"linear_affine_fold": 1} and affine not in report.after, report.after
    assert fused.op_counts() == {k: v for k, v in graph.op_counts().items() if k != affine}
    inputs = [random_input(v.shape, dtype, seed + 1 + k) for k, v in enumerate(graph.inputs)]
    assert_graphs_equal(graph, fused, inputs, dtype)


@given(dtype=float_dtypes(), seed=seeds(), data=st.data(), read=st.sampled_from(["linear", "sum"]))
def test_an_affine_after_a_sum_stays_where_a_linear_or_the_sum_is_read_elsewhere(dtype, seed, data, read):
    """A Linear (or an inner sum) read elsewhere too would be computed twice, folded and not: the BN stays."""
    b = GraphBuilder()
    total = _sum_of_linears(b, dtype, seed, data, 3, (2,), 4)
    inner = next(v for v in total.producer.inputs if v.producer.op in ("add", "sub"))
    other = inner.producer.inputs[1] if read == "linear" else inner
    graph = b.build(add_bn(b, total, data.draw(bn_stats(4)), dtype, "bn"), other)
    fused, report = run_rules(graph, "linear_affine_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert reasons(report, "batch_norm") == ["linear_affine_fold: the sum before it, or a Linear in it, is also read elsewhere (or twice)"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("term", ["input", "relu", "broadcast", "one output twice"])
def test_an_affine_after_a_sum_with_a_term_that_is_not_a_linear_is_left_alone(dtype, term):
    """``bn(lin(x) + x)`` (a residual), ``bn(lin(x) + relu(y))``, ``bn(lin(x) + bias_row)`` broadcast over the batch,
    and ``bn(y + y)`` with ``y = lin(x)`` (one Linear's output twice): no Linear of the sum's own to fold into, or one
    read twice, so the BN stays."""
    b = GraphBuilder()
    x = b.input("x", (3, 4), dtype)
    y = b.linear(x, **linear_params(4, 4, True, 0, dtype), source="lin")
    if term == "input":
        total = b.node("add", y, x)
    elif term == "relu":
        total = b.node("add", y, b.relu(b.input("u", (3, 4), dtype)))
    elif term == "broadcast":
        total = b.node("broadcast_add", y, b.input("row", (1, 4), dtype))
    else:
        total = b.node("add", y, y)
    f64 = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    stats = BNStats(f64(0.1, -0.2, 0.3, 0.0), f64(0.5, 1.0, 2.0, 1.5), f64(1.5, 0.5, -1.0, 2.0), f64(0.2, 0.0, -0.3, 0.1), 1e-5)
    graph = b.build(add_bn(b, total, stats, dtype, "bn"))
    fused, report = run_rules(graph, "linear_affine_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
