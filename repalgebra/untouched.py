"""What ``fuse`` leaves as it found it, though it runs the user's model many times.

``fuse`` runs copies of the model to capture and check it.  Two things those runs can change lie outside the
copies: torch's global random generators (a forward that draws noise, ``torch.randn_like(x)``), and the user's own
model where a hook names it as a global (``def hook(m, i, o): model.calls += 1`` at module level: a hook's
closure cells are given the copy's objects, its globals are not).  :func:`rng_kept` restores the first, :func:`tensors_kept` the
parameters and buffers of the second, and says which it restored; :func:`model_kept` its plain attributes (a call
counter, a collector's list and mode flag: a probe found a never-called model at ``n_calls = 13``, collector off)
and its hooks (a one-shot hook removes itself through the handle its closure holds, which is the user's: the
user's model had lost its hook).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch
from torch import nn

from repalgebra.draws import generators_kept
from repalgebra.frontend.fx_trace import WEIGHT_HOOKS
from repalgebra.frontend.state import plain_attributes
from repalgebra.frontend.state_keys import attribute_key, changed_names, equal_values, plain_object

__all__ = ["attributes_kept", "model_kept", "rng_kept", "tensors_kept"]

HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
              "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


@contextlib.contextmanager
def rng_kept(model: nn.Module, inputs: Any) -> Iterator[None]:
    """Within the block, the global generators may advance: after it, they are where they were (torch's CPU one
    and those of the CUDA devices the model's tensors and ``inputs`` are on, Python's ``random`` and numpy's)."""
    tensors = [*model.parameters(), *model.buffers(), *torch.utils._pytree.tree_leaves(inputs)]
    devices = sorted({t.device.index or 0 for t in tensors if torch.is_tensor(t) and t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), generators_kept():  # (and Python's and numpy's)
        yield


@contextlib.contextmanager
def tensors_kept(model: nn.Module, restored: list[str]) -> Iterator[None]:
    """Within the block, the model's hooks may change its parameters and buffers: after it, each holds the tensor and
    the values it held before, and ``restored`` names those that were changed.  Nothing else of the model's runs on
    the model itself rather than on a copy, so where no hook may write it (:func:`_hooks_may_write`) nothing is
    saved: the save is a copy of every parameter."""
    writes = _hooks_may_write(model)
    saved = [(path, table, name, t, t.detach().clone())
             for path, m in model.named_modules() if writes
             for table in (m._parameters, m._buffers)
             for name, t in table.items() if t is not None]
    try:
        yield
    finally:
        for path, table, name, t, values in saved:
            if table.get(name) is t and t.shape == values.shape and equal_values(t.detach(), values):
                continue
            table[name] = t
            with torch.no_grad():
                t.set_(values) if t.shape != values.shape else t.copy_(values)
            restored.append(f"{path}.{name}" if path else name)


@contextlib.contextmanager
def model_kept(model: nn.Module, restored: list[str]) -> Iterator[None]:
    """Within the block, the model's hooks may set its plain attributes and remove hooks: after it, each module holds
    the attributes (and their containers the items) and the hooks it held, and ``restored`` names the attributes
    that were changed."""
    before = _attribute_keys(model)
    with hooks_kept(model), attributes_kept(model):
        try:
            yield
        finally:
            restored += sorted(changed_names(before, _attribute_keys(model)))


def _attribute_keys(model: nn.Module) -> dict[str, Any]:
    """Each plain attribute of ``model``'s modules by path, as a snapshot sees it (what a call could change)."""
    return {f"{path}.{name}" if path else name: attribute_key(v)
            for path, m in model.named_modules() for name, v in plain_attributes(m).items()}


@contextlib.contextmanager
def hooks_kept(model: nn.Module) -> Iterator[None]:
    """Within the block, hooks may be removed from ``model``'s modules: after it, each holds the hooks it held, in
    their order."""
    saved = [(d, dict(d)) for m in model.modules() for name in HOOK_DICTS if isinstance(d := vars(m).get(name), dict)]
    try:
        yield
    finally:
        for d, items in saved:
            if list(d.items()) != list(items.items()):
                d.clear()
                d.update(items)


@contextlib.contextmanager
def attributes_kept(model: nn.Module) -> Iterator[None]:
    """Within the block a forward may set plain attributes of ``model``'s modules (a cache it fills on its first call,
    ``self.cache[L] = self.kernel(L)``): after it, each module holds the attributes it held, and each dict, list or
    set among them (and in them) its items.  For runs that are not the model's own: a check in float64 filled the cache of the
    copy ``fuse`` keeps with float64 values, and its next run in float32 failed (found by a probe)."""
    saved = []
    for m in model.modules():
        own = plain_attributes(m)
        saved.append((m, own, [(v, copy.copy(v)) for v in _containers(list(own.values()))]))
    try:
        yield
    finally:
        for m, own, containers in saved:
            for name in set(plain_attributes(m)) - set(own):
                del vars(m)[name]
            vars(m).update(own)
            for v, items in containers:
                v.clear()
                v.update(items) if isinstance(v, (dict, set)) else v.extend(items)


def _containers(values: list, depth: int = 3) -> list:
    """The dicts, lists and sets among ``values`` (an ``OrderedDict`` or a ``defaultdict`` too, a plain object's
    attributes) and those they hold,
    ``depth`` levels deep (a cache ``{"len": {}}``; a review found them left filled)."""
    found = []
    for v in values:
        v = vars(v) if plain_object(v) else v  # (a plain object's attributes: ``self.stats.n += 1``)
        if isinstance(v, (dict, list, set)):
            found.append(v)
            if depth > 1 and not isinstance(v, set):
                found += _containers(list(v.values()) if isinstance(v, dict) else v, depth - 1)
    return found


def _hooks_may_write(model: nn.Module) -> bool:
    """Whether a forward hook or pre-hook of ``model`` (or a global one) may write tensors of the model: any but a
    check that changes nothing (a fused model's guard) and a weight hook, which sets the module it is called with
    a plain ``weight`` from its parameters (``weight_norm``, ``spectral_norm``, ``prune``)."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    return any(not (getattr(h, "checks_only", False) or isinstance(h, WEIGHT_HOOKS))
               for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))
