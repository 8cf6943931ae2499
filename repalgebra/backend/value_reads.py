"""Which Python booleans and numbers a module's own code reads from the values of its inputs.

``torch.onnx.export`` traces a part once: a Python branch on a tensor's value (``if x.max() > 1: x = x / 255``)
or a number read from one (``int(lengths.max())``) is fixed in the file to what the traced input gave.  An ONNX
graph holds no Python, so such a file computes the model only for inputs that give the same: no check at a few
other inputs can show that it does for all (random inputs and their variations never crossed that threshold;
found by a probe, 0.2 off for images in 0..1).  :func:`value_reads` finds those reads themselves.

It runs the part once in eager under a :class:`~torch.overrides.TorchFunctionMode` that follows which tensors
are computed from the inputs (their *data*): every call with a data argument makes data, a write of data into a
tensor makes it (and what it is a view of) data, and what only takes an input's size, dtype and device
(``x.new_zeros(...)``, ``torch.zeros_like(x)``) does not.  In eager, sizes are Python numbers and weights are
not computed from the inputs, so a ``bool()`` or a number read from data is a read of the inputs' values.

Not counted: reads in torch's own code (its checks of sizes; what torch reads inside is the checks' business,
:func:`~repalgebra.backend.onnx_fallback.differs_at_other_values`), and the test of an ``assert`` statement
whose failure nothing in the model's code can catch.  An assertion computes nothing: where it holds the model
goes on as the file does, where it fails the model raises and returns nothing, and a file cannot raise (as with
the assertions on sizes, the file does not make the check; the report says so).  An ``assert`` inside a
``try``, ``with`` or ``finally`` block of the model's code is counted: a handler there may take another path.
"""

from __future__ import annotations

import dis
import functools
import sys
import types
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from repalgebra.backend.onnx_fallback import _NUMBER_READS, _TORCH_DIR, _called_by_torch, _copies, probing

__all__ = ["ValueReads", "value_reads"]

# Python booleans of values besides ``bool(t)``: ``0 in t``, ``torch.equal(a, b)``, ``a.allclose(b)``.
_BOOL_READS = {torch.Tensor.__bool__, torch.Tensor.__contains__, torch.Tensor.equal, torch.equal, torch.Tensor.allclose,
               torch.allclose, torch.Tensor.is_nonzero, torch.is_nonzero}

# Calls that read only their first argument's size, dtype and device: their result is no data of it.
_SHAPE_ONLY = {torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_empty, torch.Tensor.new_full,
               torch.Tensor.new_tensor, torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like}


@dataclass
class ValueReads:
    """What :func:`value_reads` found: Python booleans and numbers read from the inputs' values, and the
    assertions on them (not counted in ``reads``)."""

    reads: int = 0
    asserted: int = 0


class _Tracking(TorchFunctionMode):
    """While active, follows which tensors are data (computed from ``inputs``) and counts the model's reads of them."""

    def __init__(self, inputs: Sequence[Any]) -> None:
        super().__init__()
        self._data: dict[int, weakref.ref] = {}  # by id, with a weak reference telling a reused id from the tensor
        self.found = ValueReads()
        for t in pytree.tree_leaves(list(inputs)):
            self._mark(t)

    def _mark(self, t: Any) -> None:
        if torch.is_tensor(t):
            for u in (t, t._base):  # a write into a view writes into its base (and the base's other views)
                if u is not None:
                    self._data[id(u)] = weakref.ref(u)

    def _is_data(self, t: Any) -> bool:
        if not torch.is_tensor(t):
            return False
        for u in (t, t._base):
            ref = self._data.get(id(u)) if u is not None else None
            if ref is not None and ref() is u:
                return True
        return False

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        read = func in _BOOL_READS or func in _NUMBER_READS
        if read and not _called_by_torch():  # (called here: it reads the frame two up, the model's)
            if any(self._is_data(t) for t in pytree.tree_leaves((args, kwargs))):
                if func is torch.Tensor.__bool__ and _asserted():
                    self.found.asserted += 1
                else:
                    self.found.reads += 1
        out = func(*args, **kwargs)
        sources = args[1:] if func in _SHAPE_ONLY else args
        if any(self._is_data(t) for t in pytree.tree_leaves((sources, kwargs))):
            for t in pytree.tree_leaves(out):
                self._mark(t)
            if _writes(func, kwargs):  # x[idx] = data, buf.add_(data), torch.add(a, b, out=buf)
                self._mark(args[0] if args else None)
                for t in pytree.tree_leaves(kwargs.get("out")):
                    self._mark(t)
        return out


def _writes(func: Any, kwargs: dict) -> bool:
    """Whether ``func`` writes into its first argument or its ``out``: an in-place method (``add_``, ``__setitem__``,
    ``__iadd__``; an ATen overload ``add_.Tensor``) or a call given ``out``."""
    name = getattr(func, "__name__", "").split(".")[0]
    return "out" in kwargs or name in _IN_PLACE_OPERATORS or (name.endswith("_") and not name.startswith("__"))


_IN_PLACE_OPERATORS = {"__setitem__", *(f"__i{op}__" for op in ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod",
                                                                "pow", "and", "or", "xor", "lshift", "rshift"))}


def _asserted() -> bool:
    """Whether the ``bool(tensor)`` being dispatched is the test of an ``assert`` statement in the model's code
    whose failure no ``try``, ``with`` or ``finally`` of that code can catch (:func:`_asserts_at`)."""
    f = sys._getframe(2)
    while f is not None and f.f_code.co_filename.endswith(("overrides.py", "_tensor.py")) and f.f_code.co_filename.startswith(_TORCH_DIR):
        f = f.f_back
    if f is None or not _asserts_at(f.f_code, f.f_lasti):
        return False
    while f is not None and f.f_code is not _run_tracked.__code__:  # the frames of the part's call, up to its run
        if not f.f_code.co_filename.startswith(_TORCH_DIR) and _in_handler(f.f_code, f.f_lasti):
            return False
        f = f.f_back
    return f is not None


@functools.lru_cache(maxsize=1024)
def _instructions(code: types.CodeType) -> tuple[dis.Instruction, ...]:
    return tuple(dis.get_instructions(code))


def _asserts_at(code: types.CodeType, offset: int) -> bool:
    """Whether the instruction at ``offset`` (the truth test of a tensor) is a conditional jump of an ``assert``:
    one way leads to ``LOAD_ASSERTION_ERROR`` (``assert a and b`` jumps there from ``a``)."""
    ins = _instructions(code)
    k = next((j for j, i in enumerate(ins) if i.offset == offset), None)
    if k is not None and ins[k].opname == "TO_BOOL":  # (Python 3.13: the test, then the jump)
        k += 1
    if k is None or k >= len(ins) or not ins[k].opname.startswith("POP_JUMP") or "IF_TRUE" not in ins[k].opname and "IF_FALSE" not in ins[k].opname:
        return False
    after = ins[k + 1] if k + 1 < len(ins) else None
    target = next((i for i in ins if i.offset == ins[k].argval), None)
    return any(i is not None and i.opname == "LOAD_ASSERTION_ERROR" for i in (after, target))


@functools.lru_cache(maxsize=1024)
def _handled(code: types.CodeType) -> tuple:
    """The ranges of ``code`` under an exception handler (``try``, ``with``, ``finally``); ``None`` where Python keeps
    none to read (before 3.11)."""
    entries = getattr(dis.Bytecode(code), "exception_entries", None)
    return None if entries is None else tuple((e.start, e.end) for e in entries)


def _in_handler(code: types.CodeType, offset: int) -> bool:
    """Whether the instruction at ``offset`` runs under an exception handler of ``code`` (unknown: it may)."""
    ranges = _handled(code)
    return ranges is None or any(start <= offset < end for start, end in ranges)


def _run_tracked(module: nn.Module, inputs: tuple, mode: _Tracking) -> None:
    with torch.no_grad(), mode, probing():
        module(*inputs)


def value_reads(module: nn.Module, inputs: tuple) -> ValueReads:
    """The Python booleans and numbers ``module``'s own code reads, run once on ``inputs`` (copies), from values
    computed from them (see the module docstring).  A module that does not run on them reads nothing here (its
    export's checks say why it fails)."""
    copies = _copies(inputs)
    mode = _Tracking(copies)
    try:
        _run_tracked(module, copies, mode)
    except Exception:  # noqa: BLE001
        pass
    return mode.found
