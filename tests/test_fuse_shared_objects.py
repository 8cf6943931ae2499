"""``fuse`` on models whose modules pass tensors to each other through Python objects, not arguments.

fastai's U-Net reads its encoder's outputs from the forward hooks that store them, timm's ``FeatureHooks``
collects features the same way, and hand-written encoders push skips onto a list their decoders pop.  A part
captured on its own read such a tensor as a constant: the value of the example's run, so the fused model was exact
on the example and wrong on any other input (0.17 off at outputs of 0.46 for the U-Net, 0.5 relative for the
list), or lost the hooks' outputs with the copies of its parts (one output where the model returns two).  The whole
fused model is now compared with the model on other values than the example wherever a capture read a tensor that
is neither a parameter nor a buffer, or the model has forward hooks; where they differ, the parts that read such
tensors are kept whole, else the model.  Every test runs both on new inputs, in float64 to 1e-9 relative.
"""

from __future__ import annotations

import random
from collections import OrderedDict, defaultdict
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repalgebra import fuse
from zoo import count_bn, seeded

D = torch.float64


def conv_bn(ci: int, co: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ci, co, 3, stride, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU())


class StoredOutput:
    """fastai's ``Hook``: a forward hook keeping the module's last output in ``stored``, and its handle (which a
    copy of the fused model, whose module it no longer holds, failed to copy)."""

    def __init__(self, module: nn.Module) -> None:
        self.stored = None
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        self.stored = output


class UnetBlock(nn.Module):
    def __init__(self, up_in: int, skip: int, hook: StoredOutput) -> None:
        super().__init__()
        self.hook = hook
        self.shuf = nn.Sequential(nn.Conv2d(up_in, up_in * 2, 1), nn.PixelShuffle(2))
        self.bn = nn.BatchNorm2d(skip)
        self.conv = conv_bn(up_in // 2 + skip, up_in)

    def forward(self, up_in):
        s = self.hook.stored
        return self.conv(F.relu(torch.cat([self.shuf(up_in), self.bn(s)], 1)))


class HookedUnet(nn.Sequential):
    """fastai's ``DynamicUnet``: encoder stages hooked, decoder blocks reading what the hooks stored."""

    def __init__(self) -> None:
        encoder = nn.Sequential(conv_bn(3, 8, 2), conv_bn(8, 16, 2))
        hooks = [StoredOutput(encoder[0])]
        super().__init__(encoder, conv_bn(16, 16), UnetBlock(16, 8, hooks[0]))
        self.hooks = hooks


class Down(nn.Module):
    def __init__(self, skips: list, ci: int, co: int) -> None:
        super().__init__()
        self.skips, self.body = skips, conv_bn(ci, co)

    def forward(self, x):
        y = self.body(x)
        self.skips.append(y)
        return F.avg_pool2d(y, 2)


class Up(nn.Module):
    def __init__(self, skips: list, ci: int, co: int) -> None:
        super().__init__()
        self.skips, self.body = skips, conv_bn(ci, co)

    def forward(self, x):
        return self.body(torch.cat([F.interpolate(x, scale_factor=2.0), self.skips.pop()], 1))


class SharedSkips(nn.Module):
    """An encoder pushing its skip onto a list its decoder pops; a branch on values keeps the model whole."""

    def __init__(self) -> None:
        super().__init__()
        skips: list = []
        self.down, self.mid, self.up = Down(skips, 3, 8), conv_bn(8, 8), Up(skips, 16, 8)

    def forward(self, x):
        y = self.mid(self.down(x))
        if y.mean() > 100:
            y = y * 0
        return self.up(y)


class FeatureHooks:
    """timm's ``FeatureHooks``: hooks (``partial`` s of a bound method) collecting named outputs per device."""

    def __init__(self, names: list[str], modules: dict[str, nn.Module]) -> None:
        self._out: dict = defaultdict(OrderedDict)
        for name in names:
            modules[name].register_forward_hook(partial(self._collect, name))

    def _collect(self, name, module, inputs, output):
        self._out[output.device][name] = output

    def get_output(self, device):
        out, self._out[device] = self._out[device], OrderedDict()
        return out


class Body(nn.Module):
    """A stem, then a RepVGG-style three-branch block (whose branches the hooks read), then a head."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem, self.head = conv_bn(3, c), conv_bn(c, c)
        self.dense, self.pw, self.idn = nn.Sequential(*conv_bn(c, c)[:2]), nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(self.dense(x) + self.pw(x) + self.idn(x)))


class FeatureHookNet(nn.Module):
    def __init__(self, return_last: bool) -> None:
        super().__init__()
        self.return_last = return_last
        self.body = Body()
        self.feature_hooks = FeatureHooks(["body.dense", "body.idn"], dict(self.named_modules()))

    def forward(self, x):
        y = self.body(x)
        feats = list(self.feature_hooks.get_output(x.device).values())
        return [y, *feats] if self.return_last else feats


MODELS = {"hooked_unet": HookedUnet, "shared_skips": SharedSkips, "feature_hooks": partial(FeatureHookNet, False),
          "feature_hooks_and_last": partial(FeatureHookNet, True)}


@pytest.mark.parametrize("name", MODELS)
def test_tensors_passed_through_python_objects_are_read_at_run_time(name):
    model = seeded(MODELS[name], 0)().to(D).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=g, dtype=D)
    fused = fuse(model, x)
    for _ in range(3):
        x = torch.randn(2, 3, 16, 16, generator=g, dtype=D)
        with torch.no_grad():
            want, got = model(x), fused(x)
        want, got = (want, got) if isinstance(want, list) else ([want], [got])
        assert len(got) == len(want), str(fused.fuse_report)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * float(b.abs().max()))


def test_what_reads_no_stored_value_still_fuses():
    """Only the parts that read a stored tensor are kept whole: the encoder's stages of the shared-list model fold."""
    model = seeded(SharedSkips, 0)().to(D).eval()
    fused = fuse(model, torch.randn(2, 3, 16, 16, dtype=D))
    assert count_bn(fused) < count_bn(model), str(fused.fuse_report)


class NoisyCounted(nn.Module):
    """StyleGAN's noise injection (it draws in eval mode too), a head that folds, and a buffer a hook counts calls in."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = conv_bn(3, 8), nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        y = self.body(x)
        return self.head(y + 1e-3 * torch.randn_like(y[:, :1]))


COUNTED: list[nn.Module] = []  # the model a module-level hook counts into, named as a global: no copy rebinds it


def count_into_the_global_model(module, args, out):
    COUNTED[0].calls += 1  # the user's model, whichever copy runs


def test_fuse_leaves_the_users_model_and_torchs_generator_as_they_were():
    """fuse runs copies of the model; a hook that names the user's model (not the copy) through a global counts
    those runs into it, and the noise the forward draws advances torch's generator: both are put back, the first
    noted."""
    model = seeded(NoisyCounted, 0)().to(D)
    COUNTED[:] = [model]
    model.body.register_forward_hook(count_into_the_global_model)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    torch.manual_seed(5)
    fused = fuse(model, x)
    after = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(4)), "fuse advanced torch's global generator"
    assert model.calls.item() == 0 and "hooks changed calls of the model itself" in str(fused.fuse_report)


class HookedFeatures(nn.Module):
    """A feature extractor whose hook is a closure over the wrapper, written inside ``__init__`` (Grad-CAM's and
    distillation code's ``self.activations[name] = output``)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(conv_bn(3, 8), conv_bn(8, 8), conv_bn(8, 8))
        self.feats: dict[str, torch.Tensor] = {}

        def keep(name):
            def hook(module, args, out):
                self.feats[name] = out
            return hook

        self.backbone[1].register_forward_hook(keep("middle"))

    def forward(self, x):
        return self.backbone(x), self.feats["middle"]


class LambdaBranch(nn.Module):
    """A helper stored as a lambda over ``self`` in ``__init__``, in a part kept whole for its branch on values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.branch = lambda t: self.bn(self.conv(t))

    def forward(self, x):
        y = self.branch(x)
        return F.relu(y) if y.mean() > -100 else y


def patched(model: nn.Module, scale: float = 0.5) -> nn.Module:
    """``model`` with its last block's forward patched on the instance, as patches are written: a closure over the
    block's own bound forward."""
    block = model[-1]
    forward = block.forward
    block.forward = lambda x: forward(x) * scale
    return model


def test_closures_in_the_model_hold_the_copys_objects_not_the_users():
    """``copy.deepcopy`` shares functions, so a closure's cells held the user's modules in every copy fuse made: the
    hook wrote into the user's dict while the copy read its own (a model never called was refused with its
    ``KeyError``; one called before returned its last call's features, 0.76 off, and so did its ONNX file), a
    lambda helper ran the user's modules (a fused model that followed weights loaded into the user's model later),
    and a patched forward ran the user's train-mode BatchNorms, updating their statistics (found by a probe)."""
    x = torch.randn(2, 3, 8, 8, dtype=D)
    model = seeded(HookedFeatures, 0)().to(D).eval()
    fused = fuse(model, x)
    assert model.feats == {}, "fuse wrote into the user's model"
    other = torch.randn(3, 3, 8, 8, dtype=D)
    with torch.no_grad():
        for a, b in zip(fused(other), model(other)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

    model = seeded(LambdaBranch, 0)().to(D).eval()
    want = model(x).detach()
    fused = fuse(model, x)
    with torch.no_grad():
        model.bn.running_mean.add_(1.0)  # the user's model changes after fuse: the fused one does not follow it
        torch.testing.assert_close(fused(x), want, rtol=1e-9, atol=1e-12)

    model = patched(seeded(lambda: nn.Sequential(conv_bn(3, 8), conv_bn(8, 8)), 0)().to(D)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse(model, x)
    fused(torch.randn(4, 3, 8, 8, dtype=D))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "fuse changed the user's BatchNorms"
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model.eval()(x), rtol=1e-9, atol=1e-12)


class ClosureForms(nn.Module):
    """Functions held by a model in the forms a review found copies still missed: two closures sharing a cell (a hook
    that sets ``nonlocal feat``, a getter that reads it), a lambda over self in a tuple, one function twice in a
    list, a patch holding the original forward as a keyword-only default, a closure that calls itself."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form, self.layer, self.proj = form, nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.Linear(4, 2)
        if form == "shared_cell":
            feat = None

            def hook(module, args, out):
                nonlocal feat
                feat = out

            def get():
                return self.proj(feat)

            self.layer.register_forward_hook(hook)
            self.get = get
        elif form == "tuple":
            self.steps = (lambda t: self.proj(self.layer(t)),)
        elif form == "twice":
            step = lambda t: self.layer(t)  # noqa: E731
            self.steps = [step, step]
        elif form == "kwdefault":
            self.layer.forward = lambda x, *, orig=self.layer.forward: orig(x) * 2
        else:  # recursive
            def apply(t, k):
                return t if k == 0 else apply(self.layer(t), k - 1)

            self.apply_fn = apply

    def forward(self, x):
        if x.sum() > 1e9:  # a test of values: kept whole, and its own functions run as written
            x = -x
        if self.form == "shared_cell":
            self.layer(x)
            return self.get()
        if self.form == "tuple":
            return self.steps[0](x)
        if self.form == "twice":
            return self.proj(self.steps[1](self.steps[0](x)))
        if self.form == "kwdefault":
            return self.proj(self.layer(x))
        return self.proj(self.apply_fn(x, 2))


@pytest.mark.parametrize("form", ["shared_cell", "tuple", "twice", "kwdefault", "recursive"])
def test_every_closure_of_a_copy_holds_the_copys_objects(form):
    """Each form kept a cell of the user's model in fuse's copies (found by a review): a train-mode model's
    BatchNorm counted fuse's runs, the fused model followed edits of the user's model, or (a shared cell split)
    returned another call's features.  Every cell is made again once per copy, shared where it was shared."""
    torch.manual_seed(0)
    model = ClosureForms(form).to(D).train()
    x = torch.randn(3, 4, dtype=D)
    fused = fuse(model, x)
    assert model.layer[1].num_batches_tracked.item() == 0, "fuse ran the user's BatchNorm"
    model.eval()
    with torch.no_grad():
        for _ in range(2):  # a second call: a split cell returns the first call's features
            y = torch.randn(3, 4, dtype=D)
            torch.testing.assert_close(fused(y), model(y), rtol=1e-9, atol=1e-12)
        want = model(y)
        model.layer[0].weight.mul_(2)  # the user's model changes after fuse: the fused one does not follow it
        torch.testing.assert_close(fused(y), want, rtol=1e-9, atol=1e-12)


class HeldByFunctions(nn.Module):
    """State a function holds, not the module: callbacks in a list inside a closure's tuple, a draw from a generator's
    bound method (``self.draw = random.Random(1).random``)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form, self.lin, self.bn = form, nn.Linear(4, 4), nn.BatchNorm1d(4)
        if form == "callbacks":
            callbacks = [lambda t: self.bn(t)]
            held = (callbacks, 2.0)
            self.f = lambda t: held[0][0](self.lin(t)) * held[1]
        else:
            draw = random.Random(1).random
            self.f = lambda t: self.bn(self.lin(t)) * (1 + draw())

    def forward(self, x):
        return self.f(x)


@pytest.mark.parametrize("form", ["callbacks", "generator"])
def test_what_a_function_of_the_model_holds_is_the_copys_own(form):
    """A review found fuse rewrote the user's list of callbacks (reached through a tuple in a closure), and drew
    from the user's generator: the user's model then computed otherwise than a twin never fused.  Each copy holds
    its own; the fused model's calls go on as the model's.  (A plain list a hook fills is shared: a feature
    collector's list receives the fused model's features, see HookedNet.)"""
    torch.manual_seed(0)
    model, twin = HeldByFunctions(form).to(D).train(), HeldByFunctions(form).to(D).train()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(3, 4, dtype=D)
    fused = fuse(model, x)  # (in train mode: a copy that ran the user's BatchNorm would move its statistics)
    model.eval(), twin.eval()
    with torch.no_grad():
        for _ in range(3):
            want = model(x)
            torch.testing.assert_close(want, twin(x), rtol=0, atol=0)  # fuse left the user's model as it was
            torch.testing.assert_close(fused(x), want, rtol=1e-9, atol=1e-12)
        if form == "callbacks":  # the user's model changes after fuse: the fused one does not follow it
            model.lin.weight.mul_(2)
            torch.testing.assert_close(fused(x), want, rtol=1e-9, atol=1e-12)


class _SharedDownsample(nn.Module):
    """SkipNet's habit: a downsample registered on its block and on the network, and a float32 tensor made in
    forward (the model does not run in float64)."""

    def __init__(self) -> None:
        super().__init__()
        ds = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.ModuleDict({"conv": nn.Conv2d(4, 4, 3, padding=1), "downsample": ds})
        self.ds = ds

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.block["conv"](x) + self.block["downsample"](x))
        return (y.permute(0, 2, 3, 1) @ torch.eye(4)).permute(0, 3, 1, 2) + self.ds(x)


def test_a_module_under_two_names_keeps_its_dtype_through_the_float64_check():
    """The float64 check cast each of the module's two names; torch put the slots back in order and left the second
    cast in place, so fuse's own copy held float64 weights and every later run failed: fuse refused the model as one
    that does not run (found by a probe)."""
    model = seeded(_SharedDownsample, 0)().eval()
    x = torch.randn(2, 3, 6, 6)
    fused = fuse(model, x)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)  # float32, folded in float64
    assert all(p.dtype == torch.float32 for p in model.parameters())
