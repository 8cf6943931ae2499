"""The op table: the one place where an op is defined.

Each entry (:class:`OpDef`) gives the op's attribute schema with defaults, its
parameter names, its *kind* (``linear`` ops form the foldable regions,
``layout`` ops move elements around, ``nonlinear`` and ``opaque`` ops end a
region), and its reference semantics through :mod:`torch.nn.functional`.
Shape inference runs the reference semantics on ``meta`` tensors, so an op's
shape rule can never disagree with what it computes.  Back ends add their
lowerings to the same entry (``OpDef.lowerings``).

Adding an op is adding one decorated function here::

    @op("relu", kind="nonlinear")
    def relu(x):
        return F.relu(x)

Conventions: conv/pad paddings are 4-tuples ``(top, bottom, left, right)``;
``stride``/``dilation``/``kernel`` are ``(h, w)`` pairs; the channel axis is 1.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

REQUIRED = object()  # attribute default meaning "must be given"
KINDS = ("linear", "layout", "nonlinear", "opaque")


@dataclass(frozen=True)
class OpDef:
    """An entry of the op table."""

    name: str
    run: Callable[..., torch.Tensor]
    attrs: Mapping[str, Any]
    params: tuple[str, ...]
    optional_params: tuple[str, ...]
    kind: str
    variadic: bool = False
    shape: Callable[..., tuple[tuple[int, ...] | None, torch.dtype | None]] | None = None
    lowerings: dict[str, Callable[..., Any]] = field(default_factory=dict)

    @property
    def linear(self) -> bool:
        return self.kind == "linear"

    def complete_attrs(self, attrs: dict[str, Any], source: str = "") -> dict[str, Any]:
        """Fill defaults, reject unknown or missing attributes, normalise lists to tuples."""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise TypeError(f"{self.name} at {source or '<graph>'}: unknown attributes {sorted(unknown)}")
        out = {}
        for k, default in self.attrs.items():
            v = attrs.get(k, default)
            if v is REQUIRED:
                raise TypeError(f"{self.name} at {source or '<graph>'}: missing attribute {k!r}")
            out[k] = tuple(v) if isinstance(v, list) else v
        return out

    def infer(self, node) -> tuple[tuple[int, ...] | None, torch.dtype | None]:
        """Output shape and dtype of ``node`` (meta-tensor execution unless a rule is given)."""
        if self.shape is not None:
            return self.shape(node)
        if any(i.shape is None for i in node.inputs):
            return None, node.inputs[0].dtype if node.inputs else None
        dtype = next((i.dtype for i in node.inputs if i.dtype is not None and i.dtype.is_floating_point), torch.float32)
        # The result depends only on these; meta execution is slow (a BN takes milliseconds), so remember it.
        key = (self.name, tuple((i.shape, i.dtype) for i in node.inputs), tuple(node.attrs.items()), tuple((k, p.shape) for k, p in node.params.items()))
        try:
            return _INFERRED[key]
        except (KeyError, TypeError):  # TypeError: an unhashable attribute, not cached
            pass
        ins = [torch.empty(i.shape, dtype=i.dtype or dtype, device="meta") for i in node.inputs]
        params = {k: torch.empty(p.shape, dtype=dtype, device="meta") for k, p in node.params.items()}
        try:
            out = self.run(*ins, **node.attrs, **params)
        except Exception as e:  # a shape error names the node, not a torch internals line
            shapes = [i.shape for i in node.inputs]
            raise ValueError(f"{self.name} at {node.source or '<graph>'}: cannot apply to input shapes {shapes}: {e}") from e
        result = tuple(out.shape), out.dtype
        try:
            if len(_INFERRED) < 100_000:
                _INFERRED[key] = result
        except TypeError:
            pass
        return result

    def __call__(self, inputs: Sequence[torch.Tensor], attrs: Mapping[str, Any], params: Mapping[str, torch.Tensor]):
        """Reference semantics: run the op on real tensors (params cast to the input dtype)."""
        ref = next((t for t in inputs if torch.is_tensor(t) and t.is_floating_point()), None)
        if ref is not None:
            params = {k: p.to(dtype=ref.dtype, device=ref.device) for k, p in params.items()}
        return self.run(*inputs, **attrs, **params)


OPS: dict[str, OpDef] = {}
_INFERRED: dict[tuple, tuple[tuple[int, ...], torch.dtype]] = {}  # shape inference memo (OpDef.infer)


def op(name: str, *, kind: str, variadic: bool = False, shape=None):
    """Register ``fn`` as op ``name``.

    ``fn``'s positional parameters are the op's inputs; keyword-only parameters
    with a tensor meaning (listed in ``params``) are its parameters; the other
    keyword-only parameters are attributes, with their defaults.
    """
    assert kind in KINDS, kind

    def register(fn):
        sig = inspect.signature(fn)
        attrs, params, optional = {}, [], []
        for p in sig.parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            if p.annotation in ("Tensor", torch.Tensor):
                params.append(p.name)
            elif p.annotation in ("Tensor | None", "Optional[Tensor]"):
                optional.append(p.name)
            else:
                attrs[p.name] = REQUIRED if p.default is inspect.Parameter.empty else p.default
        if name in OPS:
            raise ValueError(f"op {name!r} registered twice")
        OPS[name] = OpDef(name, fn, attrs, tuple(params), tuple(optional), kind, variadic, shape)
        return fn

    return register


def op_def(name: str) -> OpDef:
    """The table entry for ``name``; a clear error for unknown ops."""
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; known ops: {', '.join(sorted(OPS))}") from None


Tensor = torch.Tensor


def _channel_view(p: Tensor, x: Tensor, axis: int) -> Tensor:
    """Reshape a per-channel vector to broadcast along ``axis`` of ``x``."""
    axis = axis % x.dim()
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


# --------------------------------------------------------------------------- linear ops


@op("conv2d", kind="linear")
def conv2d(
    x,
    *,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=(1, 1),
    padding=(0, 0, 0, 0),
    dilation=(1, 1),
    groups=1,
):
    """2-D convolution with zero padding ``(top, bottom, left, right)``."""
    top, bottom, left, right = padding
    if top == bottom and left == right:
        return F.conv2d(x, weight, bias, stride, (top, left), dilation, groups)
    return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride, 0, dilation, groups)


@op("batch_norm", kind="linear")
def batch_norm(x, *, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps=1e-5):
    """Eval-mode batch norm over axis 1: ``(x - mean) / sqrt(var + eps) * weight + bias``."""
    return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)


@op("identity", kind="linear")
def identity(x):
    """``x``."""
    return x


@op("add", kind="linear")
def add(a, b):
    """``a + b`` (same shapes)."""
    return a + b


@op("sub", kind="linear")
def sub(a, b):
    """``a - b`` (same shapes)."""
    return a - b


@op("scale", kind="linear")
def scale(x, *, scale: Tensor, axis=1):
    """Per-channel multiply by a constant (layer scale): ``x * scale[c]`` along ``axis``."""
    return x * _channel_view(scale, x, axis)


@op("pad", kind="linear")
def pad(x, *, pads=REQUIRED, value=0.0):
    """Constant padding of the last two axes by ``(top, bottom, left, right)`` (negative crops)."""
    top, bottom, left, right = pads
    return F.pad(x, (left, right, top, bottom), value=value)


@op("avg_pool2d", kind="linear")
def avg_pool2d(x, *, kernel=REQUIRED, stride=REQUIRED, padding=(0, 0), count_include_pad=True, ceil_mode=False):
    """Average pooling; ``padding`` is symmetric ``(h, w)`` as in PyTorch."""
    return F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad)


@op("concat", kind="linear", variadic=True)
def concat(*xs, axis=1):
    """Concatenation along ``axis``."""
    return torch.cat(xs, dim=axis)


@op("linear", kind="linear")
def linear(x, *, weight: Tensor, bias: Tensor | None = None):
    """``x @ weight.T + bias`` over the last axis."""
    return F.linear(x, weight, bias)


# --------------------------------------------------------------------------- layout ops


@op("reshape", kind="layout")
def reshape(x, *, shape=REQUIRED):
    """Reshape; ``-1`` may stand for one axis."""
    return x.reshape(shape)


@op("flatten", kind="layout")
def flatten(x, *, start=1, end=-1):
    """Flatten axes ``start..end``."""
    return torch.flatten(x, start, end)


@op("permute", kind="layout")
def permute(x, *, dims=REQUIRED):
    """Permute axes."""
    return x.permute(dims)


@op("transpose", kind="layout")
def transpose(x, *, dim0=REQUIRED, dim1=REQUIRED):
    """Swap two axes."""
    return x.transpose(dim0, dim1)


@op("select", kind="layout")
def select(x, *, axis=0, index=REQUIRED):
    """``x[index]`` along ``axis``, which disappears (``q, k, v = qkv[0], qkv[1], qkv[2]``)."""
    return x.select(axis, index)


# --------------------------------------------------------------------------- non-linear ops


@op("relu", kind="nonlinear")
def relu(x):
    """``max(x, 0)``."""
    return F.relu(x)


@op("gelu", kind="nonlinear")
def gelu(x, *, approximate="none"):
    """Gaussian error linear unit."""
    return F.gelu(x, approximate=approximate)


@op("sigmoid", kind="nonlinear")
def sigmoid(x):
    """Logistic sigmoid."""
    return torch.sigmoid(x)


@op("mul", kind="nonlinear")
def mul(a, b):
    """Element-wise product of two values (broadcasting)."""
    return a * b


@op("matmul", kind="nonlinear")
def matmul(a, b):
    """Batched matrix product."""
    return torch.matmul(a, b)


@op("softmax", kind="nonlinear")
def softmax(x, *, axis=-1):
    """Softmax along ``axis``."""
    return F.softmax(x, dim=axis)


@op("mean", kind="linear")
def mean(x, *, dims=REQUIRED, keepdim=False):
    """Mean over ``dims`` (global average pooling is ``dims=(2, 3)``)."""
    return x.mean(dim=dims, keepdim=keepdim)


@op("layer_norm", kind="nonlinear")
def layer_norm(x, *, weight: Tensor | None = None, bias: Tensor | None = None, normalized_shape=REQUIRED, eps=1e-5):
    """Layer norm over the trailing ``normalized_shape`` axes."""
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


# --------------------------------------------------------------------------- opaque


def _opaque_shape(node):
    return node.attrs["out_shape"], node.attrs["out_dtype"]


@op("opaque", kind="opaque", variadic=True, shape=_opaque_shape)
def opaque(*xs, fn=REQUIRED, kwargs=(), out_shape=None, out_dtype=None):
    """A module or function the front end does not know: carried through unchanged.

    ``fn`` is the callable (a copied submodule or a function), ``kwargs`` a
    tuple of ``(name, value)`` pairs of extra constant keyword arguments.
    """
    return fn(*xs, **dict(kwargs))


# --------------------------------------------------------------------------- added by the torch front end


def _dyn_size(entry, refs) -> int:
    if isinstance(entry, int):
        return entry
    size = 1
    for f in entry:
        size *= f if isinstance(f, int) else refs[f[0]].shape[f[1]]
    return size


@op("reshape_dyn", kind="layout", variadic=True)
def reshape_dyn(x, *refs, shape=REQUIRED):
    """Reshape to sizes read at run time, as in ``x.reshape(B, H * W, 64)`` with ``B, C, H, W = y.shape``.

    ``x`` is the first input; the others (``refs``) are read only for their
    shapes.  Each entry of ``shape`` is an int (``-1`` allowed) or a tuple of
    factors whose product is the size: an int, or ``(r, axis)`` for
    ``refs[r].shape[axis]``.  ``x.reshape_as(y)`` is ``shape=(((0, 0),), ((0, 1),), ...)``.
    """
    return x.reshape(tuple(_dyn_size(e, refs) for e in shape))
