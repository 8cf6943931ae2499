"""Kernel padding: a kernel grows with zero taps if the conv's padding grows with it.

    conv(x; W, padding (p_t, p_b, p_l, p_r)) =
    conv(x; pad(W, a, b, c, e), padding (p_t + a*d, p_b + b*d, p_l + c*d, p_r + e*d))

(a rows on top, b at the bottom, c columns left, e right; d the dilation).
The new taps read only positions multiplied by zero, and the output grid is
unchanged.  This aligns a 1x1 with a 3x3 (centered), and 1xk / kx1 with kxk (ACNet);
a conv3d's kernel grows the same way on its three axes (a 3-D RepVGG block's
1x1x1 inside its 3x3x3), evenly, since a conv3d pads both sides of an axis alike.
On an axis where a kernel has one tap its dilation does nothing, so it takes
the others' (an identity beside a dilated 3x3).

Preconditions: the conv is summed (add/sub/concat) with other convs of the same
input, stride, reach (padding less span: outputs of one size at every input size,
:func:`repalgebra.match.reach`) and tap lattice whose windows differ; each is padded to the union window,
unless merging them makes more work (:func:`repalgebra.match.merge_refusal`): a concat
of a 1x1 and a 7x7 conv would make every output channel pay for 7x7 taps.

Where two summed convs are too dear to merge, ``(a + b) + c`` is regrouped as
``(a + c) + b`` when the conv ``c`` merges with ``a`` at no cost: SLaK's 5x5
kernel beside its 51x5 and 5x51 ones joins the 51x5 (the sum is the same sum;
only the order of the two float additions changes).
"""

from repalgebra.kernels import pad_kernel_axes
from repalgebra.match import (
    CONVS, JOINS, conv_operands, conv_with, lattice_step, merge_refusal, merges_free, producer, reach, sole_use, union_window, window, with_operands,
)
from repalgebra.rules.registry import Refusal, Rewrite, rule


@rule("kernel_pad", on=JOINS)
def kernel_pad(graph, join):
    groups = conv_operands(join, CONVS if join.op != "concat" else ("conv2d",))  # 2-D convs merge in a concat
    refusal = None
    if len({key[:2] for key in groups}) < len(groups):
        refusal = Refusal("convs of one input and stride whose outputs have one size at the example's size only (their "
                          "padding less the kernel's span differs): at other sizes one is a row or column shorter", join)
    for group in groups.values():
        wins = [window(c) for _, c in group]
        if len(group) < 2 or len(set(wins)) == 1 or lattice_step(wins) is None:
            continue
        if why := merge_refusal(graph, join, [c for _, c in group]):
            regrouped = _regroup(graph, join, group)
            if regrouped is not None:
                return regrouped
            refusal = Refusal(why, join)
            continue
        union = union_window(wins)
        step, axes = union.step, range(len(union.first))
        new_nodes, replaced = [], {}
        for (k, conv), w in zip(group, wins):
            before = [(w.first[a] - union.first[a]) // step[a] for a in axes]
            after = [(union.last(a) - w.last(a)) // step[a] for a in axes]
            if not any(before + after) and w.step == step:
                continue
            if conv.op == "conv3d":  # its reach is the others' (conv_operands), so it grows alike on both sides
                padding = tuple(p + b * d for p, b, d in zip(conv.attrs["padding"], before, step))
            else:
                (pt, pb, pl, pr), (dh, dw) = conv.attrs["padding"], step
                padding = (pt + before[0] * dh, pb + after[0] * dh, pl + before[1] * dw, pr + after[1] * dw)
            new = conv_with(conv, weight=pad_kernel_axes(conv.params["weight"], before, after), padding=padding,
                            dilation=step)  # a one-tap axis takes the others' step
            new_nodes.append(new)
            replaced[k] = new.out
        new_join = with_operands(join, replaced)
        return Rewrite(join.out, new_join.out, (*new_nodes, new_join))
    return refusal


def _regroup(graph, join, group):
    """``(a + b) + c`` as ``(a + c) + b`` where ``a`` and ``b`` are too dear to merge but the conv ``c`` of the
    outer sum merges with ``a`` at no cost (SLaK's 5x5 inside its 51x5 beside the 5x51): then it does."""
    readers = graph.users(join.out) if join.op == "add" and sole_use(graph, join.out) else []
    if len(readers) != 1 or readers[0].op != "add" or len(group) != 2:
        return None
    outer = readers[0]
    for c_value in outer.inputs:
        c = producer(c_value, *CONVS)
        if c is None or c.x is not group[0][1].x or c.attrs["stride"] != group[0][1].attrs["stride"] or reach(c) != reach(group[0][1]) \
                or not sole_use(graph, c_value):
            continue
        for (_, keep), (_, other) in (group, group[::-1]):
            if merges_free(join, keep, c):
                inner = join.replace(inputs=(keep.out, c_value))
                regrouped = outer.replace(inputs=(inner.out, other.out))
                return Rewrite(outer.out, regrouped.out, (inner, regrouped))
    return None
