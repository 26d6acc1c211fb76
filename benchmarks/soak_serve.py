"""Soak test of the server: 200,000 requests against one process, its memory read every 20,000.

A tiny random ViT (saved with ``save_pretrained``) is served by ``uvicorn`` on a free loopback
port, so the run takes minutes and the model's own memory is small next to the server's. Several
client threads send, on kept-alive connections, a mix of traffic: valid images with budgets or
config names, and every 8th request a bad one that varies with the request (a unique unknown
path, an unknown config name, a thin image, a wrong content type, a truncated image), so that any
state keyed by client input would grow. Memory is flat when the last RSS is within 10 % of the
RSS after the first 20,000 requests. Writes ``benchmarks/results/soak_serve.json`` and prints a table:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soak_serve.py [--requests 200000] [--every 20000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FLAT = 0.10  # the last RSS within this share of the RSS after the first sample

SERVER = """
import sys
import uvicorn
import dynavit
from dynavit.config import ExecConfig
from dynavit.runtime import Controller, Entry
from dynavit.serve.app import create_app

dm = dynavit.load(sys.argv[1])
menu = [Entry(ExecConfig(mlp_width=0.5), 0.4, latency_p95_ms=1.0, gmacs=0.005, label="mlp_width=0.5"),
        Entry(ExecConfig(), 0.5, latency_p95_ms=2.0, gmacs=0.01, label="default")]
uvicorn.run(create_app(dm, Controller(menu, model=dm)), host="127.0.0.1", port=int(sys.argv[2]),
            log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_mb(pid: int, field: str) -> float:
    """A memory field of /proc/<pid>/status (VmRSS, VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


def image(fmt: str, w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def request_for(i: int, images: list[bytes], thin: bytes) -> tuple[str, bytes, str]:
    """(path with query, body, content type) of request ``i``: valid, or every 8th a bad one unique to ``i``."""
    ok = images[i % len(images)]
    if i % 8:
        query = f"config=p{i % 2}" if i % 3 == 0 else f"latency_ms={1 + (i % 97) / 7:.3f}"
        return f"/v1/infer?{query}", ok, "image/jpeg"
    bad = [(f"/v1/nothing-{i}", ok, "image/jpeg"), (f"/v1/infer?config=unknown-{i}", ok, "image/jpeg"),
           (f"/v1/infer?latency_ms={i}", thin, "image/png"), (f"/v1/infer?gmacs={i}", ok, f"text/x-{i}"),
           (f"/v1/infer?latency_ms={i}", ok[: 100 + i % 300], "image/jpeg")]
    return bad[(i // 8) % len(bad)]


def soak(folder: Path, n: int, every: int, clients: int) -> dict:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(folder), str(port)],
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    images = [image("JPEG", 64 + 16 * k, 48 + 8 * k, k) for k in range(8)]
    thin = image("PNG", 1, 4000, 0)
    statuses: Counter[int] = Counter()
    series: list[dict] = []
    lock = threading.Lock()
    counter = iter(range(n))
    done = [0]
    try:
        for _ in range(600):
            if server.poll() is not None:
                raise RuntimeError(f"the server exited: {server.stderr.read()[-2000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        t0 = time.perf_counter()
        series.append(sample(server.pid, 0, t0))

        def client() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            for i in counter:
                path, body, ctype = request_for(i, images, thin)
                conn.request("POST", path, body=body, headers={"Content-Type": ctype})
                r = conn.getresponse()
                r.read()
                with lock:
                    statuses[r.status] += 1
                    done[0] += 1
                    if done[0] % every == 0:
                        series.append(sample(server.pid, done[0], t0))
                        print(row(series[-1]), flush=True)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {"statuses": {str(k): v for k, v in sorted(statuses.items())}, "series": series}


def sample(pid: int, requests: int, t0: float) -> dict:
    return {"requests": requests, "rss_mb": round(proc_mb(pid, "VmRSS"), 1), "hwm_mb": round(proc_mb(pid, "VmHWM"), 1),
            "elapsed_s": round(time.perf_counter() - t0, 1)}


def row(s: dict) -> str:
    return f"| {s['requests']:>8} | {s['rss_mb']:>8.1f} | {s['hwm_mb']:>8.1f} | {s['elapsed_s']:>8.1f} |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--every", type=int, default=20_000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak_serve.json")
    args = ap.parse_args()
    from transformers import ViTConfig

    from dynavit.model import from_config
    from dynavit.sweep.engine import device_name

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print("| requests | RSS MB   | peak MB  | seconds  |\n|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        from_config(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, num_labels=5), seed=0).save_pretrained(Path(tmp) / "vit")
        res = soak(Path(tmp) / "vit", args.requests, args.every, args.clients)
    first, last = res["series"][1]["rss_mb"], res["series"][-1]["rss_mb"]
    flat = abs(last - first) <= FLAT * first
    out = {"machine": {"cpu": device_name(__import__("torch").device("cpu")), "platform": platform.platform(),
                       "cores": os.cpu_count()},
           "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
           "commit": commit,
           "command": " ".join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", ""), "python",
                                *sys.argv]).strip(),
           "model": "random ViT, 32x32 input, 2 blocks of width 32 (transformers ViTConfig)",
           "clients": args.clients, "requests": args.requests, "every": args.every, **res,
           "criterion": f"last RSS within {FLAT:.0%} of the RSS after {args.every} requests",
           "rss_after_first_mb": first, "rss_last_mb": last, "flat": flat}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"statuses {res['statuses']}; RSS {first:.1f} MB after {args.every} requests, {last:.1f} MB after "
          f"{res['series'][-1]['requests']}: {'flat' if flat else 'NOT flat'} (criterion: {out['criterion']}); "
          f"wrote {args.out}")
    sys.exit(0 if flat else 1)


if __name__ == "__main__":
    main()
