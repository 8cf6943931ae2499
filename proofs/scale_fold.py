"""scale_fold: a per-channel scale after a conv folds into the conv.

Identity: for a per-output-channel scale s (e.g. layer scale, or the gamma of a BN-free
affine), any stride, padding, dilation and groups,

    s[o] * conv(x; W, b)[o] == conv(x; W', b')[o]
    with W'[o] = s[o] * W[o]  and  b'[o] = s[o] * b[o]   (no bias stays no bias).

This is linearity of the conv in (W, b) for each output channel separately, 2-D or 3-D.
Precondition: s is constant per output channel (not spatially varying, not input-dependent).

Proof: symbolic x, W, b, s; expand(lhs - rhs) == 0 elementwise.
"""

from __future__ import annotations

import numpy as np

from .symbolic import conv_symbols, assert_equal, conv2d, conv3d, describe, scale, symbols_tensor


def fuse(w, b, s):
    """(W', b') with s * conv(x; W, b) == conv(x; W', b')."""
    w2 = scale(w, s)
    b2 = None if b is None else np.array([s[o] * b[o] for o in range(len(b))], dtype=object)
    return w2, b2


CONFIGS = [
    dict(C=2, O=2, H=4, W=5, k=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1, bias=True),
    dict(C=4, O=4, H=5, W=5, k=(2, 3), stride=(2, 2), padding=(0, 1, 1, 1), dilation=(1, 1), groups=2, bias=False),
    dict(C=2, O=2, H=5, W=5, k=(3, 3), stride=(1, 1), padding=(2, 2, 2, 2), dilation=(2, 2), groups=2, bias=True),
]


# A frozen BatchNorm3d written as arithmetic after a Conv3d (PySlowFast's SubBatchNorm3d): (kd, kh, kw), (d, h, w)
CONFIGS_3D = [
    dict(C=2, O=2, D=3, H=3, W=4, k=(3, 1, 2), stride=(1, 1, 2), padding=(1, 0, 1), dilation=(1, 1, 1), groups=1, bias=True),
    dict(C=4, O=2, D=4, H=3, W=3, k=(2, 2, 1), stride=(2, 1, 1), padding=(0, 1, 0), dilation=(2, 1, 1), groups=2, bias=False),
]


def prove() -> list[str]:
    done = []
    for cfg in CONFIGS_3D:
        C, O, g = cfg["C"], cfg["O"], cfg["groups"]
        x = symbols_tensor("x", (C, cfg["D"], cfg["H"], cfg["W"]))
        w = symbols_tensor("w", (O, C // g, *cfg["k"]))
        b = symbols_tensor("b", (O,)) if cfg["bias"] else None
        s = symbols_tensor("s", (O,))
        kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=g)
        desc = describe("s * conv3d == conv3d(s*W, s*b)", **cfg)
        assert_equal(scale(conv3d(x, w, b, **kw), s), conv3d(x, *fuse(w, b, s), **kw), "scale_fold " + desc)
        done.append(desc)
    for cfg in CONFIGS:
        O, g = cfg["O"], cfg["groups"]
        x, w, b = conv_symbols(cfg)
        s = symbols_tensor("s", (O,))
        kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=g)
        lhs = scale(conv2d(x, w, b, **kw), s)
        rhs = conv2d(x, *fuse(w, b, s), **kw)
        desc = describe("s * conv == conv(s*W, s*b)", **cfg)
        assert_equal(lhs, rhs, "scale_fold " + desc)
        done.append(desc)
    return done
