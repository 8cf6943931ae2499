"""Module-level data the model's code writes while it is captured: put back as it was, and the capture refused.

A capture runs ``forward``'s Python once, on stand-ins (fx's proxies, torch.export's fake tensors).  A forward
that stores into a module-level container (``STATS["input"] = torch.zeros(2)``, ``LOG.append(x.shape[0])``),
writes an attribute of a module-level object, or rebinds a global (``global CALLS; CALLS += 1``) makes that store
once, while captured, with a stand-in; the graph holds no store.  The fused model then never wrote the global,
and the user's dict held an fx ``Proxy`` after ``fuse`` (review R7, finding 08: statistics a first call caches at
module level and writes on every call).

:func:`globals_kept` takes what the namespaces of the model's code bind before the capture (the globals of the
functions its classes define, as the mode flags' stand-ins see them,
:func:`~repalgebra.frontend.mode_flags.code_namespaces`, torch's layers' too, and the attributes of the classes
defined there), puts back whatever the capture changed, and then raises :class:`GlobalWritten` naming it: ``fuse``
keeps that module whole, so it makes its stores as written, and fuses its children.  ``fuse`` and
``export_onnx`` also put back, as they end, what their own runs of the model wrote.  Every name counts when it is
bound anew, unbound or rebound; the data among them (tensors, Python scalars, containers, a ``deque`` or
``SimpleNamespace``, objects of classes the model's code defines) also when what it holds changes, followed as a
state snapshot follows a module's attributes (:func:`~repalgebra.frontend.state_keys.attribute_key`: three levels
deep).  Not watched: library objects (a logger caches its levels), dunder names (``__warningregistry__``), and
the globals of code in other modules (a helper in ``utils.py`` writing its own).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import types
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from repalgebra.frontend.mode_flags import code_namespaces
from repalgebra.frontend.state_keys import COPIED, DEPTH, ITEMS, SCALARS, attribute_key, holds_data, same_key

__all__ = ["GlobalWritten", "globals_kept"]

_MUTABLE = (list, dict, set, collections.deque, types.SimpleNamespace)  # containers (and a namespace) a write changes


class GlobalWritten(TypeError):
    """The model's code wrote module-level data while it was captured (put back as it was before the capture)."""


@dataclass(frozen=True, eq=False)
class _Snapshot:
    """What the namespaces of a model's code hold: each owner (a module's globals, or a class of the model's code)
    with every name it binds, the :func:`~repalgebra.frontend.state_keys.attribute_key` of its data, and a copy of what
    each mutable object among them holds (to put back).  Compared by identity: the blocks under way are removed by
    it, where field equality compared the held copies of tensors (an ambiguous truth value, nested blocks failed)."""

    owners: list[tuple[str, Any, dict[str, Any], dict[str, Any]]]  # (label, owner, bindings, keys of the data)
    classes: frozenset[str]
    held: list[tuple[Any, Any]]


_UNDER_WAY = threading.local()  # per thread: the snapshots of the fuse and export_onnx calls under way (outermost first)


@contextlib.contextmanager
def globals_kept(model: nn.Module, refuse: bool = True) -> Iterator[list[str]]:
    """Within the block, the module-level data of ``model``'s code may change: at its end each change is put back,
    the list yielded names them (``"models.stats.STATS"``), and, where the block ended normally and ``refuse`` (a
    capture), :class:`GlobalWritten` says so.  A capture first puts back the globals as each ``fuse`` or
    ``export_onnx`` under way (a block with ``refuse=False``) found them: fuse's own runs of the model (a first call
    that calibrates, ``CAL["shift"] = x.mean()``) left values that a later capture of a part read as constants and
    made no write of (5.2 off on every call; review R8)."""
    under_way = _UNDER_WAY.__dict__.setdefault("snapshots", [])
    if refuse:
        for outer in reversed(under_way):
            _put_back(outer, data_only=True)  # (what fuse itself stands in for a capture, a dtype property, stays)
    snapshot = _snapshot(code_namespaces(model))
    written: list[str] = []
    if not refuse:
        under_way.append(snapshot)
    try:
        yield written
    finally:  # (a block that raised: its writes put back, its error stands)
        if not refuse:
            under_way.remove(snapshot)
        written += _written(snapshot)
        if written:
            _put_back(snapshot)
    if written and refuse:
        shown = ", ".join(written[:3]) + (f" and {len(written) - 3} more" if len(written) > 3 else "")
        raise GlobalWritten(f"its forward writes the module-level {shown}: a capture makes that write once, on stand-ins, "
                            "and holds none, so the fused module would never make it (kept whole, it writes as written)")


def _snapshot(namespaces: list[dict[str, Any]]) -> _Snapshot:
    classes = frozenset(str(ns.get("__name__", "")) for ns in namespaces)
    owners: list[tuple[str, Any, dict[str, Any], dict[str, Any]]] = []
    for ns in namespaces:
        label = str(ns.get("__name__", "?"))
        owners.append((label, ns, _bindings(ns), {}))
        owners += [(f"{label}.{name}", cls, _bindings(vars(cls)), {}) for name, cls in ns.items()
                   if isinstance(cls, type) and cls.__module__ == label and not name.startswith("__")]
    held: list[tuple[Any, Any]] = []
    for _, _, bindings, keys in owners:
        for name, value in bindings.items():
            if _is_data(value, classes):
                keys[name] = attribute_key(value)
                _contents(value, 0, classes, held)
    return _Snapshot(owners, classes, held)


def _bindings(mapping: Any) -> dict[str, Any]:
    """The names a namespace or a class binds, dunders aside (a warning writes the module's ``__warningregistry__``)."""
    return {name: value for name, value in mapping.items() if not name.startswith("__")}


def _written(snapshot: _Snapshot) -> list[str]:
    """The names of ``snapshot`` bound anew, unbound or rebound since, or whose data changed."""
    written = []
    for label, owner, bindings, keys in snapshot.owners:
        now = _bindings(owner if isinstance(owner, dict) else vars(owner))
        written += [f"{label}.{name}" for name in sorted(bindings.keys() | now.keys())
                    if name not in bindings or name not in now or now[name] is not bindings[name]
                    or (name in keys and not same_key(keys[name], attribute_key(now[name])))]
    return written


def _is_data(value: Any, classes: frozenset[str]) -> bool:
    """A tensor, Python scalar, container, or object of a class defined in the model's code (``classes``: the names
    of its modules): a logger's or a library object's internals change on their own (a logger caches its levels)."""
    if isinstance(value, (torch.Tensor, *SCALARS, tuple, *_MUTABLE)):
        return True
    return holds_data(value) and type(value).__module__ in classes


def _contents(value: Any, depth: int, classes: frozenset[str], held: list[tuple[Any, Any]]) -> None:
    """Append to ``held`` each mutable object ``value`` holds (itself included),
    :data:`~repalgebra.frontend.state_keys.DEPTH` levels deep, with a copy of what it holds: a container's items, an
    object's attributes, a small tensor's values."""
    if isinstance(value, torch.Tensor):
        if value.numel() <= COPIED and value.layout is torch.strided and not value.is_meta:
            held.append((value, value.detach().clone()))
        return
    if depth > DEPTH or isinstance(value, (*SCALARS, nn.Module, type, types.ModuleType)):
        return
    if isinstance(value, (dict, set, collections.deque)):
        held.append((value, value.copy()))
        items = list(value.values()) if isinstance(value, dict) else list(value) if isinstance(value, collections.deque) else []
    elif isinstance(value, list):
        held.append((value, list(value)))
        items = list(value)
    elif isinstance(value, tuple):
        items = list(value)
    elif isinstance(value, types.SimpleNamespace) or (holds_data(value) and type(value).__module__ in classes):
        held.append((value, dict(vars(value))))
        items = list(vars(value).values())
    else:
        return
    if depth < DEPTH:  # (a container at the last level is put back, what it holds is not followed)
        for item in items[:ITEMS]:
            _contents(item, depth + 1, classes, held)


def _put_back(snapshot: _Snapshot, data_only: bool = False) -> None:
    """Bind each name of ``snapshot`` to its object again (removing those bound since), and put back what each
    mutable object held.  ``data_only``: names bound to no data, then and now (a function, a property), stay."""
    for _, owner, bindings, _ in snapshot.owners:
        now = _bindings(owner if isinstance(owner, dict) else vars(owner))
        for name in now.keys() - bindings.keys():
            if data_only and not _is_data(now[name], snapshot.classes):
                continue
            if isinstance(owner, dict):
                del owner[name]
            else:
                delattr(owner, name)
        for name, value in bindings.items():
            if data_only and not (_is_data(value, snapshot.classes) or _is_data(now.get(name), snapshot.classes)):
                continue
            if now.get(name, _MISSING) is not value:
                if isinstance(owner, dict):
                    owner[name] = value
                else:
                    setattr(owner, name, value)
    for obj, copied in reversed(snapshot.held):  # (inner objects first: each is put back whole)
        if isinstance(obj, torch.Tensor):
            if not torch.equal(obj, copied):
                with torch.inference_mode(obj.is_inference()), torch.no_grad():  # (a tensor made under inference_mode)
                    obj.copy_(copied)
        elif isinstance(obj, collections.deque):
            obj.clear()
            obj.extend(copied)
        elif isinstance(obj, (dict, set)):
            obj.clear()
            obj.update(copied)
        elif isinstance(obj, list):
            obj[:] = copied
        else:
            vars(obj).clear()
            vars(obj).update(copied)


_MISSING = object()
