"""The HTTP server: answers, micro-batching, auth, limits, bad input, fuzzing, graceful shutdown."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib

import numpy as np
import pytest
from helpers import require
from PIL import Image

from dynavit.config import ExecConfig
from dynavit.runtime import Controller, Entry

MENU = [Entry(ExecConfig(resolution=160), 0.70, latency_p95_ms=2.0, gmacs=0.6, label="resolution=160"),
        Entry(ExecConfig(mlp_width=0.5), 0.75, latency_p95_ms=4.0, gmacs=0.8, label="mlp_width=0.5"),
        Entry(ExecConfig(), 0.80, latency_p95_ms=8.0, gmacs=1.25, label="default")]


@pytest.fixture(scope="module")
def model():
    from dynavit.model import from_config
    from dynavit.models.configs import preset_config

    return from_config(preset_config("vit-t16"), seed=0)


def _app(model, **kw):
    require("fastapi")
    from dynavit.serve.app import create_app

    return create_app(model, Controller(MENU, model=model), **kw)


@pytest.fixture(scope="module")
def client(model):
    from fastapi.testclient import TestClient

    with TestClient(_app(model, max_body_bytes=2_000_000, max_pixels=4_000_000),
                    raise_server_exceptions=False) as c:
        yield c


def jpeg(w: int = 64, h: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def png_bomb(w: int = 20000, h: int = 20000) -> bytes:
    """A real 1-bit PNG of w x h zeros: ~50 KB on the wire, 400 MB of RGB once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (w + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_health_ready_configs_metrics(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True}
    menu = client.get("/v1/configs").json()["configs"]
    assert [c["name"] for c in menu] == ["p0", "p1", "p2"] and menu[2]["label"] == "default"
    text = client.get("/metrics").text
    assert "dynavit_requests_total" in text and "dynavit_infer_latency_ms_bucket" in text
    assert "dynavit_slowdown " in text and "dynavit_miss_price " in text


def test_infer_raw_and_multipart(client) -> None:
    # 200 ms: room for decoding even on a loaded CI machine (at 20 ms, a slow decode left only p0)
    r = client.post("/v1/infer?latency_ms=200", content=jpeg(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    a = r.json()
    # the model time predicted for the full path (8 ms) plus decoding and the (empty) queue, within budget
    assert a["config"]["name"] == "p2" and 8.0 <= a["predicted_ms"] <= 200.0 and a["queue_wait_ms"] == 0
    assert a["predicted_to_fit"] is True
    assert len(a["topk"]) == 5 and a["topk"][0]["probability"] >= a["topk"][1]["probability"]
    assert a["budget_met"] == (a["measured_ms"] <= 200) and a["measured_ms"] >= a["model_ms"] > 0
    r = client.post("/v1/infer?gmacs=0.7", files={"image": ("x.jpg", jpeg(), "image/jpeg")})
    assert r.status_code == 200 and r.json()["config"]["name"] == "p0" and r.json()["budget_met"] is True
    r = client.post("/v1/infer?config=default", content=jpeg(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["config"]["exec_config"] == {}
    r = client.post("/v1/infer?latency_ms=0.5", content=jpeg(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["budget_met"] is False and r.json()["config"]["name"] == "p0"
    assert r.json()["predicted_to_fit"] is False  # the controller said so before running
    misses = 1 + (not a["budget_met"])
    assert f"dynavit_budget_misses_total {misses:.1f}" in client.get("/metrics").text


@pytest.mark.parametrize("body, ctype, query, status, message", [
    (b"hello, not an image", "image/png", "latency_ms=5", 400, "not an image"),
    (jpeg(256, 192)[:3000], "image/jpeg", "latency_ms=5", 400, "truncated"),
    (png_bomb(), "image/png", "latency_ms=5", 413, "400000000"),
    (jpeg(), "image/jpeg", "latency_ms=-3", 422, "positive"),
    (jpeg(), "image/jpeg", "latency_ms=nan", 422, "positive"),
    (jpeg(), "image/jpeg", "latency_ms=inf", 422, "positive"),
    (jpeg(), "image/jpeg", "latency_ms=fast", 422, "latency_ms"),
    (jpeg(), "image/jpeg", "", 422, "give a budget"),
    (jpeg(), "image/jpeg", "config=nope", 404, "unknown config"),
    (jpeg(), "image/jpeg", "config=p0&latency_ms=3", 422, "not both"),
    (jpeg(), "image/jpeg", "energy_mj=3", 422, "energy"),
    (jpeg(), "text/plain", "latency_ms=5", 415, "content type"),
    (b"", "image/jpeg", "latency_ms=5", 400, "empty"),
    (b"x" * 2_100_000, "image/jpeg", "latency_ms=5", 413, "exceeds"),
])
def test_bad_requests_get_a_clear_4xx(client, body, ctype, query, status, message) -> None:
    r = client.post(f"/v1/infer?{query}", content=body, headers={"content-type": ctype})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert client.get("/healthz").status_code == 200  # still serving


def test_multipart_without_image_field(client) -> None:
    r = client.post("/v1/infer?latency_ms=5", files={"other": ("x.txt", b"abc", "text/plain")})
    assert r.status_code == 422 and "'image'" in r.json()["error"]


def test_auth(model) -> None:
    from fastapi.testclient import TestClient

    with TestClient(_app(model, token="s3cret"), raise_server_exceptions=False) as c:
        assert c.get("/healthz").status_code == 200
        for method, path in (("get", "/readyz"), ("get", "/metrics"), ("get", "/v1/configs"),
                             ("post", "/v1/infer?latency_ms=5"), ("get", "/openapi.json"), ("get", "/docs")):
            r = getattr(c, method)(path)
            assert r.status_code == 401 and "bearer" in r.json()["error"], path
            r = getattr(c, method)(path, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401, path
        ok = c.get("/v1/configs", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_concurrent_requests_share_a_batch(model) -> None:
    import httpx

    app = _app(model, max_batch=8, max_wait_ms=200)

    async def go() -> list[dict]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                rs = await asyncio.gather(*[c.post("/v1/infer?config=p1", content=jpeg(),
                                                   headers={"content-type": "image/jpeg"}) for _ in range(6)])
        return [r.json() for r in rs]

    answers = asyncio.run(go())
    assert max(a["batch_size"] for a in answers) > 1
    assert sum(1 for a in answers if a["batch_size"] > 1) >= 2


def test_fuzz_the_api_no_5xx(client) -> None:
    hypothesis = require("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                       st.integers(-10**12, 10**12))
    ctypes = st.sampled_from(["image/jpeg", "image/png", "application/octet-stream", "text/plain",
                              "multipart/form-data", "multipart/form-data; boundary=xyz", "", "image/x-foo"])
    bodies = st.one_of(st.binary(max_size=2048), st.just(jpeg()), st.builds(lambda b, n: b[:n], st.just(jpeg()),
                                                                           st.integers(0, 800)))

    @settings(max_examples=120, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(body=bodies, ctype=ctypes, params=st.dictionaries(
        st.sampled_from(["latency_ms", "gmacs", "energy_mj", "config", "x"]), values, max_size=3),
        path=st.sampled_from(["/v1/infer", "/v1/configs", "/v1/nothing", "/healthz"]))
    def check(body, ctype, params, path) -> None:
        r = client.post(path, params={k: str(v) for k, v in params.items()}, content=body,
                        headers={"content-type": ctype} if ctype else {})
        assert r.status_code < 500, (r.status_code, r.text)
        assert "error" in r.json() or r.status_code == 200

    check()
    assert hypothesis is not None
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").json()["ready"]


def test_real_server_client_and_graceful_shutdown(assets, tmp_path) -> None:
    """`dynavit serve` on a real sweep store: the CLI client, then SIGTERM with requests in flight."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import threading
    import time
    import urllib.request

    require("uvicorn")
    from dynavit.sweep.run import SweepTarget, run_sweep

    store = tmp_path / "r.db"
    run_sweep(SweepTarget(model=str(assets / "models" / "deit-tiny-patch16-224"),
                          data=str(assets / "imagenet-samples"), limit=8, batch_size=8, n_boot=100,
                          latency_repeats=2), space="small", strategy="random", budget=3, store=store, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "dynavit.cli", "serve", "--store", str(store), "--port",
                               str(port), "--token", "tok", "--max-batch", "1"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                req = urllib.request.Request(f"{url}/readyz", headers={"Authorization": "Bearer tok"})
                if urllib.request.urlopen(req, timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail(f"server did not become ready: {server.stderr.read() if server.poll() else ''}")
        image = next((assets / "imagenet-samples" / "images").iterdir())
        cli = [sys.executable, "-m", "dynavit.cli", "infer", str(image), "--url", url, "--latency-ms", "500"]
        out = subprocess.run([*cli, "--token", "tok"], capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0 and "budget met: True" in out.stdout and "%" in out.stdout, out.stderr
        denied = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=60)
        assert denied.returncode == 2 and "401" in denied.stderr

        results: list[tuple[int, float]] = []
        menu_req = urllib.request.Request(f"{url}/v1/configs", headers={"Authorization": "Bearer tok"})
        full = json.loads(urllib.request.urlopen(menu_req).read())["configs"][-1]["name"]
        top = f"{url}/v1/infer?config={full}"

        def post() -> None:
            req = urllib.request.Request(top, data=image.read_bytes(), method="POST",
                                         headers={"Authorization": "Bearer tok", "Content-Type": "image/jpeg"})
            with urllib.request.urlopen(req, timeout=60) as r:
                results.append((r.status, time.perf_counter()))

        threads = [threading.Thread(target=post) for _ in range(12)]
        for t in threads:
            t.start()
        time.sleep(0.1)  # 12 full-model forwards, one at a time: most are still queued
        term = time.perf_counter()
        server.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        assert [s for s, _ in results] == [200] * 12  # in-flight requests finished
        assert any(t > term for _, t in results)  # and some of them were still in flight at SIGTERM
        # uvicorn re-raises the caught SIGTERM once it has shut down, so the exit status is -SIGTERM
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Traceback" not in server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()


def test_backlog_takes_budget_away() -> None:
    """A request behind a queue gets the path that fits what is left of its budget."""
    from dynavit.serve.batcher import Batcher, Job

    async def go() -> float:
        b = Batcher(dm=None)
        loop = asyncio.get_running_loop()
        for ms in (3.0, 4.0):
            b.queues.setdefault(ExecConfig(), []).append(Job(None, (1, 1), loop.create_future(), 0.0, ms))
        return b.expected_wait_ms()

    assert asyncio.run(go()) == pytest.approx(7.0)
    c = Controller(MENU, margin=0.0)
    assert c.select(latency_ms=12 - 7.0).config == ExecConfig(mlp_width=0.5)  # 12 ms alone would take the full path


def test_load_for_store_with_rescue_measures_ladders_on_the_sweeps_images(tmp_path) -> None:
    """``serve --rescue``: the ladders come from the images the sweep measured, for a calibrated ViT only."""
    from helpers import Shapes, tiny_vit
    from typer.testing import CliRunner

    from dynavit.cli import app
    from dynavit.errors import DynavitError
    from dynavit.serve import load_for_store
    from dynavit.train.supervised import export

    export(tiny_vit(layers=4), tmp_path / "vit", {"name": "tiny"})  # 4 blocks: a deadline may drop one
    data = Shapes(12)
    for i in range(len(data)):
        img, y = data.load(i)
        (tmp_path / "data" / f"c{y}").mkdir(parents=True, exist_ok=True)
        img.save(tmp_path / "data" / f"c{y}" / f"{i}.png")
    (tmp_path / "space.json").write_text('{"mlp_width": [1.0, 0.5]}')
    runner = CliRunner()
    vit, images = str(tmp_path / "vit"), str(tmp_path / "data")
    assert runner.invoke(app, ["calibrate", vit, "--images", images, "--out", str(tmp_path / "calib"),
                               "--limit", "4"]).exit_code == 0
    sweep = ["sweep", vit, "--data", images, "--space", str(tmp_path / "space.json"), "--strategy", "grid",
             "--latency-repeats", "2"]
    for store, extra in (("plain.db", []), ("calibrated.db", ["--calibration", str(tmp_path / "calib")])):
        res = runner.invoke(app, [*sweep, "--store", str(tmp_path / store), *extra])
        assert res.exit_code == 0, res.output
    _, ctrl = load_for_store(None, tmp_path / "calibrated.db", profile_runs=3, rescue=True)
    assert ctrl.can_rescue and ctrl.entries and all(len(e.ladder) == 1 for e in ctrl.entries)
    assert all(0 < saved < 1 and 0 <= q <= 1 for e in ctrl.entries for saved, q in e.ladder)
    with pytest.raises(DynavitError, match="profiled at start-up"):
        load_for_store(None, tmp_path / "calibrated.db", profile_runs=0, rescue=True)
    with pytest.raises(DynavitError, match="calibrated ViT"):
        load_for_store(None, tmp_path / "plain.db", profile_runs=3, rescue=True)
