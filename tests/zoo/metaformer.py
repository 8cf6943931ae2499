"""MetaFormer family: PoolFormer (pooling token mixer) and EfficientFormer (4D pooling stages, then 3D attention).

Patterns reproduced (read in sail-sg/poolformer ``models/poolformer.py``, snap-research/EfficientFormer
``models/efficientformer.py`` and huggingface/pytorch-image-models ``timm/models/efficientformer.py``,
``timm/models/metaformer.py``): the token mixer ``self.pool(x) - x`` with ``nn.AvgPool2d(3, 1, 1,
count_include_pad=False)`` (border divisors differ, so it is linear but not a convolution), ``GroupNorm(1, C)``
as a channels-first LayerNorm, layer scale as ``self.layer_scale_1.unsqueeze(-1).unsqueeze(-1) * ...``,
1x1-conv MLPs (with BN after each conv in EfficientFormer), overlapping patch embeddings; EfficientFormer's
``Flat`` (``x.flatten(2).transpose(1, 2)``), attention with learned ``attention_biases[:, attention_bias_idxs]``
(an index buffer built from ``torch.meshgrid`` distances) cached per device in eval mode, ``split`` of the
qkv projection into key/key/value widths, and ``x.mean(1)`` pooling before the head.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from ._base import ZooModel, seeded
from .efficientnet import DropPath


class GroupNorm(nn.GroupNorm):
    """GroupNorm with one group: normalizes over (C, H, W)."""

    def __init__(self, num_channels: int, **kwargs: object) -> None:
        super().__init__(1, num_channels, **kwargs)


class Pooling(nn.Module):
    def __init__(self, pool_size: int = 3) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) - x


class Mlp(nn.Module):
    """1x1-conv MLP; ``with_norm`` puts a BN after each conv (EfficientFormer)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0, with_norm: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_features, in_features, 1)
        self.drop = nn.Dropout(drop)
        self.with_norm = with_norm
        if with_norm:
            self.norm1 = nn.BatchNorm2d(hidden_features)
            self.norm2 = nn.BatchNorm2d(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.with_norm:
            x = self.norm1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        if self.with_norm:
            x = self.norm2(x)
        x = self.drop(x)
        return x


class PoolFormerBlock(nn.Module):
    def __init__(self, dim: int, pool_size: int = 3, mlp_ratio: float = 4.0, drop_path: float = 0.1,
                 layer_scale_init_value: float = 0.5) -> None:
        super().__init__()
        self.norm1 = GroupNorm(dim)
        self.token_mixer = Pooling(pool_size=pool_size)
        self.norm2 = GroupNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones((dim)), requires_grad=True)
        self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones((dim)), requires_grad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1.unsqueeze(-1).unsqueeze(-1) * self.token_mixer(self.norm1(x)))
        x = x + self.drop_path(self.layer_scale_2.unsqueeze(-1).unsqueeze(-1) * self.mlp(self.norm2(x)))
        return x


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, stride: int, padding: int, in_chans: int, embed_dim: int, norm: bool = False) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = nn.BatchNorm2d(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class PoolFormer(nn.Module):
    def __init__(self, layers: tuple[int, ...] = (1, 1, 2, 1), embed_dims: tuple[int, ...] = (8, 16, 24, 32),
                 num_classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(7, 4, 2, 3, embed_dims[0])
        network: list[nn.Module] = []
        for i, depth in enumerate(layers):
            network.append(nn.Sequential(*[PoolFormerBlock(embed_dims[i]) for _ in range(depth)]))
            if i < len(layers) - 1:
                network.append(PatchEmbed(3, 2, 1, embed_dims[i], embed_dims[i + 1]))
        self.network = nn.ModuleList(network)
        self.norm = GroupNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for idx, block in enumerate(self.network):
            x = block(x)
        x = self.norm(x)
        return self.head(x.mean([-2, -1]))


# ---------------------------------------------------------------- EfficientFormer
class Attention(nn.Module):
    attention_bias_cache: dict[str, torch.Tensor]

    def __init__(self, dim: int, key_dim: int = 8, num_heads: int = 2, attn_ratio: float = 2, resolution: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.key_attn_dim = key_dim * num_heads
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads
        self.qkv = nn.Linear(dim, self.key_attn_dim * 2 + self.val_attn_dim)
        self.proj = nn.Linear(self.val_attn_dim, dim)
        points = list(itertools.product(range(resolution), range(resolution)))
        pos = torch.stack(torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij")).flatten(1)
        rel_pos = (pos[..., :, None] - pos[..., None, :]).abs()
        rel_pos = (rel_pos[0] * resolution) + rel_pos[1]
        assert rel_pos.shape[-1] == len(points)
        self.attention_biases = nn.Parameter(0.1 * torch.randn(num_heads, resolution * resolution))
        self.register_buffer("attention_bias_idxs", rel_pos)
        self.attention_bias_cache = {}

    @torch.no_grad()
    def train(self, mode: bool = True) -> None:  # returns None, as the reference does
        super().train(mode)
        if mode and self.attention_bias_cache:
            self.attention_bias_cache = {}

    def get_attention_biases(self, device: torch.device) -> torch.Tensor:
        if torch.jit.is_tracing() or self.training:
            return self.attention_biases[:, self.attention_bias_idxs]
        device_key = str(device)
        if device_key not in self.attention_bias_cache:
            self.attention_bias_cache[device_key] = self.attention_biases[:, self.attention_bias_idxs]
        return self.attention_bias_cache[device_key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, N, C)
        B, N, C = x.shape
        qkv = self.qkv(x)
        qkv = qkv.reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn + self.get_attention_biases(x.device)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.val_attn_dim)
        return self.proj(x)


class Flat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class Meta4D(nn.Module):
    def __init__(self, dim: int, pool_size: int = 3, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 layer_scale_init_value: float = 0.5) -> None:
        super().__init__()
        self.token_mixer = Pooling(pool_size=pool_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), with_norm=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1.unsqueeze(-1).unsqueeze(-1) * self.token_mixer(x))
        x = x + self.drop_path(self.layer_scale_2.unsqueeze(-1).unsqueeze(-1) * self.mlp(x))
        return x


class Meta3D(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 4.0, layer_scale_init_value: float = 0.5, resolution: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mixer = Attention(dim, resolution=resolution)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))
        self.drop_path = nn.Identity()
        self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1 * self.token_mixer(self.norm1(x)))
        x = x + self.drop_path(self.layer_scale_2 * self.mlp(self.norm2(x)))
        return x


class EfficientFormer(nn.Module):
    def __init__(self, embed_dims: tuple[int, ...] = (8, 16, 24), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, embed_dims[0] // 2, 3, stride=2, padding=1), nn.BatchNorm2d(embed_dims[0] // 2), nn.ReLU(),
            nn.Conv2d(embed_dims[0] // 2, embed_dims[0], 3, stride=2, padding=1), nn.BatchNorm2d(embed_dims[0]), nn.ReLU())
        self.network = nn.Sequential(
            Meta4D(embed_dims[0]),
            PatchEmbed(3, 2, 1, embed_dims[0], embed_dims[1], norm=True), Meta4D(embed_dims[1]), Meta4D(embed_dims[1]),
            PatchEmbed(3, 2, 1, embed_dims[1], embed_dims[2], norm=True), Meta4D(embed_dims[2]),
            Flat(), Meta3D(embed_dims[2], resolution=4))
        self.norm = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.network(self.stem(x))
        x = self.norm(x)
        return self.head(x.mean(1))


ENTRIES = (
    ZooModel("poolformer", "PoolFormer (MetaFormer with pooling mixer)", seeded(PoolFormer, 1101), (2, 3, 64, 64),
             "pool(x) - x with AvgPool2d(count_include_pad=False); GroupNorm(1, C) subclass; layer_scale.unsqueeze(-1).unsqueeze(-1) * ...; 1x1-conv MLP; overlapping patch embed 7/4/2"),
    ZooModel("efficientformer", "EfficientFormer (Meta4D pool + Meta3D attention)", seeded(EfficientFormer, 1102), (2, 3, 64, 64),
             "pool(x) - x straight on a BN output; conv-BN MLPs; Flat = flatten(2).transpose(1, 2); attention_biases[:, idxs] cached per device in eval; qkv split [k, k, v]; x.mean(1)"),
)
