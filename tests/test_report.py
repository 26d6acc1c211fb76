"""``dynavit.report``: the HTML report of a result store, on small synthetic stores.

The stores are built row by row with known qualities and MACs, so the expected Pareto front
and resilience curves follow from a plain dominance rule, independent of ``sweep.pareto``.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynavit.config import ExecConfig
from dynavit.cost.profile import ClassCost, Profile
from dynavit.errors import DynavitError
from dynavit.report import knob_of, write_report
from dynavit.sweep import stats
from dynavit.sweep.store import ResultStore, Row

N_IMAGES = 400
DEFAULT_MACS = 4.6e9
IDENTITY = {
    "model": "synthetic/deit-tiny", "model_fingerprint": "abc123", "calibration": "none",
    "dataset_fingerprint": "d41d8cd9 (400 images)", "task": "classification", "metric": "top1",
    "protocol": {"batch_size": 32, "n_boot": 200, "seed": 0, "device": "cpu", "input_size": [224, 224]},
}
# label -> (config, top-1 target, GMACs): three knobs alone (six levels), one combination
SPECS: dict[str, tuple[ExecConfig, float, float]] = {
    "default": (ExecConfig(), 0.80, 4.6),
    "resolution=192": (ExecConfig(resolution=192), 0.78, 3.4),
    "resolution=160": (ExecConfig(resolution=160), 0.70, 2.4),
    "mlp_width=0.85": (ExecConfig(mlp_width=0.85), 0.795, 3.9),
    "resolution=176": (ExecConfig(resolution=176), 0.70, 3.0),  # clearly dominated by the combination
    "mlp_width=0.7": (ExecConfig(mlp_width=0.7), 0.775, 3.5),  # dominated by resolution=192, not significantly
    "tokens(method=merge, keep=0.93, layers=all)": (
        ExecConfig(token_method="merge", token_keep=0.93, token_layers=tuple(range(12))), 0.7975, 4.1),
    "resolution=192; mlp_width=0.85": (ExecConfig(resolution=192, mlp_width=0.85), 0.77, 2.9),
}
N_IMG_TAGS = 5  # quality vs MACs, latency, energy; resilience; profile


def _hits(top1: float, base: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) uint8 top-1/top-5 hits with exactly ``top1`` accuracy, derived from ``base`` (paired)."""
    want = round(top1 * N_IMAGES)
    hits = np.zeros(N_IMAGES, dtype=np.uint8) if base is None else base[:, 0].copy()
    ones, zeros = np.flatnonzero(hits), np.flatnonzero(hits == 0)
    if want > len(ones):
        hits[rng.choice(zeros, want - len(ones), replace=False)] = 1
    else:
        hits[rng.choice(ones, len(ones) - want, replace=False)] = 0
    return np.stack([hits, np.maximum(hits, rng.random(N_IMAGES) < 0.9)], axis=1).astype(np.uint8)


def _row(label: str, cfg: ExecConfig, per_image: np.ndarray, gmacs: float, base: np.ndarray,
         *, latency: bool = True, energy: bool = False, task: str = "classification") -> Row:
    reps = stats.replicates(per_image, task, 200)
    q, (lo, hi) = stats.point(per_image, task), np.percentile(reps, [2.5, 97.5])
    d = stats.paired_delta(per_image, base, task, 200)
    ms = 10.0 * gmacs / 4.6
    return Row(
        config=cfg, quality=q, quality_lo=float(lo), quality_hi=float(hi),
        metrics={stats.main_metric(task): {"value": q, "ci_low": float(lo), "ci_high": float(hi)}},
        macs=gmacs * 1e9, macs_by_class={"linear": gmacs * 0.9e9, "attention": gmacs * 0.1e9},
        latency_p50_ms=ms if latency else None, latency_p95_ms=ms * 1.1 if latency else None,
        batch=32, batch_p50_ms=ms * 20, batch_p95_ms=ms * 21, images_per_s=32e3 / (ms * 20),
        per_image=per_image, device="cpu:test", versions={"torch": "2.5.0", "dynavit": "0.1.0"},
        energy_mj=ms * 30 if energy else None, label=label, strategy="grid",
        delta=d[0], delta_lo=d[1], delta_hi=d[2],
    )


def _profile() -> dict:
    classes = {c: ClassCost(macs=m, flops=2 * m, share=s, flop_share=fs, time_ms=t, time_share=ts, ops=4)
               for c, m, s, fs, t, ts in [("linear", 4_200_000_000, 0.91, 0.88, 6.0, 0.55),
                                          ("attention", 400_000_000, 0.09, 0.08, 2.5, 0.25),
                                          ("norm", 0, 0.0, 0.02, 1.2, 0.11), ("softmax", 0, 0.0, 0.02, 1.0, 0.09)]}
    return Profile(model="synthetic/deit-tiny", device="cpu", dtype="fp32", input_shape=(1, 3, 224, 224),
                   total_macs=4_600_000_000, total_flops=9_300_000_000, classes=classes, modules=[],
                   params=5_700_000, param_bytes=22_800_000, activation_peak_bytes=10_000_000,
                   activation_written_bytes=50_000_000, latency_ms=10.0, latency_p95_ms=11.0, instrumented_ms=10.7,
                   repeats=5).to_json()


def make_store(path: Path, labels: list[str], *, latency: bool = True, energy: bool = False,
               profile: bool = True) -> Path:
    rng = np.random.default_rng(0)
    base = _hits(SPECS["default"][1], None, rng)
    with ResultStore(path) as store:
        store.bind(IDENTITY)
        if profile:
            store.add_profile(ExecConfig(), _profile())
        for label in labels:
            cfg, top1, gmacs = SPECS[label]
            per_image = base if label == "default" else _hits(top1, base, rng)
            store.add(_row(label, cfg, per_image, gmacs, base, latency=latency, energy=energy))
    return path


def expected_front(labels: list[str]) -> list[str]:
    """Labels no other config dominates (MACs <=, quality >=, one strict), cheapest first."""
    pts = {lb: (SPECS[lb][2], round(SPECS[lb][1] * N_IMAGES)) for lb in labels}
    front = [a for a, (ca, qa) in pts.items()
             if not any((cb <= ca and qb >= qa and (cb, qb) != (ca, qa)) for b, (cb, qb) in pts.items() if b != a)]
    return sorted(front, key=lambda lb: pts[lb][0])


def _table_labels(page: str, table_id: str) -> list[str]:
    m = re.search(rf'<table id="{table_id}">(.*?)</table>', page, re.S)
    assert m, f"no table {table_id}"
    return [lb.replace("&amp;", "&") for lb in re.findall(r'<tr[^>]*data-label="([^"]*)"', m.group(1))]


def _flags(page: str) -> dict[str, str]:
    """label -> the all-rows table's "MAC front" cell (front / plausible / empty)."""
    table = re.search(r'<table id="all-rows">(.*?)</table>', page, re.S).group(1)
    header = re.findall(r"<th>(.*?)</th>", table)
    col = header.index("MAC front")
    return {lb.replace("&amp;", "&"): re.findall(r"<td[^>]*>(.*?)</td>", cells)[col]
            for lb, cells in re.findall(r'<tr[^>]*data-label="([^"]*)">(.*?)</tr>', table)}


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    store = make_store(tmp / "results.db", list(SPECS), energy=True)
    return write_report(store, tmp / "out")


def test_full_report(full_report: Path) -> None:
    page = full_report.read_text()
    assert full_report.name == "index.html"
    assert page.count("<img") == N_IMG_TAGS
    assert page.count('src="data:image/png;base64,') == N_IMG_TAGS
    for name in ("quality_macs.png", "quality_latency_p50_ms.png", "quality_energy_mj.png", "resilience.png",
                 "profile.png"):
        f = full_report.parent / name
        assert f.is_file() and f.stat().st_size > 1000, name
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    front = expected_front(list(SPECS))
    assert _table_labels(page, "front") == front
    assert sorted(_table_labels(page, "all-rows")) == sorted(SPECS)
    assert _flags(page) == {"mlp_width=0.7": "plausible", "resolution=176": ""} | {lb: "front" for lb in front}
    for text in ("synthetic/deit-tiny", "d41d8cd9 (400 images)", "classification / top1", "cpu:test", "torch 2.5.0"):
        assert text in page
    assert "http://" not in page and "https://" not in page  # self-contained: nothing to fetch


def test_front_row_values(full_report: Path) -> None:
    page = full_report.read_text()
    row = re.search(r'<tr[^>]*data-label="resolution=192">(.*?)</tr>', page).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    # #, label, quality, delta, GMACs, MACs saved %, latency p50, p95, images/s
    assert cells[1] == "resolution=192"
    assert cells[2].startswith("78.00 [")
    assert cells[3].startswith("-2.00 [")
    assert cells[4] == "3.400"
    assert cells[5] == f"{100 * (1 - 3.4 / 4.6):.1f}"


def test_knob_of() -> None:
    assert knob_of(_fake_row("resolution=192", ExecConfig(resolution=192))) == ("resolution", "192")
    assert knob_of(_fake_row("tokens(method=merge, keep=0.9)", ExecConfig(token_method="merge", token_keep=0.9))) \
        == ("tokens", "method=merge, keep=0.9")
    assert knob_of(_fake_row("resolution=192; mlp_width=0.85", ExecConfig(resolution=192, mlp_width=0.85))) is None
    assert knob_of(_fake_row("default", ExecConfig())) is None
    assert knob_of(_fake_row("", ExecConfig(mlp_width=0.7))) == ("mlp_width", "0.7")  # unlabelled: by config


def _fake_row(label: str, cfg: ExecConfig) -> Row:
    return Row(config=cfg, quality=0.5, quality_lo=0.4, quality_hi=0.6, metrics={}, macs=1.0, macs_by_class={},
               latency_p50_ms=None, latency_p95_ms=None, batch=1, batch_p50_ms=None, batch_p95_ms=None,
               images_per_s=None, per_image=np.zeros((2, 2), np.uint8), device="cpu", versions={}, label=label)


def test_empty_store_is_a_user_error(tmp_path: Path) -> None:
    with ResultStore(tmp_path / "r.db") as store:
        store.bind(IDENTITY)
    with pytest.raises(DynavitError, match="store has no results yet"):
        write_report(tmp_path / "r.db", tmp_path / "out")
    with pytest.raises(DynavitError, match="no result store"):
        write_report(tmp_path / "missing.db", tmp_path / "out")
    make_store(tmp_path / "ok.db", ["default"])
    with pytest.raises(DynavitError, match="cannot write the report"):
        write_report(tmp_path / "ok.db", tmp_path / "ok.db")  # a file, not a folder


def test_default_only_without_latency_or_profile(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "resilience.png").write_bytes(b"stale chart of an earlier report")
    index = write_report(make_store(tmp_path / "r.db", ["default"], latency=False, profile=False), tmp_path / "out")
    page = index.read_text()
    assert page.count("<img") == 1  # quality vs MACs only
    assert "without latency measurement" in page and "latency (batch 1, p50) plot skipped" in page
    assert "resilience curves skipped" in page
    assert "No operator-class profile" in page
    assert _table_labels(page, "front") == ["default"]
    assert sorted(p.name for p in index.parent.glob("*.png")) == ["quality_macs.png"]


def test_unreadable_profile_is_a_note(tmp_path: Path) -> None:
    make_store(tmp_path / "r.db", ["default"], profile=False)
    with ResultStore(tmp_path / "r.db") as store:
        store.add_profile(ExecConfig(), {"model": "written by another dynavit"})
    page = write_report(tmp_path / "r.db", tmp_path / "out").read_text()
    assert "stored profile is not readable" in page
    assert page.count("<img") == 2  # MACs, latency


def test_no_default_row(tmp_path: Path) -> None:
    labels = ["resolution=192", "mlp_width=0.85", "resolution=160"]
    page = write_report(make_store(tmp_path / "r.db", labels), tmp_path / "out").read_text()
    assert "default config is not in the store" in page
    assert page.count("<img") == 3  # MACs, latency, profile
    assert _table_labels(page, "front") == expected_front(labels)


def test_segmentation_store(tmp_path: Path) -> None:
    """mIoU rows: (n, 3, C) per-image pixel counts drive the plausible sets and the paired deltas."""
    rng = np.random.default_rng(1)
    gt = rng.integers(50, 200, size=(60, 1, 4))

    def counts(frac: float) -> np.ndarray:
        inter = (gt * frac * rng.uniform(0.9, 1.0, gt.shape)).astype(np.int64)
        return np.concatenate([inter, gt, gt], axis=1)

    base = counts(0.8)
    specs = {"default": (base, 4.6), "resolution=192": (counts(0.7), 3.4), "mlp_width=0.85": (counts(0.6), 3.9)}
    with ResultStore(tmp_path / "r.db") as store:
        store.bind(IDENTITY | {"task": "segmentation", "metric": "miou"})
        for label, (per_image, gmacs) in specs.items():
            store.add(_row(label, SPECS[label][0], per_image, gmacs, base, task="segmentation"))
    page = write_report(tmp_path / "r.db", tmp_path / "out").read_text()
    assert "segmentation / miou" in page and "miou % [95% CI]" in page
    assert page.count("<img") == 3  # MACs, latency, resilience (no profile stored)
    assert _table_labels(page, "front") == ["resolution=192", "default"]


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        msg = "headless Chromium not found (install Debian's chromium)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def test_renders_in_headless_chromium(full_report: Path, tmp_path: Path) -> None:
    exe = _chromium()
    url = full_report.resolve().as_uri()
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path}/p",
             "--virtual-time-budget=3000"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=20, check=True).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert f'data-images-ok="{N_IMG_TAGS}"' in body and f'data-images-total="{N_IMG_TAGS}"' in body, body

    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2400", url], capture_output=True,
                   timeout=20, check=True)
    img = Image.open(io.BytesIO(shot.read_bytes()))
    assert img.format == "PNG" and img.size == (1280, 2400)
    colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, plots and tables, not a blank page
