"""What a call depends on besides its input: mode flags, a child's state read by its parent, a generator.

A capture sees one call.  A branch on ``torch.is_grad_enabled()`` or ``torch.compiler.is_compiling()`` takes
the capture's answer (fx traces with gradients on, torch.export under ``no_grad`` and "compiling"); a buffer a
child kept whole updates, read by its parent, is the value one earlier call left; a model's own generator was
advanced by fuse's checks.  Each made a fused model compute something else, with no note.  The branches here
change only large activations, so a check at a small example cannot see them: compared at large inputs, in
float64, to 1e-9 relative.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repalgebra
from torch import is_grad_enabled as grads_on  # as some code imports it: by name
from torch.jit import is_scripting as scripting  # (timm imports it so in places)

D = torch.float64


def deploying_or_not() -> bool:
    """A compatibility shim for an older torch: its ``except Exception`` swallowed the stand-in's refusal, and the
    capture went on with the answer "not deploying" (found by a review)."""
    try:
        return torch.is_inference_mode_enabled()
    except Exception:
        return False


def is_torchdynamo_compiling() -> bool:
    """Hugging Face's helper (``transformers.utils.is_torchdynamo_compiling``), which models import by name: it imports
    torch inside itself, where no stand-in of the model's namespace reaches."""
    try:
        import torch as inner

        return inner.compiler.is_compiling()
    except Exception:
        return False


FLAGS = {
    "grad": lambda: torch.is_grad_enabled(),
    "grad-by-name": lambda: grads_on(),
    "inference": lambda: torch.is_inference_mode_enabled(),
    "inference-by-_C": lambda: torch._C.is_inference_mode_enabled(),  # only _get_tracing_state was watched there
    "inference-in-try": deploying_or_not,
    "compiling": lambda: torch.compiler.is_compiling(),
    "exporting": lambda: torch.compiler.is_exporting(),
    "dynamo-compiling": lambda: torch._dynamo.is_compiling(),  # the older spelling (litgpt, torchao; review R13a)
    "dynamo-external-utils": lambda: torch._dynamo.external_utils.is_compiling(),
    "hf-is-torchdynamo-compiling": lambda: is_torchdynamo_compiling(),  # (review R14a: 11.7 off)
    "fx-tracing-flag": lambda: torch.fx._symbolic_trace._is_fx_tracing_flag,  # (a value, which torch.export sets)
    "fake-mode": lambda: torch._guards.detect_fake_mode() is not None,
    "dispatch-mode": lambda: torch.utils._python_dispatch.is_in_torch_dispatch_mode(),
    "fx": lambda: torch.fx._symbolic_trace.is_fx_tracing(),
    "autocast": lambda: torch.is_autocast_enabled("cpu"),
    "deterministic": lambda: torch.are_deterministic_algorithms_enabled(),
    "onnx-export": lambda: torch.onnx.is_in_onnx_export(),  # YOLOv6's export branch (found by a probe)
}
# How a user calls the fused model; autocast leaves float64 as it is, so only a branch on it differs there.
MODES = {"no_grad": torch.no_grad, "enable_grad": torch.enable_grad, "inference_mode": torch.inference_mode,
         "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}


def conv_bn(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


def randomized(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.to(D).eval()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a - b).abs().max() / a.abs().max().clamp_min(1e-30)) < 1e-9)


class FlagBranch(nn.Module):
    """Clamps where a mode flag says so; an odd width sends it to torch.export (Python on a size).  With
    ``reshaped``, a flatten and a reshape back, which fuse checks at other sizes (its runs are reused then)."""

    def __init__(self, flag, odd_width_pads: bool, reshaped: bool = False) -> None:
        super().__init__()
        self.flag, self.odd_width_pads, self.reshaped = flag, odd_width_pads, reshaped
        self.a, self.b = conv_bn(3, 8), conv_bn(8, 8, 1)

    def forward(self, x):
        if self.odd_width_pads and x.shape[-1] % 2:
            x = F.pad(x, (0, 1))
        y = self.a(x)
        if self.reshaped:
            y = y.flatten(2).reshape(y.shape)
        if self.flag():
            y = y.clamp(-3, 3)
        return self.b(y)


@pytest.mark.parametrize("odd_width_pads", [False, True], ids=["fx", "export"])
@pytest.mark.parametrize("flag", FLAGS, ids=list(FLAGS))
def test_a_branch_on_a_mode_flag_is_kept_as_the_model_wrote_it(flag, odd_width_pads):
    model = randomized(FlagBranch(FLAGS[flag], odd_width_pads))
    gen = torch.Generator().manual_seed(1)
    fused = repalgebra.fuse(model, torch.randn(2, 3, 6, 5, dtype=D, generator=gen) * 0.1)
    assert fused.fuse_report.capture == "kept whole", str(fused.fuse_report)
    assert "its code reads " in str(fused.fuse_report) and "depends on how it is called" in str(fused.fuse_report)
    assert any(p.path == "a" and p.how != "kept whole" for p in fused.fuse_report.parts)  # its children still fuse
    x = torch.randn(2, 3, 6, 5, dtype=D, generator=gen) * 10
    for name, mode in MODES.items():
        with mode():
            assert close(model(x), fused(x)), name


def is_tracing() -> bool:
    """mmpretrain's own helper of that name (``models/utils/helpers.py``): it asks a TorchScript flag only."""
    return torch.jit.is_tracing()


class OwnTracingHelper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn(3, 8)

    def forward(self, x):
        if not is_tracing():
            assert x.dim() == 4, "images"
        return self.a(x)


def test_a_helper_named_as_a_librarys_flag_that_asks_torchscript_only_is_answered():
    """Refused by its name alone, the model it is in was kept whole and kept its BN (review R15a): a helper named as a
    library's flag is refused where its code asks whether dynamo, an export or fx runs, as Hugging Face's does."""
    model = randomized(OwnTracingHelper())
    fused = repalgebra.fuse(model, torch.randn(2, 3, 6, 5, dtype=D))
    assert fused.fuse_report.capture == "fx" and "batch_norm" not in fused.fuse_report.ops_after, str(fused.fuse_report)


def test_a_flag_bound_before_the_capture_is_seen_by_a_check_with_gradients_on():
    """``self.flag = torch.is_grad_enabled``: bound on the instance, out of the stand-ins' reach.
    torch.export records it without gradients; the capture is checked with them on too, where the model clamps."""
    model = randomized(FlagBranch(torch.is_grad_enabled, odd_width_pads=True))
    gen = torch.Generator().manual_seed(1)
    fused = repalgebra.fuse(model, torch.randn(2, 3, 6, 5, dtype=D, generator=gen) * 10)  # large enough to clamp
    assert "a branch on the grad mode" in str(fused.fuse_report), str(fused.fuse_report)
    x = torch.randn(2, 3, 6, 5, dtype=D, generator=gen) * 10
    for mode in (torch.no_grad, torch.enable_grad):
        with mode():
            assert close(model(x), fused(x)), mode


def test_nn_transformer_encoders_nested_fast_path_is_kept():
    """Under no_grad, nn.TransformerEncoder runs a padded batch as nested tensors and returns zeros at the padded
    positions; its slow path (what any capture records) does not.  It reads torch.is_grad_enabled() to choose."""
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv1d(8, 16, 3, padding=1, bias=False), nn.BatchNorm1d(16)
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)

        def forward(self, x, mask):
            if x.shape[-1] % 2:  # Python on a size: torch.export's capture
                x, mask = F.pad(x, (0, 1)), F.pad(mask, (0, 1), value=True)
            return self.enc(self.bn(self.conv(x)).transpose(1, 2), src_key_padding_mask=mask)

    model = Model().eval()
    x = torch.randn(2, 8, 6)  # even: torch.export captures the model (an odd width would pad the mask)
    padded = torch.tensor([[False] * 6, [False, False, False, True, True, True]])
    for example_mask in (torch.zeros(2, 6, dtype=torch.bool), padded):  # a padded example: enc(h, h, h) seen as such
        fused = repalgebra.fuse(model, (x, example_mask))
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                torch.testing.assert_close(fused(x, padded), model(x, padded), rtol=1e-5, atol=1e-5)  # float32


class RunningMax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("peak", torch.tensor(0.0, dtype=D))

    def forward(self, y):
        self.peak.copy_(torch.maximum(self.peak, y.amax()))
        return y / (1 + self.peak)


class ReadsChildsBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.observer, self.a = RunningMax(), conv_bn(3, 8)

    def forward(self, x):
        return self.a(self.observer(x)) + self.observer.peak  # the value this call set


class StoresStatistic(nn.Module):
    """fx cannot trace it (a branch on data); every call stores a statistic of its output on itself."""

    def __init__(self) -> None:
        super().__init__()
        self.c = conv_bn(3, 8)

    def forward(self, x):
        y = self.c(x)
        if y.sum() > 1e9:
            y = y * 0
        self.stat = y.mean((2, 3), keepdim=True)
        return y


class ReadsChildsAttribute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.child, self.post = StoresStatistic(), conv_bn(8, 8, 1)

    def forward(self, x):
        y = self.child(x)
        return self.post(y - self.child.stat)


class ReadsObserversMaximum(nn.Module):
    """torch.ao's observer, which widens its range on every call, also in eval mode: torch's own code, so the
    refusal of a state read after a call of the model's own code does not see it, and the mark of what its calls
    set does (a capture held the maximum of one call)."""

    def __init__(self) -> None:
        super().__init__()
        self.observer, self.a = torch.ao.quantization.MinMaxObserver(dtype=torch.quint8), conv_bn(3, 8)

    def forward(self, x):
        return self.a(self.observer(x)) + self.observer.max_val


@pytest.mark.parametrize("make", [ReadsChildsBuffer, ReadsChildsAttribute, ReadsObserversMaximum])
def test_a_value_a_part_kept_whole_sets_is_read_per_call_around_it(make):
    model = randomized(make())
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(2)
    fused = repalgebra.fuse(model, torch.randn(2, 3, 6, 6, dtype=D, generator=gen) * 0.1)
    with torch.no_grad():
        for scale in (1.0, 4.0, 16.0):
            x = torch.randn(2, 3, 6, 6, dtype=D, generator=gen) * scale + scale
            assert close(reference(x), fused(x)), str(fused.fuse_report)
    if make is ReadsObserversMaximum:  # (refused for the read itself, before any check at other values could)
        assert "it reads 'observer.max_val', which every call of 'observer' sets" in str(fused.fuse_report)


def test_a_models_own_generator_starts_where_the_models_does():
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.gen = conv_bn(3, 8), torch.Generator().manual_seed(0)

        def forward(self, x):
            y = self.a(x)
            return y + torch.randn(y.shape, generator=self.gen, dtype=y.dtype)

    model = randomized(Noisy())
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6, dtype=D)
    fused = repalgebra.fuse(model, x)  # its checks ran copies, drawing from copies of the generator
    with torch.no_grad():
        for _ in range(2):
            assert close(reference(x), fused(x))


def test_fuse_and_verify_run_under_inference_mode():
    model = randomized(nn.Sequential(conv_bn(3, 8), nn.ReLU()))
    with torch.inference_mode():  # as deploy scripts call it: tensors made here have no version counter
        x = torch.randn(2, 3, 8, 8, dtype=D)
        fused = repalgebra.fuse(model, x)
        assert repalgebra.verify(model, fused).passed
        assert close(model(x), fused(x))


def test_a_lazy_module_that_has_not_made_its_weights_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.LazyConv2d(8, 3), nn.BatchNorm2d(8))).eval()
    with pytest.raises(TypeError, match=r"'1.0' \(LazyConv2d\) has not made its parameters yet"):
        repalgebra.fuse(model, torch.randn(1, 3, 8, 8))


def test_a_part_its_parent_wires_up_at_run_time_runs_as_written():
    class Writer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = conv_bn(3, 8)
            self.register_buffer("m", torch.zeros(8, dtype=D))

        def forward(self, x):
            y = self.c(x)
            self.m.copy_(y.mean((0, 2, 3)))
            return y

    class Reader(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.src = conv_bn(8, 8, 1), None

        def forward(self, y):
            return self.c(y - self.src.m[None, :, None, None])

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w, self.r = Writer(), Reader()

        def forward(self, x):
            self.r.src = self.w  # a module wired into another at run time: not in the model as built
            return self.r(self.w(x))

    model = randomized(Net())
    reference = copy.deepcopy(model)
    fused = repalgebra.fuse(model, torch.randn(2, 3, 6, 6, dtype=D))
    with torch.no_grad():
        for scale in (1.0, 5.0):
            x = torch.randn(2, 3, 6, 6, dtype=D) * scale
            assert close(reference(x), fused(x))


def test_an_input_cast_to_a_weights_dtype_stays_a_cast():
    """HF's ``pixel_values.to(self.patch_embedding.weight.dtype)``: a float64 batch into a float32 model."""

    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = conv_bn(3, 8)

        def forward(self, x):
            return self.proj(x.to(self.proj[0].weight.dtype))

    model = randomized(Embed()).float()
    x = torch.randn(2, 3, 8, 8)
    fused = repalgebra.fuse(model, x)
    with torch.no_grad():
        torch.testing.assert_close(fused(x.double()), model(x.double()), rtol=1e-5, atol=1e-6)  # float32 inside


@pytest.mark.parametrize("dtype", [torch.float64, torch.uint8])
def test_a_layout_of_the_input_cast_to_a_weights_dtype_stays_a_cast(dtype):
    """``x.permute(0, 3, 1, 2).to(self.conv.weight.dtype)``: NHWC images of any dtype, cast to the model's.  The
    permuted batch has the caller's dtype as much as the batch itself: the cast was taken for the identity and the
    fused conv failed on a float64 or uint8 batch (and after ``fused.double()`` on a float32 one)."""

    class NHWC(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = conv_bn(3, 8)

        def forward(self, x):
            return self.proj(x.permute(0, 3, 1, 2).to(self.proj[0].weight.dtype))

    model = randomized(NHWC()).float()
    fused = repalgebra.fuse(model, torch.rand(2, 8, 8, 3))
    x = (torch.rand(2, 8, 8, 3) * 255).to(dtype)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(fused(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        x = torch.rand(2, 8, 8, 3)
        # In float64 both run on float32 weights, the fused ones folded and rounded to float32 once.
        torch.testing.assert_close(copy.deepcopy(fused).double()(x), copy.deepcopy(model).double()(x), rtol=1e-5, atol=1e-6)


class AssertsOnItsInput(nn.Module):
    """timm's patch embedding: ``_assert`` (torch._assert) on the input's sizes before the projection."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.img_size = conv_bn(3, 8, 1), (8, 8)

    def forward(self, x):
        _, _, h, w = x.shape
        torch._assert(h == self.img_size[0], "input height does not match the model")
        torch._assert(w % 4 == 0, "input width must be a multiple of 4")
        return self.proj(x).flatten(2).transpose(1, 2)


def test_the_models_assertions_on_its_inputs_stay_checked():
    """The graph holds no op for an assertion: the fused model checks them before each call, in its copies too."""
    import io

    model = randomized(AssertsOnItsInput())
    fused = repalgebra.fuse(model, torch.randn(2, 3, 8, 8, dtype=D))
    assert fused.fuse_report.capture == "fx" and fused.fuse_report.fired
    saved = io.BytesIO()
    torch.save(fused, saved)
    saved.seek(0)
    copies = [fused, copy.deepcopy(fused), copy.copy(fused), pickle.loads(pickle.dumps(fused)), torch.load(saved, weights_only=False),
              repalgebra.fuse(fused, torch.randn(2, 3, 8, 8, dtype=D))]
    for m in copies:
        assert close(model(torch.ones(1, 3, 8, 12, dtype=D)), m(torch.ones(1, 3, 8, 12, dtype=D)))
        with pytest.raises(AssertionError, match="height"):
            m(torch.randn(1, 3, 12, 8, dtype=D))
        with pytest.raises(AssertionError, match="multiple of 4"):
            m(torch.randn(1, 3, 8, 10, dtype=D))


class FormatsItsAssertions(nn.Module):
    """timm's PatchEmbed: assertions with f-string messages naming the sizes (fx formats them with Proxies)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.img_size = conv_bn(3, 8, 1), (8, 8)

    def forward(self, x):
        B, C, H, W = x.shape
        torch._assert(H == self.img_size[0], f"Input height ({H}) doesn't match model ({self.img_size[0]}).")
        torch._assert(W % 4 == 0, f"Input width {W} of {{B={B}}} is not a multiple of 4")
        return self.proj(x).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("shape", [(1, 3, 12, 8), (2, 3, 8, 10)])
def test_an_assertions_message_names_the_sizes_of_the_call(shape):
    """The messages said "Input height (Proxy(getitem_2))": fx had formatted them while tracing."""
    model = randomized(FormatsItsAssertions())
    fused = repalgebra.fuse(model, torch.randn(2, 3, 8, 8, dtype=D))
    x = torch.randn(shape, dtype=D)
    with pytest.raises(AssertionError) as want:
        model(x)
    for m in (fused, pickle.loads(pickle.dumps(fused))):
        with pytest.raises(AssertionError) as got:
            m(x)
        assert str(got.value) == str(want.value)


def test_an_assertion_whose_message_names_a_computed_value_stays_checked():
    """A message field that is no size of the inputs (a mean the model computes) stays as fx formatted it: read per
    call, it would make the check one of a value computed inside, which the fused model cannot make before the call."""
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = conv_bn(3, 8, 1)

        def forward(self, x):
            torch._assert(x.shape[2] == 8, f"height {x.shape[2]}, mean {x.mean()}")
            return self.proj(x)

    fused = repalgebra.fuse(randomized(Model()), torch.randn(2, 3, 8, 8, dtype=D))
    with pytest.raises(AssertionError, match="height Proxy"):
        fused(torch.randn(1, 3, 12, 8, dtype=D))


def test_torch_jit_script_of_a_fused_model_is_refused_saying_what_works():
    """TorchScript compiles forward pre-hooks too, and the fused model's input checks are Python objects: it failed
    with "'ShapeGuard' object has no attribute '__name__'", also for a fused model inside another model."""
    model = randomized(AssertsOnItsInput())
    x = torch.randn(2, 3, 8, 8, dtype=D)
    fused = repalgebra.fuse(model, x)
    for m in (fused, copy.deepcopy(fused), copy.copy(fused), nn.Sequential(fused)):
        with pytest.raises(TypeError, match=r"torch.jit.script cannot compile a fused \w+: its input checks \(InputCheck, "
                           r"ShapeGuard.*torch.export.export"):
            torch.jit.script(m)
    assert close(torch.export.export(fused, (x,)).module()(x), model(x))  # what the message offers works


def test_a_buffer_a_parent_shares_with_a_child_kept_whole_stays_shared():
    class Child(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)
            self.register_buffer("m", torch.zeros(1, 4, 1, 1))

        def forward(self, x):
            y = self.c(x)
            self.m.copy_(y.mean((0, 2, 3), keepdim=True))
            return y

    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.child, self.d = Child(), nn.Conv2d(4, 4, 1)
            self.register_buffer("alias", self.child.m)  # the same tensor under the parent's name

        def forward(self, x):
            return self.d(self.child(x)) + self.alias

    torch.manual_seed(0)
    model = Parent().eval()  # float32: a cast with .to() would give each name a tensor of its own
    reference = copy.deepcopy(model)
    fused = repalgebra.fuse(model, torch.randn(1, 3, 8, 8))
    assert fused.alias.data_ptr() == fused.child.m.data_ptr()
    with torch.no_grad():
        for scale in (1.0, 3.0):
            x = torch.randn(1, 3, 8, 8) * scale
            torch.testing.assert_close(fused(x), reference(x), rtol=1e-5, atol=1e-6)  # float32


def test_an_assertion_on_tensors_given_in_a_list_is_checked_on_them():
    class Pyramid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = conv_bn(3, 4, 1)

        def forward(self, xs):
            torch._assert(xs[0].shape[-1] == 2 * xs[1].shape[-1], "levels must halve")
            return self.a(xs[0]), self.a(xs[1])

    model = randomized(Pyramid())
    levels = [torch.randn(1, 3, 8, 8, dtype=D), torch.randn(1, 3, 4, 4, dtype=D)]
    fused = repalgebra.fuse(model, (levels,))
    assert all(close(a, b) for a, b in zip(model(levels), fused(levels)))
    with pytest.raises(AssertionError, match="levels must halve"):
        fused([levels[0], levels[0]])


def test_hooks_registered_for_every_module_are_named_in_the_report():
    """A profiler's hook on every module call keeps every module a call of itself: nothing folds, and the report
    said only "nothing to fold"."""
    model = randomized(nn.Sequential(conv_bn(3, 8), nn.ReLU())).eval()
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: None)
    try:
        fused = repalgebra.fuse(model, torch.randn(1, 3, 8, 8, dtype=D))
    finally:
        handle.remove()
    assert any("forward hooks are registered for every module" in n for n in fused.fuse_report.notes), fused.fuse_report.notes


def test_a_model_that_runs_with_gradients_on_only_is_refused_saying_so():
    """``y.register_hook(...)`` in forward fails without gradients, as fuse runs the model (and inference does); the
    error blamed eval mode and the example input."""
    class ClipsGradients(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = conv_bn(3, 8)

        def forward(self, x):
            y = self.a(x)
            y.register_hook(lambda g: g.clamp(-1, 1))
            return y

    with pytest.raises(ValueError, match="with gradients on only.*cannot register a hook"):
        repalgebra.fuse(randomized(ClipsGradients()).eval(), torch.randn(1, 3, 8, 8, dtype=D))


def test_a_frozen_model_fuses_to_a_frozen_model_and_backward_hooks_are_noted():
    model = randomized(nn.Sequential(conv_bn(3, 8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.GELU())).eval()
    x = torch.randn(1, 3, 8, 8, dtype=D)
    assert all(p.requires_grad for p in repalgebra.fuse(model, x).parameters())
    model.requires_grad_(False)
    assert not any(p.requires_grad for p in repalgebra.fuse(model, x).parameters())
    model[2].register_full_backward_hook(lambda m, gin, gout: None)
    assert any("backward hooks on '2'" in n for n in repalgebra.fuse(model, x).fuse_report.notes)


class TensorBranch(FlagBranch):
    """A branch on what a tensor is (``x.is_inference()``, its memory layout), not on a flag function."""

    def __init__(self, step) -> None:
        super().__init__(flag=None, odd_width_pads=True)
        self.step = step

    def forward(self, x):
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1))
        return self.b(self.step(self.a(x), x))


def clamp_inference(y, x):
    """Clamps where the input is an inference tensor."""
    return y.clamp(-3, 3) if x.is_inference() else y


def gelu_by_layout(y, x):
    """A channels-last fast path of another approximation (tanh GELU), as a hand-tuned block may have."""
    return F.gelu(y, approximate="tanh" if y.is_contiguous(memory_format=torch.channels_last) else "none")


def test_a_branch_on_is_inference_is_seen_by_a_check_under_inference_mode():
    """torch.export records ``x.is_inference()`` as the example's answer (False); the capture is checked under
    torch.inference_mode too, where the model clamps."""
    assert_clamps_in_every_mode(randomized(TensorBranch(clamp_inference)), "under torch.inference_mode")


def assert_clamps_in_every_mode(model: nn.Module, why: str) -> None:
    """Fused at inputs large enough to clamp, the capture is refused for ``why`` and the fused model computes what
    the model does in every mode (:data:`MODES`)."""
    gen = torch.Generator().manual_seed(1)
    fused = repalgebra.fuse(model, torch.randn(2, 3, 6, 5, dtype=D, generator=gen) * 10)  # large enough to clamp
    assert why in str(fused.fuse_report), str(fused.fuse_report)
    x = torch.randn(2, 3, 6, 5, dtype=D, generator=gen) * 10
    for name, mode in MODES.items():
        with mode():
            assert close(model(x), fused(x)), name


class TokenBranch(nn.Module):
    """Tokens ``(B, L, C)``, a fast path for contiguous ones that clamps (a branch on ``x.is_contiguous()``), and a
    layer scale; an odd length pads (Python on a size: torch.export's capture)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 8))

    def forward(self, x):
        y = self.a(x)
        if x.shape[1] % 2:
            y = F.pad(y, (0, 0, 0, 1))
        y = y if x.is_contiguous() else y.clamp(-0.1, 0.1)
        return self.b(y) * self.gamma


def test_a_branch_on_contiguity_of_tokens_is_seen_by_a_check_on_a_transposed_view():
    """The layout check covered 4-D inputs only: a (B, L, C) input's ``is_contiguous()`` was the example's answer,
    and a transposed view of the same shape took the other branch (0.77 off)."""
    model = randomized(TokenBranch())
    fused = repalgebra.fuse(model, torch.randn(2, 5, 8, dtype=D))
    assert "another memory layout" in str(fused.fuse_report), str(fused.fuse_report)
    view = torch.randn(2, 8, 5, dtype=D).transpose(1, 2)
    with torch.no_grad():
        assert close(model(view), fused(view)) and close(model(view.contiguous()), fused(view.contiguous()))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_a_branch_on_the_memory_layout_is_seen_by_a_check_in_the_other_layout(layout):
    """torch.export records the example's layout; the capture is checked at the other too, where the model takes its
    other branch."""
    model = randomized(TensorBranch(gelu_by_layout))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, 5, dtype=D, generator=gen).contiguous(memory_format=layout)
    fused = repalgebra.fuse(model, x)
    assert fused.fuse_report.capture == "kept whole", str(fused.fuse_report)
    if layout == torch.contiguous_format:  # (a channels-last example: torch.export's capture differs there already)
        assert "another memory layout" in str(fused.fuse_report), str(fused.fuse_report)
    for layout in (torch.contiguous_format, torch.channels_last):
        y = torch.randn(2, 3, 6, 5, dtype=D, generator=gen).contiguous(memory_format=layout)
        assert close(model(y), fused(y)), layout


class HookCollector(nn.Module):
    """A feature extractor written with hooks: a hook on ``layer1`` stores its output, and ``forward`` runs the
    network for that store alone and returns it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(conv_bn(3, 8, 3), nn.Sequential(conv_bn(8, 8, 3)), conv_bn(8, 8, 3))
        self.store: dict = {}
        self.net[1].register_forward_hook(self.keep)  # (a bound method: a copy's hook keeps into the copy's store)

    def keep(self, module, args, out):
        self.store["layer1"] = out

    def forward(self, x):
        self.store.clear()
        self.net(x)
        return dict(self.store)


def test_batch_norms_no_captured_graph_computes_are_named_in_the_report():
    """The graph of such a model computes no output from the network (the store is read, not its result): the
    report counted only the hooked part's folds (batch_norm 1 -> 0) and said nothing of the BatchNorms left
    (found by a probe).  The result is exact; the report now names them."""
    model = randomized(HookCollector())
    x = torch.randn(2, 3, 8, 8, dtype=D)
    fused = repalgebra.fuse(model, x)
    with torch.no_grad():
        assert close(fused(x)["layer1"], model(x)["layer1"])
    left = [p for p, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert left and any(f"{len(left)} BatchNorm modules are left" in n and repr(left[0]) in n for n in fused.fuse_report.notes), fused.fuse_report.notes


class LeftInTrainMode(nn.Module):
    """A BatchNorm after a GELU (no conv to fold into) and a part kept whole (it writes a buffer) whose forward
    reads ``self.training`` for its dropout: both are modules the fused model runs."""

    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = conv_bn(4, 4)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            return F.dropout(self.body(x), 0.5, self.training)

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn, self.gate = conv_bn(3, 4), nn.BatchNorm2d(4), self.Gate()

    def forward(self, x):
        return self.gate(self.bn(F.gelu(self.stem(x))))


def test_fused_train_changes_nothing_the_fused_model_computes():
    """``fused.train()`` flipped the BatchNorm left in the fused graph to batch statistics (and its running ones
    were overwritten) and turned the kept part's dropout on: 0.57 and 0.98 off, still 0.025 off after ``eval()``
    (found by two probes).  The parts stay in eval mode; the fused model's own flag is as set.  A fused graph's
    modules have the hook too: a tracer runs no pre-hook of the module it traces, only of those it calls, so it
    records them in eval mode too, also after ``fused.apply(lambda m: m.train())``."""
    model = randomized(LeftInTrainMode())
    x = torch.randn(3, 3, 8, 8, dtype=D)
    fused = repalgebra.fuse(model, x)
    assert [p.how for p in fused.fuse_report.parts if p.path == "gate"] == ["kept whole"], str(fused.fuse_report)
    norms = {k: v.clone() for k, v in fused.state_dict().items() if "running" in k}
    assert norms, "no BatchNorm left in the fused model: the test no longer tests one"
    with torch.no_grad():
        want = model(x)
        for m in (fused, copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
            m.train()
            assert m.training
            for _ in range(2):
                assert close(m(x), want)
            assert all(torch.equal(v, m.state_dict()[k]) for k, v in norms.items())
            m.eval()
            assert close(m(x), want)
        fused.train()  # a tracer runs no pre-hook: torch.export recorded the BatchNorm in training mode (a review)
        assert close(torch.export.export(fused, (x,)).module()(x), want) and close(fused(x), want)
        fused.apply(lambda m: m.train())  # every module's flag, past the graph's own train (a second review)
        assert close(torch.export.export(fused, (x,)).module()(x), want) and close(fused(x), want)
        fused.apply(lambda m: m.train())
        assert close(torch.jit.trace(fused, x)(x), want)


class TracingBranch(nn.Module):
    """A forward that asks whether TorchScript traces it (timm's attention caches, torchvision's ``_is_tracing()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if torch.jit.is_tracing() or torch._C._get_tracing_state() or scripting():
            return y.mean((2, 3))
        return y.amax((2, 3))


def test_torchscript_flags_are_answered_as_an_eager_call_and_noted():
    """fx answered ``torch.jit.is_tracing()`` as an eager call and said nothing: under ``torch.jit.trace`` the fused
    model took the eager branch where the model took the other (found by a probe).  The capture still answers as an
    eager call (the fused model is the model's eager function; keeping the part whole would cost timm's attention
    its folds), and the report names each flag read."""
    model = TracingBranch().to(D).eval()
    x = torch.randn(2, 3, 5, 5, dtype=D)
    fused = repalgebra.fuse(model, x)
    assert fused.fuse_report.rule_counts().get("bn_fold") == 1
    note = next(n for n in fused.fuse_report.notes if "torch.jit.trace" in n)
    assert all(f in note for f in ("torch.jit.is_tracing()", "torch._C._get_tracing_state()", "torch.jit.is_scripting()"))
    torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)  # float64


class AutocastBranch(nn.Module):
    """A flag function held by the class (bound at class creation), as Hugging Face code keeps one."""

    autocast_on = staticmethod(torch.is_autocast_enabled)

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(3, 8), conv_bn(8, 8, 1)

    def forward(self, x):
        y = self.a(x)
        if self.autocast_on("cpu"):
            y = y.clamp(-3, 3)
        return self.b(y)


def test_a_flag_function_the_class_holds_is_refused_as_its_code_reads_it():
    """``staticmethod(torch.is_autocast_enabled)`` on the class was out of the stand-ins' reach, and no capture is
    checked under autocast: fx fused the branch away, and under ``torch.autocast`` the fused model did not clamp
    (found by a review).  The class's attribute is a stand-in too while capturing: the model is kept whole."""
    model = randomized(AutocastBranch())
    gen = torch.Generator().manual_seed(1)
    fused = repalgebra.fuse(model, torch.randn(2, 3, 6, 5, dtype=D, generator=gen) * 0.1)
    assert fused.fuse_report.capture == "kept whole", str(fused.fuse_report)
    assert "reads torch.is_autocast_enabled()" in str(fused.fuse_report)
    assert AutocastBranch.autocast_on is torch.is_autocast_enabled  # put back
    x = torch.randn(2, 3, 6, 5, dtype=D, generator=gen) * 10
    for name, mode in MODES.items():
        with mode():
            assert close(model(x), fused(x)), name


HELPERS = """
import torch


def deploying():
    return torch.is_inference_mode_enabled()
"""


@pytest.mark.parametrize("reshaped", [False, True], ids=["plain", "reshaped"])
def test_a_flag_read_by_a_helper_of_another_module_is_seen_by_a_check_under_inference_mode(tmp_path, monkeypatch, reshaped):
    """A helper of the model's library (``utils.deploying()``) is not the model's code, so its flag read is out of
    the stand-ins' reach; fx traced past it, and its capture was never checked under ``torch.inference_mode``,
    where the model clamps (found by a review).  Now it is, and the capture is refused there.  ``reshaped``: the
    check starts from a run at other sizes, which must see the clamp too."""
    (tmp_path / "flag_helpers.py").write_text(HELPERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import flag_helpers

    model = randomized(FlagBranch(flag_helpers.deploying, odd_width_pads=False, reshaped=reshaped))
    assert_clamps_in_every_mode(model, "under torch.inference_mode")


HUBCONF = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if torch.is_inference_mode_enabled():  # a deploy-time branch
            y = y.clamp(-3, 3)
        return y
"""


def hub_class(tmp_path, monkeypatch, how: str) -> type:
    """``Net`` of a ``hubconf.py`` loaded as torch.hub loads it (executed, not registered in ``sys.modules``), or
    from a registered module with its ``__module__`` set to a public package that re-exports it."""
    import importlib.util
    import sys

    path = tmp_path / f"hubconf_{how}.py"
    path.write_text(HUBCONF)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if how == "renamed":
        monkeypatch.setitem(sys.modules, path.stem, module)
        module.Net.__module__ = "repalgebra"
    return module.Net


@pytest.mark.parametrize("how", ["unregistered", "renamed"])
def test_flags_in_code_of_a_module_missing_from_sys_modules_are_watched(tmp_path, monkeypatch, how):
    """The stand-ins were put into ``sys.modules[cls.__module__]``: a class from a hubconf.py torch.hub executed
    (not registered), or one whose ``__module__`` names another package, had its flag reads unwatched, and fx
    fused the branch away (found by a review).  Its functions' own globals are watched now."""
    model = randomized(hub_class(tmp_path, monkeypatch, how)())
    gen = torch.Generator().manual_seed(1)
    fused = repalgebra.fuse(model, torch.randn(2, 3, 6, 5, dtype=D, generator=gen) * 0.1)
    assert fused.fuse_report.capture == "kept whole", str(fused.fuse_report)
    x = torch.randn(2, 3, 6, 5, dtype=D, generator=gen) * 10
    for name, mode in MODES.items():
        with mode():
            assert close(model(x), fused(x)), name


class DefaultDtypeRamp(nn.Module):
    """A ramp and an offset made in torch's default dtype (factories without ``dtype=``), as position encodings are."""

    def __init__(self, factories: bool, reshaped: bool = False) -> None:
        super().__init__()
        self.factories, self.reshaped = factories, reshaped
        self.a = conv_bn(3, 8)

    def forward(self, x):
        y = self.a(x)
        if self.reshaped:  # (fuse then checks it at other sizes, and its default-dtype check starts from such a run)
            y = y.flatten(2).reshape(y.shape)
        if self.factories:
            y = y * torch.linspace(0, 1, x.shape[-1]) + torch.tensor(0.1)
        return y


@pytest.mark.parametrize("reshaped", [False, True], ids=["plain", "reshaped"])
@pytest.mark.parametrize("factories", [True, False], ids=["factories", "none"])
def test_a_part_computing_in_the_default_dtype_refuses_calls_under_another(factories, reshaped):
    """The capture held ``torch.linspace`` and ``torch.tensor(0.1)`` as made under the float32 default; called after
    ``torch.set_default_dtype(torch.float64)``, the model made them in float64 and the fused model did not (5e-8 off
    in float64, found by a review).  Such a part refuses the call by name now; one without factories runs."""
    model = randomized(DefaultDtypeRamp(factories, reshaped))
    x = torch.randn(2, 3, 6, 5, dtype=D)
    fused = repalgebra.fuse(model, x)
    assert fused.fuse_report.rule_counts().get("bn_fold") == 1, str(fused.fuse_report)
    with torch.no_grad():
        assert close(model(x), fused(x))
        torch.set_default_dtype(torch.float64)
        try:
            if factories:
                with pytest.raises(ValueError, match="default dtype"):
                    fused(x)
            else:
                assert close(model(x), fused(x))
        finally:
            torch.set_default_dtype(torch.float32)


class AutocastNet(nn.Module):
    """A RepVGG-style net whose forward runs under ``torch.autocast`` (bf16), as accelerate's ``prepare_model`` with
    ``mixed_precision="bf16"`` leaves it; its block gets bf16 activations from the stem's conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)

    @torch.autocast("cpu", dtype=torch.bfloat16)
    def forward(self, x):
        return self.head(self.block(F.relu(self.stem(x))))


def test_a_child_called_under_its_parents_autocast_is_fused():
    """The block, captured and checked outside autocast on the bf16 activations it was called with, refused them
    (its conv is float32): kept whole, its conv+BN pair stayed.  Fused on the same values in float32 (and checked in
    float64, where autocast casts nothing), under autocast it computes in bf16 as the model does, op by op.  bf16
    keeps 8 significant bits: the fused form rounds its folded weights once where the model rounds the conv's
    weights and then its output before the BN, so the two differ by a few bf16 roundings (2**-6 of the output's
    scale), and the fused one is no further from the float64 model than the model itself (measured 4.7e-3 both)."""
    torch.manual_seed(0)
    model = AutocastNet().eval()
    for bn in (model.stem[1], model.block[1]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    fused = repalgebra.fuse(model, torch.randn(2, 3, 12, 12))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert "'block' is called under torch.autocast('cpu', dtype=torch.bfloat16)" in str(fused.fuse_report)
    exact = copy.deepcopy(model).double()
    exact.forward = exact.forward.__wrapped__.__get__(exact)  # the same forward without autocast, in float64
    x = 10 * torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        got, want, truth = fused(x).double(), model(x).double(), exact(x.double())
    scale = truth.abs().max()
    assert (got - want).abs().max() <= 2**-6 * scale
    assert (got - truth).abs().max() <= 2 * (want - truth).abs().max()


class Fp32Norm(nn.GroupNorm):
    """fairseq's Fp32GroupNorm: normalizes in float32 whatever the model's dtype (its weights cast too)."""

    def forward(self, x):
        w, b = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).type_as(x)


class DeployClampFp32(FlagBranch):
    """:class:`FlagBranch` (reshaped, clamping under ``torch.inference_mode`` through a library helper) with an
    Fp32GroupNorm before its last conv: its fused form does not run in float64, so it is checked in float32."""

    def __init__(self, flag) -> None:
        super().__init__(flag, odd_width_pads=False, reshaped=True)
        self.b = nn.Sequential(Fp32Norm(4, 8), conv_bn(8, 8, 1))


def test_a_model_checked_in_its_own_dtype_is_checked_so_under_inference_mode(tmp_path, monkeypatch):
    """Its fused form fails in float64, so it is checked in float32; the check under ``torch.inference_mode`` ran
    the check module's float64 weights on float32 inputs, which failed, and the check was skipped: the fused model
    was 1.01 off under that mode.  The check module runs as in the check at the example now, and a check module
    that fails where the model runs is a difference.  (The runs at other sizes, in the model's dtype by request,
    also leave what the example's check found as it was.)"""
    (tmp_path / "flag_helpers_fp32.py").write_text(HELPERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import flag_helpers_fp32

    model = randomized(DeployClampFp32(flag_helpers_fp32.deploying)).float()
    gen = torch.Generator().manual_seed(1)
    fused = repalgebra.fuse(model, torch.randn(2, 3, 6, 5, generator=gen) * 10)  # large enough to clamp
    assert "under torch.inference_mode" in str(fused.fuse_report), str(fused.fuse_report)
    x = torch.randn(2, 3, 6, 5, generator=gen) * 10
    for name, mode in MODES.items():
        if name == "autocast":  # (a float32 model computes in bfloat16 there, its fused form rounding otherwise)
            continue
        with mode():
            torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5, msg=name)
SIZED_HELPERS = """
import torch


def deploying_a_large_map(h):
    return torch.is_inference_mode_enabled() and h.shape[-1] > 128
"""


class LargeMapsOtherwise(nn.Module):
    """Pools large maps where ``wants`` says so: a mode branch that also depends on the size.  A flatten, which fuse
    checks at other sizes (a 256-wide example is tried at 64 first, where the branch is not taken)."""

    def __init__(self, wants) -> None:
        super().__init__()
        self.wants, self.a = wants, conv_bn(3, 8)

    def forward(self, x):
        h = self.a(x)
        if self.wants(h):
            h = F.avg_pool2d(h, 3, 1, 1)
        return h.flatten(2).transpose(1, 2)


def _float64_default_and_large(h):
    return torch.get_default_dtype() == torch.float64 and h.shape[-1] > 128


@pytest.mark.parametrize("how", ["inference-mode", "default-dtype"])
def test_a_mode_branch_taken_at_large_sizes_only_is_checked_at_the_examples(tmp_path, monkeypatch, how):
    """The checks under torch.inference_mode and under the other default dtype ran at the smallest run at other sizes
    (64 wide), where the part takes no branch: the fused model was 3.5 (4.0) off at the example's own size under that
    mode (review R5 finding 02).  At the example's sizes they see the branch."""
    (tmp_path / "sized_helpers.py").write_text(SIZED_HELPERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import sized_helpers

    wants = sized_helpers.deploying_a_large_map if how == "inference-mode" else _float64_default_and_large
    model = randomized(LargeMapsOtherwise(wants))
    gen = torch.Generator().manual_seed(0)
    fused = repalgebra.fuse(model, torch.randn(1, 3, 256, 256, dtype=D, generator=gen))
    x = torch.randn(1, 3, 256, 256, dtype=D, generator=gen)
    before = torch.get_default_dtype()
    try:
        if how == "default-dtype":
            torch.set_default_dtype(torch.float64)
        with torch.inference_mode() if how == "inference-mode" else torch.no_grad():
            want = model(x)
            try:
                got = fused(x)
            except ValueError as e:  # refused by name: fine
                assert "default dtype" in str(e), e
                return
        assert close(want, got)
    finally:
        torch.set_default_dtype(before)
