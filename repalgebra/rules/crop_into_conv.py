"""Crop into conv: a crop of a conv's output is the conv with less padding.

    crop(conv(x; W, stride (s_h, s_w), padding (t, b, l, r)); a, c, e, f)
        = conv(x; W, stride (s_h, s_w), padding (t - a s_h, b - c s_h, l - e s_w, r - f s_w))

where the crop removes ``a`` rows at the top, ``c`` at the bottom, ``e``
columns on the left and ``f`` on the right.  Output row ``i`` of the
cropped conv is row ``i + a`` of the conv, whose window starts at input row
``(i + a) s_h - t = i s_h - (t - a s_h)``: the window of row ``i`` with
``a s_h`` less padding on top.  With ``c s_h`` less padding at the bottom the
conv has ``c`` fewer rows, ``floor((H + t + b - c s_h - K) / s_h) + 1``, at
every input size.  Any kernel, dilation, groups and bias.

This is a causal conv as speech and sequence models write it: a TCN's
``Conv1d(padding=k - 1)`` then a chomp ``y[..., :-(k - 1)]``, a causal
depthwise conv cropped before its BatchNorm (which then folds,
:mod:`bn_fold`), wav2vec 2.0's positional conv of even kernel dropping its
last column; a ``Conv1d`` runs as a conv of height one
(:mod:`repalgebra.frontend.height_one`), so the crop is along its width.

Preconditions: the crop is a slice of step 1 along the height or width whose
start is a number >= 0 and whose end counts from the end (``y[..., a:-c]``,
``y[..., a:]``), or a pad by amounts <= 0; a slice ending at a fixed index
keeps a number of rows that depends on the input size, which padding cannot
say.  The conv pads at least as much as the crop removes, on each side, in
input pixels (``a s_h <= t``, ...); the crop is the only reader of the conv.
"""

from __future__ import annotations

from repalgebra.ir import Node
from repalgebra.match import conv_with, producer, sole_use
from repalgebra.rules.registry import Refusal, Rewrite, rule


def cropped(crop: Node) -> tuple[int, int, int, int] | str | None:
    """``(a, c, e, f)``: the rows and columns ``crop`` removes at the top, bottom, left and right of a 4-D value at
    every size; why not, for a slice of step 1 along the height or width ending at a fixed index; else None."""
    if crop.op == "pad":
        pads = tuple(crop.attrs["pads"])
        return tuple(-p for p in pads) if max(pads) <= 0 and min(pads) < 0 else None
    a = crop.attrs
    axis = a["axis"] % 4 if crop.x.shape is not None and len(crop.x.shape) == 4 else None
    start, end = a["start"] or 0, a["end"]
    if axis not in (2, 3) or a["step"] not in (None, 1) or start < 0:
        return None
    if end is not None and end >= 0:
        return f"the slice ends at index {end}: how many outputs it keeps depends on the input size, which padding cannot say"
    removed = (start, -end if end is not None else 0)
    return (*removed, 0, 0) if axis == 2 else (0, 0, *removed)


@rule("crop_into_conv", on=("slice", "pad"))
def crop_into_conv(graph, crop):
    conv = producer(crop.x, "conv2d")
    if conv is None or not sole_use(graph, conv.out):
        return None
    removed = cropped(crop)
    if removed is None or isinstance(removed, str):
        return removed and Refusal(removed, crop)
    sh, sw = conv.attrs["stride"]
    padding = tuple(p - k * s for p, k, s in zip(conv.attrs["padding"], removed, (sh, sh, sw, sw)))
    if min(padding) < 0:
        return Refusal(f"the crop removes {removed} rows and columns (top, bottom, left, right), more than the conv's "
                       f"padding {conv.attrs['padding']} at stride {conv.attrs['stride']} covers", crop)
    new = conv_with(conv, sources=(crop,), padding=padding)
    return Rewrite(crop.out, new.out, (new,))
