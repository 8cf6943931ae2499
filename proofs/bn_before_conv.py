"""bn_before_conv: an eval-mode BatchNorm followed by an UNPADDED conv is one conv.

Identity: with per-input-channel s[c] = gamma[c] / sqrt(var[c] + eps), t[c] = beta[c] -
mean[c]*s[c] (so BN(x)[c] = s[c]*x[c] + t[c]), a conv W (O, C/G, kh, kw), bias b (0 if
absent), groups G, any stride and dilation, and c(o, i) = (o // (O/G)) * (C/G) + i the input
channel read by weight row (o, i):

    W'[o, i, u, v] = W[o, i, u, v] * s[c(o, i)]
    b'[o]          = b[o] + sum_{i, u, v} W[o, i, u, v] * t[c(o, i)]

    conv(BN(x); W, b, padding 0) == conv(x; W', b', padding 0).

Precondition: the conv has NO zero padding. With padding, the conv pads BN(x) with zeros,
but the fused conv pads x with zeros and BN(0) = t != 0: border outputs would need the shift
t for in-image taps only. REFUSED (symbolic counterexample below; the interior agrees).

The same holds for any per-channel affine map: a constant added per input channel,
sign * x + c[c] (YOLOv7's ImplicitA), is s = sign, t = c; a GroupNorm's own affine after its
normalization n (PoolFormer's GroupNorm(1, C) before a 1x1 conv) is s = gamma, t = beta, with n(x)
in the place of x.

Proof: symbolic x, W, b and BN parameters with the BN scale kept as gamma/sympy.sqrt(var+eps);
both sides are linear in 1/sqrt(var+eps), so expand(lhs - rhs) == 0 is an exact proof. The
refused case shows expand(lhs - rhs) != 0 at a border pixel and a numeric witness.
"""

from __future__ import annotations

import numpy as np
import sympy

from .symbolic import (conv_symbols, assert_differs, assert_equal, batch_norm, bn_scale_shift, bn_symbols,
                       conv2d, describe, norm_pads, symbols_tensor)


def fuse(w, b, mean, var, gamma, beta, eps, groups: int = 1, padding=0, allow_refused=False):
    """(W', b') for BN -> conv(w, b, groups). Refuses padded convs unless allow_refused."""
    if any(norm_pads(padding)) and not allow_refused:
        raise ValueError("refused: BN before a zero-padded conv is not a conv (BN(0) != 0)")
    return fuse_affine(w, b, *bn_scale_shift(mean, var, gamma, beta, eps), groups)


def fuse_affine(w, b, s, t, groups: int = 1):
    """(W', b') for x -> s[c] x + t[c] -> conv(w, b, groups), any per-channel affine map (a BN, an added constant)."""
    O, Cg, kh, kw = w.shape
    w2 = np.empty(w.shape, dtype=object)
    b2 = np.empty(O, dtype=object)
    for o in range(O):
        c0 = (o // (O // groups)) * Cg
        terms = [b[o]] if b is not None else []
        for i in range(Cg):
            for u in range(kh):
                for v in range(kw):
                    w2[o, i, u, v] = w[o, i, u, v] * s[c0 + i]
                    terms.append(w[o, i, u, v] * t[c0 + i])
        b2[o] = sympy.Add(*terms)
    return w2, b2


CONFIGS = [
    dict(C=2, O=2, H=4, W=5, k=(3, 3), stride=(1, 1), dilation=(1, 1), groups=1, bias=True),
    dict(C=4, O=4, H=5, W=5, k=(2, 3), stride=(2, 2), dilation=(1, 1), groups=2, bias=False),
    dict(C=2, O=4, H=5, W=5, k=(2, 2), stride=(1, 2), dilation=(2, 2), groups=2, bias=True),
    dict(C=2, O=2, H=4, W=4, k=(1, 1), stride=(1, 1), dilation=(1, 1), groups=1, bias=True),
]


def prove() -> list[str]:
    done = []
    for cfg in CONFIGS:
        C, g = cfg["C"], cfg["groups"]
        x, w, b = conv_symbols(cfg)
        bn = bn_symbols("", C)
        kw = dict(stride=cfg["stride"], dilation=cfg["dilation"], groups=g)
        lhs = conv2d(batch_norm(x, *bn), w, b, **kw)
        rhs = conv2d(x, *fuse(w, b, *bn, groups=g), **kw)
        desc = describe("BN -> conv(padding 0) == conv", **cfg)
        assert_equal(lhs, rhs, "bn_before_conv " + desc)
        done.append(desc)

    # A constant added per input channel (YOLOv7's ImplicitA), or subtracted from it: s = sign, t = c.
    for cfg, sign in ((CONFIGS[0], 1), (CONFIGS[1], -1)):
        C, g = cfg["C"], cfg["groups"]
        x, w, b = conv_symbols(cfg)
        c = symbols_tensor("c", (C,))
        shifted = np.empty(x.shape, dtype=object)
        for idx in np.ndindex(x.shape):
            shifted[idx] = sign * x[idx] + c[idx[0]]
        kw = dict(stride=cfg["stride"], dilation=cfg["dilation"], groups=g)
        rhs = conv2d(x, *fuse_affine(w, b, np.array([sign] * C, dtype=object), c, groups=g), **kw)
        desc = describe("(sign * x + c) -> conv(padding 0) == conv", sign=sign, **cfg)
        assert_equal(conv2d(shifted, w, b, **kw), rhs, "bn_before_conv " + desc)
        done.append(desc)

    # REFUSED: padding 1.
    x = symbols_tensor("x", (1, 3, 3))
    w = symbols_tensor("w", (1, 1, 3, 3))
    b = symbols_tensor("b", (1,))
    bn = bn_symbols("", 1)
    try:
        fuse(w, b, *bn, padding=1)
    except ValueError:
        pass
    else:
        raise AssertionError("bn_before_conv: fuse accepted a padded conv")
    lhs = conv2d(batch_norm(x, *bn), w, b, padding=1)
    rhs = conv2d(x, *fuse(w, b, *bn, padding=1, allow_refused=True), padding=1)
    assert_equal(lhs[:, 1:2, 1:2], rhs[:, 1:2, 1:2], "bn_before_conv refused case, interior")
    diff, num = assert_differs(lhs, rhs, (0, 0, 0), "bn_before_conv refused case")
    _, t = bn_scale_shift(*bn)
    expected = -t[0] * sum(w[0, 0, u, v] for u in range(3) for v in range(3) if u == 0 or v == 0)
    assert_equal([diff], [sympy.expand(expected)], "bn_before_conv refused: difference is -t * border taps")
    done.append(f"refused: BN -> conv3x3(padding 1): at corner (0,0) lhs - rhs = "
                f"-t * sum_(padded taps) W != 0 since BN(0) = t (numeric witness {num}); interior agrees")
    done += [prove_copying_pad(mode) for mode in ("reflect", "replicate", "circular")]
    done.append(prove_concat())
    return done


def prove_concat() -> str:
    """PP-HGNetV2's aggregation: conv(cat(BN(y1), a y2 + c, y3)) == conv'(cat(y1, y2, y3)), each part's affine map
    (a BN; a LearnableAffineBlock, one scale a and one shift c; none) folded into the kernel's slice it feeds."""
    y1, y2, y3 = symbols_tensor("y", (2, 3, 3)), symbols_tensor("z", (1, 3, 3)), symbols_tensor("u", (1, 3, 3))
    a, c = sympy.Symbol("a"), sympy.Symbol("c")
    bn = bn_symbols("", 2)
    _, w, b = conv_symbols(dict(C=4, O=2, H=3, W=3, k=(2, 2), groups=1, bias=True))
    lhs = conv2d(np.concatenate([batch_norm(y1, *bn), a * y2 + c, y3]), w, b)
    s1, t1 = bn_scale_shift(*bn)
    s = [*s1, a, sympy.Integer(1)]
    t = [*t1, c, sympy.Integer(0)]
    rhs = conv2d(np.concatenate([y1, y2, y3]), *fuse_affine(w, b, s, t))
    assert_equal(lhs, rhs, "bn_before_conv concat of affine parts")
    return "conv2x2(cat(BN(y1), a y2 + c, y3)) == conv2x2'(cat(y1, y2, y3)): C = 2 + 1 + 1, O=2"


def copy_pad(x: np.ndarray, pads, mode: str) -> np.ndarray:
    """``F.pad(x, (left, right, top, bottom), mode)`` on a (C, H, W) tensor: every padded pixel is a pixel of the same
    channel (reflect: mirrored without the edge; replicate: the edge; circular: wrapped around)."""
    left, right, top, bottom = pads
    C, H, W = x.shape

    def source(i: int, n: int) -> int:
        if mode == "reflect":
            return -i if i < 0 else 2 * (n - 1) - i if i >= n else i
        if mode == "replicate":
            return min(max(i, 0), n - 1)
        return i % n  # circular

    out = np.empty((C, H + top + bottom, W + left + right), dtype=object)
    for c in range(C):
        for p in range(-top, H + bottom):
            for q in range(-left, W + right):
                out[c, p + top, q + left] = x[c, source(p, H), source(q, W)]
    return out


def prove_copying_pad(mode: str) -> str:
    """conv(pad(BN(x), mode)) == conv'(pad(x, mode)) for a pad that copies pixels within each channel."""
    pads = (1, 0, 1, 2)
    x = symbols_tensor("x", (2, 3, 3))
    w, b = symbols_tensor("w", (2, 2, 2, 2)), symbols_tensor("b", (2,))
    bn = bn_symbols("", 2)
    lhs = conv2d(copy_pad(batch_norm(x, *bn), pads, mode), w, b)
    rhs = conv2d(copy_pad(x, pads, mode), *fuse(w, b, *bn))
    assert_equal(lhs, rhs, f"bn_before_conv across a {mode} pad")
    return f"BN -> {mode} pad (1, 0, 1, 2) -> conv2x2 == {mode} pad -> conv2x2'"
