"""pad_absorb: an explicit zero pad followed by a conv is the conv with more padding.

Identity: for zero padding P = (t, b, l, r) (asymmetric allowed) and a conv with padding
(pt, pb, pl, pr), any stride, dilation and groups,

    conv(pad(x, P); W, bias, padding=(pt, pb, pl, pr))
        == conv(x; W, bias, padding=(pt + t, pb + b, pl + l, pr + r)).

Reason: zero padding composes additively (pad(pad(x, P), Q) == pad(x, P + Q)) and conv2d
pads its input with zeros before sliding the window. Preconditions: the explicit pad is a
*zero* (constant 0) pad with non-negative amounts; reflect/replicate pads are not absorbed.

After a 1x1 conv with stride 1 and NO bias (any dilation, groups and own padding p):

    pad(conv1x1(x; W, padding=p), P) == conv1x1(x; W, padding=p + P).

Reason: output pixel r of a 1x1 stride-1 conv reads only input pixel r, so it commutes with
moving pixels; at a padded pixel it reads 0 and gives W * 0 = 0, which is what the pad puts
there. REFUSED with a bias b: the padded conv gives b at the border, the pad gives 0.
And a pad by (0, 0, 0, 0) is the identity, whatever its value.

Before an average pool (no ceil_mode) with padding (p, q) that counts its padding, or with no
padding at all (then every window is inside the image and the divisor is kh*kw either way), an
even zero pad (a, a, c, c) is more pool padding:

    avg_pool2d(pad(x, (a, a, c, c)), k, s, (p, q)) == avg_pool2d(x, k, s, (p + a, q + c), count_include_pad=True).

Reason: both pool the same zero-padded image and divide every window by kh*kw. REFUSED when the
pool has padding and count_include_pad=False: it divides its own padded border windows by the
real elements, which now include the pad's zeros, while the merged pool would not count them.

Proof: symbolic x, W, bias; expand(lhs - rhs) == 0 elementwise.
"""

from __future__ import annotations

from .symbolic import assert_differs, assert_equal, avg_pool2d, conv2d, conv_symbols, describe, norm_pads, pad


def fuse(pads, conv_padding):
    """New conv padding after absorbing the explicit zero pad ``pads``."""
    t, b, l, r = norm_pads(pads)
    pt, pb, pl, pr = norm_pads(conv_padding)
    return (pt + t, pb + b, pl + l, pr + r)


CONFIGS = [
    dict(C=2, O=2, H=4, W=5, k=(3, 3), pads=(1, 1, 1, 1), padding=(0, 0, 0, 0), stride=(1, 1), dilation=(1, 1), groups=1),
    dict(C=2, O=2, H=4, W=5, k=(3, 3), pads=(0, 1, 0, 1), padding=(0, 0, 0, 0), stride=(2, 2), dilation=(1, 1), groups=2),
    dict(C=2, O=4, H=5, W=4, k=(2, 3), pads=(2, 0, 1, 0), padding=(1, 1, 0, 1), stride=(1, 2), dilation=(2, 1), groups=2),
    dict(C=3, O=2, H=4, W=4, k=(1, 1), pads=(0, 2, 1, 0), padding=(0, 0, 0, 0), stride=(1, 1), dilation=(1, 1), groups=1),
]


CONFIGS_AFTER = [  # 1x1 stride-1 conv without bias, then a zero pad
    dict(C=2, O=2, H=2, W=3, k=(1, 1), padding=(0, 0, 0, 0), pads=(1, 1, 1, 1), dilation=(1, 1), groups=1),
    dict(C=4, O=2, H=3, W=2, k=(1, 1), padding=(1, 0, 0, 2), pads=(0, 2, 1, 0), dilation=(2, 3), groups=2),
    dict(C=2, O=4, H=2, W=2, k=(1, 1), padding=(0, 1, 1, 0), pads=(2, 0, 0, 1), dilation=(1, 1), groups=2),
]


POOL_CONFIGS = [  # even zero pad, then an average pool (no ceil_mode)
    dict(C=2, H=3, W=4, k=(3, 3), stride=(1, 1), padding=(0, 0), pads=(1, 1, 1, 1), count_include_pad=False),
    dict(C=1, H=4, W=4, k=(3, 5), stride=(2, 1), padding=(1, 0), pads=(0, 0, 1, 1), count_include_pad=True),
    dict(C=1, H=5, W=3, k=(5, 3), stride=(2, 2), padding=(0, 1), pads=(2, 2, 0, 0), count_include_pad=True),
]


def prove() -> list[str]:
    done = []
    for cfg in CONFIGS:
        g = cfg["groups"]
        x, w, b = conv_symbols(cfg, bias=True)
        kw = dict(stride=cfg["stride"], dilation=cfg["dilation"], groups=g)
        lhs = conv2d(pad(x, cfg["pads"]), w, b, padding=cfg["padding"], **kw)
        rhs = conv2d(x, w, b, padding=fuse(cfg["pads"], cfg["padding"]), **kw)
        desc = describe("pad -> conv == conv(padding + pad)", **cfg)
        assert_equal(lhs, rhs, "pad_absorb " + desc)
        done.append(desc)
    for cfg in CONFIGS_AFTER:
        x, w, _ = conv_symbols(cfg, bias=False)
        kw = dict(dilation=cfg["dilation"], groups=cfg["groups"])
        lhs = pad(conv2d(x, w, None, padding=cfg["padding"], **kw), cfg["pads"])
        rhs = conv2d(x, w, None, padding=fuse(cfg["pads"], cfg["padding"]), **kw)
        desc = describe("conv1x1 (no bias) -> pad == conv1x1(padding + pad)", **cfg)
        assert_equal(lhs, rhs, "pad_absorb " + desc)
        done.append(desc)
    x = conv_symbols(CONFIGS[0], bias=False)[0]
    assert_equal(pad(x, (0, 0, 0, 0)), x, "pad_absorb: pad by nothing")
    done.append("pad(x, (0, 0, 0, 0)) == x")

    for cfg in POOL_CONFIGS:
        x = conv_symbols(dict(cfg, O=1, k=(1, 1), groups=1), bias=False)[0]
        (a, _, c, _), (p, q) = cfg["pads"], cfg["padding"]
        lhs = avg_pool2d(pad(x, cfg["pads"]), cfg["k"], cfg["stride"], cfg["padding"], cfg["count_include_pad"])
        rhs = avg_pool2d(x, cfg["k"], cfg["stride"], (p + a, q + c), True)
        desc = describe("pad -> avg_pool == avg_pool(padding + pad, count_include_pad)", **cfg)
        assert_equal(lhs, rhs, "pad_absorb " + desc)
        done.append(desc)

    # REFUSED: a pool that pads and does not count its padding, after a zero pad.
    x = conv_symbols(dict(C=1, O=1, H=4, W=4, k=(1, 1), groups=1), bias=False)[0]
    lhs = avg_pool2d(pad(x, (1, 1, 1, 1)), 5, 1, 1, count_include_pad=False)
    rhs = avg_pool2d(x, 5, 1, 2, count_include_pad=True)
    diff, num = assert_differs(lhs, rhs, (0, 0, 0), "pad_absorb refused pool case")
    done.append(f"refused: avg_pool(pad(x, 1), 5, padding 1, count_include_pad=False) != avg_pool(x, 5, padding 2): "
                f"the corner window divides by 16, not 25 (numeric witness {num})")

    # REFUSED: a 1x1 conv with a bias, then a zero pad: the padded conv's border is the bias.
    cfg = dict(C=2, O=2, H=2, W=2, k=(1, 1), groups=1)
    x, w, b = conv_symbols(cfg, bias=True)
    lhs = pad(conv2d(x, w, b), (1, 1, 1, 1))
    rhs = conv2d(x, w, b, padding=(1, 1, 1, 1))
    assert_equal(lhs[:, 1:-1, 1:-1], rhs[:, 1:-1, 1:-1], "pad_absorb refused case, interior")
    diff, num = assert_differs(lhs, rhs, (0, 0, 0), "pad_absorb refused case")
    assert_equal([diff], [-b[0]], "pad_absorb refused case: difference is the bias")
    done.append(f"refused: pad(conv1x1(x; W, b)) != conv1x1(x; W, b, padding): at the border lhs - rhs = -b "
                f"(numeric witness {num}); interior agrees")
    return done
