"""Rotary embeddings written with complex numbers (Meta's LLaMA) export to ONNX, which has no complex tensors.

The fused model carries ``view_as_complex``, the product by the complex ``freqs_cis`` and ``view_as_real`` as
calls; ``torch.onnx.export`` cannot export them, so ``export_onnx`` refused the model by name.  The ONNX lowering
now writes the product as real arithmetic on (real, imaginary) pairs (:mod:`repalgebra.backend.complex_pairs`).
Tolerance: ``rtol=1e-5`` of the output's largest magnitude, float32 (a complex product and its real form differ
in the rounding of a fused multiply-add only).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repalgebra
from repalgebra.backend.onnx_fallback import FallbackError


def freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """Meta's ``precompute_freqs_cis``: ``exp(i t theta^(-2k/dim))`` for positions ``t`` and pairs ``k``."""
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    angles = torch.outer(torch.arange(end).float(), freqs)
    return torch.polar(torch.ones_like(angles), angles)


class RotaryAttention(nn.Module):
    """Meta LLaMA's attention: rotary embedding as a complex product, ``freqs_cis`` a plain attribute sliced to the
    sequence, RMSNorm before.  ``after`` is what the rotated keys also go through: nothing, or ``abs`` of their
    complex form (which has no real-pair form here)."""

    def __init__(self, dim: int = 16, heads: int = 2, after: str = "", in_float32: bool = True) -> None:
        super().__init__()
        self.heads, self.head_dim, self.after = heads, dim // heads, after
        self.in_float32 = in_float32  # Meta's rotation and softmax in float32 whatever the model's dtype
        self.norm = nn.RMSNorm(dim)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.freqs_cis = freqs_cis(self.head_dim, 64)

    def rotate(self, x: torch.Tensor, fc: torch.Tensor) -> torch.Tensor:
        z = torch.view_as_complex((x.float() if self.in_float32 else x).reshape(*x.shape[:-1], -1, 2))
        rotated = z * fc.view(1, x.shape[1], 1, -1)
        if self.after == "abs":
            return rotated.abs().repeat_interleave(2, -1).type_as(x)
        return torch.view_as_real(rotated).flatten(3).type_as(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, _ = tokens.shape
        h = self.norm(tokens)
        q, k, v = (w(h).view(b, n, self.heads, self.head_dim) for w in (self.wq, self.wk, self.wv))
        fc = self.freqs_cis[:n]
        if n > 1:  # Python on a size (Meta's ``if seqlen > 1:`` builds the mask): torch.export captures it
            q = q * 1.0
        q, k = self.rotate(q, fc), self.rotate(k, fc)
        scores = q.transpose(1, 2) @ k.transpose(1, 2).transpose(2, 3) / math.sqrt(self.head_dim)
        out = F.softmax(scores.float() if self.in_float32 else scores, -1).type_as(q) @ v.transpose(1, 2)
        return tokens + self.wo(out.transpose(1, 2).reshape(b, n, -1))


def _run(path: str, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_a_complex_rotary_embedding_exports_as_real_arithmetic(tmp_path):
    torch.manual_seed(0)
    model = RotaryAttention().eval()
    x = torch.randn(2, 8, 16)
    fused = repalgebra.fuse(model, x)
    assert any("view_as_complex" in o for o in fused.fuse_report.opaque)  # the fused model keeps the complex product
    path = str(tmp_path / "rope.onnx")
    repalgebra.export_onnx(fused, path, input_shape=x)
    proto = onnx.load(path)
    fallback = {p.key: p.value for p in proto.metadata_props}.get("repalgebra.fallback", "")
    assert "view_as" not in fallback and "mul" not in fallback, fallback  # all three written by our lowering
    for batch in (1, 2, 3):
        t = torch.randn(batch, 8, 16, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = model(t).numpy()
        assert np.abs(_run(path, t) - want).max() <= 1e-5 * np.abs(want).max()


def test_a_complex_value_used_otherwise_is_still_refused_by_name(tmp_path):
    """``z.abs()`` of the rotated keys has no real-pair form here: the graph is left as it is, and the fallback
    refuses the complex calls by name, as before."""
    torch.manual_seed(0)
    model = RotaryAttention(after="abs").eval()
    x = torch.randn(2, 8, 16)
    with pytest.raises(FallbackError, match="view_as_complex"):
        repalgebra.export_onnx(repalgebra.fuse(model, x), str(tmp_path / "abs.onnx"), input_shape=x)


class BufferedRotaryAttention(RotaryAttention):
    """torchtitan's form: ``freqs_cis`` a registered complex buffer (Meta's is a plain attribute).  fuse refused it
    ("only floating-point models can be fused").  In the model's dtype throughout, so that it runs in float64."""

    def __init__(self) -> None:
        super().__init__(in_float32=False)
        table = self.freqs_cis
        del self.freqs_cis
        self.register_buffer("freqs_cis", table, persistent=False)

    def forward(self, tokens):
        assert tokens.amax(-1).shape[-1] > 0  # (a reduction's size, which fx cannot check per call: torch.export captures it)
        return super().forward(tokens)


def test_a_registered_complex_buffer_fuses_verifies_in_float64_and_exports(tmp_path):
    torch.manual_seed(0)
    model = BufferedRotaryAttention().eval()
    x = torch.randn(2, 8, 16)
    fused = repalgebra.fuse(model, x)
    assert fused.fuse_report.capture == "specialized", str(fused.fuse_report)
    assert not [name for name, t in fused.named_buffers() if t.is_complex()]  # held as its real view
    report = repalgebra.verify(model, fused, x, dtype=torch.float64)  # (a cast by .to() dropped the imaginary part)
    assert report.passed, report
    path = str(tmp_path / "buffered.onnx")
    repalgebra.export_onnx(fused, path, input_shape=x)
    t = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(t).numpy()
    assert np.abs(_run(path, t) - want).max() <= 1e-5 * np.abs(want).max()


def test_a_wider_complex_constant_is_refused_by_name(tmp_path):
    """A complex128 ``freqs_cis`` makes the product complex128 (float64 out of a float32 model): the pairs in
    float32 computed something else, refused only by the final check's "output 0 is float32, not float64" (found
    by a review).  The graph is left as it is, and the complex calls are refused by name."""
    torch.manual_seed(0)
    model = RotaryAttention().eval()
    model.freqs_cis = model.freqs_cis.to(torch.complex128)
    x = torch.randn(2, 8, 16)
    with pytest.raises(FallbackError, match="no ONNX lowering for view_as_complex"):
        repalgebra.export_onnx(repalgebra.fuse(model, x), str(tmp_path / "wide.onnx"), input_shape=x)
