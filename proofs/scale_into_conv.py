"""scale_into_conv: a per-channel scale before a conv folds into its kernel, zero padding or not.

Identity: for a scale s[c] per input channel (one number for all channels is the case s[c] = s),
a conv W (O, C/G, kh, kw), bias b (or none), groups G, any stride, dilation and zero padding,
and c(o, i) = (o // (O/G)) * (C/G) + i the input channel that weight row (o, i) reads:

    W'[o, i, u, v] = W[o, i, u, v] * s[c(o, i)]        (b unchanged)

    conv(s * x; W, b) == conv(x; W', b).

Why: every tap multiplies one element of the padded input by one weight. Inside the image that
element is s[c] * x[c, ...], and the weight can carry s[c] instead; in the padding it is 0 =
s[c] * 0, so padding x and scaling the kernel gives the same border. Unlike bn_before_conv there
is no shift, so no padding condition: the shift is what makes BN(0) != 0.

Proof: symbolic x, W, b, s; expand(lhs - rhs) == 0 elementwise, padded and strided configurations
included.
"""

from __future__ import annotations

import numpy as np

from .symbolic import assert_equal, conv2d, conv_symbols, describe, scale, symbols_tensor


def fuse(w, s, groups: int = 1):
    """W' with conv(s * x; W) == conv(x; W'); ``s`` has one entry per input channel."""
    O, Cg = w.shape[:2]
    w2 = np.empty(w.shape, dtype=object)
    for o in range(O):
        c0 = (o // (O // groups)) * Cg
        for i in range(Cg):
            w2[o, i] = w[o, i] * s[c0 + i]
    return w2


CONFIGS = [
    dict(C=2, O=2, H=3, W=4, k=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1, bias=True, s="per channel"),
    dict(C=2, O=3, H=4, W=4, k=(3, 3), stride=(2, 2), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1, bias=False, s="per channel"),
    dict(C=4, O=4, H=4, W=4, k=(2, 3), stride=(1, 2), padding=(0, 1, 1, 1), dilation=(1, 1), groups=2, bias=True, s="per channel"),
    dict(C=2, O=2, H=5, W=5, k=(3, 3), stride=(1, 1), padding=(2, 2, 2, 2), dilation=(2, 2), groups=2, bias=False, s="one number"),
]


def prove() -> list[str]:
    done = []
    for cfg in CONFIGS:
        x, w, b = conv_symbols(cfg)
        C, g = cfg["C"], cfg["groups"]
        s = symbols_tensor("s", (C,)) if cfg["s"] == "per channel" else np.repeat(symbols_tensor("s", (1,)), C)
        kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=g)
        lhs = conv2d(scale(x, s), w, b, **kw)
        rhs = conv2d(x, fuse(w, s, g), b, **kw)
        desc = describe("conv(s * x; W, b) == conv(x; W * s[in], b)", **cfg)
        assert_equal(lhs, rhs, "scale_into_conv " + desc)
        done.append(desc)
    return done
