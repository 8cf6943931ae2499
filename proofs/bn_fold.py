"""bn_fold: a convolution followed by an eval-mode BatchNorm is one convolution.

Identity (per output channel o, for any input x):

    BN(conv(x; W, b))[o] = conv(x; W', b')[o]

    with  s[o]  = gamma[o] / sqrt(var[o] + eps)
          W'[o] = W[o] * s[o]                      (all in-channels and taps of o)
          b'[o] = (b[o] - mean[o]) * s[o] + beta[o]   (b[o] := 0 if the conv has no bias)

Preconditions: BN in eval mode (running statistics), BN channels == conv out channels.
Holds for every stride, padding (zero padding is applied to x, before the weights, so it is
untouched), dilation and groups; the fused conv keeps all of them.

A transposed convolution stores its weight as ``(C, O/groups, kh, kw)``: output channel o is
column o mod (O/groups) of the rows of o's group, so W'[i, j] = W[i, j] * s[g(i) * O/G + j] and the
bias is as above.  Every output of a transposed conv is a sum of weight-times-input terms of its own
output channel (plus that channel's bias), so the same per-channel argument holds; the configurations
below check it with stride, padding, output padding, dilation and groups.

After a channel concat of convs (MixConv, each conv reading its own input), the BN's channels are
the concat's: slice k of (mean, var, gamma, beta) normalizes conv k's outputs, so each conv folds its
own slice and the concat of the folded convs is the BN of the concat.

After a sum of convs, each reading its own input (RepNeXt's ``norm(conv_a(x) + conv_b(conv_c(x)))``),
BN(z_1 ± z_2 ± ...) = s (z_1 ± z_2 ± ...) + t: every conv folds the scale s, and the first (added)
conv also the shift t; the others fold (s, 0), their bias only scaled.  A term e of one value per
channel, broadcast over the map (a diffusion ResBlock's ``conv(x) + time_mlp(t)[:, :, None, None]``),
is s * e, and a subtracted first conv takes the shift negated: BN(e - z) = s e - (s z - t).

After a pixel shuffle (EDSR's upsampler with ``bn=True``: conv, ``PixelShuffle(r)``, BatchNorm2d), output
channel c of the shuffle holds the conv's channels c r^2 .. c r^2 + r^2 - 1, each spread over an r x r block of
pixels: the BN's (s[c], t[c]) meets every one of them, so the conv folds s and t repeated r^2 times each,
W'[o] = W[o] * s[o // r^2], b'[o] = b[o] * s[o // r^2] + t[o // r^2], and the shuffle follows the folded conv.
Repeating them the other way (s[o mod C], a tiling) is wrong wherever the channels differ
(tests/test_proofs.py shows it).

A 3-D convolution (``nn.Conv3d``) is the same sum of weight-times-input terms of one output channel, so
the same W'[o] = W[o] * s[o] holds; two configurations check it with strides, paddings, dilations and groups
on every axis.  A transposed 3-D convolution (``nn.ConvTranspose3d``) folds as the 2-D one, its weight
``(C, O/groups, kd, kh, kw)`` scaled over its first two axes; two configurations check it.

A BN on a channel piece of a conv (IBN-Net: instance norm on the first half of a conv's channels, BN on the rest)
reads conv channels idx[0], idx[1], ...: BN channel j is conv channel idx[j], a per-channel affine of that row only,
so row idx[j] folds (s[j], t[j]) and every row outside idx stays as it was; a piece that reads only rows outside idx
reads the same values from the folded conv.  Three pieces check it: the last channels, a stride, an unordered pick.

Proof method: symbolic x, W, b, mean, var, gamma, beta, eps; the BN scale is kept as the
honest ``gamma / sympy.sqrt(var + eps)``; both sides are compared with
``expand(lhs - rhs) == 0`` element by element. The identity is linear in
1/sqrt(var+eps), so no algebraic simplification of the square root is ever needed.
"""

from __future__ import annotations

import numpy as np
import sympy

from .symbolic import assert_equal, batch_norm, bn_symbols, concat, conv2d, conv3d, conv_symbols, conv_transpose2d, conv_transpose3d, describe, pixel_shuffle, scale, symbols_tensor


def fuse(w, b, mean, var, gamma, beta, eps):
    """Fused (W', b') for conv(W, b) -> BN. ``b`` may be None."""
    O = w.shape[0]
    w2 = np.empty(w.shape, dtype=object)
    b2 = np.empty(O, dtype=object)
    for o in range(O):
        s = gamma[o] / sympy.sqrt(var[o] + eps)
        w2[o] = w[o] * s
        b2[o] = ((b[o] if b is not None else 0) - mean[o]) * s + beta[o]
    return w2, b2


CONFIGS = [
    # C, O, H, W, (kh, kw), stride, padding, dilation, groups, bias
    dict(C=2, O=2, H=4, W=5, k=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1, bias=True),
    dict(C=4, O=4, H=5, W=5, k=(3, 2), stride=(2, 2), padding=(1, 0, 0, 1), dilation=(1, 1), groups=2, bias=False),
    dict(C=2, O=4, H=5, W=5, k=(3, 3), stride=(1, 1), padding=(2, 2, 2, 2), dilation=(2, 2), groups=2, bias=True),
    dict(C=2, O=2, H=4, W=5, k=(1, 3), stride=(2, 1), padding=(0, 0, 1, 1), dilation=(1, 2), groups=2, bias=True),
]


def fuse_transposed(w, b, groups, mean, var, gamma, beta, eps):
    """Fused (W', b') for conv_transpose(W, b) -> BN, with W of shape (C, O/groups, kh, kw)."""
    C, Og = w.shape[:2]
    s = [gamma[o] / sympy.sqrt(var[o] + eps) for o in range(Og * groups)]
    w2 = np.empty(w.shape, dtype=object)
    for i in range(C):
        for j in range(Og):
            w2[i, j] = w[i, j] * s[(i // (C // groups)) * Og + j]
    b2 = np.array([((b[o] if b is not None else 0) - mean[o]) * s[o] + beta[o] for o in range(Og * groups)], dtype=object)
    return w2, b2


TRANSPOSED_CONFIGS = [
    # C, O, H, W, (kh, kw), stride, padding, output_padding, dilation, groups, bias
    dict(C=2, O=3, H=2, W=3, k=(2, 2), stride=(2, 2), padding=(0, 0), output_padding=(0, 0), dilation=(1, 1), groups=1, bias=True),
    dict(C=4, O=2, H=2, W=2, k=(3, 2), stride=(2, 1), padding=(1, 0), output_padding=(1, 0), dilation=(1, 1), groups=2, bias=False),
    dict(C=2, O=4, H=2, W=2, k=(2, 3), stride=(1, 2), padding=(1, 1), output_padding=(1, 1), dilation=(2, 1), groups=2, bias=True),
]


CONFIGS_3D = [
    # C, O, D, H, W, (kd, kh, kw), stride, padding (d, h, w), dilation, groups, bias
    dict(C=2, O=2, D=3, H=3, W=4, k=(3, 1, 2), stride=(1, 1, 2), padding=(1, 0, 1), dilation=(1, 1, 1), groups=1, bias=True),
    dict(C=4, O=2, D=4, H=3, W=3, k=(2, 2, 1), stride=(2, 1, 1), padding=(0, 1, 0), dilation=(2, 1, 1), groups=2, bias=False),
]


TRANSPOSED_CONFIGS_3D = [
    # C, O, D, H, W, (kd, kh, kw), stride, padding, output_padding, dilation (d, h, w), groups, bias
    dict(C=2, O=2, D=2, H=2, W=1, k=(2, 1, 2), stride=(2, 1, 1), padding=(1, 0, 0), output_padding=(1, 0, 0),
         dilation=(1, 1, 1), groups=1, bias=True),
    dict(C=2, O=4, D=1, H=2, W=2, k=(1, 2, 2), stride=(1, 2, 1), padding=(0, 1, 0), output_padding=(0, 0, 1),
         dilation=(1, 1, 2), groups=2, bias=False),
]


def prove() -> list[str]:
    done = []
    for cfg in CONFIGS:
        O, g = cfg["O"], cfg["groups"]
        x, w, b = conv_symbols(cfg)
        bn = bn_symbols("", O)
        conv_kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=g)
        lhs = batch_norm(conv2d(x, w, b, **conv_kw), *bn)
        w2, b2 = fuse(w, b, *bn)
        rhs = conv2d(x, w2, b2, **conv_kw)
        desc = describe("conv->BN == conv", **cfg)
        assert_equal(lhs, rhs, "bn_fold " + desc)
        done.append(desc)
    for cfg in TRANSPOSED_CONFIGS + TRANSPOSED_CONFIGS_3D:
        C, O, g = cfg["C"], cfg["O"], cfg["groups"]
        volume = "D" in cfg
        op, name = (conv_transpose3d, "conv_transpose3d") if volume else (conv_transpose2d, "conv_transpose")
        x = symbols_tensor("x", (C, *(cfg[a] for a in ("D", "H", "W")[1 - volume:])))
        w = symbols_tensor("w", (C, O // g, *cfg["k"]))
        b = symbols_tensor("b", (O,)) if cfg["bias"] else None
        bn = bn_symbols("", O)
        kw = dict(stride=cfg["stride"], padding=cfg["padding"], output_padding=cfg["output_padding"],
                  dilation=cfg["dilation"], groups=g)
        lhs = batch_norm(op(x, w, b, **kw), *bn)
        rhs = op(x, *fuse_transposed(w, b, g, *bn), **kw)
        desc = describe(f"{name}->BN == {name}", **cfg)
        assert_equal(lhs, rhs, "bn_fold " + desc)
        done.append(desc)
    for cfg in CONFIGS_3D:
        C, O, g = cfg["C"], cfg["O"], cfg["groups"]
        x = symbols_tensor("x", (C, cfg["D"], cfg["H"], cfg["W"]))
        w = symbols_tensor("w", (O, C // g, *cfg["k"]))
        b = symbols_tensor("b", (O,)) if cfg["bias"] else None
        bn = bn_symbols("", O)
        kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=g)
        lhs = batch_norm(conv3d(x, w, b, **kw), *bn)
        rhs = conv3d(x, *fuse(w, b, *bn), **kw)
        desc = describe("conv3d->BN == conv3d", **cfg)
        assert_equal(lhs, rhs, "bn_fold " + desc)
        done.append(desc)
    done.append(prove_concat())
    done.append(prove_sum())
    done.append(prove_sum_with_term())
    done.extend(prove_shuffle(cfg) for cfg in SHUFFLE_CONFIGS)
    done.extend(prove_piece(mine, rest) for mine, rest in PIECES)
    return done


# A conv to C r^2 channels, pixel_shuffle(r), BN on the C channels: (r, C, conv config without O).
SHUFFLE_CONFIGS = [
    dict(r=2, C=2, conv=dict(C=2, H=2, W=2, k=(3, 3), padding=(1, 1, 1, 1), groups=1, bias=True)),
    dict(r=3, C=2, conv=dict(C=1, H=2, W=1, k=(1, 1), padding=(0, 0, 0, 0), groups=1, bias=False)),
    dict(r=2, C=2, conv=dict(C=2, H=1, W=2, k=(1, 3), padding=(0, 0, 1, 1), groups=2, bias=True)),
]


def _shuffle_sides(cfg, repeat):
    """BN(pixel_shuffle(conv(x))) and pixel_shuffle(conv'(x)) with conv' folding (s, t) spread by ``repeat(o)``."""
    r, C = cfg["r"], cfg["C"]
    conv = dict(cfg["conv"], O=C * r * r)
    x, w, b = conv_symbols(conv)
    mean, var, gamma, beta, eps = bn_symbols("", C)
    kw = dict(padding=conv["padding"], groups=conv["groups"])
    lhs = batch_norm(pixel_shuffle(conv2d(x, w, b, **kw), r), mean, var, gamma, beta, eps)
    spread = [repeat(o) for o in range(C * r * r)]
    w2, b2 = fuse(w, b, *(np.array([p[c] for c in spread], dtype=object) for p in (mean, var, gamma, beta)), eps)
    return lhs, pixel_shuffle(conv2d(x, w2, b2, **kw), r)


def prove_shuffle(cfg) -> str:
    """BN(pixel_shuffle(conv(x), r)) == pixel_shuffle(conv'(x), r): conv output channel o folds BN channel o // r^2."""
    r = cfg["r"]
    lhs, rhs = _shuffle_sides(cfg, lambda o: o // (r * r))
    desc = describe("conv->pixel_shuffle->BN == conv'->pixel_shuffle", r=r, C_bn=cfg["C"], **cfg["conv"])
    assert_equal(lhs, rhs, "bn_fold " + desc)
    return desc


# A conv of 5 channels read by two pieces that share none: (the BN's channels in its order, the other piece's).
PIECES = [([3, 4], [0, 1, 2]), ([1, 3], [0, 2, 4]), ([4, 0, 2], [1])]


def piece_rows(w, b, mine, mean, var, gamma, beta, eps):
    """Fused (W', b') for a conv whose channels ``mine`` (in the BN's order) a BN reads: row ``mine[j]`` folds BN
    channel j, the other rows stay as they were."""
    w2, b2 = w.copy(), (b.copy() if b is not None else np.array([sympy.Integer(0)] * w.shape[0], dtype=object))
    for j, o in enumerate(mine):
        s = gamma[j] / sympy.sqrt(var[j] + eps)
        w2[o] = w[o] * s
        b2[o] = (b2[o] - mean[j]) * s + beta[j]
    return w2, b2


def prove_piece(mine, rest) -> str:
    """BN(conv(x)[mine]) == conv'(x)[mine] and conv(x)[rest] == conv'(x)[rest]: conv' folds the BN into the rows its
    piece reads (a split's, a stride's, any order), and the other piece reads the same values from it as before."""
    cfg = dict(C=2, O=5, H=3, W=3, k=(3, 3), groups=1, bias=True)
    x, w, b = conv_symbols(cfg)
    bn = bn_symbols("", len(mine))
    z = conv2d(x, w, b, padding=(1, 1, 1, 1))
    z2 = conv2d(x, *piece_rows(w, b, mine, *bn), padding=(1, 1, 1, 1))
    assert_equal(batch_norm(z[mine], *bn), z2[mine], f"bn_fold piece {mine} of a conv")
    assert_equal(z[rest], z2[rest], f"bn_fold the other piece {rest} of the conv")
    return f"conv 3x3 with bias, channels {mine}->BN and channels {rest} == conv' (rows {mine} folded), the same pieces"


def prove_concat() -> str:
    """BN(cat(conv_a(x_a), conv_b(x_b))) == cat(conv_a'(x_a), conv_b'(x_b)): a 3x3 conv with bias and a grouped
    1x1 without, on inputs of their own, each folding its slice of one BN."""
    a = dict(C=2, O=2, H=3, W=3, k=(3, 3), groups=1, bias=True)
    b = dict(C=2, O=4, H=3, W=3, k=(1, 1), groups=2, bias=False)
    (xa, wa, ba), (xb, wb, bb) = conv_symbols(a), conv_symbols(b)
    xb = symbols_tensor("y", xb.shape)  # its own input
    wb = symbols_tensor("v", wb.shape)
    bn = bn_symbols("", 6)
    lhs = batch_norm(concat([conv2d(xa, wa, ba, padding=(1, 1, 1, 1)), conv2d(xb, wb, bb, groups=2)]), *bn)
    wa2, ba2 = fuse(wa, ba, *(p[:2] for p in bn[:4]), bn[4])
    wb2, bb2 = fuse(wb, bb, *(p[2:] for p in bn[:4]), bn[4])
    rhs = concat([conv2d(xa, wa2, ba2, padding=(1, 1, 1, 1)), conv2d(xb, wb2, bb2, groups=2)])
    assert_equal(lhs, rhs, "bn_fold concat of convs")
    return "cat(conv 3x3 with bias, grouped conv 1x1)->BN == cat(folded convs)"


def prove_sum() -> str:
    """BN((conv_a(x) - conv_b(y)) + conv_c(z)) == (conv_a'(x) - conv_b'(y)) + conv_c'(z): conv_a folds the BN's
    scale and shift, conv_b and conv_c only its scale (their biases scaled, no shift)."""
    a = dict(C=2, O=2, H=3, W=3, k=(3, 3), groups=1, bias=True)
    b = dict(C=2, O=2, H=3, W=3, k=(1, 1), groups=2, bias=True)
    c = dict(C=1, O=2, H=3, W=3, k=(1, 3), groups=1, bias=False)
    (xa, wa, ba), (_, wb, bb), (_, wc, _) = conv_symbols(a), conv_symbols(b), conv_symbols(c)
    xb, xc = symbols_tensor("y", (2, 3, 3)), symbols_tensor("z", (1, 3, 3))
    wb, bb, wc = symbols_tensor("v", wb.shape), symbols_tensor("d", bb.shape), symbols_tensor("u", wc.shape)
    mean, var, gamma, beta, eps = bn_symbols("", 2)
    za = conv2d(xa, wa, ba, padding=(1, 1, 1, 1))
    zb = conv2d(xb, wb, bb, groups=2)
    zc = conv2d(xc, wc, None, padding=(0, 0, 1, 1))
    lhs = batch_norm((za - zb) + zc, mean, var, gamma, beta, eps)
    zero = np.array([sympy.Integer(0)] * 2, dtype=object)
    unshifted = (zero, var, gamma, zero, eps)  # scale s = gamma / sqrt(var + eps), shift 0: mean and beta 0
    wa2, ba2 = fuse(wa, ba, mean, var, gamma, beta, eps)
    wb2, bb2 = fuse(wb, bb, *unshifted)
    wc2, bc2 = fuse(wc, None, *unshifted)
    rhs = (conv2d(xa, wa2, ba2, padding=(1, 1, 1, 1)) - conv2d(xb, wb2, bb2, groups=2)) + conv2d(xc, wc2, bc2, padding=(0, 0, 1, 1))
    assert_equal(lhs, rhs, "bn_fold sum of convs")
    return "(conv 3x3 with bias - grouped conv 1x1 with bias) + conv 1x3 without, ->BN == the sum of the folded convs (the shift in the first)"


def prove_sum_with_term() -> str:
    """BN(e - conv(x)) == s * e - conv'(x; s W, s b - t), e one value per channel broadcast over the map: the scale
    s = gamma / sqrt(var + eps) multiplies the term, and the conv, subtracted, takes the shift t = beta - mean s
    negated."""
    cfg = dict(C=2, O=2, H=3, W=3, k=(3, 3), groups=1, bias=True)
    x, w, b = conv_symbols(cfg)
    e = symbols_tensor("e", (2,))
    mean, var, gamma, beta, eps = bn_symbols("", 2)
    z = conv2d(x, w, b, padding=(1, 1, 1, 1))
    term = np.empty(z.shape, dtype=object)
    for idx in np.ndindex(z.shape):
        term[idx] = e[idx[0]]
    lhs = batch_norm(term - z, mean, var, gamma, beta, eps)
    s = np.array([gamma[o] / sympy.sqrt(var[o] + eps) for o in range(2)], dtype=object)
    t = np.array([beta[o] - mean[o] * s[o] for o in range(2)], dtype=object)
    w2 = np.empty(w.shape, dtype=object)
    for idx in np.ndindex(w.shape):
        w2[idx] = w[idx] * s[idx[0]]
    rhs = scale(term, s) - conv2d(x, w2, s * b - t, padding=(1, 1, 1, 1))
    assert_equal(lhs, rhs, "bn_fold sum with a per-channel term")
    return "(e per channel, broadcast) - conv 3x3 with bias, ->BN == s * e - the folded conv (the shift negated)"
