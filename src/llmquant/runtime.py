"""The runtime: a small wrapper over llama-cpp-python, and the only module that imports it.

Load a GGUF (threads, context, mmap), tokenize, greedy/sampled generation, and the logits of a
token batch (for eval). llama.cpp's own log output is silenced unless ``verbose``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import ModelFileError


def _threads(n: int | None) -> int:
    if n:
        return n
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class Completion:
    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str


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
    ):
        from llama_cpp import Llama

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(self.path, "no such file")
        try:
            self._llm = Llama(
                model_path=str(self.path), n_ctx=n_ctx, n_threads=_threads(threads),
                n_threads_batch=_threads(threads), n_batch=n_batch, logits_all=logits_all,
                use_mmap=use_mmap, embedding=embedding, seed=seed, verbose=verbose,
            )
        except ValueError as exc:  # llama-cpp-python raises ValueError("Failed to load model ...")
            raise ModelFileError(self.path, f"llama.cpp cannot load it: {exc}") from None

    @property
    def n_vocab(self) -> int:
        return self._llm.n_vocab()

    @property
    def n_ctx(self) -> int:
        return self._llm.n_ctx()

    @property
    def n_ctx_train(self) -> int:
        return self._llm.n_ctx_train()

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

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits for every position of ``tokens`` (needs ``logits_all=True``): (n, n_vocab) float32."""
        self._llm.reset()
        self._llm.eval(tokens)
        return np.array(self._llm.scores[: len(tokens)], dtype=np.float32)

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.close()
            self._llm = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
