"""Python tests of sizes and sizes read as numbers, taken as at the example and checked on every call.

``if D > 3:`` (PointNet), ``int(c) ** -0.5`` (the Stable Diffusion VAE's attention), ``math.sqrt(x.shape[1])``:
torch.fx had no Python value to give, and the model went to torch.export with every size fixed.  The trace now
takes them as at the example, and the fused model checks them per call (:mod:`repalgebra.frontend.size_tests`).
Tolerances: float64 models, folded in float64, compared to 1e-9 relative.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

from repalgebra import fuse
from zoo import count_bn, seeded

D = torch.float64


def same(fused: nn.Module, model: nn.Module, *xs: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(fused(*xs), model(*xs), rtol=1e-9, atol=1e-12)


class PointFeatures(nn.Module):
    """PointNet's encoder (yanx27's): extra features past xyz split off where the input has them, ``if D > 3:``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv1d(6, 16, 1), nn.BatchNorm1d(16)

    def forward(self, x):
        B, D, N = x.size()
        h = F.relu(self.bn(self.conv(x)))
        if D > 3:
            xyz, extra = x[:, :3], x[:, 3:]
            return torch.cat([h, xyz * 2, extra], 1)
        return h


class VAEAttention(nn.Module):
    """The Stable Diffusion VAE's attention block (taming-transformers' AttnBlock): ``w_ * (int(c) ** -0.5)``, and
    the input's channel count read as a float (``math.sqrt``)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(2, c)
        self.q, self.k, self.v = (nn.Conv2d(c, c, 1) for _ in range(3))
        self.out = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)
        w_ = torch.bmm(q, k.reshape(b, c, hh * ww)) * (int(c) ** (-0.5))
        h = torch.bmm(v.reshape(b, c, hh * ww), F.softmax(w_, dim=2).permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.out(h) * math.sqrt(x.shape[1])


@pytest.mark.parametrize("make, example, others", [
    (PointFeatures, (2, 6, 32), [(3, 6, 32), (1, 6, 50)]),
    (VAEAttention, (2, 8, 6, 6), [(3, 8, 5, 7), (1, 8, 4, 4)]),
])
def test_a_test_of_sizes_is_taken_as_at_the_example_and_the_rest_stays_free(make, example, others):
    """The channel count is the same for every input: the fused model runs at any batch and length, as the model."""
    model = seeded(make, 0)().to(D)
    fused = fuse(model, torch.randn(*example, dtype=D))
    assert fused.fuse_report.capture == "fx" and count_bn(fused) == 0, str(fused.fuse_report)
    assert any("taken as at the example" in n and "sizes answer otherwise" in n for n in fused.fuse_report.notes)
    for shape in others:
        same(fused, model, torch.randn(*shape, dtype=D))


class PoolsWide(nn.Module):
    """A branch on the input's width: pooled where it is wider than 12."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        y = self.body(x)
        if x.shape[-1] > 12:
            y = F.avg_pool2d(y, 2)
        return y


def test_inputs_whose_sizes_take_the_other_branch_are_refused_by_name():
    """The fused graph holds the example's branch only: a call whose sizes answer otherwise raises, naming the test,
    rather than compute the pooled branch where the model does not pool."""
    model = seeded(PoolsWide, 0)().to(D)
    fused = fuse(model, torch.randn(2, 3, 16, 16, dtype=D))
    assert fused.fuse_report.capture == "fx", str(fused.fuse_report)
    same(fused, model, torch.randn(3, 3, 14, 20, dtype=D))
    with pytest.raises(ValueError, match=r"a Python test of sizes gave True at the example input.*these inputs give False"):
        fused(torch.randn(1, 3, 8, 8, dtype=D))


class ScalesIntegerImages(nn.Module):
    """An image model that takes uint8 images too (``if not x.is_floating_point(): x = x.float().div(255)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        if not x.is_floating_point():
            x = x.float().div(255)
        return self.body(x)


def test_a_test_of_a_dtype_is_named_as_such_where_a_call_answers_otherwise():
    """Fused at a float image, the graph holds that branch only: a uint8 image is refused, and the refusal says a test
    of sizes or dtypes answered otherwise (it said "a test of sizes", naming no dtype; review R16a)."""
    model = seeded(ScalesIntegerImages, 0)().eval()
    fused = fuse(model, torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"a Python test of sizes or dtypes gave True at the example input.*give False"):
        fused(torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8))


class PoolsWideInside(PoolsWide):
    """The same branch on the width of a value computed inside (a strided conv's output)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        y = self.body(x)
        if y.shape[-1] > 6:
            y = F.avg_pool2d(y, 2)
        return y


def test_a_test_of_a_strided_convs_size_is_read_from_the_inputs():
    """A strided conv's width is ``(W + 2 - 3) // 2 + 1`` of its input's: the test reads that per call (it sent the
    model to torch.export with every size fixed before).  The fused model runs at other sizes giving the same
    answer, and refuses by name those giving the other."""
    model = seeded(PoolsWideInside, 0)().to(D)
    fused = fuse(model, torch.randn(2, 3, 16, 16, dtype=D))
    assert fused.fuse_report.capture == "fx" and count_bn(fused) == 0, str(fused.fuse_report)
    for shape in [(2, 3, 16, 16), (1, 3, 13, 14), (3, 3, 9, 40)]:
        same(fused, model, torch.randn(shape, dtype=D))
    with pytest.raises(ValueError, match=r"a Python test of sizes gave True at the example input.*these inputs give False"):
        fused(torch.randn(2, 3, 16, 12, dtype=D))  # a width of 6 after the conv


class PoolsWideAfterSlice(PoolsWideInside):
    """The branch on the width of a slice of a conv's output, whose size nothing reads from the inputs."""

    def forward(self, x):
        y = self.body(x)[..., 1:]
        if y.shape[-1] > 6:
            y = F.avg_pool2d(y, 2)
        return y


def test_a_test_of_a_size_computed_inside_is_not_taken():
    """The fused graph's checks read its inputs: a test of the size of a value computed inside, which no producer
    fixes from the inputs (a slice's), cannot be made per call, so the trace does not take it, and the model is
    captured at its example's sizes as before."""
    model = seeded(PoolsWideAfterSlice, 0)().to(D)
    fused = fuse(model, torch.randn(2, 3, 16, 16, dtype=D))
    assert "tests the size of a value computed inside the model" in str(fused.fuse_report), str(fused.fuse_report)
    same(fused, model, torch.randn(2, 3, 16, 16, dtype=D))
    with pytest.raises(ValueError):
        fused(torch.randn(2, 3, 8, 8, dtype=D))


class BidirectionalLSTM(nn.Module):
    """crnn.pytorch's recurrent head: ``T, b, h = recurrent.size()``, a Linear over ``view(T * b, h)``."""

    def __init__(self, n_in: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(n_in, hidden, bidirectional=True)
        self.embedding = nn.Linear(hidden * 2, n_out)

    def forward(self, input):
        recurrent, _ = self.rnn(input)
        T, b, h = recurrent.size()
        output = self.embedding(recurrent.view(T * b, h))
        return output.view(T, b, -1)


class CRNN(nn.Module):
    """crnn.pytorch's text recognizer at small width: 3x3 convs, 2x2 pools, then pools of stride (2, 1) and a 2x2
    conv without padding bring a 32-pixel height to 1, which ``forward`` asserts; the width is the text's length."""

    def __init__(self, nc: int = 1, nclass: int = 11, nh: int = 16) -> None:
        super().__init__()
        ks, ps, nm = [3, 3, 3, 3, 3, 3, 2], [1, 1, 1, 1, 1, 1, 0], [8, 16, 32, 32, 64, 64, 64]
        cnn = nn.Sequential()

        def conv_relu(i: int, batch_normalization: bool = False) -> None:
            cnn.add_module(f"conv{i}", nn.Conv2d(nc if i == 0 else nm[i - 1], nm[i], ks[i], 1, ps[i]))
            if batch_normalization:
                cnn.add_module(f"batchnorm{i}", nn.BatchNorm2d(nm[i]))
            cnn.add_module(f"relu{i}", nn.ReLU(True))

        conv_relu(0)
        cnn.add_module("pooling0", nn.MaxPool2d(2, 2))
        conv_relu(1)
        cnn.add_module("pooling1", nn.MaxPool2d(2, 2))
        conv_relu(2, True)
        conv_relu(3)
        cnn.add_module("pooling2", nn.MaxPool2d((2, 2), (2, 1), (0, 1)))
        conv_relu(4, True)
        conv_relu(5)
        cnn.add_module("pooling3", nn.MaxPool2d((2, 2), (2, 1), (0, 1)))
        conv_relu(6, True)
        self.cnn = cnn
        self.rnn = nn.Sequential(BidirectionalLSTM(64, nh, nh), BidirectionalLSTM(nh, nh, nclass))

    def forward(self, input):
        conv = self.cnn(input)
        b, c, h, w = conv.size()
        assert h == 1, "the height of conv must be 1"
        conv = conv.squeeze(2)
        conv = conv.permute(2, 0, 1)  # [w, b, c]
        return self.rnn(conv)


def test_crnns_height_assert_after_its_convs_and_pools_is_checked_on_the_inputs_height():
    """CRNN's ``assert h == 1`` on its last conv's height sent the model to torch.export with the width fixed too:
    every text line of another length was refused.  The height after convs and pools is read from the input's per
    call, so the fused model runs at any width and batch.  (Its height stays the example's: the original refused
    the other heights fuse tried, so no check ran there; a height the original asserts on is refused by name.)"""
    model = seeded(CRNN, 0)().to(D)
    fused = fuse(model, torch.randn(2, 1, 32, 100, dtype=D))
    assert fused.fuse_report.capture == "fx" and count_bn(fused) == 0, str(fused.fuse_report)
    for shape in [(2, 1, 32, 100), (1, 1, 32, 37), (3, 1, 32, 257)]:
        same(fused, model, torch.randn(shape, dtype=D))
    with pytest.raises(AssertionError):
        model(torch.randn(1, 1, 64, 100, dtype=D))
    with pytest.raises(ValueError, match=r"a Python test of sizes gave True at the example input.*these inputs give False"):
        fused(torch.randn(1, 1, 64, 100, dtype=D))


@settings(max_examples=200)
@example(size=5, kernel=2, stride=2, dilation=1, pads=(1, 1), op="max", ceil=True)  # the last window would start in the padding
@example(size=6, kernel=3, stride=2, dilation=1, pads=(0, 0), op="avg", ceil=True)  # rounded up
@example(size=7, kernel=2, stride=1, dilation=3, pads=(2, 0), op="conv", ceil=False)
@given(size=st.integers(1, 40), kernel=st.integers(1, 5), stride=st.integers(1, 3), dilation=st.integers(1, 3),
       pads=st.tuples(st.integers(0, 3), st.integers(0, 3)), op=st.sampled_from(["conv", "max", "avg"]), ceil=st.booleans())
def test_window_size_is_torchs_output_size(size, kernel, stride, dilation, pads, op, ceil):
    """``window_size`` (the size a test of a conv's or pool's output reads per call) is the size torch's op gives, where
    it runs; pools pad both sides alike (at most half their kernel), and only they round up."""
    from repalgebra.frontend.shapes import window_size

    x = torch.zeros(1, 1, size, 1)
    before, after = (pads[0], pads[0]) if op != "conv" else pads
    try:
        if op == "conv":
            y = F.conv2d(F.pad(x, (0, 0, before, after)), torch.zeros(1, 1, kernel, 1), stride=(stride, 1), dilation=(dilation, 1))
            ceil = False
        elif op == "max":
            y = F.max_pool2d(x, (kernel, 1), (stride, 1), (before, 0), (dilation, 1), ceil_mode=ceil)
        else:
            dilation = 1
            y = F.avg_pool2d(x, (kernel, 1), (stride, 1), (before, 0), ceil_mode=ceil)
    except RuntimeError:
        return  # (torch refuses the window: nothing to read)
    assert window_size(size, kernel, stride, dilation, before, after, ceil) == y.shape[2]


class GridGate3d(nn.Module):
    """Oktay's 3-D attention gate: ``assert batch_size == g.size(0)`` on conv outputs, with a strided conv and a
    transposed one (``g``'s batch is ``x``'s, whatever the volume's size; ``e``'s depth too)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4), nn.ReLU(inplace=True))
        self.down = nn.Conv3d(4, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose3d(4, 8, 2, stride=2)

    def forward(self, x):
        e = self.enc(x)
        g = self.down(e)
        batch_size, channels = e.size()[0], self.up(g).size(1)
        assert batch_size == g.size(0) and channels == 2 * e.size(1) and e.size(-1) == x.size(-1)
        return g


def test_a_test_of_a_3d_conv_output_reads_its_batch_from_the_input():
    """A 3-D conv's batch and channels are its input's and its weight's, as a 2-D conv's: the test was taken as
    one of a size computed inside, and the model went to torch.export with its volume fixed (found by a probe)."""
    model = seeded(GridGate3d, 0)().to(D)
    fused = fuse(model, torch.randn(2, 2, 8, 8, 8, dtype=D))
    assert fused.fuse_report.capture == "fx" and count_bn(fused) == 0, str(fused.fuse_report)
    same(fused, model, torch.randn(3, 2, 12, 10, 6, dtype=D))


class SumThenTest(nn.Module):
    """A test of the size of a sum, which broadcasts where the inputs' batches differ (1 and 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x, z):
        y = self.bn(self.lin(x)) + z
        return y * 2 if y.shape[0] > 3 else y - 1


def test_the_size_of_a_sum_is_not_read_from_its_first_input():
    """Equal shapes at the example do not make a sum's size its first input's: at x 1x4 and z 5x4 it is 5.  The
    check read x's batch, passed, and the fused model took the example's branch, 4.5 off (found by a review)."""
    model = seeded(SumThenTest, 0)().to(D)
    fused = fuse(model, (torch.randn(2, 4, dtype=D), torch.randn(2, 4, dtype=D)))
    x, z = torch.randn(1, 4, dtype=D), torch.randn(5, 4, dtype=D)
    with pytest.raises(ValueError, match="(?i)fuse (the model )?again"):
        fused(x, z)


class BatchBranch(nn.Module):
    """A branch on the batch: more than 2 rows, or at most 8 (which the example's batch plus one and batch 1 both
    answer as the example does)."""

    def __init__(self, test: str) -> None:
        super().__init__()
        self.test, self.conv, self.bn = test, nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * 2 if (x.shape[0] > 2 if self.test == "more" else x.shape[0] <= 8) else y - 1


@pytest.mark.parametrize("test", ["more", "at_most"])
def test_an_onnx_file_of_a_model_that_tests_its_batch_has_the_batch_fixed(test):
    """A file cannot make the checks the fused model makes: with a free batch it computed the example's branch at
    every batch, 2.9 off at batch 4; ``x.shape[0] <= 8`` holds at batches 1 and 4 too, and the file was 1.2 off at
    batch 10 (found by two reviews).  Where a check reads the batch at all, the file's batch is fixed."""
    import onnxruntime as ort

    from repalgebra import export_onnx

    model = seeded(BatchBranch, 0, test=test)()
    x = torch.randn(2 if test == "more" else 3, 3, 8, 8)
    for target in (model, fuse(model, x)):
        proto, report = export_onnx(target, None, x, return_report=True)
        assert not report.dynamic_batch and any("tests a size that follows the batch" in n for n in report.notes), report
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]),
                                       model(x), rtol=1e-5, atol=1e-5)  # (float32)
    proto, report = export_onnx(seeded(PointFeatures, 0)(), None, torch.randn(2, 6, 32), return_report=True)
    assert report.dynamic_batch, report  # a test of the channels, which no batch changes


class SlicedShapeTest(nn.Module):
    """A test of sizes unpacked from a slice of the shape: segmentation_models_pytorch's input check
    (``h, w = x.shape[-2:]``), or the batch from the first two (``b, c = x.shape[:2]``)."""

    def __init__(self, reads: str) -> None:
        super().__init__()
        self.reads, self.conv, self.bn = reads, nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.reads == "height-width":
            h, w = x.shape[-2:]
            if h % 4 != 0 or w % 4 != 0:
                raise RuntimeError(f"Wrong input shape height={h}, width={w}")
            return y
        b, _ = x.shape[:2]
        return y * 2 if b > 2 else y - 1


@pytest.mark.parametrize("reads", ["height-width", "batch"])
def test_an_onnx_files_batch_is_free_where_a_test_reads_sizes_after_it_through_a_slice(reads):
    """``x.shape[-2:]`` was read as the whole shape, batch included, so every smp model's file had its batch fixed
    (found by a probe); a slice that holds the batch still fixes it."""
    from repalgebra import export_onnx

    model = seeded(SlicedShapeTest, 0, reads=reads)()
    x = torch.randn(2, 3, 8, 8)
    fused = fuse(model, x)
    assert fused.fuse_report.capture == "fx", str(fused.fuse_report)
    proto, report = export_onnx(fused, None, x, return_report=True)
    assert report.dynamic_batch == (reads == "height-width"), report


class DictInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, d):
        y = self.bn(self.conv(d["a"]))
        return y * 2 if d["b"].shape[0] > 2 else y - 1


def test_a_test_of_sizes_of_an_item_of_a_dict_input_is_checked():
    """fuse raised IndexError writing the check into the graph of a model that takes a dict (found by a review)."""
    model = seeded(DictInput, 0)().to(D)
    fused = fuse(model, ({"a": torch.randn(2, 3, 8, 8, dtype=D), "b": torch.randn(2, 3, dtype=D)},))
    d = {"a": torch.randn(3, 3, 6, 6, dtype=D), "b": torch.randn(1, 3, dtype=D)}
    same(fused, model, d)
    with pytest.raises(ValueError, match="gave False at the example input"):
        fused({"a": torch.randn(2, 3, 8, 8, dtype=D), "b": torch.randn(4, 3, dtype=D)})


class ChunkCount(nn.Module):
    """``len(y.chunk(4, -1))``: torch makes 3 pieces of a length of 6, 2 of 5, 3 of 9."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv1d(3, 3, 1), nn.BatchNorm1d(3)

    def forward(self, x):
        pieces = self.bn(self.conv(x)).chunk(4, -1)
        return torch.cat(pieces, -1) / len(pieces)


def test_the_number_of_pieces_of_a_chunk_is_no_constant():
    """``len()`` of a chunk was taken as the 4 the call asks for, unchecked: the fused model divided by 4 where the
    model divides by 3 (found by a review).  It is torch's count at the example, checked per call (or the model
    is captured at its example's sizes): never the example's count at another length."""
    model = seeded(ChunkCount, 0)().to(D)
    fused = fuse(model, torch.randn(2, 3, 8, dtype=D))
    same(fused, model, torch.randn(3, 3, 8, dtype=D))
    for length in (5, 6, 9):
        x = torch.randn(2, 3, length, dtype=D)
        try:
            got = fused(x)
        except ValueError:
            continue  # refused by name
        torch.testing.assert_close(got, model(x), rtol=1e-9, atol=1e-12)


class PerGraph(nn.Module):
    """DGL-style batches of equal-size graphs: node embeddings of the whole batch returned per graph, ``h.split(n)``."""

    def __init__(self, nodes_per_graph: int = 4) -> None:
        super().__init__()
        self.n = nodes_per_graph
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8))

    def forward(self, x):
        return self.net(x).split(self.n)


class PerSample(nn.Module):
    """A per-environment policy head returning one tensor per sample, ``logits.unbind(0)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x).unbind(0)


@pytest.mark.parametrize("cls", [PerGraph, PerSample])
def test_a_returned_split_or_unbind_is_never_the_examples_number_of_pieces(cls):
    """``return h.split(k)`` / ``x.unbind(0)`` returned the example's 3 pieces at every size: 2 of the 5 dropped at
    20 rows, empty pieces at 4 rows, an IndexError at a batch of 2 (found by a probe).  Each call now gives the
    model's pieces or is refused by name."""
    model = seeded(cls, 0)().to(D)
    fused = fuse(model, torch.randn(12 if cls is PerGraph else 3, 6, dtype=D))
    same(fused, model, torch.randn(12 if cls is PerGraph else 3, 6, dtype=D))
    for rows in ((20, 4, 13) if cls is PerGraph else (5, 2)):
        x = torch.randn(rows, 6, dtype=D)
        with pytest.raises(ValueError, match="pieces at size"):
            fused(x)


@pytest.mark.parametrize("cls, rows", [(PerGraph, 12), (PerSample, 1), (PerGraph, 1)], ids=["split-12", "unbind-1", "split-1"])
def test_export_of_a_returned_split_never_returns_the_examples_number_of_pieces(tmp_path, cls, rows):
    """The file declared a dynamic batch and 3 outputs: at 20 rows it returned 3 pieces of the model's 5 (found
    by a probe).  Now its batch is fixed, also where the example is one piece, which batch 1 cannot tell (a batch
    one larger: the graph refuses it, or gives as many pieces of 2 rows)."""
    import onnxruntime as ort

    import repalgebra

    model = seeded(cls, 0)()
    x = torch.randn(rows, 6)
    repalgebra.export_onnx(fuse(model, x), str(tmp_path / "m.onnx"), x)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    assert len(session.run(None, {name: x.numpy()})) == len(model(x))
    for rows in (20, 4):
        with pytest.raises(Exception, match="dimensions"):
            session.run(None, {name: torch.randn(rows, 6).numpy()})


class LastStep(nn.Module):
    """A session encoder's last time step, as GRU4Rec-style recommenders take it: ``out.unbind(1)[-1]``,
    ``out.split(1, dim=1)[-1]``, or the last pair of steps, ``out.split(2, dim=1)[-1]``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))

    def forward(self, x):
        out = torch.tanh(self.conv(x)).transpose(1, 2)  # (B, T, C)
        if self.how == "unbind":
            last = out.unbind(1)[-1]
        elif self.how == "split":
            last = out.split(1, dim=1)[-1].squeeze(1)
        else:
            last = out.split(2, dim=1)[-1].mean(1)
        return self.head(last)


@pytest.mark.parametrize("how", ["unbind", "split", "split2"])
def test_the_last_piece_of_a_split_is_the_last_at_every_length(how):
    """``parts[-1]`` was resolved at the traced length: fused at 6 steps and called with 9, the model read step 5
    instead of 8 (0.138 off), and a mean over an empty slice gave NaN at 4 steps (found by a probe).  The last step
    is now read at every length; the last pair of steps, whose place follows the length, is refused elsewhere."""
    model = seeded(LastStep, 0, how=how)().to(D)
    fused = fuse(model, torch.randn(3, 4, 6, dtype=D))
    for length in (6, 9, 4, 5):
        x = torch.randn(3, 4, length, dtype=D)
        if how == "split2" and length != 6:
            with pytest.raises(ValueError, match="pieces at size|input shapes fixed"):
                fused(x)
        else:
            same(fused, model, x)


class SecondHalf(nn.Module):
    """``x.split(3, -1)[1]``: the second of the example's three pieces of 8 steps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv1d(3, 3, 1), nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.conv(x)).split(3, -1)[1] * 2


def test_a_piece_of_a_split_the_axis_is_too_short_for_is_refused():
    """At 3 steps the model's ``split(3, -1)`` has no second piece and torch raises IndexError; the fused model
    returned an empty tensor."""
    model = seeded(SecondHalf, 0)().to(D)
    fused = fuse(model, torch.randn(2, 3, 8, dtype=D))
    same(fused, model, torch.randn(2, 3, 6, dtype=D))
    with pytest.raises(IndexError):
        model(torch.randn(2, 3, 3, dtype=D))
    with pytest.raises(ValueError, match="pieces at size 3"):
        fused(torch.randn(2, 3, 3, dtype=D))


def test_the_second_of_two_pieces_read_alone_is_the_models_at_other_lengths():
    """``x.split(3, -1)[1]`` fused at 6 steps (two pieces) was taken for the last piece of an unpacking and refused
    9 and 12 steps ("gives 3 pieces"), which the model runs: steps 3:6 at every length of 4 steps or more (found by
    a review).  Read alone, a piece is the model's at every length that has it."""
    model = seeded(SecondHalf, 0)().to(D)
    fused = fuse(model, torch.randn(2, 3, 6, dtype=D))
    for length in (6, 9, 12, 4):
        same(fused, model, torch.randn(2, 3, length, dtype=D))
    with pytest.raises(ValueError, match="pieces at size 3"):
        fused(torch.randn(2, 3, 3, dtype=D))
    model = seeded(UnpackedHalves, 0)().to(D)  # both pieces read: at 9 steps the model's unpacking fails
    fused = fuse(model, torch.randn(2, 3, 6, dtype=D))
    with pytest.raises(ValueError, match="too many values to unpack"):
        model(torch.randn(2, 3, 9, dtype=D))
    with pytest.raises(ValueError, match="pieces at size 9"):
        fused(torch.randn(2, 3, 9, dtype=D))


class UnpackedHalves(SecondHalf):
    """``a, b = x.split(3, -1)``: both pieces read, as many as at the example."""

    def forward(self, x):
        a, b = self.bn(self.conv(x)).split(3, -1)
        return a + b * 2


def test_torch_jit_trace_records_a_fused_model_with_a_size_test():
    """Under torch.jit.trace sizes are tensors, and the per-call check of ``if D > 3:`` failed inside TorchScript
    ("no op for aten::ne ... Tensor, bool"; found by a probe).  The trace records one call at its input's sizes,
    as it does of the model."""
    model = seeded(PointFeatures, 0)().to(D)
    x = torch.randn(2, 6, 32, dtype=D)
    traced = torch.jit.trace(fuse(model, x), x)
    same(traced, model, x)


class TutorialAttention(nn.Module):
    """Attention as tutorials write its scale: ``torch.sqrt(torch.tensor(d_k, dtype=torch.float32))`` of
    ``d_k = q.size(-1)``, the width of a conv's output flattened and transposed."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.q, self.k, self.v = (nn.Conv2d(c, c, 1) for _ in range(3))

    def forward(self, x):
        x = self.stem(x)
        B, C, H, W = x.shape
        q, k, v = (m(x).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))
        d_k = q.size(-1)
        attn = F.softmax(q @ k.transpose(-2, -1) / torch.sqrt(torch.tensor(d_k, dtype=torch.float64)), dim=-1)
        return x + (attn @ v).transpose(1, 2).reshape(B, C, H, W)


def test_a_tensor_made_of_a_size_is_taken_as_at_the_example():
    """torch itself cannot read a proxy: ``torch.tensor(d_k)`` stopped fx, and the model went to torch.export with
    every size fixed (found by a probe).  The size is read through the transpose and the flatten to the conv's
    weight: the same for every input, and the model runs at any size."""
    model = seeded(TutorialAttention, 0)().to(D)
    fused = fuse(model, torch.randn(2, 3, 6, 6, dtype=D))
    assert fused.fuse_report.capture == "fx" and count_bn(fused) == 0, str(fused.fuse_report)
    same(fused, model, torch.randn(3, 3, 5, 7, dtype=D))


class ScaledByItsWidth(nn.Module):
    """``torch.tensor(x.shape[-1], dtype=x.dtype)``: a size of the input, recorded by fx as a call per call."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.body(x) / torch.tensor(x.shape[-1], dtype=x.dtype, device=x.device)


def test_a_tensor_of_an_input_size_with_a_traced_dtype_stays_per_call():
    model = seeded(ScaledByItsWidth, 0)().to(D)
    fused = fuse(model, torch.randn(2, 3, 6, 6, dtype=D))
    assert fused.fuse_report.capture == "fx", str(fused.fuse_report)
    same(fused, model, torch.randn(3, 3, 5, 9, dtype=D))


class EmptyChecked(nn.Module):
    """detectron2's ``Conv2d`` wrapper: ``if x.numel() == 0 and self.training:`` before every conv, of values the
    model computes (after a stride-2 conv, whose sizes the inputs do not fix)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        y = torch.relu(self.bn_a(self.a(x)))
        if y.numel() == 0 and self.training:
            raise RuntimeError("empty input in training")
        return self.bn_b(self.b(y))


def test_a_test_whether_a_computed_value_is_empty_is_read_from_the_inputs():
    """``y.numel() == 0`` of a value computed inside stopped fx, and torch.export fixed every size: the fused
    detector refused other image sizes (found by a probe).  A value computed by convs, norms and activations is
    empty exactly where an input is: the test reads the inputs' sizes, checked per call."""
    model = seeded(EmptyChecked, 0)().to(D)
    fused = fuse(model, torch.randn(1, 3, 16, 16, dtype=D))
    assert fused.fuse_report.capture == "fx" and fused.fuse_report.fired, str(fused.fuse_report)
    with torch.no_grad():
        for shape in ((2, 3, 24, 32), (1, 3, 9, 7)):
            x = torch.randn(*shape, dtype=D)
            torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):  # an empty batch answers the test otherwise: refused, as taken at the example
        fused(torch.randn(0, 3, 16, 16, dtype=D))


class SliceEmptied(nn.Module):
    """A slice can empty a value its input fills: ``y[:, :, k:]`` is empty where the map is ``k`` rows or fewer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))[:, :, 6:]
        return y.sum() * 0 + 1 if y.numel() == 0 else y.mean((2, 3))


def test_a_slice_that_empties_a_value_keeps_its_emptiness_test_unread():
    """Read from the inputs, the test would take the example's branch at 6 rows, where the model takes the other."""
    model = seeded(SliceEmptied, 0)().to(D)
    fused = fuse(model, torch.randn(1, 3, 8, 8, dtype=D))
    with torch.no_grad():
        x = torch.randn(1, 3, 6, 8, dtype=D)
        try:
            got = fused(x)
        except ValueError:
            return  # fixed at the example's sizes, and refused
        torch.testing.assert_close(got, model(x), rtol=1e-12, atol=1e-12)


class TimeEmbeddedUpsample(nn.Module):
    """diffusers' ResnetBlock2D time-embedding sum, then Upsample2D's test of the sum's batch (``if
    hidden_states.shape[0] >= 64:``; here a branch that changes the result, at 4, so a wrong check shows)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv, self.bn, self.temb = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.Linear(8, c)
        self.up = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, emb):
        h = self.bn(self.conv(x)) + self.temb(emb)[:, :, None, None]
        if h.shape[0] >= 4:
            h = h * 2
        return self.up(F.interpolate(h, scale_factor=2.0, mode="nearest"))


def test_a_test_of_the_batch_of_a_broadcast_sum_reads_both_inputs_batches():
    """The batch of ``h + temb[:, :, None, None]`` is the batch of ``x`` or of ``emb``, whichever is not 1.  The test
    was refused as one of a value computed inside, and the model went to torch.export with every size fixed: 16x16
    refused.  Now the check reads both batches: 16x16 runs, and a call of x's batch 1 with emb's batch 4, whose sum
    has batch 4 and takes the other branch, is refused (read from x alone, the check passed and the result was off
    by the factor 2)."""
    model = seeded(TimeEmbeddedUpsample, 0)().to(D)
    fused = fuse(model, (torch.randn(2, 3, 8, 8, dtype=D), torch.randn(2, 8, dtype=D)))
    assert fused.fuse_report.capture == "fx" and count_bn(fused) == 0, str(fused.fuse_report)
    same(fused, model, torch.randn(2, 3, 16, 16, dtype=D), torch.randn(2, 8, dtype=D))
    same(fused, model, torch.randn(1, 3, 12, 12, dtype=D), torch.randn(2, 8, dtype=D))
    with pytest.raises(ValueError, match="these inputs give True"):
        fused(torch.randn(1, 3, 8, 8, dtype=D), torch.randn(4, 8, dtype=D))


class ResidualThenChannelAssert(nn.Module):
    """guided-diffusion's ResBlock (``skip(x) + h``) then its Downsample's ``assert x.shape[1] == self.channels``."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem, self.conv, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.channels, self.down = c, nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.bn(self.conv(x))
        assert x.shape[1] == self.channels
        return self.down(x)


def test_a_channel_assert_after_a_residual_sum_is_taken():
    """A sum with a conv's output has the conv's channels at every input size (a broadcast only stretches a 1).  The
    assert was refused as a test of a value computed inside, and the model went to torch.export with 16x16 fixed:
    32x32 refused.  Now the test reads the convs' channels, needs no check, and the model runs at any size."""
    model = seeded(ResidualThenChannelAssert, 0)().to(D)
    fused = fuse(model, torch.randn(2, 3, 16, 16, dtype=D))
    assert fused.fuse_report.capture == "fx" and count_bn(fused) == 0, str(fused.fuse_report)
    same(fused, model, torch.randn(3, 3, 32, 24, dtype=D))


class DeepResidualThenBatchTest(nn.Module):
    """Twelve ``x = x + bn(conv(x))`` blocks, then a test of the batch (as diffusers' Upsample2D makes at the
    end of a UNet's stage)."""

    def __init__(self, depth: int = 12) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)) for _ in range(depth))

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return x * 2 if x.shape[0] >= 4 else x


def test_the_batch_of_a_deep_residual_sum_is_read_once_per_sum(monkeypatch):
    """Both inputs of ``x + f(x)`` lead back to the sum before: read per path, the batch of the last of 12 sums took
    12,286 reads of a producer (2 ** depth: a stage of 30 blocks did not end).  Each sum's size is read once, and the
    check reads the input's batch."""
    import repalgebra.frontend.builder as builder

    calls = []
    counted = builder.size_source

    def size_source(v, axis):
        calls.append(axis)
        return counted(v, axis)

    monkeypatch.setattr(builder, "size_source", size_source)
    model = seeded(DeepResidualThenBatchTest, 0)().to(D)
    fused = fuse(model, torch.randn(2, 3, 6, 6, dtype=D))
    assert fused.fuse_report.capture == "fx" and count_bn(fused) == 0, str(fused.fuse_report)
    assert len(calls) < 200, len(calls)  # (about 4 per block; 3 * 2 ** 12 without it)
    same(fused, model, torch.randn(3, 3, 10, 8, dtype=D))
    with pytest.raises(ValueError, match="these inputs give True"):
        fused(torch.randn(4, 3, 6, 6, dtype=D))


class ClampsOnCpu(nn.Module):
    """Two conv+BN branches after a numerical guard the model makes on the CPU only (``if x.device.type ==
    "cpu":``), as models written for several back ends do."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))

    def forward(self, x):
        if x.device.type == "cpu":
            x = x.clamp(-1.0, 1.0)
        return self.a(x) + self.b(x)


class SelfAttendsWhenSame(ClampsOnCpu):
    """Older attention code's aliasing test: one input for both branches where the query *is* the key."""

    def forward(self, q, k):
        if q.data_ptr() == k.data_ptr():
            return self.a(q) + self.b(q)
        return self.a(q) + self.b(k)


class LayerNorm2d(nn.LayerNorm):
    """timm's older LayerNorm2d: one function, two implementations chosen by the input's layout."""

    def forward(self, x):
        if x.is_contiguous():
            y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
            return y.permute(0, 3, 1, 2)
        u = x.mean(1, keepdim=True)
        v = (x - u).pow(2).mean(1, keepdim=True)
        return (x - u) * torch.rsqrt(v + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


class NormedStem(ClampsOnCpu):
    def __init__(self) -> None:
        super().__init__()
        self.norm = LayerNorm2d(4)

    def forward(self, x):
        x = self.norm(x)
        return self.a(x) + self.b(x)


def test_an_onnx_file_holds_the_branch_of_a_device_test_the_example_takes():
    """``x.device.type`` and ``data_ptr()`` were answered on meta tensors (device 'meta', every pointer 0) and taken as
    a test of sizes: the file left out the clamp the model makes on the CPU it was exported on (5.1 off for inputs
    past it), and took the aliasing branch for two distinct inputs (2.3 off; found by a review)."""
    import onnxruntime as ort

    from repalgebra import export_onnx

    def run(proto, *xs):
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), xs)})[0])

    model = seeded(ClampsOnCpu, 0)()
    x = torch.randn(2, 4, 6, 6) * 3
    with torch.no_grad():
        torch.testing.assert_close(run(export_onnx(model, None, x * 0.03), x), model(x), rtol=1e-5, atol=1e-5)
    model = seeded(SelfAttendsWhenSame, 0)()
    q, k = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(run(export_onnx(model, None, (q, q.clone())), q, k), model(q, k), rtol=1e-5, atol=1e-5)


def test_a_test_of_an_inputs_device_is_taken_as_the_example_answers_it_and_checked():
    """The fused model checked the meta tensor's answer (not on the CPU) and refused its own example, calling it "a
    Python test of sizes" (found by a review).  The example's device answers it; an input elsewhere is refused by
    name."""
    model = seeded(ClampsOnCpu, 0)().to(D)
    x = torch.randn(2, 4, 6, 6, dtype=D)
    fused = fuse(model, x)
    assert fused.fuse_report.capture == "fx" and count_bn(fused) == 0, str(fused.fuse_report)
    same(fused, model, x)
    same(fused, model, torch.randn(3, 4, 9, 7, dtype=D) * 3)
    with pytest.raises(ValueError, match="a Python test of an input's device gave True"):
        fused(x.to("meta"))


class ClampsWhenMade(nn.Module):
    """A conv+BN whose output is clamped on a test of how its input was made: ``if x.requires_grad:`` (a path kept
    for saliency maps and attacks), ``if x.storage_offset() == 0:``, ``if x.is_leaf:``."""

    def __init__(self, read: str) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.read = read

    def forward(self, x):
        y = self.a(x)
        if self.read == "requires_grad" and x.requires_grad:
            y = y.clamp(-0.1, 0.1)
        if self.read == "storage_offset" and x.storage_offset() == 0:
            y = y.clamp(-0.1, 0.1)
        if self.read == "is_leaf" and not x.is_leaf:
            y = y.clamp(-0.1, 0.1)
        return y


@pytest.mark.parametrize("read", ["requires_grad", "storage_offset", "is_leaf"])
def test_a_test_of_how_an_input_was_made_is_taken_as_the_example_answers_it_and_checked(read):
    """``x.requires_grad`` of an input was taken as False (as the fused model runs, without gradients), and
    ``x.storage_offset()``, ``x.is_leaf`` went to torch.export, which held the example's answer: an input that
    requires gradients (a saliency map's), or a slice ``t[1:]``, took the other branch in the model and the fused
    model computed the example's, 2.6 off (found by a review).  The example answers them, and an input that answers
    otherwise is refused by name."""
    model = seeded(ClampsWhenMade, 0, read=read)().to(D)
    x = torch.randn(2, 4, 6, 6, dtype=D)
    fused = fuse(model, x)
    same(fused, model, x)
    same(fused, model, torch.randn(3, 4, 9, 7, dtype=D))
    other = {"requires_grad": x.clone().requires_grad_(), "storage_offset": torch.cat([x, x])[1:],
             "is_leaf": x.clone().requires_grad_() * 1}[read]
    with pytest.raises(ValueError, match="a Python test of how an input was made gave"):
        fused(other)


def test_tests_of_pointers_and_layouts_are_not_taken_as_tests_of_sizes():
    """``q.data_ptr() == k.data_ptr()`` (0 for every meta tensor) made the fused model refuse its own distinct q and
    k; ``x.is_contiguous()`` made it refuse channels-last inputs, which the model runs (found by a review).  Such
    reads are not taken: the part is captured otherwise, and computes what the model does for both."""
    model = seeded(SelfAttendsWhenSame, 0)().to(D)
    x = torch.randn(2, 4, 6, 6, dtype=D)
    fused = fuse(model, (x, x.clone()))
    same(fused, model, x, x.clone())
    same(fused, model, x, x)
    model = seeded(NormedStem, 0)().to(D)
    fused = fuse(model, x)
    same(fused, model, x)
    same(fused, model, x.contiguous(memory_format=torch.channels_last))


def _conv_bn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))


class GainBySize(nn.Module):
    """A gain looked up by the input's width, in a dict (``self.gain.get(W, 1.0)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.gain = _conv_bn(), {12: 3.0, 16: 0.25}

    def forward(self, x):
        return self.body(x) * self.gain.get(x.shape[-1], 1.0)


class FlipsSomeSizes(nn.Module):
    """A flip at the sizes a set holds (``tuple(x.shape[-2:]) in self.flip_sizes``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.flip_sizes = _conv_bn(), {(12, 12), (16, 16)}

    def forward(self, x):
        y = self.body(x)
        return y.flip(-1) if tuple(x.shape[-2:]) in self.flip_sizes else y


class ScaleByResolution(nn.Module):
    """A scale per resolution in a ParameterDict keyed by ``str(W)`` (and ``f"{W}"``)."""

    def __init__(self, formatted: bool) -> None:
        super().__init__()
        self.body, self.formatted = _conv_bn(), formatted
        self.scales = nn.ParameterDict({"12": nn.Parameter(torch.full((4, 1, 1), 2.0)), "16": nn.Parameter(torch.full((4, 1, 1), -1.0))})

    def forward(self, x):
        y = self.body(x)
        scale = self.scales.get(f"{x.shape[-1]}" if self.formatted else str(x.shape[-1]))
        return y if scale is None else y * scale


@pytest.mark.parametrize("make", [GainBySize, FlipsSomeSizes, lambda: ScaleByResolution(False), lambda: ScaleByResolution(True)],
                         ids=["dict-get", "set-membership", "str-key", "format-key"])
def test_a_size_used_as_a_key_is_read_as_at_the_example(make):
    """The trace hashed a size by identity: the lookup missed, and the graph held the miss at every size, while the
    model looks up a gain at 12 and 16 (5.0 off at 12x12; review R9).  The key is read as at the example and
    checked per call: the fused model computes the model at the example and refuses the sizes where the read would
    differ.  ``str(W)`` of a size is its node's name in a message (timm's assertions, named per call), and its
    digits as a key."""
    model = seeded(make, 0)().to(D)
    x = torch.randn(2, 4, 8, 8, dtype=D)
    fused = fuse(model, x)
    same(fused, model, x)
    same(fused, model, torch.randn(3, 4, 8, 8, dtype=D))  # (the batch stays free)
    for size in (12, 16):
        with pytest.raises(ValueError, match="size"):
            fused(torch.randn(2, 4, size, size, dtype=D))
