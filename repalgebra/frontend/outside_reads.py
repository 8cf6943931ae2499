"""Which submodules a module's own code reads the weights of, outside their calls.

A module kept whole runs its ``forward`` as written, and ``fuse`` swaps each child it calls for the child's fused
form.  That holds only while the module uses a child by calling it.  MoCo's momentum update reads both encoders'
weights in the parent's forward (``for pb, pm in zip(self.base.parameters(), self.momentum.parameters()):
pm.data = pm.data * m + pb.data * (1 - m)``), and a RealNVP BatchNorm flow layer's log-determinant reads
``self.bn.running_var``.  Swapped in, the fused children hand that code their folded weights: the update averages
BN-folded convs against each other and drifts further from the model with every call (a probe measured 24% after
ten calls).  A check at the example cannot be trusted to see it: in float32 the first call differed by less than
its tolerance.

:func:`read_outside` runs the module once and notes every parameter or buffer that an op reads by value while no
module holding it is running: the submodules holding it and those of their ancestors below the module that are
not running either are read from outside, and are not swapped (an ancestor that is running reads its own child:
swapped whole, its fused form no longer reads it).  Reads of metadata only (``.dtype``, ``.shape``, ``.device``: HF's
``x.to(self.patch_embedding.weight.dtype)``; a factory's or a cast's template, ``w.new_zeros(n)``, ``x.type_as(w)``)
do not count: they do not see the weights' values.
"""

from __future__ import annotations

import builtins
import contextlib
import dis
import functools
import inspect
import sys
import types
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.overrides import TorchFunctionMode

from repalgebra.frontend.capture import Call
from repalgebra.frontend.returned_mapping import mapping_returned, method_loaded
from repalgebra.frontend.structured import VIEWED
from repalgebra.module_copy import in_packages, not_the_models, storage_address

__all__ = ["read_outside", "reached_through"]

# Tensor attributes and methods that read no values: what a swapped child's fused weights give alike
_METADATA = frozenset({
    "dtype", "shape", "device", "requires_grad", "is_cuda", "ndim", "layout", "is_sparse", "is_quantized", "is_meta",
    "names", "grad_fn", "is_leaf", "size", "dim", "numel", "nelement", "ndimension", "is_floating_point",
    "is_complex", "element_size", "get_device", "stride", "is_contiguous", "data_ptr", "__len__", "storage_offset",
})


def read_outside(module: nn.Module, calls: Iterable[Call], paths: Iterable[str]) -> set[str]:
    """The paths among ``paths`` (submodules of ``module``) whose parameters or buffers an op reads by value, in
    ``module`` making ``calls``, while neither they nor a module holding the same tensor are running.

    ``module`` runs without gradients, with them and under ``torch.inference_mode`` (a mode it does not run in is
    skipped); pass a copy.  Hooks on every submodule track which are running: a pre-hook
    put first (before the user's own, which may read the weights too) and a forward hook that runs even where the
    call raises."""
    paths = set(paths)
    owners: dict[Any, list[str]] = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        for t in (*sub._parameters.values(), *sub._buffers.values()):
            if t is not None:
                owners.setdefault(_key(t), []).append(path)
    running: list[str] = []
    handles = []
    for path, sub in module.named_modules(remove_duplicate=False):
        if path and not isinstance(sub, torch.jit.ScriptModule):
            handles.append(sub.register_forward_pre_hook(lambda *_, p=path: running.append(p), prepend=True))
            handles.append(sub.register_forward_hook(lambda *_, p=path: running.remove(p), always_call=True))
    reads = _Reads(owners, running)
    calls = list(calls)
    try:
        for mode in _MODES:
            try:
                with mode(), _cond_in_eager(), reads:
                    for call in calls:  # (on copies of its tensors: a forward may write into its input)
                        args, kwargs = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, (call.args, call.kwargs))
                        module(*args, **kwargs)
            except Exception:
                if mode is torch.no_grad:
                    raise
                running.clear()  # (it does not run so: nothing more to see there; the hooks' bookkeeping starts anew)
    finally:
        for h in handles:
            h.remove()
    return paths & reads.found


@contextlib.contextmanager
def _cond_in_eager() -> Iterator[None]:
    """``torch.cond`` called as eager code runs its branch as Python would, not through ``torch.compile``.

    Outside a compile ``torch.cond(pred, true_fn, false_fn, operands)`` compiles its op (``_hop_compile_and_call``),
    which dynamo refuses under an active function mode (``_Reads``): the module kept whole did not run again, and
    none of its children was fused (a probe: 7 of 7 BatchNorms left).  Its eager meaning is the branch ``pred``
    picks, called on the operands; run so, the branch's ops pass through ``_Reads`` as any other code's do."""
    from torch._higher_order_ops import utils

    compiled = utils._hop_compile_and_call

    def call(fn: Any, args: tuple) -> Any:
        if getattr(fn, "__name__", "") != "_cond_op_wrapper":  # (another higher-order op: as torch runs it)
            return compiled(fn, args)
        pred, true_fn, false_fn, operands = args
        return (true_fn if pred else false_fn)(*operands)

    utils._hop_compile_and_call = call
    try:
        yield
    finally:
        utils._hop_compile_and_call = compiled


# The modes a module kept whole runs in: ``fuse``'s checks run it without gradients, a training script calls the fused
# model with them on, a deploy script under inference mode.  A forward that reads its child's weights only when
# ``torch.is_grad_enabled()`` (it is kept whole for asking) is seen reading them in the mode it asks for.
_MODES = (torch.no_grad, torch.enable_grad, torch.inference_mode)


def _key(t: torch.Tensor) -> Any:
    """What a parameter or buffer and every view of it share (an EMA's ``t.view(-1)``, kept at ``__init__``): its
    storage; a tensor with none (empty, meta, or of a tensor subclass) by itself."""
    address = storage_address(t)
    return id(t) if address is None else ("storage", address)


def _values_read(func: Any, args: tuple, kwargs: dict) -> list[Any]:
    """The arguments of a torch function (or a tensor property's getter or setter) whose values it reads: none of
    ``x.dtype``; not the tensor a factory takes its dtype, device or shape from (``w.new_zeros(n)``,
    ``torch.zeros_like(bn.running_mean)``), nor the one a cast takes its dtype from (``x.type_as(w)``, ``x.to(w)``)."""
    name = getattr(func, "__name__", "")
    if name in ("__get__", "__set__"):  # a property: ``.data``, ``.dtype``
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    if name in _METADATA:
        return []
    if name.startswith("new_") or name.endswith("_like"):
        return [*args[1:], *kwargs.values()]
    if name in ("type_as", "to"):
        return args[:1]
    return [*args, *kwargs.values()]


def _self_and_ancestors(path: str) -> list[str]:
    """``"a.b.c"`` -> ``["a.b.c", "a.b", "a"]`` (the module itself, ``""``, is not among them)."""
    parts = path.split(".") if path else []
    return [".".join(parts[:k]) for k in range(len(parts), 0, -1)]


class _Reads(TorchFunctionMode):
    """Notes the owners of each parameter or buffer an op reads while none of them runs (``found``)."""

    def __init__(self, owners: dict[Any, list[str]], running: list[str]) -> None:
        super().__init__()
        self.owners, self.running, self.found = owners, running, set[str]()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        for t in pytree.tree_leaves(_values_read(func, args, kwargs or {})):
            held = self.owners.get(_key(t)) if isinstance(t, torch.Tensor) else None
            if held and not any(p in self.running for p in held):
                self.found.update(a for p in held for a in _self_and_ancestors(p) if a not in self.running)
        return func(*args, **(kwargs or {}))


def reached_through(module: nn.Module) -> set[str]:
    """The submodules of ``module`` (paths) whose code, ``module``'s own or a descendant's, reaches through them as
    written, on any branch: ``self.body.conv(y)`` and ``self.body[0]`` reach through ``body``;
    ``self.body.conv.weight`` and ``self.bn.running_var`` read ``body.conv``'s and ``bn``'s tensors too.

    :func:`read_outside` sees the branch its calls take only.  A parent kept whole for a branch on its input, or for
    asking ``torch.is_grad_enabled()``, may take another when called: it then read a swapped child's folded weights, or
    called the fused form's own ``conv`` (the folded kernel) where the model calls the conv alone (found by a review).
    A chain that ends in a tensor's metadata (``self.stem.conv.weight.dtype``) or a method of the child
    (``self.stem.parameters()``, left to :func:`read_outside`) does not count.  A chain through a local counts as
    from ``self`` (``body = self.body; body.conv(y)``; ``for blk in self.blocks: blk.attn.qkv(y)``: each block):
    ``body.conv`` was the fused form's folded kernel on the branch the example did not take (1.13 off; a review).
    A module the code hands on where its items are not followed (``map(lambda b: b.conv(x), self.blocks)``,
    ``getattr(self, f"layer{i}")``, ``self.named_modules()``: :func:`_handed_on`) reaches every module below it."""
    paths: dict[int, str] = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        paths.setdefault(id(sub), path)
    found: set[str] = set()
    for sub in {id(m): m for m in module.modules()}.values():
        for chain in _chains(type(sub)):
            found.update(paths[id(m)] for m in _through(sub, chain) if id(m) in paths)
        for owner, chains, _ in _held(sub):
            found.update(paths[id(m)] for c in chains for m in _through(owner, c) if id(m) in paths)
    return found - {""}


def names_reached(module: nn.Module) -> dict[int, set[str]]:
    """The names that the code of ``module`` and its descendants reads on a descendant, by the descendant's ``id``,
    where they are neither its children nor its tensors: a method or a plain attribute (``self.body.forward_features(x)``
    reads ``"forward_features"`` on ``body``).  A fused form has none of its original's methods: a parent kept whole
    that calls one on a branch the example does not take raised AttributeError where the model runs (found by a
    review).  A chain through an index the code computes, or a loop, reads the name on each child of the container
    (``for blk in self.blocks: blk.forward_features(x)``: an AttributeError where the model runs; review R5 finding 04)."""
    found: dict[int, set[str]] = {}
    for sub in {id(m): m for m in module.modules()}.values():
        for owner, whole in [*((sub, c) for c in _chains(type(sub))), *((o, c) for o, cs, _ in _held(sub) for c in cs)]:
            todo = [(owner, whole)]
            while todo:
                obj, chain = todo.pop()
                step = None
                for k, step in enumerate(chain):
                    if isinstance(step, _Method):
                        if step.name in vars(owner):
                            break  # (handed on: reached_through keeps every module below)
                        continue
                    if step is None and obj is not owner:  # each child (a loop's item, a computed index): the rest on each
                        todo += [(c, chain[k + 1:]) for c in obj._modules.values() if c is not None]
                        break
                    child = _child(obj, step)
                    if child is None:
                        break
                    obj = child
                else:
                    continue  # (children all the way: reached_through's)
                if obj is not owner and isinstance(step, str) and step not in obj._parameters and step not in obj._buffers:
                    found.setdefault(id(obj), set()).add(step)
    return found


def tests_classes(module: nn.Module) -> bool:
    """Whether the code a call of ``module`` runs (``forward`` and what it calls on ``self``, as :func:`_chains` reads
    it, comprehensions and closures in it too) asks an object's class: ``isinstance``, ``issubclass``, ``type(...)``
    or ``.__class__``.  A parent that dispatches on its children's classes (NeMo's ``if isinstance(layer,
    MaskedConv1d): x = layer(x, lens)``) answers otherwise for a fused form, which is a class of ours: its capture
    took the other branch and called the masked conv without its lengths (26% off where a batch is padded; found
    by a probe).  Also a class pattern (``case MaskedConv1d():``), ``_get_name()``, and the code of a base class
    reached by ``super()`` and of the model's module-level functions it calls (:func:`_run_functions`; review R6).
    A decorator's wrapper, and a property's setter, count only where their own reads may reach a module below
    (:func:`_may_reach_a_module`): Hugging Face's ``can_return_tuple`` asks ``isinstance(output, tuple)`` of what the
    method returned, ``deprecate_kwarg`` the module's own ``__class__``, and Lightning's ``trainer`` setter the value
    it is given; counted, every child of a part kept whole under them stayed unfused (reviews R17a, R18a).  Read once
    per class (the wrappers' and setters' reads, and the methods the instance holds, per module)."""
    cls = type(module)
    if cls not in _CLASS_TESTS:
        functions = _run_functions(cls)  # (reading the class finds its decorators' wrappers too)
        wrappers = _GUARDED.get(cls, {})
        _CLASS_TESTS[cls] = any(_asks_classes(f.__code__) for f in functions if f not in wrappers)
    bound = [f for _, _, read in _held(module) for f in read]  # (self.run = self._run_eager: its code too)
    return (_CLASS_TESTS[cls] or any(_asks_classes(f.__code__) for f in _helpers(bound))
            or any(_asks_classes(f.__code__) and any(_may_reach_a_module(module, c) for c in chains)
                   for f, chains in _GUARDED.get(cls, {}).items()))


def _may_reach_a_module(module: nn.Module, chain: tuple[Any, ...]) -> bool:
    """Whether ``chain`` (from ``module``) may give code a module below ``module``: all but a chain to a plain attribute
    of its own (``self.config.return_dict``, ``self.__class__``).  A child named, its children looped over
    (``self.children()``), a method of its class (which may return one), anything handed on or computed counts
    (a wrapper asking ``isinstance(self.head, ConvBN)`` was taken for asking none, 4.1e3 off; review R18a)."""
    if not chain:
        return False
    step = chain[0]
    if not isinstance(step, str) or step in _EVERY or step in _ITEMS or step in _TENSORS_OF or step == _ANY_METHOD:
        return True
    return _child(module, step) is not None or step in _functions(type(module)) or _delegated(module, step)


_CLASS_TESTS: "weakref.WeakKeyDictionary[type, bool]" = weakref.WeakKeyDictionary()
# (``_get_name``: nn.Module's name of a module's class, ``layer._get_name() == "MaskedConv1d"``)
_CLASS_NAMES = frozenset({"isinstance", "issubclass", "type", "__class__", "_get_name"})


def _asks_classes(code: types.CodeType) -> bool:
    """Whether ``code`` (or code nested in it) names a class test (:data:`_CLASS_NAMES`) or matches a class pattern
    (``case MaskedConv1d():``, a ``MATCH_CLASS``: no name of a test is loaded)."""
    return (not _CLASS_NAMES.isdisjoint(code.co_names) or any(op.opname == "MATCH_CLASS" for op in dis.get_instructions(code))
            or any(_asks_classes(c) for c in code.co_consts if isinstance(c, types.CodeType)))


def named_by_attributes(module: nn.Module) -> set[str]:
    """The submodules of ``module`` (paths) that a plain attribute of ``module`` or of a descendant names, in a
    dict, list, tuple or set too (``self.paths = {"main": self.a}``), or by a weak reference.  A fused form swapped
    in for such a child is not what the attribute holds: the kept parent ran the attribute's copy, which
    ``fused.double()`` did not reach, and failed where the model runs (found by a review)."""
    paths: dict[int, str] = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        paths.setdefault(id(sub), path)
    found: set[str] = set()
    for sub in {id(m): m for m in module.modules()}.values():
        todo, seen = [v for k, v in vars(sub).items() if k not in _MODULE_STATE], set()
        while todo:
            value = todo.pop()
            if id(value) in seen:
                continue  # (a dict holding itself: self.cfg["self"] = self.cfg; review R7)
            seen.add(id(value))
            if isinstance(value, weakref.ref):  # (``self._b = weakref.ref(self.b)``: a swapped child's dies; R9)
                value = value()
            if isinstance(value, types.MethodType):  # (``self.run = self.a.forward``)
                value = value.__self__
            if isinstance(value, nn.Module) and id(value) in paths:
                found.add(paths[id(value)])
            elif type(value) in (dict, list, tuple, set):
                todo += value.values() if type(value) is dict else value
    return found - {""}


_MODULE_STATE = frozenset(vars(nn.Module()))  # nn.Module's own bookkeeping (its children, parameters, hooks)


def _chains(cls: type) -> tuple[tuple[Any, ...], ...]:
    """The attribute chains from ``self`` in the code of ``cls`` and its bases (nn.Module's own aside): ``self.body.conv``
    as ``("body", "conv")``, ``self.body[0]`` as ``("body", 0)``, an index the code computes or an iteration as None,
    a chain handed on to code not followed (:func:`_handed_on`) ending in ``...`` (every module below it).
    Read once per class (held weakly: a GraphModule is a class of its own).  A view of the model's class
    (:mod:`~repalgebra.frontend.structured`: its ``forward`` takes the tensors one by one and hands ``self`` to the
    class's own) is read as that class."""
    cls = vars(cls).get(VIEWED, cls)
    if cls not in _CHAINS:
        _CHAINS[cls] = _read_chains(cls)
    return _CHAINS[cls]


_CHAINS: "weakref.WeakKeyDictionary[type, tuple[tuple[Any, ...], ...]]" = weakref.WeakKeyDictionary()


def _read_chains(cls: type) -> tuple[tuple[Any, ...], ...]:
    """:func:`_chains`, read off the code a call runs: ``forward`` (and a ``__call__`` of the class's own) and the
    methods and properties of the class it names on ``self``, in turn; not ``__init__`` or a weight init, which
    reach into every child and never run in a call (a parent kept whole kept its conv and BN as written for
    ``self.conv.bn.running_mean.normal_()`` in ``__init__``; found by a full run)."""
    functions = _functions(cls)
    roots = [n for n in ("forward", "__call__") if n in functions]
    chains, read = _read_from(cls, roots)
    while setters := [f for name, f in _setters(cls) if f not in read and name in _stored(read)]:
        more, also = _read_from(cls, setters, guarded=set(setters))  # (self.gain = x runs its setter: review R17a)
        chains, read = (*chains, *more), [*read, *also]
    _READ[cls] = tuple(read)
    return chains


def _stored(functions: list[types.FunctionType]) -> set[str]:
    """The attribute names the code of ``functions`` (and the code nested in it) sets: ``self.gain = x``."""
    def names(code: types.CodeType) -> set[str]:
        own = {op.argval for op in dis.get_instructions(code) if op.opname in ("STORE_ATTR", "DELETE_ATTR")}
        return own.union(*(names(c) for c in code.co_consts if isinstance(c, types.CodeType)))

    return set().union(*(names(f.__code__) for f in functions))


def _read_from(cls: type, todo: list[Any], guarded: set[Any] = frozenset()) -> tuple[tuple[tuple[Any, ...], ...], list[types.FunctionType]]:
    """:func:`_read_chains` from the functions (or names of functions of ``cls``) ``todo``: the chains, and the
    functions read.  The chains of the decorators' wrappers among them, and of ``guarded`` (the setters), are kept
    in :data:`_GUARDED` too: their class tests count only where they may reach a module (:func:`tests_classes`)."""
    functions = _functions(cls)
    chains: list[tuple[Any, ...]] = []
    read: list[types.FunctionType] = []
    seen: set[Any] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        function = functions[name] if isinstance(name, str) else name
        read.append(function)
        todo += _called_above(cls, function)  # super().forward(x): the base class's code runs too
        code = function.__code__
        if function is _opaque:
            chains.append((...,))
            continue
        if code.co_argcount:
            found = _chains_in(code, code.co_varnames[0], functions=function.__globals__, owner=cls)
        elif code.co_flags & inspect.CO_VARARGS:  # (a decorator's wrapper(*args, **kwargs): self is args[0])
            found = [_from_first(c) for c in _chains_in(code, code.co_varnames[code.co_kwonlyargcount],
                                                         functions=function.__globals__, owner=cls)]
            found = [c for c in found if c is not None]
        else:
            continue
        found = [t for c in found for t in _through_mappings(c, cls)]
        for c in [c for c in found if c and isinstance(c[0], _Cell)]:  # (a decorator's wrapper calls what it wraps)
            found.remove(c)
            inner = _called_cell(function, c[0])
            if inner is None:
                found.append((...,))
            elif inner not in seen:
                todo.append(inner)
            guarded = {*guarded, function}
        if function in guarded:
            _GUARDED.setdefault(cls, {})[function] = found
        chains += found
        todo += [c[0] for c in found if c and c[0] in functions]  # self.helper(x): its code runs too
        todo += list(functions) if (_ANY_METHOD,) in found else []  # (a method named by a computed getattr; review R7)
    return tuple(dict.fromkeys(chains)), read


def _held(module: nn.Module) -> list[tuple[nn.Module, tuple[tuple[Any, ...], ...], list[types.FunctionType]]]:
    """What the callables ``module`` holds as attributes of the instance may reach, as ``(owner, chains from owner,
    functions read)``: a method of a module (``self.run = self._run_eager`` in ``__init__``, YOLOv5's ``m.forward =
    m.forward_fuse``, a child given its parent's method as a callback), read from the module it is bound to, also
    inside a dict, list or tuple (a dispatch table), a ``functools.partial``, what a wrapper wraps (``torch.no_grad()(
    self._reach)``); a module a lambda's closure, a partial's arguments or a callable object holds: every module
    below it.  What they called on ``self`` was read by no one, and a parent kept whole called its fused block's
    folded conv through them (2.2e3 off; reviews R17a, R18a).  Read once per class and function."""
    found: list[tuple[nn.Module, tuple[tuple[Any, ...], ...], list[types.FunctionType]]] = []
    todo = [(v, 0, False) for k, v in vars(module).items() if k not in _MODULE_STATE]  # (value, depth, in a callable)
    seen: set[int] = set()
    while todo:
        value, depth, called = todo.pop()
        if id(value) in seen or depth > 4 or isinstance(value, (str, bytes, int, float, bool, type(None), torch.Tensor)):
            continue
        seen.add(id(value))
        if isinstance(value, types.MethodType) and isinstance(value.__self__, nn.Module):
            if (function := _function_of(value.__func__)) is not None:
                cached = _BOUND.setdefault(type(value.__self__), {})
                if function not in cached:
                    cached[function] = _read_from(type(value.__self__), [function])
                found.append((value.__self__, *cached[function]))
        elif isinstance(value, nn.Module):
            if called:  # (held by a callable: what it does with it is not read; a plain list of children is
                found.append((value, ((...,),), []))  # named_by_attributes')
        elif type(value) in (dict, list, tuple, set, frozenset):
            todo += [(v, depth + 1, called) for v in (value.values() if type(value) is dict else value)]
        elif isinstance(value, functools.partial):
            todo += [(v, depth + 1, True) for v in (value.func, *value.args, *value.keywords.values())]
        elif isinstance(value, types.FunctionType):
            todo += [(c.cell_contents, depth + 1, True) for c in value.__closure__ or () if _filled(c)]
            todo += [(value.__wrapped__, depth + 1, True)] if hasattr(value, "__wrapped__") else []
        elif callable(value) and hasattr(value, "__dict__") and not isinstance(value, type):
            todo += [(v, depth + 1, True) for v in vars(value).values()]  # (an object with __call__ holding the module)
    return found


def _filled(cell: Any) -> bool:
    """Whether a closure's cell holds a value (a cell of a name not yet bound raises on reading)."""
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


_BOUND: "weakref.WeakKeyDictionary[type, dict[Any, tuple]]" = weakref.WeakKeyDictionary()
# The decorators' wrappers and the setters among the functions read, by class: their chains (see tests_classes)
_GUARDED: "weakref.WeakKeyDictionary[type, dict[types.FunctionType, list]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class _IfHeld:
    """A step of a chain handed to a method of the module's attribute ``name`` (diffusers' ``apply_forward_hook``:
    ``self._hf_hook.pre_forward(self)``, behind a ``hasattr``): every module below where the module holds that
    attribute, nothing where it holds none (no call can reach that code: every fold of a VAE kept whole had been
    lost; review R17a)."""

    name: str


@dataclass(frozen=True)
class _Cell:
    """The chain of ``self`` handed to a call of the closure variable ``name`` (a decorator's wrapper calling the
    function it wraps, ``fn(self, x)``, ``fn(self, *args)``, or ``fn(*args)`` where ``star``: what it was given)."""

    name: str
    star: bool


def _from_first(chain: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """A chain from a wrapper's ``args`` (whose first item is ``self``) as one from ``self``: ``args[0].blocks`` as
    ``self.blocks``, ``fn(*args)`` as ``fn(self, ...)``; None for another argument (``args[1]``); every module below for
    anything else done with ``args`` (handed on, indexed by a computed or a negative index)."""
    if chain[:1] == (0,):
        return chain[1:] or None
    if chain and isinstance(chain[0], int) and not isinstance(chain[0], bool) and chain[0] > 0:
        return None  # (args[-2] may be the module: every module below, as for an index the code computes; review R17a)
    if chain and isinstance(chain[0], _Cell) and chain[0].star:
        return (_Cell(chain[0].name, False),)
    return (...,)


def _called_cell(function: types.FunctionType, cell: _Cell) -> types.FunctionType | None:
    """What ``function`` (a decorator's wrapper) calls with ``self`` first through its closure variable ``cell.name``, as
    :func:`_function_of` reads it (read as a method of the class); None where that is no function of the closure or not
    given ``self`` first (``fn(*self)``)."""
    cells = dict(zip(function.__code__.co_freevars, function.__closure__ or ()))
    if cell.star or cell.name not in cells:
        return None
    try:
        called = _function_of(cells[cell.name].cell_contents)
    except ValueError:  # (an empty cell)
        return None
    return None if called is None or called is _opaque else called


_READ: "weakref.WeakKeyDictionary[type, tuple[types.FunctionType, ...]]" = weakref.WeakKeyDictionary()
_ANY_METHOD = "<any method>"  # the chain of ``getattr(self, <computed>)``: any function of the class may run


def _called_above(cls: type, function: types.FunctionType) -> list[types.FunctionType]:
    """The functions of the bases of ``cls`` that ``function`` (of ``cls`` or a base) reaches through ``super()``:
    for each name its code loads, the first definition above the class holding ``function`` along the MRO.

    ``_functions`` holds each name's most derived function: a subclass whose ``forward`` calls
    ``super().forward(x)`` hid its base's ``forward``, whose chains and class tests were never read (a parent kept
    whole called its fused blocks' folded conv on the branch the example does not take, 163 off; review R6)."""
    if "super" not in _names(function.__code__):
        return []
    mro = [b for b in cls.__mro__ if b not in (nn.Module, object)]
    owner = next((k for k, b in enumerate(mro) if any(f is function for v in vars(b).values() for f in _layers(v))), None)
    if owner is None:
        return []
    found = []
    for name in _names(function.__code__):
        above = next((f for b in mro[owner + 1:] if (f := _function_of(vars(b).get(name))) is not None), None)
        if above is not None:
            found.append(above)
    return found


def _names(code: types.CodeType) -> set[str]:
    """The names ``code`` and the code nested in it load (globals and attributes)."""
    return set(code.co_names).union(*(_names(c) for c in code.co_consts if isinstance(c, types.CodeType)))


def _function_of(value: Any) -> types.FunctionType | None:
    """The plain function a class attribute stands for (a property's getter, a cached property's, a static or class
    method's function), else None.  Under a decorator it is the outermost wrapper of the model's code: the reader
    reads it as a method, and the function it calls with ``self`` (:func:`_read_chains`).  A wrapper that reaches into
    a child itself (``if outlier: return self.blocks[0].conv(x)``) was never read, and its parent, kept whole, called
    the fused block's folded conv (2.4e3 off; review R14a).  torch's and the standard library's wrappers are looked
    through (``@torch.no_grad()``, ``functools.lru_cache`` under a property, torch's ``lazy_property``: what they wrap
    was read by no one, 1.8e3 off; review R15a); a wrapper object of the model's code is :func:`_opaque`."""
    if isinstance(value, functools.partialmethod):  # (self.other(x), other = partialmethod(_other, k=0): _other's code)
        return _function_of(value.func)
    layers = _layers(value)
    for k, layer in enumerate(layers):
        last = k == len(layers) - 1 and len(layers) < _MOST_LAYERS
        if isinstance(layer, types.FunctionType) and (last or not _trusted(layer)):
            return layer
        if not last and not isinstance(layer, types.FunctionType) and not _trusted(layer) and not _passes_through(layer):
            return _opaque
    outer = layers[0] if layers else None
    if isinstance(outer, functools.singledispatchmethod) or (
            outer is not None and not isinstance(outer, type) and hasattr(type(outer), "__get__") and not _trusted(outer)):
        return _opaque  # (a descriptor object of the model's code: Bottle's cached_property, a decorator class with
    return None  # __get__ and __call__, which binds the module and runs code the reader cannot read; review R17a)


def _passes_through(obj: Any) -> bool:
    """Whether ``obj``, a callable object of the model's code between a wrapper and what it wraps, only calls what it
    wraps with the arguments it was given and holds no module: accelerate's ``ConvertOutputsToFp32``, whose
    ``__call__`` is ``convert_to_fp32(self.model_forward(*args, **kwargs))``.  The reader looks through it to what it
    wraps; it took it for reaching every module below, and a model ``Accelerator.prepare`` had wrapped kept every
    child as written (review R19b).  Its ``__call__`` must take ``(self, *args, **kwargs)`` and read ``args`` and
    ``kwargs`` once each, in that call of the attribute holding ``__wrapped__``."""
    call = inspect.getattr_static(type(obj), "__call__", None)
    wrapped = getattr(obj, "__wrapped__", None)
    if not isinstance(call, types.FunctionType) or wrapped is None or not isinstance(getattr(obj, "__dict__", None), dict) \
            or _holds_a_module(obj):
        return False
    code = call.__code__
    star = inspect.CO_VARARGS | inspect.CO_VARKEYWORDS
    if code.co_argcount != 1 or code.co_kwonlyargcount or code.co_flags & star != star or code.co_cellvars:
        return False
    self_name, args, kwargs = code.co_varnames[:3]
    held = {name for name, value in vars(obj).items()  # (not one a class attribute shadows: a property would run)
            if value is wrapped and name != "__wrapped__" and inspect.getattr_static(type(obj), name, None) is None}
    ops = [op for op in dis.get_instructions(code) if op.opname != "CACHE"]
    given = [k for k, op in enumerate(ops) if op.opname in ("LOAD_FAST", "STORE_FAST", "DELETE_FAST") and op.argval in (args, kwargs)]
    if len(given) != 2 or given[0] < 2 or given[0] + 4 >= len(ops):
        return False
    k = given[0]
    shape = [(op.opname, op.argval) for op in ops[k - 2:k + 5]]
    return (given[1] == k + 2 and shape[0] == ("LOAD_FAST", self_name) and shape[1][0] == "LOAD_ATTR" and shape[1][1] in held
            and shape[2:] == [("LOAD_FAST", args), ("BUILD_MAP", 0), ("LOAD_FAST", kwargs), ("DICT_MERGE", 1), ("CALL_FUNCTION_EX", 1)])


def _holds_a_module(obj: Any) -> bool:
    """Whether ``obj``'s attributes (or the items of a list, tuple or dict among them) hold a module or a method bound
    to one."""
    values = list(vars(obj).values())
    values += [v for c in values if isinstance(c, (list, tuple)) for v in c] + [v for c in values if isinstance(c, dict) for v in c.values()]
    return any(isinstance(v, nn.Module) or isinstance(getattr(v, "__self__", None), nn.Module) for v in values)


def _layers(value: Any) -> list[Any]:
    """A class attribute's function and what it wraps (``__wrapped__``, as ``functools.wraps`` sets it), outermost first;
    at most :data:`_MOST_LAYERS` (a cycle of wrappers)."""
    function = value.fget if isinstance(value, property) else value.func if isinstance(value, functools.cached_property) else value
    if isinstance(function, (staticmethod, classmethod)):
        function = function.__func__
    layers = []
    while function is not None and len(layers) < _MOST_LAYERS:
        layers.append(function)
        function = getattr(function, "__wrapped__", None)
    return layers


_MOST_LAYERS = 64


def _trusted(layer: Any) -> bool:
    """Whether a wrapper is torch's, the standard library's or ours: it calls what it wraps, and reads no child.
    (A function's globals say where it was written; ``functools.wraps`` copies the wrapped function's ``__module__``.)"""
    module = layer.__globals__.get("__name__") if isinstance(layer, types.FunctionType) else type(layer).__module__
    return not_the_models(module)


def _opaque(self: Any) -> None:
    """Stands for a wrapper object of the model's code (a class with ``__call__``): the reader cannot read it, and
    takes it for reaching every module below."""


def _setters(cls: type) -> list[tuple[str, types.FunctionType]]:
    """The setters (and deleters) of the properties of ``cls`` and its bases by the property's name, as
    :func:`_function_of` reads them: read where the code read sets that name (Lightning's ``trainer`` setter asks
    its children's classes, and is run by the trainer, never in a call: read always, every fold below a part kept
    whole was lost; review R18a)."""
    found = []
    for base in cls.__mro__:
        if base not in (nn.Module, object):
            found += [(name, f) for name, v in vars(base).items() if isinstance(v, property)
                      for f in map(_function_of, (v.fset, v.fdel)) if f is not None]
    return found


def _functions(cls: type) -> dict[str, types.FunctionType]:
    """The functions of ``cls`` and its bases by name (nn.Module's own aside), properties' getters among them, and
    those of ``functools.cached_property`` (a dict of children it returns was read by no one: 4.7e3 off; review R14a)."""
    functions: dict[str, types.FunctionType] = {}
    for base in reversed(cls.__mro__):
        if base in (nn.Module, object):
            continue
        for name, value in vars(base).items():
            if (function := _function_of(value)) is not None:
                functions[name] = function  # (the function a decorator wraps: @torch.no_grad())
    return functions


def _run_functions(cls: type) -> list[types.FunctionType]:
    """The functions a call of a ``cls`` runs: ``forward`` (or ``__call__``), the methods it names on ``self``, those
    of its bases it calls through ``super()`` (:func:`_called_above`), and the module-level functions of the model's
    code that these call, in turn (:func:`_helpers`)."""
    _chains(cls)
    return _helpers(list(_READ.get(cls, ())))



def _helpers(functions: list[types.FunctionType]) -> list[types.FunctionType]:
    """``functions`` and the module-level functions of the model's code they call by a global name, in turn
    (``return run_layers(self.layers, x, lens)``, where ``run_layers`` asks ``isinstance(layer, MaskedConv1d)``:
    a class test there was not seen, and the fused masked convs were called without their lengths; review R6)."""
    found, todo = {id(f): f for f in functions}, list(functions)
    while todo:
        function = todo.pop()
        for name in _names(function.__code__):
            helper = function.__globals__.get(name)
            if (isinstance(helper, types.FunctionType) and id(helper) not in found
                    and not not_the_models(helper.__module__)):
                found[id(helper)] = helper
                todo.append(helper)
    return list(found.values())


def _chains_in(code: types.CodeType, self_name: str, given: dict[str, list[tuple[Any, ...]]] | None = None,
               functions: dict[str, Any] | None = None, depth: int = 0, owner: type | None = None) -> list[tuple[Any, ...]]:
    """The chains from ``self_name`` in ``code`` and the code nested in it (comprehensions, closures, lambdas), also
    those through a local that holds one (``body = self.body``) or iterates over one (``for blk in self.blocks``),
    wherever the code loads it (the names are not followed through the flow: a name that holds several counts
    each).  ``given``: locals the enclosing code binds (a comprehension's iterator ``.0``).

    A loop over a call of chains (``enumerate(self.blocks)``, ``zip(self.blocks, self.scales)``,
    ``self.blocks.items()``) binds each name its target stores to an item of each (:func:`_items`), and a generator
    or comprehension over one (``sum(blk.conv(x) for blk in self.blocks)``) gets it as its ``.0``: those loops were
    not followed, and a parent kept whole called the fused blocks' folded ``conv`` (review R5 finding 03)."""
    ops = list(dis.get_instructions(code))
    chains = []
    held: dict[str, list[tuple[Any, ...]]] = {k: list(v) for k, v in (given or {}).items()}  # local name -> the chains from self it holds
    pending: list[tuple[Any, ...]] = []  # chains loaded in the statement so far, not stored: a loop over a call of them
    handed: list[tuple[Any, ...]] = []  # those of them handed to a call as arguments (followed only where iterated)
    unlooped: list[tuple[Any, ...]] = []  # containers whose items a method gave (self.blocks.children()): handed on
    # where the statement ends without a loop over them
    iterated: list[tuple[Any, ...]] = []  # items of chains whose iterator goes to nested code (a comprehension's .0)
    for i, op in enumerate(ops):
        if op.opname == "GET_ITER" and pending:  # (for i, blk in enumerate(self.blocks): each item of each chain)
            items = [_items(c) for c in pending]
            names = _loop_targets(ops, i + 1)
            for name in names:
                held.setdefault(name, []).extend(items)
            iterated += [] if names else items
            chains += [c + (...,) for c in handed]  # (for conv in map(lambda b: b.conv, self.blocks): handed on; review R7)
            pending, handed, unlooped = [], [], []  # (self.blocks.items() iterated: the loop's items, not handed on)
            continue
        if op.opname.startswith(("STORE_", "POP_", "RETURN_", "JUMP_")):
            chains += [c + (...,) for c in handed + unlooped]  # (handed to code not followed: every module below, see _handed_on)
            pending, handed, unlooped = [], [], []  # (the statement ended)
        if op.opname not in ("LOAD_FAST", "LOAD_DEREF", "LOAD_CLOSURE") or not (op.argval == self_name or op.argval in held):
            continue
        steps, end = _steps_to(ops, i + 1)
        if steps and steps[-1] in _TENSORS_OF and _first_only(ops, i, end):
            steps = (*steps[:-1], _FIRST_TENSOR)  # (next(self.stem.parameters()): its dtype or device, timm's way)
        for base in [()] if op.argval == self_name else held[op.argval]:
            chain = base + steps
            if chain:
                chains.append(chain)
            for c in range(i + 1, end):  # (if (blk := self.blocks[0]) is not None: blk.conv(x); review R7)
                if ops[c].opname == "COPY" and ops[c].arg == 1 and (name := _stored_in(ops, c + 1)) is not None:
                    held.setdefault(name, []).append(base + _steps_to(ops[:c], i + 1)[0])
            if (name := _stored_in(ops, end)) is not None:
                held.setdefault(name, []).append(chain)
            elif end < len(ops) and ops[end].opname in ("FOR_ITER", "GET_ITER"):  # (for a, b in self.pairs; a
                # comprehension's .0, its items already; or an iterator handed to a comprehension)
                targets = _loop_targets(ops, end + (ops[end].opname == "GET_ITER"))
                for target in targets:
                    held[target] = [*held.get(target, []), chain]
                iterated += [] if targets or ops[end].opname == "FOR_ITER" else [chain]
            elif end < len(ops) and ops[end].opname == "UNPACK_SEQUENCE":  # (a, b = self.blocks: each an item)
                for target in _unpacked_into(ops, end):
                    held.setdefault(target, []).append(_items(chain))
            else:
                if chain and chain[-1] is not None:  # (a chain iterated itself is the branch above's)
                    pending.append(chain)
                if chain and chain[-1] in _ITEMS:  # (next(self.blocks.children()): items not iterated)
                    unlooped.append(chain[:-1])
                elif isinstance(how := _handed_on(ops, i, end, chain[-1:] == (None,)), tuple) and how[0] in ("getattr", "index"):
                    _, k, name = how  # (getattr(self, f"layer{i}").conv, self.heads[self.task].conv: on each child)
                    rest, after_end = _steps_to(ops, k + 1)
                    after = chain + (name,) + rest
                    chains.append(after)
                    if how[0] == "getattr" and name is None and not chain:
                        chains.append((_ANY_METHOD,))  # (getattr(self, f"forward_{self.mode}")(x): any method runs)
                    if (stored := _stored_in(ops, after_end)) is not None:
                        held.setdefault(stored, []).append(after)
                    elif _handed_on(ops, k, after_end) is not False:
                        handed.append(after)
                elif isinstance(how, tuple) and how[0] in ("hasattr", "augmented"):
                    chains.append(chain + (how[1],))  # (a name asked of it, or read and set: a step into it)
                elif isinstance(how, tuple) and how[0] == "stored":
                    held.setdefault(how[1], []).append(chain)
                elif isinstance(how, tuple) and how[0] == "caller":  # (checkpoint(blk, x): called, where it is torch's)
                    if not _checkpointing(how[1], functions, how[1][0] in code.co_varnames + code.co_freevars + code.co_cellvars):
                        handed.append(chain)
                elif isinstance(how, tuple) and (inner := _in_helper(how, functions, depth)) is not None:
                    chains += [chain + c for c in inner]  # (run_layers(self.layers, x): its code, from the parameter)
                elif isinstance(how, tuple) and (inner := _spread_into(chain, how, owner, self_name, depth)) is not None:
                    chains += inner  # (self.forward_head(x, **self.one2many): by the keys; review R10a 03)
                elif isinstance(how, tuple) and (inner := _in_super(how, owner, code, depth)) is not None:
                    chains += [chain + c for c in inner]  # (ultralytics' Segment: super().forward_head(x, box_head, ...))
                elif isinstance(how, tuple) and (inner := _in_method(how, owner, self_name, depth)) is not None:
                    chains += [chain + (_Method(how[2]),) + c for c in [(), *inner]]  # (self.run(self.blocks, x): the
                    # same, where the module does not hold an attribute of that name: see _through)
                elif isinstance(how, tuple) and how[0] == "held-method" and how[1] == self_name and not depth:
                    chains.append(chain + (_IfHeld(how[2]),))  # (handed on where the module holds that attribute)
                elif isinstance(how, tuple) and how[0] == "cell" and not chain and not depth and how[2] in (0, "*"):
                    chains.append((_Cell(how[1], how[2] == "*"),))  # (fn(self, x) in a decorator's wrapper: _read_chains)
                elif how:  # (``self`` itself too: functools.reduce(getattr, "layer0.conv".split("."), self),
                    handed.append(chain)  # operator.attrgetter(...)(self), [self][0].layer0: every module below; R9)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            inner = {n: held[n] for n in const.co_freevars if n in held}  # (lambda t: blk.conv(t); review R7)
            chains += _chains_in(const, self_name, {**inner, ".0": iterated} if iterated else inner or None, functions, depth, owner)
    return chains


# Methods of a container whose items are (or hold) its children: ``self.blocks.items()`` iterates over the blocks.
_ITEMS = frozenset({"items", "values", "children", "named_children"})
# Methods and attributes of a module that reach every module below it: ``for n, m in self.named_modules()``.
_EVERY = frozenset({"modules", "named_modules", "apply", "_modules", "get_submodule", "__getitem__", "__getattr__",
                    "__dict__", "get_parameter", "get_buffer", "state_dict"})
# Methods of a child that give its tensors (``next(self.blocks[0].parameters())``): its fused form's are the folded
# ones (review R8, 141 to 273 off).  On the module itself they are left to read_outside's runs (``next(self.parameters())
# .dtype``, in every other model, reads no value).
_TENSORS_OF = frozenset({"parameters", "named_parameters", "buffers", "named_buffers"})
_FIRST_TENSOR = "<first tensor>"  # the step of ``next(child.parameters())``: read for its dtype or device


def _first_only(ops: list[dis.Instruction], i: int, end: int) -> bool:
    """Whether the chain from ``ops[i]`` to ``ops[end]`` (a method giving tensors) is called at once, handed to
    ``next`` alone, and only that tensor's metadata read: ``next(self.stem.parameters()).dtype`` (timm's way).
    Stored or read otherwise (``next(self.blocks[0].parameters()).sum()``), its values are the fused form's."""
    after = [k for k in range(end, min(end + 5, len(ops))) if ops[k].opname == "CALL"][:2]
    return (i > 0 and ops[i - 1].opname == "LOAD_GLOBAL" and ops[i - 1].argval == "next" and len(after) == 2
            and [ops[k].arg for k in after] == [0, 1] and after[1] + 1 < len(ops)
            and ops[after[1] + 1].opname in ("LOAD_ATTR", "LOAD_METHOD")
            and (ops[after[1] + 1].argval in _METADATA or str(ops[after[1] + 1].argval).startswith("new_")))


# Functions handed a module that read nothing through it
_HARMLESS = frozenset({"len", "isinstance", "issubclass", "hasattr", "id", "type", "callable", "print", "repr", "str", "bool"})
# Functions that call what they are handed first as it is (torch's and timm's activation checkpointing)
_CALLERS = frozenset({"checkpoint", "checkpoint_seq"})
# Functions that iterate over what they are handed and give its items back (iterated, the loop's items are those
# of the chain: see _chains_in)
_WRAPPERS = frozenset({"enumerate", "zip", "reversed", "iter", "list", "tuple", "sorted"})
# Instructions that end a statement (or jump): the stack holds nothing of the next one
_ENDS = ("STORE_", "POP_TOP", "POP_JUMP", "RETURN_", "JUMP_", "RESUME", "FOR_ITER", "RAISE_VARARGS", "RERAISE")


def _handed_on(ops: list[dis.Instruction], i: int, end: int, item: bool = False) -> bool | tuple[Any, ...]:
    """Whether the value of the chain that ``ops[i]`` begins and ``ops[end]`` follows is handed on to code the reader
    does not follow: an argument of a call (``map(lambda b: b.conv(x), self.blocks)``, ``next(iter(self.blocks))``,
    ``f(*self.blocks)``), put into a container, returned or yielded, or stored anywhere but in a local right away:
    every module below it then counts as reached (review R6 finding 02).  ``("getattr", k, name)`` where it is the
    object of a ``getattr`` call at ``ops[k]`` (``name`` its constant name, else None: any child); ``("helper", name,
    position)`` where it is an argument, by position, of a call of the global ``name`` (:func:`_in_helper` reads
    that function, if it is the model's, else it is handed on).

    The value is followed on the stack (:func:`_stack_effect`), from the statement's first instruction (after the
    last one that ends a statement: a call over several lines is one statement), to the instruction that takes it.
    Not handed on: called (``self.conv(x)``, ``self.blocks[i](x)``), iterated (also through ``enumerate``, ``zip``
    ...), compared or tested (``self.downsample is not None``), given to a function that reads nothing through it
    (``len``, ``isinstance``; ``super(Cls, self)``) or as the function checkpointing calls, formatted, or a cell for
    nested code (which is read itself, with the enclosing code's locals).  ``("index", k, None)`` where it is indexed
    by an index the code computes (``self.heads[self.task].conv``: each child, review R7).  An instruction the
    reader does not know counts as handing it on.  ``item``: the chain is an item of a container (a loop's local),
    which arithmetic (``x * s``) does not hand on."""
    if ops[i].opname == "LOAD_CLOSURE" or method_loaded(ops[end - 1]):
        return False  # (a method of it called: the chain names the method, for _through)
    if ops[end - 1].opname == "LOAD_ATTR" and ops[end - 1].argval in ("__call__", "forward"):
        return False  # (a way to call it, handed on: HF's ``self._gradient_checkpointing_func(layer.__call__, h)``)
    k = i
    while k > 0 and not ops[k - 1].opname.startswith(_ENDS):
        k -= 1  # (after the last statement's end: the stack is this statement's own from there, over lines too)
    stack: list[Any] = []  # per item, the index of the instruction that pushed it, "V" for the value followed
    wrapped = False  # (the value is what enumerate, zip ... made of it: iterated, its items are the loop's)
    jumped = False  # (past a conditional expression's other arm: only a store into a local is followed there)
    arms: list[int] = []  # the stack's heights at the tests of conditional expressions above the value
    first = False  # (the value is the first of a call's positional arguments, before a star: f(self, *args))
    while k < len(ops):
        op = ops[k]
        if op.opname == "JUMP_FORWARD" and "V" in stack and k >= end and (
                target := next((j for j in range(k + 1, len(ops)) if ops[j].offset == op.argval), None)) is not None:
            if arms and len(stack) == arms[-1] + 1:  # (b(t, scale=0.5 if i else 1.0): one arm's value is on the
                arms.pop()  # stack, the other's would be: the value below goes on; review R9)
                k = target
                continue
            k, jumped = target, True  # (m = self.layer0 if c else None: past the other arm, the value goes on)
            continue
        effect = _stack_effect(op)
        if op.opname == "SWAP" and len(stack) >= op.arg:
            stack[-1], stack[-op.arg] = stack[-op.arg], stack[-1]
            k += 1
            continue
        jumps = op.opcode in dis.hasjrel or op.opcode in dis.hasjabs
        if op.opname == "COPY" and op.arg == 1 and stack[-1:] == ["V"] and ops[k + 1].opname == "LOAD_ATTR":
            return ("augmented", ops[k + 1].argval)  # (self.n += 1: one attribute of it read and set again)
        if effect is None or (op.opname == "COPY" and len(stack) >= op.arg and stack[-op.arg] == "V"):
            return "V" in stack or k < end  # (not known: taken as handed on, also where it comes before the value)
        pops, pushes = effect
        taken = [stack.pop() if stack else None for _ in range(pops)]  # top first
        if "V" in taken:
            p = taken.index("V")  # its place from the top
            if jumped:  # (for b in (self.blocks if c else self.extra): the loop binds no local to the arm; review R8)
                return ("stored", op.argval) if op.opname in ("STORE_FAST", "STORE_DEREF") and p == 0 else True
            if first and op.opname in ("LIST_TO_TUPLE", "CALL_INTRINSIC_1"):
                stack.append("V")
                k += 1
                continue
            if op.opname == "CALL_FUNCTION_EX" and p == op.arg & 1 and not wrapped:  # (fn(*args, **kwargs), fn(self, *args))
                callee = next((t for t in taken[p + 1:] if t != "null"), None)
                cell = isinstance(callee, int) and ops[callee].opname == "LOAD_DEREF"
                return ("cell", ops[callee].argval, 0 if first else "*") if cell else True
            if first:
                return True  # (the list of arguments put to another use)
            if wrapped:
                return op.opname != "GET_ITER"
            if op.opname == "BUILD_LIST" and p == op.arg - 1 and ops[k + 1].opname in ("LOAD_FAST", "LOAD_DEREF") and (
                    ops[k + 2].opname == "LIST_EXTEND"):
                first, stack = True, [*stack, "V"]
                k += 1
                continue
            if op.opname == "BINARY_SUBSCR" and p == 1:  # (self.heads[self.task]: an index _steps_to did not read)
                return ("index", k, None)
            if op.opname == "CALL" and sys.version_info < (3, 13):  # (3.13 orders a call's stack otherwise: handed on)
                argc = op.arg
                if p >= argc:
                    return False  # (called, or the object a method is called on)
                callee = taken[argc] if taken[argc + 1] == "null" or taken[argc + 1] is None else taken[argc + 1]
                name = ops[callee].argval if isinstance(callee, int) and ops[callee].opname in _LOADS else None
                if name == "hasattr" and p == argc - 1:  # (hasattr(self.layer0, "bn"): the fused form has none; R9)
                    given = taken[argc - 2] if argc >= 2 else None
                    const = ops[given].argval if isinstance(given, int) and ops[given].opname == "LOAD_CONST" else None
                    return ("hasattr", const if isinstance(const, str) else None)
                if name in _HARMLESS or name == "super":
                    return False
                dotted = _dotted(ops, callee) if isinstance(callee, int) else None
                if dotted and dotted[0] == "@pytest_ar":  # (pytest's rewritten assert formats its message: a repr)
                    return False
                if dotted and dotted[-1] in _CALLERS and p == argc - 1:  # (checkpoint(blk, x) calls blk, where it is
                    return ("caller", dotted)  # torch's or timm's; checkpoint(f, blk, x) hands blk to f: review R7)
                if name in _WRAPPERS:
                    wrapped, stack = True, [*stack, "V"]
                    k += 1
                    continue
                if name == "getattr" and p == argc - 1:
                    given = taken[argc - 2] if argc >= 2 else None
                    const = ops[given].argval if isinstance(given, int) and ops[given].opname == "LOAD_CONST" else None
                    return ("getattr", k, const if isinstance(const, str) else None)
                by_keyword = any(o.opname == "KW_NAMES" for o in ops[max(k - 2, 0):k])
                if isinstance(callee, int) and _of_super(ops, callee) and not by_keyword:
                    return ("super", ops[callee].argval, argc - 1 - p)  # (super().forward_head(x, box_head): its code)
                if isinstance(callee, int) and ops[callee].opname == "LOAD_DEREF" and not by_keyword:
                    return ("cell", name, argc - 1 - p)  # (fn(self, x) in a decorator's wrapper: see _read_chains)
                if isinstance(callee, int) and ops[callee].opname == "LOAD_GLOBAL" and not by_keyword:
                    return ("helper", name, argc - 1 - p)  # (a function of the model's code, given it by position)
                if dotted and len(dotted) == 2 and ops[callee - 1].opname in ("LOAD_FAST", "LOAD_DEREF") and not by_keyword:
                    return ("method", *dotted, argc - 1 - p)  # (self.run(self.blocks, x): read where it is self's)
                if dotted and len(dotted) == 3 and ops[callee - 2].opname in ("LOAD_FAST", "LOAD_DEREF"):
                    return ("held-method", dotted[0], dotted[1])  # (self._hf_hook.pre_forward(self): see _IfHeld)
                return True  # (where a loop iterates over what it makes, enumerate(self.blocks), _chains_in takes it back)
            if op.opname == "DICT_MERGE" and p == 0 and len(stack) >= 3 and isinstance(stack[-3], int):
                return ("spread", *_dotted(ops, stack[-3]))  # (f(x, **self.heads): the keywords of a call of f)
            if op.opname == "MATCH_CLASS":  # (case MaskedConv1d(): a class test; case Block(conv=c): reads into it)
                names = taken[0]
                return bool(op.arg) or not (isinstance(names, int) and ops[names].argval == ())
            if op.opname == "BINARY_OP":  # (x * s, s a loop's partner of a block: nothing; self.blocks + self.extra
                return not item  # makes a container of the blocks, which the reader does not hold)
            return op.opname not in _NOT_HANDING and not (
                op.opname == "STORE_ATTR" and p == 0) and not (op.opname == "STORE_SUBSCR" and p < 2)
        if "V" in stack and jumps and op.opname.startswith("POP_JUMP") and "BACKWARD" not in op.opname and k >= end:
            arms.append(len(stack))  # (a conditional expression's test, the value below it: its first arm followed)
            k += 1
            continue
        if "V" in stack and jumps:
            return True  # (a jump while it is on the stack: another conditional, not followed)
        stack += [("null" if op.opname == "PUSH_NULL" or (j == 0 and pushes == 2 and op.opname == "LOAD_GLOBAL") else k)
                  for j in range(pushes)]
        if k == end - 1:
            stack[-1] = "V"
        k += 1
    return True


def _in_helper(how: tuple[Any, ...], functions: dict[str, Any] | None, depth: int) -> list[tuple[Any, ...]] | None:
    """The chains, from its parameter, that the model's module-level function ``how`` names (``("helper", name,
    position)``: :func:`_handed_on`) reads in its code (``run_layers(self.layers, x)``, whose ``for layer in
    layers: layer.conv(x)`` reaches into each layer); None where that is not a plain function of the model's code
    taking the argument by that position, or helpers nest too deep: the argument is then handed on."""
    if how[0] != "helper" or functions is None or depth >= 3:
        return None
    _, name, position = how
    if position == 0 and _checkpointing((name,), functions, False):
        return []  # (torch's checkpoint under another name, a partial of it: it calls what it is given first)
    helper = functions.get(name)
    if not isinstance(helper, types.FunctionType) or not_the_models(helper.__module__):
        return None
    code = helper.__code__
    if position >= code.co_argcount:
        return None  # (taken by *args)
    return _chains_in(code, code.co_varnames[position], functions=helper.__globals__, depth=depth + 1)


@dataclass(frozen=True)
class _Method:
    """A step of a chain into the method ``name`` of the module's class, which the code hands what the chain reached
    (``self.run(self.blocks, x)``): the steps after it are that method's reads of its parameter.  A module that holds
    an attribute of that name itself (``self.run = self._first_conv``) calls that instead: the chain is then handed
    on (review R8, 202 off)."""

    name: str


def _in_method(how: tuple[Any, ...], owner: type | None, self_name: str, depth: int) -> list[tuple[Any, ...]] | None:
    """The chains, from its parameter, that the method ``how`` names (``("method", obj, name, position)``:
    :func:`_handed_on`) reads, where ``obj`` is the module itself and the method a plain function of its class
    (``self.run(self.blocks, x)``, whose ``for b in blocks: b(x)`` reaches no block); None otherwise: the argument is
    then handed on."""
    if how[0] != "method" or how[1] != self_name or depth or (function := _own_method(owner, how[2])) is None:
        return None  # (depth: in a method's code read from a parameter, self_name is that parameter, not self)
    code, position = function.__code__, how[3]
    if position + 1 >= code.co_argcount:
        return None  # (taken by *args)
    return _chains_in(code, code.co_varnames[position + 1], functions=function.__globals__, depth=depth + 1, owner=owner)


def _of_super(ops: list[dis.Instruction], k: int) -> bool:
    """Whether ``ops[k]`` loads a method of ``super()`` (``super().forward_head``: a call of ``super`` with no
    arguments just before; 3.12's ``LOAD_SUPER_ATTR`` is not read, and hands the value on)."""
    def before(j: int) -> int:
        j -= 1
        while j >= 0 and ops[j].opname == "PRECALL":
            j -= 1
        return j

    if ops[k].opname not in ("LOAD_METHOD", "LOAD_ATTR") or (j := before(k)) < 1 or ops[j].opname != "CALL" or ops[j].arg:
        return False
    return ops[before(j)].opname == "LOAD_GLOBAL" and ops[before(j)].argval == "super"


def _in_super(how: tuple[Any, ...], owner: type | None, code: types.CodeType, depth: int) -> list[tuple[Any, ...]] | None:
    """The chains, from its parameter, that ``super().<name>(...)`` (``("super", name, position)``: :func:`_handed_on`)
    reads, where ``code`` is a method of a class of ``owner``'s: the next definition of ``name`` along the MRO after
    that class, if a plain method (:func:`_own_method`'s terms).  Ultralytics' ``Segment.forward_head`` hands its heads
    on to Detect's (``super().forward_head(x, box_head, cls_head)``), which only calls them: taken as handed on, every
    Conv+BN of the heads stayed unfolded (review R14a).  None otherwise: the argument is then handed on."""
    if how[0] != "super" or owner is None or depth >= 3:
        return None
    mro = owner.__mro__
    at = next((k for k, b in enumerate(mro) if any(getattr(f, "__code__", None) is code for v in vars(b).values() for f in _layers(v))), None)
    above = next((b for b in mro[at + 1:] if how[1] in vars(b)), None) if at is not None else None
    function = _own_method(above, how[1]) if above is not None and above not in (nn.Module, object) else None
    if function is None or how[2] + 1 >= function.__code__.co_argcount:
        return None
    inner = function.__code__
    return _chains_in(inner, inner.co_varnames[how[2] + 1], functions=function.__globals__, depth=depth + 1, owner=owner)


def _own_method(owner: type | None, name: str) -> types.FunctionType | None:
    """The plain function of ``owner`` that ``self.<name>(...)`` calls, where the reader may follow what it is given
    into its code; None for a static or class method (no self), a property or an attribute (no method), or a wrapper
    of a decorator that is not torch's (it may reach into what it is given itself; review R8)."""
    raw = inspect.getattr_static(owner, name, None) if owner is not None else None
    if not isinstance(raw, types.FunctionType):
        return None
    function = inspect.unwrap(raw)  # (the function torch's decorator wraps: @torch.no_grad())
    return function if function is raw or in_packages(raw.__globals__.get("__name__"), ("torch",)) else None


def _mapping_of(owner: type | None, name: Any) -> dict[str, tuple[str, ...] | None] | None:
    """The dict of chains the property ``name`` of ``owner`` returns (:func:`mapping_returned`), else None."""
    raw = inspect.getattr_static(owner, name, None) if owner is not None and isinstance(name, str) else None
    getter = _function_of(raw) if isinstance(raw, property) else None  # (under a decorator of the model's own, its
    return None if getter is None else mapping_returned(getter)  # wrapper, which may add to the dict: review R14a)


def _spread_into(chain: tuple[Any, ...], how: tuple[Any, ...], owner: type | None, self_name: str,
                 depth: int) -> list[tuple[Any, ...]] | None:
    """The chains that ``self.<method>(x, **self.<property>)`` reaches (``how``: ``("spread", obj, method)``, from
    :func:`_handed_on`), where the property returns a dict of chains (:func:`_mapping_of`; ultralytics'
    ``self.forward_head(x, **self.one2many)``): each key binds the method's parameter of that name, whose reads in
    the method's code follow its chain; a key no parameter names goes to ``**kwargs``, and is handed on.  None where
    the property, the method or ``obj`` is another: the dict is then handed on."""
    if (len(chain) != 1 or how[0] != "spread" or how[1:2] != (self_name,) or len(how) != 3 or depth
            or (mapping := _mapping_of(owner, chain[0])) is None or (function := _own_method(owner, how[2])) is None):
        return None
    code = function.__code__
    named = code.co_varnames[1:code.co_argcount + code.co_kwonlyargcount]
    found: list[tuple[Any, ...]] = []
    for key, value in mapping.items():
        if value is None:
            continue
        if key not in named:
            found.append(value + (...,))
            continue
        inner = _chains_in(code, key, functions=function.__globals__, depth=depth + 1, owner=owner)
        found += [value + (_Method(how[2]),) + c for c in [(), *inner]]
    return found


def _through_mappings(chain: tuple[Any, ...], owner: type) -> list[tuple[Any, ...]]:
    """``chain`` read through a property of ``owner`` that returns a dict of chains (:func:`_mapping_of`): its
    getter's code is not read (a dict it returns would be taken for every module below its values), the chain goes on
    from the value it names instead: ``self.one2many["box_head"][0]`` as ``self.cv2[0]``; the dict alone reaches
    nothing (tested, or spread into a method: :func:`_spread_into`), an item of each (a loop over its values) each
    value, anything else done with it every module below each value."""
    mapping = _mapping_of(owner, chain[0]) if chain else None
    if mapping is None:
        return [chain]
    rest = chain[1:]
    if not rest:
        return []
    if isinstance(rest[0], str) and rest[0] in mapping:
        value = mapping[rest[0]]
        return [] if value is None else [value + rest[1:]]
    tail = rest[1:] if rest[0] is None else (...,)
    return [v + tail for v in mapping.values() if v is not None]


# What takes the value without handing it on: iterating, a test, a comparison, formatting, dropping it, an index
# into it or by it, the object of an attribute or item set (STORE_ATTR, STORE_SUBSCR)
_NOT_HANDING = frozenset({"GET_ITER", "FOR_ITER", "BINARY_SUBSCR", "COMPARE_OP", "IS_OP", "CONTAINS_OP", "POP_TOP",
                          "UNARY_NOT", "TO_BOOL",
                          "FORMAT_VALUE", "FORMAT_SIMPLE", "POP_JUMP_FORWARD_IF_TRUE", "POP_JUMP_FORWARD_IF_FALSE",
                          "POP_JUMP_BACKWARD_IF_TRUE", "POP_JUMP_BACKWARD_IF_FALSE", "POP_JUMP_IF_TRUE", "POP_JUMP_IF_FALSE",
                          "POP_JUMP_FORWARD_IF_NONE", "POP_JUMP_FORWARD_IF_NOT_NONE", "POP_JUMP_IF_NONE", "POP_JUMP_IF_NOT_NONE"})


def _stack_effect(op: dis.Instruction) -> tuple[int, int] | None:
    """How many items ``op`` takes from the stack and puts on it, for the instructions of expressions and simple
    statements (CPython 3.11 and 3.12); None for any other (an unconditional jump, a ``with``, an exception handler)."""
    name, arg = op.opname, op.arg or 0
    if name in ("NOP", "RESUME", "CACHE", "EXTENDED_ARG", "KW_NAMES", "PRECALL", "MAKE_CELL", "COPY_FREE_VARS", "RETURN_CONST"):
        return 0, 0
    if name in ("PUSH_NULL", "LOAD_FAST", "LOAD_DEREF", "LOAD_CLOSURE", "LOAD_CONST", "LOAD_NAME", "LOAD_SMALL_INT",
                "LOAD_FAST_CHECK", "LOAD_ASSERTION_ERROR", "COPY"):
        return 0, 1
    if name == "LOAD_GLOBAL":
        return 0, 1 + (arg & 1)  # (3.11: and a NULL below it, for a call)
    if name == "LOAD_ATTR":
        return 1, 1 + (arg & 1 if sys.version_info >= (3, 12) else 0)
    if name == "LOAD_METHOD":
        return 1, 2
    if name in ("BINARY_SUBSCR", "BINARY_OP", "COMPARE_OP", "IS_OP", "CONTAINS_OP"):
        return 2, 1
    if name == "MATCH_CLASS":
        return 3, 1
    if name in ("GET_ITER", "UNARY_NEGATIVE", "UNARY_NOT", "UNARY_INVERT", "UNARY_POSITIVE", "LIST_TO_TUPLE", "TO_BOOL",
                "FORMAT_SIMPLE", "CALL_INTRINSIC_1"):
        return 1, 1
    if name == "FORMAT_VALUE":
        return 1 + bool(arg & 4), 1
    if name in ("BUILD_TUPLE", "BUILD_LIST", "BUILD_SET", "BUILD_STRING", "BUILD_SLICE"):
        return arg, 1
    if name == "BUILD_MAP":
        return 2 * arg, 1
    if name == "BUILD_CONST_KEY_MAP":
        return arg + 1, 1
    if name in ("LIST_APPEND", "LIST_EXTEND", "SET_ADD", "SET_UPDATE", "DICT_UPDATE", "DICT_MERGE"):
        return 1, 0
    if name == "MAP_ADD":
        return 2, 0
    if name == "CALL":
        return arg + 2, 1
    if name == "CALL_FUNCTION_EX":
        return 3 + (arg & 1), 1
    if name == "MAKE_FUNCTION":
        return 1 + bin(arg & 15).count("1"), 1
    if name in ("POP_TOP", "STORE_FAST", "STORE_DEREF", "STORE_GLOBAL", "STORE_NAME", "RETURN_VALUE", "YIELD_VALUE") or (
            name.startswith("POP_JUMP")):
        return 1, 0 + (name == "YIELD_VALUE")
    if name == "STORE_ATTR":
        return 2, 0
    if name == "STORE_SUBSCR":
        return 3, 0
    if name == "UNPACK_SEQUENCE":
        return 1, arg
    return None


_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_FAST", "LOAD_ATTR"})


def _dotted(ops: list[dis.Instruction], k: int) -> tuple[Any, ...]:
    """The dotted name of what ``ops[k]`` loads: a name and its attributes (``torch.utils.checkpoint.checkpoint``,
    ``self.run``: ``("self", "run")``).  Where the base is no name (an item, a call's result), its first entry is that
    instruction's argument, which names nothing (no global resolves it, and it is no ``self``)."""
    names = []
    while k > 0 and ops[k].opname in ("LOAD_ATTR", "LOAD_METHOD"):
        names.append(ops[k].argval)
        k -= 1
    return (ops[k].argval, *reversed(names))


def _checkpointing(dotted: tuple[str, ...], namespace: dict[str, Any] | None, local: bool) -> bool:
    """Whether the dotted name, resolved in the code's globals, is torch's or timm's activation checkpointing (which
    calls the module it is handed first, as it is): not a function of the model's own of that name."""
    if local or namespace is None or not isinstance(dotted[0], str):
        return False  # (a local of that name, or an attribute of no name: self.blocks[0].checkpoint)
    found = namespace.get(dotted[0], getattr(builtins, dotted[0], None))
    for name in dotted[1:]:
        found = getattr(found, name, None)
    while isinstance(found, functools.partial) and not found.args:  # (partial(checkpoint, use_reentrant=False))
        found = found.func
    return getattr(found, "__name__", None) in _CALLERS and in_packages(getattr(found, "__module__", None), ("torch", "timm"))


def _items(chain: tuple[Any, ...]) -> tuple[Any, ...]:
    """The chain of an item of what ``chain`` names (``self.blocks`` -> each block; ``self.blocks.items`` too)."""
    return (chain[:-1] if chain and chain[-1] in _ITEMS else chain) + (None,)


def _loop_targets(ops: list[dis.Instruction], i: int) -> list[str]:
    """The locals a ``for`` loop's target stores each item in, where ``ops[i]`` is its ``FOR_ITER``
    (``for i, (blk, s) in ...``: every name it unpacks into), else none."""
    if i >= len(ops) or ops[i].opname != "FOR_ITER":
        return []
    return _unpacked_into(ops, i)


def _unpacked_into(ops: list[dis.Instruction], i: int) -> list[str]:
    """The locals an ``UNPACK_SEQUENCE`` (or a loop's ``FOR_ITER``) at ``ops[i]`` stores the items in (``a, b =
    self.blocks``: a block each; review R6), a nested target's too."""
    names, i = [], i + 1
    while i < len(ops) and ops[i].opname in ("UNPACK_SEQUENCE", "STORE_FAST", "STORE_DEREF"):
        if ops[i].opname != "UNPACK_SEQUENCE":
            names.append(ops[i].argval)
        i += 1
    return names


def _stored_in(ops: list[dis.Instruction], i: int) -> str | None:
    """The local that ``ops[i:]`` store the value before them in (``body = self.body``), else None (a loop's target
    is :func:`_loop_targets`')."""
    return ops[i].argval if i < len(ops) and ops[i].opname in ("STORE_FAST", "STORE_DEREF") else None


_ONE_LOAD = frozenset({"LOAD_FAST", "LOAD_DEREF", "LOAD_GLOBAL", "LOAD_NAME"})  # an index a name holds


def _steps(ops: list[dis.Instruction], i: int) -> tuple[Any, ...]:
    """The attributes and subscripts that follow ``ops[i - 1]`` (a load of ``self``), in order."""
    return _steps_to(ops, i)[0]


def _steps_to(ops: list[dis.Instruction], i: int) -> tuple[tuple[Any, ...], int]:
    """:func:`_steps`, and the place of the instruction after them (a ``GET_ITER`` where the chain is iterated)."""
    steps: list[Any] = []
    while i < len(ops):
        op = ops[i]
        if op.opname in ("LOAD_ATTR", "LOAD_METHOD"):
            steps.append(op.argval)
            i += 1
        elif i + 1 < len(ops) and ops[i + 1].opname == "BINARY_SUBSCR" and op.opname in ("LOAD_CONST", "LOAD_SMALL_INT"):
            steps.append(op.argval)
            i += 2
        elif i + 1 < len(ops) and ops[i + 1].opname == "BINARY_SUBSCR" and op.opname in _ONE_LOAD:
            # An index a name holds (``self.blocks[i].conv``, ``self.heads[k].proj``): any child, and the steps after
            # it on each (they stopped at the index, and a parent kept whole called the fused blocks' folded conv:
            # 195 off; review R6)
            steps.append(None)
            i += 2
        elif op.opname == "COPY" and op.arg == 1 and i + 1 < len(ops) and ops[i + 1].opname in ("STORE_FAST", "STORE_DEREF"):
            i += 2  # (an assignment expression: ``(blk := self.blocks[0]).conv(x)`` goes on to ``conv``)
        elif i + 1 < len(ops) and ops[i + 1].opname == "BINARY_SUBSCR" or op.opname == "GET_ITER":
            steps.append(None)  # an index computed (self.blocks[i + 1]), or every child (for b in self.blocks)
            break
        else:
            break
    return tuple(steps), i


def _through(root: nn.Module, chain: tuple[Any, ...], start: nn.Module | None = None) -> list[nn.Module]:
    """The submodules of ``root`` that ``chain`` (from ``root``, or from its descendant ``start``) reaches through,
    or whose tensors it reads."""
    obj, reached = root if start is None else start, []
    for k, step in enumerate(chain):
        if isinstance(step, _IfHeld) and not _holds(root, step.name):
            return reached  # (the module holds no such attribute: the call is never made)
        if isinstance(step, _IfHeld):
            return [*reached, *(m for m in obj.modules() if m is not root)]
        if isinstance(step, _Method) and step.name not in vars(root):
            continue  # (its own method, read)
        if step is ... or isinstance(step, _Method) or (step in _EVERY and _child(obj, step) is None) or (
                step in _TENSORS_OF and obj is not root and _child(obj, step) is None) or _delegated(obj, step):
            return [*reached, *(m for m in obj.modules() if m is not root)]  # every module below (see _handed_on)
        child = _child(obj, step)
        if child is not None:
            if obj is not root:
                reached.append(obj)  # on to a child of its own: its fused form has no such child
            obj = child
            continue
        if step is None:  # one of its children, by an index the code computes, or each (a loop's local; a name
            rest = chain[k + 1:]  # getattr computes: getattr(self, f"layer{i}").conv)
            below = [m for c in obj._modules.values() if c is not None for m in _through(root, rest, c)]
            return [*reached, *([] if obj is root else [obj]), *below]
        if obj is root:
            return reached  # its own attributes
        if step in obj._parameters or step in obj._buffers:
            following = chain[k + 1] if k + 1 < len(chain) else None
            return [] if following in _METADATA else [*reached, obj]  # its weights' values (not their dtype)
        return reached  # a method or a plain attribute of the child: read_outside's to see
    return reached


def _holds(obj: nn.Module, name: str) -> bool:
    """Whether ``obj.<name>`` may give something: an attribute of the instance or its class, a child, a tensor, or
    any name where its class answers unknown names itself (``__getattr__``)."""
    return (name in vars(obj) or any(name in d for d in (obj._modules, obj._parameters, obj._buffers))
            or inspect.getattr_static(obj, name, _MISSING) is not _MISSING or type(obj).__getattr__ is not nn.Module.__getattr__)


def _delegated(obj: nn.Module, step: Any) -> bool:
    """Whether ``step`` names nothing ``obj`` holds but its class answers it in a ``__getattr__`` of its own: PEFT's
    ``PeftModel`` hands unknown names to the model it wraps, so ``self.conv1`` is ``self.base_model.conv1``, which
    the fused form had folded (5.05e3 off on a branch the example did not take; review R10)."""
    if not isinstance(step, str) or type(obj).__getattr__ is nn.Module.__getattr__:
        return False
    held = (obj._modules, obj._parameters, obj._buffers)
    return not any(step in d for d in held) and inspect.getattr_static(obj, step, _MISSING) is _MISSING


_MISSING = object()


def _child(obj: nn.Module, step: Any) -> nn.Module | None:
    """``obj``'s child that ``step`` names (an attribute, a key, an index into a Sequential or a ModuleList)."""
    children = obj._modules
    if isinstance(step, str):
        return children.get(step)
    if isinstance(step, int) and not isinstance(step, bool) and -len(children) <= step < len(children):
        return list(children.values())[step]
    return None
