"""MViTv2: multiscale pooling attention (pooled queries / keys / values) with a class token.

Patterns reproduced (read in huggingface/pytorch-image-models ``timm/models/mvitv2.py``): the qkv projection
reshaped to ``(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)`` and ``unbind(dim=0)``; ``reshape_pre_pool`` splitting
off the class token (``x[:, :, :1, :]``) and reshaping tokens to ``(-1, H, W, C).permute(0, 3, 1, 2)``; depthwise
strided conv pooling of q/k/v followed by a LayerNorm on the pooled tokens; ``reshape_post_pool`` concatenating the
class token back; decomposed relative positions (``torch.einsum("byhwc,hkc->byhwk", ...)``) written into the
attention matrix by **slice assignment** ``attn[:, :, sp_idx:, sp_idx:] = (attn[:, :, sp_idx:, sp_idx:].view(...) +
...).view(...)``; residual pooling ``x = x + q``; blocks that project the shortcut with a Linear when the width
changes and pool it with ``nn.MaxPool2d`` when the query is strided; the feature size passed along with the tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from ._base import ZooModel, seeded
from .efficientnet import DropPath


def reshape_pre_pool(x: torch.Tensor, feat_size: list[int], has_cls_token: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    H, W = feat_size
    if has_cls_token:
        cls_tok, x = x[:, :, :1, :], x[:, :, 1:, :]
    else:
        cls_tok = None
    x = x.reshape(-1, H, W, x.shape[-1]).permute(0, 3, 1, 2).contiguous()
    return x, cls_tok


def reshape_post_pool(x: torch.Tensor, num_heads: int, cls_tok: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
    feat_size = [x.shape[2], x.shape[3]]
    L_pooled = x.shape[2] * x.shape[3]
    x = x.reshape(-1, num_heads, x.shape[1], L_pooled).transpose(2, 3)
    if cls_tok is not None:
        x = torch.cat((cls_tok, x), dim=2)
    return x, feat_size


def cal_rel_pos_type(attn: torch.Tensor, q: torch.Tensor, has_cls_token: bool, q_size: list[int], k_size: list[int],
                     rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor) -> torch.Tensor:
    sp_idx = 1 if has_cls_token else 0
    q_h, q_w = q_size
    k_h, k_w = k_size
    q_h_ratio = max(k_h / q_h, 1.0)
    k_h_ratio = max(q_h / k_h, 1.0)
    dist_h = torch.arange(q_h).unsqueeze(-1) * q_h_ratio - torch.arange(k_h).unsqueeze(0) * k_h_ratio
    dist_h += (k_h - 1) * k_h_ratio
    q_w_ratio = max(k_w / q_w, 1.0)
    k_w_ratio = max(q_w / k_w, 1.0)
    dist_w = torch.arange(q_w).unsqueeze(-1) * q_w_ratio - torch.arange(k_w).unsqueeze(0) * k_w_ratio
    dist_w += (k_w - 1) * k_w_ratio
    rel_h = rel_pos_h[dist_h.long()]
    rel_w = rel_pos_w[dist_w.long()]
    B, n_head, q_N, dim = q.shape
    r_q = q[:, :, sp_idx:].reshape(B, n_head, q_h, q_w, dim)
    rel_h = torch.einsum("byhwc,hkc->byhwk", r_q, rel_h)
    rel_w = torch.einsum("byhwc,wkc->byhwk", r_q, rel_w)
    attn[:, :, sp_idx:, sp_idx:] = (
        attn[:, :, sp_idx:, sp_idx:].view(B, -1, q_h, q_w, k_h, k_w)
        + rel_h.unsqueeze(-1)
        + rel_w.unsqueeze(-2)
    ).view(B, -1, q_h * q_w, k_h * k_w)
    return attn


class MultiScaleAttention(nn.Module):
    def __init__(self, dim: int, dim_out: int, feat_size: tuple[int, int], num_heads: int = 1, kernel_q: int = 3,
                 kernel_kv: int = 3, stride_q: int = 1, stride_kv: int = 1, has_cls_token: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dim_out = dim_out
        self.head_dim = dim_out // num_heads
        self.scale = self.head_dim ** -0.5
        self.has_cls_token = has_cls_token
        self.qkv = nn.Linear(dim, dim_out * 3, bias=True)
        self.proj = nn.Linear(dim_out, dim_out)
        self.pool_q = self.norm_q = None
        if stride_q > 1 or kernel_q > 1:
            self.pool_q = nn.Conv2d(self.head_dim, self.head_dim, kernel_q, stride=stride_q, padding=kernel_q // 2,
                                    groups=self.head_dim, bias=False)
            self.norm_q = nn.LayerNorm(self.head_dim)
        self.pool_k = nn.Conv2d(self.head_dim, self.head_dim, kernel_kv, stride=stride_kv, padding=kernel_kv // 2,
                                groups=self.head_dim, bias=False)
        self.norm_k = nn.LayerNorm(self.head_dim)
        self.pool_v = nn.Conv2d(self.head_dim, self.head_dim, kernel_kv, stride=stride_kv, padding=kernel_kv // 2,
                                groups=self.head_dim, bias=False)
        self.norm_v = nn.LayerNorm(self.head_dim)
        size = feat_size[0]
        q_size = size // stride_q
        kv_size = size // stride_kv
        rel_sp_dim = 2 * max(q_size, kv_size) - 1
        self.rel_pos_h = nn.Parameter(0.02 * torch.randn(rel_sp_dim, self.head_dim))
        self.rel_pos_w = nn.Parameter(0.02 * torch.randn(rel_sp_dim, self.head_dim))
        self.residual_pooling = True

    def forward(self, x: torch.Tensor, feat_size: list[int]) -> tuple[torch.Tensor, list[int]]:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(dim=0)
        if self.pool_q is not None:
            q, q_tok = reshape_pre_pool(q, feat_size, self.has_cls_token)
            q = self.pool_q(q)
            q, q_size = reshape_post_pool(q, self.num_heads, q_tok)
        else:
            q_size = feat_size
        if self.norm_q is not None:
            q = self.norm_q(q)
        k, k_tok = reshape_pre_pool(k, feat_size, self.has_cls_token)
        k = self.pool_k(k)
        k, k_size = reshape_post_pool(k, self.num_heads, k_tok)
        k = self.norm_k(k)
        v, v_tok = reshape_pre_pool(v, feat_size, self.has_cls_token)
        v = self.pool_v(v)
        v, _ = reshape_post_pool(v, self.num_heads, v_tok)
        v = self.norm_v(v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = cal_rel_pos_type(attn, q, self.has_cls_token, q_size, k_size, self.rel_pos_h, self.rel_pos_w)
        attn = attn.softmax(dim=-1)
        x = attn @ v
        if self.residual_pooling:
            x = x + q
        x = x.transpose(1, 2).reshape(B, -1, self.dim_out)
        x = self.proj(x)
        return x, q_size


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MultiScaleBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, num_heads: int, feat_size: tuple[int, int], stride_q: int = 1,
                 stride_kv: int = 1, has_cls_token: bool = True, drop_path: float = 0.1) -> None:
        super().__init__()
        self.has_cls_token = has_cls_token
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.shortcut_proj_attn = nn.Linear(dim, dim_out) if dim != dim_out else None
        self.shortcut_pool_attn = nn.MaxPool2d(stride_q + 1, stride_q, stride_q // 2 if stride_q > 1 else 0) if stride_q > 1 else None
        self.attn = MultiScaleAttention(dim, dim_out, feat_size, num_heads, stride_q=stride_q, stride_kv=stride_kv,
                                        has_cls_token=has_cls_token)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = Mlp(dim_out, 4 * dim_out)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def _shortcut_pool(self, x: torch.Tensor, feat_size: list[int]) -> torch.Tensor:
        if self.shortcut_pool_attn is None:
            return x
        if self.has_cls_token:
            cls_tok, x = x[:, :1, :], x[:, 1:, :]
        else:
            cls_tok = None
        B, L, C = x.shape
        H, W = feat_size
        x = x.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()
        x = self.shortcut_pool_attn(x)
        x = x.reshape(B, C, -1).transpose(1, 2)
        if cls_tok is not None:
            x = torch.cat((cls_tok, x), dim=1)
        return x

    def forward(self, x: torch.Tensor, feat_size: list[int]) -> tuple[torch.Tensor, list[int]]:
        x_norm = self.norm1(x)
        x_shortcut = x if self.shortcut_proj_attn is None else self.shortcut_proj_attn(x_norm)
        x_shortcut = self._shortcut_pool(x_shortcut, feat_size)
        x, feat_size_new = self.attn(x_norm, feat_size)
        x = x_shortcut + self.drop_path1(x)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x, feat_size_new


class MViTv2(nn.Module):
    def __init__(self, embed_dim: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=7, stride=4, padding=3)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, embed_dim))
        self.blocks = nn.ModuleList([
            MultiScaleBlock(embed_dim, embed_dim, 1, (12, 12), stride_q=1, stride_kv=4),
            MultiScaleBlock(embed_dim, 2 * embed_dim, 2, (12, 12), stride_q=2, stride_kv=2),
            MultiScaleBlock(2 * embed_dim, 2 * embed_dim, 2, (6, 6), stride_q=1, stride_kv=2)])
        self.norm = nn.LayerNorm(2 * embed_dim, eps=1e-6)
        self.head = nn.Linear(2 * embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        feat_size = list(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        B, N, C = x.shape
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        for blk in self.blocks:
            x, feat_size = blk(x, feat_size)
        x = self.norm(x)
        return self.head(x[:, 0])


ENTRIES = (
    ZooModel("mvitv2", "MViTv2 (multiscale pooling attention)", seeded(MViTv2, 1701), (2, 3, 48, 48),
             "cls token split/rejoin around depthwise strided conv pooling of q/k/v + LayerNorm; HAZARD: attn[:, :, 1:, 1:] = (attn[:, :, 1:, 1:].view(...) + rel) in-place slice write; einsum rel-pos; x = x + q; MaxPool2d shortcut pooling; feat_size threaded"),
)
