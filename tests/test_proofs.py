"""Tests for the sympy proofs in ``proofs/`` (one per fusion rule)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from proofs import RULES, is_refused, load  # noqa: E402
from proofs import bn_fold, bn_before_conv, bn_into_linear, linear_affine_fold, seq_merge  # noqa: E402
from proofs.symbolic import (assert_differs, assert_equal, avg_pool2d, batch_norm, conv3d, conv_transpose3d,  # noqa: E402
                             bn_symbols, carried_axes, conv2d, conv_symbols, layout, linear, pixel_shuffle, scale,
                             symbols_tensor)

REFUSAL_RULES = {"seq_merge", "bias_fold", "border_fill", "avg_pool_to_conv", "bn_before_conv", "bn_into_linear",
                 "linear_affine_fold", "query_scale_fold", "pad_share",
                 "attention_form", "space_to_depth", "crop_into_conv", "crop_before_conv"}


@pytest.mark.parametrize("rule", RULES)
def test_rule_proof(rule):
    done = load(rule).prove()
    assert done, f"{rule}: no configuration proven"
    proved = [d for d in done if not is_refused(d)]
    refused = [d for d in done if is_refused(d)]
    assert proved
    if rule in REFUSAL_RULES:
        assert refused, f"{rule}: the refused case(s) must be shown"


def test_rule_modules_exist_and_document_their_identity():
    for rule in RULES:
        mod = load(rule)
        assert mod.__doc__ and len(mod.__doc__) > 200, f"{rule}: missing identity docstring"
        assert callable(mod.prove)


def test_python_m_proofs():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "proofs"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    for rule in RULES:
        mine = [l for l in lines if l.split()[:1] == [rule]]
        assert len(mine) == 1, f"expected one line for {rule}:\n{res.stdout}"
        assert " proved " in mine[0], mine[0]
        if rule in REFUSAL_RULES:
            assert "refused case" in mine[0], mine[0]
    assert "FAILED" not in res.stdout


def test_wrong_formula_is_caught():
    """bn_fold without multiplying the conv bias by the BN scale must NOT be proven."""
    x = symbols_tensor("x", (1, 3, 3))
    w = symbols_tensor("w", (1, 1, 3, 3))
    b = symbols_tensor("b", (1,))
    mean, var, gamma, beta, eps = bn_symbols("", 1)
    lhs = batch_norm(conv2d(x, w, b, padding=1), mean, var, gamma, beta, eps)
    w2, b2 = bn_fold.fuse(w, b, mean, var, gamma, beta, eps)
    rhs = conv2d(x, w2, b2, padding=1)
    assert_equal(lhs, rhs, "correct bn_fold")  # sanity: the right formula passes
    s = gamma[0] / sympy.sqrt(var[0] + eps)
    wrong_b = np.array([b[0] - mean[0] * s + beta[0]], dtype=object)  # bias not scaled
    wrong = conv2d(x, w2, wrong_b, padding=1)
    with pytest.raises(AssertionError, match=r"differ at element \(0, 0, 0\)"):
        assert_equal(lhs, wrong, "bn_fold with unscaled bias")
    assert_differs(lhs, wrong, (0, 0, 0), "bn_fold with unscaled bias")


def test_wrong_shuffle_fold_is_caught():
    """bn_fold through a pixel shuffle with the BN tiled over the conv's channels (conv channel o folds BN channel
    o mod C, not o // r^2) must NOT be proven: pixel (0, 1) of shuffle channel 0 is conv channel 1."""
    cfg = bn_fold.SHUFFLE_CONFIGS[0]
    lhs, rhs = bn_fold._shuffle_sides(cfg, lambda o: o % cfg["C"])
    with pytest.raises(AssertionError, match="differ at element"):
        assert_equal(lhs, rhs, "bn_fold shuffle tiled")
    assert_differs(lhs, rhs, (0, 0, 1), "bn_fold shuffle tiled")


def test_wrong_piece_fold_is_caught():
    """bn_fold through a channel piece with the BN folded into the conv's first rows (row j folds BN channel j)
    rather than the rows the piece reads must NOT be proven: the piece's channel 0 is conv channel 1."""
    mine = bn_fold.PIECES[1][0]
    x, w, b = conv_symbols(dict(C=1, O=4, H=2, W=2, k=(1, 1), groups=1, bias=True))
    bn = bn_symbols("", len(mine))
    z = conv2d(x, w, b)
    wrong = conv2d(x, *bn_fold.piece_rows(w, b, list(range(len(mine))), *bn))
    with pytest.raises(AssertionError, match="differ at element"):
        assert_equal(batch_norm(z[mine], *bn), wrong[mine], "bn_fold piece folded into the first rows")
    assert_differs(batch_norm(z[mine], *bn), wrong[mine], (0, 0, 0), "bn_fold piece folded into the first rows")


@pytest.mark.parametrize("r, shape", [(2, (8, 2, 3)), (3, (9, 1, 2)), (1, (2, 2, 2))])
def test_reference_pixel_shuffle_matches_torch(r, shape):
    """The symbolic pixel_shuffle is torch's (on numbers)."""
    torch = pytest.importorskip("torch")
    xn = np.random.default_rng(3).integers(-3, 4, shape)
    ours = pixel_shuffle(np.vectorize(sympy.Integer, otypes=[object])(xn), r)
    ref = torch.nn.functional.pixel_shuffle(torch.tensor(xn, dtype=torch.float64)[None], r)[0].numpy()
    np.testing.assert_array_equal(_num(ours), ref)


def test_refusals_raise_in_fuse():
    w1, b1 = symbols_tensor("w1", (2, 2, 1, 1)), symbols_tensor("b1", (2,))
    w2 = symbols_tensor("w2", (2, 2, 3, 3))
    with pytest.raises(ValueError, match="refused"):
        seq_merge.fuse_1x1_kxk(w1, b1, 1, w2, None, 1, padding=1)
    with pytest.raises(ValueError, match="refused"):
        bn_before_conv.fuse(w2, None, *bn_symbols("", 2), padding=(0, 0, 1, 0))
    cfg = bn_into_linear.REFUSED
    with pytest.raises(ValueError, match="refused"):
        bn_into_linear.precondition(cfg["chain"], cfg["shape"], cfg["axis"])
    cfg = linear_affine_fold.REFUSED
    with pytest.raises(ValueError, match="refused"):
        linear_affine_fold.precondition(cfg["chain"], cfg["x"][:-1] + (cfg["O"],), cfg["axis"])


def _layout_cases():
    """(input shape, tracked axis, chain, target axis, accepted) for every chain the proofs use."""
    cases = []
    for cfg in bn_into_linear.CONFIGS + [bn_into_linear.REFUSED]:
        ndim_out = len(layout(symbols_tensor("x", cfg["shape"]), cfg["chain"]).shape)
        cases.append((cfg["shape"], cfg["axis"], cfg["chain"], ndim_out - 1,
                      cfg is not bn_into_linear.REFUSED))
    for cfg in linear_affine_fold.CONFIGS + [linear_affine_fold.REFUSED]:
        y = tuple(cfg["x"][:-1]) + (cfg["O"],)
        ndim_out = len(layout(symbols_tensor("y", y), cfg["chain"]).shape)
        cases.append((y, len(y) - 1, cfg["chain"], cfg["axis"] % ndim_out,
                      cfg is not linear_affine_fold.REFUSED))
    return cases


@pytest.mark.parametrize("shape,axis,chain,target,accepted", _layout_cases())
def test_layout_precondition_matches_library(shape, axis, chain, target, accepted):
    """The proofs' semantic precondition (carried_axes) and the library's syntactic one
    (repalgebra.layout.follow_chain) agree on every layout chain the proofs use."""
    torch = pytest.importorskip("torch")
    from repalgebra.ir import Node, Value
    from repalgebra.layout import follow_chain

    ks, out_shape = carried_axes(chain, shape, axis)
    assert (target in ks) == accepted
    nodes, v = [], Value("x", tuple(shape), torch.float32)
    for op, attrs in chain:
        nodes.append(Node.make(op, [v], attrs))
        v = nodes[-1].out
    assert tuple(v.shape) == tuple(out_shape)
    got = follow_chain(nodes, axis)
    assert (got == target) == accepted, (got, target)
    if got is not None:
        assert got in ks  # the library never claims an axis that is not carried whole


def test_wrong_linear_folds_are_caught():
    """Plausible slips in the new fused formulas must NOT be proven."""
    # bn_into_linear scaling W's rows (s[o]) and shifting by W^T t, instead of columns and W t.
    cfg = bn_into_linear.CONFIGS[0]
    x = symbols_tensor("x", cfg["shape"])
    w = symbols_tensor("w", (cfg["shape"][1], cfg["shape"][1]))
    bn = bn_symbols("", cfg["shape"][1])
    lhs = linear(layout(batch_norm(x, *bn, axis=1), cfg["chain"]), w)
    w2, b2 = bn_into_linear.fuse(w, None, *bn)
    assert_equal(lhs, linear(layout(x, cfg["chain"]), w2, b2), "correct bn_into_linear")
    wrong_w, wrong_b = bn_into_linear.fuse(w.T.copy(), None, *bn)
    with pytest.raises(AssertionError, match="differ at element"):
        assert_equal(lhs, linear(layout(x, cfg["chain"]), wrong_w.T.copy(), wrong_b), "W^T t")
    # linear_affine_fold with the bias left unscaled.
    x = symbols_tensor("x", (1, 2, 2))
    w, b, s = symbols_tensor("w", (2, 2)), symbols_tensor("b", (2,)), symbols_tensor("s", (2,))
    chain = [("transpose", dict(dim0=-2, dim1=-1))]
    lhs = scale(layout(linear(x, w, b), chain), s, axis=1)
    w2, _ = linear_affine_fold.fuse(w, b, s)
    with pytest.raises(AssertionError, match="differ at element"):
        assert_equal(lhs, layout(linear(x, w2, b), chain), "unscaled bias")


@pytest.mark.parametrize("shape,chain", [
    ((2, 3, 2, 2), [("flatten", dict(start=2, end=-1)), ("transpose", dict(dim0=-2, dim1=-1))]),
    ((2, 3, 4), [("transpose", dict(dim0=-2, dim1=-1)), ("reshape", dict(shape=(2, 4, 3, 1)))]),
    ((2, 3, 2, 2), [("permute", dict(dims=(0, 2, 3, 1))), ("flatten", dict(start=0, end=2))]),
    ((2, 3, 4), [("reshape", dict(shape=(-1, 2, 6))), ("permute", dict(dims=(2, 0, 1)))]),
])
def test_reference_linear_and_layout_match_torch(shape, chain):
    """The symbolic linear and layout ops are torch's (on numbers)."""
    torch = pytest.importorskip("torch")
    from repalgebra.ops import OPS

    rng = np.random.default_rng(2)
    xn = rng.integers(-3, 4, shape)
    x = np.vectorize(sympy.Integer, otypes=[object])(xn)
    ours, ref = layout(x, chain), torch.tensor(xn, dtype=torch.float64)
    for op, attrs in chain:
        ref = OPS[op]([ref], attrs, {})
    assert ours.shape == tuple(ref.shape)
    np.testing.assert_array_equal(_num(ours), ref.numpy())
    wn, bn_ = rng.integers(-3, 4, (3, ours.shape[-1])), rng.integers(-3, 4, (3,))
    lin = linear(ours, *(np.vectorize(sympy.Integer, otypes=[object])(a) for a in (wn, bn_)))
    ref = torch.nn.functional.linear(ref, torch.tensor(wn, dtype=torch.float64),
                                     torch.tensor(bn_, dtype=torch.float64))
    np.testing.assert_array_equal(_num(lin), ref.numpy())


def _num(a):
    return np.array(a.tolist(), dtype=np.float64) if isinstance(a, np.ndarray) else a


@pytest.mark.parametrize("cfg", [
    dict(C=4, O=6, H=7, W=6, k=(3, 2), stride=(2, 1), padding=(1, 0, 2, 1), dilation=(1, 2), groups=2),
    dict(C=3, O=3, H=5, W=5, k=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1), dilation=(2, 2), groups=3),
    dict(C=2, O=4, H=6, W=5, k=(1, 3), stride=(2, 2), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1),
])
def test_reference_conv_matches_torch(cfg):
    """The symbolic reference conv2d is the torch conv2d (on numbers)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    C, O, g = cfg["C"], cfg["O"], cfg["groups"]
    x = rng.integers(-3, 4, (C, cfg["H"], cfg["W"])).astype(object)
    w = rng.integers(-3, 4, (O, C // g) + cfg["k"]).astype(object)
    b = rng.integers(-3, 4, (O,)).astype(object)
    x, w, b = (np.vectorize(sympy.Integer, otypes=[object])(a) for a in (x, w, b))
    ours = _num(conv2d(x, w, b, stride=cfg["stride"], padding=cfg["padding"],
                       dilation=cfg["dilation"], groups=g))
    t, bo, l, r = cfg["padding"]
    xt = F.pad(torch.tensor(_num(x))[None], (l, r, t, bo))
    ref = F.conv2d(xt, torch.tensor(_num(w)), torch.tensor(_num(b)), stride=cfg["stride"],
                   dilation=cfg["dilation"], groups=g)[0].numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("cfg", [
    dict(C=4, O=2, D=5, H=4, W=3, k=(3, 2, 1), stride=(2, 1, 1), padding=(1, 0, 1), dilation=(1, 2, 1), groups=2),
    dict(C=2, O=3, D=3, H=3, W=4, k=(2, 1, 3), stride=(1, 2, 2), padding=(2, 1, 0), dilation=(2, 1, 1), groups=1),
])
def test_reference_conv3d_matches_torch(cfg):
    """The symbolic reference conv3d (a sum of 2-D convs over the depth taps) is the torch conv3d (on numbers)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    C, O, g = cfg["C"], cfg["O"], cfg["groups"]
    x, w, b = (np.vectorize(sympy.Integer, otypes=[object])(rng.integers(-3, 4, shape).astype(object))
               for shape in ((C, cfg["D"], cfg["H"], cfg["W"]), (O, C // g, *cfg["k"]), (O,)))
    ours = _num(conv3d(x, w, b, stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=g))
    ref = torch.nn.functional.conv3d(torch.tensor(_num(x))[None], torch.tensor(_num(w)), torch.tensor(_num(b)), cfg["stride"],
                                     cfg["padding"], cfg["dilation"], g)[0].numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("cfg", bn_fold.TRANSPOSED_CONFIGS_3D)
def test_reference_conv_transpose3d_matches_torch(cfg):
    """The symbolic reference transposed conv3d (the scatter, voxel by voxel) is torch's (on numbers), at the
    configurations the bn_fold proof uses."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    C, O, g = cfg["C"], cfg["O"], cfg["groups"]
    x, w, b = (np.vectorize(sympy.Integer, otypes=[object])(rng.integers(-3, 4, shape).astype(object))
               for shape in ((C, cfg["D"], cfg["H"], cfg["W"]), (C, O // g, *cfg["k"]), (O,)))
    kw = {k: cfg[k] for k in ("stride", "padding", "output_padding", "dilation", "groups")}
    ours = _num(conv_transpose3d(x, w, b, **kw))
    ref = torch.nn.functional.conv_transpose3d(torch.tensor(_num(x))[None], torch.tensor(_num(w)), torch.tensor(_num(b)),
                                               **kw)[0].numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("k,stride,pad,cip", [(3, 1, 1, True), (3, 2, 1, False), ((2, 3), (2, 1), 0, False),
                                                (3, 2, 1, True)])
def test_reference_avg_pool_and_bn_match_torch(k, stride, pad, cip):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(1)
    xn = rng.normal(size=(2, 5, 6))
    x = np.vectorize(lambda v: sympy.Float(v, 30), otypes=[object])(xn)
    ours = _num(avg_pool2d(x, k, stride, pad, cip))
    ref = F.avg_pool2d(torch.tensor(xn)[None], k, stride, pad, count_include_pad=cip)[0].numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12)

    mean, var, gamma, beta = (rng.normal(size=2) for _ in range(4))
    var = np.abs(var) + 0.5
    ours = _num(batch_norm(x, *(np.array([sympy.Float(v, 30) for v in a], dtype=object)
                                for a in (mean, var, gamma, beta)), sympy.Float(1e-5, 30)))
    ref = F.batch_norm(torch.tensor(xn)[None], torch.tensor(mean), torch.tensor(var),
                       torch.tensor(gamma), torch.tensor(beta), training=False, eps=1e-5)[0].numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular", "constant"])
@pytest.mark.parametrize("pads", [(1, 2, 2, 1), (2, 0, 0, 1), (0, 0, 3, 3)])
def test_reference_pad_modes_match_torch(mode, pads):
    """pad_share's padding of each mode (top, bottom, left, right) is torch's ``F.pad`` (on numbers)."""
    torch = pytest.importorskip("torch")
    from proofs.pad_share import pad_mode

    x = np.arange(2 * 3 * 4, dtype=object).reshape(2, 3, 4)
    t, b, l, r = pads
    kw = {"value": -1.0} if mode == "constant" else {}
    ref = torch.nn.functional.pad(torch.tensor(_num(x))[None], (l, r, t, b), mode=mode, **kw)[0].numpy()
    np.testing.assert_array_equal(_num(pad_mode(x, pads, mode, value=-1)), ref)


def test_runner_reports_failure(monkeypatch, capsys):
    """A wrong fused formula makes the runner print FAILED with the differing element, exit 1."""
    from proofs.__main__ import main

    def wrong_fuse(w, b, mean, var, gamma, beta, eps):
        w2, b2 = bn_fold.__dict__["_orig_fuse"](w, b, mean, var, gamma, beta, eps)
        b2 = b2.copy()
        b2[0] = (b[0] if b is not None else 0) - mean[0] + beta[0]  # forgot the scale
        return w2, b2

    monkeypatch.setitem(bn_fold.__dict__, "_orig_fuse", bn_fold.fuse)
    monkeypatch.setattr(bn_fold, "fuse", wrong_fuse)
    assert main(["bn_fold"]) == 1
    out = capsys.readouterr().out
    assert "bn_fold" in out and "FAILED" in out and "differ at element" in out
