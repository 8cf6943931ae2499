"""The rule pages in ``docs/rules/`` stay complete and in step with the code.

* every registered rule (``repalgebra.RULES``) and both composites have a page, and the index lists them;
* every generated block in a page (IR listings before/after, numbers, refusals, rule chains)
  equals what ``docs/rules/examples.py`` generates now, so the docs cannot go stale;
* every page has a LaTeX display block, links its proof ``../../proofs/<name>.py`` and its
  property test ``../../tests/rules/test_<name>.py`` (only the link text is checked here),
  and shows its before/after pictures, which exist.

Regenerate the pages with ``python docs/rules/examples.py --write``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from repalgebra import RULES

from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
RULES_DIR = ROOT / "docs" / "rules"


def _load_examples():
    return load_script("docs_rules_examples", RULES_DIR / "examples.py")


examples = _load_examples()
PAGES = examples.PAGES
FIX = "run `python docs/rules/examples.py --write` and commit the pages"


def page_text(name: str) -> str:
    return (RULES_DIR / f"{name}.md").read_text()


@pytest.fixture(scope="module")
def generated() -> dict[tuple[str, str], str]:
    return examples.blocks()


def test_every_rule_has_a_page():
    missing = sorted(set(RULES) - set(PAGES))
    assert not missing, f"rules without a page in docs/rules/ (add them to examples.PAGES): {missing}"
    for name in PAGES:
        assert (RULES_DIR / f"{name}.md").is_file(), f"docs/rules/{name}.md is missing"
        assert name in examples.EXAMPLES, f"examples.py has no example function for {name}"


def test_index_lists_every_page():
    index = (RULES_DIR / "index.md").read_text()
    for name in PAGES:
        assert f"]({name}.md)" in index, f"docs/rules/index.md does not link {name}.md"
        assert re.search(rf"^\| `{name}` \|", index, re.M), f"docs/rules/index.md has no table row for {name}"


@pytest.mark.parametrize("name", PAGES)
def test_page_blocks_match_the_script(name, generated):
    have = examples.page_blocks(page_text(name))
    want = {key: text for key, text in generated.items() if key[0] == name}
    assert set(have) == set(want), f"{name}.md: markers {sorted(k for _, k in have)} but the script generates {sorted(k for _, k in want)}; {FIX}"
    for key, text in want.items():
        assert have[key] == text, f"{name}.md: block {key[1]!r} is out of date; {FIX}"


@pytest.mark.parametrize("name", PAGES)
def test_page_has_a_listing_before_and_after(name):
    have = examples.page_blocks(page_text(name))
    for kind in ("before", "after", "numbers"):
        assert (name, kind) in have, f"{name}.md has no <!-- listing:{name}:{kind} --> block"


@pytest.mark.parametrize("name", PAGES)
def test_page_has_latex(name):
    blocks = re.findall(r"^\$\$\n(.+?)\n\$\$$", page_text(name), re.S | re.M)
    assert blocks and all(b.strip() for b in blocks), f"{name}.md has no LaTeX display block ($$ ... $$)"


@pytest.mark.parametrize("name", PAGES)
def test_page_links_proof_and_test(name):
    text = page_text(name)
    assert f"](../../proofs/{name}.py)" in text, f"{name}.md does not link ../../proofs/{name}.py"
    assert f"](../../tests/rules/test_{name}.py)" in text, f"{name}.md does not link ../../tests/rules/test_{name}.py"


@pytest.mark.parametrize("name", PAGES)
def test_page_shows_its_pictures(name):
    text = page_text(name)
    for when in ("before", "after"):
        rel = f"img/{name}_{when}.svg"
        assert f"]({rel})" in text, f"{name}.md does not show {rel}"
        assert (RULES_DIR / rel).is_file(), f"docs/rules/{rel} is missing; {FIX} (needs Graphviz `dot`)"


def test_relative_links_resolve_inside_docs():
    """Links to other pages and to files in the repository, except proofs/tests checked by name above."""
    for name in PAGES + ["index"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page_text(name)):
            if "://" in target or re.fullmatch(r"\.\./\.\./(proofs/\w+\.py|tests/rules/test_\w+\.py)", target):
                continue
            assert (RULES_DIR / target).exists(), f"{name}.md links {target}, which does not exist"
