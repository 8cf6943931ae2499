"""Test support for fusion rules and fused graphs: Hypothesis strategies and an honest equality check.

Users testing their own rules or front ends import this module (it needs
``hypothesis``, in the ``dev`` extra)::

    from hypothesis import given
    from repalgebra.testing import assert_graphs_equal, conv_specs, bn_stats, float_dtypes, seeds

    @given(conv_specs(), float_dtypes(), seeds())
    def test_my_rule(spec, dtype, seed):
        ...
        assert_graphs_equal(graph, fused, x, dtype)

Strategies
----------
* :func:`conv_specs` draws a :class:`ConvSpec`: channels 1-16, groups dividing
  both, kernel ``(kh, kw)`` 1-7 (odd and even), stride 1-2, dilation 1-3,
  padding (asymmetric too), with or without bias, and an input size for which
  the output is non-empty.
* :func:`conv_specs_onto` draws a conv from a given input grid onto a given
  output grid (convs that can be summed), optionally on or off the tap
  lattice of another conv.
* :func:`bn_stats` draws eval-mode BatchNorm statistics (:class:`BNStats`):
  running variance from 1e-3 to 10, mean, gamma (any sign), beta, eps.
* :func:`input_shapes` draws NCHW shapes with batch 1-3.
* :func:`float_dtypes` draws float32 or float64.
* :func:`layer_stacks` draws small ``nn.Module`` s whose layers reach every attribute the front end and
  the back ends read (BN/LN eps from :func:`norm_eps`, affine off, asymmetric and even-kernel
  paddings, ``ceil_mode``, ``count_include_pad=False``, ``divisor_override``, dilations);
  :data:`ATTRIBUTE_CASES` are one such model per attribute (:mod:`repalgebra.testing_layers`).
* :func:`linear_graphs` draws a random *foldable* linear branchy region of one
  input (a :class:`RegionExample`): its normal form is a single conv2d.

For whole graphs and models (fuzzing, ``tests/test_fuzz.py``):

* :func:`mixed_graphs` draws a random DAG of linear regions with ReLU, GELU
  and opaque modules (:class:`Contraction`) between them, skip connections
  and fan-out (a :class:`MixedExample`); each region records whether it is
  foldable by construction and the op counts fusion must leave in it
  (:class:`MixedRegion`).  :func:`assert_graphs_equal_through` is
  :func:`assert_graphs_equal` across the non-linear ops.
* :func:`branchy_blocks` draws a model of reparameterizable blocks written
  as ordinary ``nn.Module`` s (:class:`RepBranches`: conv-BN, 1x1,
  asymmetric, dilated, 1x1 -> kxk, avg pool, BN and identity branches
  summed; :class:`PreNormConv`: a BN before a padded conv, which must stay),
  with the numbers of convs and BNs fusion must leave (a :class:`BlockExample`).
* :func:`assert_fuses_exactly` is for users' own pytest suites: fuse a model
  in float64, compare to 1e-9 relative, and check that no BatchNorm is left
  where it could fold.

Tensors are drawn from a seed (``seeds()``) with a ``torch.Generator``, so an
example is small to print and exactly reproducible: :func:`conv_params`,
:func:`random_input`, :meth:`BNStats.params`; :func:`add_conv` and
:func:`add_bn` add them to a :class:`~repalgebra.builder.GraphBuilder`.
:func:`snapshot_params` / :func:`assert_params_unchanged` check bit for bit
that a rewrite left its input graph alone.

The equality check
------------------
:func:`assert_graphs_equal` runs both graphs in float64 and in the given
dtype and compares them elementwise against ``tol * M``, where ``M`` is the
*magnitude graph* (:func:`magnitude`: the graph on ``|x|`` with every
coefficient made non-negative) and ``tol`` is ``eps(parameter dtype) + 1e-12``
in the float64 run (the one rounding of the fused parameters) and
``RTOL[dtype]`` (float32 1e-5, float64 1e-12) in the dtype run.  Its docstring
says why, and why ``M`` rather than ``|output|``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from math import gcd, prod
from typing import Any, Callable, Sequence

import torch
from hypothesis import assume
from hypothesis import strategies as st

from repalgebra.builder import GraphBuilder
from repalgebra.interpret import run_graph
from repalgebra.ir import Graph, Node, Value
from repalgebra.match import Window, union_window
from repalgebra.ops import TRANSPOSED_CONVS, op_def
from repalgebra.testing_layers import ATTRIBUTE_CASES, LayerStack, attribute_case, layer_stacks, norm_eps

__all__ = [
    "ConvSpec",
    "BNStats",
    "RegionExample",
    "conv_specs",
    "conv_specs_onto",
    "bn_stats",
    "input_shapes",
    "float_dtypes",
    "seeds",
    "linear_graphs",
    "conv_params",
    "random_input",
    "add_conv",
    "add_bn",
    "magnitude",
    "assert_graphs_equal",
    "RTOL",
    "ParamSnapshot",
    "snapshot_params",
    "assert_params_unchanged",
    # models whose layers reach every attribute the pipeline reads (repalgebra.testing_layers)
    "norm_eps",
    "LayerStack",
    "layer_stacks",
    "ATTRIBUTE_CASES",
    "attribute_case",
]

MAX_CHANNELS = 16
KERNELS = range(1, 8)
STRIDES = (1, 2)
DILATIONS = (1, 2, 3)


# --------------------------------------------------------------------------- conv specs


@dataclass(frozen=True)
class ConvSpec:
    """The geometry of one conv2d and of the input it reads (``height`` x ``width``).

    ``padding`` is ``(top, bottom, left, right)`` as in the op table.  The input
    size is chosen so that the output is non-empty.
    """

    in_channels: int
    out_channels: int
    groups: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    bias: bool = True
    height: int = 8
    width: int = 8

    def __post_init__(self) -> None:
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups {self.groups} must divide {self.in_channels} and {self.out_channels}")
        if min(self.out_size) < 1:
            raise ValueError(f"empty output for {self}")

    @property
    def extent(self) -> tuple[int, int]:
        """The dilated kernel's extent ``(k - 1) * d + 1`` per axis."""
        return tuple((k - 1) * d + 1 for k, d in zip(self.kernel, self.dilation))

    @property
    def out_size(self) -> tuple[int, int]:
        """Output ``(height, width)``."""
        t, b, l, r = self.padding
        eh, ew = self.extent
        return ((self.height + t + b - eh) // self.stride[0] + 1, (self.width + l + r - ew) // self.stride[1] + 1)

    @property
    def reach(self) -> tuple[int, int]:
        """Padding on both sides less the kernel's span, per axis (:func:`repalgebra.match.reach`): convs of one input
        and stride have outputs of one size at every input size when their reaches are equal, and only then."""
        t, b, l, r = self.padding
        return (t + b - self.extent[0] + 1, l + r - self.extent[1] + 1)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel)

    def input_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        return (batch, self.in_channels, self.height, self.width)

    def output_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        return (batch, self.out_channels, *self.out_size)

    @property
    def attrs(self) -> dict[str, Any]:
        """The conv2d attributes (keyword arguments for ``GraphBuilder.conv2d``)."""
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    @property
    def is_pointwise(self) -> bool:
        """1x1, stride 1, no padding: a per-pixel channel mix."""
        return self.kernel == (1, 1) and self.stride == (1, 1) and not any(self.padding)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _value(draw, fixed, strategy):
    """``fixed`` if given (a value, or a strategy to draw from), else draw from ``strategy``."""
    if fixed is None:
        return draw(strategy)
    if isinstance(fixed, st.SearchStrategy):
        return draw(fixed)
    return fixed


@st.composite
def conv_specs(
    draw,
    *,
    in_channels=None,
    out_channels=None,
    groups=None,
    kernel=None,
    stride=None,
    dilation=None,
    padding=None,
    bias=None,
    height=None,
    width=None,
    max_extra_size: int = 6,
) -> ConvSpec:
    """A random :class:`ConvSpec`.

    Every argument, when given, fixes that field (a value or a strategy);
    ``padding="none"`` means no padding, ``padding="symmetric"`` equal
    top/bottom and left/right.  Unfixed fields are drawn: channels 1-16, groups
    dividing both channel counts (grouped and depthwise convs are drawn often),
    kernel sides 1-7 independently (odd and even), stride 1-2 and dilation 1-3
    per axis, padding 0..extent-1 per side (at least 0..2), bias or not.  The
    input height/width is at least what makes the output non-empty and at most
    ``max_extra_size`` more.
    """
    cin = _value(draw, in_channels, st.none())
    cout = _value(draw, out_channels, st.none())
    g = _value(draw, groups, st.none())
    if g is None and cin is None and cout is None:
        # Draw the groups first so that grouped and depthwise convs are common.
        g = draw(st.one_of(st.just(1), st.integers(1, MAX_CHANNELS)))
    if g is None:
        cin = cin or draw(st.integers(1, MAX_CHANNELS))
        cout = cout or draw(st.integers(1, MAX_CHANNELS))
        g = draw(st.sampled_from(_divisors(gcd(cin, cout))))
    else:
        cin = cin or g * draw(st.integers(1, max(1, MAX_CHANNELS // g)))
        cout = cout or g * draw(st.integers(1, max(1, MAX_CHANNELS // g)))
    kernel = _value(draw, kernel, st.tuples(st.sampled_from(KERNELS), st.sampled_from(KERNELS)))
    stride = _value(draw, stride, st.tuples(st.sampled_from(STRIDES), st.sampled_from(STRIDES)))
    dilation = _value(draw, dilation, st.tuples(st.sampled_from(DILATIONS), st.sampled_from(DILATIONS)))
    kernel, stride, dilation = (tuple((v, v) if isinstance(v, int) else v) for v in (kernel, stride, dilation))
    eh, ew = ((k - 1) * d + 1 for k, d in zip(kernel, dilation))
    if padding == "none":
        padding = (0, 0, 0, 0)
    elif padding == "symmetric":
        ph = draw(st.integers(0, max(eh - 1, 2)))
        pw = draw(st.integers(0, max(ew - 1, 2)))
        padding = (ph, ph, pw, pw)
    else:
        side = lambda e: st.integers(0, max(e - 1, 2))  # noqa: E731
        padding = _value(draw, padding, st.tuples(side(eh), side(eh), side(ew), side(ew)))
    t, b, l, r = padding
    h_lo, w_lo = max(1, eh - t - b), max(1, ew - l - r)
    height = _value(draw, height, st.integers(h_lo, h_lo + max_extra_size))
    width = _value(draw, width, st.integers(w_lo, w_lo + max_extra_size))
    bias = _value(draw, bias, st.booleans())
    return ConvSpec(cin, cout, g, kernel, stride, dilation, tuple(padding), bias, height, width)


def _axis_options(n: int, n_out: int, stride: int, kernels, dilations, unpadded: bool) -> list[tuple[int, int, int, int]]:
    """Per axis: every (kernel, dilation, pad_before, pad_after) mapping ``n`` inputs to ``n_out`` outputs."""
    opts = []
    for k in kernels:
        for d in dilations:
            e = (k - 1) * d + 1
            for total in range(stride * (n_out - 1) + e - n, stride * n_out + e - n):
                if total < 0 or (unpadded and total):
                    continue
                if (n + total - e) // stride + 1 != n_out:
                    continue
                opts.extend((k, d, before, total - before) for before in range(total + 1))
    return opts


def _option_reach(opt: tuple[int, int, int, int]) -> int:
    """The reach (:attr:`ConvSpec.reach`) of an :func:`_axis_options` entry ``(kernel, dilation, before, after)``."""
    k, d, before, after = opt
    return before + after - d * (k - 1)


def _on_axis_lattice(opt, ref: ConvSpec, axis: int) -> bool:
    """Whether taps ``opt`` lie on ``ref``'s lattice along ``axis``; a one-tap axis takes the other's step."""
    k, d, before, _ = opt
    kr, dr = ref.kernel[axis], ref.dilation[axis]
    if k > 1 and kr > 1 and d != dr:
        return False
    step = dr if kr > 1 else d if k > 1 else 1
    return (before - ref.padding[2 * axis]) % step == 0


@st.composite
def conv_specs_onto(
    draw,
    size: tuple[int, int],
    out_size: tuple[int, int],
    stride=1,
    *,
    in_channels: int,
    out_channels: int,
    groups=None,
    bias=None,
    kernel=None,
    dilation=None,
    unpadded: bool = False,
    lattice_of: ConvSpec | None = None,
    on_lattice: bool = True,
    reach: tuple[int, int] | None = None,
) -> ConvSpec:
    """A conv reading an input of ``size`` (H, W) with ``stride`` whose output grid is exactly ``out_size``.

    Kernel (1-7 per axis), dilation (1-3) and padding (asymmetric too) are
    drawn among those that land on that grid; ``kernel`` / ``dilation`` fix
    them, ``unpadded=True`` asks for no padding.  With ``lattice_of``, the
    conv's taps lie on the same lattice as that conv's (same dilation, leading
    paddings differing by multiples of it: what ``kernel_pad`` needs), or,
    with ``on_lattice=False``, not (what ``dilation_to_dense`` is for).
    ``reach`` (default: ``lattice_of``'s, if given) fixes :attr:`ConvSpec.reach`, so that the conv's output has the
    other's size at every input size, not at ``size`` alone (at stride 2 two reaches land on one grid).
    Groups are drawn among the common divisors of the channel counts.
    """
    s = (stride, stride) if isinstance(stride, int) else tuple(stride)
    fix = lambda v, a: (KERNELS if v is None else [v if isinstance(v, int) else v[a]])  # noqa: E731
    fixd = lambda v, a: (DILATIONS if v is None else [v if isinstance(v, int) else v[a]])  # noqa: E731
    axes = [
        _axis_options(size[a], out_size[a], s[a], fix(kernel, a), fixd(dilation, a), unpadded) for a in (0, 1)
    ]
    reach = lattice_of.reach if reach is None and lattice_of is not None else reach
    if reach is not None:
        axes = [[o for o in axes[a] if _option_reach(o) == reach[a]] for a in (0, 1)]
    if lattice_of is not None:
        on = [[o for o in axes[a] if _on_axis_lattice(o, lattice_of, a)] for a in (0, 1)]
        if on_lattice:
            axes = on
        else:
            off = [[o for o in axes[a] if not _on_axis_lattice(o, lattice_of, a)] for a in (0, 1)]
            broken = [a for a in (0, 1) if off[a]]
            assume(bool(broken))
            a = draw(st.sampled_from(broken))
            axes[a] = off[a]
    assume(bool(axes[0]) and bool(axes[1]))
    kh, dh, top, bottom = draw(st.sampled_from(axes[0]))
    kw, dw, left, right = draw(st.sampled_from(axes[1]))
    g = _value(draw, groups, st.sampled_from(_divisors(gcd(in_channels, out_channels))))
    bias = _value(draw, bias, st.booleans())
    return ConvSpec(in_channels, out_channels, g, (kh, kw), s, (dh, dw), (top, bottom, left, right), bias, *size)


# --------------------------------------------------------------------------- BN statistics


@dataclass(frozen=True, eq=False)
class BNStats:
    """Eval-mode BatchNorm statistics, stored in float64."""

    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float

    @property
    def channels(self) -> int:
        return self.mean.numel()

    def params(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """``mean``, ``var``, ``weight``, ``bias`` in ``dtype``."""
        return {k: getattr(self, k).to(dtype) for k in ("mean", "var", "weight", "bias")}

    def kwargs(self, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """Keyword arguments for ``GraphBuilder.batch_norm``."""
        return {**self.params(dtype), "eps": self.eps}

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, t)`` with ``BN(x) = s * x + t`` (float64)."""
        s = self.weight / torch.sqrt(self.var + self.eps)
        return s, self.bias - self.mean * s

    def __repr__(self) -> str:
        return (
            f"BNStats(C={self.channels}, var in [{self.var.min().item():.3g}, {self.var.max().item():.3g}], "
            f"|mean|<={self.mean.abs().max().item():.3g}, |gamma|<={self.weight.abs().max().item():.3g}, eps={self.eps})"
        )


@st.composite
def bn_stats(draw, channels: int) -> BNStats:
    """Random BN statistics for ``channels`` channels.

    Running variance per channel log-uniform in a drawn sub-range of
    [1e-3, 10] (so shrinking reaches the extremes 1e-3 and 10), mean and beta
    normal with a drawn scale (0 to 3), gamma normal (either sign, sometimes
    exactly 1), eps one of 1e-5, 1e-3, 0.1 (the rules' tests; models with eps across its realistic range,
    1e-6 to 1e-2, are :func:`layer_stacks`).
    """
    seed = draw(seeds())
    lo, hi = sorted(draw(st.tuples(st.floats(-3, 1), st.floats(-3, 1))))
    mean_scale = draw(st.sampled_from([0.0, 0.1, 1.0, 3.0]))
    unit_gamma = draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    gen = torch.Generator().manual_seed(seed)
    c = channels
    var = 10 ** (lo + (hi - lo) * torch.rand(c, generator=gen, dtype=torch.float64))
    mean = mean_scale * torch.randn(c, generator=gen, dtype=torch.float64)
    weight = torch.ones(c, dtype=torch.float64) if unit_gamma else torch.randn(c, generator=gen, dtype=torch.float64)
    bias = mean_scale * torch.randn(c, generator=gen, dtype=torch.float64)
    return BNStats(mean, var.clamp(1e-3, 10.0), weight, bias, eps)


# --------------------------------------------------------------------------- shapes, dtypes, tensors


def seeds() -> st.SearchStrategy[int]:
    """Seeds for :func:`conv_params` / :func:`random_input`."""
    return st.integers(0, 2**31 - 1)


def float_dtypes() -> st.SearchStrategy[torch.dtype]:
    """float32 or float64."""
    return st.sampled_from([torch.float32, torch.float64])


@st.composite
def input_shapes(draw, channels=None, height=None, width=None, max_size: int = 12) -> tuple[int, int, int, int]:
    """An NCHW shape: batch 1-3, channels 1-16, height/width 1-``max_size`` (each fixable)."""
    n = draw(st.integers(1, 3))
    c = _value(draw, channels, st.integers(1, MAX_CHANNELS))
    h = _value(draw, height, st.integers(1, max_size))
    w = _value(draw, width, st.integers(1, max_size))
    return (n, c, h, w)


def random_input(shape: Sequence[int], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """A standard-normal tensor of ``shape``, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def conv_params(spec: ConvSpec, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """``weight`` (and ``bias`` if ``spec.bias``) for ``spec``: normal, scaled by 1/sqrt(fan-in)."""
    gen = torch.Generator().manual_seed(seed)
    fan_in = spec.weight_shape[1] * spec.weight_shape[2] * spec.weight_shape[3]
    w = torch.randn(*spec.weight_shape, generator=gen, dtype=torch.float64) / fan_in**0.5
    out = {"weight": w.to(dtype)}
    if spec.bias:
        out["bias"] = torch.randn(spec.out_channels, generator=gen, dtype=torch.float64).to(dtype)
    return out


def add_conv(b: GraphBuilder, x: Value, spec: ConvSpec, dtype: torch.dtype, seed: int, source: str = "conv") -> Value:
    """Add a conv2d node for ``spec`` with :func:`conv_params` to builder ``b``."""
    return b.conv2d(x, **conv_params(spec, dtype, seed), **spec.attrs, source=source)


def add_bn(b: GraphBuilder, x: Value, stats: BNStats, dtype: torch.dtype, source: str = "bn") -> Value:
    """Add a batch_norm node with ``stats`` to builder ``b``."""
    return b.batch_norm(x, **stats.kwargs(dtype), source=source)


# --------------------------------------------------------------------------- parameter snapshots


@dataclass(eq=False)
class ParamSnapshot:
    """The nodes of a graph and bitwise clones of their parameters (see :func:`snapshot_params`)."""

    nodes: list[Node]
    saved: list[tuple[Node, str, torch.Tensor]]


def snapshot_params(graph: Graph) -> ParamSnapshot:
    """Clones of every parameter tensor of ``graph``, to check later that nothing wrote into them."""
    return ParamSnapshot(list(graph.nodes), [(n, k, p.detach().clone()) for n in graph.nodes for k, p in n.params.items()])


def assert_params_unchanged(graph: Graph, snapshot: ParamSnapshot) -> None:
    """``graph`` still has the same nodes, and every parameter is bit-for-bit what :func:`snapshot_params` saw."""
    assert [id(n) for n in graph.nodes] == [id(n) for n in snapshot.nodes], "the graph's node list was changed"
    for n, k, saved in snapshot.saved:
        now = n.params[k]
        assert now.dtype == saved.dtype and now.shape == saved.shape, f"{n.op}.{k} changed dtype/shape"
        assert torch.equal(_bits(now), _bits(saved)), f"{n.op}.{k} at {n.source!r} was modified in place"


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)  # 1-D: a 0-dim tensor has no byte view
    return t.view(torch.uint8) if t.is_floating_point() else t


# --------------------------------------------------------------------------- the equality check

RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}
"""Tolerance per compute dtype, relative to the magnitude graph (see :func:`assert_graphs_equal`)."""


def _abs_params(n: Node) -> dict[str, torch.Tensor]:
    return {k: p.to(torch.float64).abs() for k, p in n.params.items()}


def _magnitude_op(n: Node, ms: list[torch.Tensor]) -> torch.Tensor:
    op, a = n.op, n.attrs
    if op in ("conv2d", "conv3d", *TRANSPOSED_CONVS):
        return op_def(op)(ms, a, _abs_params(n))
    if op == "batch_norm":
        p = {k: v.to(torch.float64) for k, v in n.params.items()}
        s = (p["weight"] / torch.sqrt(p["var"] + a["eps"])).abs()
        view = lambda v: v.reshape(1, -1, *([1] * (ms[0].dim() - 2)))  # noqa: E731
        return (ms[0] + view(p["mean"].abs())) * view(s) + view(p["bias"].abs())
    if op in ("add", "sub", "broadcast_add", "broadcast_sub"):
        return ms[0] + ms[1]
    if op == "matmul":  # bilinear: sum_k |a_ik| |b_kj| bounds every term of (a b)_ij
        return op_def(op)(ms, a, {})
    if op == "scale":
        return op_def(op)(ms, a, _abs_params(n))
    if op == "add_const":  # |sign * y + c| <= |y| + |c|
        return op_def(op)(ms, {**a, "sign": 1.0}, _abs_params(n))
    if op in ("pad", "pad_nd"):  # reflect / replicate / circular copy magnitudes; a constant pads with |value|
        return op_def(op)(ms, {**a, "value": abs(a["value"])}, {})
    if op == "linear":
        return op_def(op)(ms, a, _abs_params(n))
    if op == "constant":
        return n.params["value"].to(torch.float64).abs()
    if op in ("layer_norm", "rms_norm", "group_norm"):
        # Over D elements the normalized values' squares sum to at most D, so each is at most sqrt(D) in size.  A
        # LayerNorm or GroupNorm is computed as x * (gamma rstd) + (beta - mean rstd gamma) (PyTorch's kernels): its
        # terms are up to (|x| + |mean|) |gamma| / sqrt(eps) in size, however well the output is bounded, since
        # rstd = 1 / sqrt(var + eps) <= 1 / sqrt(eps); an RMSNorm only scales x, so its terms are the output's.
        p, x = _abs_params(n), ms[0]
        per_channel = lambda v: v.reshape(1, -1, *([1] * (x.dim() - 2))) if torch.is_tensor(v) else v  # noqa: E731
        view = per_channel if op == "group_norm" else (lambda v: v)
        size = x[0].numel() // a["num_groups"] if op == "group_norm" else prod(a["normalized_shape"])
        bound = torch.full_like(x, size**0.5)
        if op != "rms_norm":
            bound = bound + (x + x.amax()) / max(a["eps"], 1e-30) ** 0.5
        return bound * view(p.get("weight", 1.0)) + view(p.get("bias", 0.0))
    if op in ("identity", "avg_pool2d", "concat", "mean", "reshape", "reshape_dyn", "flatten", "permute", "transpose", "select",
              "slice", "piece", "chunk", "relu", "expand", "slice_scatter", "pixel_shuffle", "pixel_unshuffle"):
        # Non-negative coefficients (or element moves); relu is 1-Lipschitz with |relu(y)| <= |y|.
        return op_def(op)(ms, a, {})
    raise NotImplementedError(f"no magnitude (error bound) rule for op {op!r} at {n.source or '<graph>'}")


def magnitude(graph: Graph, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The magnitude graph's output: ``graph`` on ``|inputs|`` with every coefficient made non-negative.

    Convs, scales and linears use ``|W|``, ``|b|``; ``sub`` becomes ``add``; a matrix product of two
    activations multiplies their magnitudes (every term of its sums is a product of two); a
    pad pads with ``|value|``; BN is ``|s| (|x| + |mean|) + |beta|`` with
    ``s = gamma / sqrt(var + eps)``, which bounds every intermediate of both
    ways to compute it (``(x - mean) * s + beta`` and ``s * x + t``).  Pools,
    concat, means and layout ops have non-negative coefficients already.  A
    norm over ``D`` elements is ``sqrt(D) |gamma| + |beta|`` (its normalized values are at
    most ``sqrt(D)`` in size whatever its input), plus ``(|x| + max |x|) |gamma| / sqrt(eps)``
    for a LayerNorm or GroupNorm, whose kernels compute ``x * gamma rstd`` and then
    subtract the mean's share.
    Evaluated in float64.  Elementwise, the result bounds the absolute value
    of every term summed into that output, hence of the output itself.  Raises
    ``NotImplementedError`` for ops without such a rule (non-linear ones
    other than relu and the norms).
    """
    env: dict[int, torch.Tensor] = {id(v): t.to(torch.float64).abs() for v, t in zip(graph.inputs, inputs)}
    for n in graph.nodes:
        env[id(n.out)] = _magnitude_op(n, [env[id(i)] for i in n.inputs])
    outs = tuple(env[id(o)] for o in graph.outputs)
    return outs[0] if len(outs) == 1 else outs


def _as_tuple(y):
    return y if isinstance(y, tuple) else (y,)


def _param_eps(*graphs: Graph) -> float:
    eps = [torch.finfo(p.dtype).eps for g in graphs for n in g.nodes for p in n.params.values() if p.is_floating_point()]
    return max(eps, default=0.0)


def assert_graphs_equal(
    g1: Graph, g2: Graph, x: torch.Tensor | Sequence[torch.Tensor], dtype: torch.dtype, *, what: str = ""
) -> None:
    """Assert that graphs ``g1`` (reference) and ``g2`` (e.g. its fused form) compute the same function at ``x``.

    ``x`` is the input tensor (or a sequence of them, one per graph input).

    Both graphs are run twice: in float64 and in ``dtype`` (the interpreter
    casts parameters to the input's dtype).  Outputs must have equal shapes,
    the compute dtype, be finite, and satisfy elementwise

        |y1 - y2| <= tol * M,   M = max(magnitude(g1, x), magnitude(g2, x))

    with the tolerance rule

    * float64 run: ``tol = eps(p) + 1e-12`` where ``eps(p)`` is the machine
      epsilon (``torch.finfo(.).eps``, twice the unit roundoff) of the widest-
      epsilon parameter dtype of the graphs: ~1.2e-7 for float32 parameters,
      ~2.2e-16 for float64 ones;
    * ``dtype`` run: ``tol = RTOL[dtype]``: float64 1e-12, float32 1e-5,
      float16 1e-2, bfloat16 5e-2.

    Why these numbers.  The engine folds in float64 and casts each fused
    parameter once to the graph's dtype.  In exact arithmetic ``|W_fused|``
    and ``|b_fused|`` are bounded by the magnitude graph's coefficients (a
    fused coefficient is a sum of products of original ones), so the cast
    moves the output by at most ``u(p) * M`` (``u`` the unit roundoff), which
    the float64 run isolates: ``eps(p) = 2u(p)`` leaves a factor 2, and 1e-12
    covers float64 arithmetic (~1e4 roundings of 1.1e-16).  In the ``dtype``
    run both graphs also round every multiply-add: a sum of K terms computed
    in floating point is off by at most ``K u M`` (and typically by
    ``sqrt(K) u`` times the typical term, far below ``u M``).  For float32
    (``u`` = 6e-8) 1e-5 is ~170 ``u``, which covers the chains of BN, conv and
    adds the tests build with kernels up to 19x19 (dilated 7x7) and 16 input
    channels; float64 1e-12 is ~9000 ``u``.

    Why relative to ``M`` and not to ``max |y1|``: branches that cancel (``BN(x)
    - BN(x)`` in RepMixer, a ``sub`` of similar convs) give outputs much smaller
    than the terms that were rounded, and the rounding error scales with the
    terms.  ``M`` is the standard forward error bound's ``|W| |x|`` for the
    whole graph; an error that is large relative to ``M`` is a wrong rewrite,
    not rounding.  ``M`` is elementwise, so an error confined to a border row
    (a wrong padding) is measured against that row's own magnitude.
    """
    xs = (x,) if torch.is_tensor(x) else tuple(x)
    x64 = [t.detach().to(torch.float64) for t in xs]
    m = tuple(torch.maximum(a, b) for a, b in zip(_as_tuple(magnitude(g1, *x64)), _as_tuple(magnitude(g2, *x64))))
    _assert_runs_close(g1, g2, xs, m, dtype, 1, what)


def _assert_runs_close(
    g1: Graph, g2: Graph, xs: tuple[torch.Tensor, ...], m: tuple[torch.Tensor, ...], dtype: torch.dtype, depth: int, what: str
) -> None:
    """Run both graphs in float64 and in ``dtype``; assert ``|y1 - y2| <= depth * tol * m`` elementwise (see above)."""
    runs = [(torch.float64, depth * (_param_eps(g1, g2) + RTOL[torch.float64]))]
    if dtype != torch.float64:
        runs.append((dtype, depth * RTOL[dtype]))
    for run_dtype, tol in runs:
        xd = [t.detach().to(run_dtype) for t in xs]
        y1, y2 = _as_tuple(run_graph(g1, *xd)), _as_tuple(run_graph(g2, *xd))
        assert len(y1) == len(y2) == len(m), f"{what}: output counts differ: {len(y1)} vs {len(y2)}"
        for k, (a, b, mk) in enumerate(zip(y1, y2, m)):
            where = f"{what} output {k} ({run_dtype} run{f', depth {depth}' if depth != 1 else ''})"
            assert a.shape == b.shape, f"{where}: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
            assert a.dtype == b.dtype == run_dtype, f"{where}: dtypes {a.dtype}, {b.dtype}, expected {run_dtype}"
            assert torch.isfinite(a).all() and torch.isfinite(b).all(), f"{where}: non-finite values"
            err = (a.to(torch.float64) - b.to(torch.float64)).abs()
            bad = err > tol * mk
            if bool(bad.any()):
                i = int(torch.argmax(torch.where(bad, err / mk.clamp_min(1e-300), torch.zeros_like(err))))
                idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), err.shape))
                raise AssertionError(
                    f"{where}: {int(bad.sum())} of {err.numel()} elements differ beyond tol={tol:.1e} x magnitude; "
                    f"worst at {idx}: |diff|={err[idx].item():.3e}, magnitude={mk[idx].item():.3e}, "
                    f"ratio={err[idx].item() / max(mk[idx].item(), 1e-300):.3e}; "
                    f"max|y1|={a.abs().max().item():.3e}"
                )

# --------------------------------------------------------------------------- random linear regions


@dataclass(eq=False)
class RegionExample:
    """A generated linear region: the graph, an input for it, its dtype, and what was drawn."""

    graph: Graph
    x: torch.Tensor
    dtype: torch.dtype
    branches: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"RegionExample(dtype={self.dtype}, x={tuple(self.x.shape)}, branches={self.branches})\n{self.graph}"


@dataclass
class _Region:
    """What the branches of one region share: input value, channels, stride, input and output grid."""

    x: Value
    channels: int
    stride: int
    size: tuple[int, int]  # input (H, W)
    out: tuple[int, int]  # output (Ho, Wo)
    reach: tuple[int, int]  # every branch's padding less its span (ConvSpec.reach): outputs alike at every size
    windows: list[Window] = field(default_factory=list)  # the taps of every branch, in input offsets
    groups: list[int] = field(default_factory=list)  # the groups of every conv the branches draw

    @property
    def same_grid(self) -> bool:
        return self.stride == 1 and self.out == self.size

    def covers(self, kernel, dilation, padding, groups: int | None = None) -> None:
        """Record the taps of a branch (and the groups of its conv)."""
        top, _, left, _ = padding
        self.windows.append(Window((self.stride, self.stride), (-top, -left), tuple(dilation), tuple(kernel)))
        if groups is not None:
            self.groups.append(groups)

    def dominant(self) -> ConvSpec:
        """The conv that the branches fold into, as a branch of its own: it spans all their windows, on
        their lattice, with the gcd of their groups.  Beside it, merging the others costs nothing."""
        u = union_window(self.windows)
        after = [self.reach[a] + u.last(a) for a in (0, 1)]  # the region's reach: lead + after - span
        return ConvSpec(self.channels, self.channels, gcd(*self.groups), u.count, (self.stride, self.stride), u.step,
                        (-u.first[0], after[0], -u.first[1], after[1]), True, *self.size)


def _feasible_pools(r: _Region) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Avg-pool (kernel, padding) pairs with stride ``r.stride`` and reach ``r.reach`` (so mapping the input grid to
    ``r.out``)."""
    out = []
    for kh in KERNELS:
        for kw in KERNELS:
            for ph in range(kh // 2 + 1):
                for pw in range(kw // 2 + 1):
                    if (2 * ph - kh + 1, 2 * pw - kw + 1) == r.reach and kh <= r.size[0] + 2 * ph and kw <= r.size[1] + 2 * pw:
                        out.append(((kh, kw), (ph, pw)))
    return out


def _short(spec: ConvSpec) -> str:
    return (
        f"conv{spec.kernel[0]}x{spec.kernel[1]}(c{spec.in_channels}->{spec.out_channels} g{spec.groups} "
        f"s{spec.stride[0]} d{spec.dilation} p{spec.padding}{' bias' if spec.bias else ''})"
    )


class _Gen:
    """Builder state while drawing one region."""

    def __init__(self, draw, dtype: torch.dtype):
        self.draw = draw
        self.dtype = dtype
        self.b = GraphBuilder()
        self.n = 0
        self.desc: list[str] = []

    def seed(self) -> int:
        return self.draw(seeds())

    def src(self, kind: str) -> str:
        self.n += 1
        return f"region.b{self.n}.{kind}"

    def conv(self, x: Value, spec: ConvSpec, source: str) -> Value:
        return add_conv(self.b, x, spec, self.dtype, self.seed(), source)

    def bn(self, x: Value, source: str) -> Value:
        return add_bn(self.b, x, self.draw(bn_stats(x.shape[1])), self.dtype, source)

    def scale(self, x: Value, source: str) -> Value:
        gen = torch.Generator().manual_seed(self.seed())
        s = torch.randn(x.shape[1], generator=gen, dtype=torch.float64).to(self.dtype)
        return self.b.scale(x, scale=s, source=source)

    def onto(self, r: "_Region", cin: int | None = None, cout: int | None = None, **kw) -> ConvSpec:
        c = r.channels
        spec = self.draw(conv_specs_onto(r.size, r.out, r.stride, in_channels=cin or c, out_channels=cout or c, reach=r.reach, **kw))
        r.covers(spec.kernel, spec.dilation, spec.padding, spec.groups)
        return spec

    # -- branches: each returns a value of shape (N, C, Ho, Wo) --------------------------

    def conv_branch(self, r: "_Region") -> Value:
        """conv (+ BN) (+ layer scale), any kernel / dilation / padding that lands on the output grid."""
        draw = self.draw
        spec = self.onto(r)
        src = self.src("conv")
        y = self.conv(r.x, spec, src)
        with_bn = draw(st.booleans())
        if with_bn:
            y = self.bn(y, src + ".bn")
        layer_scale = draw(st.booleans())
        if layer_scale:
            y = self.scale(y, src + ".ls")
        self.desc.append(f"{_short(spec)}{' +bn' if with_bn else ''}{' +ls' if layer_scale else ''}")
        return y

    def pad_conv_branch(self, r: "_Region") -> Value:
        """explicit zero pad, then a conv whose own padding makes up the rest."""
        draw = self.draw
        spec = self.onto(r)
        explicit = tuple(draw(st.integers(0, p)) for p in spec.padding)
        rest = tuple(p - e for p, e in zip(spec.padding, explicit))
        src = self.src("padconv")
        padded = self.b.pad(r.x, pads=explicit, source=src + ".pad")
        inner = replace(spec, padding=rest, height=padded.shape[2], width=padded.shape[3])
        self.desc.append(f"pad{explicit}+{_short(inner)}")
        return self.conv(padded, inner, src)

    def seq_branch(self, r: "_Region") -> Value:
        """1x1 conv (+ BN) then kxk conv (+ BN); the 1x1 has a bias or a BN only when the kxk is unpadded."""
        draw = self.draw
        c = r.channels
        unpadded_ok = all(any(_option_reach(o) == r.reach[a] for o in _axis_options(r.size[a], r.out[a], r.stride, KERNELS, DILATIONS, True))
                          for a in (0, 1))
        kxk_unpadded = unpadded_ok and draw(st.booleans())
        g = draw(st.sampled_from(_divisors(c)))
        # Mid channels: a multiple of g, at least c, so the merged kernel is never larger than the two.
        mid = draw(st.sampled_from([m for m in range(c, MAX_CHANNELS + 1) if m % g == 0] or [c]))
        inner_bias = kxk_unpadded and draw(st.booleans())
        mid_bn = kxk_unpadded and draw(st.booleans())
        kxk = self.onto(r, cin=mid, groups=g, unpadded=kxk_unpadded)
        src = self.src("seq")
        y = self.conv(r.x, ConvSpec(c, mid, g, (1, 1), bias=inner_bias, height=r.size[0], width=r.size[1]), src + ".pw")
        if mid_bn:
            y = self.bn(y, src + ".pw.bn")
        y = self.conv(y, kxk, src + ".kxk")
        out_bn = draw(st.booleans())
        if out_bn:
            y = self.bn(y, src + ".bn")
        pw = f"1x1(c{mid} g{g}{' bias' if inner_bias else ''}{' +bn' if mid_bn else ''})"
        self.desc.append(f"{pw}->{_short(kxk)}{' +bn' if out_bn else ''}")
        return y

    def concat_branch(self, r: "_Region") -> Value:
        """channel concat of two dense (groups 1) conv (+ BN) branches splitting the channels."""
        draw = self.draw
        c1 = draw(st.integers(1, r.channels - 1))
        parts = []
        for cout in (c1, r.channels - c1):
            spec = self.onto(r, cout=cout, groups=1)  # concat_merge keeps grouped kernels apart
            src = self.src("cat")
            y = self.conv(r.x, spec, src)
            with_bn = draw(st.booleans())
            if with_bn:
                y = self.bn(y, src + ".bn")
            parts.append(y)
            self.desc.append(f"cat[{_short(spec)}{' +bn' if with_bn else ''}]")
        return self.b.concat(*parts, axis=1, source=self.src("cat"))

    def pool_branch(self, r: _Region) -> Value:
        """avg pool with count_include_pad=True."""
        kernel, padding = self.draw(st.sampled_from(_feasible_pools(r)))
        r.covers(kernel, (1, 1), (padding[0], padding[0], padding[1], padding[1]))
        self.desc.append(f"avgpool{kernel} p{padding}")
        return self.b.avg_pool2d(r.x, kernel=kernel, stride=(r.stride, r.stride), padding=padding, count_include_pad=True, source=self.src("pool"))

    def bn_branch(self, r: _Region) -> Value:
        r.covers((1, 1), (1, 1), (0, 0, 0, 0))
        self.desc.append("bn")
        return self.bn(r.x, self.src("bn"))

    def identity_branch(self, r: _Region) -> Value:
        r.covers((1, 1), (1, 1), (0, 0, 0, 0))
        self.desc.append("identity")
        return r.x


@st.composite
def linear_graphs(draw, dtype=None, max_branches: int = 4) -> RegionExample:
    """A random linear branchy region of one input that folds, by construction, to one conv2d.

    The region reads ``x`` (batch 1-3, channels 1-16, 1-10 x 1-10) and has a
    stride (1 or 2) and an output grid shared by all its branches.  Branches
    (1 to ``max_branches``) are drawn from:

    * conv (+ BN) (+ layer scale): any kernel 1-7, dilation 1-3, groups,
      padding (asymmetric too) chosen to land on the region's output grid;
    * explicit zero pad + conv (the pad and the conv's padding share the total);
    * 1x1 conv -> kxk conv (+ BN), the 1x1 with a bias or a BN only when the
      kxk is unpadded (DBB's 1x1-kxk branch), mid channels >= channels;
    * concat of two dense conv (+ BN) branches splitting the channels;
    * avg pool with ``count_include_pad=True``;
    * BN and identity, when the region keeps the grid (stride 1, no shrink).

    The first branch is always a conv-type one (the others convert to convs
    only beside a conv of the same input).  Branches are joined left to right
    with ``add`` or ``sub``; then an optional trailing layer scale or BN; then,
    for grid-keeping regions, an optional outer residual ``x + region``.
    Every construct is one the rules fold exactly (a biased 1x1 never meets a
    padded kxk, a BN never precedes a padded conv, pools always count the
    padding), so the normal form is exactly one conv2d.
    """
    dtype = _value(draw, dtype, float_dtypes())
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, MAX_CHANNELS))
    h, w = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    b = GraphBuilder()
    gen = _PrefixGen(draw, dtype, b, "region")
    x = b.input("x", (n, c, h, w), dtype)
    y = _branchy_region(draw, gen, x, max_branches)
    xt = random_input((n, c, h, w), dtype, draw(seeds()))
    return RegionExample(b.build(y), xt, dtype, gen.desc)


# =========================================================================== fuzzing: mixed graphs, user blocks
#
# Everything below was added for fuzzing whole graphs (``tests/test_fuzz.py``) and
# for users' own pytest suites (:func:`assert_fuses_exactly`).

import copy as _copy  # noqa: E402

from torch import nn  # noqa: E402

__all__ += [
    "Contraction",
    "NONLINEAR_LIPSCHITZ",
    "magnitude_through",
    "assert_graphs_equal_through",
    "MixedRegion",
    "MixedExample",
    "mixed_graphs",
    "RepBranches",
    "PreNormConv",
    "BlockExample",
    "branchy_blocks",
    "assert_fuses_exactly",
]


class Contraction(nn.Module):
    """An elementwise map ``f`` with ``|f(y)| <= |y|`` and Lipschitz constant 1, unknown to the front end.

    ``kind`` is ``"tanh"``, ``"hardtanh"``, ``"softsign"`` or ``"leaky"``.  In a
    graph it is an ``opaque`` node (fusion must carry it through untouched);
    the two properties let :func:`magnitude_through` bound errors across it.
    """

    KINDS = ("tanh", "hardtanh", "softsign", "leaky")

    def __init__(self, kind: str = "tanh") -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"unknown contraction {kind!r}; one of {self.KINDS}")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "tanh":
            return torch.tanh(x)
        if self.kind == "hardtanh":
            return x.clamp(-1.0, 1.0)
        if self.kind == "softsign":
            return x / (1 + x.abs())
        return torch.where(x >= 0, x, 0.1 * x)

    def extra_repr(self) -> str:
        return self.kind


NONLINEAR_LIPSCHITZ: dict[str, float] = {"relu": 1.0, "gelu": 1.13}
"""Lipschitz constants of the non-linear ops :func:`magnitude_through` knows; each also has ``|f(y)| <= |y|``.

(GELU: ``y * Phi(y)``, derivative ``Phi(y) + y phi(y)`` at most 1.129.)
"""


def magnitude_through(graph: Graph, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """:func:`magnitude` extended through non-linear ops: relu, gelu and :class:`Contraction` opaque nodes.

    For such an ``f`` with ``|f(y)| <= |y|`` and Lipschitz constant ``L >= 1``,
    ``M_out = L * M_in`` bounds both the value (``|f(y)| <= |y| <= M_in``) and
    the error carried through (``|f(y) - f(y')| <= L |y - y'|``), so an error
    within ``tol * M`` before the op is within ``tol * M`` after it.  Other
    ops as in :func:`magnitude`.
    """
    env: dict[int, torch.Tensor] = {id(v): t.to(torch.float64).abs() for v, t in zip(graph.inputs, inputs)}
    for n in graph.nodes:
        ms = [env[id(i)] for i in n.inputs]
        if n.op in NONLINEAR_LIPSCHITZ:
            env[id(n.out)] = NONLINEAR_LIPSCHITZ[n.op] * ms[0]
        elif n.op == "opaque" and isinstance(n.attrs["fn"], Contraction):
            env[id(n.out)] = ms[0]
        else:
            env[id(n.out)] = _magnitude_op(n, ms)
    outs = tuple(env[id(o)] for o in graph.outputs)
    return outs[0] if len(outs) == 1 else outs


def assert_graphs_equal_through(
    g1: Graph,
    g2: Graph,
    x: torch.Tensor | Sequence[torch.Tensor],
    dtype: torch.dtype,
    *,
    depth: int = 1,
    what: str = "",
) -> None:
    """:func:`assert_graphs_equal` for graphs with non-linear ops between their linear regions.

    The bound is the same elementwise ``|y1 - y2| <= tol * M`` with ``M`` from
    :func:`magnitude_through`, and both tolerances multiplied by ``depth``:
    the largest number of fused regions on one path from an input to an
    output.  Each fused region rounds its folded parameters once (and its own
    arithmetic in the ``dtype`` run), and those errors add up along a path
    (the Lipschitz factors are already in ``M``).
    """
    xs = (x,) if torch.is_tensor(x) else tuple(x)
    x64 = [t.detach().to(torch.float64) for t in xs]
    m = tuple(
        torch.maximum(a, b) for a, b in zip(_as_tuple(magnitude_through(g1, *x64)), _as_tuple(magnitude_through(g2, *x64)))
    )
    _assert_runs_close(g1, g2, xs, m, dtype, depth, what)

# --------------------------------------------------------------------------- random DAGs of regions


@dataclass
class MixedRegion:
    """One maximal linear region of a :class:`MixedExample`, as the generator built it.

    Its nodes are those whose ``source`` is ``prefix`` or starts with
    ``prefix + "."`` (rules name a merged node after the common prefix of what
    it replaces, so fused nodes keep the prefix).  ``expected`` is the op
    count of those nodes after fusion: ``{"conv2d": 1}`` for a foldable conv
    region, what must stay for one that cannot fold exactly.  ``reason`` is
    part of the left-alone reason fusion must report for an unfoldable one.
    """

    prefix: str
    kind: str
    foldable: bool
    expected: dict[str, int]
    reason: str = ""
    desc: list[str] = field(default_factory=list)

    def owns(self, node: Node) -> bool:
        """Whether ``node`` belongs to this region (by its source path)."""
        return node.source == self.prefix or node.source.startswith(self.prefix + ".")


@dataclass(eq=False)
class MixedExample:
    """A generated DAG of linear regions joined by non-linear and opaque ops (see :func:`mixed_graphs`).

    ``between`` is the op count of the nodes outside every region (relu,
    gelu, opaque, and ``add`` s joining a region with an earlier value):
    fusion must leave them all.  ``depth`` bounds the number of regions on
    any input-to-output path (for :func:`assert_graphs_equal_through`).
    """

    graph: Graph
    x: torch.Tensor
    dtype: torch.dtype
    regions: list[MixedRegion]
    between: dict[str, int]
    depth: int

    def region_counts(self, graph: Graph) -> dict[str, dict[str, int]]:
        """Per region prefix, the op counts of ``graph``'s nodes that belong to it."""
        out = {}
        for r in self.regions:
            counts: dict[str, int] = {}
            for n in graph.nodes:
                if r.owns(n):
                    counts[n.op] = counts.get(n.op, 0) + 1
            out[r.prefix] = dict(sorted(counts.items()))
        return out

    def between_counts(self, graph: Graph) -> dict[str, int]:
        """Op counts of ``graph``'s nodes outside every region."""
        counts: dict[str, int] = {}
        for n in graph.nodes:
            if not any(r.owns(n) for r in self.regions):
                counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items()))

    def __repr__(self) -> str:
        lines = [f"MixedExample(dtype={self.dtype}, x={tuple(self.x.shape)}, depth={self.depth})"]
        for r in self.regions:
            lines.append(f"  {r.prefix} [{r.kind}{'' if r.foldable else ', unfoldable'}] {r.desc} -> {r.expected}")
        return "\n".join(lines + [str(self.graph)])


class _PrefixGen(_Gen):
    """:class:`_Gen` adding to a shared builder, naming sources under ``prefix``."""

    def __init__(self, draw, dtype: torch.dtype, b: GraphBuilder, prefix: str):
        super().__init__(draw, dtype)
        self.b = b
        self.prefix = prefix

    def src(self, kind: str) -> str:
        self.n += 1
        return f"{self.prefix}.b{self.n}.{kind}"


def _weights(shape, seed: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)


def _branchy_region(draw, gen: _PrefixGen, v: Value, max_branches: int) -> Value:
    """A foldable branchy region (one conv) on input ``v``: the body of :func:`linear_graphs` and the fuzzers' regions."""
    n, c, h, w = v.shape
    if draw(st.booleans()):
        stride, out = 1, (h, w)
    else:
        stride = draw(st.sampled_from(STRIDES))
        out = (draw(st.integers(1, (h - 1) // stride + 1)), draw(st.integers(1, (w - 1) // stride + 1)))
    # A reach that lands on that grid: (size - 1 + reach) // stride + 1 == out, one of `stride` values per axis.
    reach = tuple(stride * (o - 1) - (n - 1) + draw(st.integers(0, stride - 1)) for o, n in zip(out, (h, w)))
    r = _Region(v, c, stride, (h, w), out, reach)
    first: list[Callable[[_Region], Value]] = [gen.conv_branch, gen.pad_conv_branch, gen.seq_branch]
    if c >= 2:
        first.append(gen.concat_branch)
    others = list(first)
    if _feasible_pools(r):
        others.append(gen.pool_branch)
    if r.same_grid:
        others += [gen.bn_branch, gen.identity_branch]
    branches = [draw(st.sampled_from(first))(r)]
    branches += [draw(st.sampled_from(others))(r) for _ in range(draw(st.integers(0, max_branches - 1)))]
    residual = r.same_grid and draw(st.booleans())
    if residual:
        r.covers((1, 1), (1, 1), (0, 0, 0, 0))
    if len(r.windows) > 1:  # more than one conv's taps to merge (a concat has two)
        # Merging branches can take more work than the branches (3x3 convs of rates 1 and 2 make a dense
        # 5x5): fuse merges them only where their one conv is no dearer, as beside a kernel that spans
        # them all, the main conv of every reparameterized block.
        main = r.dominant()
        gen.desc.append(f"main {_short(main)}")
        branches.insert(draw(st.integers(0, len(branches))), gen.conv(v, main, gen.src("main")))
    y = branches[0]
    for z in branches[1:]:
        op = draw(st.sampled_from(["add", "sub"]))
        gen.desc.append(op)
        y = getattr(gen.b, op)(y, z, source=gen.src(op))
    tail = draw(st.sampled_from(["none", "scale", "bn"]))
    if tail == "scale":
        y = gen.scale(y, f"{gen.prefix}.ls")
    elif tail == "bn":
        y = gen.bn(y, f"{gen.prefix}.norm")
    if tail != "none":
        gen.desc.append(f"then {tail}")
    if residual:
        y = gen.b.add(v, y, source=f"{gen.prefix}.residual")
        gen.desc.append("x + region")
    return y


_SAME_KERNELS = [(1, 1), (3, 3), (1, 3), (3, 1), (5, 5), (3, 5)]


def _same_conv(draw, cin: int, cout: int, size: tuple[int, int], padded: bool = True) -> ConvSpec:
    """A stride-1 conv keeping the grid ("same" padding, odd kernel), groups dividing both channel counts."""
    kh, kw = draw(st.sampled_from([k for k in _SAME_KERNELS if k != (1, 1)] if padded else [(1, 1)]))
    g = draw(st.sampled_from(_divisors(gcd(cin, cout))))
    return ConvSpec(cin, cout, g, (kh, kw), padding=(kh // 2, kh // 2, kw // 2, kw // 2), bias=draw(st.booleans()), height=size[0], width=size[1])


def _mixed_region(draw, b: GraphBuilder, v: Value, kind: str, prefix: str, dtype: torch.dtype) -> tuple[Value, MixedRegion]:
    """Build one region of ``kind`` on ``v``; returns its output and what fusion must make of it."""
    n, c, h, w = v.shape
    seed = lambda: draw(seeds())  # noqa: E731
    gen = _PrefixGen(draw, dtype, b, prefix)
    if kind == "branchy":
        y = _branchy_region(draw, gen, v, 3)
        return y, MixedRegion(prefix, kind, True, {"conv2d": 1}, desc=gen.desc)
    if kind == "proj":  # conv c -> c2 (+ BN) (+ layer scale): one conv
        c2 = draw(st.integers(1, 8))
        s = draw(st.sampled_from(STRIDES))
        out = (draw(st.integers(1, (h - 1) // s + 1)), draw(st.integers(1, (w - 1) // s + 1)))
        spec = draw(conv_specs_onto((h, w), out, s, in_channels=c, out_channels=c2))
        y = gen.conv(v, spec, f"{prefix}.conv")
        desc = [_short(spec)]
        if draw(st.booleans()):
            y, desc = gen.bn(y, f"{prefix}.bn"), desc + ["bn"]
        if draw(st.booleans()):
            y, desc = gen.scale(y, f"{prefix}.ls"), desc + ["ls"]
        return y, MixedRegion(prefix, kind, True, {"conv2d": 1}, desc=desc)
    if kind == "bn_padded_conv":  # BN before a zero-padding conv: must stay (BN(0) != 0 at the border)
        spec = _same_conv(draw, c, draw(st.integers(1, 8)), (h, w))
        y = gen.conv(gen.bn(v, f"{prefix}.bn"), spec, f"{prefix}.conv")
        desc = ["bn", _short(spec)]
        if draw(st.booleans()):
            y, desc = gen.bn(y, f"{prefix}.post"), desc + ["bn"]
        return y, MixedRegion(prefix, kind, False, {"batch_norm": 1, "conv2d": 1}, "bn_before_conv: the conv after it zero-pads", desc)
    if kind == "biased_1x1_padded":  # 1x1 with a bias before a zero-padding kxk: must stay two convs
        mid = draw(st.integers(1, 8))
        pw = ConvSpec(c, mid, 1, (1, 1), bias=True, height=h, width=w)
        spec = _same_conv(draw, mid, draw(st.integers(1, 8)), (h, w))
        y = gen.conv(gen.conv(v, pw, f"{prefix}.pw"), spec, f"{prefix}.kxk")
        return y, MixedRegion(prefix, kind, False, {"conv2d": 2}, "seq_merge: the 1x1 conv has a bias", ["biased 1x1", _short(spec)])
    if kind == "pool_no_count":  # avg pool dividing by fewer elements at the border, beside a conv: must stay
        k = draw(st.sampled_from([(3, 3), (3, 1), (1, 3), (5, 3)]))
        pool = b.avg_pool2d(v, kernel=k, stride=(1, 1), padding=(k[0] // 2, k[1] // 2), count_include_pad=False, source=f"{prefix}.pool")
        spec = _same_conv(draw, c, c, (h, w), padded=draw(st.booleans()))
        y = b.add(gen.conv(v, spec, f"{prefix}.conv"), pool, source=f"{prefix}.sum")
        return y, MixedRegion(
            prefix, kind, False, {"add": 1, "avg_pool2d": 1, "conv2d": 1}, "avg_pool_to_conv: count_include_pad=False", [f"avgpool{k} no-count", _short(spec)]
        )
    if kind == "pad_value":  # a constant pad with a non-zero value before a conv: must stay
        pads = draw(st.tuples(*[st.integers(0, 2)] * 4).filter(any))
        value = draw(st.sampled_from([1.0, -0.5, 2.0]))
        p = b.pad(v, pads=pads, value=value, source=f"{prefix}.pad")
        k = (draw(st.integers(1, min(3, p.shape[2]))), draw(st.integers(1, min(3, p.shape[3]))))
        spec = ConvSpec(c, draw(st.integers(1, 8)), 1, k, bias=draw(st.booleans()), height=p.shape[2], width=p.shape[3])
        y = gen.conv(p, spec, f"{prefix}.conv")
        return y, MixedRegion(prefix, kind, False, {"conv2d": 1, "pad": 1}, "pad_absorb: pads with", [f"pad{pads}={value}", _short(spec)])
    if kind == "tokens":  # [BN] -> tokens -> Linear -> [affine] -> back to NCHW: one Linear among layout ops
        c2 = draw(st.integers(1, 8))
        desc = []
        y = v
        if draw(st.booleans()):
            y, desc = gen.bn(y, f"{prefix}.norm"), ["bn"]
        y = b.transpose(b.flatten(y, start=2, source=f"{prefix}.flat"), dim0=1, dim1=2, source=f"{prefix}.t1")
        y = b.linear(y, weight=_weights((c2, c), seed(), dtype, c**-0.5), bias=_weights((c2,), seed(), dtype) if draw(st.booleans()) else None, source=f"{prefix}.fc")
        after = draw(st.sampled_from(["none", "scale_tokens", "bn_channels", "bn_image"]))
        if after == "scale_tokens":
            y = b.scale(y, scale=_weights((c2,), seed(), dtype), axis=-1, source=f"{prefix}.ls")
        y = b.transpose(y, dim0=1, dim1=2, source=f"{prefix}.t2")
        if after == "bn_channels":
            y = gen.bn(y, f"{prefix}.bn")
        y = b.reshape(y, shape=(n, c2, h, w), source=f"{prefix}.unflat")
        if after == "bn_image":
            y = gen.bn(y, f"{prefix}.bn")
        desc += [f"linear {c}->{c2}", after]
        return y, MixedRegion(prefix, kind, True, {"flatten": 1, "linear": 1, "reshape": 1, "transpose": 2}, desc=desc)
    raise ValueError(kind)


FOLDABLE_KINDS = ("branchy", "proj", "tokens")
UNFOLDABLE_KINDS = ("bn_padded_conv", "biased_1x1_padded", "pool_no_count", "pad_value")


@st.composite
def mixed_graphs(draw, dtype=None, max_regions: int = 4, unfoldable: bool = True, head=None) -> MixedExample:
    """A random DAG of linear regions with ReLU/GELU and opaque modules between them (an IR graph).

    One input (batch 1-2, channels 1-8, 2-8 x 2-8).  Then 1 to ``max_regions``
    regions; each reads the graph input or the output of an earlier boundary
    (fan-out: several regions may read one value), and is followed by a
    boundary: ``relu``, ``gelu`` or an ``opaque`` :class:`Contraction`.
    Before its boundary a region's output is sometimes added to an earlier
    boundary value of the same shape (a skip connection across non-linear
    ops, which no rule may fold).  Boundary values nothing reads are graph
    outputs, so no node is dead.  Optionally (``head``: drawn when ``None``)
    a classifier head ends the graph: global mean, [BN], Linear, [BN],
    [layer scale], which folds to the mean and one Linear.

    Each region records (:class:`MixedRegion`) whether it is foldable *by
    construction* and the op counts fusion must leave in it:

    * foldable: ``branchy`` (the branchy regions of :func:`linear_graphs`:
      conv/BN/pad/1x1-kxk/concat/pool/identity branches summed, tail BN or
      layer scale, residual) and ``proj`` (a conv changing the channel count,
      with BN and layer scale) end as one ``conv2d``; ``tokens`` (BN, flatten
      and transpose to tokens, Linear, a layer scale or BN on the features,
      back to NCHW) ends as one ``linear`` among its layout ops;
    * not foldable exactly (with ``unfoldable``): ``bn_padded_conv`` (a BN
      before a zero-padding conv), ``biased_1x1_padded`` (a biased 1x1
      before a zero-padding kxk), ``pool_no_count`` (an average pool with
      ``count_include_pad=False`` beside a conv), ``pad_value`` (a pad with a
      non-zero value before a conv): what makes them unfoldable must stay,
      with the reason in the report.
    """
    dtype = _value(draw, dtype, float_dtypes())
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 8))
    h, w = draw(st.integers(2, 8)), draw(st.integers(2, 8))
    b = GraphBuilder()
    x = b.input("x", (n, c, h, w), dtype)
    live: list[Value] = [x]  # boundary values a region may read
    depth = {id(x): 0}
    read: set[int] = set()
    regions: list[MixedRegion] = []
    between: dict[str, int] = {}
    kinds = FOLDABLE_KINDS + (UNFOLDABLE_KINDS if unfoldable else ())

    def count(op):
        between[op] = between.get(op, 0) + 1

    for i in range(draw(st.integers(1, max_regions))):
        v = draw(st.sampled_from(live))
        read.add(id(v))
        kind = draw(st.sampled_from(kinds))
        y, region = _mixed_region(draw, b, v, kind, f"r{i}", dtype)
        regions.append(region)
        d = depth[id(v)] + 1
        skips = [u for u in live if u is not v and u.shape == y.shape]
        if skips and draw(st.booleans()):
            u = draw(st.sampled_from(skips))
            read.add(id(u))
            d = max(d, depth[id(u)])
            y = b.add(y, u, source=f"skip{i}")
            region.desc.append(f"+ {u.name}")
            count("add")
        act = draw(st.sampled_from(["relu", "gelu", "opaque"]))
        if act == "opaque":
            y = b.opaque(y, fn=Contraction(draw(st.sampled_from(Contraction.KINDS))), out_shape=y.shape, out_dtype=y.dtype, source=f"act{i}")
        else:
            y = b.node(act, y, source=f"act{i}")
        count(act)
        depth[id(y)] = d
        live.append(y)
    outputs = [u for u in live if id(u) not in read]
    if _value(draw, head, st.booleans()):
        v = draw(st.sampled_from(live))
        prefix = f"r{len(regions)}"
        gen = _PrefixGen(draw, dtype, b, prefix)
        y = b.mean(v, dims=(2, 3), source=f"{prefix}.pool")
        cv = v.shape[1]
        desc = ["mean"]
        if draw(st.booleans()):
            y, desc = gen.bn(y, f"{prefix}.bn_in"), desc + ["bn"]
        k = draw(st.integers(1, 8))
        y = b.linear(y, weight=_weights((k, cv), draw(seeds()), dtype, cv**-0.5), bias=_weights((k,), draw(seeds()), dtype) if draw(st.booleans()) else None, source=f"{prefix}.fc")
        desc.append(f"linear {cv}->{k}")
        if draw(st.booleans()):
            y, desc = gen.bn(y, f"{prefix}.bn_out"), desc + ["bn"]
        if draw(st.booleans()):
            y, desc = gen.scale(y, f"{prefix}.ls"), desc + ["ls"]
        regions.append(MixedRegion(prefix, "head", True, {"linear": 1, "mean": 1}, desc=desc))
        depth[id(y)] = depth[id(v)] + 1
        if v in outputs:
            outputs.remove(v)
        outputs.append(y)
    xt = random_input((n, c, h, w), dtype, draw(seeds()))
    return MixedExample(b.build(*outputs), xt, dtype, regions, dict(sorted(between.items())), max(depth[id(o)] for o in outputs))


# --------------------------------------------------------------------------- user-style blocks (nn.Module)


class RepBranches(nn.Module):
    """A reparameterizable block written the way users write one.

    ``forward`` sums the branches (each an ordinary module of ``x``), then
    applies the optional ``post`` module (a BatchNorm), multiplies by the
    optional layer scale parameter ``gamma`` of shape ``(C, 1, 1)``, adds the
    input back when ``residual``, and ends with the optional ``act``.
    """

    def __init__(
        self,
        branches: Sequence[nn.Module],
        *,
        post: nn.Module | None = None,
        layer_scale: int | None = None,
        residual: bool = False,
        act: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.post = post
        self.gamma = nn.Parameter(torch.ones(layer_scale, 1, 1)) if layer_scale else None
        self.residual = residual
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        if self.post is not None:
            out = self.post(out)
        if self.gamma is not None:
            out = out * self.gamma
        if self.residual:
            out = x + out
        if self.act is not None:
            out = self.act(out)
        return out


class PreNormConv(nn.Module):
    """BatchNorm, then a zero-padding conv: *not* foldable exactly (the border sees 0, not ``BN(0)``)."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int], groups: int = 1, act: nn.Module | None = None) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, kernel, padding=(kernel[0] // 2, kernel[1] // 2), groups=groups)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.norm(x))
        return y if self.act is None else self.act(y)


@dataclass(eq=False)
class BlockExample:
    """A generated model (:func:`branchy_blocks`), an input, and what fusing it must leave.

    ``convs`` and ``batch_norms`` are the numbers of ``nn.Conv2d`` /
    BatchNorm modules in the fused model: one conv per foldable block, a BN
    and a conv per :class:`PreNormConv`.  ``unfoldable`` lists the module
    paths of the blocks that cannot fold.
    """

    model: nn.Module
    x: torch.Tensor
    convs: int
    batch_norms: int
    unfoldable: list[str] = field(default_factory=list)
    desc: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"BlockExample(x={tuple(self.x.shape)}, convs={self.convs}, batch_norms={self.batch_norms}, blocks={self.desc})"


def _conv_bn(cin: int, cout: int, kernel: tuple[int, int], stride: int, groups: int, dilation: int = 1) -> nn.Sequential:
    pad = (dilation * (kernel[0] // 2), dilation * (kernel[1] // 2))
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, pad, dilation=dilation, groups=groups, bias=False), nn.BatchNorm2d(cout))


def _draw_branch(draw, kind: str, cin: int, cout: int, stride: int) -> tuple[nn.Module, str]:
    """One branch of a block: maps ``cin`` channels to ``cout`` on the block's output grid ("same" padding)."""
    g = draw(st.sampled_from(_divisors(gcd(cin, cout))))
    if kind == "conv_bn":
        k = draw(st.sampled_from([1, 3, 5]))
        return _conv_bn(cin, cout, (k, k), stride, g), f"conv{k}x{k}-bn g{g}"
    if kind == "asymmetric":
        k = draw(st.sampled_from([3, 5]))
        kernel = draw(st.sampled_from([(1, k), (k, 1)]))
        return _conv_bn(cin, cout, kernel, stride, g), f"conv{kernel[0]}x{kernel[1]}-bn g{g}"
    if kind == "dilated":
        d = draw(st.sampled_from([2, 3]))
        return _conv_bn(cin, cout, (3, 3), stride, g, d), f"conv3x3 d{d}-bn g{g}"
    if kind == "conv1x1":
        return nn.Conv2d(cin, cout, 1, stride, groups=g, bias=draw(st.booleans())), f"conv1x1 g{g}"
    if kind == "seq":  # DBB's 1x1 -> kxk branch: no bias between them (the kxk zero-pads)
        k = draw(st.sampled_from([3, 5]))
        mid = draw(st.integers(cin, max(cin, 8)))
        return nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), *_conv_bn(mid, cout, (k, k), stride, 1)), f"1x1({mid})-conv{k}x{k}-bn"
    if kind == "pool":
        k = draw(st.sampled_from([3, 5]))
        return nn.AvgPool2d(k, stride, k // 2), f"avgpool{k}"
    if kind == "bn":
        return nn.BatchNorm2d(cin), "bn"
    if kind == "identity":
        return nn.Identity(), "identity"
    raise ValueError(kind)


def _main_branch(branches: list[nn.Module], cin: int, cout: int, stride: int) -> tuple[nn.Module, str]:
    """The conv-BN a block's branches fold into, as a branch of its own (a RepVGG block's 3x3): it spans every
    branch's taps ("same" padding, so all are centred), on their lattice, with the gcd of their groups."""
    windows, groups = [], []
    for m in branches:
        convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
        if convs:
            k, d = convs[-1].kernel_size, convs[-1].dilation
            groups.append(convs[-1].groups)
        else:
            k, d = (getattr(m, "kernel_size", 1),) * 2, (1, 1)
        windows.append(Window((stride, stride), tuple(-(k[a] - 1) * d[a] // 2 for a in (0, 1)), d, k))
    u = union_window(windows)
    d = u.step[0] if u.step[0] == u.step[1] else 1  # _conv_bn dilates both axes alike
    kernel = tuple((u.count[a] - 1) * u.step[a] // d + 1 for a in (0, 1))
    g = gcd(*groups)
    return _conv_bn(cin, cout, kernel, stride, g, d), f"main conv{kernel[0]}x{kernel[1]}{f' d{d}' * (d > 1)}-bn g{g}"


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Reproducible weights (1/sqrt(fan-in)), biases, BN statistics (var in [0.3, 3]), layer scales."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda shape: torch.randn(shape, generator=gen, dtype=torch.float64)  # noqa: E731
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(rnd(m.weight.shape) / m.weight[0].numel() ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.5 * rnd(m.bias.shape))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(0.5 * rnd(c))
                m.running_var.copy_(0.3 + 2.7 * torch.rand(c, generator=gen, dtype=torch.float64))
                m.weight.copy_(rnd(c))
                m.bias.copy_(0.5 * rnd(c))
            elif isinstance(m, RepBranches) and m.gamma is not None:
                m.gamma.copy_(rnd(m.gamma.shape))
    return model.eval()


@st.composite
def branchy_blocks(draw, max_blocks: int = 3, unfoldable: bool = True) -> BlockExample:
    """A random model of reparameterizable blocks written as ordinary ``nn.Module`` s (a :class:`BlockExample`).

    An ``nn.Sequential`` of 1 to ``max_blocks`` blocks on a 1-2 x 1-8 x 3-8 x
    3-8 input (float32).  Most blocks are :class:`RepBranches`: 1 to 4
    branches summed, the first a conv-type one, drawn from conv-BN (1x1, 3x3,
    5x5, grouped and depthwise), asymmetric 1xk / kx1 conv-BN (ACNet),
    dilated conv-BN, a plain 1x1 conv, a 1x1 -> kxk conv-BN (DBB), and where
    the block keeps channels and grid, an avg pool, a BN (RepVGG's identity)
    and ``nn.Identity``; stride 1 or 2, "same" padding; then an optional BN,
    layer scale, residual, and an activation (ReLU, GELU, or a
    :class:`Contraction` the front end does not know).  Each folds to one
    conv.  With ``unfoldable``, some blocks are :class:`PreNormConv` (a BN
    before a padded conv), which must keep their BN.  Weights, biases, BN
    statistics and layer scales are drawn from a seed.
    """
    batch, c = draw(st.integers(1, 2)), draw(st.integers(1, 8))
    h, w = draw(st.integers(3, 8)), draw(st.integers(3, 8))
    x = random_input((batch, c, h, w), torch.float32, draw(seeds()))
    blocks, desc, unfold = [], [], []
    convs = bns = 0
    for i in range(draw(st.integers(1, max_blocks))):
        act = draw(st.sampled_from(["relu", "gelu", "contraction"]))
        act_mod = {"relu": nn.ReLU(), "gelu": nn.GELU()}.get(act) or Contraction(draw(st.sampled_from(Contraction.KINDS)))
        if unfoldable and draw(st.integers(0, 3)) == 0:
            cout = draw(st.integers(1, 8))
            kernel = draw(st.sampled_from([(3, 3), (1, 3), (3, 1)]))
            g = draw(st.sampled_from(_divisors(gcd(c, cout))))
            blocks.append(PreNormConv(c, cout, kernel, g, act_mod))
            desc.append(f"prenorm conv{kernel} g{g} {c}->{cout}")
            unfold.append(str(i))
            convs, bns, c = convs + 1, bns + 1, cout
            continue
        cout = draw(st.sampled_from([c, draw(st.integers(1, 8))]))
        stride = draw(st.sampled_from([1, 1, 2]))
        keeps = cout == c and stride == 1
        first = draw(st.sampled_from(["conv_bn", "asymmetric", "dilated", "conv1x1", "seq"]))
        others = ["conv_bn", "asymmetric", "dilated", "conv1x1", "seq"] + (["pool", "bn", "identity"] if keeps else [])
        kinds = [first] + [draw(st.sampled_from(others)) for _ in range(draw(st.integers(0, 3)))]
        branches, names = (list(t) for t in zip(*(_draw_branch(draw, k, c, cout, stride) for k in kinds)))
        post = nn.BatchNorm2d(cout) if draw(st.booleans()) else None
        ls = cout if draw(st.booleans()) else None
        residual = keeps and draw(st.booleans())
        if len(branches) + residual > 1:  # fuse merges branches only where that is no dearer: beside a main conv
            main, name = _main_branch(branches + [nn.Identity()] * residual, c, cout, stride)
            at = draw(st.integers(0, len(branches)))
            branches.insert(at, main)
            names.insert(at, name)
        blocks.append(RepBranches(list(branches), post=post, layer_scale=ls, residual=residual, act=act_mod))
        desc.append(
            " + ".join(names) + f" s{stride} {c}->{cout}" + (" +bn" if post else "") + (" +ls" if ls else "") + (" +x" if residual else "") + f" {act}"
        )
        convs, c = convs + 1, cout
        h, w = (h - 1) // stride + 1, (w - 1) // stride + 1
    model = _randomize(nn.Sequential(*blocks), draw(seeds()))
    return BlockExample(model, x, convs, bns, unfold, desc)


# --------------------------------------------------------------------------- assert_fuses_exactly


def _unfolded_batch_norms(graph: Graph) -> list[str]:
    """BN nodes of a fused graph that sit in a foldable place: next to a conv/Linear they fold into, or beside a conv."""
    from repalgebra.layout import LAYOUT_OPS

    problems = []
    for n in graph.nodes:
        if n.op != "batch_norm":
            continue
        where = f"BatchNorm at {n.source or '<graph>'}"
        # A conv or Linear before it (through layout ops), read by nothing else: bn_fold / linear_affine_fold.
        v = n.x
        while v.producer is not None and v.producer.op in LAYOUT_OPS and graph.num_uses(v) == 1:
            v = v.producer.x
        p = v.producer
        if p is not None and p.op in ("conv2d", "linear") and graph.num_uses(v) == 1:
            problems.append(f"{where} follows the {p.op} at {p.source or '<graph>'} and was not folded into it")
            continue
        # Read only by an unpadded conv or (through layout ops) a Linear: bn_before_conv / bn_into_linear.
        users = graph.users(n.out)
        while len(users) == 1 and users[0].op in LAYOUT_OPS and graph.num_uses(users[0].out) == 1:
            users = graph.users(users[0].out)
        if graph.num_uses(n.out) == 1 and len(users) == 1:
            u = users[0]
            if (u.op == "conv2d" and u.x is n.out and not any(u.attrs["padding"])) or u.op == "linear":
                problems.append(f"{where} feeds the {u.op} at {u.source or '<graph>'} (no padding) and was not folded into it")
                continue
        # An operand of a sum/concat beside a conv or BN of the same input: bn_to_conv.
        for j in graph.users(n.out):
            if j.op in ("add", "sub", "concat"):
                for other in j.inputs:
                    q = other.producer
                    if other is not n.out and q is not None and q.op in ("conv2d", "batch_norm") and q.x is n.x:
                        problems.append(f"{where} is summed beside the {q.op} at {q.source or '<graph>'} of the same input and was not folded")
                        break
    return problems


def assert_fuses_exactly(
    module: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    dtype: torch.dtype = torch.float64,
    *,
    rtol: float | None = None,
    n_random: int = 2,
    leaf_modules: Sequence[Any] = (),
) -> nn.Module:
    """Assert that ``repalgebra.fuse`` folds ``module`` exactly; for users' own pytest suites.

    A deep copy of ``module`` is cast to ``dtype`` (float64 by default: then
    the check sees fusion's own error, ~1e-15, and nothing of float32
    rounding) and put in eval mode; ``module`` itself is not changed.  It is
    fused at ``example_inputs`` (cast to ``dtype``) and

    * the fused model must match the copy on ``example_inputs`` and on
      ``n_random`` random inputs of the same shapes: per output,
      ``max |fused - ref| <= rtol * max |ref|`` with ``rtol`` 1e-9 for float64
      (else :data:`repalgebra.verify.TOLERANCES` of ``dtype``);
    * no BatchNorm may remain in a foldable place of the fused model: after
      a conv or Linear it could fold into (whose output nothing else reads),
      before an unpadded conv or a Linear that alone reads it, or summed
      beside a conv or BN of the same input.  BatchNorms that cannot fold
      exactly (before a zero-padding conv, after a ReLU, with batch
      statistics) may stay.

    Returns the fused module.  Example::

        from repalgebra.testing import assert_fuses_exactly

        def test_my_block_fuses():
            assert_fuses_exactly(MyBlock(64), torch.randn(1, 64, 14, 14))
    """
    from torch.utils import _pytree as pytree

    from repalgebra.frontend.torch import trace
    from repalgebra.fuse import fuse
    from repalgebra.verify import TOLERANCES, verify

    if rtol is None:
        rtol = 1e-9 if dtype == torch.float64 else TOLERANCES[dtype]
    xs = (example_inputs,) if torch.is_tensor(example_inputs) else tuple(example_inputs)
    xs = tuple(t.detach().to(dtype) if t.is_floating_point() else t for t in xs)
    model = _copy.deepcopy(module).to(dtype).eval()
    fused = fuse(model, xs, leaf_modules=leaf_modules)
    report = fused.fuse_report
    with torch.no_grad():
        ref, ref_spec = pytree.tree_flatten(model(*xs))
        got, got_spec = pytree.tree_flatten(fused(*xs))
    assert ref_spec == got_spec, f"fused model returns {got_spec}, the model {ref_spec}\n{report}"
    for k, (a, b) in enumerate(zip(ref, got)):
        if not torch.is_tensor(a):
            assert a == b, f"output {k}: {b!r} instead of {a!r}\n{report}"
            continue
        assert a.shape == b.shape, f"output {k}: shape {tuple(b.shape)} instead of {tuple(a.shape)}\n{report}"
        assert bool(torch.isfinite(b).all()) or not bool(torch.isfinite(a).all()), f"output {k}: NaN or Inf after fusion\n{report}"
        err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        scale = a.double().abs().max().item() if a.numel() else 0.0
        assert err <= rtol * scale, (
            f"output {k}: fused model differs by {err:.3e} (max |ref| {scale:.3e}, relative {err / max(scale, 1e-300):.3e} "
            f"> {rtol:.0e}) on the example inputs ({dtype})\n{report}"
        )
    if n_random:
        vr = verify(model, fused, xs, n=n_random, dtype=dtype, tolerance=rtol)
        assert vr, f"fused model differs on random inputs:\n{vr}\n{report}"
    problems = _unfolded_batch_norms(trace(fused, xs, leaf_modules=leaf_modules))
    assert not problems, "BatchNorm left in a foldable place:\n  " + "\n  ".join(problems) + f"\n{report}"
    return fused


# --------------------------------------------------------------------------- plain conv nets (repalgebra.expand)

__all__ += ["PlainNet", "plain_conv_nets"]

PLAIN_KERNELS = ((1, 1), (3, 3), (3, 3), (5, 5), (1, 3), (3, 1), (3, 5), (2, 2))


@dataclass(frozen=True)
class PlainNet:
    """A plain conv net drawn by :func:`plain_conv_nets`: the model (float64, eval mode), an input shape, one line per conv."""

    model: nn.Sequential
    input_shape: tuple[int, int, int, int]
    convs: tuple[str, ...]

    def __repr__(self) -> str:
        return f"PlainNet(input {self.input_shape}: " + "; ".join(self.convs) + ")"


@st.composite
def plain_conv_nets(draw, max_convs: int = 4) -> PlainNet:
    """A random plain CNN, what :func:`repalgebra.expand` takes: an ``nn.Sequential`` of conv [+ BN] + ReLU layers.

    Each conv: 1-8 output channels, a kernel from :data:`PLAIN_KERNELS` (odd and
    even, square and not), stride 1 or 2, groups dividing both channel counts
    (depthwise when they are equal), dilation 1 or (rarely) 2, padding usually
    half the (dilated) kernel and sometimes 0, with or without a bias, followed
    by a BN (random statistics) or not.  Weights drawn from a seed; float64, eval mode.
    """
    gen = torch.Generator().manual_seed(draw(seeds()))
    channels, size = draw(st.integers(1, 6)), draw(st.integers(5, 10))
    c, h, w = channels, size, size
    layers: list[nn.Module] = []
    convs = []
    for _ in range(draw(st.integers(1, max_convs))):
        (kh, kw), stride = draw(st.sampled_from(PLAIN_KERNELS)), draw(st.sampled_from((1, 1, 2)))
        dilation = draw(st.sampled_from((1, 1, 1, 1, 2)))
        out = draw(st.sampled_from((c, c, *range(1, 9))))
        groups = draw(st.sampled_from(_divisors(gcd(c, out))))
        padding = (dilation * (kh // 2), dilation * (kw // 2)) if draw(st.integers(0, 4)) else (0, 0)
        oh, ow = ((n + 2 * p - dilation * (k - 1) - 1) // stride + 1 for n, p, k in zip((h, w), padding, (kh, kw)))
        if oh < 1 or ow < 1:
            continue
        bias, bn = draw(st.booleans()), draw(st.booleans())
        conv = nn.Conv2d(c, out, (kh, kw), stride, padding, dilation, groups, bias=bias, dtype=torch.float64)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64) / (c // groups * kh * kw) ** 0.5)
            if bias:
                conv.bias.copy_(0.2 * torch.randn(out, generator=gen, dtype=torch.float64))
        layers.append(conv)
        if bn:
            layers.append(_random_bn(out, gen))
        layers.append(nn.ReLU())
        convs.append(f"{c}->{out} {kh}x{kw}/s{stride} p{padding} d{dilation} g{groups}" + " bias" * bias + " +BN" * bn)
        c, h, w = out, oh, ow
    assume(convs)
    return PlainNet(nn.Sequential(*layers).eval(), (2, channels, size, size), tuple(convs))


def _random_bn(channels: int, gen: torch.Generator) -> nn.BatchNorm2d:
    """A float64 BN with statistics and affine parameters far from the identity (a sign flipped on some channels)."""
    bn = nn.BatchNorm2d(channels, dtype=torch.float64)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(channels, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.copy_(0.2 * torch.randn(channels, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(u(0.5, 2.0))
        sign = torch.where(torch.rand(channels, generator=gen) < 0.125, -1.0, 1.0).to(torch.float64)
        bn.weight.copy_(sign * u(0.5, 1.5))
        bn.bias.copy_(0.2 * torch.randn(channels, generator=gen, dtype=torch.float64))
    return bn
