"""``llmquant serve``: an OpenAI-compatible HTTP server over the runtime (FastAPI + uvicorn).

Endpoints as llama-server and Ollama's OpenAI layer offer them: ``/v1/chat/completions`` and
``/v1/completions`` (JSON or SSE streaming, usage counts, stop strings), ``/v1/models``,
``/v1/embeddings``, ``/health``. Errors use OpenAI's shape ``{"error": {"message", "type",
"param", "code"}}``. Binds 127.0.0.1 unless told otherwise; with ``api_key`` every endpoint but
``/health`` needs ``Authorization: Bearer KEY``.

The engine (slots, generation, streaming, grammars, tool calls) is engine.py; the models a server
holds, loaded by name, pool.py; Ollama's routes, ollama.py.
"""

from __future__ import annotations

import base64
import hmac
import json
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from ..runtime.llama import Sampling, TextStream
from .engine import (EMBED_CTX, APIError, Job, ServerState, ServeError, Slots, _EventStream, _openai_tools,  # noqa: F401
                     _template_renders_tools, _tool_choice, check_room, check_stop, embed, generate, leased,
                     load_state, parse_tool_calls, schema_grammar, stream_pieces, tool_call_grammar)







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
    n: int = Field(default=1, ge=1, le=128)  # OpenAI allows up to 128
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    logprobs: Any | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None


class ChatRequest(_Common):
    messages: list[Any]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


# -- slots ---------------------------------------------------------------------------------------------




# -- the server ----------------------------------------------------------------------------------------




def create_app(state: ServerState | None, pool: Any = None, report_dirs: list[Path] | None = None):
    """The FastAPI app over ``pool`` (a serve.pool.ModelPool) — or, for a single preloaded model, over
    ``state`` alone (a pool holding just it, the store not consulted)."""
    from fastapi import Depends, FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .. import __version__
    from .pool import ModelPool

    if pool is None:
        assert state is not None

        def only(name: str | None) -> tuple[str, Path]:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{state.model_id}`",
                           param="model", code="model_not_found")

        pool = ModelPool(budget=1 << 62, resolve=only, cost=lambda path, n_ctx, parallel: 0)
        pool.add(state)
    elif state is not None and pool.find(state.model_id) is None:
        pool.add(state)

    app = FastAPI(title="llmquant", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llm = state
    app.state.pool = pool

    def error_response(request: Request, exc: APIError) -> JSONResponse:
        if request.url.path.startswith("/api/"):  # Ollama's shape: {"error": "message"}
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first: dict[str, Any] = dict(errors[0]) if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", first["msg"])
            return error_response(request, APIError(400, f"the request body is not valid JSON: {detail}"))
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = f"{loc}: {first['msg']}" if loc else str(first["msg"])
        return error_response(request, APIError(400, msg, param=loc or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(request, APIError(exc.status_code, str(exc.detail), code=None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return error_response(request, APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    async def authorized(request: Request) -> None:
        key = pool.api_key if state is None else state.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "Incorrect or missing API key: send Authorization: Bearer KEY",
                           type="invalid_request_error", code="invalid_api_key")

    guarded = [Depends(authorized)]
    app.state.guarded = guarded

    @app.get("/health")
    async def health():
        e = pool.find(None)
        if e is None:
            return {"status": "ok", "model": pool.default, "slots_idle": 0, "slots_total": 0, "loaded": 0}
        st = e.state
        return {"status": "ok", "model": st.model_id, "slots_idle": st.slots.idle.qsize(),
                "slots_total": len(st.slots.models), "loaded": len(pool.entries)}

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        return {"object": "list", "data": [_model_card(c) for c in _cards(pool)]}

    @app.get("/v1/models/{name:path}", dependencies=guarded)
    async def model(name: str):
        for c in _cards(pool):
            if name == c["id"] or name in c["aliases"]:
                return _model_card(c)
        pool.resolve(name)  # raises the 404
        raise APIError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        _unsupported(body, echo=body.echo, suffix=body.suffix)
        lp = _completion_logprobs(body.logprobs)

        async def answer(st: ServerState):
            prompt: Any = body.prompt
            if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
                if len(prompt) != 1:
                    raise APIError(400, "only one prompt per request is supported", param="prompt")
                prompt = prompt[0]  # a string, or a list of token ids
            ids = _prompt_ids(st, prompt)
            return await _respond(st, body, ids, chat=False, request=request, grammar=_response_grammar(body),
                                  logprobs=lp)

        return await leased(pool, body.model, answer)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatRequest, request: Request):
        from ..runtime.chat import ChatTemplateError, validate_messages

        _unsupported(body)
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        try:
            messages = validate_messages(body.messages)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        tools = _openai_tools(body.tools)
        choice = _tool_choice(body.tool_choice, tools)
        if tools and choice != "none" and body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError(400, "response_format cannot be combined with tools", param="response_format")
        lp = None
        if body.logprobs:
            if not isinstance(body.logprobs, bool):
                raise APIError(400, "logprobs must be true or false for chat completions", param="logprobs")
            lp = body.top_logprobs or 0
        elif body.top_logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")

        async def answer(st: ServerState):
            if tools and not _template_renders_tools(st):
                raise APIError(400, f"{st.model_id}'s chat template does not render tools, so it cannot call them",
                               param="tools")
            try:
                prompt = st.vocab.format_chat(messages, tools=tools or None)
            except ChatTemplateError as exc:
                raise APIError(400, str(exc), param="messages") from None
            grammar = _response_grammar(body)
            if tools and choice not in ("none", "auto"):
                grammar = tool_call_grammar(tools, None if choice == "required" else choice)
            return await _respond(st, body, _prompt_ids(st, prompt), chat=True, request=request, grammar=grammar,
                                  logprobs=lp, tools=tools if choice != "none" else None)

        return await leased(pool, body.model, answer)

    @app.post("/v1/embeddings", dependencies=guarded)
    async def embeddings(body: EmbeddingRequest):
        items: list = [body.input] if isinstance(body.input, str) or (
            isinstance(body.input, list) and body.input and isinstance(body.input[0], int)) else list(body.input)
        if not items or any(len(x) == 0 for x in items):
            raise APIError(400, "input must not be empty", param="input")
        if body.dimensions is not None:
            raise APIError(400, "dimensions is not supported", param="dimensions")

        async def answer(st: ServerState):
            vectors, n_tokens = await embed(st, items)
            data = []
            for i, v in enumerate(vectors):
                emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64" \
                    else [float(x) for x in v]
                data.append({"object": "embedding", "index": i, "embedding": emb})
            return {"object": "list", "data": data, "model": st.model_id,
                    "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

        return await leased(pool, body.model, answer)

    from .ollama import JsonBodies, add_routes

    add_routes(app, pool, guarded)
    app.add_middleware(JsonBodies)
    from . import ui

    ui.add_routes(app, pool, guarded, list(report_dirs or []))
    web = Path(__file__).with_name("web")
    if (web / "index.html").is_file():
        from fastapi.responses import FileResponse
        from fastapi.staticfiles import StaticFiles

        @app.get("/", include_in_schema=False)
        async def index():
            return FileResponse(web / "index.html")

        app.mount("/web", StaticFiles(directory=web), name="web")
    return app






def _cards(pool: Any) -> list[dict]:
    """Every model a client may name: the loaded ones, then the store's (the embedded default too)."""
    from ..store import list_models

    cards: dict[str, dict] = {}
    for e in pool.loaded():
        st = e.state
        cards.setdefault(st.model_id, {"id": st.model_id, "created": st.created, "aliases": st.aliases,
                                       "meta": {"n_ctx": st.n_ctx, "slots": len(st.slots.models), "path": str(st.path),
                                                "loaded": True}})
    if pool.resolve.__name__ == "resolve_store_name":
        for m in list_models():
            cards.setdefault(m.name, {"id": m.name, "created": int(m.modified), "aliases": {m.name},
                                      "meta": {"path": m.path, "loaded": False}})
    return list(cards.values())


def _model_card(card: dict) -> dict:
    return {"id": card["id"], "object": "model", "created": card["created"], "owned_by": "llmquant",
            "meta": card["meta"]}


def _unsupported(body: _Common, **extra: Any) -> None:
    for name, value in extra.items():
        if value:
            raise APIError(400, f"{name} is not supported", param=name)


def _completion_logprobs(value: Any) -> int | None:
    if value is None or value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20:
        raise APIError(400, "logprobs must be an integer from 0 to 20 for completions", param="logprobs")
    return value


def _response_grammar(body: _Common) -> str | None:
    """OpenAI's response_format -> a llama.cpp grammar: json_object (any JSON object) or json_schema."""
    from ..runtime.llama import json_grammar

    fmt = body.response_format or {}
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar()
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise APIError(400, "response_format.json_schema must be an object with a 'schema' object",
                           param="response_format")
        return schema_grammar(spec.get("schema") or {"type": "object"}, "response_format")
    raise APIError(400, f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                   param="response_format")




# -- tools ---------------------------------------------------------------------------------------------












# -- generation ------------------------------------------------------------------------------------------
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












def _chat_logprobs(lps: list) -> dict:
    def entry(text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(x, v) for _, x, v in t.top]}
                        for t in lps], "refusal": None}


def _text_logprobs(lps: list, offset: int) -> dict:
    offsets, pos = [], offset
    for t in lps:
        offsets.append(pos)
        pos += len(t.text)
    return {"tokens": [t.text for t in lps], "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [{x: v for _, x, v in t.top} for t in lps], "text_offset": offsets}


async def _respond(state: ServerState, body: _Common, ids: list[int], *, chat: bool, request: Request,
                   grammar: str | None = None, logprobs: int | None = None, tools: list[dict] | None = None):
    from fastapi.responses import JSONResponse

    max_tokens = check_room(state, ids, body.max_tokens, "messages" if chat else "prompt")
    job = Job(ids, max_tokens, _sampling(body), check_stop(body.stop), grammar, logprobs)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return _EventStream(_stream(state, job, body.n, chat, rid, include_usage, tools))

    choices, results = [], []
    for i in range(body.n):
        ts = await generate(state, job.nth(i), request)
        if ts is None:
            return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
        results.append(ts)
        choice: dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": ts.stats.finish_reason}
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": ts.text}
            if tools:
                content, calls = parse_tool_calls(ts.text, tools)
                if calls:
                    message = {"role": "assistant", "content": content, "tool_calls": calls}
                    choice["finish_reason"] = "tool_calls"
            choice["message"] = message
            if logprobs is not None:
                choice["logprobs"] = _chat_logprobs(ts.token_logprobs)
        else:
            choice["text"] = ts.text
            if logprobs is not None:
                choice["logprobs"] = _text_logprobs(ts.token_logprobs, 0)
        choices.append(choice)
    return JSONResponse({
        "id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
        "model": state.model_id, "choices": choices, "usage": _usage(results), "timings": _timings(results[-1]),
    })




def _usage(results: list[TextStream]) -> dict:
    prompt = results[0].stats.prompt_tokens if results else 0
    completion = sum(ts.stats.completion_tokens for ts in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _timings(ts: TextStream) -> dict:
    s = ts.stats
    return {"prompt_n": s.prompt_tokens, "prompt_ms": 1000 * s.prompt_seconds, "prompt_per_second": s.prompt_tps,
            "predicted_n": s.completion_tokens, "predicted_ms": 1000 * s.generation_seconds,
            "predicted_per_second": s.generation_tps}


async def _stream(state: ServerState, job: Job, n: int, chat: bool, rid: str, include_usage: bool,
                  tools: list[dict] | None) -> AsyncIterator[bytes]:
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list[dict], **extra: Any) -> bytes:
        payload = {"id": rid, "object": kind, "created": created, "model": state.model_id, "choices": choices, **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

    def piece(i: int, text: str, lps: list, finish: str | None = None, delta: dict | None = None) -> bytes:
        c: dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": finish}
        if chat:
            c["delta"] = delta if delta is not None else ({"content": text} if text or finish is None else {})
            if job.logprobs is not None and lps:
                c["logprobs"] = _chat_logprobs(lps)
        else:
            c["text"] = text
            if job.logprobs is not None and lps:
                c["logprobs"] = _text_logprobs(lps, offset[0])
            offset[0] += len(text)
        return event([c])

    results = []
    for i in range(n):
        offset = [0]
        if chat:
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        buffered: list[str] = []  # with tools the answer is held back until it is known to be a call or not
        ts: TextStream | None = None
        try:
            async for item in stream_pieces(state, job.nth(i)):
                if isinstance(item, TextStream):
                    ts = item
                elif tools:
                    buffered.append(item[0])
                else:
                    yield piece(i, item[0], item[1])
        except Exception as exc:  # noqa: BLE001 — the status line is gone: report it in the stream
            err = APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")
            yield f"data: {json.dumps(err.body())}\n\n".encode()
            return
        assert ts is not None
        results.append(ts)
        finish = ts.stats.finish_reason
        if tools:
            content, calls = parse_tool_calls(ts.text, tools)
            if calls:
                if content:
                    yield piece(i, content, [])
                yield piece(i, "", [], None, {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]})
                finish = "tool_calls"
            elif ts.text:
                yield piece(i, ts.text, ts.token_logprobs)
        yield piece(i, "", [], finish)
    if include_usage:
        yield event([], usage=_usage(results))
    yield b"data: [DONE]\n\n"




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


def serve(state: ServerState | None, sock: socket.socket, *, log_level: str = "warning",
          announce: Callable[[str], None] | None = None, pool: Any = None,
          report_dirs: list[Path] | None = None) -> None:
    """Serve until SIGINT/SIGTERM."""
    import uvicorn

    config = uvicorn.Config(create_app(state, pool, report_dirs), log_level=log_level, access_log=log_level in ("info", "debug"),
                            timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    if announce:
        announce(f"http://{url_host}:{port}")
    server.run(sockets=[sock])
    if not server.started:
        print("the server did not start", file=sys.stderr)
