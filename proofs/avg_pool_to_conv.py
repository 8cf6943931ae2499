"""avg_pool_to_conv: an average pool is a depthwise conv with constant weights.

Identity: for C channels, kernel (kh, kw), any stride and zero padding P,

    K[c, 0, u, v] = 1 / (kh*kw)    (shape (C, 1, kh, kw)),  bias 0

    avg_pool2d(x, (kh, kw), stride, P, count_include_pad=True)
        == conv(x; K, 0, stride, padding P, groups=C)

and, when P = 0, also for count_include_pad=False (every window then lies inside the image,
so the divisor is kh*kw as well).

REFUSED 1: count_include_pad=False with P > 0. A border window holds n < kh*kw real pixels
and is divided by n; a conv has one fixed weight per tap, so the border output sum/n cannot be
matched (shown: the candidate conv gives sum/(kh*kw) at the corner).

REFUSED 2: a conv WITH bias followed by a zero-padded average pool is not one conv. The
example uses a biased 1x1 conv (W, b) followed by avg_pool(3, stride 1, padding 1): the
candidate merged conv (kernel W*K, i.e. seq_merge's 1x1 -> kxk formula, bias b, padding 1)
is exact for the weight part (W*0 = 0 on the padding), but at a border output the pool
averages b over the in-image taps only: b * n/(kh*kw) instead of b. (With a kxk conv, k > 1,
in front, even the weight part fails, since the pool's zero padding of y is not a zero
padding of x.)

Proof: symbolic x (and W, b); expand(lhs - rhs) == 0 elementwise; refused cases give a
nonzero expand(lhs - rhs) at a border pixel plus a numeric witness, and agree in the interior.
"""

from __future__ import annotations

import sympy

from .symbolic import (assert_differs, assert_equal, avg_pool2d, conv2d, const_tensor, describe,
                       norm_pads, pair, symbols_tensor, zeros)
from . import seq_merge


def fuse(C: int, k, padding=0, count_include_pad: bool = True, allow_refused=False):
    """(K, bias) of the depthwise conv (groups=C) equal to the average pool."""
    kh, kw = pair(k)
    if not count_include_pad and any(norm_pads(padding)) and not allow_refused:
        raise ValueError("refused: count_include_pad=False with padding is not a conv")
    return const_tensor(sympy.Rational(1, kh * kw), (C, 1, kh, kw)), zeros((C,))


CONFIGS = [
    dict(C=2, H=4, W=5, k=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1), count_include_pad=True),
    dict(C=2, H=5, W=5, k=(3, 3), stride=(2, 2), padding=(1, 1, 1, 1), count_include_pad=True),
    dict(C=1, H=5, W=5, k=(2, 3), stride=(2, 1), padding=(0, 1, 1, 0), count_include_pad=True),
    dict(C=2, H=4, W=5, k=(2, 2), stride=(2, 2), padding=(0, 0, 0, 0), count_include_pad=False),
    dict(C=1, H=5, W=4, k=(3, 2), stride=(1, 1), padding=(0, 0, 0, 0), count_include_pad=False),
]


def prove() -> list[str]:
    done = []
    for cfg in CONFIGS:
        C = cfg["C"]
        x = symbols_tensor("x", (C, cfg["H"], cfg["W"]))
        lhs = avg_pool2d(x, cfg["k"], cfg["stride"], cfg["padding"], cfg["count_include_pad"])
        K, bias = fuse(C, cfg["k"], cfg["padding"], cfg["count_include_pad"])
        rhs = conv2d(x, K, bias, stride=cfg["stride"], padding=cfg["padding"], groups=C)
        desc = describe("avg_pool == depthwise conv(1/(kh*kw))", **cfg)
        assert_equal(lhs, rhs, "avg_pool_to_conv " + desc)
        done.append(desc)

    # A bias-free 1x1 conv followed by a padded pool IS one conv (contrast for refused case 2).
    x = symbols_tensor("x", (2, 4, 4))
    w = symbols_tensor("w", (2, 2, 1, 1))
    K, kb = fuse(2, 3, 1)
    lhs = avg_pool2d(conv2d(x, w, None), 3, 1, 1)
    wf, bf, G = seq_merge.fuse_1x1_kxk(w, None, 1, K, kb, 2, 1)
    rhs = conv2d(x, wf, bf, padding=1, groups=G)
    assert_equal(lhs, rhs, "avg_pool_to_conv: bias-free conv1x1 -> padded pool")
    done.append("conv1x1 (no bias) -> avg_pool(3, s1, p1) == conv3x3 (seq_merge formula): C=2, H=4, W=4")

    # REFUSED 1: count_include_pad=False with padding.
    x = symbols_tensor("x", (1, 4, 4))
    try:
        fuse(1, 3, 1, count_include_pad=False)
    except ValueError:
        pass
    else:
        raise AssertionError("avg_pool_to_conv: fuse accepted count_include_pad=False with padding")
    lhs = avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    K, kb = fuse(1, 3, 1, count_include_pad=False, allow_refused=True)
    rhs = conv2d(x, K, kb, padding=1, groups=1)
    assert_equal(lhs[:, 1:-1, 1:-1], rhs[:, 1:-1, 1:-1], "avg_pool refused 1, interior")
    diff, num = assert_differs(lhs, rhs, (0, 0, 0), "avg_pool refused 1")
    corner = x[0, 0, 0] + x[0, 0, 1] + x[0, 1, 0] + x[0, 1, 1]
    assert_equal([diff], [sympy.expand(corner / 4 - corner / 9)], "avg_pool refused 1 difference")
    done.append(f"refused: avg_pool(3, p1, count_include_pad=False) vs conv: corner = sum/4 "
                f"but conv gives sum/9 (numeric witness {num}); interior agrees")

    # REFUSED 2: biased 1x1 conv followed by a zero-padded average pool.
    x = symbols_tensor("x", (1, 4, 4))
    w = symbols_tensor("w", (1, 1, 1, 1))
    b = symbols_tensor("b", (1,))
    K, kb = fuse(1, 3, 1)
    lhs = avg_pool2d(conv2d(x, w, b), 3, 1, 1)
    wf, bf, G = seq_merge.fuse_1x1_kxk(w, b, 1, K, kb, 1, 1, allow_refused=True)
    rhs = conv2d(x, wf, bf, padding=1, groups=G)
    assert_equal(lhs[:, 1:-1, 1:-1], rhs[:, 1:-1, 1:-1], "avg_pool refused 2, interior")
    diff, num = assert_differs(lhs, rhs, (0, 0, 0), "avg_pool refused 2")
    assert_equal([diff], [sympy.expand(b[0] * sympy.Rational(4, 9) - b[0])], "avg_pool refused 2 difference")
    done.append(f"refused: conv1x1(bias b) -> avg_pool(3, p1) vs merged conv: corner gets 4/9*b "
                f"instead of b (numeric witness {num}); interior agrees")
    return done
