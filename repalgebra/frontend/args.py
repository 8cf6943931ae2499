"""What the module and function handlers share: reading call arguments, and the ops both make.

A handler's arguments arrive with fx nodes replaced by ``Value``s,
:class:`~repalgebra.frontend.builder.Const`s, shape expressions and literals.
:func:`bind` matches them to a signature, :func:`shaped`, :func:`ints` and
:func:`conv_padding` read them as the op table wants them.  :func:`bn_params`,
:func:`avg_pool`, :func:`global_mean`, :func:`max_pool`, :func:`adaptive_pool`,
:func:`interpolate`, :func:`pad_nd` and :func:`prelu_made` build the ops that both a module
(``nn.AvgPool2d``) and its function (``F.avg_pool2d``) become.  :func:`constant`
reads a constant through the calls the front end carries for it
(``self.weight[:, None, None]``).
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import torch

from repalgebra.frontend.builder import Const, Made, constant_attrs
from repalgebra.frontend.calls import FnCall
from repalgebra.ir import Value, upstream
from repalgebra.ops import op_def


def shaped(x: Any) -> Value | None:
    """``x`` if it is an activation of known shape, else None."""
    return x if isinstance(x, Value) and x.shape is not None else None


def single(args: tuple, kwargs: dict) -> Value | None:
    """The one activation a call takes (``m(x)``), else None."""
    return shaped(args[0]) if len(args) == 1 and not kwargs else None


REQ = object()  # a required argument in a ``bind`` spec


def bind(spec: Sequence[tuple[str, Any]], args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """Match call arguments to ``(name, default)`` pairs (``REQ`` = required); None when they do not fit."""
    names = [s for s, _ in spec]
    if len(args) > len(names) or any(k not in names or names.index(k) < len(args) for k in kwargs):
        return None
    out = dict(spec)
    out.update(zip(names, args))
    out.update(kwargs)
    if any(v is REQ for v in out.values()):
        return None
    return out


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def ints(v: Any, n: int | None = None) -> tuple[int, ...] | None:
    """``v`` as a tuple of ints (an int is repeated ``n`` times), or None."""
    if is_int(v) and n is not None:
        return (v,) * n
    if isinstance(v, (tuple, list)) and all(is_int(x) for x in v) and (n is None or len(v) == n):
        return tuple(v)
    return None


def transposed_conv_attrs(stride: Any, padding: Any, output_padding: Any, dilation: Any, groups: Any,
                          axes: int = 2) -> dict | None:
    """The ``conv_transpose2d`` attrs of PyTorch's arguments (an int or a pair each), or None when one is not;
    ``axes`` 3: those of a ``conv_transpose3d`` (an int or a triple each)."""
    attrs = {k: ints(v, axes) for k, v in
             (("stride", stride), ("padding", padding), ("output_padding", output_padding), ("dilation", dilation))}
    if any(v is None for v in attrs.values()) or not is_int(groups):
        return None
    return {**attrs, "groups": groups}


def conv3d_attrs(kernel: Sequence[int], stride: Any, padding: Any, dilation: Any, groups: Any) -> dict | None:
    """The ``conv3d`` attrs of PyTorch's arguments (an int, one int or three each; padding also ``'valid'`` or
    ``'same'``), or None when one is not, or when ``'same'`` pads one side more (an even dilated kernel)."""
    def triple(v: Any) -> tuple[int, ...] | None:
        t = ints(v, 3) if is_int(v) else ints(v)
        return None if t is None or len(t) not in (1, 3) else t * (3 // len(t))

    if padding == "valid":
        padding = 0
    elif padding == "same":
        d = triple(dilation)
        totals = None if d is None else [di * (k - 1) for k, di in zip(kernel, d)]
        if totals is None or any(t % 2 for t in totals):
            return None
        padding = tuple(t // 2 for t in totals)
    attrs = {"stride": triple(stride), "padding": triple(padding), "dilation": triple(dilation)}
    if any(v is None for v in attrs.values()) or not is_int(groups):
        return None
    return {**attrs, "groups": groups}


def same_pads(kernel: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """``padding='same'`` as ``F.pad``'s pads (last axis first, ``(begin, end)`` each): PyTorch puts the odd extra
    row at the end of an axis (``Conv3d((2, 3, 3), padding='same')`` pads its depth by ``(0, 1)``)."""
    totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
    return tuple(p for t in reversed(totals) for p in (t // 2, t - t // 2))


def conv_padding(padding: Any, kernel: Sequence[int], dilation: Sequence[int]) -> tuple[int, int, int, int] | None:
    """PyTorch conv padding (int, pair, 'same', 'valid') as ``(top, bottom, left, right)``."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":  # PyTorch puts the odd extra row/column at the bottom/right
        out = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    p = ints(padding, 2)
    return None if p is None else (p[0], p[0], p[1], p[1])


# --------------------------------------------------------------------------- ops both handler families make


def unsqueezed(x: Value, axis: int) -> Made:
    """``x.unsqueeze(axis)`` as a reshape that reads ``x``'s sizes at run time."""
    rank = len(x.shape)
    shape = tuple(((0, k),) for k in range(axis)) + (1,) + tuple(((0, k),) for k in range(axis, rank))
    return "reshape_dyn", [x, x], {"shape": shape}, {}, ""


def height_one(x: Value) -> Value | None:
    """The 4-D value ``x`` was flattened from, when ``x = flatten(y, 2, 3)`` of a ``y`` of height 1 (a 1-D conv's).

    A BatchNorm after it is per channel (axis 1), so it commutes with the flatten: normalising before, it meets
    the conv in ``bn_fold``."""
    p = x.producer
    if p is None or p.op != "flatten" or (p.attrs.get("start"), p.attrs.get("end")) != (2, 3):
        return None
    y = p.inputs[0]
    return y if len(y.shape) == 4 and y.shape[2] == 1 else None


def bn_params(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> dict:
    """BN parameters, cloned; ``affine=False`` means weight ones and bias zeros."""
    return {
        "mean": mean.detach().clone(),
        "var": var.detach().clone(),
        "weight": torch.ones_like(mean) if weight is None else weight.detach().clone(),
        "bias": torch.zeros_like(mean) if bias is None else bias.detach().clone(),
    }


def avg_pool(x: Value | None, kernel: Any, stride: Any, padding: Any, ceil_mode: Any, count_include_pad: Any, divisor: Any, spatial: int = 2) -> Made:
    """``avg_pool2d`` of a 4-d ``x`` (``nn.AvgPool2d``, ``F.avg_pool2d``), or ``avg_pool_nd`` over the last 1 or 3 axes
    (``spatial``) of a batched ``x`` (``nn.AvgPool1d``/``3d`` and their functions); no divisor override."""
    kernel = ints(kernel, spatial)
    stride = kernel if stride is None or stride == [] or stride == () else ints(stride, spatial)
    padding = ints(padding, spatial)
    if x is None or len(x.shape) != spatial + 2 or None in (kernel, stride, padding) or divisor is not None:
        return None
    attrs = {"kernel": kernel, "stride": stride, "padding": padding, "ceil_mode": bool(ceil_mode), "count_include_pad": bool(count_include_pad)}
    return ("avg_pool2d" if spatial == 2 else "avg_pool_nd"), [x], attrs, {}, ""


def global_mean(x: Value | None, output_size: Any, spatial: int = 2) -> Made:
    """An adaptive average pool over the last ``spatial`` axes: to size 1 a ``mean`` over them, else (2-D only)
    ``adaptive_avg_pool2d``."""
    if x is None or len(x.shape) < spatial + 1:
        return None
    if output_size == 1 or (isinstance(output_size, (tuple, list)) and list(output_size) == [1] * spatial):
        nd = len(x.shape)
        return "mean", [x], {"dims": tuple(range(nd - spatial, nd)), "keepdim": True}, {}, ""
    return adaptive_pool("adaptive_avg_pool2d", x, output_size) if spatial == 2 else None


def adaptive_pool(op: str, x: Value | None, output_size: Any) -> Made:
    """``adaptive_avg_pool2d``/``adaptive_max_pool2d`` of a 3-d or 4-d ``x`` to ``(h, w)`` (None keeps a size)."""
    size = (output_size, output_size) if is_int(output_size) or output_size is None else output_size
    if x is None or len(x.shape) not in (3, 4) or not isinstance(size, (tuple, list)) or len(size) != 2:
        return None
    if not all(s is None or is_int(s) for s in size):
        return None
    return op, [x], {"output_size": tuple(size)}, {}, ""


def im2col(x: Value | None, kernel: Any, dilation: Any, padding: Any, stride: Any, output_size: Any = None) -> Made:
    """``unfold`` of a 4-d ``x`` (``F.unfold``, ``nn.Unfold``), or with an ``output_size`` ``fold`` of a 3-d ``x``
    (``F.fold``, ``nn.Fold``); each argument an int or a pair.  A size read from a tensor at run time stays a call."""
    attrs = {"kernel": ints(kernel, 2), "dilation": ints(dilation, 2), "padding": ints(padding, 2), "stride": ints(stride, 2)}
    if output_size is not None:
        attrs["output_size"] = ints(output_size, 2)
    if x is None or len(x.shape) != (4 if output_size is None else 3) or None in attrs.values():
        return None
    return ("unfold" if output_size is None else "fold"), [x], attrs, {}, ""


def vector_norm(x: Value | None, p: Any, dim: Any, keepdim: Any) -> Made:
    """``norm`` of ``x`` over ``dim`` (an int, ints, or None for all axes), for ``torch.norm``, ``x.norm``,
    ``torch.linalg.vector_norm`` (``p="fro"`` is 2); ``p`` a positive number or infinity."""
    p = 2.0 if p == "fro" else p
    if x is None or not isinstance(keepdim, bool) or isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
        return None
    dims = tuple(range(len(x.shape))) if dim is None else (dim,) if is_int(dim) else ints(dim)
    return None if not dims else ("norm", [x], {"p": float(p), "dims": dims, "keepdim": keepdim}, {}, "")


def population_variance(add: Callable[[str, list[Value], dict], Value], x: Value | None, dim: Any, correction: Any, keepdim: Any) -> Made:
    """``x.var(dim, unbiased=False)`` (``correction=0``) over ``dim`` (an int, ints, or None for all axes) as the ops it
    is: ``mean((x - mean(x, dim, keepdim=True)) ** 2, dim)`` (Restormer's and hand-written LayerNorms); ``add`` makes
    a node in the builder.  A sample variance (``correction=1``, the default) divides by a count read from the
    shape, which the graph would fix at the example: left a call."""
    if x is None or not (is_int(correction) and correction == 0) or not isinstance(keepdim, bool):
        return None
    dims = tuple(range(len(x.shape))) if dim is None else (dim,) if is_int(dim) else ints(dim)
    if not dims:
        return None
    centred = add("broadcast_sub", [x, add("mean", [x], {"dims": dims, "keepdim": True})], {})
    return "mean", [add("pow", [centred], {"exponent": 2.0})], {"dims": dims, "keepdim": keepdim}, {}, ""


def max_pool(x: Value | None, kernel: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: Any, return_indices: Any) -> Made:
    """``max_pool2d`` of a 4-d ``x``, for ``nn.MaxPool2d`` and ``F.max_pool2d`` (values only)."""
    kernel = ints(kernel, 2)
    stride = kernel if stride is None or stride == [] or stride == () else ints(stride, 2)
    padding, dilation = ints(padding, 2), ints(dilation, 2)
    if x is None or len(x.shape) != 4 or None in (kernel, stride, padding, dilation) or return_indices is not False:
        return None
    attrs = {"kernel": kernel, "stride": stride, "padding": padding, "dilation": dilation, "ceil_mode": bool(ceil_mode)}
    return "max_pool2d", [x], attrs, {}, ""


_MODES = ("nearest", "nearest-exact", "bilinear")


def leaky_relu_made(x: Value | None, slope: Any, source: str | None) -> Made:
    """``leaky_relu`` of ``x``; with slope 1 (VanillaNet's activation at the end of training, ``act_learn = 1``) the
    identity, which lets the layers either side of it merge."""
    if x is None or isinstance(slope, bool) or not isinstance(slope, (int, float)):
        return None
    return ("identity", [x], {}, {}, source) if slope == 1 else ("leaky_relu", [x], {"negative_slope": float(slope)}, {}, source)


def prelu_made(x: Value | None, weight: torch.Tensor, source: str | None) -> Made:
    """``prelu`` of ``x``: one slope for every element, or one per channel of axis 1 (as ``F.prelu`` reads it)."""
    if x is None or x.shape is None or weight.dim() != 1:
        return None
    if weight.numel() != 1 and (len(x.shape) < 2 or x.shape[1] != weight.numel()):
        return None
    return "prelu", [x], {}, {"weight": weight}, source


def interpolate(x: Value | None, size: Any, scale: Any, mode: Any, align_corners: Any, recompute: Any = None, antialias: Any = False) -> Made:
    """``F.interpolate``/``nn.Upsample`` of a 4-d ``x`` (nearest, nearest-exact, bilinear), or a 3-d or 5-d one
    (nearest, nearest-exact: a 1-d signal's, a volume's), as ``interpolate``."""
    rank = len(x.shape) if x is not None and x.shape is not None else 0
    if rank != 4 and not (rank in (3, 5) and mode in ("nearest", "nearest-exact")):
        return None
    if mode not in _MODES or antialias or recompute or (size is None) == (scale is None):
        return None
    if size is not None:
        size = ints(size, rank - 2)
        if size is None:
            return None
    else:
        axes = (scale,) * (rank - 2) if isinstance(scale, (int, float)) else scale
        if not isinstance(axes, (tuple, list)) or len(axes) != rank - 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in axes):
            return None
        scale = tuple(float(v) for v in axes)
    if align_corners is not None and (mode != "bilinear" or not isinstance(align_corners, bool)):
        return None
    attrs = {"size": size, "scale": scale, "mode": mode, "align_corners": align_corners}
    return "interpolate", [x], attrs, {}, ""


def pad_nd(x: Value | None, pads: Any, mode: Any, value: Any) -> Made:
    """``F.pad`` beyond what ``pad`` says (more than two axes, or another mode) as ``pad_nd``."""
    pads = ints(pads)
    value = 0.0 if value is None else value
    if x is None or pads is None or len(pads) % 2 or len(pads) // 2 > len(x.shape) or mode not in ("constant", "reflect", "replicate", "circular"):
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return "pad_nd", [x], {"pads": pads, "mode": mode, "value": float(value)}, {}, ""


# --------------------------------------------------------------------------- constants read through a call

# Calls on constants only that the front end carries as opaque nodes without inputs
# (``self.weight[:, None, None]``, ``self.bias.view(1, -1, 1, 1)``): deterministic, safe to run once here.
_CONST_CALLS = {
    ("call_function", operator.getitem),
    ("call_function", torch.reshape),
    ("call_function", torch.unsqueeze),
    ("call_function", torch.squeeze),
    ("call_function", torch.neg),
    ("call_function", operator.neg),
    *(("call_method", m) for m in ("view", "reshape", "unsqueeze", "squeeze", "permute", "transpose", "flatten", "t", "contiguous", "expand", "neg")),
}


def constant(x: Any) -> "Const | None":
    """``x`` as a constant: a :class:`Const`, or a value computed from constants only, by calls in ``_CONST_CALLS``
    (``self.layer_scale.unsqueeze(-1).unsqueeze(-1)``: each call an opaque node reading the one before) or by
    layout ops (``table[index].view(...).permute(2, 0, 1)``: the view and permute became ops)."""
    if isinstance(x, Const):
        return x
    n = x.producer if isinstance(x, Value) else None
    if n is None:
        return None
    if n.op == "opaque":
        fn = n.attrs["fn"]
        try:
            if not isinstance(fn, FnCall) or (fn.kind, fn.target) not in _CONST_CALLS:
                return None
        except TypeError:  # an unhashable target
            return None
    elif n.op != "constant" and op_def(n.op).kind != "layout" and n.op != "identity":
        return None
    ins = [constant(i) for i in n.inputs]
    if any(c is None for c in ins):
        return None
    with torch.no_grad():
        tensors = [c.tensor for c in ins]
        t = n.attrs["fn"](*tensors) if n.op == "opaque" else op_def(n.op)(tensors, n.attrs, n.params)
    path = next((c.path for c in ins if c.path), n.source)
    return Const(t.detach().clone(), path, any(c.plain for c in ins)) if torch.is_tensor(t) else None


def as_value(b: Any, x: Any) -> Value | None:
    """``x`` as an activation for an op that reads values: itself, or for a constant (see :func:`constant`) a
    ``constant`` node added to the builder ``b`` (a carried call it replaces is left unread and dropped)."""
    c = constant(x)
    if c is None:
        return shaped(x)
    return b.add("constant", [], constant_attrs(c), {"value": c.tensor}, c.path)


def concat_made(xs: list[Value], dim: int, source: str | None) -> Made:
    """``torch.cat(xs, dim)``.  A 1-D operand of shape ``(0,)`` is skipped, as torch skips it (DINO's
    ``output = torch.empty(0)``, grown by ``torch.cat((output, out))``); its rank is no axis to count ``dim`` by, and a
    concat of mixed ranks is no valid ONNX.  Only one made from no input: ``h[1:]`` of a batch of one is ``(0,)`` at
    the example and not at batch 3 (a review found it dropped)."""
    kept = [x for x in xs if tuple(x.shape or ()) != (0,) or not _made_of_no_input(x)] or xs
    if len(kept) == 1:
        return "identity", kept, {}, {}, source
    return "concat", kept, {"axis": dim % len(kept[0].shape)}, {}, source


def _made_of_no_input(v: Value) -> bool:
    """Whether ``v`` is computed from no input of the graph (a factory's or a constant's value): its shape is the same
    for every input."""
    return all(u.producer is not None for u in upstream(v))


def scalar_axis(shape: tuple[int, ...]) -> int:
    """The axis a scalar multiply is written along: channels of an image, else the last (feature) axis."""
    return 1 if len(shape) == 4 else len(shape) - 1


def channel_axis(const_shape: tuple[int, ...], x_shape: tuple[int, ...]) -> int | None:
    """The axis of ``x`` along which a constant of ``const_shape`` varies, if it is a per-channel vector.

    Both front ends use it: they must agree on which multiplies are a ``scale``.
    """
    if len(const_shape) > len(x_shape):
        return None
    offset = len(x_shape) - len(const_shape)
    varying = [offset + j for j, s in enumerate(const_shape) if s != 1]
    if len(varying) != 1 or const_shape[varying[0] - offset] != x_shape[varying[0]]:
        return None
    return varying[0]


# SELU's constants (Klambauer et al.), as ATen's selu passes them to elu.
SELU_ALPHA, SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


def elu_made(x: Value | None, kind: str, alpha: Any, source: str | None) -> Made:
    """``elu`` of ``x`` for ``nn.ELU``/``F.elu`` (``kind`` ``"elu"``), ``SELU`` and ``CELU``; None where ``alpha``
    is not a number."""
    if x is None or not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or (kind == "celu" and not alpha):
        return None
    if kind == "selu":
        alpha, scale, input_scale = SELU_ALPHA, SELU_SCALE, 1.0
    else:  # CELU(x) = ELU(x / alpha) * alpha on the negative side: ATen's elu with input scale 1 / alpha
        alpha, scale, input_scale = float(alpha), 1.0, 1.0 / alpha if kind == "celu" else 1.0
    return "elu", [x], {"alpha": alpha, "scale": scale, "input_scale": input_scale}, {}, source
