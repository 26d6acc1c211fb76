"""A result store's row: one measured config, its columns, and the canonical key of a config."""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dynavit.config import ExecConfig

COLUMN_TYPES = [  # name, SQLite type
    ("config_key", "TEXT NOT NULL UNIQUE"), ("config", "TEXT NOT NULL"), ("label", "TEXT"),
    ("strategy", "TEXT"), ("run_id", "INTEGER"),
    ("quality", "REAL"), ("quality_lo", "REAL"), ("quality_hi", "REAL"),
    ("delta", "REAL"), ("delta_lo", "REAL"), ("delta_hi", "REAL"),
    ("metrics", "TEXT"), ("macs", "REAL"), ("macs_by_class", "TEXT"),
    ("latency_p50_ms", "REAL"), ("latency_p95_ms", "REAL"),
    ("batch", "INTEGER"), ("batch_p50_ms", "REAL"), ("batch_p95_ms", "REAL"), ("images_per_s", "REAL"),
    ("energy_mj", "REAL"), ("device", "TEXT"), ("versions", "TEXT"), ("per_image", "BLOB"),
    ("seconds", "REAL"), ("created", "REAL"),
]
COLUMNS = [c for c, _ in COLUMN_TYPES]
JSON_COLUMNS = ("metrics", "macs_by_class", "versions")
def config_key(cfg: ExecConfig) -> str:
    """Canonical text of a config: equal configs, equal keys."""
    return json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))


def pack(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def unpack(b: bytes | None) -> np.ndarray | None:
    return None if b is None else np.load(io.BytesIO(b), allow_pickle=False)


@dataclass
class Row:
    """One measured config. ``per_image``: classification (n, 2) top-1/top-5 hits; segmentation
    (n, 3, C) intersection / ground-truth / predicted pixel counts per class."""

    config: ExecConfig
    quality: float
    quality_lo: float
    quality_hi: float
    metrics: dict[str, Any]
    macs: float
    macs_by_class: dict[str, float]
    latency_p50_ms: float
    latency_p95_ms: float
    batch: int
    batch_p50_ms: float | None
    batch_p95_ms: float | None
    images_per_s: float | None
    per_image: np.ndarray
    device: str
    versions: dict[str, str]
    energy_mj: float | None = None
    label: str = ""
    strategy: str = ""
    seconds: float = 0.0
    delta: float | None = None
    delta_lo: float | None = None
    delta_hi: float | None = None
    id: int | None = None
    run_id: int | None = None
    created: float = field(default_factory=time.time)
    accel: dict[str, dict[str, Any]] = field(default_factory=dict)  # design -> modelled energy_uj, latency_ms...

    @property
    def key(self) -> str:
        return config_key(self.config)
