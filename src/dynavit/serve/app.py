"""The HTTP inference server: one model, many paths, the controller picks one per request.

Requests that choose the same config are micro-batched (``serve.batcher``): one forward pass
per batch, so throughput grows with load while a lone request waits at most ``max_wait_ms``.
The model runs on one worker thread: the event loop keeps accepting and decoding while it
computes.

When the controller can rescue (``Controller.measure_rescue`` ran at start-up: ``serve
--rescue``), a batch of latency-budgeted requests runs under a ``Deadline`` set by the tightest
of their end-to-end deadlines: a forward that falls behind drops up to a quarter of its least
important remaining blocks when that makes it in time, and the answer names the blocks it
dropped. A batch holding a request that named its config runs that config whole.

Every bad request gets a 4xx JSON ``{"error": ...}`` that says what was wrong; the server keeps
serving. Bodies are counted as they stream and images are checked before they are decoded
(``serve.images``); decoding, the transform and the answer's prediction (``serve.predictions``)
run on a thread of their own, so the event loop (and ``/healthz``) answers while a large image is
processed. The request handling is plain functions (``plan``, ``infer``, ``answer``) around the
batcher; ``create_app`` only wires them to routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from PIL import Image
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from dynavit.errors import DynavitError
from dynavit.runtime.choice import Choice
from dynavit.runtime.controller import Controller
from dynavit.runtime.menu import Entry
from dynavit.runtime.run import Ran
from dynavit.serve.batcher import Batcher, Job
from dynavit.serve.images import (
    MAX_ASPECT,
    BodyLimit,
    RequestError,
    decode,
    decode_image,
    open_image,
    read_image_bytes,
)
from dynavit.serve.predictions import MAX_MASK_PIXELS, prediction

__all__ = ["Batcher", "Job", "RequestError", "create_app", "decode_image"]

ROUTES = {"/healthz", "/readyz", "/metrics", "/v1/configs", "/v1/infer", "/docs", "/openapi.json"}


class Metrics:
    """Prometheus metrics on a private registry (several apps may live in one process)."""

    def __init__(self, controller: Controller | None = None) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dynavit_requests_total", "HTTP requests", ["endpoint", "status"], registry=r)
        buckets = (1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 200, 500, 1000, 5000)
        self.latency = Histogram("dynavit_infer_latency_ms", "End-to-end /v1/infer time (ms)", buckets=buckets,
                                 registry=r)
        self.model_ms = Histogram("dynavit_model_ms", "Forward-pass time per batch (ms)", buckets=buckets, registry=r)
        self.batch = Histogram("dynavit_batch_size", "Images per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64),
                               registry=r)
        self.misses = Counter("dynavit_budget_misses_total", "Inferences that exceeded their latency budget",
                              registry=r)
        self.per_config = Counter("dynavit_config_requests_total", "Inferences per chosen config", ["config"],
                                  registry=r)
        self.rescued = Counter("dynavit_rescued_total", "Inferences whose deadline dropped blocks to answer in time",
                               registry=r)
        if controller is not None:  # read at scrape time: what the controller believes now
            Gauge("dynavit_slowdown", "Machine slowdown the controller estimates (observed / measured median)",
                  registry=r).set_function(lambda: controller.slowdown)
            Gauge("dynavit_miss_price", "Top-1 one expected budget miss costs in the controller's choice; rises "
                  "with misses above the target", registry=r).set_function(lambda: controller.price)
        self.memory = Gauge("dynavit_model_memory_bytes", "Bytes each loaded model holds (variant: base or a "
                            "variant's name; kind: parameters, buffers, precision_copies, compensation, total)",
                            ["variant", "kind"], registry=r)

    def held(self, dm: Any) -> None:
        """Set the memory gauge from the model (labels: its variants, fixed at start-up)."""
        held = getattr(dm, "memory_held", None)
        for variant, kinds in (held() if held is not None else {}).items():
            for kind, n in kinds.items():
                self.memory.labels(variant, kind).set(n)


@dataclass
class Server:
    """What the request handlers share: the model, its controller, the named menu, limits and the batcher."""

    dm: Any
    controller: Controller
    max_body_bytes: int
    max_pixels: int  # of the image as sent, and of the image the model's transform makes of it
    topk: int
    metrics: Metrics
    max_aspect: float = MAX_ASPECT
    max_mask_pixels: int = MAX_MASK_PIXELS
    imaging: ThreadPoolExecutor | None = None  # the one thread for image-sized work (see ``infer``)
    batcher: Batcher | None = None
    ready: bool = False

    def __post_init__(self) -> None:
        self.names = menu_names(self.controller.entries)
        self.by_label = {e.label: n for n, e in self.names.items()}


@dataclass
class Plan:
    """What one request will run, and what it was promised."""

    name: str
    entry: Entry
    kind: str  # a budget kind, or "config" for a named config
    budget: float | None  # the request's own budget (end to end)
    predicted: float | None  # the controller's prediction, end to end for latency
    budget_ok: bool  # predicted to fit
    model_budget: float | None  # what the model's own time had to fit: a miss the controller counts
    choice: Choice | None  # a latency budget's choice: the batch may run under its deadline
    queue_ms: float


def menu_names(entries: list[Entry]) -> dict[str, Entry]:
    """Stable short names for menu items, cheapest first: p0, p1, ..."""
    order = sorted(entries, key=lambda e: (e.gmacs or 0, -e.quality))
    return {f"p{i}": e for i, e in enumerate(order)}


def requested(server: Server, budgets: dict[str, float | None], config: str | None) -> tuple[dict[str, float],
                                                                                            str | None]:
    """(the budgets given, the named config's menu name): checked, 4xx otherwise."""
    given = {k: v for k, v in budgets.items() if v is not None}
    if config is not None and given:
        raise RequestError(422, "give either a config name or a budget, not both")
    if config is None and not given:
        raise RequestError(422, "give a budget: latency_ms, energy_mj or gmacs (or a config name)")
    for k, v in given.items():
        if not math.isfinite(v) or v <= 0:
            raise RequestError(422, f"{k} must be a positive finite number, got {v}")
    if config is None:
        return given, None
    name = config if config in server.names else server.by_label.get(config)
    if name is None:
        raise RequestError(404, f"unknown config {config!r}; GET /v1/configs lists the names")
    return given, name


def plan(server: Server, budgets: dict[str, float], name: str | None, t0: float) -> Plan:
    """The path for a request: the named one, or the controller's choice for what is left of the budget."""
    queue_ms = server.batcher.expected_wait_ms() if server.batcher is not None else 0.0
    if name is not None:
        return Plan(name, server.names[name], "config", None, None, True, None, None, queue_ms)
    select = dict(budgets)
    spent = 0.0
    if "latency_ms" in select:  # what is left once decoding and the queue ahead are paid for
        spent = (time.perf_counter() - t0) * 1e3 + queue_ms
        select["latency_ms"] = max(select["latency_ms"] - spent, 1e-6)
    try:
        choice = server.controller.select(**select)
    except DynavitError as e:
        raise RequestError(422, str(e)) from None
    latency = choice.kind == "latency_ms"
    name = next(n for n, e in server.names.items() if e is choice.entry)
    return Plan(name, choice.entry, choice.kind, budgets[choice.kind], choice.predicted + spent,
                choice.budget_met, choice.budget if latency else None, choice if latency else None, queue_ms)


async def infer(server: Server, request: Request, budgets: dict[str, float | None], config: str | None
                ) -> dict[str, Any]:
    """One ``/v1/infer`` request: read, decode, choose, queue, run (batched), observe, answer."""
    t0 = time.perf_counter()
    data = await read_image_bytes(request, server.max_body_bytes)
    given, name = requested(server, budgets, config)
    batcher = server.batcher
    transform, loop = server.dm.transform, asyncio.get_running_loop()
    batcher.arriving += 1
    # Image-sized work (decoding, the transform, a mask) has one thread of its own, off the event loop: one
    # such buffer in memory at a time, each bounded by the checks, and allocated and freed on the same thread,
    # so the allocator reuses its blocks. Three 40 MP images at once on three pool threads raised peak memory
    # by 365 MB, on this thread by 150 MB, as one does (a decoded RGB pixel takes 4 bytes). The price: a
    # request's decode or mask may wait behind another's (a 40 MP decode takes about a second).
    try:
        img = await loop.run_in_executor(server.imaging, open_image, data, server.max_pixels, transform,
                                         server.max_aspect)
        del data  # the image holds what it needs until ``prepare`` closes it
        pixels = await loop.run_in_executor(server.imaging, prepare, transform, img)
    finally:  # no await between here and submit(): the request is queued before anyone looks
        batcher.arriving -= 1
    p = plan(server, given, name, t0)
    due = t0 + p.budget / 1e3 if p.kind == "latency_ms" else None
    job = Job(pixels, img.size, loop.create_future(), time.perf_counter(),
              server.controller.predict(p.entry) or 0.0, p.choice, due)
    out, ran, batch = await batcher.submit(p.entry.config, job)
    fields = answer(server, p, ran, batch, (time.perf_counter() - t0) * 1e3)
    return fields | await loop.run_in_executor(server.imaging, prediction, server.dm, out, img.size, server.topk,
                                               server.max_mask_pixels)


def prepare(transform: Any, img: Image.Image) -> torch.Tensor:
    """The model's input from an opened (checked) image: decoded, transformed, then the image is closed.

    Closing lets the decoded pixels go at once; the image keeps its ``size``.
    """
    try:
        return transform(decode(img))
    finally:
        img.close()


def answer(server: Server, p: Plan, ran: Ran, batch: int, total_ms: float) -> dict[str, Any]:
    """Feed the run back to the controller and the metrics; the answer's fields other than the prediction."""
    passes = math.ceil(batch / p.entry.config.mux)  # what the sweep timed: one image, or one pass of N
    server.controller.observe(p.entry.config, ran.ms / passes, budget_ms=p.model_budget,
                              pace_ms=ran.pace_ms / passes if ran.pace_ms else None)
    latency = p.kind == "latency_ms"
    met = total_ms <= p.budget if latency else (p.budget_ok if p.kind != "config" else None)
    m = server.metrics
    if latency and not met:
        m.misses.inc()
    m.latency.observe(total_ms)
    m.model_ms.observe(ran.ms)
    m.batch.observe(batch)
    m.per_config.labels(p.name).inc()
    if ran.dropped:
        m.rescued.inc()
    return {"config": {"name": p.name, "label": p.entry.label, "exec_config": p.entry.config.to_dict()},
            "dropped_blocks": list(ran.dropped), "executed_config": ran.executed.to_dict(),
            "predicted_ms": p.predicted if latency else _finite(p.entry.latency_p95_ms),
            "measured_ms": total_ms, "model_ms": ran.ms, "batch_size": batch, "budget": p.budget,
            "budget_kind": p.kind, "budget_met": met, "predicted_to_fit": p.budget_ok, "queue_wait_ms": p.queue_ms}


def configs(server: Server) -> dict[str, Any]:
    """``/v1/configs``: the menu by name, under the store's field names."""
    return {"model": str(server.dm.source), "task": server.dm.task, "configs": [
        {"name": n, "label": e.label, "config": e.config.to_dict(), "quality": e.quality,
         "quality_lo": e.quality_lo, "quality_hi": e.quality_hi, "latency_p95_ms": e.latency_p95_ms,
         "latency_p50_ms": e.latency_p50_ms, "gmacs": e.gmacs, "energy_mj": e.energy_mj}
        for n, e in server.names.items()]}


def create_app(dm: Any, controller: Controller, *, token: str | None = None, max_body_bytes: int = 20 * 2**20,
               max_pixels: int = 40_000_000, max_batch: int = 8, max_wait_ms: float = 5.0, topk: int = 5,
               max_aspect: float = MAX_ASPECT, max_mask_pixels: int = MAX_MASK_PIXELS) -> FastAPI:
    """The FastAPI app (``dynavit serve`` runs it with uvicorn).

    ``max_pixels`` bounds the image as sent and as the model's transform makes it, ``max_aspect``
    its long side over its short side, ``max_mask_pixels`` a segmentation answer's mask.
    """
    server = Server(dm, controller, max_body_bytes, max_pixels, topk, Metrics(controller), max_aspect=max_aspect,
                    max_mask_pixels=max_mask_pixels)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.batcher = Batcher(dm, max_batch=max_batch, max_wait_ms=max_wait_ms, controller=controller)
        server.imaging = ThreadPoolExecutor(1, "dynavit-imaging")
        server.batcher.start()
        loop = asyncio.get_running_loop()
        x = torch.zeros(1, 3, *dm.input_size)
        for e in server.names.values():  # warm every path before declaring readiness
            await loop.run_in_executor(server.batcher.executor, server.batcher.forward, e.config, [x[0]])
        server.metrics.held(dm)  # warming made any int8 packs and solved corrections: count them too
        server.ready = True
        yield
        server.ready = False
        await server.batcher.close()
        server.imaging.shutdown(wait=True)

    app = FastAPI(title="dynavit", version="1", lifespan=lifespan,
                  description="Run-time adaptive ViT inference: the most accurate path within each request's budget.")
    app.add_middleware(BodyLimit, limit=max_body_bytes)  # inside the guard: auth first, and its 413s are counted
    _guard(app, server, token)
    _errors(app)
    _routes(app, server)
    return app


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error; a 413 also closes the connection, or the server would go on reading the rest of the body."""
    if status == 413:
        headers = {**(headers or {}), "Connection": "close"}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _guard(app: FastAPI, server: Server, token: str | None) -> None:
    """Auth and body size before a request is read; every answer counted by endpoint and status."""
    requests = server.metrics.requests

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if token and path != "/healthz" and not hmac.compare_digest(
                request.headers.get("authorization", "").encode(), f"Bearer {token}".encode()):
            requests.labels("other", "401").inc()
            return _error(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                          headers={"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > server.max_body_bytes
            except ValueError:
                requests.labels("other", "400").inc()
                return _error(400, f"Content-Length {length!r} is not a number")
            if too_big:
                requests.labels("other", "413").inc()
                return _error(413, f"body of {length} bytes exceeds the limit of {server.max_body_bytes}")
        response = await call_next(request)
        requests.labels(path if path in ROUTES else "other", str(response.status_code)).inc()
        return response


def _errors(app: FastAPI) -> None:
    """Every error as ``{"error": ...}`` with its status."""

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        return _error(e.status, e.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors()]
        return _error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))


def _routes(app: FastAPI, server: Server) -> None:
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        return JSONResponse({"ready": server.ready}, status_code=200 if server.ready else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(server.metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/configs")
    async def menu() -> dict[str, Any]:
        return configs(server)

    @app.post("/v1/infer")
    async def infer_route(request: Request, latency_ms: float | None = None, energy_mj: float | None = None,
                          gmacs: float | None = None, config: str | None = None) -> dict[str, Any]:
        budgets = {"latency_ms": latency_ms, "energy_mj": energy_mj, "gmacs": gmacs}
        return await infer(server, request, budgets, config)


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else v
