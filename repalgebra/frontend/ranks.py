"""How many axes a traced value has: ``x.ndim``, ``x.dim()``, ``len(x.shape)`` answered while ``torch.fx`` traces.

Public code tests ranks all the time: guided diffusion's ``while len(emb_out.shape) < len(h.shape):``, an
``if x.ndim == 3:`` that batches one image, ``if x.dim() == 4:`` before a permute.  fx has no number to give
and stops, and the model fell back to a capture at fixed sizes.  But a fused graph holds only at its
example's ranks anyway (an axis counted from the end is a fixed axis in it), and ``fuse`` guards them: the
fused model refuses inputs with another number of axes.  So the rank of a value the trace computes from
the inputs is the example's, whatever the sizes, as long as every op on the way has an output rank fixed by
its inputs' ranks.  Squeezes are the exception, and the captured graph checks the rank each gives
(:func:`~repalgebra.frontend.calls.squeeze_to_rank`).

Ranks are found on meta tensors (no arithmetic, no state touched): the example inputs' shapes, the
module's constants, each call made on meta values.  A module the trace keeps whole is run on meta
tensors too, with meta parameters, where it is one of the layers the front end knows; any other
(the user's leaves, compiled code) leaves the rank unknown, and the trace stops as before.
"""

from __future__ import annotations

import copy
import operator
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from repalgebra.frontend.calls import invoke, meta_of, runs_on_meta

__all__ = ["Ranks", "shape_length"]


class Ranks:
    """The ranks of an fx trace's values at its example inputs (None where not known), and where they were read."""

    def __init__(self, inputs: tuple | None, attr: Callable[[str], Any], known: Callable[[nn.Module], bool]) -> None:
        self.inputs = inputs  # the example inputs, one per placeholder in order; None: no ranks known
        self.attr = attr  # the root's attribute (a tensor, a submodule) at a dotted path, past fx's patched lookup
        self.known = known  # whether a module kept whole is one of torch's layers, run on meta tensors
        self.values: dict[fx.Node, Any] = {}
        self.reads: dict[fx.Node, Any] = {}  # Python values at the example inputs (see answer)
        self.read: list[str] = []  # where a rank was read, for the report

    def rank(self, node: fx.Node, where: str) -> int | None:
        """The number of axes of ``node``'s value at the example inputs, else None; recorded as read at ``where``."""
        value = self.value(node)
        if not isinstance(value, torch.Tensor) or any(u.op == "call_method" and u.target in _RANK_IN_PLACE for u in node.users):
            return None  # (``z.unsqueeze_(0)`` before the read: the node's value is z's before it)
        self.read.append(where)
        return value.dim()

    def value(self, node: fx.Node) -> Any:
        """``node``'s value at the example inputs as a meta tensor (or what it is: a size, a dtype), else None."""
        if node not in self.values:
            self.values[node] = None  # a cycle cannot happen in a graph; this keeps a failure cached
            try:
                with torch.no_grad():
                    self.values[node] = self._evaluate(node)
            except Exception:  # noqa: BLE001  (a call meta tensors cannot make: the rank stays unknown)
                pass
        return self.values[node]

    def all_known(self, node: fx.Node) -> bool:
        """Whether ``node``'s value and every value it is computed from are known (not None): a call on an unknown
        value may still answer (``None == 3`` is False), and that answer is no answer at the example."""
        seen: set[fx.Node] = set()
        todo = [node]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if self.value(n) is None:
                return False
            todo.extend(n.all_input_nodes)
        return True

    def answer(self, node: fx.Node) -> Any:
        """``node``'s Python value (a test, a number) at the example inputs where every tensor it is computed from is
        read for what the example shares with every input the fused model checks it against: a size or a dtype
        (:data:`SIZE_READS`, read on the meta values), or the device of an input (:data:`DEVICE_READS`, read on the
        example itself); else None.

        Meta tensors answer everything else otherwise than the example: their device is ``meta`` and their
        ``data_ptr()`` 0, and a non-dense input's meta copy is contiguous.  Taken as a test of sizes, such an answer
        put the meta tensor's branch in the graph (an ONNX file left out the clamp a CPU model runs under ``if
        x.device.type == "cpu":``; found by a review): a read of strides, storage or pointers stays a read of values,
        which the trace does not take (the capture falls back)."""
        if node not in self.reads:
            self.reads[node] = None  # (cached as unknown while computed: a graph has no cycle)
            try:
                self.reads[node] = self._answer(node)
            except Exception:  # noqa: BLE001  (a read or a call that fails at the example: no answer)
                pass
        return self.reads[node]

    def _answer(self, node: fx.Node) -> Any:
        if answered_on_meta(node, self.value):
            return self.value(node) if self.all_known(node) else None
        if (read := input_read(node, self.inputs)) is not None:
            return read
        if node.op not in ("call_function", "call_method") or not runs_on_meta(node.op, node.target):
            return None  # an input or a constant itself (its values), a module's or the model's own call
        unknown = []
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self.answer(n) if self.answer(n) is not None else unknown.append(n))
        if unknown or any(torch.is_tensor(v) for v in pytree.tree_leaves((args, kwargs))):
            return None  # (a tensor here is read for its values, strides or storage: ``x.data_ptr()``, ``x.stride(1)``)
        value = invoke(node.op, node.target, args, kwargs)
        return None if any(torch.is_tensor(v) for v in pytree.tree_leaves(value)) else value

    def reads_device(self, node: fx.Node) -> bool:
        """Whether :meth:`answer` of ``node`` read an input's device."""
        return self.reads_any(node, DEVICE_READS)

    def reads_dtype(self, node: fx.Node) -> bool:
        """Whether :meth:`answer` of ``node`` read a dtype (:data:`DTYPE_READS`: ``if not x.is_floating_point():``)."""
        seen: set[fx.Node] = set()
        todo = [node]
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                if _read_of(n) in DTYPE_READS:
                    return True
                todo.extend(n.all_input_nodes)
        return False

    def reads_any(self, node: fx.Node, reads: frozenset[str]) -> bool:
        """Whether :meth:`answer` of ``node`` read one of ``reads`` (:data:`DEVICE_READS`, :data:`MADE_READS`)."""
        seen: set[fx.Node] = set()
        todo = [node]
        while todo:
            n = todo.pop()
            if n not in seen and not answered_on_meta(n, self.value):  # (not past a size read: its tensor's devices)
                seen.add(n)
                if _read_of(n) in reads:
                    return True
                todo.extend(n.all_input_nodes)
        return False

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            index = [n for n in node.graph.nodes if n.op == "placeholder"].index(node)
            if self.inputs is None or index >= len(self.inputs) or not torch.is_tensor(self.inputs[index]):
                return None
            return meta_of(self.inputs[index])
        if node.op == "get_attr":
            return meta_of(self.attr(str(node.target)))
        if node.op != "call_module" and not runs_on_meta(node.op, node.target):
            return None  # the model's own function: not run on meta tensors (see runs_on_meta)
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), self.value)
        if node.op == "call_module":
            m = self.attr(str(node.target))
            return _on_meta(m, args, kwargs) if self.known(m) else None
        # a factory (torch.arange(n)) makes a real tensor: as meta, so that the calls reading it run on meta tensors
        return pytree.tree_map(meta_of, invoke(node.op, node.target, args, kwargs))


# Reads of a tensor that its meta value answers as the example does, and every input the fused model takes (the
# fused graph holds at the example's ranks and dtypes; its sizes are checked per call): attributes and methods.
SIZE_READS = frozenset({"shape", "size", "numel", "nelement", "dim", "ndimension", "ndim", "len",
                        "dtype", "is_floating_point", "is_complex", "element_size"})

# The reads among them of a dtype, which a refusal names as such (a uint8 image refused for "a test of sizes")
DTYPE_READS = frozenset({"dtype", "is_floating_point", "is_complex", "element_size"})

# Reads of an input's device: meta tensors are on ``meta``, so these are read on the example input.
DEVICE_READS = frozenset({"device", "get_device"})

# Reads of how an input was made, which a meta copy answers otherwise (a leaf at offset 0, without gradients): read
# on the example input too, and checked per call as a device read is (an input that requires gradients, a slice
# ``t[1:]`` of a batch, took the other branch of ``if x.requires_grad:`` / ``if x.storage_offset() == 0:`` in the
# model, and the fused graph computed the example's; found by a review).
MADE_READS = frozenset({"requires_grad", "is_leaf", "storage_offset"})


def answered_on_meta(node: fx.Node, value: Callable[[fx.Node], Any]) -> bool:
    """Whether ``node`` reads a size or a dtype of a tensor (:data:`SIZE_READS`; ``value`` gives each node's meta
    value), which its meta value answers as the example does."""
    return _read_of(node) in SIZE_READS and isinstance(value(node.args[0]), torch.Tensor)


def input_read(node: fx.Node, inputs: tuple | None) -> Any:
    """``x.device`` or ``x.get_device()`` (:data:`DEVICE_READS`), ``x.requires_grad``, ``x.is_leaf`` or
    ``x.storage_offset()`` (:data:`MADE_READS`) of an input ``x`` as its example answers it, else None: the device
    or gradients of a value computed inside are not followed (``.to()`` moves it, grad mode decides them)."""
    x = node.args[0] if _read_of(node) in DEVICE_READS | MADE_READS else None
    if not (isinstance(x, fx.Node) and x.op == "placeholder" and inputs is not None):
        return None
    index = [n for n in x.graph.nodes if n.op == "placeholder"].index(x)
    if index >= len(inputs) or not torch.is_tensor(inputs[index]):
        return None
    read = getattr(inputs[index], node.target if node.op == "call_method" else node.args[1])
    return read() if callable(read) else read


def _read_of(node: fx.Node) -> str | None:
    """The name of what ``node`` reads of the tensor it is given (``x.shape``: "shape", ``x.size(1)``: "size",
    ``len(x)``: "len"), else None."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 and isinstance(node.args[1], str):
        return node.args[1]
    if node.op == "call_function" and node.target is len and len(node.args) == 1:
        return "len"
    if node.op == "call_method" and node.args:
        return str(node.target)
    return None


# In-place methods that change the number of axes of the tensor they are called on.
_RANK_IN_PLACE = frozenset({"unsqueeze_", "squeeze_", "resize_", "resize_as_", "as_strided_", "set_"})


def _on_meta(m: nn.Module, args: tuple, kwargs: dict) -> Any:
    """``m.forward(*args, **kwargs)`` of a shallow copy of ``m`` holding meta tensors of its parameters' and buffers'
    shapes (fx's patched attribute lookup hands out Proxies for the traced model's own parameters, not for these)."""
    c = copy.copy(m)
    c._parameters = {k: None if p is None else nn.Parameter(meta_of(p), p.requires_grad) for k, p in m._parameters.items()}
    c._buffers = {k: None if b is None else meta_of(b) for k, b in m._buffers.items()}
    return type(m).forward(c, *args, **kwargs)


def shape_length(node: fx.Node, rank: Callable[[fx.Node], int | None]) -> int | None:
    """``len`` of a shape read (``x.shape``, ``x.size()``, ``x.shape[2:]``) at the example's ranks, else None."""
    if _is_shape(node):
        return rank(node.args[0])
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2 and isinstance(node.args[1], slice):
        base, cut = node.args
        if isinstance(base, fx.Node) and _is_shape(base) and all(v is None or isinstance(v, int) for v in (cut.start, cut.stop, cut.step)):
            r = rank(base.args[0])
            return None if r is None else len(range(r)[cut])
    return None


def _is_shape(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",))
            or (node.op == "call_method" and node.target == "size" and len(node.args) == 1 and not node.kwargs))
