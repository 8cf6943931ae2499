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

This file is the entry point (export, refuse, build); the program-to-graph
builder is :mod:`~repalgebra.frontend.aten_builder` and the per-op table
:mod:`~repalgebra.frontend.aten_handlers`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import operator
import warnings

import torch
from torch import nn
from torch.export.graph_signature import InputKind, OutputKind

from repalgebra.frontend.aten_builder import AtenCapture, BatchBound, CaptureFailed, ProgramBuilder, module_path
from repalgebra.frontend.aten_handlers import HANDLERS, MULTI_HANDLERS, SIZED
from repalgebra.frontend.autocast_off import autocast_turned_off, device_type_of
from repalgebra.frontend.capture import first_line
from repalgebra.frontend.mode_flags import mode_flags_refused
from repalgebra.frontend.module_globals import globals_kept

__all__ = ["AtenCapture", "CaptureFailed", "capture_export"]



def capture_export(module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> AtenCapture:
    """Capture ``module`` with ``torch.export`` at the shapes of ``example_inputs`` into a Graph.

    ``module`` is already a private deep copy in eval mode; it is run on fake
    tensors and not changed.  First with a symbolic batch (axis 0 of every
    input, one size): where ``torch.export`` proves the program holds for any
    batch and the graph can read the batch where the program does (reshapes to
    ``c * batch``), the capture is ``batch_free``.  Otherwise (Python that
    branches on the batch, a tensor created at the batch's size, ...) the
    graph is valid at these input shapes only, and a note says why.  Raises
    :class:`CaptureFailed` when ``torch.export`` fails or the program mutates
    state, holds higher-order ops or reads data-dependent scalars.
    """
    example_inputs = tuple(example_inputs)
    why = _batch_axis_missing(example_inputs)
    if why is None:
        try:
            # torch.export treats sizes 0 and 1 as special: trace at a batch of 2 or more.
            traced = tuple(t.expand(max(2, t.shape[0]), *t.shape[1:]).contiguous() for t in example_inputs)
            ep, offs = _export(module, traced, _batch_shapes(module, len(example_inputs)))
            return _left_off(ProgramBuilder(ep, HANDLERS, MULTI_HANDLERS, SIZED).build(example_inputs), offs)
        except (CaptureFailed, BatchBound) as e:
            why = str(e)
    ep, offs = _export(module, example_inputs, None)
    cap = _left_off(ProgramBuilder(ep, HANDLERS, MULTI_HANDLERS).build(example_inputs), offs)
    cap.notes.insert(1, f"batch fixed: {why}")
    return cap


def _left_off(cap: AtenCapture, devices: list[str]) -> AtenCapture:
    """``cap``, with the devices its forward turned autocast off on (:mod:`~repalgebra.frontend.autocast_off`) and a
    note: the fused module refuses calls under autocast on them."""
    cap.autocast_off = tuple(dict.fromkeys(devices))
    if cap.autocast_off:
        cap.notes.append(f"torch.autocast turned off for {', '.join(map(repr, cap.autocast_off))} around part of its "
                         "forward, which the graph holds without it: the fused module refuses calls under torch.autocast there")
    return cap


BATCH = torch.export.Dim("batch")


def _batch_shapes(module: nn.Module, n: int) -> tuple:
    """``dynamic_shapes`` with axis 0 of each of ``n`` inputs the batch, in the structure of ``forward``'s
    parameters: ``forward(self, *args)`` (torch.compile's module, DataParallel) takes them as one tuple."""
    specs = [{0: BATCH} for _ in range(n)]
    params = list(inspect.signature(module.forward).parameters.values())
    star = next((k for k, p in enumerate(params) if p.kind == p.VAR_POSITIONAL), None)
    if star is None or star > n:
        return tuple(specs)
    return (*specs[:star], tuple(specs[star:]))


def _batch_axis_missing(example_inputs: tuple[torch.Tensor, ...]) -> str | None:
    """Why the inputs have no common batch axis to export symbolically (None: axis 0 of each)."""
    sizes = {t.shape[0] if isinstance(t, torch.Tensor) and t.dim() else None for t in example_inputs}
    if None in sizes or len(sizes) != 1:
        return "the inputs do not share a batch axis (axis 0 of each, one size)"
    return None


@contextlib.contextmanager
def _quiet_fake_tensors():
    """torch logs a traceback at ERROR for an op that fails on its fake tensors (a model that does not run on the
    example); the failure comes back as the capture's exception, said once, so the log's copy is held back."""
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _export(module: nn.Module, inputs: tuple[torch.Tensor, ...],
            dynamic_shapes: tuple | None) -> tuple[torch.export.ExportedProgram, list[str]]:
    """``torch.export`` then ``run_decompositions({})`` (functionalized, high-level ops kept); checked pure.  Also
    the devices of the model's the forward turned autocast off on (which the program does not record: it was traced
    outside autocast; review R19b)."""
    device = device_type_of(module)
    offs: list[str] = []
    try:
        # Under no_grad a `with torch.no_grad():` block in forward changes nothing, so it records
        # no wrap_with_set_grad_enabled subgraph and its nodes keep their module paths (without
        # no_grad, run_decompositions inlines that subgraph but the module paths inside are lost).
        # An `enable_grad()` block still records one; run_decompositions inlines it too.
        with torch.no_grad(), warnings.catch_warnings(), globals_kept(module), mode_flags_refused(module), _quiet_fake_tensors(), \
                autocast_turned_off(lambda on: offs.append(on) if on == device else None):
            warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec", category=FutureWarning)  # torch-internal
            ep = torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes, strict=False)
            _check_writes_into_returned_inputs(ep.graph)
            ep = ep.run_decompositions({})
    except Exception as e:  # anything torch raises: the first line says why
        raise CaptureFailed(first_line(e)) from e
    _check_program(ep)
    return ep, offs


aten = torch.ops.aten
_DROPOUTS = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default, aten.feature_alpha_dropout.default)


def _check_writes_into_returned_inputs(graph: torch.fx.Graph) -> None:
    """Refuse an in-place write to what an eval-mode dropout or a one-operand einsum returned (or to a view of it)
    when the input is read after it.

    In eager PyTorch an eval-mode dropout returns its input itself, and ``torch.einsum("nchw->nhwc", y)`` a view
    of ``y``, so a ``.clamp_(...)`` of the result changes ``y`` too; their schemas declare a new tensor, so
    ``run_decompositions`` makes the write one to a copy, and a later read of ``y`` would see the old values.  A
    write nothing reads the input after (timm's ``x.mul_(gamma)`` layer scale on a projection behind
    ``proj_drop``) is the same either way."""
    order = {n: k for k, n in enumerate(graph.nodes)}
    for n in graph.nodes:
        base = _returned_input(n)
        if base is None:
            continue
        result, writes = _aliases(n, exclude=None)
        if not writes:
            continue
        first = min(order[w] for w in writes)
        while isinstance(base, torch.fx.Node) and base.args and _passed_as(base, base.args[0]) == "viewed":
            base = base.args[0]
        inputs, _ = _aliases(base, exclude=n)
        late = [u for v in inputs for u in v.users if u not in result and u is not n and order[u] > first]
        if late:
            what = "a one-operand einsum, a view of its operand" if n.target is aten.einsum.default else \
                "an eval-mode dropout, which is the dropout's input itself"
            raise CaptureFailed(f"{writes[0].target} at {module_path(writes[0])!r} writes in place into the result of {what}, "
                                "read again afterwards: torch.export's decomposition loses that")


def _returned_input(n: torch.fx.Node) -> torch.fx.Node | None:
    """The input that ``n`` returns eagerly, itself or a view of it, though its schema declares a new tensor."""
    if n.target in _DROPOUTS and not (len(n.args) > 2 and n.args[2] is not False):
        return n.args[0]
    if n.target is aten.einsum.default and len(n.args[1]) == 1:
        return n.args[1][0]
    return None


def _aliases(value: torch.fx.Node, exclude: torch.fx.Node | None) -> tuple[set[torch.fx.Node], list[torch.fx.Node]]:
    """``value`` and the views of it (not through ``exclude``), and the nodes that write into one of them in place."""
    seen, stack, writes = {value}, [value], []
    while stack:
        v = stack.pop()
        for u in v.users:
            how = None if u is exclude else _passed_as(u, v)
            if how == "written":
                writes.append(u)
            if how is not None and u not in seen:  # a write returns its argument: reads of it are reads of v
                seen.add(u)
                stack.append(u)
    return seen, writes


def _passed_as(user: torch.fx.Node, value: torch.fx.Node) -> str | None:
    """``"written"`` if ``user`` changes ``value`` in place, ``"viewed"`` if it returns a view of it (``getitem``
    of a list of views passes it on), else None, by the aliasing its schema declares."""
    if user.target is operator.getitem:
        return "viewed"
    if not isinstance(user.target, torch._ops.OpOverload):
        return None
    for arg, given in zip(user.target._schema.arguments, user.args):
        if given is value and arg.alias_info is not None:
            return "written" if arg.alias_info.is_write else "viewed"
    return None


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
            raise CaptureFailed(f"higher-order op {n.target.name()} at {module_path(n)!r}: its subgraphs are not carried as a plain call")
    for n in ep.graph.nodes:
        if n.op in ("get_attr", "call_module"):
            raise CaptureFailed(f"{n.op} {n.target!r} in the exported program: subgraphs are not carried as a plain call")
