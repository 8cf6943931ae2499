"""The export front end's handler table: one function per ATen op family, mapping a call onto the op table.

A handler gets (builder, fx node, the call's arguments by schema name: Values,
:class:`~repalgebra.frontend.aten_builder.Const` s or literals) and returns
``(op, inputs, attrs, params, source)``, or None for "carry it through as an
opaque call".  ``HANDLERS`` maps single-output overloads, ``MULTI_HANDLERS`` the
parts (``getitem``) of multi-output ones; the builder receives both.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx

from repalgebra.frontend.args import (
    avg_pool, channel_axis, concat_made, conv3d_attrs, elu_made, global_mean, height_one, im2col, leaky_relu_made,
    population_variance, prelu_made, scalar_axis, transposed_conv_attrs, unsqueezed, vector_norm,
)
from repalgebra.frontend.aten_builder import Const, Made, ProgramBuilder, module_path, symbolic
from repalgebra.ir import Node, Value

__all__ = ["HANDLERS", "MULTI_HANDLERS", "SIZED"]

aten = torch.ops.aten


# --------------------------------------------------------------------------- handlers
#
# A handler gets (builder, fx node, arguments by schema name with Values / _Consts /
# literals) and returns (op, inputs, attrs, params, source) or None for "carry it
# through".  Source None means the node's module path.


def _v(x: Any) -> Value | None:
    return x if isinstance(x, Value) and x.shape is not None else None


def _c(x: Any) -> torch.Tensor | None:
    return x.tensor if isinstance(x, Const) and x.tensor.is_floating_point() else None


def _owner(c: Any) -> str | None:
    """``stages.0.conv.weight`` -> ``stages.0.conv``: the module a parameter belongs to."""
    return c.path.rpartition(".")[0] if isinstance(c, Const) and c.path else None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _ints(v: Any) -> tuple[int, ...] | None:
    if isinstance(v, (tuple, list)) and all(_is_int(x) for x in v):
        return tuple(v)
    return None


def _pair(v: Any, n: int = 2) -> tuple[int, ...] | None:
    """An ATen ``int[2]`` argument (an int, one int or two) as a pair; ``n`` 3: an ``int[3]`` as a triple."""
    if _is_int(v):
        return (v,) * n
    t = _ints(v)
    if t is None or len(t) not in (1, n):
        return None
    return tuple(t) * (n // len(t))


def _conv(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    x, w, bias = _v(a["input"]), _c(a["weight"]), a["bias"]
    if x is None or len(x.shape) != 4 or w is None or w.dim() != 4 or (bias is not None and _c(bias) is None):
        return None
    stride, dilation, groups = _pair(a["stride"]), _pair(a["dilation"]), a["groups"]
    if stride is None or dilation is None or not _is_int(groups):
        return None
    padding = a["padding"]
    if padding == "valid":
        pads = (0, 0, 0, 0)
    elif padding == "same":  # PyTorch puts the odd extra row/column at the bottom/right
        total = [d * (k - 1) for k, d in zip(w.shape[2:], dilation)]
        pads = (total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2)
    else:
        p = _pair(padding)
        if p is None:
            return None
        pads = (p[0], p[0], p[1], p[1])
    params = {"weight": w} if bias is None else {"weight": w, "bias": _c(bias)}
    attrs = {"stride": stride, "padding": pads, "dilation": dilation, "groups": groups}
    return "conv2d", [x], attrs, params, _owner(a["weight"])


def _conv1d(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``aten.conv1d`` on ``(N, C, L)`` as a ``conv2d`` of height 1, as the fx front end writes ``nn.Conv1d``:
    ``flatten(conv2d(x.unsqueeze(2)), 2, 3)``; a BatchNorm1d after it moves inside the flatten (:func:`_bn`)."""
    x, w = _v(a["input"]), _c(a["weight"])
    stride, dilation, padding = _ints(a["stride"]), _ints(a["dilation"]), a["padding"]
    if x is None or len(x.shape) != 3 or w is None or w.dim() != 3 or stride is None or dilation is None:
        return None
    if not isinstance(padding, str):
        padding = _ints(padding)
        if padding is None or len(padding) != 1:
            return None
        padding = (0, padding[0])
    return _height_one(b, n, a, _conv, stride=(1, *stride), dilation=(1, *dilation), padding=padding)


def _height_one(b: ProgramBuilder, n: fx.Node, a: dict, conv2d: Callable[..., Made], **along: Any) -> Made:
    """A 1-D conv on ``(N, C, L)`` as the 2-D one ``conv2d`` makes, of height 1: ``flatten(conv(x.unsqueeze(2)), 2, 3)``
    (``along``: its geometry arguments as pairs); a BatchNorm1d after it moves inside the flatten (:func:`_bn`)."""
    where = module_path(n)
    x4 = b.add(Node.make(*unsqueezed(_v(a["input"]), 2)[:4], where))
    made = conv2d(b, n, {**a, "input": x4, "weight": Const(_c(a["weight"]).unsqueeze(2), a["weight"].path), **along})
    if made is None:
        return None
    op, inputs, attrs, params, source = made
    conv = b.add(Node.make(op, inputs, attrs, params, source or where))
    return "flatten", [conv], {"start": 2, "end": 3}, {}, None


def _conv_transpose(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``aten.conv_transpose2d`` (``nn.ConvTranspose2d``), ``aten.conv_transpose3d`` (``nn.ConvTranspose3d``)."""
    x, w, bias = _v(a["input"]), _c(a["weight"]), a["bias"]
    if x is None or len(x.shape) not in (4, 5) or w is None or w.dim() != len(x.shape) or (bias is not None and _c(bias) is None):
        return None
    axes = w.dim() - 2
    attrs = transposed_conv_attrs(*(_pair(a[k], axes) for k in ("stride", "padding", "output_padding", "dilation")), a["groups"], axes)
    if attrs is None:
        return None
    params = {"weight": w} if bias is None else {"weight": w, "bias": _c(bias)}
    return f"conv_transpose{axes}d", [x], attrs, params, _owner(a["weight"])


def _conv_transpose1d(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``aten.conv_transpose1d`` on ``(N, C, L)`` as a ``conv_transpose2d`` of height 1, as the fx front end writes
    ``nn.ConvTranspose1d`` (:func:`_height_one`)."""
    x, w = _v(a["input"]), _c(a["weight"])
    ones = [_ints(a[k]) for k in ("stride", "padding", "output_padding", "dilation")]
    if x is None or len(x.shape) != 3 or w is None or w.dim() != 3 or any(v is None or len(v) != 1 for v in ones):
        return None
    (stride,), (padding,), (output_padding,), (dilation,) = ones
    return _height_one(b, n, a, _conv_transpose, stride=(1, stride), padding=(0, padding), output_padding=(0, output_padding),
                       dilation=(1, dilation))


def _conv3d(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``aten.conv3d`` (``nn.Conv3d``) on one 5-D input."""
    x, w, bias = _v(a["input"]), _c(a["weight"]), a["bias"]
    if x is None or len(x.shape) != 5 or w is None or w.dim() != 5 or (bias is not None and _c(bias) is None):
        return None
    attrs = conv3d_attrs(w.shape[2:], a["stride"], a["padding"], a["dilation"], a["groups"])
    if attrs is None:
        return None
    params = {"weight": w} if bias is None else {"weight": w, "bias": _c(bias)}
    return "conv3d", [x], attrs, params, _owner(a["weight"])


def _convolution(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``aten.convolution``: a 2-D or 3-D conv, or a transposed one."""
    if a["transposed"] is True:
        return _conv_transpose(b, n, a)
    output_padding = _ints(a["output_padding"])
    if a["transposed"] is not False or output_padding is None or any(output_padding):
        return None
    w = _c(a["weight"])
    return _conv3d(b, n, a) if w is not None and w.dim() == 5 else _conv(b, n, a)


def _bn(x: Any, weight: Any, bias: Any, mean: Any, var: Any, eps: Any, b: ProgramBuilder | None = None) -> Made:
    x, m, v = _v(x), _c(mean), _c(var)
    if x is None or len(x.shape) < 2 or m is None or v is None or not _is_num(eps):
        return None
    if any(p is not None and _c(p) is None for p in (weight, bias)):
        return None
    params = {  # affine=False: weight ones, bias zeros
        "mean": m,
        "var": v,
        "weight": torch.ones_like(m) if weight is None else _c(weight),
        "bias": torch.zeros_like(m) if bias is None else _c(bias),
    }
    attrs = {"eps": float(eps)}
    y = height_one(x)
    if y is not None and b is not None:  # after a Conv1d (a flattened conv2d of height 1): normalise before the flatten
        bn = b.add(Node.make("batch_norm", [y], attrs, params, _owner(mean) or ""))
        return "flatten", [bn], {"start": 2, "end": 3}, {}, _owner(mean)
    return "batch_norm", [x], attrs, params, _owner(mean)


def _batch_norm(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    if a["training"] is not False:
        return None
    return _bn(a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"], a["eps"], b)


def _bn_no_training(b: ProgramBuilder, n: fx.Node, a: dict, index: int) -> Made:
    """``_native_batch_norm_legit_no_training(...)[0]`` (the other two results are empty)."""
    if index != 0:
        return None
    return _bn(a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"], a["eps"], b)


def _native_bn(b: ProgramBuilder, n: fx.Node, a: dict, index: int) -> Made:
    if index != 0 or a["training"] is not False:
        return None
    return _bn(a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"], a["eps"], b)


def _linear(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    x, w, bias = _v(a["input"]), _c(a["weight"]), a["bias"]
    if x is None or w is None or w.dim() != 2 or (bias is not None and _c(bias) is None):
        return None
    params = {"weight": w} if bias is None else {"weight": w, "bias": _c(bias)}
    return "linear", [x], {}, params, _owner(a["weight"])


def _ln(x: Any, shape: Any, weight: Any, bias: Any, eps: Any) -> Made:
    x, shape = _v(x), _ints(shape)
    if x is None or shape is None or not _is_num(eps) or any(p is not None and _c(p) is None for p in (weight, bias)):
        return None
    params = {k: _c(p) for k, p in (("weight", weight), ("bias", bias)) if p is not None}
    return "layer_norm", [x], {"normalized_shape": shape, "eps": float(eps)}, params, None


def _rms_norm(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    x, shape, weight, eps = _v(a["input"]), _ints(a["normalized_shape"]), a["weight"], a["eps"]
    if x is None or shape is None or not (eps is None or _is_num(eps)) or (weight is not None and _c(weight) is None):
        return None
    eps = None if eps is None else float(eps)  # None: the epsilon of the dtype it runs in (torch.export keeps it None)
    return "rms_norm", [x], {"normalized_shape": shape, "eps": eps}, {} if weight is None else {"weight": _c(weight)}, None


def _layer_norm(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    return _ln(a["input"], a["normalized_shape"], a["weight"], a["bias"], a["eps"])


def _native_layer_norm(b: ProgramBuilder, n: fx.Node, a: dict, index: int) -> Made:
    return None if index != 0 else _ln(a["input"], a["normalized_shape"], a["weight"], a["bias"], a["eps"])


def _unbind(b: ProgramBuilder, n: fx.Node, a: dict, index: int) -> Made:
    """``q, k, v = qkv.unbind(0)``: each result is a select."""
    x = _v(a["self"])
    return None if x is None or not _is_int(a["dim"]) else ("select", [x], {"axis": a["dim"], "index": index}, {}, None)


def _join(op: str) -> Callable[..., Made]:
    """``a + b`` / ``a - b``: of two activations of one shape ``add``/``sub``, of other shapes ``broadcast_add``/
    ``broadcast_sub``; with a constant or a number ``add_const``; ``x + 0`` and ``x - 0`` are the identity."""

    def handler(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
        x, y = a["self"], a["other"]
        if a.get("alpha", 1) != 1:
            return None
        if _v(x) is not None and _is_num(y) and y == 0:
            return "identity", [x], {}, {}, None
        if _v(x) is not None and _v(y) is not None:
            if x.shape == y.shape:
                return op, [x, y], {}, {}, None
            return ("broadcast_" + op, [x, y], {}, {}, None) if _broadcasts(x.shape, y.shape) else None
        if _v(x) is not None:  # x + c, x - c
            return _add_const(x, y, negate_const=op == "sub", negate_x=False)
        if _v(y) is not None:  # c + y, c - y
            return _add_const(y, x, negate_const=False, negate_x=op == "sub")
        return None

    return handler


def _broadcasts(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    try:
        torch.broadcast_shapes(a, b)
    except RuntimeError:
        return False
    return True


def _add_const(x: Value, c: Any, negate_const: bool, negate_x: bool) -> Made:
    """``(-)x + (-)c`` for a number or a constant tensor that does not widen ``x``: ``add_const``."""
    if not x.dtype.is_floating_point:
        return None
    if _is_num(c):
        t = torch.tensor(float(c), dtype=torch.float64)
    elif _c(c) is not None and _broadcasts(tuple(c.tensor.shape), x.shape) and torch.broadcast_shapes(c.tensor.shape, x.shape) == x.shape:
        t = _c(c)
    else:
        return None
    trainable = isinstance(c, Const) and c.trainable
    return "add_const", [x], {"sign": -1.0 if negate_x else 1.0, "_trainable": trainable}, {"const": -t if negate_const else t}, _owner(c)


def _rsub(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``aten.rsub.Scalar(x, c)``: ``c - x``."""
    x = _v(a["self"])
    return None if x is None or a.get("alpha", 1) != 1 else _add_const(x, a["other"], negate_const=False, negate_x=True)


def _div(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``a / b``: ``div`` of two activations; by a number or a per-channel constant a ``scale``."""
    x, y = _v(a["self"]), a["other"]
    if x is None or not x.dtype.is_floating_point or a.get("rounding_mode") is not None:
        return None
    if _v(y) is not None:
        return ("div", [x, y], {}, {}, None) if _broadcasts(x.shape, y.shape) else None
    if _is_num(y):  # the reciprocal in float64, as the rewrite folds it
        return None if y == 0 else _mul(b, n, {"self": x, "other": Const(torch.tensor(1.0 / y, dtype=torch.float64), None)})
    if _c(y) is not None:
        return _mul(b, n, {"self": x, "other": Const(1.0 / _c(y), y.path)})
    return None


def _pow(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    x, e = _v(a["self"]), a["exponent"]
    if x is None or not _is_num(e) or not x.dtype.is_floating_point:
        return None
    return "pow", [x], {"exponent": e}, {}, None


def _mul(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``a * b``: ``mul`` of two activations; ``scale`` by a per-channel constant or a number."""
    x, c = a["self"], a["other"]
    if not isinstance(x, Value):
        x, c = c, x
    if _v(x) is None or not x.dtype.is_floating_point or not x.shape:
        return None
    if isinstance(c, Value):
        return "mul", [x, c], {}, {}, None
    if _c(c) is not None:
        t = _c(c)
        if t.dim() > len(x.shape):
            return None
        if t.numel() == 1:
            axis = scalar_axis(x.shape)
            vec = t.reshape(()).expand(x.shape[axis]).clone()
        else:
            axis = channel_axis(tuple(t.shape), x.shape)
            vec = None if axis is None else t.reshape(-1)
        if axis is None:  # a constant map (YOLOv7's anchor grid): a constant node times x
            return ("mul", [x, _as_value(b, c)], {}, {}, None) if t.is_floating_point() else None
        return "scale", [x], {"axis": axis}, {"scale": vec}, None
    if _is_num(c):
        axis = scalar_axis(x.shape)
        return "scale", [x], {"axis": axis}, {"scale": torch.full((x.shape[axis],), float(c), dtype=x.dtype)}, None
    return None


def _clamp(lo: Any = None, hi: Any = None) -> Callable[..., Made]:
    """``clamp``/``clamp_min``/``clamp_max``/``hardtanh``/``relu6`` with number bounds."""

    def handler(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
        x = _v(a["self"])
        low = a.get("min", a.get("min_val", lo))
        high = a.get("max", a.get("max_val", hi))
        if x is None or (low is None and high is None) or any(v is not None and not _is_num(v) for v in (low, high)):
            return None
        return "clamp", [x], {"min": low, "max": high}, {}, None

    return handler


def _sum(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    x, dims = _v(a["self"]), _ints(a.get("dim"))
    keepdim = a.get("keepdim", False)
    if x is None or a["dtype"] is not None or not isinstance(keepdim, bool) or not x.shape:
        return None
    dims = tuple(range(len(x.shape))) if dims is None or dims == () else dims
    return "sum", [x], {"dims": dims, "keepdim": keepdim}, {}, None


def _max_pool(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    x, kernel, padding, dilation = _v(a["self"]), _pair(a["kernel_size"]), _pair(a["padding"]), _pair(a["dilation"])
    stride = kernel if a["stride"] in ([], (), None) else _pair(a["stride"])
    if x is None or len(x.shape) != 4 or None in (kernel, stride, padding, dilation):
        return None
    attrs = {"kernel": kernel, "stride": stride, "padding": padding, "dilation": dilation, "ceil_mode": bool(a["ceil_mode"])}
    return "max_pool2d", [x], attrs, {}, None


def _max_pool_values(b: ProgramBuilder, n: fx.Node, a: dict, index: int) -> Made:
    """``max_pool2d_with_indices(...)[0]``."""
    return _max_pool(b, n, a) if index == 0 else None


def _adaptive(op: str) -> Callable[..., Made]:
    def handler(b: ProgramBuilder, n: fx.Node, a: dict, index: int = 0) -> Made:
        x, size = _v(a["self"]), _pair(a["output_size"])
        if x is None or len(x.shape) not in (3, 4) or size is None or index != 0:
            return None
        return op, [x], {"output_size": size}, {}, None

    return handler


def _gn(x: Any, weight: Any, bias: Any, groups: Any, eps: Any) -> Made:
    x = _v(x)
    if x is None or not _is_int(groups) or not _is_num(eps) or any(p is not None and _c(p) is None for p in (weight, bias)):
        return None
    params = {k: _c(p) for k, p in (("weight", weight), ("bias", bias)) if p is not None}
    return "group_norm", [x], {"num_groups": groups, "eps": float(eps)}, params, _owner(weight)


def _group_norm(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    return _gn(a["input"], a["weight"], a["bias"], a["num_groups"], a["eps"])


def _native_group_norm(b: ProgramBuilder, n: fx.Node, a: dict, index: int) -> Made:
    return None if index != 0 else _gn(a["input"], a["weight"], a["bias"], a["group"], a["eps"])


def _upsample(mode: str, rank: int = 4) -> Callable[..., Made]:
    """``upsample_nearest2d.vec``/``_upsample_nearest_exact2d.vec``/``upsample_bilinear2d.vec`` (and, ``rank`` 3 or 5,
    the 1-d and 3-d nearest ones): ``interpolate`` (:func:`_upsampled`)."""
    return lambda b, n, a: _upsampled(a, mode, rank)


def _upsampled(a: dict, mode: str, rank: int) -> Made:
    """The ``interpolate`` of an upsampling's arguments ``a``, where its input has ``rank`` axes."""
    x, size, scales = _v(a["input"]), a["output_size"], a["scale_factors"]
    if x is None or len(x.shape) != rank or (size is None) == (scales is None):
        return None
    if size is not None and (_ints(size) is None or len(size) != rank - 2):
        return None
    if scales is not None and (not isinstance(scales, (list, tuple)) or len(scales) != rank - 2 or not all(_is_num(v) for v in scales)):
        return None
    align = a.get("align_corners")
    attrs = {
        "size": None if size is None else tuple(size),
        "scale": None if scales is None else tuple(float(v) for v in scales),
        "mode": mode,
        "align_corners": bool(align) if mode == "bilinear" else None,
    }
    return "interpolate", [x], attrs, {}, None


def _attention(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    qkv = [_v(a[k]) for k in ("query", "key", "value")]
    if None in qkv or a["dropout_p"] != 0 or not isinstance(a["enable_gqa"], bool) or not isinstance(a["is_causal"], bool):
        return None
    if (a["attn_mask"] is not None and a["is_causal"]) or (a["scale"] is not None and not _is_num(a["scale"])):
        return None
    mask = None if a["attn_mask"] is None else _as_value(b, a["attn_mask"])  # a bias gathered from a table: a constant
    if a["attn_mask"] is not None and mask is None:
        return None
    scale = None if a["scale"] is None else float(a["scale"])
    attrs = {"scale": scale, "causal": a["is_causal"], "gqa": a["enable_gqa"]}
    return "attention", qkv + ([mask] if mask is not None else []), attrs, {}, None


def _einsum(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``torch.einsum``; constant operands (a relative-position table) as ``constant`` nodes."""
    ts = a["tensors"] if isinstance(a["tensors"], (list, tuple)) else []
    if not any(_v(t) is not None for t in ts) or not isinstance(a["equation"], str):
        return None
    xs = [_as_value(b, t) for t in ts]
    return None if None in xs else ("einsum", xs, {"equation": a["equation"].replace(" ", "")}, {}, None)


def _expand(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``expand``, or ``expand_dyn`` to the recorded shape where it holds the symbolic batch (``expand(B, -1, -1)``)."""
    sizes = b.batch_sizes(n)
    if sizes is not None:  # a constant too (``cls_token.expand(B, -1, -1)``): it must be expanded at run time
        x = _as_value(b, a["self"])
        return None if x is None else ("expand_dyn", [x, b.batch_ref], {"shape": sizes}, {}, None)
    x = _v(a["self"])
    size = _ints(a["size"])
    return None if x is None or size is None else ("expand", [x], {"shape": size}, {}, None)


def _filler(value: str | float) -> Callable[..., Made]:
    """The handler of a tensor of one number made in ``forward`` (:func:`_one_number`): ``value`` the number, or the
    name of the argument holding it."""
    return lambda b, n, a: _one_number(b, n, a, a[value] if isinstance(value, str) else value)


def _one_number(b: ProgramBuilder, n: fx.Node, a: dict, number: Any) -> Made:
    """``torch.ones(B, L)``, ``torch.zeros``, ``torch.full``, ``x.new_ones(...)``, ``torch.zeros_like(x)`` and the
    like: ``number`` at ``n``'s shape and dtype (made in that dtype: a Python float is not rounded to float32 first).

    At fixed shapes a ``constant``; where its shape holds the symbolic batch (HF's ``torch.ones(batch, seq_len)``
    attention mask, an RNN's ``torch.zeros(layers, B, hidden)`` state), one expanded to the batch at run time, so
    the batch stays free."""
    info = b.info(n)
    if info is None or not isinstance(number, (bool, int, float)) or a.get("memory_format") not in (None, torch.preserve_format):
        return None
    return _filled(b, n, torch.tensor(number, dtype=info[1]), info[1], None)


def _fill(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``fill(x, v)`` (``x.fill_(v)``, or ``y[:, -1] = 0`` as torch.export functionalizes it): ``v`` at ``x``'s shape
    and dtype, a ``constant``; ``v`` a number or a constant one-element tensor, not a value computed at run time."""
    info, value = b.info(n), a["value"]
    if isinstance(value, Const) and value.tensor.numel() == 1:
        filler, source = value.tensor.reshape(()), _owner(value)
    elif isinstance(value, (bool, int, float)) and info is not None:
        filler, source = torch.tensor(value, dtype=info[1]), None
    else:
        return None
    return None if info is None else _filled(b, n, filler, info[1], source)


def _filled(b: ProgramBuilder, n: fx.Node, value: torch.Tensor, dtype: torch.dtype, source: str | None) -> Made:
    """``value`` broadcast to ``n``'s recorded shape, as a ``constant``.

    Where that shape holds the symbolic batch, the constant has size 1 there and an ``expand_dyn`` reads the batch at run time.
    """
    shape = b.info(n)[0]
    sizes = b.batch_sizes(n)
    if sizes is None:
        return "constant", [], {"dtype": dtype}, {"value": value.expand(shape).to(dtype).clone()}, source
    small = tuple(1 if isinstance(e, tuple) else e for e in sizes)
    if not _broadcasts(tuple(value.shape), small):
        return None
    const = Node.make("constant", [], {"dtype": dtype}, {"value": value.expand(small).to(dtype).clone()}, source or module_path(n))
    return "expand_dyn", [b.add(const), b.batch_ref], {"shape": sizes}, {}, source


_END = 2**63 - 1  # aten's "to the end" (``x[a:]``)


def _bound(v: Any) -> Any:
    return None if v is None or (_is_int(v) and v >= _END) else v


def _slice(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    x, start, end, step = _v(a["self"]), a["start"], _bound(a["end"]), a["step"]
    if x is None or not _is_int(a["dim"]) or not (start is None or _is_int(start)) or not (end is None or _is_int(end)) or not _is_int(step) or step < 1:
        return None
    if not start and end is None and step == 1:  # the whole axis (``x[:, 1:]``'s ``[:]`` over a symbolic batch)
        return "identity", [x], {}, {}, None
    return "slice", [x], {"axis": a["dim"], "start": start or 0, "end": end, "step": step}, {}, None


def _slice_scatter(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``slice_scatter`` (a functionalized ``y[:, :c] = src``); a constant ``y`` or ``src`` as a ``constant`` node."""
    start, end, step = a["start"], _bound(a["end"]), a["step"]
    if not _is_int(a["dim"]) or not (start is None or _is_int(start)) or not (end is None or _is_int(end)) or not _is_int(step) or step < 1:
        return None
    if _v(a["self"]) is None and _v(a["src"]) is None:
        return None
    x, src = _as_value(b, a["self"]), _as_value(b, a["src"])
    if x is None or src is None:
        return None
    return "slice_scatter", [x, src], {"axis": a["dim"], "start": start or 0, "end": end, "step": step}, {}, None


def _select_scatter(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``select_scatter`` (a functionalized ``y[:, -1] = src``): ``src`` unsqueezed along the axis, a ``slice_scatter``
    into the one-wide slice at the index (a negative index counted from the axis' end: not on a symbolic batch)."""
    dim, index = a["dim"], a["index"]
    if not (_is_int(dim) and _is_int(index)) or (_v(a["self"]) is None and _v(a["src"]) is None):
        return None
    x, src = _as_value(b, a["self"]), _as_value(b, a["src"])
    if x is None or src is None:
        return None
    axis, sizes = dim % len(x.shape), b.batch_sizes(n)
    if index < 0 and sizes is not None and isinstance(sizes[axis], tuple):
        return None
    start = index % x.shape[axis]
    wide = b.add(Node.make(*unsqueezed(src, axis)[:4], module_path(n)))
    return "slice_scatter", [x, wide], {"axis": axis, "start": start, "end": start + 1, "step": 1}, {}, None


def _split(b: ProgramBuilder, n: fx.Node, a: dict, index: int) -> Made:
    """``split.Tensor`` (also what ``chunk`` becomes) and ``split_with_sizes``: each result a ``slice``."""
    x, size = _v(a["self"]), a.get("split_size", a.get("split_sizes"))
    if x is None or not _is_int(a["dim"]):
        return None
    if _is_int(size) and size > 0:
        start, stop = index * size, (index + 1) * size
    elif _ints(size) is not None and index < len(size):
        start = sum(size[:index])
        stop = start + size[index]
    else:
        return None
    return "slice", [x], {"axis": a["dim"] % len(x.shape), "start": start, "end": stop, "step": 1}, {}, None


def _copy(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``copy(dst, src)`` (from ``y[...] = src``): ``src`` broadcast to ``dst``'s shape in ``dst``'s dtype; the
    identity of ``src`` where it has them, ``expand`` where it broadcasts, a ``constant`` for a constant ``src``
    (DBB's ``output[:, :, 0:p, :] = pad_values``); ``expand_dyn`` where the shape holds the symbolic batch."""
    info = b.info(n)
    if info is None:
        return None
    shape, dtype = info
    src = a["src"]
    if isinstance(src, Const):
        return _filled(b, n, src.tensor, dtype, _owner(src)) if _broadcasts(tuple(src.tensor.shape), shape) else None
    src = _v(src)
    if src is None or src.dtype != dtype:
        return None
    sizes = b.batch_sizes(n)
    if sizes is not None:  # equal shapes at the example's batch may still broadcast at another
        return ("expand_dyn", [src, b.batch_ref], {"shape": sizes}, {}, None) if _broadcasts(src.shape, shape) else None
    if src.shape == shape:
        return "identity", [src], {}, {}, None
    return ("expand", [src], {"shape": shape}, {}, None) if _broadcasts(src.shape, shape) else None


def _roll(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    x, shifts, dims = _v(a["self"]), _ints(a["shifts"]), _ints(a["dims"])
    if x is None or shifts is None or dims is None or len(shifts) != len(dims) or not dims:
        return None
    return "roll", [x], {"shifts": shifts, "dims": dims}, {}, None


def _shuffle(op: str, name: str) -> Callable[..., Made]:
    def handler(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
        x = _v(a["self"])
        return None if x is None or len(x.shape) != 4 or not _is_int(a[name]) else (op, [x], {"factor": a[name]}, {}, None)

    return handler


def _leaky_relu(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    return leaky_relu_made(_v(a["self"]), a["negative_slope"], None)


def _elu(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``aten.elu`` (ELU; CELU and SELU decompose to it) with number arguments."""
    x, alpha, scale, input_scale = _v(a["self"]), a["alpha"], a["scale"], a["input_scale"]
    if x is None or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (alpha, scale, input_scale)):
        return None
    return "elu", [x], {"alpha": float(alpha), "scale": float(scale), "input_scale": float(input_scale)}, {}, None


def _selu(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    return elu_made(_v(a["self"]), "selu", 1.0, None)


def _celu(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    return elu_made(_v(a["self"]), "celu", a["alpha"], None)


def _threshold(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    x, threshold, value = _v(a["self"]), a["threshold"], a["value"]
    if x is None or not all(isinstance(v, (int, float)) for v in (threshold, value)):
        return None
    return "threshold", [x], {"threshold": float(threshold), "value": float(value)}, {}, None


def _softplus(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    x, beta, threshold = _v(a["self"]), a["beta"], a["threshold"]
    if x is None or not all(isinstance(v, (int, float)) for v in (beta, threshold)):
        return None
    return "softplus", [x], {"beta": float(beta), "threshold": float(threshold)}, {}, None


def _prelu(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    w = _c(a["weight"])
    return None if w is None else prelu_made(_v(a["self"]), w, _owner(a["weight"]))


def _unary(op: str) -> Callable[..., Made]:
    def handler(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
        x = _v(a["self"])
        if x is None:
            return None
        return op, [x], {"approximate": a["approximate"]} if op == "gelu" else {}, {}, None

    return handler


def _pad_op(x: Any, pad: Any, value: Any) -> Made:
    """Torch order ``(left, right, top, bottom, ...)`` to IR ``(top, bottom, left, right)``; last two axes only."""
    x, pad = _v(x), _ints(pad)
    value = 0.0 if value is None else value
    if x is None or len(x.shape) < 2 or pad is None or len(pad) not in (2, 4, 6, 8) or any(pad[4:]) or not _is_num(value):
        return None
    left, right, top, bottom = (*pad, 0, 0)[:4]
    return "pad", [x], {"pads": (top, bottom, left, right), "value": float(value)}, {}, None


def _pad(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    made = _pad_op(a["self"], a["pad"], a["value"]) if a["mode"] == "constant" else None
    return made or _pad_nd(a["self"], a["pad"], a["mode"], a["value"])


def _constant_pad_nd(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    return _pad_op(a["self"], a["pad"], a["value"]) or _pad_nd(a["self"], a["pad"], "constant", a["value"])


def _pad_nd(x: Any, pad: Any, mode: Any, value: Any) -> Made:
    """What ``pad`` cannot say (more axes: a channels-last map; reflect, replicate, circular): ``pad_nd``."""
    x, pad = _v(x), _ints(pad)
    value = 0.0 if value is None else value
    if x is None or pad is None or len(pad) % 2 or len(pad) // 2 > len(x.shape) or not _is_num(value):
        return None
    if mode not in ("constant", "reflect", "replicate", "circular"):
        return None
    return "pad_nd", [x], {"pads": pad, "mode": mode, "value": float(value)}, {}, None


def _avg_pool(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    x, kernel, padding = _v(a["self"]), _pair(a["kernel_size"]), _pair(a["padding"])
    stride = kernel if a["stride"] in ([], (), None) else _pair(a["stride"])
    if x is None or len(x.shape) != 4 or None in (kernel, stride, padding) or a["divisor_override"] is not None:
        return None
    attrs = {"kernel": kernel, "stride": stride, "padding": padding, "ceil_mode": bool(a["ceil_mode"]), "count_include_pad": bool(a["count_include_pad"])}
    return "avg_pool2d", [x], attrs, {}, None


def _avg_pool_nd(spatial: int) -> Callable[..., Made]:
    """``avg_pool1d`` (no ``divisor_override``) and ``avg_pool3d``."""
    return lambda b, n, a: avg_pool(_v(a["self"]), a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"],
                                    a.get("divisor_override"), spatial)


def _adaptive_avg_nd(spatial: int) -> Callable[..., Made]:
    """``adaptive_avg_pool1d``/``3d``: to size 1 a ``mean`` over the last 1 or 3 axes (else a call)."""
    return lambda b, n, a: global_mean(_v(a["self"]), a["output_size"], spatial)


def _repeat(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``repeat``; where a count is the symbolic batch, of axes of size 1 only (DETR's
    ``query_embed.unsqueeze(1).repeat(1, bs, 1)``), the same values as ``expand_dyn`` to the recorded shape: the
    batch stays free (it was fixed, found by a probe)."""
    x, counts = _as_value(b, a["self"]), _ints(a["repeats"])
    if x is None or counts is None or len(counts) < len(x.shape) or min(counts) < 0:
        return None
    if any(isinstance(c, fx.Node) for c in n.args[1]):  # a count is the batch (its example's value here)
        recorded = n.args[0].meta["val"].shape
        ones = (1,) * (len(counts) - len(recorded)) + tuple(recorded)
        sizes = b.batch_sizes(n)
        return ("expand_dyn", [x, b.batch_ref], {"shape": sizes}, {}, None) if sizes is not None and all(
            c == 1 or (not symbolic(s) and int(s) == 1) for c, s in zip(counts, ones)) else None
    return None if _v(a["self"]) is None else ("repeat", [x], {"repeats": counts}, {}, None)


def _amax(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    x = _v(a["self"])
    if x is None or not isinstance(a["keepdim"], bool):
        return None
    dims = _ints(a["dim"]) if a["dim"] else tuple(range(len(x.shape)))  # [] is every axis
    return None if not dims else ("amax", [x], {"dims": dims, "keepdim": a["keepdim"]}, {}, None)


def _max_values(b: ProgramBuilder, n: fx.Node, a: dict, index: int) -> Made:
    """``torch.max(x, dim)[0]`` (``aten.max.dim``): its values are ``amax`` over ``dim`` (PointNet's pooling over
    points); the indices stay a call."""
    if index != 0 or not _is_int(a["dim"]):
        return None
    return _amax(b, n, {"self": a["self"], "dim": [a["dim"]], "keepdim": a["keepdim"]})


def _to_dtype(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``x.float()``, ``x.to(torch.float32)`` (``aten.to.dtype``, or ``aten._to_copy`` once decomposed): a ``cast``;
    one that also moves the tensor or changes its layout or memory format stays a call.  A device that is the
    tensor's own moves nothing (HF CLIP's ``input_ids.to(dtype=torch.int, device=h.device)``)."""
    x = _v(a["self"])
    own = getattr(n.args[0].meta.get("val"), "device", None) if n.args and isinstance(n.args[0], fx.Node) else None
    keeps = (a.get("layout") in (None, torch.strided) and a.get("device") in (None, own)
             and a.get("memory_format") in (None, torch.preserve_format))
    if x is None or not isinstance(a["dtype"], torch.dtype) or not keeps:
        return None
    return "cast", [x], {"dtype": a["dtype"]}, {}, None


def _adaptive_avg(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """To size 1 a ``mean`` over the last two axes, else ``adaptive_avg_pool2d``."""
    x = _v(a["self"])
    if x is None or len(x.shape) < 3:
        return None
    if _pair(a["output_size"]) != (1, 1):
        return _adaptive("adaptive_avg_pool2d")(b, n, a)
    nd = len(x.shape)
    return "mean", [x], {"dims": (nd - 2, nd - 1), "keepdim": True}, {}, None


def _mean_dim(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    x, dims = _v(a["self"]), _ints(a["dim"])
    if x is None or not dims or a["dtype"] is not None or not isinstance(a["keepdim"], bool):
        return None
    return "mean", [x], {"dims": dims, "keepdim": a["keepdim"]}, {}, None


def _var(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``aten.var`` (``x.var(dim, unbiased=False)``, ``torch.var(x, correction=0)``): see :func:`population_variance`."""
    if "correction" in a:
        correction = 1 if a["correction"] is None else a["correction"]
    else:  # var.dim and var.default: ``unbiased``
        correction = 0 if a["unbiased"] is False else 1
    add = lambda op, inputs, attrs: b.add(Node.make(op, inputs, attrs, {}, module_path(n)))  # noqa: E731
    return population_variance(add, _v(a["self"]), a.get("dim"), correction, a.get("keepdim", False))


def _mean_all(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    x = _v(a["self"])
    if x is None or not x.shape or a["dtype"] is not None:
        return None
    return "mean", [x], {"dims": tuple(range(len(x.shape))), "keepdim": False}, {}, None


def _reshape(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``view``/``reshape``: ``reshape``, or ``reshape_dyn`` where a size follows the symbolic batch (``B * N``)."""
    x = _v(a["self"])
    sizes = b.batch_sizes(n)
    if x is not None and sizes is not None:
        return "reshape_dyn", [x, b.batch_ref], {"shape": sizes}, {}, None
    shape = _ints(a.get("size", a.get("shape")))
    return None if x is None or shape is None else ("reshape", [x], {"shape": shape}, {}, None)


def _to_shape(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``unsqueeze``/``squeeze``: a reshape to the recorded shape (``reshape_dyn`` where it holds the batch)."""
    x, info, sizes = _v(a["self"]), b.info(n), b.batch_sizes(n)
    if x is not None and sizes is not None:
        return "reshape_dyn", [x, b.batch_ref], {"shape": sizes}, {}, None
    return None if x is None or info is None else ("reshape", [x], {"shape": info[0]}, {}, None)


def _flatten(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    x = _v(a["self"])
    if x is None or not (_is_int(a["start_dim"]) and _is_int(a["end_dim"])):
        return None
    return "flatten", [x], {"start": a["start_dim"], "end": a["end_dim"]}, {}, None


def _permute(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    x, dims = _v(a["self"]), _ints(a["dims"])
    return None if x is None or dims is None else ("permute", [x], {"dims": dims}, {}, None)


def _transpose(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    x = _v(a["self"])
    if x is None or not (_is_int(a["dim0"]) and _is_int(a["dim1"])):
        return None
    return "transpose", [x], {"dim0": a["dim0"], "dim1": a["dim1"]}, {}, None


def _cat(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``torch.cat``; a constant operand (a class token, folded at the example's batch size) as a ``constant`` node."""
    ts = a["tensors"] if isinstance(a["tensors"], (list, tuple)) else []
    if not any(_v(t) is not None for t in ts) or not _is_int(a["dim"]):
        return None
    xs = [_as_value(b, t) for t in ts]
    if any(x is None for x in xs):
        return None
    return concat_made(xs, a["dim"], None)


def _stack(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``torch.stack`` as the ``concat`` of the operands unsqueezed, as the fx front end writes it."""
    made = _cat(b, n, {"tensors": a["tensors"], "dim": 0})
    if made is None or len({x.shape for x in made[1]}) != 1 or not _is_int(a["dim"]):
        return None
    axis = a["dim"] % (len(made[1][0].shape) + 1)
    return "concat", [b.add(Node.make(*unsqueezed(x, axis)[:4], module_path(n))) for x in made[1]], {"axis": axis}, {}, None


def _as_value(b: ProgramBuilder, x: Any) -> Value | None:
    """An activation, or a constant tensor as a ``constant`` node."""
    if isinstance(x, Const):
        return b.add(Node.make("constant", [], {"dtype": x.tensor.dtype, "_trainable": x.trainable}, {"value": x.tensor}, _owner(x) or ""))
    return _v(x)


def _select(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    x = _v(a["self"])
    if x is None or not (_is_int(a["dim"]) and _is_int(a["index"])):
        return None
    return "select", [x], {"axis": a["dim"], "index": a["index"]}, {}, None


def _softmax(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``aten.softmax`` and ``aten.log_softmax`` along one axis, no cast."""
    x = _v(a["self"])
    if x is None or not _is_int(a["dim"]) or a.get("dtype") is not None or a.get("half_to_float", False):
        return None
    return "log_softmax" if "log_softmax" in str(n.target) else "softmax", [x], {"axis": a["dim"]}, {}, None


def _glu(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    x = _v(a["self"])
    return None if x is None or not _is_int(a["dim"]) else ("glu", [x], {"axis": a["dim"]}, {}, None)


def _matmul(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    x, y = _v(a["self"]), _v(a.get("other", a.get("mat2")))
    return None if x is None or y is None else ("matmul", [x, y], {}, {}, None)


def _add_product(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``baddbmm(input, batch1, batch2, beta, alpha)`` (diffusers' attention scores), ``addmm(input, mat1, mat2, ...)``
    and ``addbmm`` (the products summed over the batch): ``alpha (b1 @ b2) + beta input``.

    At ``beta=0`` torch does not read ``input`` (diffusers passes an uninitialised ``torch.empty``, NaN and Inf in it
    included), and neither does the op made here: ``alpha (b1 @ b2)`` only, so no constant of ``input`` is held.
    """
    x, y = (_v(a["mat1"]), _v(a["mat2"])) if "mat1" in a else (_v(a["batch1"]), _v(a["batch2"]))
    beta, alpha, where = a["beta"], a["alpha"], module_path(n)
    if x is None or y is None or not x.dtype.is_floating_point or not _is_num(beta) or not _is_num(alpha):
        return None
    product = b.add(Node.make("matmul", [x, y], {}, {}, where))
    if n.target is aten.addbmm.default:
        product = b.add(Node.make("sum", [product], {"dims": (0,), "keepdim": False}, {}, where))
    scaled = _times(b, where, product, alpha)
    if scaled is None or beta == 0:
        return None if scaled is None else ("identity", [scaled], {}, {}, None)
    term = _times(b, where, a["self"], beta) if isinstance(a["self"], Value) else a["self"]
    if isinstance(term, Const):
        term = Const(term.tensor * beta, term.path) if term.tensor.is_floating_point() else None
    return None if term is None else _join("add")(b, n, {"self": scaled, "other": term})


def _times(b: ProgramBuilder, where: str, x: Value, number: int | float) -> Value | None:
    """``x * number`` as a node (``x`` itself for 1); None where the ``scale`` op cannot hold it."""
    if number == 1:
        return x
    made = _mul(b, None, {"self": x, "other": number})
    return None if made is None else b.add(Node.make(*made[:4], where))


def _identity(b: ProgramBuilder, n: fx.Node, a: dict) -> Made:
    """``clone``/``alias``/``detach``/``dropout(train=False)``: the same values.  A clone to a memory format is
    ``x.contiguous()`` (as ``run_decompositions`` writes it): a ``contiguous`` op, kept where a layout is read."""
    x = _v(a["self"] if "self" in a else a["input"])
    if x is None or a.get("train", False) is not False:
        return None
    layout = a.get("memory_format")
    if layout not in (None, torch.preserve_format):
        return "contiguous", [x], {"memory_format": layout}, {}, None
    return "identity", [x], {}, {}, None


HANDLERS: dict[Any, Callable[..., Made]] = {
    aten.conv1d.default: _conv1d,
    aten.conv1d.padding: _conv1d,
    aten.conv2d.default: _conv,
    aten.conv2d.padding: _conv,
    aten.convolution.default: _convolution,
    aten.conv_transpose2d.input: _conv_transpose,
    aten.conv_transpose3d.input: _conv_transpose,
    aten.conv_transpose1d.default: _conv_transpose1d,
    aten.conv3d.default: _conv3d,
    aten.conv3d.padding: _conv3d,
    aten.batch_norm.default: _batch_norm,
    aten.linear.default: _linear,
    aten.layer_norm.default: _layer_norm,
    aten.rms_norm.default: _rms_norm,
    aten.add.Tensor: _join("add"),
    aten.sub.Tensor: _join("sub"),
    aten.mul.Tensor: _mul,
    aten.mul.Scalar: _mul,
    aten.neg.default: lambda b, n, a: _mul(b, n, {"self": a["self"], "other": -1.0}),  # -x: a scale by -1, the same bits
    aten.relu.default: _unary("relu"),
    aten.gelu.default: _unary("gelu"),
    aten.sigmoid.default: _unary("sigmoid"),
    aten.pad.default: _pad,
    aten.constant_pad_nd.default: _constant_pad_nd,
    aten.avg_pool2d.default: _avg_pool,
    aten.adaptive_avg_pool2d.default: _adaptive_avg,
    aten.avg_pool1d.default: _avg_pool_nd(1),
    aten.avg_pool3d.default: _avg_pool_nd(3),
    aten.adaptive_avg_pool1d.default: _adaptive_avg_nd(1),
    aten.adaptive_avg_pool3d.default: _adaptive_avg_nd(3),
    aten.mean.dim: _mean_dim,
    aten.mean.default: _mean_all,
    aten.var.correction: _var,
    aten.var.dim: _var,
    aten.var.default: _var,
    aten.view.default: _reshape,
    aten._unsafe_view.default: _reshape,
    aten.reshape.default: _reshape,
    aten.unsqueeze.default: _to_shape,
    aten.squeeze.dim: _to_shape,
    aten.squeeze.dims: _to_shape,
    aten.squeeze.default: _to_shape,
    aten.flatten.using_ints: _flatten,
    aten.permute.default: _permute,
    aten.transpose.int: _transpose,
    aten.cat.default: _cat,
    aten.stack.default: _stack,
    aten.concat.default: _cat,  # torch.concat, as RT-DETR writes it
    aten.select.int: _select,
    aten.softmax.int: _softmax,
    aten._softmax.default: _softmax,
    aten.log_softmax.int: _softmax,
    aten._log_softmax.default: _softmax,
    aten.glu.default: _glu,
    aten.matmul.default: _matmul,
    aten.bmm.default: _matmul,
    aten.mm.default: _matmul,
    aten.baddbmm.default: _add_product,
    aten.addbmm.default: _add_product,
    aten.addmm.default: _add_product,
    aten.dropout.default: _identity,
    aten.clone.default: _identity,
    aten.alias.default: _identity,
    aten.detach.default: _identity,
    aten.contiguous.default: _identity,
    aten.add.Scalar: _join("add"),
    aten.sub.Scalar: _join("sub"),
    aten.rsub.Scalar: _rsub,
    aten.div.Tensor: _div,
    aten.div.Scalar: _div,
    aten.div.Tensor_mode: _div,
    aten.pow.Tensor_Scalar: _pow,
    aten.silu.default: _unary("silu"),
    aten.hardswish.default: _unary("hardswish"),
    aten.hardsigmoid.default: _unary("hardsigmoid"),
    aten.tanh.default: _unary("tanh"),
    aten.sqrt.default: _unary("sqrt"),
    aten.rsqrt.default: _unary("rsqrt"),
    aten.exp.default: _unary("exp"),
    aten.log.default: _unary("log"),
    aten.relu6.default: _clamp(0.0, 6.0),
    aten.leaky_relu.default: _leaky_relu,
    aten.prelu.default: _prelu,
    aten.softplus.default: _softplus,
    aten.threshold.default: _threshold,
    aten.elu.default: _elu,
    aten.selu.default: _selu,
    aten.celu.default: _celu,
    aten.log_sigmoid.default: _unary("log_sigmoid"),
    aten.hardtanh.default: _clamp(),
    aten.clamp.default: _clamp(),
    aten.clamp_min.default: _clamp(),
    aten.clamp_max.default: _clamp(),
    aten.sum.dim_IntList: _sum,
    aten.sum.default: _sum,
    aten.max_pool2d.default: _max_pool,
    aten.group_norm.default: _group_norm,
    aten.upsample_nearest2d.vec: _upsample("nearest"),
    aten._upsample_nearest_exact2d.vec: _upsample("nearest-exact"),
    aten.upsample_bilinear2d.vec: _upsample("bilinear"),
    aten.upsample_nearest1d.vec: _upsample("nearest", 3),
    aten._upsample_nearest_exact1d.vec: _upsample("nearest-exact", 3),
    aten.upsample_nearest3d.vec: _upsample("nearest", 5),
    aten._upsample_nearest_exact3d.vec: _upsample("nearest-exact", 5),
    aten.scaled_dot_product_attention.default: _attention,
    aten.einsum.default: _einsum,
    aten.slice.Tensor: _slice,
    aten.slice_scatter.default: _slice_scatter,
    aten.select_scatter.default: _select_scatter,
    aten.copy.default: _copy,
    aten.roll.default: _roll,
    aten.expand.default: _expand,
    aten.zeros_like.default: _filler(0),
    aten.ones_like.default: _filler(1),
    aten.full_like.default: _filler("fill_value"),
    aten.zeros.default: _filler(0),
    aten.ones.default: _filler(1),
    aten.full.default: _filler("fill_value"),
    aten.new_zeros.default: _filler(0),
    aten.new_ones.default: _filler(1),
    aten.new_full.default: _filler("fill_value"),
    aten.fill.Scalar: _fill,
    aten.fill.Tensor: _fill,
    aten.pixel_shuffle.default: _shuffle("pixel_shuffle", "upscale_factor"),
    aten.abs.default: _unary("abs"),
    aten.repeat.default: _repeat,
    aten.amax.default: _amax,
    aten.to.dtype: _to_dtype,
    aten._to_copy.default: _to_dtype,
    aten.linalg_vector_norm.default: lambda b, n, a: None if a["dtype"] is not None else vector_norm(_v(a["self"]), a["ord"], a["dim"], a["keepdim"]),
    aten.im2col.default: lambda b, n, a: im2col(_v(a["self"]), a["kernel_size"], a["dilation"], a["padding"], a["stride"]),
    aten.col2im.default: lambda b, n, a: im2col(_v(a["self"]), a["kernel_size"], a["dilation"], a["padding"], a["stride"], a["output_size"]),
    aten.pixel_unshuffle.default: _shuffle("pixel_unshuffle", "downscale_factor"),
}

# Calls returning several tensors, mapped per ``getitem`` index (None: the generic way, see ProgramBuilder.getitem).
MULTI_HANDLERS: dict[Any, Callable[..., Made]] = {
    aten._native_batch_norm_legit_no_training.default: _bn_no_training,
    aten.native_batch_norm.default: _native_bn,
    aten.native_layer_norm.default: _native_layer_norm,
    aten.unbind.int: _unbind,
    aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split,
    aten.max_pool2d_with_indices.default: _max_pool_values,
    aten.adaptive_max_pool2d.default: _adaptive("adaptive_max_pool2d"),
    aten.native_group_norm.default: _native_group_norm,
    aten.max.dim: _max_values,
}

# Overloads that may read sizes computed from a symbolic batch: their handlers take the sizes from the recorded
# output shape instead (any other call reading one makes the capture fall back to fixed shapes).
SIZED = frozenset({aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default, aten.repeat.default,
                   aten.zeros.default, aten.ones.default, aten.full.default,
                   aten.new_zeros.default, aten.new_ones.default, aten.new_full.default})
