"""fx graph to IR: :class:`Builder` maps each fx node of a traced model to a :class:`~repalgebra.ir.Node`.

A call whose module or function has a handler (looked up in the
:class:`Handlers` tables it is given) becomes that handler's op; every other
call becomes an ``opaque`` node carrying it through unchanged: the module
itself, or a :class:`~repalgebra.frontend.calls.FnCall` that makes the
call.  Calls that return sizes (``x.shape[1]``) become
:class:`~repalgebra.frontend.calls.SymExpr` shape expressions, re-evaluated
where they are used.  Output shapes come from the op table and from running
the other calls on meta tensors, or from one real run when meta tensors fail
(:class:`NeedsRealRun`).
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from repalgebra.frontend.calls import Buf, FnCall, In, SymExpr, constant_call, invoke, meta_of, returned, runs_on_meta, squeeze_to_rank
from repalgebra.frontend.fx_trace import READ_IN, TensorInfo, autocast_left_off, input_free, recognised, summarize
from repalgebra.frontend.height_one import lift_height_one
from repalgebra.frontend.layout_reads import drop_unread_layouts
from repalgebra.frontend.inplace import KEEPS_DTYPE, MADE_CONSTANT, hidden_writes, versions
from repalgebra.frontend.size_tests import taken_as_traced
from repalgebra.frontend.pure import FACTORIES, is_pure
from repalgebra.frontend.shapes import reroute_shape_reads, size_source, window_axis, window_size
from repalgebra.ir import Graph, Node, Value, upstream
from repalgebra.rewrite import LeftAlone

# A handler gets (builder, fx node, target, args, kwargs) with fx nodes replaced by
# Values / Consts / SymExprs / literals, and returns (op, inputs, attrs, params, source)
# or None to carry the call through as an opaque node.
Made = "tuple[str, list[Value], dict, dict, str] | None"
Handler = Callable[..., Any]  # (Builder, fx.Node, target, args, kwargs) -> Made


@dataclass(frozen=True)
class Handlers:
    """Where :class:`Builder` looks calls up."""

    modules: Mapping[type, Handler]  # by the module's recognised class (fx_trace.recognised)
    functions: Mapping[Any, Handler]  # by function, or ("method", name) for a method call
    trusted: tuple = ()  # functions whose op the table describes exactly: not run on meta tensors (slow)


@dataclass(eq=False)
class Const:
    """A tensor of the model read by a call (``self.layer_scale``), cloned.  ``plain``: neither a parameter nor a
    buffer (a plain attribute, or a tensor ``forward`` makes from numbers), which a cast of the model leaves as it is:
    the fused module holds it the same way (:class:`~repalgebra.frontend.calls.FnCall`, the ``constant`` op)."""

    tensor: torch.Tensor
    path: str
    plain: bool = False
    # A parameter that requires gradients, read as it is: a parameter of the fused module.  Not one computed from
    # parameters (a relative-position bias gathered from its table): training it would not train the table, and a
    # mask that requires gradients sends scaled_dot_product_attention down a slower path.
    trainable: bool = False
    # The model's tensor itself, as reading it returns it (``self.w``), not one computed from it (``self.w.exp()``):
    # a model that returns it returns its own tensor, and the fused module returns its own too.  One computed is
    # made anew by each call of the model, and the fused module returns a copy of what it holds (see ``to_module``).
    own: bool = False


_NONE = object()  # Builder.info: the call returned None in the real run


class NeedsRealRun(Exception):
    """A call could not run on meta tensors; its shape needs a real run."""


class SizeReadInside(TypeError):
    """:func:`size_test_at_inputs`'s refusal, with ``fn``: the plain function of the model's code the read was taken
    in (:func:`~repalgebra.frontend.fx_trace.reading_function`), None where ``forward`` or a method took it.  The
    front end traces again with ``fn`` carried as a call (:func:`~repalgebra.frontend.torch.trace_model`)."""

    fn: Callable[..., Any] | None = None
    path: str = ""  # the module whose code took the read ("" for the model's own forward)


class Builder:
    """Maps the fx nodes of one traced model to IR nodes.

    Shapes come from a real run (``record``: per fx node a tensor's shape and
    dtype or a non-tensor's value) or, without one, from the op table for the
    ops it maps and from running the other calls on meta tensors (``example``:
    per fx node a meta tensor or a value); a call that cannot run on meta
    tensors raises :class:`NeedsRealRun`.
    """

    def __init__(self, root: nn.Module, handlers: Handlers, record: dict[fx.Node, Any] | None = None, prefix: str = "",
                 carry_reads: bool = True) -> None:
        self.root = root
        self.handlers = handlers
        self.prefix = prefix  # the wrapper's child name when the model was wrapped (see fx_trace.Root)
        # a plain function of the model's code that reads sizes computed inside is carried rather than checked per call
        # (see checks_of); False where carrying it failed
        self.carry_reads = carry_reads
        self.record = record
        self.example: dict[fx.Node, Any] = {}
        self.nodes: list[Node] = []
        self.env: dict[fx.Node, Any] = {}
        self.left_alone: list[LeftAlone] = []
        self.notes: list[str] = []
        # torch._assert calls on sizes read at run time (and the trace's tests of sizes): (args, kwargs, where, the
        # function, the model's function a test of sizes was taken in), see checks_of
        self.asserts: list[tuple[tuple, dict, str, Any, Any]] = []
        self.input_checks: list[tuple[FnCall, tuple[int, ...], str]] = []
        # floating tensors read that are neither parameters nor buffers: (where, dtype), see pinned_tensor
        self.pinned: list[tuple[str, torch.dtype]] = []
        # floating tensors written into in place by an op made out of place: (where, dtype), see in_dtype_of_its_target
        self.kept: list[tuple[str, torch.dtype]] = []
        # a tensor read that is neither a parameter nor a buffer: a value a run may have left (a hook's stored output)
        self.reads_plain = False
        # pure calls on the model's tensors made once, at capture, that compute (not views): kernels forward builds
        self.precomputed = 0
        # fx nodes computed without an input, and those of them that read the model's tensors (read_by_constants_only)
        self._input_free: set[fx.Node] = set()
        self._weights_only: set[fx.Node] | None = None

    # -- driver -------------------------------------------------------------------------

    def build(self, fx_graph: fx.Graph, placeholders: list[fx.Node], inputs: tuple) -> tuple[Graph, pytree.TreeSpec]:
        graph_inputs = []
        for n in fx_graph.nodes:
            if n.op == "placeholder":
                if n in placeholders:
                    t = inputs[placeholders.index(n)]
                    # (named as forward names it: fx calls ``nn.Sequential``'s ``input`` ``input_1``)
                    v = Graph.input(n.target if str(n.target).isidentifier() else n.name, tuple(t.shape), t.dtype)
                    graph_inputs.append(v)
                    self.env[n] = v
                    self.example[n] = meta_of(t)
                elif str(n.target).startswith("**"):  # the **kwargs of the example call: none
                    self.env[n] = self.example[n] = {}
                else:  # a baked-in default (concrete_args)
                    self.env[n] = self.example[n] = n.args[0] if n.args else None
            elif n.op == "get_attr":
                obj = _fetch(self.root, n.target)
                self.refuse_written(n.target)
                if (pinned := pinned_tensor(self.root, n.target, obj, self.path)) is not None:
                    self.pinned.append(pinned)
                plain = _is_plain(self.root, n.target)
                self.reads_plain |= plain and torch.is_tensor(obj)
                trainable = isinstance(obj, nn.Parameter) and obj.requires_grad
                own = not traced_constant(n.target)
                self.env[n] = Const(obj.detach().clone(), self.path(n.target), plain, trainable, own) if torch.is_tensor(obj) else obj
                self.example[n] = meta_of(obj)
            elif n.op == "call_module":
                self.env[n] = self.call(n, "call_module", self.root.get_submodule(n.target))
            elif n.op in ("call_function", "call_method"):
                self.env[n] = self.call(n, n.op, n.target)
                if n.meta.get(KEEPS_DTYPE):
                    self.env[n] = self.in_dtype_of_its_target(n, self.env[n])
            elif n.op == "output":
                out = self.args(self.unpacked(n.args[0]))
                leaves, spec = pytree.tree_flatten(out)
                values = [self.as_value(v, n) for v in leaves]
                self.input_checks = self.checks_of(graph_inputs)
                graph = lift_height_one(drop_unread_layouts(Graph(graph_inputs, self.nodes, values)))
                reroute_shape_reads(graph)
                # A call read only through ops that replaced its reads (the tuple of ``x.chunk(2)`` whose
                # parts became ``chunk`` ops, a constant's ``w[:, None, None]`` folded into a ``scale``).
                graph.eliminate_dead()
                return graph, spec
        raise AssertionError("fx graph without output")

    def in_dtype_of_its_target(self, n: fx.Node, out: Any) -> Any:
        """``out``, the value of an in-place op made out of place, cast to the dtype of the tensor it wrote into
        where the out-of-place op promotes (``y += c`` of a float32 ``y`` and a float64 ``c``)."""
        target = self.env.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        if _kept_narrower(target, out):
            # The model keeps that dtype in other dtypes too (after fused.double(), a float32 sum made by
            # torch.zeros, += a float64 term): the fused model holds in no wider dtype (see fuse._guard_pinned).
            self.kept.append((f"a tensor {self.source(n) or 'the model'}'s forward writes into in place", target.dtype))
        if (dtype := promoted_from(out, target)) is None:
            return out
        cast = self.add("cast", [out], {"dtype": dtype}, {}, self.source(n))
        self.example[n] = torch.empty(cast.shape, dtype=cast.dtype, device="meta")
        return cast

    def unpacked(self, template: Any) -> Any:
        """The output template with each call that returns a tuple or list of tensors (an LSTM's ``(h_n, c_n)``,
        returned as it came; ``torch.topk``'s values and indices) opened into its items: the output structure then
        has a tensor at each leaf."""

        def open_up(a: Any) -> Any:
            example = self.example.get(a) if isinstance(a, fx.Node) else None
            if not (type(example) in (tuple, list) or pytree.is_structseq_instance(example)) or not all(
                torch.is_tensor(t) for t in pytree.tree_leaves(example)
            ):
                return a
            graph = a.graph
            with graph.inserting_after(a):
                items = [graph.call_function(operator.getitem, (a, k)) for k in range(len(example))]
            for item, value in zip(items, example):
                item.meta = dict(a.meta)
                self.example[item] = value
                self.env[item] = self.call(item, "call_function", operator.getitem)
            return type(example)(open_up(item) for item in items)

        return fx.node.map_aggregate(template, open_up) if isinstance(template, (tuple, list, dict)) else open_up(template)

    def checks_of(self, graph_inputs: list[Value]) -> list[tuple[FnCall, tuple[int, ...], str]]:
        """The model's ``torch._assert`` calls on its inputs' sizes (timm's ``_assert(H % 32 == 0, ...)``) as calls
        ``fuse`` makes before each call of the fused graph, which holds no op for them: it would run where the model
        refuses.  One on a value computed inside is noted: the fused model does not check it.  The trace's tests of
        sizes (:mod:`~repalgebra.frontend.size_tests`) are checks too: see :func:`size_test_at_inputs`."""
        checks = []
        position = {id(g): k for k, g in enumerate(graph_inputs)}
        for args, kwargs, source, target, read_in in self.asserts:
            if target is taken_as_traced:
                try:
                    if read_in is not None and self.carry_reads and reads_inside((args, kwargs), lambda v: id(v) in position):
                        # carried, it runs as written at any size; checked, the fused model refuses the sizes that
                        # answer otherwise (mmseg's resize warns at some, make_anchors' arange reads each)
                        raise SizeReadInside(f"{source or 'forward'!r} reads the size of a value computed inside the model "
                                             f"in {read_in.__name__}()")
                    read = size_test_at_inputs(args, kwargs, source, lambda v: id(v) in position)
                except SizeReadInside as e:
                    e.fn = read_in  # (the front end traces again with it carried)
                    e.path = source  # (where fuse may keep it whole, capturing around it)
                    raise
                if read is None:
                    continue
                args, kwargs = read
            fn, inputs = _compile("call_function", target, args, kwargs)
            if all(id(v) in position for v in inputs):
                checks.append((fn, tuple(position[id(v)] for v in inputs), source))
            else:
                self.notes.append(f"a torch._assert in {source or 'forward'!r} checks a value computed inside the model: the "
                                  "fused model does not check it (only assertions on the inputs are kept)")
        return checks

    def refuse_written(self, target: str) -> None:
        """Raise where the graph reads a tensor that calls of a part kept whole set (a child's running maximum, a
        statistic an untraceable child stores): the capture holds the value one earlier call left there, and
        the model reads the one its call sets now (:func:`~repalgebra.frontend.state.mark_written`)."""
        from repalgebra.frontend.state import WRITTEN_TAG  # (state.py checks results with verify, which imports the front end)

        owner, _, name = target.rpartition(".")
        if name in getattr(self.root.get_submodule(owner), WRITTEN_TAG, ()):
            raise TypeError(f"it reads {self.path(target)!r}, which every call of {self.path(owner) or 'the model'!r} sets: a "
                            "capture would hold the value of one call (kept as a call of itself, its code reads it on each)")

    def args(self, a: Any) -> Any:
        return fx.node.map_aggregate(a, lambda x: self.env[x] if isinstance(x, fx.Node) else x)

    def path(self, path: str) -> str:
        """A module path of the traced copy as a path of the user's model."""
        if not self.prefix:
            return path
        return "" if path == self.prefix else path.removeprefix(self.prefix + ".")

    def source(self, n: fx.Node) -> str:
        return self.path(n.target if n.op == "call_module" else n.meta.get("repalgebra_source", ""))

    def as_value(self, v: Any, n: fx.Node) -> Value:
        """A graph value for an output leaf: activations as they are, constant tensors as constant nodes."""
        if isinstance(v, Value):
            return v
        if isinstance(v, Const):
            return self.add("constant", [], constant_attrs(v), {"value": v.tensor}, v.path)
        if v is None:  # PointNet's trans_feat without a feature transform, attention weights not asked for
            return self.add("opaque", [], literal_output(), {}, "")
        if isinstance(v, SymExpr):  # a size read from an input (PVT's patch embedding returns x, H, W): per call
            fn, inputs = _compile("call_function", returned, (v,), {})
            return self.add("opaque", inputs, {"fn": fn, "out_shape": None, "out_dtype": None}, {}, "")
        if type(v) in (int, float, bool, str):  # a literal of the code: the same for any input
            return self.add("opaque", [], literal_output(v), {}, "")
        raise TypeError(f"model outputs must be tensors, sizes or None; one output is {type(v).__name__} ({v!r})")

    def add(self, op: str, inputs: Sequence[Value], attrs: dict | None = None, params: dict | None = None, source: str = "", name: str | None = None) -> Value:
        node = Node.make(op, inputs, attrs, params, source, name=name)
        self.nodes.append(node)
        return node.out

    def run_meta(self, n: fx.Node, kind: str, target: Any) -> Any:
        """Run the call on meta tensors; returns (and remembers) its summary."""
        ex = lambda a: fx.node.map_aggregate(a, lambda x: self.example[x] if isinstance(x, fx.Node) else x)  # noqa: E731
        if not runs_on_meta(kind, target):
            raise NeedsRealRun(f"{n.format_node()}: the model's own code, run for real")
        before = versions(n, self.example)
        try:
            result = _call_meta(kind, target, ex(n.args), ex(n.kwargs))
        except Exception as e:
            raise NeedsRealRun(f"{n.format_node()}: {e}") from e
        hidden_writes(n, before, self.example, self.root)
        self.example[n] = result
        return summarize(result)

    def info(self, n: fx.Node, kind: str, target: Any) -> Any:
        """What the call returns (summary), or None when the op table is trusted to say it."""
        if self.record is not None:  # a recorded None (``torch._assert``) is a value, not "unknown"
            return self.record[n] if self.record.get(n) is not None else (_NONE if n in self.record else None)
        if kind == "call_module" and recognised(target) is not None:
            return None
        if target in self.handlers.trusted:  # meta execution of these is slow; the op table is exact
            return None
        return self.run_meta(n, kind, target)

    def call(self, n: fx.Node, kind: str, target: Any) -> Any:
        args, kwargs = self.args(n.args), self.args(n.kwargs)
        if any(isinstance(a, torch.Generator) for a in pytree.tree_leaves((args, kwargs))):
            # A carried call would hold a copy of it, drawing apart from the one the model draws from (found by a review)
            raise TypeError(f"{n.format_node()} draws from a torch.Generator it is given: the model runs it as written")
        if kind == "call_function" and target is torch._assert and _has_value(args, kwargs):
            args = _message_per_call(n, args, self.env)
            target = assert_with_message if len(args) > 2 else torch._assert
            # no value: kept as a check of the inputs (checks_of)
            self.asserts.append((args, kwargs, self.source(n), target, None))
            return None
        if kind == "call_function" and target is autocast_left_off:  # reads no input: a check of every call (checks_of)
            self.asserts.append((args, kwargs, self.source(n), target, None))
            return None
        if kind == "call_function" and target is taken_as_traced:  # (a test on constants' sizes alone: nothing to check)
            if _has_value(args, kwargs):
                self.asserts.append((args, kwargs, self.source(n), target, n.meta.get(READ_IN)))
            return None
        if kind == "call_function" and (_is_named_tuple(target) or (target in (getattr, operator.getitem) and _is_named_tuple(type(args[0])))):
            # A named tuple of results (``Pair(features, logits)``, fields left None) is a container, as a plain tuple is:
            # its fields are the values themselves, and the output structure keeps its type.
            try:
                made = target(*args, **kwargs)
            except Exception:  # noqa: BLE001  (a named tuple whose __new__ computes with its fields: a call, as before)
                made = None
            if made is not None:
                ex = fx.node.map_aggregate((n.args, n.kwargs), lambda x: self.example.get(x) if isinstance(x, fx.Node) else x)
                try:
                    self.example[n] = target(*ex[0], **ex[1])
                except Exception:  # noqa: BLE001  (an example missing: only the values matter)
                    pass
                return made
        folded = self.fold(n, kind, target, args, kwargs)
        if folded is not None:
            return folded
        info = self.info(n, kind, target)
        if info is _NONE:
            return SymExpr(kind, target, args, kwargs) if _has_value(args, kwargs) else None
        if info is not None and not isinstance(info, TensorInfo) and info != "tensors":
            # A size, a shape, an assertion: recomputed inside the calls that use it.  So is a device or a dtype
            # read from a constant (``self.id_tensor.to(self.weight.device)``, ``torch.zeros(n, dtype=self.w.dtype)``):
            # the meta run says "meta", and the device the module is moved to, the dtype it is cast to, count.
            if _has_value(args, kwargs):
                return SymExpr(kind, target, args, kwargs)
            if isinstance(info, (torch.device, torch.dtype)) and _has_const(args, kwargs):
                return SymExpr(kind, target, *map_leaves((args, kwargs), _token))
            return info
        if info is None or isinstance(info, TensorInfo):
            handler = self.handlers.modules.get(recognised(target)) if kind == "call_module" else self.handlers.functions.get(
                ("method", target) if kind == "call_method" else target
            )
            if handler is not None:
                made = handler(self, n, target, args, kwargs)
                if made is not None:
                    op, inputs, attrs, params, source = made
                    node = Node.make(op, inputs, attrs, params, source or self.source(n), name=n.name)
                    if info is None or (node.out.shape == info.shape and node.out.dtype == info.dtype):
                        self.nodes.append(node)
                        self.example.setdefault(n, torch.empty(node.out.shape, dtype=node.out.dtype, device="meta"))
                        return node.out
                    self.notes.append(
                        f"{n.format_node()} at {self.source(n)!r}: the {op} op would give {node.out.shape} "
                        f"{node.out.dtype}, the model {info.shape} {info.dtype}; carried through unchanged"
                    )
        if info is None:
            info = self.run_meta(n, kind, target)
        if kind == "call_module" and isinstance(target, torch.jit.ScriptModule):
            note = (f"{self.source(n)!r} is a TorchScript module: compiled code torch.fx cannot see into, carried through as it "
                    "is (fuse the Python module before scripting it to fold inside it)")
            if note not in self.notes:
                self.notes.append(note)
        return self.opaque(n, kind, target, args, kwargs, info)

    def fold(self, n: fx.Node, kind: str, target: Any, args: tuple, kwargs: dict) -> Const | None:
        """A pure call on constants only (:mod:`repalgebra.frontend.pure`), made now: its result, a constant.

        The dtype of a value the model computes counts as a constant (``scale.to(x.dtype)``, detectron2's frozen BN
        after a conv): a cast of the whole model changes it and the constants alike (as :func:`_f_to_dtype_of`
        argues); an input's dtype does not (a caller may pass another).  The result is plain (a cast leaves it) where
        a tensor it reads is, unless it is cast to such a dtype."""
        given = (*args, *kwargs.values())
        args, kwargs = tuple(map(_computed_dtype, args)), {k: _computed_dtype(v) for k, v in kwargs.items()}
        follows_a_cast = any(a is not b for a, b in zip(given, (*args, *kwargs.values())))
        leaves = pytree.tree_leaves((args, kwargs))
        consts = [a for a in leaves if isinstance(a, Const)]
        made = not consts and kind == "call_function" and target in FACTORIES and self.read_by_constants_only(n)
        if (not (consts or made) or any(isinstance(a, Value) or (isinstance(a, SymExpr) and _has_value(a.args, a.kwargs)) for a in leaves)
                or not is_pure(kind, target, args, kwargs)):
            return None

        def plain(a: Any) -> Any:  # a constant's tensor; a device read from one (``self.weight.device``) made now
            if isinstance(a, SymExpr):
                return invoke(a.kind, a.target, *pytree.tree_map(plain, (a.args, a.kwargs)))
            return a.tensor if isinstance(a, Const) else a

        try:
            with torch.no_grad():
                out = invoke(kind, target, *pytree.tree_map(plain, (args, kwargs)))
        except Exception:  # noqa: BLE001  (it fails on real constants too: carried as the model wrote it)
            return None
        if not torch.is_tensor(out):
            return None
        self.example[n] = meta_of(out)
        plain = not follows_a_cast and any(c.plain for c in consts)
        self.precomputed += bool(consts) and _computes(kind, target)
        return Const(out.detach().clone(), consts[0].path if consts else self.source(n), plain)

    def read_by_constants_only(self, n: fx.Node) -> bool:
        """Whether every reader of ``n`` computes from the model's tensors (one of them at least, besides ``n``) and
        literals alone, with no input and no module call: a kernel made in ``forward`` from the weights (ECBSR's
        ``RK = torch.zeros(...)``, then ``RK[i, i, :, :] = tmp[i, 0]``).  The weights' dtype is then the model's,
        which a cast of the fused model follows; a tensor made from literals alone keeps its own."""
        if self._weights_only is None:
            self._input_free, self._weights_only = set(), set()
            for m in n.graph.nodes:
                if input_free(m, self._input_free):
                    self._input_free.add(m)
                    if m.op == "get_attr" or any(a in self._weights_only for a in m.all_input_nodes):
                        self._weights_only.add(m)
        free, derived = self._input_free, self._weights_only
        # Each reader mixes in the weights itself, or hands its result on to readers that do (ECBSR's identity
        # kernel: ``K = torch.zeros(...)``, ``K[i, i, 1, 1] = 1.0`` per channel, then ``RK + K``).
        return bool(n.users) and all(u in free and (any(a is not n and a in derived for a in u.all_input_nodes)
                                                    or self.read_by_constants_only(u)) for u in n.users)

    def opaque(self, n: fx.Node, kind: str, target: Any, args: tuple, kwargs: dict, info: Any) -> Value:
        """Carry the call through unchanged as an ``opaque`` node."""
        if kind == "call_module" and not kwargs and all(isinstance(a, Value) for a in args):
            fn, inputs = target, list(args)
        elif (squeezed := _squeezed(kind, target, args, kwargs)) is not None and isinstance(info, TensorInfo):
            fn, inputs = _compile("call_function", squeeze_to_rank, (*squeezed, len(info.shape)), {})
        else:
            fn, inputs = _compile(kind, target, args, kwargs)
        shape, dtype = (info.shape, info.dtype) if isinstance(info, TensorInfo) else (None, None)
        return self.add("opaque", inputs, {"fn": fn, "out_shape": shape, "out_dtype": dtype}, {}, self.source(n), name=n.name)

    def leave_bn(self, n: fx.Node, reason: str) -> None:
        self.left_alone.append(LeftAlone(self.source(n), "batch_norm", reason))


def _squeezed(kind: str, target: Any, args: tuple, kwargs: dict) -> tuple[Value, Any] | None:
    """``(x, dim)`` of a carried ``x.squeeze(...)`` / ``torch.squeeze(x, ...)`` of a traced tensor (``dim`` None:
    every axis of size 1; a list, or a size read at run time, as written), else None.  How many axes it drops
    depends on the sizes: carried as :func:`squeeze_to_rank`, which checks them."""
    if not ((kind == "call_method" and target == "squeeze") or (kind == "call_function" and target is torch.squeeze)):
        return None
    x = args[0] if args else kwargs.get("input", kwargs.get("self"))
    if not isinstance(x, Value) or len(args) > 2 or set(kwargs) - {"dim", "input", "self"}:
        return None
    return x, args[1] if len(args) == 2 else kwargs.get("dim")


def _is_named_tuple(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, tuple) and hasattr(t, "_fields")


def _call_meta(kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
    """Make the call on meta tensors; a module's parameters and buffers are swapped for meta ones."""
    if kind != "call_module":
        return invoke(kind, target, args, kwargs)
    tensors = {**dict(target.named_parameters()), **dict(target.named_buffers())}
    if not tensors:
        return target(*args, **kwargs)
    meta = {k: torch.empty_like(t, device="meta") for k, t in tensors.items()}
    return torch.func.functional_call(target, meta, args, kwargs)


def literal_output(value: Any = None) -> dict:
    """The attrs of an ``opaque`` node that returns ``value``: a model output that is ``None`` (or a number of
    the code) whatever the input."""
    return {"fn": FnCall("call_function", returned, (value,), {}, {}), "out_shape": None, "out_dtype": None}


def is_returned_as_is(node: Node) -> bool:
    """Whether ``node`` only hands an output back (a literal ``None`` or number, a constant): no call of the model."""
    fn = node.attrs.get("fn") if node.op == "opaque" else None
    return isinstance(fn, FnCall) and fn.target is returned


def is_none_output(node: Node) -> bool:
    """Whether ``node`` is such a ``None`` (the ONNX export leaves it out, as ``torch.onnx.export`` does)."""
    return is_returned_as_is(node) and node.attrs["fn"].args_template == (None,) and not node.inputs


def size_test_at_inputs(args: tuple, kwargs: dict, source: str, is_input: Callable[[Value], bool]) -> tuple | None:
    """A test of sizes the trace took (:func:`~repalgebra.frontend.size_tests.taken_as_traced`'s arguments) as one of
    the inputs' sizes alone, for a check per call; None where it reads none (a channel count a conv's weight fixes:
    the same answer for every input).  ``TypeError`` where it reads a size of a value computed inside that no
    producer fixes: unchecked, the graph would hold the example's branch for any input."""
    read = read_at_inputs((args, kwargs), is_input)
    if read is None:
        raise SizeReadInside(f"{source or 'forward'!r} tests the size of a value computed inside the model (or reads it "
                             "as a number): the graph holds the example's answer, which its inputs cannot check per call")
    return read if _has_value(*read) else None


def reads_inside(template: Any, is_input: Callable[[Value], bool]) -> bool:
    """Whether ``template`` (a test's arguments) reads a size of a value computed inside the model."""
    if isinstance(template, SymExpr):  # (a size read holds its value among its arguments)
        return reads_inside((template.args, template.kwargs), is_input)
    if isinstance(template, Value):
        return not is_input(template)
    items = template.values() if isinstance(template, dict) else template if isinstance(template, (tuple, list)) else ()
    return any(reads_inside(t, is_input) for t in items)


def read_at_inputs(template: Any, is_input: Callable[[Value], bool]) -> Any:
    """``template`` (a test's arguments) with each size it reads of a value computed inside read where that value's
    producers fix it (:func:`~repalgebra.frontend.shapes.size_source`): a number (a conv's output channels are its
    weight's), or the same axis of an input; None where a value computed inside is read otherwise."""

    def size_of(v: Value, axis: Any) -> Any:
        if not isinstance(axis, int) or v.shape is None or not -len(v.shape) <= axis < len(v.shape):
            return None
        return size_at_inputs(v, axis % len(v.shape), is_input)

    def walk(t: Any) -> Any:
        if isinstance(t, SymExpr) and (empty := _emptiness_test(t)) is not None:
            # ``x.numel() == 0`` of a value computed inside (detectron2's Conv2d wrapper tests it before every
            # conv): read as a product of input sizes, zero exactly where it is (see _nonempty_from)
            numel, v = empty
            sources = None if is_input(v) else _nonempty_from(v, is_input)
            if sources is not None:
                product = SymExpr("call_function", math.prod, ([SymExpr("call_method", "numel", (u,), {}) for u in sources],), {})
                return SymExpr(t.kind, t.target, tuple(product if a is numel else a for a in t.args), t.kwargs)
        if isinstance(t, SymExpr):
            v, axis = size_read(t)
            if isinstance(v, Value) and not is_input(v):
                return size_of(v, axis)
            args, kwargs = walk(t.args), walk(t.kwargs)
            return None if args is None or kwargs is None else SymExpr(t.kind, t.target, args, kwargs)
        if isinstance(t, Value):
            return t if is_input(t) else None
        if isinstance(t, (tuple, list)):
            items = [walk(x) for x in t]
            return None if any(i is None and x is not None for i, x in zip(items, t)) else type(t)(items)
        if isinstance(t, dict):
            items = {k: walk(x) for k, x in t.items()}
            return None if any(items[k] is None and t[k] is not None for k in t) else items
        return t

    return walk(template)


def size_at_inputs(v: Value, axis: int, is_input: Callable[[Value], bool], seen: dict | None = None) -> Any:
    """``v.shape[axis]`` (``axis`` counted from 0) read where ``v``'s producers fix it at every input size: a number,
    a size of an input (a :class:`SymExpr`), or None where a value computed inside is read otherwise.

    A sum (difference, product, quotient) broadcasts its inputs' sizes (:func:`_broadcast_size_at_inputs`): equal at
    the example, they may differ at other sizes, so its size is not its first input's (diffusers' ``h + temb[:, :,
    None, None]`` before ``if h.shape[0] >= 64:``); every other op is followed by
    :func:`~repalgebra.frontend.shapes.size_source`.  ``seen`` holds the sums' sizes already read (by ``id`` and
    axis): after ``x = x + f(x)`` blocks both inputs lead back to the sum before, which is read once, not once per
    path (2 ** depth)."""
    seen = {} if seen is None else seen
    while not is_input(v):
        if v.producer is not None and v.producer.op in _BROADCASTS:
            if (id(v), axis) not in seen:
                seen[(id(v), axis)] = _broadcast_size_at_inputs(v, axis, is_input, seen)
            return seen[(id(v), axis)]
        source = size_source(v, axis)
        if source is None and v.producer is not None and (window := window_axis(v.producer, axis)) is not None:
            return _windowed(size_at_inputs(v.producer.x, axis, is_input, seen), window)
        if source is None:
            return None
        if isinstance(source, int):
            return source
        v, axis = source
        if v.shape is None:
            return None
        axis %= len(v.shape)
    return SymExpr("call_method", "size", (v, axis), {})


def _windowed(size: Any, window: tuple) -> Any:
    """The size of a strided (or shrinking) conv's or pool's output along an axis where its input's is ``size`` (a
    number, a size read from the inputs, or None): CRNN's ``assert h == 1`` after its convs and pools, checked per
    call on the input's height.  A conv that keeps the size is followed by :func:`size_source` instead."""
    if size is None or isinstance(size, int):
        return size if size is None else window_size(size, *window)
    return SymExpr("call_function", window_size, (size, *window), {})


# Elementwise ops of two values that broadcast them against each other (``add`` and ``sub`` too: their inputs'
# shapes are equal at the example only)
_BROADCASTS = ("add", "sub", "mul", "div", "broadcast_add", "broadcast_sub")


def _broadcast_size_at_inputs(v: Value, axis: int, is_input: Callable[[Value], bool], seen: dict) -> Any:
    """The size along ``axis`` of ``v``, an op of :data:`_BROADCASTS`, from its inputs' sizes (aligned from the last
    axis, as torch broadcasts; an input with fewer axes counts as size 1 there).

    Where the op runs, the inputs' sizes along an axis are each 1 or the output's.  So a number other than 1 that
    one input's producers fix is the output's size whatever the others are (``x + self.conv(x)`` has the conv's
    channels); inputs of size 1 at every input size drop out; one size read from the inputs left is the output's,
    and several (each input axis once) are :func:`broadcast_size` of them, per call.  None where an input's size is
    not known."""
    rank = len(v.shape)
    sizes: list[Any] = []
    for u in v.producer.inputs:
        if u.shape is None:
            return None
        a = axis - (rank - len(u.shape))
        sizes.append(1 if a < 0 else size_at_inputs(u, a, is_input, seen))
    fixed = [s for s in sizes if isinstance(s, int) and s != 1]
    if fixed:
        return fixed[0]
    if any(s is None for s in sizes):
        return None
    read: dict[tuple[int, Any], SymExpr] = {}  # each input's size once, by the input and axis it reads
    for s in sizes:
        for t in s.args if isinstance(s, SymExpr) and s.target is broadcast_size else () if isinstance(s, int) else (s,):
            read.setdefault((id(t.args[0]), t.args[1]), t)
    leaves = tuple(read.values())
    return 1 if not leaves else leaves[0] if len(leaves) == 1 else SymExpr("call_function", broadcast_size, leaves, {})


def broadcast_size(*sizes: int) -> int:
    """The size along one axis of values of these sizes broadcast together: the one that is not 1, or 1.  (Sizes
    that do not broadcast make the op itself raise.)"""
    return next((s for s in sizes if s != 1), 1)


_COMPARISONS = (operator.eq, operator.ne, operator.gt, operator.ge, operator.lt, operator.le)


def _emptiness_test(t: SymExpr) -> tuple[SymExpr, Any] | None:
    """``(x.numel(), x)`` where ``t`` compares ``x.numel()`` with 0 (a test whether ``x`` is empty), else None."""
    if t.kind != "call_function" or t.target not in _COMPARISONS or len(t.args) != 2 or t.kwargs:
        return None
    numel, zero = t.args if isinstance(t.args[0], SymExpr) else t.args[::-1]
    if not (isinstance(numel, SymExpr) and numel.kind == "call_method" and numel.target == "numel" and len(numel.args) == 1
            and type(zero) is int and zero == 0):
        return None
    return numel, numel.args[0]


# Ops whose output is not empty where their inputs are not (or that fail): a conv's or pool's output has at least
# one row and column, or the op raises; an elementwise op, a norm, a sum of branches or a reshape keeps its inputs'
# elements.  Not a slice, a crop (a pad by negative amounts), a resize by a factor below 1, or a call: they can make
# an empty tensor of a full one.  (A concat is empty only where all its inputs are: a call with one empty input is
# refused where the model runs, never taken otherwise.)
_NONEMPTY = frozenset({"conv2d", "conv3d", "conv_transpose2d", "conv_transpose3d", "linear", "batch_norm", "scale",
                       "identity", "relu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "leaky_relu",
                       "softplus", "threshold", "elu", "prelu", "clamp", "abs", "add", "sub", "mul", "add_const",
                       "broadcast_add", "broadcast_sub", "avg_pool2d", "avg_pool_nd", "max_pool2d", "adaptive_avg_pool2d",
                       "adaptive_max_pool2d", "layer_norm", "rms_norm", "group_norm", "cast", "reshape", "reshape_dyn",
                       "permute", "transpose", "flatten", "concat"})


def _nonempty_from(v: Value, is_input: Callable[[Value], bool]) -> list[Value] | None:
    """The inputs ``v`` is computed from where it is computed by ops of :data:`_NONEMPTY` alone: then ``v`` is empty
    exactly where one of them is.  None where another op (or a constant with no element) is on the way."""
    found: list[Value] = []
    for u in upstream(v, lambda n: n.inputs):
        if is_input(u):
            found.append(u)
            continue
        n = u.producer
        if n is None or n.op not in _NONEMPTY or any(p.numel() == 0 for p in n.params.values()):
            return None
    return found


def size_read(t: SymExpr, rank: Callable[[Any], int | None] | None = None) -> tuple[Any, Any]:
    """``(v, axis)`` where ``t`` reads one size of a value: ``v.shape[axis]``, ``v.size(axis)``, ``v.size()[axis]``,
    or an item of a slice of them (``h, w = x.shape[-2:]``, segmentation_models_pytorch's input check: read as the
    whole shape, it fixed an ONNX file's batch; found by a probe), where ``rank`` (by default a :class:`Value`'s
    number of axes) gives ``v``'s number of axes."""
    if t.kind == "call_method" and t.target == "size" and len(t.args) == 2:
        return t.args
    if t.kind == "call_function" and t.target is operator.getitem and isinstance(t.args[0], SymExpr):
        inner = t.args[0]
        if (v := _whole_shape(inner)) is not None:
            return v, t.args[1]
        if (inner.kind == "call_function" and inner.target is operator.getitem and isinstance(inner.args[0], SymExpr)
                and isinstance(inner.args[1], slice) and isinstance(t.args[1], int)):
            v = _whole_shape(inner.args[0])
            r = (rank or _rank)(v) if v is not None else None
            axes = range(r)[inner.args[1]] if r is not None else range(0)
            if -len(axes) <= t.args[1] < len(axes):
                return v, axes[t.args[1]]
    return None, None


def _rank(v: Any) -> int | None:
    return len(v.shape) if isinstance(v, Value) and v.shape is not None else None


def _whole_shape(t: SymExpr) -> Any:
    """``v`` where ``t`` is ``v.shape`` or ``v.size()``, else None."""
    if (t.kind == "call_function" and t.target is getattr and t.args[1:] == ("shape",)) or (
            t.kind == "call_method" and t.target == "size" and len(t.args) == 1):
        return t.args[0]
    return None


def _kept_narrower(target: Any, out: Any) -> bool:
    """Whether an in-place op made out of place (``out``) writes into ``target``, a floating tensor made in its own
    dtype, a value that follows the model's: cast to a wider dtype, the model keeps ``target``'s, the op promotes."""
    if not (isinstance(target, Value) and target.dtype is not None and target.dtype.is_floating_point and _made_in_its_dtype(target)):
        return False
    others = [v for v in (out.producer.inputs if isinstance(out, Value) and out.producer else ()) if v is not target]
    return any(not _made_in_its_dtype(v) for v in others)


def _made_in_its_dtype(v: Value) -> bool:
    """Whether ``v`` comes from factories of the default or a written dtype (``torch.zeros(n, 1)``), constants or
    written casts only: made in a dtype that a cast of the model does not change, where a value computed from its
    weights or inputs follows it (as a call does: ``s.to(x.dtype)``, found by a review).  An op of several inputs
    is where all its floating ones are: a residual ``x + stem(x)`` follows the model (a probe found it taken for
    made, so an accumulator written into in place was not guarded after it, and ``a(x) + b(x)`` written into
    was refused float64)."""
    floating = lambda u: u.dtype is None or u.dtype.is_floating_point or u.dtype.is_complex  # noqa: E731

    def follow(n: Node) -> list[Value]:  # the floating inputs that decide n's dtype (a mask or indices follow no cast)
        inputs = [] if n.op in ("constant", "cast") or n.op == "opaque" and a_factory(n.attrs.get("fn")) else (
            _data_inputs(n) or [] if n.op == "opaque" else _deciding(n.inputs))
        return [u for u in inputs if floating(u)]

    for u in upstream(v, follow) if floating(v) else ():
        n = u.producer
        if n is None or n.op == "opaque" and not a_factory(n.attrs.get("fn")) and _data_inputs(n) is None:
            return False  # an input (the caller's dtype), or a call computed from something
    return True


# Pure calls that only view, copy or cast a tensor, methods and functions (``torch.reshape``) by their names:
# precomputing them saves no arithmetic per call
_VIEWS = frozenset({"view", "reshape", "reshape_as", "view_as", "flatten", "transpose", "permute", "unsqueeze", "squeeze",
                    "expand", "expand_as", "contiguous", "t", "__getitem__", "getitem", "getattr", "detach", "clone", "to",
                    "type_as", "float", "double", "half", "bfloat16"})


def _computes(kind: str, target: Any) -> bool:
    """Whether a pure call does arithmetic (``W + (B @ A) * s``, ``F.conv2d(k1, k0)``), not a view, copy or cast of
    a weight (``self.gamma.view(1, -1, 1, 1)``, ``w.T``, ``x.to(self.dummy.dtype)``)."""
    return (target if isinstance(target, str) else getattr(target, "__name__", "")) not in _VIEWS


def _data_inputs(n: Node) -> list[Value] | None:
    """The inputs whose dtypes decide that of the call ``n``'s result (as an op's inputs do: :func:`_deciding`), an
    input read for its sizes only aside: none for a call on masks alone (``torch.where(mask, 0.0, 1.0)``: of the
    default dtype), the tensor an ``expand`` to an input's sizes is called on.  None where the call holds a
    floating tensor or is given a dtype read from a value: its result follows the model."""
    fn = n.attrs.get("fn")
    if not isinstance(fn, FnCall) or any(t.is_floating_point() or t.is_complex() for t in (*fn.parameters(), *fn.buffers())):
        return None
    dtype = fn.kwargs_template.get("dtype") if isinstance(fn.kwargs_template, dict) else None
    if dtype is not None and not isinstance(dtype, torch.dtype):
        return None
    return _deciding([n.inputs[i.index] for i in pytree.tree_leaves((fn.args_template, fn.kwargs_template)) if isinstance(i, In)])


def _deciding(inputs: Sequence[Value]) -> list[Value]:
    """The inputs whose dtypes decide an op's: a 0-dim tensor does not raise the dtype of one with axes
    (``torch.zeros(x.shape) + x.mean()`` stays float32 in a float64 model; a review found it taken to follow it)."""
    axes = [u for u in inputs if u.shape is None or len(u.shape) > 0]
    return axes if axes and len(axes) < len(inputs) else list(inputs)


# The factories that make a tensor of the default dtype unless told another: the pure ones, and those that draw
# or leave the values unset
_IN_THEIR_DTYPE = FACTORIES | {torch.empty, torch.rand, torch.randn, torch.randint}


def a_factory(fn: Any) -> bool:
    """Whether a carried call makes a tensor of the default dtype or of one written as a ``torch.dtype``."""
    kwargs = getattr(fn, "kwargs_template", None)
    dtype = kwargs.get("dtype") if isinstance(kwargs, dict) else None
    return getattr(fn, "target", None) in _IN_THEIR_DTYPE and (dtype is None or isinstance(dtype, torch.dtype))


def promoted_from(out: Any, target: Any) -> torch.dtype | None:
    """The dtype of ``target`` where the value ``out`` computed from it has another (a promotion), else None."""
    if not (isinstance(out, Value) and isinstance(target, Value)) or None in (out.dtype, target.dtype):
        return None
    return None if out.dtype == target.dtype else target.dtype


def pinned_tensor(root: nn.Module, target: str, obj: Any, path: Callable[[str], str]) -> tuple[str, torch.dtype] | None:
    """Where (``path`` names a module path for a message) and of which dtype the floating tensor ``obj`` that
    ``forward`` reads as ``target`` is, if it is neither a parameter nor a buffer: one it made from numbers
    (``torch.tensor([8., 16.])``, torch.fx's ``_tensor_constant0``) or a plain attribute.  A cast of the model
    (``.half()``) leaves its dtype, and PyTorch promotes what it meets to it (not a 0-d one: a number, to type
    promotion, does not raise a tensor of its kind to its dtype)."""
    if not (torch.is_tensor(obj) and obj.is_floating_point() and obj.dim()) or not _is_plain(root, target):
        return None
    owner, _, name = target.rpartition(".")
    where = (f"a tensor {path(owner) or 'the model'}'s forward makes or holds as a plain attribute"
             if name.startswith("_tensor_constant") else f"{path(target)!r}, a plain attribute")
    return where, obj.dtype


def traced_constant(target: str) -> bool:
    """Whether the attribute ``target`` is a tensor torch.fx computed while tracing (``_tensor_constant0``: the
    model's ``self.anchors * 8``), not one the model holds."""
    return str(target).rpartition(".")[2].startswith(MADE_CONSTANT)


def constant_attrs(c: Const) -> dict:
    """The attributes of a ``constant`` op holding ``c``: its dtype, whether it is plain or trainable, and whether it
    is the model's tensor itself."""
    return {"dtype": c.tensor.dtype, "_plain": c.plain, "_trainable": c.trainable, "_own": c.own}


def _is_plain(root: nn.Module, target: str) -> bool:
    """Whether the attribute ``target`` of ``root`` is neither a parameter nor a buffer."""
    owner, _, name = target.rpartition(".")
    module = root.get_submodule(owner)
    return name not in module._parameters and name not in module._buffers


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _has_const(*trees: Any) -> bool:
    return any(isinstance(a, Const) for a in pytree.tree_leaves(trees))


def _token(a: Any) -> Any:
    """A constant as an empty tensor of its dtype and device: all a read of ``.dtype`` or ``.device`` needs (the
    fused call then holds no copy of the weight it asks about)."""
    return Const(torch.empty(0, dtype=a.tensor.dtype, device=a.tensor.device), a.path) if isinstance(a, Const) else a


def _computed_dtype(a: Any) -> Any:
    """``x.dtype`` (a template) as the dtype itself where ``x`` is a value the model computes, not an input."""
    if (isinstance(a, SymExpr) and a.kind == "call_function" and a.target is getattr and a.args[1:] == ("dtype",)
            and isinstance(a.args[0], Value) and a.args[0].producer is not None and a.args[0].dtype is not None):
        return a.args[0].dtype
    return a


_PROXY_TEXT = re.compile(r"Proxy\((\w+)\)")


def assert_with_message(condition: Any, template: str, *fields: Any) -> None:
    """``torch._assert(condition, template.format(*fields))``, the message formatted only where it fails."""
    if not condition:
        torch._assert(condition, template.format(*fields))


def _message_per_call(n: fx.Node, args: tuple, env: Mapping[fx.Node, Any]) -> tuple:
    """A ``torch._assert``'s arguments with the sizes its message names read per call, as the model formats them.

    An f-string message (timm's ``f"Input height ({H}) doesn't match model ({self.img_size[0]})"``) was formatted
    while fx traced, with ``Proxy(getitem_2)`` where the size goes: ``(condition, template, *fields)`` for
    :func:`assert_with_message`, the fields the sizes of the call.  As it was where a field is no size of the
    inputs (a value computed inside would make it a check the fused model cannot make before the call)."""
    if len(args) != 2 or not isinstance(args[1], str) or not _PROXY_TEXT.search(args[1]):
        return args
    nodes = {m.name: m for m in n.graph.nodes}
    fields = [env.get(nodes.get(name)) for name in _PROXY_TEXT.findall(args[1])]
    if not all(isinstance(f, (SymExpr, int)) for f in fields):
        return args
    template = "{}".join(part.replace("{", "{{").replace("}", "}}") for part in _PROXY_TEXT.split(args[1])[::2])
    return (args[0], template, *fields)


def _has_value(*trees: Any) -> bool:
    found = False

    def visit(x: Any) -> Any:
        nonlocal found
        found = found or isinstance(x, (Value, SymExpr))
        return x

    for t in trees:
        map_leaves(t, visit)
    return found


def map_leaves(a: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to the leaves of nested tuples/lists/dicts/slices and inside shape expressions."""
    if isinstance(a, tuple):
        return tuple(map_leaves(x, fn) for x in a)
    if isinstance(a, list):
        return [map_leaves(x, fn) for x in a]
    if isinstance(a, dict):
        return {k: map_leaves(v, fn) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(map_leaves(a.start, fn), map_leaves(a.stop, fn), map_leaves(a.step, fn))
    if isinstance(a, SymExpr):
        fn(a)
        return SymExpr(a.kind, a.target, map_leaves(a.args, fn), map_leaves(a.kwargs, fn))
    return fn(a)


def _compile(kind: str, target: Any, args: tuple, kwargs: dict) -> tuple[FnCall, list[Value]]:
    """A :class:`FnCall` making this call, and the tensor inputs it reads (activations first seen first)."""
    inputs: list[Value] = []
    index: dict[int, int] = {}
    consts: dict[str, torch.Tensor] = {}
    plain: set[str] = set()
    trainable: set[str] = set()

    def leaf(x: Any) -> Any:
        if isinstance(x, Value):
            if id(x) not in index:
                index[id(x)] = len(inputs)
                inputs.append(x)
            return In(index[id(x)])
        if isinstance(x, Const):
            name = f"c{len(consts)}"
            consts[name] = x.tensor
            if x.plain:
                plain.add(name)
            if x.trainable:
                trainable.add(name)
            return Buf(name)
        return x

    fn = FnCall(kind, target, map_leaves(args, leaf), map_leaves(kwargs, leaf), consts, plain, trainable)
    return fn, inputs
