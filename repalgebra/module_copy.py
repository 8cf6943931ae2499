"""A deep copy of a user's model, also where ``copy.deepcopy`` refuses one.

The old hook-based ``torch.nn.utils.weight_norm`` (and ``spectral_norm``) keeps the conv's ``weight`` as a
plain attribute that its forward pre-hook recomputes from ``weight_g`` and ``weight_v`` before every call.
Computed with autograd on (when the hook is registered, or after a training step), it is a non-leaf tensor,
and ``copy.deepcopy`` raises "Only Tensors created explicitly by the user (graph leaves) support the deepcopy
protocol".  :func:`copy_module` copies such tensors detached: their values are the same, and the hook
recomputes them from the copied parameters anyway.
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
    return copy.deepcopy(model, memo)
