"""MkDocs hook: a link from a page to the code (``../../proofs/kernel_pad.py``) opens that code on the site.

The pages link to the proofs, tests and modules they explain, by their paths in
the repository, which work where the Markdown is read beside the code (GitHub,
an editor).  The built site holds only ``docs/``, so those links led nowhere.
This hook rewrites each link whose target lies outside ``docs/`` and exists in
the repository to a page of the site, ``source/<path>.html``, and writes that
page after the build: the file highlighted by Pygments (the highlighter the
theme uses), or for a folder a list of its files.  Nothing is fetched.
"""

from __future__ import annotations

import html
import posixpath
import re
from pathlib import Path

from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_for_filename
from pygments.util import ClassNotFound

# A Markdown link's target: ](path) or ](path#anchor), not a URL with a scheme.
_LINK = re.compile(r"\]\((?![a-z][a-z0-9+.-]*:|#)([^)\s#]+)(#[^)\s]*)?\)")
_LINKED: set[str] = set()  # repository paths the pages link to (files and folders)


def on_page_markdown(markdown: str, page, config, files) -> str:
    docs = Path(config["docs_dir"]).resolve()
    root = docs.parent
    here = (docs / page.file.src_path).parent
    # The folder the page's HTML is in: "rules/kernel_pad/" for rules/kernel_pad/index.html, "" for the home page.
    page_dir = (page.url if page.url.endswith("/") or not page.url else posixpath.dirname(page.url)).rstrip("/") or "."

    def rewrite(m: re.Match) -> str:
        target = (here / m.group(1)).resolve()
        if target.is_relative_to(docs) or not target.is_relative_to(root) or not target.exists():
            return m.group(0)
        rel = target.relative_to(root).as_posix()
        _LINKED.add(rel)
        url = posixpath.relpath(f"source/{rel}.html" if target.is_file() else f"source/{rel}/index.html", page_dir)
        return f"]({url}{m.group(2) or ''})"

    return _LINK.sub(rewrite, markdown)


def on_post_build(config) -> None:
    root = Path(config["docs_dir"]).resolve().parent
    site = Path(config["site_dir"])
    css = HtmlFormatter().get_style_defs(".highlight")
    for rel in sorted(_LINKED):
        source = root / rel
        if source.is_dir():
            names = sorted(p.name + ("/" if p.is_dir() else "") for p in source.iterdir() if not p.name.startswith((".", "__pycache__")))
            items = "".join(f'<li><a href="{html.escape(n.rstrip("/"))}{"/index.html" if n.endswith("/") else ".html"}">{html.escape(n)}</a></li>'
                            for n in names if n.endswith("/") or (source / n).suffix in (".py", ".md", ".txt", ".toml"))
            body = f"<ul>{items}</ul>"
            for n in names:  # the files listed get pages too
                if not n.endswith("/") and (source / n).suffix in (".py", ".md", ".txt", ".toml"):
                    _write(site, f"{rel}/{n}", root / rel / n, css)
            out = site / "source" / rel / "index.html"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(_page(rel + "/", body, css), encoding="utf-8")
        else:
            _write(site, rel, source, css)


def _write(site: Path, rel: str, source: Path, css: str) -> None:
    try:
        lexer = get_lexer_for_filename(source.name)
    except ClassNotFound:
        lexer = get_lexer_for_filename("x.txt")
    body = highlight(source.read_text(encoding="utf-8"), lexer, HtmlFormatter(linenos="table"))
    out = site / "source" / f"{rel}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_page(rel, body, css), encoding="utf-8")


def _page(title: str, body: str, css: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)} - repalgebra</title>'
            f"<style>body{{font-family:system-ui,sans-serif;margin:1.5em}}pre{{margin:0}}{css}</style></head>"
            f"<body><h1><code>{html.escape(title)}</code></h1>{body}</body></html>")
