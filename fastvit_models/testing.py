"""Helpers that give models realistic, reproducible random weights for tests.

Fresh models have trivial BatchNorm statistics (mean 0, var 1, weight 1, bias 0)
and layer scales of 1e-5, under which a wrong fusion can look right. These
helpers draw statistics like those of a trained network instead.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["randomize_bn_", "randomize_layer_scales_", "randomize_model_"]


@torch.no_grad()
def randomize_bn_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Randomize every ``BatchNorm`` in ``model`` in place and return ``model``.

    running_var ~ U[0.5, 2], running_mean ~ N(0, 0.1^2), weight ~ U[0.5, 1.5],
    bias ~ N(0, 0.1^2). Draws come from ``generator`` in module order, so the
    same seed gives the same model.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=generator))
            m.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            if m.affine:
                m.weight.copy_(0.5 + torch.rand(n, generator=generator))
                m.bias.copy_(0.1 * torch.randn(n, generator=generator))
    return model


@torch.no_grad()
def randomize_layer_scales_(
    model: nn.Module, generator: torch.Generator, low: float = 0.05, high: float = 0.5
) -> nn.Module:
    """Set every parameter whose name ends in ``layer_scale[_N]`` (or ``.gamma``) to U[low, high].

    Trained FastViT layer scales are far from their 1e-5 init; with the init
    values every residual branch would be numerically invisible.
    """
    for name, p in model.named_parameters():
        last = name.rsplit(".", 1)[-1]
        if last.startswith("layer_scale") or last == "gamma":
            p.copy_(low + (high - low) * torch.rand(p.shape, generator=generator))
    return model


def randomize_model_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Randomize BN statistics/affines and layer scales in place; put ``model`` in eval mode."""
    randomize_bn_(model, generator)
    randomize_layer_scales_(model, generator)
    return model.eval()
