"""Pad share: a conv with no padding of its own reads a padded copy of its input instead, kernel padded to match.

    conv(x; W, dilation d) = conv(pad_m(x; t, b, l, r); pad_0(W; t/d, b/d, l/d, r/d), dilation d)

for a pad of any mode m (reflect, replicate, circular, constant) by ``t``
rows on top, ``b`` at the bottom, ``l`` columns left and ``r`` right: every
mode copies ``x`` unchanged into its interior, ``pad_m(x)[i + t, j + l] =
x[i, j]``.  The padded kernel's old taps read the interior pixels the conv
read before; its new taps, which reach the border, are multiplied by zero.
The output grid is unchanged (the input grew by ``t + b`` rows, the kernel
too).  Any stride, groups and bias; the dilation must divide the pad amounts
(the kernel grows by whole taps), except on an axis of one tap, which takes
any dilation.

This merges RepVGG branches written with ``padding_mode='reflect'`` (or
``'circular'``, ``'replicate'``): the 3x3 reads the reflected copy, the 1x1
and the identity read ``x``; the 1x1, centred, reads only interior pixels,
so it moves onto the copy and sums with the 3x3 (:mod:`kernel_pad`,
:mod:`branch_sum`).  A BN, channel scale or identity branch beside such a
3x3 becomes a 1x1 first (:mod:`bn_to_conv`, :mod:`identity_to_conv`), where
that 1x1 would move.

Preconditions: the conv is an operand of an add or sub beside a conv of
``pad_m(x)`` with the same stride; it has no padding of its own (it would
read zeros where the copy holds copied pixels); moved, its window lies inside
the other's, on the other's taps (so the two sum to a conv of that size), and
summing the two is no dearer than the branches as they are
(:func:`repalgebra.match.merge_refusal`).  The pad copies only the last two
axes, by amounts >= 0 (a negative amount crops).
"""

from __future__ import annotations

import torch

from repalgebra.ir import Node, Value
from repalgebra.kernels import pad_kernel
from repalgebra.match import conv_with, lattice_step, merge_refusal, producer, reach, union_window, window, with_operands
from repalgebra.rules.registry import Refusal, Rewrite, rule


def copied_from(value: Value) -> tuple[Value, tuple[int, int, int, int]] | None:
    """``(x, (t, b, l, r))`` where ``value`` is ``pad_m(x; t, b, l, r)``, a pad of the last two axes of a 4-D ``x`` by
    amounts >= 0 in any mode: it holds ``x`` unchanged at offset ``(t, l)``."""
    pad = producer(value, "pad_nd")
    if pad is None or len(pad.x.shape or ()) != 4:
        return None
    pads = tuple(pad.attrs["pads"]) + (0,) * max(0, 4 - len(pad.attrs["pads"]))
    l, r, t, b, *rest = pads
    if any(rest) or min(pads) < 0:
        return None
    return pad.x, (t, b, l, r)


def moved(conv: Node, onto: Node) -> Node | None:
    """``conv`` (of ``x``, no padding) as a conv of the padded copy of ``x`` that ``onto`` reads, where its window
    there lies inside ``onto``'s, on its taps; else None."""
    shared = copied_from(onto.x)
    if shared is None or conv.x is not shared[0] or conv.attrs["padding"] != (0, 0, 0, 0):
        return None
    if conv.attrs["stride"] != onto.attrs["stride"]:
        return None
    (t, b, l, r), steps = shared[1], []
    for k, d, e, before, after in zip(conv.params["weight"].shape[2:], conv.attrs["dilation"], onto.attrs["dilation"], (t, l), (b, r)):
        step = e if k == 1 else d  # one tap has no step of its own: it takes onto's
        if before % step or after % step:
            return None  # the kernel grows by whole taps of its step
        steps.append(step)
    (sh, sw) = steps
    weight = pad_kernel(conv.params["weight"], t // sh, b // sh, l // sw, r // sw)
    new = conv_with(conv, inputs=(onto.x,), weight=weight, dilation=(sh, sw))
    windows = [window(onto), window(new)]
    fits = lattice_step(windows) is not None and union_window(windows) == windows[0] and reach(new) == reach(onto)
    return new if fits else None


def takes_1x1(onto: Node, x: Value) -> bool:
    """Whether a 1x1 conv of ``x`` (what a BN, channel scale or identity branch beside ``onto`` becomes) would move
    onto the padded copy of ``x`` that ``onto`` reads (:func:`moved`)."""
    if copied_from(onto.x) is None or x.shape is None or len(x.shape) != 4:
        return False
    c, g = x.shape[1], onto.attrs["groups"]
    g = g if c % g == 0 else c
    return moved(Node.make("conv2d", [x], {"groups": g}, {"weight": torch.zeros(c, c // g, 1, 1)}), onto) is not None


@rule("pad_share", on=("add", "sub"))
def pad_share(graph, join):
    refusal = None
    for onto in (producer(v, "conv2d") for v in join.inputs):
        if onto is None or copied_from(onto.x) is None:
            continue
        for k, value in enumerate(join.inputs):
            conv = producer(value, "conv2d")
            new = None if conv is None or conv is onto else moved(conv, onto)
            if new is None:
                continue
            if why := merge_refusal(graph, join, [onto, new], before=[onto, conv]):
                refusal = Refusal(why, join)
                continue
            new_join = with_operands(join, {k: new.out})
            return Rewrite(join.out, new_join.out, (new, new_join))
    return refusal
