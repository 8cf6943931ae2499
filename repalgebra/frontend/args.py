"""What the module and function handlers share: reading call arguments, and the ops both make.

A handler's arguments arrive with fx nodes replaced by ``Value``s,
:class:`~repalgebra.frontend.builder.Const`s, shape expressions and literals.
:func:`bind` matches them to a signature, :func:`shaped`, :func:`ints` and
:func:`conv_padding` read them as the op table wants them.  :func:`bn_params`,
:func:`avg_pool` and :func:`global_mean` build the ops that both a module
(``nn.AvgPool2d``) and its function (``F.avg_pool2d``) become.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from repalgebra.frontend.builder import Made
from repalgebra.ir import Value


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


def bn_params(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> dict:
    """BN parameters, cloned; ``affine=False`` means weight ones and bias zeros."""
    return {
        "mean": mean.detach().clone(),
        "var": var.detach().clone(),
        "weight": torch.ones_like(mean) if weight is None else weight.detach().clone(),
        "bias": torch.zeros_like(mean) if bias is None else bias.detach().clone(),
    }


def avg_pool(x: Value | None, kernel: Any, stride: Any, padding: Any, ceil_mode: Any, count_include_pad: Any, divisor: Any) -> Made:
    """``avg_pool2d`` of a 4-d ``x``, for ``nn.AvgPool2d`` and ``F.avg_pool2d`` (no divisor override)."""
    kernel = ints(kernel, 2)
    stride = kernel if stride is None or stride == [] else ints(stride, 2)
    padding = ints(padding, 2)
    if x is None or len(x.shape) != 4 or None in (kernel, stride, padding) or divisor is not None:
        return None
    attrs = {"kernel": kernel, "stride": stride, "padding": padding, "ceil_mode": bool(ceil_mode), "count_include_pad": bool(count_include_pad)}
    return "avg_pool2d", [x], attrs, {}, ""


def global_mean(x: Value | None, output_size: Any) -> Made:
    """An adaptive average pool to size 1 as a ``mean`` over the last two axes."""
    if x is None or len(x.shape) < 3 or output_size not in (1, (1, 1), [1, 1]):
        return None
    nd = len(x.shape)
    return "mean", [x], {"dims": (nd - 2, nd - 1), "keepdim": True}, {}, ""

