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

Preconditions: every value from the Linear to A is read only by the next op,
and the feature axis arrives whole on A's axis, or is that one reshape.
"""

import torch

from repalgebra.kernels import bn_affine
from repalgebra.layout import follow_chain, layout_chain, replay
from repalgebra.match import merged_source
from repalgebra.rules.registry import Rewrite, rule


@rule("linear_affine_fold", on=("batch_norm", "scale"))
def linear_affine_fold(graph, node):
    lin, chain = layout_chain(graph, node.x, ("linear",))
    if lin is None:
        return None
    axis = (1 if node.op == "batch_norm" else node.attrs["axis"]) % len(node.x.shape)
    one_channel = lin.out.shape[-1] == 1 and node.x.shape[axis] == 1  # a scalar affine: where it lands is moot
    repeat = 1
    if not one_channel and follow_chain(chain, len(lin.out.shape) - 1) != axis:
        repeat = _unflattened_rows(chain, lin, node, axis)
        if repeat is None:
            return None
    if node.op == "batch_norm":
        s, t = bn_affine(node)
    else:
        s, t = node.params["scale"], None
    if repeat > 1:  # channel c is the Linear's output rows [c r, (c + 1) r)
        s = s.repeat_interleave(repeat)
        t = None if t is None else t.repeat_interleave(repeat)
    w = lin.params["weight"]
    b = lin.params.get("bias")
    bias = b * s if b is not None else None
    if t is not None:
        bias = t if bias is None else bias + t
    new = lin.replace(params={"weight": w * s[:, None], **({"bias": bias} if bias is not None else {})}, source=merged_source(lin, node))
    moved = replay(chain, new.out)
    return Rewrite(node.out, moved[-1].out if moved else new.out, (new, *moved))


def _unflattened_rows(chain, lin, node, axis: int) -> int | None:
    """Rows per channel where ``chain`` is one reshape of the Linear's ``(B, F)`` output to ``(B, C, ...)`` and the
    affine acts on ``C`` (a generator's input layer: ``Linear(z).view(-1, C, 4, 4)``, then a BatchNorm2d): each row
    splits channel-major, so channel ``c`` holds rows ``[c r, (c + 1) r)`` with ``r = F / C``, at every batch."""
    if len(chain) != 1 or chain[0].op not in ("reshape", "reshape_dyn") or axis != 1 or len(lin.out.shape) != 2:
        return None
    shape = node.x.shape
    rows = 1
    for size in shape[2:]:
        rows *= size
    if len(shape) < 3 or shape[0] != lin.out.shape[0] or shape[1] * rows != lin.out.shape[1]:
        return None
    return rows
