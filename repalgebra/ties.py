"""Parameters the model ties stay tied in the fused model.

A language model's output head often reuses its embedding matrix (``head.weight = emb.weight``): one parameter
under two names.  ``fuse`` builds the fused model's modules from the graph, each with its own tensors, so the two
would come back as copies: equal values, the memory twice, and a fine-tune of the fused model would move them apart.
:func:`retie` makes them one parameter again.

Tying changes no value, so it cannot change what the fused model computes.  What must hold is that the tensors tied
are copies of the one the model ties, not a weight that only happens to be equal: a fused parameter is taken for a
copy of a tied parameter where it equals it exactly (dtype, shape, every element) and the tied parameter is not
constant and equal to no other parameter of the model (a fold does not write a trained embedding matrix by chance;
a LayerNorm weight of ones may be written by many).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["retie"]


def retie(fused: nn.Module, model: nn.Module) -> list[str]:
    """Make the parameters of ``fused`` that are copies of one parameter ``model`` holds under several names one
    parameter again; returns those names (``"emb.weight = head.weight"``), a line per parameter tied."""
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    tied = []
    for key, p in params.items():
        if len(names[key]) < 2 or not _distinctive(p, [q for q in params.values() if q is not p]):
            continue
        slots = [(m, attr) for m in fused.modules() for attr, q in m._parameters.items() if q is not None and _same(q, p)]
        if len({id(m._parameters[attr]) for m, attr in slots}) < 2:
            continue
        one = slots[0][0]._parameters[slots[0][1]]
        for m, attr in slots:
            setattr(m, attr, one)
        tied.append(" = ".join(names[key]))
    return tied


def _distinctive(p: torch.Tensor, others: list[torch.Tensor]) -> bool:
    """Whether a tensor exactly equal to ``p`` can only be a copy of it: ``p`` is not constant, and no other
    parameter equals it."""
    flat = p.detach().flatten()
    return flat.numel() > 1 and not bool((flat == flat[0]).all()) and not any(_same(q, p) for q in others)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.device == b.device and torch.equal(a.detach(), b.detach())
