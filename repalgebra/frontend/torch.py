"""The torch front end: ``nn.Module`` to :class:`~repalgebra.ir.Graph` through ``torch.fx``.

:func:`trace` works on a private deep copy of the model, switched to eval mode
(fusion folds *eval-mode* semantics: BatchNorm uses its running statistics,
dropout is the identity).  It traces the copy symbolically with ``torch.fx``
and runs the traced copy once on the example inputs to learn every value's
shape.  Then it maps each fx node to an IR node:

* modules it recognises (``Conv2d``, ``BatchNorm1d/2d/3d``, ``Linear``,
  ``Identity``, ``Dropout``, ``AvgPool2d``, ``ReLU``, ``GELU``, ``Sigmoid``,
  ``ZeroPad2d``/``ConstantPad2d``, ``Flatten``, ``Softmax``, ``LayerNorm``,
  ``AdaptiveAvgPool2d(1)``) and functions (``F.conv2d``, ``F.pad``,
  ``F.batch_norm``, ``F.linear``, ``F.relu``, ``F.gelu``, ``+ - *`` and ``@``,
  ``torch.cat``, flatten/reshape/view/permute/transpose/mean/softmax) become
  their op;
* ``x * p`` where ``p`` is a parameter or buffer of per-channel shape, such as
  ``(C, 1, 1)`` or ``(1, C, 1, 1)`` (a layer scale), or a Python number,
  becomes a ``scale`` op; ``a * b`` of two activations stays ``mul``;
* every other module or call becomes an ``opaque`` node that carries it
  through unchanged: unknown modules are the (deep-copied) modules themselves,
  other calls are :class:`~repalgebra.frontend.calls.FnCall` modules that
  re-evaluate shape expressions such as ``x.shape`` on every call, so the
  result still runs at any input size.

Every node keeps the module path it came from as ``source``; parameters are
cloned, never shared with the caller's model.  BatchNorms that normalise with
batch statistics (a module that stays in training mode after ``eval()``,
``track_running_stats=False``, ``F.batch_norm(training=True)``) are carried
through as opaque nodes and reported as left alone, with the reason.
"""

from __future__ import annotations

import copy
import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils import _pytree as pytree

from repalgebra.frontend.calls import Buf, FnCall, In, SymExpr, invoke
from repalgebra.ir import Graph, Node, Value
from repalgebra.rewrite import LeftAlone

__all__ = ["trace", "trace_model", "reroute_shape_reads", "TraceResult", "UntraceableError", "check_model", "infer_example_inputs", "LeafSpec"]

LeafSpec = "type[nn.Module] | nn.Module | str"
DEFAULT_SIZE = 64  # spatial size of an inferred image input


class UntraceableError(TypeError):
    """``torch.fx`` cannot trace (part of) the model; the message names the module path and the fix."""


@dataclass
class TraceResult:
    """What :func:`trace_model` learned: the graph plus what ``fuse`` reports and the back end needs."""

    graph: Graph
    output_spec: pytree.TreeSpec
    example_inputs: tuple[torch.Tensor, ...]
    inferred_input: str | None = None  # how the input was guessed, when it was
    was_training: bool = False
    left_alone: list[LeftAlone] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(eq=False)
class _Const:
    """A parameter or buffer read by a call (``self.layer_scale``), cloned."""

    tensor: torch.Tensor
    path: str


@dataclass(frozen=True)
class _TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


# --------------------------------------------------------------------------- public API


def trace(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    leaf_modules: Iterable[Any] = (),
) -> Graph:
    """Trace ``model`` (eval-mode semantics) into a :class:`~repalgebra.ir.Graph`.

    Args:
        model: any ``torch.fx``-traceable module; it is not modified (the
            trace runs on a deep copy in eval mode).
        example_inputs: a tensor or a tuple of tensors, one per ``forward``
            argument, used once to learn shapes.  When ``None``, a single input
            is guessed from the first module the traced graph calls: a
            ``Conv2d`` gives ``1 x in_channels x 64 x 64``, a ``Linear`` gives
            ``1 x in_features``, a ``BatchNorm2d`` ``1 x C x 64 x 64``; a
            ``ValueError`` says when no guess is possible or the guess fails.
        leaf_modules: module classes, module instances of ``model`` or dotted
            module paths to keep whole (not traced into): they become opaque
            nodes.  Use it for modules with data-dependent control flow.

    Returns:
        The graph; its nodes' ``source`` is the module path they came from.

    Raises:
        UntraceableError: (a ``TypeError``) ``torch.fx`` cannot trace a module;
            the message names the module path and the ``leaf_modules`` fix.
        ValueError: NaN or Inf in a parameter or buffer (named), or no input
            could be inferred.
        TypeError: non-floating-point parameters or inputs.
    """
    return trace_model(model, example_inputs, leaf_modules=leaf_modules).graph


def check_model(model: nn.Module) -> None:
    """Reject models fusion cannot handle: non-float parameters (``TypeError``), NaN/Inf values (``ValueError``).

    Integer buffers (``num_batches_tracked``) are allowed; floating-point
    buffers (BN statistics) must be finite like parameters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            raise TypeError(f"parameter {name!r} has dtype {p.dtype}: only floating-point models can be fused")
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"parameter {name!r} contains NaN or Inf")
    for name, b in model.named_buffers():
        if b.is_complex():
            raise TypeError(f"buffer {name!r} has dtype {b.dtype}: only floating-point models can be fused")
        if b.is_floating_point() and not bool(torch.isfinite(b).all()):
            raise ValueError(f"buffer {name!r} contains NaN or Inf")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter or buffer (float32 when it has none)."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def trace_model(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    leaf_modules: Iterable[Any] = (),
) -> TraceResult:
    """:func:`trace`, returning also the output structure, inputs used and the front end's notes."""
    check_model(model)
    was_training = model.training
    leaf_types, leaf_paths = _leaf_specs(model, leaf_modules)
    try:
        work = copy.deepcopy(model)
    except Exception as e:  # a module holding a lock, a generator, ...
        raise TypeError(f"cannot deep-copy {type(model).__name__} to trace it: {e}") from e
    work.eval()
    wrapped = _recognised(work) is not None or isinstance(work, leaf_types) or "" in leaf_paths
    if wrapped:  # fx never asks whether the root is a leaf: give it a parent
        work = _Root(work)
        leaf_paths = {"m." + p if p else "m" for p in leaf_paths}
    given = _as_tuple(example_inputs) if example_inputs is not None else None
    concrete = _concrete_args(work, None if given is None else len(given))
    tracer = _Tracer(leaf_types, leaf_paths)
    try:
        fx_graph = tracer.trace(work, concrete_args=concrete or None)
    except Exception as e:
        raise _untraceable(work, tracer.path_stack, e) from e
    all_placeholders = [n for n in fx_graph.nodes if n.op == "placeholder"]
    placeholders = all_placeholders[: len(all_placeholders) - len(concrete)]
    inferred = None
    if given is None:
        given, inferred = infer_example_inputs(work, fx_graph, len(placeholders))
    for k, t in enumerate(given):
        if not torch.is_tensor(t):
            raise TypeError(f"example input {k} is a {type(t).__name__}, not a tensor")
        if not t.is_floating_point():
            raise TypeError(f"example input {k} has dtype {t.dtype}: inputs must be floating point")
    if len(given) != len(placeholders):
        raise TypeError(f"{type(model).__name__}.forward takes {len(placeholders)} tensor inputs, got {len(given)} example inputs")
    prefix = "m" if wrapped else ""
    try:  # shapes from the op table and meta tensors: no arithmetic, fast
        builder = _Builder(work, prefix=prefix)
        graph, spec = _build(builder, fx_graph, placeholders, given, inferred)
    except _NeedsRealRun:  # some call cannot run on meta tensors: run the model once for real
        builder = _Builder(work, _record(fx.GraphModule(work, fx_graph), given, inferred), prefix=prefix)
        graph, spec = _build(builder, fx_graph, placeholders, given, inferred)
    notes = list(builder.notes)
    if inferred:
        notes.insert(0, f"input inferred: {inferred}")
    if was_training:
        notes.insert(0, "the model was in training mode: traced with eval-mode semantics (BN running statistics, no dropout)")
    return TraceResult(graph, spec, tuple(given), inferred, was_training, builder.left_alone, notes)


def infer_example_inputs(
    model: nn.Module, fx_graph: fx.Graph | None = None, n_inputs: int = 1
) -> tuple[tuple[torch.Tensor, ...], str]:
    """A plausible single random input for ``model`` and a sentence saying how it was chosen.

    The model itself if it is a Conv/Linear/BatchNorm, else the first such
    module the traced model calls (in module order when it cannot be traced)
    decides: ``1 x in_channels x 64 x 64`` for a Conv2d, ``1 x in_features``
    for a Linear, ``1 x C x 64 x 64`` for a BatchNorm2d, and so on.  Raises
    ``ValueError`` when there is none or the model takes several inputs.
    """
    if n_inputs != 1:
        raise ValueError(f"{type(model).__name__}.forward takes {n_inputs} inputs: pass example_inputs")
    root = model.m if isinstance(model, _Root) else model
    candidates: Iterable[tuple[str, nn.Module]] = [("", root)]
    if fx_graph is None:
        try:
            fx_graph = _Tracer((), set()).trace(copy.deepcopy(root).eval())
        except Exception:
            candidates = [*candidates, *root.named_modules()]
    if fx_graph is not None:
        calls = [n.target for n in fx_graph.nodes if n.op == "call_module"]
        candidates = [*candidates, *((p, model.get_submodule(p)) for p in calls)]
    dtype = model_dtype(model)
    for path, m in candidates:
        shape = _input_shape_for(m)
        if shape is not None:
            path = path.removeprefix("m.") if isinstance(model, _Root) else path
            where = f" {path!r}" if path else ""
            how = f"{'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} from {type(m).__name__}{where}"
            return (torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype),), how
    raise ValueError(
        f"cannot infer an input shape for {type(root).__name__}: it calls no Conv2d, Linear or BatchNorm; pass example_inputs"
    )


def _input_shape_for(m: nn.Module) -> tuple[int, ...] | None:
    s = DEFAULT_SIZE
    if isinstance(m, nn.Conv2d):
        return (1, m.in_channels, s, s)
    if isinstance(m, nn.Conv1d):
        return (1, m.in_channels, s)
    if isinstance(m, nn.Conv3d):
        return (1, m.in_channels, 16, 16, 16)
    if isinstance(m, nn.Linear):
        return (1, m.in_features)
    if isinstance(m, nn.BatchNorm2d):
        return (1, m.num_features, s, s)
    if isinstance(m, nn.BatchNorm1d):
        return (1, m.num_features)
    return None


# --------------------------------------------------------------------------- tracing


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
# Recognised module classes and the forward each must still use (a subclass with its own forward is not recognised).
_RECOGNISED: tuple[type, ...] = (
    nn.Conv2d,
    _BatchNorm,
    nn.Linear,
    nn.Identity,
    *_DROPOUTS,
    nn.AvgPool2d,
    nn.ReLU,
    nn.GELU,
    nn.Sigmoid,
    nn.ConstantPad2d,
    nn.Flatten,
    nn.Softmax,
    nn.LayerNorm,
    nn.AdaptiveAvgPool2d,
)


class _Root(nn.Module):
    """A parent for a model that is itself a leaf (a lone ``Conv2d``), which fx would trace into."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: Any) -> Any:
        return self.m(x)


def _recognised(m: nn.Module) -> type | None:
    """The recognised base class of ``m`` whose ``forward`` it uses unchanged, else None."""
    for base in _RECOGNISED:
        if isinstance(m, base) and type(m).forward is base.forward:
            return base
    return None


class _Tracer(fx.Tracer):
    """fx tracer with our leaves, remembering the module path of every node and of a failure."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_paths: set[str]) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_paths = leaf_paths
        self.path_stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_paths or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if _recognised(m) is not None:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        # Popped only on success: after an exception the stack names where tracing failed.
        self.path_stack.append(self.path_of_module(m))
        out = super().call_module(m, forward, args, kwargs)
        self.path_stack.pop()
        return out

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["repalgebra_source"] = self.path_stack[-1] if self.path_stack else ""
        return node


def _leaf_specs(model: nn.Module, leaf_modules: Iterable[Any]) -> tuple[tuple[type, ...], set[str]]:
    """Split ``leaf_modules`` into classes and module paths (instances are looked up by identity)."""
    types, paths = [], set()
    where = None
    for spec in leaf_modules:
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            types.append(spec)
        elif isinstance(spec, str):
            paths.add(spec)
        elif isinstance(spec, nn.Module):
            if where is None:
                where = {id(m): p for p, m in model.named_modules()}
            if id(spec) not in where:
                raise ValueError(f"leaf module {type(spec).__name__} is not a submodule of the model")
            paths.add(where[id(spec)])
        else:
            raise TypeError(f"leaf_modules entries are module classes, module instances or paths; got {spec!r}")
    return tuple(types), paths


def _untraceable(work: nn.Module, stack: list[str], e: Exception) -> UntraceableError:
    """The error for a failed trace, naming the innermost module being traced and how to keep it whole."""
    path = stack[-1] if stack else ""
    cls = type(work.get_submodule(path)).__name__ if path else type(work).__name__
    why = (
        "torch.fx traces forward() with symbolic tensors, so Python control flow that depends on tensor "
        "values (such as `if x.sum() > 0:`) cannot be recorded"
    )
    if path:
        return UntraceableError(
            f"cannot trace module {path!r} ({cls}): {e}\n{why}. Keep that module whole (carried through "
            f"unfused) by marking it as a leaf: repalgebra.fuse(model, leaf_modules=({cls},)) "
            f"or leaf_modules=({path!r},)"
        )
    return UntraceableError(
        f"cannot trace the forward() of {cls} itself: {e}\n{why}. Move the data-dependent part into a "
        f"submodule and mark it as a leaf, e.g. repalgebra.fuse(model, leaf_modules=(MySubmodule,))"
    )


def _as_tuple(example_inputs: Any) -> tuple:
    if torch.is_tensor(example_inputs):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def _concrete_args(model: nn.Module, n_given: int | None) -> dict[str, Any]:
    """Defaults of the ``forward`` arguments after the given inputs, to be baked in by the trace."""
    params = list(inspect.signature(model.forward).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if n_given is None:
        n_given = sum(p.default is p.empty for p in positional)
    return {p.name: p.default for p in positional[n_given:] if p.default is not p.empty}


class _Recorder(fx.Interpreter):
    """Runs the traced copy once and keeps, per node, a tensor's shape/dtype or a non-tensor's value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.meta: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            where = n.meta.get("repalgebra_source") or "the model"
            e.add_note(f"repalgebra: while running {n.format_node()} in {where!r}")
            raise
        self.meta[n] = _summarize(result)
        return result


class _NeedsRealRun(Exception):
    """A call could not run on meta tensors; its shape needs a real run."""


def _build(builder: "_Builder", fx_graph: fx.Graph, placeholders: list, given: tuple, inferred: str | None) -> tuple[Graph, pytree.TreeSpec]:
    try:
        return builder.build(fx_graph, placeholders, given)
    except ValueError as e:
        if inferred:
            raise ValueError(f"the model does not run on the inferred input ({inferred}): {e}; pass example_inputs") from e
        raise


def _call_meta(kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
    """Make the call on meta tensors; a module's parameters and buffers are swapped for meta ones."""
    if kind != "call_module":
        return invoke(kind, target, args, kwargs)
    tensors = {**dict(target.named_parameters()), **dict(target.named_buffers())}
    if not tensors:
        return target(*args, **kwargs)
    meta = {k: torch.empty_like(t, device="meta") for k, t in tensors.items()}
    return torch.func.functional_call(target, meta, args, kwargs)


def _meta(v: Any) -> Any:
    return torch.empty_like(v, device="meta") if torch.is_tensor(v) else v


def _summarize(r: Any) -> Any:
    if torch.is_tensor(r):
        return _TensorInfo(tuple(r.shape), r.dtype)
    if any(torch.is_tensor(t) for t in pytree.tree_leaves(r)):
        return "tensors"  # a container of tensors: carried as one opaque value
    return r


def _record(gm: fx.GraphModule, inputs: tuple, inferred: str | None) -> dict[fx.Node, Any]:
    rec = _Recorder(gm)
    try:
        with torch.no_grad():
            rec.run(*inputs)
    except Exception as e:
        if inferred:
            raise ValueError(f"the model does not run on the inferred input ({inferred}): {e}; pass example_inputs") from e
        raise
    return rec.meta


# --------------------------------------------------------------------------- fx graph to IR


def _bind(spec: Sequence[tuple[str, Any]], args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """Match call arguments to ``(name, default)`` pairs (``_REQ`` = required); None when they do not fit."""
    names = [s for s, _ in spec]
    if len(args) > len(names) or any(k not in names or names.index(k) < len(args) for k in kwargs):
        return None
    out = dict(spec)
    out.update(zip(names, args))
    out.update(kwargs)
    if any(v is _REQ for v in out.values()):
        return None
    return out


_REQ = object()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _ints(v: Any, n: int | None = None) -> tuple[int, ...] | None:
    """``v`` as a tuple of ints (an int is repeated ``n`` times), or None."""
    if _is_int(v) and n is not None:
        return (v,) * n
    if isinstance(v, (tuple, list)) and all(_is_int(x) for x in v) and (n is None or len(v) == n):
        return tuple(v)
    return None


def _conv_padding(padding: Any, kernel: Sequence[int], dilation: Sequence[int]) -> tuple[int, int, int, int] | None:
    """PyTorch conv padding (int, pair, 'same', 'valid') as ``(top, bottom, left, right)``."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":  # PyTorch puts the odd extra row/column at the bottom/right
        out = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    p = _ints(padding, 2)
    return None if p is None else (p[0], p[0], p[1], p[1])


def _scalar_axis(shape: tuple[int, ...]) -> int:
    """The axis a scalar multiply is written along: channels of an image, else the last (feature) axis."""
    return 1 if len(shape) == 4 else len(shape) - 1


def _channel_axis(const_shape: tuple[int, ...], x_shape: tuple[int, ...]) -> int | None:
    """The axis of ``x`` along which a constant of ``const_shape`` varies, if it is a per-channel vector."""
    if len(const_shape) > len(x_shape):
        return None
    offset = len(x_shape) - len(const_shape)
    varying = [offset + j for j, s in enumerate(const_shape) if s != 1]
    if len(varying) != 1 or const_shape[varying[0] - offset] != x_shape[varying[0]]:
        return None
    return varying[0]


class _Builder:
    """Maps the fx nodes of one traced model to IR nodes.

    Shapes come from a real run (``record``: per fx node a tensor's shape and
    dtype or a non-tensor's value) or, without one, from the op table for the
    ops it maps and from running the other calls on meta tensors (``example``:
    per fx node a meta tensor or a value); a call that cannot run on meta
    tensors raises :class:`_NeedsRealRun`.
    """

    def __init__(self, root: nn.Module, record: dict[fx.Node, Any] | None = None, prefix: str = "") -> None:
        self.root = root
        self.prefix = prefix  # the wrapper's child name when the model was wrapped (see _Root)
        self.record = record
        self.example: dict[fx.Node, Any] = {}
        self.nodes: list[Node] = []
        self.env: dict[fx.Node, Any] = {}
        self.left_alone: list[LeftAlone] = []
        self.notes: list[str] = []

    # -- driver -------------------------------------------------------------------------

    def build(self, fx_graph: fx.Graph, placeholders: list[fx.Node], inputs: tuple) -> tuple[Graph, pytree.TreeSpec]:
        graph_inputs = []
        for n in fx_graph.nodes:
            if n.op == "placeholder":
                if n in placeholders:
                    t = inputs[placeholders.index(n)]
                    v = Graph.input(n.name, tuple(t.shape), t.dtype)
                    graph_inputs.append(v)
                    self.env[n] = v
                    self.example[n] = _meta(t)
                else:  # a baked-in default (concrete_args)
                    self.env[n] = self.example[n] = n.args[0] if n.args else None
            elif n.op == "get_attr":
                obj = _fetch(self.root, n.target)
                self.env[n] = _Const(obj.detach().clone(), self.path(n.target)) if torch.is_tensor(obj) else obj
                self.example[n] = _meta(obj)
            elif n.op == "call_module":
                self.env[n] = self.call(n, "call_module", self.root.get_submodule(n.target))
            elif n.op in ("call_function", "call_method"):
                self.env[n] = self.call(n, n.op, n.target)
            elif n.op == "output":
                out = self.args(n.args[0])
                leaves, spec = pytree.tree_flatten(out)
                values = [self.as_value(v, n) for v in leaves]
                graph = Graph(graph_inputs, self.nodes, values)
                reroute_shape_reads(graph)
                return graph, spec
        raise AssertionError("fx graph without output")

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
        if isinstance(v, _Const):
            fn = FnCall("call_function", _return, (Buf("c0"),), {}, {"c0": v.tensor})
            return self.add("opaque", [], {"fn": fn, "out_shape": tuple(v.tensor.shape), "out_dtype": v.tensor.dtype}, {}, v.path)
        raise TypeError(f"model outputs must be tensors; one output is {type(v).__name__} ({v!r})")

    def add(self, op: str, inputs: Sequence[Value], attrs: dict | None = None, params: dict | None = None, source: str = "", name: str | None = None) -> Value:
        node = Node.make(op, inputs, attrs, params, source, name=name)
        self.nodes.append(node)
        return node.out

    def run_meta(self, n: fx.Node, kind: str, target: Any) -> Any:
        """Run the call on meta tensors; returns (and remembers) its summary."""
        ex = lambda a: fx.node.map_aggregate(a, lambda x: self.example[x] if isinstance(x, fx.Node) else x)  # noqa: E731
        try:
            result = _call_meta(kind, target, ex(n.args), ex(n.kwargs))
        except Exception as e:
            raise _NeedsRealRun(f"{n.format_node()}: {e}") from e
        self.example[n] = result
        return _summarize(result)

    def info(self, n: fx.Node, kind: str, target: Any) -> Any:
        """What the call returns (summary), or None when the op table is trusted to say it."""
        if self.record is not None:
            return self.record.get(n)
        if kind == "call_module" and _recognised(target) is not None:
            return None
        if target in _TRUSTED_FUNCTIONS:  # meta execution of these is slow; the op table is exact
            return None
        return self.run_meta(n, kind, target)

    def call(self, n: fx.Node, kind: str, target: Any) -> Any:
        args, kwargs = self.args(n.args), self.args(n.kwargs)
        info = self.info(n, kind, target)
        if info is not None and not isinstance(info, _TensorInfo) and info != "tensors":
            # A size, a shape, an assertion: recomputed inside the calls that use it.
            if _has_value(args, kwargs):
                return SymExpr(kind, target, args, kwargs)
            return info
        if info is None or isinstance(info, _TensorInfo):
            handler = _MODULE_HANDLERS.get(_recognised(target)) if kind == "call_module" else _FUNCTION_HANDLERS.get(
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
        return self.opaque(n, kind, target, args, kwargs, info)

    def opaque(self, n: fx.Node, kind: str, target: Any, args: tuple, kwargs: dict, info: Any) -> Value:
        """Carry the call through unchanged as an ``opaque`` node."""
        if kind == "call_module" and not kwargs and all(isinstance(a, Value) for a in args):
            fn, inputs = target, list(args)
        else:
            fn, inputs = _compile(kind, target, args, kwargs)
        shape, dtype = (info.shape, info.dtype) if isinstance(info, _TensorInfo) else (None, None)
        return self.add("opaque", inputs, {"fn": fn, "out_shape": shape, "out_dtype": dtype}, {}, self.source(n), name=n.name)

    def leave_bn(self, n: fx.Node, reason: str) -> None:
        self.left_alone.append(LeftAlone(self.source(n), "batch_norm", reason))


def _return(x: Any) -> Any:
    return x


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _has_value(*trees: Any) -> bool:
    found = False

    def visit(x: Any) -> Any:
        nonlocal found
        found = found or isinstance(x, (Value, SymExpr))
        return x

    for t in trees:
        _map(t, visit)
    return found


def _map(a: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to the leaves of nested tuples/lists/dicts/slices and inside shape expressions."""
    if isinstance(a, tuple):
        return tuple(_map(x, fn) for x in a)
    if isinstance(a, list):
        return [_map(x, fn) for x in a]
    if isinstance(a, dict):
        return {k: _map(v, fn) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_map(a.start, fn), _map(a.stop, fn), _map(a.step, fn))
    if isinstance(a, SymExpr):
        fn(a)
        return SymExpr(a.kind, a.target, _map(a.args, fn), _map(a.kwargs, fn))
    return fn(a)


def _compile(kind: str, target: Any, args: tuple, kwargs: dict) -> tuple[FnCall, list[Value]]:
    """A :class:`FnCall` making this call, and the tensor inputs it reads (activations first seen first)."""
    inputs: list[Value] = []
    index: dict[int, int] = {}
    consts: dict[str, torch.Tensor] = {}

    def leaf(x: Any) -> Any:
        if isinstance(x, Value):
            if id(x) not in index:
                index[id(x)] = len(inputs)
                inputs.append(x)
            return In(index[id(x)])
        if isinstance(x, _Const):
            name = f"c{len(consts)}"
            consts[name] = x.tensor
            return Buf(name)
        return x

    fn = FnCall(kind, target, _map(args, leaf), _map(kwargs, leaf), consts)
    return fn, inputs


# --------------------------------------------------------------------------- handlers
#
# A handler gets (builder, fx node, target, args, kwargs) with fx nodes replaced by
# Values / _Consts / SymExprs / literals, and returns (op, inputs, attrs, params, source)
# or None to carry the call through as an opaque node.

Made = "tuple[str, list[Value], dict, dict, str] | None"


def _v(x: Any) -> Value | None:
    return x if isinstance(x, Value) and x.shape is not None else None


def _single(args: tuple, kwargs: dict) -> Value | None:
    return _v(args[0]) if len(args) == 1 and not kwargs else None


def _m_conv2d(b: _Builder, n: fx.Node, m: nn.Conv2d, args: tuple, kwargs: dict) -> Made:
    x = _single(args, kwargs)
    if x is None or len(x.shape) != 4:
        return None
    if m.padding_mode != "zeros":
        b.notes.append(f"conv {b.source(n)!r} pads with mode {m.padding_mode!r}: carried through unchanged")
        return None
    padding = _conv_padding(m.padding, m.kernel_size, m.dilation)
    params = {"weight": m.weight.detach().clone()}
    if m.bias is not None:
        params["bias"] = m.bias.detach().clone()
    attrs = {"stride": tuple(m.stride), "padding": padding, "dilation": tuple(m.dilation), "groups": m.groups}
    return "conv2d", [x], attrs, params, ""


def _bn_params(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> dict:
    """BN parameters, cloned; ``affine=False`` means weight ones and bias zeros."""
    return {
        "mean": mean.detach().clone(),
        "var": var.detach().clone(),
        "weight": torch.ones_like(mean) if weight is None else weight.detach().clone(),
        "bias": torch.zeros_like(mean) if bias is None else bias.detach().clone(),
    }


def _m_batch_norm(b: _Builder, n: fx.Node, m: _BatchNorm, args: tuple, kwargs: dict) -> Made:
    x = _single(args, kwargs)
    if x is None:
        return None
    if m.training:
        b.leave_bn(n, "the module stays in training mode after eval(): it normalises with batch statistics")
        return None
    if m.running_mean is None or m.running_var is None:
        b.leave_bn(n, "track_running_stats=False: it normalises with batch statistics even in eval mode")
        return None
    return "batch_norm", [x], {"eps": float(m.eps)}, _bn_params(m.running_mean, m.running_var, m.weight, m.bias), ""


def _m_linear(b: _Builder, n: fx.Node, m: nn.Linear, args: tuple, kwargs: dict) -> Made:
    x = _single(args, kwargs)
    if x is None:
        return None
    params = {"weight": m.weight.detach().clone()}
    if m.bias is not None:
        params["bias"] = m.bias.detach().clone()
    return "linear", [x], {}, params, ""


def _m_identity(b: _Builder, n: fx.Node, m: nn.Module, args: tuple, kwargs: dict) -> Made:
    x = _single(args, kwargs)
    if x is None or m.training:  # a dropout that insists on training mode stays as it is
        return None
    return "identity", [x], {}, {}, ""


def _avg_pool(x: Value | None, kernel: Any, stride: Any, padding: Any, ceil_mode: Any, count_include_pad: Any, divisor: Any) -> Made:
    kernel = _ints(kernel, 2)
    stride = kernel if stride is None or stride == [] else _ints(stride, 2)
    padding = _ints(padding, 2)
    if x is None or len(x.shape) != 4 or None in (kernel, stride, padding) or divisor is not None:
        return None
    attrs = {"kernel": kernel, "stride": stride, "padding": padding, "ceil_mode": bool(ceil_mode), "count_include_pad": bool(count_include_pad)}
    return "avg_pool2d", [x], attrs, {}, ""


def _m_avg_pool(b: _Builder, n: fx.Node, m: nn.AvgPool2d, args: tuple, kwargs: dict) -> Made:
    x = _single(args, kwargs)
    return _avg_pool(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override)


def _m_act(op: str) -> Callable[..., Made]:
    def handler(b: _Builder, n: fx.Node, m: nn.Module, args: tuple, kwargs: dict) -> Made:
        x = _single(args, kwargs)
        if x is None:
            return None
        attrs = {"approximate": m.approximate} if op == "gelu" else {}
        return op, [x], attrs, {}, ""

    return handler


def _m_pad(b: _Builder, n: fx.Node, m: nn.ConstantPad2d, args: tuple, kwargs: dict) -> Made:
    x = _single(args, kwargs)
    pads = _ints(m.padding, 4)
    if x is None or pads is None:
        return None
    left, right, top, bottom = pads
    return "pad", [x], {"pads": (top, bottom, left, right), "value": float(m.value)}, {}, ""


def _m_flatten(b: _Builder, n: fx.Node, m: nn.Flatten, args: tuple, kwargs: dict) -> Made:
    x = _single(args, kwargs)
    return None if x is None else ("flatten", [x], {"start": m.start_dim, "end": m.end_dim}, {}, "")


def _m_softmax(b: _Builder, n: fx.Node, m: nn.Softmax, args: tuple, kwargs: dict) -> Made:
    x = _single(args, kwargs)
    return None if x is None or m.dim is None else ("softmax", [x], {"axis": m.dim}, {}, "")


def _m_layer_norm(b: _Builder, n: fx.Node, m: nn.LayerNorm, args: tuple, kwargs: dict) -> Made:
    x = _single(args, kwargs)
    if x is None:
        return None
    params = {k: getattr(m, k).detach().clone() for k in ("weight", "bias") if getattr(m, k, None) is not None}
    return "layer_norm", [x], {"normalized_shape": tuple(m.normalized_shape), "eps": float(m.eps)}, params, ""


def _global_mean(x: Value | None, output_size: Any) -> Made:
    if x is None or len(x.shape) < 3 or output_size not in (1, (1, 1), [1, 1]):
        return None
    nd = len(x.shape)
    return "mean", [x], {"dims": (nd - 2, nd - 1), "keepdim": True}, {}, ""


def _m_adaptive_avg(b: _Builder, n: fx.Node, m: nn.AdaptiveAvgPool2d, args: tuple, kwargs: dict) -> Made:
    return _global_mean(_single(args, kwargs), m.output_size)


_MODULE_HANDLERS: dict[type, Callable[..., Made]] = {
    nn.Conv2d: _m_conv2d,
    _BatchNorm: _m_batch_norm,
    nn.Linear: _m_linear,
    nn.Identity: _m_identity,
    **{d: _m_identity for d in _DROPOUTS},
    nn.AvgPool2d: _m_avg_pool,
    nn.ReLU: _m_act("relu"),
    nn.GELU: _m_act("gelu"),
    nn.Sigmoid: _m_act("sigmoid"),
    nn.ConstantPad2d: _m_pad,
    nn.Flatten: _m_flatten,
    nn.Softmax: _m_softmax,
    nn.LayerNorm: _m_layer_norm,
    nn.AdaptiveAvgPool2d: _m_adaptive_avg,
}


# -- functions and methods


def _f_join(op: str) -> Callable[..., Made]:
    """``a + b`` / ``a - b`` of two activations of one shape; adding 0 is the identity."""

    def handler(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
        if kwargs or len(args) != 2:
            return None
        zero = [isinstance(a, (int, float)) and not isinstance(a, bool) and a == 0 for a in args]
        if zero[1] or (zero[0] and op == "add"):  # x + 0, 0 + x, x - 0 (an accumulator started at 0)
            x = _v(args[1] if zero[0] else args[0])
            return None if x is None else ("identity", [x], {}, {}, "")
        x, y = _v(args[0]), _v(args[1])
        if x is None or y is None or x.shape != y.shape:
            return None
        return op, [x, y], {}, {}, ""

    return handler


def _f_mul(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``a * b``: ``mul`` of two activations; ``scale`` by a per-channel constant or a number."""
    if kwargs or len(args) != 2:
        return None
    x, c = args
    if not isinstance(x, Value):
        x, c = c, x
    if _v(x) is None or not x.dtype.is_floating_point:
        return None
    if isinstance(c, Value):
        return "mul", [x, c], {}, {}, ""
    if isinstance(c, _Const) and c.tensor.is_floating_point():
        shape = tuple(c.tensor.shape)
        if c.tensor.numel() == 1 and len(shape) <= len(x.shape):
            axis = _scalar_axis(x.shape)
            vec = c.tensor.reshape(()).expand(x.shape[axis]).clone()
        else:
            axis = _channel_axis(shape, x.shape)
            vec = None if axis is None else c.tensor.reshape(-1)
        if axis is None or len(shape) > len(x.shape):
            return None
        return "scale", [x], {"axis": axis}, {"scale": vec}, c.path
    if isinstance(c, (int, float)) and not isinstance(c, bool) and len(x.shape) >= 1:
        axis = _scalar_axis(x.shape)
        return "scale", [x], {"axis": axis}, {"scale": torch.full((x.shape[axis],), float(c), dtype=x.dtype)}, ""
    return None


def _f_matmul(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    if kwargs or len(args) != 2 or _v(args[0]) is None or _v(args[1]) is None:
        return None
    return "matmul", list(args), {}, {}, ""


def _f_cat(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = _bind([("tensors", _REQ), ("dim", 0)], args, kwargs)
    if a is None or not isinstance(a["tensors"], (list, tuple)) or not _is_int(a["dim"]):
        return None
    xs = [_v(t) for t in a["tensors"]]
    if not xs or any(x is None for x in xs):
        return None
    return "concat", xs, {"axis": a["dim"] % len(xs[0].shape)}, {}, ""


def _f_flatten(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = _bind([("input", _REQ), ("start_dim", 0), ("end_dim", -1)], args, kwargs)
    if a is None or _v(a["input"]) is None or not (_is_int(a["start_dim"]) and _is_int(a["end_dim"])):
        return None
    return "flatten", [a["input"]], {"start": a["start_dim"], "end": a["end_dim"]}, {}, ""


def _dims_arg(args: tuple, kwargs: dict, *names: str) -> tuple[Value | None, tuple[int, ...] | None]:
    """``x.f(1, 2, 3)``, ``x.f((1, 2, 3))`` or ``torch.f(x, dims)``: the input and the int tuple."""
    if not args:
        return None, None
    x, rest = _v(args[0]), args[1:]
    for k in names:
        if k in kwargs:
            rest = (kwargs[k],) + rest
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = tuple(rest[0])
    if set(kwargs) - set(names):
        return None, None
    return x, _ints(rest)


def _f_reshape(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``x.reshape(...)``/``x.view(...)``: ``reshape`` for constant sizes, ``reshape_dyn`` for sizes read from shapes."""
    if not args or _v(args[0]) is None or set(kwargs) - {"shape", "size"}:
        return None
    x, rest = args[0], args[1:] + tuple(kwargs.values())
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = tuple(rest[0])
    if not rest:
        return None
    if all(_is_int(e) for e in rest):
        return "reshape", [x], {"shape": tuple(rest)}, {}, ""
    refs: list[Value] = []
    entries = []
    for e in rest:
        factors = _size_factors(e)
        if factors is None:
            return None
        entry = []
        for f in factors:
            if isinstance(f, tuple):
                v, axis = f
                if not any(r is v for r in refs):
                    refs.append(v)
                f = (next(k for k, r in enumerate(refs) if r is v), axis % len(v.shape))
            entry.append(f)
        entries.append(entry[0] if len(entry) == 1 and _is_int(entry[0]) else tuple(entry))
    return "reshape_dyn", [x, *refs], {"shape": tuple(entries)}, {}, ""


def _size_factors(e: Any) -> list | None:
    """A size as a product of ints and ``(value, axis)`` sizes read from shapes, or None."""
    if _is_int(e):
        return [e]
    if not isinstance(e, SymExpr):
        return None
    t, a = e.target, e.args
    if t is operator.getitem and len(a) == 2 and _is_int(a[1]) and isinstance(a[0], SymExpr):
        inner = a[0]
        if inner.target is getattr and inner.args[1:] == ("shape",) and _v(inner.args[0]) is not None:
            return [(inner.args[0], a[1])]
        if inner.target == "size" and len(inner.args) == 1 and not inner.kwargs and _v(inner.args[0]) is not None:
            return [(inner.args[0], a[1])]
    if t == "size" and len(a) == 2 and _is_int(a[1]) and not e.kwargs and _v(a[0]) is not None:
        return [(a[0], a[1])]
    if t is operator.mul and len(a) == 2 and not e.kwargs:
        left, right = _size_factors(a[0]), _size_factors(a[1])
        return None if left is None or right is None else left + right
    return None


def _f_reshape_as(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    if kwargs or len(args) != 2 or _v(args[0]) is None or _v(args[1]) is None:
        return None
    shape = tuple(((0, k),) for k in range(len(args[1].shape)))
    return "reshape_dyn", list(args), {"shape": shape}, {}, ""


def _f_getitem(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``x[i]`` with an int ``i``: select along axis 0 (other indexing stays opaque)."""
    if kwargs or len(args) != 2 or _v(args[0]) is None or not _is_int(args[1]):
        return None
    return "select", [args[0]], {"axis": 0, "index": args[1]}, {}, ""


def _f_select(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = _bind([("input", _REQ), ("dim", _REQ), ("index", _REQ)], args, kwargs)
    if a is None or _v(a["input"]) is None or not (_is_int(a["dim"]) and _is_int(a["index"])):
        return None
    return "select", [a["input"]], {"axis": a["dim"], "index": a["index"]}, {}, ""


def _f_permute(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    x, dims = _dims_arg(args, kwargs, "dims")
    return None if x is None or dims is None else ("permute", [x], {"dims": dims}, {}, "")


def _f_transpose(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = _bind([("input", _REQ), ("dim0", _REQ), ("dim1", _REQ)], args, kwargs)
    if a is None or _v(a["input"]) is None or not (_is_int(a["dim0"]) and _is_int(a["dim1"])):
        return None
    return "transpose", [a["input"]], {"dim0": a["dim0"], "dim1": a["dim1"]}, {}, ""


def _f_mean(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = _bind([("input", _REQ), ("dim", None), ("keepdim", False)], args, kwargs)
    if a is None or _v(a["input"]) is None or not isinstance(a["keepdim"], bool):
        return None
    dims = (a["dim"],) if _is_int(a["dim"]) else _ints(a["dim"])
    return None if not dims else ("mean", [a["input"]], {"dims": dims, "keepdim": a["keepdim"]}, {}, "")


def _f_softmax(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = _bind([("input", _REQ), ("dim", None), ("_stacklevel", 3), ("dtype", None)], args, kwargs)
    if a is None or _v(a["input"]) is None or not _is_int(a["dim"]) or a["dtype"] is not None:
        return None
    return "softmax", [a["input"]], {"axis": a["dim"]}, {}, ""


def _f_unary(op: str, *extra: tuple[str, Any]) -> Callable[..., Made]:
    def handler(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
        a = _bind([("input", _REQ), *extra], args, kwargs)
        if a is None or _v(a["input"]) is None:
            return None
        attrs = {"approximate": a["approximate"]} if op == "gelu" else {}
        return op, [a["input"]], attrs, {}, ""

    return handler


def _f_identity_unless_training(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = _bind([("input", _REQ), ("p", 0.5), ("training", True), ("inplace", False)], args, kwargs)
    if a is None or _v(a["input"]) is None or a["training"] is not False:
        return None
    return "identity", [a["input"]], {}, {}, ""


def _const(x: Any) -> torch.Tensor | None:
    return x.tensor if isinstance(x, _Const) else None


def _f_conv2d(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    spec = [("input", _REQ), ("weight", _REQ), ("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)]
    a = _bind(spec, args, kwargs)
    if a is None or _v(a["input"]) is None or len(a["input"].shape) != 4 or _const(a["weight"]) is None:
        return None
    w = _const(a["weight"])
    if a["bias"] is not None and _const(a["bias"]) is None:
        return None
    stride, dilation = _ints(a["stride"], 2), _ints(a["dilation"], 2)
    if stride is None or dilation is None or w.dim() != 4 or not _is_int(a["groups"]):
        return None
    padding = _conv_padding(a["padding"], w.shape[2:], dilation)
    if padding is None:
        return None
    params = {"weight": w} if a["bias"] is None else {"weight": w, "bias": _const(a["bias"])}
    attrs = {"stride": stride, "padding": padding, "dilation": dilation, "groups": a["groups"]}
    return "conv2d", [a["input"]], attrs, params, a["weight"].path.rpartition(".")[0]


def _f_pad(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = _bind([("input", _REQ), ("pad", _REQ), ("mode", "constant"), ("value", None)], args, kwargs)
    if a is None or _v(a["input"]) is None or a["mode"] != "constant":
        return None
    pad = _ints(a["pad"])
    value = 0.0 if a["value"] is None else a["value"]
    if pad is None or len(pad) not in (2, 4) or not isinstance(value, (int, float)) or len(a["input"].shape) < 2:
        return None
    left, right, top, bottom = (*pad, 0, 0)[:4]
    return "pad", [a["input"]], {"pads": (top, bottom, left, right), "value": float(value)}, {}, ""


def _f_batch_norm(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    spec = [("input", _REQ), ("running_mean", _REQ), ("running_var", _REQ), ("weight", None), ("bias", None), ("training", False), ("momentum", 0.1), ("eps", 1e-5)]
    a = _bind(spec, args, kwargs)
    if a is None or _v(a["input"]) is None:
        return None
    if a["training"] is not False:
        b.leave_bn(n, "F.batch_norm(training=True): it normalises with batch statistics")
        return None
    mean, var = _const(a["running_mean"]), _const(a["running_var"])
    if mean is None or var is None or not isinstance(a["eps"], (int, float)):
        return None
    if any(a[k] is not None and _const(a[k]) is None for k in ("weight", "bias")):
        return None
    params = _bn_params(mean, var, _const(a["weight"]), _const(a["bias"]))
    return "batch_norm", [a["input"]], {"eps": float(a["eps"])}, params, a["running_mean"].path.rpartition(".")[0]


def _f_linear(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = _bind([("input", _REQ), ("weight", _REQ), ("bias", None)], args, kwargs)
    if a is None or _v(a["input"]) is None or _const(a["weight"]) is None:
        return None
    if a["bias"] is not None and _const(a["bias"]) is None:
        return None
    params = {"weight": _const(a["weight"])}
    if a["bias"] is not None:
        params["bias"] = _const(a["bias"])
    return "linear", [a["input"]], {}, params, a["weight"].path.rpartition(".")[0]


def _f_layer_norm(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = _bind([("input", _REQ), ("normalized_shape", _REQ), ("weight", None), ("bias", None), ("eps", 1e-5)], args, kwargs)
    if a is None or _v(a["input"]) is None or _ints(a["normalized_shape"]) is None or not isinstance(a["eps"], (int, float)):
        return None
    if any(a[k] is not None and _const(a[k]) is None for k in ("weight", "bias")):
        return None
    params = {k: _const(a[k]) for k in ("weight", "bias") if a[k] is not None}
    return "layer_norm", [a["input"]], {"normalized_shape": _ints(a["normalized_shape"]), "eps": float(a["eps"])}, params, ""


def _f_avg_pool(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    spec = [("input", _REQ), ("kernel_size", _REQ), ("stride", None), ("padding", 0), ("ceil_mode", False), ("count_include_pad", True), ("divisor_override", None)]
    a = _bind(spec, args, kwargs)
    if a is None:
        return None
    return _avg_pool(_v(a["input"]), a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"], a["divisor_override"])


def _f_adaptive_avg(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = _bind([("input", _REQ), ("output_size", _REQ)], args, kwargs)
    return None if a is None else _global_mean(_v(a["input"]), a["output_size"])


def _f_contiguous(b: _Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    x = _single(args, kwargs)
    return None if x is None else ("identity", [x], {}, {}, "")


_FUNCTION_HANDLERS: dict[Any, Callable[..., Made]] = {}
_TRUSTED_FUNCTIONS = (F.batch_norm,)


def _register(handler: Callable[..., Made], *targets: Any) -> None:
    for t in targets:
        _FUNCTION_HANDLERS[t] = handler


_register(_f_join("add"), operator.add, torch.add, ("method", "add"))
_register(_f_join("sub"), operator.sub, torch.sub, ("method", "sub"))
_register(_f_mul, operator.mul, torch.mul, ("method", "mul"))
_register(_f_matmul, operator.matmul, torch.matmul, ("method", "matmul"))
_register(_f_cat, torch.cat, torch.concat, torch.concatenate)
_register(_f_flatten, torch.flatten, ("method", "flatten"))
_register(_f_reshape, torch.reshape, ("method", "reshape"), ("method", "view"))
_register(_f_reshape_as, ("method", "reshape_as"), ("method", "view_as"))
_register(_f_permute, torch.permute, ("method", "permute"))
_register(_f_getitem, operator.getitem)
_register(_f_select, torch.select, ("method", "select"))
_register(_f_transpose, torch.transpose, ("method", "transpose"))
_register(_f_mean, torch.mean, ("method", "mean"))
_register(_f_softmax, F.softmax, torch.softmax, ("method", "softmax"))
_register(_f_unary("relu", ("inplace", False)), F.relu)
_register(_f_unary("relu"), torch.relu, ("method", "relu"))
_register(_f_unary("gelu", ("approximate", "none")), F.gelu)
_register(_f_unary("sigmoid"), torch.sigmoid, F.sigmoid, ("method", "sigmoid"))
_register(_f_identity_unless_training, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)
_register(_f_conv2d, F.conv2d, torch.conv2d)
_register(_f_pad, F.pad)
_register(_f_batch_norm, F.batch_norm)
_register(_f_linear, F.linear)
_register(_f_layer_norm, F.layer_norm)
_register(_f_avg_pool, F.avg_pool2d)
_register(_f_adaptive_avg, F.adaptive_avg_pool2d)
_register(_f_contiguous, ("method", "contiguous"))


# --------------------------------------------------------------------------- where sizes are read from


_SAME_SHAPE = ("batch_norm", "scale", "identity")


def size_source(v: Value, axis: int) -> tuple[Value, int] | int | None:
    """An earlier place ``v.shape[axis]`` can be read from: ``(value, axis)``, a constant, or None.

    ``v = p(u)`` fixes that size from ``u`` or from ``p``'s weights, for every input:

    * ``batch_norm``, ``scale``, ``identity``, ``add``/``sub`` of equal shapes: ``v.shape[a] = u.shape[a]``;
    * ``linear(u; W)``: ``v.shape[a] = u.shape[a]`` before the last axis, ``v.shape[-1] = W.shape[0]``;
    * ``conv2d(u; W)``: ``v.shape[0] = u.shape[0]``, ``v.shape[1] = W.shape[0]``, and a spatial
      axis with stride 1 and total padding ``dilation * (k - 1)`` keeps its size.
    """
    n = v.producer
    if n is None or v.shape is None:
        return None
    axis %= len(v.shape)
    if n.op in _SAME_SHAPE or (n.op in ("add", "sub") and all(i.shape == v.shape for i in n.inputs)):
        return n.inputs[0], axis
    if n.op == "linear":
        return n.params["weight"].shape[0] if axis == len(v.shape) - 1 else (n.x, axis)
    if n.op == "conv2d":
        w = n.params["weight"]
        if axis == 0:
            return n.x, 0
        if axis == 1:
            return w.shape[0]
        k, s, d = w.shape[axis], n.attrs["stride"][axis - 2], n.attrs["dilation"][axis - 2]
        pads = n.attrs["padding"][2 * (axis - 2)] + n.attrs["padding"][2 * (axis - 2) + 1]
        if s == 1 and pads == d * (k - 1):
            return n.x, axis
    return None


def _data_reads(graph: Graph, v: Value) -> int:
    """How many nodes (and graph outputs) read ``v`` for its values, not only for its shape."""
    shape_only = sum(u.op == "reshape_dyn" and u.x is not v for u in graph.users(v))
    return graph.num_uses(v) - shape_only


def _rerouted(graph: Graph, node: Node) -> Node | None:
    """``node`` (a ``reshape_dyn``) reading its sizes from earlier sources, or None if none moves."""
    old_refs = node.inputs[1:]
    movable = {id(r) for r in old_refs if _data_reads(graph, r) <= 1}
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
                v, axis = old_refs[f[0]], f[1]
                src = size_source(v, axis) if id(v) in movable else None
                changed = changed or src is not None
                if src is None:
                    f = (ref(v), axis)
                else:
                    f = src if isinstance(src, int) else (ref(src[0]), src[1])
            factors.append(f)
        const = all(isinstance(f, int) for f in factors)
        shape.append(math.prod(factors) if const else tuple(factors))
    if not changed:
        return None
    if not refs:  # every size is a weight's: a plain reshape
        return Node.make("reshape", [node.x], {"shape": tuple(shape)}, {}, node.source, name=node.out.name)
    return Node.make("reshape_dyn", [node.x, *refs], {"shape": tuple(shape)}, {}, node.source, name=node.out.name)


def reroute_shape_reads(graph: Graph) -> None:
    """Make each ``reshape_dyn`` read its sizes as early as :func:`size_source` allows (in place).

    ``bn(linear(x).flatten(0, 1)).reshape_as(linear(x))`` (LeViT) reads the
    linear's output twice: for its values and for its shape.  Reading the
    shape from ``x`` and ``W.shape[0]`` instead is exact at every input size
    and leaves the linear a single reader, so the Linear + BN fold applies.
    A read moves only off a value that at most one node reads for its values
    (moving reads off values that stay alive anyway would only keep an earlier
    tensor alive for longer).  Values left unread are removed.
    """
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.op != "reshape_dyn":
                continue
            new = _rerouted(graph, node)
            if new is not None:
                graph.insert_before(node, [new])
                graph.replace_uses(node.out, new.out)
                graph.eliminate_dead()
                changed = True
