"""The Ray sweep backend on a local Ray cluster: same quality and MAC columns as the local backend.

The test starts its own single-machine cluster with ``ray.init`` (no ``RAY_ADDRESS``), so Ray's
token authentication, on by default for local clusters since Ray 2.59, needs no setting here: the
driver and its workers share the token Ray generates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import dynavit
from dynavit.sweep import ResultStore
from dynavit.sweep.run import SweepTarget, run_sweep

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_cluster():
    """Two CPUs; workers import this checkout's ``dynavit`` and never touch the network."""
    mp = pytest.MonkeyPatch()
    mp.delenv("RAY_ADDRESS", raising=False)
    src = str(Path(dynavit.__file__).resolve().parents[1])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": src, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()
    mp.undo()


@pytest.fixture(scope="module")
def target(assets) -> SweepTarget:
    return SweepTarget(model=str(assets / "models" / "deit-tiny-patch16-224"),
                       data=str(assets / "imagenet-samples"), limit=8, batch_size=4, n_boot=50,
                       latency_repeats=1)


def _rows(store: Path) -> dict:
    with ResultStore(store, readonly=True) as rs:
        return {r.key: r for r in rs.rows()}


def test_ray_sweep_matches_the_local_backend(local_cluster, target, tmp_path) -> None:
    ray_sum = run_sweep(target, space="small", strategy="random", budget=4, store=tmp_path / "ray.db",
                        backend="ray", workers=2, progress=False)
    assert ray.is_initialized()  # a cluster the caller started is left running
    local_sum = run_sweep(target, space="small", strategy="random", budget=4, store=tmp_path / "local.db",
                          progress=False)
    assert ray_sum.measured == local_sum.measured == 4
    remote, local = _rows(tmp_path / "ray.db"), _rows(tmp_path / "local.db")
    assert remote.keys() == local.keys() and len(remote) == 4
    for key, r in remote.items():
        lo = local[key]
        assert np.array_equal(r.per_image, lo.per_image)  # the same predictions, image by image
        assert r.macs == lo.macs and r.macs_by_class == lo.macs_by_class
        assert r.quality == lo.quality and (r.quality_lo, r.quality_hi) == (lo.quality_lo, lo.quality_hi)
        assert r.latency_p50_ms > 0  # measured on the actor
        # timed as the local backend times them: round-robin within a group, its spread recorded
        assert set(r.metrics["latency"]) == set(lo.metrics["latency"]) >= {"runs", "spread"}

