"""Space to depth: a conv of the r x r phases of its input, stacked as channels, is one strided conv of the input.

    conv(cat_g x[:, :, a_g::r, b_g::r]; W, stride s, padding p) = conv(x; W', stride r s, padding r p)
    W'[o, c, r u + a, r v + b] = W[o, g(a, b) C + c, u, v]

YOLOv5's ``Focus`` stem (``torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2],
x[..., 1::2, 1::2]], 1)`` then a conv) is the case r = 2: the 6x6 stride-2 conv YOLOv5 later
replaced it with.  Phase ``(a, b)`` at position ``(i, j)`` of the small grid is pixel
``(r i + a, r j + b)``; a tap ``(u, v)`` of the small conv reads pixel ``(r (i s + u - p) + a, ...)``,
which is tap ``(r u + a, r v + b)`` of a conv of the full grid with stride ``r s`` and padding
``r p``; a pad of the small grid is a pad of ``r`` pixels of the full one.

Preconditions: the conv reads a channel concat (read by it alone) of exactly the r x r phases of
one 4-D value, each written as a slice of step r (start a < r, to the end) along each spatial axis;
the conv is ungrouped (a grouped one, written dense to read the full grid, would do ``groups``
times its work) and undilated.  The input's height and width are then multiples of r (else the
phases differ in size and cannot be concatenated); at a size that is not, the model raises where
the one conv computes.
"""

from __future__ import annotations

import torch

from repalgebra.ir import Value
from repalgebra.match import conv_with, producer, sole_use
from repalgebra.rules.registry import Refusal, Rewrite, rule


def _phase(value: Value) -> tuple[Value, dict[int, tuple[int, int]]] | None:
    """``(x, {axis: (start, step)})`` when ``value`` is ``x`` sliced with a step along axes 2 and 3 (either order)."""
    steps: dict[int, tuple[int, int]] = {}
    v = value
    while (n := producer(v, "slice")) is not None and n.attrs["axis"] % 4 in (2, 3) and n.attrs["axis"] % 4 not in steps:
        if n.attrs["end"] is not None and n.attrs["end"] < n.x.shape[n.attrs["axis"]]:
            return None
        steps[n.attrs["axis"] % 4] = (n.attrs["start"], n.attrs["step"])
        v = n.x
    return (v, steps) if len(steps) == 2 else None


@rule("space_to_depth", on="conv2d")
def space_to_depth(graph, conv):
    cat = producer(conv.x, "concat")
    if cat is None or cat.attrs["axis"] != 1 or not sole_use(graph, conv.x):
        return None
    phases = [_phase(v) for v in cat.inputs]
    if any(p is None for p in phases) or len({id(x) for x, _ in phases}) != 1:
        return None
    x = phases[0][0]
    r = phases[0][1][2][1]
    found = [(steps[2], steps[3]) for _, steps in phases]
    wanted = {((a, r), (b, r)) for a in range(r) for b in range(r)}
    if r < 2 or len(x.shape) != 4 or set(found) != wanted or len(found) != len(wanted):
        return None
    if conv.attrs["groups"] != 1:
        return Refusal(f"a conv of the phases in {conv.attrs['groups']} groups: as one conv of the full grid it reads "
                       "every phase, that many times the work", cat)
    if conv.attrs["dilation"] != (1, 1):
        return Refusal("a dilated conv of the phases: its taps on the full grid are not one window", cat)
    w = conv.params["weight"]
    o, cin, kh, kw = w.shape
    c = cin // len(found)
    dense = torch.zeros(o, c, r * kh, r * kw, dtype=w.dtype)
    for g, ((a, _), (b, _)) in enumerate(found):
        dense[:, :, a::r, b::r] = w[:, g * c : (g + 1) * c]
    stride = tuple(r * s for s in conv.attrs["stride"])
    padding = tuple(r * q for q in conv.attrs["padding"])
    new = conv_with(conv, sources=(cat,), inputs=(x,), weight=dense, stride=stride, padding=padding)
    return Rewrite(conv.out, new.out, (new,))
