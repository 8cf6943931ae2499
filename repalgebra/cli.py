"""The ``repalgebra`` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from repalgebra.demo import run_demo

    return run_demo()


def _rules(args: argparse.Namespace) -> int:
    from repalgebra.rewrite import RULES

    import repalgebra.rules  # noqa: F401

    for r in RULES.values():
        first = r.doc.splitlines()[0] if r.doc else ""
        print(f"{r.name:<18} on {','.join(r.ops):<16} {first}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="repalgebra", description="Structural reparameterization as an algebra of proven rewrite rules.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    d = sub.add_parser("demo", help="fold a train-time block, check it against the original, print the report")
    d.set_defaults(func=_demo)
    r = sub.add_parser("rules", help="list the fusion rules")
    r.set_defaults(func=_rules)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit 0 on success, 1 on failure, 2 on bad arguments."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"repalgebra: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
