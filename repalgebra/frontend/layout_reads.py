"""Where a layout is read: the ``contiguous`` ops a captured graph keeps.

The IR has values, not memory layouts, and no lowering needs a dense input, so ``x.contiguous()`` is the identity
between ops the graph knows.  Two readers see the layout, though: the caller, who may ``out.view(B, -1)`` an output
the model made contiguous, and a call carried through unchanged (``torch.view_as_complex`` needs a last axis of
stride one; a module kept whole may ``view`` its input).  :func:`drop_unread_layouts` takes every ``contiguous`` op
out of the graph and, where its value reaches an output or an ``opaque`` call's input through layout ops (which may
view it), elementwise ops and convs, pools and the like (which keep its layout), makes that output or input dense
instead, right where it is read.  No rule meets a ``contiguous`` between the ops it folds (a TCN's chomp,
``x[..., :-p].contiguous()``, before its BatchNorm).  Where folding changes the layout an output has at the example (a
BN of a channel slice, folded, returns the slice), :func:`layouts_to_match` and :func:`dense_outputs` make it dense as
the model's is.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from repalgebra.ir import Graph, Node, Value
from repalgebra.ops import op_def

__all__ = ["dense_outputs", "drop_unread_layouts", "layouts_to_match"]

# Ops whose output is laid out as their input is (torch's elementwise kernels keep a dense input's strides): a
# ``gelu`` of ``x.permute(0, 2, 3, 1).contiguous()`` is dense, of the permuted view permuted (review R11).
_ELEMENTWISE = frozenset({"relu", "gelu", "sigmoid", "silu", "hardswish", "hardsigmoid", "tanh", "leaky_relu", "clamp", "softplus",
                          "threshold", "elu", "abs", "sqrt", "exp", "log", "rsqrt", "pow", "prelu", "log_sigmoid", "cast", "scale",
                          "add_const", "add", "sub", "mul", "div", "broadcast_add", "broadcast_sub", "batch_norm"})


# Ops whose output takes their input's memory format, at any sizes (a conv of a channels-last input is channels-last):
# a ``.contiguous()`` before the convs of mmpretrain's ``LayerNorm2d`` makes the output dense for a channels-last
# input, where the convs without it gave a channels-last output, and a caller's ``out.view(B, -1)`` raised (R13c).
_KEEPS_LAYOUT = frozenset({"conv2d", "conv3d", "conv_transpose2d", "conv_transpose3d", "avg_pool2d", "avg_pool_nd", "max_pool2d",
                           "adaptive_avg_pool2d", "adaptive_max_pool2d", "interpolate", "group_norm", "pad", "pad_nd", "concat",
                           "glu"})


def drop_unread_layouts(graph: Graph) -> Graph:
    """``graph`` without its ``contiguous`` nodes, and with one before each output or carried call's input that
    reads the layout one of them made (a new graph)."""
    layouts = [n for n in graph.nodes if n.op == "contiguous"]
    if not layouts:
        return graph  # (as it is: the dead nodes too, which the passes after this one remove as they go)
    reads: dict[tuple[int, int], tuple[Node | None, int, Any, str]] = {}  # (reader, input) -> where, and the format
    for n in layouts:
        for reader, k in _reads(graph, n.out, n.attrs["memory_format"]):
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


def _reads(graph: Graph, value: Value, layout: Any) -> Iterator[tuple[Node | None, int]]:
    """Where ``value``'s layout is read: ``(None, k)`` for output ``k``, ``(node, k)`` for input ``k`` of an ``opaque``
    node, reached through layout ops (``y.contiguous().view(...)`` keeps the dense strides a reshape views),
    elementwise ops of its shape (which keep them too) and the ops that lay their output out as their input
    (:data:`_KEEPS_LAYOUT`)."""
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
            elif u.op == "identity" or op_def(u.op).kind == "layout" and layout == torch.contiguous_format:
                stack.append(u.out)  # (a later contiguous's format, read there, wins; a channels-last layout permuted or
                # reshaped is none: the model's y.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1) is dense)
            elif u.op in _ELEMENTWISE and u.out.shape == v.shape or (
                    u.op in _KEEPS_LAYOUT and u.out.shape is not None and v.shape is not None and len(u.out.shape) == len(v.shape)):
                stack.append(u.out)


# The dense layouts an output can have, by its rank (``torch.contiguous_format`` at any)
_FORMATS = ((torch.contiguous_format, None), (torch.channels_last, 4), (torch.channels_last_3d, 5))


def layouts_to_match(model_out: Any, fused_out: Any, outputs: int) -> dict[int, torch.memory_format]:
    """Per output of a graph of ``outputs`` outputs, the memory format in which the model's output (``model_out``, at
    the example) is dense where the fused module's (``fused_out``) is not.

    Folds change where the tensors that reach an output are made, and with it their layout, though never their
    values: a BN of a channel slice folded into the conv before it returns the slice itself, a view of the wider
    conv's output; a ``.contiguous()`` dropped between folded layers (mmpretrain's ``LayerNorm2d``) leaves the convs
    after it on a permuted view's strides, so the output comes back channels-last.  A caller's ``out.view(B, -1)``
    then raised where the model's ran (review R13c).  Compared at the example: empty where the structures differ."""
    import torch.utils._pytree as pytree

    ours, theirs = pytree.tree_leaves(fused_out), pytree.tree_leaves(model_out)
    if len(ours) != len(theirs) or len(ours) != outputs:
        return {}
    found = {}
    for k, (got, want) in enumerate(zip(ours, theirs)):
        if not (torch.is_tensor(got) and torch.is_tensor(want)) or got.shape != want.shape or got.layout != torch.strided:
            continue
        for layout, rank in _FORMATS:
            if (rank is None or want.dim() == rank) and want.is_contiguous(memory_format=layout):
                if not got.is_contiguous(memory_format=layout):  # (a view with gaps, a slice: dense as a fresh op's
                    # output would be, in the layout its input suggests, at any input (review R15a); laid out otherwise,
                    # a permuted view: the model's layout)
                    found[k] = layout if _without_gaps(got) else torch.preserve_format
                break
    return found


def _without_gaps(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill the storage they span (a permuted dense tensor does; a slice of one does not)."""
    return t.numel() == 0 or 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) == t.numel()


def dense_outputs(graph: Graph, layouts: dict[int, torch.memory_format]) -> Graph:
    """``graph`` with a ``contiguous`` op in ``layouts[k]`` before each output ``k`` named (a new graph)."""
    outputs, nodes = list(graph.outputs), list(graph.nodes)
    for k, layout in layouts.items():
        source = outputs[k].producer.source if outputs[k].producer is not None else ""
        nodes.append(Node.make("contiguous", [outputs[k]], {"memory_format": layout}, source=source))
        outputs[k] = nodes[-1].out
    return Graph(graph.inputs, nodes, outputs)
