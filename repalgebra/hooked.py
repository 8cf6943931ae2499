"""A part whose module has forward hooks of its own, fused inside them: :class:`HookedPart`.

Grad-CAM and feature extractors put a forward hook on one block (``model.layer4[-1].register_forward_hook(save)``).
``torch.fx`` traces a module's ``forward`` without its hooks, so the block's own ``forward`` is fused as any part
is (its ``conv1 -> bn1`` fold), and the fused form is held in a :class:`HookedPart` that carries the block's hooks:
each call runs them around the fused ``forward`` as the block's call ran them around its own.  Pre-hooks see (and
may replace) the inputs ``forward`` is given, forward hooks its inputs and its output (and may replace that).

The hooks are the registries of the part ``fuse`` captured (a copy of the user's block, as for any part kept
whole): removing a handle on the user's model leaves the fused model's hooks in place, and the fused model's hooks
are removed from its :class:`HookedPart` (``part._forward_hooks.clear()``).  Their ``module`` argument is the
:class:`HookedPart`, not the block.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn
from torch.nn.modules import module as _torch_module  # its global hook registries

from repalgebra.frontend.fx_trace import WEIGHT_HOOKS, runs_own_hooks
from repalgebra.module_copy import copy_module

__all__ = ["HookedPart", "carry_hooks", "movable_hooks", "without_hooks"]

# Each registry of forward hooks and its flag registries: (hooks, flags keyed as they are).
_FORWARD = (("_forward_pre_hooks", ("_forward_pre_hooks_with_kwargs",)),
            ("_forward_hooks", ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")))
_BACKWARD = ("_backward_pre_hooks", "_backward_hooks")


def movable_hooks(module: nn.Module) -> bool:
    """Whether ``module``'s hooks may run around a fused form of its ``forward``: forward hooks or pre-hooks of its
    own (:func:`~repalgebra.frontend.fx_trace.runs_own_hooks`), none of them a weight hook (weight norm sets
    ``module.weight``, which a fused form holds no longer), no old-style backward hook (``register_backward_hook``
    hooks the grad_fn of the last op of ``forward``) and no hook registered for every module (each module call
    must run those: nothing folds)."""
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    return (runs_own_hooks(module) and not any(isinstance(h, WEIGHT_HOOKS) for h in hooks)
            and module._is_full_backward_hook is not False
            and not (_torch_module._global_forward_pre_hooks or _torch_module._global_forward_hooks))


def _own(hook: Any) -> bool:
    """Whether ``hook`` is the user's, not a check of a part fused before (``checks_only``: it stays on that part)."""
    return not getattr(hook, "checks_only", False)


def without_hooks(module: nn.Module) -> nn.Module:
    """A copy of ``module`` without its own forward and backward hooks: its ``forward`` as ``torch.fx`` traces it (a
    :class:`HookedPart` gives its fused form back, whose hooks were the part's)."""
    if isinstance(module, HookedPart):  # fused again: one HookedPart, around the new fused form
        return copy_module(module.inner)
    bare = copy_module(module)
    for hooks, flags in _FORWARD:
        registry = getattr(bare, hooks)
        for key in [k for k, h in registry.items() if _own(h)]:
            del registry[key]
            for flag in flags:
                getattr(bare, flag).pop(key, None)
    for hooks in _BACKWARD:
        getattr(bare, hooks).clear()
    object.__setattr__(bare, "_is_full_backward_hook", None)  # (not its __setattr__: an immutable block refuses it)
    return bare


def carry_hooks(part: nn.Module, hooked: nn.Module) -> None:
    """Give ``part`` the forward hooks, pre-hooks and backward hooks ``hooked`` has of its own, in their order, with
    their flags (``with_kwargs``, ``always_call``) and ids: registries of its own, which no handle of ``hooked`` reaches."""
    for hooks, flags in _FORWARD:
        kept = OrderedDict((k, h) for k, h in getattr(hooked, hooks).items() if _own(h))
        setattr(part, hooks, kept)
        for flag in flags:
            setattr(part, flag, OrderedDict((k, v) for k, v in getattr(hooked, flag).items() if k in kept))
    for hooks in _BACKWARD:
        setattr(part, hooks, OrderedDict(getattr(hooked, hooks)))
    part._is_full_backward_hook = hooked._is_full_backward_hook


class HookedPart(nn.Module):
    """``inner`` (a fused ``forward``) called with the hooks ``hooked`` had of its own (:func:`carry_hooks`)."""

    def __init__(self, inner: nn.Module, hooked: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        carry_hooks(self, hooked)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)
