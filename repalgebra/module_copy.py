"""A deep copy of a user's model, also where ``copy.deepcopy`` refuses one.

The old hook-based ``torch.nn.utils.weight_norm`` (and ``spectral_norm``) keeps the conv's ``weight`` as a
plain attribute that its forward pre-hook recomputes from ``weight_g`` and ``weight_v`` before every call.
Computed with autograd on (when the hook is registered, or after a training step), it is a non-leaf tensor,
and ``copy.deepcopy`` raises "Only Tensors created explicitly by the user (graph leaves) support the deepcopy
protocol".  :func:`copy_module` copies such tensors detached: their values are the same, and the hook
recomputes them from the copied parameters anyway.

Where a copy still fails (a module holds a lock, a generator, or an object whose copy holds one, so that the model
copies once and its copy does not), the error names the attribute that does not copy.

``copy.deepcopy`` copies no function: a closure held by a module (a hook ``def hook(m, i, o): self.feats[name] = o``
written inside ``__init__``, a patched ``blk.forward = lambda x: orig(x) * s``, ``self.branch = lambda t:
self.bn(self.conv(t))``) stays the same function object in the copy, its cells holding the *original*'s modules.
The copy's hook then wrote into the user's dict while its forward read its own (stale features, 0.76 off), and a
patched forward ran the user's train-mode BatchNorms, updating their statistics.  :func:`copy_module` gives each
such function of the copy cells that hold the copies of what the model's own objects were (:func:`_rebound`).
"""

from __future__ import annotations

import copy
import functools
import types
from typing import Any, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def copy_module(model: M) -> M:
    """``copy.deepcopy(model)``, with tensors held as plain attributes that are not autograd leaves copied detached."""
    memo: dict[int, object] = {}
    for m in model.modules():
        for v in vars(m).values():
            if torch.is_tensor(v) and not v.is_leaf:
                memo[id(v)] = v.detach().clone()
    try:
        copied = copy.deepcopy(model, memo)
    except Exception as e:
        raise TypeError(f"cannot copy {type(model).__name__}: {_uncopyable(model) or ''}{e}") from e
    for m in copied.modules():
        for name, v in list(vars(m).items()):
            if name not in ("_parameters", "_buffers", "_modules") and (new := _rebound(v, memo, set())) is not v:
                vars(m)[name] = new
    return copied


def _rebound(v: Any, memo: dict[int, Any], seen: set[int]) -> Any:
    """``v`` with every function in it whose cells (or defaults) hold an object ``memo`` copied made again with the
    copy in their place; containers of the copy (a hook dict, a list of callbacks) are changed in place.  ``v``
    itself where nothing in it changes."""
    if id(v) in seen:
        return v
    seen.add(id(v))
    if isinstance(v, types.FunctionType):
        cells = tuple(types.CellType(_copied(c.cell_contents, memo, seen)) if _filled(c) else c for c in v.__closure__ or ())
        defaults = tuple(_copied(d, memo, seen) for d in v.__defaults__ or ()) or v.__defaults__
        if all(a is b for a, b in zip(cells, v.__closure__ or ())) and all(a is b for a, b in zip(defaults or (), v.__defaults__ or ())):
            return v
        new = types.FunctionType(v.__code__, v.__globals__, v.__name__, defaults, cells or None)
        return functools.update_wrapper(new, v, assigned=("__module__", "__qualname__", "__doc__", "__kwdefaults__"), updated=("__dict__",))
    if isinstance(v, types.MethodType):
        func = _rebound(v.__func__, memo, seen)
        return v if func is v.__func__ else types.MethodType(func, v.__self__)
    if isinstance(v, functools.partial):
        func = _rebound(v.func, memo, seen)
        return v if func is v.func else functools.partial(func, *v.args, **v.keywords)
    if isinstance(v, dict):
        for k, item in list(v.items()):
            if (new := _rebound(item, memo, seen)) is not item:
                v[k] = new
    elif isinstance(v, list):
        for k, item in enumerate(v):
            if (new := _rebound(item, memo, seen)) is not item:
                v[k] = new
    return v


def _copied(v: Any, memo: dict[int, Any], seen: set[int]) -> Any:
    """What a closure's cell holding ``v`` holds in the copy: the copy of a model's object, a bound method of the
    model's bound to its copy, a function made again by :func:`_rebound`; anything else is shared, as
    ``copy.deepcopy`` shares a function."""
    if id(v) in memo and memo[id(v)] is not v:
        return memo[id(v)]
    if isinstance(v, types.MethodType) and id(v.__self__) in memo:
        return types.MethodType(_rebound(v.__func__, memo, seen), memo[id(v.__self__)])
    return _rebound(v, memo, seen) if isinstance(v, (types.FunctionType, functools.partial)) else v


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a cell not yet filled (a name assigned after the closure was made)
        return False
    return True


def eval_copy(model: M) -> M:
    """A copy of ``model`` computing what it computes in eval mode: ``.eval()`` is called on the copy only where some
    module of it trains.

    ``eval()`` calls each module's ``train``, and a module that overrides it to cache what eval reads (EfficientViT's
    and TinyViT's attention bias ``self.ab``, gathered from its table) caches again: from parameters loaded since
    the model's own ``eval()``, where the model as given computes with its cache."""
    copied = copy_module(model)
    return copied.eval() if any(m.training for m in copied.modules()) else copied


def cast_floats(model: M, dtype: torch.dtype) -> M:
    """``model`` with its floating parameters and buffers cast to ``dtype``, in place, as ``model.to(dtype)`` casts
    them; a complex buffer (a RoPE ``freqs_cis``) keeps its dtype, where ``.to`` would drop its imaginary part."""
    return model._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)


def _uncopyable(model: nn.Module) -> str | None:
    """``"its attribute 'a.h' (Handle) does not copy: "`` for the first plain attribute of a module of ``model``
    that ``copy.deepcopy`` refuses, else None."""
    for path, m in model.named_modules():
        for name, v in vars(m).items():
            if name in ("_modules", "_parameters", "_buffers") or torch.is_tensor(v):
                continue
            try:
                copy.deepcopy(v)
            except Exception:  # noqa: BLE001
                where = f"{path}.{name}" if path else name
                return f"its attribute {where!r} ({type(v).__name__}) does not copy: "
    return None
