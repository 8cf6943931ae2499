"""scale_fold: a per-channel scale after a conv folds into the conv.

Identity: for a per-output-channel scale s (e.g. layer scale, or the gamma of a BN-free
affine), any stride, padding, dilation and groups,

    s[o] * conv(x; W, b)[o] == conv(x; W', b')[o]
    with W'[o] = s[o] * W[o]  and  b'[o] = s[o] * b[o]   (no bias stays no bias).

This is linearity of conv2d in (W, b) for each output channel separately.
Precondition: s is constant per output channel (not spatially varying, not input-dependent).

Proof: symbolic x, W, b, s; expand(lhs - rhs) == 0 elementwise.
"""

from __future__ import annotations

import numpy as np

from .symbolic import conv_symbols, assert_equal, conv2d, describe, scale, symbols_tensor


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


def prove() -> list[str]:
    done = []
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
