"""Identity as conv: the skip branch ``x`` of a sum beside a conv becomes a 1x1 conv.

    x = conv(x; I_G, 0)     with I_G the identity kernel of a G-group conv

A 3-D skip beside a conv3d becomes a 1x1x1 conv3d the same way.

Preconditions: ``x`` itself is an operand of add/sub/concat and another operand
is a conv2d (conv3d) or a BN reading ``x``.  G is that sibling's groups (it divides the
channels, since the sibling reads ``x``), or C for a BN sibling.  The 1x1
lands inside the sibling's window on its lattice, or the merge is otherwise no
dearer than the branches (:func:`repalgebra.match.merge_refusal`): a conv that
never merges would only add work where the skip cost nothing.
"""

from repalgebra.kernels import identity_kernel
from repalgebra.ir import Node
from repalgebra.match import JOINS, with_operands
from repalgebra.rules.registry import Refusal, Rewrite, rule
from repalgebra.rules.bn_to_conv import identity_groups, merge_refusal_beside, pointwise_op, sibling


@rule("identity_to_conv", on=JOINS)
def identity_to_conv(graph, join):
    refusal = None
    for k, value in enumerate(join.inputs):
        op = pointwise_op(value, join)
        if op is None:
            continue
        sib = sibling(join, value, value)
        if sib is None:
            continue
        groups = identity_groups(sib, value.shape[1])
        w = identity_kernel(value.shape[1], groups, next(iter(sib.params.values())).dtype, len(value.shape) - 2)
        conv = Node.make(op, [value], {"groups": groups}, {"weight": w}, join.source)
        if why := merge_refusal_beside(graph, join, sib, conv):
            refusal = Refusal(why, join)
            continue
        new = with_operands(join, {k: conv.out})
        return Rewrite(join.out, new.out, (conv, new))
    return refusal

