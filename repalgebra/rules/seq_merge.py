"""Sequential merge: a 1x1 conv next to a kxk conv composes into one conv.

kxk then 1x1 (the 1x1 has stride 1, no padding), always exact:

    conv1x1(conv(x; W1, b1); W2, b2) = conv(x; sum_m W2[o,m] W1[m,i], W2 b1 + b2)

1x1 then kxk (the 1x1 has stride 1, no padding):

    conv(conv1x1(x; W1, b1); W2, b2) = conv(x; sum_m W2[o,m,:,:] W1[m,i], b2 + sum_{m,taps} W2[o,m,taps] b1[m])

exact only if the kxk conv does not zero-pad or ``b1 = 0``: its padding
sees 0 where the unfused graph sees ``b1``.  Groups compose to gcd(g1, g2).

Preconditions: the inner conv's output is read only by the outer conv; one of
them is a pointwise 1x1; the merged kernel is no larger than the two kernels
together, or it is summed right after into a sibling conv of the same input at
least as large (DiverseBranchBlock), so merging never makes a model slower.
"""

from math import gcd

import torch

from repalgebra.kernels import compose_channels, conv_bias, conv_cost, regroup, ungroup
from repalgebra.match import JOINS, conv_with, is_1x1_pointwise, producer, sole_use
from repalgebra.rewrite import Refusal, Rewrite, rule


@rule("seq_merge", on="conv2d")
def seq_merge(graph, outer):
    inner = producer(outer.x, "conv2d")
    if inner is None or not sole_use(graph, inner.out):
        return None
    if is_1x1_pointwise(outer):
        geometry = inner
    elif is_1x1_pointwise(inner):
        geometry = outer
        has_bias = bool(conv_bias(inner).abs().max() > 0)
        if has_bias and any(outer.attrs["padding"]):
            return Refusal("the 1x1 conv has a bias and the kxk conv after it zero-pads: its border would see 0, not the bias", about=outer)
    else:
        return Refusal("neither conv is a pointwise 1x1")
    gi, go = inner.attrs["groups"], outer.attrs["groups"]
    g = gcd(gi, go)
    # The merged kernel is (O, I/g, taps of the non-1x1 conv): price it before building it.
    taps = (inner if outer.params["weight"].shape[2:] == (1, 1) else outer).params["weight"].shape[2:]
    in_channels = inner.params["weight"].shape[1] * gi
    cost = outer.params["weight"].shape[0] * (in_channels // g) * taps[0] * taps[1]
    if cost > conv_cost(inner.params["weight"]) + conv_cost(outer.params["weight"]) and not _absorbed(graph, outer, cost):
        return Refusal(f"the merged kernel would have {cost} weights, more than the two convs together")
    w_in, w_out = regroup(inner.params["weight"], gi, 1), regroup(outer.params["weight"], go, 1)
    w = ungroup(compose_channels(w_out, w_in), 1, g)
    assert conv_cost(w) == cost
    bias = None
    if "bias" in inner.params or "bias" in outer.params:
        bias = conv_bias(outer) + torch.einsum("omhw,m->o", w_out, conv_bias(inner))
    new = conv_with(geometry, sources=(inner, outer), inputs=(inner.x,), weight=w, bias=bias, groups=g)
    return Rewrite(outer.out, new.out, (new,))


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
