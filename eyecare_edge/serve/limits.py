"""What keeps one request from hurting the others: API key, Host check, body size, a bounded
queue of pipelines with a per-request deadline.

`--workers N` means N `Pipeline`s in this one process, handed out by `PipelinePool`, not N
uvicorn worker processes. Why: llama.cpp, ONNX Runtime and the image decoders release the GIL,
so N threads really run N answers at once; and one process gives one bounded queue (a 429 means
the *server* is full, not one of N processes chosen by the kernel), one `/metrics` that counts
every request (with N processes each scrape would see one process's numbers), one `/health`,
and one image-prefix cache shared by all pipelines (a second question about a photo reuses its
prefix whichever pipeline takes it). The GGUF is mmapped, so N pipelines share its weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from eyecare_edge.serve.errors import ApiError, error_body

# ---------------------------------------------------------------------- API key


def key_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison of two keys: both are hashed first, so the time depends on
    neither the key's length nor where the first differing character is."""
    if given is None:
        return False
    a = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
    b = hashlib.sha256(expected.encode("utf-8", "surrogateescape")).digest()
    return hmac.compare_digest(a, b)


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


# ---------------------------------------------------------------------- request guard


def is_loopback_host(host_header: str) -> bool:
    """Whether a Host header names this machine's loopback (localhost, 127.x.x.x, [::1])."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.split(":")[0]
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RequestGuard:
    """ASGI middleware in front of everything: counts every response by path and status (so
    413s and 500s are in /metrics too), refuses non-loopback Host headers when the server is
    bound to loopback (a web page cannot reach it through DNS rebinding), answers a body over
    `max_bytes` with 413 before it is read (Content-Length) or as soon as the received bytes pass
    the limit (chunked uploads), and a body that has not fully arrived `body_timeout_s` after the
    request began with 408. Refusals use the API's JSON error shape.

    Why the body deadline: uvicorn has none, so a client that declares a body and then sends one
    byte every few seconds (or nothing) held its connection and coroutine forever (seen: still
    open after 20 s of silence); a few hundred of those exhaust the process's file descriptors
    and nobody else can connect. The deadline covers the whole body, not the gap between
    chunks, so trickling does not extend it. (Slow *headers* are uvicorn's to read, before this
    middleware runs: put a reverse proxy in front of a server reachable from untrusted hosts.)"""

    def __init__(
        self,
        app: Any,
        *,
        max_bytes: int,
        loopback_only: bool,
        count: Callable[[str, int], None],
        known_paths: frozenset[str],
        body_timeout_s: float = 60.0,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s
        self.loopback_only = loopback_only
        self.count = count
        self.known_paths = known_paths

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            f"the request body is larger than this server's limit ({self.max_bytes / 2**20:g} MB, --max-body-mb)",
            "request_too_large",
        )

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        path = path if path in self.known_paths else "other"
        status: list[int] = []

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            refusal = self._refusal(headers)
            if refusal is not None:
                # A client that sent `Expect: 100-continue` (curl does above 1 MB) waits for our
                # go-ahead before uploading: reading would send "100 Continue" and make it upload
                # everything just to be refused, so it gets the 413 at once.
                waits = headers.get(b"expect", b"").lower() == b"100-continue"
                if refusal.status == 413 and not waits:  # uvicorn delivers no body after the answer
                    with contextlib.suppress(TimeoutError, asyncio.TimeoutError):  # a trickle: answer anyway
                        await asyncio.wait_for(_discard_body(receive, LINGER_BYTES), self.body_timeout_s)
                await send_error(counted_send, refusal)
                return
            received = 0
            body_done = False
            body_deadline = time.monotonic() + self.body_timeout_s

            async def limited() -> dict:
                nonlocal received, body_done
                if body_done:  # later receives wait for the client to leave: no deadline
                    return await receive()
                try:
                    message = await asyncio.wait_for(receive(), max(body_deadline - time.monotonic(), 0.001))
                except (TimeoutError, asyncio.TimeoutError):
                    body_done = True  # answered now; the rest of the body is not waited for
                    raise ApiError(
                        408,
                        f"the request body did not arrive within {self.body_timeout_s:g} s "
                        f"({received} bytes received; --body-timeout)",
                        "timeout",
                    ) from None
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_bytes:
                        raise self._too_large()
                    body_done = not message.get("more_body", False)
                else:
                    body_done = True
                return message

            await self.app(scope, limited, counted_send)
        finally:
            self.count(path, status[0] if status else 500)

    def _refusal(self, headers: dict[bytes, bytes]) -> ApiError | None:
        host = headers.get(b"host")
        if self.loopback_only and host is not None and not is_loopback_host(host.decode("latin-1")):
            return ApiError(
                400,
                f"Host {host.decode('latin-1')!r} is not this machine's loopback; this server is bound to loopback",
            )
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            return ApiError(400, "bad Content-Length header")
        if length is not None and int(length) > self.max_bytes:
            return self._too_large()
        return None


# A refused upload is read and thrown away, up to this many bytes, before the 413 is sent (uvicorn
# delivers no more body once a response is complete): closing on unread data resets the connection, and a client still sending (urllib, most camera SDKs) then
# gets a broken pipe instead of the 413 (seen in tests/test_serve_screen.py under load). nginx's
# lingering close does the same.
LINGER_BYTES = 64 << 20


async def _discard_body(receive: Callable, limit: int) -> None:
    """Read and drop request body messages until the body ends or `limit` bytes were dropped."""
    dropped = 0
    while dropped <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def send_error(send: Callable, err: ApiError) -> None:
    """Answer a raw ASGI request with the JSON error body."""
    import json

    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------- pipeline pool


class Ticket:
    """A request's place in the pool: taken by `admit`, released exactly once."""

    def __init__(self, pool: PipelinePool, deadline: float) -> None:
        self.pool = pool
        self.deadline = deadline
        self.started = False
        self.cancelled = False  # set when the client is gone: the generation stops at its next piece
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.pool.pending -= 1

    def release_unless_started(self) -> None:
        if not self.started:
            self.release()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


class RequestTimeout(Exception):
    """Raised inside a generation (from its stream callback) when the request's time is up."""


class Cancelled(Exception):
    """Raised inside a generation when its client went away."""


class PipelinePool:
    """N pipelines, at most `workers + queue` requests admitted (running or waiting); more get
    429 with a Retry-After estimated from recent request durations. All methods but the job
    itself run on the event loop thread."""

    def __init__(self, workers: int, queue: int, timeout_s: float) -> None:
        self.workers = workers
        self.capacity = workers + queue
        self.timeout_s = timeout_s
        self.pending = 0
        self.running = 0
        self.stopping = False  # set at shutdown: running generations stop at their next piece
        self._free: asyncio.Queue | None = None
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pipeline")
        self._mean_s = 1.0
        self.pipelines: list[Any] = []

    def attach(self, pipelines: list[Any]) -> None:
        """Make the loaded pipelines available (call on the event loop)."""
        self._free = asyncio.Queue()
        for p in pipelines:
            self._free.put_nowait(p)
        self.pipelines = list(pipelines)

    @property
    def waiting(self) -> int:
        return self.pending - self.running

    def retry_after_s(self) -> int:
        ahead = max(self.pending - self.workers + 1, 1)
        return min(max(math.ceil(self._mean_s * ahead / self.workers), 1), 120)

    def admit(self) -> Ticket:
        if self.pending >= self.capacity:
            raise ApiError(
                429,
                f"the server is busy ({self.pending} requests running or queued, the limit is "
                f"{self.capacity}: --workers + --queue); retry later",
                "rate_limit_exceeded",
                headers={"Retry-After": str(self.retry_after_s())},
            )
        self.pending += 1
        return Ticket(self, time.monotonic() + self.timeout_s)

    async def run(self, ticket: Ticket, job: Callable[[Any], Any]) -> Any:
        """Run `job(pipeline)` in a worker thread once a pipeline is free. The ticket is released
        when the job ends (even when the awaiting request was cancelled: the thread finishes
        first, then the pipeline goes back)."""
        ticket.started = True
        try:
            if self._free.empty():
                pipe = await asyncio.wait_for(self._free.get(), timeout=max(ticket.remaining(), 0.001))
            else:  # a free pipeline is taken at once, whatever the deadline
                pipe = self._free.get_nowait()
        except (TimeoutError, asyncio.TimeoutError):
            ticket.release()
            raise ApiError(
                503,
                f"no worker became free within the request timeout ({self.timeout_s:g} s)",
                "timeout",
                headers={"Retry-After": str(self.retry_after_s())},
            ) from None
        except BaseException:
            ticket.release()
            raise
        self.running += 1
        started = time.monotonic()
        future = asyncio.get_running_loop().run_in_executor(self._executor, job, pipe)

        def done(f: asyncio.Future) -> None:
            if not f.cancelled():
                f.exception()  # read here: the request may have been cancelled and never reads it
            self.running -= 1
            self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - started)
            self._free.put_nowait(pipe)
            ticket.release()

        future.add_done_callback(done)
        return await asyncio.shield(future)

    def shutdown(self) -> None:
        self.stopping = True
        self._executor.shutdown(wait=True, cancel_futures=True)


__all__ = [
    "Cancelled",
    "PipelinePool",
    "RequestGuard",
    "RequestTimeout",
    "Ticket",
    "bearer_token",
    "error_body",
    "is_loopback_host",
    "key_matches",
    "send_error",
]
