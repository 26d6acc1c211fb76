"""Shared fixtures: offline hub, fixed seeds, and the real assets (fail in CI if missing)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """Parallel workers share the cores: each takes its share of threads, as do its subprocesses."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _assets_path() -> Path:
    env = os.environ.get("DYNAVIT_ASSETS")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "assets"


@pytest.fixture(scope="session")
def assets() -> Path:
    """The real models and data; a missing folder fails under CI and skips elsewhere."""
    p = _assets_path()
    if not (p / "models" / "deit-tiny-patch16-224" / "config.json").is_file():
        msg = f"real assets not found at {p} (set DYNAVIT_ASSETS)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return p


@pytest.fixture(scope="session")
def deit_tiny_path(assets: Path) -> Path:
    return assets / "models" / "deit-tiny-patch16-224"


@pytest.fixture(scope="session")
def deit_tiny(deit_tiny_path: Path):
    import dynavit

    return dynavit.load(deit_tiny_path)



@pytest.fixture
def segformer_camvid(tmp_path: Path) -> Path:
    """A randomly initialised SegFormer-B0 for CamVid's 11 classes at 128x160, saved as a model folder."""
    import json

    from dynavit import from_config
    from dynavit.models.configs import segformer_config

    folder = tmp_path / "segformer-b0-camvid"
    from_config(segformer_config("b0", num_labels=11), seed=0).reference.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"height": 128, "width": 160}, "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "do_resize": True, "do_normalize": True}))
    return folder
