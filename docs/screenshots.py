"""Build the docs site and screenshot every page with headless Chromium, to look at it as a reader does.

::

    python docs/screenshots.py                      # every page, light, into site-screenshots/
    python docs/screenshots.py --dark               # ... and each page in the dark palette too
    python docs/screenshots.py --pages index algebra rules/bn_fold --out /tmp/shots
    python docs/screenshots.py --site site/         # screenshot an already built site

Each page is one PNG named after its path (``rules/bn_fold/index.html`` ->
``rules__bn_fold.png``; ``-dark`` added in the dark palette), of the top
``--height`` pixels of the page at ``--width`` (``--height 9000`` for the whole
of a long page; crop the PNG to look at a part).  Chromium runs with the network switched off
(``--disable-background-networking`` and friends; the pages load only files of
the built site), and each screenshot is checked not to be blank: its pixel
variance must be above :data:`MIN_VARIANCE` (a white or single-colour image has
none).  ``tests/test_docs_site.py`` runs this on a few representative pages
where Chromium is installed (``apt-get install -y chromium``).

The dark palette is Material's ``slate`` scheme, chosen by the page from the
browser's ``prefers-color-scheme`` (``mkdocs.yml``: palette with ``media``), which
``--force-dark-mode`` sets.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIN_VARIANCE = 50.0  # of the grey levels 0..255: a page with text and rules has thousands
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium() -> str | None:
    """The Chromium executable on the PATH, or None."""
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def build_site(site: Path) -> None:
    """``mkdocs build --strict`` into ``site``; raises ``RuntimeError`` with MkDocs' output if it fails."""
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    if r.returncode != 0:
        raise RuntimeError(f"mkdocs build --strict failed:\n{r.stdout}\n{r.stderr}")


def site_pages(site: Path) -> list[str]:
    """Every page of a built site as its path without ``index.html`` (``""`` is the home page), in order."""
    pages = []
    for html in sorted(site.rglob("index.html")):
        rel = html.parent.relative_to(site)
        if rel.parts and rel.parts[0] in ("assets", "search"):
            continue
        pages.append("" if str(rel) == "." else rel.as_posix())
    return pages


def shot_name(page: str, dark: bool = False) -> str:
    """File name of a page's screenshot: ``rules/bn_fold`` -> ``rules__bn_fold.png``, the home page ``index.png``."""
    stem = page.strip("/").replace("/", "__") or "index"
    return f"{stem}{'-dark' if dark else ''}.png"


def screenshot(site: Path, page: str, png: Path, *, width: int = 1400, height: int = 2400, dark: bool = False,
               browser: str | None = None, timeout: float = 120) -> None:
    """Screenshot one page of a built site (``page`` as from :func:`site_pages`) to ``png``."""
    browser = browser or chromium()
    if browser is None:
        raise FileNotFoundError("Chromium not found (apt-get install -y chromium)")
    url = (site / page / "index.html").resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--no-first-run", "--no-default-browser-check",
            f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={png}",
            *(["--force-dark-mode", "--blink-settings=preferredColorScheme=0"] if dark else []),
            url,
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0 or not png.is_file():
        raise RuntimeError(f"chromium could not screenshot {url}:\n{r.stderr[-2000:]}")


def pixel_variance(png: Path) -> float:
    """Variance of the grey levels (0..255) of an image: 0 for a blank one."""
    from PIL import Image, ImageStat

    with Image.open(png) as im:
        return ImageStat.Stat(im.convert("L")).var[0]


def take(site: Path, pages: list[str], out: Path, *, dark: bool = False, width: int = 1400, height: int = 2400,
         log=print) -> dict[str, float]:
    """Screenshot ``pages`` (light, and dark too with ``dark``) into ``out``; each PNG's name -> pixel variance.

    Raises ``RuntimeError`` naming the blank screenshots, after taking all of them.
    """
    out.mkdir(parents=True, exist_ok=True)
    browser = chromium()
    variances: dict[str, float] = {}
    for page in pages:
        for d in (False, True) if dark else (False,):
            png = out / shot_name(page, d)
            start = time.perf_counter()
            screenshot(site, page, png, width=width, height=height, dark=d, browser=browser)
            variances[png.name] = v = pixel_variance(png)
            log(f"{png.name:<44} variance {v:8.0f}  {time.perf_counter() - start:4.1f}s")
    blank = [name for name, v in variances.items() if v <= MIN_VARIANCE]
    if blank:
        raise RuntimeError(f"blank screenshots (pixel variance <= {MIN_VARIANCE}): {blank}")
    return variances


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "site-screenshots", help="folder for the PNGs")
    ap.add_argument("--site", type=Path, help="an already built site (default: build one in a temporary folder)")
    ap.add_argument("--pages", nargs="*", help="pages by path, e.g. index algebra rules/bn_fold api/repalgebra (default: all)")
    ap.add_argument("--dark", action="store_true", help="also screenshot each page in the dark palette")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=2400)
    args = ap.parse_args(argv)
    if chromium() is None:
        print("Chromium not found (apt-get install -y chromium): no screenshots", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        site = args.site or Path(tmp) / "site"
        if args.site is None:
            build_site(site)
        pages = site_pages(site)
        if args.pages:
            chosen = ["" if p in ("index", "") else p.strip("/") for p in args.pages]
            unknown = [p for p in chosen if p not in pages]
            if unknown:
                print(f"no such pages: {unknown}; the site has {pages}", file=sys.stderr)
                return 1
            pages = chosen
        try:
            take(site, pages, args.out, dark=args.dark, width=args.width, height=args.height)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
    print(f"{len(pages)} page(s) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
