"""Pad absorption: an explicit zero pad before a conv becomes the conv's own padding.

    conv(pad(x, (a, b, c, e)); W, padding p) = conv(x; W, padding p + (a, b, c, e))

Preconditions: the conv reads a constant pad whose value is 0 and whose
amounts are all non-negative (a negative pad crops, which padding cannot do).
"""

from repalgebra.match import conv_with, producer
from repalgebra.rewrite import Refusal, Rewrite, rule


@rule("pad_absorb", on="conv2d")
def pad_absorb(graph, conv):
    pad = producer(conv.x, "pad")
    if pad is None:
        return None
    if pad.attrs["value"] != 0:
        return Refusal(f"pads with {pad.attrs['value']}, not zero", about=pad)
    if min(pad.attrs["pads"]) < 0:
        return Refusal("a negative pad crops", about=pad)
    padding = tuple(p + q for p, q in zip(conv.attrs["padding"], pad.attrs["pads"]))
    new = conv_with(conv, sources=(pad,), inputs=(pad.x,), padding=padding)
    return Rewrite(conv.out, new.out, (new,))
