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

from repalgebra.one_call import traced_as_one_call

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


@op("conv_transpose2d", kind="linear")
def conv_transpose2d(
    x,
    *,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=(1, 1),
    padding=(0, 0),
    output_padding=(0, 0),
    dilation=(1, 1),
    groups=1,
):
    """Transposed 2-D convolution (``nn.ConvTranspose2d``): each input pixel scatters ``weight`` of shape
    ``(C_in, C_out / groups, kh, kw)``; ``padding`` ``(h, w)`` crops both sides and ``output_padding`` adds rows
    and columns at the bottom and right, as in PyTorch."""
    return F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation)


@op("conv_transpose3d", kind="linear")
def conv_transpose3d(
    x,
    *,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=(1, 1, 1),
    padding=(0, 0, 0),
    output_padding=(0, 0, 0),
    dilation=(1, 1, 1),
    groups=1,
):
    """Transposed 3-D convolution (``nn.ConvTranspose3d``, a volume decoder's upsampling): ``conv_transpose2d``
    with a third spatial axis first; ``weight`` is ``(C_in, C_out / groups, kd, kh, kw)`` and each attribute is
    ``(d, h, w)``."""
    return F.conv_transpose3d(x, weight, bias, stride, padding, output_padding, groups, dilation)


# The transposed convs: their weight holds output channels in its second axis (``weight.shape[1] * groups``).
TRANSPOSED_CONVS = ("conv_transpose2d", "conv_transpose3d")


@op("conv3d", kind="linear")
def conv3d(x, *, weight: Tensor, bias: Tensor | None = None, stride=(1, 1, 1), padding=(0, 0, 0), dilation=(1, 1, 1), groups=1):
    """3-D convolution (video and volume models, ``nn.Conv3d``) with zero padding ``(d, h, w)`` on both sides of
    each axis, as in PyTorch; ``stride`` and ``dilation`` are ``(d, h, w)`` too."""
    return F.conv3d(x, weight, bias, stride, padding, dilation, groups)


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
    """Per-channel multiply by a constant (layer scale): ``x * scale[c]`` along ``axis``.  One factor for every
    channel is that number (``x * 0.5``), as both back ends lower it: along a batch axis (a per-sample score
    ``y.mean(1) * 0.5``) the vector has the example's batch, and the number holds at every batch.  (Shapes are
    inferred on meta tensors, at the example's sizes, where both read alike.)"""
    if not scale.is_meta and scale.numel() and bool((scale == scale.reshape(-1)[0]).all()):
        return x * scale.reshape(-1)[0]
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


@op("avg_pool_nd", kind="nonlinear")
def avg_pool_nd(x, *, kernel=REQUIRED, stride=REQUIRED, padding=REQUIRED, count_include_pad=True, ceil_mode=False):
    """Average pooling over the last ``len(kernel)`` axes, 1 or 3 (1-D audio pools, 3-D video pools); ``avg_pool2d``
    is the 2-D one, which rules read.  Linear, but no rule folds it."""
    pool = {1: F.avg_pool1d, 3: F.avg_pool3d}[len(kernel)]
    return pool(x, kernel, stride, padding, ceil_mode, count_include_pad)


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


@op("contiguous", kind="layout")
def contiguous(x, *, memory_format=torch.contiguous_format):
    """``x.contiguous(memory_format)``: the same values, laid out densely.  The IR has values, not layouts, so the
    front end keeps this op only where a layout is read: at an output, or before a call it carries through
    (``torch.view_as_complex``, a caller's ``out.view``); elsewhere it is the identity
    (:func:`~repalgebra.frontend.layout_reads.drop_unread_layouts`).  ``torch.preserve_format``: a dense copy in
    the layout its input suggests (as a fresh op's output is: a BN of a channels-last slice is channels-last), for an
    output that folding left a view (:func:`~repalgebra.frontend.layout_reads.layouts_to_match`)."""
    if memory_format == torch.preserve_format:
        return x.clone(memory_format=memory_format)
    return x.contiguous(memory_format=memory_format)


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


@op("log_softmax", kind="nonlinear")
def log_softmax(x, *, axis=-1):
    """Log of the softmax along ``axis`` (classifier and CTC heads)."""
    return F.log_softmax(x, dim=axis)


@op("glu", kind="nonlinear")
def glu(x, *, axis=-1):
    """Gated linear unit: the first half of ``x`` along ``axis`` times the sigmoid of the second (Conformer)."""
    return F.glu(x, dim=axis)


@op("mean", kind="linear")
def mean(x, *, dims=REQUIRED, keepdim=False):
    """Mean over ``dims`` (global average pooling is ``dims=(2, 3)``)."""
    return x.mean(dim=dims, keepdim=keepdim)


@op("rms_norm", kind="nonlinear")
def rms_norm(x, *, weight: Tensor | None = None, normalized_shape=REQUIRED, eps=None):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the trailing ``normalized_shape`` axes (``nn.RMSNorm``; ``eps``
    None, its default, is the epsilon of the dtype it runs in, read per call)."""
    return F.rms_norm(x, normalized_shape, weight, eps)


@op("layer_norm", kind="nonlinear")
def layer_norm(x, *, weight: Tensor | None = None, bias: Tensor | None = None, normalized_shape=REQUIRED, eps=1e-5):
    """Layer norm over the trailing ``normalized_shape`` axes."""
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


# --------------------------------------------------------------------------- the common vision vocabulary
#
# Ops that public vision models use between their foldable regions.  None of them is folded by a
# rule: each ends a region (``nonlinear``, including the linear ones no rule folds, such as a
# bilinear resize) or only moves elements (``layout``).  Shapes come from the reference semantics.


@op("silu", kind="nonlinear")
def silu(x):
    """``x * sigmoid(x)`` (swish)."""
    return F.silu(x)


@op("hardswish", kind="nonlinear")
def hardswish(x):
    """``x * relu6(x + 3) / 6``."""
    return F.hardswish(x)


@op("hardsigmoid", kind="nonlinear")
def hardsigmoid(x):
    """``relu6(x + 3) / 6``."""
    return F.hardsigmoid(x)


@op("clamp", kind="nonlinear")
def clamp(x, *, min=None, max=None):  # noqa: A002 - torch's and ONNX's names
    """``min(max(x, min), max)``; either bound may be None (``ReLU6`` is ``clamp(min=0, max=6)``)."""
    return torch.clamp(x, min, max)


@op("leaky_relu", kind="nonlinear")
def leaky_relu(x, *, negative_slope=0.01):
    """``x`` where it is positive, else ``negative_slope * x`` (YOLOv3's and ESRGAN's 0.1 and 0.2)."""
    return F.leaky_relu(x, negative_slope)


@op("elu", kind="nonlinear")
def elu(x, *, alpha=1.0, scale=1.0, input_scale=1.0):
    """``scale * x`` where ``x > 0``, else ``scale * alpha * (exp(input_scale * x) - 1)``: ``nn.ELU`` (V-Net),
    ``nn.SELU`` (its fixed ``alpha`` and ``scale``) and ``nn.CELU`` (``input_scale = 1 / alpha``), as ATen computes
    all three."""
    return torch.ops.aten.elu(x, alpha, scale, input_scale)


@op("threshold", kind="nonlinear")
def threshold(x, *, threshold: float, value: float):
    """``x`` where it is above ``threshold``, else ``value`` (``nn.Threshold``; NaN stays NaN)."""
    return F.threshold(x, threshold, value)


@op("log_sigmoid", kind="nonlinear")
def log_sigmoid(x):
    """``log(sigmoid(x)) = -softplus(-x)``: finite for every finite ``x`` (a GAN's or a contrastive loss head's
    ``nn.LogSigmoid``), where ``log`` of a sigmoid rounded to 0 is ``-inf``."""
    return F.logsigmoid(x)


@op("softplus", kind="nonlinear")
def softplus(x, *, beta=1.0, threshold=20.0):
    """``log(1 + exp(beta x)) / beta``, and ``x`` itself where ``beta x > threshold`` (YOLOv4's Mish:
    ``x * tanh(softplus(x))``)."""
    return F.softplus(x, beta, threshold)


@op("prelu", kind="nonlinear")
def prelu(x, *, weight: Tensor = REQUIRED):
    """``x`` where it is positive, else ``weight[c] * x`` along axis 1: a learned slope per channel (or one for all)."""
    return F.prelu(x, weight)


@op("tanh", kind="nonlinear")
def tanh(x):
    """Hyperbolic tangent."""
    return torch.tanh(x)


@op("cast", kind="nonlinear")
def cast(x, *, dtype=REQUIRED):
    """``x.to(dtype)`` for a dtype written in the code (``mask.float()``, ``x.to(torch.float32)``): that dtype whatever
    the model is cast to.  (A cast to the dtype of a weight of the model is the identity; see the front end.)"""
    return x.to(dtype)


@op("sqrt", kind="nonlinear")
def sqrt(x):
    """Square root."""
    return torch.sqrt(x)


@op("exp", kind="nonlinear")
def exp(x):
    """``e ** x`` (a softmax or a temperature written out: ``(x - x.amax(1, keepdim=True)).exp()``)."""
    return torch.exp(x)


@op("log", kind="nonlinear")
def log(x):
    """Natural logarithm (``torch.log(x.clamp(min=eps))``)."""
    return torch.log(x)


@op("rsqrt", kind="nonlinear")
def rsqrt(x):
    """``1 / sqrt(x)``."""
    return torch.rsqrt(x)


@op("pow", kind="nonlinear")
def pow_(x, *, exponent=REQUIRED):
    """``x ** exponent`` for a number ``exponent``."""
    return torch.pow(x, exponent)


@op("div", kind="nonlinear")
def div(a, b):
    """Element-wise quotient of two values (broadcasting); ``x / number`` is a ``scale``."""
    return a / b


@op("broadcast_add", kind="nonlinear")
def broadcast_add(a, b):
    """``a + b`` of two values of different shapes (broadcasting; ``add`` is for one shape)."""
    return a + b


@op("broadcast_sub", kind="nonlinear")
def broadcast_sub(a, b):
    """``a - b`` of two values of different shapes (broadcasting; ``sub`` is for one shape)."""
    return a - b


@op("add_const", kind="nonlinear")
def add_const(x, *, const: Tensor, sign=1.0, _trainable=False):
    """``sign * x + const`` for a constant tensor (broadcasting) and ``sign`` 1 or -1.

    ``x + 1e-6``, ``x + self.pos_embed``, ``x - self.mean``, ``self.anchors - x`` (``sign=-1``).
    Affine; ``bias_fold`` folds one that is constant per output feature into the conv or Linear before it.
    ``_trainable``: ``const`` is a parameter that requires gradients (``pos_embed``), a parameter of the fused module.
    """
    return x + const if sign == 1 else const - x


@op("sum", kind="nonlinear")
def sum_(x, *, dims=REQUIRED, keepdim=False):
    """Sum over ``dims`` (linear, but no rule folds it)."""
    return x.sum(dim=dims, keepdim=keepdim)


@op("amax", kind="nonlinear")
def amax(x, *, dims=REQUIRED, keepdim=False):
    """Maximum over ``dims`` (values only: ``torch.amax``)."""
    return torch.amax(x, dims, keepdim)


@op("norm", kind="nonlinear")
def norm(x, *, p=2.0, dims=REQUIRED, keepdim=False):
    """The vector ``p``-norm over ``dims``: ``(sum |x|^p)^(1/p)``, the maximum of ``|x|`` for ``p = inf``
    (``torch.linalg.vector_norm``, which ``torch.norm``, ``x.norm`` and ``F.normalize`` call)."""
    return torch.linalg.vector_norm(x, p, dims, keepdim)


@op("abs", kind="nonlinear")
def abs_(x):
    """``|x|``."""
    return torch.abs(x)


@op("max_pool2d", kind="nonlinear")
def max_pool2d(x, *, kernel=REQUIRED, stride=REQUIRED, padding=(0, 0), dilation=(1, 1), ceil_mode=False):
    """Max pooling; ``padding`` is symmetric ``(h, w)`` (padded with -inf), as in PyTorch."""
    return F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)


@op("adaptive_avg_pool2d", kind="nonlinear")
def adaptive_avg_pool2d(x, *, output_size=REQUIRED):
    """Adaptive average pooling to ``output_size`` ``(h, w)`` (None keeps that size); to 1 it is a ``mean``."""
    return F.adaptive_avg_pool2d(x, output_size)


@op("adaptive_max_pool2d", kind="nonlinear")
def adaptive_max_pool2d(x, *, output_size=REQUIRED):
    """Adaptive max pooling to ``output_size`` ``(h, w)`` (None keeps that size)."""
    return F.adaptive_max_pool2d(x, output_size)


@op("group_norm", kind="nonlinear")
def group_norm(x, *, weight: Tensor | None = None, bias: Tensor | None = None, num_groups=REQUIRED, eps=1e-5):
    """Group norm: axis 1 in ``num_groups`` groups, each normalised over its channels and the other axes."""
    return F.group_norm(x, num_groups, weight, bias, eps)


@op("interpolate", kind="nonlinear", variadic=True)
def interpolate(x, *like, size=None, scale=None, mode="nearest", align_corners=None):
    """``F.interpolate``: to ``size`` ``(h, w)``, by ``scale`` ``(sh, sw)``, or to the last two sizes of a second
    input ``like`` (FPN's ``F.interpolate(top, size=lateral.shape[-2:])``); ``nearest``, ``nearest-exact``, ``bilinear``.
    Nearest modes also on one spatial axis or three (``size``/``scale`` of that length; no ``like``)."""
    if like:
        size = tuple(like[0].shape[-2:])
    return F.interpolate(x, size=size, scale_factor=scale, mode=mode, align_corners=align_corners)


@op("attention", kind="nonlinear", variadic=True)
def attention(q, k, v, *mask, scale=None, causal=False, gqa=False):
    """``F.scaled_dot_product_attention(q, k, v, mask)``: ``softmax(q k^T * scale + mask) v``, no dropout.

    ``mask`` (optional, a fourth input) is added to the scores, or where it is boolean, keeps the
    scores it is True for; ``scale`` None is ``1 / sqrt(q.shape[-1])``; ``gqa``: ``k`` and ``v`` may have
    fewer heads (axis -3) than ``q``, each serving the next ``q`` heads in turn (grouped-query attention,
    ``enable_gqa=True``).
    """
    return F.scaled_dot_product_attention(q, k, v, mask[0] if mask else None, 0.0, causal, scale=scale, enable_gqa=gqa)


@op("einsum", kind="nonlinear", variadic=True)
def einsum(*xs, equation=REQUIRED):
    """``torch.einsum(equation, *xs)``."""
    return torch.einsum(equation, *xs)


@op("slice", kind="layout")
def slice_(x, *, axis=REQUIRED, start=0, end=None, step=1):
    """``x[..., start:end:step, ...]`` along ``axis``; negative ``start``/``end`` count from the end, None is the end."""
    index = [slice(None)] * x.dim()
    index[axis] = slice(start, end, step)
    return x[tuple(index)]


@op("chunk", kind="layout")
def chunk(x, *, chunks=REQUIRED, index=REQUIRED, axis=0):
    """``x.chunk(chunks, axis)[index]``: one piece of an (almost) even split, at any size of ``axis``."""
    return chunk_piece(x, chunks, axis, index)


@traced_as_one_call  # in a fused module's code: traced again (export_onnx, unpickling), one call
def chunk_piece(x: Tensor, chunks: int, axis: int, index: int) -> Tensor:
    """``x.chunk(chunks, axis)[index]``, and a ``ValueError`` saying why where the axis is too short for that piece.

    ``x.chunk(4, 2)`` of 5 rows is 3 pieces: a model that iterates over its chunks computes with fewer pieces
    there than the trace saw, so the captured graph must not run."""
    pieces = x.chunk(chunks, axis)
    if index >= len(pieces):
        raise ValueError(f"x.chunk({chunks}, {axis}) gives {len(pieces)} pieces at size {x.shape[axis]} of axis {axis}; "
                         f"the model was captured where it gives {chunks}, and its code may depend on how many there are")
    return pieces[index]


@op("piece", kind="layout")
def piece(x, *, how=REQUIRED, size=None, index=REQUIRED, axis=0, count=None):
    """``x.split(size, axis)[index]``, ``x.unbind(axis)[index]`` or ``x.chunk(size, axis)[index]`` (``how``), where the
    axis gives ``count`` pieces as at the trace (``None``: where it gives that piece)."""
    return split_piece(x, how, size, axis, index, count)


@traced_as_one_call  # in a fused module's code: traced again (export_onnx, unpickling), one call
def split_piece(x: Tensor, how: str, size: int | None, axis: int, index: int, count: int | None) -> Tensor:
    """One piece of a split whose number of pieces follows the size of the axis, and a ``ValueError`` saying why
    where it does not give the pieces the captured graph reads.

    ``x.unbind(1)[-1]`` is the last time step at every length, ``return h.split(k)`` as many pieces as there are:
    captured at one size, the graph reads a fixed piece and returns a fixed number of them.  ``count`` is the
    number of pieces at the trace, required where the model read the last one, counted from the end, or all of
    them; else (``None``) the piece must exist, as in torch (where ``x.split(2)[3]`` of 4 rows raises)."""
    pieces = x.unbind(axis) if how == "unbind" else x.split(size, axis) if how == "split" else x.chunk(size, axis)
    if (count is not None and len(pieces) != count) or index >= len(pieces):
        call = f"x.unbind({axis})" if how == "unbind" else f"x.{how}({size}, {axis})"
        raise ValueError(f"{call} gives {len(pieces)} pieces at size {x.shape[axis]} of axis {axis}; the model was captured "
                         f"where it gives {count or 'at least ' + str(index + 1)}, and reads or returns them as they were there: "
                         "fuse again with an example of these sizes")
    return pieces[index]


@op("slice_scatter", kind="layout")
def slice_scatter(x, src, *, axis=REQUIRED, start=0, end=None, step=1):
    """``x`` with ``x[..., start:end:step, ...]`` along ``axis`` replaced by ``src`` (``y = x.clone(); y[:, :c] = src``)."""
    return torch.slice_scatter(x, src, axis, start, end, step)


@op("roll", kind="layout")
def roll(x, *, shifts=REQUIRED, dims=REQUIRED):
    """``torch.roll(x, shifts, dims)``: a cyclic shift along each of ``dims``."""
    return torch.roll(x, shifts, dims)


@op("unfold", kind="layout")
def unfold(x, *, kernel=REQUIRED, dilation=(1, 1), padding=(0, 0), stride=(1, 1)):
    """``F.unfold`` (im2col): ``(N, C, H, W) -> (N, C k_h k_w, L)``, one column per window of the zero-padded map,
    channel-major (``c k_h k_w + i k_w + j``); ``padding`` is symmetric ``(h, w)``."""
    return F.unfold(x, kernel, dilation, padding, stride)


@op("fold", kind="nonlinear")
def fold(x, *, output_size=REQUIRED, kernel=REQUIRED, dilation=(1, 1), padding=(0, 0), stride=(1, 1)):
    """``F.fold`` (col2im), the adjoint of ``unfold``: ``(N, C k_h k_w, L) -> (N, C, H, W)``, overlapping windows
    summed.  Linear, but no rule folds it."""
    return F.fold(x, output_size, kernel, dilation, padding, stride)


@op("pixel_shuffle", kind="layout")
def pixel_shuffle(x, *, factor=REQUIRED):
    """``(B, C r^2, H, W) -> (B, C, H r, W r)``."""
    return F.pixel_shuffle(x, factor)


@op("pixel_unshuffle", kind="layout")
def pixel_unshuffle(x, *, factor=REQUIRED):
    """``(B, C, H r, W r) -> (B, C r^2, H, W)``."""
    return F.pixel_unshuffle(x, factor)


@op("pad_nd", kind="layout")
def pad_nd(x, *, pads=REQUIRED, mode="constant", value=0.0):
    """``F.pad(x, pads, mode, value)`` with torch's order of ``pads`` (last axis first, ``(begin, end)`` each).

    The pads ``pad`` cannot say: more than the last two axes (a channels-last map), or a mode other than ``constant``.
    """
    return F.pad(x, pads, mode=mode, value=value if mode == "constant" else None)


def _constant_shape(node):
    return tuple(node.params["value"].shape), node.attrs["dtype"]


@op("constant", kind="layout", shape=_constant_shape)
def constant(*, value: Tensor, dtype=REQUIRED, _plain=False, _trainable=False, _own=False):
    """A constant tensor where an op reads a value: a relative-position bias gathered from its table, a class token.

    No inputs.  ``dtype`` is its own: folding in float64 does not change it.  ``_plain``: the model holds it as a
    plain attribute, not a parameter or buffer (or computes it from one), so a cast of the model leaves it as it is;
    ``_trainable``: it is a parameter that requires gradients, read as it is (a ViT's ``cls_token``), and the
    fused module holds it as a parameter; ``_own``: it is the model's tensor itself, read as it is (``self.w``, not
    ``self.w.exp()``), which a model returning it shares with its caller (a graph output of any other constant is a
    copy per call).  How the module holds it, not what it computes, so graphs do not print them.
    """
    return value.to(dtype)


@op("expand", kind="layout", variadic=True)
def expand(x, *like, shape=None):
    """``x.expand(shape)`` (``-1`` keeps a size), or with a second input ``x.expand_as(like)``."""
    return x.expand_as(like[0]) if like else x.expand(shape)


@op("repeat", kind="layout")
def repeat(x, *, repeats=REQUIRED):
    """``x.repeat(*repeats)``: each axis tiled ``repeats[k]`` times (more repeats than axes add leading axes)."""
    return x.repeat(*repeats)


@op("expand_dyn", kind="layout", variadic=True)
def expand_dyn(x, *refs, shape=REQUIRED):
    """``x.expand(B, 1, 64)`` to sizes read at run time (``cls_token.expand(B, -1, -1)`` with ``B = y.shape[0]``).

    ``refs`` and the entries of ``shape`` as in ``reshape_dyn``; an int entry is a fixed size.
    """
    return x.expand(tuple(_dyn_size(e, refs) for e in shape))


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


@op("after_call", kind="opaque", shape=lambda node: (node.inputs[0].shape, node.inputs[0].dtype))
def after_call(x, result):
    """``x`` as the call kept whole that returned ``result`` left it: ``x`` itself, read after that call (it may have
    written into it; :func:`~repalgebra.frontend.inplace.reads_after_calls`).  No rule folds through it."""
    return x


# --------------------------------------------------------------------------- added by the torch front end


def _dyn_size(entry, refs) -> int:
    if isinstance(entry, int):
        return entry
    size = 1
    for f in entry:
        size *= f if isinstance(f, int) else refs[f[0]].shape[f[1]] // (f[2] if len(f) > 2 else 1)
    return size


@op("reshape_dyn", kind="layout", variadic=True)
def reshape_dyn(x, *refs, shape=REQUIRED):
    """Reshape to sizes read at run time, as in ``x.reshape(B, H * W, 64)`` with ``B, C, H, W = y.shape``.

    ``x`` is the first input; the others (``refs``) are read only for their
    shapes.  Each entry of ``shape`` is an int (``-1`` allowed) or a tuple of
    factors whose product is the size: an int, ``(r, axis)`` for
    ``refs[r].shape[axis]``, or ``(r, axis, d)`` for ``refs[r].shape[axis] // d``
    (Swin's window partition: ``x.view(B, H // ws, ws, W // ws, ws, C)``).
    ``x.reshape_as(y)`` is ``shape=(((0, 0),), ((0, 1),), ...)``.
    """
    return x.reshape(tuple(_dyn_size(e, refs) for e in shape))
