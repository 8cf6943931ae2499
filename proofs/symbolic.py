"""Tiny symbolic reference implementation of the operators the fusion rules talk about.

Everything here works on ``numpy`` object arrays whose entries are ``sympy`` expressions:

* activations have shape ``(C, H, W)`` (batch 1 is implicit),
* conv weights have shape ``(O, C/groups, kh, kw)`` -- the PyTorch layout,
* biases and per-channel parameters have shape ``(C,)``.

The token-side operators (:func:`linear` and the layout ops :func:`flatten`, :func:`reshape`,
:func:`transpose`, :func:`permute`, :func:`layout`) work on tensors of any rank with the
PyTorch axis conventions, batch axis included (e.g. ``(B, C, H, W)`` or ``(B, N, C)``);
:func:`batch_norm` and :func:`scale` take the channel ``axis`` (0 by default, 1 for a
batched ``(B, C, ...)`` tensor). Linear weights have the PyTorch shape ``(out, in)``.
Numpy object arrays are row-major, exactly like a contiguous torch tensor, so ``reshape``
and ``flatten`` are ``numpy.reshape`` and move every element where torch moves it.

Conventions (identical to the library):

* padding is a 4-tuple ``(top, bottom, left, right)`` of *zero* padding,
* stride and dilation are ``(sh, sw)`` / ``(dh, dw)`` pairs,
* ``conv2d`` is cross-correlation, exactly like ``torch.nn.functional.conv2d``:

      y[o, p, q] = b[o] + sum_{i, u, v} w[o, i, u, v] * xpad[g(o)*C/G + i, p*sh + u*dh, q*sw + v*dw]

  where ``g(o) = o // (O/G)`` is the group of output channel ``o``.

The implementation is deliberately naive (explicit loops, explicit zero padding) so that it
can be read and checked by eye: it is the *specification* the proofs compare against.
Nothing in this file knows about any fusion rule, except the grouped-conv regrouping lemma
(:func:`regroup_weight`), which is proven in ``proofs/regroup.py`` and reused by several proofs.

Equality is decided by :func:`assert_equal`: ``sympy.expand(lhs - rhs) == 0`` elementwise
(falling back to ``expand(cancel(together(lhs - rhs)))``). Both are *sound* zero tests: a zero
result is a proof that the difference is identically zero as a function of all symbols.
BN statistics are kept symbolic, and the BN scale is written honestly as
``gamma / sympy.sqrt(var + eps)``; no substitution of ``1/sqrt(var+eps)`` by a free symbol is made
anywhere.
"""

from __future__ import annotations

import itertools
from math import prod
from typing import Iterable, Sequence

import numpy as np
import sympy

ZERO = sympy.Integer(0)
ONE = sympy.Integer(1)

__all__ = [
    "ZERO", "ONE", "symbols_tensor", "zeros", "const_tensor", "norm_pads", "pair",
    "pad", "conv2d", "conv_transpose3d", "batch_norm", "bn_scale_shift", "avg_pool2d", "add", "sub",
    "scale", "concat", "regroup_weight", "assert_equal", "assert_differs", "expand_zero",
    "EPS", "bn_symbols", "describe", "identity", "linear", "flatten", "reshape", "transpose",
    "permute", "pixel_shuffle", "LAYOUT_OPS", "layout", "carried_axes", "describe_chain",
]


# --------------------------------------------------------------------------- constructors

def symbols_tensor(name: str, shape: Sequence[int], **assumptions) -> np.ndarray:
    """An object array of fresh symbols ``name_i_j_...`` with the given shape."""
    out = np.empty(tuple(shape), dtype=object)
    for idx in itertools.product(*(range(s) for s in shape)):
        out[idx] = sympy.Symbol(name + "_" + "_".join(map(str, idx)), **assumptions)
    return out


def zeros(shape: Sequence[int]) -> np.ndarray:
    out = np.empty(tuple(shape), dtype=object)
    out.fill(ZERO)
    return out


def const_tensor(value, shape: Sequence[int]) -> np.ndarray:
    out = np.empty(tuple(shape), dtype=object)
    out.fill(sympy.sympify(value))
    return out


def pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def norm_pads(padding) -> tuple[int, int, int, int]:
    """int -> all sides; (ph, pw) -> symmetric; (top, bottom, left, right) as is."""
    if isinstance(padding, int):
        return (padding,) * 4
    padding = tuple(int(p) for p in padding)
    if len(padding) == 2:
        return (padding[0], padding[0], padding[1], padding[1])
    if len(padding) == 4:
        return padding  # type: ignore[return-value]
    raise ValueError(f"bad padding {padding!r}")


# --------------------------------------------------------------------------- operators

def pad(x: np.ndarray, pads) -> np.ndarray:
    """Explicit zero padding of a (C, H, W) tensor by (top, bottom, left, right)."""
    t, b, l, r = norm_pads(pads)
    if min(t, b, l, r) < 0:
        raise ValueError("negative padding is not supported")
    C, H, W = x.shape
    out = zeros((C, H + t + b, W + l + r))
    out[:, t:t + H, l:l + W] = x
    return out


def conv2d(x: np.ndarray, w: np.ndarray, b=None, stride=(1, 1), padding=(0, 0, 0, 0),
           dilation=(1, 1), groups: int = 1) -> np.ndarray:
    """Grouped, strided, dilated 2-D cross-correlation with explicit zero padding."""
    sh, sw = pair(stride)
    dh, dw = pair(dilation)
    C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    if C % groups or O % groups or C // groups != Cg:
        raise ValueError(f"shape mismatch: x {x.shape}, w {w.shape}, groups {groups}")
    xp = pad(x, padding)
    Hp, Wp = xp.shape[1:]
    Ho = (Hp - dh * (kh - 1) - 1) // sh + 1
    Wo = (Wp - dw * (kw - 1) - 1) // sw + 1
    if Ho <= 0 or Wo <= 0:
        raise ValueError("empty output")
    Og = O // groups
    out = np.empty((O, Ho, Wo), dtype=object)
    for o in range(O):
        c0 = (o // Og) * Cg
        for p in range(Ho):
            for q in range(Wo):
                terms = []
                for i in range(Cg):
                    for u in range(kh):
                        for v in range(kw):
                            xv = xp[c0 + i, p * sh + u * dh, q * sw + v * dw]
                            wv = w[o, i, u, v]
                            if xv != 0 and wv != 0:
                                terms.append(wv * xv)
                if b is not None:
                    terms.append(b[o])
                out[o, p, q] = sympy.Add(*terms)
    return out


def conv3d(x: np.ndarray, w: np.ndarray, b=None, stride=(1, 1, 1), padding=(0, 0, 0), dilation=(1, 1, 1),
           groups: int = 1) -> np.ndarray:
    """Grouped, strided, dilated 3-D cross-correlation of a (C, D, H, W) tensor with zero padding ``(d, h, w)``
    on both sides of each axis, written as what it is: output frame ``t`` sums, over the kernel's depth taps
    ``u``, the 2-D cross-correlation of padded input frame ``t sd + u dd`` with the kernel's slice ``u``."""
    (sd, sh, sw), (pd, ph, pw), (dd, dh, dw) = stride, padding, dilation
    C, D, H, W = x.shape
    kd = w.shape[2]
    xp = np.concatenate([zeros((C, pd, H, W)), x, zeros((C, pd, H, W))], axis=1)
    Do = (D + 2 * pd - dd * (kd - 1) - 1) // sd + 1
    if Do <= 0:
        raise ValueError("empty output")
    frames = []
    for t in range(Do):
        taps = [conv2d(xp[:, t * sd + u * dd], w[:, :, u], b if u == 0 else None, (sh, sw), (ph, ph, pw, pw), (dh, dw), groups)
                for u in range(kd)]
        frames.append(sum(taps[1:], taps[0]))
    return np.stack(frames, axis=1)


def conv_transpose2d(x: np.ndarray, w: np.ndarray, b=None, stride=(1, 1), padding=(0, 0), output_padding=(0, 0),
                     dilation=(1, 1), groups: int = 1) -> np.ndarray:
    """Transposed 2-D convolution as PyTorch defines it, written as the scatter it is: input pixel ``(a, c)`` of
    channel ``i`` adds ``x[i, a, c] * w[i, j, u, v]`` to output ``(g(i) * O/G + j, a*sh + u*dh - ph, c*sw + v*dw - pw)``,
    where ``w`` is ``(C, O/groups, kh, kw)``; the output is ``(H - 1) sh - 2 ph + dh (kh - 1) + oph + 1`` high."""
    sh, sw = pair(stride)
    dh, dw = pair(dilation)
    ph, pw = pair(padding)
    oh, ow = pair(output_padding)
    C, H, W = x.shape
    Cw, Og, kh, kw = w.shape
    if Cw != C or C % groups:
        raise ValueError(f"shape mismatch: x {x.shape}, w {w.shape}, groups {groups}")
    Ho = (H - 1) * sh - 2 * ph + dh * (kh - 1) + oh + 1
    Wo = (W - 1) * sw - 2 * pw + dw * (kw - 1) + ow + 1
    if Ho <= 0 or Wo <= 0:
        raise ValueError("empty output")
    Cg = C // groups
    terms = [[[[] for _ in range(Wo)] for _ in range(Ho)] for _ in range(Og * groups)]
    for i in range(C):
        for j in range(Og):
            o = (i // Cg) * Og + j
            for a in range(H):
                for c in range(W):
                    for u in range(kh):
                        for v in range(kw):
                            p, q = a * sh + u * dh - ph, c * sw + v * dw - pw
                            if 0 <= p < Ho and 0 <= q < Wo:
                                terms[o][p][q].append(w[i, j, u, v] * x[i, a, c])
    out = np.empty((Og * groups, Ho, Wo), dtype=object)
    for o in range(Og * groups):
        for p in range(Ho):
            for q in range(Wo):
                out[o, p, q] = sympy.Add(*terms[o][p][q], *([b[o]] if b is not None else []))
    return out


def conv_transpose3d(x: np.ndarray, w: np.ndarray, b=None, stride=(1, 1, 1), padding=(0, 0, 0), output_padding=(0, 0, 0),
                     dilation=(1, 1, 1), groups: int = 1) -> np.ndarray:
    """Transposed 3-D convolution as PyTorch defines it, the scatter of :func:`conv_transpose2d` with a depth axis:
    input voxel ``a`` (a triple) of channel ``i`` adds ``x[i, a] * w[i, j, u]`` to output
    ``(g(i) * O/G + j, a * stride + u * dilation - padding)``, axis by axis; ``w`` is ``(C, O/groups, kd, kh, kw)``."""
    C, *size = x.shape
    Cw, Og, *kernel = w.shape
    if Cw != C or C % groups:
        raise ValueError(f"shape mismatch: x {x.shape}, w {w.shape}, groups {groups}")
    out_size = [(n - 1) * s - 2 * p + d * (k - 1) + o + 1
                for n, s, p, d, k, o in zip(size, stride, padding, dilation, kernel, output_padding)]
    if min(out_size) <= 0:
        raise ValueError("empty output")
    terms: dict[tuple, list] = {}
    for i, j in itertools.product(range(C), range(Og)):
        o = (i // (C // groups)) * Og + j
        for a in itertools.product(*map(range, size)):
            for u in itertools.product(*map(range, kernel)):
                at = tuple(ai * s + ui * d - p for ai, ui, s, d, p in zip(a, u, stride, dilation, padding))
                if all(0 <= t < n for t, n in zip(at, out_size)):
                    terms.setdefault((o, *at), []).append(w[(i, j, *u)] * x[(i, *a)])
    out = np.empty((Og * groups, *out_size), dtype=object)
    for index in itertools.product(range(Og * groups), *map(range, out_size)):
        out[index] = sympy.Add(*terms.get(index, ()), *([b[index[0]]] if b is not None else []))
    return out


def bn_scale_shift(mean, var, gamma, beta, eps):
    """Per-channel (s, t) with BN(x) = s*x + t: s = gamma/sqrt(var+eps), t = beta - mean*s."""
    C = len(mean)
    s = np.empty(C, dtype=object)
    t = np.empty(C, dtype=object)
    for c in range(C):
        s[c] = gamma[c] / sympy.sqrt(var[c] + eps)
        t[c] = beta[c] - mean[c] * s[c]
    return s, t


def batch_norm(x: np.ndarray, mean, var, gamma, beta, eps, axis: int = 0) -> np.ndarray:
    """Eval-mode BatchNorm, written literally: (x - mean) / sqrt(var + eps) * gamma + beta.

    ``axis`` is the channel axis (0 for an unbatched (C, H, W) tensor, 1 for BatchNorm1d/2d
    on a batched (B, C, ...) tensor).
    """
    axis %= x.ndim
    out = np.empty(x.shape, dtype=object)
    for idx in np.ndindex(x.shape):
        c = idx[axis]
        out[idx] = (x[idx] - mean[c]) / sympy.sqrt(var[c] + eps) * gamma[c] + beta[c]
    return out


def avg_pool2d(x: np.ndarray, k, stride=None, padding=0, count_include_pad: bool = True) -> np.ndarray:
    """torch.nn.functional.avg_pool2d (ceil_mode=False) with zero padding (top,bottom,left,right).

    count_include_pad=True divides by kh*kw; False divides by the number of non-padding
    elements inside the window.
    """
    kh, kw = pair(k)
    sh, sw = pair(stride if stride is not None else (kh, kw))
    t, bo, l, r = norm_pads(padding)
    C, H, W = x.shape
    xp = pad(x, (t, bo, l, r))
    Ho = (H + t + bo - kh) // sh + 1
    Wo = (W + l + r - kw) // sw + 1
    out = np.empty((C, Ho, Wo), dtype=object)
    for c in range(C):
        for p in range(Ho):
            for q in range(Wo):
                terms, count = [], 0
                for u in range(kh):
                    for v in range(kw):
                        row, col = p * sh + u, q * sw + v
                        terms.append(xp[c, row, col])
                        if t <= row < t + H and l <= col < l + W:
                            count += 1
                div = kh * kw if count_include_pad else count
                out[c, p, q] = sympy.Add(*terms) / div
    return out


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.shape != b.shape:
        raise ValueError(f"add: shape mismatch {a.shape} vs {b.shape}")
    return a + b


def sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.shape != b.shape:
        raise ValueError(f"sub: shape mismatch {a.shape} vs {b.shape}")
    return a - b


def scale(x: np.ndarray, s, axis: int = 0) -> np.ndarray:
    """Per-channel multiply: out[..., c, ...] = s[c] * x[..., c, ...] with c on ``axis``.

    Works for activations and (with axis 0) for weights.
    """
    axis %= x.ndim
    out = np.empty(x.shape, dtype=object)
    for idx in np.ndindex(x.shape):
        out[idx] = s[idx[axis]] * x[idx]
    return out


def concat(xs: Iterable[np.ndarray]) -> np.ndarray:
    """Concatenate along the channel (first) axis."""
    return np.concatenate(list(xs), axis=0)


# --------------------------------------------------------------------------- tokens and layout

def identity(x: np.ndarray) -> np.ndarray:
    """``nn.Identity``: returns its input (the same tensor, as torch does)."""
    return x


def linear(x: np.ndarray, w: np.ndarray, b=None) -> np.ndarray:
    """``torch.nn.functional.linear`` over the last axis, written out:

        y[..., o] = b[o] + sum_c w[o, c] * x[..., c]      (w has shape (out, in)).
    """
    O, Cin = w.shape
    if x.shape[-1] != Cin:
        raise ValueError(f"linear: x {x.shape} does not end with in_features={Cin}")
    out = np.empty(x.shape[:-1] + (O,), dtype=object)
    for idx in np.ndindex(x.shape[:-1]):
        for o in range(O):
            terms = [w[o, c] * x[idx + (c,)] for c in range(Cin)]
            if b is not None:
                terms.append(b[o])
            out[idx + (o,)] = sympy.Add(*terms)
    return out


def reshape(x: np.ndarray, shape) -> np.ndarray:
    """``x.reshape(shape)`` (row-major, ``-1`` allowed), like a contiguous torch tensor."""
    return np.reshape(x, tuple(shape)).copy()


def flatten(x: np.ndarray, start: int = 0, end: int = -1) -> np.ndarray:
    """``torch.flatten(x, start, end)``."""
    s, e = start % x.ndim, end % x.ndim
    return reshape(x, x.shape[:s] + (prod(x.shape[s:e + 1]),) + x.shape[e + 1:])


def transpose(x: np.ndarray, dim0: int, dim1: int) -> np.ndarray:
    """``x.transpose(dim0, dim1)``."""
    return np.swapaxes(x, dim0, dim1).copy()


def permute(x: np.ndarray, dims) -> np.ndarray:
    """``x.permute(dims)``."""
    return np.transpose(x, tuple(dims)).copy()


# Same op and attribute names as the library's layout ops (repalgebra.ops), so a chain written
# as data here can be replayed through the library too (tests/test_proofs.py does).
def select(x: np.ndarray, axis: int, index: int) -> np.ndarray:
    """``x.select(axis, index)``: one index of ``axis``, which disappears."""
    return np.take(x, index, axis=axis)


def pixel_shuffle(x: np.ndarray, r: int) -> np.ndarray:
    """``torch.nn.functional.pixel_shuffle`` of a ``(C r^2, H, W)`` map, written out:

        out[c, h r + i, w r + j] = x[c r^2 + i r + j, h, w]."""
    Cr2, H, W = x.shape
    out = np.empty((Cr2 // (r * r), H * r, W * r), dtype=object)
    for c, h, w, i, j in itertools.product(range(Cr2 // (r * r)), range(H), range(W), range(r), range(r)):
        out[c, h * r + i, w * r + j] = x[c * r * r + i * r + j, h, w]
    return out


LAYOUT_OPS = {"flatten": flatten, "reshape": reshape, "transpose": transpose, "permute": permute, "select": select}


def layout(x: np.ndarray, chain) -> np.ndarray:
    """Apply a chain of layout ops given as ``[(op, attrs), ...]``, e.g.
    ``[("flatten", dict(start=2, end=-1)), ("transpose", dict(dim0=-2, dim1=-1))]``."""
    for op, attrs in chain:
        x = LAYOUT_OPS[op](x, **attrs)
    return x


def carried_axes(chain, shape: Sequence[int], axis: int) -> tuple[list[int], tuple[int, ...]]:
    """Where a layout ``chain`` carries input ``axis`` of a ``shape`` tensor *whole*.

    Labels every element with its index on ``axis``, runs the chain on the labels and returns
    the output axes k with ``out_label[idx] == idx[k]`` for every output index (and the output
    shape). This is exactly the condition for every per-channel map A to commute with the
    chain: ``A_k(L(x)) == L(A_axis(x))`` for all per-channel (s, t) -- if some element's label
    differs from its index on k, generic s, t tell the two sides apart there.
    """
    shape = tuple(shape)
    axis %= len(shape)
    labels = np.empty(shape, dtype=object)
    for idx in np.ndindex(shape):
        labels[idx] = idx[axis]
    out = layout(labels, chain)
    ks = [k for k in range(out.ndim)
          if out.shape[k] == shape[axis] and all(out[idx] == idx[k] for idx in np.ndindex(out.shape))]
    return ks, out.shape


# --------------------------------------------------------------------------- regrouping lemma

def regroup_weight(w: np.ndarray, groups: int, new_groups: int) -> np.ndarray:
    """Re-express a groups=``groups`` conv weight as a groups=``new_groups`` weight.

    Requires ``new_groups`` to divide ``groups``. With C input channels, a conv with groups g
    has weight (O, C/g, kh, kw); the returned weight has shape (O, C/g', kh, kw) and is
    block-diagonal with zeros: for output o (old group j = o // (O/g), new group
    j' = o // (O/g')), and old local input index i,

        W'[o, j*C/g - j'*C/g' + i] = W[o, i],   all other entries 0.

    Proven in ``proofs/regroup.py``: conv(x, W, groups=g) == conv(x, W', groups=g').
    """
    if groups % new_groups:
        raise ValueError(f"new_groups={new_groups} must divide groups={groups}")
    O, Cg, kh, kw = w.shape
    C = Cg * groups
    Cg2 = C // new_groups
    Og, Og2 = O // groups, O // new_groups
    out = zeros((O, Cg2, kh, kw))
    for o in range(O):
        j, j2 = o // Og, o // Og2
        off = j * Cg - j2 * Cg2
        for i in range(Cg):
            out[o, off + i] = w[o, i]
    return out


# --------------------------------------------------------------------------- equality

def expand_zero(expr) -> bool:
    """Sound test that ``expr`` is identically zero."""
    if expr == 0:
        return True
    if sympy.expand(expr) == 0:
        return True
    return sympy.expand(sympy.cancel(sympy.together(expr))) == 0


def _as_array(a) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    if isinstance(a, sympy.MatrixBase):
        return np.array(a.tolist(), dtype=object)
    return np.array(a, dtype=object)


def assert_equal(lhs, rhs, what: str) -> int:
    """Raise AssertionError naming the first element where expand(lhs - rhs) != 0.

    Returns the number of elements compared.
    """
    lhs, rhs = _as_array(lhs), _as_array(rhs)
    if lhs.shape != rhs.shape:
        raise AssertionError(f"{what}: shape mismatch {lhs.shape} (lhs) vs {rhs.shape} (rhs)")
    for idx in np.ndindex(lhs.shape):
        diff = sympy.sympify(lhs[idx]) - sympy.sympify(rhs[idx])
        if not expand_zero(diff):
            raise AssertionError(
                f"{what}: sides differ at element {idx}:\n"
                f"  lhs = {lhs[idx]}\n  rhs = {rhs[idx]}\n"
                f"  expand(lhs - rhs) = {sympy.expand(diff)}")
    return lhs.size


def assert_differs(lhs, rhs, idx, what: str, witness: dict | None = None):
    """Show a counterexample: expand(lhs - rhs) != 0 at element ``idx``.

    Because ``expand`` of a nonzero expression could in principle hide an algebraic relation
    (e.g. between sqrt(v+eps) and v+eps), a concrete numeric ``witness`` substitution is
    evaluated too (unspecified symbols are set to small integers; ``eps`` to 0 and BN
    variance symbols -- whose names start with ``var`` -- to perfect squares, so every
    sqrt(var+eps) is rational); the numeric difference must be a nonzero rational.
    Returns (symbolic difference, numeric difference).
    """
    lhs, rhs = _as_array(lhs), _as_array(rhs)
    diff = sympy.expand(sympy.sympify(lhs[idx]) - sympy.sympify(rhs[idx]))
    if diff == 0:
        raise AssertionError(f"{what}: expected a counterexample at {idx}, but the sides agree")
    base = dict(witness or {})
    L, R = sympy.sympify(lhs[idx]), sympy.sympify(rhs[idx])
    free = sorted((L.free_symbols | R.free_symbols) - set(base), key=lambda s: s.name)
    num = None
    for attempt in range(8):
        subs = dict(base)
        for n, sym in enumerate(free):
            if sym.name == "eps":
                subs[sym] = sympy.Integer(0)
            elif sym.name.startswith("var"):
                subs[sym] = sympy.Integer(((n + attempt) % 3 + 1) ** 2)  # var+eps: a square
            else:
                subs[sym] = sympy.Integer((7 * n + 3 * attempt) % 11 + 1)
        num = sympy.nsimplify(L.subs(subs) - R.subs(subs))
        if num != 0 and num.is_Rational:
            break
    else:
        raise AssertionError(f"{what}: no numeric witness found at {idx}: {num}")
    return diff, num


# --------------------------------------------------------------------------- convenience

EPS = sympy.Symbol("eps")


def bn_symbols(tag: str, C: int):
    """Symbolic BN running statistics and affine parameters for C channels.

    Returns (mean, var, gamma, beta, eps); ``eps`` is the shared symbol ``eps``.
    """
    return (symbols_tensor(f"mean{tag}", (C,)), symbols_tensor(f"var{tag}", (C,)),
            symbols_tensor(f"gamma{tag}", (C,)), symbols_tensor(f"beta{tag}", (C,)), EPS)


def describe(kind: str, **cfg) -> str:
    """Uniform one-line configuration description used by every proof."""
    return kind + ": " + ", ".join(f"{k}={v}" for k, v in cfg.items())


def describe_chain(chain) -> str:
    """``[("permute", dict(dims=(0, 2, 3, 1)))]`` -> ``"permute(0, 2, 3, 1)"``; empty -> ``"(none)"``."""
    parts = []
    for op, attrs in chain:
        vals = []
        for v in attrs.values():
            vals.extend(v if isinstance(v, (tuple, list)) else [v])
        parts.append(f"{op}({', '.join(map(str, vals))})")
    return " ".join(parts) or "(none)"


def conv_symbols(cfg: dict, bias: bool | None = None):
    """Symbolic input ``x`` (C, H, W), kernel ``w`` (O, C/groups, kh, kw) and bias ``b`` for a proof config.

    ``cfg`` has keys C, O, H, W, k, groups (and ``bias`` unless given here);
    ``b`` is ``None`` for a conv without bias.
    """
    C, O, g = cfg["C"], cfg["O"], cfg["groups"]
    x = symbols_tensor("x", (C, cfg["H"], cfg["W"]))
    w = symbols_tensor("w", (O, C // g) + tuple(cfg["k"]))
    with_bias = cfg["bias"] if bias is None else bias
    return x, w, (symbols_tensor("b", (O,)) if with_bias else None)
