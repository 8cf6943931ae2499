"""Where a channel axis goes through layout ops (flatten, reshape, permute, transpose, select).

Per-channel maps (BN, layer scale) commute with ops that only move elements, as
long as every element keeps its channel.  :func:`follow_axis` says on which
axis of a layout op's output the channels of input axis ``axis`` end up,
or ``None`` when the op mixes that axis with others.
"""

from __future__ import annotations

from math import prod

from repalgebra.ir import Graph, Node, Value

LAYOUT_OPS = ("flatten", "reshape", "permute", "transpose", "reshape_dyn", "select")
# The layout ops whose axes :func:`follow_axis` matches by size, at the sizes the graph was built at: a fold through
# one can hold at those sizes only (an axis of size 1, two equal sizes), so fuse and export_onnx check it at others.
SIZE_MATCHED = ("flatten", "reshape", "reshape_dyn")


def follow_axis(node: Node, axis: int) -> int | None:
    """The output axis of layout ``node`` (or of a ``mean``, which keeps the axes it does not reduce) that holds
    input axis ``axis`` whole, if any."""
    shape_in, shape_out = node.x.shape, node.out.shape
    axis %= len(shape_in)
    a = node.attrs
    if node.op == "mean":  # a reduced axis is gone; the others close up unless the mean keeps its dims
        dims = {d % len(shape_in) for d in a["dims"]}
        return None if axis in dims else axis if a["keepdim"] else axis - sum(d < axis for d in dims)
    if node.op == "transpose":
        d0, d1 = a["dim0"] % len(shape_in), a["dim1"] % len(shape_in)
        return d1 if axis == d0 else d0 if axis == d1 else axis
    if node.op == "permute":
        return [d % len(shape_in) for d in a["dims"]].index(axis)
    if node.op == "select":  # one index of another axis (an RNN head's ``y[:, :, -1]``): the others close up
        picked = a["axis"] % len(shape_in)
        return None if axis == picked else axis - (axis > picked)
    if node.op == "flatten":
        start, end = a["start"] % len(shape_in), a["end"] % len(shape_in)
        if axis < start:
            return axis
        if axis > end:
            return axis - (end - start)
        others = [shape_in[k] for k in range(start, end + 1) if k != axis]
        return start if all(s == 1 for s in others) else None
    # reshape: the axis survives if the elements before it and the axis itself line up
    # (unambiguous unless the axis has size 1, where any matching axis holds it).
    before = prod(shape_in[:axis])
    for k in range(len(shape_out)):
        if prod(shape_out[:k]) == before and shape_out[k] == shape_in[axis]:
            return k
    return None


def layout_chain(graph: Graph, value: Value, stop_ops: tuple[str, ...]) -> tuple[Node | None, list[Node]]:
    """Walk up from ``value`` through layout ops to a producer whose op is in ``stop_ops``.

    Every value on the way (``value`` included) must be read exactly once, so
    the chain can be rebuilt without leaving a copy behind.  Returns that
    producer and the layout nodes in between in data-flow order, or
    ``(None, [])``.
    """
    chain: list[Node] = []
    v = value
    while graph.num_uses(v) == 1 and v.producer is not None:
        n = v.producer
        if n.op in stop_ops:
            return n, chain[::-1]
        if n.op not in LAYOUT_OPS:
            break
        chain.append(n)
        v = n.x
    return None, []


def follow_chain(chain: list[Node], axis: int) -> int | None:
    """The axis holding input axis ``axis`` after all of ``chain``, as a non-negative index."""
    for n in chain:
        axis = follow_axis(n, axis)
        if axis is None:
            return None
    return axis


def replay(chain: list[Node], start: Value) -> list[Node]:
    """New copies of the layout ``chain`` applied to ``start`` (of the shape of the chain's input; same attrs).

    A shape-only input that is a value of the chain (``x.view(x.size(0), -1)`` reads the sizes of the value it
    reshapes) is read from its copy: read from the old value, it would keep the old chain, and what it was
    folded out of, in the graph.  The other shape-only inputs stay."""
    out, v = [], start
    copies = {id(chain[0].x): start} if chain else {}
    for n in chain:
        new = n.replace(inputs=(v, *(copies.get(id(r), r) for r in n.inputs[1:])))
        out.append(new)
        v = copies[id(n.out)] = new.out
    return out
