"""crop_into_conv: a crop of a conv's output is the conv with less padding.

    crop(conv(x; padding (t, b, l, r)); a, c, e, f) = conv(x; padding (t - a s_h, b - c s_h, l - e s_w, r - f s_w))

The crop is a slice of step 1 (start >= 0, end from the end) along the height or width, or a pad by amounts <= 0.
The identity holds at every input size: the rewritten conv is also compared with the model at a second size (the
same attributes, another input).  Refused: a crop beyond the conv's padding, a slice ending at a fixed index.  Not
matched: a slice of the channels, one with a step, a conv read elsewhere too.  Tolerances:
:func:`repalgebra.testing.assert_graphs_equal` (float64 1e-9 relative; the model's dtype otherwise).
"""

import torch
from hypothesis import given
from hypothesis import strategies as st
from rulecheck import fired, only, reasons, run_rules

from repalgebra.builder import GraphBuilder
from repalgebra.ops import op_def
from repalgebra.testing import assert_graphs_equal, float_dtypes, random_input, seeds


def cropped_conv(size, k, stride, dilation, groups, padding, crop, dtype, seed, *, bias=True, readers=1):
    """``crop(conv(x))``; ``crop`` is ``("slice", axis, start, end)`` or ``("pad", pads)`` (amounts <= 0).
    ``readers`` 2: a relu reads the conv too."""
    gen = torch.Generator().manual_seed(seed)
    cin, cout = 2 * groups, 3 * groups
    b = GraphBuilder()
    x = b.input("x", (2, cin, *size), dtype)
    weight = torch.randn(cout, cin // groups, *k, generator=gen, dtype=torch.float64) / (cin * k[0] * k[1]) ** 0.5
    params = {"weight": weight.to(dtype)} | ({"bias": torch.randn(cout, generator=gen, dtype=torch.float64).to(dtype)} if bias else {})
    y = b.conv2d(x, **params, stride=stride, padding=padding, dilation=dilation, groups=groups, source="tcn.conv")
    if crop[0] == "slice":
        out = b.slice(y, axis=crop[1], start=crop[2], end=crop[3], step=1, source="tcn.chomp")
    else:
        out = b.pad(y, pads=crop[1], source="tcn.chomp")
    outs = [out, b.relu(y)] if readers == 2 else [out]
    return b.build(*outs), x.shape


@st.composite
def cases(draw):
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = tuple(draw(st.integers(0, 4)) for _ in range(4))
    sh, sw = stride
    # what the crop removes on each side, at most what the padding covers at this stride
    removed = [draw(st.integers(0, p // s)) for p, s in zip(padding, (sh, sh, sw, sw))]
    how = draw(st.sampled_from(["slice height", "slice width", "pad"]))
    if how == "pad":
        if not any(removed):
            removed[3] = padding[3] // sw
        crop = ("pad", tuple(-r for r in removed))
    else:
        lo, hi = (0, 1) if how == "slice height" else (2, 3)
        axis = draw(st.sampled_from([2, -2] if lo == 0 else [3, -1]))
        crop = ("slice", axis, removed[lo], -removed[hi] if removed[hi] else None)
    extent = [d * (kk - 1) + 1 for d, kk in zip(dilation, k)]
    # sizes where the crop leaves at least one row and column, at the example and at a second size
    size = tuple(e + draw(st.integers(2 * s + 2 * s * 4, 2 * s + 2 * s * 4 + 5)) for e, s in zip(extent, stride))
    return size, k, stride, dilation, draw(st.sampled_from([1, 2])), padding, crop


def _crop_amounts(crop):
    if crop[0] == "pad":
        return tuple(-p for p in crop[1])
    _, axis, start, end = crop
    removed = (start, -end if end is not None else 0)
    return (*removed, 0, 0) if axis % 4 == 2 else (0, 0, *removed)


@given(case=cases(), dtype=float_dtypes(), bias=st.booleans(), seed=seeds())
def test_a_crop_of_a_conv_is_the_conv_with_less_padding_at_every_size(case, dtype, bias, seed):
    size, k, stride, dilation, groups, padding, crop = case
    if not any(_crop_amounts(crop)):  # a crop of nothing: the front end writes no slice for it
        return
    graph, shape = cropped_conv(size, k, stride, dilation, groups, padding, crop, dtype, seed, bias=bias)
    fused, report = run_rules(graph, "crop_into_conv")
    assert fired(report, "crop_into_conv") == 1 and set(fused.op_counts()) == {"conv2d"}, str(fused)
    conv = only(fused, "conv2d")
    a, c, e, f = _crop_amounts(crop)
    sh, sw = stride
    assert conv.attrs["padding"] == (padding[0] - a * sh, padding[1] - c * sh, padding[2] - e * sw, padding[3] - f * sw)
    assert_graphs_equal(graph, fused, random_input(shape, dtype, seed + 1), dtype)
    # Another size, the same attributes: the rewrite holds as a function of any input.
    other = random_input((1, shape[1], shape[2] + 3, shape[3] + 5), torch.float64, seed + 2)
    before, run_conv = only(graph, "conv2d"), op_def("conv2d").run
    w = {k: v.double() for k, v in before.params.items()}
    want = op_def(crop[0]).run(run_conv(other, **w, **before.attrs), **only(graph, crop[0]).attrs)
    got = run_conv(other, **w, **conv.attrs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@given(dtype=float_dtypes(), seed=seeds())
def test_refused_beyond_the_padding_and_for_a_fixed_end(dtype, seed):
    for crop, why in ((("slice", 3, 0, -3), "more than the conv's padding"), (("pad", (-2, 0, 0, 0)), "more than the conv's padding"),
                      (("slice", 3, 0, 5), "ends at index 5")):
        graph, _ = cropped_conv((6, 9), (3, 3), (1, 1), (1, 1), 1, (1, 1, 2, 2), crop, dtype, seed)
        fused, report = run_rules(graph, "crop_into_conv")
        assert report.fired == [] and fused.op_counts() == graph.op_counts()
        assert any(why in r for r in reasons(report, crop[0])), (why, reasons(report, crop[0]))


@given(dtype=float_dtypes(), seed=seeds(), which=st.sampled_from(["channels", "step", "read elsewhere", "negative start", "mixed pad"]))
def test_not_matched_unless_a_crop_of_the_height_or_width_is_the_convs_only_reader(dtype, seed, which):
    pads = dict(size=(6, 9), k=(3, 3), stride=(1, 1), dilation=(1, 1), groups=1, padding=(1, 1, 2, 2), dtype=dtype, seed=seed)
    crop = {"channels": ("slice", 1, 1, None), "step": ("slice", 3, 0, -2), "read elsewhere": ("slice", 3, 0, -2),
            "negative start": ("slice", 3, -4, None), "mixed pad": ("pad", (1, 0, 0, -1))}[which]
    graph, _ = cropped_conv(crop=crop, readers=2 if which == "read elsewhere" else 1, **pads)
    if which == "step":
        b = GraphBuilder()
        x = b.input("x", (1, 2, 6, 9), dtype)
        y = b.conv2d(x, weight=torch.ones(3, 2, 3, 3, dtype=dtype), padding=(1, 1, 2, 2))
        graph = b.build(b.slice(y, axis=3, start=0, end=-2, step=2))
    fused, report = run_rules(graph, "crop_into_conv")
    assert report.fired == [] and fused.op_counts() == graph.op_counts()
