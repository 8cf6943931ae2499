"""CoAtNet: MBConv stages with a BN pre-norm, then NCHW transformer stages with relative position bias.

Patterns reproduced (read in huggingface/pytorch-image-models ``timm/models/maxxvit.py``,
``timm/layers/pos_embed_rel.py`` and ``timm/layers/norm.py``): MBConv with ``shortcut = self.shortcut(x)`` taken
*before* ``x = self.pre_norm(x)`` (a BatchNorm without activation), a ``Downsample2d`` shortcut (``AvgPool2d(2, 2)``
then a biased 1x1 expand conv), 1x1 -> BN+GELU -> strided depthwise 3x3 -> BN+GELU -> SE(SiLU) -> 1x1 and
``x = self.drop_path(x) + shortcut``; transformer blocks on NCHW maps with ``LayerNorm2d`` (``permute(0, 2, 3, 1)``,
``F.layer_norm``, permute back), a norm-then-downsample ``nn.Sequential(OrderedDict(norm=..., down=...))`` when
strided, ``Attention2d`` with ``self.qkv(x).view(B, heads, dim_head * 3, -1).chunk(3, dim=2)`` and
``F.scaled_dot_product_attention(q.transpose(-1, -2).contiguous(), ..., attn_mask=rel_pos.get_bias())`` then
``.transpose(-1, -2).reshape(B, -1, H, W)``; relative position bias ``table[index].view(...).permute(2, 0, 1)``;
``LayerScale2d`` as ``x * gamma.view(1, -1, 1, 1)``; a 1x1-conv MLP.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ._base import ZooModel, seeded
from .efficientnet import DropPath


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, num_features: int, apply_act: bool = True, eps: float = 1e-3) -> None:
        super().__init__(num_features, eps=eps)
        self.act = nn.GELU() if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, exponential_average_factor, self.eps)
        return self.act(x)


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Downsample2d(nn.Module):
    def __init__(self, dim: int, dim_out: int, pool_type: str = "avg2", bias: bool = True) -> None:
        super().__init__()
        if pool_type == "max":
            self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.pool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.expand = nn.Conv2d(dim, dim_out, 1, bias=bias) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.pool(x))


class SEModule(nn.Module):
    def __init__(self, channels: int, rd_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.act = nn.SiLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.fc2(self.act(self.fc1(x_se)))
        return x * x_se.sigmoid()


class MbConvBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, expand_ratio: float = 4.0, drop_path: float = 0.1) -> None:
        super().__init__()
        mid_chs = int(out_chs * expand_ratio)
        self.shortcut = Downsample2d(in_chs, out_chs, pool_type="avg2") if stride == 2 else nn.Identity()
        self.pre_norm = BatchNormAct2d(in_chs, apply_act=False)
        self.down = nn.Identity()
        self.conv1_1x1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.norm1 = BatchNormAct2d(mid_chs)
        self.conv2_kxk = nn.Conv2d(mid_chs, mid_chs, 3, stride=stride, padding=1, groups=mid_chs, bias=False)
        self.norm2 = BatchNormAct2d(mid_chs)
        self.se = SEModule(mid_chs, max(4, int(in_chs * 0.25)))
        self.conv3_1x1 = nn.Conv2d(mid_chs, out_chs, 1, bias=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.pre_norm(x)
        x = self.down(x)
        x = self.conv1_1x1(x)
        x = self.norm1(x)
        x = self.conv2_kxk(x)
        x = self.norm2(x)
        x = self.se(x)
        x = self.conv3_1x1(x)
        return self.drop_path(x) + shortcut


class RelPosBias(nn.Module):
    def __init__(self, window_size: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.window_area = window_size[0] * window_size[1]
        self.bias_shape = (self.window_area,) * 2 + (num_heads,)
        num_relative_distance = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(0.02 * torch.randn(num_relative_distance, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window_size[0]), torch.arange(window_size[1]), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
        rel[:, :, 0] += window_size[0] - 1
        rel[:, :, 1] += window_size[1] - 1
        rel[:, :, 0] *= 2 * window_size[1] - 1
        self.register_buffer("relative_position_index", rel.sum(-1).view(-1), persistent=False)

    def get_bias(self) -> torch.Tensor:
        relative_position_bias = self.relative_position_bias_table[self.relative_position_index]
        relative_position_bias = relative_position_bias.view(self.bias_shape).permute(2, 0, 1)
        return relative_position_bias.unsqueeze(0).contiguous()


class Attention2d(nn.Module):
    def __init__(self, dim: int, dim_out: int, dim_head: int = 8, window_size: tuple[int, int] = (4, 4)) -> None:
        super().__init__()
        self.num_heads = dim_out // dim_head
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        self.qkv = nn.Conv2d(dim, dim_out * 3, 1, bias=True)
        self.rel_pos = RelPosBias(window_size, self.num_heads)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Conv2d(dim_out, dim_out, 1, bias=True)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).view(B, self.num_heads, self.dim_head * 3, -1).chunk(3, dim=2)
        attn_bias = self.rel_pos.get_bias()
        x = F.scaled_dot_product_attention(
            q.transpose(-1, -2).contiguous(),
            k.transpose(-1, -2).contiguous(),
            v.transpose(-1, -2).contiguous(),
            attn_mask=attn_bias,
            dropout_p=self.attn_drop.p if self.training else 0.0,
        ).transpose(-1, -2).reshape(B, -1, H, W)
        x = self.proj(x)
        return self.proj_drop(x)


class LayerScale2d(nn.Module):
    def __init__(self, dim: int, init_values: float = 0.5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


class ConvMlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1, bias=True)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_features, in_features, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock2d(nn.Module):
    def __init__(self, dim: int, dim_out: int, stride: int = 1, window_size: tuple[int, int] = (4, 4)) -> None:
        super().__init__()
        if stride == 2:
            self.shortcut = Downsample2d(dim, dim_out, pool_type="max")
            self.norm1 = nn.Sequential(OrderedDict([("norm", LayerNorm2d(dim, eps=1e-5)), ("down", Downsample2d(dim, dim, pool_type="max"))]))
        else:
            assert dim == dim_out
            self.shortcut = nn.Identity()
            self.norm1 = LayerNorm2d(dim, eps=1e-5)
        self.attn = Attention2d(dim, dim_out, window_size=window_size)
        self.ls1 = LayerScale2d(dim_out)
        self.drop_path1 = DropPath(0.1)
        self.norm2 = LayerNorm2d(dim_out, eps=1e-5)
        self.mlp = ConvMlp(dim_out, 4 * dim_out)
        self.ls2 = LayerScale2d(dim_out)
        self.drop_path2 = DropPath(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shortcut(x) + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class CoAtNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), BatchNormAct2d(8), nn.Conv2d(8, 8, 3, padding=1, bias=True))
        self.stages = nn.Sequential(
            MbConvBlock(8, 16, stride=2), MbConvBlock(16, 16),
            MbConvBlock(16, 24, stride=2),
            TransformerBlock2d(24, 32, stride=2), TransformerBlock2d(32, 32))
        self.norm = LayerNorm2d(32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.stages(self.stem(x)))
        return self.head(x.mean((2, 3)))


ENTRIES = (
    ZooModel("coatnet", "CoAtNet (MBConv + relative-position transformer, NCHW)", seeded(CoAtNet, 1901), (2, 3, 64, 64),
             "shortcut taken before BN pre-norm; AvgPool2d(2)+1x1 Downsample2d shortcut; BatchNorm2d subclass calling F.batch_norm; LayerNorm2d permute/F.layer_norm; qkv view(...).chunk(3, dim=2); SDPA with attn_mask rel-pos bias; gamma.view(1, -1, 1, 1)"),
)
