"""Sequential merge: a 1x1 conv next to a kxk conv (or a kx1 after a 1xk) composes into one conv.

kxk then 1x1 (the 1x1 has stride 1, no padding), always exact:

    conv1x1(conv(x; W1, b1); W2, b2) = conv(x; sum_m W2[o,m] W1[m,i], W2 b1 + b2)

1x1 then kxk (the 1x1 has stride 1, no padding):

    conv(conv1x1(x; W1, b1); W2, b2) = conv(x; sum_m W2[o,m,:,:] W1[m,i], b2 + sum_{m,taps} W2[o,m,taps] b1[m])

exact only if the kxk conv does not zero-pad or ``b1 = 0``: its padding
sees 0 where the unfused graph sees ``b1``.  Groups compose to gcd(g1, g2).

A bias-free 1x1 conv with stride 1 that zero-pads by ``P`` maps 0 to 0, so it
is the pointwise conv followed by the pad: ``conv1x1(x; W, padding P) =
pad(conv1x1(x; W), P)``.  Written so, the pad moves to where it belongs:

    conv(conv1x1(x; W1, padding P1); W2, padding P2) = conv(x; W, padding P1 + P2)    (1x1 then kxk, b1 = 0)
    conv1x1(conv(x; W1, b1); W2, padding P2)          = pad(conv(x; W, W2 b1), P2)    (kxk then 1x1, b2 = 0)

with ``W`` as above, so ``conv(conv1x1(pad(x)))`` and ``conv(pad(conv1x1(x)))``
reach the same single conv.  With a bias the padded 1x1's border is the bias,
not 0, and it is not a pad after a pointwise conv; but then its output is
``pad(conv1x1(x; W1), P1) + b1`` *everywhere*, border included, so before a kxk
conv that does not pad it still merges (DiverseBranchBlock's BN-and-pad, the BN
folded into the 1x1):

    conv(conv1x1(x; W1, b1, padding P1); W2, b2) = conv(x; W, b2 + sum_{m,taps} W2[o,m,taps] b1[m], padding P1)

Two convs that act on different axes (RepNeXt's ``conv_7_h(conv_7_w(x))``: a 1xk with its stride and padding
on the width, then a kx1 on the height) are one conv with each one's geometry on its axis:

    conv_kx1(conv_1xk(x; W1, b1); W2, b2) = conv(x; W[o,i,u,v] = sum_m W2[o,m,u,0] W1[m,i,0,v], b2 + sum W2 b1)

exact where the second does not zero-pad or ``b1 = 0`` (its padded rows are 0; the first conv gives ``b1``
there).  Alone the kxk kernel is dearer than the two; beside a kxk conv of the same input it costs nothing.

Preconditions: the inner conv's output is read only by the outer conv; one of
them is a 1x1 with stride 1 that has no padding or no bias, or the inner one is
a 1x1 with stride 1 and the outer one does not pad, or each acts on an axis the
other does not (one tap, stride 1, no padding there); the merged conv takes no
more multiply-adds per output pixel than the two (the inner one counted at its
own resolution, which a strided outer conv reduces), or it is summed right
after into a sibling conv of the same input at least as large
(DiverseBranchBlock), so merging never makes a model slower.
"""

from math import gcd

import torch

from repalgebra.ir import Node
from repalgebra.kernels import compose_channels, conv_bias, conv_cost, regroup, ungroup
from repalgebra.match import JOINS, conv_with, producer, sole_use
from repalgebra.rules.registry import Refusal, Rewrite, rule
from repalgebra.rules.pad_absorb import has_bias, pad_after_pointwise, pixelwise


@rule("seq_merge", on="conv2d")
def seq_merge(graph, outer):
    inner = producer(outer.x, "conv2d")
    if inner is None or not sole_use(graph, inner.out):
        return None
    pad_after = (0, 0, 0, 0)
    if (pads := pad_after_pointwise(outer)) is not None:  # kxk then 1x1
        geometry, padding, pad_after = inner, inner.attrs["padding"], pads
    elif (pads := pad_after_pointwise(inner)) is not None:  # 1x1 then kxk
        geometry, padding = outer, tuple(p + q for p, q in zip(outer.attrs["padding"], pads))
        if has_bias(inner) and any(outer.attrs["padding"]):
            return Refusal("the 1x1 conv has a bias and the kxk conv after it zero-pads: its border would see 0, not the bias", about=outer)
    elif pixelwise(inner) and not any(outer.attrs["padding"]):  # a padded, biased 1x1 then an unpadded kxk
        geometry, padding = outer, inner.attrs["padding"]
    elif any(pixelwise(c) and any(c.attrs["padding"]) for c in (inner, outer)):
        return Refusal("the 1x1 conv zero-pads and has a bias: its border is the bias, not 0", about=outer)
    elif (axes := _acting_axes(inner, outer)) is not None:  # RepNeXt's 1xk then kx1: each acts on an axis of its own
        if has_bias(inner) and any(outer.attrs["padding"]):
            return Refusal("the first conv has a bias and the second zero-pads: its border would see 0, not the bias", about=outer)
        geometry, padding = conv_with(outer, **_per_axis(inner, outer, axes)), None
    else:
        return Refusal("neither conv is a pointwise 1x1, nor do the two act on different axes (a 1xk then a kx1): "
                       "a kxk after a kxk is a larger kernel, which is not made", about=outer)
    gi, go = inner.attrs["groups"], outer.attrs["groups"]
    g = gcd(gi, go)
    # The merged kernel is (O, I/g, the taps of both, one of them 1 on each axis): price it before building it.
    taps = tuple(max(a, b) for a, b in zip(inner.params["weight"].shape[2:], outer.params["weight"].shape[2:]))
    in_channels = inner.params["weight"].shape[1] * gi
    cost = outer.params["weight"].shape[0] * (in_channels // g) * taps[0] * taps[1]
    apart = conv_cost(inner.params["weight"]) * _pixels_per_output(inner, outer) + conv_cost(outer.params["weight"])
    if cost > apart and not _absorbed(graph, outer, cost):
        return Refusal(f"the merged conv would take {cost} multiply-adds per output pixel, more than the two convs ({apart})")
    w_in, w_out = regroup(inner.params["weight"], gi, 1), regroup(outer.params["weight"], go, 1)
    w = ungroup(compose_channels(w_out, w_in), 1, g)
    assert conv_cost(w) == cost
    bias = None
    if "bias" in inner.params or "bias" in outer.params:
        bias = conv_bias(outer) + torch.einsum("omhw,m->o", w_out, conv_bias(inner))
    new = conv_with(geometry, sources=(inner, outer), inputs=(inner.x,), weight=w, bias=bias, groups=g,
                    padding=geometry.attrs["padding"] if padding is None else padding)
    if not any(pad_after):
        return Rewrite(outer.out, new.out, (new,))
    pad = Node.make("pad", [new.out], {"pads": pad_after}, {}, outer.source)
    return Rewrite(outer.out, pad.out, (new, pad))


def _pixels_per_output(inner, outer) -> int:
    """How many pixels the inner conv computes for each pixel of the outer one (the merged conv computes the
    outer's): a 1x1 before a stride-2 conv runs at 4 times its resolution (DenseNet's transition, a 1x1 and
    then a 2x2 average pool, merges into one 2x2 conv of stride 2 with no more work)."""
    (hi, wi), (ho, wo) = inner.out.shape[-2:], outer.out.shape[-2:]
    return max(1, (hi * wi) // max(1, ho * wo))


def _absorbed(graph, outer, cost: int) -> bool:
    """Whether ``outer`` is summed with a sibling conv of the inner conv's input with at least ``cost`` weights."""
    x = producer(outer.x).x
    for join in graph.users(outer.out):
        if join.op not in JOINS:
            continue
        for v in join.inputs:
            sib = producer(v, "conv2d")
            if sib is not None and sib is not outer and sib.x is x and conv_cost(sib.params["weight"]) >= cost:
                return True
    return False


def _acts(conv: Node) -> tuple[bool, bool]:
    """Per axis (height, width): whether ``conv`` does anything there (more than one tap, a stride, padding)."""
    (kh, kw), (sh, sw), (t, b, l, r) = conv.params["weight"].shape[2:], conv.attrs["stride"], conv.attrs["padding"]
    return kh > 1 or sh > 1 or t > 0 or b > 0, kw > 1 or sw > 1 or l > 0 or r > 0


def _acting_axes(inner: Node, outer: Node) -> tuple[bool, bool] | None:
    """Per axis, whether the inner conv is the one that acts there, where the two never act on one axis (a 1xk
    then a kx1, RepNeXt's ``conv_7_h(conv_7_w(x))``): then the pair is one conv with each one's geometry on its
    axis; else None."""
    a, b = _acts(inner), _acts(outer)
    if any(x and y for x, y in zip(a, b)) or not any(a) or not any(b):
        return None
    return a


def _per_axis(inner: Node, outer: Node, inner_axes: tuple[bool, bool]) -> dict:
    """The merged conv's stride, dilation and padding: on each axis those of the conv that acts there."""
    ph, pw = (inner if on else outer for on in inner_axes)
    it, ib, _, _ = ph.attrs["padding"]
    _, _, il, ir = pw.attrs["padding"]
    return {
        "stride": (ph.attrs["stride"][0], pw.attrs["stride"][1]),
        "dilation": (ph.attrs["dilation"][0], pw.attrs["dilation"][1]),
        "padding": (it, ib, il, ir),
    }
