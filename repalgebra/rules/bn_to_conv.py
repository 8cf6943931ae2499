"""BN as conv: a BN branch that joins a sum beside a conv becomes a 1x1 conv.

    BN(x) = conv(x; s[c] * I_G, t)     with I_G the identity kernel of a G-group conv
    (I_G[c, c mod C/G] = 1), s = gamma / sqrt(var + eps), t = beta - mean * s

A per-channel scale branch (``x * w.view(1, C, 1, 1)``, YOLOv6's ``LinearAddBlock``)
is a BN without a shift: ``scale(x; s) = conv(x; s[c] * I_G)``.  Any affine map per
channel is, too: a BN, a scale or the branch's input itself plus a constant per channel
(torchvision's ``FrozenBatchNorm2d`` as the identity branch, ``x * scale + bias``;
PP-LCNet's learnable affine ``s * x + t``), ``sign * (s x + t) + c = conv(x; sign s[c] I_G,
sign t + c)``.

A BatchNorm3d beside a conv3d (a 3-D RepVGG block's identity branch) becomes a
1x1x1 conv3d the same way.

Preconditions: the BN (or channel scale, or affine map) is an operand of add/sub/concat and
another operand is a conv2d (conv3d) or a BN reading the same input (so the two can be
summed next), and merging the two is no dearer than the branches
(:func:`repalgebra.match.merge_refusal`).  G is that sibling's groups when it
divides the channels, else C (depthwise).
"""

import torch

from repalgebra.kernels import bn_affine, identity_kernel
from repalgebra.match import CONVS, JOINS, merge_refusal, producer, with_operands
from repalgebra.ir import Graph, Node, Value
from repalgebra.rules.bias_fold import per_feature
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


def channel_affine(value: Value) -> tuple[Value, torch.Tensor, torch.Tensor | None, Node] | None:
    """``(x, s, t, node)`` where ``value`` is ``s[c] * x + t[c]`` along the channels (axis 1) of ``x``: a BN, a channel
    scale, or either of them (or ``x`` itself) plus a constant per channel, ``sign * y + c`` (torchvision's
    ``FrozenBatchNorm2d``, ``x * scale + bias``; PP-LCNet's learnable affine); ``t`` None where there is no shift,
    ``node`` the op that makes ``value``."""
    shift = producer(value, "add_const")
    c = None if shift is None else per_feature(shift.params["const"], shift.x.shape, 1)
    if shift is not None and (c is None or shift.out.dtype != shift.x.dtype):
        return None  # (a constant that varies along another axis, or promotes x to another dtype)
    bn = producer(value if shift is None else shift.x, "batch_norm", "scale")
    if bn is None and shift is None or bn is not None and bn.op == "scale" and bn.attrs["axis"] % len(bn.x.shape) != 1:
        return None
    x = bn.x if bn is not None else shift.x
    channels = x.shape[1]
    s, t = (bn_affine(bn) if bn.op == "batch_norm" else (bn.params["scale"].reshape(-1).expand(channels), None)) if (
        bn is not None) else (torch.ones(channels, dtype=c.dtype), None)
    if shift is not None:
        sign = shift.attrs["sign"]
        s, t = sign * s, (c if t is None else sign * t + c).expand(channels)
    return x, s, t, shift if shift is not None else bn


@rule("bn_to_conv", on=JOINS)
def bn_to_conv(graph, join):
    refusal = None
    for k, value in enumerate(join.inputs):
        found = channel_affine(value)
        op = None if found is None else pointwise_op(found[0], join)
        if op is None:
            continue
        x, s, t, node = found
        sib = sibling(join, value, x)
        if sib is None:
            continue
        channels = x.shape[1]
        groups = identity_groups(sib, channels)
        w = identity_kernel(channels, groups, s.dtype, len(x.shape) - 2)
        w = w * s.reshape(-1, *(1,) * (w.dim() - 1))
        params = {"weight": w} if t is None else {"weight": w, "bias": t}
        conv = Node.make(op, [x], {"groups": groups}, params, node.source)
        if why := merge_refusal_beside(graph, join, sib, conv):
            refusal = Refusal(why, join)
            continue
        new = with_operands(join, {k: conv.out})
        return Rewrite(join.out, new.out, (conv, new))
    return refusal
