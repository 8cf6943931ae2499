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
  scalar multiplies as ``scale``, relu/gelu/sigmoid, constant pads, average
  pools and means, reshapes, permutes, concat, select, softmax, layer norm,
  matmul, identities) map to their op, after checking that the op table infers
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
    """``a + b`` / ``a - b`` of two activations of one shape; ``x + 0`` and ``x - 0`` are the identity."""

    def handler(b: _Builder, n: fx.Node, a: dict) -> Made:
        x, y = a["self"], a["other"]
        if a.get("alpha", 1) != 1 or _v(x) is None:
            return None
        if _is_num(y) and y == 0:
            return "identity", [x], {}, {}, None
        if _v(y) is None or x.shape != y.shape:
            return None
        return op, [x, y], {}, {}, None

    return handler


def _scalar_axis(shape: tuple[int, ...]) -> int:
    """The axis a scalar multiply is written along: channels of an image, else the last (feature) axis."""
    return 1 if len(shape) == 4 else len(shape) - 1


def _channel_axis(const_shape: tuple[int, ...], x_shape: tuple[int, ...]) -> int | None:
    """The axis of ``x`` along which a constant of ``const_shape`` varies, if it is a per-channel vector.

    (A private copy of the fx front end's rule: the two must agree on which multiplies are a ``scale``.)
    """
    if len(const_shape) > len(x_shape):
        return None
    offset = len(x_shape) - len(const_shape)
    varying = [offset + j for j, s in enumerate(const_shape) if s != 1]
    if len(varying) != 1 or const_shape[varying[0] - offset] != x_shape[varying[0]]:
        return None
    return varying[0]


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
            axis = _scalar_axis(x.shape)
            vec = t.reshape(()).expand(x.shape[axis]).clone()
        else:
            axis = _channel_axis(tuple(t.shape), x.shape)
            vec = None if axis is None else t.reshape(-1)
        return None if axis is None else ("scale", [x], {"axis": axis}, {"scale": vec}, None)
    if _is_num(c):
        axis = _scalar_axis(x.shape)
        return "scale", [x], {"axis": axis}, {"scale": torch.full((x.shape[axis],), float(c), dtype=x.dtype)}, None
    return None


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
    return None if a["mode"] != "constant" else _pad_op(a["self"], a["pad"], a["value"])


def _constant_pad_nd(b: _Builder, n: fx.Node, a: dict) -> Made:
    return _pad_op(a["self"], a["pad"], a["value"])


def _avg_pool(b: _Builder, n: fx.Node, a: dict) -> Made:
    x, kernel, padding = _v(a["self"]), _pair(a["kernel_size"]), _pair(a["padding"])
    stride = kernel if a["stride"] in ([], (), None) else _pair(a["stride"])
    if x is None or len(x.shape) != 4 or None in (kernel, stride, padding) or a["divisor_override"] is not None:
        return None
    attrs = {"kernel": kernel, "stride": stride, "padding": padding, "ceil_mode": bool(a["ceil_mode"]), "count_include_pad": bool(a["count_include_pad"])}
    return "avg_pool2d", [x], attrs, {}, None


def _adaptive_avg(b: _Builder, n: fx.Node, a: dict) -> Made:
    x = _v(a["self"])
    if x is None or len(x.shape) < 3 or _pair(a["output_size"]) != (1, 1):
        return None
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
    xs = [_v(t) for t in a["tensors"]] if isinstance(a["tensors"], (list, tuple)) else []
    if not xs or any(x is None for x in xs) or not _is_int(a["dim"]):
        return None
    return "concat", xs, {"axis": a["dim"] % len(xs[0].shape)}, {}, None


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
}

# Calls returning several tensors, mapped per ``getitem`` index (None: the generic way, see _Builder.getitem).
_MULTI_HANDLERS: dict[Any, Callable[..., Made]] = {
    aten._native_batch_norm_legit_no_training.default: _bn_no_training,
    aten.native_batch_norm.default: _native_bn,
    aten.native_layer_norm.default: _native_layer_norm,
    aten.unbind.int: _unbind,
}
