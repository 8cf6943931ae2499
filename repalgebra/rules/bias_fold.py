"""Bias folding: a constant added per output feature after a conv or a Linear folds into its bias.

    sign * L(P(x; W, b)) + c = L(P(x; sign * W, sign * b + c[o]))

where ``P`` is a ``conv2d``, a ``conv3d`` or a ``linear``, ``L`` a chain of layout ops
(flatten, reshape, transpose, permute; possibly empty) that carries P's output
features whole to one axis, ``c`` a constant that varies along that axis only
(size 1 on every other axis), ``c[o]`` its value for output feature ``o``, and
``sign`` 1 or -1 (``1 - conv(x)``).  Layout ops only move elements, so every
element still meets the ``c`` of its own feature.

It folds what model code writes as a hand-made bias (``conv(x) +
self.bias.view(1, -1, 1, 1)``), the shift of torchvision's and DETR's
``FrozenBatchNorm2d`` (``x * scale + bias``: the scale folds by
``scale_fold``), and ResMLP's ``Affine`` after a Linear (``alpha * x + beta``).

Preconditions: every value from P to the add is read only by the next op;
the constant changes along no axis but the features'; the add keeps P's dtype.
"""

from __future__ import annotations

import torch

from repalgebra.layout import follow_chain, layout_chain, replay
from repalgebra.match import merged_source
from repalgebra.rules.registry import Rewrite, rule


@rule("bias_fold", on="add_const")
def bias_fold(graph, node):
    p, chain = layout_chain(graph, node.x, ("conv2d", "conv3d", "linear"))
    if p is None or node.out.dtype != p.out.dtype:
        return None
    features = len(p.out.shape) - 1 if p.op == "linear" else 1  # the axis P's output features are on
    c = per_feature(node.params["const"], node.x.shape, follow_chain(chain, features))
    if c is None:
        return None
    sign = node.attrs["sign"]
    w, b = p.params["weight"], p.params.get("bias")
    c = c.to(w.dtype).expand(p.out.shape[features]).clone()
    new = p.replace(params={"weight": sign * w, "bias": c if b is None else sign * b + c}, source=merged_source(p, node))
    moved = replay(chain, new.out)
    return Rewrite(node.out, moved[-1].out if moved else new.out, (new, *moved))


def per_feature(const: torch.Tensor, shape: tuple[int, ...], axis: int | None) -> torch.Tensor | None:
    """``const`` (broadcast to ``shape``) as one value per position on ``axis`` (shape ``(n,)`` or ``(1,)``),
    or ``None`` if it changes along another axis, or the features reach no single axis (``axis`` is ``None``)."""
    full = (1,) * (len(shape) - const.dim()) + tuple(const.shape)
    others = [size for k, size in enumerate(full) if k != axis]
    if all(size == 1 for size in full):
        return const.reshape(1)  # one number: where the features went is moot
    if axis is None or any(size != 1 for size in others):
        return None
    return const.reshape(-1)
