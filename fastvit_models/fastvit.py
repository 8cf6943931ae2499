"""The FastViT model (Vasu et al., ICCV 2023) and the one table of its ImageNet variants.

Layout of :class:`FastViT` (module paths as in Apple's reference, so its
train-time checkpoints load key for key)::

    patch_embed        stem: Sequential of 3 MobileOneBlocks (4x down)
    network            ModuleList, flat as in the reference:
      [stage 0 blocks, PatchEmbed, stage 1 blocks, PatchEmbed, stage 2 blocks,
       PatchEmbed, (RepCPE), stage 3 blocks]
    conv_exp           3x3 depthwise MobileOneBlock, C -> 2C, with SE and GELU
    gap                global average pool
    head               Linear(2C, num_classes)
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from .blocks import (
    AttentionBlock,
    MobileOneBlock,
    PatchEmbed,
    RepCPE,
    RepMixerBlock,
    convolutional_stem,
)

__all__ = ["FastViTConfig", "FASTVIT_CONFIGS", "FastViT", "build_fastvit"]


class FastViTConfig(NamedTuple):
    """Architecture of one FastViT variant (one row of the paper's table).

    Attributes:
        layers: blocks per stage.
        embed_dims: channels per stage.
        mlp_ratio: ConvFFN expansion ratio (same in every stage).
        token_mixers: ``"repmixer"`` or ``"attention"`` per stage.
        pos_embs: kernel size of the conditional positional encoding placed
            before each stage's blocks, or ``None`` for none.
        layer_scale_init: initial layer-scale value (only affects fresh models;
            the reference uses 1e-6 for the 36-layer variants).
    """

    layers: Tuple[int, int, int, int]
    embed_dims: Tuple[int, int, int, int]
    mlp_ratio: float
    token_mixers: Tuple[str, str, str, str]
    pos_embs: Tuple[Optional[int], Optional[int], Optional[int], Optional[int]]
    layer_scale_init: float = 1e-5


_R, _A = "repmixer", "attention"
_CONV_ONLY = (_R, _R, _R, _R)
_HYBRID = (_R, _R, _R, _A)
_NO_PE = (None, None, None, None)
_CPE7 = (None, None, None, 7)  # 7x7 conditional positional encoding before stage 4

# fmt: off
FASTVIT_CONFIGS: Dict[str, FastViTConfig] = {
    #                            blocks / stage  channels / stage     mlp  mixers       pos. enc.  ls init
    "fastvit_t8":   FastViTConfig((2, 2, 4, 2),   (48, 96, 192, 384),   3, _CONV_ONLY,  _NO_PE),
    "fastvit_t12":  FastViTConfig((2, 2, 6, 2),   (64, 128, 256, 512),  3, _CONV_ONLY,  _NO_PE),
    "fastvit_s12":  FastViTConfig((2, 2, 6, 2),   (64, 128, 256, 512),  4, _CONV_ONLY,  _NO_PE),
    "fastvit_sa12": FastViTConfig((2, 2, 6, 2),   (64, 128, 256, 512),  4, _HYBRID,     _CPE7),
    "fastvit_sa24": FastViTConfig((4, 4, 12, 4),  (64, 128, 256, 512),  4, _HYBRID,     _CPE7),
    "fastvit_sa36": FastViTConfig((6, 6, 18, 6),  (64, 128, 256, 512),  4, _HYBRID,     _CPE7,     1e-6),
    "fastvit_ma36": FastViTConfig((6, 6, 18, 6),  (76, 152, 304, 608),  4, _HYBRID,     _CPE7,     1e-6),
}
"""The seven ImageNet variants by name (Apple's table): blocks and widths per stage, MLP ratio, token mixers, RepCPE."""
# fmt: on


def _stage_blocks(
    dim: int,
    depth: int,
    token_mixer: str,
    mlp_ratio: float,
    layer_scale_init: float,
    drop_path_rates: List[float],
) -> nn.Sequential:
    """Build the ``depth`` blocks of one stage as an ``nn.Sequential``."""
    blocks: List[nn.Module] = []
    for rate in drop_path_rates:
        if token_mixer == _R:
            blocks.append(RepMixerBlock(dim, mlp_ratio, 3, layer_scale_init, rate))
        elif token_mixer == _A:
            blocks.append(AttentionBlock(dim, mlp_ratio, layer_scale_init, rate))
        else:
            raise ValueError(f"unknown token mixer {token_mixer!r}")
    assert len(blocks) == depth
    return nn.Sequential(*blocks)


class FastViT(nn.Module):
    """FastViT classifier in its train-time (unfused) form.

    See the module docstring for the layout. ``forward`` is plain data flow and
    traces with ``torch.fx.symbolic_trace``.
    """

    def __init__(
        self,
        config: FastViTConfig,
        num_classes: int = 1000,
        drop_path_rate: float = 0.0,
        cls_ratio: float = 2.0,
    ) -> None:
        """Build the model.

        Args:
            config: architecture, e.g. ``FASTVIT_CONFIGS["fastvit_t8"]``.
            num_classes: outputs of the linear classifier.
            drop_path_rate: stochastic depth rate of the last block; block ``i``
                of ``n`` gets ``rate * i / (n - 1)`` (reference schedule).
            cls_ratio: width of ``conv_exp`` relative to the last stage.
        """
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        dims = config.embed_dims
        total = sum(config.layers)
        rates = [drop_path_rate * i / (total - 1) for i in range(total)]

        self.patch_embed = convolutional_stem(3, dims[0])

        network: List[nn.Module] = []
        first = 0
        for i, depth in enumerate(config.layers):
            if i > 0:
                network.append(PatchEmbed(dims[i - 1], dims[i]))
            if config.pos_embs[i] is not None:
                network.append(RepCPE(dims[i], config.pos_embs[i]))
            network.append(
                _stage_blocks(
                    dims[i],
                    depth,
                    config.token_mixers[i],
                    config.mlp_ratio,
                    config.layer_scale_init,
                    rates[first : first + depth],
                )
            )
            first += depth
        self.network = nn.ModuleList(network)

        head_dim = int(dims[-1] * cls_ratio)
        self.conv_exp = MobileOneBlock(
            dims[-1], head_dim, kernel_size=3, groups=dims[-1], use_se=True
        )
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(head_dim, num_classes)
        self._init_linear()

    def _init_linear(self) -> None:
        """Truncated-normal(0.02) weights and zero biases for Linear layers, as the reference."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and all stages: (B, 3, H, W) -> (B, C4, H/32, W/32)."""
        x = self.patch_embed(x)
        for layer in self.network:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of images: (B, 3, H, W) -> (B, num_classes)."""
        x = self.forward_features(x)
        x = self.conv_exp(x)
        x = self.gap(x)
        x = x.flatten(1)
        return self.head(x)


def build_fastvit(name: str, num_classes: int = 1000, **kwargs) -> FastViT:
    """Build the named variant (see :data:`FASTVIT_CONFIGS`) with fresh weights.

    Raises:
        ValueError: if ``name`` is not a known variant.
    """
    if name not in FASTVIT_CONFIGS:
        valid = ", ".join(FASTVIT_CONFIGS)
        raise ValueError(f"unknown FastViT variant {name!r}; valid names: {valid}")
    return FastViT(FASTVIT_CONFIGS[name], num_classes=num_classes, **kwargs)
