"""kernel_pad: zero-padding a kernel while padding the input more leaves a conv unchanged.

Identity: let W have shape (O, C/G, kh, kw) and let W^ be W zero-padded by a rows on top,
b rows at the bottom, c columns on the left and d on the right (shape (kh+a+b) x (kw+c+d)):

    W^[o, i, u + a, v + c] = W[o, i, u, v],   all other taps 0.

With conv padding (pt, pb, pl, pr) and dilation (dh, dw), set the new padding to

    (pt + a*dh, pb + b*dh, pl + c*dw, pr + d*dw).

Then conv(x; W, b, padding) == conv(x; W^, b, new padding) for every stride, dilation and
groups. Reason: tap (u + a) of W^ reads padded row p*sh + (u + a)*dh of an input padded by
a*dh more rows on top, i.e. the same input row as tap u of W; the added zero taps contribute
nothing, and the output size is unchanged because the growth of the kernel extent equals the
growth of the padding.

Typical uses: 1x1 -> 3x3 centred (a=b=c=d=1, RepVGG), 1x3 / 3x1 -> 3x3 (ACNet, a=b=1 or
c=d=1), and aligning kernels of different sizes before branch_sum.

Proof: symbolic x, W, b; expand(lhs - rhs) == 0 elementwise.
"""

from __future__ import annotations

from .symbolic import conv_symbols, assert_equal, conv2d, conv3d, describe, norm_pads, pair, symbols_tensor, zeros


def fuse(w, padding, kpad, dilation=(1, 1)):
    """Return (W^, new_padding) for kernel padding kpad = (a, b, c, d) = (top, bottom, left, right)."""
    a, b, c, d = norm_pads(kpad)
    dh, dw = pair(dilation)
    pt, pb, pl, pr = norm_pads(padding)
    O, Cg, kh, kw = w.shape
    w2 = zeros((O, Cg, kh + a + b, kw + c + d))
    w2[:, :, a:a + kh, c:c + kw] = w
    return w2, (pt + a * dh, pb + b * dh, pl + c * dw, pr + d * dw)


CONFIGS = [
    dict(name="1x1 -> 3x3 centred", C=2, O=2, H=4, W=5, k=(1, 1), kpad=(1, 1, 1, 1), padding=(0, 0, 0, 0), stride=(1, 1), dilation=(1, 1), groups=1),
    dict(name="1x3 -> 3x3 (ACNet)", C=2, O=2, H=5, W=5, k=(1, 3), kpad=(1, 1, 0, 0), padding=(0, 0, 1, 1), stride=(2, 2), dilation=(1, 1), groups=2),
    dict(name="3x1 -> 3x3 (ACNet)", C=4, O=4, H=5, W=4, k=(3, 1), kpad=(0, 0, 1, 1), padding=(1, 1, 0, 0), stride=(1, 1), dilation=(1, 1), groups=2),
    dict(name="2x3 -> 4x5 asymmetric", C=2, O=2, H=5, W=5, k=(2, 3), kpad=(2, 0, 0, 2), padding=(1, 0, 0, 1), stride=(2, 1), dilation=(1, 1), groups=1),
    dict(name="1x1 -> 3x3 dilated", C=2, O=2, H=5, W=5, k=(1, 1), kpad=(1, 1, 1, 1), padding=(0, 0, 0, 0), stride=(1, 2), dilation=(2, 2), groups=2),
]


def prove() -> list[str]:
    done = []
    for cfg in CONFIGS:
        g = cfg["groups"]
        x, w, b = conv_symbols(cfg, bias=True)
        kw = dict(stride=cfg["stride"], dilation=cfg["dilation"], groups=g)
        lhs = conv2d(x, w, b, padding=cfg["padding"], **kw)
        w2, pad2 = fuse(w, cfg["padding"], cfg["kpad"], cfg["dilation"])
        rhs = conv2d(x, w2, b, padding=pad2, **kw)
        desc = describe("kernel zero-pad", **cfg)
        assert_equal(lhs, rhs, "kernel_pad " + desc)
        done.append(desc)
    # A conv3d (padding on both sides of each axis alike): a 1x1x1 grows by a tap on both sides of each axis,
    # its padding by the dilation, as a 3-D RepVGG block's 1x1x1 inside its 3x3x3.
    x, w, b = symbols_tensor("x", (2, 3, 4, 5)), symbols_tensor("w", (2, 1, 1, 1, 1)), symbols_tensor("b", (2,))
    w3 = zeros((2, 1, 3, 3, 3))
    w3[:, :, 1, 1, 1] = w[:, :, 0, 0, 0]
    kw = dict(stride=(1, 2, 1), groups=2)
    lhs = conv3d(x, w, b, padding=(0, 0, 0), dilation=(1, 1, 2), **kw)
    rhs = conv3d(x, w3, b, padding=(1, 1, 2), dilation=(1, 1, 2), **kw)
    desc = describe("conv3d kernel zero-pad, 1x1x1 -> 3x3x3 centred", x=(2, 3, 4, 5), dilation=(1, 1, 2), **kw)
    assert_equal(lhs, rhs, "kernel_pad " + desc)
    done.append(desc)
    return done
