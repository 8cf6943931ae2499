"""A chart that carries its own numbers: saved with the plotted data as JSON in the SVG's description.

The docs' picture scripts (``*_pictures.py``) save through :func:`save`, and the
tests read the numbers back with :func:`svg_numbers` to check that a committed
picture plots what its page's table prints now.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path


def save(fig, path: Path, data, dpi: int) -> None:
    """Save the matplotlib figure ``fig`` to ``path`` (.svg with ``data`` in its description, or .png) and close it."""
    import matplotlib.pyplot as plt

    # no date: a redrawn picture of the same numbers is the same file
    metadata = {"Date": None, "Description": json.dumps(data)} if path.suffix == ".svg" else {}
    fig.savefig(path, metadata=metadata, dpi=dpi)
    plt.close(fig)


def svg_numbers(svg: str):
    """The data :func:`save` stored in the description of ``svg`` (the file's text)."""
    m = re.search(r"<dc:description>(.*?)</dc:description>", svg, flags=re.S)
    if m is None:
        raise ValueError("the SVG has no description with the plotted numbers")
    return json.loads(html.unescape(m.group(1)))
