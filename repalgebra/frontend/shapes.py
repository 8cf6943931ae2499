"""Where sizes are read from: moving a ``reshape_dyn``'s shape reads to earlier values.

:func:`size_source` says, per op, which earlier value (or weight) fixes a
size of its output at every input size; :func:`reroute_shape_reads` uses it to
make each ``reshape_dyn`` read its sizes as early as it can, so a value read
for its shape only no longer blocks a fold (LeViT's Linear + BN).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from repalgebra.ir import Graph, Node, Value
from repalgebra.ops import TRANSPOSED_CONVS

# Ops whose output has their first input's shape: per-channel maps, and activations of one input
_SAME_SHAPE = ("batch_norm", "scale", "identity", "relu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
               "leaky_relu", "softplus", "threshold", "elu", "log_sigmoid", "prelu", "clamp", "abs", "sqrt", "exp", "log", "rsqrt", "cast", "layer_norm", "rms_norm")
_FOLDS_A_BN = ("conv2d", "conv3d", *TRANSPOSED_CONVS, "linear")  # a BN or scale after these folds into them


def size_source(v: Value, axis: int) -> tuple[Value, int] | int | None:
    """An earlier place ``v.shape[axis]`` can be read from: ``(value, axis)``, a constant, or None.

    ``v = p(u)`` fixes that size from ``u`` or from ``p``'s weights, for every input:

    * ``batch_norm``, ``scale``, ``identity``, an activation of one input (``gelu``, ``relu``, ...), ``add``/``sub``
      of equal shapes, ``add_const`` along an axis where its constant has size 1 (YOLOv7's ``ImplicitA``, ``x +
      self.implicit`` of shape ``(1, C, 1, 1)``): ``v.shape[a] = u.shape[a]``;
    * ``linear(u; W)``: ``v.shape[a] = u.shape[a]`` before the last axis, ``v.shape[-1] = W.shape[0]``;
    * ``reshape_dyn``: an axis whose entry is one size read (``refs[r].shape[a]``) or a number;
    * ``conv2d(u; W)``, ``conv3d(u; W)``: ``v.shape[0] = u.shape[0]``, ``v.shape[1] = W.shape[0]``, and a
      spatial axis with stride 1 and total padding ``dilation * (k - 1)`` keeps its size;
    * a transposed conv: ``v.shape[0] = u.shape[0]``, ``v.shape[1] = W.shape[1] * groups``;
    * ``permute``, ``transpose``: the axis it came from; ``flatten``: an axis before or after the flattened ones;
    * a carried call of ``nn.Embedding`` on token ids ``u``: ``v.shape[a] = u.shape[a]`` before the last axis,
      ``v.shape[-1]`` its ``embedding_dim`` (LLaMA's rotary cache tests ``seq_len``, read from the embedded tokens).
    """
    n = v.producer
    if n is None or v.shape is None:
        return None
    axis %= len(v.shape)
    if n.op in _SAME_SHAPE or (n.op in ("add", "sub") and all(i.shape == v.shape for i in n.inputs)
                                and _root(n.inputs[0], axis) == _root(n.inputs[1], axis)) or _kept_by_const(n, axis):
        return n.inputs[0], axis
    if n.op == "linear":
        return n.params["weight"].shape[0] if axis == len(v.shape) - 1 else (n.x, axis)
    if n.op == "reshape_dyn":  # an axis of one size read, or of a number (not -1, which follows the others)
        entry = n.attrs["shape"][axis]
        if isinstance(entry, int):
            return entry if entry >= 0 else None
        if len(entry) == 1 and isinstance(entry[0], int):
            return entry[0]
        if len(entry) == 1 and len(entry[0]) == 2:
            return n.inputs[1 + entry[0][0]], entry[0][1]
        return None
    if n.op in ("permute", "transpose"):  # the axis it came from
        dims = list(n.attrs["dims"]) if n.op == "permute" else _swapped(len(v.shape), n.attrs["dim0"], n.attrs["dim1"])
        return n.x, dims[axis] % len(v.shape)
    if n.op == "flatten" and n.x.shape is not None:  # an axis outside the flattened ones
        start, end = n.attrs["start"] % len(n.x.shape), n.attrs["end"] % len(n.x.shape)
        if axis < start:
            return n.x, axis
        if axis > start:
            return n.x, axis + end - start
    if n.op == "opaque" and (dim := _embedding_dim(n)) is not None:
        return dim if axis == len(v.shape) - 1 else (n.inputs[0], axis)
    if n.op in ("conv2d", "conv3d", *TRANSPOSED_CONVS) and axis == 0:
        return n.x, 0
    if n.op in TRANSPOSED_CONVS and axis == 1:
        return n.params["weight"].shape[1] * n.attrs["groups"]
    if n.op in ("conv2d", "conv3d"):
        if axis == 1:
            return n.params["weight"].shape[0]
        k, s, d, pads = _conv_axis(n, axis)
        if s == 1 and pads == d * (k - 1):
            return n.x, axis
    return None


def window_axis(n: Node, axis: int) -> tuple[int, int, int, int, int, bool] | None:
    """A conv's or a 2-D pool's window along spatial ``axis`` of its output, ``(kernel, stride, dilation, padding
    before, padding after, ceil_mode)``, from which :func:`window_size` computes that size from its input's; None for
    other ops and axes."""
    if n.op in ("conv2d", "conv3d") and axis >= 2:
        i, pads = axis - 2, n.attrs["padding"]
        before, after = (pads[2 * i], pads[2 * i + 1]) if n.op == "conv2d" else (pads[i], pads[i])
        return n.params["weight"].shape[axis], n.attrs["stride"][i], n.attrs["dilation"][i], before, after, False
    if n.op in ("max_pool2d", "avg_pool2d") and n.out.shape is not None and len(n.out.shape) == 4 and axis >= 2:
        i = axis - 2
        pad, dilation = n.attrs["padding"][i], n.attrs["dilation"][i] if n.op == "max_pool2d" else 1
        return n.attrs["kernel"][i], n.attrs["stride"][i], dilation, pad, pad, bool(n.attrs["ceil_mode"])
    return None


def window_size(size: int, kernel: int, stride: int, dilation: int, before: int, after: int, ceil_mode: bool) -> int:
    """The size of a conv's or pool's output along an axis where its input has ``size``, as torch computes it (a
    pool's ``ceil_mode`` window must start inside the input or its left padding)."""
    span = size + before + after - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + before:
        out -= 1
    return out


def _embedding_dim(n: Node) -> int | None:
    """The ``embedding_dim`` of an opaque node that calls an ``nn.Embedding`` (torch's class itself, with no
    forward or hooks of its own) on its one input, else None."""
    m = n.attrs.get("fn")
    if type(m) is not nn.Embedding or "forward" in vars(m) or m._forward_hooks or m._forward_pre_hooks or len(n.inputs) != 1:
        return None
    return m.embedding_dim


def _swapped(rank: int, dim0: int, dim1: int) -> list[int]:
    """The axes of a transpose's input, by the axis of its output they become."""
    dims = list(range(rank))
    dims[dim0 % rank], dims[dim1 % rank] = dims[dim1 % rank], dims[dim0 % rank]
    return dims


def _conv_axis(n: Node, axis: int) -> tuple[int, int, int, int]:
    """A conv's kernel size, stride, dilation and total padding along spatial ``axis`` (``conv2d`` pads
    ``(top, bottom, left, right)``, ``conv3d`` each of ``(d, h, w)`` on both sides)."""
    i, pads = axis - 2, n.attrs["padding"]
    total = pads[2 * i] + pads[2 * i + 1] if n.op == "conv2d" else 2 * pads[i]
    return n.params["weight"].shape[axis], n.attrs["stride"][i], n.attrs["dilation"][i], total



def size_base(v: Value, axis: int) -> tuple[Value | None, int, int]:
    """``(u, a, c)`` with ``v.shape[axis] == u.shape[a] + c`` at every input size (``u`` None: the size is ``c``).

    Followed back through ops of one input that keep the size, convs of stride 1 along the axis (each
    adds its total padding less ``dilation * (k - 1)``: a causal conv padded on both sides is ``pad`` longer than
    its input), a ``reshape_dyn`` entry that is one size of one reference or a number, and the ``flatten(2, 3)`` of
    a 1-D conv's height-one lift (one of the two axes is 1 at every size); it stops where none applies.
    """
    offset, axis = 0, axis % len(v.shape) if v.shape else axis
    while (n := v.producer) is not None and v.shape is not None:
        axis %= len(v.shape)
        if n.op in _SAME_SHAPE:  # (not a sum: equal shapes at the example may broadcast at other sizes)
            v = n.inputs[0]
        elif n.op in ("conv2d", "conv3d") and axis >= 2 and n.attrs["stride"][axis - 2] == 1:
            k, _, d, pads = _conv_axis(n, axis)
            offset += pads - d * (k - 1)
            v = n.x
        elif n.op == "reshape_dyn":
            entry = n.attrs["shape"][axis]
            if isinstance(entry, int):
                return None, 0, offset + entry
            if len(entry) != 1 or len(entry[0]) != 2:  # (a product, or a size divided: ``H // ws``)
                break
            axis, v = entry[0][1], n.inputs[1 + entry[0][0]]
        elif n.op == "flatten" and (n.attrs["start"], n.attrs["end"]) == (2, 3) and len(n.x.shape) == 4 and axis == 2:
            if size_base(n.x, 2)[::2] == (None, 1):
                axis = 3
            elif size_base(n.x, 3)[::2] != (None, 1):
                break
            v = n.x
        elif n.op == "flatten" and axis < n.attrs["start"]:
            v = n.x
        else:
            break
    return v, axis, offset


def _root(v: Value, axis: int) -> tuple[int, int] | int:
    """Where ``v.shape[axis]`` comes from, following :func:`size_source` up to a value it cannot follow or a sum
    (``(id, axis)``), or a constant.  The two terms of a sum of equal shapes have one size at every input only where
    they have one root (a residual ``x + f(x)``); where not, either may be 1 at another input and broadcast, and the
    sum's size is the other's (``y + bn(conv(x))`` read as ``y``'s batch returned another shape with other values
    for a ``y`` of batch 1; a review).  It stops at a sum, which its own reads follow in turn: a stack of residual
    sums is walked once, not once per path."""
    while True:
        axis = axis % len(v.shape) if v.shape else axis
        n = v.producer
        if n is not None and n.op in ("add", "sub"):
            return id(v), axis
        source = size_source(v, axis)
        if source is None:
            return id(v), axis
        if isinstance(source, int):
            return source
        v, axis = source


def reroute_shape_reads(graph: Graph) -> None:
    """Make each ``reshape_dyn`` read its sizes as early as :func:`size_source` allows (in place).

    ``bn(linear(x).flatten(0, 1)).reshape_as(linear(x))`` (LeViT) reads the
    linear's output twice: for its values and for its shape.  Reading the
    shape from ``x`` and ``W.shape[0]`` instead is exact at every input size
    and leaves the linear a single reader, so the Linear + BN fold applies.
    A read moves only off a value that at most one node reads for its values
    (moving reads off values that stay alive anyway would only keep an earlier
    tensor alive for longer).  Values left unread are removed, so a later node
    of the pass's list may be gone by the time the pass reaches it (a stage
    whose tokens-to-image reshape nobody reads, as in PiT): it is skipped.
    """
    _onto_same_shape(graph)
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.op != "reshape_dyn" or not graph.contains(node):
                continue
            new = _rerouted(graph, node)
            if new is not None:
                graph.insert_before(node, [new])
                graph.replace_uses(node.out, new.out)
                graph.eliminate_dead()
                changed = True


def _onto_same_shape(graph: Graph) -> None:
    """Move a shape read off a conv's or linear's output onto the one op that reads its values, where that op keeps
    the shape (in place).

    ``x = self.proj(x); _, _, H, W = x.shape; x = self.norm(x)`` (VAN's and PVT's patch embeddings) reads the
    strided conv's output for its size, which no earlier value gives (:func:`size_source`): the BN's output has
    that size at every input, and read there the conv keeps a single reader, so ``bn_fold`` applies and the read
    moves with the fold.  Sizes read for ``reshape_dyn``, ``expand_dyn``, ``expand_as`` and an ``interpolate`` to
    another's size.
    """
    for node in list(graph.nodes):
        if not graph.contains(node):  # a node nobody read, removed with the dead after an earlier move
            continue
        moved = tuple(_same_shape_reader(graph, v) if k and _reads_shape_only(node, v) else v
                      for k, v in enumerate(node.inputs))
        if any(m is not v for m, v in zip(moved, node.inputs)):
            new = node.replace(inputs=moved)
            graph.insert_before(node, [new])  # re-sorted where the BN comes after the read
            graph.replace_uses(node.out, new.out)
            graph.eliminate_dead()


def _kept_by_const(n: Node, axis: int) -> bool:
    """Whether ``n`` is an ``add_const`` whose output has its input's size along ``axis`` at every size: its constant
    has no more axes than the input and size 1 along that one (a larger constant would broadcast an input of size 1
    to its own)."""
    if n.op != "add_const" or n.x.shape is None:
        return False
    const, rank = n.params["const"], len(n.x.shape)
    if const.dim() > rank:
        return False
    at = axis - (rank - const.dim())  # (the constant's axes align with the input's last ones)
    return at < 0 or const.shape[at] == 1


def _same_shape_reader(graph: Graph, v: Value) -> Value:
    """The output of the op of :data:`_SAME_SHAPE` that alone reads the values of ``v``, a conv's or linear's output
    (else ``v``)."""
    if v.producer is None or v.producer.op not in _FOLDS_A_BN or any(o is v for o in graph.outputs):
        return v
    readers = [u for u in graph.users(v) if not _reads_shape_only(u, v)]
    if len(readers) == 1 and readers[0].op in _SAME_SHAPE and readers[0].inputs == (v,):
        return readers[0].out
    return v


def _reads_shape_only(node: Node, v: Value) -> bool:
    """Whether ``node`` reads ``v`` for its shape only (a reference of a reshape or expand to run-time sizes, the
    ``like`` of ``expand_as`` or of an ``interpolate`` to another's size)."""
    return node.op in ("reshape_dyn", "expand_dyn", "expand", "interpolate") and v is not node.x and any(i is v for i in node.inputs[1:])


def _rerouted(graph: Graph, node: Node) -> Node | None:
    """``node`` (a ``reshape_dyn``) reading its sizes from earlier sources, or None if none moves."""
    old_refs = node.inputs[1:]
    movable = {id(r) for r in old_refs if _data_reads(graph, r) <= 1 or _linears_only(graph, r)}
    refs: list[Value] = []

    def ref(v: Value) -> int:
        for k, r in enumerate(refs):
            if r is v:
                return k
        refs.append(v)
        return len(refs) - 1

    changed = False
    shape: list[Any] = []
    for entry in node.attrs["shape"]:
        if isinstance(entry, int):
            shape.append(entry)
            continue
        factors = []
        for f in entry:
            if isinstance(f, tuple):
                v, axis, *divisor = old_refs[f[0]], *f[1:]  # (a size read divided by ``divisor``: ``H // ws``)
                src = _earlier(graph, v, axis) if id(v) in movable else None
                changed = changed or src is not None
                if src is None:
                    f = (ref(v), axis, *divisor)
                else:
                    f = src // (divisor[0] if divisor else 1) if isinstance(src, int) else (ref(src[0]), src[1], *divisor)
            factors.append(f)
        const = all(isinstance(f, int) for f in factors)
        shape.append(math.prod(factors) if const else tuple(factors))
    if not changed:
        return None
    if not refs:  # every size is a weight's: a plain reshape
        return Node.make("reshape", [node.x], {"shape": tuple(shape)}, {}, node.source, name=node.out.name)
    return Node.make("reshape_dyn", [node.x, *refs], {"shape": tuple(shape)}, {}, node.source, name=node.out.name)


def _earlier(graph: Graph, v: Value, axis: int) -> tuple[Value, int] | int | None:
    """:func:`size_source`, except onto a conv/linear output that only ``v``'s BN/scale/identity reads and that is the end,
    or off a sum onto a conv, BN or partial sum that only the sum reads.

    That BN folds into the conv (``bn_fold``); a shape read left on the conv's
    output would keep the unfolded conv alive and stop the fold (PiT's pooling:
    a strided conv and a BN).  Left on ``v`` it moves with the fold.  Likewise
    the branches of a sum fold into one conv (``branch_sum``): a read moved onto
    the first branch would keep that branch's conv computed beside the folded
    one (a RepVGG block whose output's ``x.shape`` is read, as PVT's patch
    embedding does).  Left on the sum, it moves with the fold.
    """
    src = size_source(v, axis)
    if isinstance(src, tuple) and v.producer.op in ("add", "sub"):
        p = src[0].producer
        if p is not None and p.op in ("conv2d", "batch_norm", "add", "sub") and _data_reads(graph, src[0]) == 1:
            return None
    if isinstance(src, tuple) and v.producer.op in _SAME_SHAPE:
        u, a = src
        p = u.producer
        if p is not None and p.op in _FOLDS_A_BN and _data_reads(graph, u) == 1 and size_source(u, a) is None:
            return None
    return src


def _linears_only(graph: Graph, v: Value) -> bool:
    """Whether the nodes reading ``v`` for its values are all Linears (LLaMA's RMSNorm output read by ``q_proj``,
    ``k_proj`` and ``v_proj``, and for its shape by ``view(bsz, q_len, ...)``): a norm's weight or a BN before them
    folds into each once no shape read keeps it (``bn_into_linear``)."""
    readers = [u for u in graph.users(v) if not _reads_shape_only(u, v)]
    return bool(readers) and all(o is not v for o in graph.outputs) and all(u.op == "linear" and u.x is v for u in readers)


def _data_reads(graph: Graph, v: Value) -> int:
    """How many nodes (and graph outputs) read ``v`` for its values, not only for its shape."""
    return graph.num_uses(v) - sum(_reads_shape_only(u, v) for u in graph.users(v))
