"""The built docs site: rendered math, nothing from the network, an API page per public module, and a look at it.

One ``mkdocs build --strict`` (module fixture) and these checks on its pages:

* every formula of the Markdown sources became MathML: per page, the number of
  ``$...$`` and ``$$...$$`` in the source (counted here, independently of the
  build) equals the number of ``<math`` elements, and no page shows TeX
  (``\\(``, ``\\[``, ``$$``, a ``$`` outside code, arithmatex's wrappers);
* no built page or stylesheet loads a script, stylesheet, font or image from
  ``http(s)://`` (the site works offline; Material with ``font: false``);
* the API reference pages (``docs/api/``) document every public name of the
  modules they cover, from the docstrings;
* ``docs/screenshots.py`` screenshots a few representative pages in headless
  Chromium, light and dark, and none is blank (skipped where Chromium is not
  installed: ``apt-get install -y chromium``).

The hook that turns TeX into MathML (``docs/hooks/mathml.py``) is tested on its
own too: a command the converter does not know fails the build.
"""

from __future__ import annotations

import html
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load(name: str, path: Path):
    return load_script(name, path)


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        msg = f"{', '.join(missing)} not installed: pip install -e '.[dev]'"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    _require("mkdocs", "material", "mkdocstrings_handlers.python", "latex2mathml", "pymdownx")
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout}\n{r.stderr}"
    return out


def markdown_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)


def built_page(site: Path, md: Path) -> Path:
    rel = md.relative_to(DOCS).with_suffix("")
    return site / ("" if rel.name == "index" and rel.parent == Path(".") else str(rel.parent if rel.name == "index" else rel)) / "index.html"


# --------------------------------------------------------------------------- counting formulas in the sources

_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,}).*?^[ \t]*\1[ \t]*$", re.S | re.M)
_CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
_DISPLAY = re.compile(r"\$\$.+?\$\$", re.S)
# Inline math as Markdown authors write it: $ then no space ... no space then $, escaped \$ excluded,
# within one paragraph (no blank line inside).
_INLINE = re.compile(r"(?<![\\$])\$(?=\S)(?:\\.|[^\\$\n]|\n(?![ \t]*\n))+?(?<=\S)(?<!\\)\$")


def count_formulas(markdown: str) -> int:
    """Formulas in a Markdown text: ``$$...$$`` blocks and ``$...$`` spans outside code."""
    text = _FENCE.sub("", markdown)
    text = _CODE_SPAN.sub("", text)
    display = len(_DISPLAY.findall(text))
    text = _DISPLAY.sub("", text)
    return display + len(_INLINE.findall(text))


def test_count_formulas():
    md = (
        "A $x$ and $\\alpha_i$,\n$$\nK = \\sum_i W_i\n$$\n`$not$` costs \\$5 and $y\nz$.\n"
        "```python\nprint('$a$')\n```\nprices of 5 $ and 6 $ are not math\n"
    )
    assert count_formulas(md) == 4


def _article(page_html: str) -> str:
    """The page's content (Material's ``<article>``), without code blocks and code spans."""
    m = re.search(r"<article\b.*?</article>", page_html, flags=re.S)
    body = m.group(0) if m else page_html
    body = re.sub(r"<pre\b.*?</pre>", "", body, flags=re.S)
    return re.sub(r"<code\b.*?</code>", "", body, flags=re.S)


def test_every_formula_became_mathml(site: Path):
    total, wrong, raw = 0, [], []
    for md in markdown_pages():
        page = built_page(site, md)
        assert page.is_file(), f"{md.relative_to(ROOT)} has no built page at {page.relative_to(site)}"
        text = page.read_text()
        want, got = count_formulas(md.read_text()), text.count("<math")
        total += want
        if want != got:
            wrong.append(f"{md.relative_to(DOCS)}: {want} formulas in the source, {got} <math> in the page")
        body = _article(text)
        no_math = re.sub(r"<math\b.*?</math>", "", body, flags=re.S)
        for bad in ("\\(", "\\)", "\\[", "\\]", "$$", "arithmatex"):
            if bad in no_math:
                raw.append(f"{md.relative_to(DOCS)}: {bad!r}")
        if "$" in html.unescape(re.sub(r"<[^>]+>", "", no_math)):
            raw.append(f"{md.relative_to(DOCS)}: a '$' outside code")
    assert not wrong, "formulas not rendered as MathML:\n" + "\n".join(wrong)
    assert not raw, "TeX left in the built pages:\n" + "\n".join(raw)
    assert total > 400, f"only {total} formulas found in docs/: is the counter broken?"


def test_mathml_hook_converts_and_refuses_what_it_cannot():
    _require("latex2mathml", "mkdocs")
    hook = _load("docs_hooks_mathml", DOCS / "hooks" / "mathml.py")
    m = hook.tex_to_mathml(r"s_c = \frac{\gamma_c}{\sqrt{\sigma_c^2 + \varepsilon}}", display=True)
    assert m.startswith('<math display="block">') and "<mfrac>" in m and "<msqrt>" in m and "\\" not in m
    with pytest.raises(hook.ConversionError, match=r"\\foo"):
        hook.tex_to_mathml(r"\foo{x} + 1")
    page = '<p>a <span class="arithmatex">\\(x &lt; 1\\)</span></p><div class="arithmatex">\\[ a_b \\]</div>'
    out, n = hook.render_math(page)
    assert n == 2 and "arithmatex" not in out and "<mo>&#x0003C;</mo>" in out and '<div class="math"><math display="block">' in out
    from mkdocs.exceptions import PluginError

    with pytest.raises(PluginError, match=r"page\.md.*\\nope"):
        hook.render_math('<span class="arithmatex">\\(\\nope\\)</span>', "page.md")


# --------------------------------------------------------------------------- nothing from the network

_URL_ATTR = re.compile(r"<(script|link|img|source|iframe|object|embed)\b[^>]*?\b(?:src|href|srcset|data)=[\"']([^\"']+)", re.I)
_CSS_URL = re.compile(r"(?:url\(\s*[\"']?|@import\s+[\"'])([^\"')\s]+)", re.I)
_REMOTE = re.compile(r"^(?:https?:)?//", re.I)


def test_no_page_loads_anything_from_the_network(site: Path):
    remote = []
    for page in sorted(site.rglob("*.html")):
        text = page.read_text()
        for tag, url in _URL_ATTR.findall(text):
            if _REMOTE.match(url) and not (tag.lower() == "link" and _is_plain_link(text, url)):
                remote.append(f"{page.relative_to(site)}: <{tag}> {url}")
        for style in re.findall(r"<style\b.*?</style>", text, flags=re.S):
            remote += [f"{page.relative_to(site)}: <style> {u}" for u in _CSS_URL.findall(style) if _REMOTE.match(u)]
    for css in sorted(site.rglob("*.css")):
        remote += [f"{css.relative_to(site)}: {u}" for u in _CSS_URL.findall(css.read_text()) if _REMOTE.match(u)]
    assert not remote, "the site loads from the network:\n" + "\n".join(remote)
    index = (site / "index.html").read_text()
    assert "fonts.googleapis" not in index and "fonts.gstatic" not in index
    assert re.search(r'<script src="assets/javascripts/bundle\.[0-9a-f]+\.min\.js"', index), "Material's own script, local"


def _is_plain_link(text: str, url: str) -> bool:
    """A ``<link>`` that loads nothing (canonical page address, alternate language), by its rel."""
    m = re.search(r"<link\b[^>]*href=[\"']" + re.escape(url) + r"[\"'][^>]*>", text)
    rel = re.search(r"rel=[\"']([^\"']+)", m.group(0)) if m else None
    return bool(rel) and rel.group(1).lower() in {"canonical", "alternate", "author", "license", "next", "prev"}


def test_no_network_check_can_fail():
    text = '<link rel="stylesheet" href="https://fonts.googleapis.com/css?family=Roboto"><link rel="canonical" href="https://x/">'
    found = [u for t, u in _URL_ATTR.findall(text) if _REMOTE.match(u) and not (t == "link" and _is_plain_link(text, u))]
    assert found == ["https://fonts.googleapis.com/css?family=Roboto"]
    assert _CSS_URL.findall("@font-face{src:url(https://a/f.woff2)} @import 'https://b/c.css';") == ["https://a/f.woff2", "https://b/c.css"]


def test_site_has_search_code_copy_and_both_palettes(site: Path):
    index = (site / "index.html").read_text()
    assert (site / "search" / "search_index.json").is_file()
    assert "content.code.copy" in index
    assert 'data-md-color-scheme="default"' in index and 'data-md-color-scheme="slate"' in index


# --------------------------------------------------------------------------- API reference

# module -> its page under docs/api/ (the package's own names are documented where they are defined)
API_PAGES = {
    "repalgebra.fuse": "api/fuse",
    "repalgebra.verify": "api/verify",
    "repalgebra.backend.onnx": "api/backend_onnx",
    "repalgebra.expand": "api/expand",
    "repalgebra.ir": "api/ir",
    "repalgebra.interpret": "api/ir",
    "repalgebra.rewrite": "api/rewrite",
    "repalgebra.rules.registry": "api/rules",
    "repalgebra.testing": "api/testing",
    "fastvit_models": "api/fastvit_models",
}


# Modules shown in part on a page of another (ops, frontend.torch), and the ones with pages.
DOCUMENTED_MODULES = [*API_PAGES, "repalgebra.ops", "repalgebra.frontend.torch"]


def public_names(module_name: str) -> list[str]:
    """``__all__`` where the module has one, else its public functions and classes defined in it."""
    mod = importlib.import_module(module_name)
    if hasattr(mod, "__all__"):
        return list(mod.__all__)
    return sorted(
        n for n, v in vars(mod).items()
        if not n.startswith("_") and callable(v) and getattr(v, "__module__", None) == module_name
    )


def api_ids(site: Path) -> dict[str, str]:
    """Every documented object's id on the API pages (``repalgebra.verify.verify``) -> its page."""
    ids = {}
    for page in sorted((site / "api").rglob("index.html")):
        for i in re.findall(r'\bid="(repalgebra[\w.]*)"', page.read_text()):
            ids.setdefault(i, str(page.parent.relative_to(site)))
    return ids


def _text(page_html: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page_html)).split())


@pytest.mark.parametrize("module_name", list(API_PAGES))
def test_api_page_documents_every_public_name(site: Path, module_name: str):
    page = site / API_PAGES[module_name] / "index.html"
    assert page.is_file(), f"no API page for {module_name} (docs/{API_PAGES[module_name]}.md)"
    text = page.read_text()
    ids = set(re.findall(r'\bid="([\w.]+)"', text))
    missing = [n for n in public_names(module_name) if f"{module_name}.{n}" not in ids]
    assert not missing, f"{module_name}: not documented on {API_PAGES[module_name]} (no docstring?): {missing}"
    # A docstring that rendered, not just a heading: the module's own summary is on the page.
    summary = (importlib.import_module(module_name).__doc__ or "").strip().split("\n")[0]
    words = re.findall(r"[A-Za-z]{3,}", summary)[:6]
    shown = _text(re.search(r"<article\b.*?</article>", text, flags=re.S).group(0))
    assert words and all(w in shown for w in words), f"{module_name}: its docstring's first line {summary!r} is not on the page"
    assert ":func:" not in _text(text) and ":class:" not in _text(text), "Sphinx roles left as text"


def test_every_name_of_the_package_is_documented(site: Path):
    """``import repalgebra``'s public names (``__all__``), each on the API page of the module defining it."""
    import repalgebra

    ids = api_ids(site)
    missing = []
    for name in repalgebra.__all__:
        obj = getattr(repalgebra, name)
        where = {f"repalgebra.{name}"}
        if hasattr(obj, "__qualname__") and hasattr(obj, "__module__"):
            where.add(f"{obj.__module__}.{obj.__qualname__}")
        # ... or in a module whose page shows it (data such as OPS and RULES, re-exports such as trace)
        where |= {f"{m}.{name}" for m in DOCUMENTED_MODULES if vars(importlib.import_module(m)).get(name) is obj}
        if not where & set(ids):
            missing.append(f"{name} (looked for {sorted(where)})")
    assert not missing, "public names of repalgebra without API documentation:\n" + "\n".join(missing)


# --------------------------------------------------------------------------- screenshots

SHOT_PAGES = ["", "algebra", "train_fold_ship", "benchmarks", "rules/bn_fold", "api/fuse"]


def test_screenshots_are_not_blank(site: Path, tmp_path: Path):
    shots = _load("docs_screenshots", DOCS / "screenshots.py")
    if shots.chromium() is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium): no screenshots")
    assert set(SHOT_PAGES) <= set(shots.site_pages(site))
    lines: list[str] = []
    variances = shots.take(site, SHOT_PAGES, tmp_path, height=1600, log=lines.append)
    variances |= shots.take(site, ["train_fold_ship"], tmp_path, dark=True, height=1600, log=lines.append)
    assert len(variances) == len(SHOT_PAGES) + 1, variances
    assert all(v > shots.MIN_VARIANCE for v in variances.values()), variances
    # The check itself: a blank image has no variance.
    from PIL import Image

    Image.new("RGB", (64, 64), (255, 255, 255)).save(tmp_path / "blank.png")
    assert shots.pixel_variance(tmp_path / "blank.png") == 0


def test_every_link_of_a_page_leads_to_a_file_of_the_site(site: Path):
    """The pages link to the proofs, tests and modules by their paths in the repository (``../../proofs/x.py``);
    the site holds only ``docs/``, and 80 such links led nowhere.  ``docs/hooks/sources.py`` gives each a highlighted
    page under ``source/``.  Every relative ``href`` and ``src`` of every page must resolve to a file of the site
    (404.html, whose links are root-relative for the server that shows it at any depth, aside)."""
    broken = set()
    for page in site.rglob("*.html"):
        if page.name == "404.html" or "search" in page.relative_to(site).parts:
            continue
        for url in re.findall(r'(?:href|src)="([^"]+)"', page.read_text(errors="replace")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", url) or url.startswith(("//", "#")):
                continue
            target = (page.parent / html.unescape(url.partition("#")[0])).resolve()
            if not (target / "index.html" if target.is_dir() else target).exists():
                broken.add(f"{page.relative_to(site)} -> {url}")
    assert not broken, sorted(broken)[:20]
    assert (site / "source" / "proofs" / "kernel_pad.py.html").exists()
