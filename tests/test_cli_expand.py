"""``repalgebra expand MODEL --recipe R -o out.pt``: the expanded model's state dict, loadable into expand(model, R)."""

from __future__ import annotations

import textwrap

import pytest
import torch

import repalgebra
from repalgebra.cli import main
from repalgebra.recipes import mobileone


@pytest.fixture
def plain_file(tmp_path):
    """A user's plain conv net, as ``path.py:attr``."""
    path = tmp_path / "plain.py"
    path.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def make_net():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    """))
    return path


@pytest.mark.parametrize("recipe", ["repvgg", "dbb"])
def test_expand_writes_a_state_expand_can_load(tmp_path, plain_file, capsys, recipe):
    out = tmp_path / "expanded.pt"
    assert main(["expand", f"{plain_file}:make_net", "--recipe", recipe, "-o", str(out), "--input-shape", "1,3,8,8"]) == 0
    printed = capsys.readouterr()
    assert f"2 of 3 convs expanded with {recipe}" in printed.out and "same function as the original" in printed.out
    assert "[2/3] expanding" in printed.err
    state = torch.load(out, weights_only=True)
    from repalgebra.cli import load_model

    model = load_model(f"{plain_file}:make_net")
    expanded = repalgebra.expand(model, recipe)
    expanded.load_state_dict(state)  # the file is the expanded model's state
    assert any(k.endswith("scale.conv.weight") for k in state)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(expanded(x), model(x), rtol=1e-5, atol=1e-6)


def test_expand_mobileone_k_and_fresh_to_safetensors(tmp_path, plain_file, capsys):
    out = tmp_path / "expanded.safetensors"
    args = ["expand", f"{plain_file}:make_net", "--recipe", "mobileone", "--k", "2", "--init", "fresh",
            "-o", str(out), "--input-shape", "1,3,8,8"]
    assert main(args) == 0
    assert "mobileone.recipe(2)" in capsys.readouterr().out
    from safetensors.torch import load_file

    from repalgebra.cli import load_model

    expanded = repalgebra.expand(load_model(f"{plain_file}:make_net"), mobileone.recipe(2), init="fresh")
    expanded.load_state_dict(load_file(str(out)))


def test_expand_bad_recipe_is_a_usage_error(tmp_path, plain_file, capsys):
    with pytest.raises(SystemExit) as e:
        main(["expand", f"{plain_file}:make_net", "--recipe", "vgg", "-o", str(tmp_path / "x.pt")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:  # a bad argument: argparse's exit 2, before any work
        main(["expand", f"{plain_file}:make_net", "--recipe", "mobileone", "--k", "0", "-o", str(tmp_path / "x.pt"),
              "--input-shape", "1,3,8,8"])
    assert e.value.code == 2
    assert "must be 1 or more, got 0" in capsys.readouterr().err
    assert main(["expand", f"{plain_file}:make_net", "--recipe", "acnet", "--k", "2", "-o", str(tmp_path / "x.pt")]) == 2
