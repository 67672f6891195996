"""Ollama's native API on ``llmquant serve``, so ``import ollama`` and Ollama tools work unchanged.

Routes and shapes as ollama/ollama ``docs/api.md`` describes them: ``/api/generate`` and
``/api/chat`` (NDJSON streaming by default, ``stream: false`` for one object; ``options``;
``format`` ``"json"`` or a JSON schema, enforced by a llama.cpp grammar; ``keep_alive``; durations
in nanoseconds; an empty prompt or message list only loads — or with ``keep_alive: 0`` unloads —
the model), ``/api/embed`` (and the older ``/api/embeddings``), ``/api/tags``, ``/api/show``,
``/api/ps``, ``/api/version``; the store's management routes ``/api/create`` (from ``from`` and the
Modelfile fields, or a Modelfile's text; ``quantize`` quantizes the FROM model first), ``/api/copy``,
``/api/delete``, ``/api/pull`` (offline: succeeds for a stored model, 404 otherwise) and
``/api/push`` (refused with a 400: there is no registry). Errors are ``{"error": "message"}`` with
Ollama's status codes (404 for an unknown model), which the ollama client raises as
``ResponseError``. Models are the store's ``name:tag`` names, loaded on demand by the pool (pool.py).

Tool calls: the model's own chat template renders ``tools``; the answer is parsed for calls
(Hermes/Qwen ``<tool_call>`` blocks, or the whole answer a ``{"name", "arguments"}`` object), as
Ollama parses them. With tools the streamed answer is sent once it is known to be a call or not.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from ..errors import LlmquantError
from ..runtime.llama import Sampling, TextStream
from .engine import (APIError, Job, ServerState, _EventStream, check_room, embed, generate, leased, parse_tool_calls,
                  schema_grammar, stream_pieces)
from .modelfile import details_of, digest_of, now_iso
from .pool import FOREVER, parse_keep_alive

OLLAMA_API_VERSION = "0.12.0"  # the Ollama API these routes follow (clients compare it)

# options that change sampling or the context; the others Ollama accepts (num_thread, num_gpu,
# use_mmap, ...) have no effect here and are ignored, as Ollama ignores options a runner lacks
_SAMPLING_OPTIONS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "seed": int,
                     "repeat_penalty": float, "presence_penalty": float, "frequency_penalty": float}
KNOWN_OPTIONS = set(_SAMPLING_OPTIONS) | {
    "num_ctx", "num_predict", "stop", "num_keep", "typical_p", "repeat_last_n", "mirostat", "mirostat_tau",
    "mirostat_eta", "penalize_newline", "numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "vocab_only",
    "use_mmap", "use_mlock", "num_thread", "tfs_z"}


class _Named(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model: str | None = None
    name: str | None = None  # older clients send the model as "name"

    @property
    def model_name(self) -> str:
        name = self.model or self.name
        if not name:
            raise APIError(400, "model is required", param="model")
        return name


class _Body(_Named):
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class GenerateBody(_Body):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[Any] | None = None


class ChatBody(_Body):
    messages: list[Any] | None = None
    tools: list[Any] | None = None


class EmbedBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[str] = ""
    truncate: bool = True
    dimensions: int | None = None
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None


class EmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None


class ShowBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    name: str | None = None
    verbose: bool = False


class CreateBody(_Named):
    from_: str | None = Field(default=None, alias="from")
    modelfile: str | None = None  # older clients send the Modelfile's text
    quantize: str | None = None
    template: str | None = None
    system: str | None = None
    license: str | list[str] | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    stream: bool = True


class CopyBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    source: str
    destination: str


class NameBody(_Named):
    stream: bool = True


def _create_quantized(name: str, text: str, qtype: str) -> None:
    """``ollama create --quantize TYPE``: the Modelfile's FROM model quantized to TYPE (llama.cpp's
    mixture for that file type), stored under ``name`` with the Modelfile's settings."""
    import re
    import tempfile
    from pathlib import Path

    from ..gguf.recipes import parse_ftype
    from ..quantize import quantize_model
    from ..store import StoreError, get, home, looks_like_name
    from .modelfile import create_model, parse_modelfile

    mf = parse_modelfile(text, name="request")
    src = Path(mf.source).expanduser()
    if not src.exists():
        if not looks_like_name(mf.source):
            raise APIError(400, f"FROM {mf.source}: no such file or stored model")
        try:
            src = Path(get(mf.source).path)
        except StoreError:
            raise APIError(404, f"model '{mf.source}' not found") from None
    ftype = parse_ftype(qtype)
    (home() / "tmp").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home() / "tmp", prefix="create-") as tmp:
        dst = Path(tmp) / f"{name.replace('/', '_').replace(':', '-')}.gguf"
        quantize_model(src, dst, ftype)
        from_line = re.compile(r"^\s*FROM\s+.*$", re.IGNORECASE | re.MULTILINE)
        create_model(name, Path(tmp) / "Modelfile", text=from_line.sub(f"FROM {dst}", text, count=1))


def create_modelfile(body: CreateBody) -> str:
    """The Modelfile text an /api/create request stands for (``modelfile`` as sent, or built from
    ``from``, ``system``, ``template``, ``parameters``, ``messages``, ``license``)."""
    from .modelfile import setting_lines

    if body.files or body.adapters:
        raise APIError(400, "files and adapters (uploaded blobs) are not supported; create from a stored model "
                            "or a GGUF path with \"from\"", param="files")
    if body.modelfile:
        return body.modelfile
    if not body.from_:
        raise APIError(400, "\"from\" (a stored model or a GGUF path) or \"modelfile\" is required", param="from")
    settings = {"template": body.template, "system": body.system, "parameters": body.parameters,
                "messages": body.messages, "license": body.license}
    return "\n".join([f"FROM {body.from_}", *setting_lines(settings, keep_empty=True)]) + "\n"


# -- helpers ---------------------------------------------------------------------------------------------
def options_of(body: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """A request's options over the model's defaults (a Modelfile's PARAMETER lines), checked."""
    opts = dict(defaults)
    given = body.options or {}
    if not isinstance(given, dict):
        raise APIError(400, "options must be an object", param="options")
    for key, value in given.items():
        if value is None:
            continue
        if key in _SAMPLING_OPTIONS:
            kind = _SAMPLING_OPTIONS[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise APIError(400, f"options.{key} must be a number", param=f"options.{key}")
            opts[key] = kind(value)
        elif key in ("num_ctx", "num_predict"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
                raise APIError(400, f"options.{key} must be an integer", param=f"options.{key}")
            opts[key] = int(value)
        elif key == "stop":
            opts["stop"] = [value] if isinstance(value, str) else value
        else:
            opts[key] = value  # known-but-inert options and unknown ones are ignored, as Ollama does
    if "num_ctx" in opts and not 16 <= opts["num_ctx"] <= 1 << 20:
        raise APIError(400, "options.num_ctx must be between 16 and 1048576", param="options.num_ctx")
    t = opts.get("temperature")
    if t is not None and not 0 <= t <= 5:
        raise APIError(400, "options.temperature must be between 0 and 5", param="options.temperature")
    p = opts.get("top_p")
    if p is not None and not 0 < p <= 1:
        raise APIError(400, "options.top_p must be in (0, 1]", param="options.top_p")
    return opts


def sampling_of(opts: dict[str, Any]) -> Sampling:
    d = Sampling()
    return Sampling(
        temperature=opts.get("temperature", d.temperature), top_p=opts.get("top_p", d.top_p),
        top_k=opts.get("top_k", d.top_k), min_p=opts.get("min_p", d.min_p),
        repeat_penalty=opts.get("repeat_penalty", d.repeat_penalty),
        frequency_penalty=opts.get("frequency_penalty", 0.0), presence_penalty=opts.get("presence_penalty", 0.0),
        seed=opts.get("seed"),
    )


def format_grammar(fmt: Any) -> str | None:
    from ..runtime.llama import json_grammar

    if fmt in (None, ""):
        return None
    if fmt == "json":
        return json_grammar()
    if isinstance(fmt, dict):
        return schema_grammar(fmt, "format")
    raise APIError(400, f"invalid format {fmt!r}: expected \"json\" or a JSON schema", param="format")


def _stop_list(opts: dict[str, Any]) -> list[str]:
    stop = opts.get("stop") or []
    if not isinstance(stop, list) or any(not isinstance(s, str) or not s for s in stop) or len(stop) > 16:
        raise APIError(400, "options.stop must be up to 16 non-empty strings", param="options.stop")
    return stop


def _max_tokens(opts: dict[str, Any]) -> int | None:
    n = opts.get("num_predict")
    if n is None or n < 0:  # -1: until the model stops, -2: fill the context
        return None
    return max(n, 1) if n else 1


def _logprobs(body: _Body) -> int | None:
    if not body.logprobs:
        return None
    n = body.top_logprobs or 0
    if not 0 <= n <= 20:
        raise APIError(400, "top_logprobs must be from 0 to 20", param="top_logprobs")
    return n


def _logprob_list(lps: list) -> list[dict]:
    return [{"token": t.text, "logprob": t.logprob, "top_logprobs": [{"token": x, "logprob": v} for _, x, v in t.top]}
            for t in lps]


def _stats(ts: TextStream, started: float, load_ns: int) -> dict:
    s = ts.stats
    return {"done_reason": "stop" if s.finish_reason == "stop" else "length" if s.finish_reason == "length"
            else s.finish_reason, "total_duration": int((time.perf_counter() - started) * 1e9),
            "load_duration": load_ns, "prompt_eval_count": s.prompt_tokens,
            "prompt_eval_duration": int(s.prompt_seconds * 1e9), "eval_count": s.completion_tokens,
            "eval_duration": int(s.generation_seconds * 1e9)}


def _ndjson(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


async def _leased_answer(pool, body: _Body, opts: dict, make):
    """Load (or find) the model with the request's num_ctx and keep_alive, timing the load."""
    keep = parse_keep_alive(body.keep_alive)
    t0 = time.perf_counter()

    async def timed(st: ServerState):
        return await make(st, int((time.perf_counter() - t0) * 1e9))

    return await leased(pool, body.model_name, timed, n_ctx=opts.get("num_ctx"), keep_alive=keep)


def _defaults(st: ServerState) -> dict[str, Any]:
    return dict(getattr(st, "parameters", None) or {})


class JsonBodies:
    """ASGI middleware: an /api/ request body is JSON whatever its Content-Type says, as Ollama reads it
    (``curl -d '{...}'`` sends application/x-www-form-urlencoded)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/api/") and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


# -- routes ----------------------------------------------------------------------------------------------
def add_routes(app, pool, guarded) -> None:
    from fastapi.responses import JSONResponse

    def defaults_for(name: str) -> dict[str, Any]:
        e = pool.find(name)
        if e is not None:
            return _defaults(e.state)
        try:
            from ..store import get

            return dict(get(name).parameters or {})
        except Exception:  # noqa: BLE001 — unknown here; the pool answers 404 when it resolves it
            return {}

    async def load_only(body: _Body, opts: dict, kind: str):
        """Ollama: an empty prompt loads the model (keep_alive 0: unloads it) and answers done."""
        keep = parse_keep_alive(body.keep_alive)
        name = body.model_name
        if keep == 0:
            pool.resolve(name)  # 404 for an unknown model
            pool.unload(name)
            reason = "unload"
        else:
            st = await pool.acquire(name, n_ctx=opts.get("num_ctx"), keep_alive=keep)
            pool.release(st)
            name, reason = st.model_id, "load"
        out: dict[str, Any] = {"model": name, "created_at": now_iso(), "done": True, "done_reason": reason}
        out.update({"response": ""} if kind == "generate" else {"message": {"role": "assistant", "content": ""}})
        return JSONResponse(out)

    @app.post("/api/generate", dependencies=guarded)
    async def api_generate(body: GenerateBody, request: Request):
        if body.images:
            raise APIError(400, "this model does not support images", param="images")
        if body.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
        if body.template:
            raise APIError(400, "a per-request template is not supported; the model's own chat template is used "
                                "(raw: true sends the prompt as it is)", param="template")
        opts = options_of(body, defaults_for(body.model_name))
        if not body.prompt and not body.context:
            return await load_only(body, opts, "generate")
        grammar, lp = format_grammar(body.format), _logprobs(body)
        sampling, stop = sampling_of(opts), _stop_list(opts)
        started = time.perf_counter()

        async def answer(st: ServerState, load_ns: int):
            from ..runtime.chat import ChatTemplateError

            if body.raw:
                text = body.prompt
            else:
                system = body.system if body.system is not None else getattr(st, "system", None)
                messages = ([{"role": "system", "content": system}] if system else []) + \
                           [{"role": "user", "content": body.prompt}]
                try:
                    text = st.vocab.format_chat(messages)
                except ChatTemplateError as exc:
                    raise APIError(400, str(exc), param="prompt") from None
            ids = st.vocab.prompt_tokens(text) if text else []
            if body.context:
                if any(not 0 <= t < st.vocab.n_vocab for t in body.context):
                    raise APIError(400, "context token ids are out of range", param="context")
                if ids and ids[0] == st.vocab.bos and st.vocab.add_bos:
                    ids = ids[1:]
                ids = list(body.context) + ids
            job = Job(ids, check_room(st, ids, _max_tokens(opts), "prompt"), sampling, stop, grammar, lp)
            base = {"model": st.model_id}
            if not body.stream:
                ts = await generate(st, job, request)
                if ts is None:
                    return JSONResponse({"error": "client closed the request"}, status_code=499)
                out = {**base, "created_at": now_iso(), "response": ts.text, "done": True,
                       **_stats(ts, started, load_ns), "context": ids + ts.tokens}
                if lp is not None:
                    out["logprobs"] = _logprob_list(ts.token_logprobs)
                return JSONResponse(out)

            async def events():
                try:
                    async for item in stream_pieces(st, job):
                        if isinstance(item, TextStream):
                            yield _ndjson({**base, "created_at": now_iso(), "response": "", "done": True,
                                           **_stats(item, started, load_ns), "context": ids + item.tokens})
                        else:
                            part = {**base, "created_at": now_iso(), "response": item[0], "done": False}
                            if lp is not None:
                                part["logprobs"] = _logprob_list(item[1])
                            yield _ndjson(part)
                except Exception as exc:  # noqa: BLE001 — mid-stream: Ollama sends {"error"} as a line
                    yield _ndjson({"error": f"generation failed: {type(exc).__name__}: {exc}"})

            return _EventStream(events(), media_type="application/x-ndjson")

        return await _leased_answer(pool, body, opts, answer)

    @app.post("/api/chat", dependencies=guarded)
    async def api_chat(body: ChatBody, request: Request):
        from ..runtime.chat import ChatTemplateError, validate_messages
        from .engine import _openai_tools, _template_renders_tools

        opts = options_of(body, defaults_for(body.model_name))
        if not body.messages:
            return await load_only(body, opts, "chat")
        for i, m in enumerate(body.messages):
            if isinstance(m, dict) and m.get("images"):
                raise APIError(400, f"messages[{i}]: this model does not support images", param="messages")
        try:
            messages = validate_messages(body.messages)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        tools = _openai_tools(body.tools)
        grammar, lp = format_grammar(body.format), _logprobs(body)
        sampling, stop = sampling_of(opts), _stop_list(opts)
        started = time.perf_counter()

        async def answer(st: ServerState, load_ns: int):
            if tools and not _template_renders_tools(st):
                raise APIError(400, f"{st.model_id} does not support tools", param="tools")
            system = getattr(st, "system", None)
            msgs = messages if not system or messages[0]["role"] == "system" else \
                [{"role": "system", "content": system}] + messages
            try:
                text = st.vocab.format_chat(msgs, tools=tools or None)
            except ChatTemplateError as exc:
                raise APIError(400, str(exc), param="messages") from None
            ids = st.vocab.prompt_tokens(text)
            job = Job(ids, check_room(st, ids, _max_tokens(opts), "messages"), sampling, stop, grammar, lp)
            base = {"model": st.model_id}

            def message(text: str) -> dict:
                if tools:
                    content, calls = parse_tool_calls(text, tools)
                    if calls:
                        return {"role": "assistant", "content": content or "", "tool_calls": [
                            {"function": {"name": c["function"]["name"],
                                          "arguments": json.loads(c["function"]["arguments"])}} for c in calls]}
                return {"role": "assistant", "content": text}

            if not body.stream:
                ts = await generate(st, job, request)
                if ts is None:
                    return JSONResponse({"error": "client closed the request"}, status_code=499)
                out = {**base, "created_at": now_iso(), "message": message(ts.text), "done": True,
                       **_stats(ts, started, load_ns)}
                if lp is not None:
                    out["logprobs"] = _logprob_list(ts.token_logprobs)
                return JSONResponse(out)

            async def events():
                try:
                    async for item in stream_pieces(st, job):
                        if isinstance(item, TextStream):
                            if tools:  # held back until the whole answer is known to be a call or not
                                yield _ndjson({**base, "created_at": now_iso(), "message": message(item.text),
                                               "done": False})
                            yield _ndjson({**base, "created_at": now_iso(),
                                           "message": {"role": "assistant", "content": ""}, "done": True,
                                           **_stats(item, started, load_ns)})
                        elif not tools:
                            part = {**base, "created_at": now_iso(),
                                    "message": {"role": "assistant", "content": item[0]}, "done": False}
                            if lp is not None:
                                part["logprobs"] = _logprob_list(item[1])
                            yield _ndjson(part)
                except Exception as exc:  # noqa: BLE001
                    yield _ndjson({"error": f"generation failed: {type(exc).__name__}: {exc}"})

            return _EventStream(events(), media_type="application/x-ndjson")

        return await _leased_answer(pool, body, opts, answer)

    @app.post("/api/embed", dependencies=guarded)
    async def api_embed(body: EmbedBody):
        items = [body.input] if isinstance(body.input, str) else list(body.input)
        if not items or any(not x for x in items):
            raise APIError(400, "input must not be empty", param="input")
        if body.dimensions is not None and body.dimensions < 1:
            raise APIError(400, "dimensions must be positive", param="dimensions")
        if not body.model:
            raise APIError(400, "model is required", param="model")
        started = time.perf_counter()

        async def answer(st: ServerState):
            import numpy as np

            load_ns = int((time.perf_counter() - started) * 1e9)
            model = await st.embedder()
            limit = model._llm.n_batch
            tokenized = []
            for i, text in enumerate(items):
                ids = st.vocab.tokenize(text)
                if len(ids) > limit:
                    if not body.truncate:
                        raise APIError(400, f"input[{i}] has {len(ids)} tokens, more than the context of {limit}",
                                       param="input")
                    ids = ids[:limit]
                tokenized.append(ids)
            vectors, n_tokens = await embed(st, tokenized)
            out = []
            for v in vectors:
                if body.dimensions is not None:
                    if body.dimensions > len(v):
                        raise APIError(400, f"dimensions {body.dimensions} is more than the model's {len(v)}",
                                       param="dimensions")
                    v = v[: body.dimensions]
                    v = v / (float(np.linalg.norm(v)) or 1.0)
                out.append([float(x) for x in v])
            return JSONResponse({"model": st.model_id, "embeddings": out,
                                 "total_duration": int((time.perf_counter() - started) * 1e9),
                                 "load_duration": load_ns, "prompt_eval_count": n_tokens})

        return await leased(pool, body.model, answer, keep_alive=parse_keep_alive(body.keep_alive))

    @app.post("/api/embeddings", dependencies=guarded)
    async def api_embeddings(body: EmbeddingsBody):
        if not body.model:
            raise APIError(400, "model is required", param="model")

        async def answer(st: ServerState):
            if not body.prompt:
                return JSONResponse({"embedding": []})
            model = await st.embedder()
            async with st.embed_lock:
                import asyncio

                vectors, _ = await asyncio.to_thread(model.embed, [body.prompt], normalize=False)
            return JSONResponse({"embedding": [float(x) for x in vectors[0]]})

        return await leased(pool, body.model, answer, keep_alive=parse_keep_alive(body.keep_alive))

    @app.get("/api/tags", dependencies=guarded)
    async def api_tags():
        from ..store import list_models

        models = [{"name": m.name, "model": m.name, "modified_at": now_iso(m.modified), "size": m.size,
                   "digest": digest_of(m), "details": details_of(m)} for m in list_models()]
        return {"models": models}

    @app.post("/api/show", dependencies=guarded)
    async def api_show(body: ShowBody):
        from .modelfile import show_model

        name = body.model or body.name
        if not name:
            raise APIError(400, "model is required", param="model")
        pool.resolve(name)  # 404 for an unknown model
        return show_model(name, verbose=body.verbose)

    @app.get("/api/ps", dependencies=guarded)
    async def api_ps():
        from ..store import get

        out = []
        for e in pool.loaded():
            st = e.state
            try:
                m = get(st.model_id)
                digest, details = digest_of(m), details_of(m)
            except Exception:  # noqa: BLE001 — a model served from a path outside the store
                digest, details = "", {"format": "gguf"}
            expires = "2318-01-01T00:00:00Z" if e.expires_at == FOREVER and e.keep_alive == FOREVER else \
                now_iso(e.expires_at if e.expires_at != FOREVER else time.time() + e.keep_alive)
            out.append({"name": st.model_id, "model": st.model_id, "size": e.size, "digest": digest,
                        "details": details, "expires_at": expires, "size_vram": 0, "context_length": st.n_ctx})
        return {"models": out}

    # -- model management: the store behind /api/tags ---------------------------------------------------
    def _status_stream(work, stream: bool, first: str):
        """Run ``work`` (blocking, returns nothing) off the event loop; answer Ollama's progress
        lines ({"status": ...}, the last "success"), or one object with ``stream: false``."""
        import asyncio

        async def run() -> None:
            try:
                await asyncio.to_thread(work)
            except APIError:
                raise
            except LlmquantError as exc:
                raise APIError(400, str(exc)) from None

        if not stream:
            async def once():
                await run()
                return JSONResponse({"status": "success"})
            return once()

        async def events():
            yield (json.dumps({"status": first}) + "\n").encode()
            try:
                await run()
            except APIError as exc:
                yield (json.dumps({"error": exc.message}) + "\n").encode()
                return
            yield (json.dumps({"status": "success"}) + "\n").encode()

        async def streamed():
            return _EventStream(events(), media_type="application/x-ndjson")
        return streamed()

    def _stored(name: str):
        from ..store import StoreError, get

        try:
            return get(name)
        except StoreError:
            raise APIError(404, f"model '{name}' not found") from None

    @app.post("/api/create", dependencies=guarded)
    async def api_create(body: CreateBody):
        """Ollama's create: a stored model from a Modelfile (or its fields); with ``quantize`` the
        FROM model is first quantized to that type (as ``ollama create --quantize``)."""
        from ..store import parse_name

        name = body.model_name
        try:
            parse_name(name)
        except LlmquantError as exc:
            raise APIError(400, str(exc), param="model") from None
        text = create_modelfile(body)

        def work() -> None:
            from .modelfile import create_model

            if body.quantize:
                _create_quantized(name, text, body.quantize)
            else:
                create_model(name, "Modelfile", text=text)

        first = f"quantizing to {body.quantize.upper()}" if body.quantize else "parsing modelfile"
        return await _status_stream(work, body.stream, first)

    @app.post("/api/copy", dependencies=guarded)
    async def api_copy(body: CopyBody):
        from ..store import pull

        src = _stored(body.source)
        try:
            import asyncio

            await asyncio.to_thread(pull, src.path, body.destination, config=dict(src.config))
        except LlmquantError as exc:
            raise APIError(400, str(exc)) from None
        return JSONResponse({})

    @app.delete("/api/delete", dependencies=guarded)
    async def api_delete(body: NameBody):
        from ..store import remove

        name = body.model_name
        model = _stored(name)
        if model.embedded:
            raise APIError(400, f"{model.name} is the embedded default model; it cannot be deleted")
        try:
            remove(name)
        except LlmquantError as exc:
            raise APIError(400, str(exc)) from None
        return JSONResponse({})

    @app.post("/api/pull", dependencies=guarded)
    async def api_pull(body: NameBody):
        """Offline: a model already in the store is "pulled" (success at once); anything else is
        refused with what to do instead (nothing downloads weights here)."""
        name = body.model_name
        from ..store import StoreError, get

        try:
            get(name)
        except StoreError:
            raise APIError(404, f"pull model '{name}': not in the local store, and llmquant downloads nothing; "
                                "import a GGUF with `llmquant pull FILE --name NAME`") from None
        return await _status_stream(lambda: None, body.stream, "pulling manifest")

    @app.post("/api/push", dependencies=guarded)
    async def api_push(body: NameBody):
        raise APIError(400, f"push {body.model_name}: llmquant serves a local store and pushes to no registry; "
                            "copy the GGUF file itself (llmquant show NAME gives its path)")

    @app.get("/api/version")
    async def api_version():
        from .. import __version__

        return {"version": OLLAMA_API_VERSION, "llmquant": __version__}
