"""The export front end's graph builder: the nodes of an exported program to IR nodes.

:class:`ProgramBuilder` walks the program once: placeholders become graph
inputs or cloned constants, each call is looked up in a handler table
(:mod:`~repalgebra.frontend.aten_handlers`, passed in) and becomes its op when
the op table infers the shape and dtype ``torch.export`` recorded, else an
``opaque`` call of the ATen overload; calls that read only constants are
computed once.  See :mod:`~repalgebra.frontend.aten` for the whole path.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

from repalgebra.frontend.builder import map_leaves
from repalgebra.frontend.calls import Buf, FnCall, In
from repalgebra.ir import Graph, Node, Value

aten = torch.ops.aten

__all__ = ["AtenCapture", "CaptureFailed", "ProgramBuilder", "Const", "Made", "module_path", "tensor_info"]


@dataclass
class AtenCapture:
    """What :func:`capture_export` returns."""

    graph: Graph  # inputs have the example inputs' shapes and dtypes
    output_spec: pytree.TreeSpec  # structure of the model's outputs; its leaves are the graph outputs
    notes: list[str] = field(default_factory=list)


class CaptureFailed(Exception):
    """The export path cannot capture this module; ``str(e)`` is the one-line reason (first line of torch's error)."""


# --------------------------------------------------------------------------- values while building


@dataclass(eq=False)
class Const:
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


def module_path(n: fx.Node) -> str:
    """The innermost module ``n`` was recorded in (``nn_module_stack`` values are ``(path, type)``)."""
    stack = n.meta.get("nn_module_stack")
    if not stack:
        return ""
    return str(list(stack.values())[-1][0])


def tensor_info(val: Any) -> tuple[tuple[int, ...], torch.dtype] | None:
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return tuple(int(s) for s in val.shape), val.dtype
    except Exception:  # an unbacked (data-dependent) size
        raise CaptureFailed(f"a tensor of data-dependent shape {tuple(val.shape)}: not capturable at fixed shapes") from None


def _leaves(a: Any) -> list[Any]:
    out: list[Any] = []
    map_leaves(a, out.append)
    return out


def _return(x: Any) -> Any:
    return x


Made = "tuple[str, list[Value], dict, dict, str | None] | None"  # op, inputs, attrs, params, source (None: module path)


class ProgramBuilder:
    """Maps the nodes of one exported program to IR nodes."""

    def __init__(self, ep: torch.export.ExportedProgram, handlers: dict, multi_handlers: dict) -> None:
        self.ep = ep
        self.handlers = handlers  # ATen overload -> handler (aten_handlers.HANDLERS)
        self.multi_handlers = multi_handlers  # for the parts of multi-output calls
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

    def model_tensor(self, spec: Any) -> Const:
        """The cloned tensor behind a parameter, buffer or lifted-constant placeholder."""
        target = spec.target
        if spec.kind == InputKind.CONSTANT_TENSOR:
            t, path = self.ep.constants[target], None
        else:  # non-persistent buffers live in ``constants``, not in ``state_dict``
            t = self.ep.state_dict[target] if target in self.ep.state_dict else self.ep.constants[target]
            path = target
        return Const(t.detach().clone(), path)

    def env_of(self, a: Any) -> Any:
        return map_leaves(a, lambda x: self.env[x] if isinstance(x, fx.Node) else x)

    def output_value(self, v: Any, n: fx.Node) -> Value:
        if isinstance(v, Value):
            return v
        if isinstance(v, Const):  # a model output that is a constant: a node that returns it
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
        info = tensor_info(val)
        if info is None:
            return self.non_tensor(n, val)
        handler = self.handlers.get(n.target)
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
        info = tensor_info(n.meta.get("val"))
        if not isinstance(src, _Multi) or info is None:
            return self.opaque(n, operator.getitem, (src, index), {}, info)
        handler = self.multi_handlers.get(src.node.target)
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
        paths = [x.path for x in _leaves((args, kwargs)) if isinstance(x, Const) and x.path]
        real = lambda a: map_leaves(a, lambda x: x.tensor if isinstance(x, Const) else x)  # noqa: E731
        try:
            with torch.no_grad():
                result = n.target(*real(args), **real(kwargs))
        except Exception:  # it runs at fixed shapes only inside the program: carry it
            return _NOT_FOLDED
        path = paths[0] if paths else None
        return map_leaves(result, lambda t: Const(t, path) if isinstance(t, torch.Tensor) else t)

    def non_tensor(self, n: fx.Node, val: Any) -> Any:
        if val is None and not n.users:  # a run-time check (asserts on metadata or values)
            if n.target is not aten._assert_tensor_metadata.default:
                self.notes.append(f"{n.format_node()} at {module_path(n)!r}: a run-time check, dropped")
            return None
        if isinstance(val, (int, float, bool)) and not isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return val  # a size read at the example's shapes: a literal here
        raise CaptureFailed(f"{n.format_node()} at {module_path(n)!r} gives {type(val).__name__}, not a tensor (a data-dependent value?)")

    def emit(self, n: fx.Node, made: Any, info: tuple[tuple[int, ...], torch.dtype]) -> Value | None:
        """The mapped node, if the op table agrees with torch.export on its shape and dtype."""
        op, inputs, attrs, params, source = made
        where = source or module_path(n)
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
            if isinstance(x, Const):
                if id(x) not in consts:
                    consts[id(x)] = (f"c{len(consts)}", x.tensor)
                return Buf(consts[id(x)][0])
            return x

        a, k = map_leaves(args, leaf), map_leaves(kwargs, leaf)
        fn = FnCall("call_function", target, a, k, dict(consts.values()))
        shape, dtype = info if info is not None else (None, None)
        name = str(target) if target is not operator.getitem else "getitem"
        self.opaque_ops[name] = self.opaque_ops.get(name, 0) + 1
        return self.add(Node.make("opaque", inputs, {"fn": fn, "out_shape": shape, "out_dtype": dtype}, {}, module_path(n), name=n.name))


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
