"""Fuse every zoo model in float64 and print one table row per model (information, not a test).

    python -m zoo.report            # from tests/: all entries
    python -m zoo.report swin dpn   # some

Columns: outcome (``ok`` or the exception's first line), max relative error of the fused model against the
original on the entry's input (max |fused - ref| / max |ref| over all outputs), BatchNorms in the model, BatchNorm
ops left in the fused graph (from ``fuse_report.ops_after``), what ``torch.fx``'s own conv+BN fusion leaves
(``-`` where fx cannot trace the model), opaque (carried-through) ops, seconds.
"""

from __future__ import annotations

import signal
import sys
import time

import torch

from . import ZOO, count_bn, fx_fused_bn_count, zoo_model


def _flat(y: object) -> list[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y]
    return [t for item in y for t in _flat(item)]  # type: ignore[union-attr]


def _row(entry_name: str, timeout_s: int = 300) -> str:
    import repalgebra

    entry = zoo_model(entry_name)
    model = entry.build().double()
    x = torch.randn(entry.input_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        ref = _flat(model(x.clone()))
    n_bn = count_bn(model)
    fx_left = fx_fused_bn_count(entry.build())
    start = time.perf_counter()

    def _timeout(*_: object) -> None:
        raise TimeoutError(f"fuse took more than {timeout_s}s")

    old = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(timeout_s)
    try:
        fused = repalgebra.fuse(model, x.clone())
        with torch.no_grad():
            out = _flat(fused(x.clone()))
        err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item() for a, b in zip(out, ref, strict=True))
        rep = fused.fuse_report
        bn_left = rep.ops_after.get("batch_norm", 0)
        outcome = "ok" if err < 1e-6 else "WRONG"
        opaque = len(rep.opaque)
        err_s = f"{err:.1e}"
    except Exception as e:  # noqa: BLE001 - the report records any failure
        outcome = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:110]
        err_s, bn_left, opaque = "-", "-", "-"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    secs = time.perf_counter() - start
    fx_s = "-" if fx_left is None else str(fx_left)
    return f"| {entry.name} | {outcome} | {err_s} | {n_bn} | {bn_left} | {fx_s} | {opaque} | {secs:.1f} |"


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    print("| model | outcome | max rel err | BN in model | BN left (fuse) | BN left (fx fuse) | opaque ops | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names or [e.name for e in ZOO]:
        print(_row(name), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
