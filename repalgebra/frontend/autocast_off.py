"""Where a forward turns ``torch.autocast`` off while it is captured: a capture runs outside autocast, where turning
it off does nothing, so neither torch.fx nor torch.export records the block; under a caller's autocast the model
computes that block in full precision and a graph without it would compute it in half.

:func:`autocast_turned_off` reports each such block as it is entered: a ``with torch.autocast(device,
enabled=False):`` (Hugging Face's rotary embeddings, mmdet's pools), and a call of a function decorated with
``@torch.amp.custom_fwd(cast_inputs=...)`` (Deformable DETR's attention, LightGlue's keypoint normalisation),
whose wrapper enters that block only where the caller has autocast on: its question,
``torch.is_autocast_enabled``, asked by that wrapper, counts as the block (its answer is torch's own).  The capture
then makes the fused module refuse calls under autocast on that device (:func:`autocast_left_off`).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, Callable, Iterator

import torch
from torch import nn

__all__ = ["autocast_left_off", "autocast_turned_off", "device_type_of"]

# The code of ``torch.amp.custom_fwd``'s wrapper (``torch.cuda.amp.custom_fwd`` makes the same one)
_CUSTOM_FWD = torch.amp.custom_fwd(lambda *args: None, device_type="cpu").__code__


@contextlib.contextmanager
def autocast_turned_off(left_off: Callable[[str], None],
                        turned_on: Callable[[Any], None] | None = None) -> Iterator[None]:
    """While open, call ``left_off(device)`` where this thread's code turns autocast off for ``device`` (a block,
    or ``custom_fwd``'s wrapper with ``cast_inputs``); ``turned_on(autocast)``, where given, where it turns
    autocast on (it may raise: torch.fx records none of the block).  The blocks are entered as they are."""
    enter, asked = torch.amp.autocast_mode.autocast.__enter__, torch.is_autocast_enabled
    capturing = threading.get_ident()  # another thread meanwhile is not the capture's

    def entering(self: Any) -> Any:
        if threading.get_ident() == capturing:
            if not getattr(self, "_enabled", True):
                left_off(self.device)
            elif turned_on is not None:
                turned_on(self)
        return enter(self)

    def is_autocast_enabled(*args: Any, **kwargs: Any) -> bool:
        caller = sys._getframe(1)
        if threading.get_ident() == capturing and caller.f_code is _CUSTOM_FWD and caller.f_locals.get("cast_inputs") is not None:
            left_off(str(caller.f_locals.get("device_type")))
        return asked(*args, **kwargs)

    torch.amp.autocast_mode.autocast.__enter__, torch.is_autocast_enabled = entering, is_autocast_enabled
    try:
        yield
    finally:
        torch.amp.autocast_mode.autocast.__enter__, torch.is_autocast_enabled = enter, asked


def device_type_of(model: nn.Module) -> str:
    """The device type of ``model``'s first parameter or buffer (``"cpu"`` where it holds none): where turning
    autocast off changes what it computes."""
    return next((t.device.type for t in [*model.parameters(), *model.buffers()]), "cpu")


def autocast_left_off(device: str, where: str) -> None:
    """Raise ``ValueError`` where the caller has autocast on for ``device``: the model's ``with torch.autocast(device,
    enabled=False):`` in ``where`` computes that block in full precision there, and the fused graph holds its ops
    without the block (the capture took it as doing nothing, as it does with autocast off)."""
    if torch.is_autocast_enabled(device):
        raise ValueError(f"{where or 'the model'} turns torch.autocast off for {device!r} around part of its forward, and "
                         "the fused graph holds that part without it: call the fused model outside torch.autocast")
