"""The serving engine under both APIs: slots, a loaded model's state, one generation (whole or
streamed), the SSE/NDJSON response that cancels when its client goes away, grammars from JSON
schemas, and tool calls (the grammar for a forced call, the parser for a free one).

Concurrency: ``parallel`` slots, each its own llama.cpp context over the same memory-mapped
weights. A request waits for a free slot in arrival order (an ``asyncio.Queue`` of idle slots
serves its waiters first-in first-out); generation runs in a thread, so the event loop stays free
to accept, validate (with a vocabulary-only copy of the model) and stream. A client that goes away
mid-stream cancels its generation at the next token and the slot returns to the queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from fastapi import Request
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
    parameters: dict[str, Any] = field(default_factory=dict)  # a Modelfile's PARAMETER defaults (Ollama routes)
    system: str | None = None  # a Modelfile's SYSTEM prompt
    options: LoadOptions = field(default_factory=LoadOptions)  # -ngl, mmap/mlock, flash attention, KV types
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


async def leased(pool: Any, name: str | None, make: Callable[[ServerState], Any], *, n_ctx: int | None = None,
                 keep_alive: float | None = None):
    """Run ``make(state)`` with the named model leased from the pool; a streamed answer keeps the
    lease until the stream ends."""
    st = await pool.acquire(name, n_ctx=n_ctx, keep_alive=keep_alive)
    try:
        resp = await make(st)
    except BaseException:
        pool.release(st)
        raise
    if isinstance(resp, _EventStream):
        resp.on_close = lambda: pool.release(st)
    else:
        pool.release(st)
    return resp


async def embed(st: ServerState, items: list) -> tuple[list, int]:
    model = await st.embedder()
    async with st.embed_lock:  # one embedding batch at a time on the shared context
        try:
            return await asyncio.to_thread(model.embed, items)
        except ContextLengthError as exc:
            raise APIError(400, str(exc), param="input", code="context_length_exceeded") from None


def schema_grammar(schema: dict, param: str) -> str:
    from ..runtime.llama import json_schema_grammar

    try:
        return json_schema_grammar(schema)
    except ValueError as exc:
        raise APIError(400, f"{param}: {exc}", param=param) from None


def _openai_tools(tools: list[Any] | None) -> list[dict]:
    out = []
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                           param="tools")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    return out


def _tool_choice(choice: Any, tools: list[dict]) -> str:
    """"none" | "auto" | "required" | the name of the one function to call."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise APIError(400, "tool_choice must be none, auto, required or {\"type\": \"function\", ...}",
                           param="tool_choice")
        if choice == "required" and not tools:
            raise APIError(400, "tool_choice required needs tools", param="tool_choice")
        return choice
    name = ((choice or {}).get("function") or {}).get("name") if isinstance(choice, dict) else None
    if name not in {t["function"]["name"] for t in tools}:
        raise APIError(400, f"tool_choice names a function that is not among the tools: {name!r}", param="tool_choice")
    return name


def _template_renders_tools(st: ServerState) -> bool:
    template = st.vocab.chat_template or ""
    return "tools" in template


def tool_call_grammar(tools: list[dict], only: str | None = None) -> str:
    """A grammar for one call: ``{"name": NAME, "arguments": {...}}`` with the arguments valid under
    that function's parameter schema (any of the tools, or ``only``)."""
    options = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                  "arguments": t["function"]["parameters"]},
                "required": ["name", "arguments"], "additionalProperties": False}
               for t in tools if only is None or t["function"]["name"] == only]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return schema_grammar(schema, "tools")


_TOOL_TAGS = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_tool_calls(text: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
    """(remaining content, calls) from a model's output: Hermes/Qwen ``<tool_call>{...}</tool_call>``
    blocks, or the whole output one JSON object (or list of them) with ``name`` and ``arguments`` (or
    Llama 3.1's ``parameters``). Calls to functions not among ``tools`` are left as text."""
    names = {t["function"]["name"] for t in tools}
    blobs = _TOOL_TAGS.findall(text)
    rest = _TOOL_TAGS.sub("", text).strip() if blobs else ""
    if not blobs:
        stripped = text.strip()
        if not stripped.startswith(("{", "[")):
            return text, []
        blobs = [stripped]
    calls = []
    for blob in blobs:
        try:
            value = json.loads(blob)
        except ValueError:
            return text, []
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, dict) or item.get("name") not in names:
                return text, []
            args = item.get("arguments", item.get("parameters", {}))
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except ValueError:
                    return text, []
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": item["name"], "arguments": json.dumps(args, ensure_ascii=False)}})
    return (rest or None), calls


@dataclass
class Job:
    """One generation: what ``Model.generate`` needs."""
    ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str] = field(default_factory=list)
    grammar: str | None = None
    logprobs: int | None = None

    def nth(self, i: int) -> "Job":
        """The i-th of n choices: the same request with the next seed (when one was given)."""
        if i == 0 or self.sampling.seed is None:
            return self
        return Job(self.ids, self.max_tokens, dataclasses.replace(self.sampling, seed=self.sampling.seed + i),
                   self.stop, self.grammar, self.logprobs)


def check_room(state: ServerState, ids: list[int], max_tokens: int | None, param: str) -> int:
    n_ctx = state.n_ctx
    if len(ids) >= n_ctx:
        raise APIError(400, f"This model's maximum context length is {n_ctx} tokens; the prompt has {len(ids)}",
                       param=param, code="context_length_exceeded")
    max_tokens = max_tokens if max_tokens is not None else n_ctx - len(ids)
    if len(ids) + max_tokens > n_ctx:
        raise APIError(400, f"This model's maximum context length is {n_ctx} tokens; you requested "
                            f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} to generate)",
                       param="max_tokens", code="context_length_exceeded")
    return max_tokens


def check_stop(stop: Any) -> list[str]:
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stop) > 16 or any(not isinstance(s, str) or not s for s in stop):
        raise APIError(400, "stop must be up to 16 non-empty strings", param="stop")
    return stop


async def generate(state: ServerState, job: Job, request: Request | None) -> TextStream | None:
    """Generate on a free slot; None when the client hung up first (generation is then cancelled)."""
    cancel = threading.Event()
    model = await state.slots.acquire()
    loop = asyncio.get_running_loop()
    fut = _in_thread(loop, lambda: model.generate(job.ids, max_tokens=job.max_tokens, sampling=job.sampling,
                                                  stop=job.stop, cancel=cancel, grammar=job.grammar,
                                                  logprobs=job.logprobs).consume(),
                     lambda: state.slots.release(model))
    gone = asyncio.ensure_future(_disconnected(request)) if request is not None else loop.create_future()
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
        return None
    return fut.result()


async def stream_pieces(state: ServerState, job: Job) -> AsyncIterator[Any]:
    """Yield ``(text, [TokenLogprob, ...])`` pieces as they are generated, then the TextStream."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def produce(model: Model) -> TextStream:
        ts = model.generate(job.ids, max_tokens=job.max_tokens, sampling=job.sampling, stop=job.stop, cancel=cancel,
                            grammar=job.grammar, logprobs=job.logprobs)
        sent = 0
        for text in ts:
            lps = ts.token_logprobs[sent:]
            sent += len(lps)
            loop.call_soon_threadsafe(queue.put_nowait, (text, lps))
            if cancel.is_set():
                break
        if sent < len(ts.token_logprobs):
            loop.call_soon_threadsafe(queue.put_nowait, ("", ts.token_logprobs[sent:]))
        return ts

    model = await state.slots.acquire()  # a client gone while waiting here never gets a slot
    fut = _in_thread(loop, lambda: produce(model), lambda: state.slots.release(model))
    fut.add_done_callback(lambda f: queue.put_nowait(None))
    try:
        while True:
            item = await queue.get()
            if item is None:
                break
            yield item
        while not queue.empty():
            item = queue.get_nowait()
            if item is not None:
                yield item
        yield fut.result()
    finally:
        cancel.set()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """An SSE (or NDJSON) response that notices a client going away even while nothing is being
    sent (and then cancels the generation); starlette alone only notices on the next write.
    ``on_close`` runs once the response is over, however it ended."""

    def __init__(self, events: AsyncIterator[bytes], media_type: str = "text/event-stream"):
        super().__init__(events, media_type=media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events
        self.on_close: Callable[[], None] | None = None

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
            try:
                await self.events.aclose()  # type: ignore[attr-defined]
            finally:
                if self.on_close is not None:
                    self.on_close()
