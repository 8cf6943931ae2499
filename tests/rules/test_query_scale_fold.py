"""query_scale_fold: a scale on the q part of a qkv Linear's output folds into the q rows.

    scale(P(Linear(x; W, b)); s) = P(Linear(x; f[o] W[o,:], f b)),  f = 1 on the k and v rows

Tolerances: :func:`repalgebra.testing.assert_graphs_equal`.
"""

import torch
from hypothesis import given
from hypothesis import strategies as st
from rulecheck import only, reasons, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.testing import assert_graphs_equal, float_dtypes, random_input, seeds


@st.composite
def heads(draw):
    """(B, N, heads, head_dim, C_in): N tokens of C_in features, a qkv Linear to 3 * heads * head_dim."""
    return draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 6))


def _qkv(shape, bias, seed, dtype):
    bsz, n, h, d, cin = shape
    gen = torch.Generator().manual_seed(seed)
    p = {"weight": (torch.randn(3 * h * d, cin, generator=gen, dtype=torch.float64) / cin**0.5).to(dtype)}
    if bias:
        p["bias"] = torch.randn(3 * h * d, generator=gen, dtype=torch.float64).to(dtype)
    return p


def _qkv_parts(b, shape, dtype, seed, bias):
    """FastViT's split, on builder ``b``: ``qkv(x).reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4)`` and its three
    parts; returns the Linear's output and q, k, v."""
    bsz, n, h, d, cin = shape
    x = b.input("x", (bsz, n, cin), dtype)
    y = b.linear(x, **_qkv(shape, bias, seed, dtype), source="attn.qkv")
    parts = b.permute(b.reshape(y, shape=(bsz, n, 3, h, d), source="attn"), dims=(2, 0, 3, 1, 4), source="attn")
    return (y, *(b.select(parts, axis=0, index=i, source="attn") for i in range(3)))


def attention_graph(shape, dtype, seed, *, bias=True, factors=None, which=0, scale_k_too=False, read_qkv=False, axis=1):
    """FastViT's attention up to its scores: qkv -> reshape(B, N, 3, h, d) -> permute(2, 0, 3, 1, 4) -> q * s, k, v.

    ``factors``: the scale's vector along ``axis`` of q (default: head_dim ** -0.5 for every head);
    ``which``: the part (0 q, 1 k, 2 v) the scale multiplies; ``scale_k_too``: k reads the scaled part as well;
    ``read_qkv``: the Linear's output is a graph output too.
    """
    bsz, n, h, d, cin = shape
    b = GraphBuilder()
    y, q, k, v = _qkv_parts(b, shape, dtype, seed, bias)
    if factors is None:
        factors = torch.full((h,), d**-0.5, dtype=torch.float64).to(dtype)
    picked = (q, k, v)[which]
    scaled = b.scale(picked, scale=factors, axis=axis, source="attn")
    q, k, v = [scaled if i == which else p for i, p in enumerate((q, k, v))]
    if scale_k_too:
        k = picked
    # The graph ends at q, k, v: softmax((q * s) k^T) v reads them as they are, and the error bounds
    # of assert_graphs_equal cover linear and layout ops only.
    return b.build(q, k, v, y) if read_qkv else b.build(q, k, v)


@given(shape=heads(), dtype=float_dtypes(), bias=st.booleans(), seed=seeds())
def test_folds_the_query_scale_into_the_q_rows(shape, dtype, bias, seed):
    graph = attention_graph(shape, dtype, seed, bias=bias)
    fused, report = run_rules(graph, "query_scale_fold")
    assert report.rule_counts() == {"query_scale_fold": 1} and "scale" not in fused.op_counts()
    bsz, n, h, d, cin = shape
    w0, w1 = only(graph, "linear").params["weight"].double(), only(fused, "linear").params["weight"].double()
    q_rows = torch.zeros(3 * h * d, dtype=torch.bool)
    q_rows[: h * d] = True  # reshape (3, h, d) of the features: part 0 is the first h * d rows
    assert torch.equal(w1[~q_rows], w0[~q_rows]), "the k and v rows must stay as they are"
    factor = torch.tensor(d**-0.5, dtype=dtype).double()
    torch.testing.assert_close(w1[q_rows], (w0[q_rows] * factor).to(dtype).double())  # the q rows: f[o] W[o, :]
    assert ("bias" in only(fused, "linear").params) == bias
    assert_graphs_equal(graph, fused, random_input((bsz, n, cin), dtype, seed + 1), dtype)


@given(shape=heads(), dtype=float_dtypes(), which=st.sampled_from([1, 2]), seed=seeds())
def test_folds_a_per_head_scale_on_any_part(shape, dtype, which, seed):
    """A different factor per head, on k or v: each head's rows get their own factor."""
    h = shape[2]
    factors = (torch.rand(h, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5).to(dtype)
    graph = attention_graph(shape, dtype, seed, factors=factors, which=which)
    fused, report = run_rules(graph, "query_scale_fold")
    assert report.rule_counts() == {"query_scale_fold": 1} and "scale" not in fused.op_counts()
    assert_graphs_equal(graph, fused, random_input(shape[:2] + shape[-1:], dtype, seed + 1), dtype)


@given(shape=heads(), dtype=float_dtypes(), seed=seeds())
def test_refused_when_the_scaled_rows_are_read_unscaled(shape, dtype, seed):
    """k reads the very part the scale multiplies (self-attention with q = k): folding would scale k too."""
    graph = attention_graph(shape, dtype, seed, scale_k_too=True)
    fused, report = run_rules(graph, "query_scale_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert any("also read" in r for r in reasons(report, "scale"))


@given(shape=heads(), dtype=float_dtypes(), seed=seeds())
def test_refused_when_the_linear_output_is_read_elsewhere(shape, dtype, seed):
    graph = attention_graph(shape, dtype, seed, read_qkv=True)
    fused, report = run_rules(graph, "query_scale_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()


@given(shape=heads(), dtype=float_dtypes(), seed=seeds())
def test_refused_when_one_feature_meets_different_factors(shape, dtype, seed):
    """A scale along the token axis: feature o of token 0 and of token 1 would need different rows."""
    bsz, n, h, d, cin = shape
    factors = torch.arange(1, n + 1, dtype=torch.float64).to(dtype)
    graph = attention_graph(shape, dtype, seed, factors=factors, axis=2)
    fused, report = run_rules(graph, "query_scale_fold")
    if n == 1:  # one token: one factor per feature after all, and the fold is right
        assert report.rule_counts() == {"query_scale_fold": 1}
        assert_graphs_equal(graph, fused, random_input((bsz, n, cin), dtype, seed + 1), dtype)
        return
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert any("different factors" in r for r in reasons(report, "scale"))


@given(shape=heads(), k=st.sampled_from([1, 3]), dtype=float_dtypes(), bias=st.booleans(), seed=seeds())
def test_folds_a_scale_on_the_heads_of_a_conv_into_its_output_channels(shape, k, dtype, bias, seed):
    """MobileNetV4's multi-query attention: ``q = conv(x)`` (a 1x1 conv; any kernel works the same), reshaped to
    ``(B, heads, d, H W)`` and transposed to tokens, then ``q * s[head]``: the conv's output channels are its
    features, so the factor goes into the rows of its weight (``W[o]``, every ``(c, u, v)``) and its bias."""
    bsz, hw, h, d, cin = shape
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(h * d, cin, k, k, generator=gen, dtype=torch.float64) / (cin * k * k) ** 0.5).to(dtype)
    conv_bias = torch.randn(h * d, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    factors = (torch.rand(h, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    b = GraphBuilder()
    x = b.input("x", (bsz, cin, 2, hw), dtype)
    q = b.conv2d(x, weight=weight, bias=conv_bias, padding=(k // 2,) * 4, source="attn.query")
    heads_first = b.transpose(b.reshape(q, shape=(bsz, h, d, 2 * hw), source="attn"), dim0=2, dim1=3, source="attn")
    graph = b.build(b.scale(heads_first, scale=factors, axis=1, source="attn"))
    fused, report = run_rules(graph, "query_scale_fold")
    assert report.rule_counts() == {"query_scale_fold": 1} and "scale" not in fused.op_counts()
    w1 = only(fused, "conv2d").params["weight"].double()
    per_row = factors.double().repeat_interleave(d)
    torch.testing.assert_close(w1, (weight.double() * per_row[:, None, None, None]).to(dtype).double())
    assert_graphs_equal(graph, fused, random_input((bsz, cin, 2, hw), dtype, seed + 1), dtype)


def scores_graph(shape, dtype, seed, *, factors=None, onto="q", mask=False, read_again=()):
    """BERT's scores: q, k, v picked from one qkv Linear, ``matmul(q, k^T) * c`` (``/ sqrt(d)``), then ``+ mask``.

    ``factors``: the scale's vector along the key axis (default: one number, head_dim ** -0.5); ``onto="k"``: q is
    a graph input, so only k is a view of a Linear; ``read_again``: the parts ("q", "k") a second product reads too.
    """
    bsz, n, h, d, cin = shape
    b = GraphBuilder()
    _, q, k, v = _qkv_parts(b, shape, dtype, seed, True)
    if onto == "k":
        q = b.input("q", (bsz, h, n, d), dtype)
    scores = b.matmul(q, b.transpose(k, dim0=-2, dim1=-1, source="attn"), source="attn")
    if factors is None:
        factors = torch.full((n,), d**-0.5, dtype=torch.float64).to(dtype)
    out = b.scale(scores, scale=factors, axis=3, source="attn")
    if mask:
        out = b.broadcast_add(out, b.input("mask", (bsz, 1, 1, n), dtype), source="attn")
    extra = tuple(b.matmul({"q": q, "k": k}[p], b.transpose(v, dim0=-2, dim1=-1, source="attn"), source="attn") for p in read_again)
    return b.build(out, v, *extra)


def _scores_inputs(graph, dtype, seed):
    return [random_input(tuple(v.shape), dtype, seed + k) for k, v in enumerate(graph.inputs)]


@given(shape=heads(), dtype=float_dtypes(), onto=st.sampled_from(["q", "k"]), mask=st.booleans(), seed=seeds())
def test_folds_a_number_on_the_scores_into_the_rows_of_q_or_k(shape, dtype, onto, mask, seed):
    """``matmul(q, k^T) / sqrt(d) + mask``: the number passes through the product, ``c (q k^T) = (c q) k^T``, into
    the q rows of the qkv Linear (the k rows when q comes from elsewhere); the v rows stay."""
    bsz, n, h, d, cin = shape
    graph = scores_graph(shape, dtype, seed, onto=onto, mask=mask)
    fused, report = run_rules(graph, "query_scale_fold")
    assert report.rule_counts() == {"query_scale_fold": 1} and "scale" not in fused.op_counts()
    w0, w1 = only(graph, "linear").params["weight"].double(), only(fused, "linear").params["weight"].double()
    part = {"q": 0, "k": 1}[onto]
    rows = torch.zeros(3 * h * d, dtype=torch.bool)
    rows[part * h * d : (part + 1) * h * d] = True
    assert torch.equal(w1[~rows], w0[~rows]), "the rows of the other parts must stay as they are"
    factor = torch.tensor(d**-0.5, dtype=dtype).double()
    torch.testing.assert_close(w1[rows], (w0[rows] * factor).to(dtype).double())
    assert_graphs_equal(graph, fused, _scores_inputs(graph, dtype, seed), dtype)


@given(shape=heads(), dtype=float_dtypes(), seed=seeds())
def test_a_scale_per_key_on_the_scores_stays(shape, dtype, seed):
    """A factor per key column is not one number: it cannot pass to q (each q feature meets every column)."""
    n = shape[1]
    factors = torch.arange(1, n + 1, dtype=torch.float64).to(dtype)
    graph = scores_graph(shape, dtype, seed, factors=factors)
    fused, report = run_rules(graph, "query_scale_fold")
    if n == 1:  # one key: one number after all
        assert report.rule_counts() == {"query_scale_fold": 1}
        assert_graphs_equal(graph, fused, _scores_inputs(graph, dtype, seed), dtype)
        return
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert any("more than one factor" in r for r in reasons(report, "scale"))


@given(shape=heads(), dtype=float_dtypes(), seed=seeds())
def test_a_number_on_the_scores_moves_onto_k_when_q_is_read_again(shape, dtype, seed):
    """q also multiplies something else, so its rows cannot take the number: k's can, ``q (c k)^T``; with k read
    again too, neither can, and the scale stays."""
    bsz, n, h, d, cin = shape
    graph = scores_graph(shape, dtype, seed, read_again=("q",))
    fused, report = run_rules(graph, "query_scale_fold")
    assert report.rule_counts() == {"query_scale_fold": 1} and "scale" not in fused.op_counts()
    w0, w1 = only(graph, "linear").params["weight"].double(), only(fused, "linear").params["weight"].double()
    assert torch.equal(w1[: h * d], w0[: h * d]), "the q rows must stay as they are"
    assert_graphs_equal(graph, fused, _scores_inputs(graph, dtype, seed), dtype)
    graph = scores_graph(shape, dtype, seed, read_again=("q", "k"))
    fused, report = run_rules(graph, "query_scale_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    # k itself is read again, k^T (the product's operand) only by the product: the features are what is shared
    assert any("read elsewhere" in r or "read unscaled elsewhere" in r for r in reasons(report, "scale"))


def test_a_number_above_one_on_half_precision_scores_stays():
    """A CLIP-style logit scale of 100 on float16 scores: ``100 q`` overflows where ``100 (q k^T)`` does not (q up
    to 880, keys near 1e-3), and the fused model returned inf; fuse's check, in float64, could not see it."""
    for dtype, factor, fires in ((torch.float16, 100.0, False), (torch.bfloat16, 2.0, False), (torch.float16, 0.5, True),
                                 (torch.float32, 100.0, True)):
        graph = scores_graph((1, 3, 1, 2, 2), dtype, 0, factors=torch.full((3,), factor, dtype=dtype))
        fused, report = run_rules(graph, "query_scale_fold")
        assert bool(report.fired) == fires, (dtype, factor)
        if not fires:
            assert any("overflow half precision" in r for r in reasons(report, "scale"))


def test_a_number_on_the_product_of_a_value_with_itself_stays():
    """``matmul(g, g)`` of one view of a Linear: the number would meet both factors, squared, if moved onto g."""
    b = GraphBuilder()
    x = b.input("x", (2, 3, 4), torch.float64)
    g = b.reshape(b.linear(x, weight=torch.randn(16, 4, dtype=torch.float64), source="proj"), shape=(2, 3, 4, 4))
    graph = b.build(b.scale(b.matmul(g, g), scale=torch.full((4,), 0.5, dtype=torch.float64), axis=3))
    fused, report = run_rules(graph, "query_scale_fold")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
