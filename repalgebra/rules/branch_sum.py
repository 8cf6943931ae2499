"""Branch summation: convs of one input with the same window add (or subtract) into one conv.

    conv(x; W_a, b_a) +- conv(x; W_b, b_b) = conv(x; W_a +- W_b, b_a +- b_b)

Grouped convs with different groups are first written with gcd(g_a, g_b)
groups (a block-diagonal kernel with zeros), which is exact, where that is no
dearer than the two (groups 2 and 3 make a dense kernel with more weights than
both) or a larger conv of the sum absorbs it (:func:`repalgebra.match.merge_refusal`).

Two Linears of one input add the same way (RepViT's distillation head,
``(head(x) + head_dist(x)) / 2``): ``Linear(x; W_a +- W_b, b_a +- b_b)``.

A 3-D RepVGG block's conv3d branches add the same way.

Preconditions: both operands of the add/sub are conv2d, both conv3d (or both Linear) reading the same value
with equal stride, dilation, kernel size and leading padding, and equal trailing padding, so that their outputs
have one size at every input size (the add broadcasts: equal windows with different trailing padding can give a
1-row output added to every row of a taller one, and at a stride of 2 they can agree at even sizes only).
``kernel_pad`` and ``dilation_to_dense`` make windows equal first; ``kernel_pad`` keeps each conv's output size.
"""

from math import gcd

from repalgebra.kernels import conv_bias, regroup
from repalgebra.match import CONVS, conv_with, merge_refusal, merged_source, producer, reach, window
from repalgebra.rules.registry import Refusal, Rewrite, rule


@rule("branch_sum", on=("add", "sub"))
def branch_sum(graph, join):
    a, b = (producer(v, "linear") for v in join.inputs)
    if a is not None and b is not None and a.x is b.x and a.params["weight"].shape == b.params["weight"].shape:
        return _linears(join, a, b)
    a, b = (producer(v, *CONVS) for v in join.inputs)
    if a is None or b is None or a.x is not b.x or window(a) != window(b):
        return None
    if reach(a) != reach(b):
        return Refusal(f"the convs pad the input's end differently ({a.attrs['padding']} and {b.attrs['padding']}): their outputs differ "
                       f"in size at some input sizes (at a stride of 1, at every size), where the {join.op} broadcasts one or fails")
    sign = 1.0 if join.op == "add" else -1.0
    ga, gb = a.attrs["groups"], b.attrs["groups"]
    g = gcd(ga, gb)
    if g < min(ga, gb) and (why := merge_refusal(graph, join, [a, b])):
        return Refusal(why)
    w = regroup(a.params["weight"], ga, g) + sign * regroup(b.params["weight"], gb, g)
    bias = None
    if "bias" in a.params or "bias" in b.params:
        bias = conv_bias(a) + sign * conv_bias(b)
    new = conv_with(a, sources=(b, join), weight=w, bias=bias, groups=g)
    return Rewrite(join.out, new.out, (new,))


def _linears(join, a, b):
    """``Linear(x; W_a, b_a) +- Linear(x; W_b, b_b) = Linear(x; W_a +- W_b, b_a +- b_b)`` (RepViT's distillation head)."""
    sign = 1.0 if join.op == "add" else -1.0
    params = {"weight": a.params["weight"] + sign * b.params["weight"]}
    if "bias" in a.params or "bias" in b.params:
        zeros = a.params["weight"].new_zeros(a.params["weight"].shape[0])
        params["bias"] = a.params.get("bias", zeros) + sign * b.params.get("bias", zeros)
    new = a.replace(params=params, source=merged_source(a, b, join))
    return Rewrite(join.out, new.out, (new,))
