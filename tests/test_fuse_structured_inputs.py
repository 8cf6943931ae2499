"""Models whose ``forward`` takes lists, tuples or dicts of tensors, or ``*args``: FPN necks and detection heads.

fx gives each argument one Proxy, which their loops (``for f in feats``, ``len(inputs)``, ``x.keys()``) cannot
iterate: ``fuse`` refused a list as an example input, and a ``*args`` forward was captured at fixed shapes.  Now
the capture reads one tensor per input and calls ``forward`` with them in the example's structure
(:mod:`repalgebra.frontend.structured`); the fused model takes that structure again, at any size, and refuses
another (a fourth feature map it would not compute).  The models are written as mmdetection's and torchvision's
FPNs and FCOS's head are.  Exactness in float64 to 1e-9 relative (``verify``'s float64 tolerance) at the example
and at other batches and sizes; ONNX in float32 to 1e-5 relative.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections import OrderedDict, namedtuple

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repalgebra import export_onnx, fuse
from repalgebra.frontend.structured import structure_mismatch
from zoo import count_bn, seeded

D = torch.float64


def conv_module(cin: int, cout: int, k: int) -> nn.Sequential:
    """mmcv's ConvModule with a BN and a ReLU."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), bn=nn.BatchNorm2d(cout), activate=nn.ReLU()))


class MMDetFPN(nn.Module):
    """``forward(self, inputs: Tuple[Tensor])``: lateral 1x1s, a top-down sum resized to each level's shape, 3x3 outputs, and an
    extra level by max pooling."""

    def __init__(self, in_channels=(8, 16, 32), out_channels: int = 8, num_outs: int = 4) -> None:
        super().__init__()
        self.in_channels, self.num_outs = list(in_channels), num_outs
        self.lateral_convs = nn.ModuleList(conv_module(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(conv_module(out_channels, out_channels, 3) for _ in in_channels)

    def forward(self, inputs):
        assert len(inputs) == len(self.in_channels)
        laterals = [lateral_conv(inputs[i]) for i, lateral_conv in enumerate(self.lateral_convs)]
        used_backbone_levels = len(laterals)
        for i in range(used_backbone_levels - 1, 0, -1):
            prev_shape = laterals[i - 1].shape[2:]
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=prev_shape, mode="nearest")
        outs = [self.fpn_convs[i](laterals[i]) for i in range(used_backbone_levels)]
        for _ in range(self.num_outs - used_backbone_levels):
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)


class TorchvisionFPN(nn.Module):
    """``forward(self, x: Dict[str, Tensor]) -> Dict[str, Tensor]``, its blocks picked by index in a loop."""

    def __init__(self, in_channels=(8, 16, 32), out_channels: int = 8) -> None:
        super().__init__()
        self.inner_blocks = nn.ModuleList(conv_module(c, out_channels, 1) for c in in_channels)
        self.layer_blocks = nn.ModuleList(conv_module(out_channels, out_channels, 3) for _ in in_channels)

    def _block(self, blocks: nn.ModuleList, x: torch.Tensor, idx: int) -> torch.Tensor:
        idx = idx + len(blocks) if idx < 0 else idx
        out = x
        for i, module in enumerate(blocks):
            if i == idx:
                out = module(x)
        return out

    def forward(self, x):
        names = list(x.keys())
        x = list(x.values())
        last_inner = self._block(self.inner_blocks, x[-1], -1)
        results = [self._block(self.layer_blocks, last_inner, -1)]
        for idx in range(len(x) - 2, -1, -1):
            inner_lateral = self._block(self.inner_blocks, x[idx], idx)
            inner_top_down = F.interpolate(last_inner, size=inner_lateral.shape[-2:], mode="nearest")
            last_inner = inner_lateral + inner_top_down
            results.insert(0, self._block(self.layer_blocks, last_inner, idx))
        return OrderedDict([(k, v) for k, v in zip(names, results)])


class Scale(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class FCOSHead(nn.Module):
    """``forward(self, *feats)``: one shared tower (conv + BN + ReLU) per level, a per-level scale on the box branch."""

    def __init__(self, c: int = 8, levels: int = 3) -> None:
        super().__init__()
        self.tower = nn.Sequential(conv_module(c, c, 3), conv_module(c, c, 3))
        self.cls, self.reg = nn.Conv2d(c, 4, 3, padding=1), nn.Conv2d(c, 4, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0 + 0.5 * i) for i in range(levels))

    def forward(self, *feats):
        cls_scores, bbox_preds = [], []
        for x, scale in zip(feats, self.scales):
            t = self.tower(x)
            cls_scores.append(self.cls(t))
            bbox_preds.append(scale(self.reg(t)).float().exp())
        return cls_scores, bbox_preds


class DepthEncoder(nn.Module):
    """monodepth2's way: ``inputs[("color_aug", frame_id, 0)]`` for the frames of a dict keyed by tuples, the
    frames concatenated on channels into a pose encoder (conv + BN + ReLU)."""

    def __init__(self, frames=(0, -1, 1), c: int = 8) -> None:
        super().__init__()
        self.frames = frames
        self.encoder = nn.Sequential(conv_module(8 * len(frames), c, 3), conv_module(c, c, 3))

    def forward(self, inputs):
        return self.encoder(torch.cat([inputs[("color_aug", f, 0)] for f in self.frames], 1))


Batch = namedtuple("Batch", "image depth")


class RGBDStem(nn.Module):
    """A batch as a named tuple read by field (``batch.image``, ``batch.depth``): one stem per modality, summed."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.rgb, self.d = conv_module(8, c, 3), conv_module(16, c, 1)

    def forward(self, batch):
        return self.rgb(batch.image) + F.interpolate(self.d(batch.depth), size=batch.image.shape[-2:])


def feature_maps(batch: int, size: int, channels=(8, 16, 32), seed: int = 0, same_size: bool = False) -> list[torch.Tensor]:
    """A pyramid (each map half the size of the one before), or maps all of ``size`` (``same_size``)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, *(2 * (size // 2 ** (0 if same_size else k),)), generator=g, dtype=D) for k, c in enumerate(channels)]


def assert_same(want, got) -> None:
    want, got = torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9 * float(w.abs().max()))


CASES = {
    "mmdet FPN, a tuple": (MMDetFPN, lambda b, s: (tuple(feature_maps(b, s)),)),
    "torchvision FPN, a dict": (TorchvisionFPN, lambda b, s: (OrderedDict(zip(["p3", "p4", "p5"], feature_maps(b, s))),)),
    "FCOS head, *feats": (FCOSHead, lambda b, s: tuple(feature_maps(b, s, (8, 8, 8)))),
    "monodepth2 frames, a dict keyed by tuples": (
        DepthEncoder, lambda b, s: (dict(zip([("color_aug", f, 0) for f in (0, -1, 1)], feature_maps(b, s, (8, 8, 8), same_size=True))),)),
    "a named tuple": (RGBDStem, lambda b, s: (Batch(*feature_maps(b, s, (8, 16))),)),
}


@pytest.mark.parametrize("case", CASES)
def test_a_neck_or_head_taking_its_feature_maps_together_fuses_at_any_size(case):
    make, inputs = CASES[case]
    model = seeded(make, 0)().to(D)
    state = copy.deepcopy(model.state_dict())
    fused = fuse(model, inputs(2, 16))
    r = fused.fuse_report
    assert r.capture == "fx" and count_bn(fused) == 0, str(r)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    for b, s in ((2, 16), (1, 32), (3, 8)):
        with torch.no_grad():
            assert_same(model(*inputs(b, s)), fused(*inputs(b, s)))
    assert type(fused(*inputs(1, 8))) is type(model(*inputs(1, 8)))  # a tuple, an OrderedDict, a pair of lists
    # A pickled copy too (torch.save of a whole module): the OrderedDict's rebuilder was a closure, which does not
    # pickle (found by a probe: every fused torchvision segmentation model).
    again = pickle.loads(pickle.dumps(fused))
    with torch.no_grad():
        assert_same(model(*inputs(1, 8)), again(*inputs(1, 8)))
    assert type(again(*inputs(1, 8))) is type(model(*inputs(1, 8)))


def test_another_structure_is_refused_by_the_fused_model_and_kept_through_copies():
    model = seeded(MMDetFPN, 0)().to(D)
    fused = fuse(model, (tuple(feature_maps(2, 16)),))
    four = tuple(feature_maps(2, 32, (8, 16, 32, 64)))
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for m in (fused, copy.deepcopy(fused), torch.load(buffer, weights_only=False)):
        with pytest.raises(TypeError, match=r"fused with inputs \(tuple of 3 tensors\).*called with \(tuple of 4 tensors\)"):
            m(four)
    again = fuse(fused, (tuple(feature_maps(2, 16)),))  # a fused model fuses to itself
    assert again.fuse_report.ops_after == fused.fuse_report.ops_after, str(again.fuse_report)
    with torch.no_grad():
        assert_same(model(tuple(feature_maps(1, 8))), again(tuple(feature_maps(1, 8))))


def test_a_named_tuple_of_another_structure_is_refused_naming_its_class():
    """A named tuple's fields are read by name (``batch.image``): the capture crashed inside pytree (its path
    names a field by attribute), and a dict keyed by tuples was fused and then refused its own example (pytree's
    JSON writes tuple keys as lists)."""
    model = seeded(RGBDStem, 0)().to(D)
    fused = fuse(model, (Batch(*feature_maps(2, 16, (8, 16))),))
    with pytest.raises(TypeError, match=r"fused with inputs \(Batch of 2 tensors\).*called with \(tuple of 2 tensors\)"):
        fused(tuple(feature_maps(2, 16, (8, 16))))
    with torch.no_grad():
        for m in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
            assert_same(model(Batch(*feature_maps(1, 8, (8, 16)))), m(Batch(*feature_maps(1, 8, (8, 16)))))


def test_a_part_kept_whole_returns_the_models_own_class_taking_its_structure():
    """A forward fx cannot trace (a branch on a value) is kept whole: the copy is of the model's class, its
    children fused, and takes the list as the model does."""

    class Routed(MMDetFPN):
        def forward(self, inputs):
            outs = super().forward(inputs)
            return outs if outs[0].sum() > -1e9 else outs[::-1]

    model = seeded(Routed, 0)().to(D)
    fused = fuse(model, (tuple(feature_maps(2, 16)),))
    assert type(fused) is Routed and count_bn(fused) == 0, str(fused.fuse_report)
    with torch.no_grad():
        assert_same(model(tuple(feature_maps(3, 32))), fused(tuple(feature_maps(3, 32))))


@pytest.mark.parametrize("what", ["fused", "model"])
def test_onnx_export_takes_one_input_per_tensor(what):
    model = seeded(MMDetFPN, 0)().eval()
    maps = [t.float() for t in feature_maps(2, 16)]
    source = fuse(model, (tuple(maps),)) if what == "fused" else model
    proto = export_onnx(source, None, input_shape=(tuple(maps),))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x0", "x1", "x2"]
    other = [t.float() for t in feature_maps(3, 16, seed=1)]
    got = session.run(None, {f"x{k}": t.numpy() for k, t in enumerate(other)})
    with torch.no_grad():
        want = model(tuple(other))
    for w, g in zip(want, got):
        assert float(np.abs(g - w.numpy()).max()) <= 1e-5 * float(w.abs().max())


def test_a_structured_model_captured_at_fixed_shapes_keeps_its_shape_guard_through_copies():
    """Python that reads a size the fx capture cannot check per call (``if y.amax(1).shape[-1] % 2``) sends the flat view to torch.export: the fused model
    takes the list, and refuses other sizes, also as a deep copy."""

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, feats):
            out = []
            for f in feats:
                y = self.bn(self.conv(f))
                out.append(y * 2 if y.amax(1).shape[-1] % 2 == 0 else y)  # (a reduction's size: no check per call)
            return out

    model = seeded(Branchy, 0)().to(D)
    maps = [torch.randn(2, 4, 8, 8, dtype=D), torch.randn(2, 4, 4, 4, dtype=D)]
    fused = fuse(model, (maps,))
    assert fused.fuse_report.capture == "specialized" and count_bn(fused) == 0, str(fused.fuse_report)
    with torch.no_grad():
        assert_same(model(maps), fused(maps))
    for m in (fused, copy.deepcopy(fused)):
        with pytest.raises(ValueError, match="fixed at"):
            m([torch.randn(2, 4, 7, 7, dtype=D), maps[1]])


class ExtraArgs(nn.Module):
    """ultralytics' ``BaseModel.forward(self, x, *args, **kwargs)`` handing on to ``predict``, which reads the input
    tensor's batch for its output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_module(3, 8, 3)

    def forward(self, x, *args, **kwargs):
        return self.predict(x, *args, **kwargs)

    def predict(self, x, augment=False):
        return self.body(x).view(x.shape[0], 8, -1)


def test_a_tensor_argument_beside_args_is_read_as_a_tensor():
    """The flat view took the tensor argument for a container on the way to its tensors, so its ``x.shape[0]`` was
    no read of the graph: export_onnx of the fused model refused it as one reading its inputs whole (found by a
    probe on every ultralytics detection model)."""
    model = seeded(ExtraArgs, 0)().eval()
    x = torch.randn(1, 3, 16, 16)
    proto = export_onnx(fuse(model, x), None, x)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    y = torch.randn(3, 3, 16, 16)
    (got,) = session.run(None, {session.get_inputs()[0].name: y.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(y), rtol=1e-5, atol=1e-5)  # float32 in onnxruntime


class WritesIntoItsList(nn.Module):
    """HRNet's ``HighResolutionModule`` and DLA's ``IDAUp``: each branch's output written into the list given."""

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleList([conv_module(8, 8, 3), conv_module(16, 16, 3)])

    def forward(self, x):
        for i, branch in enumerate(self.branches):
            x[i] = branch(x[i])
        return x[0].mean((2, 3)) + x[1].mean((2, 3))[:, :8]


def test_a_forward_writing_into_the_list_it_is_given_is_kept_whole_with_its_parts_fused():
    """Captured from the tensors one by one, the fused model returned what the model returns and left the caller's
    list as it was, where the model leaves the branches' outputs in it (4.3 off for a caller reading them, found
    by a probe).  The model is kept whole, its branches fused."""
    model = seeded(WritesIntoItsList, 0)().to(D)
    fused = fuse(model, (feature_maps(2, 16, (8, 16)),))
    assert count_bn(fused) == 0 and fused.fuse_report.parts[0].how == "kept whole", str(fused.fuse_report)
    given, ours = feature_maps(3, 8, (8, 16)), feature_maps(3, 8, (8, 16))
    with torch.no_grad():
        assert_same(model(given), fused(ours))
    assert_same(given, ours)  # the caller's lists, as each call left them


class WritesIntoItsListAndCachesAGrid(nn.Module):
    """YOLOv5's ``Detect``, reduced: each level's prediction written into the list given, and a grid of cell
    offsets cached on the module, rebuilt where the level's size differs from the grid's."""

    def __init__(self) -> None:
        super().__init__()
        self.m = nn.ModuleList(nn.Sequential(nn.Conv2d(c, 8, 1, bias=False), nn.BatchNorm2d(8)) for c in (8, 16))
        self.grid = [torch.empty(0) for _ in range(2)]

    def forward(self, x):
        z = []
        for i in range(2):
            x[i] = self.m[i](x[i])
            if self.grid[i].shape[2:4] != x[i].shape[2:4]:
                ny, nx = x[i].shape[2:4]
                yv, xv = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
                self.grid[i] = torch.stack((xv, yv), 0)[None].to(x[i].dtype)
            z.append((x[i][:, :2] + self.grid[i]).flatten(2))
        return torch.cat(z, 2)


class WritesIntoItsListAndCounts(WritesIntoItsList):
    """The same, counting its calls in a buffer it scales its output by: state, not a cache."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x):
        self.n += 1
        return super().forward(x) * self.n


def test_a_forward_writing_into_its_list_and_caching_a_grid_is_kept_whole_with_a_note():
    """fuse raised its internal ``StateChanged: grid`` (neither a FuseError nor a ValueError, found by a probe on
    YOLOv5's Detect fused on its own): a forward writing into its list skipped the handling of state its calls
    change.  Now the grid, filled by a first call and rebuilt for other sizes, is a cache: the model is kept whole
    as called once (a note says so), its levels fused, and it computes what the model does at other batches and
    sizes, leaving the caller's list as the model does (float64 to 1e-9 relative, verify's float64 tolerance)."""
    model = seeded(WritesIntoItsListAndCachesAGrid, 0)().to(D)
    reference = copy.deepcopy(model)
    fused = fuse(model, (feature_maps(2, 8, (8, 16)),))
    report = fused.fuse_report
    assert count_bn(fused) == 0 and report.parts[0].how == "kept whole", str(report)
    assert any("a first call fills 'grid'" in n for n in report.notes), str(report)
    for batch, size in [(3, 8), (1, 16), (2, 8)]:
        given, ours = feature_maps(batch, size, (8, 16), seed=size), feature_maps(batch, size, (8, 16), seed=size)
        with torch.no_grad():
            assert_same(reference(given), fused(ours))
        assert_same(given, ours)


def test_a_forward_writing_into_its_list_and_counting_its_calls_runs_on_its_own_state():
    """As above, with a call counter (``self.n += 1``) instead of a cache: fuse raised ``StateChanged: n``.  Now the
    model runs as written on its own copy of the counter, its branches fused, and agrees with the model call after
    call (float64 to 1e-9 relative, verify's float64 tolerance)."""
    model = seeded(WritesIntoItsListAndCounts, 0)().to(D)
    reference = copy.deepcopy(model)
    fused = fuse(model, (feature_maps(2, 8, (8, 16)),))
    assert count_bn(fused) == 0 and fused.fuse_report.parts[0].how == "kept whole", str(fused.fuse_report)
    assert "'n'" in fused.fuse_report.parts[0].reason, str(fused.fuse_report)
    for call in range(3):
        given, ours = feature_maps(2, 8, (8, 16), seed=call), feature_maps(2, 8, (8, 16), seed=call)
        with torch.no_grad():
            assert_same(reference(given), fused(ours))
        assert_same(given, ours)


class ScaledByStep(nn.Module):
    """A block taking ``(t, x)`` together, as diffusion code passes a timestep with its image (a tensor, or a number),
    with a test of the image's width against a table's length (ViT: tokens against ``pos_embed``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_module(4, 4, 3), conv_module(4, 4, 1)
        self.register_buffer("table", torch.zeros(8))

    def forward(self, batch):
        t, x = batch
        y = self.a(x) + self.b(x)
        if x.shape[-1] > self.table.numel():
            y = y * 2
        return y * t


def test_a_number_for_a_tensor_inside_a_tuple_argument_is_refused_by_the_checks_before_the_graph():
    """``(3.0, x)`` for a block fused with ``(t, x)``: the structure check took the number for a leaf like a tensor,
    the check of None and numbers looked at the arguments themselves only, and the size test counted the call's
    tensors afresh (x became the first) and passed; only the graph's own assertion stopped the call (found by a
    review).  Each check before the graph refuses it, naming the number."""
    model = seeded(ScaledByStep, 0)().to(D)
    fused = fuse(model, ((torch.tensor(3.0, dtype=D), torch.randn(2, 4, 6, 6, dtype=D)),))
    call = ((3.0, torch.randn(2, 4, 12, 12, dtype=D)),)
    structure = [h for h in fused._forward_pre_hooks.values() if type(h).__name__ == "StructureGuard"]
    assert structure, str(fused.fuse_report)
    with pytest.raises(TypeError, match=r"fused with inputs \(tuple of 2 tensors\).*called with \(tuple \[float, tensor\]\)"):
        structure[0](fused, call, {})
    with pytest.raises(TypeError, match="was called with float for 1 of them"):
        fused(*call)
    other = (torch.tensor(2.0, dtype=D), torch.randn(3, 4, 5, 7, dtype=D))
    with torch.no_grad():
        assert_same(model(other), fused(other))


def test_a_call_of_a_forward_taking_args_names_what_it_was_given():
    """ultralytics' ``forward(x, *args)`` fused with ``x`` alone and called ``fused(x, False, True)`` was refused as
    "called with (tensor, tensor, tensor)" (found by a review): the structure check names the flags by their type.
    The call is refused first as one of another form than the example's (a probe's fix), by name."""
    model = seeded(ExtraArgs, 0)().to(D)
    x = torch.randn(1, 3, 16, 16, dtype=D)
    fused = fuse(model, x)
    with pytest.raises(TypeError, match=r"this call is of another form \(too many positional arguments\)"):
        fused(x, False, True)
    assert "called with (tensor, bool, bool)" in structure_mismatch((0,), (x, False, True))


class GraphConvolution(nn.Module):
    """Kipf's pygcn layer: ``torch.spmm(adj, input @ W) + b`` with a sparse normalized adjacency."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(i, o) * 0.3)
        self.bias = nn.Parameter(torch.randn(o) * 0.1)

    def forward(self, input, adj):
        return torch.spmm(adj, torch.mm(input, self.weight)) + self.bias


class PyGCN(nn.Module):
    """pygcn's two-layer GCN, a BatchNorm1d on the nodes after the first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.gc1, self.bn1, self.gc2 = GraphConvolution(8, 16), nn.BatchNorm1d(16), GraphConvolution(16, 4)

    def forward(self, x, adj):
        x = F.relu(self.bn1(self.gc1(x, adj)))
        x = F.dropout(x, 0.5, training=self.training)
        return F.log_softmax(self.gc2(x, adj), dim=1)


def normalized_adjacency(n: int, seed: int, layout: torch.layout) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = (torch.rand(n, n, generator=gen) > 0.7).to(D) + torch.eye(n, dtype=D)
    a = a / a.sum(1, keepdim=True)
    return a.to_sparse() if layout is torch.sparse_coo else a.to_sparse_csr()


@pytest.mark.parametrize("layout", [torch.sparse_coo, torch.sparse_csr], ids=["coo", "csr"])
def test_a_sparse_adjacency_input_is_passed_through(layout):
    """``fuse(model, (x, adj))`` with a sparse ``adj`` raised NotImplementedError ('aten::std.correction' on the
    SparseCPU backend) while drawing other input values, even with ``check=False`` (found by a probe).  A sparse
    input is passed through as it is to the calls that read it, on every graph."""
    model = seeded(PyGCN, 0)().to(D)
    fused = fuse(model, (torch.randn(10, 8, dtype=D), normalized_adjacency(10, 0, layout)))
    with torch.no_grad():
        for n, seed in ((10, 1), (13, 2)):
            x, adj = torch.randn(n, 8, dtype=D), normalized_adjacency(n, seed, layout)
            torch.testing.assert_close(fused(x, adj), model(x, adj), rtol=1e-9, atol=1e-12)
