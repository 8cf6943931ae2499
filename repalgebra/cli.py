"""The ``repalgebra`` command line: fuse, expand, export, verify, show, rules, demo.

MODEL is a FastViT variant name (``fastvit_t8`` ...), optionally with
``--checkpoint``, or ``module:attr`` naming an ``nn.Module`` or a factory
returning one, in an importable module or a ``.py`` file
(``path/to/blocks.py:make_block``).

Exit codes: 0 success, 1 failure (a check failed, the model could not be
folded or exported), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from pathlib import Path


class UsageError(Exception):
    """A bad argument: exit code 2."""


def _step(k: int, total: int, what: str) -> float:
    print(f"[{k}/{total}] {what}", file=sys.stderr, flush=True)
    return time.perf_counter()


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,3,256,256, got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"shape entries must be positive, got {text!r}")
    return shape


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _opset(text: str) -> int:
    import onnx

    from repalgebra.backend.onnx import MIN_OPSET

    value = _positive(text)
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= value <= newest:
        raise argparse.ArgumentTypeError(f"must be between {MIN_OPSET} and {newest}, got {value}")
    return value


def load_model(spec: str, checkpoint: str | None = None):
    """The train-time model named by ``spec`` (see the module docstring), in eval mode."""
    import torch

    import fastvit_models

    if spec in fastvit_models.list_models():
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise UsageError(f"no such checkpoint file: {checkpoint}")
        return fastvit_models.create_model(spec, checkpoint=checkpoint).eval()
    if ":" not in spec:
        names = ", ".join(fastvit_models.list_models())
        raise UsageError(f"unknown model {spec!r}: give a FastViT name ({names}) or module:attr")
    if checkpoint is not None:
        raise UsageError("--checkpoint is only for FastViT names; load weights inside your factory")
    mod_name, attr = spec.rsplit(":", 1)
    if "" not in sys.path and str(Path.cwd()) not in sys.path:  # as `python -m` does: modules of the directory you are in
        sys.path.insert(0, str(Path.cwd()))
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.exists():
                raise UsageError(f"no such file: {mod_name}")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(f"cannot import {mod_name!r}: {e}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise UsageError(f"{mod_name!r} has no attribute {attr!r}")
    try:
        model = obj if isinstance(obj, torch.nn.Module) else obj()
    except Exception as e:  # noqa: BLE001  (the factory's own error, said as its)
        raise UsageError(f"calling {spec}() failed (a factory is called with no arguments): {type(e).__name__}: {e}") from e
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{spec} gave a {type(model).__name__}, not an nn.Module")
    from repalgebra.module_copy import in_eval

    return in_eval(model)


_FASTVIT_SHAPE = (1, 3, 256, 256)


def _shape(args) -> tuple[int, ...] | None:
    """``--input-shape``, else FastViT's 1x3x256x256 for a FastViT name, else None: fuse guesses it from the model."""
    import fastvit_models

    if args.input_shape is not None:
        return args.input_shape
    return _FASTVIT_SHAPE if args.model in fastvit_models.list_models() else None


_INPUT_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "bool")


def _example(args, model=None, shape: tuple[int, ...] | None = None):
    """The example input of ``--input-shape`` and ``--input-dtype`` (None where neither says a shape): standard
    normal values of a floating dtype; token ids below the vocabulary of ``model``'s smallest ``nn.Embedding``
    (below 2 without one) of an integer dtype; random booleans."""
    import torch

    shape = shape or _shape(args)
    if shape is None:
        return None
    dtype = getattr(torch, args.input_dtype or "float32")
    if dtype.is_floating_point:
        return (torch.randn(shape).to(dtype),)
    if dtype == torch.bool:
        return (torch.rand(shape) < 0.5,)
    vocab = [m.num_embeddings for m in (model.modules() if model is not None else ()) if isinstance(m, torch.nn.Embedding)]
    return (torch.randint(0, min(vocab, default=2), shape, dtype=dtype),)


def _writable(path: str, suffixes: tuple[str, ...]) -> None:
    """Refuse an output path before the work, not after it: another kind of file, or a folder that is not there."""
    out = Path(path)
    if out.suffix not in suffixes:
        raise UsageError(f"-o {path}: the file is written as {' or '.join(suffixes)}, so its name must end so")
    if not out.parent.is_dir():
        raise UsageError(f"-o {path}: no such folder: {out.parent}")


def _fuse(args) -> int:
    import repalgebra

    _writable(args.output, (".pt", ".pth", ".safetensors"))
    _step(1, 3, f"building {args.model}")
    model = load_model(args.model, args.checkpoint)
    _step(2, 3, "fusing")
    fused = repalgebra.fuse(model, _example(args, model), strict=args.strict)
    print(fused.fuse_report)
    _step(3, 3, f"writing {args.output}")
    state = _save_state(fused, args.output)
    shape = ",".join(map(str, fused.fuse_report.input_shapes[0])) if fused.fuse_report.input_shapes else "..."
    print(f"wrote {args.output} ({sum(v.numel() for v in state.values()):,} values): the fused module's state dict; load it "
          f"into repalgebra.fuse(model, example) of the same model (here at {shape}) with load_state_dict")
    return 0


def _save_state(module, path) -> dict:
    """Write ``module``'s state dict to ``path`` (safetensors for ``.safetensors``, else ``torch.save``); return it."""
    import torch

    state = module.state_dict()
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return state


def _expand(args) -> int:
    import repalgebra
    from repalgebra.recipes import mobileone, recipe_named

    if args.k is not None and args.recipe != "mobileone":
        raise UsageError("--k is the number of kxk branches of --recipe mobileone")
    recipe = mobileone.recipe(args.k) if args.k is not None else recipe_named(args.recipe)
    _writable(args.output, (".pt", ".pth", ".safetensors"))
    _step(1, 3, f"building {args.model}")
    model = load_model(args.model, args.checkpoint)
    _step(2, 3, f"expanding with {recipe.name} (init={args.init})")
    expanded = repalgebra.expand(model, recipe, _example(args, model), init=args.init)
    print(expanded.expand_report)
    _step(3, 3, f"writing {args.output}")
    state = _save_state(expanded, args.output)
    spelled = f"repalgebra.recipes.mobileone.recipe({args.k})" if args.k is not None else repr(recipe.name)
    print(f"wrote {args.output} ({sum(v.numel() for v in state.values()):,} values): "
          f"load it into repalgebra.expand(model, {spelled}, init={args.init!r})")
    return 0


def _verify(args) -> int:
    import torch

    import repalgebra

    _step(1, 3, f"building {args.model}")
    model = load_model(args.model, args.checkpoint)
    _step(2, 3, "fusing")
    fused = repalgebra.fuse(model, _example(args, model))
    _step(3, 3, "comparing train-time and fused models")
    dtype = {"float64": torch.float64, "float32": torch.float32, None: None}[args.dtype]
    report = repalgebra.verify(model, fused, _example(args, model), n=args.n, dtype=dtype)
    print(report)
    return 0 if report else 1


def _export(args) -> int:
    import numpy as np
    import onnxruntime as ort
    import torch
    from torch.utils import _pytree as pytree

    import repalgebra
    from repalgebra.backend.onnx import export_onnx

    _writable(args.output, (".onnx",))
    _step(1, 4, f"building {args.model}")
    model = load_model(args.model, args.checkpoint)
    _step(2, 4, "fusing")
    example = _example(args, model)
    fused = repalgebra.fuse(model, example)
    _step(3, 4, f"exporting to {args.output} (opset {args.opset or 'default'})")
    shape = fused.fuse_report.input_shapes[0]  # --input-shape, or the one fuse guessed
    proto, report = export_onnx(
        fused, args.output, example[0] if example is not None else shape, opset=args.opset, fuse=False,
        metadata={"model": args.model}, return_report=True, allow_example_branches=args.allow_example_branches,
    )
    print(report)
    _step(4, 4, "running it in onnxruntime")
    (x,) = _example(args, model, shape)
    runner = "onnxruntime"
    try:
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    except Exception as e:  # noqa: BLE001  (no kernel for its dtype: onnxruntime's CPU provider has no float64 Conv)
        if "NOT_IMPLEMENTED" not in str(e):  # (only that: a file onnxruntime refuses otherwise is no file to pass)
            raise
        from onnx.reference import ReferenceEvaluator

        runner = "onnx's reference evaluator"
        print(f"onnxruntime cannot run the file ({str(e).strip().splitlines()[0][:160]}): running it in {runner}")
        got = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})
    with torch.no_grad():  # (the file's outputs are the tensors: a None among the model's is no output of it)
        ref = [t.numpy() for t in pytree.tree_leaves(fused(x)) if torch.is_tensor(t)]
    # (np.max, not max: a NaN in any output's error is the error; Python's max skips one that is not first)
    err = float(np.max([_relative_error(g, r) for g, r in zip(got, ref)] or [0.0]))
    counts: dict[str, int] = {}
    for n in proto.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    print("ONNX nodes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    ok = err <= 1e-5 and len(got) == len(ref)
    print(f"{runner} vs fused torch: max relative error {err:.2e} (tolerance 1e-05, {str(x.dtype).replace('torch.', '')}) "
          f"-> {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


def _relative_error(got: "np.ndarray", want: "np.ndarray") -> float:
    """The largest difference of ``got`` from ``want`` relative to ``want``'s largest magnitude; for a mask or an index
    (bool or integer outputs), 0 where they are equal and 1 where not (a bool has no difference: numpy refuses it)."""
    import numpy as np

    if want.dtype == np.bool_ or np.issubdtype(want.dtype, np.integer):
        return 0.0 if got.shape == want.shape and np.array_equal(got, want) else 1.0
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)) if want.size else 0.0


_PICTURE_FORMATS = ("svg", "png", "dot")


def _show(args) -> int:
    import shutil
    import subprocess

    import repalgebra

    out = args.output
    fmt = Path(out).suffix.lstrip(".").lower() if out is not None else None
    if out is not None and fmt not in _PICTURE_FORMATS:
        raise UsageError(f"-o must end in .svg, .png or .dot, got {out!r}")
    model = load_model(args.model, args.checkpoint)
    graph = repalgebra.trace(model, _example(args, model))
    if args.fused:
        graph, _ = repalgebra.rewrite(graph)
    if out is None:
        print(graph)
        return 0
    what = f"{args.model}{' (fused)' if args.fused else ''}"
    dot = graph.to_dot(title=what) + "\n"
    if fmt == "dot":
        Path(out).write_text(dot)
    else:
        if shutil.which("dot") is None:
            print(
                f"repalgebra: graphviz's `dot` program is not on PATH, so {out} was not written.\n"
                "  Install Graphviz (apt-get install graphviz, brew install graphviz or conda install graphviz) and rerun,\n"
                f"  or render the DOT text printed below yourself: save it as graph.dot, then `dot -T{fmt} graph.dot -o {out}`\n"
                "  (`-o graph.dot` writes the DOT text without Graphviz).",
                file=sys.stderr,
            )
            print(dot, end="")
            return 1
        r = subprocess.run(["dot", f"-T{fmt}", "-o", out], input=dot.encode(), capture_output=True)
        if r.returncode != 0:
            raise RuntimeError(f"`dot -T{fmt}` failed (exit {r.returncode}): {r.stderr.decode(errors='replace').strip()}")
    print(f"wrote {out} ({what}: {len(graph.nodes)} nodes)")
    return 0


def _demo(args) -> int:
    from repalgebra.demo import run_demo

    return run_demo()


def _rules(args) -> int:
    import repalgebra
    from repalgebra.rewrite import RULES

    for r in RULES.values():
        first = r.doc.splitlines()[0] if r.doc else ""
        print(f"{r.name:<20} on {','.join(r.ops):<24} {first}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="repalgebra",
        description="Structural reparameterization as an algebra of proven rewrite rules.",
        epilog="MODEL: a FastViT name (fastvit_t8, fastvit_sa12, ...) or module:attr / file.py:attr naming an nn.Module or a factory.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def model_cmd(name: str, help: str, fn):
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("model", metavar="MODEL", help="FastViT name or module:attr")
        c.add_argument("--checkpoint", help="FastViT checkpoint (.pth, .pth.tar, .safetensors; Apple or timm layout)")
        c.add_argument("--input-shape", type=_parse_shape, default=None, metavar="N,C,H,W",
                       help="example input shape (default: 1,3,256,256 for FastViT, else guessed from the model's first layer)")
        c.add_argument("--input-dtype", choices=_INPUT_DTYPES, default=None,
                       help="example input dtype (default float32); int64 draws token ids below the smallest nn.Embedding's "
                       "vocabulary, for a language model")
        c.set_defaults(func=fn)
        return c

    c = model_cmd("fuse", "fold MODEL and write the fused state dict; prints the fuse report", _fuse)
    c.add_argument("-o", "--output", required=True, help="output file (.pt or .safetensors)")
    c.add_argument("--strict", action="store_true", help="fail instead of keeping untraceable parts whole")
    c = model_cmd("expand", "over-parameterize MODEL for training (the inverse of fuse) and write its state dict; prints the expand report", _expand)
    c.add_argument("-o", "--output", required=True, help="output file (.pt or .safetensors)")
    c.add_argument("--recipe", default="repvgg", choices=["repvgg", "acnet", "dbb", "mobileone"], help="the block each conv becomes (default repvgg)")
    c.add_argument("--k", type=_positive, default=None, help="mobileone: the number of parallel kxk branches (default 3)")
    c.add_argument("--init", choices=["preserve", "fresh"], default="preserve",
                   help="preserve: the same function as MODEL (default); fresh: PyTorch's default initialization")
    c = model_cmd("export", "fuse MODEL, export it to ONNX, check it and compare onnxruntime with torch", _export)
    c.add_argument("-o", "--output", required=True, help="output .onnx file")
    c.add_argument("--opset", type=_opset, default=None, help="ONNX opset, 13 to the onnx package's newest (default 20: one Gelu kernel per GELU in onnxruntime)")
    c.add_argument("--allow-example-branches", action="store_true",
                   help="write a file whose branches on tensor values (if x.mean() > 0), and numbers read from them, are fixed to the example's (refused by default)")
    c = model_cmd("verify", "compare the train-time MODEL with its fused form on random inputs", _verify)
    c.add_argument("-n", type=_positive, default=3, help="number of random inputs (default 3)")
    c.add_argument("--dtype", choices=["float32", "float64"], default=None, help="run both models in this dtype")
    c = model_cmd("show", "print or draw the IR of MODEL", _show)
    c.add_argument("--fused", action="store_true", help="show the fused graph")
    c.add_argument("-o", "--output", default=None, help="write a picture (.svg, .png, needs graphviz) or .dot")
    what = "build fastvit_t8, fuse, verify, export to ONNX and time it: the main job in a minute"
    d = sub.add_parser("demo", help=what, description=what)
    d.set_defaults(func=_demo)
    what = "list the fusion rules: name, the ops each is tried on, and its identity in one line"
    r = sub.add_parser("rules", help="list the fusion rules", description=what)
    r.set_defaults(func=_rules)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit 0 on success, 1 on failure, 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"repalgebra: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, KeyError, FileNotFoundError, RuntimeError, NotImplementedError) as e:
        print(f"repalgebra: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
