"""``repalgebra.fuse(model)``: capture, rewrite to a fixpoint, build a new module, check it.

    fused = repalgebra.fuse(model, x)   # new nn.Module in eval mode; model untouched
    print(fused.fuse_report)            # what folded where, how each part was captured, what was kept whole

Fusion folds *eval-mode* semantics (BatchNorm with its running statistics,
dropout as the identity) whatever mode the model is in; the model itself is
never changed (parameters, buffers and ``training`` flags stay bit for bit;
plain attributes and hooks its hooks change while ``fuse`` runs its copies are
put back).
All folding arithmetic runs in float64 on the CPU; a float16/bfloat16 model's
folded weights are cast back to its dtype once, at the end, and the fused
module is moved to the model's device.

How a model is captured (:mod:`repalgebra.frontend.capture`): ``torch.fx``
first; where that fails, ``torch.export`` with shapes fixed at the example
input; where both fail, the submodule the failure happened in is kept whole
(an opaque call) and fused *inside* on its own, recursively, so a conv+BN pair
inside an untraceable attention block still folds.  Each captured graph is
checked against the original module on the example input before it is used
(in float64 where the model runs in float64, against the folded weights before
they are rounded back); a capture that computes something else is discarded and
the next path tried.  A module whose calls change its own state (a counter, a
running mean kept in eval mode) is kept whole and untouched on its own copy of
the state (:mod:`repalgebra.frontend.state`).  ``fuse`` raises only for a model
that does not run on the example input, for bad input, or with ``strict=True``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import inspect
import io
import operator
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from repalgebra.backend.torch import ORIGINS, to_module
from repalgebra.call_dispatch import MOST_SIGNATURES, CallDispatch, Dispatch, Signature
from repalgebra.draws import DRAWS, generators_kept, seeded_for_checks
from repalgebra.frontend.outside_reads import named_by_attributes, names_reached, reached_through, read_outside, tests_classes
from repalgebra.frontend.builder import a_factory, is_returned_as_is, map_leaves
from repalgebra.frontend.autocast_off import autocast_left_off
from repalgebra.frontend.calls import Buf, FnCall, In, SymExpr, target_name
from repalgebra.frontend.size_tests import taken_as_traced
from repalgebra.frontend.capture import Call, Capture, CaptureFailed, capture_fx, capture_specialized, first_line, record_calls
from repalgebra.frontend.fx_trace import one_at_a_time, runs_own_hooks
from repalgebra.frontend.inputs import as_tuple, batch_of_one, batch_plus_one
from repalgebra.frontend.layout_reads import dense_outputs, layouts_to_match
from repalgebra.frontend.module_globals import globals_kept
from repalgebra.frontend.state import STATE_TAG, StateChanged, cache_regions, copy_difference, find_state, mark_written, restore_in_place, watch
from repalgebra.frontend.structured import bound_view, flat_leaves, flat_view, needs_flat_view, restructured, structure_mismatch, structure_text, unviewed
from repalgebra.frontend.torch import UntraceableError, check_leaf_modules, check_model, example_inputs_for, leaf_paths, model_dtype
from repalgebra.frontend.wrappers import unwrap
from repalgebra.gc_pause import frozen_gc
from repalgebra.hooked import HookedPart, movable_hooks, without_hooks
from repalgebra.ir import Graph, Node
from repalgebra.layout import SIZE_MATCHED
from repalgebra.module_copy import cast_floats, copy_module, eval_copy, in_eval, keep_registries, plain_ties
from repalgebra.ties import retie
from repalgebra.rewrite import Firing, LeftAlone, RewriteReport, cast_params, rewrite
from repalgebra.untouched import attributes_kept, model_kept, rng_kept, tensors_kept
from repalgebra.verify import TOLERANCES, first_difference, tensor_leaves

__all__ = ["fuse", "FuseReport", "Part", "FuseError", "ShapeGuard", "StructureGuard"]

Unit = tuple[int, int]  # (input, axis): an axis of one of a capture's inputs (holds_at_other_sizes)
MAX_KEPT_WHOLE = 64  # submodules kept whole around one capture before the module itself is


class FuseError(RuntimeError):
    """``fuse(strict=True)`` could not capture a part, or the fused model differs from the original."""


@dataclass(frozen=True)
class Part:
    """How one module was handled: ``how`` is ``fx``, ``specialized`` or ``kept whole``; ``reason`` why not earlier paths."""

    path: str
    how: str
    reason: str = ""
    module: str = ""  # the module's class name

    def __str__(self) -> str:
        where = f"{self.path!r} ({self.module})" if self.path else f"the model ({self.module})"
        return f"{where}: {self.how}" + (f": {self.reason}" if self.reason else "")


@dataclass
class FuseReport:
    """What :func:`fuse` did: rules fired where, what was left alone and why, counts before and after."""

    fired: list[Firing] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    params_before: int = 0  # parameter elements of the model (nn.Module.parameters)
    params_after: int = 0
    buffers_before: int = 0  # buffer elements (BN statistics, layer-scale constants)
    buffers_after: int = 0
    opaque: list[str] = field(default_factory=list)  # sources of nodes carried through unchanged
    notes: list[str] = field(default_factory=list)
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)  # how the model and each part kept apart was captured
    check: str = ""  # what each rewritten part was compared with: "the model on the example input in float64, to 1e-05 relative"
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # capture / rewrite / build / check

    @property
    def capture(self) -> str:
        """``fx``, ``specialized`` or ``kept whole``: how the model itself was captured."""
        top = [p for p in self.parts if p.path == ""]
        return top[-1].how if top else "fx"

    @property
    def kept_whole(self) -> list[Part]:
        """The modules kept whole (their children fused on their own), with the reason."""
        return [p for p in self.parts if p.how == "kept whole"]

    def rule_counts(self) -> dict[str, int]:
        """How often each rule fired, most frequent first."""
        return RewriteReport(fired=self.fired).rule_counts()

    def __str__(self) -> str:
        shapes = _shapes_text(self.input_shapes)
        lines = [f"fuse: {len(self.fired)} rewrites in {self.seconds:.3f}s (traced at {shapes}; eval-mode semantics)"]
        kept = len(self.kept_whole) - (self.capture == "kept whole")
        lines.append(f"  capture: {self.capture}" + (f", {kept} part{'s' * (kept != 1)} kept whole" if kept > 0 else ""))
        plain = [p for p in self.parts if p.path and p.how == "fx" and not p.reason]  # children of parts kept whole
        for p in self.parts:
            if (p.path or p.reason) and p not in plain and f"    {p}" not in lines:  # a part met twice (inside a part kept whole)
                lines.append(f"    {p}")
        if plain:  # a part fused twice (tried under a parent that was then kept whole) is listed once
            paths = list(dict.fromkeys(repr(p.path) for p in plain))
            lines.append(f"    fused on their own with fx ({len(paths)}): {_listed(paths)}")
        if self.check:
            lines.append(f"  checked against: {self.check}")
        copies = list(dict.fromkeys(n for n in self.notes if n.endswith(_AS_IT_IS)))
        lines += [f"  note: {n}" for n in self.notes if n not in copies]
        if copies:
            where = [n[: -len(_AS_IT_IS)].rstrip(": ") for n in copies]
            lines.append(f"  note: nothing to fold in {len(copies)} part{'s' * (len(copies) > 1)}, returned as "
                         f"{'they are (copies)' if len(copies) > 1 else 'it is (a copy)'}: {_listed(where)}")
        ops = sorted(set(self.ops_before) | set(self.ops_after))
        w = max([len(o) for o in ops] + [len("parameters")])
        lines.append(f"  {'':<{w}}  {'before':>9}  {'after':>9}")
        for o in ops:
            lines.append(f"  {o:<{w}}  {self.ops_before.get(o, 0):>9}  {self.ops_after.get(o, 0):>9}")
        lines.append(f"  {'parameters':<{w}}  {self.params_before:>9}  {self.params_after:>9}")
        lines.append(f"  {'buffers':<{w}}  {self.buffers_before:>9}  {self.buffers_after:>9}")
        if self.fired:
            lines.append("  rules fired:")
            for name, n in self.rule_counts().items():
                where = sorted({f.source or _TOP for f in self.fired if f.rule == name})
                lines.append(f"    {name:<20} x{n:<4} at {_listed(where, 4)}")
        if self.left_alone:
            lines.append("  left alone:")
            for la in self.left_alone:
                lines.append(f"    {la.op} at {la.source or _TOP}: {la.reason}")
        if self.opaque:  # each place once, with how many calls it makes (a CondConv makes two: routing, conv)
            counts = Counter(self.opaque)
            places = [f"{p} x{k}" if k > 1 else p for p, k in counts.items()]
            calls = f"{len(self.opaque)} call{'s' if len(self.opaque) > 1 else ''}"
            lines.append(f"  carried through unchanged ({calls}): {_listed(places)}")
        return "\n".join(lines)


_AS_IT_IS = "nothing to fold: it is returned as it is (a copy)"  # the note of a part whose capture folds nothing


# Why an fx capture holds at the example's ranks only: an unbatched image through a graph captured batched would
# concatenate, slice or split along another axis than the model does.
_RANK_WHY = "its graph holds each axis at the example's number of axes (an axis counted from the end, dim=-1, is a fixed axis in it)"

# Why an fx capture keeps an axis at the example's size where it keeps the others free (holds_at_other_sizes).
_UNSHOWN_WHY = ("the original refused every other size tried there, so the check that its folded graph holds at "
                "other sizes never ran on that axis")

# Why a torch.export capture holds in the dtypes it was checked in only: Python read the dtype while export ran
# (``if torch.finfo(x.dtype).bits < 32``, ``x.dtype == torch.float16``) and the graph keeps the branch it took.
_EXPORT_DTYPE_WHY = ("torch.export recorded its Python in one dtype: a cast, or a branch on the dtype "
                     "(torch.finfo(x.dtype).bits < 32), stays as taken there")

_TOP = "the model's forward"  # where a node of the model's own forward is, in a report (its module path is "")

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _guard_pinned(where: str, fused: nn.Module, cap: Capture, original: nn.Module, inputs: tuple) -> None:
    """Keep ``fused`` to the dtypes a cast of the model keeps it computing in: ``forward`` reads a floating tensor
    that is neither a parameter nor a buffer (``* torch.tensor([8., 16., 32.])``), which a cast leaves as it is, so
    after ``model.half()`` PyTorch promotes the product to float32, where the fused module (its weights cast, the
    tensor folded into them) would compute in float16.  Dtypes that already hold it (float64 beside a float32
    tensor) keep their results' dtype and run.  Only where a cast shows it: a tensor forward casts to its input's
    dtype (``self.mean.to(x.dtype)``), or one torch.fx made of a buffer (a flipped blur kernel), follows the cast
    in both and keeps nothing from running.

    A tensor written into in place (``logdet += s`` into a ``torch.zeros`` of the default dtype) with a value that
    follows the model's dtype keeps its own where the fused graph's out-of-place op promotes: only dtypes it promotes
    nothing to hold (after ``fused.double()`` the model returned that sum in float32, the fused model in float64;
    a review found the same sum hidden in an output of the model's dtype, ``y * logdet[:, None]``)."""
    casts = _fixed_casts(cap)
    if not (cap.pinned or cap.kept or casts):
        return
    promoted = (casts or not cap.kept) and _promoted_after_a_cast(original, fused, inputs)
    if not (cap.kept or promoted):  # (a sum kept narrower: no dtype shows it)
        return
    casts = casts if promoted else []  # casts written in the code, which a cast of the model keeps too
    own = computes_in(original, inputs)
    holds = tuple(dict.fromkeys([own, *(t for t in _FLOATS if all(torch.promote_types(t, d) == t for _, d in [*cap.pinned, *casts])
                                        and all(torch.promote_types(t, d) == d for _, d in cap.kept))]))
    name = lambda d: str(d).replace("torch.", "")  # noqa: E731
    whys = [*(f"it reads {read}, of dtype {name(d)}, which a cast of the model leaves as it is and PyTorch promotes "
              "what it meets to" for read, d in cap.pinned[:1]),
            *(f"{read} casts to, or makes a tensor of, {name(d)}, a dtype its trace took as it was then (one read off "
              "the model's parameters, as Hugging Face's self.dtype, changes with a cast of the model; the fused graph's "
              "does not)" for read, d in casts[:1]),
            *(f"{read} stays {name(d)} in a cast of the model, where the fused graph's out-of-place op promotes to "
              "the wider dtype" for read, d in cap.kept[:1])]
    why = "; ".join(whys)
    ShapeGuard(None, where, True, holds, why=why).install(fused)
    cap.notes.append(f"fused for {_dtypes_text(holds, ' and ')} only: {why}; it refuses to run in another")


def _fixed_casts(cap: Capture) -> list[tuple[str, torch.dtype]]:
    """The casts to a floating dtype in ``cap``'s graph, and the factories given one (:func:`_written_dtype`), where
    and to what: each a dtype the fx trace took as it was then, written in the code (``x.float()``: a cast of the
    model keeps it) or read off the model
    (``mask.to(self.dtype)``, a property reading the first parameter's dtype: a cast of the model changes it, the
    fused graph's stays; found by a probe)."""
    return [(f"the forward of {_where(n.source)}", dtype) for n in cap.graph.nodes if (dtype := _written_dtype(n)) is not None]


def _written_dtype(n: Node) -> torch.dtype | None:
    """The floating dtype the node casts to, or makes a tensor of (``torch.full(..., dtype=self.dtype)``, a factory
    the graph carries as a call), as the trace took it; else None."""
    if n.op == "cast":
        dtype = n.attrs["dtype"]
    elif n.op == "opaque" and a_factory(n.attrs.get("fn")):
        dtype = n.attrs["fn"].kwargs_template.get("dtype")
    else:
        return None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _made_kernels(cap: Capture) -> bool:
    """Whether ``cap`` (an fx capture carrying no call, nor a cast or a size test whose answer it holds) made once
    what its part computes from its weights on every call.  ECBSR's and OREPA's eval forward build one kernel from
    the training branches per call; the front end computes it at capture, and the graph is the deploy form, though
    no rule fires (the part was returned as it is, found by a probe).  A review found a graph that holds fewer
    weights taken for one: a buffer read for its dtype only, a branch on a size the example did not take."""
    return (cap.how == "fx" and cap.precomputed > 0 and not cap.input_checks and not cap.dtype_tested
            and not any(n.op in ("opaque", "cast") for n in cap.graph.nodes))


def _promoted_after_a_cast(original: nn.Module, fused: nn.Module, inputs: tuple) -> bool:
    """Whether ``original`` and ``fused``, cast to half precision (bfloat16, else float16 where the model does not
    run in bfloat16), return outputs of other dtypes, or ``fused`` fails where ``original`` runs.  (bfloat16 first:
    both promote alike, and torch's float16 conv on the CPU is 30 times slower than its float32 one.)"""
    call = Call(tuple(inputs), {})
    for dtype in (torch.bfloat16, torch.float16):
        try:
            want = tensor_leaves(_run(original, call, dtype))
        except Exception:  # noqa: BLE001  (the model does not run in it: the next)
            continue
        try:
            with _quiet_fx():
                got = tensor_leaves(_run(fused, call, dtype))
        except Exception:  # noqa: BLE001
            return True
        return [t.dtype for t in want] != [t.dtype for t in got]
    return False


def _follow_requires_grad(fused: fx.GraphModule, part: nn.Module) -> None:
    """Each module ``fused`` built from ``part``'s nodes requires gradients where a parameter of a module folded into
    it does, and not where all of theirs are frozen (a frozen backbone stays frozen beside a head that trains).  Paths
    that name no module with parameters of its own (a function in a block's ``forward``) say nothing."""
    modules = dict(part.named_modules())
    for name, paths in fused.meta.get(ORIGINS, {}).items():
        flags = [p.requires_grad for q in paths if q in modules for p in modules[q].parameters(recurse=False)]
        if flags:
            fused.get_submodule(name).requires_grad_(any(flags))


def _writes_into(model: nn.Module, args: tuple) -> bool:
    """Whether ``model`` (a copy of it, in eval mode) called with ``args`` leaves other tensors in the lists, tuples
    or dicts it was given (HRNet's ``x[i] = self.branches[i](x[i])``, DLA's ``layers[i] = node(...)``), which its
    caller may read after the call.  Its capture takes the tensors one by one (:mod:`~repalgebra.frontend.structured`):
    the fused model returned the same outputs and left the caller's list as it was (found by a probe).  Such a
    model is kept whole, its parts fused."""
    given: list = []
    try:
        _run(eval_copy(model), Call(tuple(args), {}), None, given=given)
    except Exception:  # noqa: BLE001  (it does not run on the example: fuse says so, with the view)
        return False
    return first_difference(list(args), list(given[0][0]), 0.0) is not None


def _with_structure(fused: nn.Module, model: nn.Module, spec: pytree.TreeSpec, report: "FuseReport") -> nn.Module:
    """``fused`` (made from a flat view of ``model``: :mod:`repalgebra.frontend.structured`) taking ``model``'s
    arguments again: a fused graph reads its tensors out of them and refuses another structure; a copy of the
    model (kept whole, or nothing folded) is of the model's class again."""
    if not isinstance(fused, fx.GraphModule):  # a copy of the view (kept whole, nothing folded), or a wrapper
        return unviewed(fused, model)
    fused = restructured(fused, model, spec)
    StructureGuard(pytree.tree_unflatten([0] * spec.num_leaves, spec)).install(fused)
    report.notes.append(f"forward takes {structure_text(spec)}: captured with one input per tensor ({spec.num_leaves}); the "
                        "fused model takes that structure and refuses another (other lengths or keys)")
    return fused


def _in_training_mode(model: nn.Module, evaluated: nn.Module) -> list[str]:
    """The outermost submodules of ``model`` in training mode (a BatchNorm left in ``train()`` by a freezing helper)
    that ``evaluated`` (its copy after ``eval()``) has in eval mode: one that stays in training mode is left alone."""
    found: list[str] = []
    for (path, m), (_, e) in zip(model.named_modules(), evaluated.named_modules()):
        if path and m.training and not e.training and not any(path.startswith(p + ".") for p in found):
            found.append(path)
    return found


def _listed(items: list[str], most: int = 6) -> str:
    """``a, b, c`` for a report line, at most ``most`` of them and how many more."""
    return ", ".join(items[:most]) + (f", ... ({len(items) - most} more)" if len(items) > most else "")


@dataclass
class ShapeGuard:
    """Forward pre-hook of a module fused with shapes fixed at its example inputs: other shapes are an error.

    Such a module recorded the Python of the original ``forward`` at those
    shapes only (padding computed from ``H``, a loop over sizes); at other
    shapes it could compute something else, so it refuses instead.
    """

    shapes: Sequence[tuple[int, ...]] | None  # None: any shape (a guard of the dtype only)
    where: str
    free_batch: bool = False  # any batch size (axis 0 of every input, one size), the other sizes fixed
    dtypes: tuple[torch.dtype, ...] | None = None  # set when what it computes depends on the dtype it computes in: these
    why: str = "torch.fx could not trace its forward, and torch.export recorded it at those shapes"
    free_sizes: bool = False  # any sizes, batch included: only each input's number of axes is fixed (see _RANK_WHY)
    fixed_axes: tuple[Unit, ...] = ()  # with free_sizes, these (input, axis) pairs fixed at ``shapes``
    min_batch: int = 1  # with free_batch, the smallest batch it takes (2: batch 1 computes something else)
    input_dtypes: tuple[torch.dtype, ...] | None = None  # set where forward tests its inputs' dtypes: these only
    no_autocast: bool = False  # set where forward tests a dtype it computes: calls under torch.autocast refused
    checks_only: ClassVar[bool] = True  # it raises or passes, and changes nothing: a trace may run it once

    def __post_init__(self) -> None:
        self.shapes = None if self.shapes is None else [tuple(s) for s in self.shapes]

    @property
    def fixes_batch(self) -> bool:
        """Whether it holds its module at one batch size (every size fixed)."""
        return self.shapes is not None and not (self.free_batch or self.free_sizes)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
        if self.no_autocast and (device := _autocast_on(args)) is not None:
            raise ValueError(
                f"{self.where} tests the dtype of a value its forward computes, taken as at the example, and torch.autocast "
                f"is on for {device!r}, under which the model computes that value in another dtype and may take the other "
                "branch: call the fused model outside torch.autocast"
            )
        if (self.free_sizes and self.dtypes is None and not kwargs  # the common call, quickly: it runs on every one
                and all(isinstance(a, torch.Tensor) for a in args) and _ranks_fit([a.shape for a in args], self.shapes)
                and (not self.fixed_axes or _axes_fit([_dims(a) for a in args], self.shapes, self.fixed_axes))):
            return
        bound = _bound(module, args, kwargs)
        if bound is None or (not kwargs and not _binds(module, args)):  # forward refuses it: more tensors, another form
            if self.shapes is not None:
                _refuse_more_tensors(self.where, len(self.shapes), (*args, *(kwargs or {}).values()))
            _refuse_another_form(self.where, module, args, kwargs)
            return
        args = bound
        if any(isinstance(a, fx.Proxy) for a in args) or self.fits(args, module):
            return  # traced again (export_onnx): recorded as fused, at the shapes export_onnx fixes from the guard

        if self._shapes_fit(args) and self.input_dtypes is not None and _dtypes(args) != self.input_dtypes:
            raise ValueError(
                f"{self.where} was fused with inputs of dtypes {_dtypes_text(self.input_dtypes)}, and what it computes "
                f"depends on them ({self.why}); it was called with {_dtypes_text(_dtypes(args))}. Fuse the model again "
                "with inputs of the dtypes you run it with."
            )
        if self._shapes_fit(args):  # the dtype is what differs
            raise ValueError(
                f"{self.where} was fused in {str(self.dtypes[0]).replace('torch.', '')} and holds in "
                f"{_dtypes_text(self.dtypes, ' and ')} only ({_EXPORT_DTYPE_WHY if self.shapes is not None else self.why}); "
                f"it was called in "
                f"{str(computes_in(module, args)).replace('torch.', '')}. Cast the model to the dtype you run it in, then fuse it."
            )
        got = [_dims(a) for a in pytree.tree_leaves(args) if torch.is_tensor(a)]
        _refuse_more_tensors(self.where, len(self.shapes), args)
        if self.free_sizes:
            _refuse_none_for_a_tensor(self.where, len(self.shapes), len(got), args)
            if len(got) != len(self.shapes):
                _refuse_another_form(self.where, module, args, kwargs)
                return  # another number of tensors in a structure: the StructureGuard refuses the call
            if _ranks_fit(got, self.shapes):  # a fixed axis differs
                raise ValueError(
                    f"{self.where} was fused with {_units_text(self.fixed_axes)} fixed at {_shapes_text(self.shapes)} (other "
                    f"axes any size): {_UNSHOWN_WHY}; it was called with {_shapes_text(got)}. Fuse the model again with "
                    "an example input of the sizes you run it at."
                )
            ranks = lambda ss: ", ".join(str(len(s)) for s in ss)  # noqa: E731
            raise ValueError(
                f"{self.where} was fused at inputs with {ranks(self.shapes)} axes (any sizes) and was called with "
                f"{ranks(got)} ({_shapes_text(got)}): {self.why}. Fuse the model again with "
                "an example input with as many axes as you run it with."
            )
        fixed = _shapes_text(self.shapes, self.free_batch) + (
            "" if not self.free_batch else " (any batch size B)" if self.min_batch <= 1 else
            f" (any batch size B of {self.min_batch} or more: the capture does not hold at batch 1)")
        raise ValueError(
            f"{self.where} was fused with its input shapes fixed at {fixed} ({self.why}); it was called with "
            f"{_shapes_text(got)}. Fuse the model again "
            f"with an example input of the shape you run it at."
        )

    def install(self, module: nn.Module) -> None:
        """Register on ``module`` as a forward pre-hook, also on its copies (:func:`_install`); on a graph of fixed
        sizes, assert them in the graph too (:func:`_assert_sizes`)."""
        _install(self, module)
        if isinstance(module, fx.GraphModule) and self.shapes is not None and not self.free_sizes:
            _assert_sizes(module, self)

    def fits(self, args: tuple, module: nn.Module) -> bool:
        """Whether ``module`` called with ``args`` has the shapes (and, where it matters, the dtype) it was fused at."""
        return (self._shapes_fit(args) and (self.dtypes is None or computes_in(module, args) in self.dtypes)
                and (self.input_dtypes is None or _dtypes(args) == self.input_dtypes)
                and not (self.no_autocast and _autocast_on(args) is not None))

    def _shapes_fit(self, args: tuple) -> bool:
        if self.shapes is None:
            return True
        got = [_dims(a) for a in pytree.tree_leaves(args) if torch.is_tensor(a)]  # a list of feature maps: each
        if self.free_sizes:
            return _ranks_fit(got, self.shapes) and _axes_fit(got, self.shapes, self.fixed_axes)
        if not self.free_batch:
            return got == self.shapes
        return _batches_fit(got, self.shapes, self.min_batch)


def _autocast_on(args: tuple) -> str | None:
    """The device type of the first of ``args``' tensors for which the caller has ``torch.autocast`` on, else None:
    under it a test of a computed value's dtype (``if h.dtype is torch.bfloat16``), answered as at the example, may
    come out otherwise (482 off; a review)."""
    for t in pytree.tree_leaves(args):
        if torch.is_tensor(t) and torch.is_autocast_enabled(t.device.type):
            return t.device.type
    return None


_SIZE_ASSERT = "repalgebra: "  # the start of a fixed size's assertion message


def _assert_sizes(module: fx.GraphModule, guard: ShapeGuard) -> None:
    """Write ``guard``'s fixed sizes into ``module``'s graph as ``torch._assert(x.size(d) == n)`` (and a batch of at
    least its smallest), once.  Tracers do not run a root module's forward pre-hooks: ``torch.export.export(fused,
    dynamic_shapes=...)`` gave the width a range and exported a program 0.40 off at another width; with the
    assertions it refuses that dimension as it refuses the model's own (the pre-hook still speaks first in eager
    calls)."""
    graph = module.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    done = any(n.op == "call_function" and n.target is torch._assert and str(n.args[1]).startswith(_SIZE_ASSERT)
               for n in graph.nodes)
    if done or len(inputs) != len(guard.shapes):  # (a graph reading its inputs as a structure: the guard alone)
        return
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        for k, (x, shape) in enumerate(zip(inputs, guard.shapes)):
            for axis, size in enumerate(shape):
                if axis == 0 and guard.free_batch and guard.min_batch <= 1:
                    continue
                at_least = axis == 0 and guard.free_batch  # a batch of its smallest or more
                size_of = graph.call_method("size", (x, axis))
                held = graph.call_function(operator.ge if at_least else operator.eq, (size_of, guard.min_batch if at_least else size))
                said = f"{guard.min_batch} or more" if at_least else str(size)
                graph.call_function(torch._assert, (held, f"{_SIZE_ASSERT}{guard.where} was fused with axis {axis} of input {k} "
                                                          f"at {said} ({guard.why}); fuse it again at the shape you run it at"))
    graph.lint()
    module.recompile()


def _refuse_more_tensors(where: str, fused_with: int, args: tuple) -> None:
    """Raise where a call passes more tensor arguments than the model was fused with (an optional mask left out at
    fuse): the graph has no input for them, and forward's own message would name the graph's arguments, not the
    reason.  (More tensors in a list or dict argument: the :class:`StructureGuard` names the structures.)"""
    if not all(a is None or torch.is_tensor(a) for a in args):
        return
    called_with = sum(torch.is_tensor(a) for a in args)
    if called_with > fused_with:
        raise TypeError(
            f"{where} was fused with {fused_with} tensor input{'s' * (fused_with != 1)} and was called with "
            f"{called_with}: its graph computes what the model does with the example's inputs only (an optional input "
            "left out at fuse stays out). Fuse the model again with an example that passes every input you call it with."
        )


def _refuse_none_for_a_tensor(where: str, fused_with: int, called_with: int, args: tuple) -> None:
    """Raise where a call passes None or a number for an input the model was fused with a tensor for (an optional
    mask given at fuse, a diffusion timestep as an int): the graph reads a tensor there, and would fail inside its code.
    Inside a tuple, list or dict argument too (``(3.0, x)`` for a batch fused as ``(t, x)``), where the checks of the
    call's tensors counted the others afresh and let it through (found by a review)."""
    odd = [type(a).__name__ for a in pytree.tree_leaves(args) if a is None or isinstance(a, (bool, int, float, complex))]
    if called_with < fused_with and odd:
        raise TypeError(
            f"{where} was fused with {fused_with} tensor inputs and was called with {', '.join(dict.fromkeys(odd))} for "
            f"{fused_with - called_with} of them: its graph reads what the example gave there, a tensor. Fuse the model "
            "again with the inputs you call it with (an optional input left out at fuse stays out), or pass tensors."
        )


def _binds(module: nn.Module, args: tuple) -> bool:
    """Whether ``forward`` takes ``args`` positionally (``fused(x, True)`` of a forward fused as ``forward(x)`` does not)."""
    try:
        inspect.signature(module.forward).bind(*args)
    except TypeError:
        return False
    return True


def _refuse_another_form(where: str, module: nn.Module, args: tuple, kwargs: dict | None) -> None:
    """Raise, by name, where the fused forward cannot take a call the model takes: a keyword the example left at its
    default (Rainbow's ``net(x, log=True)``), an optional input the example gave left out (ArcFace's ``model(x)``
    after a fuse with labels).  The graph holds the function of the example's form of call only; Python's own
    message named the graph's parameters, not the reason."""
    try:
        inspect.signature(module.forward).bind(*args, **(kwargs or {}))
    except TypeError as e:
        raise TypeError(
            f"{where} was fused for calls of the example's form: its graph takes the inputs the example gave and "
            f"computes with forward's other arguments as the example left them (at their defaults); this call is of "
            f"another form ({e}). Fuse the model again with an example call of this form, or call the original model."
        ) from None


def _shapes_text(shapes: Sequence[tuple[int, ...]], batch: bool = False) -> str:
    """``2x3x16x16, ()`` (a 0-d tensor is ``()``); with ``batch``, the first size of each is ``B``."""
    return ", ".join("x".join("B" if batch and k == 0 else str(d) for k, d in enumerate(s)) or "()" for s in shapes)


def _dtypes(args: tuple) -> tuple[torch.dtype, ...]:
    """The dtype of each tensor among ``args`` (a structure's tensors in order)."""
    return tuple(a.dtype for a in pytree.tree_leaves(args) if torch.is_tensor(a))


def _dtypes_text(dtypes: tuple[torch.dtype, ...], sep: str = ", ") -> str:
    return sep.join(str(d).replace("torch.", "") for d in dtypes)


def _batches_fit(got: list[tuple[int, ...]], shapes: Sequence[tuple[int, ...]], min_batch: int) -> bool:
    """Whether shapes ``got`` are ``shapes`` but for one batch size (axis 0 of each) of ``min_batch`` or more."""
    return (
        len(got) == len(shapes)
        and all(len(g) == len(s) and g[1:] == s[1:] for g, s in zip(got, shapes))
        and len({g[0] for g in got}) == 1
        and (not got or got[0][0] >= min_batch)
    )


def _ranks_fit(got: list[tuple[int, ...]], shapes: Sequence[tuple[int, ...]]) -> bool:
    """Whether shapes ``got`` have as many axes, one by one, as ``shapes``."""
    return len(got) == len(shapes) and all(len(g) == len(s) for g, s in zip(got, shapes))


def _axes_fit(got: list[tuple[int, ...]], shapes: Sequence[tuple[int, ...]], units: tuple[Unit, ...]) -> bool:
    """Whether the call's shapes ``got`` have the sizes of ``shapes`` on the ``(input, axis)`` pairs ``units``."""
    return all(got[i][k] == shapes[i][k] for i, k in units)


def _units_text(units: tuple[Unit, ...]) -> str:
    return ", ".join(f"axis {k} of input {i}" for i, k in units)


def _dims(t: torch.Tensor) -> tuple[int, ...]:
    """The shape of ``t`` as ints: under TorchScript tracing (``torch.onnx.export`` of a fused module) a size is a
    0-d tensor, which would never equal the guard's int."""
    return tuple(int(d) for d in t.shape)


def _bound(module: nn.Module, args: tuple, kwargs: dict | None) -> tuple | None:
    """A guarded call's inputs in the order of ``forward``'s parameters (``fused(x, mask=mask)``); None where forward
    itself refuses the call (Python's own message is the one to see)."""
    if not kwargs:
        return args
    try:
        return tuple(inspect.signature(module.forward).bind(*args, **kwargs).arguments.values())
    except TypeError:
        return None


def _install(guard: "ShapeGuard | StructureGuard | InputCheck | StaysInEval | DefaultDtypeGuard", module: nn.Module) -> None:
    """Register ``guard`` on ``module`` as a forward pre-hook, also on its deep copies and pickled copies.

    A GraphModule drops forward pre-hooks when copied, deep-copied and unpickled (it is rebuilt from its code), so
    ``copy.copy``, ``copy.deepcopy`` or ``torch.save`` of a whole fused module would run it unguarded.
    """
    if guard not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(guard, with_kwargs=True)
    if isinstance(module, fx.GraphModule):
        if _Reinstall(guard) not in module._deepcopy_hooks:  # a copy's hooks hold copies of the guard: equal
            module._register_deepcopy_hook(_Reinstall(guard))
        type(module).__reduce__ = _reduce_with_guards  # GraphModule gives each instance a class of its own
        type(module).__copy__ = _copy_with_guards
        type(module).__prepare_scriptable__ = _refuse_script


def _uninstall(guard: Any, module: nn.Module) -> None:
    """Take ``guard`` off ``module``, and off the copies it makes (:func:`_install`): a dispatcher checks it instead.
    Left on the copies, a copy had guards its module had not, and fusing a fused model again refused it as one
    whose copies lose hooks (found by a probe)."""
    for key in [k for k, h in module._forward_pre_hooks.items() if h is guard]:
        del module._forward_pre_hooks[key]
        module._forward_pre_hooks_with_kwargs.pop(key, None)
    if isinstance(module, fx.GraphModule):
        module._deepcopy_hooks[:] = [h for h in module._deepcopy_hooks if h != _Reinstall(guard)]


def _refuse_script(module: nn.Module) -> nn.Module:
    """What ``torch.jit.script`` calls first on a guarded fused module: a TypeError saying why and what works.

    TorchScript compiles forward pre-hooks too, and the guards are Python objects: it failed with
    "'ShapeGuard' object has no attribute '__name__'"."""
    kinds = sorted({type(h).__name__ for h in module._forward_pre_hooks.values() if isinstance(h, OUR_HOOKS)})
    raise TypeError(
        f"torch.jit.script cannot compile a fused {type(module).__name__}: its input checks ({', '.join(kinds)}, forward "
        "pre-hooks that refuse inputs the fused graph was not made for, or keep its parts in eval mode) are Python, "
        "not TorchScript. For a graph to "
        "deploy, use repalgebra.export_onnx(fused, ...) or torch.export.export(fused, (x,)); torch.jit.trace(fused, x) "
        "records one call at x's shapes, without the checks."
    )


@dataclass(eq=False)
class InputCheck:
    """Forward pre-hook of a fused graph: one of the model's own ``torch._assert`` calls on its inputs' sizes
    (timm's ``_assert(H % 32 == 0, ...)``), made before each call.

    A graph holds no op for an assertion (it computes nothing), so without it the fused model would return
    something on inputs the model refuses.  ``call`` is the assertion as the front end carries calls
    (:class:`~repalgebra.frontend.calls.FnCall`), ``inputs`` the positions of the inputs it reads."""

    call: nn.Module
    inputs: tuple[int, ...]
    checks_only: ClassVar[bool] = True  # it raises or passes, and changes nothing: a trace may run it once

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
        args = _bound(module, args, kwargs)
        if args is None or any(isinstance(a, fx.Proxy) for a in args):
            return
        tensors = [a for a in pytree.tree_leaves(args) if torch.is_tensor(a)]  # the graph's inputs: one per tensor
        if all(k < len(tensors) for k in self.inputs):  # (another number of tensors: forward, or a guard, refuses it)
            self.call(*(tensors[k] for k in self.inputs))

    def fits(self, args: tuple, module: nn.Module) -> bool:
        """Whether ``module`` called with ``args`` passes the check (a dispatcher runs the original where not)."""
        try:
            self(module, args)
        except Exception:  # noqa: BLE001  (the test's ValueError, the model's own AssertionError)
            return False
        return True

    def install(self, module: nn.Module) -> None:
        """Register on ``module`` as a forward pre-hook, also on its deep copies and pickled copies (:func:`_install`);
        a test of sizes the trace took is also asserted in the graph (:func:`_assert_size_test`)."""
        _install(self, module)
        if isinstance(module, fx.GraphModule) and getattr(self.call, "target", None) is taken_as_traced:
            _assert_size_test(module, self.call, self.inputs)


def _refuse_autocast(fused: nn.Module, devices: tuple[str, ...], where: str) -> None:
    """Make ``fused`` refuse calls under autocast on each of ``devices``, which the part at ``where`` turned autocast
    off on around what its captured graph holds without it (:func:`~repalgebra.frontend.autocast_off.autocast_left_off`)."""
    for device in devices:
        InputCheck(FnCall("call_function", autocast_left_off, (device, where), {}, {}), ()).install(fused)


def _assert_size_test(module: fx.GraphModule, call: nn.Module, inputs: tuple[int, ...]) -> None:
    """Write a test of sizes the trace took (:mod:`~repalgebra.frontend.size_tests`) into ``module``'s graph as
    ``torch._assert(answer == traced)`` (a test as itself, or negated), its sizes read from the graph's inputs.  Tracers do not run a root module's
    pre-hooks: ``torch.export.export(fused, dynamic_shapes=...)`` would give the size a range and compute the traced
    branch where the model takes the other; a ``fuse`` of the fused model would lose the check (it reads a
    ``torch._assert`` as a check of its inputs, as it reads the model's own)."""
    graph = module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    answer, traced, where, what = call.args_template

    def emit(t: Any) -> Any:
        if isinstance(t, In):
            return placeholders[inputs[t.index]]
        if isinstance(t, SymExpr):
            return graph.create_node(t.kind, t.target, emit(t.args), emit(t.kwargs))
        if isinstance(t, (tuple, list)):
            return type(t)(emit(x) for x in t)
        return {k: emit(x) for k, x in t.items()} if isinstance(t, dict) else t

    said = f"{_SIZE_ASSERT}{where or 'the model'}: {what} gave {traced!r} at the example input, and the fused graph holds that branch only"
    leaves: list[Any] = []
    map_leaves(answer, lambda t: leaves.append(t) or t)
    if any(isinstance(t, Buf) for t in leaves) or not any(isinstance(t, In) for t in leaves):
        return  # (a size of a constant's: the pre-hook alone)
    if max(inputs, default=-1) >= len(placeholders) or any(
            n.op == "call_function" and n.target is torch._assert and n.args[1:] == (said,) for n in graph.nodes):
        return  # written already (a copy, a graph reading its inputs as a structure: graph_copy kept it)
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        got = emit(answer)  # (a test asserted as itself, or negated: torch.export refuses a SymBool == True)
        held = (got if traced else graph.call_function(torch.sym_not, (got,))) if isinstance(traced, bool) else (
            graph.call_function(operator.eq, (got, traced)))
        graph.call_function(torch._assert, (held, said))
    graph.lint()
    module.recompile()


@dataclass(frozen=True)
class StructureGuard:
    """Forward pre-hook of a fused model whose ``forward`` takes lists, tuples or dicts of tensors (or ``*args``):
    a call of another structure than the example's is an error.

    The fused graph reads as many feature maps as the example held, by their positions and keys
    (:mod:`repalgebra.frontend.structured`): given a fourth, it would ignore it."""

    # The example's structure: its containers with a 0 for each tensor.  Not pytree's TreeSpec (a deep copy of one
    # warns) nor its JSON (which writes a dict's tuple keys as lists, and refuses a named tuple's class).
    skeleton: Any
    checks_only: ClassVar[bool] = True  # it raises or passes, and changes nothing: a trace may run it once
    structural: ClassVar[bool] = True  # a flat view of the module takes its tensors one by one: it drops this guard

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
        args = _bound(module, args, kwargs)
        if args is not None and (problem := structure_mismatch(self.skeleton, args)) is not None:
            raise TypeError(f"{problem}. Fuse the model again with an example of that structure.")

    def install(self, module: nn.Module) -> None:
        """Register on ``module`` as a forward pre-hook, also on its deep copies and pickled copies (:func:`_install`)."""
        _install(self, module)


@dataclass(frozen=True)
class StaysInEval:
    """Forward pre-hook of a fused model: what it runs as modules runs in eval mode, whatever ``fused.train()`` set.

    The fused graph computes the model in eval mode (BatchNorms folded with their running statistics, no dropout).
    What it still holds as modules followed the flag: a BatchNorm that did not fold used batch statistics and
    overwrote its running ones, and a part kept whole ran its ``F.dropout(y, p, self.training)`` (found by two
    probes).  The fused model's own flag stays as set where its forward is a graph of ours, which reads no flag."""

    checks_only: ClassVar[bool] = True  # it changes nothing the model computes: a trace may run it once

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
        if module.training:
            for m in module.children() if isinstance(module, fx.GraphModule) else (module,):
                m.eval()

    def install(self, module: nn.Module) -> None:
        """Register on ``module`` as a forward pre-hook, also on its deep copies and pickled copies (:func:`_install`)."""
        _install(self, module)


def _stays_in_eval(fused: nn.Module) -> None:
    """:class:`StaysInEval` on ``fused`` and on every module a fused graph in it holds that is no graph of ours (a
    BatchNorm left unfolded, a part kept whole): a tracer runs the pre-hooks of the modules it calls, not of the one
    it traces, so ``torch.export.export(fused)`` after ``fused.train()`` recorded the BatchNorm in training mode, 46%
    off, and running that overwrote its statistics (found by two reviews)."""
    StaysInEval().install(fused)
    for graph in [m for m in fused.modules() if isinstance(m, fx.GraphModule)]:
        for child in graph.children():
            if not isinstance(child, (fx.GraphModule, torch.jit.ScriptModule)):  # (compiled code takes no hooks)
                StaysInEval().install(child)


@dataclass(frozen=True)
class DefaultDtypeGuard:
    """Forward pre-hook of a fused part whose model computes in torch's default dtype (``torch.linspace(0, 1, n)``,
    ``torch.tensor(0.1)``, ``torch.randn(n)`` without ``dtype=``): its capture holds what those made under the
    default dtype of the ``fuse`` call, so a call under another default (``torch.set_default_dtype``) is refused
    where the model would follow it."""

    where: str
    dtype: torch.dtype
    checks_only: ClassVar[bool] = True  # it raises or passes, and changes nothing: a trace may run it once

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
        if torch.get_default_dtype() != self.dtype and not any(isinstance(a, fx.Proxy) for a in args):
            raise ValueError(
                f"{self.where} computes values in torch's default dtype (a factory without dtype=, such as "
                f"torch.linspace or torch.tensor(0.1)), which was {str(self.dtype).replace('torch.', '')} when it was "
                f"fused and is {str(torch.get_default_dtype()).replace('torch.', '')} now: call it under the default "
                "dtype it was fused under, or fuse the model again under this one"
            )

    def install(self, module: nn.Module) -> None:
        """Register on ``module`` as a forward pre-hook, also on its deep copies and pickled copies (:func:`_install`)."""
        _install(self, module)


def follows_default_dtype(module: nn.Module, call: Call) -> bool:
    """Whether ``module`` computes exactly the same for ``call`` under the other default dtype (float64, or float32
    where it is float64): False where it computes otherwise, or does not run so.  Every factory without ``dtype=``
    reads the default dtype, and a capture holds what it made at the capture (found by a review)."""
    before = torch.get_default_dtype()
    try:
        want = _run(module, call, None)
        torch.set_default_dtype(torch.float32 if before == torch.float64 else torch.float64)
        try:
            got = _run(module, call, None)
        finally:
            torch.set_default_dtype(before)
    except Exception:  # noqa: BLE001  (it does not run under the other default: it depends on it)
        return False
    return _identical(want, got)


def _identical(a: Any, b: Any) -> bool:
    """Whether two outputs hold the same values (NaN where the other's is), their tensors in the same dtypes."""
    if first_difference(a, b, 0.0) is not None:
        return False
    return [t.dtype for t in tensor_leaves(a)] == [t.dtype for t in tensor_leaves(b)]


OUR_HOOKS = (ShapeGuard, StructureGuard, InputCheck, StaysInEval, DefaultDtypeGuard)  # the forward pre-hooks fuse puts on a fused model


@dataclass(frozen=True)
class _Reinstall:
    """A GraphModule deep-copy hook putting ``guard`` on the copy (a class, not a closure: the module pickles)."""

    guard: "ShapeGuard | StructureGuard | InputCheck | StaysInEval | DefaultDtypeGuard"

    def __call__(self, copied: nn.Module) -> None:
        self.guard.install(copied)


def _reduce_with_guards(module: fx.GraphModule) -> tuple:
    """``GraphModule.__reduce__``, and then the module's guards and input checks installed on the unpickled copy."""
    rebuild, args = fx.GraphModule.__reduce__(module)
    guards = [h for h in module._forward_pre_hooks.values() if isinstance(h, OUR_HOOKS)]
    return _rebuild_with_guards, (rebuild, args, guards)


def _copy_with_guards(module: fx.GraphModule) -> fx.GraphModule:
    """``GraphModule.__copy__`` (a new module sharing the submodules and parameters), and then the module's guards,
    input checks and report on it: a shallow copy ran the graph on any shape and dtype (0.40 off where the fused
    model refuses a width it was not fused at)."""
    copied = fx.GraphModule.__copy__(module)
    for guard in [h for h in module._forward_pre_hooks.values() if isinstance(h, OUR_HOOKS)]:
        guard.install(copied)
    if hasattr(module, "fuse_report"):
        copied.fuse_report = module.fuse_report
        _keep_report(copied)
    return copied


def _rebuild_with_guards(rebuild: Callable[..., nn.Module], args: tuple, guards: list) -> nn.Module:
    """Unpickle a guarded GraphModule: rebuild it as torch does, then put its guards back."""
    module = rebuild(*args)
    for guard in guards:
        guard.install(module)
    if hasattr(module, "fuse_report"):  # and a deep copy of it keeps the report too
        _keep_report(module)
    return module


def computes_in(module: nn.Module, args: tuple) -> torch.dtype | None:
    """The floating-point dtype a call computes in: its first floating-point input's, else the module's own."""
    tensors = [*(a for a in pytree.tree_leaves(args) if torch.is_tensor(a)), *module.parameters(), *module.buffers()]
    return next((t.dtype for t in tensors if t.is_floating_point()), None)


class ShapeDispatch(Dispatch):
    """A part fused with its shapes fixed, beside a copy of the original: calls at the shapes it was fused at run
    the fused form, any other call the original, as written.

    Used for parts below a parent kept whole: the parent's own code (a branch on values) may call the part at
    shapes the example never gave it, and the user cannot choose an example that gives them all.  Made where the
    fused form's checks refuse calls the original runs (:func:`_refuses_what_runs`: fixed shapes, a test of sizes
    taken as at the example); then every check decides (:func:`_checks_of`), its number of axes too: left on the
    form, a test of sizes refused a call the original runs (a review).
    """

    def __init__(self, fused: nn.Module, original: nn.Module, guards: list["ShapeGuard | InputCheck"]) -> None:
        super().__init__()
        self._forms, self._original, self._guards = nn.ModuleList([fused]), original, guards
        self._seal()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs and not self._changed() and all(g.fits(args, self._forms[0]) for g in self._guards):
            return self._forms[0](*args)
        return self._run_original(*args, **kwargs)


@one_at_a_time
def fuse(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    leaf_modules: Iterable[Any] = (),
    strict: bool = False,
    check: bool = True,
) -> nn.Module:
    """Fold every foldable region of ``model`` and return a new module in eval mode.

    Args:
        model: any module that runs in eval mode on ``example_inputs``, in
            train or eval mode; it is not modified.  Fusion uses eval-mode
            semantics (BN running statistics, no dropout).
        example_inputs: a tensor or tuple of tensors the model is captured
            and checked at, one per ``forward`` argument; an argument may be a
            list, tuple or dict of tensors (an FPN's feature maps): the fused
            model then takes that structure and refuses another.  When
            ``None``: the input size the model carries
            (``model.pretrained_cfg["input_size"]`` or ``default_cfg``, as
            model-zoo libraries set it), else one guessed from the first
            Conv2d/Linear/BatchNorm at 64x64, then at 224x224.
        leaf_modules: module classes, instances or dotted paths to carry
            through whole and untouched (not fused inside either).
        strict: raise instead of falling back: a model ``torch.fx`` cannot
            trace raises :class:`~repalgebra.UntraceableError`, one whose
            captures all fail or whose calls change its state raises
            :class:`FuseError`.
        check: run the original and the fused module on the example input
            before returning (float64 where the model runs in it) and reject
            a capture that differs.  Only turn it off when you verify
            yourself.

    Returns:
        A new module in eval mode (a ``torch.fx.GraphModule``, or a copy of the
        model, its own class, when the model itself had to be kept whole or
        nothing in it folds: a graph of the same ops would only add the cost
        of the calls it carries through; a :class:`~repalgebra.hooked.HookedPart`
        around the fused graph where the model has forward hooks of its own) whose fused
        regions are plain ``nn.Conv2d``/``nn.Linear`` modules named after
        their source paths; its ``fuse_report`` attribute is a
        :class:`FuseReport` that names every part kept whole or captured with
        fixed shapes, and why.  A fused graph takes inputs with as many axes
        as the example's (an axis counted from the end is a fixed axis in it)
        and refuses others.  Fusing it again changes nothing.  A module folded from
        others requires gradients where a parameter folded into it did (a frozen
        backbone stays frozen beside a head that trains; a frozen model stays frozen).
        Parameters the model ties (an embedding and its output head) stay one
        parameter where no fold changed them (:mod:`repalgebra.ties`).

    Module-level data: a part whose forward writes the module-level data of
    the model's code (``LOG.append(...)``, ``global CALLS; CALLS += 1``, a
    class attribute) is kept whole and makes its writes on every call; what
    ``fuse``'s own runs of the model wrote there is put back as it ends (the
    report names it).  See ``docs/capture.md``.

    Threads: calls of ``fuse`` and ``export_onnx`` in several threads take
    turns.  ``torch.fx`` replaces ``nn.Module.__call__`` for the whole process
    while it traces, so do not run other models in other threads while a
    ``fuse`` is under way: their module calls would go through its tracer, and
    their writes to the model code's module-level data are put back with fuse's.
        It is for inference: gradients through it follow the fused graph, not
        the model's ``torch.no_grad()`` blocks, custom ``autograd.Function``
        backward passes or backward hooks.

    Raises:
        TypeError: non-floating-point parameters, complex inputs, a model that is
            not an ``nn.Module``, or one no copy of which is its own or holds
            what it holds (``fuse`` runs copies, never the model).
        ValueError: no input given and none could be inferred, or the model
            does not run on the example input.
        UntraceableError, FuseError: only with ``strict=True``.
    """
    check_model(model)
    restored: list[str] = []
    # Called under inference_mode, the copies it makes must keep version counters; the model's checks draw from
    # torch's generators, and its hooks may write the model itself and remove themselves from it.
    with (torch.inference_mode(False), rng_kept(model, example_inputs), tensors_kept(model, restored),
          model_kept(model, restored), globals_kept(model, refuse=False) as written):
        fused = _fuse(model, example_inputs, leaf_modules, strict, check)
    if written:  # (its runs of the model: what the fused model writes is its own, on each call)
        fused.fuse_report.notes.append(f"the model's code wrote {_listed(written)} while fuse ran it: put back as it was")
    if restored:
        fused.fuse_report.notes.append(f"the model's hooks changed {_listed(restored)} of the model itself while fuse ran "
                                       "it: restored")
    return fused


def _fuse(model: nn.Module, example_inputs: Any, leaf_modules: Iterable[Any], strict: bool, check: bool) -> nn.Module:
    """:func:`fuse` outside inference mode."""
    start = time.perf_counter()
    model, unwrapped = unwrap(model)
    args = None if example_inputs is None else as_tuple(example_inputs)
    view = spec = None
    writes = False
    if args is not None and needs_flat_view(model, args) and not runs_own_hooks(model):
        leaves, spec = flat_leaves(args)  # one capture input per tensor; forward gets the structure back
        view = flat_view(model, spec)  # None: a GraphModule that reads its arguments whole
        example_inputs = leaves if view is not None else example_inputs
        writes = view is not None and _writes_into(model, args)
    whole = ("its forward writes into the lists, tuples or dicts it is given (x[i] = branch(x[i])), which its caller may "
             "read after the call and no capture writes") if writes else ""
    fuser = _Fuser(view or model, leaf_modules, strict, check, whole)
    inputs, inferred = example_inputs_for(fuser.pristine, example_inputs)
    dtype = model_dtype(fuser.pristine)
    if any(torch.is_tensor(t) and t.is_floating_point() and t.dtype != dtype for t in inputs):
        # The captures are checked against a float64 copy, which runs on a float64 example where the model itself
        # may not: the fused model came back in float64, refusing the model's own inputs.
        fuser.ensure_runs(inputs)
    # A forward writing into the caller's containers runs as written, its parts fused; what its calls change of its
    # state is handled as for any model (fuse_calls).
    fused = fuser.fuse_calls(inputs) if writes else fuser.fuse_model(inputs)
    if view is not None:
        fused = _with_structure(fused, model, spec, fuser.report)
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    if any(t.device != device for t in [*fused.parameters(), *fused.buffers()]):
        fused = fused.to(device)
    fused.eval()  # (not its return value: a train() that returns None, as OpenMMLab's backbones write it)
    if fused is not model:
        _stays_in_eval(fused)
    tied = retie(fused, model) if fused is not model else []
    if not any(p.requires_grad for p in model.parameters()):  # a frozen model stays frozen (new parameters require grad)
        fused.requires_grad_(False)
    for check in [h for h in model._forward_pre_hooks.values() if isinstance(h, InputCheck)] if fused is not model else ():
        check.install(fused)  # a fused model fused again: its graph holds no assertion to find
    report = fuser.report
    report.params_before = _numel(model.parameters())
    report.params_after = _numel(fused.parameters())
    report.buffers_before = _numel(b for b in model.buffers() if b.is_floating_point())
    report.buffers_after = _numel(b for b in fused.buffers() if b.is_floating_point())
    report.input_shapes = [tuple(t.shape) for t in inputs]
    if report.params_after + report.buffers_after > report.params_before + report.buffers_before:  # buffers folded into weights are no growth
        report.notes.append(
            f"the fused model holds more parameters and buffers than the model ({report.params_before + report.buffers_before} -> "
            f"{report.params_after + report.buffers_after}): a "
            "module called several times (a head shared across levels) is folded once per call, a part fused with "
            "fixed shapes keeps its original for other shapes, or merged kernels are larger than their parts"
        )
    if tied:
        report.notes.append(f"parameters the model ties are tied in the fused model too: {_listed(tied, 3)}")
    if len(norms := _batch_norms(fused)) > report.ops_after.get("batch_norm", 0):  # the counts above are of the graphs
        report.notes.append(
            f"{len(norms)} BatchNorm module{'s are' if len(norms) > 1 else ' is'} left in the fused model, not all in the "
            f"counts above: {_listed([repr(p) for p in norms], 3)} (in parts kept whole or carried as calls, in originals "
            "kept for other shapes than the example's, or computing what no output reads: a module the model runs for "
            "what its hooks store)"
        )
    if backward := [repr(p) if p else "the model" for p, m in model.named_modules() if m._backward_hooks or m._backward_pre_hooks]:
        report.notes.append(f"backward hooks on {_listed(backward, 3)}: the fused model is for inference; gradients through "
                            "it follow the fused graph, and parts that were fused do not run those hooks")
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        report.notes.insert(0, "forward hooks are registered for every module (nn.modules.module.register_module_forward_hook "
                               "or _pre_hook): each module call must run them, so modules stay calls of themselves and "
                               "nothing folds across them; remove those hooks while fusing")
    if inferred:
        report.notes.insert(0, f"input inferred: {inferred}")
    if unwrapped:
        report.notes.insert(0, unwrapped)
    if model.training:
        report.notes.insert(0, "the model was in training mode: traced with eval-mode semantics (BN running statistics, no dropout)")
    elif training := _in_training_mode(model, fuser.pristine):
        report.notes.insert(0, f"{len(training)} part{'s were' if len(training) > 1 else ' was'} in training mode inside a model in "
                               f"eval mode ({_listed([repr(p) for p in training], 3)}): fused with eval-mode semantics "
                               "(BN running statistics, no dropout), as after model.eval()")
    if not check:
        report.check = "none (check=False)"
    else:
        report.check = "; ".join(dict.fromkeys(fuser.checks)) or "none needed: nothing was rewritten"
    report.seconds = time.perf_counter() - start
    fused.fuse_report = report
    if isinstance(fused, fx.GraphModule):  # its deep copy is rebuilt from its code and drops other attributes
        _keep_report(fused)
    return fused


def _keep_report(module: fx.GraphModule) -> None:
    """Have ``module``'s deep copies keep its ``fuse_report`` (once: copies do not pile up hooks)."""
    if not any(isinstance(h, _KeepReport) for h in module._deepcopy_hooks):
        module._register_deepcopy_hook(_KeepReport(module.fuse_report))


@dataclass
class _KeepReport:
    """A GraphModule deep-copy hook giving the copy the fuse report (a class, not a closure: the module pickles)."""

    report: "FuseReport"

    def __call__(self, copied: nn.Module) -> None:
        copied.fuse_report = self.report


def _batch_norms(module: nn.Module) -> list[str]:
    """The paths of the BatchNorm modules in ``module``."""
    return [p for p, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def faithful_copy(model: nn.Module) -> nn.Module:
    """:func:`~repalgebra.module_copy.eval_copy` of the user's model, refused (TypeError) where the copy does not
    hold the model's parameters, buffers and plain attributes (:func:`~repalgebra.frontend.state.copy_difference`):
    every capture and check runs a copy, never the model, so the fused model computes what the copy computes."""
    copied = copy_module(model)
    if (difference := copy_difference(model, copied)) is not None:
        raise TypeError(f"cannot fuse {type(model).__name__}: {difference} (its __deepcopy__, __getstate__ or "
                        "__setstate__ changes it), and fuse captures and checks a copy")
    return in_eval(copied) if any(m.training for m in copied.modules()) else copied


class _Fuser:
    """One ``fuse`` call: a pristine eval copy of the model as the reference, the strategy, the report."""

    def __init__(self, model: nn.Module, leaf_modules: Iterable[Any], strict: bool, check: bool, whole: str = "") -> None:
        self.model = model  # the caller's: copied, never run
        self.whole = whole  # why the model itself is kept whole, its parts fused (see fuse_root); "" where it is captured
        with frozen_gc(sum(1 for _ in model.modules())):  # a big model's copy would set off full collections
            self.pristine = faithful_copy(model)  # TypeError naming what does not copy (a lock, a generator)
        check_leaf_modules(model, leaf_modules)
        self.user_leaves = leaf_paths(model, leaf_modules)  # instances are the caller's: resolve on the model
        # Parts an earlier fuse captured at fixed shapes: a trace would step past their guard and drop it (a guard
        # of the ranks alone need not stay: the new capture guards its own inputs' ranks).
        self.user_leaves += [p for p, m in model.named_modules() if p not in self.user_leaves
                             and any(isinstance(h, ShapeGuard) and not h.free_sizes for h in m._forward_pre_hooks.values())]
        self.state_leaves: list[str] = []  # parts whose forward changes their own state: kept whole and untouched
        self.fused_inside: set[str] = set()  # those of them (regions) whose children were fused, as kept whole
        self.sizes_freed: list[str] = []  # modules captured around parts at any size where torch.export fixed sizes
        self.plain_parts: list[str] = []  # parts fused from a capture that read plain tensors (Capture.reads_plain)
        self.stateful = False  # calls change the model's state: every run below is of a copy
        self.watching = True  # a run of the original that changes its state restarts fuse (see fuse_model)
        self.own_dtype_only = False  # the last check in float64 ran in the model's dtype: the candidate fails in float64
        self.not_in_float64 = False  # the last check in float64 ran in the model's dtype: the model itself fails in it
        self.checks: list[str] = []  # what each captured part was compared with: FuseReport.check
        self.initial: nn.Module | None = None  # then: a copy of the model before any run, the state parts restore from
        self.strict = strict
        self.check = check
        self.dtype = model_dtype(model)
        self.report = FuseReport()
        self.stage = {"capture": 0.0, "rewrite": 0.0, "build": 0.0, "check": 0.0}
        self.report.stage_seconds = self.stage

    # -- strategy -------------------------------------------------------------------

    def fuse_model(self, inputs: tuple[torch.Tensor, ...]) -> nn.Module:
        """The fused model; parts whose calls change their own state (:mod:`repalgebra.frontend.state`) kept whole,
        and parts whose capture read a tensor that is neither a parameter nor a buffer (``Capture.reads_plain``)
        where the fused model differs from the model on other values than the example: such a tensor, held as a
        constant, was a value a call left for the next (fastai's U-Net reads its encoder's outputs from the hooks
        that store them)."""
        fused = self.fuse_calls(inputs)
        hooked = any(_own_hooks(m) for m in self.model.modules())
        other = _other_values(inputs)
        if not (self.check and (self.plain_parts or hooked) and other is not None and _runs(eval_copy(self.model), other)):
            return fused
        for attempt in range(2):
            problem = _calls_difference(eval_copy(self.model), fused, [other], self.tolerance)
            if problem is None:
                self.checks.append(f"the whole model on other values than the example, to {self.tolerance:g} relative")
                return fused
            parts = list(self.plain_parts)
            why = ("{} reads a tensor that is neither a parameter nor a buffer, which its capture held as a constant, and "
                   f"on other values than the example the fused model computes something else ({problem}): a value a "
                   "call leaves for the next to read (a hook's stored output, a list modules share) is no constant")
            if attempt or "" in parts or not parts:
                self.restart()
                if not parts:  # its parts were fused apart, and what they share through its hooks with it
                    why = (f"{{}} computes something else once its parts are fused, on other values than the example "
                           f"({problem}): its forward hooks pass values between its modules (timm's FeatureHooks), which "
                           "copies of its parts no longer share")
                return self.untouched("", eval_copy(self.model), why.format(_where("")))
            self.restart()
            self.user_leaves += parts  # kept whole and untouched, as the user's leaves are: read at run time
            fused = self.fuse_calls(inputs)
            self.report.parts += [Part(p, "kept whole", why.format(_where(p)), type(self.pristine.get_submodule(p)).__name__) for p in parts]
        return fused

    def restart(self) -> None:
        """Start again from the model as it is, with a fresh report."""
        self.pristine = faithful_copy(self.model)
        self.report = FuseReport(stage_seconds=self.stage)
        self.checks, self.plain_parts, self.state_leaves, self.fused_inside, self.sizes_freed = [], [], [], set(), []
        self.stateful, self.watching, self.initial = False, True, None

    def fuse_calls(self, inputs: tuple[torch.Tensor, ...]) -> nn.Module:
        """The fused model; parts whose calls change their own state (:mod:`repalgebra.frontend.state`) kept whole."""
        try:
            if not self.check:  # the check's run of the original watches for state; without it, one run here does
                with watch(self.pristine) as changed:
                    _run(self.pristine, Call(tuple(inputs), {}), None)
                if changed:
                    raise StateChanged(changed)
            return self.fuse_root(inputs)
        except StateChanged as e:
            return self.fuse_with_state(inputs, e.names)

    def fuse_root(self, inputs: tuple[torch.Tensor, ...]) -> nn.Module:
        """The model's fused form: captured whole if possible, or kept whole with its parts fused where ``self.whole``
        says why no capture of it can hold (a forward writing into the containers it is given)."""
        if self.whole:
            return self.keep_whole("", [Call(tuple(inputs), {})], self.whole)
        if movable_hooks(self.pristine) and (hooked := self.fuse_hooked_root(inputs)) is not None:
            return hooked
        return self.fuse_module("", inputs)

    def fuse_hooked_root(self, inputs: tuple[torch.Tensor, ...]) -> nn.Module | None:
        """The model with forward hooks of its own (``model.register_forward_hook(save)``): its ``forward`` fused in a
        :class:`~repalgebra.hooked.HookedPart` running the same hooks, as :meth:`fuse_hooked` does for a part.  None,
        the report as it was, where nothing folds, the fused form refuses calls the model kept whole runs (shapes
        fixed by torch.export), or it computes something else."""
        module = self.pristine
        mark = self._mark()
        self.pristine = unwrap(without_hooks(module))[0]  # (a DataParallel's hooks, around the module it runs)
        try:
            inner = self.fuse_module("", inputs)
        finally:
            self.pristine = module
        fused = HookedPart(inner, module)
        # Kept whole, the model ran at any size and dtype: a capture fixed at the example's is no gain
        if (len(self.report.fired) == mark[0] or _refuses_what_runs(_checks_of(inner))
                or not self.same_on_all(module, fused, [Call(tuple(inputs), {})])):
            self._rollback(mark)
            return None
        self.report.notes.append("the model's forward was fused inside its forward hooks, which run around the fused form "
                                 "as around the model (their module argument is the fused model)")
        return fused

    def fuse_with_state(self, inputs: tuple[torch.Tensor, ...], changed: list[str]) -> nn.Module:
        """Start again from the model as it is (the run that changed ``changed`` ran the pristine copy), keeping
        whole the parts :func:`~repalgebra.frontend.state.find_state` names, and check two calls in a row."""
        self.pristine = faithful_copy(self.model)
        self.report = FuseReport(stage_seconds=self.stage)
        state = find_state(self.pristine, inputs, self.tolerance)
        mark_written(self.pristine, [*state.changed, *state.per_call])  # a capture around a part kept whole must not read them as constants
        if not state:  # only a first call fills it, the same for any input (a cache), or nothing reads it: fuse the model once called
            stored = list(state.per_call)
            cached = [c for c in sorted(changed) if c not in stored and (c not in DRAWS or c in state.first_draws)]  # (not
            # a draw another thread made)
            if stored:
                self.report.notes.append(
                    f"every call stores {_listed([repr(c) for c in stored], 4)} from its input, which no later call reads: "
                    "where the code storing it was fused, the fused module computes the same outputs but does not store it "
                    "(return it, or read it with a hook on the original)"
                )
            self.watching = False
            unfilled = copy_module(self.pristine)  # the state the model holds now: what a part kept for its cache starts from
            notes = list(self.report.notes)
            _run(self.pristine, Call(tuple(inputs), {}), None)
            self.sizes_freed = []
            fused = self.fuse_root(inputs)
            # Held at the example's sizes, the batch free, or at any size around parts kept as the first call left
            # them: try keeping the caches whole, as the model holds them now.  (Where the capture fixes the batch
            # too, as Swin v1's blocks' H and W set per call do, its ONNX file keeps a dynamic batch, which
            # torch.onnx's trace of the parts kept whole would fix: the capture at the example's sizes stands.)
            if cached and ((_fixed_sizes(self.report) and not _batch_fixed(fused)) or self.sizes_freed):
                if (around := self.fuse_around_caches(unfilled, inputs, cached, notes)) is not None:
                    return around
            if cached:
                self.report.notes.insert(0,
                    f"a first call fills {_listed([repr(c) for c in cached], 4)}, and calls on other values (and at other sizes "
                    "where the model ran) compute the same after it: fused as called once"
                )
            return fused
        self.stateful = True
        if self.strict:
            what = state.whole or "; ".join(f"{_where(p)}: {why}" for p, why in state.regions.items())
            raise FuseError(f"the model's calls change its state, so parts must be kept whole: {what}")
        initial = self.initial = copy_module(self.pristine)  # nothing has run on this copy yet
        if state.whole:
            return self.untouched("", initial, state.whole)
        # A region runs as written; its children are fused on their own, as under any parent kept whole, but not
        # those that hold the state.  Each is tagged: the tag follows the copies the captures make.
        leaves = [r for r in state.regions if r] + [h for h in state.holders if h and h not in state.regions]
        for path in leaves:
            self.state_leaves.append(path)
            setattr(self.pristine.get_submodule(path), STATE_TAG, path)
        if "" in state.regions:
            fused = self.keep_whole("", [Call(tuple(inputs), {})], state.regions[""])
        else:
            fused = self.fuse_root(inputs)
            self.fuse_inside_regions(fused, {r: why for r, why in state.regions.items() if r}, inputs)
        self.restore_state(fused)
        if self.check:
            problem = _calls_difference(initial, fused, [inputs, inputs], self.tolerance)
            if problem is not None:
                self.report = FuseReport(stage_seconds=self.stage)  # nothing of that attempt is in the result
                return self.untouched("", initial, f"with the parts that change state kept whole it still differs on a second call: {problem}")
        return fused

    def fuse_around_caches(self, unfilled: nn.Module, inputs: tuple[torch.Tensor, ...], cached: list[str],
                           notes: list[str]) -> nn.Module | None:
        """The model (``unfilled``: as it is, before the run that fused it as called once) with the parts that hold
        ``cached`` (what a first call fills) kept whole, their children fused on their own, and the rest captured
        around them, where that capture holds at any size and the model fused as called once holds at the example's
        sizes only; else None, and the fuser as it was.

        Ultralytics' ``Detect`` keys its anchors by its input's shape (``if self.dynamic or self.shape != shape:``):
        captured as called once, the test and the anchors hold at the example's shape only.  Kept whole, it runs as
        written on the state the model holds (never called, or called by the user at some size), so it refills its
        cache exactly when the model's own would, at any size; folds across its boundary are lost.  (A capture of
        the cache as its recomputation was unsound: a value filled once may differ at another size.)"""
        regions = cache_regions(unfilled, inputs, cached)
        if not regions or "" in regions:
            return None
        saved = (self.pristine, self.report, self.checks, self.plain_parts, self.initial)
        why = "a first call fills {} (a cache): it runs as written, refilling it where the model would, at any size"
        self.pristine, self.initial, self.checks, self.plain_parts = copy_module(unfilled), copy_module(unfilled), [], []
        self.report = FuseReport(stage_seconds=self.stage, notes=list(notes))
        for path in regions:
            self.state_leaves.append(path)
            setattr(self.pristine.get_submodule(path), STATE_TAG, path)
        try:
            fused = self.fuse_root(inputs)
            self.fuse_inside_regions(fused, {r: why.format(_listed([repr(c) for c in cached if _inside(c, r)], 4))
                                             for r in regions}, inputs)
            self.restore_state(fused)
            problem = _not_around(self.report)
            if problem is None and self.check:  # (fresh copies of both run: fused keeps the state it holds)
                problem = _calls_difference(unfilled, fused, [inputs, batch_plus_one(inputs), inputs], self.tolerance)
        except Exception as e:  # noqa: BLE001  (as called once, the model was fused: that form stands)
            problem = first_line(e)
        if problem is not None:
            self.pristine, self.report, self.checks, self.plain_parts, self.initial = saved
            self.state_leaves, self.fused_inside = [], set()
            return None
        self.checks.append("the model, calls in turn at the example and at another batch, "
                           f"to {self.tolerance:g} relative")
        self.report.notes.insert(0, f"a first call fills {_listed([repr(c) for c in cached], 4)} (a cache): as called "
                                 f"once, the model's capture held at the example's sizes only; {_listed([_where(r) for r in regions], 4)} "
                                 "kept whole instead, as the model holds it now, the rest captured around it at any size")
        return fused

    def fuse_inside_regions(self, fused: nn.Module, regions: dict[str, str], inputs: tuple[torch.Tensor, ...]) -> None:
        """Replace the copy of each region (path -> why it is kept) that ``fused`` carries by the region kept whole
        with its children fused (:meth:`keep_whole`): a counter in a block no longer keeps its convs' BatchNorms."""
        hooked = [r for r in regions if not isinstance(self.pristine.get_submodule(r), torch.jit.ScriptModule)]  # (no hooks there)
        try:
            calls = record_calls(copy_module(self.pristine), Call(tuple(inputs), {}), hooked)
        except Exception:  # noqa: BLE001  (a region wired up at run time: carried as it is)
            calls = {}
        for tag in (tied := self.tied_plainly("", regions)):  # (as ``fused`` holds it: a copy would hold a tensor of its own)
            self.report.notes.append(f"{_where(tag)}: its children are not fused: {_TIED_PLAINLY}")
        for parent in list(fused.modules()):
            for name, child in list(parent.named_children()):
                tag = getattr(child, STATE_TAG, None)
                if tag in regions and calls.get(tag) and tag not in self.fused_inside and tag not in tied:
                    _put(parent, name, self.keep_whole(tag, calls[tag], regions[tag]))
                    self.fused_inside.add(tag)
        for path in regions.keys() - self.fused_inside:  # (no call of it reached: it is reported as kept all the same)
            self.report.parts.append(Part(path, "kept whole", regions[path], type(self.pristine.get_submodule(path)).__name__))

    def restore_state(self, module: nn.Module) -> None:
        """Give the parts of ``module`` that hold state the model's state: captures ran (and so changed) their copies."""
        if not self.state_leaves:
            return
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                tag = getattr(child, STATE_TAG, None)
                if tag in self.state_leaves:
                    initial = self.initial.get_submodule(tag)
                    try:  # in place: a tensor it shares with its parent (a buffer under two names) stays shared
                        # (a region fused inside: its own state only; its children are fused forms, or leaves restored on their own)
                        restore_in_place(child, initial, deep=tag not in self.fused_inside)
                    except Exception:  # noqa: BLE001  (a TorchScript part, whose attributes live in C++)
                        _put(parent, name, copy_module(initial))

    def untouched(self, path: str, module: nn.Module, reason: str) -> nn.Module:
        """A copy of ``module`` (the part at ``path``), nothing fused in it; the report says why."""
        self.report.parts.append(Part(path, "kept whole", reason, type(module).__name__))
        return copy_module(module)

    def fuse_module(self, path: str, inputs: tuple[torch.Tensor, ...]) -> nn.Module:
        """The fused form of the module at ``path``, called with ``inputs``: captured whole if possible."""
        module = self.pristine.get_submodule(path)
        leaves = self.leaves_under(path)
        failures: list[tuple[str, CaptureFailed]] = []
        for how in ("fx", "specialized"):
            if how == "specialized" and (leaves or any(runs_own_hooks(m) for m in module.modules())):
                continue  # torch.export cannot keep the user's leaves whole, and runs hooks once, while it traces
            t = time.perf_counter()
            try:
                with frozen_gc(sum(1 for _ in module.modules())):  # the collector would revisit the model and the growing graph
                    cap = capture_fx(module, inputs, leaves, not self.check) if how == "fx" else capture_specialized(module, inputs)
            except CaptureFailed as e:
                self.stage["capture"] += time.perf_counter() - t
                if self.strict and how == "fx":
                    self.raise_strict(path, e)
                failures.append((how, e))
                continue
            self.stage["capture"] += time.perf_counter() - t
            if how == "specialized" and (around := self.around_at_free_sizes(path, inputs, failures, cap.batch_free)):
                return around
            try:
                return self.finish(path, cap, inputs, _reasons(failures))
            except CaptureFailed as e:
                failures.append((how, e))
        if not path:
            self.ensure_runs(inputs)
        if self.strict:
            raise FuseError(f"cannot capture {_where(path)}: {_reasons(failures)}")
        return self.fuse_around(path, inputs, failures)

    def ensure_runs(self, inputs: tuple) -> None:
        """Raise ``ValueError`` unless the model runs in eval mode on ``inputs`` (then no capture could work).  Copies
        are made outside the runs: one that fails is that error (a model that copies once and whose copy does not)."""
        name, call = type(self.pristine).__name__, Call(tuple(inputs), {})
        copied = copy_module(self.pristine)
        try:
            _run(copied, call, None)
            return
        except Exception as e:  # noqa: BLE001
            error = e
        shapes, copied = _shapes(inputs), copy_module(self.pristine)
        try:  # it may need gradients on (y.register_hook(...) in forward), where inference runs without them
            _run(copied, call, None, mode=torch.enable_grad)
        except Exception:  # noqa: BLE001
            pass
        else:
            raise ValueError(
                f"{name} runs on the example input ({shapes}) with gradients on only: without "
                f"them, as fuse captures and checks it (and as inference runs), {first_line(error)}; guard that code "
                "with `if torch.is_grad_enabled():` or `if y.requires_grad:`"
            ) from error
        raise ValueError(f"{name} does not run in eval mode on the example input ({shapes}): {first_line(error)}") from error

    def fuse_around(self, path: str, inputs: tuple, failures: list[tuple[str, CaptureFailed]]) -> nn.Module:
        """Keep the submodules that fail ``torch.fx`` whole, fuse each on its own, then capture around them; where that
        fails, keep the module at ``path`` whole (its parts fused)."""
        fused, why, _ = self.captured_around(path, inputs, failures)
        return fused if fused is not None else self.keep_whole(path, [Call(tuple(inputs), {})], why)

    def around_at_free_sizes(self, path: str, inputs: tuple, failures: list[tuple[str, CaptureFailed]],
                             batch_free: bool) -> nn.Module | None:
        """The module at ``path`` captured with fx around the submodules fx failed in (kept whole, fused on their own),
        where torch.export captured it with sizes fixed that the capture around leaves free; None, the report as it
        was, where fx failed in the module's own forward, no capture around holds, or (``batch_free``: torch.export
        fixed the sizes other than the batch only) no run at another size shows the capture around computing what
        the module does, where the capture at fixed sizes refuses (a model that runs at the example's sizes only
        keeps that capture, which folds across the parts).

        TabNet's Ghost BatchNorm (``x.chunk(int(np.ceil(x.shape[0] / vbs)))``) sent the whole model to torch.export,
        which fixed the batch: every other batch size was refused, where the model runs at any.  NAFNet's local
        pool (``Local_Base.convert``: ``if self.kernel_size[0] >= x.size(-2)``, then cumsum) sent the whole
        restoration net there, fixing its image size (probe AM finding 06).  Around the part, the rest stays
        symbolic; folds across the part's boundary are lost (the part is carried as called)."""
        # (a test of sizes in a part's forward is named for the sizes after the batch only: where torch.export fixed
        # the batch too, its capture stands, as before the test named the part)
        if not any(how == "fx" and e.path and (batch_free or not e.reason.startswith("SizeReadInside")) for how, e in failures):
            return None
        mark, plain = self._mark(), len(self.plain_parts)
        fused, _, kept = self.captured_around(path, inputs, failures)
        # (without the check, no run shows the sizes free: the capture at fixed sizes stands, as before; nor is a
        # capture around parts captured at the example's sizes themselves one at any size: export_onnx sends those to
        # its fallback, where the capture at fixed sizes lowered all)
        if fused is None or (batch_free and (any(p.how == "specialized" for p in self.report.parts[mark[4]:]) or not (
                self.check and self.holds_where_fixed_refuses(path, fused, inputs)))):
            self._rollback(mark)
            del self.plain_parts[plain:]
            return None
        if batch_free:
            self.sizes_freed.append(path)
        parts = _listed([_where(_join(path, k)) for k in kept], 4)
        free, fixed = ("size", "sizes") if batch_free else ("batch size", "batch")
        self.report.notes.append(f"{_where(path)}: captured with fx around the parts it could not trace ({parts}), at any "
                                 f"{free}, rather than with torch.export at the example's {fixed}")
        return fused

    def holds_where_fixed_refuses(self, path: str, fused: nn.Module, inputs: tuple) -> bool:
        """Whether a run with a non-batch axis resized (:func:`_sizes_shown`), which a capture at the example's sizes
        refuses, shows ``fused`` computing what the module at ``path`` does there, and none shows it differ."""
        original = self.pristine.get_submodule(path)

        def holds(other: tuple) -> bool | None:  # None: the original, or the fused form, does not run there
            try:
                return self.same(original, fused, Call(other, {}), in_float64=False) is None
            except StateChanged:
                raise
            except Exception:  # noqa: BLE001
                return None

        differs, ran, _ = _sizes_shown(holds, inputs)
        return ran and not differs

    def captured_around(self, path: str, inputs: tuple,
                        failures: list[tuple[str, CaptureFailed]]) -> tuple[nn.Module | None, str, list[str]]:
        """The module at ``path`` captured with fx around the submodules that fail it, each kept whole and fused on its
        own; else None and why not; and the submodules kept (paths in the module)."""
        module = self.pristine.get_submodule(path)
        user = set(self.leaves_under(path))
        kept: list[str] = []
        failure = next((e for how, e in failures if how == "fx"), None)
        while failure is not None and failure.path and failure.path not in kept and len(kept) < MAX_KEPT_WHOLE:
            kept.append(failure.path)
            try:
                capture_fx(module, inputs, [*user, *kept], not self.check)
                failure = None
            except CaptureFailed as e:
                failure = e
        if failure is not None and kept:  # (a call kept whole that writes into what is read after it: say so)
            return None, f"{_reasons(failures)}; around kept parts: {failure.reason}", kept
        if failure is not None or not kept:
            return None, _reasons(failures), kept
        work = copy_module(module)
        calls = record_calls(work, Call(tuple(inputs), {}), kept)
        tied = self.tied_plainly(path, kept)
        for sub in kept:
            if sub in tied:  # as ``work`` holds it: a copy of its own would hold a tensor of its own
                # (given back its state as before the recording run, in place: what it shares stays shared)
                restore_in_place(work.get_submodule(sub), module.get_submodule(sub))
                self.report.notes.append(f"{_where(_join(path, sub))}: not replaced by its fused form: {_TIED_PLAINLY}")
                continue
            mark, plain, original = self._mark(), len(self.plain_parts), work.get_submodule(sub)
            fused = self.fuse_part(_join(path, sub), calls[sub], _reasons(failures))
            if type(fused) is not type(original) and _classes_asked(work, sub):  # (as written: its class is asked)
                self._rollback(mark)
                del self.plain_parts[plain:]
                self.report.notes.append(f"{_where(_join(path, sub))}: not replaced by its fused form: {_CLASS_ASKED}")
                continue
            _set_submodule(work, sub, fused)
        try:
            cap = capture_fx(work, inputs, [*user, *kept], not self.check)
            return self.finish(path, cap, inputs, f"around {len(kept)} part{'s' * (len(kept) != 1)} kept whole", work), "", kept
        except CaptureFailed as e:
            return None, f"{_reasons(failures)}; around kept parts: {e.reason}", kept

    def fuse_part(self, path: str, calls: list[Call], why: str) -> nn.Module:
        """A submodule kept apart: fused on its own when its calls allow it, else kept whole."""
        module = self.pristine.get_submodule(path)
        if not calls or path in self.user_leaves or path in self.state_leaves:
            return copy_module(module)  # a leaf is carried through untouched, also under a parent kept whole
        if movable_hooks(module) and (hooked := self.fuse_hooked(path, calls, why)) is not None:
            return hooked
        if autocast := next((c.autocast for c in calls if c.autocast), None):  # (see capture.as_without_autocast)
            self.report.notes.append(
                f"{_where(path)} is called under torch.autocast({autocast[0]!r}, dtype={autocast[1]}): captured and checked on "
                "its inputs in its weights' dtype (autocast sets each op's precision, not what it computes); under autocast "
                f"its fused form computes in {str(autocast[1]).removeprefix('torch.')} as the model does, op by op, its "
                "folded weights rounded once")
        if all(c.tensor_only for c in calls) and _takes_other_calls(module, calls):
            # forward(x, return_attention=False) called as blk(x): the parent's other branches may pass the flag
            dispatch = self.fuse_by_signature(path, calls)
            if dispatch is not None:
                return dispatch
        if all(c.tensor_only for c in calls):
            fused = self.fuse_module(path, calls[0].args)
            guards = _checks_of(fused)
            if _refuses_what_runs(guards):  # calls its checks refuse (another branch of the parent) run the original
                for guard in guards:  # (the dispatch checks them)
                    _uninstall(guard, fused)
                fused = ShapeDispatch(fused, copy_module(module), guards)
                self.report.notes.append(f"{_where(path)}: called at other shapes than {_shapes(calls[0].args)}, it runs as written")
            if self.same_on_all(module, fused, calls[1:]):
                return fused
            return self.keep_whole(path, calls, "called at several input shapes; its capture holds at one")
        return self.fuse_by_signature(path, calls) or self.keep_whole(path, calls, _not_alone(calls))

    def fuse_hooked(self, path: str, calls: list[Call], why: str) -> nn.Module | None:
        """The part at ``path``, whose forward hooks observe or change its calls (Grad-CAM's on ``layer4[-1]``): its
        ``forward``, fused as ``torch.fx`` traces it (without hooks), in a :class:`~repalgebra.hooked.HookedPart`
        running the same hooks around it.  None, the report as it was, where that computes something else for the
        calls (a hook that reads the module it is given: it is given the HookedPart), or where nothing folds inside."""
        module = self.pristine.get_submodule(path)
        mark = self._mark()
        _set_submodule(self.pristine, path, without_hooks(module))  # what the calls' forward runs (after the pre-hooks)
        try:
            fused = HookedPart(self.fuse_part(path, calls, why), module)
        finally:
            _set_submodule(self.pristine, path, module)
        if len(self.report.fired) == mark[0] or not self.same_on_all(module, fused, calls):
            self._rollback(mark)  # (nothing folded inside: the module as it was, its children fused on their own)
            return None
        self.report.notes.append(f"{_where(path)}: its forward was fused inside its forward hooks, which run around the fused "
                                 "form as around the module (their module argument is the fused part)")
        return fused

    def fuse_by_signature(self, path: str, calls: list[Call]) -> nn.Module | None:
        """The part at ``path``, called with keywords or numbers (``blk(x, H, W)``), fused once per
        :class:`~repalgebra.call_dispatch.Signature` of its calls, in a :class:`~repalgebra.call_dispatch.CallDispatch`
        that runs the original for any other call.  None, the report as it was, where a call holds an object that is
        neither a tensor nor a plain constant, the part is called more than ``MOST_SIGNATURES`` ways or is a
        GraphModule, or a capture of any sizes differs on a later call of its signature."""
        module = self.pristine.get_submodule(path)
        groups = _by_signature(calls)
        if groups is None or len(groups) > MOST_SIGNATURES or isinstance(module, fx.GraphModule):
            return None
        mark = self._mark()
        forms, guards, as_called = [], [], []
        for sig, tensors in groups:
            view = bound_view(module, sig)
            _set_submodule(self.pristine, path, view)
            try:
                fused = self.fuse_module(path, tensors[0])
                checks = _checks_of(fused)
                fixed = _refuses_what_runs(checks)  # (other calls of the signature: the dispatch sends them on)
                for guard in checks:  # checked by the dispatch: calls they refuse run the original
                    _uninstall(guard, fused)
                if not fixed and not self.same_on_all(view, fused, [Call(xs, {}) for xs in tensors[1:]]):
                    self._rollback(mark)
                    return None
            finally:
                _set_submodule(self.pristine, path, module)
            view_class = type(fused)
            fused = unviewed(fused, module)  # a copy of the view, kept whole: the part's own class, called as the part is
            forms.append(fused)
            guards.append(checks)
            as_called.append(type(fused) is not view_class)
        if len(self.report.fired) == mark[0]:  # nothing folded: no copy of the original is worth keeping beside it
            self._rollback(mark)
            return None
        self.report.notes.append(f"{_where(path)}: fused for its calls {', '.join(repr(sig) for sig, _ in groups)}; "
                                 "any other call runs it as written")
        return CallDispatch(copy_module(module), [sig for sig, _ in groups], forms, guards, as_called)

    def _mark(self) -> tuple:
        """Where the report stands, for :meth:`_rollback`."""
        r = self.report
        return (len(r.fired), len(r.left_alone), len(r.opaque), len(r.notes), len(r.parts), dict(r.ops_before),
                dict(r.ops_after), len(self.checks))

    def _rollback(self, mark: tuple) -> None:
        """Take back what the report gained since ``mark``."""
        r = self.report
        fired, left, opaque, notes, parts, r.ops_before, r.ops_after, checks = mark
        del r.fired[fired:], r.left_alone[left:], r.opaque[opaque:], r.notes[notes:], r.parts[parts:], self.checks[checks:]

    def keep_whole(self, path: str, calls: list[Call], reason: str) -> nn.Module:
        """A copy of the module at ``path`` whose children, as called in ``calls``, are fused on their own."""
        module = copy_module(self.pristine.get_submodule(path))
        self.report.parts.append(Part(path, "kept whole", reason, type(module).__name__))
        descendants = [p for p, _ in module.named_modules() if p]
        recorded: dict[str, list[Call]] = {p: [] for p in descendants}
        written: dict[str, set[str]] = {}
        try:
            for call in calls:
                for p, cs in record_calls(copy_module(self.pristine.get_submodule(path)), call, descendants, written).items():
                    recorded[p] += cs
        except Exception as e:  # noqa: BLE001  (its parent wires it up at run time, ``self.r.src = self.w``)
            self.report.notes.append(f"{_where(path)} does not run on its own as its parent called it ({first_line(e)}): "
                                     "its children are not fused either")
            return module
        try:
            outside = dict.fromkeys(read_outside(copy_module(self.pristine.get_submodule(path)), calls, descendants),
                                    "code outside its forward reads its parameters or buffers")
        except Exception as e:  # noqa: BLE001  (it ran above, on the same calls: keep every child as written)
            self.report.notes.append(f"{_where(path)} does not run again on its calls ({first_line(e)}): its children are not fused")
            return module
        # Attributes its parent sets on a part first: the reason said of a part the loops below reach too (Swin's
        # ``for blk in self.blocks: blk.H, blk.W = H, W``)
        for p, names in written.items():  # each called part holding it, by identity: a capture of that would hold
            target = module.get_submodule(p)  # the values too (a module under two names is listed under its first)
            for holder in [h for h, cs in recorded.items() if cs and any(m is target for m in module.get_submodule(h).modules())]:
                inner = p[len(holder) + 1:] if p.startswith(f"{holder}.") else "" if p == holder else f"{p} (shared)"
                outside.setdefault(holder, _SET_BY_PARENT.format(_listed(sorted(f"{inner}.{n}".lstrip(".") for n in names), 4)))
        for p in sorted(reached_through(module) & set(descendants)):  # on any branch, as its code is written
            outside.setdefault(p, _REACHED_THROUGH)
        for p in sorted(named_by_attributes(module) & set(descendants)):
            outside.setdefault(p, _NAMED_BY_ATTRIBUTE)
        for p in self.tied_plainly(path, descendants):  # (a copy of its own would hold a tensor of its own)
            outside.setdefault(p, _TIED_PLAINLY)
        reached = names_reached(module)
        swaps = self._fuse_children(module, path, "", recorded, outside)
        swaps = self._keep_names_reached(path, module, swaps, reached)
        self.restore_state(module)
        original = self.pristine.get_submodule(path)
        if self.check and swaps and not self.same_on_all(original, module, calls):
            # A forward that reads its children's attributes (``self.bn.weight``) cannot take a fused child:
            # put every child back, then swap in only those the module still computes the same with.
            for parent, name, old, _ in swaps:
                _put(parent, name, old)
            for parent, name, old, new in swaps:
                _put(parent, name, new)
                if not self.same_on_all(original, module, calls):
                    _put(parent, name, old)
                    self.report.notes.append(f"{_where(_join(path, name))}: not replaced by its fused form: its parent reads it otherwise")
        return module

    def tied_plainly(self, path: str, parts: Iterable[str]) -> list[str]:
        """Those of ``parts`` (paths below ``path``) that hold a tensor as a plain attribute in the storage of one held
        outside them (:func:`~repalgebra.module_copy.plain_ties`): kept as the copy of their parent holds them."""
        ties = plain_ties(self.pristine)
        return [p for p in parts if _join(path, p) in ties]

    def _keep_names_reached(self, path: str, module: nn.Module, swaps: list[tuple], reached: dict[int, set[str]]) -> list[tuple]:
        """``swaps`` less those whose fused form lacks a name the parent's code reads on the child it replaced
        (:func:`~repalgebra.frontend.outside_reads.names_reached`: ``self.body.forward_features(x)`` on a branch the
        example does not take): that child is put back, as written.  A dispatcher answers its original's names."""
        kept = []
        for parent, name, old, new in swaps:
            lacking = sorted(n for n in reached.get(id(old), ()) if hasattr(old, n) and not hasattr(new, n))
            if not lacking:
                kept.append((parent, name, old, new))
                continue
            _put(parent, name, old)
            where = _where(_join(path, next(p for p, m in module.named_modules() if m is old)))
            self.report.notes.append(f"{where}: not replaced by its fused form: its parent's code reads "
                                     f"{_listed([f'.{n}' for n in lacking], 4)} on it, which the fused form has not")
        return kept

    def _fuse_children(self, module: nn.Module, root_path: str, prefix: str, recorded: dict[str, list[Call]],
                       outside: dict[str, str], asked: bool = False) -> list[tuple]:
        """Replace each called descendant by its fused form; returns the swaps ``(parent, name, old, new)``.  One in
        ``outside`` (:func:`~repalgebra.frontend.outside_reads.read_outside`: the parent's code reads its weights;
        or the parent sets its attributes, :func:`~repalgebra.frontend.capture.setting_attributes`) stays as
        written, the reason its value, and its children are fused where the parent touches none of theirs.  So
        does one whose parent, or a module above it that runs as written, asks classes (``asked``: see
        :func:`_classes_asked`); a fused form is a class of ours."""
        swaps = []
        asked = asked or tests_classes(module)
        for name, child in list(module.named_children()):
            rel = _join(prefix, name)
            if recorded.get(rel) and _join(root_path, rel) in (*self.user_leaves, *self.state_leaves):
                continue  # kept as the copy holds it: what it shares with the rest (a buffer under two names) stays shared
            if recorded.get(rel) and asked and rel not in outside:
                outside[rel] = _CLASS_ASKED
            if recorded.get(rel) and rel not in outside:
                new = self.fuse_part(_join(root_path, rel), recorded[rel], "kept whole parent")
                _put(module, name, new)
                swaps.append((module, name, child, new))
                continue
            if recorded.get(rel) and not (prefix in outside and recorded.get(prefix)):  # (one note, at the outermost called)
                self.report.notes.append(f"{_where(_join(root_path, rel))}: not replaced by its fused form: {outside[rel]}")
            swaps += self._fuse_children(child, root_path, rel, recorded, outside, asked)  # (not called itself: a ModuleList, or unused)
        return swaps

    def same_on_all(self, reference: nn.Module, candidate: nn.Module, calls: list[Call]) -> bool:
        """Whether ``candidate`` computes what ``reference`` does on each of ``calls``; False where the reference does
        not run on its own (a part its parent wires up at run time: ``self.r.src = self.w``)."""
        try:
            return all(self.same(reference, candidate, c) is None for c in calls)
        except StateChanged:
            raise
        except Exception:  # noqa: BLE001  (the original part fails alone: its children stay as they are)
            return False

    # -- one captured graph ---------------------------------------------------------------

    def finish(self, path: str, cap: Capture, inputs: tuple, reason: str, captured: nn.Module | None = None) -> nn.Module:
        """Rewrite ``cap``'s graph, build the module, check it against the original; raise CaptureFailed if it differs.
        ``captured``: what ``cap`` was captured from when not the part itself (the part with its kept parts fused)."""
        with frozen_gc(len(cap.graph.nodes)):  # the graph, the model and its copies stay alive throughout: keep the collector off them
            return self._finish(path, cap, inputs, reason, captured)

    def _finish(self, path: str, cap: Capture, inputs: tuple, reason: str, captured: nn.Module | None) -> nn.Module:
        t0 = time.perf_counter()
        graph_in = cap.graph
        if any(p.device.type != "cpu" for n in graph_in.nodes for p in n.params.values()):
            graph_in = graph_in.map_params(lambda p, n: p.cpu())  # fold on the CPU (rules build their constants there)
        g64, rw = rewrite(graph_in, cast_back=False)
        if not rw.fired and not _made_kernels(cap):
            # nothing folds: the part as it is, not a graph of the same ops (carried calls cost time)
            self.stage["rewrite"] += time.perf_counter() - t0
            return self.unfolded(path, cap, rw, reason, captured)
        if not rw.fired:
            cap.notes.append("no rule applies, but the kernels forward computes from its weights on every call are made "
                             "once, at capture: the fused module holds them")
        graph = cast_params(g64)
        t1 = time.perf_counter()
        name = f"Fused{type(self.pristine.get_submodule(path)).__name__}"

        def build(graph: Graph) -> nn.Module:
            try:
                with warnings.catch_warnings():  # a copy of such a Proxy warns (torch's LeafSpec) before it fails
                    warnings.simplefilter("ignore", FutureWarning)
                    fused = to_module(graph, output_spec=cap.output_spec, class_name=name, own_dtype=self.dtype)
            except Exception as e:  # noqa: BLE001  (a part it carries does not copy: a hook stored a tracing Proxy in it)
                raise CaptureFailed(f"the {cap.how} capture's module cannot be built: {first_line(e)}") from e
            _follow_requires_grad(fused, self.pristine.get_submodule(path))
            self.restore_state(fused)
            return fused

        fused = build(graph)
        t2 = time.perf_counter()
        self.stage["rewrite"] += t1 - t0
        self.stage["build"] += t2 - t1
        free_batch, sized, unshown = cap.batch_free, False, ()
        min_batch = 2  # torch.export's symbolic batch holds from 2 up (it takes sizes 0 and 1 for special cases)
        if self.check:
            # Folded in float64, except the parameters of ops the model computes in another dtype on purpose
            # (a float64 model's ``F.group_norm(y.float(), 1, w.float())``): those as the model holds them.
            own = g64.map_params(lambda p, n: p.to(n.out.dtype) if p.is_floating_point() and n.out.dtype is not None
                                 and n.out.dtype.is_floating_point and n.out.dtype != self.dtype else p)
            exact = to_module(own, output_spec=cap.output_spec, class_name=name, keep_param_dtype=True)
            self.restore_state(exact)
            try:
                problem = self.same(self.pristine.get_submodule(path), exact, Call(tuple(inputs), {}))
            except StateChanged:
                raise
            except Exception as e:  # noqa: BLE001  (the capture does not run: torch.export left a symbolic size in it)
                problem = f"it does not run: {first_line(e)}"
            if problem is None and (layouts := layouts_to_match(self.last_ref, self.last_got[3], len(graph.outputs))):
                graph = dense_outputs(graph, layouts)  # (the model's outputs dense where the folded ones are not)
                fused = build(graph)
                cap.notes.append(f"output{'s' * (len(layouts) != 1)} {', '.join(map(str, sorted(layouts)))} made dense, "
                                 "as the model's are: folding changed where the tensors reaching them are made")
            if problem is None and cap.how != "fx":  # (an fx capture's: after the runs at other sizes, see below)
                problem = self.in_other_modes(path, exact, inputs)
            if problem is not None:
                self.stage["check"] += time.perf_counter() - t2
                raise CaptureFailed(f"the {cap.how} capture computes something else: {problem}")
            in_own = self.own_dtype_only or self.not_in_float64 or self.dtype is None
            compared = str(self.dtype if in_own else torch.float64).replace("torch.", "")
            self.checks.append(f"{_where(path)} on the example input in {compared}, to {self.tolerance:g} relative"
                               + " (the model does not run in float64)" * self.not_in_float64)
            if self.own_dtype_only and cap.how == "fx":  # checked in its dtype only: it holds in that one only
                ShapeGuard(None, _where(path), True, (self.dtype,), why="it casts to a dtype of its own").install(fused)
                cap.notes.append(f"fused for {str(self.dtype).replace('torch.', '')} only: its forward casts to a "
                                 "dtype of its own, which the fused module keeps; it refuses to run in another")
            if free_batch:  # torch.export proved the program for batches of 2 or more; check the graph at another one
                original = self.pristine.get_submodule(path)
                try:
                    free_batch = self.same(original, exact, Call(batch_plus_one(inputs), {})) is None
                except Exception:  # noqa: BLE001  (the original itself does not run at that batch: keep it fixed)
                    free_batch = False
                min_batch = 1 if self.holds_at_batch_one(path, exact, inputs) is None else 2
            if cap.how == "fx" and rw.fired and any(n.op in SIZE_MATCHED for n in graph_in.nodes):
                sizes_hold, batch_holds, unshown = self.holds_at_other_sizes(path, fused, inputs)
                if not sizes_hold:  # a fold through a reshape that keeps an axis whole at the example's sizes only
                    why = ("its folded graph differs from it at other sizes: a reshape keeps an axis whole at the "
                           "example's sizes only, where an axis has size 1 or two sizes coincide")
                    ShapeGuard([tuple(t.shape) for t in inputs], _where(path), batch_holds, why=why).install(fused)
                    sized = True
                    cap.notes.append(f"fused with its input sizes fixed{' (any batch size)' * batch_holds}: {why}")
                elif unshown:  # axes no run showed free: kept at the example's sizes (guarded below), the others free
                    cap.notes.append(f"fused with {_units_text(unshown)} fixed at the example's sizes: {_UNSHOWN_WHY}")
            if cap.how == "fx" and (problem := self.in_other_modes(path, exact, inputs, fx_traced=True,
                                                                        grad_taken=cap.grad_taken)) is not None:
                self.stage["check"] += time.perf_counter() - t2
                raise CaptureFailed(f"the {cap.how} capture computes something else: {problem}")
            self.stage["check"] += time.perf_counter() - t2
        if cap.how == "fx" and cap.dtype_tested:
            ShapeGuard(None, _where(path), True, (computes_in(self.pristine.get_submodule(path), inputs),),
                       why="its forward tests a dtype, taken as at the example", input_dtypes=_dtypes(inputs),
                       no_autocast=True).install(fused)
        if cap.how == "fx":
            _guard_pinned(_where(path), fused, cap, self.pristine.get_submodule(path), inputs)
        self.guard_default_dtype(path, fused, inputs)
        if cap.how == "fx" and not sized:
            ShapeGuard([tuple(t.shape) for t in inputs], _where(path), why=_RANK_WHY, free_sizes=True).install(fused)
        for check, positions, _ in cap.input_checks if cap.how == "fx" else ():
            InputCheck(check, positions).install(fused)
        if not sized and unshown:  # after the model's own assertions, which say why the original refuses first
            ShapeGuard([tuple(t.shape) for t in inputs], _where(path), why=_RANK_WHY, free_sizes=True,
                       fixed_axes=unshown).install(fused)
        if free_batch and not self.check:  # batch 1 is checked even so: the example's own batch may be 1
            one = self.holds_at_batch_one(path, fused, inputs, in_float64=False)
            min_batch = 1 if one is None else 2
            if one is not None and all(t.shape[0] == 1 for t in inputs if torch.is_tensor(t) and t.dim()):
                raise CaptureFailed(f"the {cap.how} capture computes something else at its example's batch of 1: {one}")
        _refuse_autocast(fused, cap.autocast_off, _where(path))  # (an fx capture holds that check in its graph)
        if cap.how == "specialized":
            own = computes_in(fused, inputs)
            other = torch.float32 if own == torch.float64 else torch.float64  # the dtype it was checked in too
            dtypes = (own, other) if self.follows_dtype(path, fused, inputs) else (own,)
            ShapeGuard([tuple(t.shape) for t in inputs], _where(path), free_batch, dtypes, min_batch=min_batch).install(fused)
            if free_batch and min_batch > 1:
                cap.notes.append("batch 1 refused: the model computes something else there than the capture, or it was not "
                                 "checked (torch.export's symbolic batch holds from 2 up; a squeeze of the batch axis, a branch on it)")
        if cap.reads_plain:
            self.plain_parts.append(path)
        self.record(path, cap, rw, graph, reason)
        return fused

    def unfolded(self, path: str, cap: Capture, rw, reason: str, captured: nn.Module | None = None) -> nn.Module:
        """A copy of the part at ``path`` (of ``captured``, its parts kept whole fused, when given), where its capture
        folds nothing (CondConv's dynamic kernels): the graph would compute the same ops, and its calls carried
        through would only cost time."""
        if captured is None:
            cap.notes.append(_AS_IT_IS if path else "nothing to fold: the model is returned as it is (a copy)")
        self.record(path, cap, rw, cap.graph, reason)
        return copy_module(self.pristine.get_submodule(path) if captured is None else captured)

    def record(self, path: str, cap: Capture, rw, graph: Graph, reason: str) -> None:
        """Add the part at ``path`` to the report: its capture, the rules that fired, what was left alone."""
        r = self.report
        r.parts.append(Part(path, cap.how, reason, type(self.pristine.get_submodule(path)).__name__))
        r.fired += [_prefixed(f, path) for f in rw.fired]
        r.left_alone += [_prefixed(la, path) for la in [*cap.left_alone, *rw.left_alone]]
        for mine, theirs in ((r.ops_before, rw.before), (r.ops_after, rw.after)):
            for op, n in theirs.items():
                mine[op] = mine.get(op, 0) + n
        # A call of forward itself has no module path: it is named by what it calls (``getitem``, ``cumsum``).
        r.opaque += [_carried(path, n) for n in graph.nodes if n.op == "opaque" and not is_returned_as_is(n)]
        r.notes += [f"{_where(path)}: {n}" if path else n for n in cap.notes]

    def holds_at_other_sizes(self, path: str, fused: nn.Module, inputs: tuple) -> tuple[bool, bool, tuple[Unit, ...]]:
        """Whether ``fused`` (an fx capture, which runs at any size) still computes what the part at ``path`` does
        at other sizes and batches, whether it does at another batch, and the axes no run showed it for.

        The rules see the example's sizes only.  A reshape that happens to keep the channel axis whole there
        (``x.reshape(B, H * W, C)`` of a 1x1 map, ``y.reshape(8, -1)`` at batch 1) lets a per-channel fold through
        it that is wrong at other sizes.  Each non-batch axis is resized on its own, the first run the
        original accepts at the batch plus one too (:func:`_sizes_shown`): resized together, a channels-last ``(B, H, W, C)`` input's runs all changed the
        ``C`` a Linear fixes, the original refused them, and a fold that holds at ``H = W = 1`` only was declared
        free (5.6 off; a review).  An axis whose every resized run the original refuses is not shown free: the
        caller keeps it at the example's size.  These runs are in the model's own dtype, to its tolerance: what they
        look for is a fold that is wrong (a difference of the order of the outputs), not one rounding; the float64
        check at the example has run."""
        original = self.pristine.get_submodule(path)

        def holds(other: tuple) -> bool | None:  # None: the original does not run there
            try:
                held = self.same(original, fused, Call(other, {}), in_float64=False) is None
            except StateChanged:
                raise
            except Exception:  # noqa: BLE001
                return None
            return held

        batched = batch_plus_one(inputs)
        differs, ran, unshown = _sizes_shown(holds, batched, inputs)
        if ran and not differs:  # (the first accepted run grew the batch too)
            return True, True, unshown
        batch = holds(batched)
        if batch is None and not ran:  # the original refuses another batch (an unbatched image's C): at the example's
            differs, ran, unshown = _sizes_shown(holds, inputs)
        return batch is not False and not differs, batch is not False, unshown

    def holds_at_batch_one(self, path: str, candidate: nn.Module, inputs: tuple, in_float64: bool = True) -> str | None:
        """None where ``candidate`` computes what the part at ``path`` does at batch 1, else why not: a capture with
        torch.export's symbolic batch holds from batch 2 up (a squeeze of the batch axis, a branch on it)."""
        try:
            return self.same(self.pristine.get_submodule(path), candidate, Call(batch_of_one(inputs), {}), in_float64=in_float64)
        except StateChanged:
            raise
        except Exception as e:  # noqa: BLE001  (one of them does not run at batch 1: the fused one refuses it)
            return first_line(e)

    def same(self, reference: nn.Module, candidate: nn.Module, call: Call, in_float64: bool = True) -> str | None:
        """None when ``candidate`` computes what ``reference`` does for ``call``, else what differs.

        Both run in float64 where the reference does (their parameters cast on
        the fly; neither module changes).  The tolerance is :data:`~repalgebra.verify.TOLERANCES`
        of the model's dtype: a float32 model's fused form holds values rounded to float32
        (parts fused on their own, constants ``torch.export`` computed at capture), so
        the comparison runs without float32's rounding of the arithmetic but allows for
        that of the weights, exactly as :func:`~repalgebra.verify` does.
        """
        tol = self.tolerance
        if self.stateful or not self.watching:  # runs must not change what fuse returns, nor the copy it captures: a
            # model fused as called once (its cache filled) may still write at other sizes (HF Swin sets shift_size = 0
            # where the map fits one window), and the capture after it took the unshifted windows (0.27 off; R14b)
            reference, candidate = copy_module(reference), copy_module(candidate)
        device = next((t.device for t in [*reference.parameters(), *reference.buffers()]), None)
        if device is not None and any(t.device != device for t in [*candidate.parameters(), *candidate.buffers()]):
            candidate = candidate.to(device)  # built on the CPU; the model's device at the end
        dtype: torch.dtype | None = torch.float64 if in_float64 else None
        if in_float64:  # (what a run in the model's dtype by request, at other sizes, leaves as the example's found)
            self.own_dtype_only = self.not_in_float64 = False
        ref_left: dict[str, Any] = {}  # where each run leaves the generators
        got_left: dict[str, Any] = {}
        ref_given: list = []  # the arguments as each run left them
        got_given: list = []
        with watch(reference) as changed:  # the original's state must not change: else nothing captured holds
            try:
                ref = _run(reference, call, dtype, self.dtype, left=ref_left, given=ref_given)
            except Exception:  # noqa: BLE001  (the model cannot run in float64: compare in its own dtype)
                if dtype is None:  # it ran in its own dtype: it refuses the call (a run at another size)
                    raise
                dtype, self.not_in_float64 = None, True
                ref = _run(reference, call, None, left=ref_left, given=ref_given)
            if dtype is not None:
                try:
                    with _quiet_fx():  # a failure here is expected and handled: no traceback printed for it
                        got = _run(candidate, call, dtype, self.dtype, left=got_left, given=got_given)
                except Exception:  # noqa: BLE001
                    # A forward that casts to float32 itself (fairseq's Fp32GroupNorm: ``input.float()``, then
                    # ``weight.float()``) keeps parts of the model float32 in the float64 run; the fused module holds
                    # those weights as its own, cast to float64: compare both in the model's own dtype instead (the
                    # fused module then refuses other dtypes: see own_dtype_only).
                    dtype, self.own_dtype_only = None, True
                    ref = _run(reference, call, None, left=ref_left, given=ref_given)
        if changed and self.watching and not self.stateful:
            prefix = next((f"{p}." for p, m in self.pristine.named_modules() if m is reference and p), "")
            raise StateChanged([prefix + c for c in changed])  # as paths of the model, as find_state names them
        ref_how, got_how = (dtype, self.dtype), self.candidate_how(dtype)
        if dtype is None:
            ref_how = (None,)
            try:
                with _quiet_fx():
                    got = _run(candidate, call, *got_how, left=got_left, given=got_given)
            except Exception as e:  # noqa: BLE001
                return f"it fails on the example input: {first_line(e)}"
        if in_float64:  # (in_other_modes compares with the example's run again; a run at other sizes is no such)
            self.last_got, self.last_ref = (candidate, call, got_how, got), ref
        if (problem := first_difference(ref, got, tol)) is not None:
            return problem
        if (problem := first_difference(ref_given, got_given, tol)) is not None:  # items of a list it was given
            return f"it leaves the arguments it was given otherwise than the model does ({problem.replace('output', 'item', 1)})"
        if _drawn_elsewhere(ref_left, got_left) is None:
            return None
        # Another thread's draw during a run moves the generators too: a difference holds where a second pair of
        # runs leaves them where the first did.
        again: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
        _run(reference, call, *ref_how, left=again[0])
        with _quiet_fx():
            _run(candidate, call, *got_how, left=again[1])
        return _drawn_elsewhere(ref_left, got_left) if again == (ref_left, got_left) else None

    def candidate_how(self, dtype: torch.dtype | None) -> tuple:
        """How :func:`_run` runs a check module (its weights in float64) beside the model run in ``dtype``: both in
        float64, or, in the model's dtype (None), the check module's float64 weights cast to it."""
        if dtype is not None:
            return dtype, self.dtype
        return (self.dtype, torch.float64) if self.dtype is not None and self.dtype != torch.float64 else (None,)

    def in_other_modes(self, path: str, exact: nn.Module, inputs: tuple, fx_traced: bool = False,
                       grad_taken: bool = False) -> str | None:
        """How a torch.export capture, recorded without gradients, outside inference mode and at the example's
        memory layout, differs at the example from the part called with gradients on, under ``torch.inference_mode``
        or on inputs in another layout (:func:`_other_layout`: channels-last, or a transposed view's strides), or
        None: it does not, or the part does not run so.  Each is a branch the capture fixed: on the grad mode where
        the mode flags' stand-ins (:mod:`~repalgebra.frontend.mode_flags`) did not reach, such as a flag bound on
        the instance (``self.flag = torch.is_grad_enabled``) or read by a helper of another module; on
        ``x.is_inference()`` (a tensor's, not a flag function); on ``x.is_contiguous(memory_format=torch.channels_last)``
        or ``x.is_contiguous()`` (a fast path of another approximation).  With ``fx_traced``, the check under
        ``torch.inference_mode`` only: torch.fx traces with gradients on, so its check against the model run without
        them sees a grad-mode branch already, and a branch on a traced tensor's ``is_inference()`` or layout fails
        its trace; but a helper of another module asking ``torch.is_inference_mode_enabled()`` is traced past
        (found by a review).

        Also on inputs at another storage offset (a slice ``t[1:]``) and on inputs that require gradients (computed,
        not leaves), with gradients on: torch.export records ``x.storage_offset()``, ``x.requires_grad``,
        ``x.is_leaf`` and ``x.grad_fn`` as the example answers them (found by a review).  An fx capture that took
        a computed value's ``requires_grad`` as False (``grad_taken``) is checked with gradients on, on the
        example's inputs and on inputs that require them: the model's parameters, or its inputs, make the value
        require gradients there (an fx trace fails on the others, and an input's own reads are checked per call)."""
        original = self.pristine.get_submodule(path)
        call, dtype = Call(tuple(inputs), {}), None if self.own_dtype_only else torch.float64
        other = Call(tuple(_other_layout(t) for t in inputs), {})
        for mode, laid_out, made, why in (
                (torch.enable_grad, call, None, "with gradients on (a branch on the grad mode)"),
                (torch.inference_mode, call, None, "under torch.inference_mode (a branch on it)"),
                (torch.no_grad, other, None, "on an input in another memory layout (a branch on it)"),
                (torch.no_grad, call, _at_offset, "on an input at another storage offset (a branch on it)"),
                (torch.enable_grad, call, _needing_grad, "on an input that requires gradients (a branch on it)")):
            if laid_out is other and all(a is b for a, b in zip(other.args, call.args)):
                continue  # no input of two axes or more: no layout to change
            if fx_traced and mode is not torch.inference_mode and not (grad_taken and mode is torch.enable_grad):
                continue
            called = copy_module(original) if self.stateful else original
            last = getattr(self, "last_got", None)  # the check's run of ``exact`` at the example, if it was the last
            how = self.candidate_how(dtype)
            try:
                with _quiet_fx():
                    want = _run(called, laid_out, dtype, self.dtype, mode=mode, made=made)
            except Exception:  # noqa: BLE001  (it does not run in that mode, as it did without: nothing to compare)
                continue
            reuse = (last is not None and last[0] is exact and len(last[1].args) == len(call.args)
                     and all(a is b for a, b in zip(last[1].args, call.args)) and last[2] == how)
            try:
                with _quiet_fx():
                    got = last[3] if reuse and not self.stateful else _run(exact, call, *how)
            except Exception as e:  # noqa: BLE001  (it ran on the example: the model runs where it does not)
                return f"{why}, it fails: {first_line(e)}"
            problem = first_difference(want, got, self.tolerance)
            if problem is not None:
                return f"{why}, {problem}"
        return None

    def guard_default_dtype(self, path: str, fused: nn.Module, inputs: tuple) -> None:
        """Where the part computes otherwise under another default dtype, the fused module refuses calls under one
        (:class:`DefaultDtypeGuard`), and the report says so."""
        t0 = time.perf_counter()
        original = self.pristine.get_submodule(path)
        # At the example's sizes: a part may read the default dtype at some sizes only (``if torch.get_default_dtype()
        # == torch.float64 and h.shape[-1] > 128``), which a run at other sizes does not show (review R5 finding 02)
        follows = follows_default_dtype(copy_module(original) if self.stateful else original, Call(tuple(inputs), {}))
        self.stage["check"] += time.perf_counter() - t0
        if follows:
            return
        default = torch.get_default_dtype()
        DefaultDtypeGuard(_where(path), default).install(fused)
        self.report.notes.append(f"{_where(path)}: computes values in torch's default dtype (a factory without dtype=), "
                                 f"held as made under {str(default).replace('torch.', '')}: the fused model refuses "
                                 "calls under another default dtype")

    def follows_dtype(self, path: str, fused: nn.Module, inputs: tuple) -> bool:
        """Whether a part captured by ``torch.export`` in float64 still computes what the original does in float32.

        The capture records the Python of ``forward`` in its dtype (``if x.dtype == torch.float64``, ``.to(h.dtype)``
        as a cast to float64); the float64 check cannot see that.  A capture in float32 is checked in float64
        already (:meth:`same`), to float32's tolerance, which a cast to float32 inside the model passes: where the
        model cast to float64 computes anything in a narrower dtype (``self.output(h).float()``,
        ``softmax(w, dtype=torch.float32).to(q.dtype)``: casts export recorded as no-ops), or the fused graph does
        (``q.to(x.dtype)`` of a uint8 ``q``, recorded as a cast to float32), it does not follow.  Without the
        check, it is assumed not to."""
        if self.dtype != torch.float64 or not self.check:
            original = self.pristine.get_submodule(path)
            return (self.check and not computes_narrower(copy_module(original) if self.stateful else original, inputs)
                    and not computes_narrower(fused, inputs))  # a cast export fixed (q.to(x.dtype) of a uint8 q)
        call = Call(tuple(t.to(torch.float32) if t.is_floating_point() else t for t in inputs), {})
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                want = _run(self.pristine.get_submodule(path), call, torch.float32, self.dtype)
                with _quiet_fx():  # a part that computes in float64 fails in float32: expected
                    got = _run(fused, call, torch.float32, self.dtype)
            return first_difference(want, got, TOLERANCES[torch.float32]) is None
        except Exception:  # noqa: BLE001  (it fails in float32: not dtype-generic)
            return False
        finally:
            self.stage["check"] += time.perf_counter() - t0

    # -- helpers ------------------------------------------------------------------------

    @property
    def tolerance(self) -> float:
        """The relative tolerance of a check: :data:`~repalgebra.verify.TOLERANCES` of the model's dtype."""
        return TOLERANCES.get(self.dtype, 1e-5)

    def leaves_under(self, path: str) -> list[str]:
        """The paths kept whole and untouched (the user's leaves, the parts that change state) inside ``path``, relative to it."""
        leaves = [*self.user_leaves, *self.state_leaves]
        if not path:
            return leaves
        return [p[len(path) + 1 :] for p in leaves if p.startswith(path + ".")]

    def raise_strict(self, path: str, e: CaptureFailed) -> None:
        cause = e.__cause__
        if isinstance(cause, UntraceableError):
            raise cause
        raise FuseError(f"cannot capture {_where(path)} with torch.fx: {e.reason}") from e


def _run(module: nn.Module, call: Call, dtype: torch.dtype | None, own: torch.dtype | None = None,
         mode: Callable[[], contextlib.AbstractContextManager] = torch.no_grad, left: dict | None = None,
         given: list | None = None, made: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Any:
    """``module`` making ``call`` on copies of its tensors, without gradients (``mode``: in another, such as
    ``torch.enable_grad`` as a training script calls it, or ``torch.inference_mode``, whose copies are inference
    tensors), the global generators started at :data:`~repalgebra.draws.CHECK_SEED` and where they were after it
    (:func:`~repalgebra.draws.generators_kept`); with
    ``dtype``, the tensors, parameters and buffers cast to it on the fly (``torch.func.functional_call``: the module
    is neither copied nor changed).

    With ``own`` (the model's dtype), only parameters and buffers of that dtype are cast: a float64 model that
    computes a norm in float32 on purpose (``F.group_norm(y.float(), 1, w.float())``) fuses to a graph holding
    ``w.float()`` as a float32 constant, and casting it would mix dtypes where the model does not.

    ``left`` receives where the run left the global generators (before they are put back), and ``given`` the
    arguments as the call left them: a forward may write into a list it is given (HRNet's ``x[i] = branch(x[i])``,
    DLA's ``layers[i] = node(...)``), which its caller reads after the call.  ``made`` makes each copy of a tensor
    otherwise, with the same values (:func:`_at_offset`, :func:`_needing_grad`)."""

    def prepare(t: Any) -> Any:
        if not torch.is_tensor(t):
            return t
        t = t.detach().clone().to(dtype) if dtype is not None and t.is_floating_point() else t.detach().clone()
        return t if made is None else made(t)

    with generators_kept() as ends, mode():  # each run draws what the one before drew: the checks compare like with like
        seeded_for_checks()
        args, kwargs = pytree.tree_map(prepare, call.args), pytree.tree_map(prepare, call.kwargs)
        if dtype is None:
            out = module(*args, **kwargs)
        else:  # (what it sets on its modules in that dtype, a cache it fills, is not the module's: put back)
            state = _named_tensors(module)
            cast = {k: v.to(dtype) if v.is_floating_point() and own in (None, v.dtype) else v for k, v in state.items()}
            with attributes_kept(module):
                out = torch.func.functional_call(module, cast, args, kwargs, tie_weights=False)
    if left is not None:
        left.update(ends)
    if given is not None:
        given[:] = [(args, kwargs)]
    return out


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s parameters and buffers by every name they have, for ``functional_call(..., tie_weights=False)``
    in another dtype: a tied one listed once (an LM head sharing its embedding's weight) stayed in the module's
    dtype under its other name, so the float64 run failed and the check fell back to the model's dtype (where a
    dtype ``forward`` read from ``self.dtype`` and froze went unseen, found by a probe).  Each module once, under its
    first path: a module registered under two names (SkipNet's downsample, also its block's) given two casts kept
    the second's after the run, as torch puts its slots back in order (the model's copy left in float64, found by a
    probe)."""
    named: dict[str, torch.Tensor] = {}
    for path, m in module.named_modules():
        prefix = f"{path}." if path else ""
        named.update((prefix + k, t) for k, t in [*m._parameters.items(), *m._buffers.items()] if t is not None)
    return named


def _drawn_elsewhere(want: dict[str, Any], got: dict[str, Any]) -> str | None:
    """What differs where a model's run (``want``) and a candidate's (``got``) left the global generators, or None.
    Equal outputs do not make equal functions where one run advanced a generator the other did not: a draw inside
    ``torch.random.fork_rng()`` gives the same noise on every call of the model, and a capture of it draws on."""
    moved = [name for name in DRAWS if want.get(name) != got.get(name)]
    if not moved:
        return None
    return f"it leaves {' and '.join(moved)} elsewhere than the model does (a draw put back, as in torch.random.fork_rng)"


class _NarrowFloats(TorchDispatchMode):
    """Notes whether an op returns a floating or complex tensor of a narrower dtype than float64."""

    NARROW = (torch.float16, torch.bfloat16, torch.float32, torch.complex32, torch.complex64)

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.seen = self.seen or any(torch.is_tensor(t) and t.dtype in self.NARROW for t in pytree.tree_leaves(out))
        return out


def computes_narrower(module: nn.Module, inputs: tuple) -> bool:
    """Whether ``module``, its floating parameters, buffers and inputs cast to float64, computes a tensor in a
    narrower dtype (a ``.float()``, ``dtype=torch.float32``, a factory of the default dtype), or fails to run.
    Its complex buffers are cast to complex128, as the fused model's real views of them follow its cast."""

    def cast(t: Any) -> Any:
        if torch.is_tensor(t) and (t.is_floating_point() or t.is_complex()):
            return t.detach().to(torch.complex128 if t.is_complex() else torch.float64)
        return t

    state = _named_tensors(module)
    with torch.no_grad():
        args, state = pytree.tree_map(cast, inputs), {k: cast(v) for k, v in state.items()}
        try:
            with _quiet_fx(), _NarrowFloats() as watch:
                torch.func.functional_call(module, state, tuple(args), tie_weights=False)
        except Exception:  # noqa: BLE001  (it does not run in float64)
            return True
    return watch.seen


@contextlib.contextmanager
def _quiet_fx() -> Iterator[None]:
    """Standard error held back while a run that may fail runs: a GraphModule prints its generated code's traceback
    there before raising, also for an error ``fuse`` expects and handles (a float64 run of a part that computes in
    float32 on purpose).  A run that succeeds shows what it printed (a warning of a carried call) after all."""
    held = io.StringIO()
    with contextlib.redirect_stderr(held):
        yield
    sys.stderr.write(held.getvalue())


def _calls_difference(reference: nn.Module, candidate: nn.Module, calls: list[tuple], tol: float) -> str | None:
    """What differs between fresh copies of the two modules making ``calls`` (their inputs) in turn, in float64
    where they run in it."""
    # A hook's handle whose module the fused model no longer holds copies while that module lives, and fails once
    # the collector has taken it: collected first, the copies below all fail or all succeed.  Only where a module
    # holds hooks: a full collection costs 0.1-0.2 s in a process with a large heap (a test run).
    if _holds_hooks(reference, candidate):
        gc.collect()
    try:
        copies = [copy_module(m) for m in (reference, candidate)]
        spares = [copy_module(m) for m in (reference, candidate)]  # in their own dtype, should float64 fail
    except Exception as e:  # noqa: BLE001
        return f"a copy of it fails: {first_line(e)}"
    copies = [cast_floats(m, torch.float64) for m in copies]
    runs = [Call(tuple(t.to(torch.float64) if t.is_floating_point() else t for t in inputs), {}) for inputs in calls]
    try:
        outs = [[_run(m, call, None) for call in runs] for m in copies]
    except Exception:  # noqa: BLE001  (not in float64: in the model's own dtype)
        copies = spares
        try:
            outs = [[_run(m, Call(tuple(inputs), {}), None) for inputs in calls] for m in copies]
        except Exception as e:  # noqa: BLE001
            return f"it fails on the example input: {first_line(e)}"
    for k in range(len(calls)):
        problem = first_difference(outs[0][k], outs[1][k], tol)
        if problem is not None:
            return f"call {k + 1}: {problem}" if len(calls) > 1 else problem
    return None


def _holds_hooks(*modules: nn.Module) -> bool:
    """Whether a module in ``modules`` holds a hook (forward, backward, state-dict ...) other than fuse's own guards."""
    ours = (ShapeGuard, StructureGuard, InputCheck, StaysInEval, DefaultDtypeGuard, _Reinstall, bool)  # (bool: with_kwargs flags)
    return any(not isinstance(hook, ours) for root in modules for m in root.modules() for name, hooks in vars(m).items()
               if "hook" in name and isinstance(hooks, dict) for hook in hooks.values())


def _classes_asked(root: nn.Module, path: str) -> bool:
    """Whether the code of ``root`` or of a module between it and the submodule at ``path`` asks classes
    (``isinstance(layer, MaskedConv1d)``), which a fused form of that submodule, a class of ours, answers otherwise."""
    steps = path.split(".")
    return any(tests_classes(root.get_submodule(".".join(steps[:k]))) for k in range(len(steps)))


_CLASS_ASKED = ("its parent's code asks classes (isinstance), which a fused form, a class of repalgebra's, answers "
                "otherwise")


def _put(parent: nn.Module, name: str, child: nn.Module) -> None:
    """Make ``child`` ``parent``'s child ``name`` (one it has), past a ``__setattr__`` of its class that refuses
    assignments after ``__init__`` (an immutable module: its own AttributeError came out of fuse; a probe).  The
    hook registries of the child it replaces stay held (:func:`~repalgebra.module_copy.keep_registries`)."""
    old = parent._modules.get(name)
    if old is not None and old is not child:
        keep_registries(old, child)
    parent._modules[name] = child


def _fixed_sizes(report: FuseReport) -> bool:
    """Whether a part of the report's model was captured by ``torch.export``, at the example's sizes."""
    return any(p.how == "specialized" for p in report.parts)


def _batch_fixed(module: nn.Module) -> bool:
    """Whether a part of ``module`` is held at one batch size (:attr:`ShapeGuard.fixes_batch`)."""
    return any(isinstance(h, ShapeGuard) and h.fixes_batch for m in module.modules() for h in m._forward_pre_hooks.values())


def _not_around(report: FuseReport) -> str | None:
    """Why the report's model, fused with the parts that hold a cache kept whole, is no capture around them that
    holds at any size: a part captured at the example's sizes, or the model itself kept whole (its children fused
    apart, folding less than the capture at fixed sizes did); None where it is one."""
    if _fixed_sizes(report):
        return "a part of it is captured at the example's sizes only"
    if any(p.path == "" and p.how == "kept whole" for p in report.parts):
        return "the model itself is kept whole: no capture around the parts holds"
    return None


def _inside(name: str, path: str) -> bool:
    """Whether the attribute ``name`` (``model.14.anchors``) belongs to the module at ``path`` or one inside it."""
    return not path or name.startswith(f"{path}.")


def _other_values(inputs: tuple) -> tuple | None:
    """``inputs`` with other values, drawn like them (their mean and spread), in each floating tensor; None where
    none has more than one value."""
    g = torch.Generator().manual_seed(1)

    def other(t: Any) -> Any:
        if not (torch.is_tensor(t) and t.layout is torch.strided and t.is_floating_point() and t.numel() > 1):
            return t
        drawn = torch.randn(t.shape, generator=g, dtype=torch.float64)
        return (drawn * t.double().std() + t.double().mean()).to(dtype=t.dtype, device=t.device)

    changed = tuple(other(t) for t in inputs)
    return changed if any(a is not b for a, b in zip(changed, inputs)) else None


def _own_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward hooks or pre-hooks of its own (not the guards of a model fused before)."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return any(not isinstance(h, OUR_HOOKS) for h in hooks)


def _other_layout(t: Any) -> Any:
    """``t`` with the same values in another memory layout (else ``t`` itself: a tensor of one axis, or one every
    layout describes alike, as a 1x1 map): a 4-D or 5-D tensor channels-last where it is not, contiguous where it
    is; another tensor of two axes or more with its last two axes' strides swapped (a transposed view's), or
    contiguous where it is not."""
    if not torch.is_tensor(t) or t.dim() < 2:
        return t
    if t.dim() in (4, 5):
        last_format = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        last = t.is_contiguous(memory_format=last_format)
        if last and t.is_contiguous():
            return t
        return t.contiguous() if last else t.contiguous(memory_format=last_format)
    if not t.is_contiguous():
        return t.contiguous()
    swapped = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t if swapped.is_contiguous() else swapped


def _at_offset(t: torch.Tensor) -> torch.Tensor:
    """``t`` (a copy of its own, dense) with its values and strides one element into its storage, as a slice ``t[1:]``
    of a larger tensor is."""
    buffer = t.new_empty(t.numel() + 1)
    moved = torch.as_strided(buffer, t.shape, t.stride(), 1)
    return moved.copy_(t)


def _needing_grad(t: torch.Tensor) -> torch.Tensor:
    """``t`` (a copy of its own) as a value computed from a leaf that requires gradients, where it is floating: it
    requires them, is no leaf, and has a ``grad_fn`` (called under ``torch.enable_grad``)."""
    return t.requires_grad_().clone() if t.is_floating_point() or t.is_complex() else t


def _runs(module: nn.Module, inputs: tuple) -> bool:
    """Whether ``module`` runs on ``inputs`` (in eval mode, without gradients)."""
    try:
        _run(module, Call(tuple(inputs), {}), None)
    except Exception:  # noqa: BLE001
        return False
    return True


def _shapes(tensors: Iterable[Any]) -> str:
    return _shapes_text([tuple(t.shape) for t in tensors if torch.is_tensor(t)])


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _carried(path: str, node: Node) -> str:
    """How the report names a call carried through: a module by its path; a function by what it calls, and where
    (``0.sep (pad)``: a block whose convs fused, but not the pad it computes from the input size)."""
    fn, where = node.attrs["fn"], _join(path, node.source)
    if not isinstance(fn, FnCall):
        return where or _call_name(fn)
    return f"{where} ({_call_name(fn)})" if where else _call_name(fn)


def _call_name(fn: Any) -> str:
    """What a carried call calls (``getitem``, ``cumsum``, ``MyBlock``)."""
    return fn.name if isinstance(fn, FnCall) else target_name(fn)


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a and b else a or b


def _other_size(s: int) -> int:
    """Another size a model that accepted ``s`` should accept: half of a multiple of 64 from 128 on (256 becomes 128,
    a quarter of the pixels to check), else ``s`` moved by its largest power-of-two divisor up to 32 (so a model
    that downsamples by 32 still fits), down where that leaves more than the step (224 becomes 192), else up (8
    becomes 16, a 1 becomes a 2)."""
    if s >= 128 and s % 64 == 0:
        return s // 2
    d = min(s & -s, 32)
    return s - d if s > 2 * d else s + d


def _sizes_shown(holds: Callable[[tuple], bool | None], inputs: tuple,
                 after: tuple | None = None) -> tuple[bool, bool, tuple[Unit, ...]]:
    """Run ``holds`` on ``inputs`` with each non-batch axis resized on its own (axis ``k`` of every input that has
    one); where the original refuses that and several inputs have one, each input's axis ``k`` alone, and at size 1
    (``y + conv(x)`` takes a ``y`` of one channel, not of another number); then, for each size of the axes still
    refused, every axis of that size together (a square image that ``int(sqrt(N))`` needs stays one; ``x`` of
    ``(B, C, L)`` and its mask of ``(B, L)`` keep one length).  Whether a run differed, whether any ran, and the
    ``(input, axis)`` pairs no accepted run resized: a refused run shows nothing, so such an axis is not free.

    With ``after`` (``inputs`` at the example's batch, where ``inputs`` grew it), the runs after the first one
    accepted resize ``after``: that run showed the batch, and the others cost less (FastViT's fuse, 0.1 s).  A
    later axis's run also halves the axes shown free before it (:func:`_holds_beside`)."""
    ranks = {i: t.dim() for i, t in enumerate(inputs) if torch.is_tensor(t)}
    refused: list[Unit] = []
    free: list[Unit] = []  # the axes before ``k`` that a run showed free
    ran = False
    for k in range(1, max(ranks.values(), default=0)):
        units = [(i, k) for i, r in ranks.items() if r > k]
        # the axis of every input at once (smaller where it can be, then twice: a conv of kernel 2 and dilation 2
        # takes a length of 3 but not 2; found by Hypothesis), then each input's, also at size 1
        tries = [(units, _quarter), (units, _other_size), (units, _twice)]
        tries += [([u], size) for u in units for size in (_other_size, _one)] if len(units) > 1 else []
        shown: set[Unit] = set()
        for picked, size in tries:
            if set(picked) <= shown:
                continue
            resized = _resized(after if ran and after is not None else inputs, picked, size)
            held = None if resized is None else _holds_beside(holds, resized, free, {size(inputs[i].shape[j]) for i, j in picked})
            if held is False:
                return True, True, ()
            if held:
                ran, shown = True, shown | set(picked)
        refused += [u for u in units if u not in shown]
        free += [u for u in units if u in shown]
    for group in _equal_sized(inputs, refused):
        for size in (_other_size, _twice):
            held = holds(_resized(after if ran and after is not None else inputs, group, size))
            if held is False:
                return True, True, ()
            if held:
                ran, refused = True, [u for u in refused if u not in group]
                break
    return False, ran, tuple(refused)


def _holds_beside(holds: Callable[[tuple], bool | None], resized: tuple, free: list[Unit], sizes: set[int]) -> bool | None:
    """``holds`` of ``resized`` with the axes ``free`` (shown free by earlier runs) at half their size too, where
    that is smaller and none of the ``sizes`` this run gives its own axis: FastViT's run for W at ``H = 128`` costs
    half the one at ``H = 256`` (0.03 s).  The sizes
    differ, so ``H`` and ``W`` never become equal there (a square map hides an ``H`` read for a ``W``).  Where
    the original refuses the two resized together (a model with a fixed aspect), ``resized`` alone."""
    half = [u for u in free if _other_size(n := resized[u[0]].shape[u[1]]) < n and _other_size(n) not in sizes]
    both = _resized(resized, half, _other_size) if half else None
    if both is not None and (held := holds(both)) is not None:
        return held
    return holds(resized)


def _quarter(s: int) -> int:
    """A quarter of a multiple of 128 from 256 on (256 becomes 64), else ``s`` (no run): an axis resized alone
    keeps the others whole, and a smaller run costs less (FastViT's fuse: 0.1 s).  Where the original refuses it
    (a model needing a larger map), :func:`_other_size` is tried next."""
    return s // 4 if s >= 256 and s % 128 == 0 else s


def _twice(s: int) -> int:
    return 2 * s


def _one(s: int) -> int:
    """Size 1, the one size a broadcast takes beside any other."""
    return 1


def _equal_sized(inputs: tuple, units: list[Unit]) -> list[list[Unit]]:
    """For each size of ``units``, every axis after the batch of that size in ``inputs`` (a length ``x`` and its
    mask share, ``H == W``), where there are two or more."""
    every = [(i, k) for i, t in enumerate(inputs) if torch.is_tensor(t) for k in range(1, t.dim())]
    sizes = dict.fromkeys(inputs[i].shape[k] for i, k in units)
    groups = [[(i, k) for i, k in every if inputs[i].shape[k] == s] for s in sizes]
    return [g for g in groups if len(g) > 1]


def _resized(inputs: tuple, units: Iterable[Unit], size: Callable[[int], int]) -> tuple | None:
    """``inputs`` with the axes ``units`` resized, each to ``size`` of its size, or None when none changes (an
    axis of size 0 stays).

    Floating-point values are drawn afresh with the example's mean and spread, others (ids, masks) tiled from the
    example."""
    gen = torch.Generator().manual_seed(0)
    out, resized = [], False
    for i, t in enumerate(inputs):
        picked = {k for j, k in units if j == i and t.shape[k] and size(t.shape[k]) != t.shape[k]}
        if not picked:
            out.append(t)
            continue
        shape = [size(s) if k in picked else s for k, s in enumerate(t.shape)]
        resized = True
        if t.is_floating_point():
            std = float(t.double().std()) if t.numel() > 1 else 1.0
            new = torch.randn(shape, generator=gen, dtype=torch.float64) * (std or 1.0) + float(t.double().mean())
            out.append(new.to(t.dtype).to(t.device))
        else:
            new = t
            for k in sorted(picked):
                new = new.index_select(k, torch.arange(shape[k], device=t.device) % t.shape[k])
            out.append(new)
    return tuple(out) if resized else None


# Why a part whose attributes its parent sets stays as written: a capture of it holds the example's values, and the
# parent's writes would reach the fused module, which never reads them.
_SET_BY_PARENT = ("its parent sets its attributes {} on each call (Swin's blk.H, blk.W = H, W), which a capture of it "
                  "would hold at the example's values")
_NAMED_BY_ATTRIBUTE = ("a plain attribute of its parent names it (self.paths = {'main': self.a}), which a fused form "
                       "swapped in would not be")
_TIED_PLAINLY = ("it holds as a plain attribute a tensor its model holds elsewhere too (self.__dict__['t'] = parent.shift), "
                 "which a copy of its own, fused or kept whole, would hold apart: its writes would miss the model's")
_REACHED_THROUGH = ("its parent's code reaches into it (self.body.conv, self.body[0], self.bn.running_var), on some branch "
                    "at least: its fused form holds the folded weights, under other names")


def _checks_of(fused: nn.Module) -> list["ShapeGuard | InputCheck"]:
    """The pre-hooks of a fused part that refuse calls (its shapes, ranks and dtypes, a test of sizes taken as at the
    example, the model's own assertions): a dispatcher beside its original runs the original where one refuses."""
    return [h for h in fused._forward_pre_hooks.values() if isinstance(h, (ShapeGuard, InputCheck))]


def _refuses_what_runs(checks: list["ShapeGuard | InputCheck"]) -> bool:
    """Whether ``checks`` refuse calls the original runs: fixed shapes or dtypes, or a test of sizes taken as at the
    example.  Where only the number of axes, an axis the original refused at every size tried, or the model's own
    assertions are checked, the part stays without a dispatcher (a copy of its original, BatchNorms and all, beside
    every fused part below a parent kept whole): a call of another rank is refused by name."""
    return any(isinstance(c, ShapeGuard) and not c.free_sizes
               or isinstance(c, InputCheck) and getattr(c.call, "target", None) is taken_as_traced for c in checks)


def _by_signature(calls: list[Call]) -> list[tuple[Signature, list[tuple]]] | None:
    """``calls`` grouped by :class:`~repalgebra.call_dispatch.Signature`, each with its calls' tensors; None where a
    call holds something else than tensors and plain constants (or no tensor, or a NaN among its constants)."""
    groups: list[tuple[Signature, list[tuple]]] = []
    for c in calls:
        for sig, group in groups:
            if (xs := sig.tensors(c.args, c.kwargs)) is not None:
                group.append(xs)
                break
        else:
            sig = Signature.of(c.args, c.kwargs)
            xs = None if sig is None else sig.tensors(c.args, c.kwargs)
            if not xs:
                return None
            groups.append((sig, [xs]))
    return groups


def _not_alone(calls: list[Call]) -> str:
    """Why a part called with keywords or numbers is kept whole: more ways than are fused, or what its calls hold."""
    groups = _by_signature(calls)
    if groups is not None and len(groups) > MOST_SIGNATURES:
        return (f"called {len(groups)} ways with other numbers or keywords (at most {MOST_SIGNATURES} are fused per part): "
                + ", ".join(repr(sig) for sig, _ in groups[:3]) + ", ...")
    return next(c.not_alone for c in calls if not c.tensor_only)


def _takes_other_calls(module: nn.Module, calls: list[Call]) -> bool:
    """Whether ``module``'s ``forward`` takes other calls than ``calls`` make: it has more parameters than their
    arguments (an optional flag, ``return_attention=False``), or takes ``*args`` or ``**kwargs``."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C forward: as many arguments as it is given
        return False
    var = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    named = [p for p in params if p.kind not in var]
    return len(named) < len(params) or len(named) > max(len(c.args) for c in calls)


def _where(path: str) -> str:
    return repr(path) if path else "the model"


def _reasons(failures: list[tuple[str, CaptureFailed]]) -> str:
    """Why each capture path failed, one short clause each."""

    def short(text: str) -> str:  # the first line, at most 140 characters: whole sentences, else whole words
        text = text.strip().splitlines()[0] if text.strip() else ""
        if len(text) <= 140:
            return text
        end = text.rfind(". ", 60, 140)
        return text[: end + 1] if end > 0 else text[:136].rsplit(" ", 1)[0] + " ..."

    return "; ".join(f"{how}: {short(e.reason)}" + (f" (in {e.path!r})" if e.path else "") for how, e in failures)


def _prefixed(item: Any, path: str) -> Any:
    """A report entry of a part, with its source made a path of the whole model."""
    if not path:
        return item
    return type(item)(**{**item.__dict__, "source": _join(path, item.source)})


def _numel(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors)
