"""A deep copy of a user's model, also where ``copy.deepcopy`` refuses one.

The old hook-based ``torch.nn.utils.weight_norm`` (and ``spectral_norm``) keeps the conv's ``weight`` as a
plain attribute that its forward pre-hook recomputes from ``weight_g`` and ``weight_v`` before every call.
Computed with autograd on (when the hook is registered, or after a training step), it is a non-leaf tensor,
and ``copy.deepcopy`` raises "Only Tensors created explicitly by the user (graph leaves) support the deepcopy
protocol".  :func:`copy_module` copies such tensors detached: their values are the same, and the hook
recomputes them from the copied parameters anyway.

Where a copy still fails (a module holds a lock, a generator, or an object whose copy holds one, so that the model
copies once and its copy does not), the error names the attribute that does not copy.
"""

from __future__ import annotations

import copy
from typing import TypeVar

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
        return copy.deepcopy(model, memo)
    except Exception as e:
        raise TypeError(f"cannot copy {type(model).__name__}: {_uncopyable(model) or ''}{e}") from e


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
