"""pad_absorb: an explicit zero pad followed by a conv is the conv with more padding.

Identity: for zero padding P = (t, b, l, r) (asymmetric allowed) and a conv with padding
(pt, pb, pl, pr), any stride, dilation and groups,

    conv(pad(x, P); W, bias, padding=(pt, pb, pl, pr))
        == conv(x; W, bias, padding=(pt + t, pb + b, pl + l, pr + r)).

Reason: zero padding composes additively (pad(pad(x, P), Q) == pad(x, P + Q)) and conv2d
pads its input with zeros before sliding the window. Preconditions: the explicit pad is a
*zero* (constant 0) pad with non-negative amounts; reflect/replicate pads are not absorbed.

Proof: symbolic x, W, bias; expand(lhs - rhs) == 0 elementwise.
"""

from __future__ import annotations

from .symbolic import conv_symbols, assert_equal, conv2d, describe, norm_pads, pad


def fuse(pads, conv_padding):
    """New conv padding after absorbing the explicit zero pad ``pads``."""
    t, b, l, r = norm_pads(pads)
    pt, pb, pl, pr = norm_pads(conv_padding)
    return (pt + t, pb + b, pl + l, pr + r)


CONFIGS = [
    dict(C=2, O=2, H=4, W=5, k=(3, 3), pads=(1, 1, 1, 1), padding=(0, 0, 0, 0), stride=(1, 1), dilation=(1, 1), groups=1),
    dict(C=2, O=2, H=4, W=5, k=(3, 3), pads=(0, 1, 0, 1), padding=(0, 0, 0, 0), stride=(2, 2), dilation=(1, 1), groups=2),
    dict(C=2, O=4, H=5, W=4, k=(2, 3), pads=(2, 0, 1, 0), padding=(1, 1, 0, 1), stride=(1, 2), dilation=(2, 1), groups=2),
    dict(C=3, O=2, H=4, W=4, k=(1, 1), pads=(0, 2, 1, 0), padding=(0, 0, 0, 0), stride=(1, 1), dilation=(1, 1), groups=1),
]


def prove() -> list[str]:
    done = []
    for cfg in CONFIGS:
        g = cfg["groups"]
        x, w, b = conv_symbols(cfg, bias=True)
        kw = dict(stride=cfg["stride"], dilation=cfg["dilation"], groups=g)
        lhs = conv2d(pad(x, cfg["pads"]), w, b, padding=cfg["padding"], **kw)
        rhs = conv2d(x, w, b, padding=fuse(cfg["pads"], cfg["padding"]), **kw)
        desc = describe("pad -> conv == conv(padding + pad)", **cfg)
        assert_equal(lhs, rhs, "pad_absorb " + desc)
        done.append(desc)
    return done
