"""``repalgebra.fuse`` on the FastViT family: exact, fully folded, the right size.

Tolerances: a float64 model folded in float64 equals its train-time self to
1e-9 relative (the fold itself is exact; what remains is float64 rounding
through ~100 layers).  A float32 model is folded in float64 and cast once,
then compared with the float64 train-time model: 1e-5 relative, a few float32
ulps of rounding per layer.  Errors are relative to the largest logit.
"""

import copy

import pytest
import torch

import fastvit_models
import repalgebra
from fastvit_models.testing import randomize_model_

# Fused parameter counts of Apple's reference reparameterization (which keeps
# each ConvFFN's BN, the attention pre-norm and every layer scale as separate
# parameters); computed from the architecture, they round to the published
# 4.00M, 7.51M, 9.43M, 11.55M, 21.50M, 31.46M, 43.98M.
REFERENCE_FUSED_PARAMS = {
    "fastvit_t8": 3_996_040,
    "fastvit_t12": 7_508_840,
    "fastvit_s12": 9_428_712,
    "fastvit_sa12": 11_545_320,
    "fastvit_sa24": 21_501_288,
    "fastvit_sa36": 31_457_256,
    "fastvit_ma36": 43_984_632,
}
FULL = ("fastvit_t8", "fastvit_sa12")


def build(name: str, dtype=torch.float32):
    return randomize_model_(fastvit_models.create_model(name), torch.Generator().manual_seed(0)).to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def block_widths(model) -> int:
    """Sum of the channel widths of all RepMixer and attention blocks."""
    return sum(p.shape[0] for n, p in model.named_parameters() if n.endswith(("layer_scale", "layer_scale_2")) and "token_mixer" not in n)


@pytest.mark.parametrize("name", fastvit_models.list_models())
def test_fuse_is_exact_and_complete(name):
    """Every variant: float64 fold equals the model to 1e-9; no BN, no scale (layer or query), no sub left."""
    size = 256 if name in FULL else 64
    model = build(name, torch.float64)
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fused = repalgebra.fuse(model, (x[:1],))
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-9
    after = fused.fuse_report.ops_after
    assert after.get("batch_norm", 0) == 0
    assert after.get("scale", 0) == 0  # layer scales and the attention's query scale all fold
    assert after.get("sub", 0) == 0
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())


@pytest.mark.parametrize("name", FULL)
def test_float32_fold_matches_float64_model(name):
    model = build(name)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    fused = repalgebra.fuse(model, (x,))
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        assert rel_err(fused(x), ref) <= 1e-5
        assert rel_err(model(x), ref) <= 1e-5  # the train-time float32 model is no better


@pytest.mark.parametrize("name", fastvit_models.list_models())
def test_fused_parameter_count(name):
    """Ours = the reference's fused count minus what we fold beyond it.

    Per block of width C we save 2C: the ConvFFN BN's (gamma, beta) become one
    conv bias (-C) and the layer scale after fc2 vanishes (-C); in attention
    blocks the pre-norm BN becomes a qkv bias (+3C - 2C) and layer_scale_1
    vanishes into proj (-C).
    """
    model = fastvit_models.create_model(name).eval()
    fused = repalgebra.fuse(model, (torch.zeros(1, 3, 64, 64),))
    ours = sum(p.numel() for p in fused.parameters()) + sum(b.numel() for b in fused.buffers())
    assert ours == REFERENCE_FUSED_PARAMS[name] - 2 * block_widths(model)
    assert abs(ours - REFERENCE_FUSED_PARAMS[name]) / REFERENCE_FUSED_PARAMS[name] < 2e-3


def test_blocks_become_one_conv_each():
    """t8: stem 3 convs, each RepMixer 1 conv + ConvFFN (dw, fc1, fc2), patch embeds 2 convs, head 1 conv + SE 2."""
    model = build("fastvit_t8")
    fused = repalgebra.fuse(model, (torch.zeros(1, 3, 64, 64),))
    blocks = sum(1 for n, _ in model.named_modules() if n.endswith("token_mixer") )
    stages, embeds = 4, 3
    expected = 3 + blocks * 4 + embeds * 2 + 1 + 2
    assert fused.fuse_report.ops_after["conv2d"] == expected
