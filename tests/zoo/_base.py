"""What every zoo entry shares: the entry record, seeded building, realistic norm statistics.

``ZooModel`` describes one compact model; ``seeded`` turns a constructor into a
deterministic ``build`` (its own RNG stream, the caller's RNG untouched);
``randomize_bn`` gives every BatchNorm running statistics and affine
parameters far from the identity, so a fold that drops a term shows up in the
numbers; ``fx_fused_bn_count`` is what ``torch.fx``'s own conv+BN fusion
leaves, the baseline to compare ``repalgebra.fuse`` with.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["ZooModel", "seeded", "randomize_bn", "fx_fused_bn_count", "count_bn"]


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: a compact model written the way its family's public code writes it."""

    name: str  # unique, snake_case
    family: str  # human-readable family
    build: Callable[[], nn.Module]  # new model: seeded weights, realistic norm statistics, eval mode, float32
    input_shape: tuple[int, ...]  # chosen so the shape-dependent code paths run
    patterns: str  # the Python patterns it exercises, one line


def randomize_bn(model: nn.Module, seed: int) -> None:
    """Give every norm layer of ``model`` non-trivial statistics and affine parameters, in place.

    BatchNorm: running mean ~ N(0, 0.2), running variance ~ U(0.5, 2), weight ~ U(0.5, 1.5) with a
    random sign on one channel in eight, bias ~ N(0, 0.2).  LayerNorm and GroupNorm with affine
    parameters, and hand-written norm classes with a 1-D ``weight`` (ConvNeXt's channels-first LayerNorm):
    weight ~ U(0.5, 1.5), bias ~ N(0, 0.1).  Deterministic in ``seed`` and the module order.
    """
    g = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(t.shape, generator=g, dtype=torch.float64)).to(t.dtype)

    def normal(t: torch.Tensor, std: float) -> torch.Tensor:
        return (std * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(t.dtype)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.copy_(normal(m.running_mean, 0.2))
                    m.running_var.copy_(uniform(m.running_var, 0.5, 2.0))
                if m.affine:
                    w = uniform(m.weight, 0.5, 1.5)
                    flip = torch.rand(w.shape, generator=g) < 0.125
                    m.weight.copy_(torch.where(flip, -w, w))
                    m.bias.copy_(normal(m.bias, 0.2))
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or _is_custom_norm(m):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(uniform(m.weight, 0.5, 1.5))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(normal(m.bias, 0.1))


def _is_custom_norm(m: nn.Module) -> bool:
    """A hand-written norm layer (e.g. ConvNeXt's channels-first ``LayerNorm``): "Norm" in the class name and a
    1-D ``weight`` parameter of its own."""
    w = m._parameters.get("weight")
    return "Norm" in type(m).__name__ and w is not None and w.dim() == 1


def seeded(factory: Callable[..., nn.Module], seed: int, **kwargs: Any) -> Callable[[], nn.Module]:
    """A ``build`` function: ``factory(**kwargs)`` under ``seed``, norms randomized, float32, eval mode."""

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory(**kwargs)
        randomize_bn(model, seed)
        return model.float().eval()

    build.__name__ = f"build_{getattr(factory, '__name__', 'model')}"
    return build


def count_bn(model: nn.Module) -> int:
    """BatchNorm modules in ``model``."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def fx_fused_bn_count(model: nn.Module) -> int | None:
    """BatchNorms left after ``torch.fx.experimental.optimization.fuse`` on a copy of ``model``.

    Counts the BatchNorm modules of the fused ``GraphModule`` plus its eval-mode ``F.batch_norm`` call nodes (a
    BatchNorm subclass with its own forward is traced through to the functional call, which fx's fusion never
    folds; ``training=True`` calls, such as NFNet's weight standardization, are not BatchNorm layers).
    ``None`` where ``torch.fx`` cannot trace the model (shape-dependent Python, asserts on sizes,
    data-dependent control flow).  The model itself is not changed.
    """
    import torch.nn.functional as F
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(copy.deepcopy(model).eval())
    except Exception:  # noqa: BLE001 - any tracing failure means "fx cannot do it"
        return None
    functional = sum(n.op == "call_function" and n.target is F.batch_norm and not _bn_training(n) for n in fused.graph.nodes)
    return count_bn(fused) + functional


def _bn_training(node: torch.fx.Node) -> bool:
    """The ``training`` argument of an ``F.batch_norm`` call node (True: a batch-statistics normalization, e.g. weight
    standardization, not an eval-mode BatchNorm)."""
    training = node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False)
    return bool(training) if isinstance(training, bool) else True
