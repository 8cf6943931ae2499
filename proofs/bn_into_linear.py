"""bn_into_linear: an eval-mode BatchNorm before a Linear folds into it, through layout ops.

Identity: with per-channel s[c] = gamma[c] / sqrt(var[c] + eps), t[c] = beta[c] - mean[c]*s[c]
(so BN(x) = s[c]*x + t[c] on channel c), a Linear W (O, C), bias b (0 if absent), and L a chain
of layout ops (flatten / reshape / transpose / permute / select, possibly empty):

    W'[o, c] = W[o, c] * s[c]
    b'[o]    = b[o] + sum_c W[o, c] * t[c]          (always has a bias)

    Linear(L(BN(x)); W, b) == Linear(L(x); W', b').

Why: L only moves elements. If L carries BN's channel axis *whole* to the last axis (the one
the Linear reads), every element arriving at Linear input feature c came from channel c, so
L(BN(x))[..., c] = s[c] * L(x)[..., c] + t[c], and the Linear absorbs the affine map column by
column. There is no padding, so unlike bn_before_conv the fold is always exact.

Precondition: L carries BN's channel axis whole onto the Linear's last axis. Checked
semantically by :func:`precondition` (:func:`proofs.symbolic.carried_axes`: label every element
with its channel, run L, the last axis must read back its own index everywhere); the library
checks it syntactically (``repalgebra.layout.follow_chain``), and tests/test_proofs.py checks
both agree on every chain used here.

Configurations: FastViT's attention pre-norm (BatchNorm2d on (B, C, H, W), flatten(2),
transpose(-2, -1), qkv Linear), a channels-last permute, permute + flatten, BatchNorm1d on
(B, C, L) with transpose and a reshape to (B*L, C), the empty chain (BatchNorm1d -> Linear), and
an RNN/TCN head's last time step ``y[:, :, -1]`` (a select of another axis).

Also a classifier head: BN2d, flatten(1), Linear(C H W), where channel c owns features
[c H W, (c + 1) H W) (:func:`prove_flatten_all`); and RepLKNet's head, BN2d, a global average pool
(a mean over H and W), flatten(1), Linear(C), where each mean reads one channel
(:func:`prove_mean_head`, with a mean over the channels too as its refused case).

And a constant added per feature (UniRepLKNet's GRN tail, ``Linear(x + beta)``, or ``beta - x``): the
affine map with s = +-1 and t = beta (:func:`prove_shift`).

And through a concat on the features (fastai's tabular head, :func:`prove_concat`): a BN of one operand is the
affine map on the columns it fills, s and t there and 1 and 0 on the others; a concat on the batch axis is its
REFUSED case.

And a LayerNorm's or RMSNorm's own affine, ``gamma * n(x) + beta`` per feature after the normalization n
(:func:`prove_norm_affine`): whatever n computes, the Linear sees an affine map of it per feature, so the
fold is the layout case with s = gamma, t = beta (through the same layout chains), and the norm keeps n alone. REFUSED there: a norm over the
last two axes, whose gamma differs per token: one W' cannot hold every token's gamma.

REFUSED: flatten(2) *without* the transpose: the Linear then reads the spatial axis as its
features (with H*W == C the shapes even fit), element [.., c, p] meets s[c] but the fold puts
s[p] on it; symbolic counterexample below.

Proof: symbolic x, W, b and BN parameters with the BN scale kept as gamma/sympy.sqrt(var+eps);
both sides are linear in 1/sqrt(var+eps), so expand(lhs - rhs) == 0 is an exact proof.
"""

from __future__ import annotations

import numpy as np
import sympy

from .symbolic import (assert_differs, assert_equal, batch_norm, bn_scale_shift, bn_symbols,
                       carried_axes, describe, describe_chain, layout, linear, symbols_tensor)


def fuse(w, b, mean, var, gamma, beta, eps):
    """(W', b') for BN -> L -> Linear(w, b); ``b`` may be None (b' always exists)."""
    s, t = bn_scale_shift(mean, var, gamma, beta, eps)
    O, C = w.shape
    w2 = np.empty(w.shape, dtype=object)
    b2 = np.empty(O, dtype=object)
    for o in range(O):
        terms = [b[o]] if b is not None else []
        for c in range(C):
            w2[o, c] = w[o, c] * s[c]
            terms.append(w[o, c] * t[c])
        b2[o] = sympy.Add(*terms)
    return w2, b2


def precondition(chain, shape, axis: int = 1):
    """Raise ValueError('refused: ...') unless ``chain`` carries BN ``axis`` whole to the last axis."""
    ks, out_shape = carried_axes(chain, shape, axis)
    if len(out_shape) - 1 not in ks:
        raise ValueError(f"refused: layout {chain} on {tuple(shape)} does not carry BN axis {axis} "
                         f"whole to the Linear's last axis (carried to {ks}, output {out_shape})")


FASTVIT = [("flatten", dict(start=2, end=-1)), ("transpose", dict(dim0=-2, dim1=-1))]

# x shape, BN channel axis, layout chain L, Linear out features, bias
CONFIGS = [
    dict(name="FastViT attn pre-norm", shape=(1, 3, 2, 2), axis=1, chain=FASTVIT, O=4, bias=True),
    dict(name="FastViT attn pre-norm", shape=(2, 2, 1, 3), axis=1, chain=FASTVIT, O=3, bias=False),
    dict(name="channels-last permute", shape=(1, 2, 2, 3), axis=1,
         chain=[("permute", dict(dims=(0, 2, 3, 1)))], O=3, bias=True),
    dict(name="permute + flatten", shape=(1, 2, 2, 2), axis=1,
         chain=[("permute", dict(dims=(0, 2, 3, 1))), ("flatten", dict(start=1, end=2))], O=2, bias=True),
    dict(name="BN1d, transpose + reshape", shape=(2, 3, 2), axis=1,
         chain=[("transpose", dict(dim0=1, dim1=2)), ("reshape", dict(shape=(4, 3)))], O=2, bias=True),
    dict(name="BN1d, empty chain", shape=(2, 3), axis=1, chain=[], O=2, bias=False),
    dict(name="BN1d, the last time step (y[:, :, -1])", shape=(2, 2, 3), axis=1,
         chain=[("select", dict(axis=2, index=-1))], O=2, bias=True),
]

# flatten(2) without the transpose: (1, C=2, 1, 2) -> (1, 2, 2); the Linear reads H*W as features.
REFUSED = dict(name="flatten(2) without transpose", shape=(1, 2, 1, 2), axis=1,
               chain=[("flatten", dict(start=2, end=-1))], O=1, bias=True)


def _sides(cfg, x, w, b, bn):
    lhs = linear(layout(batch_norm(x, *bn, axis=cfg["axis"]), cfg["chain"]), w, b)
    rhs = linear(layout(x, cfg["chain"]), *fuse(w, b, *bn))
    return lhs, rhs


def _tensors(cfg):
    shape, axis = cfg["shape"], cfg["axis"]
    x = symbols_tensor("x", shape)
    cin = layout(x, cfg["chain"]).shape[-1]
    w = symbols_tensor("w", (cfg["O"], cin))
    b = symbols_tensor("b", (cfg["O"],)) if cfg["bias"] else None
    return x, w, b, bn_symbols("", shape[axis])


def _desc(cfg, kind):
    chain = describe_chain(cfg["chain"])
    return describe(kind, case=cfg["name"], x=cfg["shape"], L=chain, O=cfg["O"], bias=cfg["bias"])


def prove() -> list[str]:
    done = []
    for cfg in CONFIGS:
        precondition(cfg["chain"], cfg["shape"], cfg["axis"])
        x, w, b, bn = _tensors(cfg)
        lhs, rhs = _sides(cfg, x, w, b, bn)
        desc = _desc(cfg, "Linear(L(BN(x))) == Linear(L(x))")
        assert_equal(lhs, rhs, "bn_into_linear " + desc)
        done.append(desc)

    done.append(prove_flatten_all())
    done.append(prove_mean_head())
    done.extend(prove_shift(sign) for sign in (1, -1))
    done.append(prove_norm_affine())
    done.append(prove_concat())

    # REFUSED: the Linear's features are the spatial positions, not BN's channels.
    cfg = REFUSED
    try:
        precondition(cfg["chain"], cfg["shape"], cfg["axis"])
    except ValueError:
        pass
    else:
        raise AssertionError("bn_into_linear: precondition accepted flatten(2) without transpose")
    x, w, b, bn = _tensors(cfg)
    lhs, rhs = _sides(cfg, x, w, b, bn)
    idx = (0, 0, 0)  # token (channel) 0, the only output feature
    diff, num = assert_differs(lhs, rhs, idx, "bn_into_linear refused case")
    # lhs reads BN(x)[c=0, p] = s[0] x[0, p] + t[0]; the fold applies s[p], t[p] to feature p.
    s, t = bn_scale_shift(*bn)
    expected = w[0, 1] * ((s[0] - s[1]) * x[0, 0, 0, 1] + t[0] - t[1])
    assert_equal([diff], [sympy.expand(expected)], "bn_into_linear refused: difference")
    done.append(f"refused: {cfg['name']}: x (1, C=2, 1, 2) -> (1, 2, 2): at {idx} lhs - rhs = "
                f"W[0,1] * ((s[0] - s[1]) x[0,0,0,1] + t[0] - t[1]) != 0 (numeric witness {num})")
    return done


def prove_mean_head() -> str:
    """RepLKNet's head, BN2d -> global average pool (a mean over H, W keeping them) -> flatten(1) -> Linear: each
    mean reads one channel, mean(s[c] x + t[c]) = s[c] mean(x) + t[c], so W' and b' are the layout case's.
    REFUSED: a mean over the channels too mixes every s[c] and t[c] into one feature."""
    shape, flat = (1, 2, 2, 2), [("flatten", dict(start=1, end=-1))]
    x = symbols_tensor("x", shape)
    w, b = symbols_tensor("w", (3, 2)), symbols_tensor("b", (3,))
    bn = bn_symbols("", 2)

    def pooled(v):
        return layout(v.sum(axis=(2, 3), keepdims=True) / (shape[2] * shape[3]), flat)

    lhs = linear(pooled(batch_norm(x, *bn, axis=1)), w, b)
    rhs = linear(pooled(x), *fuse(w, b, *bn))
    assert_equal(lhs, rhs, "bn_into_linear global average pool head")
    # Over channels and rows, (1, 2, 2, 2) -> (1, 2): a feature averages both channels, the fold scales it by one.
    w1 = symbols_tensor("v", (1, 2))
    over = lambda v: v.sum(axis=(1, 2)) / 4  # noqa: E731
    mixed = linear(over(batch_norm(x, *bn, axis=1)), w1)
    folded = linear(over(x), *fuse(w1, None, *bn))
    assert_differs(mixed, folded, (0, 0), "bn_into_linear mean over channels")
    return ("global average pool head: x (1, C=2, 2, 2) -> mean(2, 3) -> flatten(1) -> Linear(2 -> 3): W' = W s, "
            "b' = b + W t; refused: a mean over the channels too differs")


def prove_flatten_all() -> str:
    """A classifier head, BN2d -> flatten(1) -> Linear(C H W): feature j comes from channel j // (H W), so
    W'[o, j] = W[o, j] s[j // (H W)] and b' = b + sum_j W[o, j] t[j // (H W)]."""
    shape, chain = (1, 2, 2, 1), [("flatten", dict(start=1, end=-1))]
    x = symbols_tensor("x", shape)
    w, b = symbols_tensor("w", (3, 4)), symbols_tensor("b", (3,))
    bn = bn_symbols("", 2)
    s, t = bn_scale_shift(*bn)
    per = shape[2] * shape[3]
    w2 = np.empty(w.shape, dtype=object)
    b2 = np.empty(3, dtype=object)
    for o in range(3):
        for j in range(4):
            w2[o, j] = w[o, j] * s[j // per]
        b2[o] = b[o] + sympy.Add(*(w[o, j] * t[j // per] for j in range(4)))
    lhs = linear(layout(batch_norm(x, *bn, axis=1), chain), w, b)
    rhs = linear(layout(x, chain), w2, b2)
    assert_equal(lhs, rhs, "bn_into_linear flatten(1) head")
    return "classifier head: x (1, C=2, 2, 1) -> flatten(1) -> Linear(4 -> 3): W'[o, j] = W[o, j] s[j // 2]"


def prove_shift(sign: int) -> str:
    """UniRepLKNet's GRN tail, ``Linear(x + beta)`` (and ``Linear(beta - x)``, sign -1): a constant per feature is the
    affine map with s = sign, t = beta: Linear(sign x + c; W, b) == Linear(x; sign W, b + W c)."""
    x = symbols_tensor("x", (2, 3, 4))
    w, b, c = symbols_tensor("w", (2, 4)), symbols_tensor("b", (2,)), symbols_tensor("c", (4,))
    lhs = linear(sign * x + c, w, b)
    rhs = linear(x, w * sign, b + np.array([sum(w[o, k] * c[k] for k in range(4)) for o in range(2)], dtype=object))
    assert_equal(lhs, rhs, f"bn_into_linear constant shift, sign {sign}")
    return f"Linear({'x' if sign == 1 else '-x'} + c) == Linear(x; {'W' if sign == 1 else '-W'}, b + W c): x (2, 3, 4), c per feature, O=2"


def prove_concat() -> str:
    """fastai's tabular head: BN1d on the continuous features, concatenated after the embeddings, then a Linear:
    Linear(cat(e, BN(x)); W, b) == Linear(cat(e, x); W [1; s], b + W [0; t]), the BN's s and t on the columns its
    features fill.  REFUSED: a concat on the batch axis (rows of e and of BN(x)): the Linear's columns meet both, and
    the fold would scale e's rows too."""
    e, x = symbols_tensor("e", (2, 2)), symbols_tensor("x", (2, 3))
    w, b = symbols_tensor("w", (2, 5)), symbols_tensor("b", (2,))
    bn = bn_symbols("", 3)
    s, t = bn_scale_shift(*bn)
    ones = np.array([1, 1, *s], dtype=object)
    shift = np.array([0, 0, *t], dtype=object)
    w2 = w * ones
    b2 = b + np.array([sum(w[o, k] * shift[k] for k in range(5)) for o in range(2)], dtype=object)
    lhs = linear(np.concatenate([e, batch_norm(x, *bn, axis=1)], axis=1), w, b)
    assert_equal(lhs, linear(np.concatenate([e, x], axis=1), w2, b2), "bn_into_linear through a concat")
    rows = symbols_tensor("r", (2, 3))  # e with x's features, joined on the batch axis
    v = symbols_tensor("v", (1, 3))
    joined = linear(np.concatenate([rows, batch_norm(x, *bn, axis=1)], axis=0), v)
    folded = linear(np.concatenate([rows, x], axis=0), *fuse(v, None, *bn))
    assert_differs(joined, folded, (0, 0), "bn_into_linear concat on the batch axis")
    return ("through a concat: Linear(cat(e, BN(x), -1)) == Linear(cat(e, x); W [1; s], b + W [0; t]), e (2, 2), x (2, 3), "
            "O=2; refused: a concat on the batch axis differs at row 0 (e's, which the fold scales)")


def prove_norm_affine() -> str:
    """A LayerNorm's (RMSNorm's: beta = 0) affine before a Linear: with n = n(x) the normalized values (free symbols:
    the identity does not depend on how n is computed), Linear(gamma n + beta; W, b) == Linear(n; W gamma, b + W beta).
    REFUSED: gamma over the last two axes (one factor per token and feature): folding the first token's row is wrong
    for the second token."""
    n = symbols_tensor("n", (2, 3, 4))
    w, b = symbols_tensor("w", (2, 4)), symbols_tensor("b", (2,))
    gamma, beta = symbols_tensor("g", (4,)), symbols_tensor("beta", (4,))
    lhs = linear(n * gamma + beta, w, b)
    w2 = w * gamma
    b2 = b + np.array([sum(w[o, k] * beta[k] for k in range(4)) for o in range(2)], dtype=object)
    assert_equal(lhs, linear(n, w2, b2), "bn_into_linear norm affine")
    per_token = symbols_tensor("h", (3, 4))  # gamma of a norm over (tokens, features)
    wrong = linear(n, w * per_token[0], b)
    assert_differs(linear(n * per_token, w, b), wrong, (0, 1, 0), "bn_into_linear norm over two axes")
    return ("norm affine: Linear(gamma n + beta; W, b) == Linear(n; W gamma, b + W beta), n (2, 3, 4) free, O=2; "
            "refused: gamma per token and feature (a norm over the last two axes) differs at token 1")
