"""Where a layout is read: the ``contiguous`` ops a captured graph keeps.

The IR has values, not memory layouts, and no lowering needs a dense input, so ``x.contiguous()`` is the identity
between ops the graph knows.  Two readers see the layout, though: the caller, who may ``out.view(B, -1)`` an output
the model made contiguous, and a call carried through unchanged (``torch.view_as_complex`` needs a last axis of
stride one; a module kept whole may ``view`` its input).  :func:`drop_unread_layouts` keeps a ``contiguous`` op
whose value reaches an output or an ``opaque`` call's input through layout ops (which may view it) and elementwise
ops (which keep its layout), and makes every other one the identity, so that no rule meets it between the ops it
folds.
"""

from __future__ import annotations

from repalgebra.ir import Graph, Value
from repalgebra.ops import op_def

__all__ = ["drop_unread_layouts"]


def drop_unread_layouts(graph: Graph) -> Graph:
    """``graph`` with each ``contiguous`` node whose layout nobody reads replaced by its input (in place)."""
    for n in [n for n in graph.nodes if n.op == "contiguous"]:
        if not _layout_read(graph, n.out):
            graph.replace_uses(n.out, n.x)
    graph.eliminate_dead()
    return graph


# Ops whose output is laid out as their input is (torch's elementwise kernels keep a dense input's strides): a
# ``gelu`` of ``x.permute(0, 2, 3, 1).contiguous()`` is dense, of the permuted view permuted (review R11).
_ELEMENTWISE = frozenset({"relu", "gelu", "sigmoid", "silu", "hardswish", "hardsigmoid", "tanh", "leaky_relu", "clamp", "softplus",
                          "threshold", "elu", "abs", "sqrt", "exp", "log", "rsqrt", "pow", "prelu", "log_sigmoid", "cast", "scale",
                          "add_const", "add", "sub", "mul", "div", "broadcast_add", "broadcast_sub", "batch_norm"})


def _layout_read(graph: Graph, value: Value) -> bool:
    """Whether ``value`` reaches an output or an ``opaque`` call through layout ops (``y.contiguous().view(...)``
    keeps the dense strides a reshape views) and elementwise ops of its shape (which keep them too)."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if any(o is v for o in graph.outputs):
            return True
        for u in graph.users(v):
            if u.op == "opaque":
                return True
            if u.op == "identity" or (op_def(u.op).kind == "layout" and u.op != "contiguous"):  # (which lays out anew)
                stack.append(u.out)
            elif u.op in _ELEMENTWISE and u.out.shape == v.shape:
                stack.append(u.out)
    return False
