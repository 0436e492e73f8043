"""Answering one request on a pipeline thread: the job, the OpenAI chunk stream, error mapping.

The job runs `Pipeline.ask` with a stream callback that (1) passes text pieces to the event loop
for server-sent events, (2) stops the generation when the request's deadline has passed, its
client is gone or the server is shutting down (by raising inside the callback: llama.cpp's loop
unwinds at the next token and the pipeline stays usable), and (3) strips the pieces the way
`Answer.text` is stripped, so streamed and non-streamed answers are the same text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse

from eyecare_edge.images import ImageError
from eyecare_edge.llm import LLMError
from eyecare_edge.serve.errors import ApiError
from eyecare_edge.serve.limits import Cancelled, RequestTimeout
from eyecare_edge.serve.openai_schema import (
    FINISH_REASONS,
    ChatRequest,
    chunk_body,
    completion_id,
    now,
    usage,
)

log = logging.getLogger("eyecare_edge.serve")


class SSEResponse(StreamingResponse):
    """Server-sent events; `on_close` runs however the response ends (client gone included)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def make_job(
    req: ChatRequest,
    images: list,
    ticket: Any,
    t0: float,
    loop: asyncio.AbstractEventLoop | None,
    queue: asyncio.Queue | None,
) -> Callable[[Any], tuple[Any, float]]:
    """The work done on a pipeline thread: ask, streaming pieces to `queue` when given, aborting
    when the request's deadline passes or its client is gone."""
    first: list[float] = []
    strip = _Strip()

    def on_text(piece: str) -> None:
        if not first:
            first.append(time.monotonic())
        if ticket.cancelled or ticket.pool.stopping:
            raise Cancelled()
        if time.monotonic() > ticket.deadline:
            raise RequestTimeout()
        piece = strip.feed(piece)
        if queue is not None and piece:
            loop.call_soon_threadsafe(queue.put_nowait, piece)

    def work(pipe: Any) -> tuple[Any, float]:
        if ticket.cancelled or ticket.pool.stopping:  # gone while queued: no vision, no prefill
            raise Cancelled()
        answer = pipe.ask(
            images,
            req.question,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            stream=on_text,
            grammar=req.grammar,
            stop=req.stop,
        )
        ttft = (first[0] if first else time.monotonic()) - t0
        return answer, ttft

    return work


class _Strip:
    """Streamed pieces that concatenate to the stripped answer (`Answer.text`): leading
    whitespace dropped, trailing whitespace held back until more text follows it."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""

    def feed(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.started = True
        text = self.pending + piece
        kept = text.rstrip()
        self.pending = text[len(kept) :]
        return kept


def as_api_error(e: BaseException) -> BaseException:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, RequestTimeout):
        return ApiError(504, "the answer took longer than the request timeout (--timeout)", "timeout")
    if isinstance(e, ImageError):
        return ApiError(400, f"the image is not usable: {e}")
    if isinstance(e, LLMError) and "do not fit" in str(e):
        return ApiError(400, f"the request does not fit the context: {e}", "context_length_exceeded")
    if isinstance(e, ValueError):
        return ApiError(400, str(e))
    return e


def client_gone_error() -> ApiError:
    """Answered to nobody; counted in /metrics as 499 (nginx's "client closed request")."""
    return ApiError(499, "the client closed the connection before the answer", "client_closed")


async def _until_disconnect(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def wait_or_client_gone(receive: Callable, *futures: asyncio.Future) -> None:
    """Wait until one of `futures` is done; raise client_gone_error() if the client disconnects
    first. Why: nothing else notices a client that leaves before the response starts (a camera
    SDK's timeout, a queued request given up): its request was queued, then answered in full
    for nobody, a worker's time on a real model. `receive` must be past the request body."""
    gone = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await asyncio.wait({gone, *futures}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not gone.done():
            gone.cancel()
    if gone.done() and not gone.cancelled() and not any(f.done() for f in futures):
        raise client_gone_error()


def run_job(state: Any, ticket: Any, job: Callable[[Any], Any]) -> asyncio.Future:
    """`state.pool.run(ticket, job)` as a task whose exception is always read (its client may
    have left and never read it)."""
    task = asyncio.ensure_future(state.pool.run(ticket, job))
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


def abandon(task: asyncio.Future, ticket: Any) -> None:
    """The client is gone: a generation stops at its next piece, a queued job never starts."""
    ticket.cancelled = True
    task.cancel()


@dataclass
class StartedStream:
    """A streamed request whose job is running and has produced its first piece (or finished)."""

    task: asyncio.Future
    pieces: asyncio.Queue
    getter: asyncio.Future  # the pending or done get() of the next piece
    ticket: Any

    def close(self) -> None:
        """However the response ended (client gone included, even before the body began)."""
        if not self.getter.done():
            self.getter.cancel()
        if not self.task.done():
            self.ticket.cancelled = True  # the generation stops at its next piece
            # Still queued: stop waiting for a pipeline. (Once the job runs, cancelling only
            # stops the waiting; the shielded job ends at its next piece and frees the pipeline.)
            self.task.cancel()
        self.ticket.release_unless_started()


async def start_stream(
    state: Any, receive: Callable, req: ChatRequest, images: list, ticket: Any, t0: float
) -> StartedStream:
    """Run the job and wait for its first piece before any byte of the response is sent, so
    what fails before the answer starts is an HTTP status, as OpenAI's server and vLLM give it:
    no worker free in time (503 + Retry-After), prompt over the context (400), deadline (504).
    Before, the 200 and the role chunk went out first and these came as an error event, which
    clients' retry-on-status logic (openai's max_retries on 503/429) never sees."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    task = run_job(state, ticket, make_job(req, images, ticket, t0, loop, pieces))
    getter = asyncio.ensure_future(pieces.get())
    try:
        await wait_or_client_gone(receive, getter, task)
    except BaseException:  # the client left while queued or prefilling
        getter.cancel()
        abandon(task, ticket)
        raise
    if task.done() and not getter.done() and not task.cancelled() and task.exception() is not None:
        getter.cancel()
        raise as_api_error(task.exception()) from None
    return StartedStream(task, pieces, getter, ticket)


async def stream_answer(
    state: Any, req: ChatRequest, started: StartedStream, t0: float
) -> AsyncIterator[str]:
    """OpenAI's chunk stream: a role chunk, content chunks, a finish chunk, an optional usage
    chunk, then `data: [DONE]`. An error after the stream started is sent as an error event."""
    cfg = state.config
    cid, created = completion_id(), now()
    fingerprint = state.pool.pipelines[0].digest[:16]
    task, pieces = started.task, started.pieces

    def event(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield event(
            chunk_body(cid, created, cfg.model_id, fingerprint, delta={"role": "assistant", "content": ""})
        )
        while True:
            getter = started.getter
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield event(
                    chunk_body(cid, created, cfg.model_id, fingerprint, delta={"content": getter.result()})
                )
                started.getter = asyncio.ensure_future(pieces.get())
                continue
            getter.cancel()
            break
        while not pieces.empty():
            yield event(
                chunk_body(cid, created, cfg.model_id, fingerprint, delta={"content": pieces.get_nowait()})
            )
        try:
            answer, ttft = task.result()
        except BaseException as e:
            err = as_api_error(e)
            if not isinstance(err, ApiError):
                log.error("stream failed: %s: %s", type(e).__name__, e)
                err = ApiError(500, f"internal error ({type(e).__name__}: {e})", "server_error")
            yield event(err.body())
            yield "data: [DONE]\n\n"
            return
        state.metrics.observe_answer(ttft_s=ttft, total_s=time.monotonic() - t0, answer=answer)
        finish = FINISH_REASONS.get(answer.stop_reason, "stop")
        yield event(chunk_body(cid, created, cfg.model_id, fingerprint, delta={}, finish_reason=finish))
        if req.include_usage:
            yield event(chunk_body(cid, created, cfg.model_id, fingerprint, usage_=usage(answer)))
        yield "data: [DONE]\n\n"
    finally:
        started.close()
