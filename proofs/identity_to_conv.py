"""identity_to_conv: the identity map is a 1x1 (grouped) convolution.

Identity: for C channels and any groups G with G | C, n = C/G,

    I[c, i, 0, 0] = 1 if i == c mod n else 0      (shape (C, C/G, 1, 1)),  bias = 0

    x == conv(x; I, 0, groups=G, stride 1, padding 0, dilation 1).

This is bn_to_conv with s = 1, t = 0. It is how residual (skip) connections enter a branch
sum (RepVGG, MobileOne, RepMixer, CPE); kernel_pad then grows I to the branch kernel size.

Proof: symbolic x; expand(lhs - rhs) == 0 elementwise.
"""

from __future__ import annotations

from .symbolic import ONE, assert_equal, conv2d, conv3d, describe, symbols_tensor, zeros


def fuse(C: int, groups: int):
    """(I, bias) with x == conv(x; I, bias, groups=groups)."""
    if C % groups:
        raise ValueError(f"groups={groups} must divide C={C}")
    n = C // groups
    k = zeros((C, n, 1, 1))
    for c in range(C):
        k[c, c % n, 0, 0] = ONE
    return k, zeros((C,))


CONFIGS = [
    dict(C=2, G=2, H=4, W=5),
    dict(C=3, G=1, H=4, W=4),
    dict(C=4, G=2, H=3, W=5),
    dict(C=6, G=3, H=2, W=3),
]


def prove() -> list[str]:
    done = []
    for cfg in CONFIGS:
        C, G = cfg["C"], cfg["G"]
        x = symbols_tensor("x", (C, cfg["H"], cfg["W"]))
        k, bias = fuse(C, G)
        rhs = conv2d(x, k, bias, groups=G)
        desc = describe("x == conv1x1(grouped identity)", **cfg)
        assert_equal(x, rhs, "identity_to_conv " + desc)
        done.append(desc)
    x = symbols_tensor("x", (4, 2, 3, 2))  # a 3-D skip beside a conv3d: the kernel with a third unit axis
    k, bias = fuse(4, 2)
    desc = describe("x == conv1x1x1(grouped identity)", C=4, G=2, D=2, H=3, W=2)
    assert_equal(x, conv3d(x, k[..., None], bias, groups=2), "identity_to_conv " + desc)
    done.append(desc)
    return done
