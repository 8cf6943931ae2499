"""Kernel padding: a kernel grows with zero taps if the conv's padding grows with it.

    conv(x; W, padding (p_t, p_b, p_l, p_r)) =
    conv(x; pad(W, a, b, c, e), padding (p_t + a*d, p_b + b*d, p_l + c*d, p_r + e*d))

(a rows on top, b at the bottom, c columns left, e right; d the dilation).
The new taps read only positions multiplied by zero, and the output grid is
unchanged.  This aligns a 1x1 with a 3x3 (centered), and 1xk / kx1 with kxk (ACNet).
On an axis where a kernel has one tap its dilation does nothing, so it takes
the others' (an identity beside a dilated 3x3).

Preconditions: the conv is summed (add/sub/concat) with other convs of the same
input, stride and tap lattice whose windows differ; each is padded to the union window,
unless merging them makes more work (:func:`repalgebra.match.merge_refusal`): a concat
of a 1x1 and a 7x7 conv would make every output channel pay for 7x7 taps.
"""

from repalgebra.kernels import pad_kernel
from repalgebra.match import JOINS, conv_operands, conv_with, lattice_step, merge_refusal, union_window, window, with_operands
from repalgebra.rules.registry import Refusal, Rewrite, rule


@rule("kernel_pad", on=JOINS)
def kernel_pad(graph, join):
    refusal = None
    for group in conv_operands(join).values():
        wins = [window(c) for _, c in group]
        if len(group) < 2 or len(set(wins)) == 1 or lattice_step(wins) is None:
            continue
        if why := merge_refusal(graph, join, [c for _, c in group]):
            refusal = Refusal(why, join)
            continue
        union = union_window(wins)
        step = union.step
        new_nodes, replaced = [], {}
        for (k, conv), w in zip(group, wins):
            top, left = ((w.first[a] - union.first[a]) // step[a] for a in (0, 1))
            bottom, right = ((union.last(a) - w.last(a)) // step[a] for a in (0, 1))
            if top == bottom == left == right == 0 and w.step == step:
                continue
            pt, pb, pl, pr = conv.attrs["padding"]
            dh, dw = step
            new = conv_with(
                conv,
                weight=pad_kernel(conv.params["weight"], top, bottom, left, right),
                padding=(pt + top * dh, pb + bottom * dh, pl + left * dw, pr + right * dw),
                dilation=step,  # a one-tap axis takes the others' step
            )
            new_nodes.append(new)
            replaced[k] = new.out
        new_join = with_operands(join, replaced)
        return Rewrite(join.out, new_join.out, (*new_nodes, new_join))
    return refusal
