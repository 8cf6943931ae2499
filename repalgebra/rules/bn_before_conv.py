"""BN before conv: an eval-mode BN feeding an unpadded conv folds into it.

    conv(BN(x); W, b) = conv(x; W[o,i] * s[i], b[o] + sum_{i,taps} W[o,i,taps] * t[i])
    where s = gamma / sqrt(var + eps), t = beta - mean * s  (i the input channel, within o's group)

A constant added per input channel (``sign * x + c[i]``: YOLOv7's ``ImplicitA``
before a conv) is the same affine map with ``s = sign``, ``t = c``.

Preconditions: the BN's (or the add's) output is read only by the conv, and
the conv does not zero-pad.  With padding the identity breaks: the conv's
border sees 0 where the unfused graph sees BN(0) = t != 0, so the rule refuses.
"""

import torch

from repalgebra.kernels import bn_affine, conv_bias, per_input_channel
from repalgebra.match import conv_with, producer, sole_use
from repalgebra.rules.bias_fold import per_feature
from repalgebra.rules.registry import Refusal, Rewrite, rule


@rule("bn_before_conv", on="conv2d")
def bn_before_conv(graph, conv):
    bn = producer(conv.x, "batch_norm", "add_const")
    if bn is None or not sole_use(graph, bn.out):
        return None
    w = conv.params["weight"]
    if bn.op == "add_const":
        c = per_feature(bn.params["const"], bn.x.shape, 1)
        if c is None:
            return None  # changes along other axes than the channels: not an affine map per channel
        channels = bn.x.shape[1]
        s = torch.full((channels,), float(bn.attrs["sign"]), dtype=w.dtype)
        t = c.to(w.dtype).expand(channels)
    if any(conv.attrs["padding"]):
        if bn.op == "add_const":
            return Refusal("the conv after it zero-pads: its border would see 0, not the added constant", about=bn)
        return Refusal("the conv after it zero-pads, and BN(0) != 0 at the border", about=bn)
    if bn.op == "batch_norm":
        s, t = bn_affine(bn)
    per_o = lambda v: per_input_channel(v, w.shape, conv.attrs["groups"])  # noqa: E731  (laid out like W[o, i])
    new_w = w * per_o(s)[:, :, None, None]
    new_b = conv_bias(conv) + (w * per_o(t)[:, :, None, None]).sum((1, 2, 3))
    new = conv_with(conv, sources=(bn,), inputs=(bn.x,), weight=new_w, bias=new_b)
    return Rewrite(conv.out, new.out, (new,))
