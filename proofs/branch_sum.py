"""branch_sum: the sum (or difference) of two parallel convs is one conv.

Identity: if conv_A and conv_B read the same x and agree in stride, padding, dilation,
kernel size and groups, then for sign in {+1, -1}

    conv(x; W_A, b_A) + sign * conv(x; W_B, b_B) == conv(x; W_A + sign*W_B, b_A + sign*b_B)

(a missing bias counts as 0). This is linearity of conv2d in (W, b) for fixed x.

Different groups: if conv_A has groups g_A and conv_B groups g_B, first rewrite both with the
regrouping lemma (proofs/regroup.py) to G = gcd(g_A, g_B) (which divides both), obtaining
block-diagonal kernels of shape (O, C/G, kh, kw); then sum as above with groups G.
Different kernel sizes / paddings are first aligned with kernel_pad (see repmixer, cpe).

Preconditions: same input, same output shape, same stride/dilation, aligned windows (same
kernel size and padding after kernel_pad), groups equal or regrouped to their gcd.

Two Linears of one input: Linear(x; Wa, ba) +- Linear(x; Wb, bb) == Linear(x; Wa +- Wb, ba +- bb).

Proof: symbolic x, W_A, W_B, b_A, b_B; expand(lhs - rhs) == 0 elementwise.
"""

from __future__ import annotations

from math import gcd

import numpy as np

from .symbolic import assert_equal, conv2d, conv3d, describe, linear, regroup_weight, symbols_tensor, zeros


def fuse(wa, ba, wb, bb, sign: int = 1, groups_a: int = 1, groups_b: int = 1):
    """Return (W, b, groups) of the single conv equal to conv_A + sign*conv_B."""
    if sign not in (1, -1):
        raise ValueError("sign must be +1 or -1")
    G = gcd(groups_a, groups_b)
    wa = regroup_weight(wa, groups_a, G) if groups_a != G else wa
    wb = regroup_weight(wb, groups_b, G) if groups_b != G else wb
    if wa.shape != wb.shape:
        raise ValueError(f"kernel shapes differ: {wa.shape} vs {wb.shape} (align with kernel_pad)")
    w = wa + sign * wb
    if ba is None and bb is None:
        return w, None, G
    O = wa.shape[0]
    ba = ba if ba is not None else zeros((O,))
    bb = bb if bb is not None else zeros((O,))
    b = np.array([ba[o] + sign * bb[o] for o in range(O)], dtype=object)
    return w, b, G


CONFIGS = [
    dict(C=2, O=2, H=4, W=5, k=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), ga=1, gb=1, sign=1, bias_a=True, bias_b=True),
    dict(C=4, O=4, H=5, W=5, k=(3, 2), stride=(2, 2), padding=(1, 0, 0, 1), dilation=(1, 1), ga=2, gb=2, sign=-1, bias_a=True, bias_b=False),
    dict(C=2, O=2, H=5, W=5, k=(3, 3), stride=(1, 2), padding=(2, 2, 2, 2), dilation=(2, 2), ga=2, gb=2, sign=1, bias_a=False, bias_b=True),
    dict(C=4, O=4, H=4, W=4, k=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), ga=4, gb=2, sign=1, bias_a=True, bias_b=True),
    dict(C=6, O=6, H=4, W=4, k=(1, 3), stride=(2, 1), padding=(0, 0, 1, 1), dilation=(1, 1), ga=6, gb=2, sign=-1, bias_a=True, bias_b=True),
]


def prove() -> list[str]:
    done = []
    for cfg in CONFIGS:
        C, O, ga, gb, sign = cfg["C"], cfg["O"], cfg["ga"], cfg["gb"], cfg["sign"]
        x = symbols_tensor("x", (C, cfg["H"], cfg["W"]))
        wa = symbols_tensor("wa", (O, C // ga) + cfg["k"])
        wb = symbols_tensor("wb", (O, C // gb) + cfg["k"])
        ba = symbols_tensor("ba", (O,)) if cfg["bias_a"] else None
        bb = symbols_tensor("bb", (O,)) if cfg["bias_b"] else None
        kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"])
        lhs = conv2d(x, wa, ba, groups=ga, **kw) + sign * conv2d(x, wb, bb, groups=gb, **kw)
        w, b, G = fuse(wa, ba, wb, bb, sign, ga, gb)
        rhs = conv2d(x, w, b, groups=G, **kw)
        op = "+" if sign == 1 else "-"
        desc = describe(f"conv_A {op} conv_B == conv (groups {ga},{gb} -> {G})", **cfg)
        assert_equal(lhs, rhs, "branch_sum " + desc)
        done.append(desc)
    # Two conv3d of one input with one window (a 3-D RepVGG block): the same identity, the kernels' third axis along.
    x = symbols_tensor("x", (2, 3, 3, 4))
    wa, wb = symbols_tensor("wa", (2, 1, 3, 1, 3)), symbols_tensor("wb", (2, 1, 3, 1, 3))
    ba, bb = symbols_tensor("ba", (2,)), symbols_tensor("bb", (2,))
    kw = dict(stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 1), groups=2)
    rhs = conv3d(x, wa - wb, np.array([ba[o] - bb[o] for o in range(2)], dtype=object), **kw)
    desc = describe("conv3d_A - conv3d_B == conv3d(W_A - W_B, b_A - b_B)", x=(2, 3, 3, 4), k=(3, 1, 3), groups=2, **{k: v for k, v in kw.items() if k != "groups"})
    assert_equal(conv3d(x, wa, ba, **kw) - conv3d(x, wb, bb, **kw), rhs, "branch_sum " + desc)
    done.append(desc)
    for sign, bias_b in ((1, True), (-1, False)):  # two Linears of one input
        x, wa, wb = symbols_tensor("x", (2, 3)), symbols_tensor("wa", (4, 3)), symbols_tensor("wb", (4, 3))
        ba, bb = symbols_tensor("ba", (4,)), symbols_tensor("bb", (4,)) if bias_b else None
        lhs = linear(x, wa, ba) + sign * linear(x, wb, bb)
        rhs = linear(x, wa + sign * wb, ba + sign * (bb if bb is not None else 0))
        desc = describe("Linear_A +- Linear_B == Linear(W_A +- W_B, b_A +- b_B)", sign=sign, bias_b=bias_b)
        assert_equal(lhs, rhs, "branch_sum " + desc)
        done.append(desc)
    return done
