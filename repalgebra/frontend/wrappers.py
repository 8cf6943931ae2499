"""Modules that only wrap another: ``torch.compile``'s ``OptimizedModule``, ``nn.DataParallel`` and
``DistributedDataParallel``.

Their ``forward`` computes the wrapped module's function: compiled by dynamo, or with the batch split over
devices and gathered again.  Neither can be captured as written (fx refuses a dynamo-optimized function, and
``torch.export`` of one recompiles it at fixed shapes), so ``fuse`` captures the module they wrap, at the path
``torch`` gives it (``model._orig_mod``, ``model.module``), and says so in its report.
"""

from __future__ import annotations

import sys

from torch import nn

__all__ = ["wrapped", "unwrap"]


def wrapped(m: nn.Module) -> tuple[str, str] | None:
    """``(attribute, what m is)`` where ``m`` only wraps the module ``getattr(m, attribute)``; else None."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # imported by torch.compile: no compiled module without it
    if dynamo is not None and isinstance(m, dynamo.OptimizedModule):
        return "_orig_mod", "a torch.compile wrapper (OptimizedModule)"
    if isinstance(m, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return "module", f"an nn.{type(m).__name__}"
    return None


def unwrap(model: nn.Module) -> tuple[nn.Module, str | None]:
    """The module ``model`` wraps (through every layer of wrapping), and a report note; ``(model, None)`` where it
    wraps none."""
    inner, path, what = model, "model", []
    while (w := wrapped(inner)) is not None:
        attribute, kind = w
        inner, path = getattr(inner, attribute), f"{path}.{attribute}"
        what.append(kind)
    if inner is model:
        return model, None
    return inner, (f"the model is {' of '.join(what)}: fused {path}, the module it runs (the same function); "
                   "wrap the fused module again to run it compiled or on several devices")
