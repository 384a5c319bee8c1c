"""`krea2 serve`: one long-lived pipeline behind an HTTP API shaped like OpenAI's images API, and a web page.

Endpoints: `POST /v1/images/generations` (OpenAI fields `prompt`, `n`, `size` "WxH", `response_format` "b64_json",
plus krea2's `steps`, `guidance`, `mu`, `seed`, `preset`, `lora` (LoRAs loaded at start, switched on per request),
`style_refs` and `style_strength` (with a style encoder)), `GET /healthz` (status, queue depth and the running
batch's progress), `GET /metrics` (Prometheus), `GET /` (the page).

Requests wait in a bounded queue (full: 429 with Retry-After) for one worker thread that owns the pipeline;
it takes the oldest request and every queued one of the same shape (size, steps, guidance, mu) up to `max_batch`
images, and samples them in one batch, each image with its own request's seed (`Pipeline.generate(seeds=...)`), so
a request's images are the same as `krea2 generate --seed S` gives. A request that outlives `timeout_s` gets 504 and
is dropped from the queue; a client that disconnects while it waits has its request dropped too. Every field is
checked with the CLI's rules (`krea2.limits`) and a bad one is a 400 JSON error naming it; bodies over
`max_body_bytes` get 413 before they are read in full.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import random
import re
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from fastapi import Request  # at module level: FastAPI resolves the endpoint's annotation from here
from starlette.exceptions import HTTPException as StarletteHTTPException

from krea2.errors import Krea2Error
from krea2.sampling import PRESETS, sampling_preset

PAGE = Path(__file__).resolve().parent / "assets" / "web" / "index.html"
SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")


@dataclass
class ServeConfig:
    checkpoint: str = "world"
    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 32  # requests waiting (not counting the batch being sampled); full: 429
    max_batch: int = 8  # images sampled together
    max_n: int = 8  # images per request
    timeout_s: float = 120.0  # per request, queueing included: 504 after it
    max_body_bytes: int = 64 * 1024
    max_pixels: int = 1024 * 1024  # width x height per image
    max_prompt_chars: int = 2000
    retry_after_s: int = 2
    style_encoder: str | None = None  # world or a style / style_po stage folder: enables `style_refs`
    loras: tuple[str, ...] = ()  # FILE or NAME=FILE, loaded at start (scale 0); requests switch them on by name

    def __post_init__(self):
        for option, value in (("--max-queue", self.max_queue), ("--max-batch", self.max_batch),
                              ("--max-n", self.max_n), ("--max-body", self.max_body_bytes),
                              ("--max-pixels", self.max_pixels)):
            if value < 1:
                raise Krea2Error(f"{option} must be >= 1, got {value}")
        if not self.timeout_s > 0:
            raise Krea2Error(f"--timeout must be > 0 seconds, got {self.timeout_s}")
        if not 0 <= self.port <= 65535:
            raise Krea2Error(f"--port must be in 0..65535, got {self.port}")


class FieldError(Exception):
    """A bad request field: 400 with {"error": {"message", "type", "param"}} (OpenAI's error shape)."""

    def __init__(self, param: str | None, message: str, status: int = 400):
        super().__init__(message)
        self.param, self.message, self.status = param, message, status


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param}}


def _request_model():
    from pydantic import BaseModel, ConfigDict, Field

    class StyleRef(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

        b64_json: str  # a PNG, JPEG or WebP, base64
        weight: float | int = 1.0

    class LoraUse(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

        name: str
        scale: float | int = 1.0

    class GenerationRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

        prompt: str
        n: int = Field(1, ge=1)
        size: str | None = None
        response_format: Literal["b64_json"] = "b64_json"
        model: str | None = None  # OpenAI clients send it; the server has one model
        user: str | None = None
        steps: int | None = None
        guidance: float | int | None = None
        mu: float | int | None = None
        seed: int | None = Field(None, ge=0, lt=2**63)
        preset: Literal["raw", "turbo"] | None = None
        style_refs: list[StyleRef] | None = Field(None, min_length=1, max_length=10)
        lora: list[LoraUse] | None = Field(None, max_length=4)
        style_strength: float | int = 0.5

    return GenerationRequest


@dataclass
class Shape:
    """What must agree for requests to share a batch."""

    width: int
    height: int
    steps: int
    guidance: float
    mu: float | None
    style: int = 0  # requests with style references never share a batch (their references differ): a unique id
    loras: tuple = ()  # ((name, scale), ...) sorted: the LoRAs switched on for this batch


@dataclass
class Job:
    prompt: str
    seeds: list[int]
    shape: Shape
    sampling: object  # SamplingConfig
    style: object = None  # krea2.style.StyleMix, or None
    done: threading.Event = field(default_factory=threading.Event)
    images: list | None = None
    error: str | None = None
    cancelled: bool = False
    queued_at: float = field(default_factory=time.perf_counter)

    @property
    def n(self) -> int:
        return len(self.seeds)


class QueueFull(Exception):
    pass


class Batcher:
    """The bounded queue and the worker thread that owns the pipeline."""

    def __init__(self, pipe, cfg: ServeConfig, metrics: Metrics):
        self.pipe, self.cfg, self.metrics = pipe, cfg, metrics
        self.loras: list[str] = []  # LoRAs loaded at start, by name
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.progress = {"done": 0, "total": 0, "images": 0}
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="krea2-generate", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=30)

    def depth(self) -> int:
        with self.cond:
            return sum(not j.cancelled for j in self.pending)

    def submit(self, job: Job) -> None:
        with self.cond:
            live = [j for j in self.pending if not j.cancelled]
            if len(live) >= self.cfg.max_queue:
                raise QueueFull
            self.pending = deque(live)
            self.pending.append(job)
            self.metrics.queue_depth.set(len(self.pending))
            self.cond.notify()

    def take(self) -> list[Job] | None:
        """The oldest live job and every queued job of its shape that fits in max_batch images."""
        with self.cond:
            while not self.stopping and not any(not j.cancelled for j in self.pending):
                self.cond.wait(timeout=0.5)
            if self.stopping:
                return None
            live = [j for j in self.pending if not j.cancelled]
            first, rest = live[0], live[1:]
            batch, room, keep = [first], self.cfg.max_batch - first.n, []
            for j in rest:
                if j.shape == first.shape and j.n <= room:
                    batch.append(j)
                    room -= j.n
                else:
                    keep.append(j)
            self.pending = deque(keep)
            self.metrics.queue_depth.set(len(keep))
            return batch

    def run(self) -> None:
        import torch

        while True:
            batch = self.take()
            if batch is None:
                return
            prompts = [j.prompt for j in batch for _ in j.seeds]
            seeds = [s for j in batch for s in j.seeds]
            shape = batch[0].shape
            self.progress = {"done": 0, "total": 1, "images": len(prompts)}

            def tick(done: int, total: int, n: int = len(prompts)) -> None:
                self.progress = {"done": done, "total": total, "images": n}

            t0 = time.perf_counter()
            try:
                active = dict(shape.loras)
                for name in self.loras:  # the batch's LoRAs on, every other loaded one off (scale 0 is exact)
                    self.pipe.set_lora_scale(name, active.get(name, 0.0))
                with torch.inference_mode():
                    images = self.pipe.generate(prompts, batch[0].sampling, seeds=seeds, width=shape.width,
                                                height=shape.height, batch_size=self.cfg.max_batch, progress=tick,
                                                style=batch[0].style)
                pngs = [png_base64(im) for im in images]
            except Exception as e:  # a failed batch answers its requests with a 500 instead of hanging them
                for j in batch:
                    j.error = f"generation failed: {type(e).__name__}: {e}"
                    j.done.set()
                continue
            finally:
                self.progress = {"done": 0, "total": 0, "images": 0}
            dt = time.perf_counter() - t0
            self.metrics.images.inc(len(pngs))
            self.metrics.images_per_s.set(len(pngs) / max(dt, 1e-9))
            self.metrics.batch_images.observe(len(pngs))
            i = 0
            for j in batch:
                j.images, i = pngs[i:i + j.n], i + j.n
                j.done.set()


def png_base64(image) -> str:
    """(3, H, W) in [-1, 1] -> base64 PNG."""
    from krea2.pipeline import to_pil

    buf = io.BytesIO()
    to_pil(image[None].float().cpu())[0].save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class Metrics:
    """Prometheus metrics in the app's own registry (several apps in one process stay apart)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("krea2_queue_depth", "Requests waiting for the generator", registry=self.registry)
        self.requests = Counter("krea2_requests", "Generation requests by HTTP status", ["code"],
                                registry=self.registry)
        self.latency = Histogram("krea2_request_latency_seconds", "Generation request latency",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
                                 registry=self.registry)
        self.images = Counter("krea2_images", "Images generated", registry=self.registry)
        self.images_per_s = Gauge("krea2_images_per_second", "Images per second of the last batch",
                                  registry=self.registry)
        self.batch_images = Histogram("krea2_batch_images", "Images per sampled batch",
                                      buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)


def parse_size(size: str | None, pipe, cfg: ServeConfig) -> tuple[int, int]:
    """"WxH" -> (width, height) snapped up to the token size, as `krea2 generate` does; FieldError otherwise."""
    from krea2.limits import check_side

    if size is None:
        return pipe.snap_size(None, None)
    m = SIZE.match(size)
    if not m:
        raise FieldError("size", f"size must look like WIDTHxHEIGHT, e.g. \"{pipe.resolution}x{pipe.resolution}\", "
                                 f"got {size!r}")
    width, height = int(m.group(1)), int(m.group(2))
    try:
        check_side(width, "width")
        check_side(height, "height")
    except Krea2Error as e:
        raise FieldError("size", str(e)) from None
    width, height = pipe.snap_size(width, height)
    if width * height > cfg.max_pixels:
        raise FieldError("size", f"size {width}x{height} is {width * height} pixels, over this server's limit of "
                                 f"{cfg.max_pixels} (--max-pixels)")
    return width, height


def build_job(body: dict, pipe, cfg: ServeConfig, encoder=None, loaded=None) -> Job:
    """Validate a request body into a Job, or raise FieldError naming the first bad field."""
    from pydantic import ValidationError

    from krea2.limits import check_finite, check_steps

    try:
        req = _request_model().model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None  # the field, not a union member ("guidance.float")
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise FieldError(param, f"{param}: {msg}" if param else msg) from None
    if not req.prompt.strip():
        raise FieldError("prompt", "prompt is empty; give it some text (an empty prompt is the unconditional input)")
    if len(req.prompt) > cfg.max_prompt_chars:
        raise FieldError("prompt", f"prompt is {len(req.prompt)} characters, over the limit of {cfg.max_prompt_chars}")
    if req.n > cfg.max_n:
        raise FieldError("n", f"n must be between 1 and {cfg.max_n} (--max-n), got {req.n}")
    try:
        check_steps(req.steps)
    except Krea2Error as e:
        raise FieldError("steps", str(e)) from None
    for name in ("guidance", "mu"):
        try:
            check_finite(getattr(req, name), name)
        except Krea2Error as e:
            raise FieldError(name, str(e)) from None
    width, height = parse_size(req.size, pipe, cfg)
    base = pipe.sampling
    if req.preset is not None:  # the preset's steps, guidance and mu; the checkpoint keeps its resolution rule
        p = sampling_preset(req.preset)
        base = replace(base, steps=p.steps, guidance=p.guidance, mu=p.mu)
    overrides = {k: v for k, v in (("steps", req.steps), ("guidance", req.guidance), ("mu", req.mu)) if v is not None}
    sampling = replace(base, **{k: (float(v) if k != "steps" else v) for k, v in overrides.items()})
    seed = req.seed if req.seed is not None else random.randrange(2**31)
    style = style_mix(req, encoder, cfg) if req.style_refs else None
    loras = lora_uses(req, set(loaded or ()))
    shape = Shape(width, height, sampling.steps, float(sampling.guidance), sampling.mu,
                  style=0 if style is None else next(_STYLE_IDS), loras=loras)
    return Job(req.prompt, [seed + i for i in range(req.n)], shape, sampling, style)


_STYLE_IDS = itertools.count(1)


def lora_uses(req, loaded: set[str]) -> tuple:
    """The request's `lora` list as sorted ((name, scale), ...) of LoRAs loaded at start; FieldError naming `lora`
    for an unknown name, a name given twice or a scale outside [-4, 4]."""
    import math

    uses = {}
    for use in req.lora or []:
        if use.name not in loaded:
            known = ", ".join(sorted(loaded)) or "none (start the server with --lora NAME=FILE)"
            raise FieldError("lora", f"LoRA {use.name!r} is not loaded; loaded: {known}")
        if use.name in uses:
            raise FieldError("lora", f"LoRA {use.name!r} is given twice")
        if not (math.isfinite(use.scale) and -4 <= use.scale <= 4):
            raise FieldError("lora", f"LoRA {use.name!r} scale must be in [-4, 4], got {use.scale}")
        uses[use.name] = float(use.scale)
    return tuple(sorted(uses.items()))


def load_loras(pipe, specs) -> list[str]:
    """Load each `FILE` or `NAME=FILE` into the pipeline switched off (scale 0); returns the names."""
    from pathlib import Path

    names = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        if not Path(path).is_file():
            raise Krea2Error(f"--lora {spec}: file not found")
        names.append(pipe.load_lora(path, 0.0, name=name))
    return names


def style_mix(req, encoder, cfg: ServeConfig):
    """The request's style references decoded (a pixel cap before decoding, as curation's checked decoder) and
    encoded into a StyleMix; FieldError naming `style_refs` or `style_strength` for anything wrong."""
    import binascii

    import torch

    from krea2.style import decode_reference, mix_references

    if encoder is None:
        raise FieldError("style_refs", "this server has no style encoder; start it with --style-encoder DIR")
    tokens, weights = [], []
    for i, ref in enumerate(req.style_refs):
        try:
            image = decode_reference(base64.b64decode(ref.b64_json, validate=True), f"style_refs[{i}]",
                                     cfg.max_pixels)
        except (binascii.Error, ValueError):
            raise FieldError("style_refs", f"style_refs[{i}].b64_json is not base64") from None
        except Krea2Error as e:
            raise FieldError("style_refs", str(e)) from None
        with torch.no_grad():
            tokens.append(encoder(image[None]))
        weights.append(float(ref.weight))
    try:
        return mix_references(tokens, weights, float(req.style_strength), **encoder.injection_kwargs)
    except Krea2Error as e:
        raise FieldError("style_strength" if "strength" in str(e) else "style_refs", str(e)) from None


class BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes, from Content-Length or while it streams in (the
    body is buffered up to the limit, then handed on), so an oversized upload is never read in full."""

    def __init__(self, app, limit: int, on_reject=None):
        self.app, self.limit, self.on_reject = app, limit, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self.reject(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self.reject(send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then the real channel: it reports a client that disconnects

        await self.app(scope, replay, send)

    async def reject(self, send):
        if self.on_reject is not None:
            self.on_reject()
        body = json.dumps(error_body(f"request body over {self.limit} bytes (--max-body)", None,
                                     "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def create_app(cfg: ServeConfig, pipe=None):
    """The ASGI app to run (the FastAPI app behind the body limit) and the FastAPI app itself, for `cfg`, with the
    checkpoint's pipeline loaded (or `pipe`, already loaded)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    if pipe is None:
        from krea2.pipeline import load_pipeline

        pipe = load_pipeline(cfg.checkpoint)
    metrics = Metrics()
    batcher = Batcher(pipe, cfg, metrics)
    batcher.loras = load_loras(pipe, cfg.loras)
    encoder = None
    if cfg.style_encoder:
        from krea2.style import check_style_encoder, load_style_encoder

        encoder = load_style_encoder(cfg.style_encoder)
        check_style_encoder(encoder, pipe.model)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="krea2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.cfg, app.state.metrics = batcher, cfg, metrics

    def answer(status: int, body: dict, t0: float, headers: dict | None = None, queued: bool = False
               ) -> JSONResponse:
        """The response, counted by status; latency is observed for requests that reached the queue only, so
        rejected ones (400, 429) do not pull the generation latency down. One log line per queued request."""
        metrics.requests.labels(str(status)).inc()
        if queued:
            dt = time.perf_counter() - t0
            metrics.latency.observe(dt)
            print(f"krea2 serve: {status} in {dt:.2f} s", file=sys.stderr, flush=True)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # 404/405 in the same error shape as every other answer
        return JSONResponse(error_body(str(exc.detail), None, "not_found" if exc.status_code == 404 else
                                       "invalid_request_error"), status_code=exc.status_code)

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        t0 = time.perf_counter()
        raw = await request.body()
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return answer(400, error_body("the request body is not valid JSON"), t0)
        if not isinstance(body, dict):
            return answer(400, error_body("the request body must be a JSON object with at least \"prompt\""), t0)
        try:
            job = build_job(body, pipe, cfg, encoder, batcher.loras)
        except FieldError as e:
            return answer(e.status, error_body(e.message, e.param), t0)
        try:
            batcher.submit(job)
        except QueueFull:
            return answer(429, error_body(f"the queue is full ({cfg.max_queue} requests); retry later", None,
                                          "rate_limit_exceeded"), t0, {"Retry-After": str(cfg.retry_after_s)})
        deadline = t0 + cfg.timeout_s
        while not job.done.is_set():
            if await request.is_disconnected():
                job.cancelled = True
                metrics.requests.labels("499").inc()  # nginx's "client closed request"
                return Response(status_code=499)
            if time.perf_counter() > deadline:
                job.cancelled = True
                return answer(504, error_body(f"the request did not finish within {cfg.timeout_s:g} s", None,
                                              "timeout"), t0, queued=True)
            await asyncio.sleep(0.02)
        if job.error:
            return answer(500, error_body(job.error, None, "server_error"), t0, queued=True)
        s = job.shape
        return answer(200, {"created": int(time.time()),
                            "data": [{"b64_json": b, "seed": seed, "revised_prompt": None}
                                     for b, seed in zip(job.images, job.seeds)],
                            "krea2": {"size": f"{s.width}x{s.height}", "steps": s.steps, "guidance": s.guidance,
                                      "mu": s.mu, "prompt": job.prompt, "lora": dict(s.loras),
                                      "seconds": round(time.perf_counter() - t0, 4)}}, t0, queued=True)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "checkpoint": cfg.checkpoint, "queue_depth": batcher.depth(),
                "max_queue": cfg.max_queue, "progress": batcher.progress,
                "defaults": {"size": f"{pipe.resolution}x{pipe.resolution}", "steps": pipe.sampling.steps,
                             "guidance": pipe.sampling.guidance},
                "presets": {name: {"steps": p.steps, "guidance": p.guidance} for name, p in PRESETS.items()},
                "loras": batcher.loras, "style_refs": encoder is not None}

    @app.get("/metrics")
    async def prometheus():
        metrics.queue_depth.set(batcher.depth())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text())

    return BodyLimit(app, cfg.max_body_bytes, on_reject=lambda: metrics.requests.labels("413").inc()), app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or Krea2Error naming the address and the reason."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:  # socket.gaierror included: an unknown host name
        raise Krea2Error(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --host or --port"
                         ) from None
    return sock


def serve(cfg: ServeConfig) -> None:
    """Bind (failing fast, with the bound port reported), load the checkpoint and serve until interrupted."""
    import uvicorn

    sock = listen(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    wrapped, _ = create_app(cfg)
    print(f"krea2 serve: {cfg.checkpoint} on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    uvicorn.Server(uvicorn.Config(wrapped, log_level="warning")).run(sockets=[sock])
