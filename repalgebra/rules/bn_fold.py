"""BN folding: a conv followed by an eval-mode BatchNorm is one conv.

    BN(conv(x; W, b)) = conv(x; W * s[o], b * s + t)
    where s = gamma / sqrt(var + eps), t = beta - mean * s   (per output channel o)

Preconditions: the BN reads a ``conv2d`` whose output nothing else reads.
Any stride, padding, dilation and groups: BN acts on each output channel alone.
"""

from repalgebra.kernels import bn_affine, conv_bias
from repalgebra.match import conv_with, producer, sole_use
from repalgebra.rules.registry import Refusal, Rewrite, rule


@rule("bn_fold", on="batch_norm")
def bn_fold(graph, bn):
    conv = producer(bn.x, "conv2d")
    if conv is None:
        return None
    if not sole_use(graph, conv.out):
        return Refusal("the conv before it is also read elsewhere")
    s, t = bn_affine(bn)
    w = conv.params["weight"] * s.reshape(-1, 1, 1, 1)
    new = conv_with(conv, sources=(bn,), weight=w, bias=conv_bias(conv) * s + t)
    return Rewrite(bn.out, new.out, (new,))
