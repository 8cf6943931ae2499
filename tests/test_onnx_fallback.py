"""The ONNX back end's fallback (``repalgebra/backend/onnx_fallback.py``): regions, splicing, batch axes, rewrites.

Nodes without an ONNX lowering are exported by ``torch.onnx.export`` and spliced in; each case here checks the
export against the graph or module in onnxruntime (float32, 1e-5 relative) and what the report and metadata say.
"""

from __future__ import annotations

import operator
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repalgebra
from repalgebra.backend.onnx import export_onnx, graph_to_onnx
from repalgebra.backend.onnx_fallback import REWRITES, FallbackError, capture_for_export, find_regions, probing
from repalgebra.backend.value_reads import ValueReads, value_reads
from repalgebra.frontend.calls import Buf, FnCall, In
from repalgebra.interpret import run_graph
from repalgebra.ir import Graph, Node
from zoo import seeded
from zoo.input_range import RangeNormalized, ValueReaders
from zoo.streaming import StreamingBlock, StreamingConv

RTOL = 1e-5
aten = torch.ops.aten


def run(proto: onnx.ModelProto, x: torch.Tensor) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def close(got: np.ndarray, ref: torch.Tensor) -> bool:
    ref = ref.detach().numpy()
    return got.shape == ref.shape and float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)) <= RTOL


def opaque(inputs, target, args, out, consts=None, source=""):
    fn = FnCall("call_function", target, args, {}, consts or {})
    shape, dtype = (tuple(out.shape), out.dtype) if out is not None else (None, None)
    return Node.make("opaque", inputs, {"fn": fn, "out_shape": shape, "out_dtype": dtype}, {}, source)


def test_tuple_valued_call_is_recomputed_in_each_region_that_reads_it():
    """sort -> (values, indices): getitem 0 and getitem 1 sit in two regions with our relu between them."""
    x = Graph.input("x", (2, 4, 5))
    probe = torch.zeros(2, 4, 5)
    srt = opaque([x], torch.sort, (In(0), 1), None, source="sort")
    values = opaque([srt.out], operator.getitem, (In(0), 0), probe, source="values")
    relu = Node.make("relu", [values.out], source="relu")
    indices = opaque([srt.out], operator.getitem, (In(0), 1), probe.long(), source="indices")
    as_float = opaque([indices.out], torch.Tensor.float, (In(0),), probe, source="float")
    add = Node.make("add", [relu.out, as_float.out], source="add")
    graph = Graph([x], [srt, values, relu, indices, as_float, add], [add.out])
    regions = find_regions(graph, lambda n: n.op != "opaque")
    assert [[n.out.name for n in r.nodes] for r in regions] == [
        [srt.out.name, values.out.name], [srt.out.name, indices.out.name, as_float.out.name]
    ]
    proto, report = graph_to_onnx(graph, return_report=True)
    onnx.checker.check_model(proto, full_check=True)
    assert [r.where for r in report.regions] == ["sort .. values", "indices .. float"]
    for batch in (2, 5):
        xb = torch.randn(batch, 4, 5)
        assert close(run(proto, xb)[0], run_graph(graph, xb))


def test_constant_region_without_inputs_and_an_aten_overload():
    x = Graph.input("x", (1, 3, 4))
    table = torch.randn(3, 4)
    const = opaque([], lambda c: c, (Buf("c0"),), table, {"c0": table}, source="table")
    cum = opaque([x], aten.cumsum.default, (In(0), 2), torch.zeros(1, 3, 4), source="cum")
    add = Node.make("add", [cum.out, const.out], source="add")
    graph = Graph([x], [const, cum, add], [add.out])
    proto, report = graph_to_onnx(graph, return_report=True)
    onnx.checker.check_model(proto, full_check=True)
    assert [n.path for n in report.nodes] == ["fallback", "fallback", "own"] and len(report.regions) == 1
    assert report.nodes[1].what == "cumsum.default"
    for batch in (1, 3):
        xb = torch.randn(batch, 3, 4)
        assert close(run(proto, xb)[0], run_graph(graph, xb))


class Cumsum(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=2)


def test_batch_axis_moved_by_our_nodes_is_found():
    """The region's input has the batch at axis 1 (after our transpose); it is exported dynamic there."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Cumsum()).eval()

    class Moved(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            y = self.m(x).transpose(0, 1)
            return torch.cumsum(y, dim=2).transpose(0, 1)

    m = Moved().eval()
    proto, report = export_onnx(m, None, (1, 3, 5, 5), return_report=True)
    assert report.dynamic_batch and {"in0": [1]} in [r.dynamic_axes for r in report.regions]
    for batch in (1, 3):
        x = torch.randn(batch, 3, 5, 5)
        with torch.no_grad():
            assert close(run(proto, x)[0], m(x))


class BakesBatch(nn.Module):
    """Reads the batch as a Python int (of a reduction's result, which torch.fx cannot check per call; torch.onnx.export's
    trace fixes it)."""

    def forward(self, x):
        b = int(x.amax(1).shape[0])
        return torch.cumsum(x.reshape(b, -1), dim=1).reshape(x.shape)


def test_region_whose_trace_fixes_the_batch_exports_with_the_batch_fixed():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), BakesBatch()).eval()
    proto, report = export_onnx(model, None, (2, 3, 4, 4), return_report=True)
    assert not report.dynamic_batch
    assert any("does not follow the batch" in n for n in report.notes), report.notes
    assert "'1'" in report.capture and {p.key: p.value for p in proto.metadata_props}["repalgebra.batch"] == "fixed at 2"
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert close(run(proto, x)[0], model(x))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y if y.abs().sum() >= 0 else -y  # a value in control flow: torch.fx cannot trace the model itself


def test_model_fx_cannot_trace_at_all_is_exported_whole():
    model = Branchy().eval()  # (its branch on values is one an ONNX graph cannot hold: written only when allowed)
    proto, report = export_onnx(model, None, (1, 3, 6, 6), return_report=True, allow_example_branches=True)
    assert report.capture.startswith("whole") and len(report.fallback) == 1
    assert any("Python boolean" in n for n in report.notes)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 6, 6)
        with torch.no_grad():
            assert close(run(proto, x)[0], model(x))


class ValueRouted(nn.Module):
    """Two heads, chosen by a test of the values: ``x.mean() > 0`` (``how="mean"``), which the input steers; a test
    that always holds (``"always"``); or ``y.min() >= 0`` of a ReLU's output (``"nonnegative"``), which holds for
    every input it gets after a ReLU (:func:`routed`) but not for a negated one."""

    def __init__(self, how: str):
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.how = how

    def forward(self, x):
        test = {"mean": lambda: x.mean() > 0, "always": lambda: x.abs().sum() >= 0, "nonnegative": lambda: x.min() >= 0}[self.how]
        y = self.stem(x)
        return self.a(y) if test() else self.b(y)


def routed(how: str) -> nn.Module:
    return (nn.Sequential(nn.ReLU(), ValueRouted(how)) if how == "nonnegative" else ValueRouted(how)).eval()


@pytest.mark.parametrize("what", ["model", "fused"])
def test_a_branch_on_tensor_values_is_refused_unless_allowed(what):
    """The file took the example's branch and the report only noted it (2.3 off for an input taking the other,
    found by a probe), unless the checks' random inputs happened to take another.  A branch that comes out
    otherwise for the checks' inputs or their negations is refused by name; allowed, the file is written where the
    checks compare it equal to the model.  One that comes out alike for all (a test that always holds, but for a
    NaN) is refused too, by default: an ONNX graph holds no Python branch, and no check proves it is never taken;
    allowed, it is written and noted."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 6)
    for how in ("mean", "nonnegative"):  # steered: by the checks' inputs (or only by the negated ones)
        model = routed(how)
        source = model if what == "model" else repalgebra.fuse(model, x)
        with pytest.raises(FallbackError, match=r"\(ValueRouted(; 1 branch)?\).*Python boolean"):
            export_onnx(source, None, x)
    with pytest.raises(FallbackError, match=r"\(ValueRouted; 1 branch\) turned tensor values into Python booleans or numbers, and they came out otherwise"):
        export_onnx(source, None, x)  # the ReLU's output: only the negated inputs take the other branch
    source = routed("always") if what == "model" else repalgebra.fuse(routed("always"), x)
    with pytest.raises(FallbackError, match=r"\(ValueRouted; 1 branch\) turned tensor values into Python booleans or numbers, read from the values of its inputs"):
        export_onnx(source, None, x)
    for how in ("nonnegative", "always"):
        model = routed(how)
        source = model if what == "model" else repalgebra.fuse(model, x)
        proto, report = export_onnx(source, None, x, return_report=True, allow_example_branches=True)
        assert [(r.branches, r.steered) for r in report.regions] == [(1, how == "nonnegative")]
        took = "and the checks' inputs gave others" if how == "nonnegative" else "the checks' inputs (random, scaled, varied) all gave the same"
        assert any(took in n for n in report.notes), report.notes
        for y in (x, -x, torch.randn(3, 3, 6, 6)):
            with torch.no_grad():
                assert close(run(proto, y)[0], model(y))


def _range_normalized(how: str) -> nn.Module:
    torch.manual_seed(0)
    model = RangeNormalized(how).eval()
    with torch.no_grad():
        model.stem[1].running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("how", ["max", "written", "caught"])
def test_a_branch_on_input_values_that_no_check_crosses_is_refused(how):
    """``if x.max() > 1: x = x / 255``: every check input (random, scaled by 8, negated, halved) has a maximum above
    1, so the branch looked steered by nothing and the file was written dividing always, 0.2 off for images in
    0..1 (found by a probe).  A Python branch on the values of a part's inputs is found as such (followed through
    a copy written into, and an assertion a handler catches) and refused by name; allowed, it is written and
    noted.  The test of a weight (``self.gamma``) is the same for every input, and not counted."""
    model = _range_normalized(how)
    with pytest.raises(FallbackError, match=r"\(RangeNormalized; .*\) turned tensor values into Python booleans or "
                                            r"numbers, read from the values of its inputs"):
        export_onnx(model, None, (2, 3, 16, 16))
    proto, report = export_onnx(model, None, (2, 3, 16, 16), return_report=True, allow_example_branches=True)
    assert [r.on_values for r in report.regions] == [1], report
    assert any("its code read 1 Python boolean or number from the values of its inputs" in n for n in report.notes), report.notes
    x = torch.randn(3, 3, 16, 16) * 100  # the branch the example took
    with torch.no_grad():
        assert close(run(proto, x)[0], model(x))


def test_an_assertion_on_input_values_is_no_branch():
    """An assertion computes nothing: where it holds the model goes on as the file does, where it fails the model
    raises.  It is written, and the report says the file does not make the check."""
    model = _range_normalized("asserted")
    proto, report = export_onnx(model, None, (2, 3, 16, 16), return_report=True)
    assert [(r.on_values, r.asserted) for r in report.regions] == [(0, 1)], report
    assert any("1 assertion on the values of its inputs, which the file does not make" in n for n in report.notes), report.notes
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        assert close(run(proto, x)[0], model(x))


def test_value_reads_follow_writes_and_tell_assertions():
    """``value_reads`` alone: both tests of ``assert a and b`` are the assertion's (the first jumps to the raise), the
    inputs it is given are not written by the part's run, and a part that does not run reads nothing (the export's
    own checks say why it fails)."""
    x = torch.randn(2, 3)
    assert value_reads(ValueReaders("both_asserted"), (x,)) == ValueReads(reads=0, asserted=2)
    kept = x.clone()
    value_reads(ValueReaders("in_place"), (x,))
    assert torch.equal(x, kept)
    assert value_reads(ValueReaders("raises"), (x,)) == ValueReads()


def test_an_example_tensor_is_traced_as_given():
    """The part torch.onnx.export writes was traced at random values drawn in place of the example tensor given:
    the trace took the ``/ 255`` branch and the export was refused at the user's own example ("the file computes
    something else than the model at the example input"; found by a probe).  It is traced at the example; the
    checks at other values add inputs, and refuse it naming the branch their input took."""
    model = _range_normalized("max")
    example = torch.rand(2, 3, 16, 16)  # images in 0..1
    with pytest.raises(FallbackError, match=r"file takes the branches of the input it was traced with, and the check's "
                                            r"input took another") as refused:
        export_onnx(model, None, example, allow_example_branches=True)
    assert "at the example input" not in str(refused.value)


class SwitchMoE(nn.Module):
    """Switch-Transformer routing, as its reference ports write it: top-1 expert per token, the tokens of each
    expert picked with nonzero() and index_select, written back with final[idx, :] = ..."""

    def __init__(self, d: int = 16, h: int = 32, n: int = 3) -> None:
        super().__init__()
        self.switch = nn.Linear(d, n)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d)) for _ in range(n)])

    def forward(self, x):
        b, t, d = x.shape
        x = x.reshape(-1, d)
        route_prob = torch.softmax(self.switch(x), dim=-1)
        route_prob_max, routes = torch.max(route_prob, dim=-1)
        final = x.new_zeros(x.shape)
        for i in range(len(self.experts)):
            idx = torch.eq(routes, i).nonzero(as_tuple=True)[0]
            final[idx, :] = self.experts[i](torch.index_select(x, 0, idx))
        return (final * route_prob_max.view(-1, 1)).view(b, t, d)


def test_a_part_whose_sizes_follow_the_values_is_refused_saying_so():
    """At this example an expert gets as many tokens as a sample has (8): the export took that size for the
    sequence's, and the checks' inputs route other counts.  The refusal said the file "does not run in
    onnxruntime" and to export in float32, which the model is; it names sizes that follow the values.  (Where the
    example routes otherwise, the file is written, and is the model's at the example.)"""
    torch.manual_seed(0)
    model = SwitchMoE().eval()
    torch.manual_seed(3)
    x = torch.randn(2, 8, 16)
    try:
        proto = export_onnx(model, None, x)
    except FallbackError as e:
        assert "float32 or float16" not in str(e) and "follow the values" in str(e), str(e)
    else:
        with torch.no_grad():
            assert close(run(proto, x)[0], model(x))


class PaddedPool(nn.Module):
    """A mean over the tokens that skips padding where there is any (``if (ids == 0).any()``), kept whole."""

    def forward(self, h, ids):
        if (ids == 0).any():
            m = (ids != 0).unsqueeze(-1).to(h.dtype)
            return (h * m).sum(1) / m.sum(1).clamp(min=1)
        return h.mean(1)


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc, self.pool = nn.Embedding(20, 8), nn.Linear(8, 8), PaddedPool()

    def forward(self, ids):
        return self.pool(self.fc(self.emb(ids)), ids)


def test_a_branch_on_token_ids_is_refused():
    """Token ids keep the example's values in the checks (never drawn at random, nor negated), so a branch on
    padding looked steered by nothing: the file was written with the example's branch (0.36 off for a padded
    input; found by a review).  The checks vary ids too (all 0, reversed)."""
    torch.manual_seed(0)
    ids = torch.randint(1, 20, (2, 6))  # no padding
    with pytest.raises(FallbackError, match=r"\(PaddedPool; 1 branch\).*came out otherwise.*token ids all 0"):
        export_onnx(TokenModel().eval(), None, ids)


class ReadsNumbers(nn.Module):
    """Tensor values read as Python numbers: ``x * float(ids.max())``, and the classic trim of padding to the longest
    sequence, ``x[:, :int(lengths.max())]``; ``how="weight"`` reads a number of a weight, the same for any input."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.scale = how, nn.Parameter(torch.tensor(1.5))

    def forward(self, x, ids):
        if self.how == "scale":
            return x * float(ids.max())
        if self.how == "trim":
            return x[:, : int(ids.max())].sum(1)
        if self.how == "keep":  # the trim itself: the output's size is the number read
            return x[:, : int(ids.max())]
        if self.how == "range":  # a 0-d tensor read through __index__ (found by a review)
            return sum(x[:, i] for i in range(ids.max()))
        if self.how == "numpy":  # Tacotron2's lengths.cpu().numpy() (found by a probe)
            return x[:, : ids.cpu().numpy().max()].sum(1)
        return x * self.scale.item()


@pytest.mark.parametrize("how", ["scale", "trim", "range", "numpy", "weight"])
def test_a_number_read_from_input_values_is_refused_unless_allowed(how):
    """The file held the example's number as a constant (3x off for other ids; found by a probe), with no note.
    Numbers that come out otherwise for the checks' inputs or their variations are refused like branches; one
    read from a weight is the same for every input."""
    gen = torch.Generator().manual_seed(0)
    x, ids = torch.randn(2, 8, generator=gen), torch.randint(1, 8, (2, 8), generator=gen)
    if how != "weight":
        with pytest.raises(FallbackError, match=r"\(ReadsNumbers; 1 number read\) turned tensor values into Python booleans or numbers"):
            export_onnx(ReadsNumbers(how), None, (x, ids))
        return
    proto = export_onnx(ReadsNumbers(how), None, (x, ids))  # (the capture holds the weight's number: a scale)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), (x, ids * 2))})[0]
    with torch.no_grad():
        assert close(got, ReadsNumbers(how)(x, ids * 2))


class PackedEncoder(nn.Module):
    """Tacotron2's encoder: conv + BN + ReLU, then a bidirectional LSTM on a ``pack_padded_sequence`` of the frames,
    padded back; ``total`` pads to the input's length, else to the longest of the lengths (torch's default).  The
    lengths are given as integers, or (``given``) summed from a boolean mask, True where valid or where padded
    (``mask.sum(1)``), as SpeechBrain's relative lengths in [0, 1] (``round(wav_lens * T)``), counted from token
    ids (``(ids != 0).sum(1)``), from a 0/1 mask in integers (Hugging Face's ``attention_mask.sum(1)``) or floats,
    or from a time-major ``(T, B)`` mask (``mask.sum(0)``)."""

    def __init__(self, total: bool, given: str = "lengths", c: int = 8) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv1d(c, c, 5, padding=2), nn.BatchNorm1d(c)
        self.lstm = nn.LSTM(c, 4, batch_first=True, bidirectional=True)
        self.total, self.given = total, given

    def forward(self, x, lengths):
        x = self.bn(self.conv(x)).relu().transpose(1, 2)
        frames = x.shape[1]
        if self.given == "valid":
            lengths = lengths.sum(1)
        elif self.given == "padded":
            lengths = frames - lengths.sum(1)
        elif self.given == "relative":
            lengths = torch.round(lengths * frames).long()
        elif self.given in ("ids", "float_mask"):
            lengths = (lengths != 0).sum(1)
        elif self.given == "int_mask":
            lengths = lengths.sum(1)
        elif self.given == "time_major":
            lengths = lengths.sum(0)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        y, _ = self.lstm(packed)
        return nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=frames if self.total else None)[0]


def _encoder(total: bool, given: str = "lengths") -> nn.Module:
    torch.manual_seed(0)
    model = PackedEncoder(total, given).eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    return model


def _lengths_as(given: str, lengths: torch.Tensor, frames: int = 12) -> torch.Tensor:
    """``lengths`` as :class:`PackedEncoder` takes them ``given``."""
    valid = torch.arange(frames) < lengths[:, None]
    ids = (torch.arange(frames) % 7 + 1) * valid  # token ids, 0 the padding
    return {"lengths": lengths, "valid": valid, "padded": ~valid, "relative": lengths / frames, "ids": ids,
            "int_mask": valid.long(), "float_mask": valid.double(), "time_major": valid.T}[given]


@pytest.mark.parametrize("given", ["lengths", "valid", "padded", "relative", "ids", "int_mask", "float_mask", "time_major"])
@pytest.mark.parametrize("what", ["model", "fused"])
def test_an_rnn_on_packed_lengths_is_refused_unless_it_pads_to_the_input(what, given):
    """pad_packed_sequence returns as many frames as the longest of the lengths, a size torch reads inside, which
    neither the checks (the example's lengths, 12 the longest) nor the Python reads saw: the file returned 12 frames
    for lengths [10, 7] where the model returns 10 (found by a probe); so it did for lengths summed from a boolean
    mask, True where valid or where padded, for relative lengths in floats, which random draws do not give, and for
    lengths counted from token ids, from 0/1 masks in integers or floats, or from a time-major mask (reviews).  The
    checks halve all lengths, cut masks to their first half or pad their second, halve floats, and zero the second
    half of each input's last and first axis, and a file whose output shape differs from the model's there is
    refused.  Padded to the input's length, it is
    written and computes the model's frames, float32 to 1e-5 relative, at other lengths and batches."""
    x, lengths = torch.randn(3, 8, 12), _lengths_as(given, torch.tensor([12, 9, 5]))
    model = _encoder(False, given)
    source = model if what == "model" else repalgebra.fuse(model, (x, lengths))
    with pytest.raises(FallbackError, match=r"\(PackedEncoder\) computes something else when only the values of its "
                                            r"inputs change.*output 0 has shape \(3, 12, 8\), not \(3, (6|10), 8\).*"
                                            r"output size follows those values"):
        export_onnx(source, None, (x, lengths))
    model = _encoder(True, given)
    source = model if what == "model" else repalgebra.fuse(model, (x, lengths))
    proto = export_onnx(source, None, (x, lengths))
    checks = [(torch.randn(2, 8, 12), torch.tensor([10, 7])), (torch.randn(3, 8, 12), torch.tensor([4, 12, 8]))]
    for y, n in checks[given == "time_major":]:  # (a time-major mask's batch, its second axis, is the example's)
        with torch.no_grad():
            assert close(run_inputs(proto, (y, _lengths_as(given, n)))[0], model(y, _lengths_as(given, n)))


class SlicesByNumber(nn.Module):
    """Conv + BN, its first ``int(n)`` channels kept: ``n`` a 0-d integer input, read as a Python number."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x, n):
        return self.bn(self.conv(x))[:, :int(n)]


def test_a_number_read_from_a_0d_integer_input_is_refused_unless_allowed():
    """A 0-d integer input was never varied, so ``int(n)`` read the example's 6 in every check and the file kept 6
    channels where the model keeps 3 for n = 3 (a review).  0-d inputs vary as their kind does; the number read
    comes out otherwise, and the export is refused unless allowed, where its file keeps the example's channels."""
    torch.manual_seed(0)
    model = SlicesByNumber().eval()
    model.bn.running_var.uniform_(0.5, 2.0)
    x, n = torch.randn(2, 3, 8, 8), torch.tensor(6)
    with pytest.raises(FallbackError, match="came out otherwise for other inputs"):
        export_onnx(model, None, (x, n))
    proto = export_onnx(model, None, (x, n), allow_example_branches=True)
    with torch.no_grad():
        assert close(run_inputs(proto, (x, n))[0], model(x, n))
        assert run_inputs(proto, (x, torch.tensor(3)))[0].shape[1] == 6


@pytest.mark.parametrize("how", ["scale", "keep"])
def test_numbers_read_from_ids_and_allowed_are_not_refused_by_the_lengths_check(how):
    """The check at halved ids compares the file with the model only where the model's Python reads what it reads
    at the check's own ids: a number read from them (one the output's size follows, too), accepted with
    allow_example_branches, is that flag's to judge."""
    gen = torch.Generator().manual_seed(0)
    x, ids = torch.randn(2, 8, generator=gen), torch.randint(1, 8, (2, 8), generator=gen)
    proto, report = export_onnx(ReadsNumbers(how), None, (x, ids), return_report=True, allow_example_branches=True)
    assert [(r.numbers, r.steered) for r in report.regions] == [(1, True)]
    with torch.no_grad():
        assert close(run_inputs(proto, (x, ids))[0], ReadsNumbers(how)(x, ids))


def run_inputs(proto: onnx.ModelProto, xs: tuple) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), xs)})


class PaddedMean(nn.Module):
    """Conv + BN over ``(B, T, C)`` features, averaged over each utterance's valid frames, with the padding mask
    made as ESPnet makes it: the lengths read as a Python list, the mask as long as the longest."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv1d(c, c, 3, padding=1, bias=False), nn.BatchNorm1d(c)

    def forward(self, x, lengths):
        lengths = lengths.tolist()
        frames = torch.arange(max(lengths)).unsqueeze(0).expand(len(lengths), -1)
        valid = (frames < frames.new_tensor(lengths).unsqueeze(1)).unsqueeze(1)
        y = self.bn(self.conv(x.transpose(1, 2))).relu().masked_fill(~valid, 0.0)
        return y.sum(-1) / valid.sum(-1)


def test_lengths_read_as_numbers_from_full_length_utterances_are_refused():
    """An example of full-length utterances, lengths ``[12, 12]``: the ids' variations (all 0: a mask of length 0
    that does not run; reversed: the same lengths) left the numbers alike, and the file held the example's mask,
    0.35 off for lengths ``[12, 5]`` (found by a probe).  Halved lengths read other numbers."""
    torch.manual_seed(0)
    model = PaddedMean().eval()
    model.bn.running_mean.uniform_(-1, 1)
    with pytest.raises(FallbackError, match=r"\(PaddedMean; .*numbers? read\).*came out otherwise"):
        export_onnx(model, None, (torch.randn(2, 12, 8), torch.tensor([12, 12])))


class CausalEncoder(nn.Module):
    """A conv + BN front end, then nn.TransformerEncoderLayer given an additive causal mask (0 and -inf) as an input."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.front = nn.Sequential(nn.Conv1d(8, c, 3, padding=1, bias=False), nn.BatchNorm1d(c), nn.GELU())
        self.layer = nn.TransformerEncoderLayer(c, 2, 32, batch_first=True)

    def forward(self, x, src_mask):
        return self.layer(self.front(x).transpose(1, 2), src_mask=src_mask)


def test_an_additive_float_mask_is_given_its_values_in_the_checks():
    """The checks drew the float mask at random like any float input: torch's eval fast path returned NaN for such
    a mask, and a right file was refused ("NaN or Inf at other places than the original's").  A float input
    holding infinities takes the example's values, as integer and boolean masks do."""
    torch.manual_seed(0)
    model = CausalEncoder().eval()
    mask = nn.Transformer.generate_square_subsequent_mask(10)
    proto = export_onnx(model, None, (torch.randn(2, 8, 10), mask))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (2, 5):
        x = torch.randn(batch, 8, 10)
        got = session.run(None, dict(zip([i.name for i in session.get_inputs()], (x.numpy(), mask.numpy()))))[0]
        with torch.no_grad():
            assert close(got, model(x, mask))


class SizeLoop(nn.Module):  # Python on sizes (of a reduction's result: no check per call): fuse captures it with torch.export
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        for _ in range(int(y.amax(1).shape[-1]) // 3):
            y = y + F.max_pool2d(y, 3, 1, 1)
        return y


class BatchLoop(SizeLoop):  # ... and Python that computes with the batch size as a float: the batch is fixed too
    def forward(self, x):
        y = super().forward(x)
        return y * (int(x.amax(1).shape[0] * 0.5) + 1)


def test_a_model_fused_with_the_batch_free_exports_with_a_dynamic_batch():
    model = SizeLoop().eval()
    fused = repalgebra.fuse(model, torch.randn(2, 3, 6, 6))
    assert fused.fuse_report.capture == "specialized"
    proto, report = export_onnx(fused, None, (2, 3, 6, 6), fuse=False, return_report=True)
    assert report.dynamic_batch and report.summary() == "none", report
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) == 0
    for batch in (1, 3):
        x = torch.randn(batch, 3, 6, 6)
        with torch.no_grad():
            assert close(run(proto, x)[0], model(x))


def test_a_model_fused_with_shapes_fixed_exports_with_the_batch_fixed():
    model = BatchLoop().eval()
    x = torch.randn(2, 3, 6, 6)
    fused = repalgebra.fuse(model, x)
    assert fused.fuse_report.capture == "specialized"
    proto, report = export_onnx(fused, None, (2, 3, 6, 6), fuse=False, return_report=True)
    assert not report.dynamic_batch and "fused with shapes fixed" in report.notes[0]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) == 0
    with torch.no_grad():
        assert close(run(proto, x)[0], fused(x))


class TwoInputs(nn.Module):
    """Two inputs, and a size read with ``int()`` (of a reduction's result, which fx cannot check per call): ``fuse``
    captures it with torch.export.
    ``torch.concat`` as RT-DETR writes it; ``flip`` has no op in the table: the one call for the fallback."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.side = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Conv2d(4, 8, 1)

    def forward(self, x, z):
        y = self.bn(self.conv(x))
        return torch.concat([y + torch.arange(int(y.amax(1).shape[-1]), dtype=y.dtype), self.side(z).repeat(1, 1, 2, 2).flip(-1)], dim=1)


def test_a_fused_model_of_two_inputs_fixed_at_their_shapes_exports_by_our_lowering():
    """Its shape guard keeps it a leaf of the export's fx trace, whose root then took one input (``forward() missing 1
    required positional argument: 'z'``), so the whole model went to ``torch.onnx.export``, where the guard read the
    traced sizes as tensors and refused the shapes it was fused at."""
    model = TwoInputs().eval()
    shapes = ((2, 3, 8, 8), (2, 4, 4, 4))
    inputs = tuple(torch.randn(s) for s in shapes)
    fused = repalgebra.fuse(model, inputs)
    assert fused.fuse_report.capture == "specialized"
    proto, report = export_onnx(fused, None, shapes, fuse=False, return_report=True)
    assert report.capture == "fx" and [n.what for n in report.fallback] == ["flip.default"], report
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) == 0
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})[0]
    with torch.no_grad():
        assert close(got, model(*inputs))


class TemporalShiftBlock(nn.Module):
    """TSM's in-place temporal shift (writes into a view of the block's input, so the shortcut reads it shifted too),
    inside a ResNet block: ``fuse`` captures it with torch.export."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv, self.bn = nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.down = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32))

    def forward(self, x):
        x = self.stem(x)
        nt, c, h, w = x.size()
        v = x.view(nt // 4, 4, c, h, w)
        fold = c // 8
        v[:, :-1, :fold] = v[:, 1:, :fold].clone()
        v[:, -1, :fold] = 0
        v[:, 1:, fold:2 * fold] = v[:, :-1, fold:2 * fold].clone()
        v[:, 0, fold:2 * fold] = 0
        return torch.relu(self.bn(self.conv(v.view(nt, c, h, w))) + self.down(x))


def test_an_in_place_temporal_shift_exports_by_our_lowering():
    """The zeros written into the first and last frames were ``fill`` and ``select_scatter`` calls that neither our
    lowering nor torch.onnx.export (TorchScript) could export: both ways of export_onnx failed."""
    model = TemporalShiftBlock().eval()
    x = torch.randn(8, 3, 6, 6)  # two clips of four frames
    fused = repalgebra.fuse(model, x)
    for target, kw in ((fused, {"fuse": False}), (model, {})):
        proto, report = export_onnx(target, None, tuple(x.shape), return_report=True, **kw)
        assert report.summary() == "none", report
        with torch.no_grad():
            assert close(run(proto, x)[0], model(x))


def test_spliced_names_are_unique_and_carry_the_module_path():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Cumsum(), nn.ReLU(), Cumsum()).eval()
    proto = export_onnx(model, None, (1, 3, 4, 4))
    names = [n.name for n in proto.graph.node]
    outs = [o for n in proto.graph.node for o in n.output]
    assert len(set(names)) == len(names) and len(set(outs)) == len(outs)
    assert any(n.startswith("1/fallback") for n in names) and any(n.startswith("3/fallback") for n in names)


# --------------------------------------------------------------------------- rewrites


def _rewrite(fn):
    return next(r for k, (_, r) in REWRITES.items() if k is fn)


@pytest.mark.parametrize("start,end,step", [(1, 4, 1), (0, 5, 2), (None, None, 1), (-3, None, 1)])
def test_slice_scatter_rewrite_is_exact(start, end, step):
    x = torch.randn(2, 5, 9, 3)
    src = torch.randn(2, 5, len(range(*slice(start, end, step).indices(9))), 3)
    assert torch.equal(_rewrite(aten.slice_scatter.default)(x, src, 2, start, end, step), aten.slice_scatter.default(x, src, 2, start, end, step))


@pytest.mark.parametrize("size,kernel,dilation,padding,stride", [
    ((8, 8), (2, 2), 1, 0, 2), ((9, 10), (3, 3), 1, 1, 2), ((10, 10), (3, 2), 2, 1, 1), ((11, 11), (3, 3), 2, 0, 3), ((12, 7), (2, 3), 1, 2, 3),
])
def test_fold_rewrite_is_exact(size, kernel, dilation, padding, stride):
    cols = F.unfold(torch.randn(2, 3, *size), kernel, dilation, padding, stride)
    for c in (cols, cols[0]):
        assert torch.equal(_rewrite(F.fold)(c, size, kernel, dilation, padding, stride), F.fold(c, size, kernel, dilation, padding, stride))
    assert _rewrite(F.fold)(cols, size, kernel, dilation, padding, stride, opset=18) is NotImplemented  # ONNX Col2Im


@pytest.mark.parametrize("out", [(7, 7), (4, 5), (3, 2)])
def test_adaptive_avg_pool_rewrite_is_exact(out):
    x = torch.randn(2, 3, 9, 11)
    assert torch.allclose(_rewrite(F.adaptive_avg_pool2d)(x, out), F.adaptive_avg_pool2d(x, out), rtol=0, atol=1e-6)
    assert _rewrite(F.adaptive_avg_pool2d)(x[..., :8, :8], 4) is NotImplemented  # the exporter takes factor sizes


@pytest.mark.parametrize("fn,shape,out", [
    (torch.adaptive_avg_pool1d, (2, 3, 11), 4), (F.adaptive_max_pool1d, (2, 3, 11), (4,)),
    (F.adaptive_max_pool2d, (2, 3, 9, 11), (4, None)), (F.adaptive_avg_pool3d, (2, 3, 5, 7, 6), (2, 3, 2)),
    (F.adaptive_max_pool3d, (1, 2, 5, 7, 6), 4)], ids=["avg1d", "max1d", "max2d", "avg3d", "max3d"])
def test_adaptive_pool_rewrites_of_every_rank_are_exact(fn, shape, out):
    """The 1-D and 3-D adaptive pools (and the 2-D max) at sizes that do not divide went to ``torch.onnx.export``
    as they are, which refuses them: models ``fuse`` handled did not export (review R9).  Each window's mean or max,
    axis by axis, is PyTorch's (the max exactly; the mean to float32's rounding of a sum)."""
    x = torch.randn(shape)
    got, want = _rewrite(fn)(x, out), fn(x, out)
    torch.testing.assert_close(got, want, rtol=0, atol=0 if "max" in fn.__name__ else 1e-6)
    assert _rewrite(fn)(torch.randn(2, 3, *[8] * (x.dim() - 2)), 4) is NotImplemented  # (factor sizes: the exporter's)


def test_fold_and_adaptive_pool_rewrites_keep_inf_and_nan_where_torch_has_them():
    """Both were matrix products (a transposed conv of one-hot kernels, an averaging matrix): ``0 * inf`` spread an
    Inf or NaN of one place to its neighbours."""
    cols = torch.randn(F.unfold(torch.zeros(1, 2, 7, 8), 3, padding=1, stride=2).shape)  # padding's entries not zero
    got, want = _rewrite(F.fold)(cols, (7, 8), 3, 1, 1, 2), F.fold(cols, (7, 8), 3, 1, 1, 2)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    cols[0, 4, 5], cols[0, 13, 2] = float("inf"), float("nan")
    got, want = _rewrite(F.fold)(cols, (7, 8), 3, 1, 1, 2), F.fold(cols, (7, 8), 3, 1, 1, 2)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    x = torch.randn(1, 2, 9, 11)
    x[0, 0, 3, 4], x[0, 1, 1, 1] = float("inf"), float("nan")
    got, want = _rewrite(F.adaptive_avg_pool2d)(x, (4, 5)), F.adaptive_avg_pool2d(x, (4, 5))
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())


@pytest.mark.parametrize("shape,how", [
    ((2, 3, 5, 7, 6), dict(scale_factor=1.7, mode="nearest-exact")),
    ((2, 3, 5, 7, 6), dict(size=(9, 4, 13), mode="nearest")),
    ((1, 2, 6, 7, 5), dict(scale_factor=(1.5, 2.0, 0.7), mode="nearest", recompute_scale_factor=True)),
    ((2, 3, 11), dict(scale_factor=0.6, mode="nearest-exact")),
    ((1, 2, 30, 5), dict(size=(70, 9), mode="nearest"))],  # Resize's pick is not torch's at 9 of 30 -> 70 rows
    ids=["3d-exact-scale", "3d-size", "3d-recomputed", "1d-exact", "2d-30-to-70"])
def test_nearest_interpolate_rewrite_picks_torchs_pixels(shape, how):
    """Nearest interpolation of any rank as an index_select per axis of the pixels torch picks: equal to torch's."""
    x = torch.randn(shape)
    assert torch.equal(_rewrite(F.interpolate)(x, **how), F.interpolate(x, **how))


class Upsampled3d(nn.Module):
    def __init__(self, hooked: bool) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8)
        self.up = nn.Upsample(size=(7, 5, 9), mode="nearest-exact")
        if hooked:  # (a forward hook is never traced past, and one testing values stops torch.export: the upsampling
            self.up.register_forward_hook(lambda module, args, out: out.clamp(max=1e30) if bool(out.max() > 1e30) else None)  # is a
            # call the fallback exports)

    def forward(self, x):
        return self.up(torch.relu(self.bn(self.conv(x))))


@pytest.mark.parametrize("hooked, path", [(False, "own lowering"), (True, "fallback (1 node)")])
def test_a_3d_nearest_exact_interpolate_exports(hooked, path):
    """``torch.onnx.export`` has no 3-D nearest-exact: a model ``fuse`` handled did not export (review R9).  The
    interpolation is an IR op in 3-D now, which our lowering writes; where it is a call the fallback exports (a
    hooked module), the fallback's rewrite picks torch's pixels for the exporter."""
    model = seeded(Upsampled3d, 0, hooked=hooked)()
    x = torch.randn(2, 3, 5, 7, 6)
    proto, report = export_onnx(model, None, x, return_report=True, allow_example_branches=hooked)  # (its hook's branch)
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))  # float32
    assert report.path == path, str(report)


class HookedUpsampling(nn.Module):
    """A conv and BN, then a nearest upsampling by whole factors in a module a forward hook testing values keeps a call
    (torch.export stops at the hook's branch; diffusers' Upsample2D in a UNet fx cannot trace is left so too)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.conv = {4: nn.Conv2d, 5: nn.Conv3d}[rank](3, 8, 1)
        self.bn = {4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank](8)
        self.up = nn.Upsample(scale_factor=2 if rank == 4 else (1, 2, 3), mode="nearest")
        self.up.register_forward_hook(lambda module, args, out: out.clamp(max=1e30) if bool(out.max() > 1e30) else None)

    def forward(self, x):
        return self.up(torch.relu(self.bn(self.conv(x))))


@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (1, 3, 3, 4, 5)])
def test_a_nearest_upsampling_by_whole_factors_left_to_the_exporter_is_a_resize(shape):
    """The fallback's rewrite gathered every axis's picks (a ``Gather`` per axis, 1.8x the time of the file of the
    exporter's own ``Resize``; review R20b); by whole factors, where torch picks ``floor(dst / k)``, it leaves an
    interpolation by those factors, which the exporter writes as a ``Resize`` by constant scales, exact in
    onnxruntime (float32: the folded BN's rounding only, 1e-5 of the output's magnitude)."""
    model = seeded(HookedUpsampling, 0, rank=len(shape))()
    x = torch.randn(shape)
    proto, report = export_onnx(model, None, x, return_report=True, allow_example_branches=True)
    assert report.path == "fallback (1 node)", str(report)
    assert "Resize" in {n.op_type for n in proto.graph.node}, [n.op_type for n in proto.graph.node]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (x, torch.cat([x, -x])):
        got = session.run(None, {"x": batch.numpy()})[0]
        with torch.no_grad():
            want = model(batch)
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


class ScaledBy(nn.Module):
    """A conv, then an interpolation by a factor with no exact float32 value (a multi-scale model's resampling)."""

    def __init__(self, mode: str, factor: float, rank: int) -> None:
        super().__init__()
        self.mode, self.factor = mode, factor
        self.conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank](3, 4, 3, padding=1)

    def forward(self, x):
        return F.interpolate(self.conv(x), scale_factor=self.factor, mode=self.mode, align_corners=False)


@pytest.mark.parametrize("mode,factor,shape", [("bicubic", 1.3, (2, 3, 10, 10)), ("bicubic", 0.7, (2, 3, 10, 10)),
                                               ("linear", 1.3, (2, 3, 10)), ("trilinear", 1.3, (2, 3, 4, 10, 10))])
def test_an_interpolation_by_a_factor_without_an_exact_float32_exports(mode, factor, shape):
    """torch makes ``floor(10 * 1.3) = 13`` rows; the exporter's ``Resize``, its scale 1.3 in float32
    (1.29999995), made 12, and the export was refused with an error about an ``Identity`` node (review R13b).  The
    factor moves by an ulp or two, as our own lowering's ``_scale_for`` does."""
    model = ScaledBy(mode, factor, len(shape) - 2).eval()
    x = torch.randn(*shape)
    proto = export_onnx(model, None, x)
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = model(x)
    assert got.shape == tuple(want.shape)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))  # float32


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("how", [dict(size=(5, 6)), dict(size=(14, 20)), dict(scale_factor=0.5)])
def test_antialiased_interpolate_rewrite_is_exact(mode, how):
    x = torch.randn(2, 3, 9, 11)
    got = _rewrite(F.interpolate)(x, mode=mode, antialias=True, **how)
    assert torch.allclose(got, F.interpolate(x, mode=mode, antialias=True, **how), rtol=0, atol=1e-5)
    op = aten._upsample_bicubic2d_aa.default
    assert torch.allclose(_rewrite(op)(x, [4, 5], False), op(x, [4, 5], False), rtol=0, atol=1e-5)


class Resamples(nn.Module):
    """What TorchScript cannot export at opset 17, inside a module torch.fx cannot trace (kept whole: a size of a
    reduction's result read as a number, which it cannot check per call)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        h = int(x.amax(1).shape[-1])
        y = F.interpolate(self.conv(x), size=(h // 2, h // 2 + 1), mode="bicubic", antialias=True)
        y = F.adaptive_avg_pool2d(y, (3, 3))
        cols = F.unfold(y, 2)
        return F.fold(cols, (3, 3), 2)


def test_rewrites_reach_calls_inside_a_module_kept_whole():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), Resamples()).eval()
    proto, report = export_onnx(model, None, (1, 3, 10, 10), return_report=True, opset=17)
    (region,) = report.regions
    assert region.exporter.endswith("with rewrites: adaptive_avg_pool2d, fold, interpolate(antialias)")
    for batch in (1, 3):
        x = torch.randn(batch, 3, 10, 10)
        with torch.no_grad():
            assert close(run(proto, x)[0], model(x))


class WindowBlock(nn.Module):
    def __init__(self, c: int, ws: int) -> None:
        super().__init__()
        self.proj, self.ws = nn.Linear(c, c), ws

    def forward(self, x, x_size):
        (h, w), (b, _, c), ws = x_size, x.shape, self.ws
        win = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)
        win = self.proj(win)
        batch = int(win.shape[0] / (h * w / ws / ws))
        return x + win.view(batch, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(batch, h * w, c)


class SwinIRLike(nn.Module):
    """SwinIR's forward: a plain tensor attribute rewritten on each call (``self.mean = self.mean.type_as(x)``), then a
    block given ``x_size`` whose window reverse reads the batch as ``int(windows.shape[0] / (H * W / ws / ws))``:
    torch.fx's TraceError while the graph is built, at no one submodule."""

    def __init__(self, c: int = 8, ws: int = 4) -> None:
        super().__init__()
        self.mean = torch.tensor((0.4488, 0.4371, 0.4040)).view(1, 3, 1, 1)
        self.conv, self.block = nn.Conv2d(3, c, 3, padding=1), WindowBlock(c, ws)

    def forward(self, x):
        self.mean = self.mean.type_as(x)
        x = self.conv(x - self.mean)
        y = self.block(x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3]))
        return y.transpose(1, 2).reshape(x.shape)


def test_an_attribute_a_forward_sets_from_itself_exports_through_fx():
    """It raised torch.fx's TraceError, and was exported whole.  Since a trace puts back the attribute it set to a
    proxy (``self.mean``), fx traces it, the block kept whole.  That way fixes the batch (the block reads it as a
    number), so the capture at the export's shapes, which leaves less to torch.onnx.export (the ``type_as``, not
    the block), is the file."""
    model = SwinIRLike().eval()
    x = torch.randn(1, 3, 8, 8)
    assert "kept whole: 'block'" in capture_for_export(model, (x,))[1]
    proto, report = export_onnx(model, None, (1, 3, 8, 8), return_report=True)
    assert report.capture.startswith("torch.export with shapes fixed"), report.capture
    assert [n.what for n in report.fallback] == ["type_as.default"], report.fallback
    with torch.no_grad():
        assert close(run(proto, x)[0], model(x))


def test_a_trace_error_while_the_graph_is_built_exports_the_model_whole(monkeypatch):
    """torch.fx's own error while the graph is built, at no one submodule (a proxy a forward left on a module did
    it, before traces put such attributes back): the model is one call for the export to read."""
    import repalgebra.frontend.torch as front

    def fails(*args, **kwargs):
        raise torch.fx.proxy.TraceError("symbolically traced variables cannot be used as inputs to control flow")

    monkeypatch.setattr(front, "trace_model", fails)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    proto, report = export_onnx(model, None, (1, 3, 8, 8), return_report=True, fuse=False)
    assert "torch.fx left 1 call" in report.capture, report.capture  # (and torch.export read it)
    with torch.no_grad():
        assert close(run(proto, x)[0], model(x))


class SqueezeExcite(nn.Module):
    """Global pooling written with the kernel read from the input's shape (timm's SE blocks): fx carries it opaque."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(F.avg_pool2d(x, x.shape[2:])))


def test_pool_with_a_kernel_read_from_the_shape_keeps_the_batch_dynamic():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), SqueezeExcite()).eval()
    proto, report = export_onnx(model, None, (1, 3, 7, 9), return_report=True)
    assert report.dynamic_batch, report.notes
    assert any("avg_pool2d" in r.exporter for r in report.regions) or not report.regions  # or lowered by us
    for batch in (1, 3):
        x = torch.randn(batch, 3, 7, 9)
        with torch.no_grad():
            assert close(run(proto, x)[0], model(x))
    x = torch.randn(2, 4, 5, 6)
    rewrite = _rewrite(F.avg_pool2d)
    assert torch.allclose(rewrite(x, (5, 6)), F.avg_pool2d(x, (5, 6)), rtol=0, atol=1e-6)
    assert rewrite(x, 2) is NotImplemented and rewrite(x, (5, 6), padding=1) is NotImplemented


class HalfPool(nn.Module):
    def forward(self, x):
        return F.avg_pool2d(x, x.shape[-1] // 2)  # a kernel size read from the shape, not the whole input


def test_pool_with_a_kernel_size_computed_from_the_shape_exports_with_a_dynamic_batch():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), HalfPool()).eval()
    proto, report = export_onnx(model, None, (2, 3, 8, 8), return_report=True)
    assert report.dynamic_batch, report.notes
    for batch in (1, 3):
        x = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            assert close(run(proto, x)[0], model(x))


@pytest.mark.parametrize("target", [F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default,
                                    aten._scaled_dot_product_flash_attention_for_cpu.default])
def test_attention_calls_through_the_fallback(target):
    """SDPA as the fx front end carries it, as torch.export records it, and as its CPU flash kernel (two results)."""
    x = Graph.input("x", (2, 3, 5, 4))
    probe = torch.zeros(2, 3, 5, 4)
    two = target is aten._scaled_dot_product_flash_attention_for_cpu.default
    attn = opaque([x], target, (In(0), In(0), In(0)), None if two else probe, source="attn")
    nodes = [attn] + ([opaque([attn.out], operator.getitem, (In(0), 0), probe, source="attn")] if two else [])
    relu = Node.make("relu", [nodes[-1].out], source="act")
    graph = Graph([x], [*nodes, relu], [relu.out])
    proto, report = graph_to_onnx(graph, return_report=True)
    onnx.checker.check_model(proto, full_check=True)
    assert report.dynamic_batch and len(report.fallback) == len(nodes)
    for batch in (1, 3):
        xb = torch.randn(batch, 3, 5, 4)
        assert close(run(proto, xb)[0], run_graph(graph, xb))
    if two:
        q, k, v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 6, 4), torch.randn(3, 2, 6, 4)
        mask = torch.randn(5, 6)
        for kw in (dict(), dict(is_causal=True), dict(attn_mask=mask, scale=0.3)):
            got, ref = _rewrite(target)(q, k, v, **kw), target(q, k, v, **kw)
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, ref))


@pytest.mark.parametrize("kernel, stride, padding, divisor", [((3, 1), 2, 0, 2), (3, 1, 1, 1), ((2, 3), (2, 1), (1, 1), 7)])
def test_avg_pool_with_a_divisor_override_exports_what_pytorch_computes(kernel, stride, padding, divisor):
    """torch.onnx.export writes ``divisor_override`` as a plain average; the region is rewritten first.

    The first case is the one the fallback's check once let through: the ReLU zeroes everything the pool
    sees on a standard-normal example, so only a larger input (all 12s) showed 2.0 where PyTorch gives 3.0.
    """
    conv = nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.fill_(-10.0)
    model = nn.Sequential(conv, nn.ReLU(), nn.AvgPool2d(kernel, stride, padding, divisor_override=divisor)).eval()
    proto = export_onnx(model, None, (1, 1, 5, 4))
    for x in (torch.full((1, 1, 5, 4), 12.0), 20 * torch.rand(3, 1, 5, 4, generator=torch.Generator().manual_seed(0))):
        with torch.no_grad():
            assert close(run(proto, x)[0], model(x)), (run(proto, x)[0], model(x))


def test_avg_pool_with_a_divisor_override_and_ceil_mode_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.AvgPool2d(3, 2, ceil_mode=True, divisor_override=2)).eval()
    with pytest.raises(Exception, match="divisor_override and ceil_mode"):
        export_onnx(model, None, (1, 1, 6, 6))


class PosEmbed(nn.Module):
    """A position embedding resized to the feature map (timm's ``resample_abs_pos_embed``): interpolate a parameter."""

    def __init__(self, mode: str, size_from: str):
        super().__init__()
        self.mode, self.size_from = mode, size_from
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.pos = nn.Parameter(torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1)))
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.size_from == "slice":
            size = y.shape[-2:]
        else:
            h, w = y.shape[-2:]
            size = (h, w)
        corners = {} if self.mode == "nearest" else {"align_corners": False}
        return y + F.interpolate(self.pos, size=size, mode=self.mode, **corners)


@pytest.mark.parametrize(
    "mode, size_from", [("bilinear", "slice"), ("bicubic", "slice"), ("nearest", "slice"), ("bilinear", "unpacked")]
)
def test_parameter_resized_to_the_feature_map_exports_at_another_size(mode, size_from):
    """``export_onnx`` traces the fused model again; the carried ``F.interpolate`` must stay one call there.

    Its input is the fused call's constant, not a Proxy, so running it traced the body of ``F.interpolate``,
    which read the size Proxy ``x.shape[-2:]`` as one int (``[size, size]``): a TypeError from
    ``upsample_bilinear2d``.  Fused at 8x8, exported at 12x12 with a dynamic batch, run at batch 2 and 3.
    """
    torch.manual_seed(0)
    model = PosEmbed(mode, size_from).eval()
    fused = repalgebra.fuse(model, torch.randn(1, 3, 8, 8))
    assert fused.fuse_report.capture == "fx"
    proto, report = export_onnx(fused, None, (2, 3, 12, 12), fuse=False, return_report=True)
    assert report.dynamic_batch, report.notes
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) == 0
    for batch in (2, 3):
        x = torch.randn(batch, 3, 12, 12)
        with torch.no_grad():
            assert close(run(proto, x)[0], model(x))


class GlobalMaxPool(nn.Module):
    def forward(self, x):
        return F.max_pool2d(x, x.size()[2:])  # torch.onnx.export cannot export this kernel with a dynamic batch


def test_a_retried_export_prints_nothing_of_torch(capfd, monkeypatch):
    """The region's export with a dynamic batch fails and is retried with the batch fixed; what torch printed for
    the failed attempt (its C++ log's "Torch IR graph at exception: ..." dump, past ``sys.stderr``) stays off the
    terminal, and torch's ONNX log is left as it was (``torch.onnx.export`` turns it on for good).  The capture at
    the export's shapes, which makes the pool's kernel size a constant (no fallback at all), is turned off."""
    import repalgebra.backend.onnx as backend

    monkeypatch.setattr(backend, "_at_export_shapes", lambda *args: None)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), GlobalMaxPool()).eval()
    log_before = torch._C._jit_is_onnx_log_enabled()
    capfd.readouterr()
    proto, report = export_onnx(model, None, (1, 3, 6, 6), return_report=True)
    out, err = capfd.readouterr()
    assert not report.dynamic_batch and any("cannot export it" in n for n in report.notes), report.notes
    assert "Torch IR graph" not in out + err and not (out + err).strip(), out + err
    assert torch._C._jit_is_onnx_log_enabled() == log_before
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        assert close(run(proto, x)[0], model(x))


def test_a_failed_export_prints_nothing_and_raises_torch_s_first_line(capfd):
    class NotExportable(nn.Module):
        def forward(self, x):
            return torch.special.i0(x)

    model = nn.Sequential(nn.Conv2d(3, 4, 3), NotExportable()).eval()
    capfd.readouterr()
    with pytest.raises(ValueError, match=r"cannot export it at opset \d+ either: \w+: .*i0"):
        export_onnx(model, None, (1, 3, 8, 8))
    out, err = capfd.readouterr()
    assert not (out + err).strip(), out + err


class PartialConv(nn.Module):
    """FasterNet's partial convolution written without ``x = x.clone()``: it writes into the tensor it is given."""

    def __init__(self, c: int, branch: bool) -> None:
        super().__init__()
        self.cp, self.branch = c // 4, branch
        self.conv = nn.Conv2d(self.cp, self.cp, 3, padding=1, bias=False)

    def forward(self, x):
        if not self.branch or x.sum() > -1e9:  # branch: data-dependent, so neither fx nor torch.export captures it
            x[:, : self.cp] = self.conv(x[:, : self.cp])
        return x


class FasterBlock(nn.Module):
    def __init__(self, c: int, branch: bool) -> None:
        super().__init__()
        self.mixer = PartialConv(c, branch)
        self.mlp = nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(), nn.Conv2d(2 * c, c, 1))

    def forward(self, x):
        shortcut = x
        x = self.mixer(x)  # also changes `shortcut`: the sum reads the written contents twice
        return shortcut + self.mlp(x)


@pytest.mark.parametrize("branch", [False, True])
def test_a_call_kept_whole_that_writes_into_a_value_read_after_it_exports_what_the_model_computes(branch):
    """Kept whole (a leaf, or untraceable), the partial conv wrote into the block's input while the shortcut still
    read it: the IR gave that value one content, and export_onnx refused ("computes something else")."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), FasterBlock(16, branch), FasterBlock(16, branch)).eval()
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        ref = model(x.clone())
    fused = repalgebra.fuse(model, x[:1], leaf_modules=[] if branch else [PartialConv])  # with its branch, untraceable
    assert branch or "writes into 'x' in place" in str(fused.fuse_report)  # with the branch, its trace failed first
    line = next(line for line in str(fused.fuse_report).splitlines() if "fused on their own" in line)
    # A part tried twice (the untraceable mixer's conv, under a block then kept whole) is listed once.
    assert all(line.count(f"'{k}.mlp'") == 1 and line.count(f"'{k}.mixer.conv'") <= 1 for k in (1, 2)), line
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())  # the blocks kept whole, their MLPs fused
    with torch.no_grad():
        assert close(fused(x.clone()).numpy(), ref)
    for target in (model, fused):  # the branch always holds (an ONNX graph cannot hold it: written when allowed)
        assert close(run(export_onnx(target, None, x[:1], allow_example_branches=branch), x)[0], ref)


class SelectiveKernel(nn.Module):
    """SKNet's unit: two dilated conv branches stacked on a new axis, weighted by a softmax over it."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1 + i, dilation=1 + i, bias=False), nn.BatchNorm2d(c), nn.ReLU()) for i in range(2)
        )
        self.fc = nn.Sequential(nn.Conv2d(c, c // 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU())
        self.fcs = nn.ModuleList(nn.Conv2d(c // 2, c, 1) for _ in range(2))

    def forward(self, x):
        feats = torch.stack([conv(x) for conv in self.convs], dim=1)
        z = self.fc(feats.sum(1).mean((2, 3), keepdim=True))
        attention = torch.stack([fc(z) for fc in self.fcs], -4).softmax(1)
        return (feats * attention).sum(1)


def exports_by_our_lowering(model: nn.Module, x: torch.Tensor) -> None:
    """``model`` exported at batch 1 with nothing left to torch.onnx.export, and equal to it at ``x``'s batch."""
    proto, report = export_onnx(model, None, x[:1], return_report=True)
    assert report.summary() == "none", report
    with torch.no_grad():
        assert close(run(proto, x)[0], model(x))


def test_torch_stack_is_lowered_by_our_own_ops():
    """``torch.stack`` was a call, three regions of SKNet's unit left to torch.onnx.export: it is the concat of
    its operands unsqueezed (``dim`` also negative)."""
    exports_by_our_lowering(SelectiveKernel().eval(), torch.randn(3, 8, 10, 10))


class MaxOverPoints(nn.Module):
    """PointNet's global feature: ``torch.max(x, 2, keepdim=True)[0]``, and ``x.max(dim=1).values``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv1d(3, 16, 1), nn.BatchNorm1d(16)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return torch.max(y, 2, keepdim=True)[0].view(-1, 16) + y.max(dim=1).values.sum(1, keepdim=True)


def test_the_values_of_a_max_over_an_axis_are_an_amax():
    """``torch.max(x, dim)`` returns values and indices: a call whose values went to torch.onnx.export."""
    model = MaxOverPoints().eval()
    x = torch.randn(3, 3, 20)
    fused = repalgebra.fuse(model, x[:1])
    assert fused.fuse_report.ops_after.get("amax") == 2 and "opaque" not in fused.fuse_report.ops_after, fused.fuse_report
    exports_by_our_lowering(model, x)


class TimeMajor(nn.Module):
    """fairseq's layout: a T x B x C sequence and a B x T padding mask (their first axes differ)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, padding_mask):
        y = self.proj(x).exp()  # exp: a call, so the export has a region to run
        return y.masked_fill(padding_mask.transpose(0, 1)[:, :, None], 0.0)


@pytest.mark.parametrize("dynamic_batch", [True, False])
def test_inputs_whose_first_axes_differ_export(dynamic_batch):
    """The regions' example runs gave every input the first input's first axis as its batch: the B x T mask was
    drawn T x T, and the export died in a region (``size of tensor a (12) must match the size of tensor b (2)``)."""
    model = TimeMajor().eval()
    x, mask = torch.randn(12, 2, 8), torch.zeros(2, 12, dtype=torch.bool)
    mask[1, 9:] = True
    proto = export_onnx(model, None, (x, mask), dynamic_batch=dynamic_batch)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), (x, mask))})
    with torch.no_grad():
        assert close(got, model(x, mask))


class _PaddedWindows(nn.Module):
    """Swin's window attention as its code writes it: a pad computed from the size, and the batch recomputed as a
    float (``int(windows.shape[0] / (H * W / ws / ws))``), so torch.fx keeps the block whole and the batch is fixed."""

    def __init__(self, c: int = 8, ws: int = 4) -> None:
        super().__init__()
        self.ws, self.norm, self.qkv, self.proj = ws, nn.LayerNorm(c), nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x, H, W):
        B, L, C = x.shape
        ws = self.ws
        pr, pb = (ws - W % ws) % ws, (ws - H % ws) % ws
        y = F.pad(self.norm(x).view(B, H, W, C), (0, 0, 0, pr, 0, pb))
        Hp, Wp = H + pb, W + pr
        win = y.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
        q, k, v = self.qkv(win).chunk(3, -1)
        a = self.proj(F.scaled_dot_product_attention(q, k, v)).view(-1, ws, ws, C)
        b = int(a.shape[0] / (Hp * Wp / ws / ws))
        y = a.view(b, Hp // ws, Wp // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(b, Hp, Wp, C)
        return x + y[:, :H, :W].reshape(B, H * W, C)


class _WindowNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.blocks = nn.Conv2d(3, 8, 4, 4), nn.ModuleList([_PaddedWindows(), _PaddedWindows()])

    def forward(self, img):
        x = self.embed(img)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x, H, W)
        return x.mean(1)


def test_when_the_batch_is_fixed_anyway_the_way_with_less_fallback_is_taken():
    """The first way (fx, the blocks kept whole) sent both blocks to torch.onnx.export and fixed the batch; the
    capture fused at the export's shapes fixes it too and lowers everything itself: that one is taken."""
    model = _WindowNet().eval()
    x = torch.randn(2, 3, 40, 36)
    proto, report = export_onnx(model, None, x, return_report=True)
    assert not report.dynamic_batch and report.summary() == "none", report
    with torch.no_grad():
        assert close(run(proto, x)[0], model(x))


class _Guidance(nn.Module):
    """Classifier-free guidance around a denoiser, as diffusers' pipelines write it: the batch doubled, then split by
    the latents' own batch (``split(latents.shape[0])``, which fx leaves for the fallback and torch.export fixes)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, latents):
        eps = self.net(torch.cat([latents] * 2))
        uncond, cond = eps.split(latents.shape[0])
        return uncond + 7.5 * (cond - uncond)


def test_a_capture_with_every_shape_fixed_exports_with_the_batch_fixed():
    """The later way of the batch fixed anyway, torch.export at the export's shapes, fixes the batch too: its file
    was written with a dynamic batch, and at batch 2 it returned one sample, guidance between two different ones
    (review R13b, the model at batch 2: (2, 4, 8, 8); the file: (1, 4, 8, 8)).  Either the file runs at another batch
    as the model does, or its batch is fixed."""
    model = _Guidance().eval()
    proto, report = export_onnx(model, None, (1, 4, 8, 8), return_report=True)
    dims = [d.dim_value or d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    x = torch.randn(2, 4, 8, 8)
    if report.dynamic_batch:
        with torch.no_grad():
            assert close(run(proto, x)[0], model(x)), report
    else:
        assert dims == [1, 4, 8, 8] and "batch fixed at 1" in str(report), (dims, report)
    assert dims[0] == ("batch" if report.dynamic_batch else 1), (dims, report)


def test_torch_s_own_size_checks_are_not_reported_as_control_flow():
    """InstanceNorm (CycleGAN) goes to torch.onnx.export, whose trace sees ``F.instance_norm`` check that a channel
    has more than one value: a check in torch's code, not the model branching on its values.  The note said it was,
    once per InstanceNorm; the model's own branch is still reported (above)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.ReLU()).eval()
    _, report = export_onnx(model, None, (1, 3, 8, 8), return_report=True)
    assert report.fallback and not any("Python boolean" in n for n in report.notes), report.notes


def test_a_value_the_trace_read_as_a_number_is_named_when_the_export_differs():
    """torchlibrosa's ``power_to_db`` clamps at ``log_spec.max().item() - top_db``: torch.onnx.export's trace holds
    that number as a constant, so the file computes something else at other inputs.  The refusal said only that
    it differs; it names the number read now."""
    class TopDb(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, spec):
            log_spec = 10.0 * torch.log10(torch.clamp(spec, min=1e-10))
            return self.conv(torch.clamp(log_spec, min=log_spec.max().item() - 40.0))

    with pytest.raises(FallbackError, match="read 1 tensor value as a Python number, with .item"):
        export_onnx(TopDb().eval(), None, (2, 1, 16, 16))


def test_a_float16_encoder_layer_with_a_padding_mask_goes_through_the_fallback():
    """torch.onnx.export's float16 TransformerEncoderLayer with a key padding mask: onnxruntime's graph optimizer
    crashed the process (SIGSEGV) in the fallback's check of it; unoptimized, it differed from torch by 2e-3
    relative, float16 sums in another order, over the check's 1e-3.  The check runs the file as written, at
    verify's float16 tolerance (1e-2), and so does this test (the crash is onnxruntime's, in its optimizer)."""
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

        def forward(self, x, mask):
            return self.layer(x, src_key_padding_mask=mask)

    torch.manual_seed(0)
    model = Encoder().half().eval()
    x, mask = torch.randn(2, 12, 16, dtype=torch.float16), torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 9:] = True
    fused = repalgebra.fuse(model, (x, mask))
    proto = export_onnx(fused, None, (x, mask), fuse=False)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy(), "mask": mask.numpy()})[0].astype(np.float64)
    want = fused(x, mask).double().detach().numpy()
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()


class FloorDivides(nn.Module):
    """``//`` of token ids and of floats, and a number by ids: torch floors each."""

    def forward(self, ids, x):
        return ((ids // 3).float() + (7 // (ids.abs() + 1)).float() + x // 0.7 + torch.floor_divide(x, -1.3)
                + -0.5 // (ids.abs() + 1))  # a float by int ids: a float (found by a review)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_floor_division_floors_negative_values_in_the_file(capture):
    """torch.onnx.export writes ``floor_divide`` truncated toward zero (its old meaning): ``-7 // 3`` was -2 in the
    file, -3 in torch.  The export's checks keep token ids at the example's values, all >= 0, and did not see it."""
    model = FloorDivides()
    if capture == "export":  # torch.export records aten.floor_divide
        model = torch.export.export(model, (torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8))).module()
    gen = torch.Generator().manual_seed(0)
    ids, x = torch.randint(0, 10, (2, 8), generator=gen), torch.randn(2, 8, generator=gen)
    proto = export_onnx(model, None, (ids, x))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    negative = torch.tensor([[-7, -1, 0, 5, -3, -4, 8, 9], [-9, -8, -6, -5, -2, 1, 2, 3]])
    x = torch.randn(2, 8, generator=gen) * 3
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), (negative, x))})[0]
    np.testing.assert_array_equal(got, FloorDivides()(negative, x).numpy())  # floors: equal (these quotients are not near integers)


class OneHotOfIds(nn.Module):
    def forward(self, ids):
        return F.one_hot(ids).float()  # the number of classes read from the values


def test_a_float32_part_that_does_not_run_in_onnxruntime_is_not_told_to_export_in_float32():
    """The refusal ended "export the model in float32 or float16, where it runs", for a model in float32."""
    ids = torch.randint(0, 10, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(FallbackError, match="does not run in onnxruntime") as refused:
        export_onnx(OneHotOfIds(), None, ids)
    assert "float32 or float16" not in str(refused.value)


class Cosine(nn.Module):
    def forward(self, x):
        return torch.cos(x)  # (no lowering of ours: torch.onnx.export writes it)


def test_an_opset_past_torch_onnx_exports_names_the_last_it_writes():
    """torch.onnx.export's TorchScript exporter writes opsets up to 23 (its constant for a "max" says 20): the refusal
    at 24 said "export at opset 20 or lower", where 21 to 23 work (review R16b)."""
    newest = torch.onnx._constants.ONNX_MAX_OPSET
    assert export_onnx(Cosine(), None, (2, 8), opset=newest).opset_import[0].version == newest
    if newest + 1 <= onnx.defs.onnx_opset_version():
        with pytest.raises(FallbackError, match=f"export at opset {newest} or lower"):
            export_onnx(Cosine(), None, (2, 8), opset=newest + 1)


def test_a_qat_layers_fake_quantized_weight_is_exported_as_torch_rounds_it():
    """A QAT Linear (``prepare_qat``'s, observers off): torch.onnx.export writes its weight's fake quantization as
    QuantizeLinear, which rounds ``w / s`` where torch rounds ``w * (1 / s)``; symmetric per-channel weights put the
    largest of a channel at a tie (127.5), which lands one step off.  The check's tolerance let it through (found
    by a probe).  Rewritten as torch computes it, the file equals the model."""
    import torch.ao.nn.qat as nnqat
    import torch.ao.quantization as tq

    torch.manual_seed(0)
    qconfig = tq.QConfig(activation=tq.default_fake_quant, weight=tq.default_per_channel_weight_fake_quant)
    model = nn.Sequential(nn.ReLU(), nnqat.Linear(64, 16, qconfig=qconfig))
    model[1].weight_fake_quant(model[1].weight)  # the observer sees the weight once, as a training step does
    model.apply(tq.disable_observer).eval()
    proto = export_onnx(model, None, (4, 64))
    for seed in range(3):
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            assert close(run(proto, x)[0], model(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_the_fake_quantize_rewrite_computes_what_torch_computes(dtype):
    """Bit for bit, in each dtype: torch's kernel multiplies in float32 at least and scales back in float32 (a first
    version computed in half, and 13% of a float16 file's outputs were a step off; found by a review)."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(40, 50, generator=gen) * 3).to(dtype)
    scale, zero = torch.rand(50, generator=gen) * 0.05 + 0.01, torch.randint(-3, 4, (50,), generator=gen, dtype=torch.int32)
    per_tensor = REWRITES[torch.fake_quantize_per_tensor_affine][1]
    per_channel = REWRITES[torch.fake_quantize_per_channel_affine][1]
    assert torch.equal(per_tensor(x, 0.0123, 3, -128, 127), torch.fake_quantize_per_tensor_affine(x, 0.0123, 3, -128, 127))
    if dtype != torch.float64:  # (torch's per-channel kernel takes float32 and half only)
        assert torch.equal(per_channel(x, scale, zero, 1, -128, 127), torch.fake_quantize_per_channel_affine(x, scale, zero, 1, -128, 127))


class KeepsAttention(nn.Module):
    """ESPnet's attention keeps its last weights, ``self.attn = softmax(...)``, in a model whose padding mask reads
    the lengths as numbers (so the whole model is exported by torch.onnx.export)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.q, self.out, self.attn = nn.Linear(d, d), nn.Linear(d, d), None

    def forward(self, x, lengths):
        mask = (torch.arange(int(max(lengths.tolist())))[None, :] < lengths[:, None])[:, None, :]
        scores = (self.q(x) @ x.transpose(-2, -1)).masked_fill(~mask, -1e4)
        self.attn = torch.softmax(scores, dim=-1)
        return self.out(self.attn @ x)


def test_a_model_keeping_a_computed_tensor_exports():
    """fuse's runs with autograd on left ``self.attn`` a tensor autograd made, and the export's copy of the part
    raised torch's "Only Tensors created explicitly by the user (graph leaves) support the deepcopy protocol"
    (found by a probe).  Its copies hold it detached, as fuse's do."""
    torch.manual_seed(0)
    x, lengths = torch.randn(2, 6, 8), torch.tensor([6, 4])
    model = KeepsAttention().eval()
    proto = export_onnx(model, None, (x, lengths), allow_example_branches=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), (x, lengths))})[0]
    with torch.no_grad():
        assert close(got, model(x, lengths))


class IdsInFloats(nn.Module):
    """DeepCTR's habit: one float input whose first column holds category ids (``X[:, :1].long()``), the rest dense
    features; then a BN that folds and DCN's cross layer, ``torch.matmul(kernel, x0)``, a carried call."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin, self.bn = nn.Embedding(10, 4), nn.Linear(5, 5), nn.BatchNorm1d(5)
        self.kernel, self.bias = nn.Parameter(torch.randn(5, 5)), nn.Parameter(torch.randn(5, 1))

    def forward(self, x):
        features = torch.cat([self.emb(x[:, 0:1].long()).flatten(1), x[:, 1:2]], dim=-1)
        x0 = self.bn(self.lin(features)).unsqueeze(2)
        return (x0 * (torch.matmul(self.kernel, x0) + self.bias) + x0).squeeze(2)


def test_floats_holding_ids_are_checked_at_the_examples_values():
    """The checks drew the float input at random, and the embedding raised a bare ``IndexError`` from inside the
    export; the fused model was refused for state: the carried call's own resolver, built on its first call (found
    by a probe).  Where the graph does not run on random values the checks take the example's, and note it."""
    from repalgebra import fuse

    torch.manual_seed(0)
    model = IdsInFloats().eval()
    model.bn.running_mean.uniform_(-1, 1)
    rows = lambda n: torch.cat([torch.randint(0, 10, (n, 1)).float(), torch.randn(n, 1)], 1)  # noqa: E731
    x = rows(4)
    for target in (model, fuse(model, x)):
        proto, report = export_onnx(target, None, x, return_report=True)
        assert any("checked at the example's values only" in n for n in report.notes), str(report)
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        for n in (1, 6):
            other = rows(n)
            got = session.run(None, {session.get_inputs()[0].name: other.numpy()})[0]
            with torch.no_grad():
                assert close(got, model(other))


class TemporalShift(nn.Module):
    """TSM's shift on an ``(N*T, C, H, W)`` backbone: ``torch.zeros_like`` of the clip, written slice by slice."""

    def __init__(self, segments: int = 4) -> None:
        super().__init__()
        self.segments, self.conv, self.bn = segments, nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        nt, c, h, w = x.size()
        x5 = x.view(nt // self.segments, self.segments, c, h, w)
        fold = c // 8
        out = torch.zeros_like(x5)
        out[:, :-1, :fold] = x5[:, 1:, :fold]
        out[:, 1:, fold: 2 * fold] = x5[:, :-1, fold: 2 * fold]
        out[:, :, 2 * fold:] = x5[:, :, 2 * fold:]
        return torch.relu(self.bn(self.conv(out.view(nt, c, h, w))) + x)


def test_a_region_input_read_only_for_its_sizes_is_fed_by_name():
    """torch.onnx.export dropped the region's input read only for its sizes, and the region's file was fed and wired by
    place: the 4-D input went to a 5-D one, and export_onnx refused TSM's backbone (found by a probe)."""
    torch.manual_seed(0)
    model = TemporalShift().eval()
    model.bn.running_mean.uniform_(-1, 1)
    x = torch.randn(8, 8, 8, 8)
    proto = export_onnx(repalgebra.fuse(model, x), None, x)
    with torch.no_grad():
        assert close(run(proto, x)[0], model(x))


class MultiCrop(nn.Module):
    """DINO's MultiCropWrapper: features of each crop size appended to ``torch.empty(0)`` with ``torch.cat``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        output = torch.empty(0).to(x.device)
        for crop in (x, x[..., 1:-1, 1:-1]):
            output = torch.cat((output, self.backbone(crop)))
        return self.head(output)


def test_a_concat_onto_an_empty_start_skips_it():
    """torch.cat skips a 1-D operand of shape (0,); the concat kept it, with the axis counted by its rank, and the
    file was no valid ONNX ("All inputs to Concat must have same rank"; found by a probe)."""
    torch.manual_seed(0)
    model = MultiCrop().eval()
    model.backbone[1].running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 12, 12)
    fused = repalgebra.fuse(model, x)
    assert fused.fuse_report.ops_after.get("batch_norm", 0) == 0, str(fused.fuse_report)
    with torch.no_grad():
        assert close(run(export_onnx(fused, None, x), x)[0], model(x))


class ExportBranch(nn.Module):
    """YOLOv6's and mmdet heads' habit: another output while ``torch.onnx.is_in_onnx_export()``."""

    def __init__(self, both: bool) -> None:
        super().__init__()
        self.conv, self.bn, self.both = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), both

    def forward(self, x):
        y = self.bn(self.conv(x))
        if torch.onnx.is_in_onnx_export():
            return y.sigmoid()
        return (y, y.sum()) if self.both else y


@pytest.mark.parametrize("both", [False, True], ids=["one-output", "two-outputs"])
def test_an_export_branch_on_is_in_onnx_export_is_refused_naming_the_flag(both):
    """The part reading the flag is kept whole, and torch.onnx.export takes its export branch: a file computing
    something else (refused, 2.0 off) or another number of outputs (refused with an IndexError).  Both refusals
    named a difference only; they now name the flag the part read while it was exported."""
    x = torch.randn(2, 3, 8, 8)
    fused = repalgebra.fuse(ExportBranch(both).eval(), x)
    with pytest.raises(FallbackError, match=r"its code reads torch\.onnx\.is_in_onnx_export\(\), whose answer while "
                                            r"torch\.onnx\.export traces it need not be"):
        export_onnx(fused, None, x)


class WordLM(nn.Module):
    """PyTorch's word_language_model: an embedding, an LSTM given its state, the decoded output and the new state."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.rnn, self.decoder = nn.Embedding(60, 16), nn.LSTM(16, 16, 2), nn.Linear(16, 60)

    def forward(self, tokens, h0, c0):
        output, hidden = self.rnn(self.encoder(tokens), (h0, c0))
        return self.decoder(output), hidden


def test_a_tuple_valued_call_on_a_value_another_region_computes_is_exported():
    """The LSTM's (output, state) is computed again in the region reading the state, from the embedding that the
    first region computed and did not give out: export_onnx failed with a KeyError (found by a probe)."""
    torch.manual_seed(0)
    model = WordLM().eval()
    example = (torch.randint(0, 60, (7, 2)), torch.randn(2, 2, 16), torch.randn(2, 2, 16))
    proto = export_onnx(repalgebra.fuse(model, example), None, example)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), example)})
    with torch.no_grad():
        decoded, (h, c) = model(*example)
    assert all(close(g, w) for g, w in zip(got, (decoded, h, c)))


class _MaskedEncoder(nn.Module):
    """BERT's habit with torch's own encoder: token ids and an int64 attention mask of 1s and 0s."""

    def __init__(self, vocab: int = 50, d: int = 16) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(32, d)
        layer = nn.TransformerEncoderLayer(d, 2, 32, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, input_ids, attention_mask):
        h = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1]).unsqueeze(0))
        return self.head(self.enc(h, src_key_padding_mask=attention_mask == 0)[:, 0])


def test_an_encoder_with_an_integer_mask_exports():
    """The check of integer inputs varied the mask to all 0 (every key masked: no tokenizer's input), where torch and
    the file put NaN in different places, and refused the encoder, which exported right before (a review).  It
    compares the file's output shapes only.  onnxruntime against float32, to 1e-4 relative (attention's softmax)."""
    torch.manual_seed(0)
    model = _MaskedEncoder().eval()
    ids, mask = torch.randint(1, 50, (2, 10)), torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    proto = export_onnx(model, None, (ids, mask))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    ids2, mask2 = torch.randint(1, 50, (3, 10)), torch.ones(3, 10, dtype=torch.long)
    mask2[0, 4:] = 0
    for xs in ((ids, mask), (ids2, mask2)):
        with torch.no_grad():
            want = model(*xs)
        got = session.run(None, {n: t.numpy() for n, t in zip(names, xs)})[0]
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


class IndexFromCounts(nn.Module):
    """k-diffusion's ``sigma_to_t``: the index of the last of a sorted table's entries below each sigma, from the
    running count of a bool mask (``dists.ge(0).cumsum(0).argmax(0)``), or of an int8/int32 one; a conv and
    BatchNorm to fold before it."""

    def __init__(self, dtype: torch.dtype = torch.bool) -> None:
        super().__init__()
        self.dtype = dtype
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.bn.running_mean.normal_(), self.bn.running_var.uniform_(0.5, 2)
        self.bn.weight.data.uniform_(0.5, 1.5), self.bn.bias.data.normal_()
        self.register_buffer("levels", torch.linspace(-4, 3, 50))

    def forward(self, x, sigma):
        counts = (sigma.log() - self.levels[:, None]).ge(0).to(self.dtype).cumsum(dim=0)
        index = counts.argmax(dim=0).clamp(max=self.levels.shape[0] - 2)
        return self.bn(self.conv(x)) * self.levels[index][:, None, None, None], counts


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.int32])
def test_a_cumsum_of_a_mask_is_summed_in_int64_in_the_file(dtype):
    """torch sums a bool (or other integer) tensor's ``cumsum`` in int64; the exporter wrote ``CumSum`` on the bool
    tensor itself, an invalid graph, and ``export_onnx`` refused the model ("does not run in onnxruntime").  The
    mask is cast to int64 first: the file runs, its counts are torch's (int64, equal), and its output is the
    model's at sigmas other than the example's."""
    model = IndexFromCounts(dtype).eval()
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0])
    fused = repalgebra.fuse(model, (x, sigma))
    proto = export_onnx(fused, None, (x, sigma))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for s in (sigma, torch.tensor([0.05, 12.0])):
        out, counts = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), (x, s))})
        with torch.no_grad():
            ref, ref_counts = model(x, s)
        assert counts.dtype == np.int64
        np.testing.assert_array_equal(counts, ref_counts.numpy())
        assert close(out, ref)  # float32, a folded conv: RTOL 1e-5


@pytest.mark.parametrize("model_type", [StreamingConv, StreamingBlock])
def test_a_cache_written_in_place_and_returned_exports(model_type):
    """``cache.copy_(...)`` of an input the model returns was refused: the exporter turns a ``copy_`` of a whole
    tensor into ``aten::copy``, which it cannot export ("UnsupportedOperatorError: Exporting the operator
    'aten::copy'").  It is traced as ``cache[:] = ...``, the same write; the file's outputs and new cache are the
    model's over two steps, each fed the cache the step before returned."""
    model = model_type().eval()
    gen = torch.Generator().manual_seed(0)
    xs, cache = [torch.randn(2, 4, generator=gen) for _ in range(2)], torch.randn(2, 4, 3, generator=gen)
    fused = repalgebra.fuse(model, (xs[0], cache.clone()))
    proto = export_onnx(fused, None, (xs[0], cache.clone()))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    file_cache, torch_cache = cache.numpy(), cache.clone()
    for x in xs:
        out, file_cache = session.run(None, {i.name: t for i, t in zip(session.get_inputs(), (x.numpy(), file_cache))})
        with torch.no_grad():
            ref, torch_cache = model(x, torch_cache)
        assert close(out, ref) and close(file_cache, torch_cache)  # float32, BatchNorm's division: RTOL 1e-5


class ClampedSkip(nn.Module):
    """A sanitizer kept whole that clamps its input in place only where something is out of range, its input read
    again by a skip after it."""

    class SafeClamp(nn.Module):
        def forward(self, x):
            if x.abs().amax() > 10:
                x.clamp_(-10, 10)
            return x * 2

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.clamp, self.conv1x1 = nn.Conv2d(4, 4, 3, padding=1), self.SafeClamp(), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.conv(x)
        return self.clamp(h) + (h + self.conv1x1(x))


def test_a_read_after_a_call_kept_whole_is_the_tensor_itself_and_a_write_on_other_inputs_is_refused():
    """``after_call`` (a read of ``x`` after a call kept whole, which may write into it) is ``x`` in the file: a
    call whose traced path writes nothing leaves it as it was.  One that writes on other inputs than the example
    branches on the values, which the file cannot: refused by name."""
    x = Graph.input("x", (2, 4, 5))
    call = opaque([x], torch.sin, (In(0),), torch.zeros(2, 4, 5), source="odd")
    after = Node.make("after_call", [x, call.out], source="")
    add = Node.make("add", [call.out, after.out], source="add")
    graph = Graph([x], [call, after, add], [add.out])
    proto = graph_to_onnx(graph)
    onnx.checker.check_model(proto, full_check=True)
    xb = torch.randn(3, 4, 5)
    assert close(run(proto, xb)[0], torch.sin(xb) + xb)
    with pytest.raises(FallbackError, match=r"export of clamp \(SafeClamp\) computes something else.*Python boolean"):
        export_onnx(ClampedSkip().eval(), None, torch.randn(1, 4, 8, 8))


class MessagePassing(nn.Module):
    """A pure-torch GNN layer (GIN/SAGE reimplementations): messages ``x[src]`` summed into their destination nodes
    with ``index_add_``, a Linear and BatchNorm1d to fold before it."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.channels = channels
        self.lin, self.bn = nn.Linear(channels, channels), nn.BatchNorm1d(channels)
        self.bn.running_mean.normal_(), self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x, edge_index):
        src, dst = edge_index[0], edge_index[1]
        msg = self.bn(self.lin(x))[src]
        return torch.zeros(x.size(0), self.channels).index_add_(0, dst, msg)


def test_message_passing_with_index_add_exports_and_sums_repeated_destinations():
    """``zeros.index_add_(0, dst, x[src])`` was refused: no lowering of ours, and torch.onnx.export's own refuses
    more edges than nodes ("duplicated values in 'index'").  It is written as ScatterElements(reduction="add"),
    which sums the messages of a node that receives several; the file is the model's at the example's edges and at
    others that all land on three nodes."""
    gen = torch.Generator().manual_seed(0)
    model = MessagePassing().eval()
    x, edges = torch.randn(10, 8, generator=gen), torch.randint(0, 10, (2, 30), generator=gen)
    proto = export_onnx(repalgebra.fuse(model, (x, edges)), None, (x, edges))
    assert any(n.op_type == "ScatterElements" for n in proto.graph.node)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    crowded = torch.stack([torch.randint(0, 10, (30,), generator=gen), torch.randint(0, 3, (30,), generator=gen)])
    for e in (edges, crowded):
        got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), (x, e))})[0]
        with torch.no_grad():
            assert close(got, model(x, e))  # float32, a folded BatchNorm: RTOL 1e-5


class NeighbourSum(nn.Module):
    """Per-sample node features ``(B, N, C)`` summed along a fixed graph (buffers with repeated destinations) on axis
    ``-2``, scaled by ``alpha``: in place, or functional with an int32 index."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(6)
        self.bn.running_mean.normal_(), self.bn.running_var.uniform_(0.5, 2)
        self.register_buffer("src", torch.tensor([0, 1, 2, 3, 4, 5, 5, 0, 2]))
        self.register_buffer("dst", torch.tensor([1, 1, 1, 0, 3, 3, 2, 2, 1]))

    def forward(self, x):
        h = self.bn(self.lin(x))[:, self.src]
        if self.how == "in place":
            return torch.zeros_like(x).index_add_(-2, self.dst, h, alpha=0.5)
        return torch.index_add(x, 1, self.dst.int(), h, alpha=-2)


@pytest.mark.parametrize("how", ["in place", "functional"])
def test_index_add_along_another_axis_with_alpha_keeps_the_batch_dynamic(how):
    """``index_add`` on axis -2 (or 1) with ``alpha``, where torch.onnx.export refuses ``alpha != 1``: the index is
    expanded along the batch and channels, and the file is the model's at batches other than the example's."""
    gen = torch.Generator().manual_seed(0)
    model = NeighbourSum(how).eval()
    proto = export_onnx(repalgebra.fuse(model, torch.randn(2, 6, 4, generator=gen)), None, torch.randn(2, 6, 4, generator=gen))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for b in (1, 2, 5):
        x = torch.randn(b, 6, 4, generator=gen)
        with torch.no_grad():
            assert close(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], model(x))


def test_a_probe_run_that_fails_prints_nothing(capfd):
    """The export's probes at other batches ran the fused GraphModule, whose ``x[src]`` indexes past the one node of
    a batch of 1; torch.fx printed its whole traceback to stderr ("Call using an FX-traced Module ... IndexError"),
    though the export handles the failure (the batch is fixed) and writes the file."""
    x, edges = torch.randn(10, 8), torch.randint(0, 10, (2, 30), generator=torch.Generator().manual_seed(0))
    fused = repalgebra.fuse(MessagePassing().eval(), (x, edges))
    capfd.readouterr()
    _, report = export_onnx(fused, None, (x, edges), return_report=True)
    assert not report.dynamic_batch
    assert capfd.readouterr().err == ""


def test_a_probe_keeps_what_a_run_that_returns_printed(capsys):
    """What a failing probe run printed is dropped; what a run that returns printed (a model's warnings) is not."""
    with probing():
        print("kept", file=sys.stderr)
    with pytest.raises(IndexError), probing():
        print("dropped", file=sys.stderr)
        torch.zeros(1)[torch.tensor([4])]
    assert capsys.readouterr().err == "kept\n"


@pytest.mark.parametrize("what", ["index_add", "bincount"])
def test_a_sum_over_repeated_indices_below_opset_16_is_refused_by_name(what):
    """Before opset 16 a ScatterElements has no reduction and keeps one of the entries of a repeated index."""
    gen = torch.Generator().manual_seed(0)
    x, edges = torch.randn(10, 8, generator=gen), torch.randint(0, 10, (2, 30), generator=gen)
    model, example = (MessagePassing().eval(), (x, edges)) if what == "index_add" else (CountsIds(), edges)
    with pytest.raises(FallbackError, match=rf"{what}.*opset 15.*opset 16 or higher"):
        export_onnx(model, None, example, opset=15)


class GraphMeanPool(nn.Module):
    """A graph readout: node features averaged per graph, the count of nodes per graph from ``torch.bincount`` of the
    batch vector (``minlength``: a graph may have no nodes), a Linear and BatchNorm1d to fold before it."""

    def __init__(self, graphs: int = 4) -> None:
        super().__init__()
        self.graphs = graphs
        self.lin, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)
        self.bn.running_mean.normal_(), self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x, batch):
        h = self.bn(self.lin(x))
        counts = torch.bincount(batch, minlength=self.graphs)
        sums = h.new_zeros(self.graphs, h.size(1)).index_add_(0, batch, h)
        return sums / counts.clamp(min=1).unsqueeze(1).to(h.dtype), counts


def test_a_mean_pool_with_bincount_exports_and_counts_other_batch_vectors():
    """``torch.bincount`` was refused (the exporter has no lowering for it).  It is a scatter_add of ones into as
    many zeros as torch gives, ``max(batch.max() + 1, minlength)``: the file's counts equal torch's at the example's
    batch vector and at others (a graph with no nodes, every node in one graph)."""
    gen = torch.Generator().manual_seed(0)
    model = GraphMeanPool().eval()
    x, batch = torch.randn(12, 8, generator=gen), torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3])
    proto = export_onnx(repalgebra.fuse(model, (x, batch)), None, (x, batch))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for b in (batch, torch.tensor([0] * 5 + [2] * 7), torch.zeros(12, dtype=torch.long)):
        means, counts = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), (x, b))})
        with torch.no_grad():
            ref_means, ref_counts = model(x, b)
        np.testing.assert_array_equal(counts, ref_counts.numpy())
        assert close(means, ref_means)  # float32, a folded BatchNorm: RTOL 1e-5


class CountsIds(nn.Module):
    def forward(self, ids):
        return torch.bincount(ids.flatten())  # as long as the largest id plus one


@pytest.mark.parametrize("minlength", [0, 3, 20])
def test_the_bincount_rewrite_is_exact(minlength):
    ids = torch.tensor([0, 2, 2, 7, 7, 7, 1, 0])
    assert torch.equal(_rewrite(torch.bincount)(ids, minlength=minlength, opset=20), torch.bincount(ids, minlength=minlength))


def test_a_bincount_exports_with_its_length_following_the_values():
    """Without ``minlength`` the count is as long as the largest id plus one: so is the file's, at other ids."""
    ids = torch.tensor([[0, 2, 2, 7], [7, 7, 1, 0]])
    proto = export_onnx(CountsIds(), None, ids)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for other in (ids, ids // 3, torch.tensor([[11, 0, 0, 0], [0, 0, 0, 0]])):
        np.testing.assert_array_equal(session.run(None, {session.get_inputs()[0].name: other.numpy()})[0],
                                      torch.bincount(other.flatten()).numpy())
