"""bn_to_conv: a lone eval-mode BatchNorm is a 1x1 (grouped) convolution.

Identity: for C channels and any target groups G with G | C, put n = C/G and

    s[c] = gamma[c] / sqrt(var[c] + eps),   t[c] = beta[c] - mean[c] * s[c]

    K[c, i, 0, 0] = s[c]  if i == c mod n  else 0      (K has shape (C, C/G, 1, 1))
    bias[c]       = t[c]

    BN(x) == conv(x; K, bias, groups=G, stride 1, padding 0, dilation 1).

Output channel c lies in group c // n, whose input channels start at (c // n) * n, so the
local index c mod n selects exactly input channel c: the kernel is a (grouped) diagonal.
G = C gives the depthwise form, G = 1 the dense (C, C, 1, 1) form. Combine with kernel_pad
to obtain a kxk kernel for branch summation.

A per-channel scale x * s[c] (YOLOv6's LinearAddBlock branch) is the same kernel without a
bias: scale(x; s) == conv(x; K with K[c, c mod n] = s[c], groups=G).  An affine map per channel
plus a shift, sign * (s[c] x + t[c]) + c[c] (FrozenBatchNorm2d's x * scale + bias), is the kernel
of sign * s with the bias sign * t + c.

Proof: symbolic x and BN parameters, BN scale kept as gamma/sympy.sqrt(var+eps) (linear in
1/sqrt(var+eps), no simplification of roots needed); expand(lhs - rhs) == 0 elementwise.
"""

from __future__ import annotations

import numpy as np
import sympy

from .symbolic import assert_equal, batch_norm, bn_symbols, conv2d, conv3d, describe, symbols_tensor, zeros


def fuse(mean, var, gamma, beta, eps, groups: int):
    """(K, bias) with BN(x) == conv(x; K, bias, groups=groups)."""
    C = len(mean)
    if C % groups:
        raise ValueError(f"groups={groups} must divide C={C}")
    n = C // groups
    k = zeros((C, n, 1, 1))
    bias = np.empty(C, dtype=object)
    for c in range(C):
        s = gamma[c] / sympy.sqrt(var[c] + eps)
        k[c, c % n, 0, 0] = s
        bias[c] = beta[c] - mean[c] * s
    return k, bias


CONFIGS = [
    dict(C=2, G=2, H=4, W=5),   # depthwise
    dict(C=3, G=1, H=4, W=4),   # dense
    dict(C=4, G=2, H=3, W=5),   # grouped
    dict(C=6, G=3, H=2, W=3),
]


def prove() -> list[str]:
    done = []
    for cfg in CONFIGS:
        C, G = cfg["C"], cfg["G"]
        x = symbols_tensor("x", (C, cfg["H"], cfg["W"]))
        bn = bn_symbols("", C)
        lhs = batch_norm(x, *bn)
        k, bias = fuse(*bn, groups=G)
        rhs = conv2d(x, k, bias, groups=G)
        desc = describe("BN == conv1x1(grouped diagonal)", **cfg)
        assert_equal(lhs, rhs, "bn_to_conv " + desc)
        done.append(desc)
    for cfg in CONFIGS[:3]:
        C, G = cfg["C"], cfg["G"]
        x, sc = symbols_tensor("x", (C, cfg["H"], cfg["W"])), symbols_tensor("s", (C,))
        n = C // G
        k = zeros((C, n, 1, 1))
        for c in range(C):
            k[c, c % n, 0, 0] = sc[c]
        lhs = np.empty(x.shape, dtype=object)
        for idx in np.ndindex(x.shape):
            lhs[idx] = x[idx] * sc[idx[0]]
        desc = describe("x * s[c] == conv1x1(grouped diagonal of s), no bias", **cfg)
        assert_equal(lhs, conv2d(x, k, None, groups=G), "bn_to_conv " + desc)
        done.append(desc)
    # Any affine map per channel plus a shift (FrozenBatchNorm2d's x * scale + bias, c - y): the diagonal of sign * s,
    # the bias sign * t + c.
    for sign in (1, -1):
        C, G = 4, 2
        x = symbols_tensor("x", (C, 2, 3))
        sc, t, c = symbols_tensor("s", (C,)), symbols_tensor("t", (C,)), symbols_tensor("c", (C,))
        n = C // G
        k = zeros((C, n, 1, 1))
        for ch in range(C):
            k[ch, ch % n, 0, 0] = sign * sc[ch]
        lhs = np.empty(x.shape, dtype=object)
        for idx in np.ndindex(x.shape):
            lhs[idx] = sign * (x[idx] * sc[idx[0]] + t[idx[0]]) + c[idx[0]]
        desc = describe(f"{'' if sign == 1 else '-'}(s x + t) + c == conv1x1(diagonal of sign s, bias sign t + c)", C=C, G=G, H=2, W=3)
        assert_equal(lhs, conv2d(x, k, np.array([sign * t[ch] + c[ch] for ch in range(C)], dtype=object), groups=G),
                     "bn_to_conv " + desc)
        done.append(desc)
    # BatchNorm3d beside a conv3d: the same kernel with a third unit axis.
    x, bn = symbols_tensor("x", (4, 2, 3, 2)), bn_symbols("", 4)
    k, bias = fuse(*bn, groups=2)
    desc = describe("BN3d == conv1x1x1(grouped diagonal)", C=4, G=2, D=2, H=3, W=2)
    assert_equal(batch_norm(x, *bn), conv3d(x, k[..., None], bias, groups=2), "bn_to_conv " + desc)
    done.append(desc)
    return done
