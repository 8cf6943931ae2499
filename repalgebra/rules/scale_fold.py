"""Scale folding: a per-channel multiply after a conv (layer scale) folds into the conv.

    gamma * conv(x; W, b) = conv(x; W * gamma[o], b * gamma)

Preconditions: the scale acts on the channel axis and reads a conv2d or a
conv3d (a frozen BatchNorm3d written as ``x * scale.view(1, -1, 1, 1, 1)``)
whose output nothing else reads.
"""

from repalgebra.match import conv_with, producer, sole_use
from repalgebra.rules.registry import Refusal, Rewrite, rule


@rule("scale_fold", on="scale")
def scale_fold(graph, node):
    conv = producer(node.x, "conv2d", "conv3d")
    if conv is None or node.attrs["axis"] % len(conv.out.shape) != 1:
        return None
    if not sole_use(graph, conv.out):
        return Refusal("the conv before it is also read elsewhere")
    gamma = node.params["scale"]
    bias = conv.params.get("bias")
    new = conv_with(
        conv,
        sources=(node,),
        weight=conv.params["weight"] * gamma.reshape(-1, *[1] * (conv.params["weight"].dim() - 1)),
        bias=None if bias is None else bias * gamma,
    )
    return Rewrite(node.out, new.out, (new,))
