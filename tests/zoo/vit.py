"""Vision Transformers with convolutional parts: ViT with a conv stem (ViT-C / hybrid) and dynamic image size; CeiT;
a ViT with LoRA adapters.

Patterns reproduced (read in huggingface/pytorch-image-models ``timm/models/vision_transformer.py``,
``timm/layers/patch_embed.py``, ``timm/layers/pos_embed.py``, ``timm/layers/layer_scale.py`` and
``timm/models/vision_transformer_hybrid.py``): a patch embedding that checks the input with ``torch._assert(H %
self.patch_size[0] == 0, f"...")`` before a conv-BN-ReLU stem + 1x1 projection, returning NHWC via ``x.permute(0, 2,
3, 1)``; ``_pos_embed`` that resamples the absolute position table to the actual grid (old grid side
``int(math.sqrt(num_pos))``, ``reshape(...).permute(0, 3, 1, 2)``, ``F.interpolate(mode='bicubic',
antialias=True)``) when the input is not the configured size, then ``x.view(B, -1, C)`` and
``torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)``; attention with ``qkv.reshape(B, N, 3, heads,
head_dim).permute(2, 0, 3, 1, 4).unbind(0)``, q/k LayerNorm and ``F.scaled_dot_product_attention``; ``LayerScale``
with ``x.mul_(self.gamma) if self.inplace else x * self.gamma``; ``x +
self.drop_path1(self.ls1(self.attn(self.norm1(x))))``; class-token pooling ``x[:, 0]``. CeiT (read in public CeiT
ports found through code search, whose ``LeFF`` wraps ``BatchNorm1d`` in einops ``Rearrange``; the excerpts do not
name their repository; here the rearranges are the equivalent ``transpose``/``reshape`` calls): an image-to-tokens
conv-BN-maxpool stem, ``x += self.pos_embedding[:, :(n + 1)]`` in place, and a locally-enhanced FFN that splits off
the class token, applies ``BatchNorm1d`` to ``transpose(1, 2)``-ed tokens and rebuilds the square map with ``int(N
** 0.5)``.  LoRA (read in huggingface/peft ``src/peft/tuners/lora/layer.py``): ``lora.Linear`` keeps the frozen
``base_layer`` and per-adapter ``lora_A``/``lora_B``/``lora_dropout`` ``ModuleDict``s and a ``scaling`` dict, loops over
``active_adapters``, casts ``x = x.to(lora_A.weight.dtype)``, adds ``lora_B(lora_A(dropout(x))) * scaling`` and casts the
result back to the base output's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._base import ZooModel, seeded
from .efficientnet import DropPath


class ConvStemPatchEmbed(nn.Module):
    def __init__(self, img_size: int = 32, patch_size: int = 8, in_chans: int = 3, embed_dim: int = 32) -> None:
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        cin, cout = in_chans, 8
        for _ in range(int(math.log2(patch_size))):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin, cout = cout, cout * 2
        layers.append(nn.Conv2d(cin, embed_dim, kernel_size=1, stride=1, padding=0))
        self.proj = nn.Sequential(*layers)
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        torch._assert(H % self.patch_size[0] == 0, f"Input height ({H}) should be divisible by patch size ({self.patch_size[0]}).")
        torch._assert(W % self.patch_size[1] == 0, f"Input width ({W}) should be divisible by patch size ({self.patch_size[1]}).")
        x = self.proj(x)
        x = x.permute(0, 2, 3, 1)  # NCHW -> NHWC
        return self.norm(x)


def resample_abs_pos_embed(posemb: torch.Tensor, new_size: list[int], num_prefix_tokens: int = 1) -> torch.Tensor:
    num_pos_tokens = posemb.shape[1]
    num_new_tokens = new_size[0] * new_size[1] + num_prefix_tokens
    if num_new_tokens == num_pos_tokens and new_size[0] == new_size[1]:
        return posemb
    old_size = [int(math.sqrt(num_pos_tokens - num_prefix_tokens))] * 2
    if num_prefix_tokens:
        posemb_prefix, posemb = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    else:
        posemb_prefix = None
    embed_dim = posemb.shape[-1]
    posemb = posemb.reshape(1, old_size[0], old_size[1], -1).permute(0, 3, 1, 2)
    posemb = F.interpolate(posemb, size=new_size, mode="bicubic", antialias=True)
    posemb = posemb.permute(0, 2, 3, 1).reshape(1, -1, embed_dim)
    if posemb_prefix is not None:
        posemb = torch.cat([posemb_prefix, posemb], dim=1)
    return posemb


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 4, qkv_bias: bool = True, qk_norm: bool = False) -> None:
        super().__init__()
        assert dim % num_heads == 0, "dim should be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(0.1)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return self.proj_drop(x)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(0.1)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, init_values: float | None = 0.5, qk_norm: bool = False,
                 inplace_ls: bool = False, drop_path: float = 0.1) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qk_norm=qk_norm)
        self.ls1 = LayerScale(dim, init_values=init_values, inplace=inplace_ls) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values=init_values, inplace=inplace_ls) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class VisionTransformer(nn.Module):
    def __init__(self, img_size: int = 32, patch_size: int = 8, embed_dim: int = 32, depth: int = 2, num_heads: int = 4,
                 num_classes: int = 10, dynamic_img_size: bool = True) -> None:
        super().__init__()
        self.dynamic_img_size = dynamic_img_size
        self.num_prefix_tokens = 1
        self.patch_embed = ConvStemPatchEmbed(img_size, patch_size, 3, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + self.num_prefix_tokens, embed_dim) * 0.02)
        nn.init.normal_(self.cls_token, std=1e-2)
        self.pos_drop = nn.Dropout(p=0.1)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, qk_norm=i == 0, inplace_ls=i == 1) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_img_size:
            B, H, W, C = x.shape
            pos_embed = resample_abs_pos_embed(self.pos_embed, [H, W], num_prefix_tokens=self.num_prefix_tokens)
            x = x.view(B, -1, C)
        else:
            pos_embed = self.pos_embed
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + pos_embed
        return self.pos_drop(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.blocks(x)
        x = self.norm(x)
        x = x[:, 0]
        return self.head(x)


# ---------------------------------------------------------------- CeiT (image-to-tokens stem, locally-enhanced FFN)
class LeFF(nn.Module):
    """Linear -> BN1d -> GELU, tokens back to a square map (``int(N ** 0.5)``), depthwise 3x3 -> BN -> GELU,
    Linear -> BN1d -> GELU; the class token bypasses it."""

    def __init__(self, dim: int, scale: int = 4, depth_kernel: int = 3) -> None:
        super().__init__()
        scale_dim = dim * scale
        self.up_proj = nn.Linear(dim, scale_dim)
        self.up_bn = nn.BatchNorm1d(scale_dim)
        self.depth_conv = nn.Conv2d(scale_dim, scale_dim, kernel_size=depth_kernel, padding=depth_kernel // 2, groups=scale_dim, bias=False)
        self.depth_bn = nn.BatchNorm2d(scale_dim)
        self.down_proj = nn.Linear(scale_dim, dim)
        self.down_bn = nn.BatchNorm1d(dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls_token, x = torch.split(x, [1, x.size(1) - 1], dim=1)
        B, N, C = x.shape
        h = w = int(N ** 0.5)
        x = self.up_proj(x).transpose(1, 2)  # b n c -> b c n
        x = self.act(self.up_bn(x))
        x = x.reshape(B, -1, h, w)
        x = self.act(self.depth_bn(self.depth_conv(x)))
        x = x.flatten(2).transpose(1, 2)  # b c h w -> b (h w) c
        x = self.down_proj(x).transpose(1, 2)
        x = self.act(self.down_bn(x)).transpose(1, 2)
        return torch.cat((cls_token, x), dim=1)


class CeiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.leff = LeFF(dim, scale=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.leff(self.norm2(x))
        return x


class CeiT(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 2, num_heads: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.i2t = nn.Sequential(  # image-to-tokens: conv, BN, max pool, then 4x4 patches
            nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(16), nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(16, dim, kernel_size=4, stride=4))
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embedding = nn.Parameter(0.02 * torch.randn(1, 1 + 16, dim))
        self.blocks = nn.ModuleList([CeiTBlock(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.i2t(img).flatten(2).transpose(1, 2)
        b, n, _ = x.shape
        cls_tokens = self.cls_token.expand(b, -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        x += self.pos_embedding[:, :(n + 1)]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


# ---------------------------------------------------------------- LoRA adapters (PEFT)
class LoraLinear(nn.Module):
    """A Linear with a low-rank adapter, laid out as PEFT's ``lora.Linear``: adapters in ``ModuleDict``s keyed by
    name, a loop over the active ones, the input cast to the adapter's weight dtype and the sum back."""

    def __init__(self, base: nn.Linear, r: int = 2, alpha: int = 4) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False)})
        self.lora_dropout = nn.ModuleDict({"default": nn.Dropout(0.05)})
        self.scaling = {"default": alpha / r}
        self.active_adapters = ["default"]
        nn.init.normal_(self.lora_B["default"].weight, std=0.1)  # a trained adapter: B is zero only at its start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A.keys():
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            x = x.to(lora_a.weight.dtype)
            result = result + lora_b(lora_a(self.lora_dropout[name](x))) * self.scaling[name]
        return result.to(result_dtype)


class LoraBlock(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = LoraLinear(nn.Linear(dim, 3 * dim)), LoraLinear(nn.Linear(dim, dim))
        self.fc1, self.fc2 = LoraLinear(nn.Linear(dim, 2 * dim)), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class LoraViT(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.patch = nn.Sequential(nn.Conv2d(3, dim, 4, 4, bias=False), nn.BatchNorm2d(dim))
        self.blocks = nn.Sequential(*(LoraBlock(dim) for _ in range(depth)))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.patch(x).flatten(2).transpose(1, 2))
        return self.head(x.mean(1))


ENTRIES = (
    ZooModel("vit_conv_stem", "ViT with convolutional stem, dynamic image size", seeded(VisionTransformer, 1401), (2, 3, 40, 40),
             "torch._assert(H % patch == 0); conv-BN-ReLU stem + 1x1 proj to NHWC; pos-embed resample (int(sqrt(N)), bicubic antialias) for a 5x5 grid vs 4x4 table; cls_token.expand + cat; SDPA; qk LayerNorm; LayerScale x.mul_(gamma); x[:, 0]"),
    ZooModel("ceit", "CeiT (image-to-tokens stem, locally-enhanced FFN)", seeded(CeiT, 1402), (2, 3, 64, 64),
             "conv-BN-maxpool-patchify stem; x += pos_embedding[:, :(n + 1)] in place; torch.split cls token; Linear -> BatchNorm1d on transpose(1, 2); h = w = int(N ** 0.5) reshape to a map; dw3x3-BN; cat cls back"),
    ZooModel("vit_lora", "ViT with LoRA adapters (PEFT lora.Linear layout)", seeded(LoraViT, 1403), (2, 3, 16, 16),
             "base_layer + lora_B(lora_A(dropout(x))) * scaling over ModuleDicts of adapters, looped by name; x.to(lora_A.weight.dtype) and result.to(result.dtype); adapters on qkv, proj and fc1; conv-BN patchify"),
)
