"""BN into linear: an eval-mode BN (or a constant scale) before a Linear folds into it, through layout ops.

    Linear(L(BN(x)); W, b) = Linear(L(x); W[o,c] * s[c], b + W t)
    where s = gamma / sqrt(var + eps), t = beta - mean * s

``L`` is a chain of flatten / reshape / transpose / permute / select ops
(possibly empty; a select of another axis, as in a sequence head's
``y[:, :, -1]``) that moves BN's channel axis, whole, to the last axis the Linear reads:
it only moves elements, so each element meets the same s[c] and t[c] either
way.  Or ``L`` is one ``flatten`` of every axis from the channels on (a
classifier head: ``BN2d``, ``flatten(1)``, ``Linear(C * H * W)``): feature
``j`` comes from channel ``j // (H W)``, so ``s`` and ``t`` repeat ``H W``
times each.  ``L`` may also start with a mean over axes after the channels (a
global average pool: RepLKNet's head is ``BN2d``, pool, flatten, ``Linear``):
each mean reads one channel, and the mean of ``s[c] x + t[c]`` is
``s[c] mean(x) + t[c]``; layout ops may come before the mean too (EfficientFormerV2's head: ``BN2d``,
``flatten(2)``, ``mean(-1)``, ``Linear``).  Unlike a conv there is no padding, so the fold is always exact.
This folds FastViT's attention pre-norm (BatchNorm2d, then flatten and
transpose to tokens) into the qkv projection.

A constant per-channel scale is the same fold with ``t = 0`` (the Linear keeps
its bias, or none), and a scale by one number (StyleGAN2's ``* sqrt(2)`` before
the next layer) folds through any layout: every element meets it.

A BN or scale on the features read by several Linears and nothing else
(LLaMA's RMSNorm weight before ``q_proj``, ``k_proj`` and ``v_proj``) folds
into each of them at once: ``Linear_i(s x + t) = Linear(x; W_i s, b_i + W_i t)``.

A constant added per feature right before the Linear (UniRepLKNet's GRN ends in ``... + self.beta``, then
``pwconv2``; ``sign`` -1 for ``c - x``) is the same fold with ``s = sign``:
``Linear(sign x + c) = Linear(x; sign W, b + W c)``.

A LayerNorm's or RMSNorm's own affine over the features (``nn.LayerNorm(C)`` before a ViT's ``qkv`` or ``fc1``,
``nn.RMSNorm(C)`` before ``q_proj``, ``k_proj``, ``v_proj``) is this fold too: the norm ends in ``gamma * n(x) + beta``
per feature, with ``n`` the normalization alone, so ``Linear(gamma n(x) + beta) = Linear(n(x); W gamma, b + W beta)``
and the norm keeps only its normalization.

A BN of some of the features a concat joins before the Linear (fastai's tabular model: ``bn_cont`` on the
continuous features, concatenated with the embeddings) folds into the columns those features fill:
``Linear(cat(BN(x1), x2)) = Linear(cat(x1, x2); W [s; 1], b + W [t; 0])``.

Preconditions: every value from the BN to the Linear is read only by the next
op, and the layout ops (and a mean, which must not average the channel axis)
keep the channel axis whole and end with it last, or are that one flatten.
Read by several Linears, the BN's output feeds them directly, on their last axis.  The constant is one
value per feature of the Linear's input (or one for all), and adding it does not broadcast ``x`` to a larger
shape.  A norm's affine folds where the norm normalizes the last axis alone (its ``gamma`` and ``beta`` are then one
value per feature) and only Linears read its output, as their input.  Through a concat on the Linear's features,
read by the Linear alone: each operand a BN or scale makes per feature (or by one number), read by the concat
alone, folds into the columns it fills.
"""

from math import prod

import torch

from repalgebra.kernels import bn_affine, norm_affine
from repalgebra.layout import follow_chain, layout_chain, replay
from repalgebra.match import every_reader, merged_source, producer, sole_use
from repalgebra.rules.bias_fold import per_feature
from repalgebra.rules.registry import Rewrite, rule


@rule("bn_into_linear", on="linear")
def bn_into_linear(graph, lin):
    norm = producer(lin.x, "layer_norm", "rms_norm")
    if norm is not None:
        return _norm_affine_into(graph, norm)
    shared = producer(lin.x, "batch_norm", "scale")
    if shared is not None and not sole_use(graph, lin.x):
        return _into_every_linear(graph, shared)
    shift = producer(lin.x, "add_const")
    if shift is not None:
        return _shift_into(graph, lin, shift)
    cat = producer(lin.x, "concat")
    if cat is not None:
        return _through_concat(graph, lin, cat) if sole_use(graph, lin.x) else None
    bn, chain = layout_chain(graph, lin.x, ("batch_norm", "scale", "mean", *_NORMS))
    if bn is not None and bn.op == "mean":  # a global average pool between (RepLKNet's head: BN, pool, flatten)
        mean = bn  # (after a layout chain of its own: EfficientFormerV2's head is BN, flatten(2), mean(-1))
        bn, before = layout_chain(graph, mean.x, ("batch_norm", "scale", *_NORMS))
        if bn is None:  # (a mean over the channels too fails below: the channel axis does not survive it)
            return None
        chain = [*before, mean, *chain]
    if bn is None:
        return None
    if bn.op in _NORMS:  # a ViT's final norm, then x[:, 0] or the tokens' mean, then the head; Swin's norm1, windows, qkv
        return _norm_through(lin, bn, chain)
    s, t, axis, one = _affine(bn, lin.x.shape[-1])
    if not one and follow_chain(chain, axis) != len(lin.x.shape) - 1:
        repeat = _flattened_features(chain, bn) if axis == 1 else None
        if repeat is None:
            return None
        s, t = s.repeat_interleave(repeat), None if t is None else t.repeat_interleave(repeat)
    moved = replay(chain, bn.x)
    start = moved[-1].out if moved else bn.x
    new = lin.replace(inputs=(start,), params=_folded(lin, s, t), source=merged_source(lin, bn))
    return Rewrite(lin.out, new.out, (*moved, new))


def _through_concat(graph, lin, cat):
    """``Linear(cat([BN(x1), x2, ...], -1))``: a BN (or constant scale) of the features of an operand, read by the
    concat alone, folds into the columns of ``W`` that operand fills (fastai's tabular model normalizes its
    continuous features beside the embeddings; a DLRM tower's input): ``s`` and ``t`` are the BN's on its columns,
    1 and 0 on the others."""
    rank = len(cat.out.shape)
    if cat.attrs["axis"] % rank != rank - 1:
        return None
    w = lin.params["weight"]
    s, t = torch.ones(w.shape[1], dtype=w.dtype), torch.zeros(w.shape[1], dtype=w.dtype)
    inputs, folded, start, shifted = [], [], 0, False
    for x in cat.inputs:
        width, bn = x.shape[-1], producer(x, "batch_norm", "scale")
        affine = _affine(bn, width) if bn is not None and sole_use(graph, x) and bn.x.shape == x.shape else None
        if affine is not None and (affine[3] or affine[2] == len(bn.x.shape) - 1):  # one number, or per feature
            s[start : start + width] = affine[0]
            if affine[1] is not None:
                t[start : start + width], shifted = affine[1], True
            inputs.append(bn.x)
            folded.append(bn)
        else:
            inputs.append(x)
        start += width
    if not folded:
        return None
    joined = cat.replace(inputs=tuple(inputs))
    new = lin.replace(inputs=(joined.out,), params=_folded(lin, s, t if shifted else None), source=merged_source(lin, *folded))
    return Rewrite(lin.out, new.out, (joined, new))


def _affine(bn, features: int):
    """``(s, t, axis, one)``: the BN's (or scale's, ``t`` None) map on ``axis``; ``one`` when it is one number for
    every element (StyleGAN2's ``* sqrt(2)``, a BN of one channel), then ``s`` and ``t`` spread over ``features``."""
    if bn.op == "batch_norm":
        (s, t), axis = bn_affine(bn), 1
    else:  # a constant scale: s on its axis, no shift
        s, t, axis = bn.params["scale"], None, bn.attrs["axis"] % len(bn.x.shape)
    one = s.numel() > 0 and bool((s == s.flatten()[0]).all()) and (t is None or bool((t == t.flatten()[0]).all()))
    if one:  # every element meets it, wherever it lands
        s, t = s.flatten()[0].expand(features), None if t is None else t.flatten()[0].expand(features)
    return s, t, axis, one


def _folded(lin, s, t) -> dict:
    """The Linear's parameters with ``x -> s x + t`` (``t`` None: no shift) folded in: ``W s``, ``b + W t``."""
    w, b = lin.params["weight"], lin.params.get("bias")
    params = {"weight": w * s}
    if t is not None or b is not None:
        params["bias"] = (0 if b is None else b) + (0 if t is None else w @ t)
    return params


def _shift_into(graph, lin, add):
    """``Linear(sign x + c)``, ``c`` one value per input feature or one for all: ``Linear(x; sign W, b + W c)``."""
    x, features = add.x, lin.x.shape[-1]
    c = per_feature(add.params["const"], add.out.shape, len(add.out.shape) - 1)
    if c is None or x.shape != add.out.shape or not sole_use(graph, add.out):
        return None
    s = torch.full((features,), float(add.attrs["sign"]), dtype=c.dtype)
    new = lin.replace(inputs=(x,), params=_folded(lin, s, c.expand(features)), source=merged_source(lin, add))
    return Rewrite(lin.out, new.out, (new,))


def _into_every_linear(graph, bn):
    """``bn`` read by several Linears and nothing else, on the features they read: folded into each at once."""
    readers = every_reader(graph, bn.out, "linear")
    if readers is None:
        return None
    s, t, axis, one = _affine(bn, bn.x.shape[-1])
    if not one and axis != len(bn.x.shape) - 1:
        return None
    news = [lin.replace(inputs=(bn.x,), params=_folded(lin, s, t), source=merged_source(lin, bn)) for lin in readers]
    return Rewrite(readers[0].out, news[0].out, tuple(news), also=tuple((r.out, n.out) for r, n in zip(readers[1:], news[1:])))


_NORMS = ("layer_norm", "rms_norm")


def _norm_affine(norm) -> tuple | None:
    """:func:`~repalgebra.kernels.norm_affine` of a LayerNorm or RMSNorm over the last axis alone, or None: no
    affine, or one per token and feature."""
    return norm_affine(norm) if len(norm.attrs["normalized_shape"]) == 1 else None


def _norm_affine_into(graph, norm):
    """A LayerNorm or RMSNorm over the last axis alone, read by Linears only: its ``gamma`` and ``beta`` folded into
    each (``W gamma``, ``b + W beta``), the norm left with its normalization."""
    affine = _norm_affine(norm)
    readers = [graph.users(norm.out)[0]] if sole_use(graph, norm.out) else every_reader(graph, norm.out, "linear")
    if affine is None or readers is None or readers[0].op != "linear" or readers[0].x is not norm.out:
        return None
    bare = norm.replace(params={})
    news = [lin.replace(inputs=(bare.out,), params=_folded(lin, *affine), source=merged_source(lin, norm)) for lin in readers]
    return Rewrite(readers[0].out, news[0].out, (bare, *news), also=tuple((r.out, n.out) for r, n in zip(readers[1:], news[1:])))


def _norm_through(lin, norm, chain):
    """A norm's affine folded into the one Linear that reads it through ``chain``, which carries the features (the
    norm's last axis) whole to the Linear's input axis; the chain replayed on the norm's normalization alone."""
    affine = _norm_affine(norm)
    if affine is None or follow_chain(chain, len(norm.out.shape) - 1) != len(lin.x.shape) - 1:
        return None
    bare = norm.replace(params={})
    moved = replay(chain, bare.out)
    new = lin.replace(inputs=(moved[-1].out,), params=_folded(lin, *affine), source=merged_source(lin, norm))
    return Rewrite(lin.out, new.out, (bare, *moved, new))


def _flattened_features(chain, bn) -> int | None:
    """Features per channel where ``chain`` is one ``flatten`` of every axis from the channels on (a classifier
    head's ``BN2d -> flatten(1) -> Linear(C * H * W)``, or that flatten written as a reshape to ``(N, C H W)``:
    ``x.view(x.size(0), -1)``): channel ``c`` holds features ``[c r, (c + 1) r)``."""
    shape = bn.x.shape
    if len(chain) != 1 or len(shape) < 3:
        return None
    (n,), rank = chain, len(shape)
    repeat = prod(shape[2:])
    if n.op == "flatten" and n.attrs["start"] % rank == 1 and n.attrs["end"] % rank == rank - 1:
        return repeat
    if n.op in ("reshape", "reshape_dyn") and tuple(n.out.shape) == (shape[0], shape[1] * repeat):
        return repeat
    return None
