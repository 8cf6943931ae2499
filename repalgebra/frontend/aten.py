"""The export front end: a module captured by ``torch.export``, specialized to the example inputs' shapes, as a Graph.

``torch.fx.symbolic_trace`` runs ``forward`` on symbolic proxies, so Python that
reads sizes (``if H % window:``, ``int(N ** 0.5)``, ``assert H % patch == 0``,
TF-style "same" padding computed from the input size, loops over sizes) fails,
and in-place ops (``y.relu_()``, ``nn.ReLU(inplace=True)``, ``y[:, :4] = 0``)
are recorded as if they returned new tensors.  :func:`capture_export` instead
runs ``forward`` once on fake tensors of the example inputs' shapes
(``torch.export.export(..., strict=False)``): Python arithmetic on sizes runs
for real, and the program it records is exact *at those shapes*.
``run_decompositions({})`` (an empty table) then functionalizes it: in-place ops
become out-of-place ones, slice assignment becomes ``slice_scatter``, while
high-level ATen ops (``aten.conv2d``, ``aten.linear``, ``aten.pad``, SDPA, ...)
stay whole.

Each ATen node then becomes an IR node:

* ops the op table has (conv2d, batch norm, linear, add/sub, per-channel and
  scalar multiplies and divisions as ``scale``, relu/gelu/sigmoid, constant pads, average
  pools and means, reshapes, permutes, concat, select, softmax, layer norm,
  matmul, identities, and the vision vocabulary: max and adaptive pools,
  silu/hardswish/hardsigmoid/relu6/clamp/tanh, broadcasting and constant
  arithmetic, pow/sqrt/rsqrt, sum, group norm, upsampling, SDPA, einsum,
  slices and splits, slice_scatter, roll, pixel (un)shuffle, other pads) map
  to their op, after checking that the op table infers
  the same shape and dtype as ``torch.export`` recorded (else: opaque, with a
  note);
* every other ATen call becomes an ``opaque`` node whose ``fn`` is a
  :class:`~repalgebra.frontend.calls.FnCall` of the ATen overload itself, its
  tensor inputs as ``In(i)`` and the constant tensors it reads as ``Buf``;
* calls that read only constants (``self.weight.view(...)``, a lifted
  ``torch.tensor(0.)``) are computed once here: their results are constants.

Sizes in reshapes and carried-through calls are the example's, so the graph is
valid at the example inputs' shapes only (batch size included).  Parameters,
buffers and constants are cloned: the graph shares no storage with the model.
Programs this path cannot express are refused with :class:`CaptureFailed`:
writes into buffers or inputs, higher-order ops with subgraphs, data-dependent
scalars (``.item()``).
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from repalgebra.frontend.args import channel_axis, scalar_axis
from repalgebra.frontend.calls import Buf, FnCall, In
from repalgebra.ir import Graph, Node, Value

__all__ = ["AtenCapture", "CaptureFailed", "capture_export"]

aten = torch.ops.aten


@dataclass
class AtenCapture:
    """What :func:`capture_export` returns."""

    graph: Graph  # inputs have the example inputs' shapes and dtypes
    output_spec: pytree.TreeSpec  # structure of the model's outputs; its leaves are the graph outputs
    notes: list[str] = field(default_factory=list)


class CaptureFailed(Exception):
    """The export path cannot capture this module; ``str(e)`` is the one-line reason (first line of torch's error)."""


def capture_export(module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> AtenCapture:
    """Capture ``module`` with ``torch.export`` at the shapes of ``example_inputs`` into a Graph.

    ``module`` is already a private deep copy in eval mode; it is run once on
    fake tensors and not changed.  The graph is valid at these input shapes
    only.  Raises :class:`CaptureFailed` when ``torch.export`` fails or the
    program mutates state, holds higher-order ops or reads data-dependent scalars.
    """
    example_inputs = tuple(example_inputs)
    try:
        # Under no_grad a `with torch.no_grad():` block in forward changes nothing, so it records
        # no wrap_with_set_grad_enabled subgraph and its nodes keep their module paths (without
        # no_grad, run_decompositions inlines that subgraph but the module paths inside are lost).
        # An `enable_grad()` block still records one; run_decompositions inlines it too.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec", category=FutureWarning)  # torch-internal
            ep = torch.export.export(module, example_inputs, strict=False)
            ep = ep.run_decompositions({})
    except Exception as e:  # anything torch raises: the first line says why
        raise CaptureFailed(_first_line(e)) from e
    _check_program(ep)
    return _Builder(ep).build(example_inputs)


def _first_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else '(no message)'}"


def _check_program(ep: torch.export.ExportedProgram) -> None:
    """Refuse programs that are not a pure function of their inputs and constants."""
    sig = ep.graph_signature
    if sig.buffers_to_mutate:
        names = ", ".join(sorted(set(sig.buffers_to_mutate.values())))
        raise CaptureFailed(f"forward() writes into buffer(s) {names}: a fused graph cannot carry state updates")
    if sig.user_inputs_to_mutate:
        names = ", ".join(sorted(set(sig.user_inputs_to_mutate.values())))
        raise CaptureFailed(f"forward() writes into its input(s) {names}: a fused graph cannot carry that")
    for spec in sig.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT:
            raise CaptureFailed(f"the program has a {spec.kind.name} output ({spec.target or spec.arg}); only plain outputs can be captured")
    for spec in sig.input_specs:
        if spec.kind not in (InputKind.USER_INPUT, InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            raise CaptureFailed(f"the program has a {spec.kind.name} input ({spec.target or spec.arg}); only tensors can be captured")
    for n in ep.graph.nodes:
        if isinstance(n.target, torch._ops.HigherOrderOperator):
            raise CaptureFailed(f"higher-order op {n.target.name()} at {_module_path(n)!r}: its subgraphs are not carried as a plain call")
    for n in ep.graph.nodes:
        if n.op in ("get_attr", "call_module"):
            raise CaptureFailed(f"{n.op} {n.target!r} in the exported program: subgraphs are not carried as a plain call")


# --------------------------------------------------------------------------- values while building


@dataclass(eq=False)
class _Const:
    """A constant tensor (cloned parameter, buffer or lifted constant, or computed from them)."""

    tensor: torch.Tensor
    path: str | None  # its FQN (``stages.0.conv.weight``) when it is a model tensor


@dataclass(eq=False)
class _Multi:
    """A call returning several tensors; its ``getitem`` readers decide how it is built."""

    node: fx.Node
    args: tuple
    kwargs: dict
    value: Value | None = None  # the tuple-valued opaque node, once one is needed


def _module_path(n: fx.Node) -> str:
    """The innermost module ``n`` was recorded in (``nn_module_stack`` values are ``(path, type)``)."""
    stack = n.meta.get("nn_module_stack")
    if not stack:
        return ""
    return str(list(stack.values())[-1][0])


def _tensor_info(val: Any) -> tuple[tuple[int, ...], torch.dtype] | None:
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return tuple(int(s) for s in val.shape), val.dtype
    except Exception:  # an unbacked (data-dependent) size
        raise CaptureFailed(f"a tensor of data-dependent shape {tuple(val.shape)}: not capturable at fixed shapes") from None


def _map(a: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` applied to the leaves of nested tuples/lists/dicts (fx's immutable containers become plain ones)."""
    if isinstance(a, tuple):
        return tuple(_map(x, fn) for x in a)
    if isinstance(a, list):
        return [_map(x, fn) for x in a]
    if isinstance(a, dict):
        return {k: _map(v, fn) for k, v in a.items()}
    return fn(a)


def _leaves(a: Any) -> list[Any]:
    out: list[Any] = []
    _map(a, out.append)
    return out


def _return(x: Any) -> Any:
    return x


Made = "tuple[str, list[Value], dict, dict, str | None] | None"  # op, inputs, attrs, params, source (None: module path)


class _Builder:
    """Maps the nodes of one exported program to IR nodes."""

    def __init__(self, ep: torch.export.ExportedProgram) -> None:
        self.ep = ep
        self.env: dict[fx.Node, Any] = {}
        self.nodes: list[Node] = []
        self.notes: list[str] = []
        self.opaque_ops: dict[str, int] = {}

    # -- driver -------------------------------------------------------------------------

    def build(self, example_inputs: tuple[torch.Tensor, ...]) -> AtenCapture:
        sig = self.ep.graph_signature
        kinds = {s.arg.name: s for s in sig.input_specs if hasattr(s.arg, "name")}
        user = [s.arg.name for s in sig.input_specs if s.kind == InputKind.USER_INPUT]
        if len(user) != len(example_inputs):
            raise CaptureFailed(f"the program takes {len(user)} tensor inputs, {len(example_inputs)} example inputs were given")
        inputs: list[Value] = []
        for n in self.ep.graph.nodes:
            if n.op == "placeholder":
                spec = kinds[n.name]
                if spec.kind == InputKind.USER_INPUT:
                    t = example_inputs[user.index(n.name)]
                    v = Graph.input(n.name, tuple(t.shape), t.dtype)
                    inputs.append(v)
                    self.env[n] = v
                else:
                    self.env[n] = self.model_tensor(spec)
            elif n.op == "call_function":
                self.env[n] = self.call(n)
            elif n.op == "output":
                outs = [self.output_value(self.env_of(a), n) for a in n.args[0]]
                spec = self.ep.call_spec.out_spec
                shapes = ", ".join("x".join(map(str, v.shape)) + f" {str(v.dtype).replace('torch.', '')}" for v in inputs)
                notes = [f"captured with torch.export at input shape(s) {shapes}: sizes are specialized to them"]
                notes += self.notes
                if self.opaque_ops:
                    listed = ", ".join(f"{k} x{c}" if c > 1 else k for k, c in sorted(self.opaque_ops.items()))
                    notes.append(f"carried through unchanged (no op in the table): {listed}")
                return AtenCapture(Graph(inputs, self.nodes, outs), spec, notes)
        raise AssertionError("exported program without output")

    def model_tensor(self, spec: Any) -> _Const:
        """The cloned tensor behind a parameter, buffer or lifted-constant placeholder."""
        target = spec.target
        if spec.kind == InputKind.CONSTANT_TENSOR:
            t, path = self.ep.constants[target], None
        else:  # non-persistent buffers live in ``constants``, not in ``state_dict``
            t = self.ep.state_dict[target] if target in self.ep.state_dict else self.ep.constants[target]
            path = target
        return _Const(t.detach().clone(), path)

    def env_of(self, a: Any) -> Any:
        return _map(a, lambda x: self.env[x] if isinstance(x, fx.Node) else x)

    def output_value(self, v: Any, n: fx.Node) -> Value:
        if isinstance(v, Value):
            return v
        if isinstance(v, _Const):  # a model output that is a constant: a node that returns it
            fn = FnCall("call_function", _return, (Buf("c0"),), {}, {"c0": v.tensor})
            attrs = {"fn": fn, "out_shape": tuple(v.tensor.shape), "out_dtype": v.tensor.dtype}
            return self.add(Node.make("opaque", [], attrs, {}, (v.path or "").rpartition(".")[0], name=n.name))
        raise CaptureFailed(f"model outputs must be tensors; one output is {type(v).__name__} ({v!r})")

    def add(self, node: Node) -> Value:
        self.nodes.append(node)
        return node.out

    # -- one call -----------------------------------------------------------------------

    def call(self, n: fx.Node) -> Any:
        args, kwargs = self.env_of(n.args), self.env_of(n.kwargs)
        if n.target is operator.getitem:
            return self.getitem(n, *args)
        found = _leaves((args, kwargs))
        if not any(isinstance(x, (Value, _Multi)) for x in found) and not _seeded(n.target):
            folded = self.fold(n, args, kwargs)
            if folded is not _NOT_FOLDED:
                return folded
        val = n.meta.get("val")
        if isinstance(val, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in val):
            return _Multi(n, args, kwargs)
        info = _tensor_info(val)
        if info is None:
            return self.non_tensor(n, val)
        handler = _HANDLERS.get(n.target)
        a = _bind(n.target, args, kwargs) if handler is not None else None
        made = handler(self, n, a) if a is not None else None
        if made is not None:
            out = self.emit(n, made, info)
            if out is not None:
                return out
        return self.opaque(n, n.target, args, kwargs, info)

    def getitem(self, n: fx.Node, src: Any, index: int) -> Any:
        """``call(...)[index]`` of a call returning several tensors.

        Batch norm and layer norm (result 0) and ``unbind`` (a ``select`` per
        index) map to ops.  Any other such call becomes one tuple-valued opaque
        node (no shape, as the fx front end carries containers) read by one
        opaque ``operator.getitem`` per result: the call still runs once.
        """
        if isinstance(src, (tuple, list)):  # a folded constant tuple
            return src[index]
        info = _tensor_info(n.meta.get("val"))
        if not isinstance(src, _Multi) or info is None:
            return self.opaque(n, operator.getitem, (src, index), {}, info)
        handler = _MULTI_HANDLERS.get(src.node.target)
        a = _bind(src.node.target, src.args, src.kwargs) if handler is not None else None
        made = handler(self, src.node, a, index) if a is not None else None
        if made is not None:
            out = self.emit(n, made, info)
            if out is not None:
                return out
        if src.value is None:  # the call itself, once, as a tuple-valued opaque node
            src.value = self.opaque(src.node, src.node.target, src.args, src.kwargs, None)
        return self.opaque(n, operator.getitem, (src.value, index), {}, info)

    def fold(self, n: fx.Node, args: tuple, kwargs: dict) -> Any:
        """A call that reads only constants: computed now (``self.weight.view(...)``, ``clone(lifted)``)."""
        paths = [x.path for x in _leaves((args, kwargs)) if isinstance(x, _Const) and x.path]
        real = lambda a: _map(a, lambda x: x.tensor if isinstance(x, _Const) else x)  # noqa: E731
        try:
            with torch.no_grad():
                result = n.target(*real(args), **real(kwargs))
        except Exception:  # it runs at fixed shapes only inside the program: carry it
            return _NOT_FOLDED
        path = paths[0] if paths else None
        return _map(result, lambda t: _Const(t, path) if isinstance(t, torch.Tensor) else t)

    def non_tensor(self, n: fx.Node, val: Any) -> Any:
        if val is None and not n.users:  # a run-time check (asserts on metadata or values)
            if n.target is not aten._assert_tensor_metadata.default:
                self.notes.append(f"{n.format_node()} at {_module_path(n)!r}: a run-time check, dropped")
            return None
        if isinstance(val, (int, float, bool)) and not isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return val  # a size read at the example's shapes: a literal here
        raise CaptureFailed(f"{n.format_node()} at {_module_path(n)!r} gives {type(val).__name__}, not a tensor (a data-dependent value?)")

    def emit(self, n: fx.Node, made: Any, info: tuple[tuple[int, ...], torch.dtype]) -> Value | None:
        """The mapped node, if the op table agrees with torch.export on its shape and dtype."""
        op, inputs, attrs, params, source = made
        where = source or _module_path(n)
        try:
            node = Node.make(op, inputs, attrs, params, where, name=n.name)
        except (ValueError, TypeError) as e:
            self.notes.append(f"{n.name} ({n.target}) at {where!r}: the {op} op cannot express it ({e}); carried through unchanged")
            return None
        if (node.out.shape, node.out.dtype) != info:
            self.notes.append(
                f"{n.name} ({n.target}) at {where!r}: the {op} op gives {node.out.shape} {node.out.dtype}, "
                f"the program {info[0]} {info[1]}; carried through unchanged"
            )
            return None
        return self.add(node)

    def opaque(self, n: fx.Node, target: Any, args: tuple, kwargs: dict, info: tuple | None) -> Value:
        """Carry the call through: a FnCall of ``target`` with tensor inputs as ``In`` and constants as ``Buf``."""
        inputs: list[Value] = []
        index: dict[int, int] = {}
        consts: dict[int, tuple[str, torch.Tensor]] = {}

        def leaf(x: Any) -> Any:
            if isinstance(x, _Multi):
                if x.value is None:
                    x.value = self.opaque(x.node, x.node.target, x.args, x.kwargs, None)
                x = x.value
            if isinstance(x, Value):
                if id(x) not in index:
                    index[id(x)] = len(inputs)
                    inputs.append(x)
                return In(index[id(x)])
            if isinstance(x, _Const):
                if id(x) not in consts:
                    consts[id(x)] = (f"c{len(consts)}", x.tensor)
                return Buf(consts[id(x)][0])
            return x

        a, k = _map(args, leaf), _map(kwargs, leaf)
        fn = FnCall("call_function", target, a, k, dict(consts.values()))
        shape, dtype = info if info is not None else (None, None)
        name = str(target) if target is not operator.getitem else "getitem"
        self.opaque_ops[name] = self.opaque_ops.get(name, 0) + 1
        return self.add(Node.make("opaque", inputs, {"fn": fn, "out_shape": shape, "out_dtype": dtype}, {}, _module_path(n), name=n.name))


_NOT_FOLDED = object()


def _seeded(target: Any) -> bool:
    """Random ops are never computed ahead (each run draws anew)."""
    return torch.Tag.nondeterministic_seeded in getattr(target, "tags", ())


def _bind(target: Any, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The call's arguments by schema name, defaults filled in (None for non-ATen targets)."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return None
    out: dict[str, Any] = {}
    for k, arg in enumerate(schema.arguments):
        if k < len(args) and not arg.kwarg_only:
            out[arg.name] = args[k]
        elif arg.name in kwargs:
            out[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            return None
    return out


# --------------------------------------------------------------------------- handlers
#
# A handler gets (builder, fx node, arguments by schema name with Values / _Consts /
# literals) and returns (op, inputs, attrs, params, source) or None for "carry it
# through".  Source None means the node's module path.


def _v(x: Any) -> Value | None:
    return x if isinstance(x, Value) and x.shape is not None else None


def _c(x: Any) -> torch.Tensor | None:
    return x.tensor if isinstance(x, _Const) and x.tensor.is_floating_point() else None


def _owner(c: Any) -> str | None:
    """``stages.0.conv.weight`` -> ``stages.0.conv``: the module a parameter belongs to."""
    return c.path.rpartition(".")[0] if isinstance(c, _Const) and c.path else None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _ints(v: Any) -> tuple[int, ...] | None:
    if isinstance(v, (tuple, list)) and all(_is_int(x) for x in v):
        return tuple(v)
    return None


def _pair(v: Any) -> tuple[int, int] | None:
    """An ATen ``int[2]`` argument (an int, one int or two) as a pair."""
    if _is_int(v):
        return (v, v)
    t = _ints(v)
    if t is None or len(t) not in (1, 2):
        return None
    return (t[0], t[0]) if len(t) == 1 else (t[0], t[1])


def _conv(b: _Builder, n: fx.Node, a: dict) -> Made:
    x, w, bias = _v(a["input"]), _c(a["weight"]), a["bias"]
    if x is None or len(x.shape) != 4 or w is None or w.dim() != 4 or (bias is not None and _c(bias) is None):
        return None
    stride, dilation, groups = _pair(a["stride"]), _pair(a["dilation"]), a["groups"]
    if stride is None or dilation is None or not _is_int(groups):
        return None
    padding = a["padding"]
    if padding == "valid":
        pads = (0, 0, 0, 0)
    elif padding == "same":  # PyTorch puts the odd extra row/column at the bottom/right
        total = [d * (k - 1) for k, d in zip(w.shape[2:], dilation)]
        pads = (total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2)
    else:
        p = _pair(padding)
        if p is None:
            return None
        pads = (p[0], p[0], p[1], p[1])
    params = {"weight": w} if bias is None else {"weight": w, "bias": _c(bias)}
    attrs = {"stride": stride, "padding": pads, "dilation": dilation, "groups": groups}
    return "conv2d", [x], attrs, params, _owner(a["weight"])


def _convolution(b: _Builder, n: fx.Node, a: dict) -> Made:
    """``aten.convolution``: a plain 2-D conv when not transposed."""
    output_padding = _ints(a["output_padding"])
    if a["transposed"] is not False or output_padding is None or any(output_padding):
        return None
    return _conv(b, n, a)


def _bn(x: Any, weight: Any, bias: Any, mean: Any, var: Any, eps: Any) -> Made:
    x, m, v = _v(x), _c(mean), _c(var)
    if x is None or len(x.shape) < 2 or m is None or v is None or not _is_num(eps):
        return None
    if any(p is not None and _c(p) is None for p in (weight, bias)):
        return None
    params = {  # affine=False: weight ones, bias zeros
        "mean": m,
        "var": v,
        "weight": torch.ones_like(m) if weight is None else _c(weight),
        "bias": torch.zeros_like(m) if bias is None else _c(bias),
    }
    return "batch_norm", [x], {"eps": float(eps)}, params, _owner(mean)


def _batch_norm(b: _Builder, n: fx.Node, a: dict) -> Made:
    if a["training"] is not False:
        return None
    return _bn(a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"], a["eps"])


def _bn_no_training(b: _Builder, n: fx.Node, a: dict, index: int) -> Made:
    """``_native_batch_norm_legit_no_training(...)[0]`` (the other two results are empty)."""
    if index != 0:
        return None
    return _bn(a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"], a["eps"])


def _native_bn(b: _Builder, n: fx.Node, a: dict, index: int) -> Made:
    if index != 0 or a["training"] is not False:
        return None
    return _bn(a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"], a["eps"])


def _linear(b: _Builder, n: fx.Node, a: dict) -> Made:
    x, w, bias = _v(a["input"]), _c(a["weight"]), a["bias"]
    if x is None or w is None or w.dim() != 2 or (bias is not None and _c(bias) is None):
        return None
    params = {"weight": w} if bias is None else {"weight": w, "bias": _c(bias)}
    return "linear", [x], {}, params, _owner(a["weight"])


def _ln(x: Any, shape: Any, weight: Any, bias: Any, eps: Any) -> Made:
    x, shape = _v(x), _ints(shape)
    if x is None or shape is None or not _is_num(eps) or any(p is not None and _c(p) is None for p in (weight, bias)):
        return None
    params = {k: _c(p) for k, p in (("weight", weight), ("bias", bias)) if p is not None}
    return "layer_norm", [x], {"normalized_shape": shape, "eps": float(eps)}, params, None


def _layer_norm(b: _Builder, n: fx.Node, a: dict) -> Made:
    return _ln(a["input"], a["normalized_shape"], a["weight"], a["bias"], a["eps"])


def _native_layer_norm(b: _Builder, n: fx.Node, a: dict, index: int) -> Made:
    return None if index != 0 else _ln(a["input"], a["normalized_shape"], a["weight"], a["bias"], a["eps"])


def _unbind(b: _Builder, n: fx.Node, a: dict, index: int) -> Made:
    """``q, k, v = qkv.unbind(0)``: each result is a select."""
    x = _v(a["self"])
    return None if x is None or not _is_int(a["dim"]) else ("select", [x], {"axis": a["dim"], "index": index}, {}, None)


def _join(op: str) -> Callable[..., Made]:
    """``a + b`` / ``a - b``: of two activations of one shape ``add``/``sub``, of other shapes ``broadcast_add``/
    ``broadcast_sub``; with a constant or a number ``add_const``; ``x + 0`` and ``x - 0`` are the identity."""

    def handler(b: _Builder, n: fx.Node, a: dict) -> Made:
        x, y = a["self"], a["other"]
        if a.get("alpha", 1) != 1:
            return None
        if _v(x) is not None and _is_num(y) and y == 0:
            return "identity", [x], {}, {}, None
        if _v(x) is not None and _v(y) is not None:
            if x.shape == y.shape:
                return op, [x, y], {}, {}, None
            return ("broadcast_" + op, [x, y], {}, {}, None) if _broadcasts(x.shape, y.shape) else None
        if _v(x) is not None:  # x + c, x - c
            return _add_const(x, y, negate_const=op == "sub", negate_x=False)
        if _v(y) is not None:  # c + y, c - y
            return _add_const(y, x, negate_const=False, negate_x=op == "sub")
        return None

    return handler


def _broadcasts(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    try:
        torch.broadcast_shapes(a, b)
    except RuntimeError:
        return False
    return True


def _add_const(x: Value, c: Any, negate_const: bool, negate_x: bool) -> Made:
    """``(-)x + (-)c`` for a number or a constant tensor that does not widen ``x``: ``add_const``."""
    if not x.dtype.is_floating_point:
        return None
    if _is_num(c):
        t = torch.tensor(float(c), dtype=torch.float64)
    elif _c(c) is not None and _broadcasts(tuple(c.tensor.shape), x.shape) and torch.broadcast_shapes(c.tensor.shape, x.shape) == x.shape:
        t = _c(c)
    else:
        return None
    return "add_const", [x], {"sign": -1.0 if negate_x else 1.0}, {"const": -t if negate_const else t}, _owner(c)


def _rsub(b: _Builder, n: fx.Node, a: dict) -> Made:
    """``aten.rsub.Scalar(x, c)``: ``c - x``."""
    x = _v(a["self"])
    return None if x is None or a.get("alpha", 1) != 1 else _add_const(x, a["other"], negate_const=False, negate_x=True)


def _div(b: _Builder, n: fx.Node, a: dict) -> Made:
    """``a / b``: ``div`` of two activations; by a number or a per-channel constant a ``scale``."""
    x, y = _v(a["self"]), a["other"]
    if x is None or not x.dtype.is_floating_point or a.get("rounding_mode") is not None:
        return None
    if _v(y) is not None:
        return ("div", [x, y], {}, {}, None) if _broadcasts(x.shape, y.shape) else None
    if _is_num(y):  # the reciprocal in float64, as the rewrite folds it
        return None if y == 0 else _mul(b, n, {"self": x, "other": _Const(torch.tensor(1.0 / y, dtype=torch.float64), None)})
    if _c(y) is not None:
        return _mul(b, n, {"self": x, "other": _Const(1.0 / _c(y), y.path)})
    return None


def _pow(b: _Builder, n: fx.Node, a: dict) -> Made:
    x, e = _v(a["self"]), a["exponent"]
    if x is None or not _is_num(e) or not x.dtype.is_floating_point:
        return None
    return "pow", [x], {"exponent": e}, {}, None


def _mul(b: _Builder, n: fx.Node, a: dict) -> Made:
    """``a * b``: ``mul`` of two activations; ``scale`` by a per-channel constant or a number."""
    x, c = a["self"], a["other"]
    if not isinstance(x, Value):
        x, c = c, x
    if _v(x) is None or not x.dtype.is_floating_point or not x.shape:
        return None
    if isinstance(c, Value):
        return "mul", [x, c], {}, {}, None
    if _c(c) is not None:
        t = _c(c)
        if t.dim() > len(x.shape):
            return None
        if t.numel() == 1:
            axis = scalar_axis(x.shape)
            vec = t.reshape(()).expand(x.shape[axis]).clone()
        else:
            axis = channel_axis(tuple(t.shape), x.shape)
            vec = None if axis is None else t.reshape(-1)
        return None if axis is None else ("scale", [x], {"axis": axis}, {"scale": vec}, None)
    if _is_num(c):
        axis = scalar_axis(x.shape)
        return "scale", [x], {"axis": axis}, {"scale": torch.full((x.shape[axis],), float(c), dtype=x.dtype)}, None
    return None


def _clamp(lo: Any = None, hi: Any = None) -> Callable[..., Made]:
    """``clamp``/``clamp_min``/``clamp_max``/``hardtanh``/``relu6`` with number bounds."""

    def handler(b: _Builder, n: fx.Node, a: dict) -> Made:
        x = _v(a["self"])
        low = a.get("min", a.get("min_val", lo))
        high = a.get("max", a.get("max_val", hi))
        if x is None or (low is None and high is None) or any(v is not None and not _is_num(v) for v in (low, high)):
            return None
        return "clamp", [x], {"min": low, "max": high}, {}, None

    return handler


def _sum(b: _Builder, n: fx.Node, a: dict) -> Made:
    x, dims = _v(a["self"]), _ints(a.get("dim"))
    keepdim = a.get("keepdim", False)
    if x is None or a["dtype"] is not None or not isinstance(keepdim, bool) or not x.shape:
        return None
    dims = tuple(range(len(x.shape))) if dims is None or dims == () else dims
    return "sum", [x], {"dims": dims, "keepdim": keepdim}, {}, None


def _max_pool(b: _Builder, n: fx.Node, a: dict) -> Made:
    x, kernel, padding, dilation = _v(a["self"]), _pair(a["kernel_size"]), _pair(a["padding"]), _pair(a["dilation"])
    stride = kernel if a["stride"] in ([], (), None) else _pair(a["stride"])
    if x is None or len(x.shape) != 4 or None in (kernel, stride, padding, dilation):
        return None
    attrs = {"kernel": kernel, "stride": stride, "padding": padding, "dilation": dilation, "ceil_mode": bool(a["ceil_mode"])}
    return "max_pool2d", [x], attrs, {}, None


def _max_pool_values(b: _Builder, n: fx.Node, a: dict, index: int) -> Made:
    """``max_pool2d_with_indices(...)[0]``."""
    return _max_pool(b, n, a) if index == 0 else None


def _adaptive(op: str) -> Callable[..., Made]:
    def handler(b: _Builder, n: fx.Node, a: dict, index: int = 0) -> Made:
        x, size = _v(a["self"]), _pair(a["output_size"])
        if x is None or len(x.shape) not in (3, 4) or size is None or index != 0:
            return None
        return op, [x], {"output_size": size}, {}, None

    return handler


def _gn(x: Any, weight: Any, bias: Any, groups: Any, eps: Any) -> Made:
    x = _v(x)
    if x is None or not _is_int(groups) or not _is_num(eps) or any(p is not None and _c(p) is None for p in (weight, bias)):
        return None
    params = {k: _c(p) for k, p in (("weight", weight), ("bias", bias)) if p is not None}
    return "group_norm", [x], {"num_groups": groups, "eps": float(eps)}, params, _owner(weight)


def _group_norm(b: _Builder, n: fx.Node, a: dict) -> Made:
    return _gn(a["input"], a["weight"], a["bias"], a["num_groups"], a["eps"])


def _native_group_norm(b: _Builder, n: fx.Node, a: dict, index: int) -> Made:
    return None if index != 0 else _gn(a["input"], a["weight"], a["bias"], a["group"], a["eps"])


def _upsample(mode: str) -> Callable[..., Made]:
    """``upsample_nearest2d.vec``/``_upsample_nearest_exact2d.vec``/``upsample_bilinear2d.vec``: ``interpolate``."""

    def handler(b: _Builder, n: fx.Node, a: dict) -> Made:
        x, size, scales = _v(a["input"]), a["output_size"], a["scale_factors"]
        if x is None or len(x.shape) != 4 or (size is None) == (scales is None):
            return None
        if size is not None and _ints(size) is None:
            return None
        if scales is not None and (not isinstance(scales, (list, tuple)) or len(scales) != 2 or not all(_is_num(v) for v in scales)):
            return None
        align = a.get("align_corners")
        attrs = {
            "size": None if size is None else tuple(size),
            "scale": None if scales is None else tuple(float(v) for v in scales),
            "mode": mode,
            "align_corners": bool(align) if mode == "bilinear" else None,
        }
        return "interpolate", [x], attrs, {}, None

    return handler


def _attention(b: _Builder, n: fx.Node, a: dict) -> Made:
    qkv = [_v(a[k]) for k in ("query", "key", "value")]
    if None in qkv or a["dropout_p"] != 0 or a["enable_gqa"] is not False or not isinstance(a["is_causal"], bool):
        return None
    if (a["attn_mask"] is not None and a["is_causal"]) or (a["scale"] is not None and not _is_num(a["scale"])):
        return None
    mask = None if a["attn_mask"] is None else _as_value(b, a["attn_mask"])  # a bias gathered from a table: a constant
    if a["attn_mask"] is not None and mask is None:
        return None
    scale = None if a["scale"] is None else float(a["scale"])
    return "attention", qkv + ([mask] if mask is not None else []), {"scale": scale, "causal": a["is_causal"]}, {}, None


def _einsum(b: _Builder, n: fx.Node, a: dict) -> Made:
    """``torch.einsum``; constant operands (a relative-position table) as ``constant`` nodes."""
    ts = a["tensors"] if isinstance(a["tensors"], (list, tuple)) else []
    if not any(_v(t) is not None for t in ts) or not isinstance(a["equation"], str):
        return None
    xs = [_as_value(b, t) for t in ts]
    return None if None in xs else ("einsum", xs, {"equation": a["equation"].replace(" ", "")}, {}, None)


def _expand(b: _Builder, n: fx.Node, a: dict) -> Made:
    x, size = _v(a["self"]), _ints(a["size"])
    return None if x is None or size is None else ("expand", [x], {"shape": size}, {}, None)


def _zeros_like(b: _Builder, n: fx.Node, a: dict) -> Made:
    """``torch.zeros_like(x)`` at the captured shape: a ``constant``."""
    info = _tensor_info(n.meta.get("val"))
    if _v(a["self"]) is None or info is None or a.get("memory_format") is not None:
        return None
    return "constant", [], {"dtype": info[1]}, {"value": torch.zeros(info[0], dtype=info[1])}, None


_END = 2**63 - 1  # aten's "to the end" (``x[a:]``)


def _bound(v: Any) -> Any:
    return None if v is None or (_is_int(v) and v >= _END) else v


def _slice(b: _Builder, n: fx.Node, a: dict) -> Made:
    x, start, end, step = _v(a["self"]), a["start"], _bound(a["end"]), a["step"]
    if x is None or not _is_int(a["dim"]) or not (start is None or _is_int(start)) or not (end is None or _is_int(end)) or not _is_int(step) or step < 1:
        return None
    return "slice", [x], {"axis": a["dim"], "start": start or 0, "end": end, "step": step}, {}, None


def _slice_scatter(b: _Builder, n: fx.Node, a: dict) -> Made:
    """``slice_scatter`` (a functionalized ``y[:, :c] = src``); a constant ``y`` or ``src`` as a ``constant`` node."""
    start, end, step = a["start"], _bound(a["end"]), a["step"]
    if not _is_int(a["dim"]) or not (start is None or _is_int(start)) or not (end is None or _is_int(end)) or not _is_int(step) or step < 1:
        return None
    if _v(a["self"]) is None and _v(a["src"]) is None:
        return None
    x, src = _as_value(b, a["self"]), _as_value(b, a["src"])
    if x is None or src is None:
        return None
    return "slice_scatter", [x, src], {"axis": a["dim"], "start": start or 0, "end": end, "step": step}, {}, None


def _split(b: _Builder, n: fx.Node, a: dict, index: int) -> Made:
    """``split.Tensor`` (also what ``chunk`` becomes) and ``split_with_sizes``: each result a ``slice``."""
    x, size = _v(a["self"]), a.get("split_size", a.get("split_sizes"))
    if x is None or not _is_int(a["dim"]):
        return None
    if _is_int(size) and size > 0:
        start, stop = index * size, (index + 1) * size
    elif _ints(size) is not None and index < len(size):
        start = sum(size[:index])
        stop = start + size[index]
    else:
        return None
    return "slice", [x], {"axis": a["dim"] % len(x.shape), "start": start, "end": stop, "step": 1}, {}, None


def _copy(b: _Builder, n: fx.Node, a: dict) -> Made:
    """``copy(dst, src)`` (from ``y[...] = src``): ``src`` broadcast to ``dst``'s shape in ``dst``'s dtype; the
    identity of ``src`` where it has them, ``expand`` where it broadcasts, a ``constant`` for a constant ``src``
    (DBB's ``output[:, :, 0:p, :] = pad_values``)."""
    info = _tensor_info(n.meta.get("val"))
    if info is None:
        return None
    shape, dtype = info
    src = a["src"]
    if isinstance(src, _Const):
        if not _broadcasts(tuple(src.tensor.shape), shape):
            return None
        return "constant", [], {"dtype": dtype}, {"value": src.tensor.expand(shape).to(dtype).clone()}, _owner(src)
    src = _v(src)
    if src is None or src.dtype != dtype:
        return None
    if src.shape == shape:
        return "identity", [src], {}, {}, None
    return ("expand", [src], {"shape": shape}, {}, None) if _broadcasts(src.shape, shape) else None


def _roll(b: _Builder, n: fx.Node, a: dict) -> Made:
    x, shifts, dims = _v(a["self"]), _ints(a["shifts"]), _ints(a["dims"])
    if x is None or shifts is None or dims is None or len(shifts) != len(dims) or not dims:
        return None
    return "roll", [x], {"shifts": shifts, "dims": dims}, {}, None


def _shuffle(op: str, name: str) -> Callable[..., Made]:
    def handler(b: _Builder, n: fx.Node, a: dict) -> Made:
        x = _v(a["self"])
        return None if x is None or len(x.shape) != 4 or not _is_int(a[name]) else (op, [x], {"factor": a[name]}, {}, None)

    return handler


def _unary(op: str) -> Callable[..., Made]:
    def handler(b: _Builder, n: fx.Node, a: dict) -> Made:
        x = _v(a["self"])
        if x is None:
            return None
        return op, [x], {"approximate": a["approximate"]} if op == "gelu" else {}, {}, None

    return handler


def _pad_op(x: Any, pad: Any, value: Any) -> Made:
    """Torch order ``(left, right, top, bottom, ...)`` to IR ``(top, bottom, left, right)``; last two axes only."""
    x, pad = _v(x), _ints(pad)
    value = 0.0 if value is None else value
    if x is None or len(x.shape) < 2 or pad is None or len(pad) not in (2, 4, 6, 8) or any(pad[4:]) or not _is_num(value):
        return None
    left, right, top, bottom = (*pad, 0, 0)[:4]
    return "pad", [x], {"pads": (top, bottom, left, right), "value": float(value)}, {}, None


def _pad(b: _Builder, n: fx.Node, a: dict) -> Made:
    made = _pad_op(a["self"], a["pad"], a["value"]) if a["mode"] == "constant" else None
    return made or _pad_nd(a["self"], a["pad"], a["mode"], a["value"])


def _constant_pad_nd(b: _Builder, n: fx.Node, a: dict) -> Made:
    return _pad_op(a["self"], a["pad"], a["value"]) or _pad_nd(a["self"], a["pad"], "constant", a["value"])


def _pad_nd(x: Any, pad: Any, mode: Any, value: Any) -> Made:
    """What ``pad`` cannot say (more axes: a channels-last map; reflect, replicate, circular): ``pad_nd``."""
    x, pad = _v(x), _ints(pad)
    value = 0.0 if value is None else value
    if x is None or pad is None or len(pad) % 2 or len(pad) // 2 > len(x.shape) or not _is_num(value):
        return None
    if mode not in ("constant", "reflect", "replicate", "circular"):
        return None
    return "pad_nd", [x], {"pads": pad, "mode": mode, "value": float(value)}, {}, None


def _avg_pool(b: _Builder, n: fx.Node, a: dict) -> Made:
    x, kernel, padding = _v(a["self"]), _pair(a["kernel_size"]), _pair(a["padding"])
    stride = kernel if a["stride"] in ([], (), None) else _pair(a["stride"])
    if x is None or len(x.shape) != 4 or None in (kernel, stride, padding) or a["divisor_override"] is not None:
        return None
    attrs = {"kernel": kernel, "stride": stride, "padding": padding, "ceil_mode": bool(a["ceil_mode"]), "count_include_pad": bool(a["count_include_pad"])}
    return "avg_pool2d", [x], attrs, {}, None


def _adaptive_avg(b: _Builder, n: fx.Node, a: dict) -> Made:
    """To size 1 a ``mean`` over the last two axes, else ``adaptive_avg_pool2d``."""
    x = _v(a["self"])
    if x is None or len(x.shape) < 3:
        return None
    if _pair(a["output_size"]) != (1, 1):
        return _adaptive("adaptive_avg_pool2d")(b, n, a)
    nd = len(x.shape)
    return "mean", [x], {"dims": (nd - 2, nd - 1), "keepdim": True}, {}, None


def _mean_dim(b: _Builder, n: fx.Node, a: dict) -> Made:
    x, dims = _v(a["self"]), _ints(a["dim"])
    if x is None or not dims or a["dtype"] is not None or not isinstance(a["keepdim"], bool):
        return None
    return "mean", [x], {"dims": dims, "keepdim": a["keepdim"]}, {}, None


def _mean_all(b: _Builder, n: fx.Node, a: dict) -> Made:
    x = _v(a["self"])
    if x is None or not x.shape or a["dtype"] is not None:
        return None
    return "mean", [x], {"dims": tuple(range(len(x.shape))), "keepdim": False}, {}, None


def _reshape(b: _Builder, n: fx.Node, a: dict) -> Made:
    x, shape = _v(a["self"]), _ints(a.get("size", a.get("shape")))
    return None if x is None or shape is None else ("reshape", [x], {"shape": shape}, {}, None)


def _to_shape(b: _Builder, n: fx.Node, a: dict) -> Made:
    """``unsqueeze``/``squeeze``: a reshape to the recorded shape (sizes are fixed here)."""
    x, info = _v(a["self"]), _tensor_info(n.meta.get("val"))
    return None if x is None or info is None else ("reshape", [x], {"shape": info[0]}, {}, None)


def _flatten(b: _Builder, n: fx.Node, a: dict) -> Made:
    x = _v(a["self"])
    if x is None or not (_is_int(a["start_dim"]) and _is_int(a["end_dim"])):
        return None
    return "flatten", [x], {"start": a["start_dim"], "end": a["end_dim"]}, {}, None


def _permute(b: _Builder, n: fx.Node, a: dict) -> Made:
    x, dims = _v(a["self"]), _ints(a["dims"])
    return None if x is None or dims is None else ("permute", [x], {"dims": dims}, {}, None)


def _transpose(b: _Builder, n: fx.Node, a: dict) -> Made:
    x = _v(a["self"])
    if x is None or not (_is_int(a["dim0"]) and _is_int(a["dim1"])):
        return None
    return "transpose", [x], {"dim0": a["dim0"], "dim1": a["dim1"]}, {}, None


def _cat(b: _Builder, n: fx.Node, a: dict) -> Made:
    """``torch.cat``; a constant operand (a class token, folded at the example's batch size) as a ``constant`` node."""
    ts = a["tensors"] if isinstance(a["tensors"], (list, tuple)) else []
    if not any(_v(t) is not None for t in ts) or not _is_int(a["dim"]):
        return None
    xs = [_as_value(b, t) for t in ts]
    if any(x is None for x in xs):
        return None
    return "concat", xs, {"axis": a["dim"] % len(xs[0].shape)}, {}, None


def _as_value(b: _Builder, x: Any) -> Value | None:
    """An activation, or a constant tensor as a ``constant`` node."""
    if isinstance(x, _Const):
        return b.add(Node.make("constant", [], {"dtype": x.tensor.dtype}, {"value": x.tensor}, _owner(x) or ""))
    return _v(x)


def _select(b: _Builder, n: fx.Node, a: dict) -> Made:
    x = _v(a["self"])
    if x is None or not (_is_int(a["dim"]) and _is_int(a["index"])):
        return None
    return "select", [x], {"axis": a["dim"], "index": a["index"]}, {}, None


def _softmax(b: _Builder, n: fx.Node, a: dict) -> Made:
    x = _v(a["self"])
    if x is None or not _is_int(a["dim"]) or a.get("dtype") is not None or a.get("half_to_float", False):
        return None
    return "softmax", [x], {"axis": a["dim"]}, {}, None


def _matmul(b: _Builder, n: fx.Node, a: dict) -> Made:
    x, y = _v(a["self"]), _v(a.get("other", a.get("mat2")))
    return None if x is None or y is None else ("matmul", [x, y], {}, {}, None)


def _identity(b: _Builder, n: fx.Node, a: dict) -> Made:
    """``clone``/``alias``/``detach``/``dropout(train=False)``: the same values."""
    x = _v(a["self"] if "self" in a else a["input"])
    if x is None or a.get("train", False) is not False:
        return None
    return "identity", [x], {}, {}, None


_HANDLERS: dict[Any, Callable[..., Made]] = {
    aten.conv2d.default: _conv,
    aten.conv2d.padding: _conv,
    aten.convolution.default: _convolution,
    aten.batch_norm.default: _batch_norm,
    aten.linear.default: _linear,
    aten.layer_norm.default: _layer_norm,
    aten.add.Tensor: _join("add"),
    aten.sub.Tensor: _join("sub"),
    aten.mul.Tensor: _mul,
    aten.mul.Scalar: _mul,
    aten.relu.default: _unary("relu"),
    aten.gelu.default: _unary("gelu"),
    aten.sigmoid.default: _unary("sigmoid"),
    aten.pad.default: _pad,
    aten.constant_pad_nd.default: _constant_pad_nd,
    aten.avg_pool2d.default: _avg_pool,
    aten.adaptive_avg_pool2d.default: _adaptive_avg,
    aten.mean.dim: _mean_dim,
    aten.mean.default: _mean_all,
    aten.view.default: _reshape,
    aten._unsafe_view.default: _reshape,
    aten.reshape.default: _reshape,
    aten.unsqueeze.default: _to_shape,
    aten.squeeze.dim: _to_shape,
    aten.squeeze.dims: _to_shape,
    aten.squeeze.default: _to_shape,
    aten.flatten.using_ints: _flatten,
    aten.permute.default: _permute,
    aten.transpose.int: _transpose,
    aten.cat.default: _cat,
    aten.select.int: _select,
    aten.softmax.int: _softmax,
    aten._softmax.default: _softmax,
    aten.matmul.default: _matmul,
    aten.bmm.default: _matmul,
    aten.mm.default: _matmul,
    aten.dropout.default: _identity,
    aten.clone.default: _identity,
    aten.alias.default: _identity,
    aten.detach.default: _identity,
    aten.contiguous.default: _identity,
    aten.add.Scalar: _join("add"),
    aten.sub.Scalar: _join("sub"),
    aten.rsub.Scalar: _rsub,
    aten.div.Tensor: _div,
    aten.div.Scalar: _div,
    aten.div.Tensor_mode: _div,
    aten.pow.Tensor_Scalar: _pow,
    aten.silu.default: _unary("silu"),
    aten.hardswish.default: _unary("hardswish"),
    aten.hardsigmoid.default: _unary("hardsigmoid"),
    aten.tanh.default: _unary("tanh"),
    aten.sqrt.default: _unary("sqrt"),
    aten.rsqrt.default: _unary("rsqrt"),
    aten.relu6.default: _clamp(0.0, 6.0),
    aten.hardtanh.default: _clamp(),
    aten.clamp.default: _clamp(),
    aten.clamp_min.default: _clamp(),
    aten.clamp_max.default: _clamp(),
    aten.sum.dim_IntList: _sum,
    aten.sum.default: _sum,
    aten.max_pool2d.default: _max_pool,
    aten.group_norm.default: _group_norm,
    aten.upsample_nearest2d.vec: _upsample("nearest"),
    aten._upsample_nearest_exact2d.vec: _upsample("nearest-exact"),
    aten.upsample_bilinear2d.vec: _upsample("bilinear"),
    aten.scaled_dot_product_attention.default: _attention,
    aten.einsum.default: _einsum,
    aten.slice.Tensor: _slice,
    aten.slice_scatter.default: _slice_scatter,
    aten.copy.default: _copy,
    aten.roll.default: _roll,
    aten.expand.default: _expand,
    aten.zeros_like.default: _zeros_like,
    aten.pixel_shuffle.default: _shuffle("pixel_shuffle", "upscale_factor"),
    aten.pixel_unshuffle.default: _shuffle("pixel_unshuffle", "downscale_factor"),
}

# Calls returning several tensors, mapped per ``getitem`` index (None: the generic way, see _Builder.getitem).
_MULTI_HANDLERS: dict[Any, Callable[..., Made]] = {
    aten._native_batch_norm_legit_no_training.default: _bn_no_training,
    aten.native_batch_norm.default: _native_bn,
    aten.native_layer_norm.default: _native_layer_norm,
    aten.unbind.int: _unbind,
    aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split,
    aten.max_pool2d_with_indices.default: _max_pool_values,
    aten.adaptive_max_pool2d.default: _adaptive("adaptive_max_pool2d"),
    aten.native_group_norm.default: _native_group_norm,
}
