"""Fused (reparameterized) FastViT checkpoints: create_model / load_fused.

The fused state dicts here are made from random train-time models by a small
reference reparameterization written below with plain torch ops, unit by unit
as Apple's ``reparameterize_model`` does it (fold BN into conv, pad 1x1 to kxk,
add the BN skip as an identity kernel, sum; RepMixer: ``I + ls * (mixer -
norm)``; RepCPE: ``I + pe``). Nothing here uses repalgebra or the loader's
own key tables to build them. An "Apple inference-mode model" is built the
same way (each unit replaced by its fused conv, SE and activation), so the
loaded model is compared with the fused network itself, and with the
train-time model it came from.
"""

from __future__ import annotations

import bisect
import copy
import re
from typing import Dict, Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastvit_models as fm
from fastvit_models.blocks import MobileOneBlock, RepCPE, RepMixer, ReparamLargeKernelConv
from fastvit_models.checkpoint import apple_key_to_timm, is_fused_state_dict, network_layout, timm_key_to_apple
from fastvit_models.testing import randomize_model_

SIZE = 64  # input resolution; enough for every stage (sa12's attention sees 2x2 tokens)
NAMES = ("fastvit_t8", "fastvit_sa12")


# --------------------------------------------------------------------------- reference


def _fold(kernel: torch.Tensor, bn: nn.BatchNorm2d):
    """(kernel, bias) of conv(kernel) -> bn, in float64."""
    std = (bn.running_var.double() + bn.eps).sqrt()
    t = bn.weight.double() / std
    return kernel.double() * t.reshape(-1, 1, 1, 1), bn.bias.double() - bn.running_mean.double() * t


def _identity(channels: int, per_group: int, k: int) -> torch.Tensor:
    kernel = torch.zeros(channels, per_group, k, k, dtype=torch.float64)
    for i in range(channels):
        kernel[i, i % per_group, k // 2, k // 2] = 1.0
    return kernel


def _ref_mobileone(m: MobileOneBlock):
    k = m.kernel_size
    out = m.out_channels
    weight = torch.zeros(out, m.in_channels // m.groups, k, k, dtype=torch.float64)
    bias = torch.zeros(out, dtype=torch.float64)
    if m.rbr_scale is not None:
        w, b = _fold(m.rbr_scale.conv.weight, m.rbr_scale.bn)
        weight, bias = weight + F.pad(w, [k // 2] * 4), bias + b
    if m.rbr_skip is not None:
        w, b = _fold(_identity(m.in_channels, m.in_channels // m.groups, k), m.rbr_skip)
        weight, bias = weight + w, bias + b
    for branch in m.rbr_conv or []:
        w, b = _fold(branch.conv.weight, branch.bn)
        weight, bias = weight + w, bias + b
    return weight, bias


def _ref_unit(m: nn.Module):
    """Fused (kernel, bias) of one unit, float64."""
    if isinstance(m, MobileOneBlock):
        return _ref_mobileone(m)
    if isinstance(m, RepMixer):
        wm, bm = _ref_mobileone(m.mixer)
        wn, bn = _ref_mobileone(m.norm)
        ls = m.layer_scale.double()
        return _identity(m.dim, 1, m.kernel_size) + ls.unsqueeze(-1) * (wm - wn), ls.flatten() * (bm - bn)
    if isinstance(m, ReparamLargeKernelConv):
        w, b = _fold(m.lkb_origin.conv.weight, m.lkb_origin.bn)
        if m.small_conv is not None:
            ws, bs = _fold(m.small_conv.conv.weight, m.small_conv.bn)
            w, b = w + F.pad(ws, [(m.kernel_size - m.small_kernel) // 2] * 4), b + bs
        return w, b
    if isinstance(m, RepCPE):
        c, per_group, k, _ = m.pe.weight.shape
        return _identity(c, per_group, k) + m.pe.weight.double(), m.pe.bias.double()
    raise TypeError(type(m))


def _units(model: nn.Module):
    """(path, module) of every reparameterizable unit, RepMixer children excluded."""
    found = []
    for path, m in model.named_modules():
        if any(path.startswith(p + ".") for p, q in found if isinstance(q, RepMixer)):
            continue
        if isinstance(m, (MobileOneBlock, RepMixer, ReparamLargeKernelConv, RepCPE)):
            found.append((path, m))
    return found


def reference_fused_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """What Apple's ``reparameterize_model(model).state_dict()`` holds (float32)."""
    units = _units(model)
    state = dict(model.state_dict())
    for path, m in units:
        weight, bias = _ref_unit(m)
        if isinstance(m, (RepMixer, RepCPE)):
            drop = [f"{path}."]
        elif isinstance(m, MobileOneBlock):
            drop = [f"{path}.rbr_conv.", f"{path}.rbr_scale.", f"{path}.rbr_skip."]
        else:
            drop = [f"{path}.lkb_origin.", f"{path}.small_conv."]
        state = {k: v for k, v in state.items() if not k.startswith(tuple(drop))}
        name = "lkb_reparam" if isinstance(m, ReparamLargeKernelConv) else "reparam_conv"
        state[f"{path}.{name}.weight"] = weight.float()
        state[f"{path}.{name}.bias"] = bias.float()
    return state


class _FusedUnit(nn.Module):
    """Apple's inference-mode unit: one conv with bias, then SE and activation if any."""

    def __init__(self, like: nn.Conv2d, weight, bias, se=None, act=None):
        super().__init__()
        self.conv = nn.Conv2d(
            like.in_channels, like.out_channels, like.kernel_size, like.stride, like.padding,
            groups=like.groups, bias=True,
        )
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            self.conv.bias.copy_(bias)
        self.se, self.act = se, act

    def forward(self, x):
        x = self.conv(x)
        if self.se is not None:
            x = self.se(x)
        return self.act(x) if self.act is not None else x


def apple_fused_model(model: nn.Module, fused: Dict[str, torch.Tensor]) -> nn.Module:
    """``model`` with each unit replaced by its inference-mode form, weights from ``fused``."""
    out = copy.deepcopy(model)
    for path, m in _units(model):
        name = "lkb_reparam" if isinstance(m, ReparamLargeKernelConv) else "reparam_conv"
        w, b = fused[f"{path}.{name}.weight"], fused[f"{path}.{name}.bias"]
        if isinstance(m, MobileOneBlock):
            unit = _FusedUnit(m.rbr_conv[0].conv, w, b, m.se, m.activation)
        elif isinstance(m, RepMixer):
            unit = _FusedUnit(m.mixer.rbr_conv[0].conv, w, b)
        elif isinstance(m, ReparamLargeKernelConv):
            unit = _FusedUnit(m.lkb_origin.conv, w, b)
        else:
            unit = _FusedUnit(m.pe, w, b)
        out.set_submodule(path, unit)
    return out.eval()


def to_timm_fused(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Apple fused keys -> timm's, the way timm's ``checkpoint_filter_fn`` remaps, plus
    its fused names (``lkb_reparam`` -> ``reparam_conv``; RepCPE at ``stages.S.pos_emb``)."""
    stage_ends = sorted({int(m.group(1)) for k in state if (m := re.match(r"^network\.(\d+)\.proj", k))})
    out = {}
    for k, v in state.items():
        k = k.replace("patch_embed", "stem").replace("rbr_conv", "conv_kxk").replace("rbr_scale", "conv_scale")
        k = k.replace("rbr_skip", "identity").replace("conv_exp", "final_conv").replace("lkb_origin", "large_conv")
        k = k.replace("convffn", "mlp").replace("se.reduce", "se.fc1").replace("se.expand", "se.fc2")
        k = k.replace("lkb_reparam", "reparam_conv")
        k = re.sub(r"layer_scale_([0-9])", r"layer_scale_\1.gamma", k)
        if k.endswith("layer_scale"):
            k = k + ".gamma"
        if k.startswith("head."):
            k = k.replace("head.", "head.fc.")
        m = re.match(r"^network\.(\d+)", k)
        if m:
            n = int(m.group(1))
            s, net = bisect.bisect_right(stage_ends, n), f"network.{n}"
            if k.startswith(net + ".proj"):
                k = k.replace(net + ".proj", f"stages.{s}.downsample.proj")
            elif k.startswith(net + ".pe"):
                k = k.replace(net + ".pe", f"stages.{s}.pos_emb.pos_enc")
            elif k.startswith(net + ".reparam_conv"):
                k = k.replace(net, f"stages.{s}.pos_emb")
            else:
                k = k.replace(net, f"stages.{s}.blocks")
        out[k] = v
    return out


# --------------------------------------------------------------------------- helpers


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _image(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


_CACHE: Dict[str, tuple] = {}


def _case(name: str):
    """(train-time model, Apple fused state dict, Apple inference-mode model), built once."""
    if name not in _CACHE:
        with torch.random.fork_rng():
            torch.manual_seed(3)
            model = fm.create_model(name)
        randomize_model_(model, torch.Generator().manual_seed(3))
        fused = reference_fused_state_dict(model)
        _CACHE[name] = (model, fused, apple_fused_model(model, fused))
    return _CACHE[name]


def _save(state, path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)  # Apple's release wrapping


# --------------------------------------------------------------------------- tests


def test_fused_keys_are_apples():
    """Hand-written sa12 keys: what reparameterize_model keeps, adds and drops."""
    _, fused, _ = _case("fastvit_sa12")
    present = [
        "patch_embed.0.reparam_conv.weight",
        "patch_embed.2.reparam_conv.bias",
        "network.0.0.token_mixer.reparam_conv.weight",
        "network.0.0.layer_scale",
        "network.0.0.convffn.conv.conv.weight",
        "network.0.0.convffn.conv.bn.running_var",
        "network.1.proj.0.lkb_reparam.weight",
        "network.1.proj.1.reparam_conv.weight",
        "network.6.reparam_conv.weight",
        "network.7.0.norm.running_mean",
        "network.7.0.token_mixer.qkv.weight",
        "network.7.0.token_mixer.proj.bias",
        "network.7.0.layer_scale_1",
        "conv_exp.reparam_conv.weight",
        "conv_exp.se.reduce.weight",
        "head.weight",
    ]
    absent = [
        "network.0.0.token_mixer.layer_scale",
        "network.0.0.token_mixer.mixer.rbr_conv.0.conv.weight",
        "network.0.0.token_mixer.norm.rbr_skip.weight",
        "network.1.proj.0.lkb_origin.conv.weight",
        "network.1.proj.0.small_conv.bn.bias",
        "network.6.pe.weight",
        "patch_embed.0.rbr_scale.conv.weight",
        "conv_exp.rbr_conv.0.bn.weight",
    ]
    for k in present:
        assert k in fused, k
    for k in absent:
        assert k not in fused, k
    assert fused["network.6.reparam_conv.weight"].shape == (512, 1, 7, 7)
    assert fused["network.1.proj.0.lkb_reparam.weight"].shape == (128, 1, 7, 7)
    assert is_fused_state_dict(fused)
    assert not is_fused_state_dict(_case("fastvit_sa12")[0].state_dict())
    # The loader expects exactly these keys and shapes.
    from fastvit_models.fused_checkpoint import fused_state_dict_shapes

    shapes = fused_state_dict_shapes(fm.create_model("fastvit_sa12"))
    assert shapes == {k: v.shape for k, v in fused.items()}


@pytest.mark.parametrize("name", NAMES)
def test_reference_fused_model_matches_train_time(name):
    """Sanity of the reference itself: Apple's fused network equals the train-time one."""
    model, _, apple = _case(name)
    x = _image()
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        assert rel_err(apple(x), ref) <= 1e-5
        assert rel_err(model(x), ref) <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_create_model_loads_fused_checkpoint(tmp_path, name):
    model, fused, apple = _case(name)
    x = _image()
    with torch.no_grad():
        expected_apple, expected_train = apple(x), model(x)
    first = None
    for ext in ("pth.tar", "safetensors"):
        path = tmp_path / f"{name}_reparam.{ext}"
        _save(fused, path)
        loaded = fm.create_model(name, checkpoint=path)
        assert not loaded.training
        with torch.no_grad():
            out = loaded(x)
        assert rel_err(out, expected_apple) <= 2e-6  # the fused network, computed train-time style
        assert rel_err(out, expected_train) <= 1e-5
        if first is None:
            first = loaded.state_dict()
        else:
            assert all(torch.equal(first[k], v) for k, v in loaded.state_dict().items())
    _check_branches(loaded, fused)


def _check_branches(model: nn.Module, fused: Dict[str, torch.Tensor]) -> None:
    """Main branch = fused kernel verbatim + identity BN; other branches zero."""
    eps_ok = 0

    def identity_bn(bn: nn.BatchNorm2d, bias: Optional[torch.Tensor]) -> None:
        nonlocal eps_ok
        assert torch.all(bn.weight == 1) and torch.all(bn.running_mean == 0)
        assert bn.running_var.dtype == torch.float32
        assert torch.all(torch.sqrt(bn.running_var + bn.eps) == 1)  # exactly, in float32
        assert (bn.running_var.double() + bn.eps - 1).abs().max() <= 2**-25  # float64: one f32 rounding
        z = torch.randn(2, bn.num_features, 3, 3)
        assert torch.equal(bn.eval()(z), z + (0 if bias is None else bias.reshape(-1, 1, 1)))
        if bias is not None:
            assert torch.equal(bn.bias, bias)
        eps_ok += 1

    def zero_bn(bn: nn.BatchNorm2d) -> None:
        assert torch.all(bn.weight == 0) and torch.all(bn.bias == 0)

    def zero_branch(branch) -> None:
        assert torch.all(branch.conv.weight == 0)
        zero_bn(branch.bn)

    def mobileone(m: MobileOneBlock, w, b) -> None:
        assert torch.equal(m.rbr_conv[0].conv.weight, w)
        identity_bn(m.rbr_conv[0].bn, b)
        if m.rbr_scale is not None:
            zero_branch(m.rbr_scale)
        if m.rbr_skip is not None:
            zero_bn(m.rbr_skip)

    for path, m in _units(model):
        name = "lkb_reparam" if isinstance(m, ReparamLargeKernelConv) else "reparam_conv"
        w, b = fused[f"{path}.{name}.weight"], fused[f"{path}.{name}.bias"]
        if isinstance(m, MobileOneBlock):
            mobileone(m, w, b)
        elif isinstance(m, RepMixer):
            mobileone(m.mixer, w, b)
            identity_bn(m.norm.rbr_skip, None)
            assert torch.all(m.layer_scale == 1)
        elif isinstance(m, ReparamLargeKernelConv):
            assert torch.equal(m.lkb_origin.conv.weight, w)
            identity_bn(m.lkb_origin.bn, b)
            zero_branch(m.small_conv)
        else:
            eye = _identity(*m.pe.weight.shape[:2], m.pe.weight.shape[-1])
            assert torch.equal(m.pe.weight, (w.double() - eye).float())
            assert torch.equal(m.pe.bias, b)
    kept = model.state_dict()
    for k, v in fused.items():
        if "reparam" not in k:
            assert torch.equal(kept[k], v), k
    assert eps_ok > 0


@pytest.mark.parametrize("name", NAMES)
def test_load_fused_returns_the_fused_network(tmp_path, name):
    model, fused, apple = _case(name)
    path = tmp_path / f"{name}_reparam.pth"
    _save(fused, path)
    x = _image()
    out = fm.load_fused(name, path, example_inputs=(x[:1],))
    assert not out.training
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in out.modules())
    with torch.no_grad():
        got = out(x)
        assert rel_err(got, apple(x)) <= 1e-5
        assert rel_err(got, model(x)) <= 1e-5
    # Units that stay convs of their own (named after their path) get the checkpoint's
    # kernel back: bit for bit where the loader put it behind an identity BN alone;
    # RepMixer / RepCPE kernels, whose identity is cancelled or split off, within
    # one float32 ulp at 1 (their centre tap).
    convs = {n: m for n, m in out.named_modules() if isinstance(m, nn.Conv2d)}
    checked = set()
    for path, m in _units(model):
        name = "lkb_reparam" if isinstance(m, ReparamLargeKernelConv) else "reparam_conv"
        w, b = fused[f"{path}.{name}.weight"], fused[f"{path}.{name}.bias"]
        conv = convs.get(path.replace(".", "_"))
        if conv is None or conv.weight.shape != w.shape:
            continue  # merged further by repalgebra
        assert torch.equal(conv.bias, b), path
        if isinstance(m, (RepMixer, RepCPE)):
            assert (conv.weight - w).abs().max() <= 2**-23, path
        else:
            assert torch.equal(conv.weight, w), path
        checked.add(path)
    assert {"patch_embed.0", "patch_embed.1", "patch_embed.2", "conv_exp"} <= checked


def test_timm_layout_fused_checkpoint(tmp_path):
    """timm's reparameterized keys (``reparam_conv`` everywhere) load to the same model."""
    name = "fastvit_sa12"
    model, fused, apple = _case(name)
    timm_state = to_timm_fused(fused)
    pairs = [
        ("patch_embed.0.reparam_conv.weight", "stem.0.reparam_conv.weight"),
        ("network.0.0.token_mixer.reparam_conv.bias", "stages.0.blocks.0.token_mixer.reparam_conv.bias"),
        ("network.1.proj.0.lkb_reparam.weight", "stages.1.downsample.proj.0.reparam_conv.weight"),
        ("network.1.proj.1.reparam_conv.weight", "stages.1.downsample.proj.1.reparam_conv.weight"),
        ("network.6.reparam_conv.weight", "stages.3.pos_emb.reparam_conv.weight"),
        ("network.7.0.layer_scale_2", "stages.3.blocks.0.layer_scale_2.gamma"),
        ("conv_exp.reparam_conv.bias", "final_conv.reparam_conv.bias"),
        ("conv_exp.se.expand.weight", "final_conv.se.fc2.weight"),
    ]
    layout = network_layout(model)
    for a, t in pairs:
        assert t in timm_state, t
        assert apple_key_to_timm(a, layout) == t
        assert timm_key_to_apple(t, layout) == a
    apple_path, timm_path = tmp_path / "apple.pth", tmp_path / "timm.safetensors"
    _save(fused, apple_path)
    _save(timm_state, timm_path)
    a = fm.create_model(name, checkpoint=apple_path).state_dict()
    t = fm.create_model(name, checkpoint=timm_path).state_dict()
    assert list(a) == list(t) and all(torch.equal(a[k], t[k]) for k in a)
    # Missing / unexpected keys are reported with timm's names too.
    del timm_state["stages.3.pos_emb.reparam_conv.bias"]
    timm_state["stages.1.downsample.proj.0.large_conv.conv.weight"] = torch.zeros(1)
    _save(timm_state, timm_path)
    with pytest.raises(ValueError) as info:
        fm.create_model(name, checkpoint=timm_path)
    message = str(info.value)
    assert "network.6.reparam_conv.bias (timm: stages.3.pos_emb.reparam_conv.bias)" in message
    assert "stages.1.downsample.proj.0.large_conv.conv.weight" in message


def test_missing_unexpected_and_bad_shapes_raise(tmp_path):
    _, fused, _ = _case("fastvit_t8")
    broken = dict(fused)
    del broken["network.0.0.token_mixer.reparam_conv.bias"]
    del broken["network.1.proj.0.lkb_reparam.weight"]
    broken["network.0.0.token_mixer.mixer.rbr_conv.0.conv.weight"] = torch.zeros(48, 1, 3, 3)
    broken["conv_exp.bogus"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    _save(broken, path)
    with pytest.raises(ValueError) as info:
        fm.create_model("fastvit_t8", checkpoint=path)
    message = str(info.value)
    assert "missing" in message and "unexpected" in message and "fused" in message
    for key in (
        "network.0.0.token_mixer.reparam_conv.bias",
        "network.1.proj.0.lkb_reparam.weight",
        "network.0.0.token_mixer.mixer.rbr_conv.0.conv.weight",
        "conv_exp.bogus",
    ):
        assert key in message, key
    # A fused t8 checkpoint does not fit t12 (more blocks) nor another head.
    path = tmp_path / "t8.pth"
    _save(fused, path)
    with pytest.raises(ValueError, match="missing keys"):
        fm.create_model("fastvit_t12", checkpoint=path)
    with pytest.raises(ValueError, match="shape mismatch.*head.weight"):
        fm.create_model("fastvit_t8", num_classes=10, checkpoint=path)
    wrong = dict(fused)
    wrong["patch_embed.0.reparam_conv.weight"] = torch.zeros(48, 3, 1, 1)
    _save(wrong, path)
    with pytest.raises(ValueError, match="shape mismatch.*patch_embed.0.reparam_conv.weight"):
        fm.create_model("fastvit_t8", checkpoint=path)


def test_load_fused_checkpoint_refuses_train_time_files(tmp_path):
    model, fused, _ = _case("fastvit_t8")
    path = tmp_path / "train.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match="not a fused checkpoint"):
        fm.load_fused_checkpoint(fm.create_model("fastvit_t8"), path)
    # ...while load_checkpoint takes both kinds into an existing model.
    target = fm.create_model("fastvit_t8").eval()
    _save(fused, path)
    fm.load_checkpoint(target, path)
    x = _image()
    with torch.no_grad():
        assert rel_err(target(x), model(x)) <= 1e-5
