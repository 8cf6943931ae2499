"""pad_share: a conv with no padding of its own reads a padded copy of its input, its kernel padded to match.

Identity: for a pad of mode m in {reflect, replicate, circular, constant c} by (t, b, l, r) >= 0,
any stride, groups and bias, and a dilation d dividing the pad amounts on each axis with several taps
(an axis of one tap takes any d dividing its amounts),

    conv(x; W, bias, dilation d) == conv(pad_m(x; t, b, l, r); pad_0(W; t/d, b/d, l/d, r/d), bias, dilation d).

Reason: every mode copies x into the interior of the padded map, pad_m(x)[i + t, j + l] = x[i, j];
output pixel (p, q) of the right side reads pad_m(x)[s p + u, s q + v] times the padded kernel's tap
(u, v), which is W[u - t, v - l] inside the old kernel (reading x[s p + u - t, s q + v - l], the
left side's pixel) and 0 outside it (whatever the border holds); with dilation d read every offset
times d. Both sides have floor((H - (kh - 1) d - 1) / s) + 1 output rows: the input grew by t + b
rows, the kernel's extent too.

So RepVGG's 1x1 branch, centred (t = b = l = r = 1), is a 3x3 of the reflect-padded map that its
3x3 branch reads, and the two sum to one conv (branch_sum); a BN or identity branch is a 1x1 first
(bn_to_conv, identity_to_conv).

Preconditions, each shown REFUSED below by a symbolic counterexample:
* the conv has no zero padding of its own: it reads 0 where the padded copy holds copied pixels;
* the pad amounts are >= 0: a negative amount crops, and x's first row is no longer at offset t;
* a dilation dividing the pad amounts: the kernel grows by whole taps; padded by undilated taps
  instead, a dilated kernel's old taps would land between x's pixels they read.

Proof: symbolic x, W, bias and pad value; expand(lhs - rhs) == 0 elementwise.
"""

from __future__ import annotations

import numpy as np
import sympy

from .symbolic import assert_differs, assert_equal, conv2d, conv_symbols, describe


def pad_mode(x: np.ndarray, pads, mode: str, value=0) -> np.ndarray:
    """``F.pad`` of a (C, H, W) tensor by (top, bottom, left, right) >= 0 in ``mode``: each padded position reads
    the pixel its mode names (reflect: mirrored without repeating the edge; replicate: the nearest edge pixel;
    circular: wrapped around), or ``value`` for constant."""
    t, b, l, r = pads
    C, H, W = x.shape
    index = {
        "reflect": lambda i, n: -i if i < 0 else 2 * (n - 1) - i if i >= n else i,
        "replicate": lambda i, n: min(max(i, 0), n - 1),
        "circular": lambda i, n: i % n,
    }
    out = np.empty((C, H + t + b, W + l + r), dtype=object)
    for i in range(-t, H + b):
        for j in range(-l, W + r):
            if mode == "constant":
                inside = 0 <= i < H and 0 <= j < W
                out[:, i + t, j + l] = x[:, i, j] if inside else value
            else:
                out[:, i + t, j + l] = x[:, index[mode](i, H), index[mode](j, W)]
    return out


def pad_kernel(w: np.ndarray, pads) -> np.ndarray:
    """The kernel ``w`` (O, C/g, kh, kw) with zero taps added: ``t`` rows on top, ``b`` below, ``l`` and ``r`` columns."""
    t, b, l, r = pads
    O, Cg, kh, kw = w.shape
    out = np.full((O, Cg, kh + t + b, kw + l + r), sympy.Integer(0), dtype=object)
    out[:, :, t:t + kh, l:l + kw] = w
    return out


CONFIGS = [  # the conv of x: kernel k, stride, groups; the pad: amounts and mode
    dict(C=2, O=2, H=4, W=4, k=(1, 1), stride=(1, 1), groups=1, bias=True, pads=(1, 1, 1, 1), mode="reflect"),
    dict(C=2, O=2, H=4, W=5, k=(1, 1), stride=(1, 1), groups=2, bias=True, pads=(1, 1, 1, 1), mode="circular"),
    dict(C=2, O=4, H=5, W=4, k=(1, 2), stride=(2, 1), groups=2, bias=False, pads=(2, 0, 1, 1), mode="replicate"),
    dict(C=3, O=3, H=4, W=5, k=(2, 1), stride=(1, 2), groups=1, bias=True, pads=(0, 1, 2, 1), mode="reflect"),
    dict(C=2, O=2, H=3, W=4, k=(3, 3), stride=(2, 2), groups=1, bias=True, pads=(1, 2, 0, 1), mode="constant"),
    dict(C=2, O=2, H=5, W=4, k=(2, 1), stride=(1, 1), groups=2, bias=True, pads=(2, 2, 2, 0), mode="reflect",
         dilation=(2, 2)),
    dict(C=1, O=2, H=6, W=3, k=(2, 2), stride=(1, 2), groups=1, bias=False, pads=(0, 3, 1, 1), mode="circular",
         dilation=(3, 1)),
]


def prove() -> list[str]:
    done = []
    c = sympy.Symbol("c")
    for cfg in CONFIGS:
        x, w, bias = conv_symbols(cfg)
        d = cfg.get("dilation", (1, 1))
        lhs = conv2d(x, w, bias, stride=cfg["stride"], dilation=d, groups=cfg["groups"])
        padded = pad_mode(x, cfg["pads"], cfg["mode"], value=c)
        t, b, l, r = cfg["pads"]
        taps = (t // d[0], b // d[0], l // d[1], r // d[1])
        rhs = conv2d(padded, pad_kernel(w, taps), bias, stride=cfg["stride"], dilation=d, groups=cfg["groups"])
        desc = describe("conv(x; W, d) == conv(pad_m(x); pad_0(W; pads / d), d)", **cfg)
        assert_equal(lhs, rhs, "pad_share " + desc)
        done.append(desc)

    # REFUSED: the conv pads with zeros of its own; moved, those taps read the reflected border.
    cfg = dict(C=1, O=1, H=3, W=3, k=(3, 3), groups=1, bias=False)
    x, w, _ = conv_symbols(cfg)
    lhs = conv2d(x, w, padding=(1, 1, 1, 1))
    rhs = conv2d(pad_mode(x, (1, 1, 1, 1), "reflect"), pad_kernel(w, (1, 1, 1, 1)), padding=(1, 1, 1, 1))
    _, num = assert_differs(lhs, rhs, (0, 0, 0), "pad_share refused own padding")
    done.append(f"refused: conv(x; W, padding 1) != conv(pad_reflect(x; 1); pad_0(W; 1), padding 1): the corner "
                f"reads 0 on the left, x[1, 1] on the right (numeric witness {num})")

    # REFUSED: a pad of 1 beside a kernel of dilation 2: no whole number of its taps fills it, and padded by
    # undilated taps its second tap reads the row between.
    cfg = dict(C=1, O=1, H=5, W=1, k=(2, 1), groups=1, bias=False)
    x, w, _ = conv_symbols(cfg)
    lhs = conv2d(x, w, dilation=(2, 1))
    rhs = conv2d(pad_mode(x, (1, 1, 0, 0), "replicate"), pad_kernel(w, (1, 1, 0, 0)))
    rhs = rhs[:, : lhs.shape[1]]  # the undilated kernel is shorter: compare the rows both have
    _, num = assert_differs(lhs, rhs, (0, 0, 0), "pad_share refused dilation")
    done.append(f"refused: conv(x; W, dilation 2) != conv(pad(x; 1); pad_0(W; 1)): a pad of 1 is no whole tap of "
                f"dilation 2; the second tap reads x[1], not x[2] (numeric witness {num})")

    # REFUSED: a negative pad amount crops: by (top -1, bottom 1) the map and the kernel, each cropped by a row at the
    # top and grown by one at the bottom, read x's rows one lower than the conv did.
    cfg = dict(C=1, O=1, H=4, W=1, k=(2, 1), groups=1, bias=False)
    x, w, _ = conv_symbols(cfg)
    lhs = conv2d(x, w)
    moved_map = np.concatenate([x[:, 1:], np.full((1, 1, 1), c, dtype=object)], axis=1)
    moved_kernel = np.concatenate([w[:, :, 1:], np.full((1, 1, 1, 1), sympy.Integer(0), dtype=object)], axis=2)
    rhs = conv2d(moved_map, moved_kernel)
    _, num = assert_differs(lhs, rhs, (0, 0, 0), "pad_share refused crop")
    done.append(f"refused: a crop moves every row: conv(x; W) != conv(pad(x; -1, 1); pad_0(W; -1, 1)) "
                f"(numeric witness {num})")
    return done
