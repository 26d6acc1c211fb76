"""The demo's closing line names what it wrote, not everything that lives in its output folder."""

from __future__ import annotations

import os
import time

from dynavit.demo import _written_since


def test_written_since_lists_new_files_and_folders_with_new_files(tmp_path) -> None:
    old_file, old_dir, touched_dir = tmp_path / "bench.db", tmp_path / "bench-sweep", tmp_path / "report"
    old_file.write_text("x")
    (old_dir / "a").parent.mkdir()
    (old_dir / "a").write_text("x")
    (touched_dir / "sub").mkdir(parents=True)
    (touched_dir / "sub" / "index.html").write_text("old")
    past = time.time() - 3600
    for p in (old_file, old_dir / "a", old_dir, touched_dir / "sub" / "index.html", touched_dir / "sub", touched_dir):
        os.utime(p, (past, past))
    t0 = time.time() - 1
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "sweep.db-wal").write_text("")  # SQLite's side files are not outputs
    (touched_dir / "sub" / "index.html").write_text("new")  # rewritten in place: the folder's own mtime may not move
    os.utime(touched_dir, (past, past))
    assert _written_since(tmp_path, t0) == ["report", "summary.json"]
