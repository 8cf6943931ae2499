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
such function of the copy cells that hold the copies of what the model's own objects were (:class:`_Rebinding`),
and a weak reference to one of them (``self._b = weakref.ref(self.b)``, which ``copy.deepcopy`` keeps as it is) the
copy's object.
"""

from __future__ import annotations

import copy
import functools
import os
import sys
import sysconfig
import types
import weakref
from collections import OrderedDict
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from repalgebra.draws import held_generator_state

M = TypeVar("M", bound=nn.Module)
MODULE_INTERNALS = frozenset(vars(nn.Module()))  # nn.Module's bookkeeping: its parameters, buffers, children, hooks


def copy_module(model: M, memo: dict[int, Any] | None = None) -> M:
    """``copy.deepcopy(model)``, with tensors held as plain attributes that are not autograd leaves copied detached
    (also in a dict, list or tuple attribute: timm's ``attention_bias_cache[str(device)]``, filled by a call with
    autograd on).

    The copy shares no module, parameter, buffer or tensor storage with ``model``: ``fuse`` sets its copies to eval
    mode, casts them to float64 and replaces their children, and through a shared part it did so to the user's model
    (a ``__deepcopy__`` returning ``self``, or one sharing a frozen backbone's tensors with every copy; found by a
    probe).  Where ``copy.deepcopy`` shares one, the modules whose class writes its own ``__deepcopy__`` are copied
    as ``copy.deepcopy`` copies any object (``__reduce_ex__``); where that still shares one, a TypeError names it.
    So is, always, a module that has a ``__deepcopy__`` only through its ``__getattr__`` (:func:`_delegated_deepcopy`).

    ``memo``: one shared by the copies of several modules of one model (a back end's carried parts), updated, so
    that what they share (a plain tensor both hold) their copies share too."""
    given = memo if memo is not None else {}
    copied, new = _deepcopy(model, bypassed=False, memo=dict(given))
    if _shared(model, copied) is not None:
        copied, new = _deepcopy(model, bypassed=True, memo=dict(given))
        if (shared := _shared(model, copied)) is not None:
            raise TypeError(f"cannot copy {type(model).__name__}: {shared}, and fuse must not change the model")
    given.update(new)
    rebinding = _Rebinding(new)
    for m in copied.modules():
        for name, v in list(vars(m).items()):
            if name not in ("_parameters", "_buffers", "_modules") and (new := rebinding.value(v)) is not v:
                vars(m)[name] = new
    return copied


def _deepcopy(model: M, bypassed: bool, memo: dict[int, Any]) -> tuple[M, dict[int, Any]]:
    """``copy.deepcopy(model, memo)`` and its memo (see :func:`copy_module`); ``bypassed``: the modules whose class
    writes its own ``__deepcopy__`` copied through ``__reduce_ex__`` instead."""
    held: dict[int, list[torch.Tensor]] = {}  # the parameters and buffers by their storage
    for m in model.modules():
        for t in (*m._parameters.values(), *m._buffers.values()):
            address = None if t is None else storage_address(t)
            if address is not None and not any(t is u for u in held.get(address, [])):
                held.setdefault(address, []).append(t)
    for m in model.modules():
        for v in _non_leaves([x for k, x in vars(m).items() if k not in MODULE_INTERNALS], held):
            base = _viewed(v, held)
            if base is not None:
                # A view of a parameter or buffer (an EMA's ``t.view(-1)``, written in place): the same view of its
                # copy, not a copy of its values (through one, the copy's writes never reached its parameters).
                copied = memo[id(base)] if id(base) in memo else copy.deepcopy(base, memo)
                memo[id(v)] = copied.detach().as_strided(v.size(), v.stride(), v.storage_offset() - base.storage_offset())
            elif not v.is_leaf:
                memo[id(v)] = v.detach().clone()
    try:
        for m in reversed(list(model.modules())):  # (a child before its parent copies it)
            if ((bypassed and _own_deepcopy(m)) or _delegated_deepcopy(m)) and id(m) not in memo:
                copy._reconstruct(m, memo, *m.__reduce_ex__(4))  # (which enters the copy in memo)
        copied = copy.deepcopy(model, memo)
    except Exception as e:
        raise TypeError(f"cannot copy {type(model).__name__}: {_uncopyable(model) or ''}{e}") from e
    return copied, memo


def _own_deepcopy(m: nn.Module) -> bool:
    """Whether ``m``'s class writes its own ``__deepcopy__`` (torch's own, a GraphModule's or a ScriptModule's,
    copy)."""
    method = getattr(type(m), "__deepcopy__", None)
    return method is not None and not in_packages(getattr(method, "__module__", None), ("torch",))


def _delegated_deepcopy(m: nn.Module) -> bool:
    """Whether ``copy.deepcopy`` would find a ``__deepcopy__`` on ``m`` that its class does not have: a wrapper whose
    ``__getattr__`` hands unknown names to the model it wraps (PEFT's ``PeftModel``, EMA and deployment wrappers)
    answers with its child's.  A fused child is a ``GraphModule``, whose ``__deepcopy__`` copied the child alone in
    the wrapper's place, and the wrapper's own forward was gone from the fused model (41.8 off; review R10)."""
    return getattr(type(m), "__deepcopy__", None) is None and getattr(m, "__deepcopy__", None) is not None


def not_the_models(module_name: str | None) -> bool:
    """Whether a function or class of the module ``module_name`` is not the model's code: torch's, ours, numpy's, or
    the standard library's.  A package of the model's own that bears a standard module's name (a research repo's
    top-level ``code/``, ``trace/`` or ``profile/``) is the model's: only a module loaded from the standard library's
    own directory is the library's (a decorator in ``code/utils.py`` had its wrapper trusted, and its reach into a
    child never read: 2.2e3 off; review R17a)."""
    if not module_name:  # (code exec'd in a namespace without __name__: detectron2's LazyConfig files; review R18a)
        return False
    top = module_name.partition(".")[0]
    if top in ("torch", "repalgebra", "numpy", "builtins"):
        return True
    return top in sys.stdlib_module_names and _in_the_standard_library(top)


@functools.lru_cache(maxsize=None)
def _in_the_standard_library(top: str) -> bool:
    """Whether the module ``top`` was loaded from the standard library (built in, or from its directory)."""
    module = sys.modules.get(top)
    path = getattr(module, "__file__", None)
    if module is None or path is None:
        return module is not None  # (built in: sys, itertools; not loaded: nothing of it runs)
    home = os.path.realpath(sysconfig.get_paths()["stdlib"])
    return os.path.realpath(path).startswith(home + os.sep)


def in_packages(module_name: str | None, packages: tuple[str, ...]) -> bool:
    """Whether a function's ``__module__`` is one of ``packages`` or inside one (``torch.fx.graph_module``); not a
    package whose name only begins so: ``torch_geometric``, ``torchvision``, ``torchaudio`` and ``torchmetrics`` are
    libraries of their own (a layer of one whose ``__setstate__`` puts back a default was taken for torch's, its
    attributes never compared, and fused 5.0 off; a review)."""
    name = module_name or ""
    return any(name == p or name.startswith(p + ".") for p in packages)


def _shared(model: nn.Module, copied: nn.Module) -> str | None:
    """What ``copied`` shares with ``model``, in words: a module, or a parameter or buffer (the same tensor, or one
    in the same storage); None where it shares none."""
    modules = {id(m): path for path, m in model.named_modules()}
    for path, m in copied.named_modules():
        if id(m) in modules:
            where = repr(modules[id(m)]) if modules[id(m)] else "the model"
            return (f"{where} ({type(m).__name__}) is not copied: its copy is the module itself (its __deepcopy__, or "
                    "its parent's, returns or shares it)")
    tensors = {id(t) for m in model.modules() for t in (*m._parameters.values(), *m._buffers.values()) if t is not None}
    storages = {storage_address(t) for m in model.modules()
                for t in (*m._parameters.values(), *m._buffers.values()) if t is not None} - {None}
    for path, m in copied.named_modules():
        for name, t in (*m._parameters.items(), *m._buffers.items()):
            if t is not None and (id(t) in tensors or storage_address(t) in storages):
                where = f"{path}.{name}" if path else name
                return (f"its copy shares the tensor {where!r} with it (a __deepcopy__ shares it), so a cast or a write "
                        "of the copy's would change the model's")
    return None


def storage_address(t: torch.Tensor) -> int | None:
    """The address of ``t``'s storage (shared by the views of one tensor), None where it has none to share."""
    try:
        return t.untyped_storage().data_ptr() if t.numel() and t.device.type != "meta" else None
    except (RuntimeError, NotImplementedError):  # (a tensor subclass without storage)
        return None


def plain_ties(model: nn.Module) -> set[str]:
    """The paths of the submodules of ``model`` that hold, themselves or through a descendant, a tensor as a plain
    attribute (in a dict, list or tuple too) in the storage of a tensor a module outside them holds (a parameter, a
    buffer or a plain attribute: ``self.__dict__["target"] = parent.shift``, or a view of it).

    A copy of such a part made on its own holds a tensor of its own, no longer the model's: a part kept whole that
    halves its ``target`` in place missed the parent's ``shift`` (0.5 off; review R6 finding 06).  ``fuse`` keeps such
    a part as the copy of its parent holds it."""
    holders: dict[int, set[str]] = {}  # storage -> the modules holding a tensor in it
    plain: dict[int, set[str]] = {}  # storage -> the modules holding a tensor in it as a plain attribute
    for path, m in model.named_modules():
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None and (address := storage_address(t)) is not None:
                holders.setdefault(address, set()).add(path)
        for t in _tensors([v for k, v in vars(m).items() if k not in MODULE_INTERNALS]):
            if (address := storage_address(t)) is not None:
                holders.setdefault(address, set()).add(path)
                plain.setdefault(address, set()).add(path)
    found = set()
    for address, paths in plain.items():
        for path in paths:
            parts = path.split(".") if path else []
            for above in (".".join(parts[:k]) for k in range(len(parts), 0, -1)):  # (the model itself holds all)
                if any(h != above and not h.startswith(above + ".") for h in holders[address]):
                    found.add(above)
    return found


def _tensors(values: list, depth: int = 3) -> list[torch.Tensor]:
    """The tensors among ``values`` and in their dicts, lists and tuples, ``depth`` levels deep."""
    found = []
    for v in values:
        if torch.is_tensor(v):
            found.append(v)
        elif depth > 0 and isinstance(v, (dict, list, tuple)):
            found += _tensors(list(v.values()) if isinstance(v, dict) else list(v), depth - 1)
    return found


def _viewed(v: torch.Tensor, held: dict[int, list[torch.Tensor]]) -> torch.Tensor | None:
    """The parameter or buffer ``v`` is a view of, where the same view of its copy holds the same elements: the only
    tensor in its storage, of ``v``'s dtype, dense (a copy packs it), and holding every element ``v`` reaches.
    None for any other (a review found a parameter with gaps, ``big[:, ::2]``, and two sharing one flat buffer,
    ``vector_to_parameters``, rebuilt from other elements)."""
    candidates = held.get(storage_address(v), [])
    if len(candidates) != 1 or candidates[0] is v:
        return None
    base = candidates[0]
    if base.dtype != v.dtype or not base.is_contiguous() or v.numel() == 0:
        return None
    first = v.storage_offset() - base.storage_offset()
    last = first + sum((n - 1) * st for n, st in zip(v.shape, v.stride()))
    within = first >= 0 and last < base.numel() and all(st >= 0 for st in v.stride())
    return base if within else None


def _non_leaves(values: list, held: dict[int, list[torch.Tensor]], depth: int = 3) -> list[torch.Tensor]:
    """The tensors among ``values`` that are not autograd leaves or share storage with one of ``held`` (the model's
    parameters and buffers, by storage) without being it, and those in their dicts, lists and tuples, ``depth``
    levels deep."""
    found = []
    for v in values:
        if torch.is_tensor(v) and (not v.is_leaf or any(u is not v for u in held.get(storage_address(v), []))):
            found.append(v)
        elif depth > 0 and isinstance(v, (dict, list, tuple)):
            found += _non_leaves(list(v.values()) if isinstance(v, dict) else list(v), held, depth - 1)
    return found


class _Rebinding:
    """The functions of one copy made again with cells that hold the copy's objects (``memo``: deepcopy's, the
    model's object by id to its copy).  Each cell is made again once, so two closures sharing one (a hook that sets
    ``nonlocal feat`` and the getter that reads it) still share it, and a closure that calls itself calls its new
    form.  Containers of the copy (a hook dict, a list of callbacks, a namespace's attributes) are changed in place,
    and only those: a container reached through what the copy shares with the user is the user's."""

    def __init__(self, memo: dict[int, Any]) -> None:
        self.memo = memo
        self.ours = {id(v) for v in memo.values()}  # the copy's objects
        self.done: dict[int, Any] = {}  # id of a function or container seen -> what it is in the copy
        self.cells: dict[int, types.CellType] = {}  # id of a cell -> its new cell

    def value(self, v: Any) -> Any:
        """``v`` as the copy holds it: itself where nothing in it changes."""
        if id(v) in self.done:
            return self.done[id(v)]
        self.done[id(v)] = v  # (a container that holds itself)
        if isinstance(v, types.FunctionType):
            new = _made_again(self, v)
        elif isinstance(v, types.MethodType):
            func = self.value(v.__func__)
            new = v if func is v.__func__ else types.MethodType(func, v.__self__)
        elif isinstance(v, types.BuiltinMethodType) and held_generator_state(v.__self__) is not None:
            new = getattr(_held(self, v.__self__), v.__name__)  # (self.draw = rng.random: deepcopy shares it)
        elif isinstance(v, functools.partial):
            func, args = self.value(v.func), tuple(_held(self, a) for a in v.args)
            keywords = {k: _held(self, a) for k, a in v.keywords.items()}
            same = func is v.func and all(a is b for a, b in zip(args, v.args)) and all(keywords[k] is v.keywords[k] for k in keywords)
            new = v if same else functools.partial(func, *args, **keywords)
        elif type(v) is weakref.ref:
            new = _reference_to_copy(self, v)
        elif type(v) is tuple:
            items = tuple(_held(self, x) for x in v)
            new = v if all(a is b for a, b in zip(items, v)) else items
        else:
            new = v
            container = v if isinstance(v, (dict, list)) else vars(v) if isinstance(v, types.SimpleNamespace) else None
            if id(v) not in self.ours:
                container = None
            for k in (range(len(container)) if isinstance(container, list) else list(container or ())):
                if (item := self.value(container[k])) is not container[k]:
                    container[k] = item
        self.done[id(v)] = new
        return new


def _reference_to_copy(rebinding: _Rebinding, ref: weakref.ref) -> weakref.ref:
    """``ref`` naming the copy of its referent, where that is the model's: ``copy.deepcopy`` keeps a weak reference as
    it is, and every copy fuse ran called the user's child through ``self._b = weakref.ref(self.b)`` (a train-mode
    model's statistics updated by ``fuse``, the fused model tied to the user's module; review R9)."""
    target = ref()
    copied = target if target is None else rebinding.memo.get(id(target), target)
    return ref if copied is target else weakref.ref(copied, ref.__callback__)


def _made_again(rebinding: _Rebinding, f: types.FunctionType) -> types.FunctionType:
    """``f`` with new cells (one per cell of ``f``, shared with every closure of the copy that shares it) holding
    what the copy holds (:func:`_held`), and its defaults so; ``f`` itself where it has neither."""
    if not (f.__closure__ or f.__defaults__ or f.__kwdefaults__):
        return f
    cells = tuple(rebinding.cells.setdefault(id(c), types.CellType()) for c in f.__closure__ or ())
    new = types.FunctionType(f.__code__, f.__globals__, f.__name__, None, cells or None)
    rebinding.done[id(f)] = new  # (before its cells are filled: a closure that calls itself)
    for old, cell in zip(f.__closure__ or (), cells):
        if _filled(old) and not _filled(cell):
            cell.cell_contents = _held(rebinding, old.cell_contents)
    new.__defaults__ = tuple(_held(rebinding, d) for d in f.__defaults__) if f.__defaults__ else None
    new.__kwdefaults__ = {k: _held(rebinding, d) for k, d in f.__kwdefaults__.items()} if f.__kwdefaults__ else None
    return functools.update_wrapper(new, f, assigned=("__module__", "__qualname__", "__doc__"), updated=("__dict__",))


def _held(rebinding: _Rebinding, v: Any) -> Any:
    """What a closure's cell (or a default, or an item of a tuple the copy holds) holding ``v`` holds in the copy:
    the copy of a model's object; a bound method of one bound to its copy; a hook's handle, for the copy's hooks; a
    function, partial or tuple made again
    around what it holds; a generator it draws from, copied, as ``copy.deepcopy`` copies one the model holds.  A
    list, dict or namespace is shared, as ``copy.deepcopy`` shares the function holding it (a feature collector's
    list receives the fused model's features), unless it holds functions made again: then it is a new one holding
    them (callbacks reached through a tuple: the user's list is left as it is).  Anything else (a logger, a lock)
    is shared."""
    if id(v) in rebinding.memo and rebinding.memo[id(v)] is not v:
        return rebinding.memo[id(v)]
    if id(v) in rebinding.ours:
        return v
    if isinstance(v, types.MethodType) and id(v.__self__) in rebinding.memo:
        return types.MethodType(rebinding.value(v.__func__), rebinding.memo[id(v.__self__)])
    if isinstance(v, (types.FunctionType, functools.partial, tuple, types.BuiltinMethodType, weakref.ref)):
        return rebinding.value(v)
    if isinstance(v, RemovableHandle) and id(v.hooks_dict_ref()) in rebinding.memo:
        return _handle_of_copy(v, rebinding.memo)
    if held_generator_state(v) is not None:
        try:
            return copy.deepcopy(v, rebinding.memo)
        except Exception:  # noqa: BLE001  (it does not copy: shared, as before)
            return v
    if isinstance(v, (list, dict, types.SimpleNamespace)):
        if id(v) in rebinding.done:
            return rebinding.done[id(v)]
        rebinding.done[id(v)] = v  # (a container that holds itself)
        items = vars(v) if isinstance(v, types.SimpleNamespace) else v
        keys = range(len(items)) if isinstance(items, list) else list(items)
        held = {k: _held(rebinding, items[k]) for k in keys}
        if all(held[k] is items[k] for k in keys):
            return v
        new = [held[k] for k in keys] if isinstance(v, list) else dict(held) if isinstance(v, dict) else types.SimpleNamespace(**held)
        rebinding.done[id(v)] = new
        return new
    return v


def _handle_of_copy(handle: RemovableHandle, memo: dict[int, Any]) -> RemovableHandle:
    """``handle`` for the copy's hooks: a one-shot hook removes itself through the handle its closure holds, and the
    user's handle removed the user's hook when the fused model ran its copy (found by a probe).  A dict of the
    user's that the copy does not copy is left out (a new empty one stands for it, which the handle holds: a dead
    weak reference makes ``copy.deepcopy`` of the handle fail)."""
    new = RemovableHandle.__new__(RemovableHandle)
    extra = tuple(memo.get(id(ref()), OrderedDict()) for ref in handle.extra_dict_ref or ())
    new.__setstate__((memo[id(handle.hooks_dict_ref())], handle.id, extra))
    new.__dict__[_REGISTRIES] = extra
    return new


_REGISTRIES = "_repalgebra_registries"  # hook registries held for the handles that point into them


def keep_registries(old: nn.Module, new: nn.Module) -> None:
    """Hold in ``new`` (``old``'s replacement, its fused form) the hook registries of ``old`` and its descendants
    that ``new`` does not hold itself.  A handle the model keeps (``self.h = self.body.register_
    forward_hook(f)``, removed or not) holds weak references into them: once ``old`` was gone, ``copy.deepcopy`` of
    a parent kept whole holding it raised TypeError, where the model copies (review R7, finding 10).  No module runs
    the hooks of a registry held so.  Where a module of ``new`` runs the same hooks (the same hook ids: a
    :class:`~repalgebra.hooked.HookedPart`, its registries copies of ``old``'s), it runs them from ``old``'s registries
    themselves: the parent's ``handle.remove()`` then removes them from the fused model too, and the hooks it runs are
    the parent's copies, bound to it (review R8: after ``remove_hooks()`` the fused model still ran the hook, 4.7 off)."""
    running: dict[tuple[str, tuple], list[nn.Module]] = {}  # (registry, hook ids) -> the modules of new holding it
    for m in new.modules():
        for name, registry in _registries_of(m).items():
            if registry:
                running.setdefault((name, tuple(registry)), []).append(m)
    for m in old.modules():
        own = _registries_of(m)
        same = {id(o): o for name, r in own.items() if r for o in running.get((name, tuple(r)), ())}
        for other in same.values():  # (hook ids are unique: the same ids are copies of the same hooks)
            for name, registry in own.items():
                mine = _registries_of(other).get(name)
                if mine is not None and list(mine) == list(registry):
                    other.__dict__[name] = registry  # (run from the registry the handles point into)
    held = {id(r) for r in _hook_registries(new)}
    gone = {id(r): r for r in _hook_registries(old) if id(r) not in held}
    if gone:
        new.__dict__.setdefault(_REGISTRIES, {}).update(gone)


def _registries_of(module: nn.Module) -> dict[str, dict]:
    """``module``'s own hook registries (``_forward_hooks``, ``_forward_hooks_with_kwargs``, ...) by name."""
    return {k: v for k, v in vars(module).items() if "hooks" in k and isinstance(v, dict)}


def _hook_registries(module: nn.Module) -> list[dict]:
    """The hook registries of ``module`` and its descendants."""
    return [v for m in module.modules() for v in _registries_of(m).values()]


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
    return in_eval(copied) if any(m.training for m in copied.modules()) else copied


def in_eval(model: M) -> M:
    """``model`` after ``model.eval()``: not what that returns (``nn.Module.eval`` returns what ``train`` returns, and
    an override without ``return self``, as OpenMMLab's backbones and timm's attention write it, gives None)."""
    model.eval()
    return model


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
