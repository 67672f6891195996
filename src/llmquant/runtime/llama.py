"""The runtime: a small wrapper over llama-cpp-python, and the only module that imports it.

Load a GGUF (threads, context, mmap), tokenize, greedy/sampled generation, and the logits of a
token batch (for eval). llama.cpp's own log output is silenced unless ``verbose``.
"""

from __future__ import annotations

import codecs
import ctypes
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import ModelFileError
from ..system import default_threads


@dataclass
class Completion:
    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str


class ContextLengthError(ValueError):
    """A prompt (plus the tokens asked for) does not fit the context window."""

    def __init__(self, n_prompt: int, n_ctx: int, what: str = "prompt"):
        self.n_prompt = n_prompt
        self.n_ctx = n_ctx
        super().__init__(f"the {what} has {n_prompt} tokens but the context holds {n_ctx}")


@dataclass
class Sampling:
    """llama.cpp's sampler settings; ``temperature <= 0`` is greedy (argmax at every step)."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # None: a fresh random seed per generation


@dataclass
class GenerationStats:
    prompt_tokens: int
    completion_tokens: int = 0
    prompt_seconds: float = 0.0  # from start to the first sampled token (prompt processing)
    generation_seconds: float = 0.0  # from the first to the last sampled token
    decoded: int = 0  # generated tokens run through the model (each one a decode)
    finish_reason: str = "length"  # "stop" (end of generation or stop string), "length", "cancelled"

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.decoded / self.generation_seconds if self.generation_seconds > 0 else 0.0


@dataclass
class TextStream:
    """Generated text, piece by piece: iterate it once; ``text``, ``tokens`` and ``stats`` fill in
    as it goes. Stop strings are never emitted, nor is any text that might begin one."""

    model: "Model"
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str] = field(default_factory=list)
    cancel: threading.Event | None = None
    reuse_cache: bool = False
    grammar: str | None = None  # GBNF (llama.cpp's grammar syntax) the output must follow
    logprobs: int | None = None  # None: none; N >= 0: each token's log-probability and the N most likely
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list["TokenLogprob"] = field(default_factory=list)
    stats: GenerationStats = field(init=False)

    def __post_init__(self) -> None:
        self.stats = GenerationStats(prompt_tokens=len(self.prompt))

    def __iter__(self) -> Iterator[str]:
        m, s, stats = self.model, self.sampling, self.stats
        llm = m._llm
        budget = min(self.max_tokens, m.n_ctx - len(self.prompt))
        if budget <= 0 or not self.prompt:
            stats.finish_reason = "length"
            return
        stops = [x for x in self.stop if x]
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        greedy = s.temperature <= 0
        llm.set_seed(s.seed if s.seed is not None else random.getrandbits(32))
        if not self.reuse_cache:
            llm.reset()
        grammar = None
        if self.grammar is not None:
            from llama_cpp.llama_grammar import LlamaGrammar

            grammar = LlamaGrammar.from_string(self.grammar, verbose=False)
        gen = llm.generate(
            self.prompt, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, temp=0.0 if greedy else s.temperature,
            repeat_penalty=s.repeat_penalty, frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty, reset=True, grammar=grammar,
        )
        t0 = time.perf_counter()
        t_first = t_last = None
        n_samples = 0
        try:
            for tok in gen:
                t_last = time.perf_counter()
                if t_first is None:
                    t_first = t_last
                n_samples += 1
                if self.cancel is not None and self.cancel.is_set():
                    stats.finish_reason = "cancelled"
                    break
                if m.is_end_of_generation(tok):
                    stats.finish_reason = "stop"
                    break
                self.tokens.append(tok)
                if self.logprobs is not None:
                    self.token_logprobs.append(m._sampled_logprob(tok, self.logprobs))
                pending += decoder.decode(llm.detokenize([tok]))
                if stops:
                    cut = min((i for i in (pending.find(x) for x in stops) if i >= 0), default=-1)
                    if cut >= 0:
                        pending = pending[:cut]
                        stats.finish_reason = "stop"
                        break
                    hold = _held_back(pending, stops)
                else:
                    hold = 0
                if len(pending) > hold:
                    piece, pending = pending[: len(pending) - hold], pending[len(pending) - hold:]
                    self.text += piece
                    yield piece
                if len(self.tokens) >= budget:
                    stats.finish_reason = "length"
                    break
            else:
                stats.finish_reason = "stop"
        finally:
            gen.close()
            if t_first is not None:
                stats.prompt_seconds = t_first - t0
                stats.generation_seconds = (t_last or t_first) - t_first
            stats.decoded = max(n_samples - 1, 0)
            stats.completion_tokens = len(self.tokens)
        tail = pending + decoder.decode(b"", final=True)
        if tail and stats.finish_reason != "cancelled":
            self.text += tail
            yield tail

    def consume(self) -> "TextStream":
        for _ in self:
            pass
        return self


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (log-softmax of its raw logits, before
    any sampler or grammar), with the ``top`` most likely alternatives at that position."""

    token: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class Model:
    """A loaded GGUF: ``Model(path, n_ctx=512, threads=2)``."""

    def __init__(
        self,
        path: str | Path,
        *,
        n_ctx: int = 512,
        threads: int | None = None,
        n_batch: int = 512,
        logits_all: bool = False,
        use_mmap: bool = True,
        embedding: bool = False,
        seed: int = 0,
        verbose: bool = False,
        flash_attn: bool = False,
        vocab_only: bool = False,
        kv_type: str | None = None,
        type_k: str | None = None,
        type_v: str | None = None,
        n_gpu_layers: int = 0,
        use_mlock: bool = False,
    ):
        import llama_cpp
        from llama_cpp import Llama

        # KV cache types ("f16", "q8_0", "q4_0"; kv_type sets both, type_k/type_v one each, as -ctk/-ctv);
        # llama.cpp needs flash attention for a quantized V cache
        type_k, type_v = type_k or kv_type, type_v or kv_type
        kv = {**({"type_k": _kv_ggml_type(type_k)} if type_k else {}), **({"type_v": _kv_ggml_type(type_v)} if type_v else {})}
        if type_v is not None and type_v.lower() not in ("f16", "f32", "bf16"):
            flash_attn = True
        if n_gpu_layers < -1:
            raise ValueError(f"n_gpu_layers {n_gpu_layers}: expected a number of layers >= 0, or -1 for all")

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(self.path, "no such file")
        from llama_cpp._utils import suppress_stdout_stderr

        # a vocabulary-only load warns on stderr, whatever the log level, that it has no training
        # context — nothing a user can act on (the redirect is process-wide: only for this load)
        quiet = suppress_stdout_stderr(disable=verbose or not vocab_only)
        # embeddings: one mean-pooled vector per input, the whole input in one micro-batch
        pooled: dict[str, Any] = {"pooling_type": llama_cpp.LLAMA_POOLING_TYPE_MEAN, "n_ubatch": n_batch} if embedding else {}
        try:
            with quiet:
                self._llm = Llama(
                    model_path=str(self.path), n_ctx=n_ctx, n_threads=default_threads(threads),
                    n_threads_batch=default_threads(threads), n_batch=n_batch, logits_all=logits_all,
                    use_mmap=use_mmap, embedding=embedding, seed=seed, verbose=verbose,
                    flash_attn=flash_attn, vocab_only=vocab_only, n_gpu_layers=n_gpu_layers,
                    use_mlock=use_mlock, **kv, **pooled,
                )
        except ValueError as exc:  # llama-cpp-python raises ValueError("Failed to load model ...")
            raise ModelFileError(self.path, f"llama.cpp cannot load it: {exc}") from None

    @property
    def n_vocab(self) -> int:
        return self._llm.n_vocab()

    @property
    def offload(self) -> "Offload":
        """Where the layers went, read back from the loaded model: the n_gpu_layers its params carry and
        its layer count, placed as llama.cpp's ``load_tensors`` places them (the last layers and the
        output layer on the GPU devices, none without one)."""
        import llama_cpp

        requested = int(self._llm._model.params.n_gpu_layers)
        n_layers = int(llama_cpp.llama_model_n_layer(self._llm._model.model)) + 1  # + the output layer
        devices = gpu_devices()
        want = n_layers if requested < 0 else requested
        return Offload(requested, n_layers, min(want, n_layers) if devices else 0, tuple(d.name for d in devices))

    @property
    def n_ctx(self) -> int:
        # llama.cpp pads the context (to 256); llama-cpp-python's token buffer keeps the size asked for
        return min(self._llm.n_ctx(), len(self._llm.input_ids))

    @property
    def n_ctx_train(self) -> int:
        return self._llm._model.n_ctx_train()

    @property
    def add_bos(self) -> bool:
        """Whether the vocabulary asks for a BOS token in front of a text (``tokenize`` adds it then)."""
        import llama_cpp

        return bool(llama_cpp.llama_vocab_get_add_bos(self._llm._model.vocab))

    def vocab_digest(self) -> str:
        """SHA-256 of the vocabulary (every token's text, in id order): equal digests, same tokenizer."""
        import hashlib

        import llama_cpp

        vocab = self._llm._model.vocab
        h = hashlib.sha256()
        if llama_cpp.llama_vocab_type(vocab) == llama_cpp.LLAMA_VOCAB_TYPE_NONE:  # no token texts to read
            h.update(f"none:{self.n_vocab}".encode())
            return h.hexdigest()
        for tok in range(self.n_vocab):
            h.update(llama_cpp.llama_vocab_get_text(vocab, tok) or b"")
            h.update(b"\0")
        return h.hexdigest()

    def metadata(self) -> dict[str, str]:
        return dict(self._llm.metadata)

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self._llm.detokenize(tokens).decode("utf-8", "replace")

    @property
    def bos(self) -> int:
        return self._llm.token_bos()

    @property
    def eos(self) -> int:
        return self._llm.token_eos()

    def is_end_of_generation(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._llm._model.vocab, token))

    def complete(
        self,
        prompt: str,
        *,
        max_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 0.95,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> Completion:
        """Generate a continuation; ``temperature=0`` is greedy (argmax at every step)."""
        tokens: list[int] = []
        for tok in self.stream_tokens(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed):
            tokens.append(tok)
        text = self.detokenize(tokens)
        finish = "length" if len(tokens) >= max_tokens else "stop"
        if stop:
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        return Completion(text, tokens, len(self.tokenize(prompt)), finish)

    def stream_tokens(
        self,
        prompt: str | list[int],
        *,
        max_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 0.95,
        seed: int | None = None,
    ) -> Iterator[int]:
        """Yield generated token ids, stopping at end-of-generation or ``max_tokens``."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if seed is not None:
            self._llm.set_seed(seed)
        self._llm.reset()
        gen = self._llm.generate(
            ids, top_k=1 if temperature <= 0 else 40, top_p=1.0 if temperature <= 0 else top_p,
            min_p=0.0, temp=temperature, repeat_penalty=1.0, reset=True,
        )
        for n, tok in enumerate(gen):
            if self.is_end_of_generation(tok):
                return
            yield tok
            if n + 1 >= max_tokens:
                return

    @property
    def threads(self) -> int:
        return int(self._llm.n_threads)

    def eval_tokens(self, tokens: list[int], *, reset: bool = False) -> None:
        """Run ``tokens`` through the model (appending to the cache unless ``reset``)."""
        if reset:
            self._llm.reset()
        self._llm.eval(tokens)

    def chunk_logits(self, tokens: list[int] | np.ndarray, first: int = 0) -> np.ndarray:
        """Logits of positions ``first..len(tokens)-1`` of ``tokens`` decoded as one sequence from an
        empty cache, as llama-perplexity decodes a chunk: (len(tokens) - first, n_vocab) float32.

        Only those positions are computed (the output layer is skipped for the others), in batches
        of ``n_batch`` tokens; ``len(tokens)`` must not exceed ``n_ctx``.
        """
        import llama_cpp

        ids = np.asarray(tokens, dtype=np.int32)
        n, n_batch, n_vocab = len(ids), int(self._llm.n_batch), self.n_vocab
        if not 0 <= first < n <= self.n_ctx:
            raise ValueError(f"chunk of {n} tokens (first output {first}) does not fit a context of {self.n_ctx}")
        batch = self._chunk_batch(n_batch)
        token = np.ctypeslib.as_array(batch.token, shape=(n_batch,))
        pos = np.ctypeslib.as_array(batch.pos, shape=(n_batch,))
        want = np.ctypeslib.as_array(batch.logits, shape=(n_batch,))
        ctx = self._llm.ctx
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        self._llm.n_tokens = 0  # the high-level wrapper's view of the cache is now stale
        out = np.empty((n - first, n_vocab), dtype=np.float32)
        row = 0
        for start in range(0, n, n_batch):
            size = min(n_batch, n - start)
            token[:size] = ids[start:start + size]
            pos[:size] = np.arange(start, start + size, dtype=np.int32)
            want[:size] = pos[:size] >= first
            batch.n_tokens = size
            status = llama_cpp.llama_decode(ctx, batch)
            if status != 0:
                raise ModelFileError(self.path, f"llama_decode failed with status {status}")
            n_out = int(want[:size].sum())
            if n_out:
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(n_out * n_vocab,))
                out[row:row + n_out] = logits.reshape(n_out, n_vocab)
                row += n_out
        return out

    def _chunk_batch(self, n_batch: int):
        import llama_cpp

        batch = getattr(self, "_batch", None)
        if batch is None:
            batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
            for k in range(n_batch):  # one sequence (id 0) for every token, set once
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = 0
            self._batch = batch
        return batch

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits for every position of ``tokens`` (needs ``logits_all=True``): (n, n_vocab) float32."""
        self._llm.reset()
        self._llm.eval(tokens)
        return np.array(self._llm.scores[: len(tokens)], dtype=np.float32)

    # -- generation, chat and embeddings (run / chat / serve) --------------------------------------
    @property
    def n_embd(self) -> int:
        return self._llm.n_embd()

    def token_text(self, token: int) -> str:
        """A token's text as the vocabulary stores it (special tokens included), '' for -1."""
        if token < 0:
            return ""
        return self._llm._model.token_get_text(token)

    @property
    def chat_template(self) -> str | None:
        return self._llm.metadata.get("tokenizer.chat_template") or None

    def format_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, template: str | None = None) -> str:
        """The prompt for ``messages`` from the model's own chat template (sandboxed; see chat.py);
        ``tools`` are passed to the template as transformers passes them; ``template`` overrides it."""
        from .chat import render_chat

        extra: dict[str, Any] = {"tools": tools} if tools else {}
        return render_chat(template or self.chat_template, messages, bos_token=self.token_text(self.bos),
                           eos_token=self.token_text(self.eos), add_generation_prompt=add_generation_prompt,
                           **extra)

    def _sampled_logprob(self, token: int, top: int) -> TokenLogprob:
        """During generation: the log-probabilities of the position ``token`` was just sampled at."""
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self._llm.ctx, -1)
        lp = _log_softmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)))
        best = np.argsort(-lp, kind="stable")[:top] if top > 0 else []
        return TokenLogprob(token, self.detokenize([token]), float(lp[token]),
                            [(int(t), self.detokenize([int(t)]), float(lp[t])) for t in best])

    def prompt_tokens(self, prompt: str | list[int]) -> list[int]:
        """A prompt as llama-cli and llama-server read it: BOS if the vocabulary wants one, and
        special-token text (``<|im_start|>``) parsed as the special token."""
        return self.tokenize(prompt, special=True) if isinstance(prompt, str) else [int(t) for t in prompt]

    def generate(
        self,
        prompt: str | list[int],
        *,
        max_tokens: int = 256,
        sampling: Sampling | None = None,
        stop: list[str] | None = None,
        cancel: threading.Event | None = None,
        reuse_cache: bool = False,
        grammar: str | None = None,
        logprobs: int | None = None,
    ) -> TextStream:
        """Stream a continuation of ``prompt`` as text pieces (iterate the result).

        ``reuse_cache`` keeps the part of the KV cache that matches the new prompt (a chat that
        grows turn by turn); otherwise every generation starts from an empty cache, so equal
        requests give equal greedy answers. Raises ``ContextLengthError`` if the prompt leaves no
        room to generate.
        """
        ids = self.prompt_tokens(prompt)
        if len(ids) >= self.n_ctx:
            raise ContextLengthError(len(ids), self.n_ctx)
        return TextStream(self, ids, max_tokens, sampling or Sampling(), list(stop or []), cancel, reuse_cache,
                          grammar, logprobs)

    def embed(self, inputs: list[str] | list[list[int]], *, normalize: bool = True) -> tuple[list[np.ndarray], int]:
        """One mean-pooled (and L2-normalized) vector per input, and the number of tokens read.
        Needs ``Model(..., embedding=True)``; an input must fit ``n_batch`` tokens."""
        import llama_cpp

        llm = self._llm
        if not llm.context_params.embeddings:
            raise RuntimeError("this Model was loaded without embedding=True")
        n_embd, n_batch = self.n_embd, int(llm.n_batch)
        vectors, total = [], 0
        for item in inputs:
            ids = self.tokenize(item) if isinstance(item, str) else [int(t) for t in item]
            if not ids:
                raise ContextLengthError(0, n_batch, "input (empty)")
            if len(ids) > n_batch:
                raise ContextLengthError(len(ids), n_batch, "input")
            llm._ctx.kv_cache_clear()
            llm._batch.reset()
            llm._batch.add_sequence(ids, 0, True)
            llm._ctx.decode(llm._batch)
            ptr = llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, 0)
            vec = np.ctypeslib.as_array(ptr, shape=(n_embd,)).astype(np.float32)
            if normalize:
                norm = float(np.linalg.norm(vec))
                vec = vec / norm if norm > 0 else vec
            vectors.append(vec)
            total += len(ids)
        llm._ctx.kv_cache_clear()
        llm._batch.reset()
        llm.n_tokens = 0
        return vectors, total

    def close(self) -> None:
        batch = getattr(self, "_batch", None)
        if batch is not None:
            import llama_cpp

            llama_cpp.llama_batch_free(batch)
            self._batch = None
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.close()
            self._llm = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model, as llama.cpp's common options say it (-ngl, --no-mmap, --mlock, -fa, -ctk,
    -ctv); None leaves the caller's default. ``n_gpu_layers``: -1 = every layer."""

    n_gpu_layers: int = 0
    use_mmap: bool = True
    use_mlock: bool = False
    flash_attn: bool | None = None
    type_k: str | None = None
    type_v: str | None = None

    def model_kwargs(self, **defaults: Any) -> dict[str, Any]:
        """Keyword arguments for ``Model``: these options over the caller's ``defaults``."""
        mine = {"n_gpu_layers": self.n_gpu_layers, "use_mmap": self.use_mmap, "use_mlock": self.use_mlock,
                "flash_attn": self.flash_attn, "type_k": self.type_k, "type_v": self.type_v}
        return {**defaults, **{k: v for k, v in mine.items() if v is not None}}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GpuDevice:
    name: str  # ggml's device name: CUDA0, Metal, Vulkan0, ...
    description: str  # e.g. "NVIDIA GeForce RTX 4090", "Apple M2"
    integrated: bool  # shares host memory (Apple silicon, iGPUs)
    free: int  # bytes
    total: int


def gpu_devices() -> list[GpuDevice]:
    """The GPU devices this llama-cpp-python build can offload to (none on a CPU-only build), from
    ggml's device registry; llama.cpp uses the dedicated GPUs, or the integrated ones if there are none."""
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return []
    lib = _ggml()
    found = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        kind = lib.ggml_backend_dev_type(dev)
        if kind not in (_DEV_GPU, _DEV_IGPU):
            continue
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.append(GpuDevice(lib.ggml_backend_dev_name(dev).decode(), lib.ggml_backend_dev_description(dev).decode(),
                               kind == _DEV_IGPU, free.value, total.value))
    dedicated = [d for d in found if not d.integrated]
    return dedicated or found


_DEV_GPU, _DEV_IGPU = 1, 2  # enum ggml_backend_dev_type (ggml-backend.h)


def _ggml() -> ctypes.CDLL:
    """libggml of the installed llama-cpp-python (its device registry), with the prototypes used here."""
    from .reference import _load

    lib = _load("ggml")
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    for fn in (lib.ggml_backend_dev_name, lib.ggml_backend_dev_description):
        fn.argtypes = [ctypes.c_void_p]
        fn.restype = ctypes.c_char_p
    lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    lib.ggml_backend_dev_memory.restype = None
    return lib


def gpu_offload_supported() -> bool:
    """Whether this llama-cpp-python build has a GPU backend (CUDA, Metal, Vulkan, ...) with a device."""
    return bool(gpu_devices())


@dataclass(frozen=True)
class Offload:
    """How a loaded model's layers are split between GPU devices and the CPU (llama.cpp counts the
    output layer as one more layer: a 30-block model has 31)."""

    requested: int  # n_gpu_layers as the model params carry it (-1 or more than n_layers: all)
    n_layers: int
    gpu_layers: int
    devices: tuple[str, ...] = ()

    @property
    def cpu_layers(self) -> int:
        return self.n_layers - self.gpu_layers

    def describe(self) -> str:
        """"31 layers on CPU", "31 layers on CUDA0", "20 layers on CUDA0, 11 on CPU"."""
        gpu = "+".join(self.devices) or "GPU"
        if self.gpu_layers == 0:
            return f"{self.n_layers} layers on CPU"
        if self.cpu_layers == 0:
            return f"{self.n_layers} layers on {gpu}"
        return f"{self.gpu_layers} layers on {gpu}, {self.cpu_layers} on CPU"

    def to_dict(self) -> dict:
        return {"n_gpu_layers": self.requested, "n_layers": self.n_layers, "gpu_layers": self.gpu_layers,
                "cpu_layers": self.cpu_layers, "devices": list(self.devices), "placement": self.describe()}


# -- grammars (llama.cpp GBNF) ---------------------------------------------------------------------
def json_grammar() -> str:
    """Any JSON object: llama.cpp's grammars/json.gbnf (as llama-cpp-python ships it)."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """A GBNF grammar whose sentences are the JSON documents valid under ``schema``, by
    llama-cpp-python's port of llama.cpp's json_schema_to_grammar.py. Raises ``ValueError`` for a
    schema it cannot convert."""
    import json

    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(_bounded_integers(schema)))
    except (ValueError, KeyError, TypeError, AssertionError, NotImplementedError, RecursionError) as exc:
        raise ValueError(f"cannot turn the JSON schema into a grammar: {type(exc).__name__}: {exc}") from None


_ENUM_MAX = 4096


def _bounded_integers(node: Any) -> Any:
    """llama-cpp-python's converter ignores ``minimum``/``maximum`` (llama.cpp's newer one has them):
    an integer bounded on both sides by a range up to 4096 values becomes the equivalent ``enum``, so
    the grammar enforces the bounds. (One-sided bounds stay unenforced.)"""
    if isinstance(node, list):
        return [_bounded_integers(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _bounded_integers(v) for k, v in node.items()}
    if out.get("type") == "integer" and "enum" not in out and "const" not in out:
        lo, hi = out.get("minimum"), out.get("maximum")
        if "exclusiveMinimum" in out and isinstance(out["exclusiveMinimum"], (int, float)):
            lo = int(out["exclusiveMinimum"]) + 1
        if "exclusiveMaximum" in out and isinstance(out["exclusiveMaximum"], (int, float)):
            hi = int(np.ceil(out["exclusiveMaximum"])) - 1
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
            lo, hi = int(np.ceil(lo)), int(np.floor(hi))
            if hi < lo:
                raise ValueError(f"integer with minimum {lo} above maximum {hi}")
            if hi - lo < _ENUM_MAX:
                kept = {k: v for k, v in out.items() if k in ("description", "title")}
                return {**kept, "enum": list(range(lo, hi + 1))}
    return out


_KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8, "bf16": 30}  # ggml_type values


def _kv_ggml_type(name: str) -> int:
    try:
        return _KV_TYPES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown KV cache type {name!r}; expected one of {', '.join(_KV_TYPES)}") from None


def llama_buffer_sizes(path: str | Path, *, n_ctx: int, n_batch: int = 512, kv_type: str | None = None,
                       flash_attn: bool = False) -> dict[str, int]:
    """The buffers llama.cpp allocates for ``path`` at these settings, in bytes, as it reports them in
    its log ("model", "repack", "KV", "compute", "output"; 0.01 MiB resolution). Loads the model once
    (weights mmap'd, nothing evaluated) with llama.cpp's log captured; fit's tests compare these with
    its formulas."""
    import ctypes
    import re

    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        with Model(path, n_ctx=n_ctx, n_batch=n_batch, threads=1, kv_type=kv_type, flash_attn=flash_attn):
            pass
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    sizes = {"model": 0, "repack": 0, "KV": 0, "compute": 0, "output": 0}
    rx = re.compile(r"(\S+)\s+(model|KV|compute|output) buffer size =\s+([\d.]+) MiB")
    for line in "".join(lines).splitlines():
        m = rx.search(line)
        if m:
            key = "repack" if m[2] == "model" and "REPACK" in m[1] else m[2]
            sizes[key] += int(round(float(m[3]) * (1 << 20)))
    return sizes


# -- matmul inputs through the scheduler's eval callback (llama-imatrix's hook) ---------------------

# struct ggml_tensor of the vendored ggml (ggml/include/ggml.h, llama-cpp-python 0.3.36):
# GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10, GGML_MAX_NAME 64; checked against
# ggml_get_name / ggml_get_data / ggml_nbytes on the first tensor the callback sees
def _ggml_tensor_struct():
    import ctypes

    class GGMLTensor(ctypes.Structure):
        _fields_ = [
            ("type", ctypes.c_int),
            ("buffer", ctypes.c_void_p),
            ("ne", ctypes.c_int64 * 4),
            ("nb", ctypes.c_size_t * 4),
            ("op", ctypes.c_int),
            ("op_params", ctypes.c_int32 * 16),
            ("flags", ctypes.c_int32),
            ("src", ctypes.c_void_p * 10),
            ("view_src", ctypes.c_void_p),
            ("view_offs", ctypes.c_size_t),
            ("data", ctypes.c_void_p),
            ("name", ctypes.c_char * 64),
            ("extra", ctypes.c_void_p),
            ("padding", ctypes.c_char * 8),
        ]

    return GGMLTensor


@dataclass
class MatmulInput:
    """One matrix multiplication's activations, valid only during the ``sink`` call.

    ``x``: float32 view of src1 in numpy order (ne3, ne2, ne1, ne0); ``weight_ne``: src0's ggml
    shape; for MUL_MAT_ID ``ids`` is the (n_tokens, n_expert_used) int32 view of the routing ids.
    ``source``: identifies the src1 graph node within one graph evaluation; consecutive matmuls
    with the same one (q, k and v of a layer; gate and up) read the very same activations (0:
    unknown)."""

    name: str
    op: str  # "MUL_MAT" or "MUL_MAT_ID"
    x: np.ndarray
    weight_ne: tuple[int, int, int, int]
    ids: np.ndarray | None = None
    source: int = 0


class MatmulTap:
    """A llama.cpp context whose scheduler eval callback (``cb_eval``, as tools/imatrix uses it)
    hands the F32 input of every MUL_MAT / MUL_MAT_ID whose weight ``select(name)`` accepts to
    ``sink(MatmulInput)``. MUL_MAT batches under ``min_rows`` rows are not asked for (imatrix.cpp:
    ``src1->ne[1] < 16``).

    Contexts are set up as llama-imatrix sets them: ``n_seq = max(1, n_batch // n_ctx)`` chunks of
    ``n_ctx`` tokens decoded together as parallel sequences (one KV stream each), micro-batches of
    512, logits for every token (so the last layer sees every token), no warm-up. llama-imatrix
    hands llama_decode all ``n_seq`` chunks at once, which needs an output buffer of logits for
    every one of their tokens (n_batch x n_vocab floats: 400 MB for a 49k vocabulary at its
    defaults). Here each llama_decode gets exactly one of the micro-batches llama.cpp would cut
    from that batch (``split_equal``: the same number of tokens from each sequence, sequence after
    sequence), so the callback sees the same rows in the same order, with a logits buffer of one
    micro-batch.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        select: Callable[[str], bool],
        sink: Callable[[MatmulInput], None],
        n_ctx: int = 512,
        n_batch: int = 2048,
        n_ubatch: int = 512,
        threads: int | None = None,
        min_rows: int = 16,
        verbose: bool = False,
    ):
        import ctypes

        import llama_cpp
        from llama_cpp._logger import set_verbose

        from .reference import ggml

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(self.path, "no such file")
        if n_ctx <= 0:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        set_verbose(verbose)
        self.select, self.sink, self._min_rows = select, sink, min_rows
        self.n_chunk_ctx = n_ctx
        self.n_seq = max(1, n_batch // n_ctx)
        n_kv = self.n_seq * n_ctx
        n_batch = min(n_batch, n_kv)
        if not (n_batch < n_ctx or n_batch % n_ctx == 0):  # imatrix.cpp's GGML_ASSERT
            raise ValueError(f"batch size {n_batch} must be below the context {n_ctx} or a multiple of it")
        self.n_batch = min(n_ubatch, n_batch)  # tokens per llama_decode: one micro-batch
        self.threads = default_threads(threads)
        self._error: BaseException | None = None
        self._checked = False
        self._names: dict[int, tuple[str, bool]] = {}
        self._decodes = 0
        # the graph's last observed matmul, (how many observed up to it, its weight), from the first
        # evaluation: later ones stop there; nothing after it (the output norm, the vocabulary-wide
        # output matmul, ~20 % of a small model's work) is ever observed, and the logits are not read
        self._handled, self._last_name = 0, ""
        self._stop_at: tuple[int, str] | None = None

        lib = ggml()
        lib.ggml_op_name.restype = ctypes.c_char_p
        lib.ggml_op_name.argtypes = [ctypes.c_int]
        lib.ggml_get_name.restype = ctypes.c_void_p
        lib.ggml_get_name.argtypes = [ctypes.c_void_p]
        lib.ggml_get_data.restype = ctypes.c_void_p
        lib.ggml_get_data.argtypes = [ctypes.c_void_p]
        lib.ggml_nbytes.restype = ctypes.c_size_t
        lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
        lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_tensor_get.restype = None
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self._lib = lib
        ops: dict[bytes, int] = {}
        for i in range(64):  # enum ggml_op: MUL_MAT, MUL_MAT_ID come early; stop before GGML_OP_COUNT
            ops[lib.ggml_op_name(i)] = i
            if b"MUL_MAT_ID" in ops:
                break
        self._op_mul_mat, self._op_mul_mat_id = ops[b"MUL_MAT"], ops[b"MUL_MAT_ID"]
        self._T = _ggml_tensor_struct()

        mparams = llama_cpp.llama_model_default_params()
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            raise ModelFileError(self.path, "llama.cpp cannot load it")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_tensor)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_kv
        cparams.n_seq_max = self.n_seq
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_threads = cparams.n_threads_batch = self.threads
        cparams.cb_eval = self._callback
        cparams.cb_eval_user_data = None
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            self._model = None
            raise ModelFileError(self.path, f"llama.cpp cannot make a context of {n_kv} tokens for it")
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, self.n_seq)

    # -- vocabulary --------------------------------------------------------------------------
    @property
    def add_bos(self) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))

    @property
    def bos(self) -> int:
        import llama_cpp

        return int(llama_cpp.llama_vocab_bos(self._vocab))

    @property
    def n_ctx_train(self) -> int:
        import llama_cpp

        return int(llama_cpp.llama_model_n_ctx_train(self._model))

    def tokenize(self, text: str, *, parse_special: bool = False) -> np.ndarray:
        """common_tokenize(ctx, text, add_special=true, parse_special): int32 token ids."""
        import ctypes

        import llama_cpp

        data = text.encode("utf-8")
        n_max = len(data) + 2
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, True, parse_special)
        if n < 0:  # too small: -n is the size needed
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, True, parse_special)
        return np.ctypeslib.as_array(ctypes.cast(buf, ctypes.POINTER(ctypes.c_int32)), shape=(n_max,))[:n].copy()

    # -- decoding ------------------------------------------------------------------------------
    def decode_chunks(self, chunks: list[np.ndarray]) -> None:
        """Decode up to ``n_seq`` chunks (each ``n_ctx`` tokens, BOS already in place) as parallel
        sequences from an empty cache, every token with logits, as compute_imatrix does: each call
        of llama_decode holds the micro-batch llama.cpp's split_equal would cut from
        compute_imatrix's batch (``n_batch // len(chunks)`` tokens of each chunk in turn)."""
        import llama_cpp

        if not 1 <= len(chunks) <= self.n_seq:
            raise ValueError(f"{len(chunks)} chunks for {self.n_seq} sequences")
        n = self.n_chunk_ctx
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        b = self._batch
        token = np.ctypeslib.as_array(b.token, shape=(self.n_batch,))
        pos = np.ctypeslib.as_array(b.pos, shape=(self.n_batch,))
        n_seq_id = np.ctypeslib.as_array(b.n_seq_id, shape=(self.n_batch,))
        logits = np.ctypeslib.as_array(b.logits, shape=(self.n_batch,))
        for chunk in chunks:
            if len(chunk) != n:
                raise ValueError(f"chunk of {len(chunk)} tokens, expected {n}")
        step = max(1, self.n_batch // len(chunks))  # split_equal: (t + 1) * n_seqs > n_ubatch stops it
        for start in range(0, n, step):
            size = min(step, n - start)
            k = 0
            for seq, chunk in enumerate(chunks):
                token[k:k + size] = chunk[start:start + size]
                pos[k:k + size] = np.arange(start, start + size, dtype=np.int32)
                n_seq_id[k:k + size] = 1
                for i in range(k, k + size):
                    b.seq_id[i][0] = seq
                logits[k:k + size] = 1
                k += size
            b.n_tokens = k
            self._decodes += 1  # one micro-batch, one graph evaluation
            self._handled = 0
            status = llama_cpp.llama_decode(self._ctx, b)
            if self._error is not None:
                err, self._error = self._error, None
                raise err
            if status != 0:
                raise ModelFileError(self.path, f"llama_decode failed with status {status}")
            if self._stop_at is None and self._handled:
                self._stop_at = (self._handled, self._last_name)

    def _on_tensor(self, t_addr, ask, user_data) -> bool:
        if self._error is not None:
            return False
        try:
            return self._handle(t_addr, ask)
        except BaseException as exc:  # a ctypes callback cannot raise: hand it to decode_chunks
            self._error = exc
            return False

    def _handle(self, t_addr: int, ask: bool) -> bool:
        T = self._T
        t = T.from_address(t_addr)
        if not self._checked:
            self._check_layout(t_addr, t)
        op = t.op
        if op != self._op_mul_mat and op != self._op_mul_mat_id:
            return False
        src0 = T.from_address(t.src[0])
        src1 = T.from_address(t.src[1])
        if ask:
            if op == self._op_mul_mat_id:
                return True  # every indirect matmul, as imatrix.cpp
            if src1.ne[1] < self._min_rows or src1.type != 0:  # GGML_TYPE_F32
                return False
            return self.select(_filter_tensor_name(src0.name))
        name = _filter_tensor_name(src0.name)
        if op == self._op_mul_mat_id and src1.type != 0:
            raise ModelFileError(self.path, f"{name}: MUL_MAT_ID input of ggml type {src1.type}, expected F32")
        x = self._view(t.src[1], src1, np.float32)
        wne = tuple(int(v) for v in src0.ne)
        if op == self._op_mul_mat:
            source = (self._decodes << 48) | int(t.src[1])  # the node, in this decode's graph
            self.sink(MatmulInput(name, "MUL_MAT", x, wne, source=source))  # type: ignore[arg-type]
        else:
            ids_t = T.from_address(t.src[2])
            ids = self._view(t.src[2], ids_t, np.int32)[0, 0]  # (n_tokens, n_expert_used)
            self.sink(MatmulInput(name, "MUL_MAT_ID", x, wne, ids))  # type: ignore[arg-type]
        self._handled += 1
        self._last_name = name
        # False ends this graph evaluation here (ggml_backend_sched_compute_splits)
        return self._stop_at != (self._handled, name)

    def _view(self, addr: int, t, dtype) -> np.ndarray:
        """A numpy view (ne3, ne2, ne1, ne0) of a host tensor; a copy for a device buffer."""
        import ctypes

        nbytes = int(self._lib.ggml_nbytes(addr))
        shape = tuple(int(v) for v in reversed(t.ne))
        strides = tuple(int(v) for v in reversed(t.nb))
        if self._lib.ggml_backend_buffer_is_host(t.buffer):
            raw = (ctypes.c_char * nbytes).from_address(t.data)
            base = np.frombuffer(raw, dtype=np.uint8)
        else:
            base = np.empty(nbytes, dtype=np.uint8)
            self._lib.ggml_backend_tensor_get(addr, base.ctypes.data, 0, nbytes)
        return np.ndarray(shape, dtype=dtype, buffer=base, strides=strides)

    def _check_layout(self, addr: int, t) -> None:
        import ctypes

        name_ok = self._lib.ggml_get_name(addr) == addr + type(t).name.offset
        data_ok = self._lib.ggml_get_data(addr) == (t.data or None)
        if not (name_ok and data_ok and ctypes.sizeof(type(t)) == 336):
            raise RuntimeError("struct ggml_tensor of this libggml does not match the layout llmquant reads "
                               "(llama-cpp-python 0.3.36's ggml.h)")
        self._checked = True

    def close(self) -> None:
        import llama_cpp

        if getattr(self, "_batch", None) is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "MatmulTap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _filter_tensor_name(raw: bytes) -> str:
    """imatrix.cpp filter_tensor_name: ``CUDA0#blk.0.attn_k.weight#0`` -> ``blk.0.attn_k.weight``."""
    name = raw.decode("utf-8", "replace")
    if "#" in name:
        name = name.split("#", 2)[1]
    return name
