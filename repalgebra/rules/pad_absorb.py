"""Pad absorption: an explicit zero pad next to a conv becomes the conv's own padding.

Before a conv (any kernel, stride, dilation, groups):

    conv(pad(x, (a, b, c, e)); W, padding p) = conv(x; W, padding p + (a, b, c, e))

After a 1x1 conv with stride 1 and no bias, which maps the zeros it would pad
to 0 and so commutes with the pad:

    pad(conv1x1(x; W, padding p), (a, b, c, e)) = conv1x1(x; W, padding p + (a, b, c, e))

With a bias the conv's border is the bias where the pad puts 0.  A pad by 0
on every side is the identity, whatever its value and producer.  Together with
``seq_merge`` this gives a zero pad before or after a bias-free 1x1 conv one
normal form.

Before an average pool that counts padded elements (its own padded border is
zeros too):

    avg_pool(pad(x, (a, a, c, c)); k, s, padding (p, q)) = avg_pool(x; k, s, padding (p + a, q + c), count_include_pad=True)

Preconditions: a constant pad whose value is 0 and whose amounts are all
non-negative (a negative pad crops, which padding cannot do).  After a conv:
the conv is 1x1 with stride 1 and no (non-zero) bias, and the pad is the only
reader of its output.  Before a pool: the pad is even on each axis (a pool pads
both sides alike), the pool has no ``ceil_mode``, counts its own padding if it
has any (``count_include_pad``), and its padding stays at most half its kernel
(PyTorch's limit).
"""

from repalgebra.ir import Node
from repalgebra.kernels import conv_bias
from repalgebra.match import conv_with, merged_source, producer, sole_use
from repalgebra.rules.registry import Refusal, Rewrite, rule


@rule("pad_absorb", on=("conv2d", "avg_pool2d", "pad"))
def pad_absorb(graph, node):
    if node.op == "pad":
        if not any(node.attrs["pads"]):
            return Rewrite(node.out, node.x)
        pad, conv = node, producer(node.x, "conv2d")
        if conv is None or not sole_use(graph, conv.out) or not pixelwise(conv):
            return None
    else:
        conv, pad = node, producer(node.x, "pad")
        if pad is None:
            return None
    if pad.attrs["value"] != 0:
        return Refusal(f"pads with {pad.attrs['value']}, not zero", about=pad)
    if min(pad.attrs["pads"]) < 0:
        return Refusal("a negative pad crops", about=pad)
    if node.op == "avg_pool2d":
        return _into_pool(node, pad)
    padding = tuple(p + q for p, q in zip(conv.attrs["padding"], pad.attrs["pads"]))
    if node is conv:
        new = conv_with(conv, sources=(pad,), inputs=(pad.x,), padding=padding)
        return Rewrite(conv.out, new.out, (new,))
    if has_bias(conv):
        return Refusal("the 1x1 conv before it has a bias: its own border would be the bias, not 0", about=pad)
    new = conv_with(conv, sources=(pad,), padding=padding)
    return Rewrite(pad.out, new.out, (new,))


def _into_pool(pool: Node, pad: Node):
    """``pool(pad(x))`` as ``pool(x)`` with more padding, counted (the pad's zeros count in every window)."""
    t, b, l, r = pad.attrs["pads"]
    a = pool.attrs
    (kh, kw), (ph, pw) = _pair(a["kernel"]), _pair(a["padding"])
    if t != b or l != r:
        return Refusal("the pad is uneven on an axis; a pool pads both sides alike", about=pad)
    if a["ceil_mode"]:
        return Refusal("the pool rounds its output size up (ceil_mode): where its last window starts depends on the padding", about=pad)
    if (ph or pw) and not a["count_include_pad"]:
        return Refusal("the pool does not count its own padding (count_include_pad=False), and the pad's zeros count", about=pad)
    if ph + t > kh // 2 or pw + l > kw // 2:
        return Refusal("the pool would pad more than half its kernel", about=pad)
    new = pool.replace(inputs=(pad.x,), attrs={"padding": (ph + t, pw + l), "count_include_pad": True}, source=merged_source(pool, pad))
    return Rewrite(pool.out, new.out, (new,))


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def pixelwise(conv: Node) -> bool:
    """A 1x1 conv with stride 1: output pixel r reads input pixel r only (its padding aside)."""
    return conv.params["weight"].shape[2:] == (1, 1) and conv.attrs["stride"] == (1, 1)


def has_bias(conv: Node) -> bool:
    """Whether the conv has a non-zero bias."""
    return bool(conv_bias(conv).abs().max() > 0)


def pad_after_pointwise(conv: Node) -> tuple[int, int, int, int] | None:
    """``P`` when ``conv`` is a pointwise 1x1 conv followed by a zero pad by ``P`` (``P = 0`` if it does not pad), else None.

    A 1x1 stride-1 conv is one when it does not pad or has no bias.
    """
    if not pixelwise(conv) or (any(conv.attrs["padding"]) and has_bias(conv)):
        return None
    return conv.attrs["padding"]
