"""The HTTP side of `nbdiff serve`: a FastAPI app over the engine (nbdiff.serve), run by uvicorn.

    app = make_app(engine, settings, model, tokenizer, api_key="...", cors=["http://localhost:3000"])

Routes: GET /health (no key needed), GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions,
POST /v1/completions. Requests are parsed by nbdiff.serve.protocol (which refuses bad input with
OpenAI's error object); replies stream as server-sent events in OpenAI's chunk format.

Notable choices:
- The body is read with a size cap (413 past it), before JSON parsing; every error, the
  framework's own 404/405 and an unexpected failure included, answers in OpenAI's error shape.
- The engine thread hands items to the event loop through a mailbox that wakes the loop once per
  burst (a step of eight rows is one wake-up, not eight); a stream sends what has arrived since its
  last chunk as one chunk. A client that goes away cancels its ticket, which frees its row at the
  next block boundary. A streaming
  reply starts once its first item is there, so a request that fails before any text gets a
  proper error status instead of a broken stream.
- The API key is compared in constant time; CORS only when asked; logs carry counts and timings,
  never prompt or reply text unless `log_prompts`.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from nbdiff.errors import NBDiffError
from nbdiff.serve import protocol
from nbdiff.serve.engine import Delta, Done, Engine, QueueFull
from nbdiff.serve.protocol import APIError, ServerSettings

MAX_BODY = 4 * 1024 * 1024
log = logging.getLogger("nbdiff.serve")


class _Gone(Exception):
    """The client disconnected while its request was running."""


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _read_body(request: Request, limit: int) -> bytes:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise APIError(413, f"the body is {int(size)} bytes; the limit is {limit}", None, "request_too_large")
    chunks, total = [], 0
    async for part in request.stream():
        total += len(part)
        if total > limit:
            raise APIError(413, f"the body is over the limit of {limit} bytes", None, "request_too_large")
        chunks.append(part)
    return b"".join(chunks)


def _check_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise APIError(401, "a valid API key is needed: send 'Authorization: Bearer <key>'", None, "invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


class _Mailbox:
    """Items from the engine thread to one event loop's queues: one wake-up of the loop per burst."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: collections.deque = collections.deque()
        self.scheduled = False

    def post(self, queue: asyncio.Queue, item) -> None:  # engine thread
        with self.lock:
            self.pending.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:  # event loop
        with self.lock:
            items, self.pending, self.scheduled = self.pending, collections.deque(), False
        for queue, item in items:
            queue.put_nowait(item)


class _Call:
    """One submitted request: its items arrive on this loop's queue."""

    def __init__(self, engine: Engine, parsed: protocol.Request, http: Request, mailbox: _Mailbox):
        self.items: asyncio.Queue = asyncio.Queue()
        self.http = http

        def sink(item) -> None:  # called on the engine thread
            mailbox.post(self.items, item)

        try:
            self.ticket = engine.submit(parsed.job, sink)
        except QueueFull as exc:
            raise APIError(429, exc.message + f"; {exc.hint}", None, "server_busy", kind="rate_limit_error",
                           headers={"Retry-After": str(exc.retry_after)}) from None
        except NBDiffError as exc:
            raise APIError(503, exc.message, None, "unavailable", kind="server_error", headers={"Retry-After": "5"}) from None

    async def next(self):
        """The next item; cancels the ticket and raises _Gone when the client has left."""
        while True:
            try:
                return await asyncio.wait_for(self.items.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await self.http.is_disconnected():
                    self.ticket.cancel()
                    raise _Gone() from None


def _failed(done: Done) -> APIError:
    if done.error and "time limit" in done.error:
        return APIError(503, done.error, None, "timeout", kind="server_error", headers={"Retry-After": "5"})
    return APIError(500, done.error or "the request was cancelled", None, "internal_error", kind="server_error")


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(call: _Call, parsed: protocol.Request, settings: ServerSettings, first, on_done) -> AsyncIterator[str]:
    item, text = first, []
    try:
        if parsed.kind == "chat":
            yield _sse(protocol.chunk(parsed, settings, role=True))
        while isinstance(item, Delta):
            parts = [item.text]
            while not call.items.empty():  # what arrived meanwhile goes in the same chunk
                item = call.items.get_nowait()
                if not isinstance(item, Delta):
                    break
                parts.append(item.text)
            piece = "".join(parts)
            text.append(piece)
            yield _sse(protocol.chunk(parsed, settings, text=piece))
            if isinstance(item, Delta):
                item = await call.items.get()  # a disconnect cancels this generator (Starlette), see finally
        done: Done = item
        if done.error:
            yield _sse(_failed(done).body())
        else:
            yield _sse(protocol.chunk(parsed, settings, done=done))
            if parsed.include_usage:
                yield _sse(protocol.chunk(parsed, settings, done=done, usage_only=True))
        yield "data: [DONE]\n\n"
        on_done(parsed, "".join(text), done)
    finally:
        call.ticket.cancel()  # no-op once done; frees the row when the client left mid-stream


@dataclass
class _Service:
    """What every route needs: the engine, the server's settings, the model and the policies."""

    engine: Engine
    settings: ServerSettings
    model: Any
    tokenizer: Any
    api_key: str | None
    log_prompts: bool
    max_body: int
    mailbox: _Mailbox | None = None
    """The serving loop's (made on the first request, where the loop is known)."""

    def finished(self, parsed: protocol.Request, text: str, done: Done) -> None:
        log.info("%s %s prompt=%d completion=%d finish=%s %.2fs queued=%.2fs tokens/forward=%.2f%s",
                 parsed.id, parsed.kind, done.prompt_tokens, done.completion_tokens, done.finish_reason,
                 done.seconds, done.queued_seconds, done.tokens_per_forward, " timed-out" if done.timed_out else "")
        if self.log_prompts:
            log.info("%s reply: %r", parsed.id, text)

    async def complete(self, request: Request, parse) -> Any:
        """One chat or text completion: parse, submit, then stream or collect the reply."""
        _check_key(request, self.api_key)
        body = protocol.parse_json(await _read_body(request, self.max_body))
        # the chat template and the tokenizer run off the event loop: a long prompt must not stall other clients
        parsed = await run_in_threadpool(parse, body, self.settings, self.model, self.tokenizer)
        if self.log_prompts:
            log.info("%s prompt: %r", parsed.id, self.tokenizer.decode(parsed.job.prompt))
        loop = asyncio.get_running_loop()
        if self.mailbox is None or self.mailbox.loop is not loop:
            self.mailbox = _Mailbox(loop)
        call = _Call(self.engine, parsed, request, self.mailbox)
        try:
            first = await call.next()
            if isinstance(first, Done) and first.error:
                raise _failed(first)
            if parsed.stream:
                headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
                return StreamingResponse(_stream(call, parsed, self.settings, first, self.finished),
                                         media_type="text/event-stream", headers=headers)
            item, text = first, []
            while isinstance(item, Delta):
                text.append(item.text)
                item = await call.next()
            if item.error:
                raise _failed(item)
            self.finished(parsed, "".join(text), item)
            return protocol.reply(parsed, self.settings, "".join(text), item)
        except _Gone:
            log.info("%s client went away; its row is freed", parsed.id)
            return JSONResponse(protocol.error_body("client closed the request", code="client_closed"), status_code=499)


def _errors_in_openai_shape(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def refused(request: Request, exc: APIError):
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception):
        log.error("unexpected %s on %s: %s", type(exc).__name__, request.url.path, exc)
        return _error(APIError(500, "the server failed on this request; it keeps serving", None, "internal_error",
                               kind="server_error"))


def make_app(engine: Engine, settings: ServerSettings, model, tokenizer, *, api_key: str | None = None,
             cors: list[str] | None = None, log_prompts: bool = False, max_body: int = MAX_BODY) -> FastAPI:
    """The FastAPI app of one engine."""
    app = FastAPI(title="nbdiff serve", docs_url=None, redoc_url=None, openapi_url=None)
    if cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    _errors_in_openai_shape(app)
    service = _Service(engine, settings, model, tokenizer, api_key, log_prompts, max_body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await service.complete(request, protocol.chat_request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await service.complete(request, protocol.completion_request)

    @app.get("/v1/models")
    async def list_models(request: Request):
        _check_key(request, api_key)
        return protocol.models(settings)

    @app.get("/v1/models/{name:path}")
    async def one_model(request: Request, name: str):
        _check_key(request, api_key)
        if name != settings.model_id:
            raise protocol.unknown_model(name, settings)
        return protocol.model_card(settings)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_id, **engine.stats()}

    return app
