"""Write one generated section of docs/benchmarks.md between HTML-comment markers.

Each benchmark owns a tag; rerunning it replaces its section and leaves the rest (and the
hand-written findings) untouched.
"""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(tag: str, heading: str, body: str, doc: Path = DOC) -> Path:
    """Replace the ``tag`` section of ``doc`` with ``body``, or append it under ``heading``."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"<!-- {tag}:start -->\n{body}\n<!-- {tag}:end -->"
    pat = re.compile(rf"<!-- {re.escape(tag)}:start -->.*?<!-- {re.escape(tag)}:end -->", re.S)
    found = pat.search(text)
    text = pat.sub(lambda _m: block, text) if found else text.rstrip() + f"\n\n## {heading}\n\n{block}\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return doc
