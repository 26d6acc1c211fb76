"""Where a benchmark's output goes: ``benchmarks/results/`` (raw JSON and its generated tables).

``write_json(name, payload)`` stores the raw numbers with the machine, the date and the command
line, so that every figure quoted in docs/results.md traces to a file and a way to rerun it.
``write_section(tag, heading, body)`` stores the benchmark's full Markdown tables beside it;
docs/results.md keeps only the current headline numbers and links to these files, so a rerun
never rewrites the hand-written document.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from dynavit.sweep.engine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = RESULTS  # where generated sections land; callers print it after writing


def machine() -> dict[str, Any]:
    """What a number depends on besides the code: CPU model, cores, threads, torch, GPU, and the load.

    ``load_1min`` (the 1-minute load average at the end of the run) says whether other work shared
    the cores: timings taken at a load above the core count are indicative only.
    """
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "gpu": gpu, "load_1min": round(os.getloadavg()[0], 2)}


def command() -> str:
    """The command line that produced this run, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(ROOT):
        script = script.relative_to(ROOT)
    return shlex.join([".venv/bin/python", str(script), *sys.argv[1:]])


def write_json(name: str, payload: dict[str, Any], folder: Path = RESULTS) -> Path:
    """Write ``payload`` to ``folder/<name>.json`` with ``machine``, ``date`` and ``command`` added.

    Keys the payload already has win, so a script that records its own machine label keeps it.
    """
    record = {"machine": machine(), "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
              "command": command()}
    record.update(payload)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return path


def write_section(tag: str, heading: str, body: str, doc: Path | None = None) -> Path:
    """Write a benchmark's generated Markdown to ``benchmarks/results/<tag>.md``.

    With ``doc``, replace the ``tag`` section between HTML-comment markers of that file instead
    (or append it under ``heading``), leaving the rest of the file untouched.
    """
    if doc is None:
        path = RESULTS / f"{tag}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {heading}\n\n{body.rstrip()}\n")
        return path
    text = doc.read_text() if doc.exists() else ""
    block = f"<!-- {tag}:start -->\n{body}\n<!-- {tag}:end -->"
    pat = re.compile(rf"<!-- {re.escape(tag)}:start -->.*?<!-- {re.escape(tag)}:end -->", re.S)
    found = pat.search(text)
    text = pat.sub(lambda _m: block, text) if found else text.rstrip() + f"\n\n## {heading}\n\n{block}\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return doc
