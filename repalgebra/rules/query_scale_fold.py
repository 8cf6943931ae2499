"""Query scale: a scale on a part of a Linear's output (attention's ``q * head_dim**-0.5``) folds into those rows.

    scale(P(Linear(x; W, b)); s) = P(Linear(x; f[o] * W[o,:], f * b)),   and the other parts are unchanged

and the same for a conv, whose output channels are its features (MobileNetV4's multi-query attention
computes ``q`` with a 1x1 conv and reshapes it to heads): ``conv(x; f[o] * W[o], f * b)``.

where ``P`` is a path of layout ops from the Linear to the scale (reshape,
permute, select, slice, ...: ``qkv(x).reshape(B, N, 3, h, d).permute(2, 0, 3,
1, 4)[0]``), and ``f[o]`` is the factor the scale puts on output feature ``o``
(1 for the features it does not see).  Layout ops only move and pick elements,
so every element of the scale's input *is* one output feature ``o`` of the
Linear: multiplying it by ``s`` is multiplying row ``o`` of ``W`` and ``b``.
The k and v parts of the same Linear read rows the scale never sees, so they
keep theirs (``f = 1``).

Preconditions: every element of one feature meets the same factor (a per-head
scale on a layout that keeps features whole); no feature the scale sees is
read anywhere else (through another layout path, or the Linear's output
itself); the scale's input is read only by the scale.  Which feature lands
where is computed, not pattern-matched: the layout path is run on the
Linear's output-feature indices.

A number on the scores instead (BERT's ``matmul(q, k.transpose(-1, -2)) / sqrt(d)``, then ``+ mask``) is the same
fold one step further, since a number passes through a matrix product, ``c (A B) = (c A) B``:

    scale(matmul(P(Linear(x; W, b)), K); c) = matmul(P(Linear(x; c W_q, c b_q)), K)

for the features ``P`` picks (or with ``c`` on the right operand's Linear when the left is not one, or is read
elsewhere).  Preconditions: one factor ``c`` for every element; the scores are read by the scale only, the operand
by the product only; in half precision ``|c| <= 1`` (``c q`` can overflow where ``c (q k^T)`` does not: a CLIP-style
logit scale of 100).
"""

from __future__ import annotations

import torch

from repalgebra.ir import Graph, Node, Value
from repalgebra.match import producer, sole_use
from repalgebra.ops import _channel_view, op_def
from repalgebra.rules.registry import Refusal, Rewrite, rule

# Ops that move or pick elements and nothing else: the index of the feature an element came from
# goes through them unchanged.
PATH_OPS = ("flatten", "reshape", "reshape_dyn", "permute", "transpose", "select", "slice", "chunk")


_FEATURE_AXIS = {"linear": -1, "conv2d": 1}  # where a producer's output features (the rows of its weight) are


def _path_up(graph: Graph, value: Value) -> Node | None:
    """The Linear (or conv) that ``value`` is a layout-only view of (through :data:`PATH_OPS`), if any."""
    v = value
    while v.producer is not None and v.producer.op in PATH_OPS:
        v = v.producer.x
    return v.producer if v.producer is not None and v.producer.op in _FEATURE_AXIS else None


def _indices(node: Node, idx: torch.Tensor) -> torch.Tensor:
    """Layout ``node`` applied to the feature-index tensor ``idx`` (its other inputs only lend shapes)."""
    refs = [torch.empty(i.shape) for i in node.inputs[1:]]
    return op_def(node.op).run(idx, *refs, **node.attrs)


def _leaves(graph: Graph, lin: Node) -> list[tuple[Value, torch.Tensor, list[Node]]]:
    """Every value below the Linear along layout ops that something other than a layout op reads.

    Returns ``(value, feature indices of its elements, its non-layout readers)``; a graph output
    counts as a reader (an empty list then still means "read").
    """
    out, axis = lin.out, _FEATURE_AXIS[lin.op] % len(lin.out.shape)
    features = out.shape[axis]
    start = torch.arange(features).reshape(-1, *[1] * (len(out.shape) - 1 - axis)).expand(out.shape)
    found, stack = [], [(out, start)]
    outputs = {id(o) for o in graph.outputs}
    while stack:
        v, idx = stack.pop()
        others = []
        for u in graph.users(v):
            if u.op in PATH_OPS and u.x is v:
                stack.append((u.out, _indices(u, idx)))
            else:
                others.append(u)
        if others or id(v) in outputs:
            found.append((v, idx, others))
    return found


@rule("query_scale_fold", on="scale")
def query_scale_fold(graph, node):
    lin = _path_up(graph, node.x)
    if lin is not None:
        if not sole_use(graph, node.x):
            return Refusal("the scaled value is also read elsewhere")
        factors = _channel_view(node.params["scale"], torch.empty(node.x.shape), node.attrs["axis"]).expand(node.x.shape)
        return _fold(graph, node, lin, node.x, factors)
    mm = producer(node.x, "matmul")
    if mm is None:
        return None
    c = node.params["scale"].reshape(-1)
    refusal = None
    for operand in mm.inputs:  # the scores' number moves onto q (or k) through the product: c (A B) = (c A) B
        lin = _path_up(graph, operand)
        if lin is None or sum(i is operand for i in mm.inputs) > 1:
            continue
        if not (c.numel() and bool((c == c[0]).all())):
            return Refusal("a scale on a matrix product with more than one factor")
        if abs(float(c[0])) > 1 and node.out.dtype in (torch.float16, torch.bfloat16):
            return Refusal("a number above 1 moved onto an operand can overflow half precision where the product does not")
        if not (sole_use(graph, node.x) and sole_use(graph, operand)):
            refusal = Refusal("the scores, or the operand the number would move onto, are also read elsewhere")
            continue  # the other operand may take it
        return _fold(graph, node, lin, operand, c[:1].expand(operand.shape))
    return refusal


def _fold(graph: Graph, node: Node, lin: Node, scaled: Value, factors: torch.Tensor) -> Rewrite | Refusal | None:
    """Multiply the rows of ``lin`` that the layout view ``scaled`` shows by ``factors`` (one per element of
    ``scaled``), and take the ``scale`` ``node`` out."""
    leaves = _leaves(graph, lin)
    mine = next((idx for v, idx, _ in leaves if v is scaled), None)
    if mine is None:
        return None
    features = lin.params["weight"].shape[0]
    seen = torch.zeros(features, dtype=torch.bool)
    seen[mine.reshape(-1)] = True
    for v, idx, _ in leaves:
        if v is not scaled and bool(seen[idx.reshape(-1)].any()):
            return Refusal("a feature it scales is also read unscaled elsewhere")
    flat_idx, flat_f = mine.reshape(-1), factors.reshape(-1).to(torch.float64)
    lo = torch.full((features,), float("inf"), dtype=torch.float64).scatter_reduce(0, flat_idx, flat_f, "amin")
    hi = torch.full((features,), float("-inf"), dtype=torch.float64).scatter_reduce(0, flat_idx, flat_f, "amax")
    if not bool((lo[seen] == hi[seen]).all()):
        return Refusal("elements of one feature meet different factors")
    f = torch.where(seen, lo, torch.ones(features, dtype=torch.float64))
    w = lin.params["weight"]
    params = {"weight": w * f.to(w.dtype).reshape(-1, *[1] * (w.dim() - 1))}
    if "bias" in lin.params:
        b = lin.params["bias"]
        params["bias"] = b * f.to(b.dtype)
    new = lin.replace(params=params)  # still the qkv Linear (or q conv): its source stays
    return Rewrite(lin.out, new.out, (new,), also=((node.out, node.x),))
