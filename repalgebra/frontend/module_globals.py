"""Module-level data the model's code writes while it is captured: put back as it was, and the capture refused.

A capture runs ``forward``'s Python once, on stand-ins (fx's proxies, torch.export's fake tensors).  A forward
that stores into a module-level container (``STATS["input"] = torch.zeros(2)``, ``LOG.append(x.shape[0])``),
writes an attribute of a module-level object, or rebinds a global (``global CALLS; CALLS += 1``) makes that store
once, while captured, with a stand-in; the graph holds no store.  The fused model then never wrote the global,
and the user's dict held an fx ``Proxy`` after ``fuse`` (review R7, finding 08: statistics a first call caches at
module level and writes on every call).

:func:`globals_kept` takes what the namespaces of the model's code hold before the capture (the globals of the
functions its classes define, as the mode flags' stand-ins see them,
:func:`~repalgebra.frontend.mode_flags.code_namespaces`: torch's layers' too), puts back whatever the capture
changed, and then raises :class:`GlobalWritten` naming it: ``fuse`` keeps that module whole, so it makes its
stores as written, and fuses its children.  ``fuse`` and ``export_onnx`` also put back, as they end, what their
own runs of the model wrote.  Data is what is watched: tensors, Python scalars, containers and objects of classes
the model's code defines, followed as a state snapshot follows a module's attributes
(:func:`~repalgebra.frontend.state.attribute_key`: three levels deep); not modules, classes or functions.  Code
of other modules (a helper in ``utils.py`` writing its own globals) is not watched.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Iterator

import torch
from torch import nn

from repalgebra.frontend.mode_flags import code_namespaces

__all__ = ["GlobalWritten", "globals_kept"]

_SCALARS = (bool, int, float, complex, str, type(None))
_DEPTH, _ITEMS, _COPIED = 3, 256, 4096  # as a state snapshot follows them (levels, items per container, tensor elements)


class GlobalWritten(TypeError):
    """The model's code wrote module-level data while it was captured (put back as it was before the capture)."""


@contextlib.contextmanager
def globals_kept(model: nn.Module, refuse: bool = True) -> Iterator[list[str]]:
    """Within the block (a capture of ``model``), the module-level data of ``model``'s code may change: at its end
    each change is put back, the list yielded names them (``"models.stats.STATS"``), and, where the block
    ended normally and ``refuse``, :class:`GlobalWritten` says so."""
    from repalgebra.frontend.state import _same, attribute_key  # (state imports verify, which imports the tracer)

    namespaces = code_namespaces(model)
    classes = {str(ns.get("__name__", "")) for ns in namespaces}
    before = [(ns, _data(ns, classes)) for ns in namespaces]
    keys = [{name: attribute_key(value) for name, value in data.items()} for _, data in before]
    held: list[tuple[Any, Any]] = []
    for _, data in before:
        for value in data.values():
            _contents(value, 0, classes, held)
    written: list[str] = []
    try:
        yield written
    finally:  # (a block that raised: its writes put back, its error stands)
        for (ns, data), key in zip(before, keys):
            now = _data(ns, classes)
            written += [f"{ns.get('__name__', '?')}.{name}" for name in sorted(data.keys() | now.keys())
                        if name not in data or name not in now or not _same(key[name], attribute_key(now[name]))]
        if written:
            _put_back(before, held, classes)
    if written and refuse:
        shown = ", ".join(written[:3]) + (f" and {len(written) - 3} more" if len(written) > 3 else "")
        raise GlobalWritten(f"its forward writes the module-level {shown}: a capture makes that write once, on stand-ins, "
                            "and holds none, so the fused module would never make it (kept whole, it writes as written)")


def _data(namespace: dict[str, Any], classes: set[str]) -> dict[str, Any]:
    """The entries of ``namespace`` that are data a forward may write (not dunders, modules, classes or functions)."""
    return {name: value for name, value in namespace.items() if not name.startswith("__") and _is_data(value, classes)}


def _is_data(value: Any, classes: set[str]) -> bool:
    """A tensor, Python scalar, container, or object of a class defined in the model's code (``classes``: the names
    of its modules): a logger's or a library object's internals change on their own (a logger caches its levels)."""
    if isinstance(value, (torch.Tensor, *_SCALARS, list, tuple, dict, set)):
        return True
    return _plain(value) and type(value).__module__ in classes


def _plain(value: Any) -> bool:
    """An instance with a ``__dict__`` of its own data (not a module, class or function)."""
    return hasattr(value, "__dict__") and not isinstance(value, (nn.Module, type, types.ModuleType)) and not callable(value)


def _contents(value: Any, depth: int, classes: set[str], held: list[tuple[Any, Any]]) -> None:
    """Append to ``held`` each mutable object ``value`` holds (itself included), :data:`_DEPTH` levels deep, with a
    copy of what it holds: a container's items, an object's attributes, a small tensor's values."""
    if isinstance(value, torch.Tensor):
        if value.numel() <= _COPIED and value.layout is torch.strided and not value.is_meta:
            held.append((value, value.detach().clone()))
        return
    if depth >= _DEPTH or isinstance(value, (*_SCALARS, nn.Module, type, types.ModuleType)):
        return
    if isinstance(value, dict):
        held.append((value, dict(value)))
        items = list(value.values())
    elif isinstance(value, list):
        held.append((value, list(value)))
        items = list(value)
    elif isinstance(value, set):
        held.append((value, set(value)))
        items = []
    elif isinstance(value, tuple):
        items = list(value)
    elif _plain(value) and type(value).__module__ in classes:
        held.append((value, dict(vars(value))))
        items = list(vars(value).values())
    else:
        return
    for item in items[:_ITEMS]:
        _contents(item, depth + 1, classes, held)


def _put_back(before: list[tuple[dict[str, Any], dict[str, Any]]], held: list[tuple[Any, Any]], classes: set[str]) -> None:
    """Bind each namespace's data names to their values before the capture (removing those it added), and put back
    what each mutable object held."""
    for ns, data in before:
        for name in set(_data(ns, classes)) - set(data):
            del ns[name]
        ns.update(data)
    with torch.no_grad():
        for obj, copied in reversed(held):  # (inner objects first: each is put back whole)
            if isinstance(obj, torch.Tensor):
                if not torch.equal(obj, copied):
                    obj.copy_(copied)
            elif isinstance(obj, (dict, set)):
                obj.clear()
                obj.update(copied)
            elif isinstance(obj, list):
                obj[:] = copied
            else:
                vars(obj).clear()
                vars(obj).update(copied)
