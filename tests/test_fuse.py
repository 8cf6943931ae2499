"""``repalgebra.fuse``: a new eval-mode module, the input untouched, idempotent, reported, robust to bad input."""

from __future__ import annotations

import copy
import math
import pickle
import threading
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repalgebra
from repalgebra import FuseReport, UntraceableError, fuse, verify
from zoo.streaming import StreamingBlock

D = torch.float64


def randomize(model: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Random BN statistics and affine parameters (running_var in [0.5, 2])."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(c, generator=g))
                    m.bias.copy_(0.2 * torch.randn(c, generator=g))
    return model.to(dtype)


class Block(nn.Module):
    """RepVGG-style: 3x3 conv-BN + 1x1 conv-BN + BN, ReLU."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.skip = nn.BatchNorm2d(c)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(F.relu(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)) + self.skip(x)))


def net(c: int = 8, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return randomize(nn.Sequential(Block(c), Block(c)), dtype=dtype)


def snapshot(model: nn.Module) -> tuple:
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        {k: v.requires_grad for k, v in model.named_parameters()},
    )


def assert_unchanged(model: nn.Module, snap: tuple) -> None:
    state, flags, grads = snap
    now = model.state_dict()
    assert state.keys() == now.keys()
    for k in state:
        assert now[k].dtype == state[k].dtype and torch.equal(now[k], state[k]), k
    assert [m.training for m in model.modules()] == flags
    assert {k: v.requires_grad for k, v in model.named_parameters()} == grads


# --------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("train_mode", [False, True])
def test_input_model_is_never_mutated(train_mode):
    model = net().train(train_mode)
    snap = snapshot(model)
    fused = fuse(model, torch.randn(2, 8, 10, 10))
    assert_unchanged(model, snap)
    assert not fused.training and not any(m.training for m in fused.modules())
    # eval-mode semantics, said so in the report when the model was training
    x = torch.randn(2, 8, 10, 10)
    ref = copy.deepcopy(model).eval()(x)
    torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-5)
    assert ("training mode" in str(fused.fuse_report)) == train_mode
    assert_unchanged(model, snap)


def test_fused_shares_no_storage_and_is_independent():
    model = net()
    x = torch.randn(1, 8, 10, 10)
    fused = fuse(model, x)
    before = fused(x)
    ptrs = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert not ptrs & {t.untyped_storage().data_ptr() for t in [*fused.parameters(), *fused.buffers()]}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.equal(fused(x), before)


def test_result_is_one_conv_per_block():
    model = net()
    fused = fuse(model, torch.randn(1, 8, 10, 10))
    assert fused.fuse_report.ops_after == {"conv2d": 2, "relu": 2}
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert verify(model, fused, torch.randn(1, 8, 10, 10), dtype=D)


def test_idempotent():
    model = net()
    x = torch.randn(2, 8, 10, 10)
    once = fuse(model, x)
    twice = fuse(once, x)
    assert twice.fuse_report.ops_after == once.fuse_report.ops_after == twice.fuse_report.ops_before
    assert not twice.fuse_report.fired
    assert torch.equal(once(x), twice(x))
    assert sorted(dict(once.named_parameters())) == sorted(dict(twice.named_parameters()))


def test_idempotent_with_opaque_parts_and_asymmetric_padding():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 8, 4, padding="same")  # even kernel: asymmetric padding
            self.bn = nn.BatchNorm2d(8)
            self.pool = nn.MaxPool2d(2)  # unknown: carried through
            self.ln = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            y = self.pool(self.bn(self.a(x)))
            B, C, H, W = y.shape
            y = self.ln(y.reshape(B, C, H * W).transpose(1, 2))
            return self.fc(y).softmax(-1), y[:, 0]

    model = randomize(M())
    x = torch.randn(2, 4, 8, 8)
    once = fuse(model, x)
    assert any(isinstance(m, nn.ZeroPad2d) for m in once.modules())
    twice = fuse(once, x)
    assert twice.fuse_report.ops_after == once.fuse_report.ops_after
    for a, b in zip(once(x), twice(x)):
        assert torch.equal(a, b)
    assert verify(model, once, x, dtype=D)
    assert verify(model, twice, torch.randn(3, 4, 12, 6), dtype=D)  # any input size


def test_report():
    model = net()
    fused = fuse(model, torch.randn(1, 8, 10, 10))
    r = fused.fuse_report
    assert isinstance(r, FuseReport)
    assert r.rule_counts()["bn_fold"] == 4
    assert {f.source for f in r.fired if f.rule == "bn_fold"} == {"0.bn3", "0.bn1", "1.bn3", "1.bn1"}
    assert r.ops_before["batch_norm"] == 6 and "batch_norm" not in r.ops_after
    assert r.params_before == sum(p.numel() for p in model.parameters())
    assert r.params_after == sum(p.numel() for p in fused.parameters()) == 2 * (8 * 8 * 9 + 8)
    assert r.buffers_before > 0 and r.buffers_after == 0
    text = str(r)
    for word in ("bn_fold", "batch_norm", "parameters", "before", "after", "eval-mode"):
        assert word in text


def test_report_left_alone_with_reason():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y), y  # the conv's output is read twice: BN cannot fold

    fused = fuse(randomize(M()), torch.randn(1, 4, 6, 6))
    (la,) = fused.fuse_report.left_alone
    assert la.op == "batch_norm" and la.source == "bn" and "read elsewhere" in la.reason
    assert "left alone" in str(fused.fuse_report)


# --------------------------------------------------------------------------- BN that cannot fold


class TrainBN(nn.BatchNorm2d):
    """A BN that insists on training mode."""

    def train(self, mode: bool = True):
        return super().train(True)


@pytest.mark.parametrize(
    "make_bn,reason",
    [
        (lambda: TrainBN(4), "training mode"),
        (lambda: nn.BatchNorm2d(4, track_running_stats=False), "track_running_stats=False"),
    ],
)
def test_bn_with_batch_statistics_is_left_alone(make_bn, reason):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), make_bn(), nn.ReLU())
    model.eval()
    snap = snapshot(model)
    x = torch.randn(4, 4, 6, 6)
    fused = fuse(model, x)
    assert_unchanged(model, snap)
    r = fused.fuse_report
    assert r.ops_after.get("opaque") == 1 and r.ops_after.get("conv2d") == 1
    assert any(la.op == "batch_norm" and reason in la.reason and la.source == "1" for la in r.left_alone), str(r)
    fresh = copy.deepcopy(model)
    torch.testing.assert_close(fused(x), fresh(x))


def test_functional_batch_norm_training_true_is_left_alone():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.register_buffer("m", torch.zeros(3))
            self.register_buffer("v", torch.ones(3))

        def forward(self, x):
            return F.batch_norm(self.conv(x), self.m.clone(), self.v.clone(), training=True)

    fused = fuse(M(), torch.randn(2, 3, 4, 4))
    assert any("training=True" in la.reason for la in fused.fuse_report.left_alone)


def test_bn_affine_false_and_conv_without_bias():
    model = randomize(nn.Sequential(nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6, affine=False)))
    fused = fuse(model, torch.randn(1, 4, 7, 7))
    (conv,) = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert conv.bias is not None  # the BN's shift
    assert verify(model, fused, torch.randn(1, 4, 7, 7), dtype=D)
    lone = fuse(nn.Conv2d(4, 6, 3, bias=False), torch.randn(1, 4, 7, 7))
    (conv,) = [m for m in lone.modules() if isinstance(m, nn.Conv2d)]
    assert conv.bias is None


# --------------------------------------------------------------------------- control flow, leaves


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -x


class WithDataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.blocks = nn.Sequential(nn.ReLU(), DataDependent())

    def forward(self, x):
        return self.blocks(self.stem(x))


def test_data_dependent_control_flow_names_module_and_fix():
    model = randomize(WithDataDependent())
    with pytest.raises(TypeError) as info:  # by default the module is kept whole: tests/test_fuse_capture.py
        fuse(model, torch.randn(1, 4, 6, 6), strict=True)
    msg = str(info.value)
    assert isinstance(info.value, UntraceableError)
    assert "'blocks.1'" in msg and "DataDependent" in msg and "leaf_modules=(DataDependent,)" in msg


@pytest.mark.parametrize("leaf", [DataDependent, "blocks.1", "instance"])
def test_leaf_modules_carry_the_module_through(leaf):
    model = randomize(WithDataDependent())
    if leaf == "instance":
        leaf = model.blocks[1]
    x = torch.randn(1, 4, 6, 6)
    fused = fuse(model, x, leaf_modules=(leaf,))
    assert fused.fuse_report.ops_after == {"conv2d": 1, "opaque": 1, "relu": 1}
    assert fused.fuse_report.opaque == ["blocks.1"]
    for sign in (1, -1):
        assert verify(model, fused, sign * x.abs() + sign, dtype=D, n=1)
        torch.testing.assert_close(fused(sign * x.abs()), model.eval()(sign * x.abs()))


def test_calls_of_forward_itself_are_reported_by_what_they_call():
    """A call written in the model's own ``forward`` has no module path: the report names the call, not "<graph>"."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y.cumsum(1)[:, : x.shape[1] // 2], self.bn(x).sort(dim=1).values

    fused = fuse(randomize(M()), torch.randn(2, 4, 5, 5))
    assert sorted(fused.fuse_report.opaque) == ["cumsum", "getattr", "getitem", "sort"]  # getattr: .values
    assert "carried through unchanged (4 calls): " in str(fused.fuse_report)


class SharedWeights(nn.Module):
    """One conv + BN block applied three times (ALBERT-style weight sharing) and one MLP on two pooled vectors (CBAM)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(8, 2), nn.ReLU(), nn.Linear(2, 8))

    def forward(self, x):
        for _ in range(3):
            x = self.block(x)
        gate = self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1))
        return x * torch.sigmoid(gate)[:, :, None, None]


def test_a_module_called_several_times_stays_one_module():
    """Each call of the shared block folds its BN into the same conv: the fused model holds that conv once, as the
    model holds the block once, not a copy per call (three times the weights)."""
    model = randomize(SharedWeights())
    x = torch.randn(2, 8, 6, 6)
    fused = fuse(model, x)
    kinds = [type(m).__name__ for m in fused.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(kinds) == ["Conv2d", "Linear", "Linear"], kinds
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in model.parameters())
    assert verify(model, fused, x, dtype=D)


class IdentityInitBlock(nn.Module):
    """Two conv + BN pairs of one block (a ResNet's basic block), both convs identity-initialised, BNs fresh."""

    def __init__(self, c: int = 8, identity: bool = True) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        if identity:
            for conv in (self.conv1, self.conv2):
                nn.init.dirac_(conv.weight)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


def test_two_folds_with_equal_weights_stay_two_modules():
    """Both folds are named ``block`` (the common prefix) and, identity-initialised, had equal weights: the torch back
    end made them one module, so the fused model's state_dict had other keys than a trained one's and fine-tuning
    it tied the two convs.  A module is shared only between calls that merged the same modules."""
    x = torch.randn(2, 8, 6, 6)
    fresh = fuse(nn.Sequential(OrderedDict(block=IdentityInitBlock())).eval(), x)
    trained = fuse(randomize(nn.Sequential(OrderedDict(block=IdentityInitBlock(identity=False)))), x)
    assert list(fresh.state_dict()) == list(trained.state_dict())
    assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in trained.parameters())
    fresh.load_state_dict(trained.state_dict())


def test_a_shared_conv_whose_one_call_is_scaled_is_two_modules():
    """``conv(x) * 2 + conv(x.flip(-1))``: the number folds into one call's weights, whose paths are the conv's
    alone (the model's own forward has none): only the weights tell the two calls apart."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x) * 2.0 + self.conv(x.flip(-1))

    model, x = M().eval(), torch.randn(2, 3, 8, 8)
    fused = fuse(model, x)
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 2
    assert verify(model, fused, x, dtype=D)


class SharedConvTwoNorms(nn.Module):
    """TridentNet's branches: one conv called twice, each call with a BatchNorm of its own (fresh: equal)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv(x)).relu() * self.bn2(self.conv(x)).sigmoid()


def test_a_shared_conv_folded_with_two_norms_is_two_modules_whatever_the_norms_hold():
    x = torch.randn(2, 4, 6, 6)
    model = SharedConvTwoNorms().eval()
    fresh, trained = fuse(model, x), fuse(randomize(SharedConvTwoNorms()), x)
    assert list(fresh.state_dict()) == list(trained.state_dict()) and len(fresh.state_dict()) == 4  # two convs, biases
    assert verify(model, fresh, x, dtype=D)


class TwoRolls(nn.Module):
    """Two biases picked from one table by rolls of the height and of the width (a positional lookup)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.register_buffer("table", torch.randn(1, 4, 1, 8, generator=torch.Generator().manual_seed(1)))

    def forward(self, x):
        _, _, h, w = x.shape
        row = torch.roll(self.table, h // 4, -1)[..., :1]
        col = torch.roll(self.table, w // 4, -1)[..., :1]
        return self.bn(self.conv(x)) + row + 2 * col


def test_two_calls_of_one_function_with_other_arguments_stay_two_modules():
    """Both rolls are calls the fused module carries, of one source and one buffer: shared as one module, the
    second replayed the first's arguments.  At the square example they agree; at 16x8 the fused model was 6.5
    off, and so was its ONNX file.  A carried call's arguments are part of what makes it the same."""
    model = randomize(TwoRolls()).double().eval()
    fused = fuse(model, torch.randn(1, 4, 16, 16, dtype=D))
    for shape in [(1, 4, 16, 16), (2, 4, 16, 8), (1, 4, 8, 24)]:
        x = torch.randn(shape, dtype=D)
        torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-9)  # float64, folded in float64


def test_copies_of_a_fused_model_keep_its_report():
    fused = fuse(randomize(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))).eval(), torch.randn(1, 4, 8, 8))
    unpickled = pickle.loads(pickle.dumps(fused))
    for copied in (copy.deepcopy(fused), unpickled, copy.deepcopy(unpickled)):  # deepcopy dropped it
        assert str(copied.fuse_report) == str(fused.fuse_report)


def test_a_model_frozen_in_part_is_fused_frozen_in_part():
    """Every fused parameter required gradients unless none of the model's did: fine-tuning the fused model trained
    its frozen backbone too.  A module built from folds requires them where a parameter folded into it does."""
    model = randomize(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),   # frozen
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),   # conv frozen, its BN trains
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))).eval()           # trains
    for p in [*model[:2].parameters(), *model[3].parameters()]:
        p.requires_grad_(False)
    fused = fuse(model, torch.randn(2, 3, 16, 16))
    trains = {name: all(p.requires_grad for p in m.parameters()) for name, m in fused.named_children() if any(True for _ in m.parameters())}
    assert trains == {"m_0": False, "m_3": True, "m_8": True}, trains
    assert all(p.requires_grad is False for p in fused.m_0.parameters())


class LearnedInputs(nn.Module):
    """Parameters a forward reads but nothing folds: StyleGAN2's ConstantInput (repeated to the batch), a ViT's
    class token (expanded) and position embedding (added), a PReLU's slopes."""

    def __init__(self) -> None:
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, 8, 4, 4))
        self.cls, self.pos = nn.Parameter(torch.randn(1, 1, 8)), nn.Parameter(torch.randn(1, 17, 8))
        self.conv, self.bn, self.act = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.PReLU(8)

    def forward(self, z):
        h = self.act(self.bn(self.conv(self.input.repeat(z.shape[0], 1, 1, 1) * z[:, :, None, None])))
        t = h.flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(z.shape[0], -1, -1), t], 1) + self.pos


@pytest.mark.parametrize("capture", ["fx", "specialized"])
def test_parameters_read_but_not_folded_stay_parameters(capture):
    """They came back as buffers (``const_repeat.c0``, ``pos_const``; found by a probe): fine-tuning the fused model
    left them frozen, where the model trains them.  Parameters they stay, and a frozen model's stay frozen."""
    model = randomize(LearnedInputs()).eval()
    wrapped = model if capture == "fx" else _SizeRead(model)
    z = torch.randn(2, 8)
    fused = fuse(wrapped, z)
    assert fused.fuse_report.capture == capture and fused.fuse_report.rule_counts().get("bn_fold") == 1, str(fused.fuse_report)
    # torch.export's repeat and expand of them by the batch are made per call (the repeat was computed ahead, at the
    # example's batch, as a buffer, until it became an expand to the batch)
    assert not [b for b in fused.buffers() if b.is_floating_point()], list(fused.named_buffers())
    assert {tuple(p.shape) for p in fused.parameters()} >= {(1, 17, 8), (8,), (1, 8, 4, 4), (1, 1, 8)}
    with torch.no_grad():
        torch.testing.assert_close(fused(z), model(z), rtol=1e-5, atol=1e-5)  # float32, folded in float64
    fused(z).square().sum().backward()
    assert all(p.grad is not None for p in fused.parameters())  # every parameter is one the forward reads
    model.requires_grad_(False)
    assert not any(p.requires_grad for p in fuse(wrapped, z).parameters())


class SharedReads(nn.Module):
    """One PReLU called twice and one position embedding added twice; the stem frozen, PReLU included."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.c1, self.bn1, self.act = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.PReLU(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.act(self.bn1(self.c1(x + self.pos)))
        return self.act(self.bn2(self.c2(y + self.pos)))


def test_a_parameter_read_twice_is_one_parameter_and_a_frozen_one_stays_frozen():
    """A PReLU called twice and an embedding added twice became two parameters each, which a fine-tune moved apart;
    a frozen PReLU's slopes required gradients in the fused model (found by a review)."""
    model = randomize(SharedReads()).eval()
    fused = fuse(model, torch.randn(2, 8, 6, 6))
    shapes = sorted(tuple(p.shape) for p in fused.parameters())
    assert shapes.count((1, 8, 1, 1)) == 1 and shapes.count((8,)) == 3, shapes  # pos; the PReLU and two folded biases
    model.act.requires_grad_(False)
    frozen = fuse(model, torch.randn(2, 8, 6, 6))
    assert [tuple(p.shape) for p in frozen.parameters() if not p.requires_grad] == [(8,)]


class _SizeRead(nn.Module):
    """``model`` behind a size read as a number (``int(z.shape[1] ** 0.5)``, of a reduction's result, which the fx
    capture cannot check per call): torch.fx stops, torch.export captures it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, z):
        return self.model(z) * int(math.sqrt(z.amax(0).shape[0] * 4.5) // 6)


def test_top_level_control_flow_error():
    class M(nn.Module):
        def forward(self, x):
            return x if x.mean() > 0 else -x

    with pytest.raises(TypeError, match="forward\\(\\) of M itself"):
        fuse(M(), torch.randn(2, 3), strict=True)


# --------------------------------------------------------------------------- bad input, dtypes


def test_an_example_in_another_dtype_than_the_model_runs_in_is_refused():
    """A float32 model and a float64 example: the captures were checked against a float64 copy of the model, which
    runs on it, and the fused model came back in float64, refusing the model's own float32 inputs (found by a
    probe).  The model itself must run on the example; one that casts its input takes it."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())).eval()
    with pytest.raises(ValueError, match=r"does not run in eval mode on the example input \(2x3x8x8\).*Double"):
        fuse(model, torch.randn(2, 3, 8, 8, dtype=D))

    class CastsItsInput(nn.Module):
        def __init__(self, body: nn.Module) -> None:
            super().__init__()
            self.body = body

        def forward(self, x):
            return self.body(x.float())

    wrapped = CastsItsInput(model)
    fused = fuse(wrapped, torch.randn(2, 3, 8, 8, dtype=D))
    x = torch.randn(2, 3, 8, 8, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), wrapped(x), rtol=1e-5, atol=1e-5)  # float32, folded in float64


def test_fuse_in_several_threads_at_once():
    """torch.fx replaces ``nn.Module.__call__`` and ``__getattr__`` process-wide while it traces: two fuses in two
    threads restored each other's replacements, calls raised ``NameError`` inside our tracer, and the process could
    stay broken after them (found by a probe, 1 to 2 fuses in 30).  The traces take turns."""
    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    errors: list[BaseException] = []
    done: list[tuple[nn.Module, nn.Module, torch.Tensor]] = []

    def work(models: list[tuple[nn.Module, torch.Tensor]]) -> None:  # fuse only: a model run in a thread while
        try:                                                             # another traces is not ours to guard
            for model, x in models:
                done.append((model, fuse(model, x), x))
        except BaseException as e:  # noqa: BLE001  (re-raised below, in the test's thread)
            errors.append(e)

    # Made before the threads start: fuse's check of the default dtype sets torch's default for the whole process
    # during one run, and a model or input another thread made then was float64 (it happened in a test run)
    models = [[(randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)), seed=10 * t + k).eval(),
                torch.randn(2, 3, 8, 8)) for k in range(8)] for t in range(3)]
    threads = [threading.Thread(target=work, args=(models[t],)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert nn.Module.__call__ is call and nn.Module.__getattr__ is getattr_
    assert len(done) == 24
    for model, fused, x in done:
        assert fused.fuse_report.capture == "fx", str(fused.fuse_report)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)  # float32, folded in float64


def test_nan_or_inf_values_are_allowed_and_never_folded():
    """Non-finite values are the model's business; a fold that would spread them is refused (see test_fuse_capture)."""
    model = net(dtype=D)
    with torch.no_grad():
        model[1].conv1.weight[0, 0, 0, 0] = float("nan")
    x = torch.randn(1, 8, 6, 6, dtype=D)
    fused = fuse(model, x)
    torch.testing.assert_close(fused(x), model.eval()(x), equal_nan=True)
    assert any("not finite" in la.reason for la in fused.fuse_report.left_alone)


class CopiesOnce:
    """An attribute whose copy holds a lock (a client that opens a connection when copied): the model copies once,
    its copy does not."""

    def __init__(self, lock=None) -> None:
        self.lock = lock

    def __deepcopy__(self, memo):
        return CopiesOnce(copy.deepcopy(self.lock, memo) if self.lock is not None else threading.Lock())


def test_a_model_that_does_not_copy_is_refused_naming_the_attribute():
    """fuse runs copies of the model (and of its copy); a copy that fails names the attribute, not a bare pickling
    error from deep inside a capture."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = net()
            self.body[0].client = CopiesOnce()

        def forward(self, x):
            y = self.body(x)
            return y if y.sum() > 0 else -y  # the capture fails: fuse runs and copies the model more

    # (refused at the first copy since it is compared with the model: the client it holds is another)
    with pytest.raises(TypeError, match=r"cannot fuse M: its copy's 'body.0.client' differs from its own"):
        fuse(M().eval(), torch.randn(1, 8, 4, 4))
    model = net()
    model[0].lock = threading.Lock()
    with pytest.raises(TypeError, match=r"cannot copy Sequential: its attribute '0.lock' \(lock\) does not copy"):
        fuse(model, torch.randn(1, 8, 4, 4))


def test_non_float_rejected():
    model = net()
    model[0].register_parameter("count", nn.Parameter(torch.ones(3, dtype=torch.int64), requires_grad=False))
    with pytest.raises(TypeError, match="count.*int64"):
        fuse(model)
    with pytest.raises(TypeError, match="complex"):
        fuse(net(), torch.ones(1, 8, 4, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="at 0.*int"):  # an integer input is passed on as it is: the conv refuses it
        fuse(net(), torch.ones(1, 8, 4, 4, dtype=torch.int32))
    with pytest.raises(TypeError):
        fuse("not a module")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_folded_in_float64_and_cast_back(dtype):
    model = net(dtype=dtype)
    x = torch.randn(2, 8, 10, 10, dtype=dtype)
    fused = fuse(model, x)
    assert all(p.dtype == dtype for p in fused.parameters())
    assert fused.fuse_report.ops_after == {"conv2d": 2, "relu": 2}
    assert fused(x).dtype == dtype
    assert verify(model, fused, x)  # float16 1e-2 / bfloat16 3e-2 relative
    # the folded weights are the float64 fold of the half weights, rounded once
    ref = fuse(net(dtype=dtype).to(D), x.to(D))
    for (k, a), (_, b) in zip(fused.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b.to(dtype)), k


def test_float64_model_matches_to_1e9():
    model = net(dtype=D)
    fused = fuse(model)
    report = verify(model, fused)
    assert report and report.dtype == D and report.max_rel < 1e-12


# --------------------------------------------------------------------------- inputs and outputs


def test_inferred_input_is_reported():
    fused = fuse(net())
    assert fused.fuse_report.input_shapes == [(1, 8, 64, 64)]
    assert "input inferred: 1x8x64x64" in str(fused.fuse_report)


def test_cannot_infer_input():
    class M(nn.Module):
        def forward(self, x):
            return x * 2

    with pytest.raises(ValueError, match="example_inputs"):
        fuse(M())


def test_several_inputs_and_structured_outputs():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
            self.b = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x, y, scale: float = 2.0):
            return {"sum": self.a(x) + self.b(x), "other": (self.b(y) * scale, y)}

    model = randomize(M()).eval()
    x, y = torch.randn(1, 3, 5, 5), torch.randn(1, 3, 5, 5)
    fused = fuse(model, (x, y))
    out, ref = fused(x, y), model(x, y)
    assert out.keys() == ref.keys()
    torch.testing.assert_close(out["sum"], ref["sum"])
    torch.testing.assert_close(out["other"][0], ref["other"][0])
    # The model returns its input y itself; the fused module returns a copy of it (a copy the model made, y.clone(),
    # is one no op in the graph too, and a caller writing into it must not write into y).
    assert torch.equal(out["other"][1], y) and out["other"][1] is not y
    assert fused.fuse_report.ops_after["conv2d"] == 2
    with pytest.raises(ValueError, match="example_inputs"):
        fuse(model)


def test_an_optional_input_given_or_left_out_at_fuse_and_not_after_is_refused_by_name():
    """``forward(x, mask=None)`` fused with a mask: ``fused(x, None)`` failed inside the generated code
    (``AttributeError: 'NoneType' object has no attribute 'shape'``); it is refused by name."""
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv1d(4, 4, 3, padding=1, bias=False), nn.BatchNorm1d(4)

        def forward(self, x, mask=None):
            y = self.bn(self.conv(x))
            return y * mask[:, None] if mask is not None else y

    model = randomize(Masked()).eval()
    x, mask = torch.randn(2, 4, 10), (torch.rand(2, 10) > 0.5).float()
    fused = fuse(model, (x, mask))
    torch.testing.assert_close(fused(x, mask), model(x, mask))
    with pytest.raises(TypeError, match="fused with 2 tensor inputs and was called with NoneType for 1 of them"):
        fused(x, None)
    with pytest.raises(TypeError, match="called with NoneType"):
        fused(x, mask=None)
    with pytest.raises(TypeError, match="called with int for 1 of them"):  # a diffusion timestep as a number
        fused(x, 3)
    # The other way round: fused without the mask, called with it (Python's "forward() takes 2 positional
    # arguments but 3 were given" named the graph's arguments, not the reason).
    fused = fuse(model, x)
    for call in (lambda: fused(x, mask), lambda: fused(x, mask=mask)):
        with pytest.raises(TypeError, match="fused with 1 tensor input and was called with 2: .* optional input left out"):
            call()


class DuelingC51(nn.Module):
    """Kaixhin/Rainbow's distributional dueling head: ``forward(x, log=False)``; its ``learn()`` calls ``log=True``."""

    def __init__(self, atoms: int = 11, actions: int = 4) -> None:
        super().__init__()
        self.atoms, self.actions = atoms, actions
        self.body = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.v, self.a = nn.Linear(32, atoms), nn.Linear(32, actions * atoms)

    def forward(self, x, log=False):
        h = self.body(x)
        v, a = self.v(h).view(-1, 1, self.atoms), self.a(h).view(-1, self.actions, self.atoms)
        q = v + a - a.mean(1, keepdim=True)
        return F.log_softmax(q, dim=2) if log else F.softmax(q, dim=2)


class ArcFaceNeck(nn.Module):
    """insightface-style ``forward(x, label=None)``: margin logits with labels in training, embeddings without."""

    def __init__(self) -> None:
        super().__init__()
        self.neck = nn.Sequential(nn.Linear(16, 8, bias=False), nn.BatchNorm1d(8))
        self.weight = nn.Parameter(torch.randn(5, 8))

    def forward(self, x, label=None):
        emb = self.neck(x)
        if label is None:
            return emb
        cosine = F.linear(F.normalize(emb), F.normalize(self.weight))
        return 30.0 * (cosine - 0.5 * F.one_hot(label, 5))


def test_a_call_of_another_form_than_the_examples_is_refused_by_name():
    """Arguments the example left at their defaults are fixed, and an optional input it gave becomes required:
    ``fused(x, log=True)`` raised Python's "forward() got an unexpected keyword argument 'log'", and ``fused(x)``
    of a model fused with labels "missing 1 required positional argument" (found by a probe).  Both name the
    reason now; the example's form stays exact."""
    model = randomize(DuelingC51()).eval().double()
    x = torch.randn(4, 8, dtype=torch.float64)
    fused = fuse(model, x)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-12)
    for call in (lambda: fused(x, log=True), lambda: fused(x, True)):
        with pytest.raises(TypeError, match="fused for calls of the example's form"):
            call()
    model = randomize(ArcFaceNeck()).eval().double()
    x, label = torch.randn(4, 16, dtype=torch.float64), torch.tensor([0, 3, 1, 4])
    fused = fuse(model, (x, label))
    torch.testing.assert_close(fused(x, label), model(x, label), rtol=1e-9, atol=1e-12)
    with pytest.raises(TypeError, match="fused for calls of the example's form.*'label'"):
        fused(x)


def test_functional_style_and_layer_scale():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 6, 3, 3) * 0.1)
            self.w1 = nn.Parameter(torch.randn(6, 6, 1, 1) * 0.1)
            self.w2 = nn.Parameter(torch.randn(4, 6, 1, 1) * 0.1)
            self.register_buffer("mean", torch.randn(6) * 0.1)
            self.register_buffer("var", torch.rand(6) + 0.5)
            self.gamma = nn.Parameter(torch.rand(1, 6, 1, 1) + 0.5)

        def forward(self, x):
            y = F.conv2d(F.pad(x, (1, 1, 1, 1)), self.w) + F.conv2d(x, self.w1)
            y = F.batch_norm(y, self.mean, self.var, None, None, False, 0.1, 1e-3)
            return torch.cat([self.gamma * y, F.conv2d(x, self.w2, padding=0) * 0.5], dim=1)

    model = M()
    fused = fuse(model, torch.randn(1, 6, 7, 7))
    # The sum, its BN and the layer scales fold into one 3x3 conv.  The concat of that 3x3 (6 channels) with the
    # 1x1 (4 channels) stays: as one conv every output channel would pay for 3x3 taps (540 multiply-adds per
    # pixel for 348).
    assert fused.fuse_report.ops_after == {"conv2d": 2, "concat": 1}, str(fused.fuse_report)
    assert "540 multiply-adds per output pixel, more than the 2 convs together (348)" in str(fused.fuse_report)
    assert verify(model, fused, torch.randn(2, 6, 7, 7), dtype=D)


def test_mul_of_two_activations_stays_mul():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 1)
            self.b = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.a(x) * torch.sigmoid(self.b(x))

    fused = fuse(Gate(), torch.randn(1, 4, 5, 5))
    assert fused.fuse_report.ops_after == {"conv2d": 2, "mul": 1, "sigmoid": 1}


def test_reflect_padding_conv_is_a_reflect_pad_then_a_conv_and_its_bn_folds():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(3)).eval()
    fused = fuse(model, torch.randn(1, 3, 6, 6))
    assert fused.fuse_report.ops_after == {"pad_nd": 1, "conv2d": 1}
    assert verify(model, fused, torch.randn(2, 3, 7, 9), dtype=D)  # fx: any size


def test_fastvit_model_fuses_and_runs_at_other_sizes():
    import fastvit_models

    torch.manual_seed(0)
    model = randomize(fastvit_models.create_model("fastvit_t8", num_classes=10), dtype=D).eval()
    fused = fuse(model, torch.randn(1, 3, 64, 64, dtype=D))
    after = fused.fuse_report.ops_after
    assert "batch_norm" not in after and "sub" not in after, str(fused.fuse_report)
    assert verify(model, fused, torch.randn(1, 3, 64, 64, dtype=D), n=1)
    assert verify(model, fused, torch.randn(2, 3, 96, 96, dtype=D), n=1)


def test_a_model_with_nothing_to_fold_is_returned_as_a_copy_of_itself():
    """timm's CondConv computes its kernel from the input (routing weights times experts), so fx carries the
    conv as a call and nothing folds.  A graph of the same ops, its calls carried through, ran 10-25% slower than
    the model (probe); fuse now returns a copy of the model, with the report saying so."""

    class CondConv(nn.Module):
        def __init__(self, c: int = 8, experts: int = 4) -> None:
            super().__init__()
            self.route = nn.Linear(c, experts)
            self.weight = nn.Parameter(torch.randn(experts, c * c * 9) * 0.1)
            self.c = c

        def forward(self, x):
            r = torch.sigmoid(self.route(x.mean((2, 3))))
            w = (r @ self.weight).view(x.shape[0] * self.c, self.c, 3, 3)
            y = F.conv2d(x.reshape(1, -1, *x.shape[2:]), w, padding=1, groups=x.shape[0])
            return F.silu(y.view(x.shape[0], self.c, *y.shape[2:]))

    model = CondConv().eval()
    x = torch.randn(2, 8, 6, 6)
    fused = fuse(model, x)
    assert type(fused) is CondConv and fused.weight is not model.weight  # a copy: the model is not shared
    assert fused.fuse_report.fired == [] and "nothing to fold: the model is returned as it is (a copy)" in str(fused.fuse_report)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)


def test_the_report_says_what_the_check_compared():
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU()))
    x = torch.randn(1, 3, 8, 8)
    report = fuse(model, x).fuse_report
    assert report.check == "the model on the example input in float64, to 1e-05 relative"
    assert "\n  checked against: the model on the example input in float64, to 1e-05 relative\n" in str(report)
    assert fuse(model, x, check=False).fuse_report.check == "none (check=False)"


def test_flags_fixed_at_their_defaults_are_named_in_the_report():
    """``forward(x, *, return_features=False)``: the capture takes the default's branch; the fused module does not take
    the flag (a call passing it is a TypeError) and the report says so."""

    class WithFlag(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)

        def forward(self, x, *, return_features=False):
            y = self.bn(self.conv(x))
            return (y.mean((2, 3)), y) if return_features else y.mean((2, 3))

    fused = fuse(randomize(WithFlag()), torch.randn(1, 3, 6, 6))
    assert any("fixed at their defaults (return_features=False)" in n for n in fused.fuse_report.notes), fused.fuse_report.notes
    with pytest.raises(TypeError, match="return_features"):
        fused(torch.randn(1, 3, 6, 6), return_features=True)


def test_an_output_that_is_none_is_no_carried_call():
    class WithMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return {"y": self.bn(self.conv(x)), "mask": None}

    fused = fuse(randomize(WithMask()), torch.randn(1, 3, 4, 4))
    assert fused.fuse_report.opaque == [] and "carried through" not in str(fused.fuse_report)
    assert fused(torch.randn(1, 3, 4, 4))["mask"] is None


class ValueGate(nn.Module):
    """A branch on the input's values: kept whole, its children fused on their own."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.a(x)) if x.abs().mean() > 0 else x  # always true, but a value fx cannot branch on


def test_the_children_of_parts_kept_whole_share_one_report_line():
    """Every child of a part kept whole is fused on its own: one line lists them, one note the ones with nothing to
    fold (an activation), instead of a line and a note each."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 1), ValueGate(), ValueGate())).eval()
    fused = fuse(model, torch.randn(1, 3, 6, 6))
    text = str(fused.fuse_report)
    assert "    fused on their own with fx (4): '1.a', '1.act', '2.a', '2.act'" in text, text
    assert "  note: nothing to fold in 2 parts, returned as they are (copies): '1.act', '2.act'" in text, text
    assert "'1.a' (Sequential): fx" not in text


class SkipAndNorm(nn.Module):
    """``y + bn(y)`` where ``y`` is returned too: the skip and the BN merge into a 1x1 depthwise conv that cannot
    merge into the conv before it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        return y + self.bn(y), y


def test_a_per_channel_affine_left_by_fusion_runs_as_multiply_and_add():
    """The 1x1 depthwise conv is a ChannelAffine, a Conv2d computed as ``x * w + b``: PyTorch's depthwise conv
    kernel made the fused model slower than the model (1.8x).  Fusing it again, or exporting it, reads it back as
    the conv."""
    from repalgebra.channel_affine import ChannelAffine

    model = randomize(SkipAndNorm(), dtype=D)
    x = torch.randn(2, 8, 6, 6, dtype=D)
    fused = fuse(model, x)
    affine = [m for m in fused.modules() if isinstance(m, ChannelAffine)]
    assert len(affine) == 1 and not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules()), fused
    assert {n for n, _ in affine[0].named_parameters()} == {"weight", "bias"}
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 2 and affine[0].groups == 8
    assert verify(model, fused, x, n=2)
    again = fuse(fused, x)
    assert again.fuse_report.ops_before == again.fuse_report.ops_after == {"conv2d": 2}, again.fuse_report
    assert verify(model, again, torch.randn(3, 8, 5, 7, dtype=D), n=2)
    proto = repalgebra.export_onnx(fused.float(), None, (2, 8, 6, 6), fuse=False)
    assert {p.key: p.value for p in proto.metadata_props}["repalgebra.fallback"] == "none"


def test_a_part_left_in_training_mode_inside_an_eval_model_is_named():
    """A freezing helper that calls ``bn.train()`` after ``model.eval()``: fused with running statistics, as the
    whole model in training mode is, and the report says which parts it concerns."""
    model = net().eval()
    model[1].train()
    fused = fuse(model, torch.randn(2, 8, 10, 10))
    assert "1 part was in training mode inside a model in eval mode ('1')" in str(fused.fuse_report)
    assert "was in training mode" not in str(fuse(net().eval(), torch.randn(2, 8, 10, 10)).fuse_report)


def test_a_call_inside_a_submodule_is_reported_with_what_it_calls():
    """A function a block calls (a size-computed ``F.pad``) was listed by the block's path alone, which read as if
    the whole block were carried through unfused."""

    class SamePad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, stride=2), nn.BatchNorm2d(4)

        def forward(self, x):
            pad = (x.shape[-1] + 1) % 2
            return self.bn(self.conv(F.pad(x, (pad, 1, pad, 1)).cumsum(1)))

    model = nn.Sequential(SamePad(), nn.Identity()).eval()
    fused = fuse(randomize(model), torch.randn(2, 4, 7, 7))
    assert fused.fuse_report.opaque == ["0 (pad)", "0 (cumsum)"], str(fused.fuse_report)
    assert "carried through unchanged (2 calls): 0 (pad), 0 (cumsum)" in str(fused.fuse_report)


def test_a_fold_that_grows_the_parameters_is_noted():
    """A head shared across pyramid levels, each level scaled (FCOS's ``Scale``): the scale folds into a copy of the
    shared conv per call, so the fused model holds more parameters than the model, which the report says."""

    class SharedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.scales = nn.Parameter(torch.tensor([1.0, 2.0]))

        def forward(self, a, b):
            return self.conv(a) * self.scales[0], self.conv(b) * self.scales[1]

    model = randomize(SharedHead()).eval()
    fused = fuse(model, (torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)))
    r = fused.fuse_report
    assert r.params_after > r.params_before and any("holds more parameters and buffers than the model" in n for n in r.notes), str(r)
    assert not any("holds more parameters" in n for n in fuse(randomize(net()), torch.randn(2, 8, 10, 10)).fuse_report.notes)


@pytest.mark.parametrize("norm", [nn.InstanceNorm1d, nn.InstanceNorm2d])
@pytest.mark.parametrize("running", [True, False])
def test_an_instance_norm_with_running_statistics_folds_like_a_batch_norm(norm, running):
    """In eval mode ``track_running_stats=True`` normalises with the running statistics per channel: a BatchNorm, so
    it folds into the conv before it.  Without them it normalises each sample by its own statistics: it stays."""
    conv = nn.Conv1d(3, 6, 3, padding=1) if norm is nn.InstanceNorm1d else nn.Conv2d(3, 6, 3, padding=1)
    inorm = norm(6, affine=True, track_running_stats=running)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if running:
            inorm.running_mean.copy_(torch.randn(6, generator=gen))
            inorm.running_var.copy_(torch.rand(6, generator=gen) + 0.5)
        inorm.weight.copy_(torch.randn(6, generator=gen))
        inorm.bias.copy_(torch.randn(6, generator=gen))
    model = nn.Sequential(conv, inorm).double().eval()
    x = torch.randn(2, 3, *(7,) * (conv.weight.dim() - 2), dtype=torch.float64, generator=gen)
    fused = fuse(model, x)
    assert ("bn_fold" in {f.rule for f in fused.fuse_report.fired}) == running, str(fused.fuse_report)
    assert torch.allclose(fused(x), model(x), rtol=1e-9, atol=1e-12)


class ReturnsWhatItComputesFromWeights(nn.Module):
    """open_clip's CLIP returns ``self.logit_scale.exp()`` beside its features; a dense head returns its priors
    (``self.anchors * stride``), and its buffer as it is.  With ``pad``, Swin's pad to a window multiple (Python on a
    size: the capture is torch.export's)."""

    def __init__(self, pad: bool) -> None:
        super().__init__()
        self.pad = pad
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.register_buffer("anchors", torch.tensor([[10.0, 13.0], [16.0, 30.0]]))

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.pad and y.shape[-2] % 4:
            y = F.pad(y, (0, 0, 0, 4 - y.shape[-2] % 4))
        outs = (y, self.logit_scale.exp(), self.anchors * 8)
        return outs if self.pad else (*outs, self.anchors)


@pytest.mark.parametrize("pad", [False, True], ids=["fx", "specialized"])
def test_an_output_computed_from_weights_alone_is_made_anew_per_call(pad):
    """Folded, the fused module held it and returned that tensor on every call: a caller's ``scale.mul_(2)`` changed
    every later call (28.57 for 14.29; review R10).  A buffer returned as it is stays the module's own, as the
    model's is."""
    model = ReturnsWhatItComputesFromWeights(pad).double().eval()
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    fused = fuse(model, x)
    assert fused.fuse_report.capture == ("specialized" if pad else "fx"), str(fused.fuse_report)
    with torch.no_grad():
        first = fused(x)
        first[1].mul_(2)
        first[2].mul_(2)
        again, want = fused(x), model(x)
    torch.testing.assert_close(again[0], want[0], rtol=1e-9, atol=1e-12)  # float64, folded
    for got, ref in zip(again[1:], want[1:]):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)  # the same values, not twice them
    if not pad:
        assert want[3] is model.anchors and again[3] is fused(x)[3]


class Boxes(nn.Module):
    def forward(self, a):
        return a.view(-1, 2)


class PostProcessed(nn.Module):
    """A head whose post-processing child is carried through (a forward hook of the user's on it), fed priors made
    from a buffer: the folded product is the carried call's own tensor, which it returns a view of."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.register_buffer("anchors", torch.rand(10, 2))
        self.post = Boxes()
        self.post.register_forward_hook(lambda m, args, out: None)

    def forward(self, x):
        return self.bn(self.conv(x)), self.post(self.anchors * 8)


def test_what_a_carried_call_returns_of_its_own_tensors_is_made_anew_per_call():
    """The fused module returned the carried call's view of the product it held: a caller's ``boxes.mul_(100)``
    left every later call 770 off (review R11)."""
    model = PostProcessed().double().eval()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    fused = fuse(model, x)
    with torch.no_grad():
        fused(x)[1].mul_(100)
        torch.testing.assert_close(fused(x)[1], model(x)[1], rtol=0, atol=0)


def test_copies_the_model_returns_stay_copies():
    """``return y, y.clone(), x.clone()``: the clones are no ops in the graph, and the fused module returned ``y``
    twice and the caller's own ``x``; a caller post-processing one in place (``post.clamp_(min=0)``) changed the
    features, and recycling the kept input (``raw.mul_(0)``) zeroed its own batch."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

            self.windows = lambda t: t.unfold(3, 2, 1)  # a call the graph keeps whole: it may return a view

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y, y.clone(), x.clone(), x.clone().flatten(1), self.windows(x.clone())

    model = Net().double().eval()
    fused = repalgebra.fuse(model, torch.randn(1, 4, 6, 6, dtype=torch.float64))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    kept = x.clone()
    with torch.no_grad():
        feats, post, raw, flat, windows = fused(x)
        want = model(kept)[0]
        post.clamp_(min=0)
        raw.mul_(0)
        flat.mul_(0)
        windows.zero_()
    assert torch.equal(x, kept), "the caller's input must not change"
    torch.testing.assert_close(feats, want, rtol=1e-9, atol=1e-9)


def test_leaf_modules_that_name_nothing_are_refused():
    """``leaf_modules="dense"`` (a string, iterated as its letters) and a path the model does not have kept nothing
    whole, silently; ``trace`` too."""
    import pytest

    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    for call in (repalgebra.fuse, repalgebra.trace):
        with pytest.raises(TypeError, match=r"write leaf_modules=\['0'\]"):
            call(model, x, leaf_modules="0")
        with pytest.raises(ValueError, match=r"names 'nope', which the model has no submodule at \(its children: '0', '1'\)"):
            call(model, x, leaf_modules=["nope"])
    assert "batch_norm" not in repalgebra.fuse(model, x).fuse_report.ops_after
    assert repalgebra.fuse(model, x, leaf_modules=["0"]).fuse_report.ops_after == {"opaque": 1, "relu": 1}


def test_a_fused_sequential_takes_its_input_by_the_name_forward_gives_it():
    """fx names ``nn.Sequential.forward``'s ``input`` ``input_1`` (a builtin's name): the fused module's forward took
    ``input_1``, and ``fused(input=x)`` was a TypeError where the model takes it."""
    model = net().eval()  # (net() trains: its dropout would draw)
    fused = fuse(model, torch.randn(1, 8, 4, 4))
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(input=x), model(input=x), rtol=1e-5, atol=1e-5 * float(model(x).abs().max()))


class Tabular(nn.Module):
    """fastai's TabularModel: an embedding per categorical column, ``bn_cont`` on the continuous ones, the two joined,
    then its LinBnDrop layers (BatchNorm1d, Dropout, Linear, ReLU) and the output Linear."""

    def __init__(self, sizes=(5, 7), dims=(3, 2), n_cont: int = 4) -> None:
        super().__init__()
        self.embeds = nn.ModuleList(nn.Embedding(n, d) for n, d in zip(sizes, dims))
        self.emb_drop, self.bn_cont = nn.Dropout(0.1), nn.BatchNorm1d(n_cont)
        width = sum(dims) + n_cont
        self.layers = nn.Sequential(
            nn.Sequential(nn.BatchNorm1d(width), nn.Dropout(0.2), nn.Linear(width, 8), nn.ReLU()),
            nn.Sequential(nn.BatchNorm1d(8), nn.Dropout(0.2), nn.Linear(8, 6), nn.ReLU()),
            nn.Linear(6, 2))

    def forward(self, x_cat, x_cont):
        x = self.emb_drop(torch.cat([e(x_cat[:, i]) for i, e in enumerate(self.embeds)], 1))
        return self.layers(torch.cat([x, self.bn_cont(x_cont)], 1))


def test_a_tabular_models_continuous_batch_norm_folds_through_the_concat():
    """``bn_cont`` normalizes the continuous features beside the embeddings, and the join fed the first Linear: it was
    left, "no rule applies" (found by a probe).  It folds into the Linear's columns its features fill."""
    model = randomize(Tabular()).double().eval()
    ids = lambda n: torch.stack([torch.randint(0, 5, (n,)), torch.randint(0, 7, (n,))], 1)  # noqa: E731
    fused = fuse(model, (ids(4), torch.randn(4, 4, dtype=D)))
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fused.modules()), str(fused.fuse_report)
    x_cat, x_cont = ids(6), torch.randn(6, 4, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(fused(x_cat, x_cont), model(x_cat, x_cont), rtol=1e-9, atol=1e-12)  # float64


class FreezesOnTrain(nn.Module):
    """OpenMMLab's backbones: ``train`` overridden to freeze stages, without ``return self``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.stem.eval()

    def forward(self, x):
        return self.head(self.stem(x))


@pytest.mark.parametrize("training", [True, False])
def test_a_train_that_returns_nothing_is_fused_verified_and_exported(training, tmp_path):
    """``nn.Module.eval()`` returns what ``train`` returns: None here, and fuse failed with "'NoneType' object has no
    attribute 'parameters'" (found by a probe)."""
    model = randomize(FreezesOnTrain())
    model.train(training)
    x = torch.randn(2, 3, 8, 8)
    fused = fuse(model, x)
    assert model.training == training
    verify(model, fused, x)
    repalgebra.export_onnx(fused, tmp_path / "m.onnx", x)


def test_the_module_torch_export_gives_is_fused():
    """``ExportedProgram.module()`` carries torch.export's own hooks (a check of its inputs' sizes), which a copy
    drops: fuse refused it, asking to move hooks the user never registered; then fx carried its aten ops as
    calls, and nothing folded (found by a probe).  Its aten graph is read by the torch.export capture."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())).eval()
    x = torch.randn(2, 3, 8, 8)
    exported = torch.export.export(model, (x,)).module()
    fused = fuse(exported, x)
    assert fused.fuse_report.ops_after == {"conv2d": 1, "relu": 1}, str(fused.fuse_report)
    y = torch.randn(2, 3, 8, 8)  # (exported without dynamic shapes: its batch is fixed, as the module's own check says)
    with torch.no_grad():
        torch.testing.assert_close(fused(y), model(y), rtol=1e-5, atol=1e-5)  # float32, folded in float64
    assert len(exported._forward_pre_hooks) == 2


def test_fuse_leaves_the_callers_example_inputs_as_they_were():
    """A model whose calls cannot all run on meta tensors is run once for real while built: on the caller's own
    example tensors, so a cache the model writes in place came back from ``fuse`` two steps on (a probe).  The run
    takes copies; the fused model computes what the model does on the same state, float64 to 1e-12."""
    torch.manual_seed(0)
    model = StreamingBlock().double().eval()
    x, cache = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    kept = cache.clone()
    fused = repalgebra.fuse(model, (x, cache))
    assert torch.equal(cache, kept), "fuse must not write into the caller's example"
    with torch.no_grad():
        want, want_cache = model(x, kept.clone())
        got, got_cache = fused(x, cache)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_cache, want_cache, rtol=1e-12, atol=1e-12)


class _TimeBlock(nn.Module):
    """A diffusion ResBlock written with a BatchNorm: the time embedding added to the conv's map before the BN."""

    def __init__(self, c: int = 4, temb: int = 8) -> None:
        super().__init__()
        self.conv, self.time_mlp, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.Linear(temb, c), nn.BatchNorm2d(c)

    def forward(self, x, t_emb):
        return torch.relu(self.bn(self.conv(x) + self.time_mlp(t_emb)[:, :, None, None]))


def test_a_bn_after_a_conv_plus_a_time_embedding_folds():
    """``bn(conv(x) + time_mlp(t)[:, :, None, None])`` kept its BN ("no rule applies (input from add)"; a probe):
    the conv folds it and the embedding is scaled, at any batch and size (float64, to 1e-10)."""
    torch.manual_seed(0)
    model = _TimeBlock().double().eval()
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2.0)
    model.bn.weight.data.normal_(1.0, 0.3)
    fused = repalgebra.fuse(model, (torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)))
    assert "batch_norm" not in fused.fuse_report.ops_after, str(fused.fuse_report)
    for b, h, w in [(2, 8, 8), (3, 5, 7), (1, 4, 4)]:
        x, t = torch.randn(b, 4, h, w, dtype=torch.float64), torch.randn(b, 8, dtype=torch.float64)
        with torch.no_grad():
            want = model(x, t)
            torch.testing.assert_close(fused(x, t), want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))


class _ReshapesASum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x, y):
        h = y + self.bn(self.conv(x))
        return h.reshape(h.shape[0], h.shape[1], -1).sum(-1)


def test_a_reshape_of_a_sum_reads_its_sizes_where_a_term_may_broadcast():
    """``h = y + bn(conv(x))`` is a sum of equal shapes at the example, and ``h.reshape(h.shape[0], ...)`` read its
    sizes from ``y``: for a ``y`` of batch 1, or of 1 channel, the fused model returned another shape with other
    values (a review).  A sum's size is read from a term only where both have one root (a residual); here from the
    sum itself (float64, to 1e-10)."""
    torch.manual_seed(0)
    model = _ReshapesASum().double().eval()
    model.bn.running_var.uniform_(0.5, 2.0)
    fused = repalgebra.fuse(model, (torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)))
    for x, y in [((3, 3, 8, 8), (1, 4, 8, 8)), ((2, 3, 8, 8), (2, 1, 8, 8)), ((2, 3, 5, 5), (2, 4, 5, 5))]:
        x, y = torch.randn(x, dtype=torch.float64), torch.randn(y, dtype=torch.float64)
        with torch.no_grad():
            want = model(x, y)
            torch.testing.assert_close(fused(x, y), want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))


class _SAGEConv(nn.Module):
    """PyG's ``SAGEConv`` (mean aggregation) written out: ``lin_l(mean of neighbours) + lin_r(x)``."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.lin_l, self.lin_r = nn.Linear(c_in, c_out), nn.Linear(c_in, c_out, bias=False)

    def forward(self, x, edge_index):
        src, dst = edge_index[0], edge_index[1]
        count = torch.zeros(x.size(0), 1, dtype=x.dtype).index_add_(0, dst, torch.ones(src.numel(), 1, dtype=x.dtype))
        aggr = torch.zeros_like(x).index_add_(0, dst, x[src]) / count.clamp(min=1)
        return self.lin_l(aggr) + self.lin_r(x)


class _GraphSAGE(nn.Module):
    """OGB's GraphSAGE: conv, BatchNorm1d, relu, per layer."""

    def __init__(self, c: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.convs = nn.ModuleList([_SAGEConv(c, hidden), _SAGEConv(hidden, hidden)])
        self.bns = nn.ModuleList([nn.BatchNorm1d(hidden), nn.BatchNorm1d(hidden)])

    def forward(self, x, edge_index):
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(bn(conv(x, edge_index)))
        return x


class _Towers(nn.Module):
    """Two Linear towers summed before a BatchNorm1d (a DLRM-style interaction), with the ``dense`` tower called
    once more on its own for a second output, and on both inputs in the sum (one module, three calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.dense, self.sparse, self.bn = nn.Linear(8, 16), nn.Linear(6, 16), nn.BatchNorm1d(16)

    def forward(self, a, b, c):
        return self.bn(self.dense(a) - self.sparse(b) + self.dense(c)), self.dense(a)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_a_bn_after_a_sum_of_linears_folds(dtype, rtol):
    """A BatchNorm1d after a sum of Linears (PyG's SAGEConv ``lin_l(aggr) + lin_r(x)``, then the BN, as OGB's
    GraphSAGE stacks them) kept its BN: "batch_norm at bns.0: no rule applies (input from add, used by relu)" (a
    probe).  The BN folds into the Linears (the scale into each, the shift into one bias), exactly, at other graph
    sizes."""
    model = randomize(_GraphSAGE().eval(), dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    graph = lambda n, e: (torch.randn(n, 8, generator=gen, dtype=dtype), torch.randint(0, n, (2, e), generator=gen))  # noqa: E731
    fused = repalgebra.fuse(model, graph(12, 40))
    assert "batch_norm" not in fused.fuse_report.ops_after, str(fused.fuse_report)
    assert fused.fuse_report.rule_counts().get("linear_affine_fold") == 2, str(fused.fuse_report)
    for n, e in [(12, 40), (5, 9), (30, 100)]:
        x, edges = graph(n, e)
        with torch.no_grad():
            want = model(x, edges)
            torch.testing.assert_close(fused(x, edges), want, rtol=rtol, atol=rtol * float(want.abs().max()))


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_a_bn_after_a_sum_of_linears_of_one_module_called_elsewhere_too_is_exact(dtype, rtol):
    """One ``nn.Linear`` called twice in the sum and once more outside it: each call is a Linear of its own, the BN
    folds into the two in the sum and the call outside keeps the module's own weight."""
    model = randomize(_Towers().eval(), dtype=dtype)
    gen = torch.Generator().manual_seed(2)
    inputs = lambda n: (torch.randn(n, 8, generator=gen, dtype=dtype), torch.randn(n, 6, generator=gen, dtype=dtype),  # noqa: E731
                        torch.randn(n, 8, generator=gen, dtype=dtype))
    fused = repalgebra.fuse(model, inputs(4))
    assert "batch_norm" not in fused.fuse_report.ops_after, str(fused.fuse_report)
    for n in (4, 1, 7):
        args = inputs(n)
        with torch.no_grad():
            for got, want in zip(fused(*args), model(*args)):
                torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


def _default_conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


class _Upsampler(nn.Sequential):
    """EDSR's ``common.Upsampler``: per factor of 2 (or one of 3), a conv to ``r² n_feats`` channels, a
    ``PixelShuffle(r)``, and with ``bn=True`` a ``BatchNorm2d(n_feats)``, then the activation."""

    def __init__(self, conv, scale: int, n_feats: int, bn: bool = False, act: str | bool = False, bias: bool = True) -> None:
        m: list[nn.Module] = []
        if (scale & (scale - 1)) == 0:  # scale = 2^n
            for _ in range(int(math.log(scale, 2))):
                m.append(conv(n_feats, 4 * n_feats, 3, bias))
                m.append(nn.PixelShuffle(2))
                if bn:
                    m.append(nn.BatchNorm2d(n_feats))
                if act == "relu":
                    m.append(nn.ReLU(True))
        elif scale == 3:
            m.append(conv(n_feats, 9 * n_feats, 3, bias))
            m.append(nn.PixelShuffle(3))
            if bn:
                m.append(nn.BatchNorm2d(n_feats))
        super().__init__(*m)


@pytest.mark.parametrize("scale", [4, 3])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_a_bn_after_a_pixel_shuffle_folds_into_the_conv_before_it(scale, dtype, rtol):
    """EDSR's upsampler with ``bn=True`` (conv, ``PixelShuffle(r)``, ``BatchNorm2d``) kept its BNs ("no rule applies
    (input from pixel_shuffle)"): channel ``c`` after the shuffle is the conv's channels ``[c r², (c + 1) r²)``, so
    the BN folds into the conv repeated ``r²`` times, exactly, at other sizes."""
    model = randomize(_Upsampler(_default_conv, scale, 4, bn=True, act="relu").eval(), dtype=dtype)
    fused = repalgebra.fuse(model, (torch.randn(2, 4, 6, 6, dtype=dtype),))
    assert "batch_norm" not in fused.fuse_report.ops_after, str(fused.fuse_report)
    for shape in [(2, 4, 6, 6), (1, 4, 3, 5)]:
        x = torch.randn(shape, dtype=dtype)
        with torch.no_grad():
            want = model(x)
            torch.testing.assert_close(fused(x), want, rtol=rtol, atol=rtol * float(want.abs().max()))


class _IBN(nn.Module):
    """IBN-Net's instance-batch norm (fast-reid, IBN-Net): instance norm on the first half of the channels, batch
    norm on the rest, after one conv."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.half = int(planes / 2)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x):
        split = torch.split(x, self.half, 1)
        out1 = self.IN(split[0].contiguous())
        out2 = self.BN(split[1].contiguous())
        return torch.cat((out1, out2), 1)


class _BottleneckIBN(nn.Module):
    """ResNet-50-IBN-a's bottleneck: ``bn1`` is an IBN where ``ibn`` is set."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, ibn: bool = True, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = _IBN(planes) if ibn else nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * self.expansion, 1, stride, bias=False),
                                        nn.BatchNorm2d(planes * self.expansion))

    def forward(self, x):
        residual = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


@pytest.mark.parametrize("planes", [8, 6])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_a_bn_on_a_channel_piece_of_a_conv_folds_into_its_rows(planes, dtype, rtol):
    """IBN-Net's ``cat(IN(h[:, :half]), BN(h[:, half:]))`` after ``conv1`` kept its BN ("no rule applies (input from
    piece)"): the BN folds into the conv's rows of its half, the instance norm reads the other rows unchanged."""
    model = randomize(_BottleneckIBN(16, planes).eval(), dtype=dtype)
    fused = repalgebra.fuse(model, (torch.randn(2, 16, 8, 8, dtype=dtype),))
    assert "batch_norm" not in fused.fuse_report.ops_after, str(fused.fuse_report)
    assert sum(isinstance(m, nn.InstanceNorm2d) for m in fused.modules()) == 1, str(fused.fuse_report)
    for shape in [(2, 16, 8, 8), (1, 16, 5, 7)]:
        x = torch.randn(shape, dtype=dtype)
        with torch.no_grad():
            want = model(x)
            torch.testing.assert_close(fused(x), want, rtol=rtol, atol=rtol * float(want.abs().max()))
