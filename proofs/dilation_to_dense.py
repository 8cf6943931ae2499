"""dilation_to_dense: a dilated kernel is an undilated kernel with zeros between the taps.

Identity: for W of shape (O, C/G, kh, kw) and dilation (dh, dw) define W~ of shape
((kh-1)*dh + 1) x ((kw-1)*dw + 1) by

    W~[o, i, u*dh, v*dw] = W[o, i, u, v],   all other taps 0.

Then conv(x; W, b, dilation=(dh, dw)) == conv(x; W~, b, dilation=(1, 1)) with the same
stride, padding and groups. Reason: tap u of W reads row p*sh + u*dh, which is where tap
u*dh of W~ reads with dilation 1; the output size formula H + pt + pb - dh*(kh-1) - 1 is the
same for both since the extents agree.

Proof: symbolic x, W, b; expand(lhs - rhs) == 0 elementwise.
"""

from __future__ import annotations

from .symbolic import conv_symbols, assert_equal, conv2d, describe, pair, zeros


def fuse(w, dilation):
    """Dense kernel W~ equivalent to W with the given dilation."""
    dh, dw = pair(dilation)
    O, Cg, kh, kw = w.shape
    w2 = zeros((O, Cg, (kh - 1) * dh + 1, (kw - 1) * dw + 1))
    for u in range(kh):
        for v in range(kw):
            w2[:, :, u * dh, v * dw] = w[:, :, u, v]
    return w2


CONFIGS = [
    dict(C=2, O=2, H=5, W=5, k=(3, 3), dilation=(2, 2), stride=(1, 1), padding=(2, 2, 2, 2), groups=1),
    dict(C=2, O=4, H=5, W=5, k=(2, 3), dilation=(2, 2), stride=(2, 2), padding=(1, 0, 2, 1), groups=2),
    dict(C=2, O=2, H=4, W=6, k=(2, 2), dilation=(1, 3), stride=(1, 2), padding=(0, 1, 1, 1), groups=2),
    dict(C=2, O=2, H=7, W=3, k=(3, 1), dilation=(3, 1), stride=(1, 1), padding=(0, 0, 0, 0), groups=1),
]


def prove() -> list[str]:
    done = []
    for cfg in CONFIGS:
        g = cfg["groups"]
        x, w, b = conv_symbols(cfg, bias=True)
        kw = dict(stride=cfg["stride"], padding=cfg["padding"], groups=g)
        lhs = conv2d(x, w, b, dilation=cfg["dilation"], **kw)
        rhs = conv2d(x, fuse(w, cfg["dilation"]), b, dilation=(1, 1), **kw)
        desc = describe("dilated == dense with zero taps", **cfg)
        assert_equal(lhs, rhs, "dilation_to_dense " + desc)
        done.append(desc)
    return done
