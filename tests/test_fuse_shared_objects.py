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

import copy
import random
import weakref
from collections import OrderedDict, defaultdict
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repalgebra import export_onnx, fuse, verify
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


class _RepBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.pw = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(self.dense(x) + self.pw(x))


class _FrozenEncoder(nn.Module):
    """A pretrained encoder that EMA copies share rather than duplicate: its ``__deepcopy__`` returns itself."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = conv_bn(3, c)

    def forward(self, x):
        return self.body(x)

    def __deepcopy__(self, memo):
        return self


class _EncoderNet(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.encoder, self.block, self.head = _FrozenEncoder(c), _RepBlock(c), nn.Conv2d(c, 4, 1)

    def forward(self, x):
        return self.head(self.block(self.encoder(x)))


class _Singleton(_EncoderNet):
    """A model shared by reference: never copied."""

    def __deepcopy__(self, memo):
        return self


class _SharedBackbone(nn.Module):
    """Copies share the frozen backbone's tensors (``memo`` seeded with them), as EMA helpers keep one encoder."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.backbone = nn.Sequential(conv_bn(3, c), _RepBlock(c))
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        return self.head(self.backbone(x))

    def __deepcopy__(self, memo):
        for t in [*self.backbone.parameters(), *self.backbone.buffers()]:
            memo[id(t)] = t
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new


def scale_output(module, args, out):
    return out * 1.5


@pytest.mark.parametrize("build, hooked", [(_Singleton, "block"), (_EncoderNet, "block"), (_SharedBackbone, "backbone.1")])
def test_a_copy_that_is_or_shares_the_model_is_made_again(build, hooked):
    """fuse runs copies; where ``copy.deepcopy`` gave the model itself (``__deepcopy__`` returning ``self``, on the
    model or on its encoder) or a copy sharing its tensors, fuse switched the user's model to eval mode, replaced
    the children of a part kept whole (a hooked block) by fused modules, and cast the shared float32 weights to
    float64 in place, so the user's model refused float32 input (found by a probe).  Such modules are now copied
    through ``__reduce_ex__``: the model stays as it was, and the fused model computes what it does."""
    model = seeded(build, 0)().train()
    model.get_submodule(hooked).register_forward_hook(scale_output)
    before = {k: (v.clone(), v.dtype) for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    fused = fuse(model, x)
    assert all(m.training for m in model.modules()), "fuse switched the user's model to eval mode"
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(v, before[k][0]) and v.dtype == before[k][1] for k, v in model.state_dict().items())
    assert count_bn(fused) < count_bn(model), str(fused.fuse_report)
    assert verify(model, fused, x).passed and all(m.training for m in model.modules()), "verify changed the model"
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model.eval()(x), rtol=1e-5, atol=1e-5)  # float32, folded in float64


class _CountedShared(nn.Module):
    """Copies hold the model's tensors under new names (parameters and buffers over the same storage), and forward
    counts its calls in a buffer, in place."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.head = nn.Sequential(conv_bn(3, 8), _RepBlock(8)), nn.Conv2d(8, 4, 1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls.add_(1)
        return self.head(self.backbone(x))

    def __deepcopy__(self, memo):
        for t in self.parameters():
            memo[id(t)] = nn.Parameter(t.detach(), requires_grad=t.requires_grad)
        for t in self.buffers():
            memo[id(t)] = t.detach()
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new


def test_a_copy_over_the_models_storage_is_made_again():
    """A copy whose tensors share the model's storage took fuse's runs into the user's model: its call counter
    counted them, though the user never called it."""
    model = seeded(_CountedShared, 0)().to(D)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    fused = fuse(model, x)
    assert model.calls.item() == 0, "fuse's runs of its copies wrote the user's model"
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-12)


def _the_encoder() -> nn.Module:
    return _ENCODERS["shared"]


class _RegisteredEncoder(_FrozenEncoder):
    """An encoder pickled by reference to a registry (``__reduce__``): no way to copy it is left."""

    def __reduce__(self):
        return (_the_encoder, ())


_ENCODERS: dict[str, nn.Module] = {}


def test_a_model_no_copy_of_which_is_its_own_is_refused_by_name():
    """Where neither ``copy.deepcopy`` nor ``__reduce_ex__`` gives a copy of its own, fuse refuses by name rather
    than change the user's module through its "copy"."""
    model = seeded(_EncoderNet, 0)().train()
    model.encoder = _ENCODERS["shared"] = _RegisteredEncoder(8)
    with pytest.raises(TypeError, match="'encoder' \\(_RegisteredEncoder\\) is not copied"):
        fuse(model, torch.randn(2, 3, 16, 16))
    assert model.encoder.training


class _Calibrated(nn.Module):
    """A run-time setting kept out of pickles: ``__getstate__`` drops it, ``__setstate__`` restores its default."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = conv_bn(3, 8), nn.Conv2d(8, 4, 1)
        self.logit_scale, self.calibration = 1.0, {"shift": 0.0}

    def forward(self, x):
        return self.head(self.stem(x)) * self.logit_scale + self.calibration["shift"]

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("logit_scale", None)
        state.pop("calibration", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.logit_scale, self.calibration = 1.0, {"shift": 0.0}


class _DefaultActivation(nn.Module):
    """A module its ``__setstate__`` rebuilds with the default activation, whichever the model was given."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.act = conv_bn(3, 8), nn.ReLU()

    def forward(self, x):
        return self.act(self.stem(x))

    def __setstate__(self, state):
        super().__setstate__(state)
        self._modules["act"] = nn.ReLU()


def test_a_model_whose_copy_computes_otherwise_is_refused_by_name():
    """fuse captures and checks a copy, never the model: where the copy held the default ``logit_scale`` (1.0) and
    the model 0.25, the fused model returned 4x the model's output and its check against the copy passed (found by
    a probe).  The copy is compared with the model first, and fuse refuses by name where they differ."""
    model = seeded(_Calibrated, 0)().to(D)
    model.logit_scale = 0.25
    with pytest.raises(TypeError, match="'logit_scale' differs"):
        fuse(model, torch.randn(2, 3, 8, 8, dtype=D))
    model.logit_scale, model.calibration["shift"] = 1.0, 0.5
    with pytest.raises(TypeError, match="'calibration' differs"):
        fuse(model, torch.randn(2, 3, 8, 8, dtype=D))
    model.calibration["shift"] = 0.0  # the copy's values: the same function
    other = seeded(_DefaultActivation, 0)().to(D)
    other.act = nn.GELU()
    with pytest.raises(TypeError, match="its copy holds no GELU at 'act'"):
        fuse(other, torch.randn(2, 3, 8, 8, dtype=D))
    x = torch.randn(2, 3, 8, 8, dtype=D)
    fused = fuse(model, x)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-12)


class _LibraryCalibrated(_Calibrated):
    """:class:`_Calibrated` as a library named ``torch...`` writes it (torch_geometric, torchvision, torchaudio,
    torchmetrics): its ``__getstate__`` and ``__setstate__`` are of that package, not of torch."""

    def __getstate__(self):
        return super().__getstate__()

    def __setstate__(self, state):
        super().__setstate__(state)

    __getstate__.__module__ = __setstate__.__module__ = "torch_geometric.nn.dense.linear"


def test_a_library_named_torch_something_is_not_taken_for_torch():
    """A class of ``torch_geometric`` (or ``torchvision``...) was taken for torch's own, which copies itself its own
    way, and only its tensors were compared: its copy's default ``logit_scale`` was fused, 4x the model (5.0 off; a
    review).  Only torch's package and those inside it count as torch's."""
    model = seeded(_LibraryCalibrated, 0)().to(D)
    model.logit_scale = 0.25
    with pytest.raises(TypeError, match="'logit_scale' differs"):
        fuse(model, torch.randn(2, 3, 8, 8, dtype=D))


def test_an_export_of_a_model_whose_copy_computes_otherwise_is_refused_by_name():
    """export_onnx traces and checks copies too: its file returned 4x the model's output (a fixer's finding)."""
    model = seeded(_Calibrated, 0)().to(D)
    model.logit_scale = 0.25
    with pytest.raises(TypeError, match="cannot export .*'logit_scale' differs"):
        export_onnx(model, None, torch.randn(2, 3, 8, 8, dtype=D))


class _Stats:
    def __init__(self) -> None:
        self.frames = 0


WATCHED: list[nn.Module] = []  # the model a module-level hook writes, named as a global: no copy rebinds it


def collect_features(module, args, out):
    """A feature collector over the user's model: counts calls, keeps the first two outputs, then turns off."""
    model = WATCHED[0]
    model.n_calls += 1
    model.stats.frames += 1
    if model.mode == "collect":
        model.feats.append(out.detach())
        model.mode = "collect" if len(model.feats) < 2 else "off"


def test_fuse_puts_back_the_attributes_a_hook_sets_on_the_users_model():
    """Parameters and buffers such a hook changed were put back, plain attributes were not: a model the user never
    called came out of fuse with ``n_calls = 13``, two collected features and its collector off (found by a
    probe).  They are put back too, and noted."""
    model = seeded(lambda: nn.Sequential(conv_bn(3, 8), conv_bn(8, 8), nn.Conv2d(8, 4, 1)), 0)().to(D)
    model.n_calls, model.mode, model.feats, model.stats = 0, "collect", [], _Stats()
    WATCHED[:] = [model]
    model[1].register_forward_hook(collect_features)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    fused = fuse(model, x)
    assert (model.n_calls, model.mode, model.feats, model.stats.frames) == (0, "collect", [], 0)
    assert "hooks changed feats, mode, n_calls" in str(fused.fuse_report)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-12)


def log_shape_once(module: nn.Module, with_kwargs: bool = False) -> list:
    """A one-shot hook: it removes itself after its first call, through the handle its closure holds."""
    logged, handle = [], None

    def hook(mod, args, *rest):  # (rest: the keyword arguments too where registered with_kwargs)
        logged.append(tuple(rest[-1].shape))
        handle.remove()

    handle = module.register_forward_hook(hook, with_kwargs=with_kwargs)
    return logged


ONE_SHOT: list = []  # the handle of a one-shot hook, kept in a global: no copy rebinds it


def remove_the_global_one_shot(module, args, out):
    ONE_SHOT[0].remove()


class HoldsRemovedHandle(nn.Module):
    """Keeps the handle of a hook it removed at once on its body, and branches on a value (kept whole, its body
    fused): the handle points into the registries of the body the fused form replaces."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(3, 4)
        self.handle = self.body.register_forward_hook(lambda m, args, out: None)
        self.handle.remove()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return y.relu() if y.sum() > 0 else y


def test_a_parent_kept_whole_holding_a_handle_into_a_fused_childs_registries_copies():
    """Review R7 finding 10: once the body was replaced by its fused form, the handle's weak references were dead,
    and ``copy.deepcopy`` of the fused model raised TypeError where the model copies.  The replaced registries stay
    held; the copy computes the same, and the handle still removes nothing."""
    import gc

    model = seeded(HoldsRemovedHandle, 0)().to(D)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    fused = fuse(model, x)
    assert count_bn(fused) == 0 and any(p.path == "" and p.how == "kept whole" for p in fused.fuse_report.parts)
    gc.collect()  # (what fuse held of the body it replaced is gone)
    copied = copy.deepcopy(fused)
    copied.handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(copied(x), model(x), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-12)


class RemovesItsHooks(nn.Module):
    """Keeps the handle of a hook it put on its body or on the body's first conv, which scales what it returns and
    stores features, and a method that removes it; branches on a value (kept whole, its body fused)."""

    def __init__(self, on: str) -> None:
        super().__init__()
        self.body = conv_bn(3, 4)
        self.features: dict = {}
        self.handles = [(self.body if on == "child" else self.body[0]).register_forward_hook(self._tap)]

    def _tap(self, module, args, out):
        self.features["tap"] = out.detach()  # (the module argument is a HookedPart in the fused model)
        return out * 3

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return y.relu() if y.sum() > 0 else y - 1


@pytest.mark.parametrize("on", ["child", "grandchild"])
def test_a_parents_handles_remove_the_hooks_its_fused_child_runs(on):
    """Review R8: the fused body ran copies of the hooks from registries of its own, so after the parent's
    ``remove_hooks()`` the fused model still scaled its output (4.7 off) and the parent's handles removed nothing.
    The fused forms run the same hooks from the registries the handles point into, bound to the fused parent."""
    model = seeded(RemovesItsHooks, 0, on=on)().to(D)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    fused = fuse(model, x)
    assert any(p.path == "body" and p.how == "fx" for p in fused.fuse_report.parts), str(fused.fuse_report)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-12)
        assert fused.features.keys() == model.features.keys() != set(), fused.features.keys()
        model.remove_hooks()
        fused.remove_hooks()
        model.features.clear()
        fused.features.clear()
        torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-12)
        assert fused.features == model.features == {}


def test_a_hook_that_removes_itself_is_still_on_the_users_model_after_fuse():
    """fuse's runs of its copies called the one-shot hook, whose handle is the user's: the user's model, never
    called, had lost its hook after fuse, and a copy's hook kept in the fused model removed it at its first call
    (found by a probe), also where the handle is a global.  The hooks of the user's modules are put back, and a
    copy's hook removes itself from the copy."""
    model = seeded(lambda: nn.Sequential(conv_bn(3, 8), nn.Conv2d(8, 4, 1)), 0)().to(D)
    logged = log_shape_once(model[0], with_kwargs=True)
    ONE_SHOT[:] = [model[1].register_forward_hook(remove_the_global_one_shot)]
    fused = fuse(model, torch.randn(2, 3, 8, 8, dtype=D))
    assert len(model[0]._forward_hooks) == 1 and len(model[1]._forward_hooks) == 1, "fuse removed the user's hooks"
    fused(torch.randn(2, 3, 8, 8, dtype=D))
    assert len(model[0]._forward_hooks) == 1, "the fused model removed the user's hook"
    logged.clear()
    model(torch.randn(1, 3, 8, 8, dtype=D))
    model(torch.randn(1, 3, 8, 8, dtype=D))
    assert logged == [(1, 8, 8, 8)] and not model[0]._forward_hooks and not model[1]._forward_hooks


class WeakBackReference(nn.Module):
    """A model holding an unregistered weak reference to its own child (``self._b = weakref.ref(self.b)``), called
    through it; with ``branch``, kept whole by a branch on its input's values."""

    def __init__(self, branch: bool) -> None:
        super().__init__()
        self.a, self.b, self.branch = conv_bn(3, 4), conv_bn(3, 4), branch
        self._b = weakref.ref(self.b)

    def forward(self, x):
        if self.branch and x.mean() < -100:
            return self._b()[0](x)
        return self.a(x) + self._b()(x)


@pytest.mark.parametrize("branch", [False, True], ids=["captured", "kept-whole"])
def test_a_weak_reference_to_a_child_is_the_copys(branch):
    """``copy.deepcopy`` keeps a weak reference as it is: every copy fuse ran called the user's child, a model in
    train mode had its BatchNorm statistics updated by ``fuse``, and the fused model went on calling the user's
    module (1.3 off while the user's model trained; review R9).  A copy's weak reference now names the copy's
    child; a parent kept whole keeps the child it names as written (a fused form swapped in, the reference died)."""
    x = torch.randn(2, 3, 8, 8, dtype=D)
    model = seeded(WeakBackReference, 0, branch=branch)().to(D).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse(model, x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"fuse changed the user's {k}"
    reference = copy.deepcopy(model).eval()
    reference._b = weakref.ref(reference.b)
    with torch.no_grad():
        for inputs in (x, torch.randn(3, 3, 8, 8, dtype=D), x - 1000):
            torch.testing.assert_close(fused(inputs), reference(inputs), rtol=1e-9, atol=1e-12)
    assert all(v is not model.b for v in [getattr(m, "_b", lambda: None)() for m in fused.modules()])
