"""Handlers for functions and methods (``F.conv2d``, ``torch.cat``, ``x.view``, ``a + b``, ...): each maps a call to one op.

A handler gets ``(builder, fx node, target, args, kwargs)`` and returns
``(op, inputs, attrs, params, source)``, or None to leave the call opaque
(see :mod:`repalgebra.frontend.builder`).  Weights read with ``get_attr``
arrive as :class:`~repalgebra.frontend.builder.Const`; sizes read from shapes
as :class:`~repalgebra.frontend.calls.SymExpr`.  The table
:data:`FUNCTION_HANDLERS` at the bottom is keyed by the function, or by
``("method", name)`` for a method call.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx

from repalgebra.frontend.args import REQ, avg_pool, bind, bn_params, conv_padding, global_mean, ints, is_int, shaped, single
from repalgebra.frontend.builder import Builder, Const, Made
from repalgebra.frontend.calls import SymExpr
from repalgebra.ir import Value

# --------------------------------------------------------------------------- arithmetic


def _f_join(op: str) -> Callable[..., Made]:
    """``a + b`` / ``a - b`` of two activations of one shape; adding 0 is the identity."""

    def handler(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
        if kwargs or len(args) != 2:
            return None
        zero = [isinstance(a, (int, float)) and not isinstance(a, bool) and a == 0 for a in args]
        if zero[1] or (zero[0] and op == "add"):  # x + 0, 0 + x, x - 0 (an accumulator started at 0)
            x = shaped(args[1] if zero[0] else args[0])
            return None if x is None else ("identity", [x], {}, {}, "")
        x, y = shaped(args[0]), shaped(args[1])
        if x is None or y is None or x.shape != y.shape:
            return None
        return op, [x, y], {}, {}, ""

    return handler


def _f_mul(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``a * b``: ``mul`` of two activations; ``scale`` by a per-channel constant or a number."""
    if kwargs or len(args) != 2:
        return None
    x, c = args
    if not isinstance(x, Value):
        x, c = c, x
    if shaped(x) is None or not x.dtype.is_floating_point:
        return None
    if isinstance(c, Value):
        return "mul", [x, c], {}, {}, ""
    if isinstance(c, Const) and c.tensor.is_floating_point():
        shape = tuple(c.tensor.shape)
        if c.tensor.numel() == 1 and len(shape) <= len(x.shape):
            axis = _scalar_axis(x.shape)
            vec = c.tensor.reshape(()).expand(x.shape[axis]).clone()
        else:
            axis = _channel_axis(shape, x.shape)
            vec = None if axis is None else c.tensor.reshape(-1)
        if axis is None or len(shape) > len(x.shape):
            return None
        return "scale", [x], {"axis": axis}, {"scale": vec}, c.path
    if isinstance(c, (int, float)) and not isinstance(c, bool) and len(x.shape) >= 1:
        axis = _scalar_axis(x.shape)
        return "scale", [x], {"axis": axis}, {"scale": torch.full((x.shape[axis],), float(c), dtype=x.dtype)}, ""
    return None


def _scalar_axis(shape: tuple[int, ...]) -> int:
    """The axis a scalar multiply is written along: channels of an image, else the last (feature) axis."""
    return 1 if len(shape) == 4 else len(shape) - 1


def _channel_axis(const_shape: tuple[int, ...], x_shape: tuple[int, ...]) -> int | None:
    """The axis of ``x`` along which a constant of ``const_shape`` varies, if it is a per-channel vector."""
    if len(const_shape) > len(x_shape):
        return None
    offset = len(x_shape) - len(const_shape)
    varying = [offset + j for j, s in enumerate(const_shape) if s != 1]
    if len(varying) != 1 or const_shape[varying[0] - offset] != x_shape[varying[0]]:
        return None
    return varying[0]


def _f_matmul(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    if kwargs or len(args) != 2 or shaped(args[0]) is None or shaped(args[1]) is None:
        return None
    return "matmul", list(args), {}, {}, ""


# --------------------------------------------------------------------------- layout


def _f_cat(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("tensors", REQ), ("dim", 0)], args, kwargs)
    if a is None or not isinstance(a["tensors"], (list, tuple)) or not is_int(a["dim"]):
        return None
    xs = [shaped(t) for t in a["tensors"]]
    if not xs or any(x is None for x in xs):
        return None
    return "concat", xs, {"axis": a["dim"] % len(xs[0].shape)}, {}, ""


def _f_flatten(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("start_dim", 0), ("end_dim", -1)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not (is_int(a["start_dim"]) and is_int(a["end_dim"])):
        return None
    return "flatten", [a["input"]], {"start": a["start_dim"], "end": a["end_dim"]}, {}, ""


def _dims_arg(args: tuple, kwargs: dict, *names: str) -> tuple[Value | None, tuple[int, ...] | None]:
    """``x.f(1, 2, 3)``, ``x.f((1, 2, 3))`` or ``torch.f(x, dims)``: the input and the int tuple."""
    if not args:
        return None, None
    x, rest = shaped(args[0]), args[1:]
    for k in names:
        if k in kwargs:
            rest = (kwargs[k],) + rest
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = tuple(rest[0])
    if set(kwargs) - set(names):
        return None, None
    return x, ints(rest)


def _f_reshape(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``x.reshape(...)``/``x.view(...)``: ``reshape`` for constant sizes, ``reshape_dyn`` for sizes read from shapes."""
    if not args or shaped(args[0]) is None or set(kwargs) - {"shape", "size"}:
        return None
    x, rest = args[0], args[1:] + tuple(kwargs.values())
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = tuple(rest[0])
    if not rest:
        return None
    if all(is_int(e) for e in rest):
        return "reshape", [x], {"shape": tuple(rest)}, {}, ""
    refs: list[Value] = []
    entries = []
    for e in rest:
        factors = _size_factors(e)
        if factors is None:
            return None
        entry = []
        for f in factors:
            if isinstance(f, tuple):
                v, axis = f
                if not any(r is v for r in refs):
                    refs.append(v)
                f = (next(k for k, r in enumerate(refs) if r is v), axis % len(v.shape))
            entry.append(f)
        entries.append(entry[0] if len(entry) == 1 and is_int(entry[0]) else tuple(entry))
    return "reshape_dyn", [x, *refs], {"shape": tuple(entries)}, {}, ""


def _size_factors(e: Any) -> list | None:
    """A size as a product of ints and ``(value, axis)`` sizes read from shapes, or None."""
    if is_int(e):
        return [e]
    if not isinstance(e, SymExpr):
        return None
    t, a = e.target, e.args
    if t is operator.getitem and len(a) == 2 and is_int(a[1]) and isinstance(a[0], SymExpr):
        inner = a[0]
        if inner.target is getattr and inner.args[1:] == ("shape",) and shaped(inner.args[0]) is not None:
            return [(inner.args[0], a[1])]
        if inner.target == "size" and len(inner.args) == 1 and not inner.kwargs and shaped(inner.args[0]) is not None:
            return [(inner.args[0], a[1])]
    if t == "size" and len(a) == 2 and is_int(a[1]) and not e.kwargs and shaped(a[0]) is not None:
        return [(a[0], a[1])]
    if t is operator.mul and len(a) == 2 and not e.kwargs:
        left, right = _size_factors(a[0]), _size_factors(a[1])
        return None if left is None or right is None else left + right
    return None


def _f_reshape_as(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    if kwargs or len(args) != 2 or shaped(args[0]) is None or shaped(args[1]) is None:
        return None
    shape = tuple(((0, k),) for k in range(len(args[1].shape)))
    return "reshape_dyn", list(args), {"shape": shape}, {}, ""


def _f_getitem(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    """``x[i]`` with an int ``i``: select along axis 0 (other indexing stays opaque)."""
    if kwargs or len(args) != 2 or shaped(args[0]) is None or not is_int(args[1]):
        return None
    return "select", [args[0]], {"axis": 0, "index": args[1]}, {}, ""


def _f_select(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("dim", REQ), ("index", REQ)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not (is_int(a["dim"]) and is_int(a["index"])):
        return None
    return "select", [a["input"]], {"axis": a["dim"], "index": a["index"]}, {}, ""


def _f_permute(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    x, dims = _dims_arg(args, kwargs, "dims")
    return None if x is None or dims is None else ("permute", [x], {"dims": dims}, {}, "")


def _f_transpose(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("dim0", REQ), ("dim1", REQ)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not (is_int(a["dim0"]) and is_int(a["dim1"])):
        return None
    return "transpose", [a["input"]], {"dim0": a["dim0"], "dim1": a["dim1"]}, {}, ""


def _f_contiguous(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    x = single(args, kwargs)
    return None if x is None else ("identity", [x], {}, {}, "")


# --------------------------------------------------------------------------- reductions and activations


def _f_mean(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("dim", None), ("keepdim", False)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not isinstance(a["keepdim"], bool):
        return None
    dims = (a["dim"],) if is_int(a["dim"]) else ints(a["dim"])
    return None if not dims else ("mean", [a["input"]], {"dims": dims, "keepdim": a["keepdim"]}, {}, "")


def _f_softmax(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("dim", None), ("_stacklevel", 3), ("dtype", None)], args, kwargs)
    if a is None or shaped(a["input"]) is None or not is_int(a["dim"]) or a["dtype"] is not None:
        return None
    return "softmax", [a["input"]], {"axis": a["dim"]}, {}, ""


def _f_unary(op: str, *extra: tuple[str, Any]) -> Callable[..., Made]:
    def handler(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
        a = bind([("input", REQ), *extra], args, kwargs)
        if a is None or shaped(a["input"]) is None:
            return None
        attrs = {"approximate": a["approximate"]} if op == "gelu" else {}
        return op, [a["input"]], attrs, {}, ""

    return handler


def _f_identity_unless_training(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("p", 0.5), ("training", True), ("inplace", False)], args, kwargs)
    if a is None or shaped(a["input"]) is None or a["training"] is not False:
        return None
    return "identity", [a["input"]], {}, {}, ""


# --------------------------------------------------------------------------- layers as functions


def _const(x: Any) -> torch.Tensor | None:
    return x.tensor if isinstance(x, Const) else None


def _f_conv2d(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    spec = [("input", REQ), ("weight", REQ), ("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)]
    a = bind(spec, args, kwargs)
    if a is None or shaped(a["input"]) is None or len(a["input"].shape) != 4 or _const(a["weight"]) is None:
        return None
    w = _const(a["weight"])
    if a["bias"] is not None and _const(a["bias"]) is None:
        return None
    stride, dilation = ints(a["stride"], 2), ints(a["dilation"], 2)
    if stride is None or dilation is None or w.dim() != 4 or not is_int(a["groups"]):
        return None
    padding = conv_padding(a["padding"], w.shape[2:], dilation)
    if padding is None:
        return None
    params = {"weight": w} if a["bias"] is None else {"weight": w, "bias": _const(a["bias"])}
    attrs = {"stride": stride, "padding": padding, "dilation": dilation, "groups": a["groups"]}
    return "conv2d", [a["input"]], attrs, params, a["weight"].path.rpartition(".")[0]


def _f_pad(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("pad", REQ), ("mode", "constant"), ("value", None)], args, kwargs)
    if a is None or shaped(a["input"]) is None or a["mode"] != "constant":
        return None
    pad = ints(a["pad"])
    value = 0.0 if a["value"] is None else a["value"]
    if pad is None or len(pad) not in (2, 4) or not isinstance(value, (int, float)) or len(a["input"].shape) < 2:
        return None
    left, right, top, bottom = (*pad, 0, 0)[:4]
    return "pad", [a["input"]], {"pads": (top, bottom, left, right), "value": float(value)}, {}, ""


def _f_batch_norm(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    spec = [("input", REQ), ("running_mean", REQ), ("running_var", REQ), ("weight", None), ("bias", None), ("training", False), ("momentum", 0.1), ("eps", 1e-5)]
    a = bind(spec, args, kwargs)
    if a is None or shaped(a["input"]) is None:
        return None
    if a["training"] is not False:
        b.leave_bn(n, "F.batch_norm(training=True): it normalises with batch statistics")
        return None
    mean, var = _const(a["running_mean"]), _const(a["running_var"])
    if mean is None or var is None or not isinstance(a["eps"], (int, float)):
        return None
    if any(a[k] is not None and _const(a[k]) is None for k in ("weight", "bias")):
        return None
    params = bn_params(mean, var, _const(a["weight"]), _const(a["bias"]))
    return "batch_norm", [a["input"]], {"eps": float(a["eps"])}, params, a["running_mean"].path.rpartition(".")[0]


def _f_linear(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("weight", REQ), ("bias", None)], args, kwargs)
    if a is None or shaped(a["input"]) is None or _const(a["weight"]) is None:
        return None
    if a["bias"] is not None and _const(a["bias"]) is None:
        return None
    params = {"weight": _const(a["weight"])}
    if a["bias"] is not None:
        params["bias"] = _const(a["bias"])
    return "linear", [a["input"]], {}, params, a["weight"].path.rpartition(".")[0]


def _f_layer_norm(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("normalized_shape", REQ), ("weight", None), ("bias", None), ("eps", 1e-5)], args, kwargs)
    if a is None or shaped(a["input"]) is None or ints(a["normalized_shape"]) is None or not isinstance(a["eps"], (int, float)):
        return None
    if any(a[k] is not None and _const(a[k]) is None for k in ("weight", "bias")):
        return None
    params = {k: _const(a[k]) for k in ("weight", "bias") if a[k] is not None}
    return "layer_norm", [a["input"]], {"normalized_shape": ints(a["normalized_shape"]), "eps": float(a["eps"])}, params, ""


def _f_avg_pool(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    spec = [("input", REQ), ("kernel_size", REQ), ("stride", None), ("padding", 0), ("ceil_mode", False), ("count_include_pad", True), ("divisor_override", None)]
    a = bind(spec, args, kwargs)
    if a is None:
        return None
    return avg_pool(shaped(a["input"]), a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"], a["divisor_override"])


def _f_adaptive_avg(b: Builder, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> Made:
    a = bind([("input", REQ), ("output_size", REQ)], args, kwargs)
    return None if a is None else global_mean(shaped(a["input"]), a["output_size"])


# --------------------------------------------------------------------------- the table


FUNCTION_HANDLERS: dict[Any, Callable[..., Made]] = {}
TRUSTED_FUNCTIONS = (F.batch_norm,)


def _register(handler: Callable[..., Made], *targets: Any) -> None:
    for t in targets:
        FUNCTION_HANDLERS[t] = handler


_register(_f_join("add"), operator.add, torch.add, ("method", "add"))
_register(_f_join("sub"), operator.sub, torch.sub, ("method", "sub"))
_register(_f_mul, operator.mul, torch.mul, ("method", "mul"))
_register(_f_matmul, operator.matmul, torch.matmul, ("method", "matmul"))
_register(_f_cat, torch.cat, torch.concat, torch.concatenate)
_register(_f_flatten, torch.flatten, ("method", "flatten"))
_register(_f_reshape, torch.reshape, ("method", "reshape"), ("method", "view"))
_register(_f_reshape_as, ("method", "reshape_as"), ("method", "view_as"))
_register(_f_permute, torch.permute, ("method", "permute"))
_register(_f_getitem, operator.getitem)
_register(_f_select, torch.select, ("method", "select"))
_register(_f_transpose, torch.transpose, ("method", "transpose"))
_register(_f_mean, torch.mean, ("method", "mean"))
_register(_f_softmax, F.softmax, torch.softmax, ("method", "softmax"))
_register(_f_unary("relu", ("inplace", False)), F.relu)
_register(_f_unary("relu"), torch.relu, ("method", "relu"))
_register(_f_unary("gelu", ("approximate", "none")), F.gelu)
_register(_f_unary("sigmoid"), torch.sigmoid, F.sigmoid, ("method", "sigmoid"))
_register(_f_identity_unless_training, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)
_register(_f_conv2d, F.conv2d, torch.conv2d)
_register(_f_pad, F.pad)
_register(_f_batch_norm, F.batch_norm)
_register(_f_linear, F.linear)
_register(_f_layer_norm, F.layer_norm)
_register(_f_avg_pool, F.avg_pool2d)
_register(_f_adaptive_avg, F.adaptive_avg_pool2d)
_register(_f_contiguous, ("method", "contiguous"))
