"""Train-time building blocks of FastViT, written as plain PyTorch modules.

Every block here keeps its multi-branch train-time form (conv + BN branches, BN
skips, layer scales). Nothing is fused: ``repalgebra.fuse`` folds the branches
later by tracing the model with ``torch.fx``, so all ``forward`` methods avoid
data-dependent Python control flow. ``if`` statements only test the module's own
structure (e.g. "does this block have a skip branch"), which ``torch.fx``
resolves once at trace time.

Module and attribute names follow Apple's reference implementation
(``apple/ml-fastvit``: ``rbr_conv``, ``rbr_scale``, ``rbr_skip``, ``lkb_origin``,
``small_conv``, ``convffn``, ``layer_scale``, ...), so Apple's train-time
checkpoints load without renaming and the fusion engine's reports use the same
module paths as the paper's code.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "conv_bn",
    "DropPath",
    "SEBlock",
    "MobileOneBlock",
    "ReparamLargeKernelConv",
    "PatchEmbed",
    "RepMixer",
    "ConvFFN",
    "Attention",
    "RepCPE",
    "RepMixerBlock",
    "AttentionBlock",
    "convolutional_stem",
]


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
) -> nn.Sequential:
    """Return ``Sequential(conv=Conv2d(bias=False), bn=BatchNorm2d)`` with 'same' padding.

    The child names ``conv`` and ``bn`` match the reference, so checkpoint keys
    read ``...rbr_conv.0.conv.weight`` / ``...rbr_conv.0.bn.running_var``.
    """
    branch = nn.Sequential()
    branch.add_module(
        "conv",
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size=kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        ),
    )
    branch.add_module("bn", nn.BatchNorm2d(out_channels))
    return branch


class DropPath(nn.Module):
    """Stochastic depth: zero whole samples of a residual branch while training.

    Identity in eval mode. Blocks build it only for a positive rate (otherwise
    they hold ``None`` and skip the call), so default traced graphs have no such node.
    """

    def __init__(self, drop_prob: float) -> None:
        """Create the layer.

        Args:
            drop_prob: probability of dropping a sample's branch, in (0, 1).
        """
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply per-sample dropping (train mode) or return ``x`` unchanged (eval)."""
        if not self.training:
            return x
        keep = 1.0 - self.drop_prob
        # One Bernoulli draw per sample, broadcast over C, H, W (inputs are 4-D).
        mask = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        """Show the drop probability in ``print(model)``."""
        return f"drop_prob={self.drop_prob}"


class SEBlock(nn.Module):
    """Squeeze-and-excitation as in MobileOne: mean, 1x1 reduce, ReLU, 1x1 expand, sigmoid.

    The reference squeezes with ``F.avg_pool2d(x, kernel_size=[h, w])`` where
    ``h, w`` are read from the input at run time, i.e. a *global* average over the
    whole feature map at any resolution (8x8 in the head at 256x256 input). We
    write the same quantity as ``x.mean((2, 3), keepdim=True)``: it equals the
    reference at 256x256 (and every other size) and ``torch.fx`` records it as a
    single static op instead of an ``avg_pool2d`` whose kernel size is a traced
    shape. (Forks such as FastViT-HD hard-code ``kernel_size=[16, 16]``; that
    variant would fail on the 8x8 map of a 256x256 input and is not followed.)
    """

    def __init__(self, channels: int, rd_ratio: float = 0.0625) -> None:
        """Create the block.

        Args:
            channels: channels of the input (and output).
            rd_ratio: width of the bottleneck relative to ``channels``; the
                reference truncates with ``int()``.
        """
        super().__init__()
        hidden = int(channels * rd_ratio)
        self.reduce = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)
        self.expand = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rescale each channel of ``x`` by a gate computed from its global mean."""
        s = x.mean((2, 3), keepdim=True)
        s = self.reduce(s)
        s = F.relu(s)
        s = self.expand(s)
        s = torch.sigmoid(s)
        return x * s


class MobileOneBlock(nn.Module):
    """MobileOne block at train time: a sum of BN'd linear branches, then SE, then activation.

    Branches (each present or not, as in the reference):

    * ``rbr_skip``: ``BatchNorm2d`` on the input, only when ``in == out`` and
      ``stride == 1``;
    * ``rbr_conv``: ``ModuleList`` of ``num_conv_branches`` conv+BN pairs with the
      full kernel (FastViT always uses one, except RepMixer's ``norm`` with zero);
    * ``rbr_scale``: a 1x1 conv+BN pair, only when ``kernel_size > 1`` and
      ``use_scale_branch``.

    The branches are summed in the reference's order (scale, skip, convs), then
    the result goes through SE (if ``use_se``) and GELU (if ``use_act``): SE
    *before* the activation, as in the reference.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        use_se: bool = False,
        use_act: bool = True,
        use_scale_branch: bool = True,
        num_conv_branches: int = 1,
    ) -> None:
        """Create the block; padding is always ``kernel_size // 2`` as in FastViT.

        Args:
            in_channels: input channels.
            out_channels: output channels.
            kernel_size: kernel of the conv branches (odd).
            stride: stride of every conv branch.
            groups: groups of every conv branch (``in_channels`` = depthwise).
            use_se: apply :class:`SEBlock` to the summed branches.
            use_act: apply GELU at the end.
            use_scale_branch: add the 1x1 branch (only used when ``kernel_size > 1``).
            num_conv_branches: number of full-kernel conv+BN branches.
        """
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.groups = groups

        # Absent parts are None rather than nn.Identity, so traced graphs carry no no-op nodes.
        self.se = SEBlock(out_channels) if use_se else None
        self.activation = nn.GELU() if use_act else None

        self.rbr_skip = (
            nn.BatchNorm2d(in_channels) if in_channels == out_channels and stride == 1 else None
        )
        self.rbr_conv = (
            nn.ModuleList(
                conv_bn(in_channels, out_channels, kernel_size, stride, groups)
                for _ in range(num_conv_branches)
            )
            if num_conv_branches > 0
            else None
        )
        self.rbr_scale = (
            conv_bn(in_channels, out_channels, 1, stride, groups)
            if kernel_size > 1 and use_scale_branch
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the branches (scale, skip, convs, in the reference's order), then SE and act."""
        branches: List[torch.Tensor] = []
        if self.rbr_scale is not None:
            branches.append(self.rbr_scale(x))
        if self.rbr_skip is not None:
            branches.append(self.rbr_skip(x))
        if self.rbr_conv is not None:
            for branch in self.rbr_conv:
                branches.append(branch(x))
        out = branches[0]
        for b in branches[1:]:
            out = out + b
        if self.se is not None:
            out = self.se(out)
        if self.activation is not None:
            out = self.activation(out)
        return out


class ReparamLargeKernelConv(nn.Module):
    """RepLKNet-style large-kernel conv: large conv+BN plus a small conv+BN, summed.

    Used (depthwise, stride 2, 7x7 + 3x3) as the first half of :class:`PatchEmbed`.

    No activation: the reference constructs a GELU but calls it without using its
    result (``self.activation(out); return out``), so the official checkpoints
    were trained without one. We keep that behaviour, so loaded checkpoints give
    identical outputs, and simply omit the dead activation.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        groups: int,
        small_kernel: Optional[int] = 3,
    ) -> None:
        """Create the block.

        Args:
            in_channels: input channels.
            out_channels: output channels.
            kernel_size: size of the large kernel (``lkb_origin``).
            stride: stride of both branches.
            groups: groups of both branches.
            small_kernel: size of the parallel small kernel (``small_conv``), or
                ``None`` for none.
        """
        super().__init__()
        if small_kernel is not None and small_kernel > kernel_size:
            raise ValueError("small_kernel cannot be larger than kernel_size")
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        self.lkb_origin = conv_bn(in_channels, out_channels, kernel_size, stride, groups)
        self.small_conv = (
            conv_bn(in_channels, out_channels, small_kernel, stride, groups)
            if small_kernel is not None
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``lkb_origin(x) + small_conv(x)`` (no activation, see class doc)."""
        out = self.lkb_origin(x)
        if self.small_conv is not None:
            out = out + self.small_conv(x)
        # Deliberately no activation: the reference discards its GELU's result.
        return out


class PatchEmbed(nn.Module):
    """Downsampling between stages: 7x7 depthwise large-kernel conv, then a 1x1 MobileOne block.

    ``proj[0]`` is a :class:`ReparamLargeKernelConv` (``groups=in_channels``,
    stride 2, 3x3 small branch, no activation); ``proj[1]`` a 1x1
    :class:`MobileOneBlock` with a BN skip and GELU.
    """

    def __init__(
        self, in_channels: int, embed_dim: int, patch_size: int = 7, stride: int = 2
    ) -> None:
        """Create the layer.

        Args:
            in_channels: channels of the previous stage.
            embed_dim: channels of the next stage.
            patch_size: large kernel size.
            stride: downsampling factor.
        """
        super().__init__()
        self.proj = nn.Sequential(
            ReparamLargeKernelConv(
                in_channels,
                embed_dim,
                kernel_size=patch_size,
                stride=stride,
                groups=in_channels,
                small_kernel=3,
            ),
            MobileOneBlock(embed_dim, embed_dim, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Downsample ``x`` by ``stride`` and map it to ``embed_dim`` channels."""
        return self.proj(x)


class RepMixer(nn.Module):
    """Reparameterizable token mixer: ``x + layer_scale * (mixer(x) - norm(x))``.

    ``mixer`` is a depthwise MobileOne block (3x3 conv+BN, 1x1 conv+BN, BN skip,
    no activation); ``norm`` a depthwise MobileOne block that is only a BN skip.
    """

    def __init__(self, dim: int, kernel_size: int = 3, layer_scale_init: float = 1e-5) -> None:
        """Create the mixer.

        Args:
            dim: channels.
            kernel_size: depthwise kernel of the mixer.
            layer_scale_init: initial value of every entry of ``layer_scale``.
        """
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.norm = MobileOneBlock(
            dim,
            dim,
            kernel_size,
            groups=dim,
            use_act=False,
            use_scale_branch=False,
            num_conv_branches=0,
        )
        self.mixer = MobileOneBlock(dim, dim, kernel_size, groups=dim, use_act=False)
        self.layer_scale = nn.Parameter(layer_scale_init * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix tokens spatially with a scaled residual difference."""
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


class ConvFFN(nn.Module):
    """Convolutional FFN: 7x7 depthwise conv + BN, 1x1 ``fc1``, GELU, 1x1 ``fc2``.

    The reference also holds ``nn.Dropout`` layers; every FastViT variant uses
    rate 0, so they are left out (they hold no weights).
    """

    def __init__(self, in_channels: int, hidden_channels: int) -> None:
        """Create the FFN.

        Args:
            in_channels: input (and output) channels.
            hidden_channels: channels after ``fc1``.
        """
        super().__init__()
        self.conv = conv_bn(in_channels, in_channels, kernel_size=7, groups=in_channels)
        self.fc1 = nn.Conv2d(in_channels, hidden_channels, kernel_size=1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_channels, in_channels, kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        """Truncated-normal(0.02) conv weights and zero biases, as the reference."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the FFN."""
        x = self.conv(x)
        x = self.fc1(x)
        x = self.act(x)
        return self.fc2(x)


class Attention(nn.Module):
    """Multi-head self-attention over the H*W tokens of a (B, C, H, W) map.

    ``qkv`` has no bias, head dim is 32, and the score is ``(q * scale) @ k^T``
    exactly as in the reference (not ``scaled_dot_product_attention``), so
    outputs match it bit for bit. Shape handling uses only tensor methods that
    ``torch.fx`` records (``flatten``/``transpose``/``reshape`` with the traced
    ``x.shape``).
    """

    def __init__(self, dim: int, head_dim: int = 32, qkv_bias: bool = False) -> None:
        """Create the attention layer.

        Args:
            dim: channels; must be a multiple of ``head_dim``.
            head_dim: channels per head.
            qkv_bias: give ``qkv`` a bias (the reference does not).
        """
        super().__init__()
        if dim % head_dim != 0:
            raise ValueError(f"dim {dim} is not a multiple of head_dim {head_dim}")
        self.head_dim = head_dim
        self.num_heads = dim // head_dim
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend across all spatial positions; returns a map shaped like ``x``."""
        B, C, H, W = x.shape
        N = H * W
        x = x.flatten(2).transpose(-2, -1)  # (B, N, C)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each (B, heads, N, head_dim)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return x.transpose(-2, -1).reshape(B, C, H, W)


class RepCPE(nn.Module):
    """Conditional positional encoding: ``x + pe(x)`` with a depthwise 7x7 conv (with bias)."""

    def __init__(self, dim: int, kernel_size: int = 7) -> None:
        """Create the encoding.

        Args:
            dim: channels.
            kernel_size: spatial size of the depthwise kernel.
        """
        super().__init__()
        self.pe = nn.Conv2d(
            dim, dim, kernel_size, stride=1, padding=kernel_size // 2, groups=dim, bias=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add the position-dependent depthwise conv of ``x`` to ``x`` (order as reference)."""
        return self.pe(x) + x


def _drop_path(rate: float) -> Optional[DropPath]:
    """``DropPath(rate)`` for a positive rate, else ``None`` (no node in traced graphs)."""
    return DropPath(rate) if rate > 0.0 else None


class RepMixerBlock(nn.Module):
    """MetaFormer block with RepMixer: ``x = mixer(x); x = x + ls * convffn(x)``.

    The token mixer carries its own residual (inside :class:`RepMixer`), so only
    the FFN has an explicit skip here.
    """

    def __init__(
        self,
        dim: int,
        mlp_ratio: float,
        kernel_size: int = 3,
        layer_scale_init: float = 1e-5,
        drop_path: float = 0.0,
    ) -> None:
        """Create the block.

        Args:
            dim: channels.
            mlp_ratio: FFN hidden width relative to ``dim`` (truncated with ``int()``).
            kernel_size: RepMixer kernel.
            layer_scale_init: initial value of both layer scales.
            drop_path: stochastic depth rate of the FFN branch.
        """
        super().__init__()
        self.token_mixer = RepMixer(dim, kernel_size, layer_scale_init)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.drop_path = _drop_path(drop_path)
        self.layer_scale = nn.Parameter(layer_scale_init * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply token mixing, then the scaled FFN residual."""
        x = self.token_mixer(x)
        branch = self.layer_scale * self.convffn(x)
        if self.drop_path is not None:
            branch = self.drop_path(branch)
        return x + branch


class AttentionBlock(nn.Module):
    """MetaFormer block with attention: BN pre-norm, MHSA and ConvFFN, each with a layer scale.

    ``x = x + ls1 * attn(norm(x)); x = x + ls2 * convffn(x)``. The FFN branch
    has no pre-norm: its 7x7 conv + BN plays that role, as in the reference.
    """

    def __init__(
        self,
        dim: int,
        mlp_ratio: float,
        layer_scale_init: float = 1e-5,
        drop_path: float = 0.0,
    ) -> None:
        """Create the block.

        Args:
            dim: channels (multiple of 32).
            mlp_ratio: FFN hidden width relative to ``dim`` (truncated with ``int()``).
            layer_scale_init: initial value of both layer scales.
            drop_path: stochastic depth rate of both residual branches.
        """
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.token_mixer = Attention(dim)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.drop_path = _drop_path(drop_path)
        self.layer_scale_1 = nn.Parameter(layer_scale_init * torch.ones(dim, 1, 1))
        self.layer_scale_2 = nn.Parameter(layer_scale_init * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the attention residual, then the FFN residual."""
        branch = self.layer_scale_1 * self.token_mixer(self.norm(x))
        if self.drop_path is not None:
            branch = self.drop_path(branch)
        x = x + branch
        branch = self.layer_scale_2 * self.convffn(x)
        if self.drop_path is not None:
            branch = self.drop_path(branch)
        return x + branch


def convolutional_stem(in_channels: int, out_channels: int) -> nn.Sequential:
    """Stem of three MobileOne blocks (each with GELU), 4x downsampling in total.

    0. 3x3 stride-2 dense conv (+1x1 scale branch; no skip: shapes differ);
    1. 3x3 stride-2 depthwise conv (+1x1 scale branch; no skip: stride 2);
    2. 1x1 conv with BN skip (no scale branch: kernel is already 1x1).
    """
    return nn.Sequential(
        MobileOneBlock(in_channels, out_channels, kernel_size=3, stride=2),
        MobileOneBlock(out_channels, out_channels, kernel_size=3, stride=2, groups=out_channels),
        MobileOneBlock(out_channels, out_channels, kernel_size=1),
    )
