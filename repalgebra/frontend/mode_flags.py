"""Mode flags a forward reads while it is captured: a capture would fix the branch they chose.

``if torch.is_grad_enabled():``, ``if torch.compiler.is_compiling():``,
``torch.is_autocast_enabled()`` or ``torch.fx._symbolic_trace.is_fx_tracing()``
answer for the capture, not for the call: torch.fx traces with gradients on,
torch.export under ``no_grad`` and while "compiling", both outside autocast,
and the user calls the fused model either way (Hugging Face's attention asks
whether autocast is on).
``nn.TransformerEncoder`` is the case in torch itself: under ``no_grad`` it
runs padded batches as nested tensors and returns zeros at padded positions,
which a capture (any of them) would not.

While a capture runs, the model's code sees these functions raise
:class:`ModeFlagRead`, so the capture fails with that reason and ``fuse`` keeps
the module that reads the flag whole: its own ``forward`` asks on every call,
as the model does.  Only the model's code is watched: the globals of the
functions its classes define (``torch`` there is a stand-in that hands out
everything else as it is, ``torch._C`` too, and a flag function imported by
name is replaced), and the flag functions its classes hold as attributes
(``autocast_on = staticmethod(torch.is_autocast_enabled)``).  A refusal the
model's code catches itself (``except Exception: flag = False``) is raised
again when the capture ends.  torch itself is not patched, so its internals
(and torch.compile's tables of these functions) see the real ones; another
thread running the same code meanwhile gets the real answer too.  Code of
other modules the forward calls into is not watched, nor a flag function bound
on an instance or as a default argument: ``fuse`` checks a torch.export
capture with gradients on and under ``torch.inference_mode`` as well, and an
fx capture under ``torch.inference_mode``, where such a branch shows at the
example; none is checked under ``torch.autocast``.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
import types
from typing import Any, Callable, Iterator

import torch
import torch.fx._symbolic_trace as symbolic_trace
from torch import nn

__all__ = ["ModeFlagRead", "code_namespaces", "mode_flags_noted", "mode_flags_refused"]


class ModeFlagRead(TypeError):
    """The model's code read a mode flag while it was captured."""


# The refusals of the capture under way in this thread (:func:`mode_flags_refused`), swallowed or not
_capture = threading.local()
_capture.refused = []


# The flag functions by the module that holds them; each is refused where the model's code calls it.
_FLAGS: dict[types.ModuleType, tuple[str, ...]] = {
    torch: ("is_grad_enabled", "is_inference_mode_enabled", "is_autocast_enabled", "is_autocast_cpu_enabled",
            "get_autocast_dtype", "get_autocast_cpu_dtype", "get_autocast_gpu_dtype", "is_autocast_cache_enabled",
            "are_deterministic_algorithms_enabled", "is_deterministic_algorithms_warn_only_enabled"),
    torch.compiler: ("is_compiling", "is_dynamo_compiling", "is_exporting"),
    torch.onnx: ("is_in_onnx_export",),  # YOLOv6's and mmdet heads' export branch
    torch._utils: ("is_compiling",),
    # the same functions as torch's (and a few of its own), reached as ``torch._C.is_inference_mode_enabled()``
    torch._C: ("is_grad_enabled", "is_inference_mode_enabled", "is_autocast_enabled", "is_autocast_cpu_enabled",
               "get_autocast_dtype", "get_autocast_cpu_dtype", "get_autocast_gpu_dtype", "is_autocast_cache_enabled",
               "_is_any_autocast_enabled", "_get_deterministic_algorithms", "_get_deterministic_algorithms_warn_only"),
    symbolic_trace: ("is_fx_tracing", "is_fx_symbolic_tracing"),
}
# Flags answered as the model runs eagerly, and noted: whether TorchScript traces or compiles the code.  A fused
# model traced with torch.jit.trace (or scripted) takes the eager branch where the model's own code may take
# another; keeping whole every part that asks would cost timm's LeViT and EfficientFormer attention (``if
# torch.jit.is_tracing() or self.training:``, two ways to one value) their folds, so the report says it instead.
_ANSWERED: dict[types.ModuleType, tuple[str, ...]] = {
    torch.jit: ("is_tracing", "is_scripting"),
    torch._C: ("_get_tracing_state",),  # torchvision's _is_tracing()
}
# How the model's code reaches them: ``torch.compiler.is_compiling``, ``torch.fx._symbolic_trace.is_fx_tracing``.
_ROUTES: dict[types.ModuleType, dict[str, types.ModuleType]] = {
    torch: {"compiler": torch.compiler, "_utils": torch._utils, "fx": torch.fx, "onnx": torch.onnx, "jit": torch.jit,
            "_C": torch._C},
    torch.fx: {"_symbolic_trace": symbolic_trace},
}


def _flags() -> dict[types.ModuleType, tuple[str, ...]]:
    """:data:`_FLAGS`, and ``torch._dynamo.is_compiling``: the older spelling of ``torch.compiler.is_compiling`` (a
    function of its own, which torch.export answers True), still common in public code (litgpt, torchao).  Missed,
    an export capture dropped the eager branch it guards (a clamp: 105 off at other values; review R13a).  Also
    ``torch._guards.detect_fake_mode`` and the dispatch mode's flag, which a trace answers otherwise (review R14a).
    ``torch._dynamo`` takes a second to import, so it is imported at the first capture, which needs it anyway (not
    cached: a dict of a few entries, and no state of this module's)."""
    import torch._dynamo.external_utils as external_utils
    import torch._guards
    import torch.utils._python_dispatch as python_dispatch

    return {**_FLAGS, torch._dynamo: ("is_compiling",), external_utils: ("is_compiling",),
            torch._guards: ("detect_fake_mode",), python_dispatch: ("is_in_torch_dispatch_mode",)}


def _routes() -> dict[types.ModuleType, dict[str, types.ModuleType]]:
    """:data:`_ROUTES`, and the routes to ``torch._dynamo``'s flag (:func:`_flags`)."""
    import torch._dynamo.external_utils as external_utils
    import torch._guards
    import torch.utils._python_dispatch as python_dispatch

    return {**_ROUTES, torch: {**_ROUTES[torch], "_dynamo": torch._dynamo, "_guards": torch._guards, "utils": torch.utils},
            torch._dynamo: {"external_utils": external_utils}, torch.utils: {"_python_dispatch": python_dispatch}}


class _Watched(types.ModuleType):
    """A stand-in for a module in the model's namespace: its flag functions refuse, the rest is the module's."""

    def __init__(self, real: types.ModuleType, noted: list[str] | None, answered: list[str]) -> None:
        super().__init__(real.__name__, real.__doc__)
        for table, notes in ((_flags(), noted), (_ANSWERED, answered)):
            vars(self).update({name: _refusing(getattr(real, name), f"{real.__name__}.{name}()", notes)
                               for name in table.get(real, ()) if callable(getattr(real, name, None))})
        vars(self).update({name: _Watched(sub, noted, answered) for name, sub in _routes().get(real, {}).items()})
        vars(self)["_real"] = real
        vars(self)["_read"] = {name: _refusing(lambda name=name: getattr(real, name), f"{real.__name__}.{name}", noted)
                               for name in _FLAG_ATTRIBUTES.get(real, ())}

    def __getattr__(self, name: str) -> Any:
        return _attribute(vars(self), name)


def _attribute(held: dict[str, Any], name: str) -> Any:
    """The attribute ``name`` of a stand-in's module (``held``: the stand-in's own attributes): a flag it holds as a
    value (:data:`_FLAG_ATTRIBUTES`) refused or noted on the read, anything else the module's."""
    if name in held["_read"]:
        return held["_read"][name]()
    return getattr(held["_real"], name)


# Flags a module holds as plain values, which torch.export sets while it traces (shims of public code read fx's)
_FLAG_ATTRIBUTES: dict[types.ModuleType, tuple[str, ...]] = {symbolic_trace: ("_is_fx_tracing_flag",)}


def _refusing(original: Callable[..., bool], name: str, noted: list[str] | None) -> Callable[..., bool]:
    """``original`` as the model's code sees it: refusing, or (``noted`` given) answering and noting ``name`` there."""
    capturing = threading.get_ident()  # another thread running the same code meanwhile gets the real answer

    def flag(*args: Any, **kwargs: Any) -> bool:
        if threading.get_ident() != capturing:
            return original(*args, **kwargs)
        if noted is not None:
            noted.append(name)
            return original(*args, **kwargs)
        owner = sys._getframe(1).f_locals.get("self")
        where = f" (in the forward of {type(owner).__name__})" if isinstance(owner, nn.Module) else ""
        refused = ModeFlagRead(f"its code reads {name}{where}: what it computes depends on how it is called, and a "
                               "capture would fix the answer it got while capturing")
        _capture.refused.append(refused)  # (a shim's ``except Exception: flag = False`` may swallow it)
        raise refused

    flag.__wrapped__ = original  # type: ignore[attr-defined]
    return flag


def code_namespaces(model: nn.Module) -> list[dict[str, Any]]:
    """The global namespaces of the code of ``model``'s classes (and their bases), torch.nn's layers included: each
    function's own ``__globals__`` beside ``sys.modules[cls.__module__]``, which a ``hubconf.py`` that torch.hub
    execs is not registered in, and which a library that rewrites ``cls.__module__`` to its public package names
    wrongly (found by a review)."""
    seen: dict[int, dict[str, Any]] = {}
    for cls in {type(m) for m in model.modules()}:
        for base in cls.__mro__:
            if base in (nn.Module, object):
                continue
            module = sys.modules.get(base.__module__)  # (where a decorator's wrapper hides a function)
            for namespace in [*(vars(module) for module in [module] if module is not None),
                              *(function.__globals__ for function in _functions(base))]:
                name = str(namespace.get("__name__", ""))
                if not name.startswith("torch.") or name.startswith("torch.nn.modules."):
                    seen.setdefault(id(namespace), namespace)
    return list(seen.values())


def _functions(cls: type) -> list[types.FunctionType]:
    """The Python functions defined on ``cls``: its methods, static and class methods, and properties' getters."""
    found = []
    for value in vars(cls).values():
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        elif isinstance(value, property):
            value = value.fget
        if isinstance(value, types.FunctionType):
            value = inspect.unwrap(value)  # the function a decorator wraps (@torch.no_grad())
        if isinstance(value, types.FunctionType):
            found.append(value)
    return found


def _bound_on_classes(model: nn.Module) -> list[tuple[type, str, Any]]:
    """The flag functions ``model``'s classes hold as attributes (``autocast_on = staticmethod(torch.is_autocast_enabled)``):
    bound at class creation, which no namespace's stand-in reaches, ``(class, name, value)``."""
    found = []
    for cls in {type(m) for m in model.modules()}:
        for base in cls.__mro__:
            if base in (nn.Module, object) or base.__module__.startswith("torch."):
                continue
            for name, value in vars(base).items():
                function = value.__func__ if isinstance(value, staticmethod) else value
                if callable(function) and not isinstance(function, type) and _is_flag(function):
                    found.append((base, name, value))
    return list(dict.fromkeys(found))


def _is_flag(value: Any) -> bool:
    """Whether ``value`` is one of the flag functions of :func:`_flags` or :data:`_ANSWERED`."""
    return any(value is getattr(owner, name, None) for table in (_flags(), _ANSWERED) for owner, names in table.items()
               for name in names)


def _stand_in(value: Any, watched: dict[int, Any], noted: list[str] | None, answered: list[str]) -> Any:
    """What the model's code sees instead of ``value`` (a module or a flag function), else None."""
    routes = _routes()
    if isinstance(value, types.ModuleType) and (value in _flags() or value in _ANSWERED or value in routes) or value is torch.fx:
        return watched.setdefault(id(value), _Watched(value, noted, answered))
    for table, notes in ((_flags(), noted), (_ANSWERED, answered)):
        for owner, names in table.items():
            for name in names:
                if value is getattr(owner, name, None):
                    return _refusing(value, f"{owner.__name__}.{name}()", notes)
    if (isinstance(value, types.FunctionType) and value.__name__ in _LIBRARY_FLAGS and not str(value.__module__).startswith("torch")
            and _asks_a_capture(value)):
        return _refusing(value, f"{value.__module__}.{value.__name__}()", noted)
    return None


def _asks_a_capture(function: types.FunctionType) -> bool:
    """Whether a library's flag helper asks whether dynamo, an export or fx runs (the names its code, nested code
    too, loads): mmpretrain's own ``is_tracing()`` asks ``torch.jit.is_tracing()`` only, a TorchScript flag answered
    as the model runs eagerly; refused by its name, the model it was in was kept whole and lost its folds (R15a)."""
    def names(code: types.CodeType) -> set[str]:
        return set(code.co_names).union(*(names(c) for c in code.co_consts if isinstance(c, types.CodeType)))

    return not (names(function.__code__) - {function.__name__}).isdisjoint(_CAPTURE_NAMES)


# Flag helpers of model libraries, which the model's code imports by name: Hugging Face's
# ``transformers.utils.is_torchdynamo_compiling()`` imports torch inside the function (no stand-in of this module
# reaches it there) and asks ``torch.compiler.is_compiling()``; a torch.export capture fixed its answer, True, and
# dropped the eager branch (11.7 off; review R14a).  ``is_tracing`` is transformers 5's (jit, fx or dynamo), and
# ``is_torch_fx_proxy`` answers True for fx's traced values only.
_LIBRARY_FLAGS = frozenset({"is_torchdynamo_compiling", "is_torchdynamo_exporting", "is_tracing", "is_torch_fx_proxy"})
# What a helper asking whether a capture runs loads: torch's flags (and the library's own helpers that ask them)
_CAPTURE_NAMES = frozenset({"is_compiling", "is_dynamo_compiling", "is_exporting", "_dynamo", "dynamo", "is_fx_tracing",
                            "is_fx_symbolic_tracing", "Proxy", "FakeTensor", *_LIBRARY_FLAGS})


@contextlib.contextmanager
def mode_flags_refused(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, ``model``'s code raises :class:`ModeFlagRead` where it calls a mode flag function; the list
    yielded notes the TorchScript flags it read (:data:`_ANSWERED`), which answer as the model runs eagerly.  A
    refusal the model's code caught itself (``try: ... except Exception: deploying = False``, a shim for old torch)
    is raised again as the block ends: the capture went on with an answer the model may not get when called."""
    answered: list[str] = []
    outer, _capture.refused = getattr(_capture, "refused", []), []
    try:
        with _watched(model, None, answered):
            yield answered
        if _capture.refused:
            raise _capture.refused[0]
    finally:
        _capture.refused = outer


@contextlib.contextmanager
def mode_flags_noted(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, ``model``'s code gets the mode flags' answers, and the list yielded notes each flag it read
    (``torch.onnx.is_in_onnx_export()``: an export of a part kept whole takes the branch meant for exports)."""
    noted: list[str] = []
    with _watched(model, noted, noted):
        yield noted


@contextlib.contextmanager
def _watched(model: nn.Module, noted: list[str] | None, answered: list[str]) -> Iterator[None]:
    """The flag functions in the namespaces of ``model``'s code swapped for stand-ins (:func:`_refusing`)."""
    watched: dict[int, Any] = {}
    swapped: list[tuple[dict[str, Any], str, Any]] = []
    classes: list[tuple[type, str, Any]] = []
    try:
        for namespace in code_namespaces(model):
            for name, value in list(namespace.items()):
                if not (isinstance(value, types.ModuleType) or callable(value)):
                    continue
                stand_in = _stand_in(value, watched, noted, answered)
                if stand_in is not None:
                    swapped.append((namespace, name, value))
                    namespace[name] = stand_in
        for cls, name, value in _bound_on_classes(model):
            function = value.__func__ if isinstance(value, staticmethod) else value
            stand_in = _stand_in(function, watched, noted, answered)
            classes.append((cls, name, value))
            setattr(cls, name, staticmethod(stand_in))  # (a builtin held as it is binds no self either)
        yield
    finally:
        for cls, name, value in reversed(classes):
            setattr(cls, name, value)
        for namespace, name, value in reversed(swapped):
            namespace[name] = value
