"""regroup: a grouped conv is a conv with fewer groups and a block-diagonal kernel.

Lemma (used by branch_sum, seq_merge, concat_merge): let conv(.; W, groups=g) have C input
and O output channels, W of shape (O, C/g, kh, kw). For any g' dividing g define W' of shape
(O, C/g', kh, kw) by

    W'[o, j*C/g - j'*C/g' + i] = W[o, i]     (j = o // (O/g), j' = o // (O/g'), 0 <= i < C/g)
    W'[o, everything else]      = 0

Then for every x, bias, stride, padding and dilation

    conv(x; W, b, groups=g) == conv(x; W', b, groups=g').

Reason: old group j of outputs reads input channels [j*C/g, (j+1)*C/g), which lie inside the
input range [j'*C/g', (j'+1)*C/g') of new group j' because g' | g; the extra input channels
of the bigger group get zero weights. g' = 1 gives the dense equivalent of any grouped conv.

Implementation: :func:`proofs.symbolic.regroup_weight`. Proof: exact expand(lhs - rhs) == 0.
"""

from __future__ import annotations

from .symbolic import assert_equal, conv2d, describe, regroup_weight, symbols_tensor

fuse = regroup_weight

CONFIGS = [
    dict(C=4, O=4, H=4, W=4, k=(3, 3), g=4, g2=1, stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1)),
    dict(C=4, O=8, H=5, W=5, k=(2, 3), g=4, g2=2, stride=(2, 2), padding=(0, 1, 1, 1), dilation=(1, 1)),
    dict(C=6, O=6, H=4, W=5, k=(3, 1), g=6, g2=3, stride=(1, 2), padding=(2, 2, 0, 0), dilation=(2, 1)),
    dict(C=4, O=2, H=4, W=4, k=(1, 1), g=2, g2=2, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1)),
]


def prove() -> list[str]:
    done = []
    for cfg in CONFIGS:
        C, O, g, g2 = cfg["C"], cfg["O"], cfg["g"], cfg["g2"]
        x = symbols_tensor("x", (C, cfg["H"], cfg["W"]))
        w = symbols_tensor("w", (O, C // g) + cfg["k"])
        b = symbols_tensor("b", (O,))
        kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"])
        lhs = conv2d(x, w, b, groups=g, **kw)
        rhs = conv2d(x, regroup_weight(w, g, g2), b, groups=g2, **kw)
        desc = describe("conv(groups=g) == conv(groups=g', block-diagonal W)", **cfg)
        assert_equal(lhs, rhs, "regroup " + desc)
        done.append(desc)
    return done
