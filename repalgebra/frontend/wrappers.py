"""Modules that only wrap another: ``torch.compile``'s ``OptimizedModule``, ``nn.DataParallel`` and
``DistributedDataParallel``.

Their ``forward`` computes the wrapped module's function: compiled by dynamo, or with the batch split over
devices and gathered again.  Neither can be captured as written (fx refuses a dynamo-optimized function, and
``torch.export`` of one recompiles it at fixed shapes), so ``fuse`` captures the module they wrap, at the path
``torch`` gives it (``model._orig_mod``, ``model.module``), and says so in its report.

A ``forward`` compiled on the instance (Hugging Face's ``model.forward = torch.compile(model.forward)``) is
unwrapped the same way, for the model itself: ``fuse`` captures a shallow copy running the method it compiles; and
for a part (``self.encoder.forward = torch.compile(self.encoder.forward)``): a copy of the model whose part runs the
method it compiles.  The compile wrapper is not kept in the fused model.

Only a wrapper that adds nothing is one: a wrapper with hooks of its own (a post-processor on the compiled
model's output) or a subclass with its own ``forward`` computes more than the module it wraps, so it is
fused as any other module (kept whole, with the module it wraps fused inside).
"""

from __future__ import annotations

import copy
import inspect
import sys
import types

from torch import nn

__all__ = ["is_wrapper", "wrapped", "unwrap", "without_compiled_forward", "without_compiled_parts"]


def _wrappers() -> dict[type, tuple[str, str]]:
    """Each wrapper class: the attribute holding the module it runs, and what to call it in the report."""
    table = {nn.DataParallel: ("module", "an nn.DataParallel"),
             nn.parallel.DistributedDataParallel: ("module", "an nn.DistributedDataParallel")}
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # imported by torch.compile: no compiled module without it
    if dynamo is not None:
        table[dynamo.OptimizedModule] = ("_orig_mod", "a torch.compile wrapper (OptimizedModule)")
    return table


def is_wrapper(m: nn.Module) -> bool:
    """Whether ``m`` is a wrapper (of a class above), whether or not it adds hooks or a ``forward`` of its own."""
    return isinstance(m, tuple(_wrappers()))


def wrapped(m: nn.Module) -> tuple[str, str] | None:
    """``(attribute, what m is)`` where ``m`` only wraps the module ``getattr(m, attribute)``; else None."""
    if m._forward_pre_hooks or m._forward_hooks:  # hooks of its own run around the wrapped module's call
        return None
    return next((w for cls, w in _wrappers().items() if _plain(m, cls)), None)


def _plain(m: nn.Module, cls: type) -> bool:
    """Whether ``m`` is a ``cls`` that calls and computes as ``cls`` does (a subclass may override neither)."""
    kind = type(m)
    return isinstance(m, cls) and kind.forward is cls.forward and kind.__call__ is cls.__call__


def unwrap(model: nn.Module) -> tuple[nn.Module, str | None]:
    """The module ``model`` wraps (through every layer of wrapping), and a report note; ``(model, None)`` where it
    wraps none.  A forward compiled on the instance (:func:`without_compiled_forward`) is taken off a shallow copy."""
    inner, path, what = model, "model", []
    while (w := wrapped(inner)) is not None:
        attribute, kind = w
        inner, path = getattr(inner, attribute), f"{path}.{attribute}"
        what.append(kind)
    plain = without_compiled_forward(inner)
    note = None if inner is model else (f"the model is {' of '.join(what)}: fused {path}, the module it runs (the same "
                                        "function); wrap the fused module again to run it compiled or on several devices")
    inner, parts = without_compiled_parts(inner if plain is None else plain)
    if parts:
        note = "; ".join([*([note] if note else []), *parts])
    if plain is None:
        return inner, note
    compiled = (f"the forward of {path} is torch.compile's of its own method ({path}.forward = torch.compile(...)): "
                "fused the method it compiles (the same function); compile the fused module's forward again to run it compiled")
    return inner, compiled if note is None else f"{note}; {compiled}"


def without_compiled_forward(m: nn.Module) -> nn.Module | None:
    """A shallow copy of ``m`` running the method that ``m.forward``, set on the instance by Hugging Face's recipe
    ``model.forward = torch.compile(model.forward)``, compiles; None where ``m`` has no such forward.

    fx refuses a dynamo-optimized function (the model went to torch.export at fixed sizes, compiling it again), and
    the compiled function calls the method of ``m`` itself, the user's model, from every copy ``fuse`` makes.  The
    copy holds the class's ``forward`` (or the method compiled, bound to the copy) and shares the rest with ``m``,
    which ``fuse`` copies before it runs anything."""
    method = _compiled_method(m)
    if method is None:
        return None
    plain = copy.copy(m)
    _run_plain(plain, method)
    return plain


def without_compiled_parts(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """``model``, or a copy of it where each part whose forward is compiled on the instance
    (``self.encoder.forward = torch.compile(self.encoder.forward)``) runs the method compiled; and a note per part.
    (The root is :func:`without_compiled_forward`'s.)

    The copy is shallow along the paths to those parts (a part or parent met twice is copied once) and shares the
    rest with ``model``, which ``fuse`` copies before it runs anything.  fx refuses a compiled function (the model
    went to torch.export at fixed sizes), and ``fuse``'s copies of it would call the method of the user's part.  The
    fused model's part is its fused form, without the compile wrapper, as for the root."""
    parts = [(path, m, method) for path, m in model.named_modules(remove_duplicate=False)
             if path and (method := _compiled_method(m)) is not None]
    if not parts:
        return model, []
    made: dict[int, nn.Module] = {}

    def copied(m: nn.Module) -> nn.Module:
        if id(m) not in made:
            made[id(m)] = copy.copy(m)
            made[id(m)]._modules = dict(m._modules)  # (its own table: the parts set below are the copy's only)
        return made[id(m)]

    root, notes = copied(model), []
    for path, m, method in parts:
        parent = root
        for name in path.split(".")[:-1]:
            parent._modules[name] = copied(parent._modules[name])
            parent = parent._modules[name]
        part = parent._modules[path.split(".")[-1]] = copied(m)
        if "forward" in vars(part):
            _run_plain(part, method)
        notes.append(f"the forward of {path!r} is torch.compile's of its own method ({path}.forward = torch.compile(...)): "
                     "fused the method it compiles (the same function); the fused model's part is not compiled")
    return root, list(dict.fromkeys(notes))


def _compiled_method(m: nn.Module) -> types.MethodType | None:
    """The method of ``m`` that a forward set on ``m`` by ``torch.compile`` compiles, or None (no such forward, or a
    function of other objects, which stays as it is)."""
    fn = vars(m).get("forward")
    if fn is None or not hasattr(fn, "_torchdynamo_orig_callable"):
        return None
    method = inspect.unwrap(fn)  # (torch keeps the compiled callable under __wrapped__ too)
    return method if inspect.ismethod(method) and method.__self__ is m else None


def _run_plain(m: nn.Module, method: types.MethodType) -> None:
    """Make ``m`` (a copy of ``method``'s module) run ``method``'s function on itself: its class's forward where it is
    that one."""
    if method.__func__ is type(m).forward:
        del vars(m)["forward"]
    else:
        vars(m)["forward"] = types.MethodType(method.__func__, m)
