"""``python -m proofs [-v] [rule ...]``: run every rule proof, one summary line per rule.

Exit status 0 if every proof holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from . import RULES, is_refused, load


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m proofs", description=__doc__)
    ap.add_argument("rules", nargs="*", help=f"subset of: {' '.join(RULES)}")
    ap.add_argument("-v", "--verbose", action="store_true", help="list every configuration")
    args = ap.parse_args(argv)
    names = args.rules or RULES
    unknown = [n for n in names if n not in RULES]
    if unknown:
        ap.error(f"unknown rule(s): {', '.join(unknown)}")

    failed = 0
    t_all = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        try:
            done = load(name).prove()
        except Exception as exc:  # AssertionError from a proof, or a bug
            failed += 1
            dt = time.perf_counter() - t0
            print(f"{name:<18} FAILED   {dt:.1f}s", flush=True)
            if isinstance(exc, AssertionError):
                print("    " + str(exc).replace("\n", "\n    "), flush=True)
            else:
                traceback.print_exc()
            continue
        dt = time.perf_counter() - t0
        proved = [d for d in done if not is_refused(d)]
        refused = [d for d in done if is_refused(d)]
        n = len(proved)
        line = f"{name:<18} proved  ({n} configuration{'s' if n != 1 else ''})"
        if refused:
            line += f"  + {len(refused)} refused case{'s' if len(refused) != 1 else ''} shown"
        print(f"{line:<72} {dt:5.1f}s", flush=True)
        if args.verbose:
            for d in done:
                print("    " + d, flush=True)
    total = time.perf_counter() - t_all
    status = "FAILED" if failed else "all proofs hold"
    print(f"{len(names) - failed}/{len(names)} rules proved, {status}  ({total:.1f}s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
