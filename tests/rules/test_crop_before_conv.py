"""crop_before_conv: a crop of a conv's input, on sides the conv does not pad, is zero taps of its kernel.

    conv(crop(x; a, c, e, f); W, padding P) = conv(x; pad(W, a/d_h, c/d_h, e/d_w, f/d_w), padding P)

The crop is a slice of step 1 (start >= 0, end from the end) along the height or width, or a pad by amounts <= 0,
on sides the conv does not pad, by whole dilated taps; another conv of the uncropped input (same stride and groups,
as many outputs, a window holding the grown kernel's) is there to merge with.  The identity holds at every input size:
the rewritten conv is also compared with the model at a second size.  Refused: a cropped side the conv pads, a
crop that is no whole number of taps, no conv to merge with.  Tolerances: :func:`repalgebra.testing.assert_graphs_equal`
(float64 1e-9 relative; the model's dtype otherwise).
"""

import torch
from hypothesis import given
from hypothesis import strategies as st
from rulecheck import fired, reasons, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.ops import op_def
from repalgebra.testing import assert_graphs_equal, float_dtypes, random_input, seeds


def acnet_branch(size, k, stride, dilation, groups, padding, crop, sibling, dtype, seed):
    """``(conv(crop(x)), sibling(x))``: ``crop`` is ``("slice", axis, start, end)`` or ``("pad", pads)``;
    ``sibling`` the other conv's ``(kernel, padding, stride)``, or None."""
    gen = torch.Generator().manual_seed(seed)
    cin, cout = 2 * groups, 3 * groups
    b = GraphBuilder()
    x = b.input("x", (2, cin, *size), dtype)

    def weights(kernel):
        w = torch.randn(cout, cin // groups, *kernel, generator=gen, dtype=torch.float64) / (cin * kernel[0] * kernel[1]) ** 0.5
        return {"weight": w.to(dtype), "bias": torch.randn(cout, generator=gen, dtype=torch.float64).to(dtype)}

    if crop[0] == "slice":
        cut = b.slice(x, axis=crop[1], start=crop[2], end=crop[3], step=1, source="acb.crop")
    else:
        cut = b.pad(x, pads=crop[1], source="acb.crop")
    outs = [b.conv2d(cut, **weights(k), stride=stride, padding=padding, dilation=dilation, groups=groups, source="acb.ver_conv")]
    if sibling is not None:
        kernel, pad, step = sibling
        outs.append(b.conv2d(x, **weights(kernel), stride=step, padding=pad, dilation=dilation, groups=groups,
                             source="acb.square_conv"))
    return b.build(*outs), x.shape


def _removed(crop):
    if crop[0] == "pad":
        return tuple(-p for p in crop[1])
    _, axis, start, end = crop
    cut = (start, -end if end is not None else 0)
    return (*cut, 0, 0) if axis % 4 == 2 else (0, 0, *cut)


@st.composite
def cases(draw):
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dh, dw = dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    how = draw(st.sampled_from(["slice height", "slice width", "pad"]))
    taps = [draw(st.integers(0, 2)) for _ in range(4)]
    if how == "slice height":
        taps[2:] = [0, 0]
    elif how == "slice width":
        taps[:2] = [0, 0]
    axis_of = (0, 1) if how == "slice height" else (2, 3)
    if not any(taps[i] for i in (axis_of if how != "pad" else range(4))):
        taps[axis_of[1]] = 1
    removed = [t * d for t, d in zip(taps, (dh, dh, dw, dw))]
    padding = tuple(0 if r else draw(st.integers(0, 2)) for r in removed)  # no padding on a cropped side
    if how == "pad":
        crop = ("pad", tuple(-r for r in removed))
    else:
        lo, hi = axis_of
        axis = draw(st.sampled_from([2, -2] if lo == 0 else [3, -1]))
        crop = ("slice", axis, removed[lo], -removed[hi] if removed[hi] else None)
    grown = (k[0] + taps[0] + taps[1], k[1] + taps[2] + taps[3])
    # a sibling whose window holds the grown kernel's with as many outputs: more taps on a side, as much more padding
    more = [draw(st.integers(0, 1)) for _ in range(4)]
    sibling = ((grown[0] + more[0] + more[1], grown[1] + more[2] + more[3]),
               tuple(p + m * d for p, m, d in zip(padding, more, (dh, dh, dw, dw))), stride)
    extent = [d * (g + 2 - 1) + 1 for d, g in zip(dilation, grown)]
    size = tuple(e + 2 * s + draw(st.integers(2, 9)) for e, s in zip(extent, stride))
    return size, k, stride, dilation, draw(st.sampled_from([1, 2])), padding, crop, sibling, tuple(taps)


@given(case=cases(), dtype=float_dtypes(), seed=seeds())
def test_a_crop_before_a_conv_is_zero_taps_of_its_kernel_at_every_size(case, dtype, seed):
    size, k, stride, dilation, groups, padding, crop, sibling, taps = case
    graph, shape = acnet_branch(size, k, stride, dilation, groups, padding, crop, sibling, dtype, seed)
    fused, report = run_rules(graph, "crop_before_conv")
    assert fired(report, "crop_before_conv") == 1 and set(fused.op_counts()) == {"conv2d"}, str(fused)
    conv = next(n for n in fused.nodes if str(n.source) != "acb.square_conv")
    assert conv.x is fused.inputs[0] and conv.attrs["padding"] == padding
    t, b, l, r = taps
    assert tuple(conv.params["weight"].shape[2:]) == (k[0] + t + b, k[1] + l + r)
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed + 1), dtype)
    # Another size, the same attributes: the rewrite holds as a function of any input.
    other = random_input((1, shape[1], shape[2] + 3, shape[3] + 5), torch.float64, seed + 2)
    before = next(n for n in graph.nodes if n.op == "conv2d" and "ver_conv" in str(n.source))
    cut = next(n for n in graph.nodes if n.op == crop[0])
    run_conv = op_def("conv2d").run
    want = run_conv(op_def(crop[0]).run(other, **cut.attrs), **{k: v.double() for k, v in before.params.items()}, **before.attrs)
    got = run_conv(other, **{k: v.double() for k, v in conv.params.items()}, **conv.attrs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


_ACB = dict(size=(7, 9), k=(3, 1), stride=(1, 1), dilation=(1, 1), groups=1, padding=(0, 0, 0, 0),
            crop=("slice", 3, 1, -1), sibling=((3, 3), (0, 0, 0, 0), (1, 1)))


@given(dtype=float_dtypes(), seed=seeds(), which=st.sampled_from(["padded side", "half a tap", "no sibling",
                                                                   "small sibling", "strided sibling", "sibling padded otherwise",
                                                                   "sibling of fewer outputs"]))
def test_refused_where_the_conv_pads_the_cropped_side_or_nothing_takes_the_grown_kernel(dtype, seed, which):
    case = dict(_ACB)
    why = {"padded side": "pads the left side the crop removes", "half a tap": "not a whole number of taps",
           "no sibling": "no other conv", "small sibling": "no other conv", "strided sibling": "no other conv",
           "sibling padded otherwise": "no other conv", "sibling of fewer outputs": "no other conv"}[which]
    if which == "padded side":
        case["padding"] = (0, 0, 1, 0)
    elif which == "half a tap":
        case["dilation"], case["k"], case["sibling"] = (1, 2), (3, 2), ((3, 3), (0, 0, 0, 0), (1, 1))
    elif which == "no sibling":
        case["sibling"] = None
    elif which == "small sibling":
        case["sibling"] = ((3, 2), (0, 0, 0, 0), (1, 1))
    elif which == "strided sibling":
        case["sibling"] = ((3, 3), (0, 0, 0, 0), (2, 1))
    elif which == "sibling padded otherwise":  # a 3x3 padded 1 beside the 3x1 padded 0 (a review)
        case["sibling"] = ((3, 3), (1, 1, 1, 1), (1, 1))
    else:  # its window holds the grown kernel's, but one tap wider unpadded, it has one output fewer
        case["sibling"] = ((3, 4), (0, 0, 0, 0), (1, 1))
    graph, _ = acnet_branch(**case, dtype=dtype, seed=seed)
    fused, report = run_rules(graph, "crop_before_conv")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
    assert any(why in r for r in reasons(report, "slice")), (why, reasons(report, "slice"))


@given(dtype=float_dtypes(), seed=seeds(), which=st.sampled_from(["channels", "step", "negative start", "fixed end", "mixed pad"]))
def test_not_matched_unless_the_crop_is_of_the_height_or_width_from_both_ends(dtype, seed, which):
    crop = {"channels": ("slice", 1, 1, None), "step": ("slice", 3, 1, -1), "negative start": ("slice", 3, -8, None),
            "fixed end": ("slice", 3, 1, 8), "mixed pad": ("pad", (1, 0, 0, -1))}[which]
    if which not in ("step", "channels"):
        graph, _ = acnet_branch(**{**_ACB, "crop": crop}, dtype=dtype, seed=seed)
    else:
        b = GraphBuilder()
        x = b.input("x", (1, 4, 7, 9), dtype)
        y = b.slice(x, axis=3, start=1, end=-1, step=2) if which == "step" else b.slice(x, axis=1, start=1, end=-1, step=1)
        cin = 4 if which == "step" else 2
        graph = b.build(b.conv2d(y, weight=torch.ones(3, cin, 3, 1, dtype=dtype)), b.conv2d(x, weight=torch.ones(3, 4, 3, 3, dtype=dtype)))
    fused, report = run_rules(graph, "crop_before_conv")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
