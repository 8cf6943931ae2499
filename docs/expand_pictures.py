"""The pictures of ``docs/expand.md``: one conv+BN, its expanded form under each recipe, and what fuse gives back.

Every picture is drawn from the IR: the plain block and each expanded block
(``repalgebra.expand`` of an 8->8 3x3 conv and its BN) are traced with
``repalgebra.trace`` at 1x8x6x6, the folded form comes from
``repalgebra.rewrite``, and Graphviz renders ``Graph.to_dot()`` with the
layout of ``docs/fastvit_pictures.py``::

    python docs/expand_pictures.py              # regenerate docs/img/expand/*.svg
    python docs/expand_pictures.py --list       # node counts only; needs no Graphviz
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

import repalgebra
from repalgebra.recipes import RECIPES

HERE = Path(__file__).resolve().parent
OUT = HERE / "img" / "expand"
sys.path.insert(0, str(HERE))
from fastvit_pictures import dot_text, render  # noqa: E402

SHAPE = (1, 8, 6, 6)


def plain() -> nn.Module:
    """The plain block every picture starts from: a 3x3 conv (8 -> 8 channels) and its BN."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)).eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--list", action="store_true", help="only print node counts")
    args = ap.parse_args(argv)
    if not args.list and shutil.which("dot") is None:
        print("graphviz `dot` not found (apt-get install graphviz): no pictures written", file=sys.stderr)
        return 1
    x = (torch.randn(SHAPE),)
    pictures = {"plain": (repalgebra.trace(plain(), x), "conv 3x3 + BN, as written")}
    for name in RECIPES:
        expanded = repalgebra.trace(repalgebra.expand(plain(), name), x)
        pictures[name] = (expanded, f"expand(..., {name!r})")
    pictures["fused"] = (repalgebra.rewrite(pictures["dbb"][0])[0], "fuse(expand(...)), every recipe")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (graph, title) in pictures.items():
        print(f"{name:<10} {len(graph.nodes):>3} nodes   {title}")
        if not args.list:
            (args.out / f"{name}.svg").write_bytes(render(dot_text(graph, title), "svg"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
