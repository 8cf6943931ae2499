"""Handlers for the ``nn.Module`` classes the front end recognises: each maps a module call to one op.

A handler gets ``(builder, fx node, module, args, kwargs)`` and returns
``(op, inputs, attrs, params, source)``, or None to leave the call opaque
(see :mod:`repalgebra.frontend.builder`).  Parameters are cloned.  The table
:data:`MODULE_HANDLERS` at the bottom is keyed by the recognised class
(:func:`repalgebra.frontend.fx_trace.recognised`): a subclass that keeps its
base's ``forward`` is handled as that base.
"""

from __future__ import annotations

from typing import Callable

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from repalgebra.frontend.args import adaptive_pool, avg_pool, bn_params, conv3d_attrs, conv_padding, same_pads, elu_made, global_mean, height_one, im2col, interpolate, ints, leaky_relu_made, max_pool, pad_nd, prelu_made, single, transposed_conv_attrs, unsqueezed
from repalgebra.channel_affine import ChannelAffine
from repalgebra.frontend.builder import Builder, Made
from repalgebra.frontend.fx_trace import DROPOUTS, module_weight
from repalgebra.ir import Value


def _conv(b: Builder, n: fx.Node, m: nn.Conv2d | nn.Conv1d) -> tuple[dict, dict, dict | None]:
    """The ``conv2d`` attrs and params of ``m`` (a ``Conv1d`` as a conv of height 1), and the ``pad_nd`` attrs of
    the ``F.pad`` a padding mode other than zeros applies first (else None)."""
    pre = None
    if m.padding_mode != "zeros":  # nn.Conv*d pads with F.pad(x, m._reversed_padding_repeated_twice, mode), then convolves unpadded
        pre = {"pads": list(m._reversed_padding_repeated_twice), "mode": m.padding_mode, "value": 0.0}
    weight = module_weight(m)
    stride, padding, dilation, kernel = m.stride, m.padding, m.dilation, m.kernel_size
    if isinstance(m, nn.Conv1d):  # the length is the width; the height is 1
        weight = weight.unsqueeze(2)
        stride, dilation, kernel = (1, *stride), (1, *dilation), (1, *kernel)
        padding = padding if isinstance(padding, str) else (0, *padding)
    params = {"weight": weight} if m.bias is None else {"weight": weight, "bias": module_weight(m, "bias")}
    padding = (0, 0, 0, 0) if pre else conv_padding(padding, kernel, dilation)
    attrs = {"stride": tuple(stride), "padding": padding, "dilation": tuple(dilation), "groups": m.groups}
    return attrs, params, pre


def _padded(b: Builder, n: fx.Node, x: Value, pre: dict | None) -> Value:
    return x if pre is None else b.add("pad_nd", [x], pre, {}, b.source(n))


def _m_conv2d(b: Builder, n: fx.Node, m: nn.Conv2d, args: tuple, kwargs: dict) -> Made:
    x = single(args, kwargs)
    conv = None if x is None or len(x.shape) != 4 else _conv(b, n, m)
    if conv is None:
        return None
    attrs, params, pre = conv
    return "conv2d", [_padded(b, n, x, pre)], attrs, params, ""


def _m_conv_transpose(b: Builder, n: fx.Node, m: nn.ConvTranspose2d | nn.ConvTranspose3d, args: tuple, kwargs: dict) -> Made:
    """``nn.ConvTranspose2d`` on one 4-D input, ``nn.ConvTranspose3d`` on one 5-D input (an ``output_size`` argument
    leaves the call opaque)."""
    x, axes = single(args, kwargs), len(m.kernel_size)
    if x is None or len(x.shape) != 2 + axes:
        return None
    attrs = transposed_conv_attrs(m.stride, m.padding, m.output_padding, m.dilation, m.groups, axes)
    params = {"weight": module_weight(m)} | ({} if m.bias is None else {"bias": module_weight(m, "bias")})
    return f"conv_transpose{axes}d", [x], attrs, params, ""


def _m_conv_transpose1d(b: Builder, n: fx.Node, m: nn.ConvTranspose1d, args: tuple, kwargs: dict) -> Made:
    """``ConvTranspose1d`` on ``(N, C, L)`` as a ``conv_transpose2d`` of height 1, as :func:`_m_conv1d` writes a
    ``Conv1d``: a ``BatchNorm1d`` after it folds (``bn_fold``)."""
    x = single(args, kwargs)
    if x is None or len(x.shape) != 3:
        return None
    attrs = transposed_conv_attrs((1, *m.stride), (0, *m.padding), (0, *m.output_padding), (1, *m.dilation), m.groups)
    params = {"weight": module_weight(m).unsqueeze(2)} | ({} if m.bias is None else {"bias": module_weight(m, "bias")})
    x4 = b.add(*unsqueezed(x, 2)[:4], source=b.source(n))
    return "flatten", [b.add("conv_transpose2d", [x4], attrs, params, b.source(n))], {"start": 2, "end": 3}, {}, ""


def _m_conv3d(b: Builder, n: fx.Node, m: nn.Conv3d, args: tuple, kwargs: dict) -> Made:
    """``nn.Conv3d`` on one 5-D input, zero padding (another padding mode leaves the call opaque)."""
    x = single(args, kwargs)
    if x is None or len(x.shape) != 5 or m.padding_mode != "zeros":
        return None
    pads = same_pads(m.kernel_size, m.dilation) if m.padding == "same" else None
    pre = {"pads": pads} if pads and pads[::2] != pads[1::2] else None  # (an even kernel: one more at an axis's end)
    attrs = conv3d_attrs(m.kernel_size, m.stride, 0 if pre else m.padding, m.dilation, m.groups)
    if attrs is None:
        return None
    params = {"weight": module_weight(m)} | ({} if m.bias is None else {"bias": module_weight(m, "bias")})
    return "conv3d", [_padded(b, n, x, pre)], attrs, params, ""


def _m_conv1d(b: Builder, n: fx.Node, m: nn.Conv1d, args: tuple, kwargs: dict) -> Made:
    """``Conv1d`` on ``(N, C, L)`` as a ``conv2d`` of height 1: ``flatten(conv2d(x.unsqueeze(2)), 2, 3)``.

    Every 2-D rule then applies to it as it stands (a ``1 x k`` kernel), and
    :func:`_m_batch_norm` moves a ``BatchNorm1d`` after it inside the flatten,
    where ``bn_fold`` meets it.
    """
    x = single(args, kwargs)
    conv = None if x is None or len(x.shape) != 3 else _conv(b, n, m)
    if conv is None:
        return None
    attrs, params, pre = conv
    x4 = b.add(*unsqueezed(_padded(b, n, x, pre), 2)[:4], source=b.source(n))  # reflect etc. pad (N, C, L) as 1-D
    return "flatten", [b.add("conv2d", [x4], attrs, params, b.source(n))], {"start": 2, "end": 3}, {}, ""


def _m_batch_norm(b: Builder, n: fx.Node, m: _BatchNorm, args: tuple, kwargs: dict) -> Made:
    x = single(args, kwargs)
    if x is None:
        return None
    if m.training:
        b.leave_bn(n, "the module stays in training mode after eval(): it normalises with batch statistics")
        return None
    if m.running_mean is None or m.running_var is None:
        b.leave_bn(n, "track_running_stats=False: it normalises with batch statistics even in eval mode")
        return None
    attrs, params = {"eps": float(m.eps)}, bn_params(m.running_mean, m.running_var, module_weight(m), module_weight(m, "bias"))
    y = height_one(x)
    if y is not None:  # per channel (axis 1), so it commutes with flattening axes 2 and 3: normalise before
        return "flatten", [b.add("batch_norm", [y], attrs, params, b.source(n))], {"start": 2, "end": 3}, {}, ""
    return "batch_norm", [x], attrs, params, ""


def _m_instance_norm(b: Builder, n: fx.Node, m: _InstanceNorm, args: tuple, kwargs: dict) -> Made:
    """An ``InstanceNorm`` with ``track_running_stats=True`` in eval mode normalises with its running statistics, per
    channel (``use_input_stats`` is false): a BatchNorm in eval mode, which folds.  Without them it normalises each
    sample with its own statistics and stays a call (so does an unbatched input, whose channels are axis 0)."""
    x = single(args, kwargs)
    if x is None or m.training or m.running_mean is None or len(x.shape) != m._get_no_batch_dim() + 1:
        return None
    return _m_batch_norm(b, n, m, args, kwargs)


def _m_linear(b: Builder, n: fx.Node, m: nn.Linear, args: tuple, kwargs: dict) -> Made:
    x = single(args, kwargs)
    if x is None:
        return None
    params = {"weight": module_weight(m)}
    if m.bias is not None:
        params["bias"] = module_weight(m, "bias")
    return "linear", [x], {}, params, ""


def _m_identity(b: Builder, n: fx.Node, m: nn.Module, args: tuple, kwargs: dict) -> Made:
    x = single(args, kwargs)
    if x is None or m.training:  # a dropout that insists on training mode stays as it is
        return None
    return "identity", [x], {}, {}, ""


def _m_avg_pool(b: Builder, n: fx.Node, m: nn.AvgPool1d | nn.AvgPool2d | nn.AvgPool3d, args: tuple, kwargs: dict) -> Made:
    x, spatial = single(args, kwargs), _SPATIAL[type(m)]
    divisor = getattr(m, "divisor_override", None)  # AvgPool1d has none
    return avg_pool(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, divisor, spatial)


def _m_act(op: str) -> Callable[..., Made]:
    def handler(b: Builder, n: fx.Node, m: nn.Module, args: tuple, kwargs: dict) -> Made:
        x = single(args, kwargs)
        if x is None:
            return None
        attrs = {"approximate": m.approximate} if op == "gelu" else {}
        return op, [x], attrs, {}, ""

    return handler


def _m_pad(b: Builder, n: fx.Node, m: nn.ConstantPad2d, args: tuple, kwargs: dict) -> Made:
    x = single(args, kwargs)
    pads = ints(m.padding, 4)
    if x is None or pads is None:
        return None
    left, right, top, bottom = pads
    return "pad", [x], {"pads": (top, bottom, left, right), "value": float(m.value)}, {}, ""


def _m_flatten(b: Builder, n: fx.Node, m: nn.Flatten, args: tuple, kwargs: dict) -> Made:
    x = single(args, kwargs)
    return None if x is None else ("flatten", [x], {"start": m.start_dim, "end": m.end_dim}, {}, "")


def _m_softmax(b: Builder, n: fx.Node, m: nn.Softmax | nn.LogSoftmax, args: tuple, kwargs: dict) -> Made:
    x = single(args, kwargs)
    op = "log_softmax" if isinstance(m, nn.LogSoftmax) else "softmax"
    return None if x is None or m.dim is None else (op, [x], {"axis": m.dim}, {}, "")


def _m_glu(b: Builder, n: fx.Node, m: nn.GLU, args: tuple, kwargs: dict) -> Made:
    x = single(args, kwargs)
    return None if x is None else ("glu", [x], {"axis": m.dim}, {}, "")


def _m_layer_norm(b: Builder, n: fx.Node, m: nn.LayerNorm, args: tuple, kwargs: dict) -> Made:
    x = single(args, kwargs)
    if x is None:
        return None
    params = {k: getattr(m, k).detach().clone() for k in ("weight", "bias") if getattr(m, k, None) is not None}
    return "layer_norm", [x], {"normalized_shape": tuple(m.normalized_shape), "eps": float(m.eps)}, params, ""


def _m_rms_norm(b: Builder, n: fx.Node, m: nn.RMSNorm, args: tuple, kwargs: dict) -> Made:
    x = single(args, kwargs)
    if x is None:
        return None
    params = {} if m.weight is None else {"weight": m.weight.detach().clone()}
    eps = None if m.eps is None else float(m.eps)  # None: the epsilon of the dtype it runs in, read per call
    return "rms_norm", [x], {"normalized_shape": tuple(m.normalized_shape), "eps": eps}, params, ""


def _m_leaky_relu(b: Builder, n: fx.Node, m: nn.LeakyReLU, args: tuple, kwargs: dict) -> Made:
    return leaky_relu_made(single(args, kwargs), m.negative_slope, "")


def _m_softplus(b: Builder, n: fx.Node, m: nn.Softplus, args: tuple, kwargs: dict) -> Made:
    x = single(args, kwargs)
    return None if x is None else ("softplus", [x], {"beta": float(m.beta), "threshold": float(m.threshold)}, {}, "")


def _m_prelu(b: Builder, n: fx.Node, m: nn.PReLU, args: tuple, kwargs: dict) -> Made:
    return prelu_made(single(args, kwargs), m.weight.detach().clone(), "")


def _m_adaptive_avg(b: Builder, n: fx.Node, m: nn.AdaptiveAvgPool1d | nn.AdaptiveAvgPool2d | nn.AdaptiveAvgPool3d, args: tuple, kwargs: dict) -> Made:
    return global_mean(single(args, kwargs), m.output_size, _SPATIAL[type(m)])


# The pooled axes of each pool class (the last ones of a batched input).
_SPATIAL = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}


def _m_max_pool(b: Builder, n: fx.Node, m: nn.MaxPool2d, args: tuple, kwargs: dict) -> Made:
    x = single(args, kwargs)
    return max_pool(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)


def _m_adaptive_max(b: Builder, n: fx.Node, m: nn.AdaptiveMaxPool2d, args: tuple, kwargs: dict) -> Made:
    return None if m.return_indices else adaptive_pool("adaptive_max_pool2d", single(args, kwargs), m.output_size)


def _m_hardtanh(b: Builder, n: fx.Node, m: nn.Hardtanh, args: tuple, kwargs: dict) -> Made:
    """``nn.Hardtanh`` and ``nn.ReLU6``: ``clamp``."""
    x = single(args, kwargs)
    return None if x is None else ("clamp", [x], {"min": m.min_val, "max": m.max_val}, {}, "")


def _m_elu(b: Builder, n: fx.Node, m: nn.ELU | nn.SELU | nn.CELU, args: tuple, kwargs: dict) -> Made:
    """``nn.ELU``, ``nn.SELU``, ``nn.CELU``: ``elu``."""
    return elu_made(single(args, kwargs), type(m).__name__.lower(), getattr(m, "alpha", 1.0), "")


def _m_threshold(b: Builder, n: fx.Node, m: nn.Threshold, args: tuple, kwargs: dict) -> Made:
    x = single(args, kwargs)
    return None if x is None else ("threshold", [x], {"threshold": float(m.threshold), "value": float(m.value)}, {}, "")


def _m_group_norm(b: Builder, n: fx.Node, m: nn.GroupNorm, args: tuple, kwargs: dict) -> Made:
    x = single(args, kwargs)
    if x is None:
        return None
    params = {k: getattr(m, k).detach().clone() for k in ("weight", "bias") if getattr(m, k, None) is not None}
    return "group_norm", [x], {"num_groups": m.num_groups, "eps": float(m.eps)}, params, ""


def _m_upsample(b: Builder, n: fx.Node, m: nn.Upsample, args: tuple, kwargs: dict) -> Made:
    x = single(args, kwargs)
    return interpolate(x, m.size, m.scale_factor, m.mode, m.align_corners, m.recompute_scale_factor)


def _m_fold(b: Builder, n: fx.Node, m: nn.Unfold | nn.Fold, args: tuple, kwargs: dict) -> Made:
    return im2col(single(args, kwargs), m.kernel_size, m.dilation, m.padding, m.stride, getattr(m, "output_size", None))


def _m_pixel_shuffle(b: Builder, n: fx.Node, m: nn.Module, args: tuple, kwargs: dict) -> Made:
    x = single(args, kwargs)
    if x is None or len(x.shape) != 4:
        return None
    if isinstance(m, nn.PixelShuffle):
        return "pixel_shuffle", [x], {"factor": m.upscale_factor}, {}, ""
    return "pixel_unshuffle", [x], {"factor": m.downscale_factor}, {}, ""


def _m_pad_nd(mode: str) -> Callable[..., Made]:
    """``nn.ReflectionPad2d``/``nn.ReplicationPad2d``: ``pad_nd``."""

    def handler(b: Builder, n: fx.Node, m: nn.Module, args: tuple, kwargs: dict) -> Made:
        return pad_nd(single(args, kwargs), m.padding, mode, None)

    return handler


# --------------------------------------------------------------------------- the table


MODULE_HANDLERS: dict[type, Callable[..., Made]] = {
    nn.Conv2d: _m_conv2d,
    nn.Conv1d: _m_conv1d,
    nn.ConvTranspose2d: _m_conv_transpose,
    nn.ConvTranspose3d: _m_conv_transpose,
    nn.ConvTranspose1d: _m_conv_transpose1d,
    ChannelAffine: _m_conv2d,  # the torch back end's 1x1 depthwise conv: that conv
    nn.Conv3d: _m_conv3d,
    _BatchNorm: _m_batch_norm,
    nn.SyncBatchNorm: _m_batch_norm,
    _InstanceNorm: _m_instance_norm,
    nn.Linear: _m_linear,
    nn.Identity: _m_identity,
    **{d: _m_identity for d in DROPOUTS},
    nn.AvgPool1d: _m_avg_pool,
    nn.AvgPool2d: _m_avg_pool,
    nn.AvgPool3d: _m_avg_pool,
    nn.ReLU: _m_act("relu"),
    nn.GELU: _m_act("gelu"),
    nn.Sigmoid: _m_act("sigmoid"),
    nn.ConstantPad2d: _m_pad,
    nn.Flatten: _m_flatten,
    nn.Softmax: _m_softmax,
    nn.LogSoftmax: _m_softmax,
    nn.GLU: _m_glu,
    nn.LayerNorm: _m_layer_norm,
    nn.RMSNorm: _m_rms_norm,
    nn.AdaptiveAvgPool1d: _m_adaptive_avg,
    nn.AdaptiveAvgPool2d: _m_adaptive_avg,
    nn.AdaptiveAvgPool3d: _m_adaptive_avg,
    nn.MaxPool2d: _m_max_pool,
    nn.AdaptiveMaxPool2d: _m_adaptive_max,
    nn.SiLU: _m_act("silu"),
    nn.Hardswish: _m_act("hardswish"),
    nn.Hardsigmoid: _m_act("hardsigmoid"),
    nn.Tanh: _m_act("tanh"),
    nn.LeakyReLU: _m_leaky_relu,
    nn.Softplus: _m_softplus,
    nn.LogSigmoid: _m_act("log_sigmoid"),
    nn.PReLU: _m_prelu,
    nn.Hardtanh: _m_hardtanh,
    nn.Threshold: _m_threshold,
    nn.ELU: _m_elu,
    nn.SELU: _m_elu,
    nn.CELU: _m_elu,
    nn.GroupNorm: _m_group_norm,
    nn.Upsample: _m_upsample,
    nn.PixelShuffle: _m_pixel_shuffle,
    nn.PixelUnshuffle: _m_pixel_shuffle,
    nn.Unfold: _m_fold,
    nn.Fold: _m_fold,
    nn.ReflectionPad2d: _m_pad_nd("reflect"),
    nn.ReplicationPad2d: _m_pad_nd("replicate"),
}
