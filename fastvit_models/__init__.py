"""FastViT (Vasu et al., ICCV 2023) as plain train-time PyTorch modules.

The seven ImageNet variants follow Apple's reference implementation
(``apple/ml-fastvit``) branch for branch, with its module names, so official
train-time checkpoints load; nothing is fused here (``repalgebra.fuse`` does
that by tracing with ``torch.fx``).

Typical use::

    import fastvit_models
    model = fastvit_models.create_model("fastvit_sa12", checkpoint="fastvit_sa12.pth.tar")
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

__all__ = [
    "create_model",
    "list_models",
    "load_checkpoint",
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
    """Build a FastViT variant, optionally loading a train-time checkpoint.

    Args:
        name: one of :func:`list_models`.
        num_classes: outputs of the classifier (must match the checkpoint's head).
        checkpoint: ``.pth``, ``.pth.tar`` or ``.safetensors`` file in Apple's or
            timm's key layout (detected); see :mod:`fastvit_models.checkpoint`.
        drop_path_rate: stochastic depth rate (training only; default off).

    Returns:
        The model, in eval mode when a checkpoint was loaded.

    Raises:
        ValueError: unknown ``name`` (the message lists valid names), or a
            checkpoint with missing/unexpected keys or wrong shapes.
        NotImplementedError: for fused checkpoints.
    """
    model = build_fastvit(name, num_classes=num_classes, drop_path_rate=drop_path_rate)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
        model.eval()
    return model
