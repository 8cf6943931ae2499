"""cpe: conditional positional encoding x + dwconv_kxk(x) is ONE depthwise conv (composite).

Block (C channels, odd k, stride 1, "same" padding p = k // 2, depthwise conv with bias):

    y = x + dwconv(x; W, b, padding p, groups C)

Identity: y == conv(x; W*, b, padding p, groups C), obtained by chaining proven primitives:

    1. identity_to_conv: x == depthwise 1x1 identity conv (zero bias)
    2. kernel_pad:       1x1 -> centred kxk, padding 0 -> p
    3. branch_sum:       W* = W + delta_kxk,  b* = b + 0

Preconditions: stride 1 and same padding (so the residual shapes match), odd k, depthwise.
Proof: C=2, 4x5 symbolic input, kernels 3x3 (p=1), 5x5 (p=2) and 7x7 (p=3, FastViT's
RepCPE size); expand(lhs - rhs) == 0 elementwise.
"""

from __future__ import annotations

from .symbolic import add, assert_equal, conv2d, describe, symbols_tensor
from . import branch_sum, identity_to_conv, kernel_pad


def fuse(w, b):
    """(W*, b*) of the single depthwise conv equal to x + dwconv(x; w, b)."""
    C, _, k, k2 = w.shape
    assert k == k2 and k % 2 == 1
    p = k // 2
    ki, bi = identity_to_conv.fuse(C, C)                  # 1
    ki, pi = kernel_pad.fuse(ki, 0, (p, p, p, p))          # 2
    assert pi == (p, p, p, p)
    wf, bf, G = branch_sum.fuse(ki, bi, w, b, +1, C, C)    # 3
    return wf, bf


def prove() -> list[str]:
    done = []
    C, H, W = 2, 4, 5
    for k in (3, 5, 7):
        p = k // 2
        x = symbols_tensor("x", (C, H, W))
        w = symbols_tensor("w", (C, 1, k, k))
        b = symbols_tensor("b", (C,))
        lhs = add(x, conv2d(x, w, b, padding=p, groups=C))
        wf, bf = fuse(w, b)
        rhs = conv2d(x, wf, bf, padding=p, groups=C)
        desc = describe(f"x + dwconv{k}x{k}(x) == one dwconv{k}x{k}", C=C, H=H, W=W, padding=p)
        assert_equal(lhs, rhs, "cpe " + desc)
        done.append(desc)
    return done
