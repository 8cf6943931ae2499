"""MobileViT v1 (reshape-based unfold/fold around a transformer) and MobileViT v2 (``F.unfold``/``F.fold``,
separable linear attention).

Patterns reproduced (read in huggingface/pytorch-image-models ``timm/models/mobilevit.py`` and apple/ml-cvnets
``cvnets/modules/mobilevit_block.py``): v1 computes ``new_h = math.ceil(H / patch_h) * patch_h``, bilinearly
interpolates to it when ``H`` is not a multiple of the patch (15 -> 16 here) and back afterwards, unfolds with
``x.reshape(B * C * n_h, p_h, n_w, p_w).transpose(1, 2)`` and ``reshape(B, C, N, P).transpose(1, 3).reshape(B * P,
N, -1)``, folds with the mirror sequence, and fuses with ``self.conv_fusion(torch.cat((shortcut, x), dim=1))``;
MobileNetV2 inverted residuals with SiLU between. v2 resizes its input when needed (``align_corners=True``), unfolds
with ``F.unfold(fm, kernel_size, stride)`` + ``reshape(B, C, P, -1)``, runs ``x = x + self.pre_norm_attn(x)`` blocks
with ``GroupNorm(1, C)``, splits the 1x1 ``qkv_proj`` output with ``torch.split(qkv, [1, d, d], dim=1)``,
``F.softmax(query, dim=-1)``, ``torch.sum(key * scores, dim=-1, keepdim=True)``, ``F.relu(value) *
context_vector.expand_as(value)``, and folds with ``F.fold(patches, output_size=..., kernel_size=..., stride=...)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._base import ZooModel, seeded
from .efficientnet import ConvNormAct
from .vit import Block as TransformerBlock


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 2) -> None:
        super().__init__()
        mid = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            ConvNormAct(cin, mid, 1, act_layer=nn.SiLU),
            ConvNormAct(mid, mid, 3, stride=stride, groups=mid, act_layer=nn.SiLU),
            ConvNormAct(mid, cout, 1, act_layer=None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileVitBlock(nn.Module):
    def __init__(self, in_chs: int, transformer_dim: int, transformer_depth: int = 1, patch_size: int = 2, num_heads: int = 2) -> None:
        super().__init__()
        self.conv_kxk = ConvNormAct(in_chs, in_chs, 3, act_layer=nn.SiLU)
        self.conv_1x1 = nn.Conv2d(in_chs, transformer_dim, kernel_size=1, bias=False)
        self.transformer = nn.Sequential(*[
            TransformerBlock(transformer_dim, num_heads, mlp_ratio=2.0, init_values=None, drop_path=0.0)
            for _ in range(transformer_depth)])
        self.norm = nn.LayerNorm(transformer_dim)
        self.conv_proj = ConvNormAct(transformer_dim, in_chs, 1, act_layer=nn.SiLU)
        self.conv_fusion = ConvNormAct(in_chs + in_chs, in_chs, 3, act_layer=nn.SiLU)
        self.patch_size = (patch_size, patch_size)
        self.patch_area = self.patch_size[0] * self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_kxk(x)
        x = self.conv_1x1(x)
        patch_h, patch_w = self.patch_size
        B, C, H, W = x.shape
        new_h, new_w = math.ceil(H / patch_h) * patch_h, math.ceil(W / patch_w) * patch_w
        num_patch_h, num_patch_w = new_h // patch_h, new_w // patch_w
        num_patches = num_patch_h * num_patch_w
        interpolate = False
        if new_h != H or new_w != W:
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
            interpolate = True
        # [B, C, H, W] --> [B * C * n_h, n_w, p_h, p_w]
        x = x.reshape(B * C * num_patch_h, patch_h, num_patch_w, patch_w).transpose(1, 2)
        # [B * C * n_h, n_w, p_h, p_w] --> [BP, N, C] where P = p_h * p_w and N = n_h * n_w
        x = x.reshape(B, C, num_patches, self.patch_area).transpose(1, 3).reshape(B * self.patch_area, num_patches, -1)
        x = self.transformer(x)
        x = self.norm(x)
        # [BP, N, C] --> [B, C, H, W]
        x = x.contiguous().view(B, self.patch_area, num_patches, -1)
        x = x.transpose(1, 3).reshape(B * C * num_patch_h, num_patch_w, patch_h, patch_w)
        x = x.transpose(1, 2).reshape(B, C, num_patch_h * patch_h, num_patch_w * patch_w)
        if interpolate:
            x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
        x = self.conv_proj(x)
        x = self.conv_fusion(torch.cat((shortcut, x), dim=1))
        return x


class MobileViT(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvNormAct(3, 8, 3, stride=2, act_layer=nn.SiLU)
        self.stages = nn.Sequential(
            InvertedResidual(8, 12, 1), InvertedResidual(12, 16, 2),
            MobileVitBlock(16, 24, transformer_depth=2, patch_size=2),
            InvertedResidual(16, 24, 2),
            MobileVitBlock(24, 32, transformer_depth=1, patch_size=2))
        self.final_conv = ConvNormAct(24, 48, 1, act_layer=nn.SiLU)
        self.head = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final_conv(self.stages(self.stem(x)))
        return self.head(x.mean((2, 3)))


# ---------------------------------------------------------------- v2
class LinearSelfAttention(nn.Module):
    def __init__(self, embed_dim: int, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.qkv_proj = nn.Conv2d(embed_dim, 1 + (2 * embed_dim), kernel_size=1, bias=True)
        self.attn_dropout = nn.Dropout(p=attn_dropout)
        self.out_proj = nn.Conv2d(embed_dim, embed_dim, kernel_size=1, bias=True)
        self.embed_dim = embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [B, 1 + 2d, P, N]
        query, key, value = torch.split(qkv, split_size_or_sections=[1, self.embed_dim, self.embed_dim], dim=1)
        context_scores = F.softmax(query, dim=-1)
        context_scores = self.attn_dropout(context_scores)
        context_vector = key * context_scores
        context_vector = torch.sum(context_vector, dim=-1, keepdim=True)
        out = F.relu(value) * context_vector.expand_as(value)
        return self.out_proj(out)


class LinearAttnFFN(nn.Module):
    def __init__(self, embed_dim: int, ffn_latent_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.pre_norm_attn = nn.Sequential(nn.GroupNorm(1, embed_dim), LinearSelfAttention(embed_dim), nn.Dropout(p=dropout))
        self.pre_norm_ffn = nn.Sequential(
            nn.GroupNorm(1, embed_dim), nn.Conv2d(embed_dim, ffn_latent_dim, 1, bias=True), nn.SiLU(), nn.Dropout(p=dropout),
            nn.Conv2d(ffn_latent_dim, embed_dim, 1, bias=True), nn.Dropout(p=dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pre_norm_attn(x)
        x = x + self.pre_norm_ffn(x)
        return x


class MobileViTBlockv2(nn.Module):
    def __init__(self, in_channels: int, attn_unit_dim: int, n_attn_blocks: int = 2, patch_h: int = 2, patch_w: int = 2) -> None:
        super().__init__()
        self.local_rep = nn.Sequential(
            ConvNormAct(in_channels, in_channels, 3, groups=in_channels, act_layer=nn.SiLU),
            nn.Conv2d(in_channels, attn_unit_dim, 1, bias=False))
        self.global_rep = nn.Sequential(
            *[LinearAttnFFN(attn_unit_dim, 2 * attn_unit_dim) for _ in range(n_attn_blocks)], nn.GroupNorm(1, attn_unit_dim))
        self.conv_proj = ConvNormAct(attn_unit_dim, in_channels, 1, act_layer=None)
        self.patch_h = patch_h
        self.patch_w = patch_w

    def unfolding_pytorch(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        batch_size, in_channels, img_h, img_w = feature_map.shape
        patches = F.unfold(feature_map, kernel_size=(self.patch_h, self.patch_w), stride=(self.patch_h, self.patch_w))
        patches = patches.reshape(batch_size, in_channels, self.patch_h * self.patch_w, -1)
        return patches, (img_h, img_w)

    def folding_pytorch(self, patches: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
        batch_size, in_dim, patch_size, n_patches = patches.shape
        patches = patches.reshape(batch_size, in_dim * patch_size, n_patches)
        return F.fold(patches, output_size=output_size, kernel_size=(self.patch_h, self.patch_w), stride=(self.patch_h, self.patch_w))

    def resize_input_if_needed(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, in_channels, orig_h, orig_w = x.shape
        if orig_h % self.patch_h != 0 or orig_w % self.patch_w != 0:
            new_h = int(math.ceil(orig_h / self.patch_h) * self.patch_h)
            new_w = int(math.ceil(orig_w / self.patch_w) * self.patch_w)
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=True)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resize_input_if_needed(x)
        fm = self.local_rep(x)
        patches, output_size = self.unfolding_pytorch(fm)
        patches = self.global_rep(patches)
        fm = self.folding_pytorch(patches=patches, output_size=output_size)
        return self.conv_proj(fm)


class MobileViTv2(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvNormAct(3, 8, 3, stride=2, act_layer=nn.SiLU)
        self.stages = nn.Sequential(
            InvertedResidual(8, 16, 2), MobileViTBlockv2(16, 16, n_attn_blocks=2),
            InvertedResidual(16, 24, 2), MobileViTBlockv2(24, 24, n_attn_blocks=1))
        self.head = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


ENTRIES = (
    ZooModel("mobilevit", "MobileViT v1 (reshape unfold/fold around a transformer)", seeded(MobileViT, 1601), (2, 3, 60, 60),
             "math.ceil(H / p) * p with bilinear interpolate 15 -> 16 and back; reshape/transpose unfold into (B*P, N, C) and fold back; transformer blocks; conv_fusion(torch.cat((shortcut, x), 1)); MV2 blocks"),
    ZooModel("mobilevitv2", "MobileViT v2 (F.unfold/F.fold, separable linear attention)", seeded(MobileViTv2, 1602), (2, 3, 60, 60),
             "resize_input_if_needed (15 -> 16, align_corners=True); F.unfold + reshape(B, C, P, -1); GroupNorm(1) pre-norm; torch.split(qkv, [1, d, d]); softmax over N; sum(keepdim) context; relu(value) * expand_as; F.fold"),
)
