"""The FastAPI application: routes, error mapping, loading in the background.

The server listens before the bundle is loaded, so `/health` can say 503 ("loading") to an
orchestrator instead of refusing connections; the pipelines are built in a thread and attached
to the pool when ready. A load failure is reported on `/health` and stops the server (exit 1).

Every failure a client can cause is an `ApiError` (4xx with `{"error": {...}}`); anything else is
logged and answered 500 in the same shape, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from eyecare_edge.bundle import Manifest
from eyecare_edge.serve.errors import ApiError, error_body, load_json
from eyecare_edge.serve.jobs import (
    SSEResponse,
    abandon,
    as_api_error,
    make_job,
    run_job,
    start_stream,
    stream_answer,
    wait_or_client_gone,
)
from eyecare_edge.serve.limits import (
    PipelinePool,
    RequestGuard,
    bearer_token,
    key_matches,
)
from eyecare_edge.serve.media import MediaPolicy, load_images
from eyecare_edge.serve.metrics import Metrics
from eyecare_edge.serve.openai_schema import (
    completion_body,
    completion_id,
    now,
    parse_chat_request,
)

log = logging.getLogger("eyecare_edge.serve")
KNOWN_PATHS = frozenset(
    {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/screen", "/v1/protocols"}
)


@dataclass
class ServeConfig:
    """How the server runs (the `serve` command's options)."""

    bundle: Path
    model_id: str
    manifest: Manifest
    api_key: str | None = None
    workers: int = 1
    queue: int = 8
    timeout_s: float = 300.0
    max_body_bytes: int = 32 << 20
    body_timeout_s: float = 60.0
    max_images: int = 4
    media: MediaPolicy = field(default_factory=MediaPolicy)
    loopback_only: bool = True
    clinical: Any = None  # serve.screen.ClinicalConfig: POST /v1/screen, GET /v1/protocols
    clinical_unavailable: str = "the clinical extra is not installed: pip install 'eyecare-edge[clinical]'"


class ServerState:
    """What the routes share: config, pool, metrics, loading status."""

    def __init__(self, config: ServeConfig, loader: Callable[[], list[Any]]) -> None:
        self.config = config
        self.loader = loader
        self.pool = PipelinePool(config.workers, config.queue, config.timeout_s)
        self.metrics = Metrics()
        self.status = "loading"
        self.load_error: str | None = None
        self.on_fatal: Callable[[], None] | None = None
        self.prefix_cache: Any = None
        self.n_ctx = 0
        self.loaded = ""

    @property
    def ready(self) -> bool:
        return self.status == "ok"

    def start_loading(self, loop: asyncio.AbstractEventLoop) -> threading.Thread:
        def work() -> None:
            try:
                pipes = self.loader()
            except Exception as e:
                log.error("loading %s failed: %s", self.config.bundle, e)
                loop.call_soon_threadsafe(self._failed, str(e))
                return
            loop.call_soon_threadsafe(self._loaded, pipes)

        thread = threading.Thread(target=work, name="bundle-loader", daemon=True)
        thread.start()
        return thread

    def _loaded(self, pipes: list[Any]) -> None:
        self.pool.attach(pipes)
        self.prefix_cache = getattr(pipes[0], "prefix_cache", None)
        self.n_ctx = pipes[0].lm.n_ctx
        self.loaded = pipes[0].describe()
        self.status = "ok"
        log.info("ready: %d pipeline(s); %s", len(pipes), self.loaded)

    def _failed(self, message: str) -> None:
        self.status = "error"
        self.load_error = message
        if self.on_fatal is not None:
            self.on_fatal()

    def close(self) -> None:
        self.pool.shutdown()
        for pipe in self.pool.pipelines:
            with contextlib.suppress(Exception):
                pipe.close()


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _static_page() -> str:
    return resources.files("eyecare_edge.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def add_screen_routes(
    app: FastAPI,
    state: ServerState,
    require_key: Callable[[Request], None],
    require_ready: Callable[[], None],
) -> None:
    """POST /v1/screen (run a protocol on one image, file SR + FHIR) and GET /v1/protocols."""
    from eyecare_edge.serve.screen import clinical_unavailable, run_screen_request
    from eyecare_edge.serve.screen_schema import protocols_body, read_screen_request, screen_body

    cfg = state.config

    @app.get("/v1/protocols")
    async def protocols(request: Request) -> JSONResponse:
        require_key(request)
        if cfg.clinical is None:
            raise clinical_unavailable(cfg.clinical_unavailable)
        return JSONResponse(protocols_body(cfg.clinical))

    @app.post("/v1/screen")
    async def screen(request: Request) -> JSONResponse:
        require_key(request)
        if cfg.clinical is None:
            raise clinical_unavailable(cfg.clinical_unavailable)
        require_ready()
        t0 = time.monotonic()
        req = await read_screen_request(request, cfg.clinical, model_id=cfg.model_id, n_ctx=state.n_ctx)
        result = await run_screen_request(state, req, t0, request.receive)
        rid = "screen-" + completion_id().split("-", 1)[-1]
        body = screen_body(
            result,
            rid=rid,
            created=now(),
            model_id=cfg.model_id,
            fingerprint=state.pool.pipelines[0].digest[:16],
        )
        return JSONResponse(body)


def create_app(state: ServerState) -> FastAPI:
    """The ASGI app for `state` (loading starts when the app starts)."""
    cfg = state.config

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start_loading(asyncio.get_running_loop())
        yield
        await asyncio.get_running_loop().run_in_executor(None, state.close)

    app = FastAPI(title="eyecare-edge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    page = _static_page()

    # ------------------------------------------------------------------ error mapping

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {err.detail}"
        return JSONResponse(error_body(message, kind), status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error ({type(err).__name__}: {err})", "server_error"), 500)

    def require_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        if not key_matches(bearer_token(request.headers.get("authorization")), cfg.api_key):
            raise ApiError(
                401,
                "missing or wrong API key (send 'Authorization: Bearer KEY')",
                "authentication_error",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def require_ready() -> None:
        if state.status == "loading":
            raise ApiError(
                503, "the bundle is still loading; retry shortly", "unavailable", headers={"Retry-After": "2"}
            )
        if state.status != "ok":
            raise ApiError(503, f"the bundle failed to load: {state.load_error}", "unavailable")

    # ------------------------------------------------------------------ routes

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(
            page,
            headers={
                "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                "script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
                "X-Content-Type-Options": "nosniff",
            },
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": state.status, "model": cfg.model_id}
        if state.load_error:
            body["error"] = state.load_error
        return JSONResponse(body, status_code=200 if state.ready else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        require_key(request)
        m = cfg.manifest
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": cfg.model_id,
                        "object": "model",
                        "created": int(cfg.bundle.joinpath("manifest.json").stat().st_mtime),
                        "owned_by": "eyecare-edge",
                        "input_modalities": ["text", "image"],
                        "output_modalities": ["text"],
                        "precisions": {
                            "llm": m.precisions("llm", "gguf"),
                            "vision": sorted(
                                {f.precision for f in m.files if f.role == "vision" and f.format == "onnx"}
                            ),
                        },
                        "loaded": state.loaded or None,
                        "max_images": cfg.max_images,
                        "context_length": state.n_ctx or None,
                        "bundle_digest": m.digest(),
                    }
                ],
            }
        )

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        require_key(request)
        pool = state.pool
        gauges = {
            "eyecare_queue_depth": ("Requests admitted and waiting for a pipeline.", pool.waiting),
            "eyecare_requests_running": ("Requests being answered now.", pool.running),
            "eyecare_queue_capacity": ("Requests admitted at most (--workers + --queue).", pool.capacity),
            "eyecare_ready": ("1 once the bundle is loaded.", 1 if state.ready else 0),
        }
        cache = state.prefix_cache
        text = state.metrics.render(gauges, cache.stats if cache is not None else None)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        require_key(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(
                415,
                f"Content-Type must be application/json, got {ctype or 'none'!r}",
                "invalid_request_error",
            )
        require_ready()
        t0 = time.monotonic()
        body = load_json(await request.body())
        req = parse_chat_request(
            body, model_id=cfg.model_id, max_images=cfg.max_images, max_tokens_limit=state.n_ctx
        )
        try:  # placeholders in the question must match the images: say so now, not mid-stream
            state.pool.pipelines[0].prompt_pieces(req.question, len(req.image_urls))
        except ValueError as e:
            raise ApiError(400, str(e), param="messages[0].content") from None
        # Admitted before decoding, so the queue bound covers decoding work too.
        ticket = state.pool.admit()
        try:
            images = await asyncio.get_running_loop().run_in_executor(
                None, load_images, req.image_urls, cfg.media
            )
        except BaseException:
            ticket.release()
            raise
        if req.stream:
            started = await start_stream(state, request.receive, req, images, ticket, t0)
            return SSEResponse(stream_answer(state, req, started, t0), on_close=started.close)
        task = run_job(state, ticket, make_job(req, images, ticket, t0, None, None))
        try:
            await wait_or_client_gone(request.receive, task)
            answer, ttft = task.result()
        except BaseException as e:
            if not task.done():
                abandon(task, ticket)
            if isinstance(e, Exception):
                raise as_api_error(e) from None
            raise
        state.metrics.observe_answer(ttft_s=ttft, total_s=time.monotonic() - t0, answer=answer)
        fingerprint = state.pool.pipelines[0].digest[:16]
        return JSONResponse(completion_body(completion_id(), now(), cfg.model_id, answer, fingerprint))

    add_screen_routes(app, state, require_key, require_ready)

    app.add_middleware(
        RequestGuard,
        max_bytes=cfg.max_body_bytes,
        body_timeout_s=cfg.body_timeout_s,
        loopback_only=cfg.loopback_only,
        count=state.metrics.count_request,
        known_paths=KNOWN_PATHS,
    )
    return app
