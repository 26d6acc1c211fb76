"""The result store: one SQLite file (WAL) per sweep target (model + calibration + dataset).

Each measured config is one row written in its own transaction, so a sweep killed at any
moment (even ``kill -9``) leaves every finished row intact and no half row; rerunning the
same command skips the configs already stored. The ``meta`` table pins the model weights,
calibration, dataset and evaluation protocol: a store refuses rows from anything else and
names what differs, so rows of different experiments are never mixed. A database that is
neither empty nor a store is refused before anything is written to it, one writer at a time
holds a store's lease (``lease.py``), and a damaged file is a one-line ``StoreError``.

Schema (version 1)::

    meta(key PRIMARY KEY, value)           -- schema_version, identity fields, created
    runs(id, started, finished, status, args)
    profiles(config_key PRIMARY KEY, profile)   -- Profile.to_json() of the default path
    results(id, config_key UNIQUE, config, label, strategy, run_id,
            quality, quality_lo, quality_hi,  -- the main metric (top1 or miou) in [0, 1]
            delta, delta_lo, delta_hi,        -- paired difference to the default config
            metrics,                          -- JSON: every metric with its CI
            macs, macs_by_class,              -- per image (batch 1)
            latency_p50_ms, latency_p95_ms,   -- batch 1
            batch, batch_p50_ms, batch_p95_ms, images_per_s,  -- throughput batch
            energy_mj, device, versions, per_image (npy bytes), seconds, created)
    accel(config_key, design, design_key, cost, created)  -- modelled accelerator cost per design
                                                         -- (``dynavit accel``; created on first write)
    lease(id = 1, pid, host, started, heartbeat)        -- the one writer (``lease.py``; created on first use)
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from dynavit.config import ExecConfig
from dynavit.errors import DynavitError
from dynavit.sweep import lease
from dynavit.sweep.row import COLUMN_TYPES, COLUMNS, JSON_COLUMNS, Row, config_key, pack, unpack

SCHEMA_VERSION = 1
IDENTITY = ("model", "model_fingerprint", "calibration", "dataset_fingerprint", "task", "metric", "protocol")

_images_at: ContextVar[str | None] = ContextVar("images_at", default=None)


@contextlib.contextmanager
def images_at(folder: str | Path | None) -> Iterator[None]:
    """Within this block, stores name ``folder`` as their sweep's images (moved since the sweep; None: as recorded)."""
    token = _images_at.set(None if folder is None else str(Path(folder).resolve()))
    try:
        yield
    finally:
        _images_at.reset(token)


class StoreError(DynavitError):
    pass


def _explain(err: sqlite3.Error, path: Path) -> str:
    msg = str(err).lower()
    if "readonly" in msg or "read-only" in msg:
        return (f"cannot write to the result store {path}: it is read-only "
                "(check its permissions or pick another --store)")
    if "full" in msg:
        return f"cannot write to the result store {path}: the disk is full (free space, then rerun to resume)"
    if "malformed" in msg:
        return (f"the result store {path} is damaged (SQLite says: {err}); restore it from a copy, or start a "
                "new --store")
    if "not a database" in msg:
        return f"{path} is not a dynavit result store (SQLite says: {err})"
    if "unable to open" in msg:
        folder = path.parent
        if not folder.is_dir():
            return f"cannot open the result store {path}: the folder {folder} does not exist"
        if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            return (f"cannot write to the result store {path}: it is read-only "
                    "(check its permissions or pick another --store)")
        return f"cannot open the result store {path}: {err}"
    return f"result store {path}: {err}"


class ResultStore:
    """Open (or create) a store; ``bind(identity)`` before writing rows."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly and not self.path.is_file():
            raise StoreError(f"no result store at {self.path}")
        self._leased = False
        try:
            if readonly:
                self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
            else:
                self.conn = sqlite3.connect(self.path, timeout=30)
                self._refuse_foreign()
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=NORMAL")
                self._create()
            self._check_version()
        except sqlite3.Error as e:
            raise StoreError(_explain(e, self.path)) from None

    def _refuse_foreign(self) -> None:
        """Refuse, before writing anything, a database that holds tables and is not a result store."""
        tables = [t for (t,) in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        if tables and "meta" not in tables:
            self.conn.close()
            shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
            raise StoreError(f"{self.path} is an SQLite database but not a dynavit result store (its tables: "
                             f"{shown}); it was left untouched: give --store a new file")

    def _create(self) -> None:
        cols = ",\n".join(f"{c} {t}" for c, t in COLUMN_TYPES)
        with self.conn:
            self.conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.conn.execute("CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY, started REAL, "
                              "finished REAL, status TEXT, args TEXT)")
            self.conn.execute(f"CREATE TABLE IF NOT EXISTS results (id INTEGER PRIMARY KEY, {cols})")
            self.conn.execute("CREATE TABLE IF NOT EXISTS profiles (config_key TEXT PRIMARY KEY, "
                              "profile TEXT NOT NULL)")
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def _check_version(self) -> None:
        try:
            row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.OperationalError as e:
            if "no such table" not in str(e):
                raise
            raise StoreError(f"{self.path} is not a dynavit result store (no meta table)") from None
        if row is None or int(row[0]) != SCHEMA_VERSION:
            found = row[0] if row else "none"
            raise StoreError(f"{self.path} has store schema version {found}; this dynavit reads version "
                             f"{SCHEMA_VERSION} (use the dynavit version that wrote it, or start a new store)")

    def close(self) -> None:
        if self._leased:
            with contextlib.suppress(sqlite3.Error):
                lease.release(self.conn)
            self._leased = False
        self.conn.close()

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Rows of a query; a damaged file is a StoreError that names it, not an SQLite traceback."""
        try:
            return self.conn.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise StoreError(_explain(e, self.path)) from None

    def acquire(self) -> None:
        """Become the store's one writer, or refuse while another live sweep is (see ``lease``)."""
        try:
            owner = lease.acquire(self.conn)
        except sqlite3.Error as e:
            raise StoreError(_explain(e, self.path)) from None
        if owner is not None:
            raise StoreError(f"{self.path} is being written by another sweep ({owner.describe()}); wait for it "
                             "to finish (then rerun to reuse its rows) or give this one another --store")
        self._leased = True

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, sql: str, args: tuple = ()) -> int:
        try:
            with self.conn:
                if self._leased:
                    lease.heartbeat(self.conn)
                return self.conn.execute(sql, args).lastrowid or 0
        except sqlite3.Error as e:
            raise StoreError(_explain(e, self.path)) from None

    # ---- identity ------------------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, str]:
        return dict(self._read("SELECT key, value FROM meta"))

    def bind(self, identity: dict[str, Any]) -> None:
        """Pin the store to one experiment; refuse a different one, naming each mismatch."""
        identity = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in identity.items()}
        missing = [k for k in IDENTITY if k not in identity]
        if missing:
            raise ValueError(f"identity lacks {missing}")
        if "model" not in self.meta:  # a new store: pinned to this experiment
            rows = [(k, identity[k]) for k in IDENTITY] + [("created", str(time.time()))]
            try:
                with self.conn:  # OR IGNORE: of two first writers, the first pins the store
                    self.conn.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", rows)
            except sqlite3.Error as e:
                raise StoreError(_explain(e, self.path)) from None
        meta = self.meta
        diffs = [f"{k}: store has {_clip(meta.get(k))}, this sweep {_clip(identity[k])}"
                 for k in IDENTITY if meta.get(k) != identity[k]]
        if diffs:
            raise StoreError(f"{self.path} holds results of another experiment; refusing to mix rows "
                             f"({'; '.join(diffs)}). Use a new --store for this one.")

    # ---- runs ----------------------------------------------------------------------------------
    def start_run(self, args: dict[str, Any]) -> int:
        return self._write("INSERT INTO runs (started, status, args) VALUES (?, 'running', ?)",
                           (time.time(), json.dumps(args, sort_keys=True, default=str)))

    def last_target(self) -> dict[str, Any]:
        """The ``SweepTarget`` fields of the latest sweep run, to rebuild its model and data."""
        rows = self._read("SELECT args FROM runs ORDER BY id DESC LIMIT 1")
        if not rows:
            raise StoreError(f"{self.path} records no sweep run")
        target = json.loads(rows[0][0])["target"]
        moved = _images_at.get()
        return target if moved is None else {**target, "data": moved}

    def finish_run(self, run_id: int, status: str) -> None:
        self._write("UPDATE runs SET finished=?, status=? WHERE id=?", (time.time(), status, run_id))

    # ---- rows ----------------------------------------------------------------------------------
    def add(self, row: Row) -> int:
        """Write one row atomically; a config already stored is left as it is (returns its id)."""
        values = {c: getattr(row, c, None) for c in COLUMNS}
        values.update(config_key=row.key, config=row.config.to_json(), per_image=pack(row.per_image))
        for c in JSON_COLUMNS:
            values[c] = json.dumps(values[c], sort_keys=True)
        marks = ", ".join("?" for _ in COLUMNS)
        rid = self._write(f"INSERT OR IGNORE INTO results ({', '.join(COLUMNS)}) VALUES ({marks})",
                          tuple(values[c] for c in COLUMNS))
        row.id = rid or self._id(row.key)
        return row.id

    def add_profile(self, cfg: ExecConfig, profile: dict[str, Any]) -> None:
        """A full operator-class profile (``Profile.to_json()``) of one config, for the report."""
        self._write("INSERT OR REPLACE INTO profiles VALUES (?, ?)", (config_key(cfg), json.dumps(profile)))

    def profiles(self) -> dict[ExecConfig, dict[str, Any]]:
        return {ExecConfig.from_dict(json.loads(k)): json.loads(v)
                for k, v in self._read("SELECT config_key, profile FROM profiles")}

    def add_accel(self, cfg: ExecConfig, design: str, design_key: str, cost: dict[str, Any]) -> None:
        """The modelled cost of a stored config on one accelerator design (replaces an older one)."""
        if self.get(cfg) is None:
            raise StoreError(f"{self.path} has no measured row for {cfg.to_json()}; sweep it before costing it")
        self._write("CREATE TABLE IF NOT EXISTS accel (config_key TEXT NOT NULL, design TEXT NOT NULL, "
                    "design_key TEXT NOT NULL, cost TEXT NOT NULL, created REAL, PRIMARY KEY (config_key, design))")
        self._write("INSERT OR REPLACE INTO accel VALUES (?, ?, ?, ?, ?)",
                    (config_key(cfg), design, design_key, json.dumps(cost, sort_keys=True), time.time()))

    def accel(self, key: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """config key -> design -> modelled cost, for every config or one (empty when none was costed)."""
        if not self._read("SELECT name FROM sqlite_master WHERE name='accel'"):
            return {}
        sql, args = "SELECT config_key, design, design_key, cost FROM accel", ()
        if key is not None:
            sql, args = sql + " WHERE config_key=?", (key,)
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for k, design, dkey, cost in self._read(sql, args):
            out.setdefault(k, {})[design] = {**json.loads(cost), "design_key": dkey}
        return out

    def _id(self, key: str) -> int:
        return self._read("SELECT id FROM results WHERE config_key=?", (key,))[0][0]

    def keys(self) -> set[str]:
        return {k for (k,) in self._read("SELECT config_key FROM results")}

    def __len__(self) -> int:
        return self._read("SELECT COUNT(*) FROM results")[0][0]

    def get(self, cfg: ExecConfig) -> Row | None:
        found = self._read(f"SELECT id, {', '.join(COLUMNS)} FROM results WHERE config_key=?", (config_key(cfg),))
        if not found:
            return None
        row = self._row(found[0])
        row.accel = self.accel(row.key).get(row.key, {})
        return row

    def rows(self, *, per_image: bool = True) -> list[Row]:
        cols = COLUMNS if per_image else [c for c in COLUMNS if c != "per_image"]
        rows = [self._row(r, cols) for r in self._read(f"SELECT id, {', '.join(cols)} FROM results ORDER BY id")]
        accel = self.accel()
        for r in rows:
            r.accel = accel.get(r.key, {})
        return rows

    def _row(self, r: tuple, cols: list[str] | None = None) -> Row:
        try:
            return _row(r, cols)
        except (ValueError, TypeError, KeyError) as e:  # bytes changed inside a row's JSON or array
            raise StoreError(f"row {r[0]} of the result store {self.path} is damaged ({e}); restore the store "
                             "from a copy, or start a new --store") from None

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows())

    # ---- export --------------------------------------------------------------------------------
    def table(self) -> list[dict[str, Any]]:
        """Flat records (no per-image data), for CSV / Parquet / pandas."""
        out = []
        for r in self.rows(per_image=False):
            rec: dict[str, Any] = {"id": r.id, "config": r.config.to_json(), "label": r.label}
            for c in COLUMNS:
                if c in ("config", "config_key", "label", "per_image", "metrics", "macs_by_class", "versions"):
                    continue
                rec[c] = getattr(r, c)
            for cls, v in sorted(r.macs_by_class.items()):
                rec[f"macs_{cls}"] = v
            for name, m in sorted(r.metrics.items()):
                if isinstance(m, dict) and "value" in m:
                    rec[name] = m["value"]
            for design, c in sorted(r.accel.items()):
                rec[f"accel_energy_uj:{design}"] = c.get("energy_uj")
                rec[f"accel_latency_ms:{design}"] = c.get("latency_ms")
            out.append(rec)
        return out

    def export(self, path: str | Path) -> Path:
        """Write the table as .csv or .parquet (pyarrow)."""
        path = Path(path)
        records = self.table()
        names: list[str] = []
        for rec in records:
            names += [k for k in rec if k not in names]
        if path.suffix == ".csv":
            with path.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=names)
                w.writeheader()
                w.writerows(records)
        elif path.suffix == ".parquet":
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq
            except ImportError:
                raise DynavitError("Parquet export needs pyarrow (pip install pyarrow), or export to .csv") from None
            pq.write_table(pa.Table.from_pylist([{k: rec.get(k) for k in names} for rec in records]), path)
        else:
            raise DynavitError(f"cannot export to {path.name}: use a .csv or .parquet file name")
        return path


def _clip(v: str | None, n: int = 80) -> str:
    if v is None:
        return "nothing"
    return v if len(v) <= n else v[: n - 3] + "..."


def _row(r: tuple, cols: list[str] | None = None) -> Row:
    cols = cols or COLUMNS
    d = dict(zip(["id", *cols], r, strict=True))
    for c in JSON_COLUMNS:
        d[c] = json.loads(d[c]) if d.get(c) else {}
    d["per_image"] = unpack(d.get("per_image"))
    d["config"] = ExecConfig.from_json(d["config"])
    d.pop("config_key")
    return Row(**d)
