"""The models a server holds: loaded by the name a request gives, unloaded least recently used.

As ``ollama serve`` does: a request names a store model (``name:tag``); if it is not loaded the
pool loads it (one load at a time, in a thread), first unloading idle models, least recently used
first, until the new one fits the memory budget (``fit``'s estimate of weights + per-slot KV,
compute and output buffers: ``fit.planner.serving_bytes``) and the count limit
(``OLLAMA_MAX_LOADED_MODELS``, 3 on a CPU). A model in use is never unloaded: a request that needs
its room waits for it. Each model has a keep-alive (Ollama's ``keep_alive``: ``"5m"``, seconds,
``0`` unload after this request, negative keep forever); a background task unloads expired ones.
A different ``num_ctx`` is a different instance (Ollama reloads the model with the new context).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engine import APIError, ServerState, load_state

DEFAULT_KEEP_ALIVE = 300.0  # Ollama's OLLAMA_KEEP_ALIVE default: 5m
FOREVER = float("inf")
_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's keep_alive -> seconds (``inf``: forever); None when absent. A number is seconds, a
    string a Go duration ("5m", "1h30m", "-1"). Raises APIError for anything else."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise APIError(400, "keep_alive must be a duration such as \"5m\" or a number of seconds", param="keep_alive")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
                raise APIError(400, f"keep_alive {value!r}: expected a duration such as \"5m\", \"1h\" or seconds",
                               param="keep_alive") from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise APIError(400, "keep_alive must be a duration such as \"5m\" or a number of seconds", param="keep_alive")
    return FOREVER if seconds < 0 else seconds


@dataclass
class Loaded:
    key: tuple[str, int]  # (store name, n_ctx)
    state: ServerState
    size: int  # bytes, fit's estimate
    leases: int = 0
    keep_alive: float = DEFAULT_KEEP_ALIVE
    expires_at: float = FOREVER  # time.time() seconds; set when the last lease ends
    loaded_at: float = field(default_factory=time.time)

    @property
    def busy(self) -> bool:
        """Leased, or a generation thread still holds a slot (a cancelled stream winding down)."""
        slots = self.state.slots
        return self.leases > 0 or (slots._idle is not None and slots.idle.qsize() < len(slots.models))


class ModelPool:
    """``await pool.acquire(name, ...)`` -> a ServerState with a lease; ``pool.release(state)`` when done."""

    def __init__(self, *, budget: int, max_models: int = 3, n_ctx: int = 4096, parallel: int = 1,
                 threads: int | None = None, api_key: str | None = None,
                 resolve: Callable[[str | None], tuple[str, Path]] | None = None,
                 cost: Callable[[Path, int, int], int] | None = None,
                 loader: Callable[..., ServerState] = load_state, batch: int = 512, options: Any = None):
        self.budget, self.max_models = budget, max_models
        self.batch, self.options = batch, options  # how every model is loaded (runtime.llama.LoadOptions)
        self.n_ctx, self.parallel, self.threads, self.api_key = n_ctx, parallel, threads, api_key
        self.resolve = resolve or resolve_store_name
        self.cost = cost or _fit_cost
        self.loader = loader
        self.entries: OrderedDict[tuple[str, int], Loaded] = OrderedDict()  # least recently used first
        self.default: str | None = None  # the name a request without a model gets
        self._lock: asyncio.Lock | None = None
        self._changed: asyncio.Condition | None = None
        self._reaper: asyncio.Task | None = None

    # -- bookkeeping that must live in the server's event loop --------------------------------------
    @property
    def changed(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
            self._lock = asyncio.Lock()
        return self._changed

    @property
    def lock(self) -> asyncio.Lock:
        _ = self.changed
        assert self._lock is not None
        return self._lock

    def add(self, state: ServerState, *, keep_alive: float = FOREVER) -> Loaded:
        """A model loaded before the server started (``llmquant serve MODEL``): the default one."""
        apply_store_settings(state)
        entry = Loaded((state.model_id, state.n_ctx), state, self.cost(state.path, state.n_ctx, len(state.slots.models)),
                       keep_alive=keep_alive)
        self.entries[entry.key] = entry
        self.default = self.default or state.model_id
        return entry

    @property
    def used(self) -> int:
        return sum(e.size for e in self.entries.values())

    def loaded(self) -> list[Loaded]:
        return list(reversed(self.entries.values()))  # most recently used first, as ollama ps

    def find(self, name: str | None) -> Loaded | None:
        """A loaded model answering to ``name`` (any n_ctx), without loading anything."""
        name = name or self.default
        for e in reversed(self.entries.values()):
            if name in e.state.aliases or name == e.key[0]:
                return e
        return None

    # -- leases ------------------------------------------------------------------------------------------
    async def acquire(self, name: str | None, *, n_ctx: int | None = None,
                      keep_alive: float | None = None) -> ServerState:
        self.start_reaper()
        entry = self._match(name, n_ctx)
        if entry is None:
            model_id, path = self.resolve(name or self.default)
            want = n_ctx or self.n_ctx
            entry = self.entries.get((model_id, want)) or await self._load(model_id, path, want)
        entry.leases += 1
        self.entries.move_to_end(entry.key)
        if keep_alive is not None:
            entry.keep_alive = keep_alive
        entry.expires_at = FOREVER
        return entry.state

    def release(self, state: ServerState) -> None:
        for entry in self.entries.values():
            if entry.state is state:
                entry.leases -= 1
                if entry.leases == 0:
                    entry.expires_at = time.time() + entry.keep_alive
                    if entry.keep_alive == 0 and not entry.busy:
                        self._unload(entry)  # else the reaper unloads it once its thread is done
                self._notify()
                return

    def _match(self, name: str | None, n_ctx: int | None) -> Loaded | None:
        name = name or self.default
        for e in reversed(self.entries.values()):
            if (name in e.state.aliases or name == e.key[0]) and (n_ctx is None or e.key[1] == n_ctx):
                return e
        return None

    async def _load(self, model_id: str, path: Path, n_ctx: int) -> Loaded:
        async with self.lock:  # one load at a time; a second request for the same model waits for this one
            entry = self.entries.get((model_id, n_ctx))
            if entry is not None:
                return entry
            size = await asyncio.to_thread(self.cost, path, n_ctx, self.parallel)
            if size > self.budget:
                raise APIError(500, f"model requires more system memory ({_gib(size)}) than is available "
                                    f"({_gib(self.budget)})", type="server_error", code="insufficient_memory")
            async with self.changed:
                while self.used + size > self.budget or len(self.entries) >= self.max_models:
                    idle = [e for e in self.entries.values() if not e.busy]
                    if idle:
                        self._unload(idle[0])  # least recently used first
                    else:  # every model is busy: wait for a release (or a slot freed by a thread)
                        try:
                            await asyncio.wait_for(self.changed.wait(), 0.5)
                        except asyncio.TimeoutError:
                            pass
            state = await asyncio.to_thread(
                self.loader, path, model_id, n_ctx=n_ctx, parallel=self.parallel, threads=self.threads,
                api_key=self.api_key, batch=self.batch, options=self.options)
            apply_store_settings(state)
            entry = Loaded((model_id, n_ctx), state, size)
            self.entries[entry.key] = entry
            return entry

    def unload(self, name: str) -> bool:
        """keep_alive 0 on a load-only request: unload every idle instance of ``name`` now."""
        hit = False
        for e in list(self.entries.values()):
            if name in e.state.aliases or name == e.key[0]:
                if e.busy:
                    e.keep_alive, e.expires_at = 0.0, time.time()  # the reaper unloads it when free
                else:
                    self._unload(e)
                hit = True
        return hit

    def _unload(self, entry: Loaded) -> None:
        self.entries.pop(entry.key, None)
        close_state(entry.state)
        self._notify()

    def _notify(self) -> None:
        cond = self._changed
        if cond is None:
            return

        async def wake() -> None:
            async with cond:
                cond.notify_all()

        try:
            asyncio.get_running_loop().create_task(wake())
        except RuntimeError:
            pass

    # -- keep-alive ------------------------------------------------------------------------------------
    def start_reaper(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            for e in list(self.entries.values()):
                if not e.busy and e.expires_at <= now:
                    self._unload(e)


def apply_store_settings(state: ServerState) -> None:
    """A stored model's Modelfile settings (PARAMETER defaults, SYSTEM) onto its loaded state."""
    from ..store import StoreError, get

    try:
        m = get(state.model_id)
    except StoreError:
        return
    state.parameters = m.parameters
    state.system = m.config.get("system")


def close_state(state: ServerState) -> None:
    for m in state.slots.models:
        m.close()
    state.vocab.close()
    if state._embedder is not None:
        state._embedder.close()


def resolve_store_name(name: str | None) -> tuple[str, Path]:
    """A request's model name -> (canonical name:tag, GGUF path); 404 ``model not found`` otherwise."""
    from ..store import StoreError, get

    try:
        m = get(name or "default")
    except StoreError:
        raise APIError(404, f"model '{name}' not found: the model `{name}` does not exist in the store "
                            "(see llmquant list)", param="model", code="model_not_found") from None
    return m.name, Path(m.path)


def _fit_cost(path: Path, n_ctx: int, parallel: int) -> int:
    from ..fit.planner import serving_bytes

    return serving_bytes(str(path), n_ctx=n_ctx, parallel=parallel)


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def default_budget() -> int:
    """fit's usable memory on this machine (free memory now), as ``llmquant fit`` counts it."""
    from ..fit.machines import this_machine
    from ..fit.planner import usable_memory

    return usable_memory(this_machine(bandwidth=1.0))
