"""Text encoders written the way transformer libraries write them: captured by ``torch.fx``, at any length.

A BERT-style embedding slices its ``position_ids`` buffer by the sequence length it reads from the input
(``self.position_ids[:, :seq_length]``) and expands a ``token_type_ids`` buffer to the batch; its attention
turns a 0/1 mask into additive minus infinity of the dtype it computes in (``torch.finfo(scores.dtype).min``) and
tests the mask's rank (``attention_mask.dim() == 2``).  fx stopped on each (a Proxy in a buffer's index, a Proxy
for ``finfo``'s dtype), and such a model was captured at fixed lengths.  Compared in float64 to 1e-9 relative;
the ONNX export in float32 to 1e-5.
"""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repalgebra

D = torch.float64


class Encoder(nn.Module):
    """Embeddings (word, token type, position buffers), a LayerNorm, one multi-head self-attention."""

    def __init__(self, vocab: int = 50, d: int = 16, heads: int = 2, positions: int = 64) -> None:
        super().__init__()
        self.words, self.types, self.positions = nn.Embedding(vocab, d), nn.Embedding(2, d), nn.Embedding(positions, d)
        self.norm, self.dropout = nn.LayerNorm(d), nn.Dropout(0.1)
        self.register_buffer("position_ids", torch.arange(positions).expand((1, -1)), persistent=False)
        self.register_buffer("token_type_ids", torch.zeros(1, positions, dtype=torch.long), persistent=False)
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.heads = heads

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.size()[:-1] + (self.heads, x.size(-1) // self.heads)
        return x.view(shape).permute(0, 2, 1, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, past: int = 0) -> torch.Tensor:
        shape = input_ids.size()
        length = shape[1]
        position_ids = self.position_ids[:, past: length + past]
        token_type_ids = self.token_type_ids[:, :length].expand(shape[0], length)
        h = self.words(input_ids) + self.types(token_type_ids) + self.positions(position_ids)
        h = self.dropout(self.norm(h))
        q, k, v = (self.split_heads(f(h)) for f in (self.query, self.key, self.value))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.size(-1))
        if attention_mask is not None:
            mask = attention_mask[:, None, None, :] if attention_mask.dim() == 2 else attention_mask[:, None]
            scores = scores + (1.0 - mask) * torch.finfo(scores.dtype).min
        context = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3).contiguous()
        return context.view(context.size()[:-2] + (-1,))


def masked(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch * 100 + length)
    ids = torch.randint(0, 50, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=D)
    mask[0, length // 2 + 1:] = 0  # a padded sequence
    return ids, mask


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-9) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= rtol * float(a.abs().max())


def test_a_buffer_sliced_by_the_length_is_traced_and_runs_at_any_length():
    torch.manual_seed(0)
    model = Encoder().to(D).eval()
    fused = repalgebra.fuse(model, torch.randint(0, 50, (2, 5)))
    assert fused.fuse_report.capture == "fx"
    with torch.no_grad():
        for batch, length in ((3, 9), (1, 1), (2, 64)):
            ids = torch.randint(0, 50, (batch, length))
            assert close(model(ids), fused(ids))


def test_the_mask_value_is_read_from_the_dtype_per_call():
    torch.manual_seed(0)
    model = Encoder().to(D).eval()
    fused = repalgebra.fuse(model, masked(2, 5))
    assert fused.fuse_report.capture == "fx"
    with torch.no_grad():
        ids, mask = masked(3, 7)  # cast down after fusing: float64's minimum would be -inf in float32, and 0 * -inf NaN
        want = model.float()(ids, mask.float())
        assert torch.isfinite(want).all() and close(want.double(), fused.float()(ids, mask.float()).double(), 1e-5)
        model.double(), fused.double()
        for batch, length in ((3, 7), (1, 12)):
            assert close(model(*masked(batch, length)), fused(*masked(batch, length)))
        three_d = masked(2, 5)[1][:, None, :].expand(2, 5, 5)  # the other branch of the rank test: refused
        with pytest.raises(ValueError, match="fused at inputs with 2, 2 axes"):
            fused(masked(2, 5)[0], three_d)


def test_the_text_encoder_exports_to_onnx():
    torch.manual_seed(0)
    model = Encoder().eval()
    ids, mask = masked(2, 5)
    mask = mask.float()
    proto = repalgebra.export_onnx(repalgebra.fuse(model, (ids, mask)), None, input_shape=[ids, mask])
    session = ort.InferenceSession(proto.SerializeToString())
    names = [i.name for i in session.get_inputs()]
    (got,) = session.run(None, dict(zip(names, (ids.numpy(), mask.numpy()))))
    want = model(ids, mask).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


class Layer(nn.Module):
    """A decoder layer of today's text models: RMSNorm-free LLaMA rotary angles from a buffer expanded to the batch,
    a causal mask made with ``torch.empty`` at the input's sizes (CLIP), a float16-only clamp (Whisper, T5)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, d // 2, dtype=torch.float64) / (d // 2)), persistent=False)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        bsz, length, _ = h.shape
        position = torch.arange(length, dtype=h.dtype)[None, None, :]
        angles = (self.inv_freq[None, :, None].expand(bsz, -1, 1).to(h.dtype) @ position).transpose(1, 2)
        rotary = torch.cat((angles.cos(), angles.sin()), -1)
        mask = torch.empty(bsz, length, length, dtype=h.dtype).fill_(torch.finfo(h.dtype).min).triu_(1)
        q, k = self.q(h) * rotary, self.k(h) * rotary
        h = h + 0.5 * self.o(((q @ k.transpose(1, 2)) / 4 + mask).softmax(-1) @ self.v(h))  # the half folds into o
        if h.dtype == torch.float16:
            h = h.clamp(-60000, 60000)
        return h


def test_sizes_and_dtypes_read_without_branching_on_sizes_are_traced():
    torch.manual_seed(0)
    model = Layer().to(D).eval()
    fused = repalgebra.fuse(model, torch.randn(2, 5, 16, dtype=D))
    report = fused.fuse_report
    assert report.capture == "fx" and report.fired
    assert any("tests of a dtype" in note for note in report.notes)
    with torch.no_grad():
        for batch, length in ((3, 9), (1, 2)):
            h = torch.randn(batch, length, 16, dtype=D)
            assert close(model(h), fused(h))
        with pytest.raises(ValueError, match="fused with inputs of dtypes float64, and what it computes depends on them"):
            fused.float()(torch.randn(2, 5, 16))  # the clamp is the float16 branch's: in another dtype it refuses


def test_tracing_leaves_torch_as_it_found_it():
    # The trace records some torch calls by replacing them for its duration; torch.Tensor's own dunders are never
    # replaced (a __getitem__ set on it, even set back, leaves tensors passing for Python sequences).
    before, functions = dict(vars(torch.Tensor)), {name: getattr(torch, name) for name in ("zeros", "empty", "finfo")}
    repalgebra.fuse(Encoder().eval(), masked(2, 5)[0])
    assert dict(vars(torch.Tensor)) == before
    assert all(getattr(torch, name) is f for name, f in functions.items())
    assert torch.tensor(torch.tensor(3.0)).item() == 3.0  # a 0-d tensor is no sequence


class MaskKinds(nn.Module):
    """A mask that may come as bools (made additive here) or already additive, told apart by its dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.b(self.a(x))
        if mask.dtype == torch.bool:
            mask = (1.0 - mask.to(y.dtype)) * -1e4
        return (y + mask).softmax(-1)


def test_a_dtype_test_of_any_input_guards_that_inputs_dtype():
    torch.manual_seed(0)
    model = MaskKinds().to(D).eval()
    x, bools = torch.randn(2, 4, 6, dtype=D), torch.rand(2, 4, 6) > 0.3
    fused = repalgebra.fuse(model, (x, bools))
    with torch.no_grad():
        assert close(model(x, bools), fused(x, bools))
        with pytest.raises(ValueError, match="fused with inputs of dtypes float64, bool"):
            fused(x, torch.randn(2, 4, 6, dtype=D))  # an additive mask: the model takes its other branch


def test_a_fused_model_with_calls_sized_at_run_time_pickles_and_fuses_again():
    # Unpickling a GraphModule traces its code again with torch's own tracer: torch.empty(bsz, L, L) and
    # torch.finfo(h.dtype) there would fail on its Proxies; they are written so that they record themselves.
    torch.manual_seed(0)
    model = Layer().to(D).eval()
    h = torch.randn(2, 5, 16, dtype=D)
    fused = repalgebra.fuse(model, h)
    again = repalgebra.fuse(fused, h)
    with torch.no_grad():
        other = torch.randn(3, 7, 16, dtype=D)
        for copy_ in (pickle.loads(pickle.dumps(fused)), again):
            assert close(model(other), copy_(other))


class ClampsInFloat64(nn.Module):
    """``x.dtype is torch.float64``: Python's ``is`` of a traced value is always false, whatever the dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.a(x))
        return y.clamp(-3, 3) if x.dtype is torch.float64 else y


def test_a_dtype_looked_at_outside_the_graph_is_taken_as_at_the_example():
    """``is`` of a traced value is always false: the trace took the other branch.  The model went to torch.export;
    now it is traced again with each ``x.dtype`` as at the example (float64: the clamp), and the fused model runs
    in float64 only."""
    torch.manual_seed(0)
    model = ClampsInFloat64().to(D).eval()
    x = 0.1 * torch.randn(2, 4, 6, dtype=D)  # small: the clamp changes nothing here, and the check cannot tell
    fused = repalgebra.fuse(model, x)
    assert fused.fuse_report.capture == "fx", str(fused.fuse_report)
    assert any("x.dtype" in n and "taken as at the example" in n for n in fused.fuse_report.notes)
    with torch.no_grad():
        assert close(model(100 * x), fused(100 * x))
        with pytest.raises(ValueError, match="fused with inputs of dtypes float64"):
            fused(x.float())


class LoraConv(nn.Module):
    """peft's LoRA ``Conv2d`` layer: ``_cast_input_dtype`` (``if x.dtype == dtype: return x``, the dtype its
    ``lora_A``'s weight's), the result cast back to the base layer's dtype (``result.to(torch_result_dtype)``)."""

    def __init__(self, c: int = 8, cast: bool = True) -> None:
        super().__init__()
        self.base_layer, self.cast_input_dtype_enabled = nn.Conv2d(c, c, 3, padding=1), cast
        self.lora_A = nn.ModuleDict({"default": nn.Conv2d(c, 2, 3, padding=1, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Conv2d(2, c, 1, bias=False)})

    def _cast_input_dtype(self, x, dtype):
        if (not self.cast_input_dtype_enabled) or (x.dtype == dtype):
            return x
        return x.to(dtype=dtype)

    def forward(self, x):
        result = self.base_layer(x)
        torch_result_dtype = result.dtype
        a, b = self.lora_A["default"], self.lora_B["default"]
        x = self._cast_input_dtype(x, a.weight.dtype)  # not read where the cast is disabled: a read left unused
        return (result + b(a(x)) * 2.0).to(torch_result_dtype)


class LoraNet(nn.Module):
    def __init__(self, cast: bool) -> None:
        super().__init__()
        self.stem, self.lora, self.bn = nn.Conv2d(3, 8, 1), LoraConv(cast=cast), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.lora(torch.relu(self.stem(x))))


@pytest.mark.parametrize("cast", [True, False], ids=["compared", "unused"])
def test_peft_loras_dtype_test_or_unused_read_keeps_the_sizes_free(cast):
    """``x.dtype == lora_A.weight.dtype`` of a computed value was refused as a test of sizes, and with the cast
    disabled the weight's dtype read unused was taken for one Python looked at: either sent every peft LoRA model
    to torch.export, at its example's 16x16 only.  Now both are taken as at the example: the fused model runs at
    24x20 and refuses another dtype."""
    from zoo import count_bn, seeded

    model = seeded(LoraNet, 0, cast=cast)().to(D)
    fused = repalgebra.fuse(model, torch.randn(1, 3, 16, 16, dtype=D))
    # (With every dtype taken as at the example, ``.to(torch_result_dtype)`` is a cast to float64 that the BN does
    # not fold through)
    assert fused.fuse_report.capture == "fx" and count_bn(fused) == (0 if cast else 1), str(fused.fuse_report)
    x = torch.randn(2, 3, 24, 20, dtype=D)
    with torch.no_grad():
        assert close(model(x), fused(x))
        with pytest.raises(ValueError, match="fused with inputs of dtypes float64"):
            fused(x.float())


class BiasOfWeightDtype(nn.Module):
    """Tensors made in the dtype of a weight (``torch.zeros(..., dtype=self.weight.dtype)``), as HF's layers make
    their masks and caches: a cast of the model changes that dtype, and the fused model must follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.a(x))
        w = self.a.weight
        return y + torch.zeros(x.shape[0], 1, 1, dtype=w.dtype) + torch.ones(6, dtype=w.dtype)


def test_a_weights_dtype_read_while_tracing_follows_a_cast_of_the_fused_model():
    torch.manual_seed(0)
    model = BiasOfWeightDtype().to(D).eval()
    x = torch.randn(2, 4, 6, dtype=D)
    fused = repalgebra.fuse(model, x)
    assert fused.fuse_report.capture == "fx" and fused.fuse_report.fired
    with torch.no_grad():
        assert close(model(x), fused(x))
        single = fused.float()(x.float())  # fused in float64, run in float32: the model's tensors are float32 too
        assert single.dtype == torch.float32
        torch.testing.assert_close(single, model.float()(x.float()), rtol=1e-5, atol=1e-6)


class Conv1D(nn.Module):
    """GPT-2's projection: a Linear with its weight stored transposed, applied with ``torch.addmm`` on the tokens
    flattened to rows, and the output shape written as ``x.size()[:-1] + (nf,)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight, self.bias = nn.Parameter(torch.randn(nx, nf) * 0.2), nn.Parameter(torch.randn(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2MLP(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.ln, self.c_fc, self.c_proj = nn.LayerNorm(d), Conv1D(4 * d, d), Conv1D(d, 4 * d)
        self.head = nn.Parameter(torch.randn(d, 3))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.c_proj(F.gelu(self.c_fc(self.ln(h))) * 0.5)
        return h @ self.head  # CLIP's text projection is written so too


def test_gpt2s_conv1d_and_a_matrix_product_with_a_weight_are_linears_that_fold():
    torch.manual_seed(0)
    model = GPT2MLP().to(D).eval()
    fused = repalgebra.fuse(model, torch.randn(2, 5, 8, dtype=D))
    report = fused.fuse_report
    assert report.capture == "fx" and report.ops_after.get("linear") == 3 and "opaque" not in report.ops_after, str(report)
    assert "bn_into_linear" in {f.rule for f in report.fired}  # the half folds into c_proj through its row view
    with torch.no_grad():
        for batch, length in ((3, 7), (1, 1)):
            h = torch.randn(batch, length, 8, dtype=D)
            assert close(model(h), fused(h))


@pytest.mark.parametrize("how", ["F", "torch", "method", "F_positional", "log"])
def test_a_softmax_computed_in_a_dtype_of_its_own_is_a_cast_and_a_softmax(how):
    """LLaMA's ``softmax(scores, dim=-1, dtype=torch.float32)`` was a call carried whole (and so a fallback region in
    ONNX); it is a cast, then the softmax, in every spelling, and stays so when the fused model is cast."""
    class Scores(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            y = self.proj(x)
            return {"F": lambda: F.softmax(y, dim=-1, dtype=torch.float64), "torch": lambda: torch.softmax(y, -1, torch.float64),
                    "method": lambda: y.softmax(-1, torch.float64), "F_positional": lambda: F.softmax(y, -1, 3, torch.float64),
                    "log": lambda: F.log_softmax(y, dim=-1, dtype=torch.float64)}[how]()

    model = Scores().eval()
    x = torch.randn(3, 5, 4)
    fused = repalgebra.fuse(model, x)
    report = fused.fuse_report
    assert report.capture == "fx" and "opaque" not in report.ops_after and report.ops_after["cast"] == 1, str(report)
    assert report.ops_after.get("log_softmax" if how == "log" else "softmax") == 1, str(report)
    for half in (False, True):  # (the float32 Linear's rounding, then float64: 1e-6; float16's: 1e-2)
        m, fm, t = (model.half(), fused.half(), x.half()) if half else (model, fused, x)
        with torch.no_grad():
            want, got = m(t), fm(t)
        assert got.dtype == want.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-2 if half else 1e-6, atol=1e-2 if half else 1e-7)


class HandWrittenRMSNorm(nn.Module):
    """HF's LlamaRMSNorm: the weight times the normalized values, a ``scale`` in the graph."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(d))

    def forward(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))


class ShapeReadingAttention(nn.Module):
    """HF attention: ``bsz, q_len, _ = hidden_states.size()`` of the normalized input, then q, k, v views."""

    def __init__(self, norm: str, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm = HandWrittenRMSNorm(d) if norm == "hand" else nn.LayerNorm(d) if norm == "layer" else nn.RMSNorm(d)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))

    def forward(self, x):
        h = self.norm(x)
        bsz, q_len, _ = h.size()
        q, k, v = (p(h).view(bsz, q_len, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return torch.softmax(q @ k.transpose(2, 3), -1) @ v


@pytest.mark.parametrize("norm", ["hand", "layer", "rms"])
def test_a_norms_weight_folds_into_q_k_v_when_its_output_shape_is_read(norm):
    """The shape read of the normalized input counted as a fourth reader, so the weight stayed before q, k and v
    ("no rule applies (used by linear, reshape)"); read from the norm's input instead (the same sizes at every
    input), the weight folds into each.  Compared in float64 to 1e-10 relative at other batches and lengths."""
    torch.manual_seed(0)
    model = ShapeReadingAttention(norm).to(D).eval()
    with torch.no_grad():
        for p in model.norm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    fused = repalgebra.fuse(model, torch.randn(2, 6, 16, dtype=D))
    report = fused.fuse_report
    assert report.rule_counts().get("bn_into_linear") == 1 and "scale" not in report.ops_after, str(report)
    for shape in ((2, 6, 16), (3, 11, 16), (1, 1, 16)):
        x = torch.randn(shape, dtype=D)
        with torch.no_grad():
            want, got = model(x), fused(x)
        assert (got - want).abs().max() <= 1e-10 * want.abs().max()


class Float32Softmax(nn.Module):
    """LLaMA's attention weights: ``softmax(scores, dtype=torch.float32).to(q.dtype)``, with or without the head tied
    to the embedding."""

    def __init__(self, tied: bool, d: int = 16, vocab: int = 20) -> None:
        super().__init__()
        self.emb, self.q, self.k, self.v = nn.Embedding(vocab, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.emb.weight

    def forward(self, ids):
        x = self.emb(ids)
        q, k, v = self.q(x), self.k(x), self.v(x)
        return self.lm_head(F.softmax(q @ k.transpose(1, 2), dim=-1, dtype=torch.float32).to(q.dtype) @ v)


@pytest.mark.parametrize("tied", [False, True])
def test_a_cast_back_from_a_dtype_the_code_writes_follows_the_model(tied):
    """``.to(q.dtype)`` of float32 weights was taken for the identity (both float32 at capture), but ``q`` follows the
    model's dtype and the weights do not: the fused model cast with ``.double()`` failed ("expected scalar type
    Double but found Float"; with the head tied, with no guard naming why).  It runs as the model does."""
    torch.manual_seed(0)
    model = Float32Softmax(tied).eval()
    ids = torch.randint(0, 20, (2, 5))
    fused = repalgebra.fuse(model, ids)
    with torch.no_grad():
        want, got = model.double()(ids), fused.double()(ids)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # the same ops in the same dtypes


def with_statistics(bn: nn.Module) -> None:
    """Running statistics of a trained BatchNorm (random), so that its fold is not the identity."""
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)


class TiedLM(nn.Module):
    """A language model whose head is its embedding matrix (GPT-2, T5, BERT's decoder), with a conv + BN between
    them that folds.  ``copy_of_words`` holds an equal matrix the model does not tie."""

    def __init__(self, vocab: int = 50, d: int = 16, copy_of_words: bool = False) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab, d)
        self.conv, self.bn = nn.Conv1d(d, d, 3, padding=1), nn.BatchNorm1d(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.words.weight
        self.other = nn.Linear(d, vocab, bias=False) if copy_of_words else None
        if copy_of_words:
            self.other.weight = nn.Parameter(self.words.weight.detach().clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(self.words(ids).transpose(1, 2))).transpose(1, 2)
        return self.head(h) if self.other is None else (self.head(h), self.other(h))


def _tied_lm(**kw) -> TiedLM:
    torch.manual_seed(0)
    model = TiedLM(**kw).eval()
    with_statistics(model.bn)
    return model


def _slots(module: nn.Module, tensor: torch.Tensor) -> list[str]:
    return [name for name, p in module.named_parameters(remove_duplicate=False) if p is tensor]


def test_a_head_tied_to_the_embedding_stays_tied():
    """The fused model built the head from the graph with its own copy of the matrix: twice the memory, a report
    blaming a module called several times, and a fine-tune that moved the two apart.  One parameter again."""
    model = _tied_lm()
    ids = torch.randint(0, 50, (2, 7))
    fused = repalgebra.fuse(model, ids)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), model(ids), rtol=1e-5, atol=1e-5)  # float32 after a float64 fold
    shared = dict(fused.named_parameters())["words.weight"]
    assert sorted(_slots(fused, shared)) == ["head.weight", "words.weight"]
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in model.parameters())  # BN folded
    assert "words.weight = head.weight" in str(fused.fuse_report)
    assert "more parameters" not in str(fused.fuse_report)
    assert fused.state_dict().keys() >= {"words.weight", "head.weight"}
    again = copy.deepcopy(fused)
    assert len(_slots(again, dict(again.named_parameters())["words.weight"])) == 2


def test_an_equal_matrix_the_model_does_not_tie_stays_its_own():
    """A tensor equal to the tied matrix but held apart in the model (a copy, not the parameter) stays apart:
    equality alone does not say a fused weight came from the tied parameter."""
    model = _tied_lm(copy_of_words=True)
    ids = torch.randint(0, 50, (2, 7))
    fused = repalgebra.fuse(model, ids)
    with torch.no_grad():
        for got, want in zip(fused(ids), model(ids)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    params = dict(fused.named_parameters(remove_duplicate=False))
    assert len({id(params[k]) for k in params if params[k].shape == (50, 16)}) == 3
    assert "ties" not in str(fused.fuse_report)


class DtypePropertyLM(nn.Module):
    """Hugging Face's additive mask: ``mask.to(dtype=self.dtype)`` and ``(1.0 - mask) * torch.finfo(self.dtype).min``,
    ``self.dtype`` a property reading the first parameter (``ModuleUtilsMixin.dtype``); the head tied or not."""

    def __init__(self, tied: bool, vocab: int = 20, d: int = 8) -> None:
        super().__init__()
        self.wte, self.proj, self.bn = nn.Embedding(vocab, d), nn.Linear(d, d), nn.BatchNorm1d(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, ids, attention_mask):
        h = self.bn(self.proj(self.wte(ids)).transpose(1, 2)).transpose(1, 2)
        mask = attention_mask[:, None, :].to(dtype=self.dtype)
        w = h @ h.transpose(1, 2) + (1.0 - mask) * torch.finfo(self.dtype).min
        return self.lm_head(w.softmax(-1) @ h)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_dtype_read_from_the_models_property_is_seen_by_the_float64_check(tied):
    """fx records ``self.dtype`` as the float32 of the trace, so the fused model keeps the mask in float32.  With the
    head tied, the float64 check cast the embedding's weight under one name only, the model failed to run, and the
    check fell back to float32 while the report said float64 (a probe's variant was 3.1 off after
    ``fused.double()``).  In half precision the fused model failed inside its graph ("expected scalar type Float but
    found Half") where the model runs.  Now: checked in float64; in float64 it computes what the model does (to
    float32's rounding of the folded weights), and half precision is refused by name."""
    torch.manual_seed(0)
    model = DtypePropertyLM(tied).eval()
    with_statistics(model.bn)
    ids, mask = torch.randint(0, 20, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    fused = repalgebra.fuse(model, (ids, mask))
    assert "in float64" in fused.fuse_report.check
    with torch.no_grad():
        torch.testing.assert_close(fused(ids, mask), model(ids, mask), rtol=1e-5, atol=1e-5)  # float32, folded in float64
        got = copy.deepcopy(fused).double()(ids, mask)
        torch.testing.assert_close(got, copy.deepcopy(model).double()(ids, mask), rtol=1e-5, atol=1e-5)
        copy.deepcopy(model).half()(ids, mask)  # the model runs in half precision
        with pytest.raises(ValueError, match=r"holds in float32 and float64 only \(the forward of the model casts to, or makes a tensor of, float32"):
            copy.deepcopy(fused).half()(ids, mask)


class DtypePropertyVision(nn.Module):
    """Hugging Face's vision embeddings and diffusers' models: ``pixel_values.to(self.dtype)``, ``self.dtype`` a
    property reading the first parameter (``ModuleUtilsMixin.dtype``, ``ModelMixin.dtype``)."""

    def __init__(self, c: int = 8, configured: torch.dtype | None = None) -> None:
        super().__init__()
        self.configured = configured  # a dtype of its own, which a cast of the model leaves
        self.conv, self.bn, self.head = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.Conv2d(c, 4, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.configured or next(self.parameters()).dtype

    def forward(self, pixel_values):
        x = pixel_values.to(self.dtype)
        return self.head(F.relu(self.bn(self.conv(x))))


def test_an_input_cast_to_the_models_dtype_property_takes_the_inputs_the_model_takes():
    """fx ran the property on the real module and recorded a cast to float32: the fused model held in float32 only and
    refused a float64 batch, which the model casts and runs (a probe).  The cast now reads its dtype off a parameter in
    the fused graph, as ``x.to(self.conv.weight.dtype)`` does: any input dtype the model takes, and after
    ``fused.double()`` it casts to float64 as the model does after ``model.double()``."""
    torch.manual_seed(0)
    model = DtypePropertyVision().eval()
    with_statistics(model.bn)
    fused = repalgebra.fuse(model, torch.randn(1, 3, 16, 16))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules()), str(fused.fuse_report)
    assert any("self.dtype" in n for n in fused.fuse_report.notes), fused.fuse_report.notes
    x = torch.randn(2, 3, 12, 20, dtype=torch.float64)
    with torch.no_grad():
        for given in (x, x.float(), (x * 40).clamp(0, 255).to(torch.uint8)):
            torch.testing.assert_close(fused(given), model(given), rtol=1e-5, atol=1e-5)  # float32, folded in float64
        got = copy.deepcopy(fused).double()(x)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, copy.deepcopy(model).double()(x), rtol=1e-5, atol=1e-5)


def test_a_dtype_property_of_the_modules_own_is_not_read_off_its_parameters():
    """A ``dtype`` property answering a dtype the module was configured with changes with no cast of the model: the
    cast stays the trace's (a fused model following its parameters would run after ``.double()`` where the model
    fails), and the fused model computes what the model does."""
    torch.manual_seed(0)
    model = DtypePropertyVision(configured=torch.float32).eval()
    with_statistics(model.bn)
    fused = repalgebra.fuse(model, torch.randn(1, 3, 16, 16))
    assert not any("self.dtype" in n for n in fused.fuse_report.notes), fused.fuse_report.notes
    x = torch.randn(2, 3, 12, 20, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)  # float32, folded in float64


class ParametersDtypeVision(nn.Module):
    """timm's and Hugging Face's inline form: ``pixel_values.to(next(self.parameters()).dtype)``, or ``dtype =
    next(self.parameters()).dtype`` then a cast and a tensor made in it (a learned-free position bias)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, pixel_values):
        if self.how == "inline":
            return self.head(F.relu(self.bn(self.conv(pixel_values.to(next(self.parameters()).dtype)))))
        if self.how == "device":  # (the device read the same way: the stand-ins' differs too)
            p = next(self.parameters())
            return self.head(F.relu(self.bn(self.conv(pixel_values.to(device=p.device, dtype=p.dtype)))))
        dtype = next(self.parameters()).dtype
        x = pixel_values.to(dtype=dtype)
        bias = torch.ones(1, 8, 1, 1, dtype=dtype) * 0.5
        return self.head(F.relu(self.bn(self.conv(x)) + bias))


@pytest.mark.parametrize("how", ["inline", "named", "device"])
def test_an_input_cast_to_the_dtype_of_the_models_parameters_read_inline_takes_the_inputs_the_model_takes(how):
    """fx runs ``self.parameters()`` on the real module, so the dtype was the trace's float32: the fused model refused a
    float64 batch the model casts and runs ("holds in float32 only"), and after ``fused.double()`` it still cast to
    float32.  The dtype (and a device read with it) is read off a parameter in the fused graph, so it follows a cast
    of the model."""
    torch.manual_seed(0)
    model = ParametersDtypeVision(how).eval()
    with_statistics(model.bn)
    fused = repalgebra.fuse(model, torch.randn(1, 3, 16, 16))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules()), str(fused.fuse_report)
    assert any("next(self.parameters()).dtype" in n for n in fused.fuse_report.notes), fused.fuse_report.notes
    x = torch.randn(2, 3, 12, 20, dtype=torch.float64)
    with torch.no_grad():
        for given in (x, x.float()):
            torch.testing.assert_close(fused(given), model(given), rtol=1e-5, atol=1e-5)  # float32, folded in float64
        got = copy.deepcopy(fused).double()(x)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, copy.deepcopy(model).double()(x), rtol=1e-5, atol=1e-5)  # (float32 weights)


class BuffersDtypeNormalizer(nn.Module):
    """A module without parameters (a fixed normalizer and a filter bank held as buffers) that casts its input to
    ``next(self.buffers()).dtype``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.randn(1, 4, 1, 1))
        self.register_buffer("bank", torch.randn(4, 4, 1, 1))

    def forward(self, x):
        x = x.to(next(self.buffers()).dtype)
        return F.conv2d(x - self.mean, self.bank)


def test_an_input_cast_to_the_dtype_of_the_models_buffers_follows_a_cast_of_the_model():
    """The dtype was read off parameters only: in a module without any it stayed the trace's float32, and after
    ``fused.double()`` a float32 input raised torch's dtype error where the model casts and runs (review R6 finding
    05).  It is read off a buffer where there is no parameter."""
    torch.manual_seed(0)
    model = BuffersDtypeNormalizer().eval()
    fused = repalgebra.fuse(model, torch.randn(1, 4, 8, 8))
    x = torch.randn(2, 4, 6, 10)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)  # float32, folded in float64
        double, reference = copy.deepcopy(fused).double(), copy.deepcopy(model).double()
        for given in (x, x.double()):
            got = double(given)
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, reference(given), rtol=1e-5, atol=1e-5)  # (float32 buffers)


class ParametersFinfoMask(ParametersDtypeVision):
    """A number made from the parameters' dtype (``torch.finfo(dtype).min``, baked in by the trace) besides the cast."""

    def forward(self, pixel_values):
        dtype = next(self.parameters()).dtype
        x = self.head(F.relu(self.bn(self.conv(pixel_values.to(dtype)))))
        return x.clamp(min=torch.finfo(dtype).min / 2)


def test_a_number_made_from_the_dtype_of_the_models_parameters_keeps_the_cast_as_traced():
    """The clamp's bound is float32's in the trace and float64's after ``model.double()``: the graph stays as traced,
    and the fused model keeps to float32 as before (it computes what the model does there)."""
    torch.manual_seed(0)
    model = ParametersFinfoMask("inline").eval()
    with_statistics(model.bn)
    fused = repalgebra.fuse(model, torch.randn(1, 3, 16, 16))
    assert not any("next(self.parameters()).dtype" in n for n in fused.fuse_report.notes), fused.fuse_report.notes
    x = torch.randn(2, 3, 12, 20)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)  # float32, folded in float64
        with pytest.raises(ValueError, match="float32"):
            copy.deepcopy(fused).double()(x.double())


class KeyCache:
    """Hugging Face's ``DynamicCache``: a plain object holding the keys per layer, compared by identity."""

    def __init__(self) -> None:
        self.key_cache: list[torch.Tensor] = []

    def update(self, k: torch.Tensor, layer: int) -> torch.Tensor:
        if len(self.key_cache) <= layer:
            self.key_cache.append(k)
        else:
            self.key_cache[layer] = torch.cat([self.key_cache[layer], k], dim=-2)
        return self.key_cache[layer]


class CachingLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.k = nn.Embedding(50, 8), nn.Linear(8, 8)
        self.head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 50))

    def forward(self, ids):
        cache = KeyCache()
        h = self.emb(ids)
        k = cache.update(self.k(h), 0)
        h = h + F.softmax(h @ k.transpose(1, 2), -1) @ h
        b, t, c = h.shape
        return self.head(h.reshape(b * t, c)).view(b, t, -1), cache


def test_a_cache_object_among_the_outputs_is_compared_by_its_tensors():
    """The model is kept whole (it returns an object fx cannot build), and its children are fused; each was swapped
    back, "its parent reads it otherwise", because the check compared the two runs' caches with ``!=``, which for a
    class without ``__eq__`` tells any two objects apart (found by a probe).  The head's BatchNorm folds now, and a
    cache holding other keys still differs."""
    from repalgebra.verify import first_difference

    torch.manual_seed(0)
    model = CachingLM().eval()
    with_statistics(model.head[1])
    ids = torch.randint(0, 50, (2, 5))
    fused = repalgebra.fuse(model, ids)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fused.modules()), str(fused.fuse_report)
    with torch.no_grad():
        (want, want_cache), (got, got_cache) = model(ids), fused(ids)
    assert type(got_cache) is KeyCache
    assert first_difference((want, want_cache), (got, got_cache), 1e-5) is None
    got_cache.key_cache[0] = got_cache.key_cache[0] + 1
    assert "differs by 1 " in first_difference((want, want_cache), (got, got_cache), 1e-5)


class EmbeddedTests(nn.Module):
    """A dtype test (T5's ``if hidden_states.dtype == torch.float16: clamp``) and a size test (LLaMA's rotary cache:
    ``if seq_len > self.max_seq_len_cached``, ``seq_len`` read from the embedded tokens) after an ``nn.Embedding``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens, self.k_proj = nn.Embedding(50, 8), nn.Linear(8, 8)
        self.register_buffer("cos_cached", torch.randn(32, 4), persistent=False)
        self.head = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    def forward(self, ids):
        h = self.embed_tokens(ids)
        if h.dtype == torch.float16:
            h = h.clamp(-60000, 60000)
        bsz, q_len, _ = h.size()
        k = self.k_proj(h).view(bsz, q_len, 2, 4).transpose(1, 2)
        seq_len = k.shape[-2]
        if seq_len > self.cos_cached.shape[0]:
            raise ValueError("longer than the rotary cache")
        return self.head((k * self.cos_cached[:seq_len].to(k.dtype)).mean((1, 2)))


def test_tests_of_what_an_embedding_makes_are_answered_and_checked_per_call():
    """torch.fx could answer neither test: nothing after an embedding of token ids had a known dtype or size, so
    the model went to torch.export at the example's length and refused every other (T5, BLOOM, LLaMA, Mistral;
    found by a probe).  An embedding runs on meta tensors, and its output's sizes are its ids' and its width."""
    torch.manual_seed(0)
    model = EmbeddedTests().eval()
    with_statistics(model.head[1])
    model = model.double()
    fused = repalgebra.fuse(model, torch.randint(0, 50, (2, 7)))
    assert fused.fuse_report.capture == "fx" and fused.fuse_report.fired, str(fused.fuse_report)
    with torch.no_grad():
        for b, length in ((1, 3), (3, 9), (2, 32)):
            ids = torch.randint(0, 50, (b, length))
            torch.testing.assert_close(fused(ids), model(ids), rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError):  # past the cache, as the model: the test is checked per call
            fused(torch.randint(0, 50, (2, 33)))


class DistilBertMask(nn.Module):
    """DistilBERT's attention: ``scores.masked_fill(mask, torch.tensor(torch.finfo(scores.dtype).min))``."""

    def __init__(self, halved: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.halved = nn.Linear(8, 8), nn.Linear(8, 8), halved
        self.head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))

    def forward(self, x, mask):
        scores = self.q(x) @ self.k(x).transpose(1, 2)
        hidden = (mask == 0).view(x.size(0), 1, x.size(1)).expand_as(scores)
        fill = torch.finfo(scores.dtype).min
        scores = scores.masked_fill(hidden, torch.tensor(fill / 2 if self.halved else fill))
        return self.head((scores.softmax(-1) @ x)[:, 0])


@pytest.mark.parametrize("halved", [False, True], ids=["minimum", "half-minimum"])
def test_a_tensor_of_a_dtypes_minimum_is_made_per_call(halved):
    """``torch.tensor`` of a number read from a dtype was taken for one of a size, which it is not: the model went
    to torch.export at the example's length (found by a probe; ``finfo.min / 2`` by a review).  It is a call now,
    which follows a cast."""
    torch.manual_seed(0)
    model = DistilBertMask(halved).eval()
    with_statistics(model.head[1])
    model = model.double()
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    fused = repalgebra.fuse(model, (torch.randn(2, 7, 8, dtype=D), mask))
    assert fused.fuse_report.capture == "fx" and fused.fuse_report.fired, str(fused.fuse_report)
    with torch.no_grad():
        for length in (3, 9):
            x, m = torch.randn(3, length, 8, dtype=D), torch.ones(3, length, dtype=torch.long)
            m[0, 1:] = 0
            torch.testing.assert_close(fused(x, m), model(x, m), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(copy.deepcopy(fused).float()(x.float(), m), copy.deepcopy(model).float()(x.float(), m),
                                       rtol=1e-5, atol=1e-5)  # float32, the weights folded in float64


class DtypePropertyFactory(nn.Module):
    """A tensor made in the model's dtype read off its parameters: ``torch.full(..., dtype=self.dtype)``, or a
    ``torch.zeros`` of it written into in place; with ``finfo``, also a number of that dtype
    (``torch.finfo(self.dtype).eps``, which the trace bakes in)."""

    def __init__(self, kind: str, finfo: bool = False) -> None:
        super().__init__()
        self.kind, self.finfo, self.lin, self.bn = kind, finfo, nn.Linear(8, 8), nn.BatchNorm1d(8)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, x):
        y = self.bn(self.lin(x).transpose(1, 2)).transpose(1, 2)
        eps = torch.finfo(self.dtype).eps if self.finfo else 0.0
        if self.kind == "full":
            return y * torch.full(y.shape, 0.1 + eps, dtype=self.dtype)
        acc = torch.zeros(y.shape, dtype=self.dtype)
        acc += y
        return acc + eps


def _factory_model(kind: str, finfo: bool) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = DtypePropertyFactory(kind, finfo).eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 5, 8)
    fused = repalgebra.fuse(model, x)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)  # float32, folded in float64
    return model, fused, x


@pytest.mark.parametrize("kind", ["full", "zeros"])
def test_a_factory_of_a_dtype_read_off_the_model_is_guarded_like_a_cast(kind):
    """fx records the dtype as the float32 of the trace: after ``fused.half()`` the product was float32 where the
    model's is float16 (found by a review of the guard for casts).  Where the property also gives a number the trace
    bakes in (``torch.finfo(self.dtype).eps``), the graph cannot follow a cast: half precision is refused by name."""
    model, fused, x = _factory_model(kind, finfo=True)
    with torch.no_grad():
        assert copy.deepcopy(model).half()(x.half()).dtype == torch.float16
        with pytest.raises(ValueError, match=r"makes a tensor of, float32"):
            copy.deepcopy(fused).half()(x.half())


@pytest.mark.parametrize("kind", ["full", "zeros"])
def test_a_factory_of_a_dtype_read_off_the_model_follows_its_casts(kind):
    """The dtype a property reads off the parameters, given to a factory, is read off a parameter in the fused graph:
    after ``fused.half()`` the tensor is made in float16 as the model's is (half precision was refused)."""
    model, fused, x = _factory_model(kind, finfo=False)
    with torch.no_grad():
        want = copy.deepcopy(model).half()(x.half())
        got = copy.deepcopy(fused).half()(x.half())
    assert got.dtype == want.dtype == torch.float16
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


class RotaryAutocastOff(nn.Module):
    """Hugging Face's LLaMA rotary embedding: the angles computed under ``with torch.autocast(device_type,
    enabled=False):`` (in float32 where the caller runs the model under autocast), after a Linear + BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)), persistent=False)

    def forward(self, x):
        h = self.bn(self.lin(x).transpose(1, 2)).transpose(1, 2)
        position_ids = torch.arange(x.shape[1], device=x.device)[None, :].to(self.inv_freq.dtype)
        with torch.autocast(device_type=x.device.type if isinstance(x.device.type, str) else "cpu", enabled=False):
            freqs = position_ids[:, :, None] * self.inv_freq[None, None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
        return h * emb.cos() + h.flip(-1) * emb.sin()


def test_autocast_turned_off_on_the_models_device_is_taken_with_a_check():
    """``with torch.autocast(device, enabled=False):`` on the model's own device was refused while tracing, and an
    LLaMA-like model went to torch.export fixed at its example's length (7): length 11 refused.  Without a caller's
    autocast the block changes nothing: it is traced past, the fused model runs at any length, and a call under
    ``torch.autocast`` (where the model computes the block in float32 and the graph would not) is refused by name."""
    from zoo import count_bn, seeded

    model = seeded(RotaryAutocastOff, 0)().to(D)
    fused = repalgebra.fuse(model, torch.randn(2, 7, 8, dtype=D))
    assert fused.fuse_report.capture == "fx" and count_bn(fused) == 0, str(fused.fuse_report)
    x = torch.randn(3, 11, 8, dtype=D)
    with torch.no_grad():
        assert close(model(x), fused(x))
        for runs in (fused, pickle.loads(pickle.dumps(fused))):
            with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="outside torch.autocast"):
                runs(x)
