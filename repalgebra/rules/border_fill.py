"""Border fill: a zero pad whose border is then written with a conv's bias is that conv's own padding.

    fill(pad(conv1x1(x; W, b, padding P), Q), b) = conv1x1(x; W, b, padding P + Q)

where ``pad(., Q)`` pads with zeros by ``Q = (top, bottom, left, right)`` and
``fill(y, v)`` overwrites the ``Q`` rows and columns of every border of ``y``
with ``v[c]`` in channel ``c`` (``y[:, :, :top] = v``, then bottom, left, right,
in any order: slice assignments that ``torch.export`` records as
``slice_scatter``).  A 1x1 conv with stride 1 maps a padded position to
``0 . W + b = b``, so the filled border is exactly what its own padding computes;
inside the border nothing changes.  The same holds before the conv is folded,
for a BatchNorm whose output at 0 is ``v``:

    fill(pad(bn(x), Q), bn(0)) = bn(pad(x, Q))        bn(0)[c] = beta[c] - mean[c] gamma[c] / sqrt(var[c] + eps)

This is DiverseBranchBlock's ``BNAndPadLayer`` (and ECBSR's ``SeqConv3x3``): they
pad after the BN and write ``bn(0)`` into the border so that the kxk conv after
it, which does not pad, sees what a padded conv would.  Once the border is the
1x1's padding, ``seq_merge`` merges the pair into one kxk conv.

A ``slice_scatter`` that replaces a whole tensor (``y[:] = src``, which
functionalized code writes around every slice assignment) is ``src``.

Preconditions: a 4-D value; each fill writes, along the height or width, the
first or the last rows of the padded value (the last counted from the end, so
that they stay the border at any size), as many as the pad added on that side,
with a constant that varies along channels only; every side the pad added to is
filled, all with the same values, and those equal the conv's bias (or ``bn(0)``)
up to float32 rounding (the model computes them in its own dtype, the fold in
float64).
"""

from __future__ import annotations

import torch

from repalgebra.ir import Node
from repalgebra.match import conv_with, merged_source, producer
from repalgebra.rules.registry import Refusal, Rewrite, rule

_SIDES = {(2, "first"): 0, (2, "last"): 1, (3, "first"): 2, (3, "last"): 3}  # -> index into (top, bottom, left, right)


@rule("border_fill", on="slice_scatter")
def border_fill(graph, node):
    x, src = node.inputs
    if _whole(node):
        return Rewrite(node.out, src)
    fills: dict[int, torch.Tensor] = {}
    n, chain = node, []
    while n is not None and n.op == "slice_scatter":
        side = _side(n)
        if side is None:
            return None
        k, width, value = side
        if k in fills or width == 0:
            return None  # the same side twice: not the pattern
        fills[k] = value
        chain.append(n)
        n = producer(n.x)
    pad = n if n is not None and n.op == "pad" else None
    if pad is None or pad.attrs["value"] != 0 or min(pad.attrs["pads"]) < 0:
        return None
    if any(_side(c)[1] != pad.attrs["pads"][_side(c)[0]] for c in chain):
        return None
    if set(fills) != {k for k, q in enumerate(pad.attrs["pads"]) if q > 0}:
        return None  # a side left with zeros (or filled past the pad): not a padding
    values = list(fills.values())
    v = values[0]
    if any(u.dtype != v.dtype or not torch.equal(u, v) for u in values[1:]):
        return None
    inner = producer(pad.x, "conv2d", "batch_norm")
    if inner is None:
        return Refusal("the padded value comes from neither a conv nor a BatchNorm", about=pad)
    sources = (pad, *chain)
    if inner.op == "conv2d":
        a = inner.attrs
        if inner.params["weight"].shape[2:] != (1, 1) or a["stride"] != (1, 1):
            return Refusal("the conv before the pad is not 1x1 with stride 1: its border is not its bias", about=pad)
        bias = inner.params.get("bias")
        if bias is None or not _same(v, bias):
            return Refusal("the border is filled with other values than the bias of the 1x1 conv before the pad", about=pad)
        padding = tuple(p + q for p, q in zip(a["padding"], pad.attrs["pads"]))
        new = conv_with(inner, sources=sources, padding=padding)
        return Rewrite(node.out, new.out, (new,))
    p = inner.params
    at_zero = p["bias"] - p["mean"] * p["weight"] / torch.sqrt(p["var"] + inner.attrs["eps"])
    if not _same(v, at_zero):
        return Refusal("the border is filled with other values than the BatchNorm's output at 0", about=pad)
    padded = pad.replace(inputs=(inner.x,), source=merged_source(pad, *chain))
    bn = inner.replace(inputs=(padded.out,), source=merged_source(inner, *sources))
    return Rewrite(node.out, bn.out, (padded, bn))


def _whole(n: Node) -> bool:
    """``slice_scatter`` of a whole axis with a source of the whole shape: the result is the source."""
    x, src = n.inputs
    a = n.attrs
    return a["start"] == 0 and a["end"] is None and a["step"] == 1 and src.shape == x.shape


def _side(n: Node) -> tuple[int, int, torch.Tensor] | None:
    """``(side, width, values per channel)`` when ``n`` fills the first or last rows or columns with a per-channel constant."""
    x, src = n.inputs
    a = n.attrs
    if x.shape is None or len(x.shape) != 4 or a["step"] != 1:
        return None
    axis, start, end = a["axis"] % 4, a["start"], a["end"]
    if start == 0 and isinstance(end, int) and end > 0:
        where, width = "first", end
    elif isinstance(start, int) and start < 0 and end is None:
        where, width = "last", -start
    else:
        return None
    if (axis, where) not in _SIDES or width > x.shape[axis]:
        return None
    value = _channel_constant(src, x.shape[1])
    return None if value is None else (_SIDES[(axis, where)], width, value)


def _channel_constant(v, channels: int) -> torch.Tensor | None:
    """The per-channel values of ``v`` when it is a constant (maybe broadcast) that varies along channels only."""
    while (n := producer(v, "expand", "expand_dyn")) is not None:  # expanded to the batch, maybe twice
        v = n.x
    c = producer(v, "constant")
    if c is None:
        return None
    t = c.params["value"]
    t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() <= 4 else None
    if t is None or t.shape[1] not in (1, channels):
        return None
    per_channel = t.amax(dim=(0, 2, 3), keepdim=True)
    if not bool((t == per_channel).all()):
        return None
    return per_channel.reshape(-1).expand(channels)


def _same(v: torch.Tensor, w: torch.Tensor) -> bool:
    """Equal up to float32 rounding: the model computed the fill in its own dtype (a float32 model's constant holds
    float32 values, whatever dtype it is stored in), the fold the bias in float64.  A model in a coarser dtype is
    left alone; the float64 check of the fused model is the final word either way."""
    if not v.is_floating_point():
        return False
    w = w.double().reshape(-1)
    tol = 16 * torch.finfo(torch.float32).eps * max(1.0, float(w.abs().max()))
    return v.shape == w.shape and bool(((v.double() - w).abs() <= tol).all())
