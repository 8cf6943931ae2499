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
from typing import Any, Callable

import torch
from torch import fx
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

from repalgebra.frontend.builder import map_leaves, literal_output
from repalgebra.frontend.calls import Buf, DtypeLimit, FnCall, In, constant_call
from repalgebra.frontend.height_one import lift_height_one
from repalgebra.frontend.layout_reads import drop_unread_layouts
from repalgebra.frontend.inputs import shapes_and_dtypes
from repalgebra.ir import Graph, Node, Value

aten = torch.ops.aten

__all__ = ["AtenCapture", "BatchBound", "CaptureFailed", "ProgramBuilder", "Const", "Sym", "Made", "module_path", "symbolic", "tensor_info"]


@dataclass
class AtenCapture:
    """What :func:`capture_export` returns."""

    graph: Graph  # inputs have the example inputs' shapes and dtypes
    output_spec: pytree.TreeSpec  # structure of the model's outputs; its leaves are the graph outputs
    notes: list[str] = field(default_factory=list)
    batch_free: bool = False  # valid at any batch size (exported with a symbolic batch, no size read as a number)
    reads_plain: bool = False  # reads a lifted constant: a tensor neither a parameter nor a buffer (Capture.reads_plain)
    autocast_off: tuple[str, ...] = ()  # devices the forward turned autocast off on (Capture.autocast_off)


class CaptureFailed(Exception):
    """The export path cannot capture this module; ``str(e)`` is the one-line reason (first line of torch's error)."""


class BatchBound(Exception):
    """A program exported with a symbolic batch reads the batch size where the graph cannot keep it symbolic.

    ``str(e)`` says where; :func:`~repalgebra.frontend.aten.capture_export` then captures at fixed shapes.
    """


# --------------------------------------------------------------------------- values while building


@dataclass(eq=False)
class Const:
    """A constant tensor (cloned parameter, buffer or lifted constant, or computed from them)."""

    tensor: torch.Tensor
    path: str | None  # its FQN (``stages.0.conv.weight``) when it is a model tensor
    trainable: bool = False  # a parameter that requires gradients, read as it is (see builder.Const)
    empty: fx.Node | None = None  # the ``torch.empty`` call that made it: its values are whatever memory held
    own: bool = False  # the model's parameter or buffer itself, read as it is (see builder.Const)


def constant_output(v: Const) -> dict:
    """The attributes of an ``opaque`` node returning ``v`` as a model output: the model's own tensor itself, or a
    copy per call of one computed from them (the model makes it anew on each call; see ``backend.torch._unaliased``)."""
    return {"fn": constant_call(v.tensor, copied=not v.own), "out_shape": tuple(v.tensor.shape), "out_dtype": v.tensor.dtype}


@dataclass(frozen=True)
class Sym:
    """A size the program computes from the symbolic batch (``x.shape[0]``, ``B * N``), by its value here.

    Only the handlers in ``sized`` may read one: they take the symbolic sizes from the recorded output instead.
    """

    value: int  # at the example inputs' batch size


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


def tensor_info(val: Any, size: Callable[[Any], int] = int) -> tuple[tuple[int, ...], torch.dtype] | None:
    """``(shape, dtype)`` of a recorded tensor, its sizes made concrete by ``size``; None for non-tensors."""
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(size(s) for s in val.shape), val.dtype


def _leaves(a: Any) -> list[Any]:
    out: list[Any] = []
    map_leaves(a, out.append)
    return out


Made = "tuple[str, list[Value], dict, dict, str | None] | None"  # op, inputs, attrs, params, source (None: module path)


class ProgramBuilder:
    """Maps the nodes of one exported program to IR nodes."""

    def __init__(self, ep: torch.export.ExportedProgram, handlers: dict, multi_handlers: dict, sized: frozenset = frozenset()) -> None:
        self.ep = ep
        self.handlers = handlers  # ATen overload -> handler (aten_handlers.HANDLERS)
        self.multi_handlers = multi_handlers  # for the parts of multi-output calls
        self.sized = sized  # overloads whose handler reads sizes from the recorded output (symbolic batch allowed)
        self.env: dict[fx.Node, Any] = {}
        self.nodes: list[Node] = []
        self.notes: list[str] = []
        self.opaque_ops: dict[str, int] = {}
        self.batch: Any = None  # the batch's sympy symbol, when the program was exported with a symbolic batch
        self.batch_size = 0  # its value at the example inputs
        self.batch_ref: Value | None = None  # the graph input whose axis 0 is the batch

    # -- sizes --------------------------------------------------------------------------

    def size(self, s: Any) -> int:
        """A recorded size at the example inputs (a symbolic batch size evaluated at the example's batch)."""
        if not isinstance(s, torch.SymInt):
            return int(s)
        expr = s.node.expr
        if self.batch is None or not expr.free_symbols <= {self.batch}:
            raise CaptureFailed(f"a tensor of data-dependent size {expr}: not capturable at fixed shapes")
        return int(expr.xreplace({self.batch: self.batch_size}))

    def info(self, n: fx.Node) -> tuple[tuple[int, ...], torch.dtype] | None:
        """``(shape, dtype)`` ``torch.export`` recorded for ``n``, at the example inputs."""
        return tensor_info(n.meta.get("val"), self.size)

    def holds_batch(self, n: fx.Node) -> bool:
        """Whether the tensor ``n`` computes has a size that follows the symbolic batch."""
        val = n.meta.get("val")
        return isinstance(val, torch.Tensor) and any(symbolic(s) for s in val.shape)

    def batch_sizes(self, n: fx.Node) -> tuple | None:
        """``n``'s recorded shape as ``reshape_dyn`` sizes (the batch read from :attr:`batch_ref`); None if static.

        A size ``c * batch`` becomes the factors ``((0, 0), c)``; any other expression of the batch is refused.
        """
        if not self.holds_batch(n):
            return None
        sizes: list[Any] = []
        for s in n.meta["val"].shape:
            if not symbolic(s):
                sizes.append(int(s))
                continue
            coeff, rest = s.node.expr.as_coeff_Mul()
            if rest != self.batch or not coeff.is_Integer or coeff < 1:
                raise BatchBound(f"{n.target} at {module_path(n)!r} makes a size {s.node.expr} of the batch")
            sizes.append(((0, 0),) if coeff == 1 else ((0, 0), int(coeff)))
        return tuple(sizes)

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
                    val = n.meta.get("val")
                    if self.batch is None and isinstance(val, torch.Tensor) and val.dim() and symbolic(val.shape[0]):
                        self.batch, self.batch_size, self.batch_ref = val.shape[0].node.expr, t.shape[0], v
                else:
                    self.env[n] = self.model_tensor(spec)
            elif n.op == "call_function":
                self.env[n] = self.call(n)
            elif n.op == "output":
                outs = [self.output_value(self.env_of(a), n) for a in n.args[0]]
                spec = self.ep.call_spec.out_spec
                shapes = shapes_and_dtypes(inputs)
                if self.batch is None:
                    notes = [f"captured with torch.export at input shape(s) {shapes}: sizes are specialized to them"]
                else:
                    notes = [f"captured with torch.export at input shape(s) {shapes} with a symbolic batch: other sizes are specialized"]
                notes += self.notes
                if self.opaque_ops:
                    listed = ", ".join(f"{k} x{c}" if c > 1 else k for k, c in sorted(self.opaque_ops.items()))
                    notes.append(f"carried through unchanged (no op in the table): {listed}")
                graph = lift_height_one(drop_unread_layouts(Graph(inputs, self.nodes, outs)))
                graph.eliminate_dead()  # a value a handler read past (a Conv1d's flatten, its BatchNorm1d moved before it)
                lifted = any(s.kind == InputKind.CONSTANT_TENSOR for s in sig.input_specs)
                return AtenCapture(graph, spec, notes, batch_free=self.batch is not None, reads_plain=lifted)
        raise AssertionError("exported program without output")

    def model_tensor(self, spec: Any) -> Const:
        """The cloned tensor behind a parameter, buffer or lifted-constant placeholder."""
        target = spec.target
        if spec.kind == InputKind.CONSTANT_TENSOR:
            t, path = self.ep.constants[target], None
        else:  # non-persistent buffers live in ``constants``, not in ``state_dict``
            t = self.ep.state_dict[target] if target in self.ep.state_dict else self.ep.constants[target]
            path = target
        trainable = spec.kind == InputKind.PARAMETER and t.requires_grad
        return Const(t.detach().clone(), path, trainable=trainable, own=spec.kind != InputKind.CONSTANT_TENSOR)

    def env_of(self, a: Any) -> Any:
        return map_leaves(a, lambda x: self.env[x] if isinstance(x, fx.Node) else x)

    def output_value(self, v: Any, n: fx.Node) -> Value:
        if isinstance(v, Value):
            return v
        if isinstance(v, Const) and v.empty is not None:  # an uninitialised torch.empty returned: refused
            _refuse_empty(v)
        if isinstance(v, Const):  # a model output that is a constant: a node that returns it
            return self.add(Node.make("opaque", [], constant_output(v), {}, (v.path or "").rpartition(".")[0], name=n.name))
        if v is None or type(v) in (int, float, bool, str):  # a size here is one the shape guard fixes
            return self.add(Node.make("opaque", [], literal_output(v), {}, "", name=n.name))
        raise CaptureFailed(f"model outputs must be tensors, sizes or None; one output is {type(v).__name__} ({v!r})")

    def add(self, node: Node) -> Value:
        self.nodes.append(node)
        return node.out

    # -- one call -----------------------------------------------------------------------

    def call(self, n: fx.Node) -> Any:
        if self.batch is not None and symbolic(n.meta.get("val")):
            return self.non_tensor(n, n.meta["val"])  # size arithmetic on the batch (``B * 9``)
        args, kwargs = self.env_of(n.args), self.env_of(n.kwargs)
        if n.target is operator.getitem:
            return self.getitem(n, *args)
        self.check_empties(n, args, kwargs)
        found = _leaves((args, kwargs))
        reads_batch = any(isinstance(x, Sym) for x in found)
        if reads_batch:
            if n.target not in self.sized:
                raise BatchBound(f"{n.target} at {module_path(n)!r} reads the batch size as a number")
            args, kwargs = (map_leaves(a, lambda x: x.value if isinstance(x, Sym) else x) for a in (args, kwargs))
            found = _leaves((args, kwargs))
        if not reads_batch and not any(isinstance(x, (Value, _Multi)) for x in found) and not _seeded(n.target):
            folded = self.fold(n, args, kwargs)
            if folded is not _NOT_FOLDED:
                return folded
        val = n.meta.get("val")
        if isinstance(val, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in val):
            return _Multi(n, args, kwargs)
        info = self.info(n)
        if info is None:
            return self.non_tensor(n, val)
        handler = self.handlers.get(n.target)
        a = _bind(n.target, args, kwargs) if handler is not None else None
        made = handler(self, n, a) if a is not None else None
        if made is not None:
            out = self.emit(n, made, info)
            if out is not None:
                return out
        if reads_batch:  # carried through, it would keep the example's batch size
            raise BatchBound(f"{n.target} at {module_path(n)!r} reads the batch size and has no op to keep it symbolic")
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
        info = self.info(n)
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
        empty = n if _uninitialised(n.target, result) else None
        return map_leaves(result, lambda t: Const(t, path, empty=empty) if isinstance(t, torch.Tensor) else t)

    def check_empties(self, n: fx.Node, args: tuple, kwargs: dict) -> None:
        """Refuse the capture where ``n`` reads the values of an uninitialised ``torch.empty`` (a folded constant).

        Computed once like any call of constants, it would freeze whatever memory held (garbage, NaN and Inf,
        another in every capture) into the fused model.  An argument ``n`` does not read the values of
        (:func:`_unread`: ``fill``, ``copy``, ``baddbmm`` at ``beta=0``) stays the constant, which no node then
        holds; any other read refuses (:func:`_refuse_empty`), and the module is kept whole (its children fused):
        the model's own code makes the tensor on every call.
        """
        if not any(isinstance(x, Const) and x.empty is not None for x in _leaves((args, kwargs))):
            return
        unread = _unread(n.target, args, kwargs)
        read = [a for k, a in list(enumerate(args)) + list(kwargs.items()) if k not in unread]
        for x in _leaves(read):
            if isinstance(x, Const) and x.empty is not None:
                _refuse_empty(x)

    def non_tensor(self, n: fx.Node, val: Any) -> Any:
        if val is None and not n.users:  # a run-time check (asserts on metadata or values)
            if n.target is not aten._assert_tensor_metadata.default:
                self.notes.append(f"{n.format_node()} at {module_path(n)!r}: a run-time check, dropped")
            return None
        if isinstance(val, (int, float, bool)) and not isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return val  # a size read at the example's shapes: a literal here
        if isinstance(val, torch.SymInt) and self.batch is not None and val.node.expr.free_symbols <= {self.batch}:
            return Sym(self.size(val))  # a size computed from the batch: only reshapes may read it
        if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)) and self.batch is not None:
            raise BatchBound(f"{n.format_node()} at {module_path(n)!r} computes {type(val).__name__} {val} from the batch size")
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
        trainable: set[str] = set()

        def leaf(x: Any) -> Any:
            if isinstance(x, _Multi):
                if x.value is None:
                    x.value = self.opaque(x.node, x.node.target, x.args, x.kwargs, None)
                x = x.value
            if isinstance(x, Const) and x.empty is not None:  # not held as a buffer of garbage: refused
                _refuse_empty(x)
            if isinstance(x, Value):
                if id(x) not in index:
                    index[id(x)] = len(inputs)
                    inputs.append(x)
                return In(index[id(x)])
            if isinstance(x, Const):
                if id(x) not in consts:
                    consts[id(x)] = (f"c{len(consts)}", x.tensor)
                    if x.trainable:
                        trainable.add(consts[id(x)][0])
                return Buf(consts[id(x)][0])
            return x

        # A float at its dtype's limit is torch.finfo(x.dtype).min/max of the model's code (masking scores before a
        # softmax): it follows the input's dtype, so casting the fused module keeps it in range.
        first = next((v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, Value) and v.dtype is not None and v.dtype.is_floating_point), None)
        limits = {getattr(torch.finfo(first.dtype), w): w for w in ("min", "max")} if first is not None else {}

        def literal(x: Any) -> Any:
            if type(x) is float and x in limits:
                return DtypeLimit(leaf(first).index, limits[x])
            return leaf(x)

        a, k = map_leaves(args, literal), map_leaves(kwargs, literal)
        fn = FnCall("call_function", target, a, k, dict(consts.values()), trainable=trainable)
        shape, dtype = info if info is not None else (None, None)
        name = str(target) if target is not operator.getitem else "getitem"
        self.opaque_ops[name] = self.opaque_ops.get(name, 0) + 1
        return self.add(Node.make("opaque", inputs, {"fn": fn, "out_shape": shape, "out_dtype": dtype}, {}, module_path(n), name=n.name))


_NOT_FOLDED = object()


def symbolic(s: Any) -> bool:
    """Whether ``s`` (a size, or a recorded value) is a symbolic size of the capture: one that holds the batch."""
    return isinstance(s, torch.SymInt) and bool(s.node.expr.free_symbols)


# Calls whose result holds whatever memory held: never computed ahead into a constant that is read (see check_empties).
_UNINITIALISED = frozenset({aten.empty.memory_format, aten.empty_like.default, aten.new_empty.default,
                            aten.empty_strided.default, aten.new_empty_strided.default, aten.empty_permuted.default})

# Calls that read no value of their ``self`` (only its shape, dtype, device): they overwrite it, or take its metadata.
_OVERWRITES = frozenset({aten.fill.Scalar, aten.fill.Tensor, aten.zero.default, aten.copy.default,
                         aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
                         aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default, aten.new_full.default})

# Calls that do not read ``self`` at ``beta=0``: ``beta input + alpha (b1 @ b2)``.
_BETA_SCALED = frozenset({aten.baddbmm.default, aten.addbmm.default, aten.addmm.default, aten.addmv.default})


def _uninitialised(target: Any, result: Any) -> bool:
    """Whether ``result`` of a call of ``target`` holds values no one wrote: a ``torch.empty`` with elements."""
    return target in _UNINITIALISED and isinstance(result, torch.Tensor) and result.numel() > 0


def _refuse_empty(c: Const) -> None:
    """Raise :class:`CaptureFailed` for a read of ``c``, an uninitialised ``torch.empty``, naming where it was made."""
    n = c.empty
    raise CaptureFailed(f"{n.target} at {module_path(n)!r} makes a tensor whose values a later call reads before anything "
                        "writes them (an uninitialised torch.empty): kept whole, not frozen into a constant of garbage")


def _unread(target: Any, args: tuple, kwargs: dict) -> set[int | str]:
    """The positions and keywords of ``target``'s arguments whose values the call does not read (``self`` of
    :data:`_OVERWRITES`, and of :data:`_BETA_SCALED` at ``beta=0``)."""
    bound = _bind(target, args, kwargs)
    if bound is None or "self" not in bound:
        return set()
    if target in _OVERWRITES or (target in _BETA_SCALED and bound.get("beta") == 0):
        return {0} if args else {"self"}
    return set()


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
