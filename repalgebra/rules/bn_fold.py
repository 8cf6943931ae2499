"""BN folding: a conv (or a transposed conv) followed by an eval-mode BatchNorm is one conv.

    BN(conv(x; W, b)) = conv(x; W * s[o], b * s + t)
    where s = gamma / sqrt(var + eps), t = beta - mean * s   (per output channel o)

A transposed conv (``nn.ConvTranspose2d``) stores its weight as ``(C_in, C_out / groups, kh, kw)``: output
channel ``o`` is column ``o mod (C_out / groups)`` of the rows of its group, so the same ``s[o]`` scales
those columns.

Preconditions: the BN reads a ``conv2d`` or ``conv_transpose2d`` whose output nothing else reads.
Any stride, padding, output padding, dilation and groups: BN acts on each output channel alone.
"""

from repalgebra.kernels import bn_affine, conv_bias, per_input_channel
from repalgebra.match import conv_with, producer, sole_use
from repalgebra.rules.registry import Refusal, Rewrite, rule


@rule("bn_fold", on="batch_norm")
def bn_fold(graph, bn):
    conv = producer(bn.x, "conv2d", "conv_transpose2d")
    if conv is None:
        return None
    if not sole_use(graph, conv.out):
        return Refusal(f"the {'transposed ' * (conv.op != 'conv2d')}conv before it is also read elsewhere")
    s, t = bn_affine(bn)
    w = conv.params["weight"]
    if conv.op == "conv2d":
        w = w * s.reshape(-1, 1, 1, 1)
    else:  # (C_in, C_out / g, kh, kw): the scale of output channel o laid out like the weight's rows and columns
        w = w * per_input_channel(s, w.shape[:2], conv.attrs["groups"])[:, :, None, None]
    new = conv_with(conv, sources=(bn,), weight=w, bias=conv_bias(conv) * s + t)
    return Rewrite(bn.out, new.out, (new,))
