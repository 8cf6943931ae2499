"""``fuse`` on models whose calls change their own state, and on leaves under a parent kept whole.

A fused module is built from one recorded call; a forward that changes the model's
tensors or attributes (a counter, a running average kept in eval mode, a
buffer a parent updates, a Glow-style initialization from the first batch)
computes another function on the next call, so the part that holds the state
must run as written.  Each model here is run side by side with the fused module
over a sequence of calls with different inputs: every call must agree, in
float64 to 1e-9 relative (``verify``'s float64 tolerance).  What only a first
call fills, the same for any input (a cache of weight-derived values, the weight
``spectral_norm``'s hook recomputes), is not state: those models fuse fully.
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import itertools
import math
from collections import OrderedDict, defaultdict
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from repalgebra import export_onnx, fuse
from repalgebra.fuse import FuseError
from zoo import count_bn, seeded

D = torch.float64


def randomized(make) -> nn.Module:
    """``make()`` seeded, with the zoo's realistic BN statistics, float64, eval mode."""
    return seeded(make, 0)().to(D)


def conv_bn(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())


class Counter(nn.Module):
    """Counts its calls in a buffer it scales its output by (``self.n += 1``)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.register_buffer("n", torch.zeros(()))
        self.body = conv_bn(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n += 1
        return self.body(x) * self.n


class Rebinding(nn.Module):
    """The same counter written ``self.n = self.n + 1``: a new tensor each call, no in-place write."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n = self.n + 1
        return x + self.n


class RunningMean(nn.Module):
    """Keeps a running mean of its features in eval mode too, and subtracts it."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.body = conv_bn(c)
        self.register_buffer("mean", torch.zeros(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        self.mean.mul_(0.9).add_(0.1 * y.mean((0, 2, 3)))
        return y - self.mean[None, :, None, None]


class PythonCounter(nn.Module):
    """Counts its calls in a plain ``int`` attribute."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.body = conv_bn(c)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.body(x) * self.calls


class Warmup:
    """A plain object a block steps on every call (a schedule, an EMA helper)."""

    def __init__(self) -> None:
        self.step = 0


class StateInside(nn.Module):
    """Counts in a dict entry (``self.stats["calls"] += 1``: the dict keeps its length) or in a plain object's
    attribute (``self.warmup.step += 1``: the object keeps its identity).  A snapshot saw only a container's length
    and an object's identity, so fuse baked the first call's count (2.2 apart at the second call)."""

    def __init__(self, where: str, c: int = 4) -> None:
        super().__init__()
        self.body, self.where = conv_bn(c), where
        self.stats, self.warmup = {"calls": 0}, Warmup()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.where == "dict":
            self.stats["calls"] += 1
            return self.body(x) * self.stats["calls"]
        self.warmup.step += 1
        return self.body(x) * min(self.warmup.step, 3)


@dataclasses.dataclass(slots=True)
class StreamStep:
    step: int = 0


class UnseenState(nn.Module):
    """State a snapshot did not see (review R10): a memory too large to copy at every snapshot, written through
    ``.data`` (no version bump), in place or rebound to new storage (a streaming conv's ``self.cache.data = ...``);
    a call counter in a numpy array (``self.calls += 1``); a step in a ``@dataclass(slots=True)`` object (no
    ``__dict__``).  Each was fused as a constant: 1.4 to 10 off from the second call on.  Then (review R11): a counter
    in an ``itertools.count``, a ``bytearray``, and a tensor in a numpy array of objects."""

    def __init__(self, where: str, c: int = 4) -> None:
        super().__init__()
        self.body, self.where = conv_bn(c), where
        self.register_buffer("mem", torch.zeros(c, 2048))
        self.calls, self.state = np.zeros(1, dtype=np.int64), StreamStep()
        self.counter, self.raw = itertools.count(1), bytearray(1)
        self.held = np.empty(1, dtype=object)
        self.held[0] = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.where == "data_in_place":
            self.mem.data[:, 0] += 1.0
        elif self.where == "data_rebound":
            self.mem.data = self.mem + 1.0
        elif self.where == "numpy":
            self.calls += 1
            return y * float(self.calls[0])
        elif self.where == "count":
            return y * next(self.counter)
        elif self.where == "bytearray":
            self.raw[0] += 1
            return y * self.raw[0]
        elif self.where == "object_array":
            self.held[0] += 1
            return y * self.held[0]
        else:
            self.state.step += 1
            return y * self.state.step
        return y + self.mem[:, :1].reshape(1, -1, 1, 1)


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("v", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.v


class ParentUpdatesChild(nn.Module):
    """The parent writes the child's buffer (``self.scale.v.add_(1)``), the child reads it."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.body = conv_bn(c)
        self.scale = Scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.scale.v.add_(1)
        return self.scale(self.body(x))


class ActNorm(nn.Module):
    """Glow's ActNorm: the first call sets a per-channel affine from that batch's statistics."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.initialized.item() == 0:
            with torch.no_grad():
                self.loc.copy_(-x.mean((0, 2, 3), keepdim=True))
                self.log_scale.copy_(-torch.log(x.std((0, 2, 3), keepdim=True) + 1e-6))
                self.initialized.fill_(1)
        return (x + self.loc) * torch.exp(self.log_scale)


class BiasCache(nn.Module):
    """An attention-style bias table gathered once per device and cached in a dict (as LeViT does in eval mode)."""

    def __init__(self, c: int = 4, n: int = 36) -> None:
        super().__init__()
        self.biases = nn.Parameter(torch.randn(c, 7))
        self.register_buffer("idx", torch.arange(n) % 7, persistent=False)
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.biases[:, self.idx]
        return x + self.cache[key].reshape(1, x.shape[1], x.shape[2], x.shape[3])


class LazyMean(nn.Module):
    """A mean over the positions written with a factor filled on the first call, from the first input's size."""

    def __init__(self) -> None:
        super().__init__()
        self.inv_area = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inv_area is None:
            self.inv_area = torch.full((1, x.shape[1], 1, 1), 1.0 / (x.shape[-2] * x.shape[-1]), dtype=x.dtype)
        return x + x.sum((2, 3), keepdim=True) * self.inv_area


class SizeScratch(nn.Module):
    """Swin's ``blk.H, blk.W = H, W``: an attribute every call rewrites from its input before it reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.area = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.area = x.shape[-2] * x.shape[-1]
        return x + x.sum((2, 3), keepdim=True) / self.area


class LazyTable(nn.Module):
    """A positional table built on the first call for that call's size, then added on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos is None:
            self.pos = torch.linspace(0, 1, x.shape[-2] * x.shape[-1], dtype=x.dtype).reshape(1, 1, *x.shape[-2:])
        return x + self.pos


class LargestTable(nn.Module):
    """A table kept for the largest width seen and sliced to each call's: its values follow the table's size
    (``linspace`` over it, as normalized coordinates) when ``positional`` is False, or only the position (a
    rotary-style ``cos`` of the position, as LLaMA's grown cos/sin cache) when True."""

    def __init__(self, positional: bool) -> None:
        super().__init__()
        self.positional, self.table = positional, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1]
        if self.table is None or self.table.shape[0] < w:
            at = torch.arange(w, dtype=x.dtype)
            self.table = torch.cos(at * 0.3) if self.positional else torch.linspace(-1, 1, w, dtype=x.dtype)
        return x + self.table[:w]


class Net(nn.Module):
    """stem -> inner -> head, each stem and head a conv + BN + ReLU that folds."""

    def __init__(self, inner: nn.Module, c: int = 4) -> None:
        super().__init__()
        self.stem, self.inner, self.head = conv_bn(c), inner, conv_bn(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inner(self.stem(x)))


class BranchOnData(Net):
    """Python branching on a value: neither torch.fx nor torch.export captures the model itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(self.stem(x))
        if y.sum() > 0:
            y = y + 1
        return self.head(y)


def inputs(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 4, 6, 6, generator=g, dtype=D) for _ in range(n)]


def fused_and_reference(model: nn.Module, **kw) -> tuple[nn.Module, nn.Module]:
    """``fuse(model)`` and an untouched copy of the model as it was; the model's own state must not change."""
    before = copy.deepcopy(model)
    fused = fuse(model, inputs()[0], **kw)
    for (name, a), (_, b) in zip(before.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), f"fuse changed the model's {name}"
    assert vars(before).get("calls") == vars(model).get("calls")
    return fused, before


def assert_same_calls(reference: nn.Module, fused: nn.Module) -> None:
    """The two agree call after call: x1, x2, x3, x1 again."""
    xs = inputs()
    for k, x in enumerate([*xs, xs[0]]):
        with torch.no_grad():
            want, got = reference(x.clone()), fused(x.clone())
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()), msg=lambda m: f"call {k + 1}: {m}")


def kept_whole(fused: nn.Module) -> dict[str, str]:
    return {p.path: p.reason for p in fused.fuse_report.parts if p.how == "kept whole"}


@pytest.mark.parametrize(
    "make, region, state, bns",
    [
        (lambda: Net(Counter()), "inner", "inner.n", 0),  # the region runs as written, its children fused
        (lambda: Net(Rebinding()), "inner", "inner.n", 0),
        (lambda: Net(RunningMean()), "inner", "inner.mean", 0),
        (lambda: Net(PythonCounter()), "inner", "inner.calls", 0),
        (lambda: Net(ParentUpdatesChild()), "inner", "inner.scale.v", 0),
        (lambda: Net(ActNorm()), "inner", "inner.loc", 0),
        (lambda: BranchOnData(Counter()), "inner", "inner.n", 0),
        (lambda: Net(StateInside("dict")), "inner", "inner.stats", 0),
        (lambda: Net(StateInside("object")), "inner", "inner.warmup", 0),
        (lambda: Net(UnseenState("data_in_place")), "inner", "inner.mem", 0),
        (lambda: Net(UnseenState("data_rebound")), "inner", "inner.mem", 0),
        (lambda: Net(UnseenState("numpy")), "inner", "inner.calls", 0),
        (lambda: Net(UnseenState("slots")), "inner", "inner.state", 0),
        (lambda: Net(UnseenState("count")), "inner", "inner.counter", 0),
        (lambda: Net(UnseenState("bytearray")), "inner", "inner.raw", 0),
        (lambda: Net(UnseenState("object_array")), "inner", "inner.held", 0),
    ],
    ids=["counter", "rebinding", "running_mean", "python_counter", "parent_updates_child", "actnorm", "untraceable_parent",
         "dict_entry", "object_attribute", "data_in_place", "data_rebound", "numpy_array", "slots_object", "itertools_count",
         "bytearray", "numpy_object_array"],
)
def test_the_part_that_holds_state_runs_as_written(make, region, state, bns):
    fused, reference = fused_and_reference(randomized(make))
    assert_same_calls(reference, fused)
    assert region in kept_whole(fused), str(fused.fuse_report)
    assert repr(state) in kept_whole(fused)[region], kept_whole(fused)
    assert count_bn(fused) == bns, str(fused.fuse_report)  # stem and head fold around it


class StepConditioned(nn.Module):
    """A child called with the step its parent counts, as a diffusion sampler's block gets its timestep."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.body = conv_bn(c)

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        return self.body(x) * (1.0 + 0.1 * step)


class RegionAroundChildren(nn.Module):
    """A block counting its calls whose children are read in other ways too: through their weights (``reads``),
    with the count as an argument (``passes``), or through a reference to the block's own buffer that the child
    holds and reads (``aliased``)."""

    def __init__(self, how: str, c: int = 4) -> None:
        super().__init__()
        self.how, self.body = how, conv_bn(c)
        self.register_buffer("n", torch.zeros(()))
        self.stepped = StepConditioned(c)
        self.body[1].shared = self.n  # (the same tensor: a write to n is a write the BN's holder sees)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n += 1
        if self.how == "reads":
            return self.body(x) + self.body[0].weight.mean() * self.n
        if self.how == "passes":
            return self.stepped(x, int(self.n))
        return self.body(x) * self.body[1].shared


@pytest.mark.parametrize("how", ["reads", "passes", "aliased"])
def test_the_children_of_a_part_kept_for_its_state_fold_only_where_that_holds(how):
    """A part kept for its state runs as written with its children fused on their own, as under any parent kept
    whole: a child whose weights its parent reads, that is called with the count, or that holds the state itself
    must still compute what it did, call after call (float64, to 1e-9)."""
    fused, reference = fused_and_reference(randomized(lambda: Net(RegionAroundChildren(how))))
    assert_same_calls(reference, fused)
    assert "'inner.n'" in kept_whole(fused).get("inner", ""), str(fused.fuse_report)


def test_state_of_the_model_itself_keeps_it_whole_and_fuses_its_children():
    fused, reference = fused_and_reference(randomized(Counter))
    assert_same_calls(reference, fused)
    assert "'n'" in kept_whole(fused)[""]
    assert count_bn(fused) == 0, str(fused.fuse_report)  # its child was fused on its own


def test_without_the_check_state_is_still_found():
    fused, reference = fused_and_reference(randomized(lambda: Net(Counter())), check=False)
    assert_same_calls(reference, fused)
    assert "inner" in kept_whole(fused)


def test_strict_refuses_naming_the_state():
    with pytest.raises(FuseError, match=r"inner\.n"):
        fuse(randomized(lambda: Net(Counter())), inputs()[0], strict=True)


@pytest.mark.parametrize(
    "make",
    [lambda: Net(BiasCache()), lambda: Net(nn.utils.spectral_norm(nn.Conv2d(4, 4, 3, padding=1)))],
    ids=["bias_cache", "spectral_norm"],
)
def test_what_a_first_call_fills_the_same_for_any_input_is_not_state(make):
    fused, reference = fused_and_reference(randomized(make))
    assert_same_calls(reference, fused)
    assert not kept_whole(fused), str(fused.fuse_report)
    assert count_bn(fused) == 0, str(fused.fuse_report)
    assert any("a first call fills" in n for n in fused.fuse_report.notes), fused.fuse_report.notes


def test_a_stateless_model_is_not_flagged():
    fused, reference = fused_and_reference(randomized(lambda: Net(conv_bn(4))))
    assert_same_calls(reference, fused)
    assert not kept_whole(fused) and not fused.fuse_report.notes and count_bn(fused) == 0


def test_a_leaf_under_a_parent_kept_whole_stays_untouched():
    """``leaf_modules`` are carried through whole also when their parent is kept whole (its children fused one by one)."""
    model = randomized(lambda: BranchOnData(conv_bn(4)))
    fused = fuse(model, inputs()[0], leaf_modules=["stem"])
    assert kept_whole(fused).keys() >= {""}
    assert type(fused.stem) is nn.Sequential and isinstance(fused.stem[1], nn.BatchNorm2d), fused.stem
    assert count_bn(fused) == 1  # the stem's; the others folded
    assert_same_calls(model, fused)


class ScriptedCounter(nn.Module):
    """The counter as TorchScript code would keep it: a Python int attribute (compiled with ``torch.jit.script``)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.n = 0
        self.body = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n += 1
        return self.body(x) * float(self.n)


def test_a_torchscript_child_is_carried_through_and_its_neighbours_fold():
    """A ScriptModule takes no hooks and its Python ``vars`` are compiler internals the first call rebuilds: neither
    may crash ``fuse`` or count as state.  It runs as it is; the BNs around it fold."""
    model = randomized(lambda: Net(nn.Conv2d(4, 4, 3, padding=1)))
    model.inner = torch.jit.script(model.inner)
    fused, reference = fused_and_reference(model)
    assert_same_calls(reference, fused)
    assert not kept_whole(fused) and count_bn(fused) == 0, str(fused.fuse_report)


def test_state_inside_a_torchscript_child_is_found():
    """Its declared attributes are watched (``self.n``, compiled): the part holding it runs as written."""
    model = randomized(lambda: Net(ScriptedCounter()))
    model.inner = torch.jit.script(model.inner)
    fused, reference = fused_and_reference(model)
    assert_same_calls(reference, fused)
    assert "'inner.n'" in kept_whole(fused).get("inner", ""), str(fused.fuse_report)


def test_a_torchscript_model_is_refused_with_the_way_out():
    with pytest.raises(TypeError, match="TorchScript module .*fuse the nn.Module first"):
        fuse(torch.jit.script(randomized(lambda: conv_bn(4))), inputs()[0])


@pytest.mark.parametrize("make", [LazyMean, LazyTable], ids=["lazy_mean", "lazy_table"])
def test_what_a_first_call_fills_from_the_input_size_is_state(make):
    """Its value at 6x6 is not its value at another size (``LazyTable``'s no longer broadcasts there, so a primed
    copy fails where a fresh one runs): the fused model must fill its own on its first call."""
    model = randomized(lambda: Net(make()))
    fused, reference = fused_and_reference(model)
    assert "inner" in kept_whole(fused), str(fused.fuse_report)
    x = torch.randn(2, 4, 12, 12, dtype=D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the first call of both is at 12x12
        torch.testing.assert_close(fused(x.clone()), reference(x.clone()), rtol=1e-9, atol=1e-9)


def test_a_table_kept_for_the_largest_size_seen_is_state_where_its_values_follow_its_size():
    """Probed only with calls after the example's, it looked like a cache: at a larger size it is rebuilt for that
    size.  But the example's size computes otherwise after a larger call, so the original, once called larger,
    returned another function than the fused model (4.0 apart): it must run as written."""
    model = randomized(lambda: Net(LargestTable(positional=False)))
    fused, reference = fused_and_reference(model)
    assert "'inner.table'" in kept_whole(fused).get("inner", ""), str(fused.fuse_report)
    large = torch.randn(2, 4, 12, 12, dtype=D, generator=torch.Generator().manual_seed(3))
    for k, x in enumerate([large, inputs()[0]]):
        with torch.no_grad():
            want = reference(x.clone())
            torch.testing.assert_close(fused(x.clone()), want, rtol=1e-9, atol=1e-9 * float(want.abs().max()), msg=lambda m: f"call {k + 1}: {m}")


def test_a_table_kept_for_the_largest_size_seen_whose_values_follow_the_position_is_a_cache():
    fused, reference = fused_and_reference(randomized(lambda: Net(LargestTable(positional=True))))
    assert_same_calls(reference, fused)
    assert not kept_whole(fused) and count_bn(fused) == 0, str(fused.fuse_report)


class CachedGCNConv(nn.Module):
    """PyG's ``GCNConv(cached=True)``: the first call normalizes its graph (self-loops, ``D^-1/2 A D^-1/2``) and
    keeps the normalized edges in a plain attribute, which later calls use whatever graph they are given."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.lin, self._cached = nn.Linear(c, c), None

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        if self._cached is None:
            loop = torch.arange(x.shape[0])
            edges = torch.cat([edge_index, torch.stack([loop, loop])], 1)
            deg = torch.zeros(x.shape[0], dtype=x.dtype).scatter_add_(0, edges[1], torch.ones(edges.shape[1], dtype=x.dtype))
            self._cached = edges, deg.rsqrt()[edges[0]] * deg.rsqrt()[edges[1]]
        edges, weight = self._cached
        h = self.lin(x)
        return torch.zeros_like(h).index_add_(0, edges[1], weight[:, None] * h[edges[0]])


class GraphNet(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.pre, self.conv = nn.Sequential(nn.Linear(c, c), nn.BatchNorm1d(c)), CachedGCNConv(c)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pre(x), edge_index)


def test_a_cache_filled_from_an_integer_input_is_state():
    """Only floating inputs were given other values, so a normalization cached from the example's ``edge_index``
    looked the same for any input: the fused model computed over the example's edges on every other graph (0.17
    apart; a probe).  Integers are also tried in another order: the conv runs as written, the rest folds."""
    model = randomized(GraphNet)
    g = torch.Generator().manual_seed(0)
    example = (torch.randn(10, 4, generator=g, dtype=D), torch.randint(0, 10, (2, 30), generator=g))
    fused = fuse(model, example)
    assert "'conv._cached'" in kept_whole(fused).get("conv", ""), str(fused.fuse_report)
    assert count_bn(fused) == 0, str(fused.fuse_report)
    reference = randomized(GraphNet)  # the model as it was: never called
    for x, edges in [(torch.randn(10, 4, generator=g, dtype=D), torch.randint(0, 10, (2, 30), generator=g)), example]:
        with torch.no_grad():
            want = reference(x, edges)
            torch.testing.assert_close(fused(x, edges), want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


class LabelCache(nn.Module):
    """A class-conditional block that caches its label's embedding on the first call (and uses it after)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.body, self.embed, self.cached = conv_bn(c), nn.Embedding(10, c), None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.cached is None:
            self.cached = self.embed(y)
        return self.body(x) * self.cached[..., None, None]


class LabelNet(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.stem, self.block = conv_bn(c), LabelCache(c)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.block(self.stem(x), y)


@pytest.mark.parametrize("label", [3, 0])
def test_a_cache_filled_from_one_integer_is_state(label):
    """Integers were only reordered, which leaves one label (or equal ones) as it is: the embedding the first call
    cached from the example's label was fused, and the model's first call with another label was 2.2 off (a
    review).  Integers halved are other values: the block runs as written, the stem folds.  Label 0 (a zeros
    example) halves to itself: ids one up are the other values there (it was fused as the example's, 4.35 off in
    review R4 finding 03)."""
    model = randomized(LabelNet)
    x = torch.randn(2, 4, 6, 6, dtype=D, generator=torch.Generator().manual_seed(0))
    fused = fuse(model, (x, torch.tensor([label, label])))
    assert "'block.cached'" in kept_whole(fused).get("block", ""), str(fused.fuse_report)
    reference = randomized(LabelNet)  # the model as it was: never called
    for y in (torch.tensor([5, 5]), torch.tensor([label, label])):
        with torch.no_grad():
            want = reference(x, y)
            torch.testing.assert_close(fused(x, y), want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


class SegmentMean(nn.Module):
    """Adds to each row of a packed batch ``(sum(lengths), C)`` its sequence's mean; the rows' sequence ids are cached
    by the first call (from its ``lengths``)."""

    def __init__(self) -> None:
        super().__init__()
        self.segment = None

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.segment is None:
            self.segment = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        sums = torch.zeros(lengths.numel(), x.shape[1], dtype=x.dtype).index_add_(0, self.segment, x)
        return x + (sums / lengths[:, None])[self.segment]


class PackedNet(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.pre, self.pool = nn.Sequential(nn.Linear(c, c), nn.BatchNorm1d(c)), SegmentMean()

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.pool(self.pre(x), lengths)


def test_a_cache_filled_from_lengths_in_another_order_is_state():
    """Halved, the lengths no longer sum to the rows and the model does not run (nothing learned there): lengths
    in another order show that the sequence ids the first call cached follow them."""
    model = randomized(PackedNet)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, dtype=D, generator=g)
    fused = fuse(model, (x, torch.tensor([3, 5])))
    assert "'pool.segment'" in kept_whole(fused).get("pool", ""), str(fused.fuse_report)
    reference = randomized(PackedNet)
    for lengths in (torch.tensor([6, 2]), torch.tensor([3, 5])):
        with torch.no_grad():
            want = reference(x, lengths)
            torch.testing.assert_close(fused(x, lengths), want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


class TokenRamp(nn.Module):
    """A positional ramp over the tokens of ``(B, N, C)``, built on the first call for its length (or a longer one)
    and sliced after: its values follow the first length."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.proj, self.ramp = nn.Linear(1, c), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        if self.ramp is None or self.ramp.shape[0] < n:
            self.ramp = torch.linspace(-1, 1, n, dtype=x.dtype)
        return x + self.proj(self.ramp[:n, None])


class TokenNet(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.fc, self.ramp, self.norm, self.out = nn.Linear(c, c), TokenRamp(c), nn.LayerNorm(c), nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.ramp(self.fc(x))))


def test_a_table_built_for_the_first_token_count_is_state():
    """The spatial sizes tried were the last two axes together, which for tokens ``(B, N, C)`` doubles the channels
    the Linear fixes: no call at another size ran, and a ramp built for the example's 16 tokens was fused (0.81 off
    at 8; a review).  Where no spatial size runs, each axis is doubled on its own: the ramp runs as written."""
    model = randomized(TokenNet)
    g = torch.Generator().manual_seed(0)
    fused = fuse(model, torch.randn(1, 16, 4, dtype=D, generator=g))
    assert "'ramp.ramp'" in kept_whole(fused).get("ramp", ""), str(fused.fuse_report)
    reference = randomized(TokenNet)
    for n in (8, 16, 24):
        x = torch.randn(1, n, 4, dtype=D, generator=g)
        with torch.no_grad():
            want = reference(x)
            torch.testing.assert_close(fused(x), want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


def test_an_attribute_every_call_rewrites_before_reading_is_not_state():
    """No call sees what an earlier one left: the model is one function of its input, and fuses fully."""
    model = randomized(lambda: Net(SizeScratch()))
    fused, reference = fused_and_reference(model)
    assert not kept_whole(fused) and count_bn(fused) == 0, str(fused.fuse_report)
    assert_same_calls(reference, fused)


def test_attributes_a_checksum_cannot_sum_are_no_state():
    """A large array of class names (numpy strings) made fuse raise numpy's TypeError, and a large quantized buffer
    made every capture fail (no sum): the model folds as before (review R11)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    model.class_names = np.array([f"n{i:08d} class {i}" for i in range(1000)])
    with warnings.catch_warnings():  # (torch says quantized tensors are deprecated)
        warnings.simplefilter("ignore")
        model.register_buffer("codebook", torch.quantize_per_tensor(torch.randn(5000), 0.1, 0, torch.qint8))
    fused = fuse(model, torch.randn(1, 3, 8, 8))
    assert count_bn(fused) == 0 and not kept_whole(fused), str(fused.fuse_report)


def test_state_an_op_writes_without_a_version_bump_is_found():
    """torch.ao's default QAT activation fake-quant (``FusedMovingAvgObsFakeQuantize``) still observes in eval mode,
    and its fused op updates ``min_val``/``max_val`` without bumping their version counters: compared by value."""
    from torch.ao.quantization import default_fused_act_fake_quant

    model = randomized(lambda: Net(default_fused_act_fake_quant())).float()
    model.train()
    with torch.no_grad():  # calibrate, as QAT training would
        for x in inputs():
            model(x.float())
    model.eval()
    reference = copy.deepcopy(model)
    fused = fuse(model, inputs()[0].float())  # the fake-quant op runs in float32 only
    assert "inner" in kept_whole(fused), str(fused.fuse_report)
    for k, x in enumerate([*inputs(), inputs()[0]]):
        with torch.no_grad():
            want = reference(x.float())  # float32, folded in float64: 1e-5 relative (a quantization step is ~1e-2)
            torch.testing.assert_close(fused(x.float()), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=lambda m: f"call {k + 1}: {m}")


class RunningMax(nn.Module):
    """Normalizes by the largest activation seen so far, kept in a buffer (``torch.maximum``): a running max."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.body = conv_bn(c)
        self.register_buffer("mx", torch.zeros(()))

    def forward(self, x):
        y = self.body(x)
        self.mx = torch.maximum(self.mx, y.abs().max())
        return y / (self.mx + 1.0)


def test_a_running_max_is_state_though_larger_inputs_do_not_move_it():
    # Probed only with larger inputs, the maximum the example left looked like a fill "the same for any input".
    model = randomized(RunningMax)
    x = torch.randn(2, 4, 8, 8, dtype=D, generator=torch.Generator().manual_seed(0))
    fused = fuse(model, x)
    assert float(model.mx) == 0.0  # the user's model is not run
    small = 0.01 * x
    ref = copy.deepcopy(model)
    for t in (small, x, small):
        torch.testing.assert_close(fused(t), ref(t), rtol=1e-9, atol=1e-12)


class StoresLast(nn.Module):
    """``self.last = y``: a side output stored on every call, read by nothing in forward (a feature for a loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.last = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = x * 2
        return x.relu()


def test_a_side_output_stored_on_every_call_is_named_as_one_the_fused_module_does_not_store():
    """It is no state (no call reads it) and no cache either: its value follows the input, and the report said
    "a first call fills 'inner.last', the same for any input"."""
    fused, reference = fused_and_reference(randomized(lambda: Net(StoresLast())))
    assert_same_calls(reference, fused)
    notes = "\n".join(fused.fuse_report.notes)
    assert "every call stores 'inner.last' from its input" in notes and "first call fills" not in notes, notes


def test_a_nan_in_a_weight_is_not_taken_for_a_change():
    """A parameter holding a NaN equals itself after a call: it was reported as changed by forward (NaN != NaN)
    and the model kept whole, or refused with ``strict=True``."""
    model = randomized(lambda: Net(conv_bn(4)))
    with torch.no_grad():
        model.inner[0].weight[0, 0, 0, 0] = float("nan")
    fused = fuse(model, inputs()[0], strict=True)
    assert not kept_whole(fused), str(fused.fuse_report)


class CachesItsBiasInTrain(nn.Module):
    """EfficientViT's (MSRA) and TinyViT's attention: ``train(False)`` caches the bias gathered from its table as
    ``self.ab``, which eval reads."""

    def __init__(self, c: int = 4, n: int = 16) -> None:
        super().__init__()
        self.proj = conv_bn(c)
        self.biases = nn.Parameter(torch.zeros(3))
        self.register_buffer("idxs", torch.randint(0, 3, (n, n)))

    @torch.no_grad()
    def train(self, mode: bool = True):
        super().train(mode)
        if mode and hasattr(self, "ab"):
            del self.ab
        else:
            self.ab = self.biases[self.idxs]
        return self

    def forward(self, x):
        t = self.proj(x).flatten(2)
        return (t @ (self.biases[self.idxs] if self.training else self.ab)).softmax(-1)


def test_a_model_in_eval_mode_is_fused_as_it_computes_not_as_eval_would_cache_again():
    """The bias table loaded after ``eval()``: the model computes with its cached bias.  ``fuse`` called ``eval()`` on
    its copy, which cached again from the new table, and the fused model (and its check) followed that copy: 0.64
    off, unchecked.  A model in training mode is fused as ``model.eval()`` makes it."""
    model = randomized(CachesItsBiasInTrain).eval()
    with torch.no_grad():
        model.biases.copy_(torch.tensor([1.0, -2.0, 3.0]))  # as load_state_dict after eval()
    x = torch.randn(2, 4, 4, 4, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(fuse(model, x)(x), model(x), rtol=1e-9, atol=1e-12)  # float64: verify's tolerance
        training = copy.deepcopy(model).train()
        torch.testing.assert_close(fuse(training, x)(x), copy.deepcopy(training).eval()(x), rtol=1e-9, atol=1e-12)
        assert training.training and not hasattr(training, "ab")  # the user's model untouched


class StyleMixing(nn.Module):
    """rosinality's StyleGAN2 style mixing: two styles, crossed at a layer drawn at random on every call (Python's
    ``random.randint``, numpy's, or torch's read into Python); then a conv + BN that folds."""

    def __init__(self, draw: str, layers: int = 6) -> None:
        super().__init__()
        self.draw = draw
        self.style = nn.Sequential(nn.Linear(8, 8), nn.LeakyReLU(0.2), nn.Linear(8, 8))
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(layers))
        self.head = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1, bias=False), nn.BatchNorm1d(4))

    def crossover(self, n: int) -> int:
        if self.draw == "python":
            return random.randint(1, n - 1)
        if self.draw == "numpy":
            return int(np.random.randint(1, n))
        return int(torch.randint(1, n, ()).item())

    def forward(self, z1, z2):
        cut = self.crossover(len(self.layers))
        w1, w2 = self.style(z1), self.style(z2)
        h = z1
        for i, layer in enumerate(self.layers):
            h = torch.tanh(layer(h) + (w1 if i < cut else w2))
        return self.head(h.unsqueeze(1))


def generators() -> tuple:
    return bytes(torch.random.get_rng_state().numpy()), random.getstate(), np.random.get_state()[1].tobytes()


def seeded_calls(model: nn.Module, inputs: tuple, seed: int, calls: int = 6) -> list[torch.Tensor]:
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    with torch.no_grad():
        return [model(*inputs) for _ in range(calls)]


@pytest.mark.parametrize("draw", ["python", "numpy", "torch"])
def test_a_number_drawn_in_python_is_never_frozen_by_a_capture(draw):
    """torch.fx runs ``random.randint`` once while it traces and records its number: the fused model crossed the
    styles at one layer on every call, where the model draws one of five.  The checks compared one run of the
    model with it, so one time in five they drew that layer too and passed (found by a probe).  A call that
    advances a generator now makes the drawing module state: it runs as written, drawing as the model does, and
    its children fuse; the generators are left where they were."""
    torch.manual_seed(0)
    model = StyleMixing(draw).to(D).eval()
    model.head[1].running_mean.uniform_(-1, 1)
    z1, z2 = torch.randn(4, 8, dtype=D), torch.randn(4, 8, dtype=D)
    for seed in range(8):  # (several seeds: each drew the frozen layer again with its own chance)
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        before = generators()
        fused = fuse(model, (z1, z2))
        assert generators() == before, "fuse moved a global generator"
        assert "draws random numbers" in fused.fuse_report.parts[0].reason, str(fused.fuse_report)
        got, want = seeded_calls(fused, (z1, z2), seed), seeded_calls(model, (z1, z2), seed)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        assert len({float(t.sum()) for t in got}) > 1, "the fused model crossed the styles at one layer only"


class NoisyBlocks(nn.Module):
    """A VAE-style sample between two conv + BN stages, and StyleGAN2's noise injection in a child of its own."""

    class Noise(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.tensor(0.3))

        def forward(self, x):
            return x + self.weight * x.new_empty(x.shape[0], 1, *x.shape[2:]).normal_()

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(conv_bn(4), nn.ReLU(), nn.Conv2d(4, 8, 1))
        self.decoder = nn.Sequential(conv_bn(4), self.Noise(), conv_bn(4))

    def forward(self, x):
        mu, log_var = self.encoder(x).chunk(2, dim=1)
        return self.decoder(mu + torch.exp(0.5 * log_var) * torch.randn_like(mu))


def test_around_a_draw_everything_folds_and_the_draws_are_the_models():
    """A VAE's sample kept the whole model as written, and its encoder and decoder, fused on their own, were
    swapped back: the checks compared runs that drew other numbers (found by two probes).  The checks now draw the
    same numbers in the model and the candidate: only the modules whose own code draws run as written (the model's
    forward, though its decoder draws too, and the noise injection), every BatchNorm folds, and with the same seed the fused model computes what
    the model does.  export_onnx refuses the model by name."""
    model = randomized(NoisyBlocks)
    x = torch.randn(2, 4, 8, 8, dtype=D)
    fused = fuse(model, x)
    assert count_bn(fused) == 0, str(fused.fuse_report)
    kept = {p.path: p.reason for p in fused.fuse_report.parts if p.how == "kept whole"}
    assert list(kept) == [""] and "draws random numbers" in kept[""], str(fused.fuse_report)
    assert "carried through unchanged (1 call): decoder.1" in str(fused.fuse_report)  # the noise, inside the decoder
    for a, b in zip(seeded_calls(fused, (x,), 3), seeded_calls(model, (x,), 3)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match=r"NoisyBlocks to ONNX: the model's own forward, 'decoder.1' draws random numbers \(torch's"):
        export_onnx(model, None, x)


class PutBackNoise(nn.Module):
    """Noise drawn inside ``torch.random.fork_rng()``: the generator is put back, so every call adds the same noise."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(4), conv_bn(4)

    def forward(self, x):
        y = self.a(x)
        with torch.random.fork_rng():
            noise = torch.randn_like(y)
        return self.b(y + 0.1 * noise)


def test_a_draw_the_model_puts_back_is_not_captured_as_a_draw():
    """No generator moves across a call, so no module was seen drawing: fx captured ``randn_like`` as a call,
    the first call agreed (the checks start both from the same state) and the next ones drew on, 0.59 off (the
    fused model gave new noise on every call; the model the same).  The checks now also compare where each run
    leaves the generators: the forward runs as written, and its children fuse."""
    model = randomized(PutBackNoise)
    x = torch.randn(2, 4, 8, 8, dtype=D)
    before = generators()
    fused = fuse(model, x)
    assert generators() == before, "fuse moved a global generator"
    assert count_bn(fused) == 0, str(fused.fuse_report)
    assert "torch's random generator elsewhere" in fused.fuse_report.parts[0].reason, str(fused.fuse_report)
    with torch.no_grad():
        want = model(x)
        for _ in range(3):
            torch.testing.assert_close(fused(x), want, rtol=1e-9, atol=1e-12)


class SeedsItsNoise(nn.Module):
    """Fixed noise: ``torch.manual_seed(0)`` in forward, then a draw (the same noise on every call)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn(4)

    def forward(self, x):
        y = self.a(x)
        torch.manual_seed(0)
        return y + torch.randn_like(y)


def test_a_draw_the_model_seeds_itself_is_not_captured_as_a_draw():
    """The trace ran ``torch.manual_seed(0)`` for real, and the checks ran from where it left the generator: the
    capture drew what the model draws there, and the fused model drew on, 4.8 off (found by a review).  The
    checks start their generators at a seed of their own."""
    model = randomized(SeedsItsNoise)
    x = torch.randn(2, 4, 8, 8, dtype=D)
    before = generators()
    fused = fuse(model, x)
    assert generators() == before, "fuse moved a global generator"
    with torch.no_grad():
        want = model(x)
        for _ in range(2):
            torch.testing.assert_close(fused(x), want, rtol=1e-9, atol=1e-12)


SHARED = torch.Generator().manual_seed(0)  # a generator the model draws from without holding it


class OwnGenerator(nn.Module):
    """Draws from a generator it holds (``self.rng = random.Random(0)``, ``np.random.default_rng(0)``), or from a
    ``torch.Generator`` it is given (``torch.randn(shape, generator=G)``)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.lin, self.bn = kind, nn.Linear(4, 4), nn.BatchNorm1d(4)
        self.rng = random.Random(0) if kind == "python" else np.random.default_rng(0) if kind == "numpy" else None

    def forward(self, x):
        y = self.bn(self.lin(x))
        if self.kind == "python":
            return y * self.rng.randint(1, 9)
        if self.kind == "numpy":
            return y * float(self.rng.integers(1, 9))
        return y + torch.randn(y.shape, generator=SHARED, dtype=y.dtype)


@pytest.mark.parametrize("kind", ["python", "numpy", "given"])
def test_a_draw_from_a_generator_the_model_holds_or_is_given_is_not_frozen(kind):
    """fx ran ``self.rng.randint`` once and held its number (a generator the model holds is no global one, which
    fuse watched), and a carried call held a copy of the ``generator=`` it was given (found by a review).  The
    module runs as written: each call draws from its own generator as the model's does."""
    model = randomized(lambda: OwnGenerator(kind))
    x = torch.randn(3, 4, dtype=D)
    fused = fuse(model, x)
    for _ in range(4):  # each draws the next number of its own generator (a copy of the model's at fuse)
        SHARED.manual_seed(7)
        want = model(x)
        SHARED.manual_seed(7)
        torch.testing.assert_close(fused(x), want, rtol=1e-9, atol=1e-12)


def test_a_cache_filled_by_a_call_with_autograd_on_copies():
    """A bias table cached in a dict by an eval call without ``torch.no_grad`` is no autograd leaf, and
    ``copy.deepcopy`` refused the model (timm's EfficientFormer, LeViT; found by a probe).  It copies detached."""
    model = randomized(lambda: Net(BiasCache()))
    x = inputs(1)[0]
    model(x)  # (autograd on: the cached table has a grad_fn)
    assert next(iter(model.inner.cache.values())).grad_fn is not None
    fused = fuse(model, x)
    assert count_bn(fused) == 0, str(fused.fuse_report)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-12)


class RecastsItsTime(nn.Module):
    """torchdiffeq's ODEBlock: ``self.integration_time = self.integration_time.type_as(x)`` on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(4)
        self.integration_time = torch.tensor([0.0, 1.5])

    def forward(self, x):
        self.integration_time = self.integration_time.type_as(x)
        return self.body(x) * self.integration_time[1]




class S4DKernel(nn.Module):
    """S4D's convolution kernel of a length, made in complex arithmetic (state-spaces' s4d.py, trimmed)."""

    def __init__(self, h: int = 4, n: int = 8) -> None:
        super().__init__()
        self.log_dt = nn.Parameter(torch.linspace(-6, -2, h))
        self.C = nn.Parameter(torch.view_as_real(torch.randn(h, n // 2, dtype=torch.cfloat)))
        self.log_A_real = nn.Parameter(torch.log(0.5 * torch.ones(h, n // 2)))
        self.register_buffer("A_imag", math.pi * torch.arange(n // 2).float().repeat(h, 1))

    def forward(self, length):
        dt = torch.exp(self.log_dt)
        A = -torch.exp(self.log_A_real) + 1j * self.A_imag
        dtA = A * dt.unsqueeze(-1)
        C = torch.view_as_complex(self.C) * (torch.exp(dtA) - 1.0) / A
        return 2 * torch.einsum("hn, hnl -> hl", C, torch.exp(dtA.unsqueeze(-1) * torch.arange(length))).real


class KernelCache(nn.Module):
    """An S4D layer whose kernel is cached per length on the first call of that length, in a dict, an OrderedDict,
    a defaultdict, or a dict inside a dict."""

    def __init__(self, kind: str = "dict") -> None:
        super().__init__()
        self.kernel = S4DKernel()
        self.pre = nn.Sequential(nn.Conv1d(4, 4, 1, bias=False), nn.BatchNorm1d(4))
        self.post = nn.Conv1d(4, 4, 1)
        self.nested = kind == "nested"
        self.cache = {"len": {}} if self.nested else {"dict": dict, "OrderedDict": OrderedDict, "defaultdict": lambda: defaultdict(int)}[kind]()

    def forward(self, u):
        u = self.pre(u)
        cache = self.cache["len"] if self.nested else self.cache
        if "kernel" not in cache:  # (one length: keyed by u.size(-1), the key is a size read with a check, review R9)
            cache["kernel"] = self.kernel(u.size(-1)).detach()
        return self.post(u * cache["kernel"])


@pytest.mark.parametrize("kind", ["dict", "OrderedDict", "defaultdict", "nested"])
def test_a_cache_a_check_in_float64_fills_is_not_left_in_the_model_fuse_keeps(kind):
    """A check run in float64 filled the cache of fuse's private copy, whose next run in float32 failed: "does not
    run in eval mode ... Input type (double) and bias type (float)" (found by a probe; in another kind of dict, by a
    review).  What a run in a dtype other than the model's sets on its modules is put back."""
    torch.manual_seed(0)
    model = KernelCache(kind).eval()
    model.pre[1].running_mean.uniform_(-1, 1)
    x = torch.randn(2, 4, 16)
    fused = fuse(model, x)
    assert count_bn(fused) == 0 and not (model.cache["len"] if kind == "nested" else model.cache), str(fused.fuse_report)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-6)  # float32, folded in float64


class KeepsItsSize(nn.Module):
    """A forward that stores the input's size as a tuple attribute and reads it back (``self.hw = (H, W)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(4)
        self.hw = (0, 0)

    def forward(self, x):
        self.hw = (x.shape[2], x.shape[3])
        return self.body(x).flatten(2).reshape(x.shape[0], 4, *self.hw)


@pytest.mark.parametrize("make", [RecastsItsTime, KeepsItsSize], ids=["from-itself", "tuple-of-sizes"])
def test_an_attribute_set_from_itself_each_call_keeps_fx(make):
    """fx left a proxy of its trace on the module; the next trace read it and failed, and the model went to
    torch.export with every size fixed (found by a probe).  The module gets its value back after each trace (a
    tuple of sizes too)."""
    model = randomized(make)
    fused = fuse(model, inputs(1)[0])
    assert fused.fuse_report.capture == "fx" and count_bn(fused) == 0, str(fused.fuse_report)
    x = torch.randn(3, 4, 9, 7, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-12)
    assert torch.is_tensor(model.integration_time) if make is RecastsItsTime else model.hw == (9, 7)


def _shift_off(x: torch.Tensor, shift: list, window: int) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` habit: where the window covers the map, ``shift[0] = 0`` on the
    block's own list, for good."""
    if window >= x.shape[-1]:
        shift[0] = 0
    return torch.roll(x, shifts=shift[0], dims=-1) if shift[0] else x


torch.fx.wrap("_shift_off")


class ShiftedBlock(nn.Module):
    def __init__(self, c: int, window: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.window, self.shift = window, [window // 2]

    def forward(self, x):
        return x + _shift_off(self.conv(x), self.shift, self.window)


def test_a_first_call_that_turns_a_shift_off_at_twice_the_size_too_is_state():
    """Both blocks turn their shift off at the example; the deeper one also at twice its size, so only the first
    was found to hold state, and the deeper one's capture was kept beside a copy for other sizes that the calls
    its capture answered never reached: a larger call after one at the example's size was 1.07 off (found by a
    probe).  A first call is also compared at four times the size now: both blocks hold state, and the fused
    model computes what the model does for either order of calls (a review found the first fix wrong for the
    other order)."""
    model = seeded(lambda: nn.Sequential(ShiftedBlock(4, 4), nn.AvgPool2d(2), ShiftedBlock(4, 4)), 0)().double().eval()
    fused = fuse(model, torch.randn(1, 4, 4, 4, dtype=torch.float64))
    for order in (((1, 4, 4, 4), (1, 4, 16, 16), (2, 4, 12, 12)), ((1, 4, 16, 16), (1, 4, 4, 4), (1, 4, 16, 16))):
        used, ours = copy.deepcopy(model), copy.deepcopy(fused)  # each called as the other is, from the start
        with torch.no_grad():
            for shape in order:
                x = torch.randn(*shape, dtype=torch.float64)
                torch.testing.assert_close(ours(x), used(x), rtol=1e-12, atol=1e-12)


class _Neighbour:
    """Another thread that draws from torch's generator while the model's call number ``on`` runs, and only then
    (a hook function reads it as a global: fuse copies the model, hooks included).  Its counts are instrumentation
    of the test, not data of the model's code, which fuse watches in its captures and puts back after its runs: the
    model's code reaches it through a ``ContextVar``, which that watch sees by identity (a global list holding it
    shows its counts, slots included)."""

    __slots__ = ("on", "calls", "drawn", "go", "done")

    def __init__(self, on: set[int]) -> None:
        import threading

        self.on, self.calls, self.drawn = on, 0, 0
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        threading.Thread(target=self._draw, daemon=True).start()

    def _draw(self) -> None:
        while True:
            self.go.acquire()
            torch.rand(3)
            self.drawn += 1
            self.done.release()


NEIGHBOUR: contextvars.ContextVar[_Neighbour | None] = contextvars.ContextVar("NEIGHBOUR", default=None)


def _neighbour_draws() -> None:
    n = NEIGHBOUR.get()
    if n is None:
        return
    n.calls += 1
    if n.calls in n.on:
        n.go.release()
        n.done.acquire()


class _Ticks(nn.Module):
    """Where the neighbour may draw: a call of the model (an identity; its trace runs the tick too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _neighbour_draws()
        return x


def test_a_draw_of_another_thread_during_a_call_is_not_the_models():
    """Another thread that draws while fuse watches a call moves the global generator too: that made a model that
    draws nothing kept whole as one that does (the threads test, on a busy machine).  A draw counts where two
    calls seeded alike leave the generator at one state, another than the seed's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), _Ticks()).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    token = NEIGHBOUR.set(_Neighbour(on={2, 3}))  # during fuse's first runs of the model
    x = torch.randn(2, 3, 6, 6)
    try:
        fused = fuse(model, x)
    finally:
        neighbour = NEIGHBOUR.get()
        NEIGHBOUR.reset(token)
    assert neighbour.drawn == 2, neighbour.calls
    report = fused.fuse_report
    assert not report.kept_whole and not any("random" in n or "fills" in n for n in report.notes), str(report)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)  # float32, folded in float64


class _Leaky(nn.Module):
    """snntorch's neuron: its update rule a bound method held as an attribute, its membrane a buffer sized lazily."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mem", torch.zeros(0), False)
        self.state_function = self._base_sub

    def _base_sub(self, x):
        return 0.5 * self.mem + x

    def forward(self, x):
        if not self.mem.shape == x.shape:
            self.mem = torch.zeros_like(x)
        self.mem = self.state_function(x)
        spk = (self.mem > 1.0).to(x.dtype)
        self.mem = self.mem - spk
        return spk + self.mem


def test_a_bound_method_held_by_a_part_with_state_is_bound_to_that_part():
    """Restoring the neuron's state after fuse's runs copied its ``state_function`` on its own, bound to a third
    neuron whose membrane no call reached: the two-call check failed and the whole model was kept whole, its BatchNorm
    unfolded (found by a probe).  The copy is bound to the neuron restored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), _Leaky()).double().eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].running_mean.uniform_(-0.5, 0.5)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    fused = fuse(model, x)
    assert fused.fuse_report.capture == "fx" and count_bn(fused) == 0, str(fused.fuse_report)
    for k in range(3):  # the membrane carries over: each call compared in turn, in float64
        y = x * (k + 1)
        torch.testing.assert_close(fused(y), ref(y), rtol=1e-10, atol=1e-10)


class _CountedPaths(nn.Module):
    """Counts its calls in a plain attribute, and calls its branches through a plain dict naming them, as routing
    blocks write it (``self.paths = {"main": self.a, "skip": self.b}``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(4), conv_bn(4)
        self.calls = 0
        self.paths = {"main": self.a, "skip": self.b}

    def forward(self, x):
        self.calls += 1
        return self.paths["main"](x) + self.paths["skip"](x) * self.calls


def test_a_plain_attribute_naming_a_child_names_the_fused_models_child():
    """A block kept whole for its counter ran ``self.paths["main"]``, a third copy of its child that no ``_modules``
    held: ``fused.double()`` did not reach it, and the fused model failed where the model runs (found by a review).
    The attribute names the fused model's own child (kept as written, as the attribute needs it); the rest fuses."""
    model = seeded(lambda: nn.Sequential(conv_bn(4), _CountedPaths()), 0)()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 4, 8, 8)
    fused = fuse(model, x)
    block = next(m for m in fused.modules() if isinstance(m, _CountedPaths))
    assert block.paths["main"] is block.a and block.paths["skip"] is block.b, str(fused.fuse_report)
    assert count_bn(fused) == 2, str(fused.fuse_report)  # the stem's folds; the branches the dict names stay
    fused.double(), ref.double()
    for k in range(2):  # the counter carries over: each call compared in turn
        y = x.double() * (k + 1)
        torch.testing.assert_close(fused(y), ref(y), rtol=1e-5, atol=1e-5)  # folded in float64, held in float32


class _LazyProjection(nn.Module):
    """Draws its projection on its first call (a lazy random init)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.proj = None

    def forward(self, x):
        if self.proj is None:
            self.proj = torch.randn(x.shape[1], x.shape[1], dtype=x.dtype)
        return torch.einsum("bchw,cd->bdhw", self.bn(self.conv(x)), self.proj)


def test_a_first_calls_draw_is_noted_as_the_models():
    """The check that tells another thread's draws from the model's ran the copy fuse's first calls had run, saw no
    draw, and dropped the note that a first call fills the generator (found by a review)."""
    torch.manual_seed(0)
    fused = fuse(_LazyProjection().double().eval(), torch.randn(2, 4, 5, 5, dtype=torch.float64))
    assert any("a first call fills" in n and "random generator" in n for n in fused.fuse_report.notes), fused.fuse_report.notes


class ComparesWithNoShape(nn.Module):
    """A shape compared with ``None`` (``!=`` and ``==``) as Ultralytics' ``Detect`` compares its cache before a first
    call; here nothing is ever cached: the test is the same whatever the sizes."""

    shape = None

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(4, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.down(x)
        if self.shape != y.shape:
            y = y + 1.0
        if y.shape[2:] == self.shape:
            y = y * 3.0
        return y


def test_a_shape_compared_with_none_is_answered_for_every_input():
    """fx recorded ``y.shape != None`` as a test of the sizes of a value computed inside, which no input can check,
    and the model was captured by torch.export at the example's shapes (refused at any other size).  A shape is a
    tuple, which is never ``None``: now fx answers it for every input, and the fused model runs at any size (float64
    to 1e-9 relative, verify's float64 tolerance)."""
    model = randomized(ComparesWithNoShape)
    fused = fuse(model, torch.randn(2, 4, 16, 16, dtype=D))
    assert fused.fuse_report.capture == "fx" and count_bn(fused) == 0, str(fused.fuse_report)
    for shape in [(2, 4, 16, 16), (1, 4, 24, 8)]:
        x = torch.randn(shape, dtype=D)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-9)


class TransductiveGCN(nn.Module):
    """A GCN that holds its graph's sparse normalized adjacency as a buffer (pygcn and LightGCN variants)."""

    def __init__(self, adj: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("adj", adj)
        self.w1, self.bn, self.w2 = nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.bn(torch.sparse.mm(self.adj, self.w1(x))))
        return torch.sparse.mm(self.adj, self.w2(h))


def test_a_sparse_buffer_is_watched_as_state():
    """The state watch compared the copied sparse buffer with ``torch.equal``: ``export_onnx`` raised
    NotImplementedError ('aten::equal' on the SparseCPU backend; found by a probe).  Its entries are compared
    now: the fused model is exact, and the export refuses by name (torch.onnx.export has no sparse matmul)."""
    gen = torch.Generator().manual_seed(0)
    a = (torch.rand(10, 10, generator=gen) > 0.7).to(D) + torch.eye(10, dtype=D)
    model = seeded(TransductiveGCN, 0, adj=(a / a.sum(1, keepdim=True)).to_sparse())().to(D)
    x = torch.randn(10, 8, dtype=D)
    fused = fuse(model, x)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="_sparse_mm"):
        export_onnx(fused, None, x)


def test_restore_in_place_puts_back_what_runs_changed_in_the_tensors_themselves():
    """``restore_in_place`` writes the initial values into the tensors a part holds (a buffer it shares with its
    parent stays shared): with its children fused, fuse's runs touch copies only, so no test of fuse sees it; its
    contract, checked here directly."""
    from repalgebra.frontend.state import restore_in_place

    initial = randomized(Counter)
    part = copy.deepcopy(initial)
    held = part.n
    with torch.no_grad():
        part(inputs()[0])
        part(inputs()[0])
    assert float(part.n) == 2.0
    restore_in_place(part, initial)
    assert part.n is held and float(held) == float(initial.n) == 0.0


class AnchorCachingDetect(nn.Module):
    """Ultralytics' ``Detect`` (``ultralytics/nn/modules/head.py``) as YOLOv8 and YOLO11 run it: its anchors are cached
    by the shape of the first feature map, in class attributes until a call fills them, and recomputed where
    ``self.dynamic or self.shape != shape``.  The zoo's ``Detect`` recomputes them on every call."""

    dynamic = False  # force grid reconstruction
    export = False  # export mode
    format = None  # export format
    shape = None
    anchors = torch.empty(0)  # init
    strides = torch.empty(0)  # init

    def __init__(self, nc: int = 3, ch: tuple = ()) -> None:
        super().__init__()
        from zoo.detection import DFL, Conv

        self.nc = nc  # number of classes
        self.nl = len(ch)  # number of detection layers
        self.reg_max = 8  # DFL channels
        self.no = nc + self.reg_max * 4  # number of outputs per anchor
        self.stride = torch.tensor([8.0, 16.0])  # strides computed during build
        c2, c3 = max((16, ch[0] // 4, self.reg_max * 4)), max(ch[0], min(self.nc, 100))  # channels
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1)) for x in ch
        )
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, self.nc, 1)) for x in ch)
        self.dfl = DFL(self.reg_max) if self.reg_max > 1 else nn.Identity()

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        for i in range(self.nl):
            x[i] = torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1)
        return self._inference(x)

    def _inference(self, x: list[torch.Tensor]) -> torch.Tensor:
        from zoo.detection import dist2bbox, make_anchors

        shape = x[0].shape  # BCHW
        x_cat = torch.cat([xi.view(shape[0], self.no, -1) for xi in x], 2)
        if self.format != "imx" and (self.dynamic or self.shape != shape):
            self.anchors, self.strides = (x.transpose(0, 1) for x in make_anchors(x, self.stride, 0.5))
            self.shape = shape
        box, cls = x_cat.split((self.reg_max * 4, self.nc), 1)
        dbox = dist2bbox(self.dfl(box), self.anchors.unsqueeze(0), xywh=True, dim=1) * self.strides
        return torch.cat((dbox, cls.sigmoid()), 1)


def yolov8_with_anchor_cache() -> nn.Module:
    """The zoo's YOLOv8 slice with its head as Ultralytics writes it (:class:`AnchorCachingDetect`)."""
    from zoo.detection import YOLO

    model = YOLO(nc=3)
    head = AnchorCachingDetect(3, (24, 32))
    head.i, head.f = model.model[14].i, model.model[14].f
    model.model[14] = head
    return model


def images(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(sum(shape)))


@pytest.mark.parametrize("called_at", [None, (1, 3, 32, 96)], ids=["never_called", "called_by_the_user"])
def test_a_detect_head_whose_anchors_are_cached_by_shape_is_kept_whole_and_the_model_runs_at_any_size(called_at):
    """YOLOv8's ``Detect`` caches its anchors by its input's shape: as called once, the model's capture read
    ``self.shape != shape`` and the anchors at the example's 64x64 only, so the fused model was captured by
    torch.export and refused every other image size by name, where the model runs at any.  The head is kept
    whole now, as the model holds it (never called, or called by the user at another size), its convs fused on
    their own, and the rest captured with fx around it: calls at a new size, back at the example's and at
    another batch agree call for call, and the model itself is not changed."""
    model = seeded(yolov8_with_anchor_cache, 902)().to(D)
    if called_at is not None:
        with torch.no_grad():
            model(images(*called_at))
    before = copy.deepcopy(model)
    fused = fuse(model, images(1, 3, 64, 64))
    assert vars(model.model[14]).get("shape") == vars(before.model[14]).get("shape")
    assert "a first call fills 'model.14.anchors'" in kept_whole(fused).get("model.14", ""), str(fused.fuse_report)
    assert kept_whole(fused).keys() == {"model.14"} and count_bn(fused) == 0, str(fused.fuse_report)
    head = next(m for m in fused.modules() if isinstance(m, AnchorCachingDetect))
    assert vars(head).get("shape") == vars(before.model[14]).get("shape")  # its cache, as the model holds it
    for k, shape in enumerate([(1, 3, 96, 64), (1, 3, 64, 64), (3, 3, 96, 64), (3, 3, 64, 64), (1, 3, 96, 64)]):
        x = images(*shape)
        with torch.no_grad():
            want, got = before(x.clone()), fused(x.clone())
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()), msg=lambda m: f"call {k + 1} at {shape}: {m}")
    for (name, a), (_, b) in zip(before.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), f"fuse changed the model's {name}"


def test_a_detect_head_kept_whole_for_its_anchor_cache_exports_to_onnx_at_a_dynamic_batch():
    """The fused model with the head kept whole exports at the example's image size (the head written by
    torch.onnx.export), its batch dynamic, and computes what the model does at batches 1 and 3."""
    import onnxruntime as ort

    model = seeded(yolov8_with_anchor_cache, 902)()
    fused = fuse(model, torch.randn(1, 3, 64, 64))
    proto = export_onnx(fused, None, torch.randn(1, 3, 64, 64))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param, proto.graph.input[0]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = model(x)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


class TopDetections(nn.Module):
    """The model and the top-scoring boxes of its head's output, as Ultralytics' ``v10Detect.postprocess`` takes them:
    ``min(max_det, anchors)`` reads the number of anchors, a size computed inside, as a number."""

    max_det = 300

    def __init__(self) -> None:
        super().__init__()
        self.yolo = yolov8_with_anchor_cache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preds = self.yolo(x)  # (b, 4 + nc, anchors)
        anchors = preds.shape[-1]
        index = preds[:, 4:].amax(1).topk(min(self.max_det, anchors), dim=1).indices
        return preds.gather(2, index.unsqueeze(1).expand(-1, preds.shape[1], -1))


def test_a_cached_head_is_not_kept_whole_where_no_capture_around_it_holds():
    """Around the head, the model's own code reads a size of its output as a number, which fx cannot capture: the
    model itself would be kept whole, folding only the head's convs.  The capture at the example's image size
    stands (every BatchNorm folded), exact there at any batch."""
    model = seeded(TopDetections, 902)().to(D)
    fused = fuse(model, images(1, 3, 64, 64))
    assert not kept_whole(fused) and count_bn(fused) == 0, str(fused.fuse_report)
    assert any(p.how == "specialized" for p in fused.fuse_report.parts), str(fused.fuse_report)
    for shape in [(1, 3, 64, 64), (3, 3, 64, 64)]:
        x = images(*shape)
        with torch.no_grad():
            want = model(x.clone())
        torch.testing.assert_close(fused(x.clone()), want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
class CountsAndHalvesTarget(nn.Module):
    """Counts its calls, and halves the tensor it holds as a plain attribute (its parent's ``shift``) where the
    input is large: a region kept whole for its state, with a conv and a BatchNorm inside."""

    def __init__(self, target: torch.Tensor, c: int = 4) -> None:
        super().__init__()
        self.__dict__["target"] = target
        self.register_buffer("n", torch.zeros((), dtype=D))
        self.body = conv_bn(c).to(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n += 1
        if x.abs().amax() > 10:
            with torch.no_grad():
                self.target.mul_(0.5)
        return self.body(x)


class ShiftAfterRegion(nn.Module):
    """``region(x) + conv(x) + shift``, the region halving ``shift`` through its plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, dtype=D)
        self.shift = nn.Parameter(torch.ones(1, 4, 1, 1, dtype=D))
        self.region = CountsAndHalvesTarget(self.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.region(x) + self.conv(x) + self.shift


def test_a_region_kept_for_its_state_holding_its_parents_tensor_plainly_stays_tied_to_it():
    """A region's children were fused inside a copy of the region made on its own (``fuse_inside_regions``), whose
    ``target`` was a tensor of its own: its halving missed the fused model's ``shift`` (0.5, 0.75, 0.875 off; found
    fixing review R6 finding 06).  The region stays as the fused model holds it, its children as written."""
    torch.manual_seed(0)
    model = ShiftAfterRegion().eval()
    fused = fuse(model, 0.01 * torch.randn(1, 4, 8, 8, dtype=D))
    assert "'region': its children are not fused" in str(fused.fuse_report), fused.fuse_report
    with torch.no_grad():
        for _ in range(3):  # (compared with the model itself: fuse never changes it)
            x = 100 * torch.randn(1, 4, 8, 8, dtype=D)
            torch.testing.assert_close(fused(x.clone()), model(x.clone()), rtol=1e-9, atol=1e-9)
    assert model.shift.flatten()[0] == 0.125


class FirstBatchScale(nn.Module):
    """A scale taken from the first batch the model sees (a lazy calibration), kept for every later call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.scale = None

    def forward(self, x):
        if self.scale is None:
            self.scale = x.abs().amax().detach()
        return self.bn(self.conv(x)) * self.scale


def test_a_first_call_filled_from_its_input_is_no_cache():
    """What a first call fills from its input's values is state, not a cache: fused as called once, the fused model
    would hold the example's scale where the model's first call takes its own.  Both, first called on another batch,
    compute the same."""
    model = randomized(FirstBatchScale)
    fused = fuse(model, torch.randn(2, 4, 5, 5, dtype=D))
    y = 7.0 * torch.randn(2, 4, 5, 5, dtype=D)
    used, ours = copy.deepcopy(model), copy.deepcopy(fused)
    with torch.no_grad():
        torch.testing.assert_close(ours(y), used(y), rtol=1e-9, atol=1e-12)


class ShiftOffInForward(nn.Module):
    """torchvision's ``shifted_window_attention`` habit in the block's own forward: where the window covers the map,
    ``self.shift[0] = 0`` on its own list, for good."""

    def __init__(self, c: int, window: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.window, self.shift = window, [window // 2]

    def forward(self, x):
        y = self.conv(x)
        if self.window >= x.shape[-1]:
            self.shift[0] = 0
        return x + (torch.roll(y, shifts=self.shift[0], dims=-1) if self.shift[0] else y)


def test_a_first_call_that_turns_a_shift_off_in_forward_is_state():
    """The shift a first call at the example turns off stays off for a larger later call, which a first call at that
    size keeps: state, seen only by comparing a later call on other values with that call made first.  Taken for a
    cache, the model would be fused as called once and refuse the larger call (its size test answers otherwise),
    where the model computes."""
    model = seeded(lambda: ShiftOffInForward(4, 4), 0)().double().eval()
    fused = fuse(model, torch.randn(1, 4, 4, 4, dtype=D))
    used, ours = copy.deepcopy(model), copy.deepcopy(fused)
    with torch.no_grad():
        for shape in ((1, 4, 4, 4), (1, 4, 16, 16), (2, 4, 8, 12)):
            x = torch.randn(*shape, dtype=D)
            torch.testing.assert_close(ours(x), used(x), rtol=1e-12, atol=1e-12)


def test_a_detect_head_fused_without_the_check_is_kept_whole_for_its_cache_too():
    """Without fuse's check no run shows the sizes free around a part (the capture around parts at free sizes
    needs it), so the capture as called once held at the example's sizes: the head holding the cache is kept
    whole as the model holds it, and the model runs at another size as with the check."""
    model = seeded(yolov8_with_anchor_cache, 902)().to(D)
    before = copy.deepcopy(model)
    fused = fuse(model, images(1, 3, 64, 64), check=False)
    assert "model.14" in kept_whole(fused), str(fused.fuse_report)
    x = images(1, 3, 96, 64)
    with torch.no_grad():
        want = before(x.clone())
        torch.testing.assert_close(fused(x.clone()), want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


class ShiftedWindows(nn.Module):
    """HF Swin's ``set_shift_and_window_size``, called first in each layer's forward: a map no larger than the
    window is never shifted, which it sets for good (``self.shift_size = 0``).  At the example's size nothing is set."""

    def __init__(self, shift: int) -> None:
        super().__init__()
        self.window, self.shift_size = 4, shift
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def set_shift_and_window_size(self, h: int, w: int) -> None:
        if min(h, w) <= self.window:
            self.shift_size, self.window = 0, min(h, w)

    def forward(self, x):
        self.set_shift_and_window_size(x.shape[2], x.shape[3])
        y = self.bn(self.conv(x))
        if self.shift_size > 0:
            y = torch.roll(y, (-self.shift_size, -self.shift_size), dims=(2, 3))
        return y.flatten(2).transpose(1, 2).reshape(y.shape)


def test_a_write_at_another_size_than_the_example_is_not_captured():
    """fuse's runs of the model at other sizes than the example's (its checks of a capture there) ran the copy it
    captures, once the model was taken as fused as called once: HF Swin's layer set ``shift_size = 0`` in that copy
    at a smaller size, and the capture after it dropped the shifted windows, at the example too (0.27 off; review
    R14b).  Those runs now run copies."""
    model = randomized(lambda: nn.Sequential(ShiftedWindows(0), ShiftedWindows(2)))
    reference = copy.deepcopy(model)
    x = torch.randn(1, 4, 6, 6, dtype=D, generator=torch.Generator().manual_seed(3))
    fused = fuse(model, x)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), reference(x), rtol=1e-9, atol=0)  # float64
    assert [m.shift_size for m in model] == [0, 2]
