"""The block pictures of ``docs/fastvit.md``: each FastViT block before and after folding.

Every picture is drawn from the IR of a real block module of ``fastvit_models``
(taken out of a freshly built ``fastvit_t8`` or ``fastvit_sa12``, so widths and
module names are the real ones), traced at a tiny spatial size with
``repalgebra.trace``, folded with ``repalgebra.rewrite`` and rendered by
Graphviz from ``Graph.to_dot()``::

    python docs/fastvit_pictures.py              # regenerate docs/img/fastvit/*.svg
    python docs/fastvit_pictures.py --out DIR    # write them somewhere else
    python docs/fastvit_pictures.py --png        # also write PNGs (for looking at them)
    python docs/fastvit_pictures.py --list       # names, node counts; needs no Graphviz

The DOT text is post-processed here (graph attributes for a compact top-down
layout, shorter labels), never in ``repalgebra/ir.py``.
``tests/test_fastvit_pictures.py`` runs this script and checks that the committed
pictures show what it draws now.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn

import fastvit_models
import repalgebra
from repalgebra.ir import Graph

HERE = Path(__file__).resolve().parent
OUT = HERE / "img" / "fastvit"


class Picture(NamedTuple):
    name: str  # file stem: <name>_train.svg, <name>_fused.svg
    title: str  # what the block is, with its path in the model
    block: Callable[[dict[str, nn.Module]], nn.Module]  # picks the block out of the models
    input_shape: tuple[int, ...]


class Head(nn.Module):
    """The classifier tail of a :class:`fastvit_models.FastViT`, with the model's own submodules."""

    def __init__(self, model: fastvit_models.FastViT) -> None:
        super().__init__()
        self.conv_exp, self.gap, self.head = model.conv_exp, model.gap, model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The same ops as the end of FastViT.forward.
        x = self.conv_exp(x)
        x = self.gap(x)
        x = x.flatten(1)
        return self.head(x)


# In reading order of the page.  t8 widths: 48, 96, 192, 384; sa12: 64, 128, 256, 512.
PICTURES = [
    Picture("stem", "fastvit_t8 patch_embed (stem)", lambda m: m["fastvit_t8"].patch_embed, (1, 3, 16, 16)),
    Picture("patch_embed", "fastvit_t8 network.1 (PatchEmbed)", lambda m: m["fastvit_t8"].network[1], (1, 48, 8, 8)),
    Picture("repmixer", "fastvit_t8 network.0.0.token_mixer (RepMixer)", lambda m: m["fastvit_t8"].network[0][0].token_mixer, (1, 48, 4, 4)),
    Picture("convffn", "fastvit_t8 network.0.0.convffn (ConvFFN)", lambda m: m["fastvit_t8"].network[0][0].convffn, (1, 48, 4, 4)),
    Picture("repmixer_block", "fastvit_t8 network.0.0 (RepMixerBlock)", lambda m: m["fastvit_t8"].network[0][0], (1, 48, 4, 4)),
    Picture("repcpe", "fastvit_sa12 network.6 (RepCPE)", lambda m: m["fastvit_sa12"].network[6], (1, 512, 2, 2)),
    Picture("attention_block", "fastvit_sa12 network.7.0 (AttentionBlock)", lambda m: m["fastvit_sa12"].network[7][0], (1, 512, 2, 2)),
    Picture("head", "fastvit_t8 conv_exp, gap, head", lambda m: Head(m["fastvit_t8"]), (1, 384, 2, 2)),
]

# Graph attributes added to every picture: top-down, compact, title on top.
_GRAPH_ATTRS = '  graph [fontname="Helvetica", fontsize=12, nodesep=0.25, ranksep=0.3, margin=0.05];'


def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: fastvit_models.create_model(name).eval() for name in ("fastvit_t8", "fastvit_sa12")}


def graphs(pic: Picture, built: dict[str, nn.Module]) -> tuple[Graph, Graph]:
    """The traced (train-time) graph of the picture's block and its folded form."""
    block = pic.block(built).eval()
    train = repalgebra.trace(block, (torch.randn(pic.input_shape),))
    fused, _ = repalgebra.rewrite(train)
    return train, fused


# Attributes at values that say nothing in these pictures, and reshape_dyn's size recipe
# (the output shape on the next line says it better): dropped from the labels.
_QUIET = re.compile(r"\b(?:(?:stride|dilation|groups)=1|padding=0|eps=\S+|approximate=none|shape=\(.*\))(?=\s|$)")


def _trim(label: str) -> str:
    """Drop quiet attributes; put short attributes on the op's line."""
    lines = [" ".join(_QUIET.sub("", line).split()) for line in label.split("\\n")]
    lines = [line for line in lines if line]
    if len(lines) > 1 and "=" in lines[1] and len(lines[0]) + len(lines[1]) <= 30:
        lines[:2] = [f"{lines[0]} {lines[1]}"]
    return "\\n".join(lines)


def dot_text(graph: Graph, title: str) -> str:
    """``graph.to_dot`` with a compact top-down layout, trimmed labels, dashed size-only edges."""
    # reshape_dyn reads only the sizes of its second and later inputs: draw those edges dashed.
    size_edges = {f'"{i.name}" -> "{n.out.name}";' for n in graph.nodes if n.op == "reshape_dyn" for i in n.inputs[1:]}
    lines = graph.to_dot(title=title).splitlines()
    lines.insert(1, _GRAPH_ATTRS)
    out = []
    for line in lines:
        if "shape=box" in line:
            line = re.sub(r'label="((?:[^"\\]|\\.)*)"', lambda m: f'label="{_trim(m.group(1))}"', line)
        elif line.strip() in size_edges:
            line = line.rstrip(";") + ' [style=dashed, color="#888888", arrowsize=0.6];'
        out.append(line)
    return "\n".join(out) + "\n"


def render(dot: str, fmt: str) -> bytes:
    return subprocess.run(["dot", f"-T{fmt}"], input=dot.encode(), capture_output=True, check=True).stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT.relative_to(HERE.parent)})")
    ap.add_argument("--png", action="store_true", help="also write PNGs next to the SVGs")
    ap.add_argument("--list", action="store_true", help="only print each picture's node counts")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if not args.list and shutil.which("dot") is None:
        print("graphviz `dot` not found (apt-get install graphviz): no pictures written", file=sys.stderr)
        return 1
    built = models()
    if not args.list:
        args.out.mkdir(parents=True, exist_ok=True)
    for pic in PICTURES:
        train, fused = graphs(pic, built)
        print(f"{pic.name:<16} {len(train.nodes):>3} nodes -> {len(fused.nodes):>3}   {pic.title}")
        if args.list:
            continue
        shape = "x".join(map(str, pic.input_shape))
        for when, graph in (("train", train), ("fused", fused)):
            dot = dot_text(graph, f"{pic.title}: {'train-time' if when == 'train' else 'fused'}, input {shape}")
            (args.out / f"{pic.name}_{when}.svg").write_bytes(render(dot, "svg"))
            if args.png:
                (args.out / f"{pic.name}_{when}.png").write_bytes(render(dot, "png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
