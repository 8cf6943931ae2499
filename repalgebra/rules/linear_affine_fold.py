"""Affine after linear: a BN or layer scale after a Linear folds into it, through layout ops.

    A(L(Linear(x; W, b))) = L(Linear(x; s[o] * W[o,:], s * b + t))

where ``A(y) = s * y + t`` acts per channel (eval-mode BN: s = gamma /
sqrt(var + eps), t = beta - mean * s; layer scale: s = gamma, t = 0) and ``L``
is a chain of flatten / reshape / transpose / permute ops (possibly empty)
that carries the Linear's output features, whole, to the axis A acts on.
Layout ops only move elements, so every element meets the same s[o], t[o].
Or ``L`` is one reshape of the Linear's ``(B, F)`` output to ``(B, C, H, W)`` (a
generator's input layer, ``Linear(z).view(-1, C, 4, 4)``): channel ``c`` is the
rows ``[c H W, (c + 1) H W)``, so ``s`` and ``t`` repeat ``H W`` times each.
This folds LeViT's Linear + BatchNorm1d (across a flatten) and FastViT's
layer scale after the attention projection (across the reshape back to NCHW).

After a sum (``add``/``sub``, nested) of Linears that read different inputs
(PyG's SAGEConv ``lin_l(aggr) + lin_r(x)`` before a BatchNorm1d, a DLRM-style
``fc1(a) + fc2(b)``), A distributes over the sum: every Linear folds the scale,
and the first one (always added) also the shift:

    A(L(Linear_1(x_1) ± ... ± Linear_n(x_n)))
        = L(Linear_1(x_1; s W_1, s b_1 + t) ± ... ± Linear_n(x_n; s W_n, s b_n))

Preconditions: every value from the Linear to A is read only by the next op,
and the feature axis arrives whole on A's axis, or is that one reshape.  After
a sum, every term is a Linear (or a sum of them) of the sum's shape, each read
by the sum alone: a term of anything else (an identity, a non-linearity, a
broadcast one) leaves A where it is.
"""

import torch

from repalgebra.kernels import bn_affine
from repalgebra.layout import follow_chain, layout_chain, replay
from repalgebra.match import merged_source, sole_use
from repalgebra.rules.registry import Refusal, Rewrite, rule


_SUMS = ("add", "sub")  # of one shape: a broadcast term is not a Linear of the sum's features


@rule("linear_affine_fold", on=("batch_norm", "scale"))
def linear_affine_fold(graph, node):
    top, chain = layout_chain(graph, node.x, ("linear", *_SUMS))
    if top is None:
        return None
    axis = (1 if node.op == "batch_norm" else node.attrs["axis"]) % len(node.x.shape)
    one_channel = top.out.shape[-1] == 1 and node.x.shape[axis] == 1  # a scalar affine: where it lands is moot
    repeat = 1
    if not one_channel and follow_chain(chain, len(top.out.shape) - 1) != axis:
        repeat = _unflattened_rows(chain, top, node, axis)
        if repeat is None:
            return None
    if node.op == "batch_norm":
        s, t = bn_affine(node)
    else:
        s, t = node.params["scale"], None
    if repeat > 1:  # channel c is the Linear's output rows [c r, (c + 1) r)
        s = s.repeat_interleave(repeat)
        t = None if t is None else t.repeat_interleave(repeat)
    if top.op in _SUMS:
        return _through_sum(graph, node, top, chain, s, t)
    new = _folded(top, s, t, node)
    moved = replay(chain, new.out)
    return Rewrite(node.out, moved[-1].out if moved else new.out, (new, *moved))


def _folded(lin, s, t, node):
    """``lin`` with the per-feature affine ``s * y + t`` (``t`` None: no shift) folded into its rows."""
    w = lin.params["weight"]
    b = lin.params.get("bias")
    bias = b * s if b is not None else None
    if t is not None:
        bias = t if bias is None else bias + t
    return lin.replace(params={"weight": w * s[:, None], **({"bias": bias} if bias is not None else {})}, source=merged_source(lin, node))


def _through_sum(graph, node, top, chain, s, t):
    """``A(L(Linear_1 ± Linear_2 ± ...))``: every Linear folds the scale, the first one also the shift; None unless
    every term is a Linear or a sum of them, of the sum's shape.  The first (leftmost) term of a sum is added, never
    subtracted, so its shift needs no sign."""
    nodes, shift, shared, seen = [], [t], [], set()  # the shift goes into the first Linear of the sum, once

    def folded(value):
        n = value.producer
        if id(value) in seen:  # a term twice (``y + y``): folded twice, its Linear would be computed twice
            shared.append(n)
        seen.add(id(value))
        if n is not None and n.op in _SUMS and value.shape == top.out.shape:
            inputs = [folded(v) for v in n.inputs]
            if None in inputs:
                return None
            nodes.append(n.replace(inputs=tuple(inputs)))
        elif n is not None and n.op == "linear" and value.shape == top.out.shape:
            nodes.append(_folded(n, s, shift.pop() if shift else None, node))
        else:
            return None
        if not sole_use(graph, value):
            shared.append(n)
        return nodes[-1].out

    new = folded(top.out)
    if new is None:
        return None
    if shared:
        return Refusal("the sum before it, or a Linear in it, is also read elsewhere (or twice)")
    moved = replay(chain, new)
    return Rewrite(node.out, moved[-1].out if moved else new, (*nodes, *moved))


def _unflattened_rows(chain, top, node, axis: int) -> int | None:
    """Rows per channel where ``chain`` is one reshape of the ``(B, F)`` output of ``top`` (the Linear, or a sum of
    Linears) to ``(B, C, ...)`` and the affine acts on ``C`` (a generator's input layer:
    ``Linear(z).view(-1, C, 4, 4)``, then a BatchNorm2d): each row splits channel-major, so channel ``c`` holds rows
    ``[c r, (c + 1) r)`` with ``r = F / C``, at every batch."""
    if len(chain) != 1 or chain[0].op not in ("reshape", "reshape_dyn") or axis != 1 or len(top.out.shape) != 2:
        return None
    shape = node.x.shape
    rows = 1
    for size in shape[2:]:
        rows *= size
    if len(shape) < 3 or shape[0] != top.out.shape[0] or shape[1] * rows != top.out.shape[1]:
        return None
    return rows
