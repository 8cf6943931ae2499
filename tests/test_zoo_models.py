"""The zoo itself (``tests/zoo``): every entry builds deterministically, runs in float32 and float64, and is
what its record says.  Fusing the zoo is ``tests/test_zoo.py``'s job, not this file's."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from zoo import ZOO, ZooModel, count_bn, fx_fused_bn_count, randomize_bn, zoo_model


def _flat(y: object) -> list[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):  # torchvision's detection backbones return an OrderedDict of feature maps
        y = list(y.values())
    assert isinstance(y, (tuple, list)), f"unexpected output type {type(y).__name__}"
    return [t for item in y for t in _flat(item)]


def test_zoo_has_at_least_30_unique_snake_case_entries() -> None:
    names = [e.name for e in ZOO]
    assert len(names) >= 30
    assert len(set(names)) == len(names)
    for e in ZOO:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", e.name), e.name
        assert e.family and e.patterns and "\n" not in e.patterns
        assert all(isinstance(d, int) and d > 0 for d in e.input_shape)


def test_zoo_model_lookup() -> None:
    assert zoo_model(ZOO[0].name) is ZOO[0]
    with pytest.raises(KeyError, match="known"):
        zoo_model("no_such_model")


@pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
def test_builds_and_runs_in_float32_and_float64(entry: ZooModel) -> None:
    state = torch.random.get_rng_state()
    model = entry.build()
    assert torch.equal(state, torch.random.get_rng_state()), "build must not consume the global RNG"
    assert isinstance(model, nn.Module) and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = torch.randn(entry.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y32 = _flat(model(x.clone()))
        rerun = _flat(model(x.clone()))
        again = _flat(entry.build()(x.clone()))
        model64 = entry.build().double()
        y64 = _flat(model64(x.double()))
    for a, r, b, c in zip(y32, rerun, again, y64, strict=True):
        assert a.dtype == torch.float32 and c.dtype == torch.float64
        assert torch.isfinite(a).all() and torch.isfinite(c).all()
        assert torch.equal(a, r), "no randomness in forward: a second call must give the same output"
        assert torch.equal(a, b), "two builds, same input: outputs must be bit-identical"
        scale = c.abs().max().clamp_min(1e-12)
        assert ((a.double() - c).abs().max() / scale).item() < 1e-3


def test_randomize_bn_is_deterministic_and_non_trivial() -> None:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.LayerNorm(4))

    a, b = make(), make()
    randomize_bn(a, 7)
    randomize_bn(b, 7)
    for (na, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(ta, tb), na
    bn = a[1]
    assert not torch.allclose(bn.running_mean, torch.zeros(8)) and not torch.allclose(bn.running_var, torch.ones(8))
    assert (bn.running_var > 0).all()
    assert not torch.allclose(a[2].weight, torch.ones(8)) and not torch.allclose(a[3].bias, torch.zeros(4))


def test_fx_fused_bn_count() -> None:
    class Traceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x))

    class ShapeDependent(Traceable):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] % 2:
                x = x[..., :-1]
            return self.bn(self.conv(x))

    model = Traceable().eval()
    assert fx_fused_bn_count(model) == 0
    assert count_bn(model) == 1, "the model itself is not changed"
    assert fx_fused_bn_count(ShapeDependent().eval()) is None
