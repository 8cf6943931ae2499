"""``fuse`` on forwards that write module-level data: the fused model makes the same writes, and ``fuse`` leaves
the globals as it found them.

A capture runs ``forward``'s Python once, on stand-ins: a store into a module-level dict or list, a global
rebound, an attribute of a module-level object set, happens once, while captured, and no graph holds it (review R7
finding 08: statistics cached at module level by a first call were never written by the fused model, and the
user's dict held an fx ``Proxy`` after ``fuse``).  Each model here is run side by side with its fused form over
calls on different inputs, the globals cleared before each run: the writes must agree, tensors in float64 to
1e-9 relative (``verify``'s float64 tolerance), Python values exactly.
"""

from __future__ import annotations

import collections
import logging
import types
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from repalgebra import export_onnx, fuse
from repalgebra.frontend.module_globals import GlobalWritten, globals_kept
from zoo import count_bn, seeded

D = torch.float64
RTOL = 1e-9

STATS: dict[str, torch.Tensor] = {}
LOG: list = []
COUNTS = {"calls": 0}
SEEN: set = set()
CALLS = 0
TABLE = torch.zeros(3, dtype=D)
_logger = logging.getLogger(__name__)


@dataclass
class Schedule:
    step: int = 0


SCHEDULE = Schedule()


def _clear() -> None:
    global CALLS
    STATS.clear()
    LOG.clear()
    COUNTS["calls"] = 0
    SEEN.clear()
    CALLS = 0
    SCHEDULE.step = 0


def _globals() -> dict:
    return {"STATS": dict(STATS), "LOG": list(LOG), "COUNTS": dict(COUNTS), "SEEN": set(SEEN), "CALLS": CALLS, "step": SCHEDULE.step}


class Writes(nn.Module):
    """A conv+BN block whose forward writes module-level data as ``how`` says, before its convolution."""

    def __init__(self, how: str, c: int = 3) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        global CALLS
        if self.how == "cached statistics":  # review R7 finding 08: made by a first call, written on every call
            s = STATS.get("input")
            if s is None:
                s = torch.zeros(2, dtype=x.dtype)
                STATS["input"] = s
            s[0] = x.mean()
        elif self.how == "list append":
            LOG.append(x.shape[-1])
        elif self.how == "tensor logged":
            LOG.append(x.detach().mean())
        elif self.how == "dict counter":
            COUNTS["calls"] += 1
        elif self.how == "global rebound":
            CALLS += 1
        elif self.how == "object attribute":
            SCHEDULE.step += 1
        elif self.how == "set add":
            SEEN.add(x.shape[0])
        return self.bn(self.conv(x))


WRITES = ["cached statistics", "list append", "tensor logged", "dict counter", "global rebound", "object attribute", "set add"]


def _same_writes(model: nn.Module, fused: nn.Module, inputs: list[torch.Tensor]) -> None:
    """Each input run through ``model`` and ``fused`` from cleared globals: the outputs and the globals agree."""
    for k in range(1, len(inputs) + 1):
        _clear()
        want = [model(x) for x in inputs[:k]]
        theirs = _globals()
        _clear()
        got = [fused(x) for x in inputs[:k]]
        mine = _globals()
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a, rtol=RTOL, atol=RTOL)
        assert mine.keys() == theirs.keys()
        for name in theirs:
            a, b = theirs[name], mine[name]
            if name == "STATS":
                assert a.keys() == b.keys(), name
                for key in a:
                    torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=RTOL)
            elif name == "LOG":
                assert len(a) == len(b), name
                for u, v in zip(a, b):
                    torch.testing.assert_close(torch.as_tensor(v), torch.as_tensor(u), rtol=RTOL, atol=RTOL)
            else:
                assert a == b, name


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, 3, 8, 8, generator=g, dtype=D) * s + s for s in (1.0, 2.0, 0.5)]


@pytest.mark.parametrize("how", WRITES)
def test_a_forward_writing_module_level_data_is_fused_making_the_same_writes(how: str) -> None:
    model = seeded(lambda: Writes(how), 0)().to(D).eval()
    _clear()
    fused = fuse(model, _inputs()[0])
    _same_writes(model, fused, _inputs())


@pytest.mark.parametrize("how", WRITES)
def test_fuse_leaves_the_globals_as_it_found_them(how: str) -> None:
    """``fuse`` runs and captures the model: no value of its runs, and no stand-in of a capture (an fx ``Proxy``),
    is left in the user's globals, and the report says what was put back."""
    model = seeded(lambda: Writes(how), 0)().to(D).eval()
    _clear()
    before = _globals()
    fused = fuse(model, _inputs()[0])
    assert _globals() == before
    assert any("put back as it was" in n for n in fused.fuse_report.notes), fused.fuse_report.notes


class Stack(nn.Module):
    """Three conv+BN blocks, the middle one writing a module-level list: only it is kept whole."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Writes("none"), Writes("list append"), Writes("none"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).relu()


def test_only_the_block_that_writes_a_global_is_kept_whole() -> None:
    model = seeded(Stack, 0)().to(D).eval()
    fused = fuse(model, _inputs()[0])
    _same_writes(model, fused, _inputs())
    assert count_bn(fused) == 1  # the writer's BatchNorm: its siblings fold
    reasons = {p.path: p.reason for p in fused.fuse_report.parts if p.how == "kept whole"}
    assert "GlobalWritten" in reasons["blocks.1"] and "LOG" in reasons["blocks.1"], reasons


class Reads(nn.Module):
    """Reads module-level data, logs through a module-level logger and warns, writing no data of the model's code."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _logger.debug("called")  # (a logger caches its levels: library objects are not the model's data)
        warnings.warn("Reads is deprecated", DeprecationWarning)  # (a warning writes the module's __warningregistry__)
        return self.bn(self.conv(x)) + TABLE.view(1, 3, 1, 1) * len(COUNTS)


def test_a_forward_reading_globals_still_fuses_whole() -> None:
    model = seeded(Reads, 0)().to(D).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        fused = fuse(model, _inputs()[0])
    assert count_bn(fused) == 0
    assert not any(p.how == "kept whole" for p in fused.fuse_report.parts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        _same_writes(model, fused, _inputs())


def test_globals_kept_puts_back_every_kind_of_write_and_names_them() -> None:
    """Stores, item writes, a rebinding, a name added, an object's attribute and a tensor written in place are
    all put back; ``refuse`` raises at the end of a block that ended normally, and only then."""
    global CALLS
    model = Writes("none")
    _clear()
    STATS["input"] = torch.ones(2, dtype=D)
    before = {**_globals(), "table": TABLE.clone(), "stats": STATS["input"].clone()}
    with pytest.raises(GlobalWritten, match=rf"{__name__}.ADDED_BY_THE_BLOCK, {__name__}.CALLS, {__name__}.COUNTS and 5 more:"):
        with globals_kept(model):
            LOG.append(1)
            COUNTS["calls"] = 5
            COUNTS["new"] = 1
            CALLS = 3
            SCHEDULE.step = 7
            SEEN.add(2)
            STATS["input"][0] = 5.0
            TABLE.add_(1)
            globals()["ADDED_BY_THE_BLOCK"] = [1]
    now = {**_globals(), "table": TABLE, "stats": STATS["input"]}
    assert now.keys() == before.keys()
    for name, value in before.items():
        if name == "STATS":
            assert now[name].keys() == value.keys()
        elif name in ("table", "stats"):  # (a tensor written in place, in a dict held by a global: its values)
            torch.testing.assert_close(now[name], value, rtol=0, atol=0)
        else:
            assert now[name] == value, name
    assert "ADDED_BY_THE_BLOCK" not in globals()
    with globals_kept(model, refuse=False) as written:  # put back, not refused
        LOG.append(1)
    assert LOG == [] and written == [f"{__name__}.LOG"]
    with pytest.raises(KeyError):  # the block's own failure stands, its writes put back
        with globals_kept(model):
            LOG.append(1)
            raise KeyError("failed")
    assert LOG == []
    _clear()


def test_export_onnx_leaves_the_globals_as_it_found_them() -> None:
    """``export_onnx`` runs, captures and exports the model (``torch.onnx.export`` of the part kept whole runs its
    Python too): what those runs wrote is put back, and the report says so; the file computes the model's outputs."""
    import onnxruntime as ort

    model = seeded(Stack, 0)().eval()
    x = _inputs()[0].float()
    _clear()
    before = _globals()
    proto, report = export_onnx(model, None, x, return_report=True)
    assert _globals() == before
    assert any(n.startswith(f"the model's code wrote {__name__}.LOG while export_onnx ran it") for n in report.notes), report.notes
    got = ort.InferenceSession(proto.SerializeToString()).run(None, {proto.graph.input[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-5, atol=1e-5)  # float32 file, float64-folded weights


TRACE: dict = {"a": {"b": {"sums": []}}}  # (a list three levels down)
LAST = None  # (rebound by a forward from a value that is no data)
CONFIG = types.SimpleNamespace(step=0)
RECENT: collections.deque = collections.deque(maxlen=8)
CAL: dict = {}
with torch.inference_mode():
    RUNNING = torch.zeros(2)  # (made under inference_mode: written back under it)


class MoreWrites(nn.Module):
    """Writes review R8 found unwatched or not put back."""

    calls = 0  # (a class attribute)

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        global LAST
        if self.how == "three levels down":
            TRACE["a"]["b"]["sums"].append(x.sum())
        elif self.how == "rebound from no data":
            LAST = x.shape[-1]
        elif self.how == "class attribute":
            type(self).calls += 1
        elif self.how == "simple namespace":
            CONFIG.step += 1
        elif self.how == "deque":
            RECENT.append(x.shape[0])
        elif self.how == "inference tensor":
            with torch.inference_mode():
                RUNNING[0] += 1
        return self.bn(self.conv(x))


def _clear_more() -> None:
    TRACE["a"]["b"]["sums"].clear()
    MoreWrites.calls, CONFIG.step = 0, 0
    RECENT.clear()
    with torch.inference_mode():
        RUNNING.zero_()


def _more_globals() -> dict:
    return {"sums": len(TRACE["a"]["b"]["sums"]), "LAST": LAST, "calls": MoreWrites.calls, "step": CONFIG.step,
            "recent": list(RECENT), "running": RUNNING.tolist()}


@pytest.mark.parametrize("how", ["three levels down", "rebound from no data", "class attribute", "simple namespace",
                                 "deque", "inference tensor"])
def test_more_kinds_of_module_level_writes_are_made_and_put_back(how: str) -> None:
    """Review R8: a list three levels down kept an fx Proxy and fake tensors (a later fuse failed); a global rebound
    from a numpy array was deleted; a class attribute, a SimpleNamespace and a deque were not watched (never written
    by the fused model); a tensor made under inference_mode made fuse fail putting it back."""
    global LAST
    import numpy as np

    LAST = np.zeros(2)
    _clear_more()
    model = seeded(lambda: MoreWrites(how), 0)().to(D).eval()
    before = _more_globals()
    fused = fuse(model, _inputs()[0])
    assert _more_globals().keys() == before.keys()
    for name, value in before.items():  # (a numpy array by identity: put back, not deleted)
        assert _more_globals()[name] is value if name == "LAST" else _more_globals()[name] == value, name
    model(_inputs()[1])
    theirs = _more_globals()
    LAST = before["LAST"]
    _clear_more()
    fused(_inputs()[1])
    mine = _more_globals()
    assert {k: v for k, v in mine.items() if k != "LAST"} == {k: v for k, v in theirs.items() if k != "LAST"}
    assert (mine["LAST"] == theirs["LAST"]) if how == "rebound from no data" else True
    _clear_more()


class Calibrates(nn.Module):
    """Calibrates a shift on its first call, kept in a module-level dict (review R8: fuse's own run of the model
    filled it, and the capture of the block that came after read it as a constant, 5.2 off on every call)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "shift" not in CAL:
            CAL["shift"] = x.mean().detach()
        return self.bn(self.conv(x - CAL["shift"]))


class AroundCalibrates(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blk = Calibrates()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blk(x)
        return y if y.sum() > 0 else -y  # (a branch on values: kept whole, its child captured on its own)


def test_a_first_call_calibration_kept_at_module_level_is_not_baked_from_fuses_own_run() -> None:
    model = seeded(AroundCalibrates, 0)().to(D).eval()
    CAL.clear()
    fused = fuse(model, _inputs()[0])
    assert CAL == {}
    xs = [x * 3 + 5 for x in _inputs()[1:]]
    want = [model(x) for x in xs]
    theirs = dict(CAL)
    CAL.clear()
    got = [fused(x) for x in xs]
    torch.testing.assert_close(CAL["shift"], theirs["shift"], rtol=0, atol=0)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=RTOL)
    CAL.clear()


def test_nested_blocks_each_put_back_their_own():
    """``export_onnx`` around ``fuse``: the inner block left the list of blocks under way by comparing snapshots field
    by field, which compared the held copies of a module-level tensor and raised RuntimeError (an ambiguous truth
    value) where the two blocks found the same globals.  Each block puts back what was written within it."""
    import sys

    code = types.ModuleType("nested_blocks_model")  # (a module of its own: its globals are the table alone)
    exec("import torch\nfrom torch import nn\nTABLE = torch.zeros(3)\nLOG = []\n"
         "class Adds(nn.Module):\n    def forward(self, x):\n        return x + TABLE\n", vars(code))
    sys.modules[code.__name__] = code
    try:
        model = code.Adds()
        with globals_kept(model, refuse=False) as outer:
            with globals_kept(model, refuse=False) as inner:  # (the same globals as the outer one found: a fuse
                model(torch.ones(3))  # whose runs write nothing)
            assert inner == []
            with globals_kept(model, refuse=False) as inner:
                code.TABLE.add_(1)
            torch.testing.assert_close(code.TABLE, torch.zeros(3), rtol=0, atol=0)
            assert inner == ["nested_blocks_model.TABLE"]
            code.LOG.append(1)
        assert code.LOG == [] and "nested_blocks_model.LOG" in outer  # (TABLE too: the copy back moved its version)
    finally:
        del sys.modules[code.__name__]
