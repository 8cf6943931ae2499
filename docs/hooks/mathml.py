"""MkDocs hook: every formula of the docs becomes MathML when the site is built (and docstrings read cleanly).

``pymdownx.arithmatex`` (generic mode, ``mkdocs.yml``) keeps each ``$...$`` and
``$$...$$`` of a page away from Markdown and wraps its TeX as
``<span class="arithmatex">\\(...\\)</span>`` or
``<div class="arithmatex">\\[...\\]</div>``.  This hook replaces each of them
with the MathML that ``latex2mathml`` makes of the TeX.  Browsers render MathML
natively: no script, no font and nothing from the network, when building or
reading.

A formula the converter cannot translate fails the build (``PluginError``)
naming the page and the TeX: ``latex2mathml`` keeps a command it does not know
as text (``<mi>\\foo</mi>``), so any backslash left in the MathML is an error.
Write such formulas with commands it knows (``\\operatorname``, ``\\mathrm``,
``\\text``, ...).

The API pages' docstrings are written for Sphinx as much as for us:
:func:`tidy_docstrings` turns their cross-reference roles into code.
"""

from __future__ import annotations

import html
import re

from latex2mathml.converter import convert
from mkdocs.exceptions import PluginError

# arithmatex's generic output: an inline span with \(...\), or a display div with \[...\].
ARITHMATEX = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*(?:\\\((?P<inline>.*?)\\\)|\\\[(?P<display>.*?)\\\])\s*</(?P=tag)>',
    re.S,
)
# Text between the MathML tags (after the converter escaped what it wrote).
_TEXT = re.compile(r">([^<]*)<")


class ConversionError(ValueError):
    """A TeX formula latex2mathml cannot translate completely."""


def tex_to_mathml(tex: str, display: bool = False) -> str:
    """MathML for one TeX formula (without its ``$`` delimiters); raises :class:`ConversionError`.

    >>> tex_to_mathml("x^2")
    '<math display="inline"><mrow><msup><mi>x</mi><mn>2</mn></msup></mrow></math>'
    """
    try:
        mathml = convert(tex.strip(), display="block" if display else "inline")
    except Exception as e:  # the converter's own errors: unbalanced braces, bad environments
        raise ConversionError(f"latex2mathml failed on {tex!r}: {type(e).__name__}: {e}") from None
    # HTML5 needs no namespace on <math>, and the built pages then name no URL at all.
    mathml = mathml.replace(' xmlns="http://www.w3.org/1998/Math/MathML"', "", 1)
    left = [t for t in _TEXT.findall(mathml) if "\\" in html.unescape(t)]
    if left:
        raise ConversionError(f"latex2mathml does not know {', '.join(sorted(set(left)))} in {tex!r}")
    return mathml


def render_math(page_html: str, where: str = "") -> tuple[str, int]:
    """Replace every arithmatex formula of a page's HTML by MathML; the new HTML and how many formulas."""
    count = 0

    def one(m: re.Match) -> str:
        nonlocal count
        display = m["display"] is not None
        tex = html.unescape(m["display"] if display else m["inline"])
        try:
            mathml = tex_to_mathml(tex, display)
        except ConversionError as e:
            raise PluginError(f"{where}: {e}") from None
        count += 1
        return f'<div class="math">{mathml}</div>' if display else mathml

    return ARITHMATEX.sub(one, page_html), count


# Sphinx cross-reference roles in docstrings (``:func:`fuse```, ``:class:`~repalgebra.Graph```) come
# out of mkdocstrings as ":func:<code>fuse</code>"; and a paragraph that ends in "::" (reST's
# "a code block follows") keeps both colons.
_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj|const):<code>(~?)([^<]*)</code>")
_LITERAL_MARK = re.compile(r"(?<=[^:\s]):(?=:</p>)")


def tidy_docstrings(page_html: str) -> str:
    """Sphinx roles become plain code (``~a.b.C`` shows ``C``); a paragraph's closing ``::`` becomes ``:``."""
    html_out = _ROLE.sub(lambda m: f"<code>{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}</code>", page_html)
    return _LITERAL_MARK.sub("", html_out)


def on_page_content(html_text: str, page, config, files) -> str:  # noqa: ARG001  (MkDocs' hook signature)
    """MkDocs calls this with each page's HTML body: formulas in, MathML out (and docstrings tidied)."""
    out, _ = render_math(html_text, page.file.src_uri)
    return tidy_docstrings(out)
