"""FastViT at small width: RepMixer stages, ConvFFN, large-kernel patch embedding, RepCPE, attention stage.

Patterns reproduced (read in apple/ml-fastvit ``models/fastvit.py``, ``models/modules/mobileone.py``,
``models/modules/replknet.py`` and huggingface/pytorch-image-models ``timm/models/fastvit.py``): RepMixer
``x = x + self.layer_scale * (self.mixer(x) - self.norm(x))`` where ``norm`` is a MobileOne block with no conv
branches (BN skip only) and ``mixer`` a depthwise MobileOne block without activation; ConvFFN built with
``nn.Sequential()`` + ``add_module`` (7x7 depthwise conv + BN) then 1x1 / GELU / 1x1; a large-kernel patch
embedding whose small-kernel branch is added with ``out += self.small_conv(x)``; RepCPE ``x = self.pe(x) + x``
(a biased depthwise 7x7); the attention block with a ``BatchNorm2d`` pre-norm and ``Attention`` that flattens
4-D input with ``torch.flatten(x, start_dim=2).transpose(-2, -1)``, ``qkv.reshape(...).permute(2, 0, 3, 1, 4)``,
``unbind(0)``, and reshapes back when ``len(shape) == 4``; layer scales of shape ``(dim, 1, 1)``; GELU
activations passed as module *instances*; an SE head block.
"""

from __future__ import annotations

import torch
from torch import nn

from ._base import ZooModel, seeded
from .efficientnet import DropPath
from .reparam import MobileOneBlock, conv_bn


class ReparamLargeKernelConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int,
                 small_kernel: int | None, activation: nn.Module) -> None:
        super().__init__()
        self.activation = activation
        self.lkb_origin = conv_bn(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups)
        self.small_conv = conv_bn(in_channels, out_channels, small_kernel, stride, small_kernel // 2, groups) if small_kernel else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lkb_origin(x)
        if self.small_conv is not None:
            out += self.small_conv(x)
        return self.activation(out)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, stride: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            ReparamLargeKernelConv(in_channels, embed_dim, patch_size, stride, groups=in_channels, small_kernel=3,
                                   activation=nn.GELU()),
            MobileOneBlock(embed_dim, embed_dim, kernel_size=1, stride=1, padding=0, num_conv_branches=1, activation=nn.GELU()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class RepMixer(nn.Module):
    def __init__(self, dim: int, kernel_size: int = 3, layer_scale_init_value: float = 0.5) -> None:
        super().__init__()
        self.norm = MobileOneBlock(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, use_act=False,
                                   use_scale_branch=False, num_conv_branches=0)
        self.mixer = MobileOneBlock(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, use_act=False,
                                    num_conv_branches=1)
        self.layer_scale = nn.Parameter(layer_scale_init_value * torch.ones((dim, 1, 1)), requires_grad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


class ConvFFN(nn.Module):
    def __init__(self, in_channels: int, hidden_channels: int, drop: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Sequential()
        self.conv.add_module("conv", nn.Conv2d(in_channels, in_channels, 7, padding=3, groups=in_channels, bias=False))
        self.conv.add_module("bn", nn.BatchNorm2d(in_channels))
        self.fc1 = nn.Conv2d(in_channels, hidden_channels, kernel_size=1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_channels, in_channels, kernel_size=1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        return self.drop(x)


class RepMixerBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 3.0, drop_path: float = 0.1, layer_scale_init_value: float = 0.5) -> None:
        super().__init__()
        self.token_mixer = RepMixer(dim, kernel_size=3, layer_scale_init_value=layer_scale_init_value)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.layer_scale = nn.Parameter(layer_scale_init_value * torch.ones((dim, 1, 1)), requires_grad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        x = x + self.drop_path(self.layer_scale * self.convffn(x))
        return x


class Attention(nn.Module):
    def __init__(self, dim: int, head_dim: int = 8, qkv_bias: bool = False) -> None:
        super().__init__()
        assert dim % head_dim == 0, "dim should be divisible by head_dim"
        self.head_dim = head_dim
        self.num_heads = dim // head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        B, C, H, W = shape
        N = H * W
        if len(shape) == 4:
            x = torch.flatten(x, start_dim=2).transpose(-2, -1)  # (B, N, C)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        if len(shape) == 4:
            x = x.transpose(-2, -1).reshape(B, C, H, W)
        return x


class AttentionBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 3.0, layer_scale_init_value: float = 0.5) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.token_mixer = Attention(dim=dim)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.drop_path = nn.Identity()
        self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones((dim, 1, 1)), requires_grad=True)
        self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones((dim, 1, 1)), requires_grad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1 * self.token_mixer(self.norm(x)))
        x = x + self.drop_path(self.layer_scale_2 * self.convffn(x))
        return x


class RepCPE(nn.Module):
    def __init__(self, in_channels: int, embed_dim: int, spatial_shape: tuple[int, int] = (7, 7)) -> None:
        super().__init__()
        self.pe = nn.Conv2d(in_channels, embed_dim, spatial_shape, 1, int(spatial_shape[0] // 2), bias=True, groups=embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pe(x) + x


class FastViT(nn.Module):
    def __init__(self, embed_dims: tuple[int, ...] = (8, 16, 32), num_classes: int = 10) -> None:
        super().__init__()
        gelu = nn.GELU()
        self.patch_embed = nn.Sequential(
            MobileOneBlock(3, embed_dims[0], 3, stride=2, padding=1, num_conv_branches=1, activation=gelu),
            MobileOneBlock(embed_dims[0], embed_dims[0], 3, stride=2, padding=1, groups=embed_dims[0], num_conv_branches=1,
                           activation=gelu),
            MobileOneBlock(embed_dims[0], embed_dims[0], 1, stride=1, padding=0, num_conv_branches=1, activation=gelu))
        self.network = nn.Sequential(
            RepMixerBlock(embed_dims[0]), RepMixerBlock(embed_dims[0]),
            PatchEmbed(7, 2, embed_dims[0], embed_dims[1]), RepMixerBlock(embed_dims[1]),
            PatchEmbed(7, 2, embed_dims[1], embed_dims[2]), RepCPE(embed_dims[2], embed_dims[2]),
            AttentionBlock(embed_dims[2]))
        self.conv_exp = MobileOneBlock(embed_dims[2], embed_dims[2] * 2, 3, stride=1, padding=1, groups=embed_dims[2],
                                       use_se=True, num_conv_branches=1, activation=gelu)
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.head = nn.Linear(embed_dims[2] * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self.network(x)
        x = self.conv_exp(x)
        x = self.gap(x)
        x = x.view(x.size(0), -1)
        return self.head(x)


ENTRIES = (
    ZooModel("fastvit", "FastViT (RepMixer, ConvFFN, RepCPE, attention)", seeded(FastViT, 1201), (2, 3, 64, 64),
             "x + layer_scale * (mixer(x) - norm(x)) with BN-only MobileOne 'norm'; out += small_conv(x); pe(x) + x; BN pre-norm attention with flatten/transpose and len(shape) == 4 branches; (dim,1,1) layer scales; shared GELU instance"),
)
