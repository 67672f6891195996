"""``llmquant serve``: an OpenAI-compatible HTTP server over the runtime (FastAPI + uvicorn).

Endpoints as llama-server and Ollama's OpenAI layer offer them: ``/v1/chat/completions`` and
``/v1/completions`` (JSON or SSE streaming, usage counts, stop strings), ``/v1/models``,
``/v1/embeddings``, ``/health``. Errors use OpenAI's shape ``{"error": {"message", "type",
"param", "code"}}``. Binds 127.0.0.1 unless told otherwise; with ``api_key`` every endpoint but
``/health`` needs ``Authorization: Bearer KEY``.

Concurrency: ``parallel`` slots, each its own llama.cpp context over the same memory-mapped
weights. A request waits for a free slot in arrival order (an ``asyncio.Queue`` of idle slots
serves its waiters first-in first-out); generation runs in a thread, so the event loop stays free
to accept, validate (with a vocabulary-only copy of the model) and stream. A client that goes away
mid-stream cancels its generation at the next token and the slot returns to the queue.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import StreamingResponse

from ..errors import LlmquantError
from ..runtime.llama import ContextLengthError, LoadOptions, Model, Sampling, TextStream

EMBED_CTX = 2048


class ServeError(LlmquantError):
    """The server cannot start (address in use, bad options)."""


class APIError(Exception):
    """An error answered to a client in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- request bodies (unknown fields are accepted and ignored, as OpenAI clients send many) --------------
StopT = str | list[str] | None


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: StopT = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    logprobs: Any | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None


class ChatRequest(_Common):
    messages: list[Any]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


# -- slots ---------------------------------------------------------------------------------------------
class Slots:
    """Loaded models handed out first come, first served."""

    def __init__(self, models: list[Model]):
        self.models = models
        self._idle: asyncio.Queue[Model] | None = None

    @property
    def idle(self) -> asyncio.Queue[Model]:
        if self._idle is None:  # created inside the server's event loop
            self._idle = asyncio.Queue()
            for m in self.models:
                self._idle.put_nowait(m)
        return self._idle

    async def acquire(self) -> Model:
        return await self.idle.get()

    def release(self, model: Model) -> None:
        self.idle.put_nowait(model)


def _in_thread(loop: asyncio.AbstractEventLoop, fn: Callable[[], Any], on_exit: Callable[[], None]) -> asyncio.Future:
    """Run ``fn`` in a new thread; the future resolves with its result. ``on_exit`` runs in the event
    loop once the thread is done with the model, whatever happened to the awaiting request."""
    fut = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        on_exit()
        if not fut.done():
            fut.set_result(value) if ok else fut.set_exception(value)

    def body() -> None:
        try:
            result, ok = fn(), True
        except BaseException as exc:  # noqa: BLE001 — handed to the awaiting request
            result, ok = exc, False
        try:
            loop.call_soon_threadsafe(settle, ok, result)
        except RuntimeError:  # the loop closed (shutdown)
            pass

    threading.Thread(target=body, daemon=True).start()
    return fut


# -- the server ----------------------------------------------------------------------------------------
@dataclass
class ServerState:
    model_id: str
    path: Path
    slots: Slots
    vocab: Model  # vocabulary only: tokenize and format chats without a slot
    n_ctx: int
    threads: int
    api_key: str | None = None
    aliases: set[str] = field(default_factory=set)
    created: int = field(default_factory=lambda: int(time.time()))
    options: LoadOptions = field(default_factory=LoadOptions)
    _embedder: Model | None = None
    _embed_lock: asyncio.Lock | None = None

    @property
    def embed_lock(self) -> asyncio.Lock:
        if self._embed_lock is None:  # created inside the server's event loop
            self._embed_lock = asyncio.Lock()
        return self._embed_lock

    def check_model(self, name: str | None) -> None:
        if name is None or name in self.aliases:
            return
        raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_id}`",
                       param="model", code="model_not_found")

    async def embedder(self) -> Model:
        async with self.embed_lock:
            if self._embedder is None:
                n = min(self.n_ctx, EMBED_CTX)
                self._embedder = await asyncio.to_thread(
                    Model, self.path, **self.options.model_kwargs(n_ctx=n, n_batch=n, embedding=True, threads=self.threads))
            return self._embedder


def load_state(path: Path, model_id: str, *, n_ctx: int, parallel: int, threads: int | None,
               api_key: str | None, aliases: set[str] | None = None, batch: int = 512,
               options: LoadOptions | None = None) -> ServerState:
    from ..system import default_threads

    options = options or LoadOptions()
    per_slot = threads or max(1, default_threads() // parallel)
    models = [Model(path, **options.model_kwargs(n_ctx=n_ctx, threads=per_slot, n_batch=min(batch, n_ctx)))
              for _ in range(parallel)]
    vocab = Model(path, vocab_only=True)
    names = {model_id, path.name, path.stem, str(path)} | (aliases or set())
    return ServerState(model_id, path, Slots(models), vocab, n_ctx, per_slot, api_key, names, options=options)


def create_app(state: ServerState):
    from fastapi import Depends, FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .. import __version__

    app = FastAPI(title="llmquant", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llm = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first: dict[str, Any] = dict(errors[0]) if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", first["msg"])
            return JSONResponse(APIError(400, f"the request body is not valid JSON: {detail}").body(), 400)
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = f"{loc}: {first['msg']}" if loc else str(first["msg"])
        return JSONResponse(APIError(400, msg, param=loc or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse(APIError(exc.status_code, str(exc.detail), code=None).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body(), 500)

    async def authorized(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send Authorization: Bearer KEY",
                           type="invalid_request_error", code="invalid_api_key")

    guarded = [Depends(authorized)]

    @app.get("/health")
    async def health():
        idle = state.slots.idle.qsize()
        return {"status": "ok", "model": state.model_id, "slots_idle": idle, "slots_total": len(state.slots.models)}

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{name:path}", dependencies=guarded)
    async def model(name: str):
        state.check_model(name)
        return _model_card(state)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        state.check_model(body.model)
        _unsupported(body, echo=body.echo, suffix=body.suffix)
        prompt: Any = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]  # a string, or a list of token ids
        ids = _prompt_ids(state, prompt)
        return await _respond(state, body, ids, chat=False, request=request)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatRequest, request: Request):
        from ..runtime.chat import ChatTemplateError, validate_messages

        state.check_model(body.model)
        _unsupported(body)
        if body.tools:
            raise APIError(400, "tool calling is not supported", param="tools")
        fmt = (body.response_format or {}).get("type", "text")
        if fmt != "text":
            raise APIError(400, f"response_format {fmt!r} is not supported", param="response_format")
        try:
            messages = validate_messages(body.messages)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        try:
            prompt = state.vocab.format_chat(messages)
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), param="messages") from None
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        return await _respond(state, body, _prompt_ids(state, prompt), chat=True, request=request)

    @app.post("/v1/embeddings", dependencies=guarded)
    async def embeddings(body: EmbeddingRequest):
        state.check_model(body.model)
        items: list = [body.input] if isinstance(body.input, str) or (
            isinstance(body.input, list) and body.input and isinstance(body.input[0], int)) else list(body.input)
        if not items or any(len(x) == 0 for x in items):
            raise APIError(400, "input must not be empty", param="input")
        n_vocab = state.vocab.n_vocab  # token ids out of range make llama_decode fail (found by schemathesis)
        if any(isinstance(x, list) and any(not 0 <= t < n_vocab for t in x) for x in items):
            raise APIError(400, f"input token ids must be in 0..{n_vocab - 1}", param="input")
        if body.dimensions is not None:
            raise APIError(400, "dimensions is not supported", param="dimensions")
        model = await state.embedder()
        async with state.embed_lock:  # one embedding batch at a time on the shared context
            try:
                vectors, n_tokens = await asyncio.to_thread(model.embed, items)
            except ContextLengthError as exc:
                raise APIError(400, str(exc), param="input", code="context_length_exceeded") from None
        data = []
        for i, v in enumerate(vectors):
            emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64" \
                else [float(x) for x in v]
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": state.model_id,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    return app


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "llmquant",
            "meta": {"n_ctx": state.n_ctx, "slots": len(state.slots.models), "path": str(state.path)}}


def _unsupported(body: _Common, **extra: Any) -> None:
    if body.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    if body.logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    for name, value in extra.items():
        if value:
            raise APIError(400, f"{name} is not supported", param=name)


def _prompt_ids(state: ServerState, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        if any(not 0 <= t < state.vocab.n_vocab for t in prompt):
            raise APIError(400, f"prompt token ids must be in 0..{state.vocab.n_vocab - 1}", param="prompt")
        ids = list(prompt)
    else:
        ids = state.vocab.prompt_tokens(prompt)
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    return ids


def _sampling(body: _Common) -> Sampling:
    d = Sampling()
    return Sampling(
        temperature=d.temperature if body.temperature is None else body.temperature,
        top_p=d.top_p if body.top_p is None else body.top_p,
        top_k=d.top_k if body.top_k is None else body.top_k,
        min_p=d.min_p if body.min_p is None else body.min_p,
        repeat_penalty=d.repeat_penalty if body.repeat_penalty is None else body.repeat_penalty,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        seed=body.seed,
    )


async def _respond(state: ServerState, body: _Common, ids: list[int], *, chat: bool, request: Request):
    from fastapi.responses import JSONResponse

    n_ctx = state.n_ctx
    if len(ids) >= n_ctx:
        raise APIError(400, f"This model's maximum context length is {n_ctx} tokens; the prompt has {len(ids)}",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    max_tokens = body.max_tokens if body.max_tokens is not None else n_ctx - len(ids)
    if len(ids) + max_tokens > n_ctx:
        raise APIError(400, f"This model's maximum context length is {n_ctx} tokens; you requested "
                            f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} to generate)",
                       param="max_tokens", code="context_length_exceeded")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 16 or any(not s for s in stop):
        raise APIError(400, "stop must be up to 16 non-empty strings", param="stop")
    sampling = _sampling(body)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return _EventStream(_stream(state, ids, max_tokens, sampling, stop, chat, rid, include_usage))

    cancel = threading.Event()
    model = await state.slots.acquire()
    loop = asyncio.get_running_loop()
    fut = _in_thread(loop, lambda: model.generate(ids, max_tokens=max_tokens, sampling=sampling, stop=stop,
                                                  cancel=cancel).consume(),
                     lambda: state.slots.release(model))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({fut, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        cancel.set()
        raise
    finally:
        gone.cancel()
    if not fut.done():  # the client hung up: stop generating for nobody (the thread frees the slot)
        cancel.set()
        fut.add_done_callback(lambda f: f.exception())  # retrieve it, so asyncio does not complain
        return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
    ts: TextStream = fut.result()
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": ts.stats.finish_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": ts.text}
    else:
        choice["text"] = ts.text
    return JSONResponse({
        "id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
        "model": state.model_id, "choices": [choice], "usage": _usage(ts), "timings": _timings(ts),
    })


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(ts: TextStream) -> dict:
    return {"prompt_tokens": ts.stats.prompt_tokens, "completion_tokens": ts.stats.completion_tokens,
            "total_tokens": ts.stats.prompt_tokens + ts.stats.completion_tokens}


def _timings(ts: TextStream) -> dict:
    s = ts.stats
    return {"prompt_n": s.prompt_tokens, "prompt_ms": 1000 * s.prompt_seconds, "prompt_per_second": s.prompt_tps,
            "predicted_n": s.completion_tokens, "predicted_ms": 1000 * s.generation_seconds,
            "predicted_per_second": s.generation_tps}


async def _stream(state: ServerState, ids: list[int], max_tokens: int, sampling: Sampling, stop: list[str],
                  chat: bool, rid: str, include_usage: bool) -> AsyncIterator[bytes]:
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list[dict], **extra: Any) -> bytes:
        payload = {"id": rid, "object": kind, "created": created, "model": state.model_id, "choices": choices, **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

    def piece(text: str, finish: str | None = None) -> bytes:
        c: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if chat:
            c["delta"] = {"content": text} if text or finish is None else {}
        else:
            c["text"] = text
        return event([c])

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def produce(model: Model) -> TextStream:
        ts = model.generate(ids, max_tokens=max_tokens, sampling=sampling, stop=stop, cancel=cancel)
        for text in ts:
            loop.call_soon_threadsafe(queue.put_nowait, text)
            if cancel.is_set():
                break
        return ts

    model = await state.slots.acquire()  # a client gone while waiting here never gets a slot
    fut = _in_thread(loop, lambda: produce(model), lambda: state.slots.release(model))
    fut.add_done_callback(lambda f: queue.put_nowait(None))
    try:
        if chat:
            yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        while True:
            text = await queue.get()
            if text is None:
                break
            yield piece(text)
        while not queue.empty():  # pieces queued after the sentinel cannot happen, but be exact
            text = queue.get_nowait()
            if text is not None:
                yield piece(text)
        try:
            ts: TextStream = fut.result()
        except Exception as exc:  # noqa: BLE001 — the status line is gone: report it in the stream
            err = APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")
            yield f"data: {json.dumps(err.body())}\n\n".encode()
            return
        yield piece("", ts.stats.finish_reason)
        if include_usage:
            yield event([], usage=_usage(ts))
        yield b"data: [DONE]\n\n"
    finally:
        cancel.set()


class _EventStream(StreamingResponse):
    """An SSE response that notices a client going away even while no token is being sent (and
    then cancels the generation); starlette alone only notices on the next write."""

    def __init__(self, events: AsyncIterator[bytes]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away during a write
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            await self.events.aclose()  # type: ignore[attr-defined]


# -- running it ------------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the model loads so a busy port fails fast and ``port=0``
    picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(state: ServerState, sock: socket.socket, *, log_level: str = "warning",
          announce: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM."""
    import uvicorn

    config = uvicorn.Config(create_app(state), log_level=log_level, access_log=log_level in ("info", "debug"),
                            timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    if announce:
        announce(f"http://{url_host}:{port}")
    server.run(sockets=[sock])
    if not server.started:
        print("the server did not start", file=sys.stderr)
