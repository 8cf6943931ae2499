"""Crop before conv: a crop of a conv's input, on sides the conv does not pad, is zero taps of its kernel.

    conv(crop(x; a, c, e, f); W, padding (t, b, l, r))
        = conv(x; pad(W, a/d_h, c/d_h, e/d_w, f/d_w), padding (t, b, l, r))

where the crop removes ``a`` rows at the top, ``c`` at the bottom, ``e`` columns
on the left and ``f`` on the right of the input, every side it crops is a side
the conv does not pad, and ``(d_h, d_w)`` is the conv's dilation.  Output column
``j`` of the conv reads cropped columns ``j s - l + m d``, input columns
``j s - l + e + m d``: with ``l = 0``, the taps of a kernel grown by ``e / d``
zero taps on the left, which read input columns ``j s + m' d`` with ``m'`` from
``e / d`` on.  The grown kernel's extent takes ``e + f`` more columns, the
crop took ``e + f`` fewer: one output count at every input size.  Any stride,
groups and bias.

This is ACNet's block where its padding is less than half its kernel: the
square ``k x k`` conv reads the input, and the ``k x 1`` and ``1 x k`` branches
read it cropped by ``k // 2 - padding`` on the sides they do not pad
(``input[:, :, :, c:-c]``).  Their kernels grown to the square one's width, the
three branches read one input and sum into one conv (:mod:`kernel_pad`,
:mod:`branch_sum`).

Preconditions: the crop is a slice of step 1 along the height or width whose
start is a number >= 0 and whose end counts from the end, or a pad by amounts
<= 0 (:func:`~repalgebra.rules.crop_into_conv.cropped`).  The conv pads no side
the crop removes: there it reads zeros where the uncropped input has values.
Each crop is a whole number of dilated taps.  Another conv reads the uncropped
input with the same stride and groups, as many outputs at every size, and a
window that holds the grown kernel's: the grown kernel merges into it; alone,
or beside a conv padded otherwise, its zero taps would only add work.
"""

from __future__ import annotations

from repalgebra.ir import Graph, Node
from repalgebra.kernels import pad_kernel_axes
from repalgebra.match import Window, conv_with, lattice_step, producer, reach, union_window, window
from repalgebra.rules.crop_into_conv import cropped
from repalgebra.rules.registry import Refusal, Rewrite, rule


@rule("crop_before_conv", on=("conv2d",))
def crop_before_conv(graph, conv):
    crop = producer(conv.x, "slice", "pad")
    removed = None if crop is None else cropped(crop)
    if removed is None or isinstance(removed, str):
        return removed and Refusal(removed, crop)
    grown = grown_taps(removed, conv.attrs["padding"], conv.attrs["dilation"])
    if isinstance(grown, str):
        return Refusal(grown, crop)
    (t, b, l, r), (kh, kw) = grown, conv.params["weight"].shape[2:]
    if not merges_with_a_sibling(graph, conv, crop, (kh + t + b, kw + l + r)):
        return Refusal("no other conv of the uncropped input takes the grown kernel: its zero taps would only add work", crop)
    new = conv_with(conv, sources=(crop,), inputs=(crop.x,), weight=pad_kernel_axes(conv.params["weight"], (t, l), (b, r)))
    return Rewrite(conv.out, new.out, (new,))


def grown_taps(removed: tuple[int, int, int, int], padding: tuple[int, int, int, int],
               dilation: tuple[int, int]) -> tuple[int, int, int, int] | str:
    """The zero taps ``(top, bottom, left, right)`` a kernel grows by to read the uncropped input; why not where the
    conv pads a side the crop removes, or a crop is not a whole number of dilated taps."""
    dh, dw = dilation
    taps = []
    for side, k, p, d in zip(("top", "bottom", "left", "right"), removed, padding, (dh, dh, dw, dw)):
        if k and p:
            return (f"the conv pads the {side} side the crop removes: it reads zeros there where the uncropped input "
                    "has values")
        if k % d:
            return f"the crop of {k} on the {side} is not a whole number of taps of dilation {d}"
        taps.append(k // d)
    return tuple(taps)


def merges_with_a_sibling(graph: Graph, conv: Node, crop: Node, kernel: tuple[int, int]) -> bool:
    """Whether another conv reads ``crop``'s input with ``conv``'s stride and groups, as many outputs at every size
    (:func:`~repalgebra.match.reach`), and a window that holds ``conv``'s grown to ``kernel``: the two then merge
    into that conv's kernel (:mod:`kernel_pad`, :mod:`branch_sum`) at no cost.  A sibling padded otherwise (a 3x3
    padded 1 beside a 3x1 padded 0) is no such conv, and growing the kernel would only add work (found by a
    review)."""
    t, b, l, r = conv.attrs["padding"]
    dh, dw = conv.attrs["dilation"]
    grown = Window(conv.attrs["stride"], (-t, -l), (dh, dw), kernel)
    reach_grown = (t + b - dh * (kernel[0] - 1), l + r - dw * (kernel[1] - 1))
    for n in graph.users(crop.x):
        if n is conv or n.op != "conv2d" or n.x is not crop.x or any(n.attrs[k] != conv.attrs[k] for k in ("stride", "groups")):
            continue
        theirs = window(n)
        if reach(n) == reach_grown and lattice_step([grown, theirs]) is not None:
            union = union_window([grown, theirs])
            if (union.first, union.count) == (theirs.first, theirs.count):
                return True
    return False
