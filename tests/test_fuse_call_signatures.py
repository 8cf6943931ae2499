"""Parts called with keywords or numbers below a parent kept whole: fused once per way they are called.

A vision transformer calls its blocks ``blk(x, H, W)`` (PVT, SegFormer, Twins), a text model its layers
``layer(x, attention_mask=None)``.  Where the parent cannot be captured (a branch on data), such parts used to stay
as written, their BatchNorms unfolded.  Each is now captured once per signature (its constants fixed, its tensors
the inputs) and any other call runs the original.  Models are float64, so the fused model is compared to 1e-10
relative: folding rounds nothing a float64 model holds beyond that.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import repalgebra
from repalgebra.call_dispatch import CallDispatch, Signature

D = torch.float64
RTOL = 1e-10


def bn(c: int) -> nn.BatchNorm2d:
    b = nn.BatchNorm2d(c)
    b.running_mean.normal_()
    b.running_var.uniform_(0.5, 2.0)
    b.weight.data.normal_()
    b.bias.data.normal_()
    return b


class TokenBlock(nn.Module):
    """PVT's habit: tokens in, the map's sizes as numbers, a conv and a BatchNorm on the map."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), bn(c)

    def forward(self, x, H, W, scale=None):
        B, N, C = x.shape
        y = self.bn(self.conv(x.transpose(1, 2).reshape(B, C, H, W)))
        if scale is not None:
            y = y * scale
        return x + y.flatten(2).transpose(1, 2)


class Pyramid(nn.Module):
    """A parent no capture takes whole: it branches on its input's values."""

    def __init__(self, c: int = 6, depth: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), bn(c))
        self.blocks = nn.ModuleList([TokenBlock(c) for _ in range(depth)])

    def forward(self, x):
        x = self.stem(x)
        B, C, H, W = x.shape
        if x.mean() > 0:
            x = -x
        t = x.flatten(2).transpose(1, 2)
        for blk in self.blocks:
            t = blk(t, H, W, scale=None)
        return t


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * b.abs().max().item())


def _model(cls=Pyramid, **kw) -> nn.Module:
    torch.manual_seed(0)
    return cls(**kw).to(D).eval()


def test_blocks_called_with_their_sizes_fold_below_a_parent_kept_whole():
    model = _model()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    before = copy.deepcopy(model.state_dict())
    fused = repalgebra.fuse(model, x)
    report = fused.fuse_report
    assert report.capture == "kept whole"
    assert {f.source for f in report.fired if f.rule == "bn_fold"} >= {"blocks.0.bn", "blocks.1.bn"}
    assert all(isinstance(b, CallDispatch) for b in fused.blocks)
    assert any("fused for its calls (<tensor>, 8, 8, scale=None)" in n for n in report.notes)
    # the example's sizes, another batch, another map (the original runs: H and W differ), the other branch
    for y in [x, torch.randn(3, 3, 8, 8, dtype=D), torch.randn(1, 3, 6, 10, dtype=D), -x.abs()]:
        _close(fused(y), model(y))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class Twice(nn.Module):
    """One layer called two ways: without a mask, then with one (a cross-attention's memory mask)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.layer = Masked(c)

    def forward(self, x):
        if x.mean() > 0:
            x = x * 2
        y = self.layer(x, mask=None)
        return self.layer(y, mask=(x > 0).to(x.dtype))


class Masked(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 1), bn(c)

    def forward(self, x, mask=None, gain=1.0):
        y = self.bn(self.conv(x))
        return y * gain if mask is None else y * mask * gain


def test_each_way_of_calling_is_fused_and_other_calls_run_as_written():
    model = _model(Twice)
    x = torch.randn(2, 4, 5, 5, dtype=D)
    fused = repalgebra.fuse(model, x)
    layer = fused.layer
    assert isinstance(layer, CallDispatch) and len(layer._forms) == 2
    assert [f.source for f in fused.fuse_report.fired if f.rule == "bn_fold"].count("layer.bn") == 2
    _close(fused(x), model(x))
    _close(fused(-x), model(-x))
    # calls the model never made run the original: another gain, a gain of another type, a mask by position
    m = torch.rand(2, 4, 5, 5, dtype=D)
    ref = model.layer
    for args, kwargs in [((x,), {"mask": None, "gain": 2.0}), ((x,), {"mask": None, "gain": 1}), ((x, m), {}),
                         ((x,), {"gain": 1.0, "mask": None}), ((x,), {})]:
        _close(layer(*args, **kwargs), ref(*args, **kwargs))
    assert layer._signatures[0].tensors((x,), {"gain": 1.0, "mask": None}) is None  # the example never gave gain
    assert layer._signatures[0].tensors((x,), {"mask": None}) is not None


def test_signatures_compare_constants_by_type_and_value():
    x = torch.zeros(1)
    sig = Signature.of((x, 8, True), {"p": 0.5, "d": None})
    assert sig.tensors((torch.ones(2), 8, True), {"d": None, "p": 0.5}) is not None  # keyword order is no matter
    for args, kwargs in [((x, 8.0, True), {"p": 0.5, "d": None}), ((x, 8, 1), {"p": 0.5, "d": None}),
                         ((x, 8, True), {"p": 0.5, "d": x}), ((x, 9, True), {"p": 0.5, "d": None}),
                         ((x, x, True), {"p": 0.5, "d": None}), ((x, 8, True), {"p": 0.5}),
                         ((None, 8, True), {"p": 0.5, "d": None}), ((x, (8, True)), {"p": 0.5, "d": None}),
                         ((x, 8, True), {"q": 0.5, "d": None})]:
        assert sig.tensors(args, kwargs) is None, (args, kwargs)
    assert Signature.of((x, object()), {}) is None  # an object's equality says nothing of what a part does with it
    nan = Signature.of((x, float("nan")), {})
    assert nan.tensors((x, float("nan")), {}) is None  # no NaN equals a NaN: such a call runs the original


class Data(nn.Module):
    """A parent handing its block a number read off its input's values: each call's number decides."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.block = Repeat(c)

    def forward(self, x):
        return self.block(x, int(x.abs().mean() > 1) + 1)


class Repeat(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), bn(c)

    def forward(self, x, times):
        for _ in range(times):
            x = self.bn(self.conv(x))
        return x


def test_a_number_the_parent_computes_per_call_runs_the_original_when_it_differs():
    model = _model(Data)
    small = torch.randn(2, 4, 6, 6, dtype=D) * 0.1  # times == 1
    fused = repalgebra.fuse(model, small)
    assert isinstance(fused.block, CallDispatch)
    big = torch.randn(2, 4, 6, 6, dtype=D) * 10  # times == 2: not the fused call
    for y in (small, big):
        _close(fused(y), model(y))


class Settings:
    gain = 2.0


class WithSettings(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 1), bn(c)

    def forward(self, x, settings):
        return self.bn(self.conv(x)) * settings.gain


class Configured(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.block = WithSettings(c)

    def forward(self, x):
        if x.mean() > 0:
            x = x + 1
        return self.block(x, Settings())  # an object among the arguments


def test_a_call_holding_an_object_keeps_the_part_whole_as_before():
    model = _model(Configured)
    x = torch.randn(1, 4, 5, 5, dtype=D)
    fused = repalgebra.fuse(model, x)
    assert not isinstance(fused.block, CallDispatch)
    assert any(p.path == "block" and "a Settings among its arguments" in p.reason for p in fused.fuse_report.kept_whole)
    _close(fused(x), model(x))


def test_a_fused_dispatch_saves_copies_and_fuses_again():
    model = _model()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    fused = repalgebra.fuse(model, x)
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    again = repalgebra.fuse(fused, x)
    for other in (loaded, copy.deepcopy(fused), again):
        _close(other(x), model(x))
        y = torch.randn(1, 3, 4, 6, dtype=D)
        _close(other(y), model(y))


def test_a_float32_model_fused_per_call_follows_a_cast_to_float64():
    torch.manual_seed(0)
    model = Pyramid().eval()
    x = torch.randn(2, 3, 8, 8)
    fused = repalgebra.fuse(model, x)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)  # float32, folded in float64
    ref = copy.deepcopy(model).double()(x.double())
    got = copy.deepcopy(fused).double()(x.double())
    assert got.dtype == D
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # the folded weights are float32 values


class SwinV1Block(nn.Module):
    """Swin v1's habit: the layer sets ``blk.H, blk.W`` before each call, and the block reads them."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.H = self.W = None
        self.dw, self.bn = nn.Conv2d(c, c, 3, padding=1, groups=c), bn(c)

    def forward(self, x):
        B, L, C = x.shape
        H, W = self.H, self.W
        assert L == H * W, "input feature has wrong size"
        y = self.bn(self.dw(x.view(B, H, W, C).permute(0, 3, 1, 2)))
        return x + y.permute(0, 2, 3, 1).reshape(B, H * W, C)


class SwinV1Layer(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, c, 2, 2)
        self.blocks = nn.ModuleList([SwinV1Block(c) for _ in range(2)])
        self.gates = nn.Linear(c, 2)

    def forward(self, x):
        x = self.patch(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        skip = self.gates(x.mean(1)).mean(0) > 0  # SkipNet's habit: a flag the parent sets from the data
        for blk, off in zip(self.blocks, skip.tolist()):
            blk.H, blk.W = H, W
            if torch.is_grad_enabled() or not off:  # a mode flag keeps the layer whole too
                x = blk(x)
        return x


def test_a_part_whose_attributes_its_parent_sets_stays_as_written():
    """Fused at 16x16, a block captured with ``H, W`` read off its attributes held 8x8 tokens: an 8x32 input has as
    many tokens, passed ``assert L == H * W``, and came out scrambled (found by a probe).  Such a part now stays as
    written (its children are fused), and the report says which attributes its parent sets."""
    model = _model(SwinV1Layer)
    fused = repalgebra.fuse(model, torch.randn(2, 3, 16, 16, dtype=D))
    notes = " ".join(fused.fuse_report.notes)
    assert "'blocks.0': not replaced by its fused form: its parent sets its attributes H, W on each call" in notes
    assert all(type(b).__name__ == "SwinV1Block" for b in fused.blocks)
    for shape in [(2, 3, 16, 16), (1, 3, 8, 32), (1, 3, 32, 8), (3, 3, 12, 20)]:
        x = torch.randn(shape, dtype=D)
        for y in (x, -x, 5 * x):  # the gates take other values
            _close(fused(y), model(y))


class Remembers(nn.Module):
    """A block that notes what it saw in its own forward (``self.last_shape``): its own write, not its parent's."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), bn(c)
        self.last_shape = None

    def forward(self, x):
        self.last_shape = tuple(x.shape)
        return self.bn(self.conv(x))


class Branches(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.block = Remembers(c)

    def forward(self, x):
        return self.block(x) if x.mean() > -10 else x


def test_a_part_writing_its_own_attributes_is_still_fused():
    model = _model(Branches)
    x = torch.randn(2, 4, 6, 6, dtype=D)
    fused = repalgebra.fuse(model, x)
    assert "block.bn" in {f.source for f in fused.fuse_report.fired if f.rule == "bn_fold"}, str(fused.fuse_report)
    _close(fused(x), model(x))


class Attends(nn.Module):
    """DINO's habit: ``forward(x, return_attention=False)``, asked for the attention on one path only."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv, self.bn, self.att = nn.Conv2d(c, c, 3, padding=1), bn(c), nn.Conv2d(c, 1, 1)

    def forward(self, x, return_attention=False):
        y = self.bn(self.conv(x))
        a = torch.sigmoid(self.att(y))
        return a if return_attention else x + y * a


class AttendsByKeywords(Attends):
    """The same block taking its flag through ``**kwargs`` (a wrapper's habit)."""

    def forward(self, x, **kwargs):
        return super().forward(x, kwargs.get("return_attention", False))


class LastAttention(nn.Module):
    def __init__(self, c: int = 4, block: type = Attends) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([block(c) for _ in range(2)])

    def forward(self, x):
        want = bool(x.mean() > 1)  # a branch the example does not take
        for i, blk in enumerate(self.blocks):
            if want and i == len(self.blocks) - 1:
                return blk(x, return_attention=True)
            x = blk(x)
        return x


@pytest.mark.parametrize("block", [Attends, AttendsByKeywords])
def test_a_part_called_with_its_tensors_alone_still_takes_its_other_arguments(block):
    """Fused from ``blk(x)``, a block whose forward also takes ``return_attention`` failed with a bare ``TypeError``
    when the parent's other branch passed it (found by a probe).  Such a part is fused for the calls made, and any
    other call runs the original."""
    model = _model(LastAttention, block=block)
    x = torch.randn(2, 4, 6, 6, dtype=D)
    fused = repalgebra.fuse(model, x)
    assert {f.source for f in fused.fuse_report.fired if f.rule == "bn_fold"} >= {"blocks.0.bn", "blocks.1.bn"}
    for y in (x, x + 5):
        _close(fused(y), model(y))


class PackedEncoder(nn.Module):
    """Tacotron2's encoder: a conv and a BatchNorm, then an LSTM called on a PackedSequence (lengths from values)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv1d(c, c, 3, padding=1), nn.BatchNorm1d(c)
        self.lstm = nn.LSTM(c, 3, batch_first=True)
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x, lengths):
        x = self.bn(self.conv(x)).transpose(1, 2)
        x = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        y, _ = self.lstm(x)
        return nn.utils.rnn.pad_packed_sequence(y, batch_first=True)[0]


def test_a_part_called_on_a_packed_sequence_stays_as_written():
    """A PackedSequence is no plain container of tensors and constants: a signature holding one is None (building
    its skeleton used to crash fuse, its constructor reading a slot's device) and the LSTM runs as written."""
    x, lengths = torch.randn(2, 4, 7, dtype=D), torch.tensor([7, 5])
    packed = nn.utils.rnn.pack_padded_sequence(x.transpose(1, 2), lengths, batch_first=True, enforce_sorted=False)
    assert Signature.of((packed,), {}) is None
    model = _model(PackedEncoder)
    fused = repalgebra.fuse(model, (x, lengths))
    for args in [(x, lengths), (torch.randn(3, 4, 7, dtype=D), torch.tensor([4, 7, 2]))]:
        _close(fused(*args), model(*args))


class Settable(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), bn(c)
        self.gain, self.num_heads = 1.0, 2

    def forward(self, t, H, W):
        B, N, C = t.shape
        return t + self.gain * self.bn(self.conv(t.transpose(1, 2).reshape(B, C, H, W))).flatten(2).transpose(1, 2)


class SetsOnOneBranch(nn.Module):
    """A parent that reads a part's attribute, and sets one, on a branch the example does not take."""

    def __init__(self) -> None:
        super().__init__()
        self.blk = Settable()

    def forward(self, x):
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)
        if x.mean() > 0:
            self.blk.gain = 3.0
            t = t * self.blk.num_heads
        return self.blk(t, H, W)


def test_a_parents_reads_and_writes_of_a_part_on_another_branch_reach_its_original():
    """Fused per signature, the part became a dispatcher: the parent's ``blk.num_heads`` on another branch raised
    an ``AttributeError``, and its ``blk.gain = 3.0`` landed on the dispatcher, which neither form read (4.2 off;
    found by a review).  Reads are the original's; a write goes to the original, which then runs every call."""
    model = _model(SetsOnOneBranch)
    x = torch.randn(2, 4, 6, 6, dtype=D)
    x = x - x.mean() - 1  # the example takes the branch that sets nothing
    fused = repalgebra.fuse(model, x)
    assert isinstance(fused.blk, CallDispatch) and fused.blk.num_heads == 2
    ref = copy.deepcopy(model)
    for y in (x, x.abs() + 1, x):  # the write sticks: the third call runs with gain 3 in both
        _close(fused(y), ref(y))
    assert fused.blk._as_written and fused.blk._original.gain == 3.0


class CallsWithSizes(nn.Module):
    """A parent kept whole (a branch on its input's values) that calls its part with the sizes of its input."""

    def __init__(self) -> None:
        super().__init__()
        self.blk = Settable()

    def forward(self, x):
        B, C, H, W = x.shape
        if x.mean() > 0:
            x = x * 2
        return self.blk(x.flatten(2).transpose(1, 2), H, W)


@pytest.mark.parametrize("what", ["weight", "conv"])
def test_a_weight_or_child_replaced_in_a_dispatched_part_runs_the_original(what):
    """The dispatcher compared its original's plain attributes only: a parent's ``conv.weight = nn.Parameter(w)``,
    or a conv replaced by one of equal settings, went unseen, and the fused form ran on with the weight it folded
    (a review).  The identities of children, parameters and buffers are compared too.  (A parent's own code that
    reaches into the part now keeps it as written, also through ``vars(self)``: review R9; here the replacement is
    made from outside, as the parent's would, on the fused model and on the model alike.)"""
    model = _model(CallsWithSizes)
    x = torch.randn(2, 4, 6, 6, dtype=D)
    fused = repalgebra.fuse(model, x)
    assert isinstance(fused.blk, CallDispatch)
    ref = copy.deepcopy(model)
    for m in (fused, ref):
        if what == "weight":
            m.blk.conv.weight = nn.Parameter(m.blk.conv.weight.detach() * 2)
        else:
            torch.manual_seed(1)
            m.blk.conv = nn.Conv2d(4, 4, 3, padding=1).to(D)
    for y in (x, x.abs() + 1, x):
        _close(fused(y), ref(y))
    assert fused.blk._as_written


def test_a_negative_zero_is_not_the_signatures_zero():
    """``0.0 == -0.0``, but ``math.copysign`` tells them apart, and a part may too (found by a review)."""
    x = torch.zeros(1)
    sig = Signature.of((x, 0.0), {"z": complex(0.0, 0.0)})
    assert sig.tensors((x, 0.0), {"z": complex(0.0, 0.0)}) is not None
    assert sig.tensors((x, -0.0), {"z": complex(0.0, 0.0)}) is None
    assert sig.tensors((x, 0.0), {"z": complex(0.0, -0.0)}) is None


class PosConv(nn.Module):
    """Twins' PEG as some ports call it: with ``x.shape[2:]``, a ``torch.Size``."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, groups=c), bn(c)

    def forward(self, t, size):
        H, W = size
        B, N, C = t.shape
        return t + self.bn(self.conv(t.transpose(1, 2).reshape(B, C, H, W))).flatten(2).transpose(1, 2)


class SizedBySize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = PosConv()

    def forward(self, x):
        if x.mean() > 10:
            x = x * 2
        return self.pos(x.flatten(2).transpose(1, 2), x.shape[2:])


def test_a_size_passed_as_torch_size_runs_the_fused_form():
    """A recorded call holds ``x.shape[2:]`` as a plain tuple: the real call's ``torch.Size`` never matched its own
    signature, and every call ran the original while the report claimed the fold (found by a probe)."""
    model = _model(SizedBySize)
    x = torch.randn(2, 4, 6, 6, dtype=D)
    fused = repalgebra.fuse(model, x)
    assert fused.pos._signatures[0].tensors((torch.zeros(1), torch.Size([6, 6])), {}) is not None
    ran = []
    handle = fused.pos._forms[0].register_forward_pre_hook(lambda m, a: ran.append(1))
    _close(fused(x), model(x))
    handle.remove()
    assert ran
    y = torch.randn(1, 4, 5, 7, dtype=D)
    _close(fused(y), model(y))


class AttnH(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), bn(c)
        self.H = self.W = None

    def forward(self, t):
        B, N, C = t.shape
        return t + self.bn(self.conv(t.transpose(1, 2).reshape(B, C, self.H, self.W))).flatten(2).transpose(1, 2)


class BlockOfAttn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.fc = AttnH(), nn.Linear(4, 4)

    def forward(self, t):
        return self.fc(self.attn(t))


class SetsAGrandchild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blk = BlockOfAttn()

    def forward(self, x):
        if x.mean() > 10:
            x = x * 2
        B, C, H, W = x.shape
        self.blk.attn.H, self.blk.attn.W = H, W
        return self.blk(x.flatten(2).transpose(1, 2))


def test_a_part_whose_child_its_parent_sets_stays_as_written_too():
    """Only the child whose attributes were set was kept as written: its parent, captured whole, held the
    example's H and W, and an 8x32 input (as many tokens as 16x16) came out 5.5 off (a probe and a review)."""
    model = _model(SetsAGrandchild)
    fused = repalgebra.fuse(model, torch.randn(2, 4, 16, 16, dtype=D))
    assert type(fused.blk).__name__ == "BlockOfAttn" and type(fused.blk.attn).__name__ == "AttnH"
    for shape in [(2, 4, 16, 16), (1, 4, 8, 32), (1, 4, 32, 8)]:
        y = torch.randn(shape, dtype=D)
        _close(fused(y), model(y))



def test_a_part_called_more_ways_than_are_fused_is_kept_whole_saying_so():
    """The report gave the first call's odd argument as the reason, where the part is kept whole for its fifth
    signature (found by a probe)."""
    from repalgebra.frontend.capture import Call
    from repalgebra.fuse import _not_alone

    x = torch.zeros(1)
    why = _not_alone([Call((x, k), {}) for k in range(5)])
    assert why.startswith("called 5 ways with other numbers or keywords (at most 4 are fused per part)"), why
    assert "among its arguments" in _not_alone([Call((x, object()), {})])


class MaskedLayer(nn.Module):
    """BERT's habit: a mask added, or filled where boolean, at the dtype's minimum (a capture guarded by the ranks)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(d, d, bias=False), nn.BatchNorm1d(d)

    def forward(self, h, attention_mask=None, output_attentions=False):
        s = h @ h.transpose(-1, -2)
        if attention_mask is not None:
            s = s.masked_fill(~attention_mask, torch.finfo(s.dtype).min) if attention_mask.dtype == torch.bool else s + attention_mask
        y = s.softmax(-1) @ h
        return (self.bn(self.fc(y).transpose(1, 2)).transpose(1, 2),)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList([MaskedLayer(), MaskedLayer()])

    def forward(self, x, mask):
        ext = (1.0 - mask[:, None, :]) * -1e4
        for layer in self.layer:
            x = layer(x, ext, torch.is_grad_enabled())[0]  # a mode flag: the encoder is kept whole
        return x


def test_a_model_fused_per_signature_fuses_again():
    """The dispatcher's fused forms lost their shape guards to the dispatch, but their copies got them back: fusing
    the fused model again refused it as one whose copies lose hooks (found by a probe)."""
    model = _model(Encoder)
    ex = (torch.randn(2, 6, 8, dtype=D), torch.ones(2, 6, dtype=D))
    fused = repalgebra.fuse(model, ex)
    assert isinstance(fused.layer[0], CallDispatch)
    again = repalgebra.fuse(fused, ex)
    other = (torch.randn(3, 5, 8, dtype=D), (torch.rand(3, 5) > 0.3).to(D))
    for f in (fused, again):
        for args in (ex, other):
            _close(f(*args), model(*args))


def test_torch_compile_works_after_a_fuse_in_a_fresh_process():
    """A capture inside a trace imported torch._dynamo for the first time while the trace had torch.finfo patched:
    dynamo's table of constant types held the stand-in, and every torch.compile in that process failed after
    (found by the test suite in another order).  Run in a fresh process, where nothing imported dynamo before."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import torch, repalgebra\n"
        "import test_fuse_call_signatures as T\n"
        "m = T._model(T.Branches)\n"
        "repalgebra.fuse(m, torch.randn(2, 4, 6, 6, dtype=T.D))\n"
        "c = torch.compile(torch.nn.Conv2d(3, 3, 1), backend='eager')\n"
        "c(torch.randn(1, 3, 4, 4))\n"
        "print('compiled')\n" % str(Path(__file__).parent)
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-2000:]


class Tunable(nn.Module):
    """A part with a setter, an underscore attribute, and an attribute named as a dispatcher's would be."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), bn(c)
        self.gain, self._gain, self.fused = 1.0, 1.0, False

    def set_gain(self, g: float) -> None:
        self.gain = g

    def forward(self, t, H, W):
        B, N, C = t.shape
        y = self.bn(self.conv(t.transpose(1, 2).reshape(B, C, H, W))).flatten(2).transpose(1, 2)
        return t + self.gain * self._gain * y


class Tunes(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.blk, self.how = Tunable(), how

    def forward(self, x):
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)
        if x.mean() > 0:  # a branch the example does not take
            if self.how == "method":
                self.blk.set_gain(3.0)
            elif self.how == "underscore":
                self.blk._gain = 3.0
            elif self.blk.fused:  # the part's own attribute, not the dispatcher's forms
                t = t * 5
        return self.blk(t, H, W)


@pytest.mark.parametrize("how", ["method", "underscore", "own name"])
def test_a_dispatched_parts_own_names_and_methods_stay_its_own(how):
    """A setter called on the dispatcher wrote into the original unseen, an underscore name stayed on the
    dispatcher, and a part's ``self.fused`` read the dispatcher's forms (4.2 and 31.9 off; found by a review).
    Every public name is the original's, and a change of its attributes makes it run every call."""
    model = _model(Tunes, how=how)
    x = torch.randn(2, 4, 6, 6, dtype=D)
    x = x - x.mean() - 1
    fused = repalgebra.fuse(model, x)
    assert isinstance(fused.blk, CallDispatch)
    ref = copy.deepcopy(model)
    for y in (x, x.abs() + 1, x):
        _close(fused(y), ref(y))


def test_a_tool_that_wraps_a_dispatchers_forward_runs_it():
    """accelerate's and profilers' ``m.forward = wrap(m.forward)`` went to the original, whose forward then called
    the dispatcher again: a RecursionError (found by a review).  ``forward`` is the dispatcher's own."""
    model = _model(Tunes, how="method")
    x = torch.randn(2, 4, 6, 6, dtype=D) - 2
    fused = repalgebra.fuse(model, x)
    inner = fused.blk.forward
    fused.blk.forward = lambda *a, **k: inner(*a, **k)
    _close(fused(x), model(x))
    assert not fused.blk._as_written


class SharedAttn(nn.Module):
    """The parent holds the attention twice: as its own and inside its block, and sets it through its own name."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = AttnH()
        self.blk = BlockOfAttn()
        self.blk.attn = self.attn

    def forward(self, x):
        if x.mean() > 10:
            x = x * 2
        B, C, H, W = x.shape
        self.attn.H, self.attn.W = H, W
        return self.blk(x.flatten(2).transpose(1, 2))


def test_a_part_holding_a_module_its_parent_sets_under_another_name_stays_as_written():
    model = _model(SharedAttn)
    fused = repalgebra.fuse(model, torch.randn(2, 4, 16, 16, dtype=D))
    for shape in [(2, 4, 16, 16), (1, 4, 8, 32)]:
        y = torch.randn(shape, dtype=D)
        _close(fused(y), model(y))


def test_a_cast_or_move_of_the_fused_model_keeps_its_dispatchers_fused():
    """A cast replaces the original's buffers, whose identities the fingerprint compares: after ``.to()``,
    ``.half()`` or ``.cuda()`` every dispatcher ran its original (a review).  It is sealed again after one."""
    model = _model()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    fused = repalgebra.fuse(model, x)
    # (a move to another device makes new tensors of the same values; here, clones on the CPU)
    for cast in (lambda m: m._apply(torch.Tensor.clone), lambda m: m.float()._apply(torch.Tensor.double)):
        copied = cast(copy.deepcopy(fused))
        got = copied(x)  # (through float32 and back: float32's rounding)
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5 * float(got.abs().max()))
        assert not any(b._as_written for b in copied.blocks)


class _Doubles(nn.Module):
    def forward(self, module, args, out):
        return out * 2


def test_a_hook_registered_on_a_dispatched_parts_child_runs():
    """A forward hook registered after fuse on ``fused.blocks[0].conv`` (the original's, reached through the
    dispatcher) was never run: the fused form ran on (1.2 off; a review).  The hooks are fingerprinted: the
    original runs, with the hook, as the model does with the same hook."""
    model = _model()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    fused = repalgebra.fuse(model, x)
    fused.blocks[0].conv.register_forward_hook(_Doubles())
    model.blocks[0].conv.register_forward_hook(_Doubles())
    _close(fused(x), model(x))
    assert fused.blocks[0]._as_written and not fused.blocks[1]._as_written


class PooledWhenLarge(nn.Module):
    """A block that pools large maps first (``if x.shape[-1] > 8``: a test of sizes the trace takes as at the
    example), then a conv+BN beside a 1x1 conv+BN; ``gain`` as a number where given."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), bn(c))
        self.b = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), bn(c))

    def forward(self, x, gain=None):
        if x.shape[-1] > 8:
            x = nn.functional.avg_pool2d(x, 2)
        y = self.a(x) + self.b(x)
        return y if gain is None else y * gain


class CroppedTokens(nn.Module):
    """Tokens cropped to 8 where longer (a test of sizes), then Linear, a scale, Linear: it takes tokens with or
    without a batch axis, as ``nn.Linear`` does."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.l, self.l2 = nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, x):
        if x.shape[-2] > 8:
            x = x[..., :8, :]
        return self.l2(self.l(x) * 0.5)


class ValueBranch(nn.Module):
    """A parent kept whole (a branch on its input's values) around ``blk``, called with ``number`` where it is given.
    (Called directly: a module handed to a function, ``self.call(self.blk, x)``, counts as reached and stays as
    written.)"""

    def __init__(self, blk: nn.Module, number: float | None) -> None:
        super().__init__()
        self.blk, self.number = blk, number

    def forward(self, x):
        if x.mean() > 1e9:
            x = x * 0
        return self.blk(x) if self.number is None else self.blk(x, self.number)


@pytest.mark.parametrize("blk, number, example, other", [
    (PooledWhenLarge, None, (2, 4, 6, 6), (2, 4, 12, 12)),
    (PooledWhenLarge, 2.0, (2, 4, 6, 6), (2, 4, 12, 12)),  # a CallDispatch
    (CroppedTokens, None, (2, 5, 8), (5, 8)),  # one unbatched sequence: another number of axes
], ids=["size-test", "size-test-with-a-number", "rank"])
def test_a_call_a_parts_checks_refuse_runs_the_original(blk, number, example, other):
    """A part fused below a parent kept whole kept its test of sizes and its guard of the number of axes on the
    fused form: the dispatchers read only guards of fixed shapes, so the parent's call at 12x12, or with an
    unbatched sequence, raised where the original runs ("the model: a Python test of sizes gave False ...").
    Every check of the form decides now: such a call runs the part as written, the example's the fused form.  (A
    part whose only check is its number of axes has no dispatcher, whose copy of the original would double its
    weights: an unbatched call of it is refused by name.)"""
    torch.manual_seed(0)
    model = ValueBranch(blk(), number).to(D).eval()
    fused = repalgebra.fuse(model, torch.randn(example, dtype=D))
    assert not isinstance(fused.blk, blk), "the part is not fused: the test tests nothing"
    ran = []
    getattr(fused.blk, "_forms", [fused.blk])[0].register_forward_pre_hook(lambda m, args: ran.append(tuple(args[0].shape)))
    for shape in (example, other):
        y = torch.randn(shape, dtype=D)
        _close(fused(y), model(y))
    assert ran == [example] and not fused.blk._as_written  # the fused form at the example, the original elsewhere


def test_a_guard_taken_off_a_fused_form_stays_off_its_copies():
    """``_uninstall`` takes a guard off a fused GraphModule and off the copies it makes (a dispatcher checks it
    instead): left on the copies, a copy held guards its module had not.  The dispatchers now check the same guards
    first, so no call shows it; the contract, checked here directly."""
    from repalgebra.fuse import ShapeGuard, _uninstall

    fused = repalgebra.fuse(_model(lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))), torch.randn(1, 3, 8, 8, dtype=D))
    guard = ShapeGuard([(1, 3, 8, 8)], "the part")
    guard.install(fused)
    assert guard in copy.deepcopy(fused)._forward_pre_hooks.values()
    _uninstall(guard, fused)
    assert guard not in fused._forward_pre_hooks.values() and guard not in copy.deepcopy(fused)._forward_pre_hooks.values()
