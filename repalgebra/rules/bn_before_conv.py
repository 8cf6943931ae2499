"""BN before conv: an eval-mode BN feeding an unpadded conv folds into it.

    conv(BN(x); W, b) = conv(x; W[o,i] * s[i], b[o] + sum_{i,taps} W[o,i,taps] * t[i])
    where s = gamma / sqrt(var + eps), t = beta - mean * s  (i the input channel, within o's group)

A constant added per input channel (``sign * x + c[i]``: YOLOv7's ``ImplicitA``
before a conv) is the same affine map with ``s = sign``, ``t = c``.

A reflect, replicate or circular pad between them (mmcv's ``ConvModule`` with
``order=('norm', 'conv', 'act')`` and ``padding_mode='reflect'``) copies pixels
within each channel, so the affine map commutes with it: the pad moves before
the fold, ``conv(pad(BN(x))) = conv'(pad(x))``.

Preconditions: the BN's (or the add's) output is read only by the conv (or the
copying pad, read only by the conv), and the conv does not zero-pad.  With padding the identity breaks: the conv's
border sees 0 where the unfused graph sees BN(0) = t != 0, so the rule refuses.
"""

import torch

from repalgebra.kernels import bn_affine, conv_bias, per_input_channel
from repalgebra.match import conv_with, producer, sole_use
from repalgebra.rules.bias_fold import per_feature
from repalgebra.rules.registry import Refusal, Rewrite, rule


_COPYING = ("reflect", "replicate", "circular")  # pads that copy pixels of the same channel


@rule("bn_before_conv", on="conv2d")
def bn_before_conv(graph, conv):
    pad = _copying_pad(graph, conv.x)
    bn = producer(conv.x if pad is None else pad.x, "batch_norm", "add_const")
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
    if pad is None:
        new = conv_with(conv, sources=(bn,), inputs=(bn.x,), weight=new_w, bias=new_b)
        return Rewrite(conv.out, new.out, (new,))
    moved = pad.replace(inputs=(bn.x, *pad.inputs[1:]))  # the affine commutes with copying pixels
    new = conv_with(conv, sources=(bn,), inputs=(moved.out,), weight=new_w, bias=new_b)
    return Rewrite(conv.out, new.out, (moved, new))


def _copying_pad(graph, value):
    """The reflect / replicate / circular ``pad_nd`` of the spatial axes making ``value`` (read only by the conv), else None."""
    pad = producer(value, "pad_nd")
    if pad is None or pad.attrs["mode"] not in _COPYING or not sole_use(graph, pad.out):
        return None
    pads = pad.attrs["pads"]
    return pad if len(pads) <= 4 and len(value.shape) == 4 else None  # never the channel axis
