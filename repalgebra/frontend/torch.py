"""The torch front end: ``nn.Module`` to :class:`~repalgebra.ir.Graph` through ``torch.fx``.

:func:`trace` works on a private deep copy of the model, switched to eval mode
(fusion folds *eval-mode* semantics: BatchNorm uses its running statistics,
dropout is the identity).  It traces the copy symbolically with ``torch.fx``
and runs the traced copy once on the example inputs to learn every value's
shape.  Then it maps each fx node to an IR node:

* modules it recognises (``Conv2d``, ``BatchNorm1d/2d/3d``, ``Linear``,
  ``LayerNorm``, pools, activations, ...: ``fx_trace._RECOGNISED``) and
  functions and methods (``F.conv2d``, ``F.pad``, ``+ - * /``, ``@``,
  ``torch.cat``, slicing, reshapes and permutes, ...: the tables at the bottom
  of ``handlers_modules.py`` and ``handlers_functions.py``) become their op;
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

The work is split by job, each file read top to bottom:

* :mod:`~repalgebra.frontend.fx_trace`: the eval-mode copy, the ``torch.fx`` tracer and its leaves, one real run;
* :mod:`~repalgebra.frontend.inputs`: checking the model and its example inputs, inferring an input;
* :mod:`~repalgebra.frontend.builder`: fx graph to IR, opaque calls, shapes on meta tensors;
* :mod:`~repalgebra.frontend.handlers_modules` and :mod:`~repalgebra.frontend.handlers_functions`:
  one handler per recognised module or function, tables at the bottom (helpers in
  :mod:`~repalgebra.frontend.args`);
* :mod:`~repalgebra.frontend.shapes`: where a ``reshape_dyn`` reads its sizes from;
* :mod:`~repalgebra.frontend.inplace`: in-place ops in the fx graph made out-of-place, or refused;
* :mod:`~repalgebra.frontend.aten`: the second capture path, ``torch.export`` at fixed shapes, ATen ops to IR
  (the builder in :mod:`~repalgebra.frontend.aten_builder`, the per-op table in :mod:`~repalgebra.frontend.aten_handlers`);
* :mod:`~repalgebra.frontend.capture`: both paths behind one interface, for ``fuse``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from repalgebra.frontend.builder import Builder, Handlers, NeedsRealRun, SizeReadInside
from repalgebra.frontend.capture import first_line
from repalgebra.frontend.dtype_properties import follow_dtype_properties, follow_parameters_dtype
from repalgebra.frontend.fx_trace import (
    Carried, DtypeReadOutside, LeafSpec, Tracer, UntraceableError, carried_function, carried_modules, check_leaf_modules, concrete_args,
    copy_for_tracing, leaf_paths, record_run, trace_fx,
)
from repalgebra.frontend.handlers_functions import FUNCTION_HANDLERS, TRUSTED_FUNCTIONS
from repalgebra.frontend.handlers_modules import MODULE_HANDLERS
from repalgebra.frontend.inplace import InplaceHazard, functionalize, reads_after_calls
from repalgebra.frontend.inputs import as_tuple, check_example_inputs, check_model, example_inputs_for, infer_example_inputs, model_dtype
from repalgebra.frontend.shapes import reroute_shape_reads
from repalgebra.ir import Graph
from repalgebra.module_copy import copy_module, eval_copy
from repalgebra.rewrite import LeftAlone

__all__ = [
    "trace", "trace_model", "reroute_shape_reads", "TraceResult", "UntraceableError", "check_model", "infer_example_inputs",
    "example_inputs_for", "leaf_paths", "model_dtype", "LeafSpec",
]
HANDLERS = Handlers(MODULE_HANDLERS, FUNCTION_HANDLERS, TRUSTED_FUNCTIONS)


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
    dtype_tested: bool = False  # forward tests a dtype, taken as at the example: the graph holds in that dtype only
    input_checks: list = field(default_factory=list)  # torch._assert calls on the inputs (Builder.checks_of)
    pinned: list = field(default_factory=list)  # (where, dtype) of floating tensors a cast leaves (Builder.pinned_tensor)
    reads_plain: bool = False  # reads a tensor that is neither a parameter nor a buffer (Builder.reads_plain)
    kept: list = field(default_factory=list)  # (where, dtype) of floating tensors written into in place (Builder.kept)
    precomputed: int = 0  # pure calls on the model's tensors made at capture that compute (Builder.precomputed)
    grad_taken: bool = False  # a computed value's requires_grad taken as False (Tracer.grad_taken)


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
        ValueError: no input could be inferred, or the example does not run.
        TypeError: non-floating-point parameters, complex inputs.

    NaN and Inf in parameters are allowed (a clamp bound of ``-inf``): the
    rewrite engine does not fold a weight that is not finite, and reports it.
    """
    check_leaf_modules(model, leaf_modules)
    return trace_model(model, example_inputs, leaf_modules=leaf_modules).graph


def trace_model(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    leaf_modules: Iterable[Any] = (),
    check_trace: bool = True,
) -> TraceResult:
    """:func:`trace`, returning also the output structure, inputs used and the front end's notes.

    With ``check_trace`` the traced graph is run against ``forward`` at the example input (:func:`_check_trace`);
    ``fuse`` turns it off when it checks the fused result against the model anyway.

    Where the graph holds a test of the size of a value computed inside the model taken in a plain function of the
    model's code, it is traced again with that function carried as a call (:func:`_size_reads_carried`): run as
    written, it holds at any size, where a check per call (if the inputs could make one) would refuse every size
    answering otherwise (mmseg's ``resize`` warns at some sizes; YOLO's ``make_anchors`` reads each one).  Where it
    cannot be carried, its tests are checked per call where the inputs can check them (else the refusal stands)."""
    check_model(model)
    carried: list[Carried] = []
    try:
        return _trace_model(model, example_inputs, leaf_modules, check_trace, carried)
    except SizeReadInside as e:
        try:
            return _size_reads_carried(model, example_inputs, leaf_modules, check_trace, carried, e)
        except SizeReadInside as failed:
            try:  # (its reads checked per call, where the inputs can check them: CRNN's heights after its convs)
                traced = _trace_model(model, example_inputs, leaf_modules, check_trace, carried, carry_reads=False)
            except SizeReadInside:
                raise failed from None
            traced.notes.append(f"{str(failed).split('; ')[0]}; its tests of sizes are checked per call")
            return traced


def _size_reads_carried(model: nn.Module, example_inputs: Any, leaf_modules: Iterable[Any], check_trace: bool,
                        carried: list[Carried], error: SizeReadInside) -> TraceResult:
    """:func:`trace_model`'s result where ``error``'s function (mmseg's ``resize``, which reads ``int()`` of its
    input's sizes only to decide whether to warn) and those of the reads found after it are carried as calls, run
    as written on every call, up to ``MOST_CARRIED`` functions in all; else ``error``, with why the trace carrying
    them failed.  Before, the model went to torch.export with its sizes fixed at the example."""
    while (fn := error.fn) is not None and not any(c.fn is fn for c in carried) and len(carried) < MOST_CARRIED:
        carried = [*carried, Carried(fn, str(error), "the fused graph would hold its reads of sizes as the example answers them")]
        try:
            return _trace_model(model, example_inputs, leaf_modules, check_trace, carried)
        except SizeReadInside as e:
            error = e
        except Exception as e:  # noqa: BLE001  (the refusal stays the read's, with this reason added)
            raise SizeReadInside(f"{fn.__name__}() not carried: {first_line(e)}; {error}") from e
    raise error


def _trace_model(model: nn.Module, example_inputs: Any, leaf_modules: Iterable[Any], check_trace: bool,
                 carried: list[Carried], carry_reads: bool = True) -> TraceResult:
    """:func:`trace_model` with the functions in ``carried`` carried as calls (it gains those fx fails in); without
    ``carry_reads``, a function's reads of sizes computed inside are checked per call where they can be."""
    was_training = model.training
    work, tracer, prefix = copy_for_tracing(model, leaf_modules, tuple(carried))
    given = as_tuple(example_inputs) if example_inputs is not None else None
    unprefixed = lambda path: "" if path == prefix else path.removeprefix(prefix + ".") if prefix else path  # noqa: E731
    try:
        work, tracer, fx_graph, placeholders = _traced(model, leaf_modules, given, work, tracer, carried)
        retrace = lambda m=model: _traced(  # noqa: E731  (a fresh copy, carrying what this trace carries)
            m, leaf_modules, given, *copy_for_tracing(m, leaf_modules, tuple(carried))[:2], list(carried))[2]
        followed = follow_dtype_properties(model, work, fx_graph, retrace) if given is not None else None
        if given is not None and followed is None:
            followed = follow_parameters_dtype(model, work, fx_graph, retrace)
        inplace_notes = functionalize(fx_graph, work)
        reads_after_calls(fx_graph, work)  # (after functionalize: its reroutes are reads too)
    except (UntraceableError, InplaceHazard) as e:
        e.path = unprefixed(e.path)
        raise
    inferred = None
    if given is None:
        given, inferred = infer_example_inputs(work, fx_graph, len(placeholders))
    check_example_inputs(model, given, len(placeholders))
    if check_trace:
        _check_trace(model, work, fx_graph, given)
    try:
        try:  # shapes from the op table and meta tensors: no arithmetic, fast
            builder = Builder(work, HANDLERS, prefix=prefix, carry_reads=carry_reads)
            graph, spec = _build(builder, fx_graph, placeholders, given, inferred)
        except NeedsRealRun:  # some call cannot run on meta tensors: run the model once for real
            builder = Builder(work, HANDLERS, record_run(fx.GraphModule(work, fx_graph), given, inferred), prefix=prefix,
                              carry_reads=carry_reads)
            graph, spec = _build(builder, fx_graph, placeholders, given, inferred)
    except InplaceHazard as e:  # a call kept whole writes into a value read after it (seen in either run)
        e.path = unprefixed(e.path)
        raise
    spec = typed_like(tracer.output_structure, spec)
    notes = [*inplace_notes, *tracer.notes, *builder.notes, *([followed] if followed else [])]
    if fixed := concrete_args(work, len(given)):  # a call passing them is a TypeError, never a silent default
        shown = ", ".join(f"{k}={v!r}" for k, v in fixed.items())
        notes.append(f"forward's arguments after the inputs are fixed at their defaults ({shown}): the fused module does not take them")
    if any(str(n.target).startswith("**") for n in fx_graph.nodes if n.op == "placeholder"):
        notes.append("forward's **kwargs traced empty, as a call with the inputs only: the fused module does not take them")
    if inferred:
        notes.insert(0, f"input inferred: {inferred}")
    if was_training:
        notes.insert(0, "the model was in training mode: traced with eval-mode semantics (BN running statistics, no dropout)")
    return TraceResult(graph, spec, tuple(given), inferred, was_training, builder.left_alone, notes, tracer.dtype_tested,
                       builder.input_checks, builder.pinned, builder.reads_plain, builder.kept, builder.precomputed,
                       grad_taken=tracer.grad_taken)


def _traced(model: nn.Module, leaf_modules: Iterable[Any], given: tuple | None, work: nn.Module,
            tracer: Tracer, carried: list[Carried]) -> tuple[nn.Module, Tracer, fx.Graph, list[fx.Node]]:
    """``work``, a copy of ``model`` (:func:`~repalgebra.frontend.fx_trace.copy_for_tracing`), traced by ``tracer``
    (:func:`~repalgebra.frontend.fx_trace.trace_fx`): the copy, tracer, graph and input placeholders; ``x.ndim`` is
    answered at ``given`` (fuse guards the fused model's ranks).

    Where Python looked at a traced ``x.dtype`` outside the graph (peft's ``dtype = x.dtype`` left unused, a
    ``str(x.dtype)`` in a log message, ``x.dtype is torch.float16``), which branch it took is not known: a
    fresh copy is traced again with every ``x.dtype`` as at ``given``, which ``fuse`` then guards as it guards a
    test of a dtype (the fused model refuses other dtypes).  The model went to torch.export with its sizes fixed.

    Where fx fails inside a plain function of the model's code (PyG's ``global_add_pool`` reads ``int(batch.max())``),
    a fresh copy is traced again with that function carried as a call (see
    :func:`~repalgebra.frontend.fx_trace.carried_function`), up to ``MOST_CARRIED`` of them, rather than keeping
    the whole model whole, where nothing folds across its children (a BatchNorm after a part ending in a Linear).
    ``carried`` holds the functions ``tracer`` carries, and gains those."""
    tracer.ranks.inputs = given
    try:
        return _carrying(model, leaf_modules, given, work, tracer, carried)
    except DtypeReadOutside:
        if given is None:
            raise
    work, tracer, _ = copy_for_tracing(model, leaf_modules, tuple(carried))
    tracer.ranks.inputs, tracer.dtypes_as_traced = given, True
    return _carrying(model, leaf_modules, given, work, tracer, carried)


def _carrying(model: nn.Module, leaf_modules: Iterable[Any], given: tuple | None, work: nn.Module, tracer: Tracer,
              carried: list[Carried]) -> tuple[nn.Module, Tracer, fx.Graph, list[fx.Node]]:
    """``work`` traced by ``tracer`` as :func:`_traced` returns it; where fx fails inside a function of the model's
    code, a fresh copy traced again with it carried (``carried`` gains it)."""
    while True:
        try:
            return work, tracer, *_traced_once(work, tracer, given)
        except DtypeReadOutside:
            raise
        except UntraceableError as e:
            fn = carried_function(e.__cause__ or e)
            if fn is None or any(c.fn is fn for c in carried) or len(carried) >= MOST_CARRIED:
                raise
            carried.append(Carried(fn, first_line(e.__cause__ or e)))
        as_traced = tracer.dtypes_as_traced
        work, tracer, _ = copy_for_tracing(model, leaf_modules, tuple(carried))
        tracer.ranks.inputs, tracer.dtypes_as_traced = given, as_traced


MOST_CARRIED = 4  # functions carried as calls in one trace: past that, the model's Python is not fx's to trace


def _traced_once(work: nn.Module, tracer: Tracer, given: tuple | None) -> tuple[fx.Graph, list[fx.Node]]:
    """:func:`~repalgebra.frontend.fx_trace.trace_fx`, refusing a carried function called with a module."""
    fx_graph, placeholders = trace_fx(work, tracer, None if given is None else len(given))
    if bad := carried_modules(fx_graph, work, tracer.carried):
        raise UntraceableError(f"{bad[0]}, whose state it could read or change where fuse's checks cannot see: not "
                               "carried as a call")
    return fx_graph, placeholders


def _check_trace(model: nn.Module, work: nn.Module, fx_graph: fx.Graph, given: tuple) -> None:
    """Raise :class:`UntraceableError` unless the traced graph computes what ``forward`` does at ``given``.

    torch.fx runs the Python of ``forward`` on Proxies, which are not Tensors: ``isinstance(x, torch.Tensor)``
    is false for them, so a branch on it is recorded the other way than the model takes it, without an
    error.  Both run on copies (a call may change state; tracing may have set attributes of ``work`` to
    Proxies), from the same random state (noise drawn in ``forward``), in the model's dtype; their outputs
    are compared leaf by leaf (fx writes an ``OrderedDict`` back as a dict)."""
    from repalgebra.verify import TOLERANCES, first_difference

    outs = []
    # An Interpreter runs the graph node by node: no code generated for it (a GraphModule would compile a
    # forward as long as the model).
    runs = (fx.Interpreter(copy_module(work), graph=fx_graph).run, eval_copy(model))
    for run in runs:
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(0)
            try:
                outs.append(run(*[t.clone() for t in given]))
            except Exception:  # noqa: BLE001  (the build runs the graph again and reports its own failure)
                return
    tolerance = TOLERANCES.get(model_dtype(work), 1e-5)
    why = first_difference(pytree.tree_leaves(outs[1]), pytree.tree_leaves(outs[0]), tolerance)
    if why is not None:
        raise UntraceableError(
            f"torch.fx's trace of {type(model).__name__} computes something else than its forward at the example input "
            f"({why}): Python that fx runs on symbolic values took another path than on tensors (isinstance(x, "
            "torch.Tensor) is false while tracing)"
        )


def typed_like(returned: pytree.TreeSpec | None, built: pytree.TreeSpec) -> pytree.TreeSpec:
    """``returned`` (what the model's forward returned: an ``OrderedDict``, a named tuple) where it has the
    shape of ``built`` (the fx graph's output, whose containers are plain dicts, lists and tuples), else ``built``."""
    if returned is None or returned.num_leaves != built.num_leaves:
        return built

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    leaves = list(range(built.num_leaves))
    same = plain(pytree.tree_unflatten(leaves, returned)) == plain(pytree.tree_unflatten(leaves, built))
    return returned if same else built


def _build(builder: Builder, fx_graph: fx.Graph, placeholders: list, given: tuple, inferred: str | None) -> tuple[Graph, pytree.TreeSpec]:
    """``builder.build``; a failure on an inferred input says so."""
    try:
        return builder.build(fx_graph, placeholders, given)
    except ValueError as e:
        if inferred:
            raise ValueError(f"the model does not run on the inferred input ({inferred}): {e}; pass example_inputs") from e
        raise

