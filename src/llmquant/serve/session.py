"""``run`` and ``chat``: a prompt or a conversation through the runtime, streamed as it is generated.

``run`` is llama-cli's ``-p`` (a raw completion, or with ``chat=True`` one user turn through the
model's chat template, as ``ollama run MODEL PROMPT`` does). ``ChatSession`` keeps a conversation:
it renders the whole history with the model's own template (sandboxed, chat.py) every turn and
lets llama.cpp reuse the KV cache for the part that did not change, so a long chat does not
re-read its history; when the history outgrows the context the oldest turns are dropped.
``repl`` is the interactive loop (``/bye``, ``/clear``, ``/system``, Ctrl-C, Ctrl-D).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.llama import ContextLengthError, LoadOptions, Model, Sampling, TextStream


def load(path: str | Path, *, ctx: int = 4096, threads: int | None = None, batch: int = 512,
         options: LoadOptions | None = None) -> Model:
    """``path`` loaded for generation; ``options``: GPU layers, mmap/mlock, flash attention, KV types."""
    return Model(path, **(options or LoadOptions()).model_kwargs(n_ctx=ctx, threads=threads, n_batch=min(batch, ctx)))


def run_prompt(
    model: Model, prompt: str, *, max_tokens: int = 256, sampling: Sampling | None = None,
    chat: bool = False, system: str | None = None, stop: list[str] | None = None,
    cancel: threading.Event | None = None,
) -> TextStream:
    """A TextStream for ``prompt`` (iterate it for the pieces); ``max_tokens < 0``: until the end
    of generation or a full context."""
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt = model.format_chat(messages)
    limit = max_tokens if max_tokens >= 0 else model.n_ctx
    return model.generate(prompt, max_tokens=limit, sampling=sampling, stop=stop, cancel=cancel)


@dataclass
class ChatSession:
    model: Model
    sampling: Sampling = field(default_factory=Sampling)
    max_tokens: int = -1  # per answer; -1: until the end of generation or a full context
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    reserve: int = 256  # tokens kept free for an answer when old turns must be dropped
    dropped: int = 0  # turns dropped so far to fit the context

    def messages(self, user: str | None = None) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": user}] if user is not None else []
        return head + self.history + tail

    def prompt_ids(self, user: str) -> list[int]:
        """The rendered conversation ending in ``user``'s turn, oldest turns dropped to fit."""
        while True:
            ids = self.model.prompt_tokens(self.model.format_chat(self.messages(user)))
            room = self.model.n_ctx - len(ids)
            if room >= min(self.reserve, self.model.n_ctx // 4) or not self.history:
                break
            drop = 2 if len(self.history) >= 2 else 1  # a user turn and its answer
            del self.history[:drop]
            self.dropped += drop
        if len(ids) >= self.model.n_ctx:
            raise ContextLengthError(len(ids), self.model.n_ctx, "message")
        return ids

    def send(self, user: str, cancel: threading.Event | None = None) -> TextStream:
        """Start an answer to ``user``; iterate the result for the pieces, then call ``commit``."""
        ids = self.prompt_ids(user)
        limit = self.max_tokens if self.max_tokens >= 0 else self.model.n_ctx
        return self.model.generate(ids, max_tokens=limit, sampling=self.sampling, cancel=cancel, reuse_cache=True)

    def commit(self, user: str, answer: str) -> None:
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]

    def clear(self) -> None:
        self.history.clear()


HELP = """Commands:
  /bye            leave (also Ctrl-D)
  /clear          forget the conversation
  /system TEXT    set the system prompt (and forget the conversation)
  /history        show the conversation so far
  /?, /help       this help
Start a message with \"\"\" to write several lines; end it with \"\"\"."""


def repl(
    session: ChatSession,
    read: Callable[[str], str],
    write: Callable[[str], None],
    note: Callable[[str], None],
) -> None:
    """The interactive loop. ``read(prompt)`` raises EOFError at the end of input and may raise
    KeyboardInterrupt; ``write`` gets the answer's pieces, ``note`` one-line messages."""
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            note("(use Ctrl-D or /bye to leave)")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith('"""'):
            block = _multiline(text[3:], read)
            if block is None:
                continue
            text = block
        elif text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/bye", "/exit", "/quit"):
                return
            if cmd == "/clear":
                session.clear()
                note("conversation cleared")
            elif cmd == "/system":
                session.system = arg.strip() or None
                session.clear()
                note("system prompt set" if session.system else "system prompt removed")
            elif cmd == "/history":
                for m in session.messages():
                    note(f"{m['role']}: {m['content']}")
            elif cmd in ("/?", "/help"):
                note(HELP)
            else:
                note(f"unknown command {cmd}; /? for help")
            continue
        _answer(session, text, write, note)


def _multiline(first: str, read: Callable[[str], str]) -> str | None:
    lines = [first]
    if first.rstrip().endswith('"""') and first.strip() != "":
        return first.rstrip()[:-3]
    while True:
        try:
            line = read("... ")
        except EOFError:
            return None
        except KeyboardInterrupt:
            return None
        if line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            return "\n".join(lines).strip("\n")
        lines.append(line)


def _answer(session: ChatSession, text: str, write: Callable[[str], None], note: Callable[[str], None]) -> None:
    before = session.dropped
    try:
        stream = session.send(text)
        if session.dropped > before:
            note(f"(dropped the {session.dropped - before} oldest messages to fit the context)")
        for piece in stream:
            write(piece)
    except ContextLengthError as exc:
        note(f"message too long: {exc}")
        return
    except KeyboardInterrupt:  # stop this answer, keep the session; the turn is not remembered
        write("\n")
        note("(interrupted)")
        return
    write("\n\n" if stream.text and not stream.text.endswith("\n") else "\n")
    if stream.stats.finish_reason == "length":
        note("(the answer reached the token limit)")
    session.commit(text, stream.text)
