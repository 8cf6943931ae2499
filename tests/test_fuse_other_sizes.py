"""A fold through a reshape that keeps an axis whole at the example's sizes only must not reach other sizes.

The rules see one example.  ``x.reshape(B, H * W, C)`` of a 1x1 map keeps the channels on the last axis, so a
BatchNorm folds into the Linear after it; on a 2x2 map the same reshape scatters the channels.  An fx capture runs
at any size, so ``fuse`` checks the folded graph at another batch and at grown sizes; where it differs, the
fused model refuses other sizes by name (and ``export_onnx`` fixes the batch).  Compared in float64 to 1e-9
relative (a fold rounds once per parameter).
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import repalgebra

D = torch.float64


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            m.weight.data.copy_(1 + 0.5 * torch.randn(c, generator=gen))
            m.bias.data.copy_(torch.randn(c, generator=gen))
    return model.eval()


class TokensByReshape(nn.Module):
    """A CNN head that makes tokens with ``reshape(B, H * W, C)`` (no permute) after a BatchNorm: right at a 1x1 map."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.ReLU(), nn.Conv2d(c, c, 3, 2, 1), nn.ReLU())
        self.norm, self.fc = nn.BatchNorm2d(c), nn.Linear(c, 5)

    def forward(self, x):
        x = self.norm(self.stem(x))
        b, c, h, w = x.shape
        return self.fc(x.reshape(b, h * w, c)).mean(1)


class OneToken(nn.Module):
    """Tokens through a Linear, ``reshape(B, C, N, 1)`` and a BatchNorm2d: a channel reshape only at one token."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.fc, self.norm = nn.Linear(c, c), nn.BatchNorm2d(c)

    def forward(self, x):
        b, n, c = x.shape
        return self.norm(self.fc(x).reshape(b, c, n, 1))


class BatchBehind(nn.Module):
    """``fc(x).reshape(8, -1) * g``: the batch moves behind the features; a per-row scale only at batch 1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.g = nn.Parameter(torch.linspace(-2, 2, 8).view(8, 1))

    def forward(self, x):
        return self.fc(x).reshape(8, -1) * self.g


class GainFirst(BatchBehind):
    """:class:`BatchBehind` with a small input the batch does not size, first: ``forward(gain, x)``."""

    def forward(self, gain, x):
        return super().forward(x) * gain.mean()


CASES = {
    "tokens-by-reshape": (TokensByReshape, (1, 3, 4, 4), [(3, 3, 4, 4), (1, 3, 8, 8), (2, 3, 16, 12)]),
    "one-token": (OneToken, (2, 1, 8), [(3, 1, 8), (2, 4, 8), (1, 9, 8)]),
    "batch-behind": (BatchBehind, (1, 16), [(2, 16), (4, 16)]),
    # The check at another batch grew only the tensors as long as the first one's axis 0 (gain's 3): x stayed at
    # batch 1, the check passed, and batch 2 was 1.96 off, silently (found by a review).
    "batch-behind-unbatched-first": (GainFirst, ((3,), (1, 16)), [((3,), (2, 16)), ((3,), (4, 16))]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_fold_exact_at_the_example_only_is_refused_elsewhere(name):
    make, shape, others = CASES[name]
    torch.manual_seed(0)
    model = randomized(make()).to(D)
    draw = lambda s: tuple(torch.randn(t, dtype=D) for t in s) if isinstance(s[0], tuple) else (torch.randn(s, dtype=D),)  # noqa: E731
    x = draw(shape)
    fused = repalgebra.fuse(model, x)
    with torch.no_grad():
        torch.testing.assert_close(fused(*x), model(*x), rtol=1e-9, atol=1e-9 * float(model(*x).abs().max()))
        refused = 0
        for s in others:
            y = draw(s)
            try:
                got = fused(*y)
            except ValueError as e:
                assert "differs from it at other sizes" in str(e)
                refused += 1
                continue
            torch.testing.assert_close(got, model(*y), rtol=1e-9, atol=1e-9 * float(model(*y).abs().max()))
    assert refused, "every other size ran: the fold this model is made to mislead is gone, so the test tests nothing"
    assert any("differs from it at other sizes" in n for n in fused.fuse_report.notes), str(fused.fuse_report)


class ChannelsLastHead(nn.Module):
    """A channels-last ``(B, H, W, C)`` map through a Linear, then ``reshape(B, C, -1)`` and a BatchNorm1d: at
    ``H = W = 1`` the reshape is a permute and the BN folds into the Linear; at other sizes it interleaves positions
    and channels."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.fc, self.bn, self.c = nn.Linear(c, c), nn.BatchNorm1d(c), c

    def forward(self, x):
        return self.bn(self.fc(x).reshape(x.shape[0], self.c, -1))


def test_each_axis_of_a_channels_last_input_is_checked_on_its_own():
    """The check at other sizes resized axes 2 and 3 of a rank-4 input together and never axis 1: for ``(B, H, W,
    C)`` every run changed the ``C`` the Linear fixes, the original refused it, a refused run counted as holding,
    and the fused model was 5.6 off at 2x3 (a review).  Each axis is resized on its own now: H shows the fold
    differs and the sizes are fixed; C, which the original refuses everywhere, is never declared free."""
    torch.manual_seed(0)
    model = randomized(ChannelsLastHead()).to(D)
    fused = repalgebra.fuse(model, torch.randn(2, 1, 1, 8, dtype=D))
    assert "linear_affine_fold" in fused.fuse_report.rule_counts(), "nothing folds: the test tests nothing"
    with torch.no_grad():
        for shape in [(3, 1, 1, 8), (2, 2, 3, 8), (2, 7, 7, 8)]:
            y = torch.randn(shape, dtype=D)
            try:
                got = fused(y)
            except ValueError as e:
                assert shape[1:3] != (1, 1) and "differs from it at other sizes" in str(e)
                continue
            torch.testing.assert_close(got, model(y), rtol=1e-9, atol=1e-9 * float(model(y).abs().max()))


class PerTokenScale(nn.Module):
    """Tokens ``(B, N, C)`` through a Linear times a BatchNorm1d over ``C``: it holds at any ``N``, and ``C`` is the
    Linear's."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(c, c), nn.BatchNorm1d(c)

    def forward(self, x):
        b, n, c = x.shape
        return self.bn(self.fc(x).reshape(b * n, c)).reshape(b, n, c)


def test_an_axis_the_original_refuses_at_every_size_tried_is_fixed_and_the_others_stay_free():
    torch.manual_seed(0)
    model = randomized(PerTokenScale()).to(D)
    fused = repalgebra.fuse(model, torch.randn(2, 5, 8, dtype=D))
    assert "batch_norm" not in fused.fuse_report.ops_after, str(fused.fuse_report)
    assert any("axis 2 of input 0 fixed" in n for n in fused.fuse_report.notes), str(fused.fuse_report)
    with torch.no_grad():
        for shape in [(3, 9, 8), (1, 1, 8)]:
            y = torch.randn(shape, dtype=D)
            torch.testing.assert_close(fused(y), model(y), rtol=1e-9, atol=1e-9 * float(model(y).abs().max()))
        with pytest.raises(ValueError, match="axis 2 of input 0 fixed"):
            fused(torch.randn(2, 5, 4, dtype=D))


def test_where_the_reshape_moves_no_channel_the_sizes_stay_free():
    """The same head at a 2x2 map: the BN is not folded through the reshape and every size runs."""
    torch.manual_seed(0)
    model = randomized(TokensByReshape()).to(D)
    fused = repalgebra.fuse(model, torch.randn(1, 3, 8, 8, dtype=D))
    with torch.no_grad():
        for s in [(1, 3, 8, 8), (3, 3, 16, 12), (2, 3, 4, 4)]:
            y = torch.randn(s, dtype=D)
            torch.testing.assert_close(fused(y), model(y), rtol=1e-9, atol=1e-9 * float(model(y).abs().max()))


def _ort(path, x: torch.Tensor) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


def test_export_fixes_the_batch_where_a_fold_holds_at_the_example_batch_only(tmp_path):
    torch.manual_seed(0)
    model = BatchBehind().eval()
    _, report = repalgebra.export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 16), return_report=True)
    assert any("differs from the model at another batch" in n for n in report.notes), str(report)
    x = torch.randn(1, 16)
    np.testing.assert_allclose(_ort(tmp_path / "m.onnx", x), model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="dimensions"):  # a batch of 2 is refused, not computed wrong
        _ort(tmp_path / "m.onnx", torch.randn(2, 16))


class Packed(nn.Module):
    """Reshapes whose first axis is not the batch: ``reshape(4, -1)`` and ``reshape(1, -1, C)`` (the batch packed)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        y = self.fc(x)
        return torch.relu(y.reshape(4, -1)), y.reshape(1, -1, 16).mean(1)


def test_export_keeps_a_reshape_s_minus_one_where_the_model_wrote_it(tmp_path):
    # The ONNX Reshape took axis 0 for the batch: at batch 2, (8, 8) came out where the model gives (4, 16).
    torch.manual_seed(0)
    model = Packed().eval()
    repalgebra.export_onnx(model, tmp_path / "p.onnx", torch.randn(1, 16))
    s = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    for b in (1, 2, 4):
        x = torch.randn(b, 16)
        got = s.run(None, {s.get_inputs()[0].name: x.numpy()})
        for g, w in zip(got, model(x)):
            assert g.shape == tuple(w.shape)
            np.testing.assert_allclose(g, w.detach().numpy(), rtol=1e-5, atol=1e-5)


class T5Style(nn.Module):
    """T5's layer: an RMSNorm whose weight multiplies the normed input, then an attention whose projections are
    reshaped with sizes unpacked from a slice of the shape (``bs, L = h.shape[:2]``); a conv stem's ``H, W =
    x.shape[-2:]`` the same way.  The sizes become shape reads of ``h`` (a ``reshape_dyn``), not a carried call,
    so the norm's weight has the projection as its one reader and folds into it (``bn_into_linear``)."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(d, generator=torch.Generator().manual_seed(0)))
        self.q, self.heads = nn.Linear(d, d, bias=False), heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        bs, L = h.shape[:2]
        q = self.q(h).view(bs, L, self.heads, -1).transpose(1, 2)
        width, = h.shape[-1:]
        return x + q.transpose(1, 2).reshape(bs * L, width).reshape(bs, L, width)


def test_sizes_unpacked_from_a_slice_of_the_shape_are_shape_reads():
    model = T5Style().double().eval()
    fused = repalgebra.fuse(model, torch.randn(2, 5, 16, dtype=D))
    r = fused.fuse_report
    assert r.capture == "fx" and r.rule_counts().get("bn_into_linear") == 1 and "opaque" not in r.ops_after, str(r)
    for shape in ((2, 5, 16), (3, 9, 16), (1, 1, 16)):
        x = torch.randn(shape, dtype=D)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-9)


class ShortcutBesidePatch(nn.Module):
    """A 1x1 stride-2 shortcut beside a 2x2 stride-2 patch conv (Conv1d too): their outputs have one size at even
    sizes only, and where one is a single column the add broadcasts it.  The two were merged into one conv at an
    even example; at 8x3 the fused model returned other numbers (1.65 apart)."""

    def __init__(self, conv: type = nn.Conv2d) -> None:
        super().__init__()
        self.short, self.patch = conv(4, 4, 1, stride=2), conv(4, 4, 2, stride=2)

    def forward(self, x):
        return self.short(x) + self.patch(x)


@pytest.mark.parametrize("conv, example, other", [(nn.Conv2d, (1, 4, 8, 2), (1, 4, 8, 3)), (nn.Conv1d, (1, 4, 2), (1, 4, 3))])
def test_convs_whose_outputs_agree_at_even_sizes_only_stay_apart(conv, example, other):
    model = ShortcutBesidePatch(conv).to(D).eval()
    fused = repalgebra.fuse(model, torch.randn(example, dtype=D))
    assert fused.fuse_report.ops_after.get("conv2d", 0) + fused.fuse_report.ops_after.get("conv1d", 0) == 2
    x = torch.randn(other, dtype=D)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-9)


class BatchIntoRows(nn.Module):
    """A conv, then ``y.reshape(C, -1) * g[:, None]`` and back to ``y.shape``: at batch 1 a per-channel scale at
    every height and width; at batch 2 a row holds two channels' values."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.g = nn.Parameter(torch.linspace(0.5, 1.5, c))

    def forward(self, x):
        y = self.conv(x)
        return (y.reshape(y.shape[1], -1) * self.g[:, None]).reshape(y.shape)


def test_a_fold_exact_at_the_example_batch_at_every_size_is_checked_at_another_batch():
    """The runs at other sizes resize one axis each; the first the original accepts also grows the batch, the rest
    keep the example's (they cost less so).  A fold that holds at batch 1 for every height and width must still be
    seen to differ at batch 2."""
    model = BatchIntoRows().to(D).eval()
    x = torch.randn(1, 3, 6, 5, dtype=D)
    fused = repalgebra.fuse(model, x)
    with torch.no_grad():
        for shape in [(1, 3, 6, 5), (1, 3, 8, 7), (2, 3, 6, 5), (3, 3, 4, 4)]:
            y = torch.randn(shape, dtype=D)
            try:
                got = fused(y)
            except ValueError as e:  # refused by name: the fused graph holds at the example's sizes only
                assert shape != x.shape and "sizes" in str(e), str(e)
                continue
            torch.testing.assert_close(got, model(y), rtol=1e-9, atol=1e-9)


class LargePool(nn.Module):
    """A conv and BN, a flatten and a reshape back, and a 100x100 average pool: a map under 100 is refused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.nn.functional.avg_pool2d(y.flatten(2).reshape(y.shape), 100)


def test_an_axis_refused_at_a_quarter_of_its_size_is_tried_at_half():
    """Each axis is resized alone to a quarter of its size first (a cheaper run); a model that refuses so small a
    map is tried at half, and its sizes stay free."""
    model = randomized(LargePool()).to(D)
    fused = repalgebra.fuse(model, torch.randn(1, 3, 256, 256, dtype=D))
    assert fused.fuse_report.rule_counts().get("bn_fold") == 1, str(fused.fuse_report)
    assert not any(f"axis {k}" in n for n in fused.fuse_report.notes for k in (2, 3)), str(fused.fuse_report)
    y = torch.randn(2, 3, 128, 200, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(fused(y), model(y), rtol=1e-9, atol=1e-9)


class FlattenedBack(nn.Module):
    """A conv and BN, a flatten and a reshape back (so ``fuse`` checks its folded graph at other sizes), a mean."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y.flatten(2).reshape(y.shape).mean((2, 3))


class Strips(FlattenedBack):
    """A scanner's row and column passes: a strip is a full row or a full column of the 256x256 page (one of its
    sides stays 256), the other side any length."""

    def forward(self, x):
        torch._assert((x.shape[2] == 256) | (x.shape[3] == 256), "a strip spans the page on one side")
        return super().forward(x)


def _runs_of(model_type: type, monkeypatch, fused: bool = False) -> list[tuple]:
    """The input shapes ``fuse`` runs the original (a ``model_type``; with ``fused``, its fused forms) at, in order,
    from now on."""
    fuse_module = sys.modules["repalgebra.fuse"]
    real, shapes = fuse_module._run, []

    def recorded(module, call, *args, **kwargs):
        if type(module) is model_type or fused and type(module).__name__ == f"Fused{model_type.__name__}":
            shapes.append(tuple(call.args[0].shape))
        return real(module, call, *args, **kwargs)

    monkeypatch.setattr(fuse_module, "_run", recorded)
    return shapes


def test_the_run_for_a_later_axis_halves_the_axes_shown_free_before(monkeypatch):
    """The run for W takes H, shown free by the run before, at half its size: (1, 3, 128, 64), not (1, 3, 256, 64),
    a cheaper run where the sizes still differ."""
    model = randomized(FlattenedBack()).to(D)
    shapes = _runs_of(FlattenedBack, monkeypatch)
    fused = repalgebra.fuse(model, torch.randn(1, 3, 256, 256, dtype=D))
    assert (2, 3, 64, 256) in shapes and (1, 3, 128, 64) in shapes, shapes
    assert (1, 3, 256, 64) not in shapes, shapes
    assert not any(f"axis {k}" in n for n in fused.fuse_report.notes for k in (2, 3)), str(fused.fuse_report)
    y = torch.randn(2, 3, 96, 40, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(fused(y), model(y), rtol=1e-9, atol=1e-9)
    shapes.clear()  # at 128, half of H is the size W takes: W is resized alone, so no run is square but the example
    repalgebra.fuse(model, torch.randn(1, 3, 128, 128, dtype=D))
    assert (1, 3, 128, 64) in shapes, shapes
    assert [s for s in shapes if s[1] == 3 and s[2] == s[3] != 128] == [], shapes


def test_an_axis_refused_beside_the_axes_shown_before_is_tried_alone(monkeypatch):
    """A model that refuses H and W resized together (a strip keeps one side whole) is run with W resized alone,
    and W stays free: the run beside a halved H is a saving, not a test the axis must pass."""
    model = randomized(Strips()).to(D)
    shapes = _runs_of(Strips, monkeypatch)
    fused = repalgebra.fuse(model, torch.randn(1, 3, 256, 256, dtype=D))
    assert (1, 3, 256, 64) in shapes, shapes
    assert shapes.count((1, 3, 128, 64)) == 1, shapes  # refused once, not tried again as if float64 had failed
    assert not any(f"axis {k}" in n for n in fused.fuse_report.notes for k in (2, 3)), str(fused.fuse_report)
    assert fused.fuse_report.rule_counts().get("bn_fold") == 1, str(fused.fuse_report)
    with torch.no_grad():
        for shape in [(1, 3, 256, 40), (2, 3, 24, 256)]:
            y = torch.randn(shape, dtype=D)
            torch.testing.assert_close(fused(y), model(y), rtol=1e-9, atol=1e-9)
        with pytest.raises(Exception, match="spans the page"):  # as the original refuses it
            fused(torch.randn(1, 3, 64, 64, dtype=D))


def test_the_check_under_inference_mode_reuses_the_fused_forms_run_at_the_example(monkeypatch):
    """The check under ``torch.inference_mode`` compares the model's run there with the fused form's run at the
    example, which the runs at other sizes (in the model's dtype) had taken the place of: the fused form ran at the
    example a second time (FastViT: 0.17 s of its fuse)."""
    model = randomized(FlattenedBack()).to(D)
    shapes = _runs_of(FlattenedBack, monkeypatch, fused=True)
    repalgebra.fuse(model, torch.randn(1, 3, 256, 256, dtype=D))
    # the model's and its fused form's check, the model under inference_mode, and under each default dtype
    assert shapes.count((1, 3, 256, 256)) == 5, shapes
