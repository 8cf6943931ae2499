"""Loading FastViT checkpoints in Apple's or timm's key layout, train-time or fused.

:func:`load_checkpoint` reads a file (see :mod:`fastvit_models.state_dicts`
for the formats and the key layouts), renames its keys to our model's
(Apple's), and loads it. Fused (reparameterized) checkpoints, as written after
Apple's or timm's ``reparameterize_model`` (``reparam_conv`` / ``lkb_reparam``
keys), are handed to :mod:`fastvit_models.fused_checkpoint`, so both kinds
load through the same call.

The key-layout helpers are importable from here too (they live in
:mod:`fastvit_models.state_dicts`, which both loaders import).
"""

from __future__ import annotations

import os
from typing import Union

import torch.nn as nn

from . import state_dicts
from .fused_checkpoint import load_fused_state_dict_
from .state_dicts import *  # noqa: F403  (the key-layout helpers, importable from here as before)
from .state_dicts import check_state_dict, detect_layout, is_fused_state_dict, read_state_dict, to_apple_state_dict

__all__ = ["load_checkpoint", *state_dicts.__all__]


def load_checkpoint(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load a FastViT checkpoint (Apple or timm layout) into ``model`` in place.

    Train-time checkpoints: every parameter and buffer must be present
    (``num_batches_tracked`` may be absent or extra) and have the model's shape.

    Fused checkpoints (``reparam_conv`` / ``lkb_reparam`` keys, from Apple's or
    timm's ``reparameterize_model``) are handed to
    :func:`fastvit_models.fused_checkpoint.load_fused_state_dict_`: ``model``
    then computes exactly the fused network, with each unit's reparameterized
    kernel in its main conv branch and the other branches zeroed. A fused
    checkpoint cannot be un-fused; see that module.

    Raises:
        ValueError: listing missing and unexpected keys (for timm files with
            the file's own key name in parentheses), or tensors whose shape does
            not match the model (e.g. another variant or class count).
    """
    path = os.fspath(path)
    file_state = read_state_dict(path)
    layout = detect_layout(file_state)
    state, origin = to_apple_state_dict(file_state, model)
    if is_fused_state_dict(file_state):
        return load_fused_state_dict_(model, state, path=path, layout=layout, origin=origin)
    own = model.state_dict()
    check_state_dict(
        state, {k: v.shape for k, v in own.items()}, model, path=path, layout=layout, origin=origin
    )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return model
