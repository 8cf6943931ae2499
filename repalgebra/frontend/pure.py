"""Calls that are pure functions of their arguments, so a call on constants only can be made once, at capture.

``torch.fx`` computes what a forward does with buffers while it traces (a buffer is a
plain tensor to it), but it records what a forward does with *parameters*: timm's
``ScaledStdConv2d`` and ``StdConv2d`` standardize their weight in every forward
(``F.batch_norm(self.weight.reshape(1, out, -1), None, None, training=True, ...)``), a
``weight * self.gain`` or ``self.gamma.view(1, -1, 1, 1)`` reads a parameter.  The
front end computes such a call on the captured constants once, with the same ops in
the same dtype as the model, so the fused graph holds its result: the same numbers
the model computes on every call.

Only calls listed here qualify: no random numbers, no writes into an argument
(``inplace=True``, methods ending in ``_``), and ``F.batch_norm`` only when it has no
running statistics to update.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from repalgebra.frontend.fx_trace import recognised
from repalgebra.frontend.inplace import inplace_kwarg, on_copy, setitem_copy

__all__ = ["FACTORIES", "PURE_MODULES", "is_pure"]

PURE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow, operator.getitem,
    operator.matmul,  # LoRA's ``self.lora_B @ self.lora_A`` (loralib, peft's DoRA)
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.sqrt, torch.rsqrt, torch.exp, torch.log,
    torch.abs, torch.sum, torch.mean, torch.var, torch.std, torch.var_mean, torch.std_mean, torch.clamp, torch.clip,
    torch.reshape, torch.flatten, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze, torch.cat,
    torch.stack, torch.matmul, torch.einsum, torch.sigmoid, torch.tanh, torch.softmax, torch.where, torch.maximum,
    torch.minimum, torch.sign, torch.square, torch.reciprocal, torch.erf,
    F.batch_norm, F.layer_norm, F.group_norm, F.normalize, F.softmax, F.sigmoid, F.tanh, F.pad, F.softplus,
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.hardtanh, F.leaky_relu, F.elu,  # BiFPN: relu(self.w) / (sum + eps)
    # A kernel made from kernels (ECBSR's 1x1-3x3 merge in its eval forward: F.conv2d(k1, k0.permute(1, 0, 2, 3))).
    F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d, F.linear, torch.mm, torch.bmm, torch.kron,
    setitem_copy,  # ``k[i, i] = w[i]`` into a kernel being made, made a copy by the front end
    # A weight fake-quantized in forward (QAT, LSQ: ``(w / s).round().clamp(lo, hi) * s``) is a function of the weights.
    torch.round, torch.floor, torch.ceil, torch.trunc, torch.fake_quantize_per_tensor_affine, torch.fake_quantize_per_channel_affine,
}  # fmt: skip
# Factories: pure, and called with no tensor at all.  Folded only where what they make is read by calls on
# constants alone (a kernel filled in: ``k = torch.zeros(...)``, then ``k[i, i] = ...``; see Builder.fold): next
# to an activation a tensor made per call keeps its dtype through a cast of the model, a constant would not.
FACTORIES = {torch.zeros, torch.ones, torch.full, torch.eye, torch.arange, torch.linspace, torch.tensor}
# In-place methods the front end runs on a copy (``on_copy``) that draw no random numbers.
_COPY_METHODS = {"zero_", "fill_", "copy_", "add_", "sub_", "mul_", "div_", "clamp_", "index_fill_", "masked_fill_", "fill_diagonal_"}
PURE_METHODS = {
    "add", "sub", "mul", "div", "pow", "neg", "sqrt", "rsqrt", "exp", "log", "abs", "sum", "mean", "var", "std",
    "clamp", "clip", "reshape", "view", "reshape_as", "view_as", "flatten", "transpose", "permute", "unsqueeze",
    "squeeze", "expand", "expand_as", "contiguous", "t", "flip", "repeat", "sigmoid", "tanh", "softmax",
    "square", "reciprocal", "type_as", "float", "double", "half", "bfloat16", "__getitem__", "relu",
    "detach", "clone", "to",  # DBB: self.bn.bias.detach() - ..., self.id_tensor.to(self.weight.device)
    "round", "floor", "ceil", "trunc",
    "matmul", "mm", "bmm", "new_zeros", "new_ones", "new_full",  # loralib: ``x.new_zeros(...)`` filled with ``B @ A``
}  # fmt: skip
# Attributes that are functions of the tensor: ``self.merge_AB().T`` (loralib's MergedLinear).
_PURE_ATTRIBUTES = {"T", "mT"}


# Activation modules hold no state: EfficientDet's BiFPN writes ``self.p6_w1_relu(self.p6_w1)``.  Linear layers and
# convs compute from their weights and their input alone: a hypernetwork's kernel ``self.w2(relu(self.w1(self.z)))``
# is made from the weights at capture, as ``F.linear`` of them is (it stayed a call, and the conv that reads the
# kernel with it, its BatchNorm unfolded; a probe).
PURE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Tanh, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
                nn.Softplus, nn.ELU, nn.Hardtanh, nn.Identity, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_pure(kind: str, target: Any, args: tuple, kwargs: dict) -> bool:
    """Whether the call computes its result from its arguments alone and changes none of them."""
    if kind == "call_module":  # its own class's forward, no hooks (see fx_trace.recognised), not in place
        return type(target) in PURE_MODULES and recognised(target) is not None and not getattr(target, "inplace", False)
    if kwargs.get("out") is not None or inplace_kwarg(target, args, kwargs):
        return False
    if kind == "call_method":
        return target in PURE_METHODS
    if kind == "call_function" and target is getattr:
        return len(args) == 2 and args[1] in _PURE_ATTRIBUTES
    if kind == "call_function" and target is on_copy:
        return bool(args) and args[0] in _COPY_METHODS
    if kind != "call_function" or target not in PURE_FUNCTIONS | FACTORIES:
        return False
    if target is F.batch_norm:  # with running statistics and training=True it updates them
        running = [kwargs.get("running_mean", args[1] if len(args) > 1 else None), kwargs.get("running_var", args[2] if len(args) > 2 else None)]
        training = kwargs.get("training", args[5] if len(args) > 5 else False)
        return not training or all(r is None for r in running)
    return True
