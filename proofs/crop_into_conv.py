"""crop_into_conv: a crop of a conv's output is the conv with less padding.

Identity: a conv with stride (s_h, s_w), zero padding (t, b, l, r), any kernel, dilation, groups and
bias; a crop that removes a rows at the top, c at the bottom, e columns on the left and f on the
right of its output (a slice y[:, a:-c, e:-f], or a pad by (-a, -c, -e, -f)). Then

    crop(conv(x; W, b, padding (t, b, l, r)); a, c, e, f)
        == conv(x; W, b, padding (t - a*s_h, b - c*s_h, l - e*s_w, r - f*s_w))

whenever every new padding is >= 0.

Why: output row i of the crop is row i + a of the conv, whose window starts at input row
(i + a)*s_h - t = i*s_h - (t - a*s_h): the window of row i of a conv padded t - a*s_h on top. The
row count of a conv is floor((H + t + b - K) / s_h) + 1 with K the dilated kernel extent; taking
(a + c)*s_h from t + b takes exactly a + c from it, at every H. The same for the columns.

Configurations: a TCN's causal conv (height 1, kernel 3 padded 2 on both sides, chomp of the last
2 columns) at two widths, the identity holding at each with the same new padding; a crop of the
first row and last column of a strided, dilated, grouped conv with a bias; a crop written as a pad
by negative amounts on all four sides. All with symbolic x, W, b.

REFUSED: a slice that ends at a fixed index (y[..., :4]). At one width a padding exists that
keeps those 4 columns (shown exact); at another width the same padding keeps another number of
columns, where the slice still keeps 4: no padding holds at every width (shown by the shapes).

Proof: symbolic tensors; expand(lhs - rhs) == 0 elementwise.
"""

from __future__ import annotations

from .symbolic import assert_equal, conv2d, describe, symbols_tensor


def fuse(padding, removed, stride):
    """The conv's padding after a crop removing ``removed = (a, c, e, f)`` rows and columns of its output."""
    sh, sw = stride
    return tuple(p - k * s for p, k, s in zip(padding, removed, (sh, sh, sw, sw)))


def crop(y, removed):
    """``y[:, a:H - c, e:W - f]`` of a (C, H, W) tensor."""
    a, c, e, f = removed
    return y[:, a : y.shape[1] - c, e : y.shape[2] - f]


CONFIGS = [
    dict(name="TCN chomp", C=2, O=2, H=1, W=5, k=(1, 3), stride=(1, 1), dilation=(1, 1), groups=1,
         padding=(0, 0, 2, 2), removed=(0, 0, 0, 2), bias=True),
    dict(name="TCN chomp, another width", C=2, O=2, H=1, W=8, k=(1, 3), stride=(1, 1), dilation=(1, 1), groups=1,
         padding=(0, 0, 2, 2), removed=(0, 0, 0, 2), bias=True),
    dict(name="first row and last column, strided, dilated, grouped", C=2, O=4, H=6, W=5, k=(3, 2), stride=(2, 1),
         dilation=(1, 2), groups=2, padding=(2, 1, 0, 3), removed=(1, 0, 0, 2), bias=True),
    dict(name="a pad by negative amounts", C=1, O=2, H=5, W=6, k=(2, 2), stride=(2, 2), dilation=(1, 1), groups=1,
         padding=(2, 3, 2, 2), removed=(1, 1, 1, 1), bias=False),
]


def prove() -> list[str]:
    done = []
    for cfg in CONFIGS:
        x = symbols_tensor("x", (cfg["C"], cfg["H"], cfg["W"]))
        w = symbols_tensor("w", (cfg["O"], cfg["C"] // cfg["groups"], *cfg["k"]))
        b = symbols_tensor("b", (cfg["O"],)) if cfg["bias"] else None
        kw = dict(stride=cfg["stride"], dilation=cfg["dilation"], groups=cfg["groups"])
        lhs = crop(conv2d(x, w, b, padding=cfg["padding"], **kw), cfg["removed"])
        new = fuse(cfg["padding"], cfg["removed"], cfg["stride"])
        assert min(new) >= 0, new
        rhs = conv2d(x, w, b, padding=new, **kw)
        desc = describe("crop(conv(x; padding P)) == conv(x; padding P - crop * stride)", case=cfg["name"],
                        x=(cfg["C"], cfg["H"], cfg["W"]), kernel=cfg["k"], stride=cfg["stride"],
                        dilation=cfg["dilation"], groups=cfg["groups"], padding=cfg["padding"],
                        crop=cfg["removed"], new_padding=new, bias=cfg["bias"])
        assert_equal(lhs, rhs, f"crop_into_conv {desc}")
        done.append(desc)

    # REFUSED: y[..., :4] keeps 4 columns at every width; a padding keeps a number that grows with the width.
    w = symbols_tensor("w", (1, 1, 1, 3))
    kept = []
    for width in (3, 5):
        x = symbols_tensor("x", (1, 1, width))
        lhs = conv2d(x, w, None, padding=(0, 0, 2, 2))[:, :, :4]
        rhs = conv2d(x, w, None, padding=(0, 0, 2, 1))  # 1 column fewer: the padding that fits width 3
        if width == 3:
            assert_equal(lhs, rhs, "crop_into_conv: a fixed end at the width it fits")
        kept.append((lhs.shape[2], rhs.shape[2]))
    assert kept[1][0] != kept[1][1], kept
    done.append(f"refused: y[..., :4] after a conv padded (2, 2): padding (2, 1) equals it at width 3 (shown), but at "
                f"width 5 the slice keeps {kept[1][0]} columns and that conv {kept[1][1]}: no padding holds at every width")
    return done
