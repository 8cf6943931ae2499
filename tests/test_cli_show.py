"""``repalgebra show MODEL [--fused] [-o graph.svg|png|dot]``, run in-process through ``repalgebra.cli.main``.

Pictures need Graphviz's ``dot``: the tests that render one skip without it
locally and fail without it in CI (which installs graphviz).  The no-``dot``
path is tested everywhere by hiding ``dot`` (``shutil.which`` patched).
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap

import pytest
import torch

from repalgebra.cli import main

SMALL = ["--input-shape", "1,3,64,64"]

BLOCK_PY = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.skip = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + self.skip(x))


    def make_block():
        return Block()


    block = Block()
    """
)


@pytest.fixture
def need_dot():
    if shutil.which("dot") is None:
        if os.environ.get("CI"):
            pytest.fail("graphviz `dot` is not installed (CI installs it: apt-get install -y graphviz)")
        pytest.skip("graphviz `dot` is not installed")


@pytest.fixture
def block_file(tmp_path):
    path = tmp_path / "myblocks.py"
    path.write_text(BLOCK_PY)
    yield path
    sys.modules.pop("myblocks", None)  # imported by name in one test


def test_text_form_of_a_fastvit(capsys):
    assert main(["show", "fastvit_t8", *SMALL]) == 0
    out = capsys.readouterr().out
    assert out.startswith("graph(%x: 1x3x64x64):")
    assert "batch_norm(" in out and "# network.0.0.token_mixer.mixer.rbr_skip" in out
    assert out.rstrip().splitlines()[-1].strip().startswith("return %")


def test_fused_text_form_has_no_batch_norm(capsys):
    assert main(["show", "fastvit_t8", "--fused", *SMALL]) == 0
    out = capsys.readouterr().out
    assert out.startswith("graph(%x: 1x3x64x64):")
    assert "conv2d(" in out and "batch_norm(" not in out and " sub(" not in out


def test_dot_file_of_a_fastvit(tmp_path, capsys):
    out = tmp_path / "t8.dot"
    assert main(["show", "fastvit_t8", "--fused", *SMALL, "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    dot = out.read_text()
    assert dot.startswith("digraph G {") and dot.rstrip().endswith("}")
    assert 'label="fastvit_t8 (fused)"' in dot
    assert "batch_norm" not in dot and "conv2d" in dot


def test_svg_of_a_fastvit(tmp_path, capsys, need_dot):
    out = tmp_path / "t8.svg"
    assert main(["show", "fastvit_t8", *SMALL, "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    svg = out.read_text()
    assert "<svg" in svg and "</svg>" in svg
    assert ">fastvit_t8</text>" in svg  # the title
    assert ">batch_norm</text>" in svg  # the train-time graph


def test_png_of_module_attr_factory(block_file, tmp_path, capsys, need_dot):
    out = tmp_path / "block.png"
    assert main(["show", f"{block_file}:make_block", "--fused", "--input-shape", "1,3,8,8", "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_importable_module_attr(block_file, tmp_path, monkeypatch, capsys):
    """``module:attr`` with an importable module and an ``nn.Module`` instance (not a factory)."""
    monkeypatch.syspath_prepend(str(block_file.parent))
    out = tmp_path / "block.dot"
    assert main(["show", "myblocks:block", "--input-shape", "1,3,8,8", "-o", str(out)]) == 0
    dot = out.read_text()
    assert 'label="myblocks:block"' in dot and "batch_norm" in dot
    assert main(["show", "myblocks:block", "--fused", "--input-shape", "1,3,8,8"]) == 0
    text = capsys.readouterr().out
    fused = text[text.index("graph(", 1):]  # the second command's listing
    assert "batch_norm" not in fused and fused.count("conv2d(") == 1 and "relu(" in fused


@pytest.mark.parametrize("fmt", ["svg", "png"])
def test_without_dot_prints_a_message_and_the_dot_text(block_file, tmp_path, monkeypatch, capsys, fmt):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "dot" else real_which(name, *a, **k))
    out = tmp_path / f"block.{fmt}"
    assert main(["show", f"{block_file}:make_block", "--input-shape", "1,3,8,8", "-o", str(out)]) == 1
    captured = capsys.readouterr()
    assert not out.exists()
    assert "`dot` program is not on PATH" in captured.err and f"{out} was not written" in captured.err
    assert "apt-get install graphviz" in captured.err and f"dot -T{fmt} graph.dot -o {out}" in captured.err
    assert captured.out.startswith("digraph G {") and captured.out.rstrip().endswith("}")
    assert "batch_norm" in captured.out


def test_dot_output_needs_no_graphviz(block_file, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    out = tmp_path / "block.dot"
    assert main(["show", f"{block_file}:make_block", "--input-shape", "1,3,8,8", "-o", str(out)]) == 0
    assert out.read_text().startswith("digraph G {")


def test_bad_output_suffix_is_a_usage_error(tmp_path, capsys):
    out = tmp_path / "t8.jpg"
    assert main(["show", "fastvit_t8", *SMALL, "-o", str(out)]) == 2
    assert "-o must end in .svg, .png or .dot" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_model_is_a_usage_error(capsys):
    assert main(["show", "fastvit_t9", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'fastvit_t9'" in err and "fastvit_t8" in err
