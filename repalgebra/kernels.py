"""Tensor algebra the rules share: BN as an affine map, identity kernels, regrouping, kernel padding.

Everything here builds new tensors; nothing writes into its arguments.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from repalgebra.ir import Node
from repalgebra.ops import TRANSPOSED_CONVS


def bn_affine(bn: Node) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``y = s * x + t``: ``s = weight / sqrt(var + eps)``, ``t = bias - mean * s``."""
    p = bn.params
    s = p["weight"] / torch.sqrt(p["var"] + bn.attrs["eps"])
    return s, p["bias"] - p["mean"] * s


def norm_affine(norm: Node) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A LayerNorm's, RMSNorm's or GroupNorm's own affine map after its normalization ``n``, ``gamma n + beta``, as
    ``(gamma, beta)``: ``gamma`` ones where the norm has only a ``beta``, ``beta`` None where it has none; None where
    it has neither."""
    gamma, beta = norm.params.get("weight"), norm.params.get("bias")
    if gamma is None and beta is None:
        return None
    return (torch.ones(beta.shape, dtype=beta.dtype) if gamma is None else gamma), beta


def conv_bias(conv: Node) -> torch.Tensor:
    """The conv's (or transposed conv's) bias, zeros when it has none."""
    w = conv.params["weight"]
    b = conv.params.get("bias")
    out_channels = w.shape[1] * conv.attrs["groups"] if conv.op in TRANSPOSED_CONVS else w.shape[0]
    return torch.zeros(out_channels, dtype=w.dtype) if b is None else b


def per_input_channel(v: torch.Tensor, weight_shape: torch.Size, groups: int) -> torch.Tensor:
    """``v`` (one value per input channel of a conv) laid out like its weight rows ``W[o, i]``: at ``[o, i]`` the
    value of input channel ``i`` of output channel ``o``'s group; shape ``(O, C / groups)``."""
    out_ch, in_per_group = weight_shape[:2]
    return v.reshape(groups, 1, in_per_group).expand(groups, out_ch // groups, in_per_group).reshape(out_ch, in_per_group)


def identity_kernel(channels: int, groups: int, dtype: torch.dtype, dims: int = 2) -> torch.Tensor:
    """The 1x1 kernel of a conv with ``groups`` groups that computes the identity: ``(C, C/G, 1, 1)`` (``dims`` 3:
    the 1x1x1 kernel of a conv3d)."""
    per_group = channels // groups
    w = torch.zeros(channels, per_group, dtype=dtype)
    c = torch.arange(channels)
    w[c, c % per_group] = 1
    return w.reshape(channels, per_group, *(1,) * dims)


def regroup(weight: torch.Tensor, groups: int, new_groups: int) -> torch.Tensor:
    """The kernel of the same conv written with ``new_groups`` groups (``new_groups`` divides ``groups``).

    A conv with ``g`` groups is a conv with ``g'`` groups whose kernel is block
    diagonal inside each of the ``g'`` groups, with zeros elsewhere.
    """
    if groups == new_groups:
        return weight
    if groups % new_groups:
        raise ValueError(f"cannot regroup a conv with {groups} groups to {new_groups}")
    out_ch, in_per_group = weight.shape[:2]
    out_per_group = out_ch // groups
    in_per_new = in_per_group * (groups // new_groups)
    new = weight.new_zeros(out_ch, in_per_new, *weight.shape[2:])
    for j in range(groups):
        local = (j % (groups // new_groups)) * in_per_group
        rows = slice(j * out_per_group, (j + 1) * out_per_group)
        new[rows, local : local + in_per_group] = weight[rows]
    return new


def ungroup(weight: torch.Tensor, groups: int, new_groups: int) -> torch.Tensor:
    """Inverse of :func:`regroup`: keep only the diagonal blocks of a ``groups``-group kernel."""
    if groups == new_groups:
        return weight
    out_ch, in_per_group = weight.shape[:2]
    ratio = new_groups // groups
    in_per_new = in_per_group // ratio
    out_per_new = out_ch // new_groups
    blocks = []
    for j in range(new_groups):
        local = (j % ratio) * in_per_new
        blocks.append(weight[j * out_per_new : (j + 1) * out_per_new, local : local + in_per_new])
    return torch.cat(blocks)


def pad_kernel(weight: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Zero-pad a kernel's spatial extent by rows/columns on each side."""
    return pad_kernel_axes(weight, (top, left), (bottom, right))


def pad_kernel_axes(weight: torch.Tensor, before: Sequence[int], after: Sequence[int]) -> torch.Tensor:
    """Zero-pad a 2-D or 3-D kernel by ``before[a]`` taps at the start of spatial axis ``a`` and ``after[a]`` at its end."""
    return F.pad(weight, [p for a in reversed(range(len(before))) for p in (before[a], after[a])])


def densify(weight: torch.Tensor, dilation: tuple[int, int]) -> torch.Tensor:
    """A dilated kernel as an undilated one: taps spread ``dilation`` apart with zeros between."""
    dh, dw = dilation
    o, i, kh, kw = weight.shape
    dense = weight.new_zeros(o, i, (kh - 1) * dh + 1, (kw - 1) * dw + 1)
    dense[:, :, ::dh, ::dw] = weight
    return dense


def compose_channels(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Channel-mix ``outer`` (O, M, kh, kw) after ``inner`` (M, I, kh', kw') where, on each axis, one of the two has
    one tap (a 1x1 and a kxk; a kx1 after a 1xk).

    Both kernels are dense (groups 1).  The result is ``sum_m outer[o, m] * inner[m, i]`` tap by tap, each kernel
    repeated along an axis where it has one tap.
    """
    kh, kw = max(outer.shape[2], inner.shape[2]), max(outer.shape[3], inner.shape[3])
    return torch.einsum("omhw,mihw->oihw", outer.expand(-1, -1, kh, kw), inner.expand(-1, -1, kh, kw))


def conv_cost(weight: torch.Tensor) -> int:
    """Multiply-adds per output pixel of a conv with this kernel (its number of weights)."""
    return weight.numel()
