"""linear_affine_fold: a per-channel affine map after a Linear folds into it, through layout ops.

Identity: A(y) = s*y + t per channel, on A's channel axis: an eval-mode BatchNorm
(s = gamma / sqrt(var + eps), t = beta - mean*s) or a layer scale (s = gamma, t = 0). With a
Linear W (O, C), bias b (0 if absent) and L a chain of layout ops (flatten / reshape /
transpose / permute, possibly empty):

    W'[o, :] = s[o] * W[o, :]
    b'[o]    = s[o] * b[o] + t[o]        (no bias and no shift (layer scale) -> no bias)

    A(L(Linear(x; W, b))) == L(Linear(x; W', b')).

Why: L only moves elements. If L carries the Linear's output-feature axis (its last axis)
*whole* onto A's channel axis, the element A meets at channel o is output feature o of the
Linear, so A(L(y)) = L(s*y + t) with (s, t) acting on the feature axis, and s*(W x + b) + t
is again a Linear, row by row.

Precondition: L carries the Linear's last axis whole onto A's axis. Checked semantically by
:func:`precondition` (:func:`proofs.symbolic.carried_axes`); the library checks it
syntactically (``repalgebra.layout.follow_chain``); tests/test_proofs.py checks that both
agree on every chain used here.

Configurations: FastViT's layer scale after the attention projection (tokens (B, N, C) ->
proj -> transpose(-2, -1) -> reshape to (B, C, H, W) -> layer scale on axis 1), the same with a
BatchNorm2d, LeViT's Linear_BN (Linear on (B, N, C) -> flatten(0, 1) -> BatchNorm1d -> reshape
back; the final reshape is applied to both sides), a channels-last Linear followed by
permute to NCHW and BatchNorm2d, and a plain layer scale on the last axis (empty chain).

After a sum of Linears, each reading its own input (PyG's SAGEConv ``lin_l(aggr) + lin_r(x)``
before a BatchNorm1d): A(L(z_1 ± z_2 ± ...)) = L(s (z_1 ± z_2 ± ...) + t), and s distributes over the
sum, so every Linear folds the scale s and the first (added) one also the shift t; the others fold
(s, no shift), their bias only scaled.  :data:`SUM_CONFIGS` check it on (N, C) features with a BN on
axis 1, on (N, L, C) features transposed to (N, C, L) for a BatchNorm1d, and with a layer scale.

REFUSED: a layout op that mixes the feature axis with another axis. Here the classic slip
``y.reshape(B, C, N)`` instead of ``y.transpose(1, 2)``: with N = 2, C = 4 it splits each row of
4 features over two output rows, so the element at [0, 0, 1] is feature 1 but meets the layer
scale s[0]; the per-channel fold puts s[1] on it. Symbolic counterexample below.

Proof: symbolic x, W, b, s and BN parameters (BN scale kept as gamma/sympy.sqrt(var+eps));
both sides are linear in 1/sqrt(var+eps), so expand(lhs - rhs) == 0 is an exact proof.
"""

from __future__ import annotations

import numpy as np
import sympy

from .symbolic import (assert_differs, assert_equal, batch_norm, bn_scale_shift, bn_symbols,
                       carried_axes, describe, describe_chain, layout, linear, scale, symbols_tensor)


def fuse(w, b, s, t=None):
    """(W', b') for Linear(w, b) -> L -> per-channel (s, t). ``b``/``t`` may be None.

    Returns b' = None when there is neither a bias nor a shift (layer scale after a bias-free
    Linear), like the library.
    """
    O = w.shape[0]
    w2 = np.empty(w.shape, dtype=object)
    for o in range(O):
        w2[o] = s[o] * w[o]
    if b is None and t is None:
        return w2, None
    b2 = np.empty(O, dtype=object)
    for o in range(O):
        b2[o] = (s[o] * b[o] if b is not None else 0) + (t[o] if t is not None else 0)
    return w2, b2


def fuse_bn(w, b, mean, var, gamma, beta, eps):
    """(W', b') for Linear(w, b) -> L -> eval-mode BN."""
    return fuse(w, b, *bn_scale_shift(mean, var, gamma, beta, eps))


def precondition(chain, shape, axis: int):
    """Raise ValueError('refused: ...') unless ``chain``, applied to the Linear's output of
    ``shape``, carries its last axis whole onto ``axis``."""
    ks, out_shape = carried_axes(chain, shape, -1)
    if axis % len(out_shape) not in ks:
        raise ValueError(f"refused: layout {chain} on {tuple(shape)} does not carry the Linear's "
                         f"feature axis whole to axis {axis} (carried to {ks}, output {out_shape})")


def _fastvit(B, H, W, C):
    return [("transpose", dict(dim0=-2, dim1=-1)), ("reshape", dict(shape=(B, C, H, W)))]


# x: Linear input; O: Linear out features; L: layout chain after it; A: "scale" or "bn" on axis;
# post: layout applied after A on both sides (not part of the rule).
CONFIGS = [
    dict(name="FastViT layer scale after attn proj", x=(1, 4, 3), O=2, bias=True,
         chain=_fastvit(1, 2, 2, 2), A="scale", axis=1),
    dict(name="FastViT layer scale after attn proj", x=(2, 3, 2), O=3, bias=False,
         chain=_fastvit(2, 1, 3, 3), A="scale", axis=1),
    dict(name="BatchNorm2d after proj + reshape", x=(1, 4, 2), O=2, bias=False,
         chain=_fastvit(1, 2, 2, 2), A="bn", axis=1),
    dict(name="LeViT Linear_BN", x=(2, 3, 2), O=3, bias=False,
         chain=[("flatten", dict(start=0, end=1))], A="bn", axis=1,
         post=[("reshape", dict(shape=(2, 3, 3)))]),
    dict(name="LeViT Linear_BN", x=(2, 2, 3), O=2, bias=True,
         chain=[("flatten", dict(start=0, end=1))], A="bn", axis=1,
         post=[("reshape", dict(shape=(2, 2, 2)))]),
    dict(name="channels-last Linear, permute, BN2d", x=(1, 2, 2, 2), O=3, bias=True,
         chain=[("permute", dict(dims=(0, 3, 1, 2)))], A="bn", axis=1),
    dict(name="layer scale, empty chain", x=(1, 3, 2), O=2, bias=True, chain=[], A="scale", axis=-1),
]

# y.reshape(B, C, N) instead of y.transpose(1, 2): (1, N=2, C=4) -> (1, 4, 2), layer scale on axis 1.
REFUSED = dict(name="reshape (B,N,C)->(B,C,N) without transpose", x=(1, 2, 2), O=4, bias=True,
               chain=[("reshape", dict(shape=(1, 4, 2)))], A="scale", axis=1)


# A sum of Linears of their own inputs, ``terms`` of (name, input shape, bias, sign), summed left to right with
# their signs (the first one added), then L and A.
SUM_CONFIGS = [
    dict(name="SAGEConv lin_l(aggr) - lin_r(x) + lin(z), BN1d on (N, C)", O=2, chain=[], A="bn", axis=1,
         terms=[("x", (2, 3), True, 1), ("y", (2, 2), True, -1), ("z", (2, 3), False, 1)]),
    dict(name="(N, L, C) features, transpose to (N, C, L), BN1d", O=2,
         chain=[("transpose", dict(dim0=1, dim1=2))], A="bn", axis=1,
         terms=[("x", (1, 2, 2), False, 1), ("y", (1, 2, 3), True, 1)]),
    dict(name="layer scale after fc1(a) - fc2(b) on (N, L, C)", O=3, chain=[], A="scale", axis=-1,
         terms=[("x", (1, 2, 2), True, 1), ("y", (1, 2, 2), False, -1)]),
]


def prove_sum(cfg) -> str:
    """A(L(sum_k sign_k Linear_k(x_k))) == L(sum_k sign_k Linear_k'(x_k)): Linear_1 folds (s, t), the others (s, 0)."""
    O = cfg["O"]
    params = bn_symbols("", O) if cfg["A"] == "bn" else (symbols_tensor("s", (O,)),)
    s, t = bn_scale_shift(*params) if cfg["A"] == "bn" else (params[0], None)
    total = folded = None
    for k, (name, shape, bias, sign) in enumerate(cfg["terms"]):
        x, w = symbols_tensor(name, shape), symbols_tensor(f"w{k}", (O, shape[-1]))
        b = symbols_tensor(f"b{k}", (O,)) if bias else None
        w2, b2 = fuse(w, b, s, t if k == 0 else None)  # the shift once, into the first (added) Linear
        z, z2 = sign * linear(x, w, b), sign * linear(x, w2, b2)
        total, folded = (z, z2) if total is None else (total + z, folded + z2)
    y = layout(total, cfg["chain"])
    lhs = batch_norm(y, *params, axis=cfg["axis"]) if cfg["A"] == "bn" else scale(y, s, axis=cfg["axis"])
    rhs = layout(folded, cfg["chain"])
    assert_equal(lhs, rhs, "linear_affine_fold sum " + cfg["name"])
    terms = " ".join(f"{'+-'[sign < 0]} Linear({name}{'' if bias else ', no bias'})" for name, _, bias, sign in cfg["terms"])
    return describe("A(L(sum of Linears)) == L(sum of folded Linears)", case=cfg["name"], terms=terms,
                    L=describe_chain(cfg["chain"]), A=f"{cfg['A']}(axis={cfg['axis']})")


def _tensors(cfg):
    x = symbols_tensor("x", cfg["x"])
    O = cfg["O"]
    w = symbols_tensor("w", (O, cfg["x"][-1]))
    b = symbols_tensor("b", (O,)) if cfg["bias"] else None
    if cfg["A"] == "bn":
        return x, w, b, bn_symbols("", O)
    return x, w, b, (symbols_tensor("s", (O,)),)


def _sides(cfg, x, w, b, params):
    y = layout(linear(x, w, b), cfg["chain"])
    if cfg["A"] == "bn":
        lhs = batch_norm(y, *params, axis=cfg["axis"])
        w2, b2 = fuse_bn(w, b, *params)
    else:
        lhs = scale(y, params[0], axis=cfg["axis"])
        w2, b2 = fuse(w, b, params[0])
        if (b2 is None) != (b is None):
            raise AssertionError("linear_affine_fold: layer scale must keep bias-ness")
    rhs = layout(linear(x, w2, b2), cfg["chain"])
    post = cfg.get("post", [])
    return layout(lhs, post), layout(rhs, post)


def _desc(cfg, kind):
    chain = describe_chain(cfg["chain"])
    return describe(kind, case=cfg["name"], x=cfg["x"], O=cfg["O"], bias=cfg["bias"], L=chain,
                    A=f"{cfg['A']}(axis={cfg['axis']})")


def prove() -> list[str]:
    done = []
    for cfg in CONFIGS:
        y_shape = tuple(cfg["x"][:-1]) + (cfg["O"],)
        precondition(cfg["chain"], y_shape, cfg["axis"])
        x, w, b, params = _tensors(cfg)
        lhs, rhs = _sides(cfg, x, w, b, params)
        desc = _desc(cfg, "A(L(Linear(x))) == L(Linear'(x))")
        assert_equal(lhs, rhs, "linear_affine_fold " + desc)
        done.append(desc)

    done.append(prove_generator_input())
    done.extend(prove_sum(cfg) for cfg in SUM_CONFIGS)

    # REFUSED: the reshape mixes the feature axis with the token axis.
    cfg = REFUSED
    y_shape = tuple(cfg["x"][:-1]) + (cfg["O"],)
    try:
        precondition(cfg["chain"], y_shape, cfg["axis"])
    except ValueError:
        pass
    else:
        raise AssertionError("linear_affine_fold: precondition accepted a feature-mixing reshape")
    x, w, b, (s,) = _tensors(cfg)
    lhs, rhs = _sides(cfg, x, w, b, (s,))
    # out[0, 0, 1] is y[0, 0, 1] (token 0, feature 1): A gives it s[0], the fold s[1].
    idx = (0, 0, 1)
    diff, num = assert_differs(lhs, rhs, idx, "linear_affine_fold refused case")
    y = linear(x, w, b)
    assert_equal([diff], [sympy.expand((s[0] - s[1]) * y[0, 0, 1])],
                 "linear_affine_fold refused: difference")
    done.append(f"refused: {cfg['name']}: (1, N=2, C=4) -> (1, 4, 2), layer scale on axis 1: at {idx} "
                f"lhs - rhs = (s[0] - s[1]) * Linear(x)[0,0,1] != 0 (numeric witness {num})")
    return done


def prove_generator_input() -> str:
    """A generator's input layer: Linear(z) (2 -> C H W = 2 * 2 * 1), reshape to (1, C=2, 2, 1), BN2d: channel c is
    the rows [c H W, (c + 1) H W), so row o is scaled by s[o // (H W)] and shifted by t[o // (H W)]."""
    C, H, W = 2, 2, 1
    z = symbols_tensor("z", (1, 2))
    w, b = symbols_tensor("w", (C * H * W, 2)), symbols_tensor("b", (C * H * W,))
    bn = bn_symbols("", C)
    s, t = bn_scale_shift(*bn)
    chain = [("reshape", dict(shape=(1, C, H, W)))]
    lhs = batch_norm(layout(linear(z, w, b), chain), *bn, axis=1)
    rows = H * W
    w2, b2 = fuse(w, b, [s[o // rows] for o in range(C * H * W)], [t[o // rows] for o in range(C * H * W)])
    rhs = layout(linear(z, w2, b2), chain)
    assert_equal(lhs, rhs, "linear_affine_fold generator input")
    return "generator input: Linear(2 -> 4) -> reshape (1, C=2, 2, 1) -> BN2d: row o scaled by s[o // 2]"
