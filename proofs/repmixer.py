"""repmixer: FastViT's RepMixer block is ONE depthwise 3x3 conv with bias (composite).

Block (C channels, eval mode, ls = per-channel layer scale):

    y = x + ls * (mixer(x) - norm(x))
    mixer(x) = BN_a(dwconv3x3(x; W, padding 1, groups C)) + BN_b(x)
    norm(x)  = BN_c(x)

Identity: y == conv(x; W*, b*, padding 1, groups C), where (W*, b*) are obtained purely by
chaining the primitive rules, each proven in its own module:

    1. bn_fold:          (W_a, b_a) from dwconv3x3 -> BN_a
    2. bn_to_conv:       BN_b, BN_c as depthwise 1x1 convs (G = C)
    3. kernel_pad:       those 1x1 kernels -> centred 3x3, padding 0 -> 1
    4. branch_sum:       (W_a + W_b - W_c, b_a + b_b - b_c)   (mixer - norm)
    5. scale_fold:       multiply by ls per output channel
    6. identity_to_conv: x as a depthwise 1x1 identity conv, then kernel_pad to 3x3
    7. branch_sum:       identity + scaled branch

so, written out, with s_z = gamma_z / sqrt(var_z + eps), t_z = beta_z - mean_z*s_z, and
delta the centred 3x3 delta kernel:

    W*[c] = delta + ls[c] * (s_a[c]*W[c] + (s_b[c] - s_c[c]) * delta)
    b*[c] = ls[c] * (t_a[c] + t_b[c] - t_c[c])

Preconditions: stride 1, padding 1 (same), eval-mode BNs, depthwise conv.
Proof: C=2 channels with a 4x4 symbolic input (and C=3, 5x4), every weight/BN parameter symbolic, BN scale kept as
gamma/sympy.sqrt(var+eps); expand(lhs - rhs) == 0 elementwise. The final single conv is
compared with the block computed op by op by the reference implementation, and the chained
(W*, b*) is also checked against the written-out closed form above.
"""

from __future__ import annotations

from .symbolic import (add, assert_equal, batch_norm, bn_symbols, conv2d, describe, scale, sub,
                       symbols_tensor)
from . import bn_fold, bn_to_conv, branch_sum, identity_to_conv, kernel_pad, scale_fold


def fuse(w, bn_a, bn_b, bn_c, ls):
    """(W*, b*) of the single depthwise 3x3 conv (padding 1, groups C)."""
    C = w.shape[0]
    wa, ba = bn_fold.fuse(w, None, *bn_a)                              # 1
    kb, bb = bn_to_conv.fuse(*bn_b, groups=C)                          # 2
    kc, bc = bn_to_conv.fuse(*bn_c, groups=C)
    kb, pb = kernel_pad.fuse(kb, 0, (1, 1, 1, 1))                      # 3
    kc, pc = kernel_pad.fuse(kc, 0, (1, 1, 1, 1))
    assert pb == pc == (1, 1, 1, 1)
    wm, bm, G = branch_sum.fuse(wa, ba, kb, bb, +1, C, C)              # 4
    wm, bm, G = branch_sum.fuse(wm, bm, kc, bc, -1, G, C)
    ws, bs = scale_fold.fuse(wm, bm, ls)                               # 5
    ki, bi = identity_to_conv.fuse(C, C)                               # 6
    ki, pi = kernel_pad.fuse(ki, 0, (1, 1, 1, 1))
    assert pi == (1, 1, 1, 1)
    wf, bf, G = branch_sum.fuse(ki, bi, ws, bs, +1, C, G)              # 7
    assert G == C
    return wf, bf


def block(x, w, bn_a, bn_b, bn_c, ls):
    """The unfused RepMixer block, op by op."""
    C = x.shape[0]
    mixer = add(batch_norm(conv2d(x, w, None, padding=1, groups=C), *bn_a), batch_norm(x, *bn_b))
    norm = batch_norm(x, *bn_c)
    return add(x, scale(sub(mixer, norm), ls))


def closed_form(w, bn_a, bn_b, bn_c, ls):
    """The written-out (W*, b*) from the docstring, for cross-checking the chained result."""
    import numpy as np
    from .symbolic import bn_scale_shift, zeros
    C = w.shape[0]
    sa, ta = bn_scale_shift(*bn_a)
    sb, tb = bn_scale_shift(*bn_b)
    sc, tc = bn_scale_shift(*bn_c)
    delta = zeros((1, 3, 3))
    delta[0, 1, 1] = 1
    wf = np.empty(w.shape, dtype=object)
    bf = np.empty(C, dtype=object)
    for c in range(C):
        wf[c] = delta + ls[c] * (sa[c] * w[c] + (sb[c] - sc[c]) * delta)
        bf[c] = ls[c] * (ta[c] + tb[c] - tc[c])
    return wf, bf


def prove() -> list[str]:
    done = []
    for C, H, W in ((2, 4, 4), (3, 5, 4)):
        x = symbols_tensor("x", (C, H, W))
        w = symbols_tensor("w", (C, 1, 3, 3))
        bn_a, bn_b, bn_c = bn_symbols("a", C), bn_symbols("b", C), bn_symbols("c", C)
        ls = symbols_tensor("ls", (C,))
        lhs = block(x, w, bn_a, bn_b, bn_c, ls)
        wf, bf = fuse(w, bn_a, bn_b, bn_c, ls)
        rhs = conv2d(x, wf, bf, padding=1, groups=C)
        desc = describe("x + ls*(BN_a(dwconv3x3 x) + BN_b(x) - BN_c(x)) == one dwconv3x3", C=C, H=H, W=W)
        assert_equal(lhs, rhs, "repmixer " + desc)
        cw, cb = closed_form(w, bn_a, bn_b, bn_c, ls)
        assert_equal(wf, cw, "repmixer chained weight vs closed form")
        assert_equal(bf, cb, "repmixer chained bias vs closed form")
        done.append(desc)
    return done
