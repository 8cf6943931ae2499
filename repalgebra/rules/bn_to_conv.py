"""BN as conv: a BN branch that joins a sum beside a conv becomes a 1x1 conv.

    BN(x) = conv(x; s[c] * I_G, t)     with I_G the identity kernel of a G-group conv
    (I_G[c, c mod C/G] = 1), s = gamma / sqrt(var + eps), t = beta - mean * s

A per-channel scale branch (``x * w.view(1, C, 1, 1)``, YOLOv6's ``LinearAddBlock``)
is a BN without a shift: ``scale(x; s) = conv(x; s[c] * I_G)``.

A BatchNorm3d beside a conv3d (a 3-D RepVGG block's identity branch) becomes a
1x1x1 conv3d the same way.

Preconditions: the BN (or channel scale) is an operand of add/sub/concat and
another operand is a conv2d (conv3d) or a BN reading the same input (so the two can be
summed next), and merging the two is no dearer than the branches
(:func:`repalgebra.match.merge_refusal`).  G is that sibling's groups when it
divides the channels, else C (depthwise).
"""

import torch

from repalgebra.kernels import bn_affine, identity_kernel
from repalgebra.match import CONVS, JOINS, merge_refusal, producer, with_operands
from repalgebra.ir import Graph, Node, Value
from repalgebra.rules.pad_share import takes_1x1
from repalgebra.rules.registry import Refusal, Rewrite, rule


def sibling(join: Node, value: Value, x: Value) -> Node | None:
    """A conv/BN operand of ``join`` (other than ``value``) that reads ``x``, or (in a sum) a conv of a padded
    copy of ``x`` that a 1x1 of ``x`` can move onto (:func:`repalgebra.rules.pad_share.takes_1x1`)."""
    for other in join.inputs:
        if other is value:
            continue
        sib = producer(other, *CONVS, "batch_norm")
        if sib is not None and (sib.x is x or (sib.op == "conv2d" and join.op != "concat" and takes_1x1(sib, x))):
            return sib
    return None


def identity_groups(sib: Node, channels: int) -> int:
    """Groups for an identity-like conv joining ``sib``: the sibling conv's groups, else depthwise."""
    groups = sib.attrs["groups"] if sib.op in CONVS else channels
    return groups if channels % groups == 0 else channels


def merge_refusal_beside(graph: Graph, join: Node, sib: Node, conv: Node) -> str | None:
    """Why ``conv``, the 1x1 a branch would become, would not merge with its sibling at no extra cost
    (:func:`repalgebra.match.merge_refusal`); a BN sibling counts as the depthwise 1x1 it becomes."""
    if sib.op == "batch_norm":
        c = sib.x.shape[1]
        sib = Node.make(conv.op, [sib.x], {"groups": c}, {"weight": torch.zeros(c, 1, *conv.params["weight"].shape[2:])}, sib.source)
    return merge_refusal(graph, join, [sib, conv])


def pointwise_op(x: Value, join: Node) -> str | None:
    """The conv of a 1x1 branch of ``x`` joining ``join``: ``conv2d`` of an image, ``conv3d`` of a volume or clip in
    a sum (only 2-D convs merge in a concat), else None."""
    return {4: "conv2d", 5: "conv3d" if join.op != "concat" else None}.get(len(x.shape or ()))


@rule("bn_to_conv", on=JOINS)
def bn_to_conv(graph, join):
    refusal = None
    for k, value in enumerate(join.inputs):
        bn = producer(value, "batch_norm", "scale")
        op = None if bn is None else pointwise_op(bn.x, join)
        if op is None or (bn.op == "scale" and bn.attrs["axis"] % len(bn.x.shape) != 1):
            continue
        sib = sibling(join, value, bn.x)
        if sib is None:
            continue
        channels = bn.x.shape[1]
        groups = identity_groups(sib, channels)
        s, t = bn_affine(bn) if bn.op == "batch_norm" else (bn.params["scale"].reshape(-1).expand(channels), None)
        w = identity_kernel(channels, groups, s.dtype, len(bn.x.shape) - 2)
        w = w * s.reshape(-1, *(1,) * (w.dim() - 1))
        params = {"weight": w} if t is None else {"weight": w, "bias": t}
        conv = Node.make(op, [bn.x], {"groups": groups}, params, bn.source)
        if why := merge_refusal_beside(graph, join, sib, conv):
            refusal = Refusal(why, join)
            continue
        new = with_operands(join, {k: conv.out})
        return Rewrite(join.out, new.out, (conv, new))
    return refusal
