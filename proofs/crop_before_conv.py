"""crop_before_conv: a crop of a conv's input, on sides the conv does not pad, is zero taps of its kernel.

Identity: a conv with stride (s_h, s_w), dilation (d_h, d_w), zero padding (t, b, l, r), any kernel, groups and
bias; a crop that removes a rows at the top, c at the bottom, e columns on the left and f on the right of its
input (x[:, a:-c, e:-f], or a pad by (-a, -c, -e, -f)), each a multiple of the dilation, on sides the conv does
not pad (a > 0 only where t = 0, and so on). Then

    conv(crop(x; a, c, e, f); W, b, padding P)
        == conv(x; pad(W, a/d_h, c/d_h, e/d_w, f/d_w), b, padding P)

with the kernel padded by zero taps: a/d_h rows on top, c/d_h at the bottom, e/d_w columns left, f/d_w right.

Why: output column j of the conv reads cropped columns j*s_w - l + m*d_w for taps m, which are input columns
j*s_w - l + e + m*d_w. With l = 0, a kernel grown by e/d_w zero taps on the left reads input columns
j*s_w + m'*d_w, and its tap m' = m + e/d_w is the old tap m: the same columns, the new taps reading columns the
crop removed, times zero. The kernel's extent grows by e + f, the input shrank by e + f: the same output count
at every width. Where the conv pads a cropped side it reads zeros there, which the uncropped input replaces by
values: no kernel says that.

Configurations: ACNet's vertical branch at padding 0 (a 3x1 kernel on the input cropped by one column each
side) at two widths; a strided, dilated, grouped conv with a bias, cropped by a dilation's worth on top and on
the right, padding the other sides; a crop written as a pad by negative amounts on all four sides. All with
symbolic x, W, b.

REFUSED: a crop of a side the conv pads (left by 1, padding 1 on the left): the conv reads a zero where the
grown kernel reads the cropped column (shown at one element).

Proof: symbolic tensors; expand(lhs - rhs) == 0 elementwise.
"""

from __future__ import annotations

import numpy as np

from .symbolic import assert_differs, assert_equal, conv2d, conv_symbols, describe, symbols_tensor


def fuse(w: np.ndarray, removed, dilation) -> np.ndarray:
    """The kernel ``w`` grown by zero taps for a crop removing ``removed = (a, c, e, f)`` of its conv's input."""
    a, c, e, f = removed
    dh, dw = dilation
    assert a % dh == c % dh == e % dw == f % dw == 0, (removed, dilation)
    O, I, kh, kw = w.shape
    grown = np.zeros((O, I, kh + (a + c) // dh, kw + (e + f) // dw), dtype=object)
    grown[:, :, a // dh : a // dh + kh, e // dw : e // dw + kw] = w
    return grown


def crop(x, removed):
    """``x[:, a:H - c, e:W - f]`` of a (C, H, W) tensor."""
    a, c, e, f = removed
    return x[:, a : x.shape[1] - c, e : x.shape[2] - f]


CONFIGS = [
    dict(name="ACNet's vertical branch at padding 0", C=2, O=2, H=4, W=5, k=(3, 1), stride=(1, 1), dilation=(1, 1),
         groups=1, padding=(0, 0, 0, 0), removed=(0, 0, 1, 1), bias=True),
    dict(name="ACNet's vertical branch, another width", C=2, O=2, H=4, W=7, k=(3, 1), stride=(1, 1), dilation=(1, 1),
         groups=1, padding=(0, 0, 0, 0), removed=(0, 0, 1, 1), bias=True),
    dict(name="top and right, strided, dilated, grouped", C=2, O=4, H=7, W=6, k=(2, 2), stride=(2, 1), dilation=(2, 1),
         groups=2, padding=(0, 1, 2, 0), removed=(2, 0, 0, 1), bias=True),
    dict(name="a pad by negative amounts", C=1, O=2, H=6, W=6, k=(2, 3), stride=(1, 2), dilation=(1, 1), groups=1,
         padding=(0, 0, 0, 0), removed=(1, 2, 1, 1), bias=False),
]


def prove() -> list[str]:
    done = []
    for cfg in CONFIGS:
        x, w, b = conv_symbols(cfg)
        kw = dict(stride=cfg["stride"], dilation=cfg["dilation"], groups=cfg["groups"], padding=cfg["padding"])
        lhs = conv2d(crop(x, cfg["removed"]), w, b, **kw)
        rhs = conv2d(x, fuse(w, cfg["removed"], cfg["dilation"]), b, **kw)
        desc = describe("conv(crop(x); W) == conv(x; W grown by zero taps)", case=cfg["name"],
                        x=(cfg["C"], cfg["H"], cfg["W"]), kernel=cfg["k"], stride=cfg["stride"],
                        dilation=cfg["dilation"], groups=cfg["groups"], padding=cfg["padding"],
                        crop=cfg["removed"], bias=cfg["bias"])
        assert_equal(lhs, rhs, f"crop_before_conv {desc}")
        done.append(desc)

    # REFUSED: the conv pads the left side the crop removes.
    x = symbols_tensor("x", (1, 3, 5))
    w = symbols_tensor("w", (1, 1, 1, 3))
    lhs = conv2d(crop(x, (0, 0, 1, 0)), w, None, padding=(0, 0, 1, 0))
    rhs = conv2d(x, fuse(w, (0, 0, 1, 0), (1, 1)), None, padding=(0, 0, 1, 0))
    assert lhs.shape == rhs.shape, (lhs.shape, rhs.shape)
    assert_differs(lhs, rhs, (0, 0, 0), "crop_before_conv: a crop of a padded side")
    done.append("refused: a crop of one column on the left before a conv padded 1 on the left: the conv reads a zero "
                "where the grown kernel reads the cropped column (output (0, 0, 0) differs)")
    return done
