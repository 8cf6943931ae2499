"""seq_merge: two convs in sequence, one of them 1x1, are one conv (with a precondition).

(A) 1x1 then kxk. conv1: W1 (M, C/g1, 1, 1), b1, stride 1, padding 0, dilation 1, groups g1.
    conv2: W2 (O, M/g2, kh, kw), b2, any stride, padding P, dilation, groups g2.
    Let G = gcd(g1, g2); rewrite both kernels with groups G (regrouping lemma,
    proofs/regroup.py) and write m(o, l) = (o // (O/G)) * (M/G) + l for the l-th mid channel
    of o's group. Then

        W[o, i, u, v] = sum_{l < M/G} W2[o, l, u, v] * W1[m(o,l), i]
        b[o]          = b2[o] + sum_{l < M/G} sum_{u,v} W2[o, l, u, v] * b1[m(o,l)]

        conv2(conv1(x)) == conv(x; W, b, groups=G, stride, padding P, dilation of conv2)

    EXACT iff P == 0 or b1 is absent (b1 == 0). With P > 0 conv2 sees zero padding of
    conv1(x) = W1 x + b1, i.e. the border taps read 0 instead of b1 (while the fused conv's
    own zero padding of x gives W1*0 = 0 for the weight part, which is fine): the bias term
    b1 is counted for every tap in the fused bias, but at border outputs the padded taps
    contribute nothing. REFUSED in that case (symbolic counterexample below).

(B) kxk then 1x1. conv1: W1 (M, C/g1, kh, kw), b1, any stride/padding/dilation, groups g1.
    conv2: W2 (O, M/g2, 1, 1), b2, stride 1, padding 0, groups g2. With G, m(o,l) as above:

        W[o, i, u, v] = sum_{l} W2[o, l] * W1[m(o,l), i, u, v]     (W = W2 @ W1 over channels)
        b[o]          = b2[o] + sum_{l} W2[o, l] * b1[m(o,l)]        (b = W2 b1 + b2)

        conv2(conv1(x)) == conv(x; W, b, groups=G, stride/padding/dilation of conv1)

    always exact (a 1x1 stride-1 unpadded conv is a per-pixel matrix multiply).

(C) A zero-padding 1x1 conv without bias is a pointwise conv followed by a zero pad:
    conv1x1(x; W1, padding P) == pad(conv1x1(x; W1), P), because W1 * 0 = 0. So

    (A') 1x1 (stride 1, padding P1, NO bias) then kxk (padding P2, bias b2):
         conv2(conv1(x)) == conv(x; W, b, groups=G, stride/dilation of conv2, padding P1 + P2)
         with W, b of (A) (b1 = 0); the padded 1x1 is pad(pointwise) and the pad is absorbed by
         the kxk (pad_absorb), so conv2(conv1x1(pad(x))) and conv2(pad(conv1x1(x))) have one
         normal form.
    (B') kxk (bias b1, any geometry) then 1x1 (stride 1, padding P2, NO bias):
         conv2(conv1(x)) == pad(conv(x; W, b, groups=G, geometry of conv1), P2)
         with W, b of (B) (b2 = 0).

    REFUSED: a zero-padding 1x1 WITH a bias is not a pad after a pointwise conv: its border is
    the bias b, the pad's border is 0 (symbolic counterexample below).

    (A'') 1x1 (stride 1, padding P1, WITH bias b1) then kxk (padding 0, bias b2): the 1x1's
         output is pad(conv1x1(x; W1), P1) + b1 everywhere, border included, so
         conv2(conv1(x)) == conv(x; W, b, groups=G, stride/dilation of conv2, padding P1)
         with W, b of (A), b1 counted at every tap (DiverseBranchBlock's BN-and-pad).

Proof: symbolic x, W1, b1, W2, b2; expand(lhs - rhs) == 0 elementwise. The refused case is
shown with a nonzero expand(lhs - rhs) at a border pixel plus a concrete numeric witness,
and the same formula is shown to agree on the interior (so the failure is exactly the border).
"""

from __future__ import annotations

from math import gcd

import numpy as np
import sympy

from .symbolic import (assert_differs, assert_equal, conv2d, describe, norm_pads, pad, regroup_weight,
                       symbols_tensor, zeros)


def _regroup(w, g, G):
    return regroup_weight(w, g, G) if g != G else w


def fuse_1x1_kxk(w1, b1, g1, w2, b2, g2, padding, allow_refused: bool = False):
    """(W, b, G) for 1x1 conv (w1, b1, groups g1) -> kxk conv (w2, b2, groups g2, padding)."""
    if w1.shape[2:] != (1, 1):
        raise ValueError("first conv must be 1x1")
    if b1 is not None and any(norm_pads(padding)) and not allow_refused:
        raise ValueError("refused: 1x1 conv with bias followed by a zero-padded kxk conv")
    G = gcd(g1, g2)
    w1r, w2r = _regroup(w1, g1, G), _regroup(w2, g2, G)
    M, Ci = w1r.shape[:2]
    O, Ml, kh, kw = w2r.shape
    w = zeros((O, Ci, kh, kw))
    b = np.empty(O, dtype=object)
    for o in range(O):
        base = (o // (O // G)) * (M // G)
        for i in range(Ci):
            for u in range(kh):
                for v in range(kw):
                    w[o, i, u, v] = sympy.Add(*[w2r[o, l, u, v] * w1r[base + l, i, 0, 0] for l in range(Ml)])
        terms = [b2[o]] if b2 is not None else []
        if b1 is not None:
            terms += [w2r[o, l, u, v] * b1[base + l] for l in range(Ml) for u in range(kh) for v in range(kw)]
        b[o] = sympy.Add(*terms)
    return w, b, G


def fuse_kxk_1x1(w1, b1, g1, w2, b2, g2):
    """(W, b, G) for kxk conv (w1, b1, groups g1) -> 1x1 conv (w2, b2, groups g2, stride 1, pad 0)."""
    if w2.shape[2:] != (1, 1):
        raise ValueError("second conv must be 1x1")
    G = gcd(g1, g2)
    w1r, w2r = _regroup(w1, g1, G), _regroup(w2, g2, G)
    M, Ci, kh, kw = w1r.shape
    O, Ml = w2r.shape[:2]
    w = zeros((O, Ci, kh, kw))
    b = np.empty(O, dtype=object)
    for o in range(O):
        base = (o // (O // G)) * (M // G)
        for i in range(Ci):
            for u in range(kh):
                for v in range(kw):
                    w[o, i, u, v] = sympy.Add(*[w2r[o, l, 0, 0] * w1r[base + l, i, u, v] for l in range(Ml)])
        terms = [b2[o]] if b2 is not None else []
        if b1 is not None:
            terms += [w2r[o, l, 0, 0] * b1[base + l] for l in range(Ml)]
        b[o] = sympy.Add(*terms)
    return w, b, G


CONFIGS_A = [  # 1x1 -> kxk
    dict(C=2, M=2, O=2, H=4, W=5, k=(3, 3), g1=1, g2=1, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), b1=True, b2=True),
    dict(C=4, M=4, O=4, H=5, W=5, k=(3, 3), g1=2, g2=2, stride=(2, 2), padding=(1, 1, 1, 1), dilation=(1, 1), b1=False, b2=True),
    dict(C=2, M=2, O=2, H=5, W=5, k=(2, 2), g1=1, g2=2, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(2, 2), b1=True, b2=False),
    dict(C=4, M=2, O=2, H=4, W=5, k=(2, 3), g1=2, g2=1, stride=(1, 2), padding=(1, 0, 0, 1), dilation=(1, 1), b1=False, b2=True),
]
CONFIGS_B = [  # kxk -> 1x1
    dict(C=2, M=2, O=2, H=5, W=5, k=(3, 3), g1=2, g2=1, stride=(2, 2), padding=(1, 1, 1, 1), dilation=(1, 1), b1=True, b2=True),
    dict(C=2, M=4, O=2, H=4, W=5, k=(2, 3), g1=1, g2=2, stride=(1, 2), padding=(0, 1, 2, 1), dilation=(2, 1), b1=True, b2=False),
    dict(C=4, M=4, O=4, H=4, W=4, k=(3, 1), g1=4, g2=2, stride=(1, 1), padding=(1, 1, 0, 0), dilation=(1, 1), b1=False, b2=True),
]


CONFIGS_A += [  # 1x1 with padding p1 (no bias) -> kxk: padding p1 + padding
    dict(C=2, M=2, O=2, H=3, W=4, k=(3, 3), g1=1, g2=1, stride=(1, 1), p1=(1, 1, 1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), b1=False, b2=True),
    dict(C=4, M=4, O=2, H=4, W=3, k=(2, 3), g1=2, g2=2, stride=(2, 1), p1=(0, 1, 2, 0), padding=(1, 0, 0, 1), dilation=(1, 2), b1=False, b2=True),
    dict(C=2, M=4, O=4, H=3, W=3, k=(3, 1), g1=1, g2=4, stride=(1, 2), p1=(2, 1, 0, 1), padding=(0, 0, 1, 1), dilation=(1, 1), b1=False, b2=False),
]
CONFIGS_B += [  # kxk (any geometry, bias) -> 1x1 with padding p2 (no bias): pad(conv, p2)
    dict(C=2, M=2, O=2, H=4, W=4, k=(3, 3), g1=1, g2=1, stride=(1, 1), padding=(1, 1, 1, 1), p2=(1, 1, 1, 1), dilation=(1, 1), b1=True, b2=False),
    dict(C=4, M=4, O=2, H=5, W=4, k=(2, 3), g1=4, g2=2, stride=(2, 1), padding=(0, 1, 1, 0), p2=(0, 2, 1, 0), dilation=(2, 1), b1=True, b2=False),
    dict(C=2, M=2, O=4, H=3, W=3, k=(1, 1), g1=2, g2=1, stride=(1, 1), padding=(1, 0, 0, 1), p2=(1, 0, 2, 1), dilation=(1, 1), b1=False, b2=False),
]


CONFIGS_A_BIASED = [  # 1x1 with padding p1 AND a bias -> unpadded kxk: padding p1
    dict(C=2, M=2, O=2, H=3, W=4, k=(3, 3), g1=1, g2=1, stride=(1, 1), p1=(1, 1, 1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), b1=True, b2=True),
    dict(C=4, M=4, O=2, H=3, W=3, k=(3, 2), g1=2, g2=2, stride=(2, 1), p1=(1, 0, 2, 1), padding=(0, 0, 0, 0), dilation=(1, 1), b1=True, b2=False),
]


def fuse_separate(w1, b1, g1, w2, b2, g2):
    """(W, b, G) for a conv acting on one axis (w1, b1, groups g1; one tap on the other) -> a conv acting on the other
    (w2, b2, groups g2): W[o, i, u, v] = sum_m w2[o, m, u or 0, v or 0] w1[m, i, u or 0, v or 0], b = b2 + sum w2 b1."""
    G = gcd(g1, g2)
    w1r, w2r = _regroup(w1, g1, G), _regroup(w2, g2, G)
    M, Ci, kh1, kw1 = w1r.shape
    O, Ml, kh2, kw2 = w2r.shape
    kh, kw = max(kh1, kh2), max(kw1, kw2)
    w = zeros((O, Ci, kh, kw))
    b = np.empty(O, dtype=object)
    for o in range(O):
        base = (o // (O // G)) * (M // G)
        for i in range(Ci):
            for u in range(kh):
                for v in range(kw):
                    w[o, i, u, v] = sympy.Add(*[w2r[o, l, min(u, kh2 - 1), min(v, kw2 - 1)] * w1r[base + l, i, min(u, kh1 - 1), min(v, kw1 - 1)]
                                                for l in range(Ml)])
        terms = [b2[o]] if b2 is not None else []
        if b1 is not None:
            terms += [w2r[o, l, u, v] * b1[base + l] for l in range(Ml) for u in range(kh2) for v in range(kw2)]
        b[o] = sympy.Add(*terms)
    return w, b, G


CONFIGS_SEPARATE = [  # RepNeXt's kx1(1xk(x)): each conv's stride, dilation and padding on its own axis
    dict(C=2, M=2, O=2, H=4, W=5, k1=(1, 3), s1=(1, 1), d1=(1, 1), p1=(0, 0, 1, 1), g1=2,
         k2=(3, 1), s2=(1, 1), d2=(1, 1), p2=(1, 1, 0, 0), g2=2, b1=False, b2=True),
    dict(C=2, M=4, O=2, H=5, W=6, k1=(1, 2), s1=(1, 2), d1=(1, 2), p1=(0, 0, 2, 1), g1=1,
         k2=(2, 1), s2=(2, 1), d2=(1, 1), p2=(0, 1, 0, 0), g2=2, b1=False, b2=False),
    dict(C=2, M=2, O=2, H=5, W=4, k1=(3, 1), s1=(2, 1), d1=(1, 1), p1=(0, 0, 0, 0), g1=1,
         k2=(1, 2), s2=(1, 1), d2=(1, 1), p2=(0, 0, 0, 0), g2=1, b1=True, b2=True),  # no padding after: a bias folds
]


def _tensors(cfg, k1, k2):
    C, M, O = cfg["C"], cfg["M"], cfg["O"]
    x = symbols_tensor("x", (C, cfg["H"], cfg["W"]))
    w1 = symbols_tensor("w1", (M, C // cfg["g1"]) + k1)
    w2 = symbols_tensor("w2", (O, M // cfg["g2"]) + k2)
    b1 = symbols_tensor("b1", (M,)) if cfg["b1"] else None
    b2 = symbols_tensor("b2", (O,)) if cfg["b2"] else None
    return x, w1, b1, w2, b2


def prove() -> list[str]:
    done = []
    none = (0, 0, 0, 0)
    for cfg in CONFIGS_A:
        x, w1, b1, w2, b2 = _tensors(cfg, (1, 1), cfg["k"])
        p1 = cfg.get("p1", none)
        kw = dict(stride=cfg["stride"], dilation=cfg["dilation"])
        lhs = conv2d(conv2d(x, w1, b1, padding=p1, groups=cfg["g1"]), w2, b2, groups=cfg["g2"], padding=cfg["padding"], **kw)
        both = tuple(p + q for p, q in zip(p1, norm_pads(cfg["padding"])))
        w, b, G = fuse_1x1_kxk(w1, b1, cfg["g1"], w2, b2, cfg["g2"], both)
        rhs = conv2d(x, w, b, groups=G, padding=both, **kw)
        desc = describe("conv1x1 (padding p1, no bias if any) -> convkxk == conv(padding p1 + padding)", **cfg)
        assert_equal(lhs, rhs, "seq_merge " + desc)
        done.append(desc)
    for cfg in CONFIGS_A_BIASED:
        x, w1, b1, w2, b2 = _tensors(cfg, (1, 1), cfg["k"])
        kw = dict(stride=cfg["stride"], dilation=cfg["dilation"])
        lhs = conv2d(conv2d(x, w1, b1, padding=cfg["p1"], groups=cfg["g1"]), w2, b2, groups=cfg["g2"], **kw)
        w, b, G = fuse_1x1_kxk(w1, b1, cfg["g1"], w2, b2, cfg["g2"], none)  # the kxk does not pad
        rhs = conv2d(x, w, b, groups=G, padding=cfg["p1"], **kw)
        desc = describe("conv1x1 (padding p1, bias) -> convkxk (no padding) == conv(padding p1)", **cfg)
        assert_equal(lhs, rhs, "seq_merge " + desc)
        done.append(desc)
    for cfg in CONFIGS_B:
        x, w1, b1, w2, b2 = _tensors(cfg, cfg["k"], (1, 1))
        p2 = cfg.get("p2", none)
        kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"])
        lhs = conv2d(conv2d(x, w1, b1, groups=cfg["g1"], **kw), w2, b2, groups=cfg["g2"], padding=p2)
        w, b, G = fuse_kxk_1x1(w1, b1, cfg["g1"], w2, b2, cfg["g2"])
        rhs = pad(conv2d(x, w, b, groups=G, **kw), p2)
        desc = describe("convkxk -> conv1x1 (padding p2, no bias if any) == pad(conv, p2)", **cfg)
        assert_equal(lhs, rhs, "seq_merge " + desc)
        done.append(desc)

    for cfg in CONFIGS_SEPARATE:
        x, w1, b1, w2, b2 = _tensors(cfg, cfg["k1"], cfg["k2"])
        lhs = conv2d(conv2d(x, w1, b1, cfg["s1"], cfg["p1"], cfg["d1"], cfg["g1"]), w2, b2, cfg["s2"], cfg["p2"], cfg["d2"], cfg["g2"])
        w, b, G = fuse_separate(w1, b1, cfg["g1"], w2, b2, cfg["g2"])
        first_h = cfg["k1"][0] > 1 or cfg["s1"][0] > 1 or any(cfg["p1"][:2])  # which conv acts on the height
        h, v = (cfg["s1"], cfg["d1"], cfg["p1"]) if first_h else (cfg["s2"], cfg["d2"], cfg["p2"]), \
               (cfg["s2"], cfg["d2"], cfg["p2"]) if first_h else (cfg["s1"], cfg["d1"], cfg["p1"])
        rhs = conv2d(x, w, b, (h[0][0], v[0][1]), (*h[2][:2], *v[2][2:]), (h[1][0], v[1][1]), G)
        desc = describe("conv on one axis -> conv on the other == conv with each one's geometry on its axis", **cfg)
        assert_equal(lhs, rhs, "seq_merge " + desc)
        done.append(desc)

    # REFUSED: a 1x3 WITH bias, then a 3x1 that zero-pads: the padded rows are 0, the first conv gives its bias there.
    cfg = dict(C=1, M=1, O=1, H=3, W=3, g1=1, g2=1, b1=True, b2=False)
    x, w1, b1, w2, _ = _tensors(cfg, (1, 3), (3, 1))
    lhs = conv2d(conv2d(x, w1, b1, padding=(0, 0, 1, 1)), w2, padding=(1, 1, 0, 0))
    w, b, _ = fuse_separate(w1, b1, 1, w2, None, 1)
    rhs = conv2d(x, w, b, padding=(1, 1, 1, 1))
    _, num = assert_differs(lhs, rhs, (0, 0, 0), "seq_merge refused separate axes")
    done.append(f"refused: conv3x1(conv1x3(x; bias), padding 1) != the merged 3x3: the top row reads 0 above x where the "
                f"1x3 gives its bias (numeric witness {num})")

    # REFUSED: a zero-padding 1x1 conv WITH bias is not pad(pointwise conv): the border is b, not 0.
    x, w1, b1 = symbols_tensor("x", (2, 2, 2)), symbols_tensor("w1", (2, 2, 1, 1)), symbols_tensor("b1", (2,))
    lhs = conv2d(x, w1, b1, padding=(1, 1, 1, 1))
    rhs = pad(conv2d(x, w1, b1), (1, 1, 1, 1))
    assert_equal(lhs[:, 1:-1, 1:-1], rhs[:, 1:-1, 1:-1], "seq_merge refused padded 1x1, interior")
    diff, num = assert_differs(lhs, rhs, (0, 0, 0), "seq_merge refused padded 1x1")
    assert_equal([diff], [b1[0]], "seq_merge refused padded 1x1: difference is the bias")
    done.append(f"refused: conv1x1(bias, padding 1) != pad(conv1x1(bias), 1): at the border lhs - rhs = b1 "
                f"(numeric witness {num}); interior agrees")

    # REFUSED: 1x1 conv WITH bias, then a zero-padded 3x3 conv.
    cfg = dict(C=2, M=2, O=1, H=4, W=4, k=(3, 3), g1=1, g2=1, stride=(1, 1), padding=(1, 1, 1, 1),
               dilation=(1, 1), b1=True, b2=True)
    x, w1, b1, w2, b2 = _tensors(cfg, (1, 1), cfg["k"])
    try:
        fuse_1x1_kxk(w1, b1, 1, w2, b2, 1, cfg["padding"])
    except ValueError:
        pass
    else:
        raise AssertionError("seq_merge: fuse_1x1_kxk accepted the refused configuration")
    lhs = conv2d(conv2d(x, w1, b1), w2, b2, padding=cfg["padding"])
    w, b, G = fuse_1x1_kxk(w1, b1, 1, w2, b2, 1, cfg["padding"], allow_refused=True)
    rhs = conv2d(x, w, b, padding=cfg["padding"])
    assert_equal(lhs[:, 1:-1, 1:-1], rhs[:, 1:-1, 1:-1], "seq_merge refused case, interior")
    diff, num = assert_differs(lhs, rhs, (0, 0, 0), "seq_merge refused case")
    # The symbolic difference is exactly the bias of the padded taps:
    # -(sum over the 5 taps in row 0 / column 0 of W2[0, m] * b1[m]).
    expected = -sum(w2[0, m, u, v] * b1[m] for m in range(2) for u in range(3) for v in range(3)
                    if u == 0 or v == 0)
    assert_equal([diff], [expected], "seq_merge refused case: difference is the padded taps' bias")
    done.append(f"refused: conv1x1(bias) -> conv3x3(padding 1): at corner pixel (0,0) "
                f"lhs - rhs = -sum_(border taps) W2*b1 != 0 (numeric witness {num}); interior agrees")
    return done
