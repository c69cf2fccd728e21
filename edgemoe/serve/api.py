"""The OpenAI-compatible HTTP API on Starlette: /v1/models, /v1/completions,
/v1/chat/completions (server-sent events when streamed), /health, /metrics, and the live demo
page at / with its cache feed (/api/cache, /api/cache/stream)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from importlib.resources import files
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import ChatTemplateError, EdgeMoEError
from ..runtime.engine import Model
from .live import cache_snapshot, prometheus
from .params import RequestError, Sampling, chat_messages, completion_prompt, sampling
from .scheduler import Job, QueueFullError, Scheduler

# What the server process holds beyond Model.memory_needed: the ASGI stack (Starlette,
# uvicorn, their imports) and per-request buffers; measured in docs/serve.md.
SERVER_OVERHEAD_BYTES = 24 << 20
MAX_BODY_BYTES = 4 << 20
CACHE_FEED_INTERVAL_S = 0.25
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
STATIC = files("edgemoe.serve") / "static"


class Server:
    """One loaded model behind the API: its name, context length and queue; batch: requests
    decoded together (1: one at a time), each with a KV cache of the whole context counted
    in memory_needed."""

    def __init__(
        self,
        model: Model,
        name: str,
        context: int,
        api_key: str | None = None,
        max_queue: int = 256,
        batch: int = 1,
    ):
        self.model, self.name, self.context, self.api_key = model, name, context, api_key
        self.scheduler = Scheduler(model, max_queue=max_queue, batch=batch)
        self.created = int(time.time())
        self.memory_needed = model.memory_needed(context, sequences=batch) + SERVER_OVERHEAD_BYTES

    def close(self) -> None:
        self.scheduler.close()


def _error(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise RequestError(
            f"the request body is {len(raw)} bytes; the server takes at most {MAX_BODY_BYTES}", status=413
        )
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _check_auth(server: Server, request: Request) -> None:
    if server.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), server.api_key.encode()):
        raise RequestError(
            "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the key the server was "
            "started with (--api-key)",
            status=401,
            kind="authentication_error",
        )


def _check_model(server: Server, body: dict[str, Any]) -> None:
    name = body.get("model")
    if name is not None and name != server.name:
        raise RequestError(
            f"the model {name!r} does not exist here: this server serves {server.name!r} (GET /v1/models)",
            "model",
            status=404,
        )


def _job(server: Server, prompt: list[int], p: Sampling, default_max: int, stop: list[str], field: str) -> Job:
    n, ctx = len(prompt), server.context
    if n >= ctx:
        raise RequestError(
            f"the prompt is {n} tokens and the context holds {ctx}: shorten it (the server's --context sets the length)",
            field,
        )
    if p.max_tokens is not None and n + p.max_tokens > ctx:
        raise RequestError(
            f"the context holds {ctx} tokens; the request asks for {n + p.max_tokens} ({n} of prompt and "
            f"{p.max_tokens} to generate): lower max_tokens to at most {ctx - n} or shorten the prompt",
            "max_tokens",
        )
    max_tokens = p.max_tokens if p.max_tokens is not None else min(default_max, ctx - n)
    return Job(
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        seed=p.seed,
        stop=stop,
        ignore_eos=p.ignore_eos,
        loop=asyncio.get_running_loop(),
    )


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client goes away (queued: never started; running: stopped
    before its next forward pass)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


def _usage(job: Job) -> dict[str, int]:
    return {
        "prompt_tokens": len(job.prompt),
        "completion_tokens": job.completion_tokens,
        "total_tokens": len(job.prompt) + job.completion_tokens,
    }


def _failure(exc: BaseException) -> RequestError:
    if isinstance(exc, EdgeMoEError):
        return RequestError(f"generation failed: {exc}", status=500, kind="server_error")
    return RequestError(f"generation failed: {type(exc).__name__}: {exc}", status=500, kind="server_error")


async def _collect(request: Request, job: Job) -> tuple[str, str]:
    """All of a job's text and its finish reason, cancelling it if the client leaves first."""
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    pieces: list[str] = []
    try:
        while True:
            event = await job.events.get()
            if event[0] == "token":
                pieces.append(event[1])
            elif event[0] == "done":
                return "".join(pieces), event[1]
            else:
                raise _failure(event[1])
    finally:
        job.cancel()  # a no-op once it finished; stops it if this handler was cancelled
        watcher.cancel()


async def _sse(
    request: Request, job: Job, chunk: Callable[[str | None, str | None], dict[str, Any]], p: Sampling
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text piece, one with the finish reason, the usage
    when asked for (stream_options.include_usage), then [DONE]."""
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    try:
        first = chunk(None, None)
        if first:
            yield f"data: {json.dumps(first)}\n\n"
        while True:
            event = await job.events.get()
            if event[0] == "token":
                yield f"data: {json.dumps(chunk(event[1], None))}\n\n"
                continue
            if event[0] == "done":
                yield f"data: {json.dumps(chunk('', event[1]))}\n\n"
                if p.include_usage:
                    last = chunk(None, None) or chunk("", None)
                    last.update(choices=[], usage=_usage(job))
                    yield f"data: {json.dumps(last)}\n\n"
            else:
                yield f"data: {json.dumps(_failure(event[1]).body())}\n\n"
            yield "data: [DONE]\n\n"
            return
    finally:
        job.cancel()
        watcher.cancel()


def _submit(server: Server, job: Job) -> Job:
    try:
        return server.scheduler.submit(job)
    except QueueFullError as e:
        raise RequestError(str(e), status=503, kind="server_busy") from None


async def completions(request: Request) -> Response:
    server: Server = request.app.state.server
    try:
        _check_auth(server, request)
        body = await _body(request)
        _check_model(server, body)
        p = sampling(body, server.context)
        prompt = completion_prompt(body)
        if isinstance(prompt, str):
            ids = server.model.encode(prompt)
        else:
            ids = prompt
            bad = [t for t in ids if not 0 <= t < server.model.config.vocab_size]
            if bad:
                raise RequestError(
                    f"token id {bad[0]} is outside the vocabulary (0..{server.model.config.vocab_size - 1})", "prompt"
                )
        job = _submit(server, _job(server, ids, p, 16, p.stop, "prompt"))
    except RequestError as e:
        return _error(e)
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
        if text is None:
            return {}
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": server.name,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        }

    if p.stream:
        return StreamingResponse(_sse(request, job, chunk, p), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        text, finish = await _collect(request, job)
    except RequestError as e:
        return _error(e)
    out = chunk(text, finish)
    out["usage"] = _usage(job)
    return JSONResponse(out)


async def chat_completions(request: Request) -> Response:
    server: Server = request.app.state.server
    try:
        _check_auth(server, request)
        body = await _body(request)
        _check_model(server, body)
        p = sampling(body, server.context)
        messages = chat_messages(body)
        try:
            ids = server.model.encode_chat(messages)
        except ChatTemplateError as e:
            raise RequestError(str(e), "messages") from None
        stop = p.stop + [s for s in server.model.chat_template.stop if s not in p.stop]
        job = _submit(server, _job(server, ids, p, server.context, stop, "messages"))
    except RequestError as e:
        return _error(e)
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    # the fallback transcript's replies follow "Assistant:" and start with its space
    strip = server.model.chat_template.is_fallback

    def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
        nonlocal strip
        if text is None:
            delta: dict[str, Any] = {"role": "assistant", "content": ""}
        else:
            if strip and text:
                text, strip = text.lstrip(), not text.strip()
            delta = {"content": text} if finish is None else {}
        return {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": server.name,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    if p.stream:
        return StreamingResponse(_sse(request, job, chunk, p), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        text, finish = await _collect(request, job)
    except RequestError as e:
        return _error(e)
    if strip:
        text = text.lstrip()
    return JSONResponse(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": server.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": _usage(job),
        }
    )


async def list_models(request: Request) -> Response:
    server: Server = request.app.state.server
    try:
        _check_auth(server, request)
    except RequestError as e:
        return _error(e)
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {
                    "id": server.name,
                    "object": "model",
                    "created": server.created,
                    "owned_by": "edgemoe",
                    "context_length": server.context,
                }
            ],
        }
    )


async def health(request: Request) -> Response:
    server: Server = request.app.state.server
    s = server.scheduler
    return JSONResponse({"status": "ok", "model": server.name, "queue": s.waiting, "running": s.running is not None})


async def metrics(request: Request) -> Response:
    server: Server = request.app.state.server
    text = prometheus(server.model, server.scheduler, server.memory_needed)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def _snapshot(server: Server) -> dict[str, Any]:
    out = cache_snapshot(server.model, server.scheduler, server.memory_needed)
    out.update(model=server.name, context=server.context, auth=server.api_key is not None)
    return out


async def cache_json(request: Request) -> Response:
    return JSONResponse(_snapshot(request.app.state.server))


async def cache_stream(request: Request) -> Response:
    """The cache snapshot as server-sent events, every CACHE_FEED_INTERVAL_S while the client
    listens."""
    server: Server = request.app.state.server

    async def feed() -> AsyncIterator[str]:
        gone = asyncio.Event()

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        try:
            while not gone.is_set():
                yield f"data: {json.dumps(_snapshot(server))}\n\n"
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(gone.wait(), CACHE_FEED_INTERVAL_S)
        finally:
            watcher.cancel()

    return StreamingResponse(feed(), media_type="text/event-stream", headers=SSE_HEADERS)


async def index(request: Request) -> Response:
    return FileResponse(str(STATIC / "index.html"), media_type="text/html")


async def not_found(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    detail = getattr(exc, "detail", "")
    if status == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = f"no such endpoint: {request.url.path} (the API is under /v1: models, completions, chat/completions)"
    return JSONResponse(RequestError(detail if status not in (404, 405) else message, status=status).body(), status)


def create_app(server: Server) -> Starlette:
    """The ASGI application for a Server; uvicorn runs it (serve.run)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        server.close()

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/health", health),
            Route("/metrics", metrics),
            Route("/v1/models", list_models),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/api/cache", cache_json),
            Route("/api/cache/stream", cache_stream),
            Mount("/static", app=StaticFiles(directory=str(STATIC)), name="static"),
        ],
        exception_handlers={404: not_found, 405: not_found},
        lifespan=lifespan,
    )
    app.state.server = server
    return app
