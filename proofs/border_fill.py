"""border_fill: a zero pad whose border is then written with a 1x1 conv's bias is that conv's padding.

Identity: for a 1x1 conv with stride 1 (any own padding p, any groups) and a zero pad by
Q = (t, b, l, r), with fill(y, v, Q) writing v[c] into the t first and b last rows and the l first
and r last columns of channel c (the four slice assignments, in any order):

    fill(pad(conv1x1(x; W, bias, padding=p), Q), bias, Q) == conv1x1(x; W, bias, padding=p + Q)

Why: output pixel r of a 1x1 stride-1 conv reads input pixel r only, so it commutes with moving
pixels; at a padded pixel it reads 0 and gives W * 0 + bias = bias, which is what the fill writes.
Inside the border both sides are the same conv.

The same before the BN is folded: with bn(0)[c] = beta[c] - mean[c] gamma[c] / sqrt(var[c] + eps),

    fill(pad(bn(x), Q), bn(0), Q) == bn(pad(x, Q))

(bn is per channel and affine; at a padded 0 it gives bn(0)).

And a slice_scatter that replaces the whole tensor is its source: slice_scatter(y, src, axis,
0, None) == src whenever src has y's shape.

REFUSED: a fill with other values than the bias (the border differs by v - bias), and a pad after
a 3x3 conv (its padded output's border would be the conv of the image's edge, not the bias).

Proof: symbolic x, W, bias, v and BN parameters; expand(lhs - rhs) == 0 elementwise.
"""

from __future__ import annotations

import numpy as np

from .symbolic import (assert_differs, assert_equal, batch_norm, bn_scale_shift, bn_symbols, conv2d, conv_symbols,
                       describe, norm_pads, pad, symbols_tensor)


def fill(y: np.ndarray, v, pads, order=("top", "bottom", "left", "right")) -> np.ndarray:
    """``y`` with its border of widths ``pads`` = (top, bottom, left, right) overwritten with ``v[c]`` per channel."""
    t, b, l, r = norm_pads(pads)
    out = y.copy()
    C, H, W = y.shape
    regions = {"top": (slice(0, t), slice(None)), "bottom": (slice(H - b, H), slice(None)),
               "left": (slice(None), slice(0, l)), "right": (slice(None), slice(W - r, W))}
    for side in order:
        rows, cols = regions[side]
        if (side in ("top", "bottom") and not (t if side == "top" else b)) or (side in ("left", "right") and not (l if side == "left" else r)):
            continue
        for c in range(C):
            out[c, rows, cols] = v[c]
    return out


def fuse(padding, pads):
    """The conv's padding after the filled pad became its own."""
    return tuple(p + q for p, q in zip(norm_pads(padding), norm_pads(pads)))


CONV_CONFIGS = [  # 1x1 stride-1 conv with a bias, zero pad, border filled with the bias
    dict(C=2, O=2, H=2, W=3, padding=(0, 0, 0, 0), pads=(1, 1, 1, 1), groups=1, order=("top", "bottom", "left", "right")),
    dict(C=4, O=2, H=3, W=2, padding=(1, 0, 0, 1), pads=(2, 1, 1, 2), groups=2, order=("left", "top", "right", "bottom")),
    dict(C=2, O=4, H=2, W=2, padding=(0, 0, 0, 0), pads=(0, 1, 2, 0), groups=2, order=("right", "bottom", "left", "top")),
]

BN_CONFIGS = [
    dict(C=2, H=2, W=3, pads=(1, 1, 1, 1), order=("top", "bottom", "left", "right")),
    dict(C=1, H=3, W=2, pads=(2, 0, 1, 1), order=("right", "left", "top", "bottom")),
]


def prove() -> list[str]:
    done = []
    for cfg in CONV_CONFIGS:
        x, w, b = conv_symbols(dict(cfg, k=(1, 1)), bias=True)
        kw = dict(groups=cfg["groups"])
        lhs = fill(pad(conv2d(x, w, b, padding=cfg["padding"], **kw), cfg["pads"]), b, cfg["pads"], cfg["order"])
        rhs = conv2d(x, w, b, padding=fuse(cfg["padding"], cfg["pads"]), **kw)
        desc = describe("fill(pad(conv1x1 + b), b) == conv1x1(padding + pad)", **cfg)
        assert_equal(lhs, rhs, "border_fill " + desc)
        done.append(desc)
    for cfg in BN_CONFIGS:
        x = symbols_tensor("x", (cfg["C"], cfg["H"], cfg["W"]))
        mean, var, gamma, beta, eps = bn_symbols("", cfg["C"])
        _, at_zero = bn_scale_shift(mean, var, gamma, beta, eps)
        lhs = fill(pad(batch_norm(x, mean, var, gamma, beta, eps), cfg["pads"]), at_zero, cfg["pads"], cfg["order"])
        rhs = batch_norm(pad(x, cfg["pads"]), mean, var, gamma, beta, eps)
        desc = describe("fill(pad(bn(x)), bn(0)) == bn(pad(x))", **cfg)
        assert_equal(lhs, rhs, "border_fill " + desc)
        done.append(desc)

    # A whole-tensor slice_scatter: every element comes from src.
    y, src = symbols_tensor("y", (2, 2, 3)), symbols_tensor("s", (2, 2, 3))
    out = y.copy()
    out[:, 0:None, :] = src
    assert_equal(out, src, "border_fill: whole slice_scatter")
    done.append("slice_scatter(y, src, axis, 0, None) == src (src of y's shape)")

    # REFUSED: a border filled with other values than the bias.
    cfg = dict(C=1, O=1, H=2, W=2, k=(1, 1), groups=1)
    x, w, b = conv_symbols(cfg, bias=True)
    v = symbols_tensor("v", (1,))
    lhs = fill(pad(conv2d(x, w, b), (1, 1, 1, 1)), v, (1, 1, 1, 1))
    rhs = conv2d(x, w, b, padding=(1, 1, 1, 1))
    diff, num = assert_differs(lhs, rhs, (0, 0, 0), "border_fill refused case (other values)")
    assert_equal([diff], [v[0] - b[0]], "border_fill refused: difference is v - bias")
    done.append(f"refused: a border filled with v != bias: lhs - rhs = v - b at the border (numeric witness {num})")

    # REFUSED: a 3x3 conv before the pad: its padded output's border reads the image's edge.
    cfg = dict(C=1, O=1, H=3, W=3, k=(3, 3), groups=1)
    x, w, b = conv_symbols(cfg, bias=True)
    lhs = fill(pad(conv2d(x, w, b, padding=(1, 1, 1, 1)), (1, 1, 1, 1)), b, (1, 1, 1, 1))
    rhs = conv2d(x, w, b, padding=(2, 2, 2, 2))
    diff, num = assert_differs(lhs, rhs, (0, 0, 1), "border_fill refused case (3x3 conv)")
    done.append(f"refused: a 3x3 conv before the pad: at the border the padded conv still sees the image (numeric witness {num})")
    return done
