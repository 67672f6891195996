"""Base log-probabilities on disk in llama-perplexity's ``--kl-divergence-base`` file format.

Follows tools/perplexity/perplexity.cpp of llama.cpp (the version vendored by llama-cpp-python
0.3.36): ``perplexity()`` writes the file when given ``--kl-divergence-base FILE`` alone,
``kl_divergence()`` reads it back with ``--kl-divergence``. Layout (little-endian)::

    "_logits_"                       8 bytes magic
    n_ctx                            uint32
    n_vocab, n_chunk                 int32, int32
    tokens[n_chunk * n_ctx]          int32: the tokenized text as it was cut (no BOS substitution)
    per chunk, per scored position (n_ctx - 1 - n_ctx/2 of them), nv = 2*((n_vocab+1)/2) + 4 uint16:
        float32 scale, float32 min_log_prob, uint16 q[n_vocab], padding to nv
        log p[i] = scale * q[i] + min_log_prob

``log_softmax(n_vocab, logits, uint16_t * log_prob, tok)`` does the 16-bit encoding: the range is
floored at max_logit - 16 and every logit at or below the floor is stored as 0 (so the reader's
``p_log_base > -16`` test skips it). ``encode_rows`` does the same arithmetic in float32.
"""

from __future__ import annotations

import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LogitsFileError

MAGIC = b"_logits_"
HEADER = struct.Struct("<8sIii")  # magic, n_ctx, n_vocab, n_chunk
TEMP_PREFIX = ".llmquant-partial-"


def row_width(n_vocab: int) -> int:
    """uint16 values per stored row: 2 floats (4 uint16) + n_vocab, rounded up to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def scored_per_chunk(n_ctx: int) -> int:
    return n_ctx - 1 - n_ctx // 2


def file_size(n_ctx: int, n_vocab: int, n_chunk: int) -> int:
    """Exact size of the file llama-perplexity writes for these dimensions."""
    return HEADER.size + 4 * n_chunk * n_ctx + 2 * n_chunk * scored_per_chunk(n_ctx) * row_width(n_vocab)


def encode_rows(logits: np.ndarray) -> np.ndarray:
    """Rows of logits (n, n_vocab) -> the rows llama-perplexity writes: uint16 (n, row_width)."""
    z = np.ascontiguousarray(logits, dtype=np.float32)
    n, n_vocab = z.shape
    out = np.zeros((n, row_width(n_vocab)), dtype=np.uint16)
    f32 = np.float32
    for lo in range(0, n, 16):  # blocks of rows keep the float32 temporaries small
        b = z[lo:lo + 16]
        max_logit = b.max(axis=1)
        min_logit = np.maximum(b.min(axis=1), max_logit - f32(16))
        sum_exp = np.exp(b - max_logit[:, None]).sum(axis=1, dtype=np.float64)  # expf, summed in double
        log_sum_exp = np.log(sum_exp).astype(np.float32)
        min_log_prob = (min_logit - max_logit) - log_sum_exp
        scale = (max_logit - min_logit) / f32(65535)
        with np.errstate(divide="ignore"):
            inv_scale = np.where(scale != 0, f32(1) / np.where(scale != 0, scale, f32(1)), f32(0)).astype(np.float32)
        q = np.rint(inv_scale[:, None] * (b - min_logit[:, None]))  # nearest_int: round half to even
        q = np.where(b > min_logit[:, None], q, f32(0))
        head = np.stack([scale, min_log_prob], axis=1).astype("<f4").view(np.uint16)
        out[lo:lo + len(b), :4] = head
        out[lo:lo + len(b), 4:4 + n_vocab] = q.astype(np.uint16)
    return out


def decode_rows(rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """Stored rows -> log-probabilities as the reader computes them: float32 (n, n_vocab)."""
    rows = np.ascontiguousarray(rows, dtype=np.uint16)
    head = rows[:, :4].copy().view("<f4")  # (n, 2): scale, min_log_prob
    q = rows[:, 4:4 + n_vocab].astype(np.float32)
    return (head[:, 0:1] * q + head[:, 1:2]).astype(np.float32)


@dataclass(frozen=True)
class LogitsHeader:
    n_ctx: int
    n_vocab: int
    n_chunk: int

    @property
    def n_scored(self) -> int:
        return scored_per_chunk(self.n_ctx)

    @property
    def size(self) -> int:
        return file_size(self.n_ctx, self.n_vocab, self.n_chunk)


class LogitsFile:
    """A base-logits file opened for reading: ``header``, ``tokens`` (int32, all chunks) and
    ``chunk(i)`` (stored uint16 rows of chunk i, read when asked for). Every field is checked against the
    file size before use."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise LogitsFileError(self.path, "no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(HEADER.size)
        if len(raw) < HEADER.size:
            raise LogitsFileError(self.path, f"truncated: {size} bytes, a header needs {HEADER.size}")
        magic, n_ctx, n_vocab, n_chunk = HEADER.unpack(raw)
        if magic != MAGIC:
            raise LogitsFileError(self.path, f"does not start with {MAGIC!r} (llama-perplexity --kl-divergence-base file)")
        if not 4 <= n_ctx <= 1 << 24:
            raise LogitsFileError(self.path, f"n_ctx {n_ctx} is out of range")
        if not 1 <= n_vocab <= 1 << 24:
            raise LogitsFileError(self.path, f"n_vocab {n_vocab} is out of range")
        if n_chunk < 1:
            raise LogitsFileError(self.path, f"n_chunk {n_chunk} is out of range")
        self.header = LogitsHeader(n_ctx, n_vocab, n_chunk)
        if size != self.header.size:
            raise LogitsFileError(
                self.path, f"{size} bytes, expected {self.header.size} for n_ctx {n_ctx}, n_vocab {n_vocab}, "
                f"{n_chunk} chunks (truncated or not a llama-perplexity logits file)")
        n_tok = n_chunk * n_ctx
        self.tokens = np.fromfile(self.path, dtype="<i4", count=n_tok, offset=HEADER.size)
        if n_tok and (self.tokens.min() < 0 or self.tokens.max() >= n_vocab):
            raise LogitsFileError(self.path, f"holds token ids outside 0..{n_vocab - 1}")
        self._data = HEADER.size + 4 * n_tok

    def chunk(self, i: int) -> np.ndarray:
        h = self.header
        if not 0 <= i < h.n_chunk:
            raise IndexError(f"chunk {i} of {h.n_chunk}")
        nv = row_width(h.n_vocab)
        start = self._data + 2 * i * h.n_scored * nv
        # read, not memory-mapped: a mapping would keep every chunk read so far resident (the
        # whole file, tens of GB for a large vocabulary, by the end of a rung's evaluation)
        rows = np.fromfile(self.path, dtype="<u2", count=h.n_scored * nv, offset=start)
        if rows.size != h.n_scored * nv:
            raise LogitsFileError(self.path, f"chunk {i} is truncated (the file shrank while it was read)")
        return rows.reshape(h.n_scored, nv)

    def log_probs(self, i: int) -> np.ndarray:
        return decode_rows(self.chunk(i), self.header.n_vocab)

    def close(self) -> None:
        self.tokens = np.empty(0, np.int32)

    def __enter__(self) -> "LogitsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LogitsFileWriter:
    """Writes a base-logits file atomically: a hidden temporary name in the destination folder,
    ``add_chunk`` once per chunk in order, ``commit`` fsyncs and renames; leaving the ``with``
    block without ``commit`` removes the temporary file."""

    def __init__(self, path: str | Path, n_ctx: int, n_vocab: int, tokens: np.ndarray):
        self.path = Path(path)
        tokens = np.ascontiguousarray(tokens, dtype="<i4")
        if tokens.size % n_ctx or not tokens.size:
            raise ValueError(f"{tokens.size} tokens are not a whole number of {n_ctx}-token chunks")
        self.header = LogitsHeader(n_ctx, n_vocab, tokens.size // n_ctx)
        self.tmp = self.path.parent / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{self.path.name}"
        self._f = open(self.tmp, "wb")
        self._f.write(HEADER.pack(MAGIC, n_ctx, n_vocab, self.header.n_chunk))
        self._f.write(tokens.tobytes())
        self._chunks = 0
        self._done = False

    def add_chunk(self, logits: np.ndarray) -> None:
        """The base's logits of one chunk's scored positions (n_scored, n_vocab)."""
        h = self.header
        if logits.shape != (h.n_scored, h.n_vocab):
            raise ValueError(f"chunk logits {logits.shape}, expected {(h.n_scored, h.n_vocab)}")
        if self._chunks >= h.n_chunk:
            raise ValueError(f"more than {h.n_chunk} chunks")
        self._f.write(encode_rows(logits).tobytes())
        self._chunks += 1

    def commit(self) -> Path:
        if self._chunks != self.header.n_chunk:
            raise RuntimeError(f"commit after {self._chunks} of {self.header.n_chunk} chunks")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        self._done = True
        return self.path

    def __enter__(self) -> "LogitsFileWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self._done:
            self._f.close()
            self.tmp.unlink(missing_ok=True)
