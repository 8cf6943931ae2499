"""Where a layout is read: the ``contiguous`` ops a captured graph keeps.

The IR has values, not memory layouts, and no lowering needs a dense input, so ``x.contiguous()`` is the identity
between ops the graph knows.  Two readers see the layout, though: the caller, who may ``out.view(B, -1)`` an output
the model made contiguous, and a call carried through unchanged (``torch.view_as_complex`` needs a last axis of
stride one; a module kept whole may ``view`` its input).  :func:`drop_unread_layouts` takes every ``contiguous`` op
out of the graph and, where its value reaches an output or an ``opaque`` call's input through layout ops (which may
view it) and elementwise ops (which keep its layout), makes that output or input dense instead, right where it is
read.  No rule meets a ``contiguous`` between the ops it folds (a TCN's chomp, ``x[..., :-p].contiguous()``,
before its BatchNorm).
"""

from __future__ import annotations

from typing import Any, Iterator

from repalgebra.ir import Graph, Node, Value
from repalgebra.ops import op_def

__all__ = ["drop_unread_layouts"]

# Ops whose output is laid out as their input is (torch's elementwise kernels keep a dense input's strides): a
# ``gelu`` of ``x.permute(0, 2, 3, 1).contiguous()`` is dense, of the permuted view permuted (review R11).
_ELEMENTWISE = frozenset({"relu", "gelu", "sigmoid", "silu", "hardswish", "hardsigmoid", "tanh", "leaky_relu", "clamp", "softplus",
                          "threshold", "elu", "abs", "sqrt", "exp", "log", "rsqrt", "pow", "prelu", "log_sigmoid", "cast", "scale",
                          "add_const", "add", "sub", "mul", "div", "broadcast_add", "broadcast_sub", "batch_norm"})


def drop_unread_layouts(graph: Graph) -> Graph:
    """``graph`` without its ``contiguous`` nodes, and with one before each output or carried call's input that
    reads the layout one of them made (a new graph)."""
    layouts = [n for n in graph.nodes if n.op == "contiguous"]
    if not layouts:
        return graph  # (as it is: the dead nodes too, which the passes after this one remove as they go)
    reads: dict[tuple[int, int], tuple[Node | None, int, Any, str]] = {}  # (reader, input) -> where, and the format
    for n in layouts:
        for reader, k in _reads(graph, n.out):
            reads[(id(reader), k)] = (reader, k, n.attrs["memory_format"], n.source)
        graph.replace_uses(n.out, n.x)
    graph.eliminate_dead()
    if not reads:
        return graph
    made: dict[tuple[int, Any], Node] = {}

    def dense(v: Value, layout: Any, source: str) -> Value:  # one contiguous node per value and format
        if (id(v), layout) not in made:
            made[(id(v), layout)] = Node.make("contiguous", [v], {"memory_format": layout}, source=source)
        return made[(id(v), layout)].out

    outputs, before = list(graph.outputs), {}
    for reader, k, layout, source in reads.values():
        if reader is None:
            outputs[k] = dense(outputs[k], layout, source)
        else:
            reader.inputs = tuple(dense(v, layout, source) if j == k else v for j, v in enumerate(reader.inputs))
            before.setdefault(id(reader), []).append(reader.inputs[k].producer)
    nodes: dict[int, Node] = {}  # (by id, in order: each new node just before its first reader, or last)
    for n in graph.nodes:
        nodes.update((id(c), c) for c in before.get(id(n), ()) if id(c) not in nodes)
        nodes[id(n)] = n
    nodes.update((id(c), c) for c in made.values() if id(c) not in nodes)
    return Graph(graph.inputs, list(nodes.values()), outputs)


def _reads(graph: Graph, value: Value) -> Iterator[tuple[Node | None, int]]:
    """Where ``value``'s layout is read: ``(None, k)`` for output ``k``, ``(node, k)`` for input ``k`` of an ``opaque``
    node, reached through layout ops (``y.contiguous().view(...)`` keeps the dense strides a reshape views) and
    elementwise ops of its shape (which keep them too)."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        yield from ((None, k) for k, o in enumerate(graph.outputs) if o is v)
        for u in graph.users(v):
            if u.op == "opaque":
                yield from ((u, k) for k, i in enumerate(u.inputs) if i is v)
            elif u.op == "identity" or op_def(u.op).kind == "layout":  # (a later contiguous's format, read there, wins)
                stack.append(u.out)
            elif u.op in _ELEMENTWISE and u.out.shape == v.shape:
                stack.append(u.out)
