"""In-place ops in a ``torch.fx`` trace: make them out-of-place where that is exact, refuse where it is not.

The IR has value semantics: a value never changes after it is made.  Eager
PyTorch does not: ``y.relu_()``, ``nn.ReLU(inplace=True)(y)``, ``y += 1`` and
``y.add_(z)`` change ``y`` itself, and every later read of ``y`` (or of a view
of it) sees the new contents.  A symbolic trace records such a call as a node,
but later reads of ``y`` still point at the node that made ``y``: mapped
naively to the IR, they would read the value *before* the mutation, and the
fused model would compute something else.

:func:`functionalize` rewrites the fx graph so that it means the same under
value semantics:

* each in-place node ``I`` that mutates ``v`` becomes its out-of-place form
  (``relu_`` -> ``relu``, ``inplace=True`` -> ``False``, ``operator.iadd`` ->
  ``operator.add``), and every read of ``v`` *after* ``I`` reads ``I`` instead;
* this is exact only when nothing else shares ``v``'s storage: when ``v`` may
  alias another value that is read after the mutation (a view made by
  ``view``/``reshape``/``transpose``/indexing, the input of ``nn.Identity``, an
  unknown call that might return its input), when ``v`` is (a view of) a graph
  input, or a parameter or buffer, :class:`InplaceHazard` is raised with the
  module path, and the caller captures another way (``torch.export``, which
  functionalizes through aliases, or keeps the module whole).

"May alias" is conservative: only calls known to return fresh tensors (convs,
norms, arithmetic, activations, ...) cut an alias chain.

Symbolic tracing also loses ``y += 1``: a ``Proxy`` has no ``__iadd__``, so
Python falls back to ``y = y + 1`` and the mutation of the tensor ``y`` that
others may still hold is not recorded at all.  :class:`InplaceProxy` (used by
our tracer) records augmented assignments as ``operator.iadd`` and friends so
that :func:`functionalize` sees them (not ``b @= w``: a tensor has no
``__imatmul__``, and Python rebinds ``b`` to ``b @ w`` there too).
"""

from __future__ import annotations

import functools
import inspect
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from repalgebra.one_call import traced_as_one_call

__all__ = ["KEEPS_DTYPE", "MADE_CONSTANT", "MADE_IN_TRACE", "READ_AT_VERSION", "InplaceHazard", "InplaceProxy", "after_call", "functionalize", "hidden_writes", "is_inplace", "on_copy",
           "kept_clone", "kept_contiguous", "reads_after_calls", "setitem_copy", "versions", "constant_writes"]

# The meta key of a node made out of place whose result has the dtype its first argument had: ``y += c`` keeps
# ``y`` float32 for a float64 ``c`` where ``y + c`` promotes (a T-Net's identity made with numpy; found by a probe)
KEEPS_DTYPE = "repalgebra_keeps_dtype"
# How fx names a tensor it met in the code that the model holds neither as a parameter, a buffer nor a plain attribute
# (``k = torch.zeros(C, C, 3, 3)`` made in forward, a slice of a buffer): it reads it by reference, a new ``get_attr``
# node each time the code hands it on
MADE_CONSTANT = "_tensor_constant"
# The meta key of such a ``get_attr`` node: the tensor's version counter when the trace read it (see
# :func:`_check_constants_read`)
READ_AT_VERSION = "repalgebra_read_at_version"
# The meta key set (True) on such a node where the trace saw the tensor made: a result of a torch call while tracing,
# in storage of its own (not a module-level tensor of the model's code, which outlives the call)
MADE_IN_TRACE = "repalgebra_made_in_trace"


class InplaceHazard(Exception):
    """An in-place op whose effect value semantics cannot express; ``path`` is the module it is in."""

    def __init__(self, reason: str, path: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path


# ``a op= b`` -> the out-of-place operator.
_AUGMENTED = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    operator.ifloordiv: operator.floordiv,
    operator.imod: operator.mod,
    operator.ipow: operator.pow,
    operator.imatmul: operator.matmul,
    operator.iand: operator.and_,
    operator.ior: operator.or_,
    operator.ixor: operator.xor,
    operator.ilshift: operator.lshift,
    operator.irshift: operator.rshift,
}


class InplaceProxy(fx.Proxy):
    """An fx ``Proxy`` that records ``a += b`` (and the other augmented assignments) as in-place calls."""


def _augmented(fn: Any) -> Any:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", fn, (self, other), {})

    return method


# Only those a tensor writes in place: ``torch.Tensor`` has no ``__imatmul__``, so ``b @= w`` rebinds ``b`` to ``b @ w``
# and leaves the tensor ``b`` named before as it was (a Proxy without it falls back to ``__matmul__`` the same way).
for _fn in _AUGMENTED:
    if hasattr(torch.Tensor, f"__{_fn.__name__}__"):
        setattr(InplaceProxy, f"__{_fn.__name__}__", _augmented(_fn))


def _setitem(self: fx.Proxy, index: Any, value: Any) -> None:
    """``y[:, :c] = z`` (DBB's border fill, TSM's shift, an output written in slices): an in-place call of
    ``operator.setitem``, which ``fx.Proxy`` refuses; :func:`functionalize` makes it a copy with the slice set."""
    self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


InplaceProxy.__setitem__ = _setitem

# Tensor attributes whose assignment replaces values: ``y.data = y.data.clamp(-4, 4)`` (an activation clip, BinaryNet's
# ``input.data = Binarize(input.data)``), ``z.real = x``.
_VALUE_ATTRIBUTES = {"data", "real", "imag"}


def _setattr(self: fx.Proxy, name: str, value: Any) -> None:
    """Refuse ``y.data = v``: on a Proxy it would only set a Python attribute, and later reads of ``y`` would read the
    values before.  Not recorded as a write: ``y.data = v`` takes ``v``'s storage, shape and dtype (views of ``y``
    made before keep the old), which no in-place op of the IR means; torch.export captures it or the module is kept
    whole."""
    if name in _VALUE_ATTRIBUTES:
        raise TypeError(f"y.{name} = ... replaces a traced tensor's values, which torch.fx cannot record")
    object.__setattr__(self, name, value)


InplaceProxy.__setattr__ = _setattr

# Methods ending in ``_`` that only change metadata, never values.
_METADATA_METHODS = {"requires_grad_", "share_memory_", "retain_grad", "resize_as_"}
# Calls whose result is not a tensor (sizes, flags): they share no storage.
_NON_TENSOR_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous", "item", "tolist", "element_size", "get_device"}
_NON_TENSOR_FUNCTIONS = {len, torch.numel, torch.is_tensor, torch.is_floating_point}
_NON_TENSOR_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_sparse"}
# Methods whose result may share storage with ``self``.
_VIEW_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "t", "T", "mT",
    "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "unbind", "split", "split_with_sizes",
    "chunk", "tensor_split", "contiguous", "as_strided", "unfold", "diagonal", "movedim", "moveaxis", "swapaxes",
    "swapdims", "detach", "to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda",
    "real", "imag", "view_as_real", "__getitem__", "align_to", "refine_names", "rename", "clone_if_needed",
}  # fmt: skip
_VIEW_FUNCTIONS = {
    operator.getitem, operator.pos, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
    torch.unsqueeze, torch.split, torch.chunk, torch.unbind, torch.narrow, torch.select, torch.movedim,
    torch.moveaxis, torch.swapaxes, torch.t, torch.tensor_split, torch.detach, torch.diagonal, torch.as_strided,
    torch.broadcast_to, torch.atleast_1d, torch.atleast_2d, torch.atleast_3d, torch.real, torch.imag,
    # In eval mode dropout returns its input itself: a later ``z.clamp_()`` changes ``x`` too.
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, torch.dropout,
}  # fmt: skip
# (``after_call`` returns its first input itself: added below, once it is defined)
# Calls known to return a new tensor (never one of their inputs or a view of one).
_FRESH_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.matmul,
    operator.neg, operator.pow, operator.mod, operator.abs, operator.rshift, operator.lshift,
    operator.and_, operator.or_, operator.xor, operator.invert,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide, torch.matmul, torch.bmm, torch.mm,
    torch.cat, torch.concat, torch.concatenate, torch.stack, torch.relu, torch.sigmoid, torch.tanh,
    torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs, torch.softmax, torch.mean, torch.sum,
    torch.amax, torch.amin, torch.max, torch.min, torch.clamp, torch.clip, torch.where, torch.roll,
    torch.conv2d, torch.erf, torch.pow, torch.addmm, torch.baddbmm, torch.norm, torch.var, torch.std,
    torch.zeros_like, torch.ones_like, torch.full_like, torch.randn_like, torch.pixel_shuffle,
    torch.pixel_unshuffle, torch.cumsum, torch.sort, torch.topk, torch.gather, torch.masked_fill, torch.clone,
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, F.conv_transpose3d, F.linear, F.batch_norm, F.layer_norm, F.group_norm,
    F.instance_norm, F.gelu, F.silu, F.mish, F.softmax, F.log_softmax, F.sigmoid, F.tanh, F.hardswish,
    F.hardsigmoid, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.avg_pool1d, F.avg_pool2d, F.max_pool2d,
    F.max_pool1d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.pad,
    F.interpolate, F.scaled_dot_product_attention, F.normalize, F.unfold, F.fold, F.pixel_shuffle,
    F.embedding, F.softplus, F.hardtanh, F.threshold, F.prelu, torch.prelu,
    # Factories: a new tensor, no view of the sizes they are given (PointNet++'s ``torch.zeros(B, npoint)`` written
    # in place; a GNN's ``torch.zeros(N, C).index_add_(...)``)
    torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.eye, torch.linspace, torch.rand,
    torch.randn, torch.randint,
}  # fmt: skip
_FRESH_METHODS = {
    "add", "sub", "subtract", "mul", "multiply", "div", "divide", "matmul", "relu", "sigmoid", "tanh", "exp", "log", "sqrt",
    "rsqrt", "abs",
    "softmax", "mean", "sum", "amax", "amin", "max", "min", "clamp", "clip", "pow", "neg", "clone", "norm",
    "var", "std", "roll", "masked_fill", "gather", "cumsum", "erf", "sign", "square", "reciprocal", "exp2",
    "addmm", "bmm", "mm", "where", "new_zeros", "new_ones", "new_full", "new_empty", "logsumexp", "argmax",
    "argmin", "sort", "topk", "repeat", "tile", "flip", "scatter", "index_select", "gelu", "sin", "cos",
}  # fmt: skip
# Dropout in eval mode and Identity return their input itself.
_ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_FRESH_MODULES = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.Linear, nn.LayerNorm, nn.GroupNorm,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.Softmax, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Upsample,
    nn.MultiheadAttention, nn.Embedding, nn.Bilinear, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
    nn.ReplicationPad2d, nn.PixelShuffle, nn.PixelUnshuffle, nn.Softplus, nn.LogSoftmax,
)  # fmt: skip


def inplace_kwarg(target: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a call of ``target`` (an ``F.relu``-like function) is made with ``inplace=True``."""
    try:
        k = _inplace_position(target)
    except TypeError:  # an unhashable callable: look it up uncached
        k = _inplace_position.__wrapped__(target)
    if k is None:
        return False
    if "inplace" in kwargs:
        return kwargs["inplace"] is True
    return len(args) > k and args[k] is True


@functools.lru_cache(maxsize=1024)
def _inplace_position(target: Any) -> int | None:
    """The position of ``target``'s ``inplace`` parameter, or None.  Cached: ``inspect.signature`` of a builtin
    parses its text signature and copies ``sys.modules``, once per traced call otherwise (6% of fusing 1600 blocks)."""
    try:
        names = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


def is_inplace(n: fx.Node, root: nn.Module) -> bool:
    """Whether ``n`` changes its first argument in place."""
    if n.op == "call_method":
        name = n.target
        if name == "__setitem__":  # ``k[i] = v`` on a tensor fx holds as a constant, ``v`` traced
            return True
        return name.endswith("_") and not name.startswith("_") and name not in _METADATA_METHODS
    if n.op == "call_function":
        if n.target in _AUGMENTED or n.target is operator.setitem:
            return True
        name = getattr(n.target, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and getattr(torch, name, None) is n.target:
            return True
        return inplace_kwarg(n.target, n.args, n.kwargs)
    if n.op == "call_module":
        m = root.get_submodule(n.target)
        return getattr(m, "inplace", False) is True and not isinstance(m, _ALIAS_MODULES)
    return False


def _alias_inputs(n: fx.Node, root: nn.Module) -> list[fx.Node]:
    """The nodes whose storage ``n``'s result may share (conservative: unknown calls may return any input)."""
    tensors = [a for a in n.all_input_nodes]
    if n.op in ("placeholder", "get_attr", "output"):
        return []
    if is_inplace(n, root):
        return tensors[:1]
    if n.op == "call_method":
        if n.target in _FRESH_METHODS or n.target in _NON_TENSOR_METHODS:
            return []
        return tensors[:1] if n.target in _VIEW_METHODS else tensors
    if n.op == "call_function":
        if n.target in _FRESH_FUNCTIONS or n.target in _NON_TENSOR_FUNCTIONS:
            return []
        if n.target is operator.getitem and isinstance(n.args[0], fx.Node) and _fresh_tuple(n.args[0]):
            return []  # one of topk's values and indices: tensors of their own, neither a view of the other
        if n.target is torch.einsum:  # of one operand a permutation or a diagonal: a view of it
            return tensors[:1] if len(tensors) == 1 else []
        if n.target is getattr and len(n.args) == 2 and n.args[1] in _NON_TENSOR_ATTRIBUTES:
            return []  # x.shape; but x.T, x.data, x.mT are views
        return tensors[:1] if n.target in _VIEW_FUNCTIONS else tensors
    m = root.get_submodule(n.target)
    if isinstance(m, _ALIAS_MODULES):
        return tensors[:1]
    if isinstance(m, _FRESH_MODULES) or (type(m).__module__.startswith("torch.nn.modules.activation")):
        return []
    return tensors


# Calls that return a tuple of new tensors (``values, indices``); max, min and median only along a dim.
_TUPLES_OF_FRESH = {"topk", "sort", "kthvalue", "mode", "var_mean", "std_mean", "aminmax", "cummax", "cummin", "max", "min", "median"}
_ALONG_A_DIM = {"max", "min", "median"}


def _fresh_tuple(n: fx.Node) -> bool:
    """Whether ``n`` returns a tuple of tensors that share storage with nothing (``torch.topk``, ``x.max(dim)``;
    not ``x.max()``, a tensor, nor ``torch.max(a, b)``), so that its items alias neither each other nor its input."""
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", None) if n.op == "call_function" else None
    if name not in _TUPLES_OF_FRESH or (n.op == "call_function" and getattr(torch, str(name), None) is not n.target):
        return False
    if name in _ALONG_A_DIM:  # (a dim: the second argument or a keyword, a number)
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
        return isinstance(dim, int)
    return True


def alias_bases(graph: fx.Graph, root: nn.Module) -> dict[fx.Node, frozenset[fx.Node]]:
    """Each node mapped to the nodes whose storage it may be: itself, and what each input it may alias
    (:func:`_alias_inputs`) may be.  Two values may share storage where their bases meet.

    Not an equivalence: a call that may return either of two inputs (``F.grid_sample(feat, grid)``, to a
    conservative reading) may share storage with each, but the two share none with each other.  Classes closed
    under that relation (a union-find) took BasicSR's ``LeakyReLU(inplace=True)`` before ``flow_warp`` for a write
    into the flow grid, and fixed every size of the model (found by a probe)."""
    bases: dict[fx.Node, frozenset[fx.Node]] = {}
    for n in graph.nodes:  # (itself too: a view of its result shares that, whatever else it may be)
        bases[n] = frozenset((n,)).union(*(bases[a] for a in _alias_inputs(n, root)))
    return bases


def _shares(bases: dict[fx.Node, frozenset[fx.Node]], a: fx.Node, b: fx.Node) -> bool:
    return not bases[a].isdisjoint(bases[b])


def _where(n: fx.Node) -> str:
    return n.meta.get("repalgebra_source", "")


def _describe(n: fx.Node) -> str:
    t = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    return f"{t}({', '.join(str(a) for a in n.args)})"


def functionalize(graph: fx.Graph, root: nn.Module) -> list[str]:
    """Make every in-place node of ``graph`` out-of-place and reroute later reads (in place).

    Returns notes for the report.  Raises :class:`InplaceHazard` when an
    in-place node mutates a graph input, a parameter or buffer, or a value
    that shares storage with another value read after the mutation.
    """
    _check_constants_read(graph, root)
    nodes = list(graph.nodes)
    for n in nodes:
        if isinstance(n.kwargs.get("out"), fx.Node):  # writes into another tensor than its first argument
            raise InplaceHazard(f"{_describe(n)} writes its result into {n.kwargs['out'].name!r} (out=)", _where(n))
    inplace = [n for n in nodes if is_inplace(n, root)]
    if not inplace:
        return []
    if _one_node_per_constant(graph, root, inplace):
        nodes = list(graph.nodes)
    order = {n: k for k, n in enumerate(nodes)}
    bases = alias_bases(graph, root)
    for node in inplace:
        if not node.args or not isinstance(node.args[0], fx.Node):
            raise InplaceHazard(f"in-place call {_describe(node)} on a non-tensor first argument", _where(node))
        v = node.args[0]
        group = [w for w in nodes if _shares(bases, w, v)]
        for w in group:
            if w.op == "placeholder":
                raise InplaceHazard(f"{_describe(node)} changes the input {w.name!r} in place", _where(node))
            if w.op == "get_attr" and not _made_in_forward(w, root):
                what = (f"the parameter or buffer {w.target!r}" if not str(w.target).startswith(MADE_CONSTANT)
                        else f"the parameter or buffer that {w.target!r} is a view of" if _storage(w, root) in _model_storages(root)
                        else "a tensor the call did not make (a module-level tensor of the model's code)")
                raise InplaceHazard(f"{_describe(node)} changes {what} in place", _where(node))
        for w in group:
            # An earlier in-place node is checked as any value is: its result is what later reads were rerouted to
            # (``y = relu_(y); y[:, :2].clamp_(max=1); return y`` reads it after the clamp, which rerouting ``v`` misses)
            if w is v or w is node:
                continue
            if order[w] > order[node] and all(a is v or order[a] >= order[node] or not _shares(bases, a, v)
                                              for a in _alias_inputs(w, root)):
                continue  # made after the mutation (a view of the mutated value or the result): it reads the new contents
            if order[w] > order[node] or any(order[u] > order[node] for u in w.users):
                raise InplaceHazard(
                    f"{_describe(node)} changes {v.name!r} in place while {w.name!r} may share its storage "
                    f"and is read afterwards",
                    _where(node),
                )
        for user in list(v.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(v, node)
    counts: dict[str, int] = {}
    for node in inplace:
        what = _make_out_of_place(node, root)
        counts[what] = counts.get(what, 0) + 1
    return ["in-place ops made out-of-place (nothing else shares their storage): " + ", ".join(f"{k} x{c}" for k, c in counts.items())]


def _check_constants_read(graph: fx.Graph, root: nn.Module) -> None:
    """Raise :class:`InplaceHazard` where a tensor constant was written in place by code that ran at once while
    tracing (``k[1] = 1.0``, no traced value in it) after a node read it: fx holds the tensor itself, so that read
    would see the write too, where the model reads the values before it."""
    for n in graph.nodes:
        if READ_AT_VERSION in n.meta and _constant(n, root)._version != n.meta[READ_AT_VERSION]:
            raise InplaceHazard(f"a tensor forward makes ({n.target!r}) is written in place after {n.name!r} reads it, by code "
                                "torch.fx runs once while tracing (no traced value in it): the trace would read the values after",
                                _where(n))


def _constant(n: fx.Node, root: nn.Module) -> Any:
    return operator.attrgetter(str(n.target))(root)


def _made_in_forward(n: fx.Node, root: nn.Module) -> bool:
    """Whether ``n`` reads a tensor constant fx made of a tensor the trace saw made (:data:`MADE_IN_TRACE`: a result of
    a torch call in storage of its own): one forward made (``k = torch.zeros(C, C, 3, 3)``, ECBSR's kernel built by
    item assignment), which a write in place changes for this call only, as a value.  Not a slice of a buffer (a
    constant too, in the buffer's storage: a write into it is the buffer's), nor a module-level tensor of the
    model's code (``G[0, 0] = x.mean()``), which outlives the call: the fused model, computing such a write as a
    value, left the tensor as it was."""
    return n.op == "get_attr" and str(n.target).startswith(MADE_CONSTANT) and bool(n.meta.get(MADE_IN_TRACE))


def _model_storages(root: nn.Module) -> set[int]:
    """Where the tensors the model holds live (:func:`_held_storages`), but for the constants fx set on it."""
    found = set()
    for m in root.modules():
        held = [t for k, t in vars(m).items() if not (m is root and k.startswith(MADE_CONSTANT))]
        for t in (*m._parameters.values(), *m._buffers.values(), *held):
            if torch.is_tensor(t) and t.untyped_storage().nbytes():
                found.add(t.untyped_storage().data_ptr())
    return found


def _one_node_per_constant(graph: fx.Graph, root: nn.Module, inplace: list[fx.Node]) -> bool:
    """Read each tensor forward made (:func:`_made_in_forward`) that ``inplace`` writes into, directly or through a
    view, through its first ``get_attr`` node; returns whether the graph changed.

    fx makes a new ``get_attr`` node of such a constant each time the code hands it on: ``k[i, i] = tmp[i]`` writes
    into one, ``F.conv2d(x, k)`` reads another, which under value semantics never saw the write (ECBSR's
    ``rep_params()``: the fx capture convolved with zeros; found by a probe).  Read through one node, the write is
    rerouted to every later read as any other."""
    bases = alias_bases(graph, root)
    written = {b.target for n in inplace if n.args and isinstance(n.args[0], fx.Node)
               for b in bases[n.args[0]] if _made_in_forward(b, root)}
    first: dict[Any, fx.Node] = {}
    changed = False
    for n in list(graph.nodes):
        if n.op != "get_attr" or n.target not in written:
            continue
        if n.target not in first:
            first[n.target] = n
            continue
        n.replace_all_uses_with(first[n.target])
        graph.erase_node(n)
        changed = True
    return changed


def constant_writes(n: fx.Node, root: nn.Module) -> list[fx.Node]:
    """The item assignments traced so far, before ``n``, into the tensor constant (:data:`MADE_CONSTANT`) that ``n``
    reads, in order: fx holds the tensor as it was before them, and a value computed from ``n`` while tracing (a
    branch on the weights alone) must apply them.  ``LookupError`` where another write may reach it (an in-place
    call, or one into a view of it)."""
    if n.op != "get_attr" or not str(n.target).startswith(MADE_CONSTANT):
        return []
    nodes = list(n.graph.nodes)
    bases = alias_bases(n.graph, root)
    same = {m for m in nodes if m.op == "get_attr" and m.target == n.target}
    found = []
    for w in nodes[: nodes.index(n)]:
        if not (is_inplace(w, root) and w.args and isinstance(w.args[0], fx.Node) and not bases[w.args[0]].isdisjoint(same)):
            continue
        if w.args[0] not in same or not (w.target is operator.setitem or w.target == "__setitem__"):
            raise LookupError(w.name)
        found.append(w)
    return found


def versions(n: fx.Node, values: dict[fx.Node, Any]) -> dict[fx.Node, int]:
    """The version counters of the tensors ``n`` reads (``values``: per node its tensor): a write in place moves one."""
    return {a: values[a]._version for a in n.all_input_nodes if torch.is_tensor(values.get(a))}


def hidden_writes(node: fx.Node, before: dict[fx.Node, int], values: dict[fx.Node, Any], root: nn.Module) -> None:
    """Raise :class:`InplaceHazard` when ``node``, a call the trace does not see into, changed one of its inputs in
    place (their :func:`versions` ``before`` the call differ from those in ``values`` now) and a later node reads
    it, or a view of it.

    :func:`functionalize` handles the in-place ops the trace records; a module carried through whole can still
    write into what it is given (FasterNet's partial convolution written without ``x.clone()``:
    ``x[:, :c] = conv(x[:, :c])``).  Under value semantics the later read would see the contents before the
    write.  When only the call's own result (and what is computed from it) reads the new contents, the IR
    means the same.  The path is the innermost module holding the call and the reads, for the caller to keep
    whole.

    A run shows the writes at the example only: ``if x.abs().amax() > 10: x.clamp_(-10, 10)`` writes on other
    inputs.  A call of the model's own code whose result is unused (:func:`_for_its_effects`) is made for what it
    does besides returning, so it is taken to write into every tensor it is given, whatever the run showed: where
    one is read afterwards (by a later node, or by the caller: an input, a parameter or a buffer), the holder is kept
    whole, and the call runs as written.  Elsewhere the call, which nothing then observes, may be dropped."""
    effects = _for_its_effects(node, root)
    written = list(before) if effects else [a for a, v in before.items() if values[a]._version != v]
    if not written:
        return
    nodes = list(node.graph.nodes)
    order = {n: k for k, n in enumerate(nodes)}
    after = {node}  # the call's result and what is computed from it: it carries the new contents legitimately
    for n in nodes[order[node] + 1 :]:  # (not an input read again, made ``after_call(x, result)``: that is ``x``)
        if n.target is not after_call and any(a in after for a in n.all_input_nodes):
            after.add(n)
    bases = alias_bases(node.graph, root)
    outside = [n for n in nodes if n.op == "output"] if effects else []  # (the caller reads its inputs and the state)
    for w in written:
        readers = [u for m in nodes if _shares(bases, m, w) and m not in after for u in m.users
                   if order[u] > order[node] and u.target is not after_call]  # (an after_call's readers read w)
        readers += [o for o in outside if any(m.op in ("placeholder", "get_attr") and _shares(bases, m, w) for m in nodes)]
        if readers and effects:
            raise InplaceHazard(
                f"{_describe(node)} is a call kept whole whose result is unused (made for its effects: it may write into "
                f"{w.name!r} on other inputs than the example) and {readers[0].name!r} reads {w.name!r} afterwards",
                _holder(node, readers),
            )
        if readers:
            raise InplaceHazard(
                f"{_describe(node)} writes into {w.name!r} in place (a call kept whole) and {readers[0].name!r} reads "
                "it afterwards", _holder(node, readers),
            )


# Packages whose calls write only as the trace sees (and the front end's own helpers, which write nothing).
_LIBRARIES = {"torch", "builtins", "_operator", "operator", "math", "repalgebra"}


def _for_its_effects(n: fx.Node, root: nn.Module) -> bool:
    """Whether ``n`` is a call of the model's own code (:func:`_own_code`) whose result nothing reads: what it does,
    it does besides returning."""
    return not n.users and _own_code(n, root)


def _own_code(n: fx.Node, root: nn.Module) -> bool:
    """Whether ``n`` is a call the trace does not see into of the model's own code (a module of its classes, a
    function it wraps).  torch's own layers and functions write in place only where the trace sees it
    (``inplace=True``, a name ending in ``_``), and so does a subclass of theirs that runs their code unchanged
    (torchvision's video ResNet builds its convs as ``Conv3DSimple(nn.Conv3d)``, which adds a static method only:
    taken for the model's code, its input read again after it, by a residual, had every BN after it unfolded;
    review R17b)."""
    from repalgebra.frontend.fx_trace import recognised  # (fx_trace imports this module)

    if n.op not in ("call_module", "call_function"):
        return False
    if n.op == "call_module" and recognised(root.get_submodule(n.target)) is not None:
        return False
    owner = type(root.get_submodule(n.target)) if n.op == "call_module" else n.target
    return str(getattr(owner, "__module__", None) or "builtins").partition(".")[0] not in _LIBRARIES


def reads_after_calls(graph: fx.Graph, root: nn.Module) -> int:
    """Make every read of a tensor after a call of the model's own code that was given it (or a value sharing its
    storage) read ``after_call(tensor, result)``, the tensor as the call left it; returns how many were made.

    A call kept whole may write into its input on some inputs only (``if x.amax() > 3: x.clamp_(max=3)``):
    :func:`hidden_writes` sees the writes of the example's run, not these.  Under value semantics a later read of
    ``h`` (``y = self.odd(h); return y + h``) would be the value before the call, and rewrites would compute it
    anew from what made ``h`` (``h + conv2(x)`` merged into one conv of ``x``), missing the write.  ``after_call``
    is an op no rule folds through, and the fused module reads the tensor itself there, after the call: what it
    holds then, as in the model.  Calls whose result is unused are :func:`hidden_writes`'s (taken to write)."""
    calls = [n for n in graph.nodes if n.users and _own_code(n, root)]
    _state_given(graph, root, calls)
    _keep_copies(graph, root, calls)
    made, read = 0, -1
    for call in calls:
        if read != made:  # (anew after a call got after_call nodes: later calls may read them)
            nodes = list(graph.nodes)
            order = {n: k for k, n in enumerate(nodes)}
            bases, read = alias_bases(graph, root), made
        _refuse_state_read_after(call, nodes, order, bases, root)
        given = [a for a in call.all_input_nodes if a.op != "get_attr" and not of_sizes(a)]
        before = [m for m in nodes if order[m] < order[call] and any(_shares(bases, m, a) for a in given)]
        for m in before:
            readers = [u for u in m.users if order[u] > order[call] and u.target is not after_call]
            if not readers:
                continue
            with graph.inserting_after(call):
                now = graph.call_function(after_call, (m, call))
            now.meta.update(m.meta)
            for u in readers:
                u.replace_input_with(m, now)
            made += 1
    return made


_SIZE_READS = ("size", "dim", "numel")
_SIZE_ARITHMETIC = (operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
                    operator.mod, operator.neg, operator.pow)


def of_sizes(n: fx.Node) -> bool:
    """Whether ``n`` is a number (or tuple of numbers) read from sizes: ``x.size()``, ``x.shape``, ``x.dim()``, an
    item of one, arithmetic of such.  A call given it cannot write into it, so no read after the call needs to be
    :func:`after_call` (timm's ``get_same_padding(ih, k, s, d)``, carried, was computed again for every later read
    of ``ih``)."""
    if n.op == "call_method":
        return n.target in _SIZE_READS
    if n.op != "call_function":
        return False
    if n.target is getattr:
        return len(n.args) == 2 and n.args[1] in ("shape", "ndim")
    return n.target in _SIZE_ARITHMETIC and bool(n.all_input_nodes) and all(of_sizes(a) for a in n.all_input_nodes)


def _refuse_state_read_after(call: fx.Node, nodes: list[fx.Node], order: dict[fx.Node, int],
                             bases: dict[fx.Node, frozenset[fx.Node]], root: nn.Module | None = None) -> None:
    """Raise :class:`InplaceHazard` where a parameter or buffer that ``call`` (a call of the model's own code kept
    whole) is given, or that the module it calls holds, is read after it (directly or through a view); one the
    module holds, also where it is read before it (the next forward reads what the call wrote).

    The call may write into it on other inputs than the example (a calibration observer widening its ``amax``:
    ``if m > amax: amax.fill_(m)``), and the capture reads a parameter or buffer as a constant copied at capture,
    which rules fold (``y / self.obs.amax`` into the next conv): the fused model kept the value of the capture where
    the model reads the one the call left, on that call and every later one (11 off; review R5 finding 05).  The
    holder is captured another way or kept whole."""
    owner = f"{call.target}." if call.op == "call_module" else None
    # (a tensor the called module holds that the model reads under another name: one tied under two names, fx
    # naming it by the first, or held as a plain attribute; review R6 finding 04)
    held = _held_storages(root.get_submodule(str(call.target))) if owner is not None and root is not None else set()
    state = [a for a in nodes if a.op == "get_attr"
             and (a in call.all_input_nodes or (owner is not None and str(a.target).startswith(owner))
                  or (bool(held) and _storage(a, root) in held))]
    for a in state:
        # (not through the call's own result, which may be the tensor it was given: that read is the value the
        # call left, no constant).  A tensor the called module holds is read before the call too: the next forward
        # reads what this call wrote, where the capture holds a constant (0.5 off; found fixing review R6 finding 06)
        before = a not in call.all_input_nodes
        readers = [u for m in nodes if not bases[m].isdisjoint(bases[a]) and call not in bases[m] for u in m.users
                   if (order[u] > order[call] or before) and u is not call and u.target is not after_call]
        if readers:
            raise InplaceHazard(
                f"{_describe(call)} is a call kept whole that may write into the parameter or buffer {a.target!r} on "
                f"other inputs than the example, and {readers[0].name!r} reads it afterwards", _holder(call, readers))


def _held_storages(module: nn.Module) -> set[int]:
    """Where the tensors ``module`` and its descendants hold live: their parameters and buffers, and tensors among
    their plain attributes (``self.__dict__["target"] = parent.shift``), which a call of it may write into."""
    found = set()
    for m in module.modules():
        for t in (*m._parameters.values(), *m._buffers.values(), *vars(m).values()):
            if torch.is_tensor(t) and t.untyped_storage().nbytes():
                found.add(t.untyped_storage().data_ptr())
    return found


def _copies_read_after(graph: fx.Graph, root: nn.Module, calls: list[fx.Node],
                       bases: dict[fx.Node, frozenset[fx.Node]]) -> set[fx.Node]:
    """The copies of what a call of ``calls`` is given (or of a copy of it) made before that call, which a node after
    it reads (directly or through views): a fresh tensor of one input the IR may take for the identity
    (:func:`_fresh_one_input`: ``h.clone()``, ``h * 1``, ``torch.cat([h])``) or a ``contiguous()``.

    In the model ``shortcut = h.clone(); y = self.clamp(h); return y + proj(shortcut)`` reads the values before the
    call's write; the IR took the copy for ``h`` and the fused module read ``h`` after the call (112 off; review R5
    finding 01).  :func:`_keep_copies` keeps them copies."""
    nodes = list(graph.nodes)
    order = {n: k for k, n in enumerate(nodes)}
    found: set[fx.Node] = set()
    for call in calls:
        reach = frozenset().union(*(bases[a] for a in call.all_input_nodes))  # what the call may write into
        copies: set[fx.Node] = set()
        for b in nodes[: order[call]]:
            inputs = [a for a in b.all_input_nodes if a.op != "get_attr"]
            if len(inputs) != 1 or (bases[inputs[0]].isdisjoint(reach) and bases[inputs[0]].isdisjoint(copies)):
                continue
            if _fresh_one_input(b, root) or _is_contiguous(b):
                copies.add(b)
        for n in nodes[: order[call]]:
            if any(order[u] > order[call] for u in n.users):
                found |= bases[n] & copies
    return found


def _is_contiguous(n: fx.Node) -> bool:
    return (n.op, n.target) in (("call_method", "contiguous"), ("call_function", torch.Tensor.contiguous))
def _state_given(graph: fx.Graph, root: nn.Module, calls: list[fx.Node]) -> None:
    """Raise :class:`InplaceHazard` where a call of ``calls`` (the model's own code, kept whole, its result used) is
    given a parameter or buffer (or a view of one) that another node reads too.

    The call may write into it on other inputs than the example (``if x.abs().amax() > 10: w.mul_(0.5)``), and the
    model keeps what it wrote: later reads, and reads before the call in the next forward, see it.  The IR takes a
    parameter for a constant and folds it (``conv(x) + self.shift`` into the conv's bias), which ``after_call`` cannot
    follow across forwards.  A parameter that only the call reads is carried to it as the fused module's own tensor,
    and the call keeps writing into that."""
    bases = alias_bases(graph, root)
    for call in calls:
        storages = {_storage(b, root) for a in call.all_input_nodes for b in bases[a] if b.op == "get_attr"} - {None}
        held = [m for m in graph.nodes if m.op == "get_attr" and _storage(m, root) in storages]
        readers = [u for m in held for u in m.users if not _only_to(u, call, root)]
        if readers:
            # (a buffer's slice is a constant fx made, ``_tensor_constant0``: the buffer's own name says more)
            name = min((str(h.target) for h in held), key=lambda t: (t.startswith("_tensor_constant"), t))
            raise InplaceHazard(
                f"{_describe(call)} is a call kept whole given the parameter or buffer {name!r}, which it may write into on "
                f"other inputs than the example, and {readers[0].name!r} reads it too (the IR takes it for a constant)",
                _holder(call, readers),
            )


def _only_to(n: fx.Node, call: fx.Node, root: nn.Module) -> bool:
    """Whether ``n`` is ``call``, or a view (``w[0]``, ``w.view(-1)``) that only ``call`` reads, through views."""
    if n is call:
        return True
    view = (n.target in _VIEW_METHODS if n.op == "call_method" else n.target in _VIEW_FUNCTIONS if n.op == "call_function"
            else n.op == "call_module" and isinstance(root.get_submodule(n.target), _ALIAS_MODULES))
    return view and all(_only_to(u, call, root) for u in n.users)


def _storage(n: fx.Node, root: nn.Module) -> int | None:
    """Where the tensor a ``get_attr`` node reads lives (tied weights read under two names share it), or None."""
    try:
        t = operator.attrgetter(str(n.target))(root)
    except AttributeError:
        return None
    return t.untyped_storage().data_ptr() if torch.is_tensor(t) and t.untyped_storage().nbytes() else None


# Calls whose result the IR never takes for the identity of their input (layers computing from their weights,
# non-linearities without a setting that makes them the identity, reductions): a copy of it for a call kept whole
# (:func:`_keep_copies`) would only cost time.  (``leaky_relu`` of slope 1, a ``hardtanh`` or a ``threshold`` may
# be the identity: they are not here.)
_COMPUTING_MODULES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.Linear, nn.LayerNorm, nn.GroupNorm,
                      nn.MultiheadAttention, nn.Embedding, nn.Bilinear)
_IDENTITY_ACTIVATIONS = (nn.LeakyReLU, nn.Hardtanh, nn.Threshold, nn.RReLU)
_COMPUTING_FUNCTIONS = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, torch.conv2d, F.linear,
    F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.embedding, F.prelu, torch.prelu, F.normalize,
    F.scaled_dot_product_attention, F.relu, torch.relu, F.gelu, F.silu, F.mish, F.sigmoid, torch.sigmoid, F.tanh,
    torch.tanh, F.hardswish, F.hardsigmoid, F.elu, F.selu, F.celu, F.softplus, F.softmax, torch.softmax, F.log_softmax,
    torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.erf, torch.mean, torch.sum, torch.amax, torch.amin, torch.norm,
    torch.var, torch.std, torch.cumsum,
}  # fmt: skip
_COMPUTING_METHODS = {
    "relu", "sigmoid", "tanh", "exp", "log", "sqrt", "rsqrt", "softmax", "mean", "sum", "amax", "amin", "norm", "var",
    "std", "cumsum", "erf", "gelu", "sin", "cos", "sign", "square", "reciprocal", "exp2", "logsumexp",
}  # fmt: skip


def _keep_copies(graph: fx.Graph, root: nn.Module, calls: list[fx.Node]) -> None:
    """Keep each fresh tensor that ``calls`` (calls of the model's own code, kept whole) are given, directly or through
    views, a tensor of its own in the fused module: a clone is made :func:`kept_clone` (its keywords kept), and a
    call of one computed tensor that the IR may take for the identity of it (``h * 1``, ``h + 0``, ``torch.cat([h])``,
    a zero ``F.pad``) is read through a :func:`kept_clone` of its result, and ``contiguous()`` (a copy of a permuted
    view at run time) is made :func:`kept_contiguous`.

    In the model the call writes into that tensor, and later reads of ``h`` see none of it; the IR took the clone
    (or the op) for ``h`` itself and handed the call ``h`` to write into (``y = self.clamp(h.clone().flatten(1));
    return y + conv(h)``: 6.5 apart where the clamp bites; review R4 finding 01).  Neither the alias table nor
    :func:`reads_after_calls` sees it: the tensor is fresh there."""
    bases = alias_bases(graph, root)
    given = {b for call in calls for a in call.all_input_nodes for b in bases[a]}  # (before the copies are made)
    given |= _copies_read_after(graph, root, calls, bases)  # (copies made before a call and read after it)
    fresh = {b for b in given if _fresh_one_input(b, root)}
    for b in [n for n in graph.nodes if n in fresh]:
        if (b.op, b.target) in (("call_method", "clone"), ("call_function", torch.clone)) and len(b.args) == 1:
            b.op, b.target = "call_function", kept_clone
            continue
        with graph.inserting_after(b):
            kept = graph.call_function(kept_clone, (b,))
        kept.meta.update(b.meta)
        b.replace_all_uses_with(kept, delete_user_cb=lambda u: u is not kept)
    for n in given:
        if (n.op, n.target) == ("call_method", "contiguous") or (n.op, n.target) == ("call_function", torch.Tensor.contiguous):
            n.op, n.target = "call_function", kept_contiguous  # (a copy of a strided view at run time, the identity in the IR)


def _fresh_one_input(n: fx.Node, root: nn.Module) -> bool:
    """Whether ``n`` makes a tensor of its own (:func:`_alias_inputs`: none) from one computed tensor, with torch's
    code, and may be the identity of it in the IR (a clone, ``* 1``, a zero pad; not a conv or a ReLU)."""
    if n.op not in ("call_function", "call_method", "call_module") or n.target is kept_clone or _own_code(n, root):
        return False
    if (n.target in _NON_TENSOR_METHODS if n.op == "call_method"
            else n.op == "call_function" and n.target in (*_NON_TENSOR_FUNCTIONS, getattr, operator.getitem)) or _fresh_tuple(n):
        return False  # (a size, a flag, a tuple or an item of one: no tensor the IR takes for the identity of another)
    if _alias_inputs(n, root) or len([a for a in n.all_input_nodes if a.op != "get_attr"]) != 1:
        return False
    if n.op == "call_module":
        m = root.get_submodule(n.target)
        activation = type(m).__module__.startswith("torch.nn.modules.activation") and not isinstance(m, _IDENTITY_ACTIVATIONS)
        return not (isinstance(m, _COMPUTING_MODULES) or activation)
    return n.target not in (_COMPUTING_METHODS if n.op == "call_method" else _COMPUTING_FUNCTIONS)


@traced_as_one_call
def kept_clone(x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``x.clone(**kwargs)``, given to a call kept whole that may write into it (:func:`_keep_copies`): a copy in the
    fused module too."""
    return x.clone(**kwargs)


@traced_as_one_call
def after_call(x: torch.Tensor, result: Any) -> torch.Tensor:
    """``x`` as the call kept whole that returned ``result`` left it (it may have written into it): ``x`` itself,
    read after that call (:func:`reads_after_calls`)."""
    return x


@traced_as_one_call
def kept_contiguous(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``x.contiguous()``, given to a call kept whole that may write into it (:func:`_keep_copies`): ``x`` itself where
    it is contiguous, else a copy, as in the model (the IR takes it for the identity)."""
    return x.contiguous(*args, **kwargs)


_VIEW_FUNCTIONS.add(after_call)  # (x itself: what writes into it later writes into x)
_VIEW_FUNCTIONS.add(kept_contiguous)  # (x itself where x is contiguous)
_FRESH_FUNCTIONS.add(kept_clone)


def _holder(node: fx.Node, readers: list[fx.Node]) -> str:
    """The innermost module holding ``node`` and its ``readers``: the module path they have in common."""
    where = [_source(node), *(_source(u) for u in readers)]
    common = where[0].split(".") if where[0] else []
    for path in where[1:]:
        parts = path.split(".") if path else []
        k = next((i for i, (a, b) in enumerate(zip(common, parts)) if a != b), min(len(common), len(parts)))
        common = common[:k]
    return ".".join(common)


def _source(n: fx.Node) -> str:
    return n.target if n.op == "call_module" else _where(n)


def _make_out_of_place(n: fx.Node, root: nn.Module) -> str:
    """Turn ``n`` into the same computation without the mutation; returns what it was, for the notes."""
    if n.op == "call_module":
        m = root.get_submodule(n.target)
        m.inplace = False  # every call site of this module was checked: none relies on the mutation
        return f"{type(m).__name__}(inplace=True)"
    n.meta[KEEPS_DTYPE] = True  # (a module in place, ReLU(inplace=True), keeps it anyway)
    if n.op == "call_method":
        name = n.target
        if name == "__setitem__":  # (``k[i] = v`` on a constant: the same arguments as operator.setitem's)
            n.op, n.target = "call_function", setitem_copy
            return "y[...] = z (item assignment)"
        if hasattr(torch.Tensor, name[:-1]):
            n.target = name[:-1]
        else:  # copy_, fill_, zero_, ...: run it on a copy
            n.op, n.target, n.args = "call_function", on_copy, (name, *n.args)
        return name
    if n.target in _AUGMENTED:
        n.target = _AUGMENTED[n.target]
        return f"{n.target.__name__}= (augmented assignment)"
    if n.target is operator.setitem:
        n.target = setitem_copy
        return "y[...] = z (item assignment)"
    name = getattr(n.target, "__name__", "")
    if name.endswith("_") and getattr(torch, name, None) is n.target:
        if hasattr(torch, name[:-1]):
            n.target = getattr(torch, name[:-1])
        elif hasattr(torch.Tensor, name):  # torch.zero_(y) (no torch.zero): the method, on a copy
            n.target, n.args = on_copy, (name, *n.args)
        else:  # torch.embedding_renorm_: neither an out-of-place twin nor a method to run on a copy
            raise InplaceHazard(f"{_describe(n)} writes in place and has no out-of-place form", _where(n))
        return f"torch.{name}"
    n.kwargs = {**n.kwargs, "inplace": False}
    if "inplace" in inspect.signature(n.target).parameters:
        k = list(inspect.signature(n.target).parameters).index("inplace")
        if len(n.args) > k:
            n.args = n.args[:k] + (False,) + n.args[k + 1 :]
            n.kwargs = {key: val for key, val in n.kwargs.items() if key != "inplace"}
    return f"{name}(inplace=True)"


@traced_as_one_call
def setitem_copy(x: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """``y = x.clone(); y[index] = value``: an item assignment without its side effect.

    Always a copy, also where the value before has no other reader in the trace: rewrites may make a value another's
    (a ``slice_scatter`` of a whole axis is its source), so a call that wrote into its input could change a value
    other nodes read."""
    y = x.clone()
    y[index] = value
    return y


@traced_as_one_call
def on_copy(method: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``getattr(x.clone(), method)(*args, **kwargs)``: an in-place method without its side effect."""
    return getattr(x.clone(), method)(*args, **kwargs)

