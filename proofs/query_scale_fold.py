"""query_scale_fold: a scale on one part of a Linear's output (the attention's query) folds into those rows.

Identity: a Linear W (O, C), bias b (0 if absent), and P a path of layout ops that picks one part
of its output: FastViT's ``qkv(x).reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4)[p]`` (p = 0 for q).
A scale s acts on P's output along an axis (``q * d**-0.5`` is s[head] = d**-0.5 on the head axis).
If every element of feature o meets one factor f[o] (f[o] = 1 for the features P does not pick):

    W'[o, :] = f[o] * W[o, :]
    b'[o]    = f[o] * b[o]

    scale(P(Linear(x; W, b)); s) == P(Linear(x; W', b')),  and  P'(Linear(x; W, b)) == P'(Linear(x; W', b'))

for every other path P' (k, v) that picks none of the features P picks.

Why: layout ops only move and pick elements, so every element of P's output *is* some output
feature o of the Linear at some token, and s multiplies it by f[o]; f[o] (W[o] x + b[o]) is row o of
a Linear again. Rows P does not pick keep f = 1, so k and v are unchanged.

Preconditions (checked semantically by :func:`factors` on labelled elements, as the library does on
its index tensor): (1) every element of one feature meets the same factor; (2) the features P picks
are read by no other path.

Configurations: FastViT's attention (per-head scale head_dim**-0.5, here a symbolic factor per head)
on q, k or v, with and without a bias, 1 and 2 heads, 1 and 2 tokens.  A conv's features are its
output channels (MobileNetV4's multi-query attention: ``q = conv(x)`` reshaped to (h, d, H W) and
transposed to (h, H W, d), scaled per head): W'[o] = f[o] W[o] over every (c, u, v), for a 1x1 and a
padded 3x3 kernel.

A number on the scores instead (BERT's ``matmul(q, k^T) / sqrt(d) + mask``) passes through the product,
c (q k^T) = (c q) k^T, so it is the same fold with f = c on q's features (or k's, when q is not one
part of the Linear): proved with a symbolic c and mask for both; a factor per key column is refused
(q's one feature meets every column), with a symbolic counterexample.

REFUSED: a scale along the token axis (one factor per token, N = 2): feature o of token 0 meets s[0],
of token 1 s[1]; a row of W can carry only one, so the fold with s[0] is wrong at token 1. Symbolic
counterexample below. (Precondition (2) is the engine's graph check; a path that reads the picked
features unscaled would see them multiplied: that is the same as applying s to it.)

Proof: symbolic x, W, b and factors; both sides are polynomials, so expand(lhs - rhs) == 0 is exact.
"""

from __future__ import annotations

import numpy as np
import sympy

from .symbolic import add, assert_differs, assert_equal, conv2d, describe, linear, permute, reshape, scale, symbols_tensor, transpose


def select(x: np.ndarray, axis: int, index: int) -> np.ndarray:
    """``x.select(axis, index)``."""
    return np.take(x, index, axis=axis)


def path(y: np.ndarray, B: int, N: int, h: int, d: int, part: int) -> np.ndarray:
    """FastViT's split: reshape (B, N, 3, h, d), permute (2, 0, 3, 1, 4), pick ``part``: (B, h, N, d)."""
    return select(permute(reshape(y, (B, N, 3, h, d)), (2, 0, 3, 1, 4)), 0, part)


def factors(O: int, picked: np.ndarray, s, axis: int):
    """f[o] for every feature from the labelled path output ``picked`` (its elements are feature indices).

    Raises ValueError('refused: ...') when one feature meets two factors (precondition (1)).
    """
    f: list = [None] * O
    for idx in np.ndindex(picked.shape):
        o, factor = picked[idx], s[idx[axis % picked.ndim]]
        if f[o] is not None and sympy.expand(f[o] - factor) != 0:
            raise ValueError(f"refused: feature {o} meets two factors, {f[o]} and {factor}")
        f[o] = factor
    return [1 if v is None else v for v in f]


def fuse(w: np.ndarray, b, f):
    """(W', b') = (f[o] W[o, :], f[o] b[o]); no bias stays no bias."""
    w2 = np.empty(w.shape, dtype=object)
    for o in range(w.shape[0]):
        w2[o] = f[o] * w[o]
    if b is None:
        return w2, None
    return w2, np.array([f[o] * b[o] for o in range(len(b))], dtype=object)


def _labels(B, N, O):
    labels = np.empty((B, N, O), dtype=object)
    for idx in np.ndindex(labels.shape):
        labels[idx] = idx[-1]
    return labels


# B, N tokens of C features, h heads of d features; the scale on part p (0 q, 1 k, 2 v) along axis.
CONFIGS = [
    dict(name="FastViT query scale, 2 heads", B=1, N=2, C=2, h=2, d=1, part=0, axis=1, bias=False),
    dict(name="FastViT query scale, 1 head, biased qkv", B=1, N=2, C=2, h=1, d=2, part=0, axis=1, bias=True),
    dict(name="per-head scale on k", B=1, N=1, C=2, h=2, d=1, part=1, axis=1, bias=True),
    dict(name="per-head scale on v", B=2, N=1, C=1, h=2, d=1, part=2, axis=1, bias=False),
]

REFUSED = dict(name="scale along the token axis", B=1, N=2, C=1, h=1, d=1, part=0, axis=2, bias=False)


def _sides(cfg):
    B, N, C, h, d, p = cfg["B"], cfg["N"], cfg["C"], cfg["h"], cfg["d"], cfg["part"]
    O = 3 * h * d
    x = symbols_tensor("x", (B, N, C))
    w = symbols_tensor("w", (O, C))
    b = symbols_tensor("b", (O,)) if cfg["bias"] else None
    picked = path(_labels(B, N, O), B, N, h, d, p)
    s = symbols_tensor("s", (picked.shape[cfg["axis"]],))
    y = linear(x, w, b)
    lhs = [scale(path(y, B, N, h, d, p), s, axis=cfg["axis"])] + [path(y, B, N, h, d, q) for q in range(3) if q != p]
    return x, w, b, s, picked, O, lhs


# A conv of C channels to h heads of d, on an H x W map, kernel k; the scale per head on the query tokens.
CONV_CONFIGS = [
    dict(name="MobileNetV4 query conv 1x1, 2 heads", C=2, h=2, d=1, H=1, W=2, k=1, bias=True),
    dict(name="query conv 3x3, padded, 1 head of 2", C=1, h=1, d=2, H=2, W=2, k=3, bias=False),
]


def _conv_path(y: np.ndarray, h: int, d: int) -> np.ndarray:
    """(h d, H, W) -> reshape (h, d, H W) -> transpose to (h, H W, d): the query tokens per head."""
    return transpose(reshape(y, (h, d, y.shape[1] * y.shape[2])), 1, 2)


def _prove_conv(cfg: dict) -> str:
    C, h, d, H, W, k = (cfg[n] for n in ("C", "h", "d", "H", "W", "k"))
    O = h * d
    x, w = symbols_tensor("x", (C, H, W)), symbols_tensor("w", (O, C, k, k))
    b = symbols_tensor("b", (O,)) if cfg["bias"] else None
    s = symbols_tensor("s", (h,))
    labels = np.empty((O, H, W), dtype=object)
    for idx in np.ndindex(labels.shape):
        labels[idx] = idx[0]
    f = factors(O, _conv_path(labels, h, d), s, 0)
    pads = (k // 2,) * 4
    w2, b2 = fuse(w, b, f)
    lhs = scale(_conv_path(conv2d(x, w, b, padding=pads), h, d), s, axis=0)
    rhs = _conv_path(conv2d(x, w2, b2, padding=pads), h, d)
    desc = describe("scale(P(conv(x))) == P(conv'(x))", case=cfg["name"], x=(C, H, W), kernel=k, heads=h, head_dim=d, bias=cfg["bias"])
    assert_equal(lhs, rhs, f"query_scale_fold {desc}")
    return desc


# A number on the scores: c * (q k^T) + mask, with q (or k) one part of the qkv Linear.
SCORES_CONFIGS = [
    dict(name="BERT scores / sqrt(d) + mask, onto q", B=1, N=2, C=2, h=1, d=2, onto=0),
    dict(name="scores * c, onto k (q given), 2 heads", B=1, N=2, C=1, h=2, d=1, onto=1),
]


def _prove_scores(cfg: dict) -> str:
    """c * matmul(q, k^T) + m == matmul(q', k'^T) + m with c folded into the rows of the part ``onto``."""
    B, N, C, h, d, onto = (cfg[n] for n in ("B", "N", "C", "h", "d", "onto"))
    O = 3 * h * d
    x, w, b = symbols_tensor("x", (B, N, C)), symbols_tensor("w", (O, C)), symbols_tensor("b", (O,))
    c, mask = sympy.Symbol("c"), symbols_tensor("m", (B, h, N, N))
    given_q = symbols_tensor("g", (B, h, N, d))

    def scores(y: np.ndarray, factor) -> np.ndarray:
        q = path(y, B, N, h, d, 0) if onto == 0 else given_q
        return add(factor * np.matmul(q, transpose(path(y, B, N, h, d, 1), -2, -1)), mask)

    f = factors(O, path(_labels(B, N, O), B, N, h, d, onto), [c] * d, -1)
    w2, b2 = fuse(w, b, f)
    y, y2 = linear(x, w, b), linear(x, w2, b2)
    desc = describe("c * matmul(q, k^T) + m == matmul(q', k'^T) + m; v unchanged", case=cfg["name"], x=(B, N, C),
                    heads=h, head_dim=d, onto="qk"[onto])
    assert_equal(scores(y, c), scores(y2, 1), f"query_scale_fold {desc}")
    assert_equal(path(y, B, N, h, d, 2), path(y2, B, N, h, d, 2), f"query_scale_fold {desc}: v")
    return desc


def _refuse_per_key() -> str:
    """A factor per key column cannot move onto q: q's one feature meets both columns' factors."""
    x, w = symbols_tensor("x", (1, 2, 1)), symbols_tensor("w", (3, 1))
    s = symbols_tensor("s", (2,))
    y = linear(x, w)
    q, k = path(y, 1, 2, 1, 1, 0), path(y, 1, 2, 1, 1, 1)
    lhs = scale(np.matmul(q, transpose(k, -2, -1)), s, axis=3)
    w2, _ = fuse(w, None, [s[0], 1, 1])  # the number token 0's column meets, moved onto q anyway
    y2 = linear(x, w2)
    rhs = np.matmul(path(y2, 1, 2, 1, 1, 0), transpose(path(y2, 1, 2, 1, 1, 1), -2, -1))
    diff, num = assert_differs(lhs, rhs, (0, 0, 0, 1), "query_scale_fold refused scores case")
    return f"refused: a factor per key on the scores (N=2) moved onto q: at (0, 0, 0, 1) lhs - rhs = {diff} != 0 (numeric witness {num})"


def prove() -> list[str]:
    done = [_prove_conv(cfg) for cfg in CONV_CONFIGS] + [_prove_scores(cfg) for cfg in SCORES_CONFIGS] + [_refuse_per_key()]
    for cfg in CONFIGS:
        x, w, b, s, picked, O, lhs = _sides(cfg)
        f = factors(O, picked, s, cfg["axis"])
        w2, b2 = fuse(w, b, f)
        y2 = linear(x, w2, b2)
        B, N, h, d, p = cfg["B"], cfg["N"], cfg["h"], cfg["d"], cfg["part"]
        rhs = [path(y2, B, N, h, d, p)] + [path(y2, B, N, h, d, q) for q in range(3) if q != p]
        desc = describe("scale(P(Linear(x))) == P(Linear'(x)); other parts unchanged", case=cfg["name"],
                        x=(B, N, cfg["C"]), heads=h, head_dim=d, part="qkv"[p], axis=cfg["axis"], bias=cfg["bias"])
        for k, (lo, ro) in enumerate(zip(lhs, rhs)):
            assert_equal(lo, ro, f"query_scale_fold {desc} output {k}")
        done.append(desc)

    cfg = REFUSED
    x, w, b, s, picked, O, lhs = _sides(cfg)
    try:
        factors(O, picked, s, cfg["axis"])
    except ValueError:
        pass
    else:
        raise AssertionError("query_scale_fold: precondition accepted a scale along the tokens")
    # The fold anyway, with the factor token 0 meets: wrong at token 1.
    f = [s[0] if o == 0 else 1 for o in range(O)]
    w2, _ = fuse(w, None, f)
    rhs = path(linear(x, w2), cfg["B"], cfg["N"], cfg["h"], cfg["d"], 0)
    idx = (0, 0, 1, 0)
    diff, num = assert_differs(lhs[0], rhs, idx, "query_scale_fold refused case")
    assert_equal([diff], [sympy.expand((s[1] - s[0]) * linear(x, w)[0, 1, 0])], "query_scale_fold refused: difference")
    done.append(f"refused: {cfg['name']}: q (1, 1, N=2, 1) scaled by s[token]: at {idx} "
                f"lhs - rhs = (s[1] - s[0]) * Linear(x)[0,1,0] != 0 (numeric witness {num})")
    return done
