"""The HTTP inference server: one model, many paths, the controller picks one per request.

Requests that choose the same config are micro-batched: a batcher collects them for up to
``max_wait_ms`` (or until ``max_batch``) and runs one forward pass, so throughput grows with
load while a lone request waits at most ``max_wait_ms``. On a multiplexed path
(``ExecConfig(mux=N)``) the batch's images are grouped N per pass in queue order, each client
reading its own slot; a group without N requests is filled with blank images (see
``dynavit.multiplex``). The model runs on one worker
thread: the event loop keeps accepting and decoding while it computes.

When the controller can rescue (``Controller.measure_rescue`` ran at start-up: ``serve
--rescue``), a batch of latency-budgeted requests runs under a ``Deadline`` set by the tightest
of their end-to-end deadlines: a forward that falls behind drops up to a quarter of its least
important remaining blocks when that makes it in time, and the answer names the blocks it
dropped. A batch holding a request that named its config runs that config whole.

Every bad request gets a 4xx JSON ``{"error": ...}`` that says what was wrong; the server keeps
serving. Images are checked before they are decoded: body size, content type, and the pixel
count from the header (decompression bombs are refused before any pixel is allocated).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import math
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from PIL import Image, UnidentifiedImageError
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from dynavit.config import ExecConfig
from dynavit.deadline import Deadline, attached, with_dropped
from dynavit.errors import DynavitError
from dynavit.runtime.controller import Choice, Controller, Entry

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif", "image/tiff",
               "application/octet-stream")


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """RGB image from bytes; 400 for non-images and truncated files, 413 for too many pixels."""
    if not data:
        raise RequestError(400, "the request has no image (empty body)")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:  # PIL's own ceiling, above ours
        raise RequestError(413, f"{e}; this server accepts at most {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise RequestError(400, "the body is not an image this server can decode (JPEG, PNG, WebP, BMP, ...)"
                           ) from None
    w, h = img.size
    if w * h > max_pixels or w <= 0 or h <= 0:
        raise RequestError(413, f"image is {w}x{h} = {w * h} pixels; this server accepts at most {max_pixels}")
    try:
        img.load()
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise RequestError(400, f"the image could not be decoded (truncated or corrupt: {e})") from None


@dataclass
class _Job:
    pixels: torch.Tensor
    size: tuple[int, int]  # original (w, h), for segmentation masks
    future: asyncio.Future
    arrived: float
    predicted_ms: float = 0.0  # the controller's prediction for this image alone, for the backlog
    choice: Choice | None = None  # a latency budget's choice: the batch may run under its deadline
    due: float | None = None  # perf_counter by which the answer is due (the request's latency budget)


@dataclass
class _Ran:
    """One forward of a batch: its outputs and what the clock and the deadline saw."""

    out: Any
    ms: float
    dropped: tuple[int, ...] = ()  # blocks the deadline dropped
    pace_ms: float | None = None  # with drops: the whole path's time at the run's pace


@dataclass
class Batcher:
    """Per-config queues drained by one task; one forward per batch on the model thread."""

    dm: Any
    max_batch: int = 8
    max_wait_ms: float = 5.0
    controller: Controller | None = None  # gives batches of latency-budgeted requests a deadline
    queues: dict[ExecConfig, list[_Job]] = field(default_factory=dict)
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "dynavit-model"))

    def __post_init__(self) -> None:
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._busy_until = 0.0  # perf_counter when the running batch is predicted to finish
        self.arriving = 0  # requests received but not yet queued (decoding): batch mates worth waiting for
        self.batch_sizes: list[int] = []

    def expected_wait_ms(self) -> float:
        """Predicted time before a request submitted now starts: the running batch plus the queue.

        Queued images are counted one by one (as if unbatched), which overestimates a batched
        backlog: the controller errs towards a cheaper path, not towards a miss.
        """
        running = max(0.0, self._busy_until - time.perf_counter()) * 1e3
        return running + sum(j.predicted_ms for q in self.queues.values() for j in q)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def submit(self, cfg: ExecConfig, job: _Job) -> Any:
        if self._closing:
            raise RequestError(503, "the server is shutting down")
        self.queues.setdefault(cfg, []).append(job)
        self._wake.set()
        return await job.future

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while any(self.queues.values()):
                cfg = min((c for c, q in self.queues.items() if q), key=lambda c: self.queues[c][0].arrived)
                wait = self.queues[cfg][0].arrived + self.max_wait_ms / 1e3 - time.perf_counter()
                # wait for batch mates only while some are on their way: a lone request runs at once
                if len(self.queues[cfg]) < self.max_batch and wait > 0 and self.arriving and not self._closing:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
                    self._wake.clear()
                    continue
                jobs, self.queues[cfg] = self.queues[cfg][: self.max_batch], self.queues[cfg][self.max_batch:]
                await self._run(cfg, jobs)
            if self._closing:
                return

    async def _run(self, cfg: ExecConfig, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        self.batch_sizes.append(len(jobs))
        self._busy_until = time.perf_counter() + sum(j.predicted_ms for j in jobs) / 1e3
        try:
            ran = await loop.run_in_executor(self.executor, self._forward, cfg, [j.pixels for j in jobs], jobs)
        except Exception as e:  # noqa: BLE001 - delivered to each waiting request as a 500
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        for k, j in enumerate(jobs):
            if not j.future.done():
                j.future.set_result((ran.out[k], ran, len(jobs)))

    def _forward(self, cfg: ExecConfig, pixels: list[torch.Tensor], jobs: list[_Job] | None = None) -> _Ran:
        """One forward of ``pixels`` on ``cfg``; with ``jobs`` (their requests), under the batch's deadline."""
        with torch.inference_mode():
            self.dm.configure(cfg)
            same = len({p.shape for p in pixels}) == 1  # else (segmentation keeps aspect): one pass each
            t0 = time.perf_counter()
            deadline = self._deadline(jobs, t0) if same and jobs else None
            with attached(self.dm.module, deadline, t0) if deadline is not None else contextlib.nullcontext():
                out = self.dm(torch.stack(pixels)) if same else [self.dm(p[None])[0] for p in pixels]
            ms = (time.perf_counter() - t0) * 1e3
        if deadline is None or not deadline.dropped:
            return _Ran(out, ms)
        return _Ran(out, ms, tuple(sorted(deadline.dropped)), deadline.full_ms)

    def _deadline(self, jobs: list[_Job], start: float) -> Deadline | None:
        """The batch's deadline: the tightest request's; none if any request named its config."""
        if self.controller is None or any(j.choice is None or j.due is None for j in jobs):
            return None
        tightest = min(jobs, key=lambda j: j.due)
        return self.controller.deadline(tightest.choice, cuda=jobs[0].pixels.is_cuda,
                                        budget_ms=(tightest.due - start) * 1e3, batch=len(jobs))

    async def close(self) -> None:
        """Finish everything queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self.executor.shutdown(wait=True)


class Metrics:
    """Prometheus metrics on a private registry (several apps may live in one process)."""

    def __init__(self, controller: Controller | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("dynavit_requests_total", "HTTP requests", ["endpoint", "status"],
                                registry=self.registry)
        buckets = (1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 200, 500, 1000, 5000)
        self.latency = Histogram("dynavit_infer_latency_ms", "End-to-end /v1/infer time (ms)", buckets=buckets,
                                 registry=self.registry)
        self.model_ms = Histogram("dynavit_model_ms", "Forward-pass time per batch (ms)", buckets=buckets,
                                  registry=self.registry)
        self.batch = Histogram("dynavit_batch_size", "Images per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64),
                               registry=self.registry)
        self.misses = Counter("dynavit_budget_misses_total", "Inferences that exceeded their latency budget",
                              registry=self.registry)
        self.per_config = Counter("dynavit_config_requests_total", "Inferences per chosen config", ["config"],
                                  registry=self.registry)
        self.rescued = Counter("dynavit_rescued_total", "Inferences whose deadline dropped blocks to answer in time",
                               registry=self.registry)
        if controller is not None:  # read at scrape time: what the controller believes now
            Gauge("dynavit_slowdown", "Machine slowdown the controller estimates (observed / measured median)",
                  registry=self.registry).set_function(lambda: controller.slowdown)
            Gauge("dynavit_miss_price", "Top-1 one expected budget miss costs in the controller's choice; rises "
                  "with misses above the target", registry=self.registry).set_function(lambda: controller.price)


def _names(entries: list[Entry]) -> dict[str, Entry]:
    """Stable short names for menu items, cheapest first: p0, p1, ..."""
    order = sorted(entries, key=lambda e: (e.gmacs or 0, -e.quality))
    return {f"p{i}": e for i, e in enumerate(order)}


def create_app(dm: Any, controller: Controller, *, token: str | None = None, max_body_bytes: int = 20 * 2**20,
               max_pixels: int = 40_000_000, max_batch: int = 8, max_wait_ms: float = 5.0, topk: int = 5) -> FastAPI:
    """The FastAPI app (``dynavit serve`` runs it with uvicorn)."""
    names = _names(controller.entries)
    by_label = {e.label: n for n, e in names.items()}
    metrics = Metrics(controller)
    state: dict[str, Any] = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = Batcher(dm, max_batch=max_batch, max_wait_ms=max_wait_ms, controller=controller)
        batcher.start()
        state["batcher"] = batcher
        loop = asyncio.get_running_loop()
        x = torch.zeros(1, 3, *dm.input_size)
        for e in names.values():  # warm every path before declaring readiness
            await loop.run_in_executor(batcher.executor, batcher._forward, e.config, [x[0]])
        state["ready"] = True
        yield
        state["ready"] = False
        await batcher.close()

    app = FastAPI(title="dynavit", version="1", lifespan=lifespan,
                  description="Run-time adaptive ViT inference: the most accurate path within each request's budget.")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next):  # auth, body size, metrics
        path = request.url.path
        if token and path != "/healthz" and not hmac.compare_digest(
                request.headers.get("authorization", "").encode(), f"Bearer {token}".encode()):
            metrics.requests.labels("other", "401").inc()
            return JSONResponse({"error": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > max_body_bytes
            except ValueError:
                return error(400, f"Content-Length {length!r} is not a number")
            if too_big:
                metrics.requests.labels("other", "413").inc()
                return error(413, f"body of {length} bytes exceeds the limit of {max_body_bytes}")
        response = await call_next(request)
        metrics.requests.labels(path if path in known else "other", str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        return error(e.status, e.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors()]
        return error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/configs")
    async def configs() -> dict[str, Any]:
        return {"model": str(dm.source), "task": dm.task, "configs": [
            {"name": n, "label": e.label, "config": e.config.to_dict(), "quality": e.quality,
             "latency_p95_ms": e.latency_ms, "latency_p50_ms": e.latency_p50_ms, "gmacs": e.gmacs,
             "energy_mj": e.energy_mj} for n, e in names.items()]}

    @app.post("/v1/infer")
    async def infer(request: Request, latency_ms: float | None = None, energy_mj: float | None = None,
                    gmacs: float | None = None, config: str | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        data = await _read_image_bytes(request, max_body_bytes)
        budgets = {k: v for k, v in (("latency_ms", latency_ms), ("energy_mj", energy_mj), ("gmacs", gmacs))
                   if v is not None}
        if config is not None and budgets:
            raise RequestError(422, "give either a config name or a budget, not both")
        if config is None and not budgets:
            raise RequestError(422, "give a budget: latency_ms, energy_mj or gmacs (or a config name)")
        for k, v in budgets.items():
            if not math.isfinite(v) or v <= 0:
                raise RequestError(422, f"{k} must be a positive finite number, got {v}")
        if config is not None:
            name = config if config in names else by_label.get(config)
            if name is None:
                raise RequestError(404, f"unknown config {config!r}; GET /v1/configs lists the names")
        batcher: Batcher = state["batcher"]
        batcher.arriving += 1
        try:
            img = await asyncio.to_thread(decode_image, data, max_pixels)
            pixels = await asyncio.to_thread(dm.transform, img)
        finally:  # no await between here and submit(): the request is queued before anyone looks
            batcher.arriving -= 1
        wait_ms = batcher.expected_wait_ms()
        choice = None
        if config is not None:
            entry, predicted, budget_ok, kind, budget = names[name], None, True, "config", None
            model_budget = None  # what the model's own time had to fit: a miss counted by the controller
        else:
            select = dict(budgets)
            if "latency_ms" in select:  # what is left once decoding and the queue ahead are paid for
                spent = (time.perf_counter() - t0) * 1e3 + wait_ms
                select["latency_ms"] = max(select["latency_ms"] - spent, 1e-6)
            try:
                choice = controller.select(**select)
            except DynavitError as e:
                raise RequestError(422, str(e)) from None
            entry, kind, budget = choice.entry, choice.kind, budgets[choice.kind]
            predicted = choice.predicted + (spent if kind == "latency_ms" else 0.0)
            budget_ok = choice.budget_met
            model_budget = choice.budget if kind == "latency_ms" else None
            name = next(n for n, e in names.items() if e is entry)
        loop = asyncio.get_running_loop()
        due = t0 + budgets["latency_ms"] / 1e3 if kind == "latency_ms" else None
        job = _Job(pixels, img.size, loop.create_future(), time.perf_counter(),
                   controller.predict(entry) or 0.0, choice if kind == "latency_ms" else None, due)
        out, ran, batch = await state["batcher"].submit(entry.config, job)
        model_ms = ran.ms
        total_ms = (time.perf_counter() - t0) * 1e3
        passes = math.ceil(batch / entry.config.mux)  # what the sweep timed: one image, or one pass of N
        controller.observe(entry.config, model_ms / passes, budget_ms=model_budget,
                           pace_ms=ran.pace_ms / passes if ran.pace_ms else None)
        met = total_ms <= budget if kind == "latency_ms" else (budget_ok if kind != "config" else None)
        if kind == "latency_ms" and not met:
            metrics.misses.inc()
        metrics.latency.observe(total_ms)
        metrics.model_ms.observe(model_ms)
        metrics.batch.observe(batch)
        metrics.per_config.labels(name).inc()
        if ran.dropped:
            metrics.rescued.inc()
        result = {"config": {"name": name, "label": entry.label, "exec_config": entry.config.to_dict()},
                  "dropped_blocks": list(ran.dropped),
                  "executed_config": with_dropped(entry.config, ran.dropped).to_dict(),
                  "predicted_ms": predicted if kind == "latency_ms" else _none_if(entry.latency_ms),
                  "measured_ms": total_ms, "model_ms": model_ms, "batch_size": batch, "budget": budget,
                  "budget_kind": kind, "budget_met": met, "predicted_to_fit": budget_ok, "queue_wait_ms": wait_ms}
        result.update(_prediction(dm, out, img.size, topk))
        return result

    known = {"/healthz", "/readyz", "/metrics", "/v1/configs", "/v1/infer", "/docs", "/openapi.json"}
    return app


def _none_if(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else v


async def _read_image_bytes(request: Any, limit: int) -> bytes:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as e:  # noqa: BLE001 - malformed multipart of any kind is the client's error
            raise RequestError(400, f"malformed multipart body: {e}") from None
        upload = form.get("image") or form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError(422, "multipart body needs an 'image' file field")
        data = await upload.read(limit + 1)
    elif ctype in IMAGE_TYPES or ctype.startswith("image/"):
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                break
    else:
        raise RequestError(415, f"content type {ctype or '(none)'!r} is not accepted; send image bytes "
                                "(image/jpeg, image/png, ...) or multipart/form-data with an 'image' field")
    if len(data) > limit:
        raise RequestError(413, f"body exceeds the limit of {limit} bytes")
    return data


def _prediction(dm: Any, out: torch.Tensor, size: tuple[int, int], topk: int) -> dict[str, Any]:
    if dm.task == "segmentation":
        import torch.nn.functional as F

        w, h = size
        mask = F.interpolate(out[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0].argmax(0)
        buf = io.BytesIO()
        Image.fromarray(mask.numpy().astype(np.uint8)).save(buf, format="PNG")
        present = sorted(int(c) for c in torch.unique(mask))
        return {"task": "segmentation", "mask_png_base64": base64.b64encode(buf.getvalue()).decode(),
                "classes": {str(c): dm.id2label.get(c, str(c)) for c in present}}
    probs = out.float().softmax(-1)
    p, idx = probs.topk(min(topk, probs.numel()))
    return {"task": "classification", "topk": [
        {"index": int(i), "label": dm.id2label.get(int(i), str(int(i))), "probability": float(v)}
        for v, i in zip(p, idx, strict=True)]}
