"""What a snapshot of state compares: :func:`attribute_key` of one value, and the limits it follows.

A snapshot is taken before a run and compared after it.  The watch on a model's own state
(:mod:`~repalgebra.frontend.state`), the watch on its code's module-level data
(:mod:`~repalgebra.frontend.module_globals`) and the check that ``fuse`` leaves the user's model as it found it
(:mod:`~repalgebra.untouched`) all see a value the same way: a tensor by identity, version counter and (small ones)
values (larger buffers by their storage and a checksum), a numpy array by its bytes (or checksum), a scalar by
value, containers and plain objects (with a ``__dict__`` or ``__slots__``) by what they hold, :data:`DEPTH` levels
deep.  This module imports nothing of the front end, so each of them can import it.
"""

from __future__ import annotations

import array
import collections
import itertools
import types
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from repalgebra.draws import held_generator_state
from repalgebra.module_copy import _filled

__all__ = ["COPIED", "DEPTH", "ITEMS", "MISSING", "SCALARS", "attribute_key", "changed_names", "equal_values", "holds_data",
           "plain_object", "same_key"]

SCALARS = (bool, int, float, complex, str, type(None))
COPIED = 4096  # tensors up to this many elements are compared by value too (statistics, observers, counters)
DEPTH = 3  # levels of containers and plain objects a snapshot follows
ITEMS = 256  # items of one container it compares one by one
MISSING = object()  # a name a snapshot does not hold
# Libraries whose objects' attributes are their machinery, not the model's data: not followed into
_LIBRARIES = ("torch", "builtins", "numpy", "typing", "functools", "collections")


def attribute_key(value: Any, depth: int = 0) -> Any:
    """What a call could change of one attribute: a tensor (with its version counter: an in-place write changes it),
    a Python scalar's value, and what lists, tuples, dicts, sets and plain objects hold (``self.stats["n"] += 1``,
    ``self.schedule.step += 1``), followed :data:`DEPTH` levels deep and up to :data:`ITEMS` items each; beyond
    that a container's type and length, an object's identity.  Modules are not followed: their own state is theirs."""
    # (tensors and scalars first: most of a model's entries, and neither is a generator or a function)
    if isinstance(value, torch.Tensor):
        small = value.numel() <= COPIED and not value.is_meta
        version = None if value.is_inference() else value._version  # made under inference_mode: no counter to read
        if small:
            return _Tensor(value, version, value.detach().clone())
        return _Tensor(value, version, None, None if isinstance(value, nn.Parameter) else _checksum(value))
    if isinstance(value, np.ndarray):  # (a call counter: ``self.calls += 1`` writes into it; review R10)
        return ("array", id(value), value.dtype.str, value.shape, _array_key(value, depth))
    if isinstance(value, (bytearray, array.array)):  # (their bytes: a counter in one is written in place; R11)
        return ("buffer", id(value), _bytes_key(bytes(value)))
    if isinstance(value, itertools.count):  # (its next number shows only in its repr: ``count(5)``; R11)
        return ("count", id(value), repr(value))
    if isinstance(value, SCALARS):
        return ("value", "nan" if value != value else value)  # a size recomputed to the same value is no change
    if (drawn := held_generator_state(value)) is not None:
        return ("generator", drawn)  # (one the model holds draws when a call advances it: self.rng = random.Random(0))
    if isinstance(value, types.FunctionType) and (value.__closure__ or value.__defaults__) and depth < DEPTH:
        # What a function holds (a generator it draws from, a call counter in a default): a call may change it too
        held = [c.cell_contents for c in value.__closure__ or () if _filled(c)] + list(value.__defaults__ or ())
        return ("function", id(value), tuple(attribute_key(h, depth + 1) for h in held))
    deeper = depth < DEPTH
    if isinstance(value, (list, tuple, dict, set, frozenset, collections.deque)):
        if not deeper or len(value) > ITEMS:
            return ("container", type(value).__name__, len(value))
        if isinstance(value, dict):
            return ("dict", type(value).__name__, tuple((attribute_key(k, DEPTH), attribute_key(v, depth + 1)) for k, v in value.items()))
        if isinstance(value, (set, frozenset)):
            return ("set", type(value).__name__, frozenset(attribute_key(v, DEPTH) for v in value if isinstance(v, SCALARS)), len(value))
        return ("items", type(value).__name__, tuple(attribute_key(v, depth + 1) for v in value))
    if deeper and plain_object(value):
        return ("object", id(value), tuple(sorted((k, attribute_key(v, depth + 1)) for k, v in vars(value).items() if not k.startswith("__"))))
    if deeper and (slots := _slots(value)) is not None:  # (``@dataclass(slots=True)``: no ``__dict__``; review R10)
        return ("object", id(value), tuple(sorted((k, attribute_key(v, depth + 1)) for k, v in slots.items())))
    return ("object", id(value))


def _array_key(value: np.ndarray, depth: int) -> Any:
    """What a numpy array holds: its bytes (a large one's sum where it is numeric, else a hash of its bytes), or for
    an array of objects (tensors, say), each item's key: its bytes are the items' addresses."""
    if value.dtype.hasobject:
        if value.size > ITEMS or depth >= DEPTH:
            return ("objects", value.size)
        return tuple(attribute_key(v, depth + 1) for v in value.flat)
    if value.nbytes > 8 * COPIED and value.dtype.kind in "biufc":
        return value.ctypes.data, str(value.sum(dtype=np.complex128))
    return _bytes_key(value.tobytes())


def _bytes_key(data: bytes) -> Any:
    """``data`` itself where it is small, else its hash (a snapshot holds every key until it is compared)."""
    return data if len(data) <= 8 * COPIED else hash(data)


def _checksum(t: torch.Tensor) -> tuple | None:
    """A buffer too large to copy at every snapshot (:data:`COPIED`), as its storage and the sum of its values: a
    write through ``.data`` bumps no version counter (a streaming conv's ``self.cache.data = x[..., -k:]``, a
    memory's ``self.mem.data[:, 0] += 1``: fused as constants; review R10).  Not a parameter's: its weights are
    the model's, which a forward rewriting through ``.data`` would be no model to fuse (and each snapshot summing
    every weight would cost a pass over the model)."""
    if t.is_meta or t.layout is not torch.strided or t.is_quantized or t.is_nested or type(t) is not torch.Tensor:
        return None  # (a quantized buffer has no sum: its capture "did not run", and every fold was lost; review R11)
    data = t.detach()
    total = torch.view_as_real(data).sum(dtype=torch.float64) if data.is_complex() else data.sum(
        dtype=torch.float64 if data.is_floating_point() else torch.int64)
    return data.data_ptr(), str(total.item())  # (str: a NaN sum equals itself)


def _slots(value: Any) -> dict[str, Any] | None:
    """What an instance of a Python class with ``__slots__`` and no ``__dict__`` holds, by name; None for others."""
    cls = type(value)
    if (hasattr(value, "__dict__") or callable(value) or isinstance(value, (nn.Module, type, types.ModuleType))
            or cls.__module__.startswith(_LIBRARIES)):
        return None
    names: list[str] = []
    for c in cls.__mro__:
        declared = c.__dict__.get("__slots__", ())
        names += [declared] if isinstance(declared, str) else [n for n in declared if n != "__weakref__"]
    return {n: getattr(value, n, MISSING) for n in names} if names else None


def holds_data(value: Any) -> bool:
    """An instance with a ``__dict__`` of its own data: not a module, class, Python module or function."""
    return hasattr(value, "__dict__") and not isinstance(value, (nn.Module, type, types.ModuleType)) and not callable(value)


def plain_object(value: Any) -> bool:
    """An instance of a Python class that :func:`holds_data`, not of a library whose objects' attributes are its
    machinery (torch's, numpy's, the standard library's)."""
    return holds_data(value) and not type(value).__module__.startswith(_LIBRARIES)


def same_key(a: Any, b: Any) -> bool:
    """Two :func:`attribute_key` results say the same state (tensors by :meth:`_Tensor.same`, the rest by value):
    tuples compare item by item in C, calling Python for their tensors only (each check's run compares two
    snapshots of the model; FastViT's 2,000 entries took 15 ms, item by item in Python)."""
    return bool(a == b)


@dataclass(frozen=True, eq=False)
class _Tensor:
    t: torch.Tensor
    version: int
    copy: torch.Tensor | None = None  # the values, for a small tensor: some fused ops write without a version bump
    checksum: tuple | None = None  # a larger buffer's storage and sum (:func:`_checksum`)

    def same(self, other: Any) -> bool:
        """Unchanged: the same tensor not written since, or one rebound to an equal value (``weight_norm``'s hook
        recomputes ``weight`` before every call)."""
        if not isinstance(other, _Tensor):
            return False
        if self.t is other.t:
            # torch.ao's fused fake-quant updates its observer's min/max in place without bumping the version
            return (self.version == other.version and (self.copy is None or equal_values(self.copy, other.t))
                    and self.checksum == other.checksum)
        return self.t.shape == other.t.shape and self.t.dtype == other.t.dtype and equal_values(self.t, other.t)

    __eq__ = same  # (so tuples of keys holding tensors compare with ``==``: :func:`same_key`)
    __hash__ = object.__hash__


def equal_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, a NaN equal to a NaN (a weight that holds one is not changed by a call).  Sparse tensors (pygcn's
    adjacency held as a buffer) have no ``torch.equal``: their coalesced indices and values are compared."""
    if a.layout is not torch.strided or b.layout is not torch.strided:
        return a.layout == b.layout and a.shape == b.shape and _equal_sparse(a, b)
    if torch.equal(a, b):
        return True
    return a.shape == b.shape and (a.is_floating_point() or a.is_complex()) and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _equal_sparse(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two sparse tensors of one layout and shape with the same entries (an explicit zero stored in one only counts
    as a difference: the state watch then says changed, which keeps a part whole rather than fuse it wrong)."""
    a, b = (t.to_sparse_coo().coalesce() if t.layout is not torch.sparse_coo else t.coalesce() for t in (a, b))
    return torch.equal(a.indices(), b.indices()) and equal_values(a.values(), b.values())


def changed_names(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The names whose entries differ between two snapshots (one missing from either counts)."""
    out = []
    for name in before.keys() | after.keys():
        a, b = before.get(name, MISSING), after.get(name, MISSING)
        if not same_key(a, b):
            out.append(name)
    return out
