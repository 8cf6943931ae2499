"""concat_merge: channel-concatenation of parallel convs is one conv with stacked weights.

Identity: if conv_A (O_A outputs) and conv_B (O_B outputs) read the same x with groups 1
and aligned windows (same kernel size, stride, padding, dilation), then

    concat([conv(x; W_A, b_A), conv(x; W_B, b_B)], channels)
        == conv(x; [W_A; W_B], [b_A; b_B])

where [;] stacks along the output-channel axis (shape (O_A + O_B, C, kh, kw)); a missing
bias counts as 0. Each output channel of a conv depends only on its own weight row and bias.

Preconditions: groups 1 for both (a grouped branch is first made dense with the regrouping
lemma, proofs/regroup.py -- shown in the last configuration), aligned windows (use
kernel_pad to align different kernel sizes, as in the 1x3 / 3x1 case below).

Proof: symbolic x and weights; expand(lhs - rhs) == 0 elementwise.
"""

from __future__ import annotations

import numpy as np

from .symbolic import (assert_equal, concat, conv2d, describe, regroup_weight, symbols_tensor,
                       zeros)
from . import kernel_pad


def fuse(wa, ba, wb, bb):
    """Stacked (W, b) for concat([conv_A, conv_B]) (groups 1)."""
    if wa.shape[1:] != wb.shape[1:]:
        raise ValueError(f"kernels not aligned: {wa.shape} vs {wb.shape}")
    w = np.concatenate([wa, wb], axis=0)
    if ba is None and bb is None:
        return w, None
    ba = ba if ba is not None else zeros((wa.shape[0],))
    bb = bb if bb is not None else zeros((wb.shape[0],))
    return w, np.concatenate([ba, bb])


CONFIGS = [
    dict(C=2, OA=2, OB=1, H=4, W=5, k=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), ga=1, bias_b=True),
    dict(C=2, OA=1, OB=2, H=5, W=5, k=(2, 3), stride=(2, 2), padding=(1, 0, 0, 1), dilation=(1, 1), ga=1, bias_b=False),
    dict(C=2, OA=2, OB=2, H=5, W=5, k=(3, 3), stride=(1, 1), padding=(2, 2, 2, 2), dilation=(2, 2), ga=2, bias_b=True),
]


def prove() -> list[str]:
    done = []
    for cfg in CONFIGS:
        C, ga = cfg["C"], cfg["ga"]
        x = symbols_tensor("x", (C, cfg["H"], cfg["W"]))
        wa = symbols_tensor("wa", (cfg["OA"], C // ga) + cfg["k"])
        wb = symbols_tensor("wb", (cfg["OB"], C) + cfg["k"])
        ba = symbols_tensor("ba", (cfg["OA"],))
        bb = symbols_tensor("bb", (cfg["OB"],)) if cfg["bias_b"] else None
        kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"])
        lhs = concat([conv2d(x, wa, ba, groups=ga, **kw), conv2d(x, wb, bb, **kw)])
        wa_dense = regroup_weight(wa, ga, 1) if ga != 1 else wa
        rhs = conv2d(x, *fuse(wa_dense, ba, wb, bb), **kw)
        desc = describe("concat(conv_A, conv_B) == conv(stacked)", **cfg)
        assert_equal(lhs, rhs, "concat_merge " + desc)
        done.append(desc)

    # ACNet-style: 1x3 and 3x1 branches, aligned to 3x3 with kernel_pad, then concatenated.
    x = symbols_tensor("x", (2, 4, 4))
    wa = symbols_tensor("wa", (1, 2, 1, 3))
    wb = symbols_tensor("wb", (2, 2, 3, 1))
    ba, bb = symbols_tensor("ba", (1,)), symbols_tensor("bb", (2,))
    lhs = concat([conv2d(x, wa, ba, padding=(0, 0, 1, 1)), conv2d(x, wb, bb, padding=(1, 1, 0, 0))])
    wa3, pa = kernel_pad.fuse(wa, (0, 0, 1, 1), (1, 1, 0, 0))
    wb3, pb = kernel_pad.fuse(wb, (1, 1, 0, 0), (0, 0, 1, 1))
    assert pa == pb == (1, 1, 1, 1)
    rhs = conv2d(x, *fuse(wa3, ba, wb3, bb), padding=pa)
    desc = "concat(conv1x3, conv3x1) == conv3x3(stacked after kernel_pad): C=2, H=4, W=4"
    assert_equal(lhs, rhs, "concat_merge " + desc)
    done.append(desc)
    return done
