"""Affine after linear: a BN or layer scale after a Linear folds into it, through layout ops.

    A(L(Linear(x; W, b))) = L(Linear(x; s[o] * W[o,:], s * b + t))

where ``A(y) = s * y + t`` acts per channel (eval-mode BN: s = gamma /
sqrt(var + eps), t = beta - mean * s; layer scale: s = gamma, t = 0) and ``L``
is a chain of flatten / reshape / transpose / permute ops (possibly empty)
that carries the Linear's output features, whole, to the axis A acts on.
Layout ops only move elements, so every element meets the same s[o], t[o].
This folds LeViT's Linear + BatchNorm1d (across a flatten) and FastViT's
layer scale after the attention projection (across the reshape back to NCHW).

Preconditions: every value from the Linear to A is read only by the next op,
and the feature axis arrives whole on A's axis.
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
    if not one_channel and follow_chain(chain, len(lin.out.shape) - 1) != axis:
        return None
    if node.op == "batch_norm":
        s, t = bn_affine(node)
    else:
        s, t = node.params["scale"], None
    w = lin.params["weight"]
    b = lin.params.get("bias")
    bias = b * s if b is not None else None
    if t is not None:
        bias = t if bias is None else bias + t
    new = lin.replace(params={"weight": w * s[:, None], **({"bias": bias} if bias is not None else {})}, source=merged_source(lin, node))
    moved = replay(chain, new.out)
    return Rewrite(node.out, moved[-1].out if moved else new.out, (new, *moved))
