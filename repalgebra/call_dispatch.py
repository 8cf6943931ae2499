"""Parts called with keywords or numbers: fused once per way they are called, the original for any other call.

A part below a parent kept whole is captured on its own from the calls the parent made.  Vision transformers call
their blocks ``blk(x, H, W)``, text models ``layer(x, attention_mask=None, output_attentions=False)``: a capture
takes tensors only, so such parts used to stay as written, their BatchNorms unfolded.  A call's
:class:`Signature` is its arguments with each tensor replaced by a slot: the constants (``H``, ``None``,
``False``) are part of the function the capture sees, so the part is captured once per signature (a view of it
taking the tensors alone, :func:`~repalgebra.frontend.structured.bound_view`), and :class:`CallDispatch` runs
that capture only for calls of that signature, whose constants are equal and of the same type.  Any other call
(another ``H``, a mask where the example gave ``None``) runs the original, as written: nothing is assumed about
what the constants do.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["Signature", "Dispatch", "CallDispatch", "MOST_SIGNATURES", "tensors_in"]

MOST_SIGNATURES = 4  # ways one part may be called and still be fused per way: more, and it stays as written

# Constants a signature holds: compared by type and value.  Anything else (a cache object, a module) keeps the part
# as written: its equality says nothing of what the part does with it.
_CONSTANTS = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.layout, torch.memory_format)


class TensorSlot:
    """Where a signature's call has a tensor (one instance, :data:`SLOT`; it pickles by name)."""

    def __repr__(self) -> str:
        return "<tensor>"

    def __reduce__(self) -> str:
        return "SLOT"


SLOT = TensorSlot()


class Signature:
    """A call's arguments with each tensor a :data:`SLOT`: ``(args, kwargs)``, the keywords sorted by name."""

    def __init__(self, skeleton: tuple) -> None:
        self.skeleton = skeleton

    @classmethod
    def of(cls, args: tuple, kwargs: dict) -> "Signature | None":
        """The signature of a call; None where it holds something that is neither a tensor nor a plain constant."""
        leaves, spec = _flatten(_ordered(args, kwargs))
        if not all(torch.is_tensor(v) or type(v) in _CONSTANTS for v in leaves):
            return None
        return cls(pytree.tree_unflatten([SLOT if torch.is_tensor(v) else v for v in leaves], spec))

    def tensors(self, args: tuple, kwargs: dict) -> tuple | None:
        """The call's tensors in order where it has this signature, else None."""
        return tensors_in(self.skeleton, args, kwargs)

    def bind(self, tensors: Sequence[Any]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of this signature's call with ``tensors`` in its slots (Proxies, while traced)."""
        leaves, spec = pytree.tree_flatten(self.skeleton)
        it = iter(tensors)
        args, kwargs = pytree.tree_unflatten([next(it) if v is SLOT else v for v in leaves], spec)
        return tuple(args), dict(kwargs)

    def slots(self) -> list[int]:
        """Where the tensors are among the flattened arguments."""
        return [k for k, v in enumerate(pytree.tree_leaves(self.skeleton)) if v is SLOT]

    def __repr__(self) -> str:
        args, kwargs = self.skeleton
        return "(" + ", ".join([*(repr(a) for a in args), *(f"{k}={v!r}" for k, v in kwargs.items())]) + ")"


def tensors_in(skeleton: tuple, args: tuple, kwargs: dict) -> tuple | None:
    """The tensors of a call whose arguments are ``skeleton``'s, a tensor in each slot and equal constants elsewhere;
    None for a call of another signature.  It runs on every call of a dispatcher, so it walks the call beside the
    skeleton once, opening what :func:`_flatten` opens (a ``torch.Size`` as its tuple), with no pytree spec built
    per call (two flattens cost a small block more than its fused form saved)."""
    want_args, want_kwargs = skeleton
    if len(args) != len(want_args) or len(kwargs) != len(want_kwargs):
        return None
    found: list = []
    if not _matches(want_args, tuple(args), found):
        return None
    for name, want in want_kwargs.items():  # (sorted by name, as the recorded call's were)
        if name not in kwargs or not _matches(want, kwargs[name], found):
            return None
    return tuple(found)


def _matches(want: Any, got: Any, found: list) -> bool:
    """Whether ``got`` is ``want`` of a skeleton (a tensor in each slot, appended to ``found``; equal constants and
    containers of the same kind elsewhere)."""
    if want is SLOT:
        found.append(got)
        return torch.is_tensor(got)
    kind = type(want)
    if kind is tuple or kind is list:
        return ((type(got) is kind or (kind is tuple and type(got) is torch.Size)) and len(got) == len(want)
                and all(_matches(w, g, found) for w, g in zip(want, got)))
    if kind is dict:
        return (type(got) is dict and list(got) == list(want)
                and all(_matches(w, got[k], found) for k, w in want.items()))
    return _equal(got, want)  # (a tensor is of no constant's type)


def _flatten(tree: Any) -> tuple[list, Any]:
    """A call's leaves, opening plain tuples, lists and dicts only: anything else is a leaf, so a structure torch
    registers with pytree (a ``PackedSequence``, a namedtuple that checks its fields when built) is neither a tensor
    nor a constant and keeps the part as written.  Opened, a PackedSequence's skeleton could not even be built (its
    constructor reads its fields' devices) and fuse crashed on an RNN called on one."""
    return pytree.tree_flatten(tree, is_leaf=lambda v: type(v) not in (tuple, list, dict))


def _ordered(args: tuple, kwargs: dict) -> tuple:
    """The call's arguments, its keywords sorted by name and a ``torch.Size`` as the tuple it is (a recorded call
    holds one so: ``pos(x, x.shape[2:])`` never matched its own signature)."""
    return _sizes_as_tuples((tuple(args), dict(sorted(kwargs.items()))))


def _sizes_as_tuples(v: Any) -> Any:
    if isinstance(v, torch.Size):
        return tuple(v)
    if type(v) in (tuple, list):
        return type(v)(_sizes_as_tuples(x) for x in v)
    if type(v) is dict:
        return {k: _sizes_as_tuples(x) for k, x in v.items()}
    return v


def _equal(a: Any, b: Any) -> bool:
    """Same type and value (``8`` is not ``8.0``, ``True`` not ``1``, ``-0.0`` not ``0.0``: ``math.copysign`` tells
    them apart; no NaN equals a NaN: such a call runs the original)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (float, complex)):
        bits = _bits(a)
        return bits is not None and bits == _bits(b)
    return bool(a == b)


def _bits(v: float | complex) -> bytes | None:
    """A float's or complex's bits (None for a NaN, which equals nothing)."""
    parts = (v.real, v.imag) if isinstance(v, complex) else (v,)
    return None if any(math.isnan(p) for p in parts) else struct.pack(f"{len(parts)}d", *parts)


class Dispatch(nn.Module):
    """A part fused beside a copy of its original, ``self._original``, which runs the calls the fused forms do not
    take (:class:`CallDispatch`, and ``fuse``'s ``ShapeDispatch``).

    Its parent's own code may read the part's attributes (``blk.num_heads``) or change them (``blk.gain = 3.0``,
    ``blk.set_gain(3.0)``, ``blk.attn.H = H``) on a branch the example did not take.  Every public name is the
    original's (the dispatcher's own state has names of its own, ``_forms`` and the like, so that a part's
    ``self.fused`` is no dispatcher's), and a write of a name the original has goes to it.  Before each call the
    plain attributes of the original's modules are compared with those it was sealed with
    (:func:`_fingerprint`): where they changed, the original runs that call and every later one, as written; the
    fused forms hold what was there when they were captured (found by reviews)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("_modules", {}).get("_original")
            if original is None or name in _DISPATCH_STATE:
                raise
            return getattr(original, name)

    def __setattr__(self, name: str, value: Any) -> None:
        original = self.__dict__.get("_modules", {}).get("_original")
        if (self.__dict__.get("_sealed") and original is not None and name not in _DISPATCH_STATE and name not in MODULE_STATE
                and not hasattr(type(self), name) and hasattr(original, name)):
            setattr(original, name, value)  # (a name the original lacks, fuse_report or qconfig, stays here)
            return
        super().__setattr__(name, value)

    def _seal(self) -> None:
        """From now on, a write of a name the original has is the original's, and a change of its plain attributes
        makes it run every call.  The modules watched are listed here, once: a child replaced later changes its
        parent's fingerprint."""
        self.__dict__["_watched"] = list(self._original.modules())
        self.__dict__["_sealed"] = _fingerprint(self._watched)

    def _changed(self) -> bool:
        """Whether the original's plain attributes changed since it was sealed, or since it last ran here (its own
        writes in its forward are its own: state it keeps was left whole before any dispatcher was made)."""
        if self.__dict__.get("_as_written"):
            return True
        if _fingerprint(self._watched) != self.__dict__.get("_sealed"):
            self.__dict__["_as_written"] = True
        return self.__dict__.get("_as_written", False)

    def _run_original(self, *args: Any, **kwargs: Any) -> Any:
        out = self._original(*args, **kwargs)
        if not self.__dict__.get("_as_written"):
            self._seal()
        return out

    def _apply(self, fn: Any, recurse: bool = True) -> "Dispatch":
        """A cast or a move of the fused model (``.to()``, ``.half()``, ``.cuda()``) replaces the original's buffers,
        which the fingerprint compares by identity: sealed again after it, so the forms run on (every dispatcher
        ran its original after a cast; a review).  A change made before it is seen first."""
        if "_watched" in self.__dict__:
            self._changed()
        super()._apply(fn, recurse)
        if not self.__dict__.get("_as_written") and "_original" in self._modules:
            self._seal()
        return self

    def __setstate__(self, state: dict) -> None:
        """A copy's (``copy.deepcopy``, ``torch.load``) identities are its own: sealed again, unless it ran as written."""
        super().__setstate__(state)
        if not self.__dict__.get("_as_written") and "_original" in self._modules:
            self._seal()

    @property
    def _as_written(self) -> bool:
        """Whether the original runs every call (its attributes were changed from outside)."""
        return bool(self.__dict__.get("_as_written", False))


_DISPATCH_STATE = frozenset({"_original", "_forms", "_guards", "_signatures", "_as_called", "_sealed", "_watched",
                             "_as_written"})
MODULE_STATE = frozenset(vars(nn.Module())) | {"forward"}  # nn.Module's bookkeeping, and a forward a tool wraps


_PLAIN = (int, float, bool, str, type(None))


def _fingerprint(modules: list[nn.Module]) -> tuple:
    """The plain attributes of ``modules``, each as its value where it is a number, a string or None, else
    as its identity, the identities of their children, parameters and buffers, and their hooks: what a parent's
    write or a method's changes (``self.gain = g``, ``blk.conv = nn.Conv2d(...)``, ``blk.conv.weight =
    nn.Parameter(w)``, a hook registered on ``blk.conv``: a replaced weight the fused form folded before, a child
    replaced by one of equal settings, and a hook that changes a child's output went unseen; reviews).  It runs
    before every call of a dispatcher, so it reads each dict once and sorts nothing (an attribute deleted and set
    again reads as a change)."""
    return tuple((tuple([(k, v if type(v) in _PLAIN else id(v)) for k, v in vars(m).items() if k not in MODULE_STATE]),
                  tuple(map(id, m._modules.values())), tuple(map(id, m._parameters.values())),
                  tuple(map(id, m._buffers.values())), tuple(m._forward_pre_hooks), tuple(m._forward_hooks))
                 for m in modules)


class CallDispatch(Dispatch):
    """A part fused once per :class:`Signature`, beside a copy of the original.

    A call of one of ``signatures`` whose tensors pass every check of its fused form (its number of axes, its
    shapes where fused at fixed shapes, a test of sizes taken as at the example) runs that form on its tensors, or on the call as made where ``as_called`` says so (a form kept
    whole, its children fused); any other call runs the original as written.
    """

    def __init__(self, original: nn.Module, signatures: list[Signature], fused: list[nn.Module], guards: list[list],
                 as_called: list[bool]) -> None:
        super().__init__()
        self._original = original
        self._forms = nn.ModuleList(fused)
        self._signatures, self._guards, self._as_called = signatures, guards, as_called
        self._seal()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._changed():
            for signature, fused, guards, as_called in zip(self._signatures, self._forms, self._guards, self._as_called):
                tensors = signature.tensors(args, kwargs)
                if tensors is not None and all(g.fits(tensors, fused) for g in guards):
                    return fused(*args, **kwargs) if as_called else fused(*tensors)
        return self._run_original(*args, **kwargs)

    def extra_repr(self) -> str:
        return "fused for the calls " + ", ".join(map(repr, self._signatures))
