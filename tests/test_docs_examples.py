"""Every Python example in the docs runs, and the output the docs show is the output you get.

* Each ```` ```python ```` block of ``README.md``, ``docs/*.md`` and ``docs/rules/*.md``
  runs; the blocks of one file run in order in one fresh namespace (a later
  block uses the names of earlier ones), with a temporary directory as the
  working directory.  A failure names the file and the block's line, and the
  traceback's line numbers are the Markdown file's own.
* A ```` ```text ```` block right after an ``<!-- output -->`` comment shows what
  the closest Python block above it prints.  It must match, up to numbers that
  vary between machines or runs: timings (``0.062s``), floats in scientific
  notation (``1.80e-07``, rounding errors) and the counters in IR value names
  (``%conv2d16``) are compared as placeholders, and runs of spaces as one space.  After a deliberate change, refresh those blocks with
  ``python tests/test_docs_examples.py --write`` and review the diff.
* ``mkdocs build --strict`` succeeds (mkdocs is in the ``dev`` extra; in CI a
  missing mkdocs fails instead of skipping).
* Every relative link in the docs points to a file that exists.  MkDocs only
  knows the files under ``docs/``, so it reports links to the code (the rule
  pages link their proofs and tests) as "not found" at INFO level
  (``mkdocs.yml``: ``validation.links.not_found: info``); this test checks
  them against the repository instead.

Blocks that are not meant to run use another fence info (```` ```text ````,
```` ```console ````).  Keep examples small: the whole file runs in seconds.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import io
import os
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON_INFOS = {"python", "py", "python3"}
OUTPUT_MARK = "<!-- output -->"
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def markdown_files() -> list[Path]:
    """README.md and every Markdown file under docs/, in a stable order."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs").glob("*/*.md"))]
    return [f for f in files if f.is_file()]


@dataclass
class Block:
    """A fenced block: its info word, first content line (1-based) and text."""

    info: str
    line: int
    end: int  # 1-based line of the closing fence
    code: str
    output_of: int | None = None  # for an output block: the index of the Python block it shows


def fenced_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, indentation of the fence removed."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    last_python: int | None = None
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or (m["fence"][0] == "`" and "`" in m["info"]):
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        info = m["info"].strip().lstrip("{").strip().lstrip(".").split(maxsplit=1)
        word = info[0].lower().rstrip("}") if info else ""
        prev = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        body = []
        j = i + 1
        while j < len(lines):
            s = lines[j].strip()
            if s.startswith(fence) and set(s) == {fence[0]}:
                break
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        block = Block(word, i + 2, j + 1, "\n".join(body) + ("\n" if body else ""))
        if word in PYTHON_INFOS:
            last_python = len(blocks)
        elif prev == OUTPUT_MARK:
            if last_python is None:
                raise ValueError(f"line {i + 1}: an output block with no Python block above it")
            block.output_of = last_python
        blocks.append(block)
        i = j + 1
    return blocks


def normalize(text: str) -> str:
    """Output with the machine-dependent parts masked: timings, floats in scientific notation, value counters, space runs."""
    text = re.sub(r"\b\d+\.\d+s\b", "<seconds>", text)
    text = re.sub(r"(%\w*?)\d+\b", r"\1<n>", text)
    text = re.sub(r"[-+]?\b\d+(\.\d+)?e[-+]\d+\b", "<float>", text)
    return "\n".join(re.sub(r"[ \t]+", " ", line).rstrip() for line in text.strip("\n").splitlines())


def run_file(path: Path, workdir: Path) -> dict[int, str]:
    """Run the Python blocks of ``path`` in order in one namespace, in ``workdir``; their outputs by block index.

    Raises ``AssertionError`` naming the file and line of the first block that fails.
    """
    import torch

    rel = path.relative_to(ROOT)
    blocks = fenced_blocks(path.read_text())
    namespace: dict = {"__name__": f"docs_example_{path.stem}"}
    outputs: dict[int, str] = {}
    old_cwd = os.getcwd()
    # A page may pin torch's global state for reproducible numbers (train_fold_ship.md: one
    # thread, deterministic algorithms); put it back so later pages and tests run as before.
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    os.chdir(workdir)
    torch.manual_seed(0)
    _restart_value_names()
    try:
        for k, b in enumerate(blocks):
            if b.info not in PYTHON_INFOS:
                continue
            # Pad with blank lines so that tracebacks give the Markdown file's line numbers.
            code = compile("\n" * (b.line - 1) + b.code, str(rel), "exec")
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf):
                    exec(code, namespace)
            except Exception:
                tb = traceback.format_exc()
                printed = buf.getvalue()
                tail = f"\n--- it printed:\n{printed[-2000:]}" if printed else ""
                raise AssertionError(f"{rel}: the python block at line {b.line} failed:\n{tb}{tail}") from None
            outputs[k] = buf.getvalue()
    finally:
        os.chdir(old_cwd)
        torch.set_default_dtype(torch.float32)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return outputs


def _restart_value_names() -> None:
    """Number IR values from 0 again, as in a fresh interpreter (the numbers are masked when compared anyway)."""
    import itertools

    import repalgebra.ir

    repalgebra.ir._ids = itertools.count()


FILES = markdown_files()


def _id(p: Path) -> str:
    return str(p.relative_to(ROOT))


@pytest.mark.parametrize("path", FILES, ids=_id)
def test_examples_run_and_print_what_the_docs_show(path: Path, tmp_path: Path):
    outputs = run_file(path, tmp_path)
    rel = path.relative_to(ROOT)
    for b in fenced_blocks(path.read_text()):
        if b.output_of is None:
            continue
        got = outputs[b.output_of]
        if normalize(got) != normalize(b.code):
            diff = "\n".join(
                difflib.unified_diff(b.code.splitlines(), got.splitlines(), "shown in the docs", "printed now", lineterm="")
            )
            pytest.fail(
                f"{rel}: the output block at line {b.line} no longer matches what the code above it prints "
                f"(refresh with `python tests/test_docs_examples.py --write` if the change is intended):\n{diff}"
            )


def test_docs_have_examples():
    """The collector finds the examples (a broken parser must not pass by finding nothing)."""
    found = {_id(p): sum(b.info in PYTHON_INFOS for b in fenced_blocks(p.read_text())) for p in FILES}
    for name in ("README.md", "docs/index.md", "docs/algebra.md", "docs/tutorial.md"):
        assert found.get(name, 0) >= 1, f"{name} has no python block: {found}"


def test_fence_parser():
    text = (
        "intro\n```python\na = 1\n```\n<!-- output -->\n```text\nhi\n```\n"
        "- item\n\n    ```python\n    b = a\n    ```\n````markdown\n```python\nnot code\n```\n````\n"
    )
    blocks = fenced_blocks(text)
    assert [(b.info, b.line, b.code) for b in blocks] == [
        ("python", 3, "a = 1\n"),
        ("text", 7, "hi\n"),
        ("python", 12, "b = a\n"),
        ("markdown", 15, "```python\nnot code\n```\n"),
    ]
    assert blocks[1].output_of == 0
    assert normalize("fuse: 7 rewrites in 0.062s\n  0  1x4  9.54e-07    1.80e-07  yes  \n") == (
        "fuse: 7 rewrites in <seconds>\n 0 1x4 <float> <float> yes"
    )
    assert normalize("%conv2d16 = conv2d(%x)  : 1x4x8x8  # conv3\n  return %add_1") == (
        "%conv2d<n> = conv2d(%x) : 1x4x8x8 # conv3\n return %add_<n>"
    )


# --------------------------------------------------------------------------- links

_LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", FILES, ids=_id)
def test_relative_links_resolve(path: Path):
    text = path.read_text()
    # Links inside fenced blocks are code, not links.
    lines = text.splitlines()
    for b in fenced_blocks(text):
        for k in range(b.line - 2, b.end):
            lines[k] = ""
    broken = []
    for n, line in enumerate(lines, 1):
        for m in _LINK.finditer(line):
            target = (m.group(1) or m.group(2)).split("#", 1)[0]
            if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # an anchor on the same page, or an absolute URL
            resolved = (path.parent / target).resolve()
            if resolved.exists():
                continue
            broken.append(f"line {n}: {target}")
    assert not broken, f"{path.relative_to(ROOT)}: links to missing files: {broken}"


# --------------------------------------------------------------------------- mkdocs


def test_mkdocs_build_strict(tmp_path: Path):
    missing = [m for m in ("mkdocs", "pymdownx", "material", "mkdocstrings", "latex2mathml") if importlib.util.find_spec(m) is None]
    if missing:
        msg = f"{', '.join(missing)} not installed: pip install -e '.[dev]'"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout}\n{r.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()


# --------------------------------------------------------------------------- --write


def write_outputs(paths: list[Path]) -> int:
    """Replace every output block with what its Python block prints now; returns how many changed."""
    import tempfile

    changed = 0
    for path in paths:
        with tempfile.TemporaryDirectory() as tmp:
            outputs = run_file(path, Path(tmp))
        lines = path.read_text().splitlines(keepends=True)
        blocks = [b for b in fenced_blocks(path.read_text()) if b.output_of is not None]
        for b in reversed(blocks):  # from the end, so earlier line numbers stay valid
            got = outputs[b.output_of]
            if normalize(got) == normalize(b.code):
                continue  # only masked parts (timings, rounding errors) differ: keep the page as it is
            fence_line = lines[b.line - 2]
            indent = fence_line[: len(fence_line) - len(fence_line.lstrip())]
            new = [indent + line if line.strip() else line for line in got.rstrip("\n").splitlines(keepends=False)]
            lines[b.line - 1 : b.end - 1] = [line + "\n" for line in new]
            changed += 1
            print(f"{path.relative_to(ROOT)}: output block at line {b.line} updated")
        path.write_text("".join(lines))
    return changed


if __name__ == "__main__":
    if sys.argv[1:2] != ["--write"]:
        sys.exit("usage: python tests/test_docs_examples.py --write [FILE.md ...]   (or run it with pytest)")
    chosen = [Path(p).resolve() for p in sys.argv[2:]] or FILES
    n = write_outputs(chosen)
    print(f"{n} output block(s) updated")
