"""BN before conv: an eval-mode BN feeding an unpadded conv folds into it.

    conv(BN(x); W, b) = conv(x; W[o,i] * s[i], b[o] + sum_{i,taps} W[o,i,taps] * t[i])
    where s = gamma / sqrt(var + eps), t = beta - mean * s  (i the input channel, within o's group)

A constant added per input channel (``sign * x + c[i]``: YOLOv7's ``ImplicitA``
before a conv) is the same affine map with ``s = sign``, ``t = c``.

A reflect, replicate or circular pad between them (mmcv's ``ConvModule`` with
``order=('norm', 'conv', 'act')`` and ``padding_mode='reflect'``) copies pixels
within each channel, so the affine map commutes with it: the pad moves before
the fold, ``conv(pad(BN(x))) = conv'(pad(x))``.

Read by several convs and nothing else (the 1x1 branches of an Inception block
after a shared BN), it folds into each of them at once.

A GroupNorm's own affine (PoolFormer's ``GroupNorm(1, C)`` before its MLP's 1x1 conv) is the same map with
``s = gamma``, ``t = beta``, after the normalization ``n``: ``conv(gamma n(x) + beta) = conv'(n(x))``, and the
norm keeps its normalization alone.

Through a channel concat that only the conv reads (PP-HGNetV2's LearnableAffineBlock, ``scale * x + bias``, on
each part before the aggregation 1x1), each part's map (a BN, an added constant, a scale) folds into the
kernel's slice of input channels it feeds; a part read elsewhere too keeps its map, and a zero-padding conv takes
only scales.

Preconditions: the BN's (or the add's) output is read only by the conv (or the
copying pad, read only by the conv), or only by convs, and no such conv zero-pads.  With padding the identity breaks: the conv's
border sees 0 where the unfused graph sees BN(0) = t != 0, so the rule refuses.
"""

import torch

from repalgebra.kernels import bn_affine, conv_bias, norm_affine, per_input_channel
from repalgebra.match import conv_with, every_reader, producer, sole_use
from repalgebra.rules.bias_fold import per_feature
from repalgebra.rules.registry import Refusal, Rewrite, rule


_COPYING = ("reflect", "replicate", "circular")  # pads that copy pixels of the same channel


@rule("bn_before_conv", on="conv2d")
def bn_before_conv(graph, conv):
    pad = _copying_pad(graph, conv.x)
    bn = producer(conv.x if pad is None else pad.x, "batch_norm", "add_const", "group_norm")
    if bn is None:
        return _through_concat(graph, conv) if pad is None else None
    readers = [conv] if sole_use(graph, bn.out) else every_reader(graph, bn.out, "conv2d") if pad is None else None
    if readers is None:
        return None
    affine = _affine(bn, conv.params["weight"].dtype)
    if affine is None:
        return None  # changes along other axes than the channels: not an affine map per channel
    if any(any(c.attrs["padding"]) for c in readers):
        if bn.op == "add_const":
            return Refusal("the conv after it zero-pads: its border would see 0, not the added constant", about=bn)
        if bn.op == "group_norm":
            return Refusal("the conv after it zero-pads: its border would see 0, not the norm's beta", about=bn)
        return Refusal("the conv after it zero-pads, and BN(0) != 0 at the border", about=bn)
    bare = (bn.replace(params={}),) if bn.op == "group_norm" else ()  # a norm keeps its normalization
    x = bare[0].out if bare else bn.x
    if pad is None:  # one conv, or each conv reading the BN (an Inception block's 1x1 branches)
        news = [_folded(c, *affine, bn, x) for c in readers]
        return Rewrite(readers[0].out, news[0].out, (*bare, *news), also=tuple((r.out, n.out) for r, n in zip(readers[1:], news[1:])))
    moved = pad.replace(inputs=(x, *pad.inputs[1:]))  # the affine commutes with copying pixels
    new = _folded(conv, *affine, bn, moved.out)
    return Rewrite(conv.out, new.out, (*bare, moved, new))


def _affine(bn, dtype):
    """``(s, t)`` per input channel: the BN's, ``sign`` and the constant of an ``add_const``, or a channel scale's
    factors and no shift (None when it varies along other axes)."""
    if bn.op == "batch_norm":
        return bn_affine(bn)
    channels = bn.x.shape[1]
    if bn.op == "group_norm":  # its own affine, after the normalization
        affine = norm_affine(bn)
        if affine is None:
            return None
        gamma, beta = affine
        return gamma.to(dtype), torch.zeros(channels, dtype=dtype) if beta is None else beta.to(dtype)
    if bn.op == "scale":
        f = bn.params["scale"].reshape(-1).to(dtype)
        if bn.attrs["axis"] % len(bn.x.shape) != 1 and f.numel() != 1:
            return None
        return f.expand(channels), torch.zeros(channels, dtype=dtype)
    c = per_feature(bn.params["const"], bn.x.shape, 1)
    if c is None:
        return None
    return torch.full((channels,), float(bn.attrs["sign"]), dtype=dtype), c.to(dtype).expand(channels)


def _folded(conv, s, t, bn, x):
    """``conv`` reading ``x`` with ``x -> s x + t`` per input channel folded into its weights and bias."""
    w = conv.params["weight"]
    per_o = lambda v: per_input_channel(v, w.shape, conv.attrs["groups"])  # noqa: E731  (laid out like W[o, i])
    new_w = w * per_o(s)[:, :, None, None]
    new_b = conv_bias(conv) + (w * per_o(t)[:, :, None, None]).sum((1, 2, 3))
    return conv_with(conv, sources=(bn,), inputs=(x,), weight=new_w, bias=new_b)


def _copying_pad(graph, value):
    """The reflect / replicate / circular ``pad_nd`` of the spatial axes making ``value`` (read only by the conv), else None."""
    pad = producer(value, "pad_nd")
    if pad is None or pad.attrs["mode"] not in _COPYING or not sole_use(graph, pad.out):
        return None
    pads = pad.attrs["pads"]
    return pad if len(pads) <= 4 and len(value.shape) == 4 else None  # never the channel axis


def _through_concat(graph, conv):
    """``conv(cat(a_1(y_1), ..., y_k, ...))`` on channels, ``a_j`` an affine map per channel (a BN, a constant added, a
    scale; PP-HGNetV2's LearnableAffineBlock on each layer before the aggregation 1x1): ``conv'(cat(y_1, ...))``, each
    map folded into the kernel's slice of input channels it feeds."""
    cat = producer(conv.x, "concat")
    if cat is None or len(conv.x.shape) != 4 or cat.attrs["axis"] % 4 != 1 or not sole_use(graph, cat.out):
        return None
    dtype = conv.params["weight"].dtype
    scales, shifts, inputs, folded = [], [], [], []
    for v in cat.inputs:
        part = producer(v, "batch_norm", "add_const", "scale")
        affine = None if part is None or not sole_use(graph, v) else _affine(part, dtype)
        if affine is None:
            affine, part = (torch.ones(v.shape[1], dtype=dtype), torch.zeros(v.shape[1], dtype=dtype)), None
        scales.append(affine[0])
        shifts.append(affine[1])
        inputs.append(v if part is None else part.x)
        folded += [part] if part is not None else []
    if not folded:
        return None
    t = torch.cat(shifts)
    if any(conv.attrs["padding"]) and bool(t.abs().max() > 0):
        return Refusal("the conv after it zero-pads: its border would see 0, not the shift of what the concat holds", about=folded[0])
    joined = cat.replace(inputs=tuple(inputs))
    new = _folded(conv, torch.cat(scales), t, folded[0], joined.out)
    return Rewrite(conv.out, new.out, (joined, new))
