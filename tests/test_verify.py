"""``repalgebra.verify``: numbers per output, dtype-derived tolerance, pass/fail, callers' modules untouched."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from repalgebra import VerifyReport, fuse, verify
from repalgebra.verify import TOLERANCES, first_difference


def model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        m[1].running_var.uniform_(0.5, 2)
        m[1].running_mean.normal_(0, 0.2)
    return m.to(dtype).eval()


class Perturbed(nn.Module):
    def __init__(self, inner: nn.Module, eps: float) -> None:
        super().__init__()
        self.inner, self.eps = inner, eps

    def forward(self, x):
        y = self.inner(x)
        return y + self.eps * y.abs().max()


def test_identical_models_pass_with_zero_error():
    m = model()
    r = verify(m, m, torch.randn(1, 3, 8, 8))
    assert isinstance(r, VerifyReport) and r and r.passed
    assert r.max_abs == 0 and r.max_rel == 0 and r.n == 3 and r.input_shapes == [(1, 3, 8, 8)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_tolerance_follows_dtype(dtype, tol):
    assert TOLERANCES[dtype] == tol
    m = model(dtype)
    assert verify(m, m, torch.randn(1, 3, 6, 6, dtype=dtype)).tolerance == tol


def test_relative_error_is_measured_and_judged():
    m = model(torch.float64)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    small = verify(m, Perturbed(m, 1e-11), x)
    assert small and 5e-12 < small.max_rel < 2e-11
    big = verify(m, Perturbed(m, 1e-7), x)
    assert not big and not big.passed and 5e-8 < big.max_rel < 2e-7
    assert verify(m, Perturbed(m, 1e-7), x, tolerance=1e-6)


def test_float64_run_casts_copies_and_leaves_callers_alone():
    m = model().train()
    fused = fuse(m, torch.randn(1, 3, 8, 8))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    r = verify(m, fused, torch.randn(1, 3, 8, 8), dtype=torch.float64)
    assert r and r.dtype == torch.float64
    # float32 weights compared in float64: float32's tolerance applies, the numbers show its rounding
    assert r.tolerance == 1e-5 and 0 < r.max_rel < 1e-6
    assert m.training and all(p.dtype == torch.float32 for p in m.parameters())
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())  # no BN statistics updated
    assert all(p.dtype == torch.float32 for p in fused.parameters())


def test_table_and_bool():
    m = model()
    text = str(verify(m, m, torch.randn(1, 3, 5, 5), n=2))
    assert text.startswith("verify: PASS (2 random inputs 1x3x5x5, float32, tolerance 1e-05 relative)")
    assert "max abs err" in text and "max rel err" in text and "1x4x5x5" in text
    bad = verify(m, Perturbed(m, 1e-2), torch.randn(1, 3, 5, 5))
    assert not bad and str(bad).startswith("verify: FAIL") and "NO" in str(bad)


def test_shape_or_structure_mismatch_fails():
    m = model()
    other = nn.Sequential(m, nn.AvgPool2d(2))
    r = verify(m, other, torch.randn(1, 3, 6, 6))
    assert not r and "shapes differ" in r.outputs[0].problem

    class Two(nn.Module):
        def forward(self, x):
            return x, x

    r = verify(Two(), nn.Identity(), torch.randn(2, 2))
    assert not r and "output structures differ" in r.problem


def test_several_outputs_and_inputs():
    class M(nn.Module):
        def forward(self, x, y):
            return {"a": x + y, "b": (x * y, x - y)}

    class N(M):
        def forward(self, x, y):
            out = super().forward(x, y)
            out["b"] = (out["b"][0] * (1 + 1e-3), out["b"][1])
            return out

    r = verify(M(), N(), (torch.randn(3, 4), torch.randn(3, 4)))
    assert [o.passed(r.tolerance) for o in r.outputs] == [True, False, True]
    assert not r


def test_nan_fails_and_inferred_inputs():
    m = model()
    r = verify(m, Perturbed(m, float("nan")))
    assert not r and r.outputs[0].problem.startswith("NaN")
    assert r.input_shapes == [(1, 3, 64, 64)]


def test_integer_inputs_are_used_as_given():
    # Token ids are not data to draw at random: every run uses the example's own, in the models' dtype.
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)).eval()
    ids = torch.tensor([[1, 2, 9]])
    report = verify(emb, emb, ids, n=2)
    assert report and report.dtype == torch.float32
    shifted = nn.Sequential(copy.deepcopy(emb), Perturbed(nn.Identity(), 1e-3))
    assert not verify(emb, shifted, ids, n=1)
    with pytest.raises(TypeError):
        verify(model(), model(), torch.ones(1, 3, 4, 4, dtype=torch.int64), dtype=torch.int64)


def test_verify_does_not_change_modules_in_place_when_casting():
    m = model()
    before = copy.deepcopy(m)
    verify(m, m, torch.randn(1, 3, 4, 4), dtype=torch.float16)
    for (k, a), (_, b) in zip(m.state_dict().items(), before.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), k


class Smoothed(nn.Module):
    """A video model's temporal smoothing: each call adds the previous frame's features and keeps its own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.register_buffer("prev", torch.zeros(1, 3, 8, 8))

    def forward(self, x):
        y = self.conv(x)
        out = y + self.prev
        self.prev = y.detach()
        return out


def test_verify_leaves_the_state_of_both_models_as_it_was():
    """``verify`` ran an eval-mode model itself: the caller's next call added verify's random frame (review R10)."""
    torch.manual_seed(0)
    model = Smoothed().eval()
    other = copy.deepcopy(model)
    assert verify(model, other, (1, 3, 8, 8), n=3)
    assert not model.prev.any() and not other.prev.any()


def test_bad_arguments_and_failing_models_are_named():
    """``verify(model, "fused.pt")``, ``dtype="float64"``, ``n=0`` and ``tolerance=-1`` gave an AttributeError, an
    empty FAIL report or a report that fails everything; a model failing on the inputs gave torch's bare error,
    not saying which of the two failed."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(TypeError, match="candidate must be an nn.Module, got str .a path"):
        verify(model, "fused.pt", x)
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        verify(model, model, x, dtype="float64")
    with pytest.raises(ValueError, match="1 or more; got 0"):
        verify(model, model, x, n=0)
    with pytest.raises(ValueError, match="positive relative error bound, got -1"):
        verify(model, model, x, tolerance=-1)
    other = nn.Conv2d(4, 4, 3).eval()
    with pytest.raises(ValueError, match=r"the candidate \(Conv2d\) fails on inputs 1x3x8x8 float32: RuntimeError"):
        verify(model, other, x)


class Pathways(nn.Module):
    """SlowFast's list input, a dict of feature maps, and an actor-critic's outputs: a distribution and a float."""

    def __init__(self) -> None:
        super().__init__()
        self.slow, self.fast = model(), model()

    def forward(self, paths, extra):
        y = self.slow(paths[0]) + self.fast(paths[1]) + extra["bias"]
        logits = y.mean((2, 3))
        return torch.distributions.Categorical(logits=logits), float(y.abs().max())


def test_structured_inputs_and_outputs_are_compared_as_fuse_takes_them():
    """A list or dict argument raised "'list' object has no attribute 'is_floating_point'" (found by two probes);
    a distribution compared by identity, a float exactly (found by a probe).  A shape stands for one input."""
    m = Pathways()
    example = ([torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)], {"bias": torch.randn(1, 4, 1, 1)})
    fused = fuse(m, example)
    assert sum(isinstance(x, nn.BatchNorm2d) for x in fused.modules()) == 0, str(fused.fuse_report)
    report = verify(m, fused, example, dtype=torch.float64)
    assert report.passed and sum(o.shape == (2, 4) for o in report.outputs) == 2, str(report)  # logits, and _param
    off = copy.deepcopy(m)
    with torch.no_grad():
        off.fast[1].running_mean += 1e-2
    assert not verify(m, off, example).passed
    assert verify(model(), fuse(model(), torch.randn(2, 3, 8, 8)), (2, 3, 8, 8)).passed


def test_output_objects_that_hold_themselves_are_compared_once_each():
    """A cache whose layers point back to it: opened again at every level, the comparison recursed without end
    through a dataclass (a RecursionError) and grew as n**4 with the layers (found by a review)."""
    import dataclasses
    import time

    from repalgebra.verify import first_difference

    @dataclasses.dataclass(eq=False)
    class Layer:
        keys: torch.Tensor
        cache: object = None

    class Cache:
        def __init__(self, n: int, scale: float = 1.0) -> None:
            self.layers = [Layer(torch.full((2, 3), float(k)) * scale) for k in range(n)]
            for layer in self.layers:
                layer.cache = self

    start = time.perf_counter()
    assert first_difference(Cache(24), Cache(24), 1e-9) is None
    assert time.perf_counter() - start < 5  # (n**4 took about 10 s at 24 layers; this is one pass)
    assert "differs" in first_difference(Cache(4), Cache(4, 2.0), 1e-9)


def test_a_long_chain_of_output_objects_is_compared_without_running_out_of_stack():
    """A beam search's hypotheses linked by ``hyp.prev``, 400 deep: opened all the way down, the comparison ran out
    of Python's stack (found by a review).  Below a depth they are compared by identity: two runs' chains differ."""
    from repalgebra.verify import first_difference

    class Hyp:
        def __init__(self, prev, score):
            self.prev, self.score = prev, score

    def chain(n):
        h = None
        for k in range(n):
            h = Hyp(h, torch.tensor([float(k)]))
        return h

    assert first_difference(chain(4), chain(4), 1e-9) is None
    assert "differs" in first_difference(chain(400), chain(400), 1e-9)


class Spectrum(nn.Module):
    """A conv's 2-D real FFT (a spectral head), or its conjugate."""

    def __init__(self, conjugate: bool = False) -> None:
        super().__init__()
        self.conv, self.conjugate = nn.Conv2d(3, 3, 3, padding=1), conjugate

    def forward(self, x):
        y = torch.fft.rfft2(self.conv(x))
        return y.conj() if self.conjugate else y


def test_complex_outputs_are_compared_in_both_parts():
    """``.double()`` of a complex output dropped its imaginary part: a conjugate passed ``verify`` at 0.0 and fuse's
    own check (``first_difference``), 24 off (review R9).  Both parts are compared now (float64, 1e-9)."""
    torch.manual_seed(0)
    ref = Spectrum().double().eval()
    conj = Spectrum(conjugate=True).double().eval()
    conj.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a complex output is noted)
        assert not verify(ref, conj, x)
        assert verify(ref, copy.deepcopy(ref), x)
    with torch.no_grad():
        assert first_difference(ref(x), conj(x), 1e-9) is not None
        assert first_difference(ref(x), ref(x).clone(), 1e-9) is None


def test_outputs_of_another_kind_of_dtype_differ():
    """An integer output against a floating-point one of equal values passed (review R9); a precision is no kind."""
    labels = torch.tensor([0, 2, 1])
    assert "integer" in first_difference(labels, labels.double(), 1e-9)
    assert first_difference(labels.float(), labels.double(), 1e-9) is None
    assert "bool" in first_difference(labels > 0, (labels > 0).long(), 1e-9)
