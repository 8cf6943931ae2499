"""Dilation to dense: a dilated kernel is an undilated larger kernel with zeros between taps.

    conv(x; W, dilation d) = conv(x; D_d(W), dilation 1),
    D_d(W)[.., i*d, j*d] = W[.., i, j], zero elsewhere;  size (k-1)*d+1

Preconditions: the conv is summed (add/sub/concat) with another conv of the
same input and stride whose taps do not lie on the same lattice (a different
dilation, or an offset that is not a multiple of it), and merging them makes
no more work (:func:`repalgebra.match.merge_refusal`: the one conv has no more
multiply-adds than they have, or a larger kernel of the same sum absorbs it).
Alone, a dilated conv is cheaper than its dense form, so the rule leaves it; so
it does where the dense window is much wider than the branches (ASPP's rates
6, 12, 18 and 24: one 49 x 49 kernel for four 3 x 3 ones).
"""

from repalgebra.kernels import densify
from repalgebra.match import JOINS, conv_operands, conv_with, merge_refusal, on_lattice, window, with_operands
from repalgebra.rules.registry import Refusal, Rewrite, rule


@rule("dilation_to_dense", on=JOINS)
def dilation_to_dense(graph, join):
    refusal = None
    for group in conv_operands(join, ("conv2d",)).values():  # a dilated conv3d is left as it is
        if len(group) < 2 or on_lattice([window(c) for _, c in group]):
            continue
        if why := merge_refusal(graph, join, [c for _, c in group]):
            refusal = Refusal(why, join)
            continue
        new_nodes, replaced = [], {}
        for k, conv in group:
            if conv.attrs["dilation"] != (1, 1):
                w = densify(conv.params["weight"], conv.attrs["dilation"])
                new = conv_with(conv, weight=w, dilation=(1, 1))
                new_nodes.append(new)
                replaced[k] = new.out
        if not new_nodes:
            continue
        new_join = with_operands(join, replaced)
        return Rewrite(join.out, new_join.out, (*new_nodes, new_join))
    return refusal
