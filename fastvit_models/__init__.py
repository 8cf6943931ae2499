"""FastViT (Vasu et al., ICCV 2023) as plain train-time PyTorch modules.

The seven ImageNet variants follow Apple's reference implementation
(``apple/ml-fastvit``) branch for branch, with its module names, so official
train-time checkpoints load; nothing is fused here (``repalgebra.fuse`` does
that by tracing with ``torch.fx``).

Typical use::

    import fastvit_models
    model = fastvit_models.create_model("fastvit_sa12", checkpoint="fastvit_sa12.pth.tar")

Fused (reparameterized) checkpoints load too: ``create_model`` gives a
train-time model that computes the fused network, ``load_fused`` its
``repalgebra.fuse`` (see :mod:`fastvit_models.fused_checkpoint`)::

    fused = fastvit_models.load_fused("fastvit_sa12", "fastvit_sa12_reparam.pth.tar")
"""

from __future__ import annotations

import os
from typing import List, Optional, Union

from .blocks import (
    Attention,
    AttentionBlock,
    ConvFFN,
    DropPath,
    MobileOneBlock,
    PatchEmbed,
    RepCPE,
    RepMixer,
    RepMixerBlock,
    ReparamLargeKernelConv,
    SEBlock,
)
from .checkpoint import load_checkpoint
from .fastvit import FASTVIT_CONFIGS, FastViT, FastViTConfig, build_fastvit
from .fused_checkpoint import load_fused, load_fused_checkpoint

__all__ = [
    "create_model",
    "list_models",
    "load_checkpoint",
    "load_fused",
    "load_fused_checkpoint",
    "FastViT",
    "FastViTConfig",
    "FASTVIT_CONFIGS",
    "Attention",
    "AttentionBlock",
    "ConvFFN",
    "DropPath",
    "MobileOneBlock",
    "PatchEmbed",
    "RepCPE",
    "RepMixer",
    "RepMixerBlock",
    "ReparamLargeKernelConv",
    "SEBlock",
]


def list_models() -> List[str]:
    """Return the names of the seven FastViT ImageNet variants."""
    return list(FASTVIT_CONFIGS)


def create_model(
    name: str,
    num_classes: int = 1000,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    drop_path_rate: float = 0.0,
) -> FastViT:
    """Build a FastViT variant, optionally loading a train-time or fused checkpoint.

    Args:
        name: one of :func:`list_models`.
        num_classes: outputs of the classifier (must match the checkpoint's head).
        checkpoint: ``.pth``, ``.pth.tar`` or ``.safetensors`` file in Apple's or
            timm's key layout (detected); see :mod:`fastvit_models.checkpoint`.
            A fused checkpoint (``reparam_conv`` / ``lkb_reparam`` keys) gives
            a train-time model computing the fused network (the same function,
            float rounding aside): each unit's fused kernel sits in its main
            conv branch behind an identity BN, the other branches are zeroed.
            Those weights cannot be un-fused; training from them starts from
            the zeroed branches (see :mod:`fastvit_models.fused_checkpoint`).
        drop_path_rate: stochastic depth rate (training only; default off).

    Returns:
        The model, in eval mode when a checkpoint was loaded.

    Raises:
        ValueError: unknown ``name`` (the message lists valid names), or a
            checkpoint with missing/unexpected keys or wrong shapes.
    """
    model = build_fastvit(name, num_classes=num_classes, drop_path_rate=drop_path_rate)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
        model.eval()
    return model
