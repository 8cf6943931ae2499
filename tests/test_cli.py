"""The ``repalgebra`` command line: fuse, export, verify, rules, demo; exit codes 0 / 1 / 2."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import onnx
import pytest
import torch

import fastvit_models
import repalgebra
from repalgebra.cli import main
from repalgebra.demo import run_demo

SMALL = ["--input-shape", "1,3,64,64"]


@pytest.fixture
def block_file(tmp_path):
    """A user's module file with a factory, as ``path.py:attr``."""
    path = tmp_path / "blocks.py"
    path.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
                self.b = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8))

            def forward(self, x):
                return torch.relu(self.a(x) + self.b(x))

        def make_block():
            return Block()
    """))
    return f"{path}:make_block"


def test_fuse_fastvit_writes_a_loadable_state(tmp_path, capsys):
    out = tmp_path / "t8.pt"
    assert main(["fuse", "fastvit_t8", "-o", str(out), *SMALL]) == 0
    printed = capsys.readouterr()
    assert "rules fired" in printed.out and "[2/3] fusing" in printed.err
    state = torch.load(out, weights_only=True)
    fused = repalgebra.fuse(fastvit_models.create_model("fastvit_t8"), (torch.zeros(1, 3, 64, 64),))
    fused.load_state_dict(state)  # the file is the fused model's state
    assert not any("bn" in k for k in state)


def test_fuse_user_factory_to_safetensors(tmp_path, block_file, capsys):
    out = tmp_path / "block.safetensors"
    assert main(["fuse", block_file, "-o", str(out), "--input-shape", "1,3,16,16"]) == 0
    from safetensors.torch import load_file

    assert len(load_file(str(out))) == 2  # one conv: weight and bias


def test_export_checks_and_compares(tmp_path, block_file, capsys):
    out = tmp_path / "block.onnx"
    assert main(["export", block_file, "-o", str(out), "--input-shape", "1,3,16,16", "--opset", "18"]) == 0
    printed = capsys.readouterr().out
    assert "Conv 1" in printed and "OK" in printed
    model = onnx.load(str(out))
    assert model.opset_import[0].version == 18


def test_export_in_float64_is_checked_where_onnxruntime_cannot_run_it(tmp_path, capsys):
    """onnxruntime's CPU provider has no float64 Conv: the command crashed with its traceback after writing the file
    (found by a probe).  It checks the file in onnx's reference evaluator instead, and says so."""
    path = tmp_path / "double.py"
    path.write_text("from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).double()\n")
    out = tmp_path / "block.onnx"
    assert main(["export", f"{path}:make", "-o", str(out), "--input-shape", "1,3,16,16", "--input-dtype", "float64"]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime cannot run the file" in printed and "reference evaluator vs fused torch" in printed, printed
    assert "float64) -> OK" in printed, printed


@pytest.mark.parametrize("extra", ["y > 0", "None"], ids=["bool-mask", "none"])
def test_export_compares_a_mask_and_skips_a_none_among_the_outputs(tmp_path, capsys, extra):
    """The command wrote the file, then crashed comparing it: numpy refuses to subtract bools, and a None output (which
    the file does not have) met ``.numpy()`` (review R13b).  A mask is compared for equality, a None skipped."""
    path = tmp_path / "masked.py"
    path.write_text("import torch\nfrom torch import nn\n\n\nclass Masked(nn.Module):\n    def __init__(self):\n"
                    "        super().__init__()\n        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)\n\n"
                    f"    def forward(self, x):\n        y = self.bn(self.conv(x))\n        return y, {extra}\n\n\n"
                    "def make():\n    return Masked()\n")
    out = tmp_path / "masked.onnx"
    assert main(["export", f"{path}:make", "-o", str(out), "--input-shape", "1,3,16,16"]) == 0
    assert "-> OK" in capsys.readouterr().out


def test_verify_passes(block_file, capsys):
    assert main(["verify", block_file, "--input-shape", "1,3,16,16", "--dtype", "float64"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_rules_lists_every_rule(capsys):
    assert main(["rules"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in repalgebra.RULES)


@pytest.mark.parametrize(
    "argv",
    [
        ["fuse", "no_such_model", "-o", "x.pt"],
        ["fuse", "no_such_module_xyz:f", "-o", "x.pt"],
        ["verify", "fastvit_t8", "--input-shape", "1,a,3"],
        ["export", "fastvit_t8"],
        ["bogus"],
        ["export", "fastvit_t8", "-o", "x.onnx", "--opset", "9"],
        ["verify", "fastvit_t8", "-n", "0"],
        ["verify", "fastvit_t8", "--checkpoint", "no_such_file.pth"],
    ],
)
def test_bad_arguments_exit_2(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse prints its usage lines first
    assert "error" in last and "Traceback" not in last


def test_failure_exits_1(tmp_path, capsys):
    path = tmp_path / "bad.py"
    path.write_text("import torch\nfrom torch import nn\nm = nn.Sequential(nn.Conv2d(4, 4, 3))\n")
    assert main(["fuse", f"{path}:m", "-o", str(tmp_path / "o.pt"), "--input-shape", "1,3,8,8"]) == 1
    err = capsys.readouterr().err
    assert "does not run in eval mode on the example input (1x3x8x8)" in err


def test_demo_small(capsys):
    assert run_demo(size=64) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out and "latency ms" in out


def test_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "repalgebra.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "fuse" in r.stdout and "demo" in r.stdout


def test_fuse_keeps_an_untraceable_part_whole_and_says_so(tmp_path, capsys):
    path = tmp_path / "gated.py"
    path.write_text(textwrap.dedent("""
        from torch import nn

        class Gate(nn.Module):  # control flow on values: no capture can record it
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))

            def forward(self, x):
                return self.body(x) if x.mean() > 0 else x

        def make():
            return nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), Gate())
    """))
    spec = f"{path}:make"
    assert main(["fuse", spec, "-o", str(tmp_path / "g.pt"), "--input-shape", "1,3,8,8"]) == 0
    out = capsys.readouterr().out
    assert "'2' (Gate): kept whole: fx: TraceError" in out and "1 part kept whole" in out
    assert main(["fuse", spec, "-o", str(tmp_path / "g.pt"), "--input-shape", "1,3,8,8", "--strict"]) == 1
    assert "cannot trace module '2' (Gate)" in capsys.readouterr().err


def test_export_a_part_without_lowering_goes_through_the_fallback_and_says_so(tmp_path, capsys):
    path = tmp_path / "gated.py"
    path.write_text(textwrap.dedent("""
        from torch import nn

        class Gate(nn.Module):  # control flow on values: kept whole by fuse, exported by torch.onnx.export
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))

            def forward(self, x):
                return self.body(x) if x.abs().sum() >= 0 else x

        def make():
            return nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), Gate())
    """))
    out = tmp_path / "g.onnx"
    # A branch on values is refused by default, found where it is read (the file holds the example's branch); this
    # one every input takes, which the user says with the flag
    assert main(["export", f"{path}:make", "-o", str(out), "--input-shape", "2,3,8,8"]) == 1
    assert "m_3 (Gate; 1 branch)" in capsys.readouterr().err
    assert main(["export", f"{path}:make", "-o", str(out), "--input-shape", "2,3,8,8", "--allow-example-branches"]) == 0
    printed = capsys.readouterr().out
    assert "fallback (torch.onnx.export):" in printed and "m_3: 1 IR node (Gate)" in printed, printed
    assert "into Python boolean (control flow on values)" in printed and "OK" in printed
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["repalgebra.fallback"].startswith("1 IR node in 1 region via torch.onnx.export: m_3 (Gate)")
    assert meta["repalgebra.batch"] == "dynamic"

    # A gate the input's values steer: the file would hold the example's branch, so it is refused by name.
    path.write_text(path.read_text().replace("x.abs().sum() >= 0", "x.mean() > 0"))
    assert main(["export", f"{path}:make", "-o", str(tmp_path / "steered.onnx"), "--input-shape", "2,3,8,8"]) == 1
    err = capsys.readouterr().err
    assert "m_3 (Gate; 1 branch)" in err and "--allow-example-branches" not in err and "allow_example_branches" in err, err
    assert not (tmp_path / "steered.onnx").exists()

def test_a_language_model_exports_and_verifies_with_token_ids(tmp_path, capsys):
    """``--input-shape 2,8`` drew a float input, which an nn.Embedding refuses, and the error said "pass
    example_inputs", which the CLI has no option for.  ``--input-dtype int64`` draws ids below the vocabulary."""
    path = tmp_path / "tokens.py"
    path.write_text(textwrap.dedent("""
        from torch import nn

        def make():
            return nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    """))
    shape = ["--input-shape", "2,8", "--input-dtype", "int64"]
    assert main(["export", f"{path}:make", "-o", str(tmp_path / "t.onnx"), *shape]) == 0
    assert "-> OK" in capsys.readouterr().out
    assert main(["verify", f"{path}:make", *shape]) == 0
    assert main(["export", f"{path}:make", "-o", str(tmp_path / "u.onnx")]) == 1
    assert "--input-shape and --input-dtype" in capsys.readouterr().err


def test_a_module_of_the_working_directory_and_a_shape_guessed_from_it(tmp_path, monkeypatch, capsys):
    """``repalgebra fuse my_models:make_block`` in the directory holding ``my_models.py``: the console script does not
    put that directory on ``sys.path`` as ``python -m`` does (cannot import it), and without ``--input-shape`` the
    example was FastViT's 1x3x256x256 (an 8-channel block does not run on it); now the shape is fuse's guess."""
    (tmp_path / "cwd_models.py").write_text(textwrap.dedent("""
        from torch import nn

        def make_block():
            return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

        def needs_arg(c):
            return nn.Conv2d(c, c, 1)
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert main(["fuse", "cwd_models:make_block", "-o", str(tmp_path / "f.pt")]) == 0
    out = capsys.readouterr().out
    assert "traced at 1x8x64x64" in out and "load_state_dict" in out
    assert main(["fuse", "cwd_models:needs_arg", "-o", str(tmp_path / "g.pt")]) == 2
    assert "calling cwd_models:needs_arg() failed (a factory is called with no arguments)" in capsys.readouterr().err


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, capsys):
    path = tmp_path / "text.pth"
    for text in ("hello\n", "not a checkpoint"):  # torch.load: a bare KeyError, and an UnpicklingError
        path.write_text(text)
        assert main(["verify", "fastvit_t8", *SMALL, "--checkpoint", str(path)]) == 1
        assert "not a PyTorch checkpoint" in capsys.readouterr().err


def test_an_output_path_that_cannot_be_written_is_refused_before_the_work(tmp_path, block_file, capsys):
    """``fuse -o f.onnx`` wrote a torch pickle named .onnx; ``-o /no/such/dir/f.pt`` failed after the whole fuse."""
    assert main(["fuse", block_file, "-o", str(tmp_path / "f.onnx"), "--input-shape", "1,3,8,8"]) == 2
    assert "must end so" in capsys.readouterr().err
    assert main(["fuse", block_file, "-o", str(tmp_path / "nope" / "f.pt"), "--input-shape", "1,3,8,8"]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "[2/3] fusing" not in err
    assert main(["export", block_file, "-o", str(tmp_path / "f.pt"), "--input-shape", "1,3,8,8"]) == 2
