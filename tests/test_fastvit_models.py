"""Tests of fastvit_models: structure, parameter counts, fx tracing, checkpoint loading."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import fastvit_models as fm
from fastvit_models.checkpoint import (
    apple_key_to_timm,
    network_layout,
    timm_key_to_apple,
    to_timm_state_dict,
)
from fastvit_models.testing import randomize_bn_, randomize_model_

NAMES = [
    "fastvit_t8",
    "fastvit_t12",
    "fastvit_s12",
    "fastvit_sa12",
    "fastvit_sa24",
    "fastvit_sa36",
    "fastvit_ma36",
]

# Train-time parameter counts of our modules (== Apple's train-time modules).
TRAIN_PARAMS = {
    "fastvit_t8": 4_026_232,
    "fastvit_t12": 7_553_704,
    "fastvit_s12": 9_473_576,
    "fastvit_sa12": 11_580_968,
    "fastvit_sa24": 21_554_216,
    "fastvit_sa36": 31_527_464,
    "fastvit_ma36": 44_068_004,
}
# Parameter counts (millions) that the reference reports for its *fused* models.
FUSED_PARAMS_M = {
    "fastvit_t8": 4.00,
    "fastvit_t12": 7.51,
    "fastvit_s12": 9.43,
    "fastvit_sa12": 11.55,
    "fastvit_sa24": 21.50,
    "fastvit_sa36": 31.46,
    "fastvit_ma36": 43.98,
}


def _random_model(name: str, seed: int = 0, **kwargs) -> fm.FastViT:
    """A variant with random weights, realistic BN statistics and layer scales, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = fm.create_model(name, **kwargs)
    return randomize_model_(model, torch.Generator().manual_seed(seed))


def _image(size: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- registry


def test_list_models_has_the_seven_variants():
    assert fm.list_models() == NAMES


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        fm.create_model("fastvit_xl")
    for name in NAMES:
        assert name in str(info.value)


def test_no_fused_code_paths():
    model = fm.create_model("fastvit_sa12")
    for name, module in model.named_modules():
        for attr in ("reparameterize", "inference_mode", "reparam_conv", "lkb_reparam"):
            assert not hasattr(module, attr), f"{name or 'model'} has {attr}"


# --------------------------------------------------------------------------- parameter counts


def _train_count_from_config(cfg: fm.FastViTConfig, num_classes: int = 1000) -> int:
    """Train-time parameters recomputed from the reference's structure, branch by branch."""

    def cbn(cin, cout, k, groups=1):  # conv (no bias) + BN affine
        return cout * (cin // groups) * k * k + 2 * cout

    bn = lambda c: 2 * c  # noqa: E731
    d = cfg.embed_dims
    c = d[0]
    n = cbn(3, c, 3) + cbn(3, c, 1)  # stem 0: 3x3 s2 + 1x1 scale, no skip
    n += cbn(c, c, 3, c) + cbn(c, c, 1, c)  # stem 1: dw 3x3 s2 + 1x1 scale, no skip
    n += bn(c) + cbn(c, c, 1)  # stem 2: 1x1 + BN skip
    for i, depth in enumerate(cfg.layers):
        c, h = d[i], int(d[i] * cfg.mlp_ratio)
        if i > 0:  # patch embed: 7x7 + 3x3 (groups = C_in), then 1x1 MobileOne with skip
            n += cbn(d[i - 1], c, 7, d[i - 1]) + cbn(d[i - 1], c, 3, d[i - 1])
            n += bn(c) + cbn(c, c, 1)
        if cfg.pos_embs[i]:
            k = cfg.pos_embs[i]
            n += c * k * k + c
        ffn = cbn(c, c, 7, c) + (c * h + h) + (h * c + c)
        if cfg.token_mixers[i] == "repmixer":
            mixer = bn(c) + (bn(c) + cbn(c, c, 3, c) + cbn(c, c, 1, c)) + c  # norm, mixer, ls
            n += depth * (mixer + ffn + c)
        else:
            attn = bn(c) + 3 * c * c + (c * c + c)  # pre-norm, qkv (no bias), proj
            n += depth * (attn + ffn + 2 * c)
    c, c2 = d[-1], 2 * d[-1]
    s = int(c2 * 0.0625)
    n += cbn(c, c2, 3, c) + cbn(c, c2, 1, c) + (c2 * s + s) + (s * c2 + c2)  # conv_exp + SE
    return n + c2 * num_classes + num_classes


def _fused_count_from_model(model: nn.Module) -> int:
    """Parameters the fused reference model keeps, summed from *our* module tree.

    Each MobileOne / large-kernel / RepMixer / RepCPE unit becomes one conv with
    bias (its kernel size and groups read off our branches); everything else
    (ConvFFN's conv+BN, attention, layer scales of the blocks, SE, head) stays.
    """

    def fused_conv(conv: nn.Conv2d) -> int:
        return conv.weight.numel() + conv.out_channels

    total = 0

    def visit(m: nn.Module) -> None:
        nonlocal total
        if isinstance(m, fm.MobileOneBlock):
            main = m.rbr_conv[0].conv if m.rbr_conv is not None else None
            assert main is not None
            total += fused_conv(main) + (_n_params(m.se) if m.se is not None else 0)
        elif isinstance(m, fm.ReparamLargeKernelConv):
            total += fused_conv(m.lkb_origin.conv)
        elif isinstance(m, fm.RepMixer):
            total += fused_conv(m.mixer.rbr_conv[0].conv)
        elif isinstance(m, fm.RepCPE):
            total += fused_conv(m.pe)
        else:
            total += sum(p.numel() for p in m.parameters(recurse=False))
            for child in m.children():
                visit(child)

    visit(model)
    return total


@pytest.mark.parametrize("name", NAMES)
def test_variant_params_and_small_forward(name):
    model = fm.create_model(name).eval()
    train = _n_params(model)
    print(f"{name}: train-time {train:,} params")
    assert train == TRAIN_PARAMS[name]
    assert train == _train_count_from_config(fm.FASTVIT_CONFIGS[name])
    fused = _fused_count_from_model(model)
    assert round(fused / 1e6, 2) == FUSED_PARAMS_M[name], fused
    # 32x32 leaves a 1x1 map in the last stage: RepCPE, attention and SE still run.
    with torch.no_grad():
        assert model(_image(32)).shape == (1, 1000)


# --------------------------------------------------------------------------- structure


def test_mobileone_branches_where_shapes_allow():
    model = fm.create_model("fastvit_t8")
    stem0, stem1, stem2 = model.patch_embed
    assert stem0.rbr_skip is None and stem0.rbr_scale is not None  # 3 -> 48, stride 2
    assert stem1.rbr_skip is None and stem1.rbr_conv[0].conv.groups == 48  # depthwise s2
    assert stem2.rbr_skip is not None and stem2.rbr_scale is None  # 1x1
    for block in (stem0, stem1, stem2):
        assert len(block.rbr_conv) == 1 and isinstance(block.activation, nn.GELU)
        assert block.se is None
    assert isinstance(model.conv_exp.se, fm.SEBlock) and model.conv_exp.rbr_skip is None
    assert model.conv_exp.rbr_conv[0].conv.weight.shape == (768, 1, 3, 3)
    mixer = model.network[0][0].token_mixer
    assert mixer.norm.rbr_conv is None and mixer.norm.rbr_scale is None
    assert mixer.mixer.activation is None and mixer.norm.activation is None
    assert mixer.layer_scale.shape == (48, 1, 1)
    embed = model.network[1]
    assert embed.proj[0].lkb_origin.conv.weight.shape == (96, 1, 7, 7)
    assert embed.proj[0].small_conv.conv.weight.shape == (96, 1, 3, 3)
    assert embed.proj[0].lkb_origin.conv.stride == (2, 2)


def test_large_kernel_conv_has_no_activation():
    torch.manual_seed(0)
    lk = fm.ReparamLargeKernelConv(8, 16, 7, stride=2, groups=8, small_kernel=3).eval()
    randomize_bn_(lk, torch.Generator().manual_seed(0))
    x = torch.randn(2, 8, 12, 12)
    out = lk(x)
    assert torch.equal(out, lk.lkb_origin(x) + lk.small_conv(x))
    assert (out < -0.5).any()  # GELU would bound outputs below by about -0.17


def test_repmixer_formula():
    torch.manual_seed(0)
    mixer = randomize_model_(fm.RepMixer(16), torch.Generator().manual_seed(0))
    x = torch.randn(2, 16, 9, 9)
    expected = x + mixer.layer_scale * (mixer.mixer(x) - mixer.norm.rbr_skip(x))
    assert torch.equal(mixer(x), expected)


def test_se_equals_reference_pooling():
    torch.manual_seed(0)
    se = fm.SEBlock(64).eval()
    for size in (8, 5):  # 8x8 is the head's map at 256x256 input
        x = torch.randn(2, 64, size, size)
        s = F.avg_pool2d(x, kernel_size=[size, size])  # the reference's squeeze
        s = torch.sigmoid(se.expand(F.relu(se.reduce(s))))
        torch.testing.assert_close(se(x), x * s.view(-1, 64, 1, 1), rtol=1e-6, atol=1e-7)


def test_attention_matches_sdpa():
    torch.manual_seed(0)
    attn = fm.Attention(64).eval()
    assert attn.qkv.bias is None and attn.num_heads == 2
    x = torch.randn(2, 64, 5, 6)
    tokens = x.flatten(2).transpose(1, 2)
    q, k, v = attn.qkv(tokens).reshape(2, 30, 3, 2, 32).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 30, 64)
    y = attn.proj(y).transpose(1, 2).reshape(2, 64, 5, 6)
    torch.testing.assert_close(attn(x), y, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- forward / fx


@pytest.mark.parametrize("name, num_classes", [("fastvit_t8", 10), ("fastvit_sa12", 1000)])
def test_forward_256_and_fx_trace(name, num_classes):
    model = _random_model(name, num_classes=num_classes)
    traced = torch.fx.symbolic_trace(model)
    targets = {str(n.target) for n in traced.graph.nodes if n.op == "call_module"}
    assert "network.0.0.token_mixer.mixer.rbr_conv.0.conv" in targets
    assert not any(isinstance(traced.get_submodule(t), nn.Identity) for t in targets)
    with torch.no_grad():
        x = _image(256)
        out = model(x)
        assert out.shape == (1, num_classes) and torch.isfinite(out).all()
        assert torch.equal(traced(x), out)
        x = _image(64, batch=2)  # one trace serves any input size: no shapes baked in
        assert torch.equal(traced(x), model(x))


def test_drop_path_is_identity_in_eval():
    plain = _random_model("fastvit_t8")
    dropping = fm.create_model("fastvit_t8", drop_path_rate=0.2)
    dropping.load_state_dict(plain.state_dict())
    dropping.eval()
    assert any(isinstance(m, fm.DropPath) for m in dropping.modules())
    x = _image(64)
    with torch.no_grad():
        assert torch.equal(dropping(x), plain(x))


def test_randomize_bn_ranges_and_determinism():
    a = randomize_bn_(fm.create_model("fastvit_t8"), torch.Generator().manual_seed(3))
    b = randomize_bn_(fm.create_model("fastvit_t8"), torch.Generator().manual_seed(3))
    bns = [m for m in a.modules() if isinstance(m, nn.BatchNorm2d)]
    var = torch.cat([m.running_var for m in bns])
    mean = torch.cat([m.running_mean for m in bns])
    assert var.min() >= 0.5 and var.max() <= 2.0
    assert 0.05 < mean.std() < 0.2
    assert not torch.equal(torch.cat([m.weight for m in bns]), torch.ones_like(var))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        if "running" in ka:
            assert torch.equal(va, vb), ka


# --------------------------------------------------------------------------- checkpoints

# (Apple key, timm key) pairs as they appear in the two projects' sa12 checkpoints.
SA12_KEY_PAIRS = [
    ("patch_embed.0.rbr_conv.0.conv.weight", "stem.0.conv_kxk.0.conv.weight"),
    ("patch_embed.0.rbr_scale.bn.running_var", "stem.0.conv_scale.bn.running_var"),
    ("patch_embed.2.rbr_skip.weight", "stem.2.identity.weight"),
    (
        "network.0.0.token_mixer.mixer.rbr_conv.0.conv.weight",
        "stages.0.blocks.0.token_mixer.mixer.conv_kxk.0.conv.weight",
    ),
    (
        "network.0.0.token_mixer.mixer.rbr_scale.conv.weight",
        "stages.0.blocks.0.token_mixer.mixer.conv_scale.conv.weight",
    ),
    (
        "network.0.0.token_mixer.mixer.rbr_skip.running_mean",
        "stages.0.blocks.0.token_mixer.mixer.identity.running_mean",
    ),
    (
        "network.0.0.token_mixer.norm.rbr_skip.weight",
        "stages.0.blocks.0.token_mixer.norm.identity.weight",
    ),
    ("network.0.0.token_mixer.layer_scale", "stages.0.blocks.0.token_mixer.layer_scale.gamma"),
    ("network.0.1.convffn.conv.conv.weight", "stages.0.blocks.1.mlp.conv.conv.weight"),
    ("network.0.1.convffn.conv.bn.bias", "stages.0.blocks.1.mlp.conv.bn.bias"),
    ("network.0.1.convffn.fc1.weight", "stages.0.blocks.1.mlp.fc1.weight"),
    ("network.0.1.convffn.fc2.bias", "stages.0.blocks.1.mlp.fc2.bias"),
    ("network.0.1.layer_scale", "stages.0.blocks.1.layer_scale.gamma"),
    ("network.1.proj.0.lkb_origin.conv.weight", "stages.1.downsample.proj.0.large_conv.conv.weight"),
    ("network.1.proj.0.small_conv.bn.weight", "stages.1.downsample.proj.0.small_conv.bn.weight"),
    ("network.1.proj.1.rbr_skip.running_var", "stages.1.downsample.proj.1.identity.running_var"),
    ("network.1.proj.1.rbr_conv.0.conv.weight", "stages.1.downsample.proj.1.conv_kxk.0.conv.weight"),
    ("network.2.1.convffn.fc1.weight", "stages.1.blocks.1.mlp.fc1.weight"),
    ("network.4.5.layer_scale", "stages.2.blocks.5.layer_scale.gamma"),
    ("network.5.proj.0.lkb_origin.bn.bias", "stages.3.downsample.proj.0.large_conv.bn.bias"),
    ("network.6.pe.weight", "stages.3.pos_emb.pos_enc.weight"),
    ("network.6.pe.bias", "stages.3.pos_emb.pos_enc.bias"),
    ("network.7.0.norm.running_mean", "stages.3.blocks.0.norm.running_mean"),
    ("network.7.0.token_mixer.qkv.weight", "stages.3.blocks.0.token_mixer.qkv.weight"),
    ("network.7.0.token_mixer.proj.bias", "stages.3.blocks.0.token_mixer.proj.bias"),
    ("network.7.1.layer_scale_1", "stages.3.blocks.1.layer_scale_1.gamma"),
    ("network.7.1.layer_scale_2", "stages.3.blocks.1.layer_scale_2.gamma"),
    ("network.7.1.convffn.conv.bn.weight", "stages.3.blocks.1.mlp.conv.bn.weight"),
    ("conv_exp.rbr_conv.0.conv.weight", "final_conv.conv_kxk.0.conv.weight"),
    ("conv_exp.rbr_scale.bn.weight", "final_conv.conv_scale.bn.weight"),
    ("conv_exp.se.reduce.weight", "final_conv.se.fc1.weight"),
    ("conv_exp.se.expand.bias", "final_conv.se.fc2.bias"),
    ("head.weight", "head.fc.weight"),
    ("head.bias", "head.fc.bias"),
]
# Keys that must NOT exist (branches the reference does not build).
SA12_ABSENT_APPLE = [
    "patch_embed.0.rbr_skip.weight",
    "patch_embed.2.rbr_scale.conv.weight",
    "network.7.0.token_mixer.qkv.bias",
    "network.0.0.token_mixer.norm.rbr_conv.0.conv.weight",
    "conv_exp.rbr_skip.weight",
]


def test_hand_written_keys_both_layouts():
    model = fm.create_model("fastvit_sa12")
    apple = set(model.state_dict())
    timm = set(to_timm_state_dict(model))
    layout = network_layout(model)
    for a, t in SA12_KEY_PAIRS:
        assert a in apple, a
        assert t in timm, t
        assert apple_key_to_timm(a, layout) == t
        assert timm_key_to_apple(t, layout) == a
    for a in SA12_ABSENT_APPLE:
        assert a not in apple, a
    assert model.state_dict()["network.7.0.token_mixer.qkv.weight"].shape == (1536, 512)
    assert model.state_dict()["conv_exp.se.reduce.weight"].shape == (64, 1024, 1, 1)


@pytest.mark.parametrize("name", ["fastvit_t8", "fastvit_sa12", "fastvit_ma36"])
def test_key_mappings_are_inverse(name):
    model = fm.create_model(name)
    layout = network_layout(model)
    timm = [apple_key_to_timm(k, layout) for k in model.state_dict()]
    assert len(set(timm)) == len(timm)
    assert [timm_key_to_apple(k, layout) for k in timm] == list(model.state_dict())


def _save(state, path, fmt):
    """Write ``state`` in one of the supported file formats."""
    if fmt == "pth":
        torch.save(state, path)
    elif fmt == "pth.tar":
        torch.save({"state_dict": state, "epoch": 300}, path)
    elif fmt == "model-wrapped":
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))


FORMATS = {"pth": "pth", "pth.tar": "pth.tar", "model-wrapped": "pth", "safetensors": "safetensors"}


@pytest.mark.parametrize("name", ["fastvit_t8", "fastvit_sa12"])
@pytest.mark.parametrize("layout", ["apple", "timm"])
def test_checkpoint_round_trip(tmp_path, name, layout):
    source = _random_model(name, seed=7)
    expected = source.state_dict()
    state = expected if layout == "apple" else to_timm_state_dict(source)
    loaded = None
    for fmt, ext in FORMATS.items():
        path = tmp_path / f"{name}-{layout}-{fmt}.{ext}"
        _save(state, path, fmt)
        if loaded is None:
            loaded = fm.create_model(name, checkpoint=path)
            assert not loaded.training
            x = _image(64)
            with torch.no_grad():
                assert torch.equal(loaded(x), source(x))
        else:
            with torch.no_grad():  # scramble, so that only a full load restores every tensor
                for t in loaded.state_dict().values():
                    t.fill_(-1)
            fm.load_checkpoint(loaded, path)
        got = loaded.state_dict()
        assert list(got) == list(expected)
        for key, value in expected.items():
            assert torch.equal(got[key], value), (fmt, key)


def test_checkpoint_without_num_batches_tracked(tmp_path):
    source = _random_model("fastvit_t8", seed=2)
    state = {k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}
    path = tmp_path / "t8.pth"
    torch.save(state, path)
    loaded = fm.create_model("fastvit_t8", checkpoint=path)
    x = _image(64)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


@pytest.mark.parametrize("layout", ["apple", "timm"])
def test_missing_and_unexpected_keys_raise(tmp_path, layout):
    model = fm.create_model("fastvit_t8")
    if layout == "apple":
        state = model.state_dict()
        drop, extra = "network.0.0.layer_scale", "network.0.0.bogus.weight"
    else:
        state = to_timm_state_dict(model)
        drop, extra = "stages.0.blocks.0.layer_scale.gamma", "stages.0.blocks.0.bogus.weight"
    del state[drop]
    state[extra] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        fm.create_model("fastvit_t8", checkpoint=path)
    message = str(info.value)
    assert drop in message and extra in message
    assert "missing" in message and "unexpected" in message


def test_wrong_variant_or_head_raises(tmp_path):
    path = tmp_path / "t8.pth"
    torch.save(fm.create_model("fastvit_t8").state_dict(), path)
    with pytest.raises(ValueError, match="missing keys"):
        fm.create_model("fastvit_t12", checkpoint=path)  # stage 3 has 6 blocks, not 4
    with pytest.raises(ValueError, match="shape mismatch.*head.weight"):
        fm.create_model("fastvit_t8", num_classes=10, checkpoint=path)


@pytest.mark.parametrize(
    "fused_key", ["patch_embed.0.reparam_conv.weight", "network.1.proj.0.lkb_reparam.weight"]
)
def test_incomplete_fused_checkpoint_lists_missing_keys(tmp_path, fused_key):
    """A fused file is recognised as fused; an incomplete one is refused with the missing keys."""
    path = tmp_path / "fused.pth.tar"
    torch.save({"state_dict": {fused_key: torch.zeros(1), "head.weight": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="missing") as info:
        fm.create_model("fastvit_t8", checkpoint=path)
    assert "reparam_conv" in str(info.value)


def test_unrecognised_layout_raises(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="layout"):
        fm.create_model("fastvit_t8", checkpoint=path)



def test_pickled_objects_are_refused_clearly(tmp_path):
    import argparse

    path = tmp_path / "train.pth.tar"
    state = fm.create_model("fastvit_t8").state_dict()
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(ValueError, match="weights_only"):
        fm.create_model("fastvit_t8", checkpoint=path)
