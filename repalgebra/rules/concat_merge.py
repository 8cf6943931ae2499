"""Channel concatenation: convs of one input, concatenated on channels, are one conv.

    cat(conv(x; W_1, b_1), ..., conv(x; W_n, b_n)) = conv(x; cat(W_1..W_n), cat(b_1..b_n))

Grouped kernels are written with one group first (block-diagonal with zeros):
the concatenated output channels are not ordered group by group.

Preconditions: every operand of the channel concat is a conv2d reading the same
value with the same window (stride, dilation, kernel size, leading padding) and trailing padding (at a stride
of 2, a different trailing padding gives outputs of one size at some input sizes only),
and the merged kernel is no larger than the kernels it replaces (grouped
kernels written densely can be much larger: that would make a model slower).
"""

import torch

from repalgebra.kernels import conv_bias, conv_cost, regroup
from repalgebra.match import conv_with, producer, reach, window
from repalgebra.rules.registry import Refusal, Rewrite, rule


@rule("concat_merge", on="concat")
def concat_merge(graph, cat):
    convs = [producer(v, "conv2d") for v in cat.inputs]
    if cat.attrs["axis"] not in (1, -3) or len(convs) < 2 or any(c is None for c in convs):
        return None
    first = convs[0]
    if any(c.x is not first.x or window(c) != window(first) for c in convs):
        return None
    if any(reach(c) != reach(first) for c in convs):
        return Refusal("the convs pad the input's end differently: their outputs differ in size at some input sizes, where the concat fails")
    groups = {c.attrs["groups"] for c in convs}
    g = groups.pop() if groups == {1} else 1
    w = torch.cat([regroup(c.params["weight"], c.attrs["groups"], g) for c in convs])
    before = sum(conv_cost(c.params["weight"]) for c in convs)
    if conv_cost(w) > before:
        return Refusal(f"the merged dense kernel would have {conv_cost(w)} weights, more than the {before} of the grouped convs")
    bias = None
    if any("bias" in c.params for c in convs):
        bias = torch.cat([conv_bias(c) for c in convs])
    new = conv_with(first, sources=(*convs[1:], cat), weight=w, bias=bias, groups=g)
    return Rewrite(cat.out, new.out, (new,))
