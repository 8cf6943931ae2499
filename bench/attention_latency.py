"""Eager latency of the fused FastViT with and without the attention op (rule ``attention_form``).

    python bench/attention_latency.py [--variants fastvit_sa12,fastvit_sa36,fastvit_ma36] [--rounds 21] [--size 256]
                                      [--write docs/benchmarks.md]

Each variant is fused twice: with every rule (its attention runs as one
``F.scaled_dot_product_attention``) and with every rule but
``attention_form`` (matmul, softmax, matmul as the model writes them; the
query scale is folded either way).  Both fused modules are timed in eager
PyTorch, 1 thread, batch 1, float32, in interleaved rounds; the table reports
medians, the ratio, and the largest difference between the two outputs
relative to the largest logit.  Its section sits between the
``<!-- attention_latency -->`` markers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fastvit_models  # noqa: E402
import repalgebra  # noqa: E402
from fastvit_latency import write_section  # noqa: E402
from fastvit_models.testing import randomize_model_  # noqa: E402
from repalgebra.rewrite import RULES  # noqa: E402
from timing import interleaved_medians, machine  # noqa: E402

MARK = "<!-- attention_latency -->"


def fuse_without(model: torch.nn.Module, x: torch.Tensor, rule: str) -> torch.nn.Module:
    """``repalgebra.fuse`` with one rule taken out of the registry for the call."""
    taken = RULES.pop(rule)
    try:
        return repalgebra.fuse(model, x, check=False)
    finally:
        RULES[rule] = taken


def measure(name: str, rounds: int, size: int) -> dict:
    model = randomize_model_(fastvit_models.create_model(name), torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with_op = repalgebra.fuse(model, x, check=False)
    without = fuse_without(model, x, "attention_form")
    n_att = with_op.fuse_report.ops_after.get("attention", 0)
    with torch.no_grad():
        a, b = with_op(x), without(x)
        diff = float((a - b).abs().max() / b.abs().max())
        t_with, t_without = interleaved_medians([lambda: with_op(x), lambda: without(x)], rounds=rounds)
    return dict(name=name, attention=n_att, with_ms=t_with * 1e3, without_ms=t_without * 1e3, diff=diff)


def table(rows: list[dict]) -> str:
    lines = [
        "| variant | attention ops | written out ms | attention op ms | ratio | output difference |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['attention']} | {r['without_ms']:.1f} | {r['with_ms']:.1f} | "
            f"{r['with_ms'] / r['without_ms']:.3f} | {r['diff']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="fastvit_sa12,fastvit_sa36,fastvit_ma36")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--write", type=Path, default=None, help="put the table into this Markdown file")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.variants.split(","):
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        rows.append(measure(name, args.rounds, args.size))
    body = (
        f"### Eager PyTorch: the fused FastViT's attention written out vs one attention op "
        f"(batch 1, {args.size}x{args.size}, float32)\n\n"
        f"Machine: {machine()}; medians of {args.rounds} interleaved rounds.  Ratio: attention op / written out "
        f"(below 1: the attention op is faster).  Output difference: largest |difference| of the two fused "
        f"models' logits relative to the largest logit.\n\n{table(rows)}"
    )
    print(body)
    if args.write:
        write_section(args.write, MARK, body)


if __name__ == "__main__":
    main()
