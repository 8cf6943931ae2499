"""bias_fold: a constant added per output feature after a conv or a Linear folds into its bias.

Identity: for a constant c that is the same along every axis but the one holding P's output
features (c[o]; a single number is the case "the same for every o"), a sign in {1, -1}, and P a
conv2d or conv3d (any stride, padding, dilation, groups) or a Linear followed by a chain L of layout ops
(flatten / reshape / transpose / permute, possibly empty) that carries its output features whole:

    sign * L(P(x; W, b)) + c == L(P(x; W', b'))
    with W' = sign * W  and  b'[o] = sign * b[o] + c[o]      (no bias: b'[o] = c[o])

Why: P(x; W, b)[o] = b[o] + (sum of W[o, ...] * x[...]), linear in (W, b) row by row; adding
c[o] to every element of feature o is adding it to b[o]. L only moves elements, so each element
still meets the c of its own feature (the precondition, checked with
:func:`proofs.symbolic.carried_axes` here and with ``repalgebra.layout.follow_chain`` in the
library).

REFUSED: a constant that changes along another axis (a positional embedding ``pos[o, h, w]``
added to a conv's output). A bias adds one number per output channel at every position; at
(0, 1, 0) the fold would add pos[0, 0, 0] where the graph adds pos[0, 1, 0]. Symbolic
counterexample below.

Proof: symbolic x, W, b, c; expand(lhs - rhs) == 0 elementwise.
"""

from __future__ import annotations

import numpy as np

from .symbolic import (assert_differs, assert_equal, carried_axes, conv2d, conv3d, conv_symbols, describe,
                       describe_chain, layout, linear, symbols_tensor)


def fuse(w, b, c, sign):
    """(W', b') with sign * P(x; W, b) + c[o] == P(x; W', b'); ``c`` has one entry per output feature."""
    w2 = np.vectorize(lambda v: sign * v, otypes=[object])(w)
    b2 = np.array([(sign * b[o] if b is not None else 0) + c[o] for o in range(w.shape[0])], dtype=object)
    return w2, b2


def add_per_feature(y, c, sign, axis):
    """sign * y + c[o] with o the index on ``axis`` (``c`` of length 1: the same number everywhere)."""
    out = np.empty(y.shape, dtype=object)
    for idx in np.ndindex(y.shape):
        out[idx] = sign * y[idx] + c[idx[axis] if len(c) > 1 else 0]
    return out


CONV_CONFIGS = [
    dict(C=2, O=2, H=3, W=4, k=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1, bias=True, sign=1, c="per channel"),
    dict(C=2, O=2, H=4, W=4, k=(3, 3), stride=(2, 2), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1, bias=False, sign=1, c="per channel"),
    dict(C=4, O=4, H=4, W=4, k=(2, 3), stride=(1, 2), padding=(0, 1, 1, 1), dilation=(1, 1), groups=2, bias=True, sign=-1, c="per channel"),
    dict(C=2, O=2, H=5, W=5, k=(3, 3), stride=(1, 1), padding=(2, 2, 2, 2), dilation=(2, 2), groups=2, bias=False, sign=-1, c="one number"),
]

# Linear input x, O output features, layout chain L after it (the features land on ``axis``).
LINEAR_CONFIGS = [
    dict(name="ResMLP Affine beta after a Linear", x=(1, 3, 2), O=2, bias=True, chain=[], axis=-1, sign=1),
    dict(name="bias after proj, back to NCHW", x=(1, 4, 2), O=2, bias=False,
         chain=[("transpose", dict(dim0=-2, dim1=-1)), ("reshape", dict(shape=(1, 2, 2, 2)))], axis=1, sign=1),
    dict(name="1 - Linear(x), channels-last to NCHW", x=(1, 2, 2, 2), O=3, bias=True,
         chain=[("permute", dict(dims=(0, 3, 1, 2)))], axis=1, sign=-1),
]


def _prove_conv(cfg) -> str:
    x, w, b = conv_symbols(cfg)
    O = cfg["O"]
    c = symbols_tensor("c", (O,) if cfg["c"] == "per channel" else (1,))
    kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"])
    lhs = add_per_feature(conv2d(x, w, b, **kw), c, cfg["sign"], axis=0)
    rhs = conv2d(x, *fuse(w, b, c if len(c) == O else np.repeat(c, O), cfg["sign"]), **kw)
    desc = describe("sign * conv + c == conv(sign*W, sign*b + c)", **cfg)
    assert_equal(lhs, rhs, "bias_fold " + desc)
    return desc


def _prove_conv3d() -> str:
    """A frozen BatchNorm3d's shift after a Conv3d (its scale is scale_fold's), with a bias and groups."""
    cfg = dict(C=4, O=2, D=3, H=2, W=3, k=(3, 1, 2), stride=(1, 1, 2), padding=(1, 0, 1), dilation=(1, 1, 1), groups=2, bias=True, sign=1)
    x = symbols_tensor("x", (cfg["C"], cfg["D"], cfg["H"], cfg["W"]))
    w = symbols_tensor("w", (cfg["O"], cfg["C"] // cfg["groups"], *cfg["k"]))
    b, c = symbols_tensor("b", (cfg["O"],)), symbols_tensor("c", (cfg["O"],))
    kw = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"])
    lhs = add_per_feature(conv3d(x, w, b, **kw), c, 1, axis=0)
    desc = describe("conv3d + c == conv3d(W, b + c)", **cfg)
    assert_equal(lhs, conv3d(x, *fuse(w, b, c, 1), **kw), "bias_fold " + desc)
    return desc


def _prove_linear(cfg) -> str:
    O = cfg["O"]
    y_shape = tuple(cfg["x"][:-1]) + (O,)
    ks, out_shape = carried_axes(cfg["chain"], y_shape, -1)
    if cfg["axis"] % len(out_shape) not in ks:  # the precondition: L carries the features whole to the add's axis
        raise AssertionError(f"bias_fold: {cfg['name']}: the chain does not carry the features to axis {cfg['axis']}")
    x, w = symbols_tensor("x", cfg["x"]), symbols_tensor("w", (O, cfg["x"][-1]))
    b = symbols_tensor("b", (O,)) if cfg["bias"] else None
    c = symbols_tensor("c", (O,))
    lhs = add_per_feature(layout(linear(x, w, b), cfg["chain"]), c, cfg["sign"], cfg["axis"])
    rhs = layout(linear(x, *fuse(w, b, c, cfg["sign"])), cfg["chain"])
    desc = describe("sign * L(Linear) + c == L(Linear(sign*W, sign*b + c))", case=cfg["name"], x=cfg["x"], O=O,
                    bias=cfg["bias"], L=describe_chain(cfg["chain"]), sign=cfg["sign"])
    assert_equal(lhs, rhs, "bias_fold " + desc)
    return desc


def prove() -> list[str]:
    done = [_prove_conv(cfg) for cfg in CONV_CONFIGS] + [_prove_conv3d()] + [_prove_linear(cfg) for cfg in LINEAR_CONFIGS]

    # REFUSED: a positional embedding pos[o, h, w] is not one number per channel.
    cfg = dict(C=1, O=1, H=2, W=2, k=(1, 1), groups=1, bias=True)
    x, w, b = conv_symbols(cfg)
    pos = symbols_tensor("pos", (1, 2, 2))
    lhs = conv2d(x, w, b) + pos
    rhs = conv2d(x, *fuse(w, b, pos[:, 0, 0], 1))  # the only per-channel choice: pos at one position
    idx = (0, 1, 0)
    diff, num = assert_differs(lhs, rhs, idx, "bias_fold refused case")
    assert_equal([diff], [pos[0, 1, 0] - pos[0, 0, 0]], "bias_fold refused: difference")
    done.append(f"refused: a positional embedding pos[o, h, w] after a 1x1 conv: at {idx} lhs - rhs = "
                f"pos[0,1,0] - pos[0,0,0] != 0 (numeric witness {num})")
    return done
