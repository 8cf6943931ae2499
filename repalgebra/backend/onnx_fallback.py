"""The ONNX back end's fallback: what has no lowering of ours is exported by ``torch.onnx.export`` and spliced in.

:func:`~repalgebra.backend.onnx.graph_to_onnx` lowers every node whose op has
an ONNX lowering in the op table.  The rest (typically ``opaque`` nodes: a
module kept whole, a carried-through call such as ``F.max_pool2d`` or an ATen
overload recorded by ``torch.export``) is grouped into *regions*: runs of
consecutive nodes without a lowering.  Each region becomes a small torch
module (the torch back end's :func:`~repalgebra.backend.torch.to_module` of
the region's nodes), is exported alone with ``torch.onnx.export`` (the
TorchScript exporter) at our opset, and its ONNX graph is spliced into ours:
its inputs become the names our lowering gave the region's input values, every
other name gets a prefix made from the region's module path, and its
initializers, opset imports and local functions are merged.

Example inputs for a region come from one run of the graph.  With a dynamic
batch the graph is run at another batch size than the one it was captured at;
every axis of a region input or output whose size changes with it is exported
as a dynamic axis (the batch need not be axis 0 there: ``qkv.permute(2, 0, 3,
1, 4)``), and the sizes are traced from the run rather than at a batch of 1,
which the exporter could treat as a broadcast.  Every region's export is run
in onnxruntime against the torch module at the graph's own batch.  A graph
that does not run at another batch size, or a region that cannot be exported
with a dynamic batch or whose export does not follow it (Python that reads a
size as a number), is exported with the batch fixed, and the report says why.

A few ATen ops the TorchScript exporter cannot export at our opset are
rewritten, while a region is traced, as exact equivalents it can export
(:data:`REWRITES`: ``slice_scatter``, functional ``copy``, ``col2im``/``F.fold``,
adaptive average pooling to sizes that do not divide, antialiased resampling,
average pooling over the whole input with a kernel read from the shape, the
CPU flash-attention kernel, ``index_add`` and ``bincount`` as ``scatter_add`` calls,
which sum repeated indices).

Which nodes went through the fallback is recorded in :class:`ExportReport`
(and, as a summary, in the model's ``metadata_props``).  :func:`capture_for_export`
is how ``export_onnx`` captures a module (``torch.fx``, with the submodules it
cannot trace kept whole, else the whole module as one opaque call).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import logging
import math
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.overrides import TorchFunctionMode

from repalgebra.frontend.calls import FnCall
from repalgebra.frontend.mode_flags import mode_flags_noted
from repalgebra.ir import Graph, Node, Value
from repalgebra.module_copy import copy_module, in_eval

__all__ = [
    "ExportReport", "NodePath", "RegionReport", "Region", "ExportedRegion", "FallbackError", "REWRITES", "Rewrites",
    "find_regions", "run_regions", "export_regions", "export_region", "splice", "capture_for_export", "fixed_shape_parts",
    "onnx_differs", "probing",
]


class FallbackError(ValueError):
    """``torch.onnx.export`` could not export a region either; the message names it, the opset and the reason."""


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class NodePath:
    """How one IR node reached ONNX: ``own`` (our lowering) or ``fallback`` (``torch.onnx.export``, region ``region``)."""

    source: str
    op: str
    what: str  # the op, or for an opaque node what it calls (``MaxPool2d``, ``scaled_dot_product_attention``)
    path: str  # "own" | "fallback"
    region: int | None = None


@dataclass
class RegionReport:
    """One fallback region: where it is, what it calls, the IR nodes and ONNX nodes, how it was exported."""

    index: int
    where: str
    whats: list[str]
    ir_nodes: int
    onnx_nodes: int
    exporter: str
    dynamic_axes: dict[str, list[int]] = field(default_factory=dict)
    branches: int = 0  # tensor values its trace turned into Python booleans: the branches its example took, fixed
    steered: bool = False  # and those booleans (or numbers) changed with the values of its inputs (see export_regions)
    numbers: int = 0  # tensor values its trace read as Python numbers (``.item()``, ``float(t)``): constants in the file
    on_values: int = 0  # Python booleans and numbers its code read from its inputs' values (value_reads): fixed in the file
    asserted: int = 0  # assertions on its inputs' values: the file does not make them


@dataclass
class ExportReport:
    """What ``export_onnx`` did: per IR node the path it took, ONNX node counts, the fallback regions, notes."""

    opset: int = 0
    dynamic_batch: bool = True
    capture: str = ""  # how the module was captured for export (fx, fx with parts kept whole, whole)
    nodes: list[NodePath] = field(default_factory=list)
    regions: list[RegionReport] = field(default_factory=list)
    onnx_nodes: int = 0
    own_onnx_nodes: int = 0
    fallback_onnx_nodes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def fallback(self) -> list[NodePath]:
        """The IR nodes that went through ``torch.onnx.export``."""
        return [n for n in self.nodes if n.path == "fallback"]

    @property
    def path(self) -> str:
        """``own lowering`` when every node was lowered by us, else ``fallback (k nodes)``."""
        k = len(self.fallback)
        return "own lowering" if k == 0 else f"fallback ({k} node{'s' * (k != 1)})"

    def summary(self) -> str:
        """One line for the ONNX metadata (``repalgebra.fallback``): none, or each region's module path and calls."""
        if not self.regions:
            return "none"
        parts = [f"{r.where} ({', '.join(r.whats)}): {_count(r.onnx_nodes, 'ONNX node')}" for r in self.regions]
        k, r = len(self.fallback), len(self.regions)
        return f"{k} IR node{'s' * (k != 1)} in {r} region{'s' * (r != 1)} via torch.onnx.export: " + "; ".join(parts)

    def __str__(self) -> str:
        batch = "dynamic" if self.dynamic_batch else "fixed"
        lines = [
            f"export: {self.onnx_nodes} ONNX nodes (opset {self.opset}, batch {batch}): own lowering {self.own_onnx_nodes} "
            f"from {len(self.nodes) - len(self.fallback)} IR nodes, fallback {self.fallback_onnx_nodes} "
            f"from {len(self.fallback)} IR nodes in {len(self.regions)} region{'s' * (len(self.regions) != 1)}"
        ]
        if self.capture:
            lines.append(f"  capture: {self.capture}")
        if self.regions:
            lines.append("  fallback (torch.onnx.export):")
            for r in self.regions:
                how = r.exporter.removeprefix("torch.onnx.export (TorchScript)").strip()
                lines.append(
                    f"    {r.where}: {_count(r.ir_nodes, 'IR node')} ({', '.join(r.whats)}) -> {_count(r.onnx_nodes, 'ONNX node')}"
                    + (f" ({how})" if how else "")
                )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' * (n != 1)}"


def _dedup(items: Sequence[str]) -> list[str]:
    out: list[str] = []
    for i in items:
        if i not in out:
            out.append(i)
    return out


def describe(node: Node) -> str:
    """What a node computes, for reports: the op, or for an opaque node what it calls."""
    if node.op != "opaque":
        return node.op
    fn = node.attrs.get("fn")
    if isinstance(fn, FnCall):
        return fn.name
    return type(fn).__name__ if isinstance(fn, nn.Module) else getattr(fn, "__name__", type(fn).__name__)


# --------------------------------------------------------------------------- regions


@dataclass
class Region:
    """Consecutive nodes without an ONNX lowering, exported together.

    ``nodes`` are the run itself plus, before it, the producers of any non-tensor value it reads
    (a tuple-valued call read by ``getitem``), recomputed here so that only tensors cross the border.
    """

    index: int
    run: list[Node]  # the nodes this region stands for, in graph order
    nodes: list[Node]  # what it computes: the run and the non-tensor producers it needs
    inputs: list[Value]  # tensors it reads from outside
    outputs: list[Value]  # tensors of the run read after it (or graph outputs)
    refused: list[str] = field(default_factory=list)  # why our lowering refused its nodes (for the error, should the fallback fail)

    @property
    def where(self) -> str:
        """The module path of the region (its first and last node's, when they differ)."""
        first, last = (n.source or n.out.name for n in (self.run[0], self.run[-1]))
        return first if first == last else f"{first} .. {last}"

    @property
    def whats(self) -> list[str]:
        """What the region's nodes call, each once."""
        return _dedup([describe(n) for n in self.run])

    def module(self) -> nn.Module:
        """The region as a torch module (the torch back end's lowering of its nodes)."""
        from repalgebra.backend.torch import to_module

        return to_module(Graph(self.inputs, self.nodes, self.outputs), class_name="FallbackRegion")


def _is_tensor(v: Value) -> bool:
    return v.shape is not None


def find_regions(graph: Graph, lowered: Callable[[Node], bool]) -> list[Region]:
    """The graph's nodes without a lowering, as regions of consecutive nodes (in graph order)."""
    nodes = list(graph.nodes)
    position = {id(n): k for k, n in enumerate(nodes)}
    readers: dict[int, list[Node]] = {}
    for n in nodes:
        for v in n.inputs:
            readers.setdefault(id(v), []).append(n)
    outputs = {id(v) for v in graph.outputs}
    runs: list[list[Node]] = []
    current: list[Node] | None = None
    for n in nodes:
        if lowered(n):
            current = None
            continue
        if current is None:
            current = []
            runs.append(current)
        current.append(n)
    parts = []
    for k, run in enumerate(runs):
        members = {id(n) for n in run}
        needed = [v for n in run for v in n.inputs if not _is_tensor(v) and id(v.producer) not in members]
        while needed:  # pull in the producers of non-tensor values, and what they read
            v = needed.pop()
            p = v.producer
            if p is None or id(p) in members:
                continue
            members.add(id(p))
            needed += [i for i in p.inputs if not _is_tensor(i)]
        body = sorted((n for n in nodes if id(n) in members), key=lambda n: position[id(n)])
        inputs: list[Value] = []
        for n in body:
            for v in n.inputs:
                if (v.producer is None or id(v.producer) not in members) and all(v is not i for i in inputs):
                    if not _is_tensor(v):
                        raise AssertionError(f"non-tensor value {v} crosses into a fallback region")
                    inputs.append(v)
        parts.append((k, run, body, inputs))
    # A value another region reads is an output of its own: a call that returns a tuple is computed again in each
    # region reading it, from inputs another region computes (an LSTM on an embedding, found by a probe).
    read_elsewhere = {id(v) for *_, inputs in parts for v in inputs}
    regions = []
    for k, run, body, inputs in parts:
        run_ids = {id(n) for n in run}
        outs = [
            n.out for n in run
            if _is_tensor(n.out) and (id(n.out) in outputs or id(n.out) in read_elsewhere
                                      or any(id(r) not in run_ids for r in readers.get(id(n.out), [])))
        ]
        regions.append(Region(k, run, body, inputs, outs))
    return regions


# --------------------------------------------------------------------------- example inputs


def run_regions(
    graph: Graph, regions: list[Region], modules: list[nn.Module], x: Sequence[torch.Tensor]
) -> list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
    """Run ``graph`` on ``x`` (our nodes by the op table's reference semantics, regions by their modules);
    returns each region's input and output tensors."""
    from repalgebra.ops import op_def

    first = {id(r.run[0]): r for r in regions}
    in_region = {id(n) for r in regions for n in r.run}
    env: dict[int, Any] = {id(v): t for v, t in zip(graph.inputs, x)}
    seen: list[tuple[tuple, tuple]] = [((), ())] * len(regions)
    with torch.no_grad(), probing():
        for n in graph.nodes:
            r = first.get(id(n))
            if r is not None:
                args = tuple(env[id(v)] for v in r.inputs)
                # On copies: a region may write into what it is given (the capture made sure nothing else reads
                # it after), and its inputs are kept as its example.
                got = modules[r.index](*_copies(args))
                got = got if isinstance(got, tuple) else (got,)
                seen[r.index] = (args, got)
                for v, t in zip(r.outputs, got):
                    env[id(v)] = t
            elif id(n) not in in_region:
                env[id(n.out)] = op_def(n.op)([env[id(i)] for i in n.inputs], n.attrs, n.params)
    return seen


def _copies(tensors: Sequence[Any]) -> tuple:
    return tuple(t.clone() if torch.is_tensor(t) else t for t in tensors)


def changed_axes(values: Sequence[Value], tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Per value, the axes whose size in ``tensors`` differs from the value's recorded shape."""
    out = []
    for v, t in zip(values, tensors):
        if len(t.shape) != len(v.shape):
            raise ValueError(f"{v.name}: rank {len(t.shape)} at the other batch size, {len(v.shape)} as captured")
        out.append([k for k, (a, b) in enumerate(zip(t.shape, v.shape)) if a != b])
    return out


# --------------------------------------------------------------------------- export the regions


@dataclass
class ExportedRegion:
    """One region as ``torch.onnx.export`` gave it: the model, how it was exported, its dynamic input axes."""

    model: onnx.ModelProto
    exporter: str
    dynamic_axes: dict[str, list[int]] = field(default_factory=dict)
    branches: int = 0  # tensor values the trace turned into Python booleans (control flow fixed to one branch)
    numbers: int = 0  # tensor values the trace read as Python numbers (``.item()``, ``float(t)``): constants in the file
    steered: bool = False  # its Python booleans changed with its inputs' values: the file holds one input's branches
    on_values: int = 0  # Python booleans and numbers its code read from its inputs' values (value_reads): fixed in the file
    asserted: int = 0  # assertions on its inputs' values: the file does not make them
    flags: tuple[str, ...] = ()  # the mode flags its code read while traced (``torch.onnx.is_in_onnx_export()``)


def batch_input(graph: Graph) -> int | None:
    """The place of the input whose axis 0 is the file's batch: the first input with axes (a neural ODE's ``forward(t,
    x)`` takes a 0-d time first: taken for the batch's, the export failed with an IndexError; review R16b); None where
    every input is 0-d."""
    return next((k for k, v in enumerate(graph.inputs) if v.shape), None)


def drawn_at_random(example: torch.Tensor) -> bool:
    """Whether a check may give an input random values in place of ``example``'s: not for token ids, a boolean
    mask, or floats holding infinities (an additive attention mask: torch's fast attention path returns NaN for a
    random one).  Those take the example's values, its rows repeated to the batch."""
    return example.is_floating_point() and bool(example.isfinite().all())


def check_input(v: Value, example: torch.Tensor | None, rows: int | None, gen: torch.Generator, dtype: torch.dtype,
                drawn: bool = True) -> torch.Tensor:
    """Graph input ``v`` for a check run with ``rows`` rows (``None``: its own shape): the example's values, its rows
    repeated, where they are not drawn at random (:func:`drawn_at_random`, or not ``drawn``); else standard normal
    values from ``gen``, in ``v``'s dtype (``dtype`` where it has none)."""
    if example is not None and not (drawn and drawn_at_random(example)):
        return example if rows is None else example[torch.arange(rows) % example.shape[0]]
    return torch.randn(v.shape if rows is None else (rows, *v.shape[1:]), generator=gen, dtype=v.dtype or dtype)


def export_regions(
    graph: Graph, regions: list[Region], dynamic_batch: bool, opset: int, notes: list[str], examples: Sequence[torch.Tensor] = ()
) -> tuple[list[ExportedRegion | None], bool]:
    """Every region exported with ``torch.onnx.export`` and checked in onnxruntime; and whether the batch stays dynamic.

    With ``dynamic_batch``, the regions are traced at another batch size than the graph's (the example inputs
    of one run of the graph there) with the axes that follow it dynamic, then checked at the graph's own batch.
    When the graph does not run at the other batch size, a region cannot be exported with a dynamic batch
    (a kernel size read from the input's shape at run time) or its export does not follow the batch (Python in a
    module kept whole that reads sizes as numbers), everything is exported again with the batch fixed and
    ``notes`` says why.  With the batch fixed, each region is traced at the graph's shapes and checked there.
    A region none of whose values is read outside it (a tuple-valued call, recomputed where it is read) is
    not exported: ``None``.  The regions are traced at ``examples`` as given (their rows repeated to another
    batch), and checked there; the other checks draw floating-point inputs at random, but for an input that is
    not (token ids, a boolean mask), or holds infinities (an additive attention mask), which keeps the example's
    values, its rows repeated to the batch.  Without ``examples`` (a graph exported alone), all are drawn.
    """
    modules = [r.module() for r in regions]
    gen = torch.Generator().manual_seed(0)
    batch = graph.inputs[first].shape[0] if (first := batch_input(graph)) is not None else None
    given = dict(zip(range(len(graph.inputs)), examples))

    drawn = True

    def at(b: int, example: bool = False) -> list[torch.Tensor]:
        xs = []
        for k, v in enumerate(graph.inputs):
            # An input whose first axis is not the batch (a time-major T x B x C beside a B x T mask) keeps its size.
            rows = b if v.shape and v.shape[0] == batch else v.shape[0] if v.shape else None
            xs.append(check_input(v, given.get(k), rows, gen, torch.float32, drawn and not example))
        return xs

    # The example as given: the regions are traced at its values, and the file must compute the model's outputs
    # there.  Random values only add checks: drawn in its place, a branch on x.max() took the other side in the
    # trace, and the export was refused at the user's own example (found by a probe).
    try:
        own = run_regions(graph, regions, modules, at(batch, example=True))
    except Exception as e:  # noqa: BLE001
        if not given:
            raise FallbackError(f"export_onnx: the graph does not run on the export's check inputs (random values): "
                                f"{_first_line(e)}; pass the example tensors it runs on") from e
        raise FallbackError(f"export_onnx: the graph does not run on the example input: {_first_line(e)}") from e
    checks = [own]
    if given:
        try:
            checks.append(run_regions(graph, regions, modules, at(batch)))
        except Exception as e:  # noqa: BLE001
            # Floats the model reads as indices (DeepCTR's ids in a float input, ``X[:, :2].long()``): drawn at
            # random, they index out of range.  The checks take the example's values then, as for token ids.
            drawn = False
            notes.append(f"the graph does not run on random values of its inputs ({_first_line(e)}: floats it reads as "
                         "indices?), so the parts torch.onnx.export writes are checked at the example's values only")
    # A wider input: one example can hide a wrong export (a ReLU zeroing everything a pool sees).
    try:
        checks.append(run_regions(graph, regions, modules, [8 * t if t.is_floating_point() else t for t in at(batch)]))
    except Exception:  # noqa: BLE001  (the graph does not run there: the inputs it runs at)
        pass
    if dynamic_batch:
        other = batch + 2
        try:
            seen = run_regions(graph, regions, modules, at(other, example=True))  # traced at the example's rows
            axes = [(changed_axes(r.inputs, i), changed_axes(r.outputs, o)) for r, (i, o) in zip(regions, seen)]
            # and at batch 1, where a trace at another batch may have taken another branch (``len(x) == 1``), and
            # above the traced batch, where a loop over the rows that the trace unrolled would stop short
            dynamic_checks = [*checks, *(run_regions(graph, regions, modules, at(b)) for b in {1, 2 * other + 1} - {batch})]
        except Exception as e:  # noqa: BLE001  (sizes fixed at the captured batch somewhere in the graph)
            notes.append(f"batch fixed at {batch}: the graph does not run at batch {other}, 1 or {2 * other + 1} ({_first_line(e)})")
        else:
            try:
                exported = [_export(r, m, i, a, opset) if r.outputs else None for r, m, (i, _), a in zip(regions, modules, seen, axes)]
            except FallbackError as e:
                notes.append(f"batch fixed at {batch}: with a dynamic batch, {e}")
            else:
                wrong = next(((r, why) for r, e in zip(regions, exported) if e and (why := _differs_on(e.model, dynamic_checks, r.index))), None)
                if wrong is None:
                    _refuse_sizes_from_values(regions, modules, exported, checks)
                    return _noted(regions, exported, notes, modules, checks), True
                r, why = wrong
                notes.append(
                    f"batch fixed at {batch}: torch.onnx.export's trace of {r.where} at batch {other} does not follow "
                    f"the batch ({why}; its Python reads sizes, or tensor values, as numbers)"
                )
    exported = [_export(r, m, i, ([], []), opset) if r.outputs else None for r, m, (i, _) in zip(regions, modules, own)]
    for r, e in zip(regions, exported):
        why = e and _differs_on(e.model, checks, r.index)
        if why and why.startswith("onnxruntime: ") and "invalid dimensions" in why:  # ran, at other sizes than traced
            raise FallbackError(
                f"torch.onnx.export's export of {r.where} ({', '.join(r.whats)}) holds the sizes of the input it was "
                f"traced with, and the export's check inputs give it others, so it is not written: "
                f"{why.removeprefix('onnxruntime: ')}{_refusals(r)}; its inputs' sizes follow the values (the tokens "
                "routed to an expert, a nonzero() selection), which an ONNX export fixes at one input's"
            )
        if why and why.startswith("onnxruntime: "):  # it does not run there: no kernel for its dtype, numpy no bfloat16
            floats = {v.dtype for v in graph.inputs if v.dtype is not None and v.dtype.is_floating_point}
            hint = ("; export the model in float32 or float16, where it runs" if floats - {torch.float32, torch.float16}
                    else " (an op torch.onnx.export wrote for another dtype than it meets, or a size it computed from values)")
            raise FallbackError(
                f"torch.onnx.export's export of {r.where} ({', '.join(r.whats)}) does not run in onnxruntime, so it "
                f"cannot be checked and is not written: {why.removeprefix('onnxruntime: ')}{_refusals(r)}{hint}"
            )
        if why:
            raise FallbackError(
                f"torch.onnx.export's export of {r.where} ({', '.join(r.whats)}) computes something else: {why}{_refusals(r)}"
                + _flags_read(e.flags)
                + (f" (its trace read {e.numbers} tensor value{'s' * (e.numbers != 1)} as {'Python numbers' if e.numbers != 1 else 'a Python number'}, with .item(), "
                   "float(), int() or .numpy(): the file holds the traced input's numbers as constants)" if e.numbers else "")
                + (f" (its trace turned {e.branches} tensor value{'s' * (e.branches != 1)} into Python boolean"
                   f"{'s' * (e.branches != 1)}: the file takes the branches of the input it was traced with, and the "
                   "check's input took another)" if e.branches else "")
            )
    _refuse_sizes_from_values(regions, modules, exported, checks)
    return _noted(regions, exported, notes, modules, checks), False


def _noted(regions: list[Region], exported: list[ExportedRegion | None], notes: list[str], modules: list[nn.Module],
           checks: list[list[tuple[tuple, tuple]]]) -> list[ExportedRegion | None]:
    """``exported``, with what each region's code reads from its inputs' values at the example (the first of
    ``checks``; :func:`~repalgebra.backend.value_reads.value_reads`), ``steered`` set where its Python booleans or
    numbers change with its inputs' values (:func:`steered_by_values`), and a note for each region that reads
    values, or that its trace fixed control flow or numbers, or that asserts on values (the file does not)."""
    from repalgebra.backend.value_reads import value_reads

    for r, m, e in zip(regions, modules, exported):
        if e is None:
            continue
        found = value_reads(m, checks[0][r.index][0])
        e.on_values, e.asserted = found.reads, found.asserted
        if e.asserted:
            notes.append(f"{r.where}: {_count(e.asserted, 'assertion')} on the values of its inputs, which the file does "
                         "not make (an ONNX graph cannot raise): it computes the model wherever they hold")
        if e.branches or e.numbers or e.on_values:
            e.steered = steered_by_values(m, [c[r.index][0] for c in checks])
            notes.append(_branch_note(r.where, e))
    return exported


def _branch_note(where: str, e: ExportedRegion) -> str:
    """The note on a region whose trace turned tensor values into Python booleans or numbers, or whose code reads
    them from its inputs' values."""
    read = [f"turned {e.branches} tensor value{'s' * (e.branches != 1)} into Python boolean{'s' * (e.branches != 1)} "
            "(control flow on values)"] * bool(e.branches) + [
            f"read {e.numbers} tensor value{'s' * (e.numbers != 1)} as Python number{'s' * (e.numbers != 1)} "
            "(.item(), float(t), int(t), .numpy())"] * bool(e.numbers)
    said = [f"torch.onnx.export's trace {' and '.join(read)}"] * bool(read) + [
            f"its code read {e.on_values} Python boolean{'s' * (e.on_values != 1)} or number{'s' * (e.on_values != 1)} "
            "from the values of its inputs (not sizes, not weights)"] * bool(e.on_values)
    return (f"{where}: {'; '.join(said)}: the export always takes the branches and numbers of its example input"
            + (", and the checks' inputs gave others" if e.steered else "; the checks' inputs (random, scaled, varied) all gave the same"))


def steered_by_values(module: nn.Module, inputs: list[tuple]) -> bool:
    """Whether ``module``'s own Python booleans of tensors (``if x.mean() > 0``), or the numbers it reads from them
    (``float(ids.max())``, ``int(lengths.max())``), come out otherwise for some of ``inputs`` or their variations
    (:func:`_varied`) than for the first: its branches or numbers follow its inputs' values.  A
    branch on sizes (``min(x.shape[0], 4)``, a tensor in a trace) or a test that always holds (``x.abs().sum() >=
    0``) does not.  Evidence, not proof: inputs the checks did not draw may take another branch; and a varied
    input may be one the model never makes (a negated ReLU output), which ``allow_example_branches`` is for."""
    runs = [*inputs, *(tuple(_varied(t, k) for t in xs) for xs in inputs for k in VARIATIONS)]
    seen = []
    for xs in runs:
        outcomes = _Outcomes()
        try:
            with torch.no_grad(), outcomes, probing():
                module(*_copies(xs))
        except Exception:  # noqa: BLE001  (a negated input it does not take: a sqrt's NaN raised on, a check)
            continue
        seen.append(outcomes.seen)
    return any(s != seen[0] for s in seen[1:])


VARIATIONS = (0, 1, 2, 3)  # the variations of a check input (:func:`_varied`)


def _varied(t: Any, k: int) -> Any:
    """Variation ``k`` (one of :data:`VARIATIONS`) of a check input: floats negated, then halved after the first
    row, then all halved; token ids all 0 (padding), reversed along their last axis, halved after the first row,
    then all halved; a boolean mask inverted, all True, then cut to the first half of its last axis (``&``), then
    padded over its second half (``|``).  Values the checks do not draw at random (ids and masks keep the
    example's) still vary.  Halving the rows after the first keeps ids valid, and keeps the longest of lengths:
    full-length utterances, ``[12, 12]``, read into a padding mask as long as the longest (ESPnet's
    ``make_pad_mask``) had no other variation that ran and changed them (``[0, 0]`` makes a mask of length 0; found
    by a probe).  Halving them all takes the longest below the padded length: an LSTM on a
    ``pack_padded_sequence`` returns as many frames as the longest of its lengths (torch reads it inside, as a
    size), and no other variation changed that (found by a probe).  The halved masks and floats do the same for
    lengths summed from a mask (``mask.sum(1)``, True where valid or where padded) and for SpeechBrain's relative
    lengths (``wav_lens * T``, in [0, 1]).  A 0-d tensor (``y[:, :int(n)]``) varies as its kind does.  The
    variations in :data:`CUTS` zero the second half of an axis (:func:`_cut`), whatever the kind."""
    if not torch.is_tensor(t):
        return t
    if k in CUTS:
        return _cut(t, -1 if k == CUTS[0] else 0)
    if t.is_floating_point():
        return -t if k < 2 else _halved(t, k == 2)
    if t.dtype == torch.bool:
        if k < 2 or not t.dim():
            return ~t if k == 0 else torch.ones_like(t)
        first = torch.arange(t.shape[-1], device=t.device) < (t.shape[-1] + 1) // 2
        return t & first if k == 2 else t | ~first
    return torch.zeros_like(t) if k == 0 else (t.flip(-1) if t.dim() else t) if k == 1 else _halved(t, k == 2)


def _cut(t: torch.Tensor, axis: int) -> torch.Tensor:
    """``t`` with the second half of ``axis`` zero (False for a mask): the padding of ids, of a 0/1 mask in integers
    or floats, or of a time-major mask, grown to half the length, whatever the encoding (``(ids != 0).sum(1)``,
    Hugging Face's ``attention_mask.sum(1)``, ``m.bool()`` of a float mask, a ``(T, B)`` mask summed over time;
    a review found each exporting the example's frames).  A 0-d tensor has no axis to cut: as it is."""
    if not t.dim():
        return t
    axis %= t.dim()
    keep = (torch.arange(t.shape[axis], device=t.device) < (t.shape[axis] + 1) // 2).reshape(-1, *[1] * (t.dim() - 1 - axis))
    return t & keep if t.dtype == torch.bool else t * keep.to(t.dtype)


def _halved(t: torch.Tensor, after_first: bool) -> torch.Tensor:
    """``t`` halved (floor division for integers), only its rows after the first where ``after_first``."""
    half = t / 2 if t.is_floating_point() else t // 2
    return torch.cat([t[:1], half[1:]]) if after_first and t.dim() else half


def _values_varied(xs: tuple, k: int) -> tuple:
    """``xs`` with variation ``k`` (:func:`_varied`) of its integer tensors and masks, and of its floats where it
    halves them (not their negation: the checks' random draws vary signs already)."""
    return tuple(_varied(t, k) if _is_integer(t) or (torch.is_tensor(t) and t.is_floating_point() and k >= 2) else t
                 for t in xs)


CUTS = (4, 5)  # the variations of the check at other values only (:func:`_cut`): the last axis, then the first


def _is_integer(t: Any) -> bool:
    """An integer tensor or a boolean mask: values the checks take from the example."""
    return torch.is_tensor(t) and not (t.is_floating_point() or t.is_complex())


def differs_at_other_values(model: onnx.ModelProto, module: nn.Module, inputs: list[tuple]) -> str:
    """Why ``model`` (a region's file) does not compute what ``module`` does on ``inputs`` with their values varied
    (:func:`_values_varied`: lengths, token ids, masks, halved floats, and each of them with the second half of its
    last or its first axis zero, :func:`_cut`), where the module's own Python takes the
    branches and reads the numbers it takes for the inputs as they are (empty where it does).

    The checks' inputs keep the example's ids, masks and lengths (and its floats, where random ones do not run),
    and the booleans and numbers the module's Python reads (:func:`steered_by_values`) do not see what torch reads
    inside: ``pad_packed_sequence`` returns as many frames as the longest of the lengths ``pack_padded_sequence``
    was given, a size torch computes from their values, and the file held the example's (12 frames where the model
    gave 10, found by a probe; so too with lengths summed from a boolean mask, or relative lengths in floats).
    Where the Python reads the same, the file's outputs must have the module's shapes; where it reads others, the
    branches are :func:`steered_by_values`' to judge (and ``allow_example_branches``' to accept)."""
    session = None
    for xs in inputs:
        seen, _ = _run_noting(module, xs)
        for k in (*VARIATIONS, *CUTS):
            varied = _values_varied(xs, k)
            if all(a is b for a, b in zip(varied, xs)):
                continue
            got, out = _run_noting(module, varied)
            if got is None or got != seen:
                continue
            try:
                session = session or ort_session(model)
            except Exception:  # noqa: BLE001  (a file onnxruntime cannot load: the checks before refused it or said so)
                return ""
            if why := _shapes_differ(session, varied, out):
                return why
    return ""


def _shapes_differ(session: Any, inputs: tuple, outputs: tuple) -> str:
    """Why the file's outputs on ``inputs`` do not have ``outputs``' shapes (empty where they do).  Shapes only: the
    values at inputs no model is given (a mask of ids all 0 masks every key, where torch's fast path gives zeros and
    the file NaN) refused BERT-style encoders that exported right (found by a review); what the values read by the
    Python decide is :func:`steered_by_values`' to judge."""
    try:
        got = session.run(None, dict(_fed([i.name for i in session.get_inputs()], [t.detach().cpu().numpy() for t in inputs])))
    except Exception as e:  # noqa: BLE001
        return f"onnxruntime: {_first_line(e)}"
    for k, (g, t) in enumerate(zip(got, outputs)):
        if torch.is_tensor(t) and tuple(g.shape) != tuple(t.shape):
            return f"output {k} has shape {tuple(g.shape)}, not {tuple(t.shape)}"
    return ""


def _run_noting(module: nn.Module, xs: tuple) -> tuple[list | None, tuple]:
    """The booleans and numbers ``module``'s own Python reads from tensors on ``xs`` (:class:`_Outcomes`), and its
    outputs as a tuple; ``(None, ())`` where it does not run on them."""
    outcomes = _Outcomes()
    try:
        with torch.no_grad(), outcomes, probing():
            out = module(*_copies(xs))
    except Exception:  # noqa: BLE001  (inputs it refuses: lengths of 0 that pack_padded_sequence does not take)
        return None, ()
    return outcomes.seen, out if isinstance(out, tuple) else (out,)


def _refuse_sizes_from_values(regions: list[Region], modules: list[nn.Module], exported: list[ExportedRegion | None],
                              checks: list[list[tuple[tuple, tuple]]]) -> None:
    """Raise :class:`FallbackError` naming the first region whose file computes something else than its module
    where only its inputs' values change (:func:`differs_at_other_values`)."""
    for r, m, e in zip(regions, modules, exported):
        if e is not None and (why := differs_at_other_values(e.model, m, [c[r.index][0] for c in checks])):
            sizes = "has shape" in why
            raise FallbackError(
                f"torch.onnx.export's export of {r.where} ({', '.join(r.whats)}) computes something else when only the "
                f"values of its inputs change (lengths, token ids, masks: all 0, reversed, halved or cut to their "
                f"first half): {why}; "
                + ("the part's output size follows those values (pad_packed_sequence returns as many frames as the "
                   "longest of its lengths), and the file would freeze it at the example's" if sizes else
                   "the file holds what torch computed from the example's values")
                + f"{_refusals(r)}; no file is written. "
                + ("Give the output the padded length (pad_packed_sequence(..., total_length=T), T the padded input's "
                   "length read before packing), or export the part without it" if sizes else
                   "Compute what depends on those values with tensor ops, or export the part without it")
            )


class _Outcomes(TorchFunctionMode):
    """While active, the outcomes of the model's own ``bool(tensor)`` calls (its control flow on values) and the
    numbers it reads from tensors (``.item()``, ``float(t)``), in order."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (func is torch.Tensor.__bool__ or func in _NUMBER_READS) and not _called_by_torch():
            self.seen.append(out.tolist() if isinstance(out, np.ndarray) else out)  # (arrays compare entry by entry)
        return out


def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:200]}"


def _refusals(region: Region) -> str:
    """Our lowering's reasons for refusing the region's nodes, for a :class:`FallbackError` (empty when it has none)."""
    return f" (our lowering refused: {'; '.join(region.refused)})" if region.refused else ""


def _differs_on(model: onnx.ModelProto, checks: list[list[tuple[tuple, tuple]]], index: int) -> str:
    """Why ``model`` differs from region ``index``'s recorded inputs and outputs in any of ``checks`` (empty: it does not)."""
    return next((why for run in checks if (why := onnx_differs(model, *run[index]))), "")


def onnx_differs(model: onnx.ModelProto, inputs: tuple, outputs: tuple, rtol: float = 1e-3, *, unloadable: str | None = None) -> str:
    """Why ``model`` in onnxruntime does not give ``outputs`` on ``inputs`` (empty when it does); ``unloadable``, when
    given, is the answer for a file onnxruntime cannot load at all (no kernel for a dtype, say)."""
    try:
        session = ort_session(model)
    except Exception as e:  # noqa: BLE001
        return f"onnxruntime: {_first_line(e)}" if unloadable is None else unloadable
    return session_differs(session, inputs, outputs, rtol)


def reference_differs(model: onnx.ModelProto, inputs: tuple, outputs: tuple, rtol: float = 1e-3) -> str:
    """Why onnx's reference evaluator does not give ``outputs`` on ``inputs`` with ``model`` (empty when it does),
    compared as :func:`session_differs` compares.  For a file onnxruntime cannot run: its CPU provider has no float64
    kernel of several ops, and numpy no bfloat16 (``ml_dtypes``, which onnx depends on, has one).  Pure numpy, so
    slow: a float64 FastViT-T8 at 256x256 takes 2 s a sample."""
    from onnx.reference import ReferenceEvaluator

    try:
        got = ReferenceEvaluator(model).run(None, {n: _numpy(t) for n, t in _fed([i.name for i in model.graph.input], inputs)})
    except Exception as e:  # noqa: BLE001
        return f"onnx's reference evaluator: {_first_line(e)}"
    return _outputs_differ(got, outputs, rtol)


def ort_session(model: onnx.ModelProto) -> Any:
    """An onnxruntime session of ``model`` as written, on one thread (raises where onnxruntime cannot load it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 4
    # The file as written, not onnxruntime's rewrite of it: its graph optimizer crashes the process (SIGSEGV) on
    # torch.onnx.export's float16 TransformerEncoderLayer with a padding mask.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def session_differs(session: Any, inputs: tuple, outputs: tuple, rtol: float = 1e-3, *, flips: float = 0.0) -> str:
    """Why onnxruntime's ``session`` does not give ``outputs`` on ``inputs`` (empty when it does), compared by
    :func:`_outputs_differ`."""
    try:
        feed = {n: t.detach().cpu().numpy() for n, t in _fed([i.name for i in session.get_inputs()], inputs)}
        got = session.run(None, feed)
    except Exception as e:  # noqa: BLE001
        return f"onnxruntime: {_first_line(e)}"
    return _outputs_differ(got, outputs, rtol, flips)


def _fed(names: list[str], inputs: tuple) -> list[tuple[str, Any]]:
    """A file's inputs by name, each with its tensor of ``inputs``: a region's file names them ``in{k}`` after the
    region's ``k``-th input, and torch.onnx.export drops an input the graph reads only for its sizes (TSM's shift,
    ``torch.zeros_like(x)``): the rest are fed by their names, not their places (a 4-D input went to a 5-D one)."""
    at = [int(n[2:]) if n.startswith("in") and n[2:].isdigit() else None for n in names]
    if None in at or max(at, default=-1) >= len(inputs):
        return list(zip(names, inputs))
    return [(n, inputs[k]) for n, k in zip(names, at)]


def _outputs_differ(got: list, outputs: tuple, rtol: float, flips: float = 0.0) -> str:
    """Why a file's outputs ``got`` (numpy arrays) are not ``outputs`` (empty when they are): their shapes and dtypes,
    NaN and Inf where the reference has them, other entries within ``rtol`` or the dtype's tolerance (as verify
    compares), integer and boolean entries equal but for a fraction ``flips`` of them."""
    import numpy as np

    from repalgebra.verify import TOLERANCES, first_difference

    for k, (g, t) in enumerate(zip(got, outputs)):
        g, ref = np.asarray(g), _numpy(t)
        if g.shape != ref.shape:
            return f"output {k} has shape {tuple(g.shape)}, not {tuple(ref.shape)}"
        if g.dtype != ref.dtype:  # torch.onnx.export's Clip of float16 and a float32 bound is float16, torch's float32
            return f"output {k} is {g.dtype}, not {ref.dtype}"
        if ref.size and not t.is_floating_point():
            if (wrong := int(np.count_nonzero(g != ref))) > flips * ref.size:
                return f"output {k} differs in {wrong} of {ref.size} entries"
        elif ref.size:
            tol = max(rtol, TOLERANCES.get(t.dtype, rtol))  # float16 sums rounded in another order: verify's 1e-2
            why = first_difference(_from_numpy(ref), _from_numpy(g), tol)
            if why:
                return why.replace("output 0", f"output {k}", 1)
    return ""


def _numpy(t: torch.Tensor) -> Any:
    """``t`` as a numpy array; bfloat16 as ``ml_dtypes.bfloat16`` (numpy has none; onnx depends on ml_dtypes)."""
    t = t.detach().cpu()
    if t.dtype != torch.bfloat16:
        return t.numpy()
    import ml_dtypes

    return t.float().numpy().astype(ml_dtypes.bfloat16)


def _from_numpy(a: Any) -> torch.Tensor:
    """A numpy array as a tensor to compare; a bfloat16 one in float32 (torch reads no ml_dtypes arrays)."""
    import numpy as np

    return torch.from_numpy(a.astype(np.float32) if a.dtype.name == "bfloat16" else a)


def _export(region: Region, module: nn.Module, examples: tuple, axes: tuple[list, list], opset: int) -> ExportedRegion:
    """One region exported by :func:`export_region`; a :class:`FallbackError` naming it when that fails."""
    error = None
    with mode_flags_noted(module) as flags:
        try:
            model, used, (branches, numbers) = export_region(region, module, examples, axes[0], axes[1], opset)
        except Exception as e:  # noqa: BLE001  (torch.onnx raises many types)
            error = e
    if error is not None:
        calls = ", ".join(region.whats)
        scripted = any(isinstance(n.attrs.get("fn"), torch.jit.ScriptModule) for n in region.run)
        hint = (" (a TorchScript module: export the Python module it was scripted from, fused, and script the model "
                "after)") if scripted else ""
        newest = torch.onnx._constants.ONNX_MAX_OPSET  # (its TorchScript exporter's own "max", 20, is not: 21 to 23 run)
        if opset > newest:  # what our lowering writes goes further than what torch.onnx.export's TorchScript exporter does
            hint += f" (torch.onnx.export writes opsets up to {newest}: export at opset {newest} or lower)"
        raise FallbackError(
            f"no ONNX lowering for {calls} at {region.where}, and torch.onnx.export (TorchScript) cannot export it at "
            f"opset {opset} either: {_first_line(error)}{_refusals(region)}{_flags_read(flags)}{hint}"
        ) from error
    how = "torch.onnx.export (TorchScript)" + (f" with rewrites: {', '.join(used)}" if used else "")
    return ExportedRegion(model, how, {f"in{k}": a for k, a in enumerate(axes[0]) if a}, branches, numbers,
                          flags=tuple(dict.fromkeys(flags)))


def _flags_read(flags: Sequence[str]) -> str:
    """Why a region's export may differ from the module, for a :class:`FallbackError`: the mode flags its code read
    while traced (empty when it read none)."""
    if not flags:
        return ""
    return (f" (its code reads {' and '.join(dict.fromkeys(flags))}, whose answer while torch.onnx.export traces it "
            "need not be the one the model gets when called: the file holds the branch the trace took)")


@contextlib.contextmanager
def probing() -> Iterator[None]:
    """A run the export makes to probe the model, or a part of it, whose failure the export handles (a batch or values
    it does not run at): what the run writes to ``sys.stderr`` is held, and dropped where the run raises.

    torch.fx prints the whole traceback of a GraphModule call that fails in its generated code ("Call using an
    FX-traced Module ...") before it raises, which read as the export's own failure (found by a probe: a GNN's
    ``x[src]`` at batch 1).  A run that returns writes what it printed (a model's warnings) through, after it.
    """
    held = io.StringIO()
    with contextlib.redirect_stderr(held):
        yield
    sys.stderr.write(held.getvalue())  # (not reached where the run raised)


@contextlib.contextmanager
def _quiet() -> Iterator[list[warnings.WarningMessage]]:
    """torch.onnx.export's tracer warnings, log lines and dumps stay off the user's terminal; the warnings are recorded.

    An attempt that fails is retried or reported by us (:class:`FallbackError` quotes the exception's first
    line), so nothing it prints is for the user, including the C++ dump before it raises ("Torch IR graph at
    exception: ...").
    """
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with (
            warnings.catch_warnings(record=True) as caught,
            _onnx_log_kept(),
            _fds_to_scratch(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("always")
            yield caught
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _onnx_log_kept() -> Iterator[None]:
    """torch's C++ ONNX log left on or off as it was: ``torch.onnx.export`` turns it on and never back off (it
    tests ``_jit_is_onnx_log_enabled`` uncalled), which would print a dump at every later failed export."""
    enabled = getattr(torch._C, "_jit_is_onnx_log_enabled", None)
    before = enabled() if enabled else None
    try:
        yield
    finally:
        if before is not None:
            torch._C._jit_set_onnx_log_enabled(before)


@contextlib.contextmanager
def _fds_to_scratch() -> Iterator[None]:
    """The process's stdout and stderr (file descriptors 1 and 2) into a scratch file while the block runs.

    C++ code (torch's ONNX log) writes to them directly, past ``sys.stdout``/``sys.stderr`` and their redirects.
    They are the process's: another thread's output in that time goes there too.  Where they cannot be
    duplicated (closed descriptors), the block runs without.
    """
    for stream in (sys.stdout, sys.stderr):  # what Python has buffered goes out first, where it was headed
        with contextlib.suppress(Exception):
            stream.flush()
    saved: list[int] = []
    try:
        for fd in (1, 2):
            saved.append(os.dup(fd))
    except OSError:
        for copy_ in saved:
            os.close(copy_)
        yield
        return
    try:
        with tempfile.TemporaryFile() as scratch:
            for fd in (1, 2):
                os.dup2(scratch.fileno(), fd)
            yield
    finally:
        for fd, copy_ in zip((1, 2), saved):
            os.dup2(copy_, fd)
            os.close(copy_)


def export_region(
    region: Region,
    module: nn.Module,
    examples: tuple[torch.Tensor, ...],
    dynamic: list[list[int]],
    dynamic_out: list[list[int]],
    opset: int,
) -> tuple[onnx.ModelProto, list[str], tuple[int, int]]:
    """``module`` (the region) exported alone with ``torch.onnx.export`` (TorchScript) under :class:`Rewrites`,
    inputs ``in0, in1, ...``, outputs ``out0, ...``, the given axes dynamic.  Returns the model, the rewrites
    used and how many tensor values the trace turned into Python booleans and read as numbers."""
    in_names = [f"in{k}" for k in range(len(examples))]
    out_names = [f"out{k}" for k in range(len(region.outputs))]
    axes = {name: {a: f"{name}_d{a}" for a in ax} for name, ax in [*zip(in_names, dynamic), *zip(out_names, dynamic_out)] if ax}
    buf = io.BytesIO()
    mode = Rewrites(opset)
    with _quiet() as caught, mode:
        torch.onnx.export(
            in_eval(copy_module(module)), _copies(examples), buf, dynamo=False, opset_version=opset,
            input_names=in_names, output_names=out_names, dynamic_axes=axes or None, do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue()), sorted(set(mode.used)), (mode.branches, mode.numbers)


# --------------------------------------------------------------------------- rewrites for torch.onnx.export
#
# A few ATen ops the TorchScript exporter cannot export at our opset (or at all), each rewritten as an exact
# equivalent it can, only where it cannot (a rewrite returns NotImplemented otherwise): applied as a
# TorchFunctionMode while a region is traced, so they also reach calls inside a module kept whole.  Resampling is
# linear at fixed sizes: out = A_h @ x @ A_w^T, the matrices computed by the op itself on unit vectors (outside the
# trace).


def _ints(v: Any) -> tuple:
    """Sizes as Python numbers, ``(v, v)`` for one: under the trace a size read from a shape is a 0-d tensor, and
    the sizes here are fixed (only the batch is dynamic, and these are spatial)."""
    if isinstance(v, (int, float, torch.Tensor)) and not (torch.is_tensor(v) and v.dim() > 0):
        v = (v, v)
    return tuple(None if k is None else int(k) for k in v)


@contextlib.contextmanager
def _untraced() -> Iterator[None]:
    """Compute constants while ``torch.onnx.export`` traces, without recording the computation."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        with torch.no_grad():
            yield
    finally:
        torch._C._set_tracing_state(state)


def _slice_scatter(x, src, dim=0, start=None, end=None, step=1, *, opset=0):
    """``x`` with ``x[..., start:end:step, ...] = src`` along ``dim``: concatenation for step 1."""
    dim = dim % x.dim()
    size = int(x.shape[dim])
    lo, hi, _ = slice(start, end, step).indices(size)
    if step != 1:
        out = x.clone()
        out[(slice(None),) * dim + (slice(lo, hi, step),)] = src
        return out
    parts = [x.narrow(dim, 0, lo), src, x.narrow(dim, hi, size - hi)]
    return torch.cat([p for p in parts if p.shape[dim] > 0], dim)


def _copy(x, src, non_blocking=False, *, opset=0):
    """Functional ``x.copy_(src)``: ``src`` broadcast to ``x``'s shape, in ``x``'s dtype."""
    return src.to(x.dtype).expand_as(x)


def _copy_into(x, src, non_blocking=False, *, opset=0):
    """In-place ``x.copy_(src)`` (a streaming conv's ``cache.copy_(torch.roll(cache, -1, -1))``) as ``x[:] = src``,
    the same write: the exporter turns a ``copy_`` of a whole tensor into ``aten::copy``, which it cannot export,
    and a write into a slice into ops it can (the later reads of ``x`` see the new values in both)."""
    if x.dim() == 0:
        return NotImplemented
    x[:] = src
    return x


def _cumsum(x, dim, dtype=None, *, opset=0):
    """``x.cumsum(dim)`` of a bool or integer ``x``: torch sums in int64 (``mask.cumsum(0)`` is int64), and so does the
    file now; the exporter wrote ``CumSum`` on the bool (or int8, int16, uint8) tensor itself, which ONNX does not
    define (k-diffusion's ``dists.ge(0).cumsum(0)`` was refused as an invalid graph)."""
    if dtype is not None or x.dtype.is_floating_point or x.is_complex() or x.dtype == torch.int64:
        return NotImplemented
    return torch.cumsum(x.to(torch.int64), dim)


def index_add_as_scatter(x, dim, index, source, alpha=1, *, in_place: bool, opset: int):
    """``x.index_add(dim, index, source, alpha=alpha)`` as ``x.scatter_add(dim, index, alpha * source)``, the index
    expanded to ``source``'s shape along the other axes: the exporter writes ``ScatterElements(reduction="add")``,
    which sums the entries of a duplicated index as torch does (message passing, ``zeros.index_add_(0, dst,
    x[src])``).  Its own ``index_add`` refuses more entries than rows ("duplicated values in 'index'") and ``alpha``.
    Without a reduction (before opset 16) a ScatterElements keeps one entry of each duplicate: refused by name."""
    if opset < 16:
        raise NotImplementedError(
            f"index_add: ONNX sums repeated indices only in ScatterElements(reduction='add'), from opset 16 on, "
            f"and the export is at opset {opset}: export at opset 16 or higher"
        )
    if isinstance(dim, str) or x.dim() == 0 or index.dim() > 1 or source.dim() != x.dim():
        return NotImplemented  # (a named axis, a 0-d tensor: as torch.onnx.export takes them)
    shape = [1] * x.dim()
    shape[dim] = -1
    index = index.to(torch.int64).reshape(shape).expand_as(source)
    if not (isinstance(alpha, (int, float)) and alpha == 1):
        source = source * alpha
    return x.scatter_add_(dim, index, source) if in_place else x.scatter_add(dim, index, source)


def _index_add(x, dim, index, source, *, alpha=1, out=None, opset=0):
    if out is not None:
        return NotImplemented  # (written into a given tensor: as torch.onnx.export takes it)
    return index_add_as_scatter(x, dim, index, source, alpha, in_place=False, opset=opset)


def _index_add_into(x, dim, index, source, *, alpha=1, opset=0):
    return index_add_as_scatter(x, dim, index, source, alpha, in_place=True, opset=opset)


def _bincount(x, weights=None, minlength=0, *, opset=0):
    """``torch.bincount(x, minlength=m)`` (a graph readout's count of nodes per graph) as a ``scatter_add`` of ones
    into ``max(x.max() + 1, m)`` zeros, a length the file computes from ``x`` as torch does (``Range`` of it: the
    exporter has no ``bincount``).  Counts are integers: exact in any order.  Weighted counts (float sums) are left
    to the exporter, which refuses them by name; so is a count before opset 16 (no ScatterElements reduction)."""
    if weights is not None or x.dim() != 1:
        return NotImplemented
    if opset < 16:
        raise NotImplementedError(
            f"bincount: ONNX sums repeated indices only in ScatterElements(reduction='add'), from opset 16 on, "
            f"and the export is at opset {opset}: export at opset 16 or higher"
        )
    x = x.to(torch.int64)
    zeros = torch.zeros_like(torch.arange((x.max() + 1).clamp(min=minlength)))
    return zeros.scatter_add(0, x, torch.ones_like(x))


def adaptive_windows(n_in: int, n_out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive-pool windows along one axis: ``[floor(o n_in / n_out), ceil((o + 1) n_in / n_out))`` for each
    output position ``o``."""
    return [((o * n_in) // n_out, -((-(o + 1) * n_in) // n_out)) for o in range(n_out)]


def fold_sources(output_size: Sequence[int], kernel, dilation, padding, stride) -> torch.Tensor:
    """For each pixel of ``F.fold``'s ``(H, W)`` output, the entries ``j L + l`` (kernel position ``j`` of window
    ``l``) of a channel's ``k L`` columns that land on it, filled up with ``k L``, the place of a zero appended to
    them: an ``(H W, width)`` index.  Torch's own unfold of the pixels' numbers says where each entry lands."""
    h, w = output_size
    numbers = torch.arange(1, h * w + 1, dtype=torch.float64).reshape(1, 1, h, w)
    lands = torch.nn.functional.unfold(numbers, kernel, dilation, padding, stride)[0].to(torch.int64) - 1  # -1: padding
    sources: list[list[int]] = [[] for _ in range(h * w)]
    for entry, pixel in enumerate(lands.flatten().tolist()):
        if pixel >= 0:
            sources[pixel].append(entry)
    width = max(map(len, sources), default=0) or 1
    return torch.tensor([s + [lands.numel()] * (width - len(s)) for s in sources], dtype=torch.int64)


def _col2im(x, output_size, kernel_size, dilation=1, padding=0, stride=1, *, opset=0):
    """``F.fold`` as a sum of gathers: each output pixel sums the column entries that land on it
    (:func:`fold_sources`); from opset 18 on, ONNX has ``Col2Im``.  (Not a transposed convolution of one-hot
    kernels: its ``0 * inf`` would spread an Inf or a NaN of one entry to every pixel its window covers.)"""
    if opset >= 18:
        return NotImplemented
    size, kernel = _ints(output_size), _ints(kernel_size)
    batched = x.dim() == 3
    if not batched:
        x = x.unsqueeze(0)
    c = int(x.shape[1]) // (kernel[0] * kernel[1])
    with _untraced():
        sources = fold_sources(size, kernel, _ints(dilation), _ints(padding), _ints(stride))
    entries = torch.nn.functional.pad(x.reshape(-1, c, int(x.shape[1]) // c * int(x.shape[2])), (0, 1))
    y = entries.index_select(-1, sources.flatten()).reshape(-1, c, *size, sources.shape[1]).sum(-1)
    return y if batched else y.squeeze(0)


def _avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None, *, opset=0):
    """Two average pools torch.onnx.export gets wrong.

    * ``divisor_override``: the exporter writes a plain average (torch 2.13), so the pool is rewritten as
      one that counts the padding, times ``kh * kw / divisor``: without ``ceil_mode`` every window then
      divides by ``kh * kw``.  With ``ceil_mode`` the last windows divide by less; that is refused.
    * a kernel that is the whole input (``F.avg_pool2d(x, x.shape[2:])``, a squeeze-excite idiom) as a mean:
      the exporter needs a kernel size it can read as a constant, and one read from the shape is not.
    """
    if divisor_override:
        if ceil_mode:
            raise NotImplementedError(
                "avg_pool2d with divisor_override and ceil_mode=True: torch.onnx.export writes it as a plain average"
            )
        kh, kw = _ints(kernel_size)
        pooled = torch.nn.functional.avg_pool2d(x, kernel_size, stride, padding, False, True)
        return pooled * ((kh * kw) / divisor_override)
    size = _ints(x.shape[-2:])
    if _ints(kernel_size) != size or stride not in (None, [], ()) and _ints(stride) != size:
        return NotImplemented
    if _ints(padding) != (0, 0):
        return NotImplemented
    return x.mean(dim=(-2, -1), keepdim=True)


def _adaptive_pool(x, output_size, return_indices=False, *, spatial: int, reduce: Callable[[torch.Tensor, int], torch.Tensor],
                   opset=0):
    """Adaptive pooling of ``spatial`` axes at fixed sizes whose output size does not divide the input's (the
    exporter takes only those): ``reduce`` (:func:`_window_mean`, :func:`_window_max`) of each of PyTorch's windows
    ``[floor(i in / out), ceil((i + 1) in / out))``, one axis after the other (a matrix product would spread an Inf
    or a NaN of one window into the others, as ``0 * inf``).  Not with ``return_indices``; 1-D and 3-D too (their
    export failed on models ``fuse`` handled; review R9)."""
    sizes = [int(n) for n in x.shape[-spatial:]]
    one = isinstance(output_size, (int, torch.Tensor)) and not (torch.is_tensor(output_size) and output_size.dim() > 0)
    wanted = [n if o is None else int(o) for n, o in zip(sizes, (output_size,) * spatial if one else tuple(output_size))]
    if return_indices or not any(n % o for n, o in zip(sizes, wanted)):
        return NotImplemented
    for dim, (n_in, n_out) in zip(range(-spatial, 0), zip(sizes, wanted)):
        if n_in != n_out:
            x = torch.cat([reduce(x.narrow(dim, lo, hi - lo), dim) for lo, hi in adaptive_windows(n_in, n_out)], dim)
    return x


def _window_mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.mean(dim, keepdim=True)


def _window_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.amax(dim, keepdim=True)


def _resample(x, resize: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """A separable resampling at fixed sizes: ``resize(e, axis)`` on unit vectors along ``axis`` gives its matrices.

    The unit vectors are two wide across the other axis, which keeps its size (torch's antialiased kernels
    weigh a height-1 or width-1 input differently).
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])
    with _untraced():
        e_h = torch.eye(h, dtype=x.dtype).reshape(h, 1, h, 1).repeat(1, 1, 1, 2)
        e_w = torch.eye(w, dtype=x.dtype).reshape(w, 1, 1, w).repeat(1, 1, 2, 1)
        a_h = resize(e_h, 0)[:, 0, :, 0].t().contiguous()
        a_w = resize(e_w, 1)[:, 0, 0, :].contiguous()
    return torch.matmul(torch.matmul(a_h, x), a_w)


def _aa_op(op: Callable) -> Callable:
    """An antialiased ATen resampling (``_upsample_bicubic2d_aa``, ...) as two matrix products."""

    def rewrite(x, output_size, align_corners, scales_h=None, scales_w=None, *, opset=0):
        oh, ow = _ints(output_size)
        return _resample(x, lambda e, axis: op(e, [oh, 2] if axis == 0 else [2, ow], align_corners, scales_h if axis == 0 else None,
                                               None if axis == 0 else scales_w))

    return rewrite


def _interpolate(
    x, size=None, scale_factor=None, mode="nearest", align_corners=None, recompute_scale_factor=None, antialias=False, *, opset=0
):
    """``F.interpolate(..., antialias=True)`` (no ONNX op before opset 18) as two matrix products; nearest and
    nearest-exact as a ``Gather`` per axis of the pixels torch picks (:func:`_nearest`); others unchanged."""
    if mode in ("nearest", "nearest-exact") and not antialias:
        return _nearest(x, size, scale_factor, mode, recompute_scale_factor)
    if not antialias and scale_factor is not None and not recompute_scale_factor:
        return _scaled(x, scale_factor, mode, align_corners)
    if not antialias or x.dim() != 4:
        return NotImplemented
    pair = lambda v: (v, v) if not isinstance(v, (tuple, list)) else tuple(v)  # noqa: E731
    size, scale = (_ints(size) if size is not None else None), (pair(scale_factor) if scale_factor is not None else None)

    def resize(e: torch.Tensor, axis: int) -> torch.Tensor:
        one = lambda v: (v[0], 2) if axis == 0 else (2, v[1])  # noqa: E731
        kw = dict(mode=mode, align_corners=align_corners, recompute_scale_factor=recompute_scale_factor, antialias=True)
        if size is not None:
            return torch.nn.functional.interpolate(e, size=one(size), **kw)
        return torch.nn.functional.interpolate(e, scale_factor=(scale[0], 1.0) if axis == 0 else (1.0, scale[1]), **kw)

    return _resample(x, resize)


def _scaled(x, scale_factor, mode, align_corners) -> Any:
    """An interpolation by ``scale_factor`` with each factor moved by as few float32 ulps as it takes for the output
    size of ``Resize``, which holds its scales in float32, to be torch's (``floor(size * factor)`` in double): 1.3 is
    1.29999995 in float32, and the exporter's file made 12 rows of 10 where torch makes 13 (review R13b: the export
    was refused with an error about an ``Identity`` node).  The coordinates move by as much (~1e-7, float32's own
    rounding); unchanged where no factor needs it."""
    from repalgebra.backend.onnx import _scale_for

    spatial = [int(n) for n in x.shape[2:]]
    factors = list(scale_factor) if isinstance(scale_factor, (tuple, list)) else [scale_factor] * len(spatial)
    if len(factors) != len(spatial):
        return NotImplemented
    moved = tuple(float(_scale_for(f, n, math.floor(n * f))) for f, n in zip(factors, spatial))
    if all(float(np.float32(f)) == m for f, m in zip(factors, moved)):
        return NotImplemented
    return torch.nn.functional.interpolate(x, scale_factor=moved, mode=mode, align_corners=align_corners)


def _nearest(x, size, scale_factor, mode, recompute_scale_factor) -> torch.Tensor:
    """Nearest interpolation at fixed sizes as one ``index_select`` per spatial axis, of the indices torch itself
    picks (run on each axis's coordinates): exact, where the exporter's ``Resize`` picks by ``dst / scale`` and
    rounds to other pixels at some sizes, and has no 3-D nearest-exact at all (review R9).  By whole factors where
    torch picks ``floor(dst / k)`` (:func:`~repalgebra.backend.onnx._resize_picks`), an interpolation by those
    factors, which the exporter writes as a ``Resize`` by constant scales picking the same pixels."""
    spatial = [int(n) for n in x.shape[2:]]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # (as the kernel computes its scale)
    kw = dict(size=size, scale_factor=scale_factor, mode=mode, recompute_scale_factor=recompute_scale_factor)
    with _untraced():
        picks = []
        for axis, n in enumerate(spatial):
            along = [1] * len(spatial)
            along[axis] = n
            coords = torch.arange(n, dtype=dtype).reshape(1, 1, *along).expand(1, 1, *spatial)
            line = torch.nn.functional.interpolate(coords, **kw)[0, 0]
            picks.append(line[(0,) * axis + (slice(None),) + (0,) * (len(spatial) - axis - 1)].to(torch.int64))
    from repalgebra.backend.onnx import _resize_picks

    if mode == "nearest" and x.dtype in (torch.float32, torch.float16) and all(
            len(pick) % n == 0 and _resize_picks(pick, n, False) for pick, n in zip(picks, spatial)):
        # by whole factors, picking floor(dst / k): the exporter's Resize by constant scales picks the same pixels,
        # and onnxruntime runs it many times faster than a Gather per axis (diffusers' Upsample2D in a UNet fx cannot
        # trace: 28 ms against 15.9 for a 2x upsampling of 128 maps of 80x80; review R20b)
        return torch.nn.functional.interpolate(x, scale_factor=tuple(float(len(p) // n) for p, n in zip(picks, spatial)), mode="nearest")
    for axis, pick in enumerate(picks):
        x = x.index_select(axis + 2, pick)
    return x


def _flash_attention(q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None, opset=0):
    """The CPU flash-attention kernel ``torch.export`` may record: ``F.scaled_dot_product_attention`` and the
    log-sum-exp of the scaled scores it also returns."""
    if dropout_p:
        return NotImplemented
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / float(int(q.shape[-1])) ** 0.5)
    if is_causal:
        n, m = int(q.shape[-2]), int(k.shape[-2])
        with _untraced():
            causal = torch.ones(n, m, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return out, torch.logsumexp(scores, dim=-1)


def _floor_divide(a, b, *, opset=0):
    """``a // b``, which torch floors: torch.onnx.export writes ``floor_divide`` as it used to compute it, truncated
    toward zero (``-7 // 3`` is -2 in the file, -3 in torch).  ``div(rounding_mode="floor")`` it writes as a floor."""
    return torch.div(a, b, rounding_mode="floor")


def _floor_divide_reflected(a, b, *, opset=0):
    """``b // a`` for a number ``b`` (``Tensor.__rfloordiv__``): :func:`_floor_divide` the other way round, in the
    dtype torch gives it (a float by int ids is a float: ``-0.5 // ids``)."""
    return torch.div(torch.full_like(a, b, dtype=torch.result_type(a, b)), a, rounding_mode="floor")


def _fake_quantize(x, scale, zero_point, quant_min, quant_max, axis=None):
    """``fake_quantize_per_{tensor,channel}_affine`` as torch computes it: ``(clamp(round(x * (1 / s)) + z, lo, hi)
    - z) * s``.  torch.onnx.export writes QuantizeLinear, which rounds ``x / s``: at a tie (symmetric per-channel
    weights put the largest of each channel at 127.5) it lands on the next integer, one quantization step off."""
    if torch.is_tensor(zero_point) and zero_point.is_floating_point():
        return NotImplemented  # float zero points: torch rounds x / s + z, another formula (exported as it writes it)
    # Its kernel multiplies in float32 at least (a half x times the float 1 / s; a double x in double) and scales
    # the integer back in float32 (found by a review: in half, 13% of a file's outputs were a step off).
    work = torch.promote_types(x.dtype, torch.float32)
    scale = torch.as_tensor(scale, dtype=torch.float32)
    zero = torch.as_tensor(zero_point).to(work)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    q = torch.clamp(torch.round(x.to(work) * (1.0 / scale).to(work)) + zero, quant_min, quant_max)
    return ((q - zero).float() * scale).to(x.dtype)


def _fake_quantize_per_tensor(x, scale, zero_point, quant_min, quant_max, *, opset=0):
    return _fake_quantize(x, scale, zero_point, quant_min, quant_max)


def _fake_quantize_per_channel(x, scale, zero_point, axis, quant_min, quant_max, *, opset=0):
    return _fake_quantize(x, scale, zero_point, quant_min, quant_max, axis)


aten = torch.ops.aten
REWRITES: dict[Any, tuple[str, Callable]] = {
    torch.fake_quantize_per_tensor_affine: ("fake_quantize", _fake_quantize_per_tensor),
    aten.fake_quantize_per_tensor_affine.default: ("fake_quantize", _fake_quantize_per_tensor),
    aten.fake_quantize_per_tensor_affine.tensor_qparams: ("fake_quantize", _fake_quantize_per_tensor),
    torch.fake_quantize_per_channel_affine: ("fake_quantize", _fake_quantize_per_channel),
    aten.fake_quantize_per_channel_affine.default: ("fake_quantize", _fake_quantize_per_channel),
    torch.Tensor.__floordiv__: ("floor_divide", _floor_divide),
    torch.Tensor.floor_divide: ("floor_divide", _floor_divide),
    torch.floor_divide: ("floor_divide", _floor_divide),
    aten.floor_divide.default: ("floor_divide", _floor_divide),
    torch.Tensor.__rfloordiv__: ("floor_divide", _floor_divide_reflected),
    aten.slice_scatter.default: ("slice_scatter", _slice_scatter),
    torch.slice_scatter: ("slice_scatter", _slice_scatter),
    torch.Tensor.slice_scatter: ("slice_scatter", _slice_scatter),
    aten.copy.default: ("copy", _copy),
    torch.Tensor.copy_: ("copy_", _copy_into),
    aten.cumsum.default: ("cumsum", _cumsum),
    torch.cumsum: ("cumsum", _cumsum),
    torch.Tensor.cumsum: ("cumsum", _cumsum),
    aten.index_add.default: ("index_add", _index_add),
    torch.index_add: ("index_add", _index_add),
    torch.Tensor.index_add: ("index_add", _index_add),
    aten.index_add_.default: ("index_add_", _index_add_into),
    torch.Tensor.index_add_: ("index_add_", _index_add_into),
    aten.bincount.default: ("bincount", _bincount),
    torch.bincount: ("bincount", _bincount),
    torch.Tensor.bincount: ("bincount", _bincount),
    aten.col2im.default: ("col2im", _col2im),
    torch.nn.functional.fold: ("fold", _col2im),
    aten.avg_pool2d.default: ("avg_pool2d", _avg_pool2d),
    torch.nn.functional.avg_pool2d: ("avg_pool2d", _avg_pool2d),
    **{f: (f"adaptive_avg_pool{d}d", functools.partial(_adaptive_pool, spatial=d, reduce=_window_mean)) for d, fs in (
        (1, (aten.adaptive_avg_pool1d.default, torch.adaptive_avg_pool1d)),
        (2, (aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default, torch.nn.functional.adaptive_avg_pool2d)),
        (3, (aten.adaptive_avg_pool3d.default, aten._adaptive_avg_pool3d.default, torch.nn.functional.adaptive_avg_pool3d)))
       for f in fs},
    **{f: (f"adaptive_max_pool{d}d", functools.partial(_adaptive_pool, spatial=d, reduce=_window_max)) for d, f in (  # (aten's
        # give indices too)
        (1, torch.nn.functional.adaptive_max_pool1d), (2, torch.nn.functional.adaptive_max_pool2d),
        (3, torch.nn.functional.adaptive_max_pool3d))},
    aten._upsample_bicubic2d_aa.default: ("upsample_bicubic2d_aa", _aa_op(aten._upsample_bicubic2d_aa.default)),
    aten._upsample_bilinear2d_aa.default: ("upsample_bilinear2d_aa", _aa_op(aten._upsample_bilinear2d_aa.default)),
    torch.nn.functional.interpolate: ("interpolate(antialias)", _interpolate),
    aten._scaled_dot_product_flash_attention_for_cpu.default: ("flash_attention", _flash_attention),
}


class Rewrites(TorchFunctionMode):
    """While active, the calls in :data:`REWRITES` run as their rewrites (where the exporter needs them at
    ``opset``); ``used`` names those that did."""

    def __init__(self, opset: int) -> None:
        super().__init__()
        self.opset = opset
        self.used: list[str] = []
        self.branches = 0  # tensor values the model's own code turned into Python booleans
        self.numbers = 0  # and read as Python numbers

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__bool__ and not _called_by_torch():
            self.branches += 1
        elif func in _NUMBER_READS and not _called_by_torch():
            self.numbers += 1
        try:
            entry = REWRITES.get(func)
        except TypeError:  # an unhashable callable
            entry = None
        if entry is not None:
            out = entry[1](*args, **kwargs, opset=self.opset)
            if out is not NotImplemented:
                self.used.append(entry[0])
                return out
        return func(*args, **kwargs)


# (``.numpy()``: NVIDIA Tacotron2's ``input_lengths.cpu().numpy()`` before ``pack_padded_sequence``; found by a probe)
_NUMBER_READS = {torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.tolist,
                 torch.Tensor.numpy, torch.Tensor.__array__}


def _called_by_torch() -> bool:
    """Whether the ``bool(tensor)`` being dispatched was written in torch's own code (InstanceNorm's check that a
    channel has more than one value): a check of sizes, not the model's control flow on values."""
    f = sys._getframe(2)
    while f is not None and f.f_code.co_filename.endswith((os.path.join("torch", "overrides.py"), os.path.join("torch", "_tensor.py"))):
        f = f.f_back
    return f is not None and f.f_code.co_filename.startswith(_TORCH_DIR)


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


# --------------------------------------------------------------------------- splice


@dataclass
class Spliced:
    """What the splices add besides nodes and initializers: opset imports and local functions."""

    opsets: dict[str, int] = field(default_factory=dict)
    functions: list[onnx.FunctionProto] = field(default_factory=list)


def splice(
    ctx: Any, sub: onnx.ModelProto, input_names: Sequence[str], prefix: str, opset: int, extra: Spliced
) -> list[str]:
    """Add ``sub``'s graph to ``ctx`` (our lowering context) reading ``input_names``; returns its output names.

    Every name of ``sub`` except its inputs is renamed ``prefix/name`` (made unique in ``ctx``); an output
    that no node of ``sub`` computes (an input or an initializer passed through) becomes an ``Identity``.
    """
    g = sub.graph
    for imp in sub.opset_import:
        if imp.domain in ("", "ai.onnx"):
            if imp.version != opset:
                raise FallbackError(f"torch.onnx.export gave opset {imp.version} for {prefix}, asked for {opset}")
        elif extra.opsets.setdefault(imp.domain, imp.version) != imp.version:
            raise FallbackError(f"two versions of opset domain {imp.domain!r}: {extra.opsets[imp.domain]} and {imp.version}")
    names: dict[str, str] = dict(_fed([i.name for i in g.input], tuple(input_names)))
    names[""] = ""

    def rename(name: str) -> str:
        if name not in names:
            names[name] = ctx.unique(f"{prefix}/{name.lstrip('/')}")
        return names[name]

    def rename_graph(graph: onnx.GraphProto) -> None:  # names inside If/Loop bodies, with their outer-scope reads
        for t in graph.initializer:
            t.name = rename(t.name)
        for vi in [*graph.input, *graph.output, *graph.value_info]:
            vi.name = rename(vi.name)
        for node in graph.node:
            rename_node(node)

    def rename_node(node: onnx.NodeProto) -> None:
        node.input[:] = [rename(i) for i in node.input]
        node.output[:] = [rename(o) for o in node.output]
        node.name = ctx.unique(f"{prefix}/{node.name.lstrip('/') or node.op_type}#node")
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                rename_graph(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sg in a.graphs:
                    rename_graph(sg)

    produced = {o for node in g.node for o in node.output}
    for t in g.initializer:
        t = copy.deepcopy(t)
        t.name = rename(t.name)
        ctx.initializers.append(t)
    for node in g.node:
        node = copy.deepcopy(node)
        rename_node(node)
        ctx.nodes.append(node)
    outs = []
    for o in g.output:
        if o.name in produced:
            outs.append(names[o.name])
        else:  # a pass-through: the exporter returned an input or a constant as it is
            outs.append(ctx.emit("Identity", [rename(o.name)]))
    for f in sub.functions:
        if all((f.domain, f.name, f.overload) != (h.domain, h.name, h.overload) for h in extra.functions):
            extra.functions.append(f)
    return outs


# --------------------------------------------------------------------------- capture for export


MAX_LEAVES = 64  # submodules kept whole (carried through to the fallback) before the module itself is


def capture_for_export(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[Graph, str]:
    """``model`` as a graph for export, and how it was captured.

    ``torch.fx`` first; a submodule it cannot trace becomes a leaf (an opaque node for the fallback), one at a
    time as the tracer names them; if the module's own ``forward`` cannot be traced, the whole module is one
    opaque node (so the whole export goes through ``torch.onnx.export``).
    """
    from repalgebra.frontend.inplace import InplaceHazard
    from repalgebra.frontend.torch import UntraceableError, trace_model

    leaves: list[str] = []
    reason = ""
    while len(leaves) <= MAX_LEAVES:
        try:
            traced = trace_model(model, inputs, leaf_modules=tuple(leaves))
            graph = traced.graph
            # The checks the fused model makes per call (a test of sizes taken as at the example, an assertion): a
            # file cannot make them, and its batch must not be free where they read it (export_onnx).
            graph.input_checks = list(traced.input_checks)
        except (UntraceableError, InplaceHazard) as e:
            path = getattr(e, "path", "")
            reason = (str(e).strip().splitlines() or [""])[0]
            if not path or path in leaves:
                break
            leaves.append(path)
            continue
        except Exception as e:  # noqa: BLE001  (torch.fx's own TraceError while the graph is built, at no one path)
            reason = _first_line(e)
            break
        if not leaves:
            return graph, "fx"
        shown = ", ".join(repr(p) for p in leaves)
        return graph, f"fx, with {len(leaves)} part{'s' * (len(leaves) != 1)} torch.fx cannot trace kept whole: {shown}"
    return whole_model_graph(model, inputs), f"whole (torch.fx cannot trace {type(model).__name__}: {reason})"


def whole_model_graph(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Graph:
    """A graph of one opaque node calling ``model`` (then one ``getitem`` per output when it returns several)."""
    from torch.utils import _pytree as pytree

    from repalgebra.frontend.builder import literal_output
    from repalgebra.frontend.calls import FnCall, In

    work = in_eval(copy_module(model))
    with torch.no_grad():
        out = work(*[t.clone() for t in inputs])
    xs = [Graph.input(f"x{k}" if len(inputs) > 1 else "x", tuple(t.shape), t.dtype) for k, t in enumerate(inputs)]
    if torch.is_tensor(out):
        node = Node.make("opaque", xs, {"fn": work, "out_shape": tuple(out.shape), "out_dtype": out.dtype}, {}, "")
        return Graph(xs, [node], [node.out])
    leaves = output_leaves(out)
    odd = next((t for t in leaves if t is not None and not torch.is_tensor(t)), None)
    if odd is not None:
        raise TypeError(f"export_onnx: {type(model).__name__} returns a {type(odd).__name__} among its outputs; ONNX outputs are "
                        "tensors (return tensors in tuples, lists, dicts, named tuples or dataclasses)")
    whole = Node.make("opaque", xs, {"fn": Flat(work), "out_shape": None, "out_dtype": None}, {}, "")
    nodes = [whole]
    for k, t in enumerate(leaves):
        if t is None:  # an output that is always None: left out of the ONNX graph
            nodes.append(Node.make("opaque", [], literal_output(), {}, ""))
            continue
        fn = FnCall("call_function", _getitem, (In(0), k), {}, {})
        nodes.append(Node.make("opaque", [whole.out], {"fn": fn, "out_shape": tuple(t.shape), "out_dtype": t.dtype}, {}, ""))
    return Graph(xs, nodes, [n.out for n in nodes[1:]])


def _getitem(xs: Any, k: int) -> Any:
    return xs[k]


class Flat(nn.Module):
    """``module`` with its outputs flattened to a tuple of tensors."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *xs: Any) -> tuple:
        return tuple(output_leaves(self.module(*xs)))


def output_leaves(out: Any) -> list:
    """The tensors (and Nones) of a model's output in order: pytree's leaves, and inside a mapping or dataclass pytree
    does not know (an HF ``ModelOutput`` class that is not registered) its values, as ``to_tuple()`` gives them."""
    from torch.utils import _pytree as pytree

    flat = []
    for t in pytree.tree_leaves(out):
        if isinstance(t, Mapping):
            flat += output_leaves(list(t.values()))
        elif dataclasses.is_dataclass(t) and not isinstance(t, type):
            flat += output_leaves([getattr(t, f.name) for f in dataclasses.fields(t)])
        else:
            flat.append(t)
    return flat


def fixed_shape_parts(model: nn.Module) -> list[str]:
    """Where ``model`` holds parts ``fuse`` captured with shapes fixed, batch included (a ``ShapeGuard``): valid at one batch."""
    from repalgebra.fuse import ShapeGuard

    found = []
    for path, m in model.named_modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, ShapeGuard) and hook.fixes_batch:
                shapes = ", ".join("x".join(map(str, s)) for s in hook.shapes)
                found.append(f"{path or 'the model'} (at {shapes})")
    return found
