"""Attention form: softmax(q k^T * c) v written out becomes one ``attention`` op (``F.scaled_dot_product_attention``).

    matmul(softmax(c * matmul(q, transpose(k, -2, -1)), -1), v) = attention(q, k, v; scale = c)

with ``c`` a number (1 when there is no scale op).  It is the definition of
scaled dot-product attention (no mask, no dropout, not causal), so both sides
compute the same function; the right side runs as one fused kernel in eager
PyTorch and lowers to ONNX as the same MatMul/Softmax/MatMul (or ``Attention``).

Preconditions: the transpose swaps the last two axes of ``k``; the softmax is
over the last axis; a scale between the scores and the softmax has one factor
for every element; the scores (and the scaled scores and the softmax) are read
only by the next op, so nothing else needs them; q, k and v have the same
leading (batch, head) sizes.
"""

from __future__ import annotations

from repalgebra.match import producer, sole_use
from repalgebra.rules.registry import Rewrite, rule


def _swaps_last_two(node) -> bool:
    """A transpose (or permute) that swaps the last two axes and keeps the others."""
    rank = len(node.x.shape)
    if rank < 2:
        return False
    if node.op == "transpose":
        return {node.attrs["dim0"] % rank, node.attrs["dim1"] % rank} == {rank - 2, rank - 1}
    return [d % rank for d in node.attrs["dims"]] == [*range(rank - 2), rank - 1, rank - 2]


def _uniform(scale_node) -> float | None:
    """The one factor of a ``scale`` op, or None if its factors differ."""
    s = scale_node.params["scale"].reshape(-1)
    return float(s[0]) if s.numel() and bool((s == s[0]).all()) else None


@rule("attention_form", on="matmul")
def attention_form(graph, node):
    sm = producer(node.inputs[0], "softmax")
    if sm is None or not sole_use(graph, sm.out):
        return None
    rank = len(sm.out.shape)
    if sm.attrs["axis"] % rank != rank - 1:
        return None
    c, scores = 1.0, sm.x
    scaled = producer(scores, "scale")
    if scaled is not None:
        c = _uniform(scaled)
        if c is None or not sole_use(graph, scores):
            return None
        scores = scaled.x
    mm = producer(scores, "matmul")
    if mm is None or not sole_use(graph, scores):
        return None
    q, kt = mm.inputs
    tr = producer(kt, "transpose", "permute")
    if tr is None or not _swaps_last_two(tr):
        return None
    k, v = tr.x, node.inputs[1]
    if not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]) or len(q.shape) < 2:
        return None
    new = node.replace(op="attention", inputs=(q, k, v), attrs={"scale": c, "causal": False}, params={})
    return Rewrite(node.out, new.out, (new,))
