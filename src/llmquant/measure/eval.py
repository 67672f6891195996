"""Quality evaluation as llama.cpp's ``llama-perplexity`` computes it, with ``--kl-divergence``.

Follows tools/perplexity/perplexity.cpp of llama.cpp (the version vendored by llama-cpp-python
0.3.36): ``perplexity()`` for the chunking and the scored tokens, ``kl_divergence()`` and its
``log_softmax()`` for the per-token statistics, ``mean_and_uncertainty`` / ``covariance`` /
``percentile`` for the aggregates.

* The text is tokenized once (BOS in front when the vocabulary asks for it) and cut into
  ``n_chunk = min(chunks, n_tokens // ctx)`` chunks of ``ctx`` tokens; llama-perplexity refuses
  fewer than ``2 * ctx`` tokens and so do we.
* Each chunk is decoded from an empty cache with its first token replaced by BOS (when the
  vocabulary adds BOS); the logits at positions ``first = ctx // 2 .. ctx - 2`` are scored against
  the next token, i.e. ``ctx - 1 - first`` tokens per chunk.
* Per token: NLL of the model (and of the base), KL(base || model) over the whole vocabulary,
  whether both put the same token on top, Δp = p_model(next) - p_base(next).

Two parts: the statistics (pure functions over numpy arrays, and ``Statistics`` which aggregates
them with llama-perplexity's error formulas) and the orchestration (``evaluate``,
``evaluate_many``), which runs the base and every model over the same chunk in lockstep so that
memory holds one chunk of logits per model whatever the length of the text.

Models are GGUF files (run by llama.cpp) or Hugging Face folders (run by transformers through
runtime/torch.py, optionally quantized at load time with ``load="nf4"``, or through llama.cpp as an
F32 GGUF made on the fly — dequantized first when the checkpoint is weight-only quantized). Any two
compare: the text is tokenized once by the base's tokenizer and the same ids feed every model, after
a check that the vocabularies are the same (same size, same token texts).

By default the base distribution is used exactly (float64 from the float32 logits). llama-perplexity
stores it between its two runs as 16-bit log-probabilities, floored at max - 16, and skips
log p <= -16 in the KLD sum; ``llama_compat=True`` reproduces that storage too (bench/eval_parity.py
shows both against the tool).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EvalError, EvalTextError, LogitsFileError

MIN_CTX = 16
DEFAULT_TEXT = Path(__file__).parent.parent / "data" / "eval.txt"
TEXT_SUFFIXES = (".txt", ".md")
_ROWS = 16  # rows per block: keeps the float64 scratch of a block (16 x n_vocab) in cache
# llama-perplexity leaves flash attention on "auto", which the CPU backend resolves to enabled
FLASH_ATTN = True

KLD_PERCENTILES = {"max": 1.0, "p999": 0.999, "p99": 0.99, "p95": 0.95, "p90": 0.90, "median": 0.5,
                   "p10": 0.10, "p05": 0.05, "p01": 0.01, "p001": 0.001, "min": 0.0}
DP_PERCENTILES = {"max": 1.0, "p999": 0.999, "p99": 0.99, "p95": 0.95, "p90": 0.90, "p75": 0.75,
                  "median": 0.5, "p25": 0.25, "p10": 0.10, "p05": 0.05, "p01": 0.01, "p001": 0.001,
                  "min": 0.0}


# == statistics: pure functions over arrays ======================================================

def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def _in_blocks(n: int, threads: int, work: Callable[[int, int], None]) -> None:
    """Call ``work(lo, hi)`` over row blocks of ``_ROWS``, on ``threads`` threads (numpy releases
    the GIL in its loops, so blocks run in parallel)."""
    blocks = [(lo, min(lo + _ROWS, n)) for lo in range(0, n, _ROWS)]
    if threads <= 1 or len(blocks) == 1:
        for lo, hi in blocks:
            work(lo, hi)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(lambda b: work(*b), blocks):
            pass


def _check(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits)
    targets = np.asarray(targets, dtype=np.int64)
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(f"logits {logits.shape} and targets {targets.shape}: expected (n, n_vocab) and (n,)")
    if targets.size and (targets.min() < 0 or targets.max() >= logits.shape[1]):
        raise ValueError(f"target token out of range 0..{logits.shape[1] - 1}")
    return logits, targets


def _shifted_lse(z: np.ndarray, buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row max m and log sum exp(z - m) (float64); leaves z - m in ``buf``."""
    m = z.max(axis=1).astype(np.float64)
    np.subtract(z, m[:, None], out=buf, dtype=np.float64)
    e = np.exp(buf)
    return m, np.log(e.sum(axis=1))


def _nll(z: np.ndarray, m: np.ndarray, lse: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) = lse - (z_t - m), in the same operations as the base's ``-logp[target]``
    (``logp = (z - m) - lse``): z_t - m is exact in float64, and a - b = -(b - a) in IEEE arithmetic,
    so identical logits give bit-identical NLLs for model and base (ΔPPL exactly 0). The algebraically
    equal ``(m + lse) - z_t`` rounds twice and differs from it in the last bit."""
    return lse - (z[np.arange(z.shape[0]), targets].astype(np.float64) - m)


def token_nll(logits: np.ndarray, targets: np.ndarray, *, threads: int = 1) -> np.ndarray:
    """-log p(target) for each row of ``logits`` (n, n_vocab): float64 (n,)."""
    logits, targets = _check(logits, targets)
    n, n_vocab = logits.shape
    nll = np.empty(n)

    def work(lo: int, hi: int) -> None:
        z = logits[lo:hi]
        m, lse = _shifted_lse(z, np.empty((hi - lo, n_vocab)))
        nll[lo:hi] = _nll(z, m, lse, targets[lo:hi])

    _in_blocks(n, threads, work)
    return nll


def llama_log_probs(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities as llama-perplexity stores them for the base (``log_softmax`` with a
    ``uint16_t * log_prob`` argument): per row, uint16 steps of (max - min)/65535 above
    min = max(min logit, max logit - 16), in float32 arithmetic. Returns them dequantized
    (``scale * q + min_log_prob``), float32 (n, n_vocab); logits_file.py holds the encoding."""
    from .logits_file import decode_rows, encode_rows

    z = np.asarray(logits, dtype=np.float32)
    return decode_rows(encode_rows(z), z.shape[1])


@dataclass(frozen=True)
class BaseProbs:
    """The base model's distribution over one chunk, computed once and shared by every model
    compared with it: p (n, n_vocab) float64, and per row sum p, sum p log p, the top token and
    the NLL of the target."""

    probs: np.ndarray
    sum_p: np.ndarray
    sum_p_logp: np.ndarray
    top: np.ndarray
    nll: np.ndarray

    @classmethod
    def from_logits(cls, logits: np.ndarray, targets: np.ndarray, *, llama_compat: bool = False,
                    threads: int = 1) -> BaseProbs:
        logits, targets = _check(logits, targets)
        if llama_compat:
            return cls.from_log_probs(llama_log_probs(logits), targets, threads=threads)
        n, n_vocab = logits.shape
        probs = np.empty((n, n_vocab))
        sum_p, sum_p_logp, nll = np.empty(n), np.empty(n), np.empty(n)
        top = np.empty(n, dtype=np.int64)

        def work(lo: int, hi: int) -> None:
            z = logits[lo:hi]
            logp = np.empty((hi - lo, n_vocab))
            _, lse = _shifted_lse(z, logp)  # logp = z - max
            logp -= lse[:, None]
            top[lo:hi] = z.argmax(axis=1)
            p = probs[lo:hi]
            np.exp(logp, out=p)
            sum_p[lo:hi] = p.sum(axis=1)
            sum_p_logp[lo:hi] = np.einsum("ij,ij->i", p, logp)
            nll[lo:hi] = -logp[np.arange(hi - lo), targets[lo:hi]]

        _in_blocks(n, threads, work)
        return cls(probs, sum_p, sum_p_logp, top, nll)

    @classmethod
    def from_log_probs(cls, log_probs: np.ndarray, targets: np.ndarray, *, threads: int = 1) -> BaseProbs:
        """The base as llama-perplexity reads it from its --kl-divergence-base file: float32
        log-probabilities (decoded 16-bit values); ``kl_divergence()`` skips log p <= -16."""
        log_probs, targets = _check(log_probs, targets)
        n, n_vocab = log_probs.shape
        probs = np.empty((n, n_vocab))
        sum_p, sum_p_logp, nll = np.empty(n), np.empty(n), np.empty(n)
        top = np.empty(n, dtype=np.int64)

        def work(lo: int, hi: int) -> None:
            stored = log_probs[lo:hi]
            logp = stored.astype(np.float64)
            top[lo:hi] = stored.argmax(axis=1)
            p = probs[lo:hi]
            np.exp(logp, out=p)
            p[stored <= -16.0] = 0.0
            sum_p[lo:hi] = p.sum(axis=1)
            sum_p_logp[lo:hi] = np.einsum("ij,ij->i", p, logp)
            nll[lo:hi] = -logp[np.arange(hi - lo), targets[lo:hi]]

        _in_blocks(n, threads, work)
        return cls(probs, sum_p, sum_p_logp, top, nll)


@dataclass(frozen=True)
class TokenStats:
    """Per scored token: NLL of the model and of the base, KL(base || model) in nats, whether
    both have the same top token, and Δp = p_model(target) - p_base(target)."""

    nll: np.ndarray
    nll_base: np.ndarray
    kld: np.ndarray
    same_top: np.ndarray
    p_diff: np.ndarray


def compare(base: BaseProbs, logits: np.ndarray, targets: np.ndarray, *, threads: int = 1) -> TokenStats:
    """The model's logits over the chunk against the base distribution, token by token."""
    logits, targets = _check(logits, targets)
    n, n_vocab = logits.shape
    if base.probs.shape != logits.shape:
        raise ValueError(f"base {base.probs.shape} and model {logits.shape} logits differ in shape")
    nll, kld = np.empty(n), np.empty(n)
    top = np.empty(n, dtype=np.int64)

    def work(lo: int, hi: int) -> None:
        z = logits[lo:hi]
        p = base.probs[lo:hi]
        buf = np.empty((hi - lo, n_vocab))
        m = z.max(axis=1).astype(np.float64)
        np.subtract(z, m[:, None], out=buf, dtype=np.float64)
        p_shifted = np.einsum("ij,ij->i", p, buf)  # sum p (z - m)
        np.exp(buf, out=buf)
        lse = np.log(buf.sum(axis=1))
        # KL = sum p (log p - (z - m - lse)) = sum p log p - sum p (z - m) + lse * sum p
        kld[lo:hi] = base.sum_p_logp[lo:hi] - p_shifted + lse * base.sum_p[lo:hi]
        nll[lo:hi] = _nll(z, m, lse, targets[lo:hi])
        top[lo:hi] = z.argmax(axis=1)

    _in_blocks(n, threads, work)
    p_diff = np.exp(-nll) - np.exp(-base.nll)
    return TokenStats(nll, base.nll.copy(), kld, top == base.top, p_diff)


def token_stats(base_logits: np.ndarray, logits: np.ndarray, targets: np.ndarray, *,
                llama_compat: bool = False, threads: int = 1) -> TokenStats:
    """``compare`` for a single pair of logits arrays."""
    base = BaseProbs.from_logits(base_logits, targets, llama_compat=llama_compat, threads=threads)
    return compare(base, logits, targets, threads=threads)


def _mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    """kl_divergence()'s mean_and_uncertainty: mean and standard error (0 for 10 values or fewer)."""
    if count < 1:
        return 0.0, 0.0
    f = total / count
    df = total2 / count - f * f
    return f, math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0


def _covariance(sum_a: float, sum_b: float, sum_ab: float, count: int) -> float:
    if count < 10:
        return 0.0
    return (sum_ab / count - (sum_a / count) * (sum_b / count)) / (count - 1)


def _percentiles(values: np.ndarray, fractions: dict[str, float]) -> dict[str, float]:
    """Linear interpolation between order statistics at fraction * (n - 1), the median as the
    mean of the two middle values: llama-perplexity's ``percentile`` (= numpy's "linear")."""
    if values.size == 0:
        return {k: float("nan") for k in fractions}
    return {k: float(v) for k, v in zip(fractions, np.quantile(values, list(fractions.values())))}


class Statistics:
    """Aggregates per-token statistics over chunks: the sums of llama-perplexity's
    ``kl_divergence_result``, plus every token's KLD and Δp as float32 (8 bytes a token, as the
    tool keeps them) for the percentiles."""

    def __init__(self) -> None:
        self.count = 0
        self.with_base = False
        self.sum_nll = self.sum_nll2 = 0.0
        self.sum_nll_base = self.sum_nll_base2 = self.sum_nll_nll_base = 0.0
        self.sum_kld = self.sum_kld2 = 0.0
        self.sum_p_diff = self.sum_p_diff2 = self.sum_p_diff4 = 0.0
        self.max_p_diff = 0.0
        self.n_same_top = 0
        self._kld: list[np.ndarray] = []
        self._p_diff: list[np.ndarray] = []

    def add_nll(self, nll: np.ndarray) -> None:
        """Perplexity only (no base): the NLL of each scored token."""
        nll = np.asarray(nll, dtype=np.float64)
        self.count += nll.size
        self.sum_nll += float(nll.sum())
        self.sum_nll2 += float(nll @ nll)

    def add(self, s: TokenStats) -> None:
        self.with_base = True
        self.add_nll(s.nll)
        self.sum_nll_base += float(s.nll_base.sum())
        self.sum_nll_base2 += float(s.nll_base @ s.nll_base)
        self.sum_nll_nll_base += float(s.nll @ s.nll_base)
        self.sum_kld += float(s.kld.sum())
        self.sum_kld2 += float(s.kld @ s.kld)
        d2 = s.p_diff * s.p_diff
        self.sum_p_diff += float(s.p_diff.sum())
        self.sum_p_diff2 += float(d2.sum())
        self.sum_p_diff4 += float(d2 @ d2)
        if s.p_diff.size:
            self.max_p_diff = max(self.max_p_diff, float(np.abs(s.p_diff).max()))
        self.n_same_top += int(np.count_nonzero(s.same_top))
        self._kld.append(s.kld.astype(np.float32))
        self._p_diff.append(s.p_diff.astype(np.float32))

    def perplexity(self) -> tuple[float, float]:
        """PPL and its uncertainty as ``perplexity()`` prints "Final estimate: PPL = x +/- y"."""
        if self.count < 2:
            return (math.exp(self.sum_nll / self.count) if self.count else float("nan")), 0.0
        nll = self.sum_nll / self.count
        var = self.sum_nll2 / self.count - nll * nll
        ppl = math.exp(nll)
        return ppl, (math.sqrt(var / (self.count - 1)) * ppl if var > 0 else 0.0)

    def summary(self) -> dict[str, float]:
        """Everything llama-perplexity prints at the end of a --kl-divergence run (PPL only when
        no base was given). Δp, RMS Δp and the same-top share are in percent, as printed."""
        n = self.count
        if not self.with_base:
            ppl, ppl_err = self.perplexity()
            return {"ppl": ppl, "ppl_err": ppl_err}
        log_ppl, log_ppl_unc = _mean_and_uncertainty(self.sum_nll, self.sum_nll2, n)
        log_base, log_base_unc = _mean_and_uncertainty(self.sum_nll_base, self.sum_nll_base2, n)
        ppl, base_ppl = math.exp(log_ppl), math.exp(log_base)
        ppl_err, base_err = ppl * log_ppl_unc, base_ppl * log_base_unc
        cov = _covariance(self.sum_nll, self.sum_nll_base, self.sum_nll_nll_base, n)
        cor = cov / (log_ppl_unc * log_base_unc) if log_ppl_unc * log_base_unc > 0 else float("nan")
        ln_ratio = log_ppl - log_base
        ln_ratio_err = math.sqrt(max(log_ppl_unc ** 2 + log_base_unc ** 2 - 2.0 * cov, 0.0))
        ratio = math.exp(ln_ratio)
        delta_err = math.sqrt(max(ppl_err ** 2 + base_err ** 2 - 2.0 * ppl * base_ppl * cov, 0.0))
        kld_mean, kld_err = _mean_and_uncertainty(self.sum_kld, self.sum_kld2, n)
        dp_mean, dp_err = _mean_and_uncertainty(self.sum_p_diff, self.sum_p_diff2, n)
        mse, mse_err = _mean_and_uncertainty(self.sum_p_diff2, self.sum_p_diff4, n)
        rms = math.sqrt(mse)
        top = self.n_same_top / n if n else float("nan")
        top_err = math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0
        kld = np.sort(np.concatenate(self._kld)) if self._kld else np.empty(0, np.float32)
        dp = np.sort(np.concatenate(self._p_diff)) if self._p_diff else np.empty(0, np.float32)
        out = {
            "ppl": ppl, "ppl_err": ppl_err, "base_ppl": base_ppl, "base_ppl_err": base_err,
            "delta_ppl": ppl - base_ppl, "delta_ppl_err": delta_err,
            "ppl_ratio": ratio, "ppl_ratio_err": ratio * ln_ratio_err,
            "ln_ppl_ratio": ln_ratio, "ln_ppl_ratio_err": ln_ratio_err, "ppl_cor": cor,
            "kld_mean": kld_mean, "kld_err": kld_err,
        }
        out.update({f"kld_{k}": v for k, v in _percentiles(kld.astype(np.float64), KLD_PERCENTILES).items()})
        out.update({"dp_mean": 100 * dp_mean, "dp_err": 100 * dp_err})
        out.update({f"dp_{k}": 100 * v for k, v in _percentiles(dp.astype(np.float64), DP_PERCENTILES).items()})
        out.update({
            "rms_dp": 100 * rms, "rms_dp_err": 100 * (0.5 / rms * mse_err if rms > 0 else 0.0),
            "top1": 100 * top, "top1_err": 100 * top_err,
        })
        return out


# == orchestration ================================================================================

@dataclass
class EvalResult:
    """One model's evaluation. PPL values are perplexities; KLD in nats; ``dp_*``, ``rms_dp`` and
    ``top1`` in percent (as llama-perplexity prints them). Base fields are None without a base."""

    model: str
    base: str | None
    text: str
    n_ctx: int
    n_chunks: int
    n_tokens_scored: int
    ppl: float
    ppl_err: float
    base_ppl: float | None = None
    base_ppl_err: float | None = None
    delta_ppl: float | None = None
    delta_ppl_err: float | None = None
    ppl_ratio: float | None = None
    ppl_ratio_err: float | None = None
    ln_ppl_ratio: float | None = None
    ln_ppl_ratio_err: float | None = None
    ppl_cor: float | None = None
    kld_mean: float | None = None
    kld_err: float | None = None
    kld_max: float | None = None
    kld_p999: float | None = None
    kld_p99: float | None = None
    kld_p95: float | None = None
    kld_p90: float | None = None
    kld_median: float | None = None
    kld_p10: float | None = None
    kld_p05: float | None = None
    kld_p01: float | None = None
    kld_p001: float | None = None
    kld_min: float | None = None
    dp_mean: float | None = None
    dp_err: float | None = None
    dp_max: float | None = None
    dp_p999: float | None = None
    dp_p99: float | None = None
    dp_p95: float | None = None
    dp_p90: float | None = None
    dp_p75: float | None = None
    dp_median: float | None = None
    dp_p25: float | None = None
    dp_p10: float | None = None
    dp_p05: float | None = None
    dp_p01: float | None = None
    dp_p001: float | None = None
    dp_min: float | None = None
    rms_dp: float | None = None
    rms_dp_err: float | None = None
    top1: float | None = None
    top1_err: float | None = None
    base_file_type: str | None = None
    base_is_quantized: bool | None = None
    llama_compat: bool = False
    threads: int = 0
    seconds: float = 0.0  # this model's decoding + statistics
    tokens_per_second: float = 0.0  # tokens decoded by this model per second of ``seconds``
    base_seconds: float | None = None  # the base's decoding + statistics (shared by evaluate_many)
    model_format: str | None = None  # GGUF file type, or the HF folder's format (F32, NF4, compressed-tensors W4A16 g64)
    runtime: str = "llama.cpp"  # what computed this model's logits: llama.cpp or transformers
    wall_seconds: float = 0.0  # the whole call: loading, tokenizing, every model
    notes: list[str] = field(default_factory=list)
    offload: dict | None = None  # runtime.llama.Offload.to_dict() of this model as loaded

    def to_dict(self) -> dict:
        """Plain JSON-ready values (a statistic that is undefined, e.g. NaN, becomes None)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def load_text(text: str | Path | None = None) -> tuple[str, str]:
    """(text, name) of the evaluation text: the built-in one, a text file, or a folder whose .txt
    and .md files are concatenated in sorted order. Like llama-perplexity's ``-f``, the bytes are
    kept as they are except one trailing newline."""
    if text is None:
        path, name = DEFAULT_TEXT, "llmquant built-in evaluation text (Python Language Reference prose)"
    else:
        path = Path(text).expanduser()
        name = str(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise EvalTextError(path, f"folder holds no {' or '.join(TEXT_SUFFIXES)} files")
        content = "\n\n".join(_read_text_file(p) for p in files)
    elif path.is_file():
        content = _read_text_file(path)
    else:
        raise EvalTextError(path, "no such file or folder")
    if not content.strip():
        raise EvalTextError(path, "the text is empty")
    return content.removesuffix("\n"), name


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    if b"\0" in raw[:65536]:
        raise EvalTextError(path, "looks binary (contains NUL bytes), expected UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EvalTextError(path, f"is not UTF-8 text (byte {exc.start}); expected a text file") from None


def check_ctx(ctx: int) -> None:
    if not isinstance(ctx, int) or ctx < MIN_CTX or ctx % 2:
        raise EvalError(f"ctx must be an even number of tokens >= {MIN_CTX}, got {ctx}", ctx)


def chunk_layout(n_tokens: int, ctx: int, chunks: int | None) -> int:
    """Number of chunks llama-perplexity evaluates; refuses texts under 2 * ctx tokens as it does."""
    if chunks is not None and chunks < 1:
        raise EvalError(f"chunks must be >= 1, got {chunks}", chunks)
    if n_tokens < 2 * ctx:
        raise EvalError(
            f"the text tokenizes to {n_tokens} tokens; a context of {ctx} needs at least {2 * ctx} "
            f"(llama-perplexity's minimum): give a longer text or a smaller --ctx", n_tokens)
    n_chunk = n_tokens // ctx
    return n_chunk if chunks is None else min(chunks, n_chunk)


@dataclass(frozen=True)
class ModelRef:
    """A model to evaluate and how to run it. ``path``: a GGUF file or an HF folder. ``load``: "nf4"
    quantizes an HF folder at load time (bitsandbytes). ``runtime``: "auto" (llama.cpp for a GGUF,
    transformers for an HF folder), "torch", or "llama" (an HF folder converted to an F32 GGUF on the
    fly, its weights dequantized first when the checkpoint is quantized: the fast path)."""

    path: Path
    load: str | None = None
    runtime: str = "auto"
    allow_pickle: bool = False

    @property
    def is_hf(self) -> bool:
        return self.path.is_dir()

    @property
    def uses_torch(self) -> bool:
        return self.is_hf and self.runtime in ("auto", "torch")


ModelSpec = str | Path | ModelRef


def as_ref(spec: ModelSpec) -> ModelRef:
    if isinstance(spec, ModelRef):
        ref = spec
    else:
        ref = ModelRef(Path(spec))
    if ref.runtime not in ("auto", "torch", "llama"):
        raise EvalError(f"runtime must be auto, torch or llama, got {ref.runtime!r}", ref.runtime)
    if ref.load is not None and ref.load != "nf4":
        raise EvalError(f"unknown --load {ref.load!r}; expected nf4", ref.load)
    if ref.load is not None and not ref.is_hf:
        raise EvalError(f"--load {ref.load} quantizes a Hugging Face folder at load time; {ref.path.name} is not one", ref.path)
    if ref.load is not None and not ref.uses_torch:
        raise EvalError(f"--load {ref.load} runs in transformers; it cannot be combined with the llama.cpp runtime", ref.load)
    return ref


def evaluate(model: ModelSpec, base: ModelSpec | None = None, text: str | Path | None = None, ctx: int = 512,
             chunks: int | None = None, threads: int | None = None, *,
             progress: Callable[[int, int], None] | None = None, llama_compat: bool = False,
             base_logits: str | Path | None = None,
             before_write: Callable[[int], None] | None = None, options=None) -> EvalResult:
    """Perplexity of ``model`` over ``text`` and, with ``base``, the KL-divergence statistics of
    ``model`` against ``base`` (llama-perplexity --kl-divergence). Either may be a GGUF or an HF
    folder (see ``ModelRef``). ``options``: a runtime.llama.LoadOptions
    (GPU layers, mmap/mlock, flash attention, KV types) for every model loaded.

    ``base_logits``: a llama-perplexity ``--kl-divergence-base`` file. When it exists it is the
    base (its tokens replace ``text``, its context ``ctx``; statistics as the tool computes them
    from 16-bit log-probabilities); when it does not, ``base`` is run once to write it first
    (``before_write(nbytes)`` is told its exact size before anything is written)."""
    if base_logits is not None:
        if any(isinstance(s, ModelRef) or Path(s).is_dir() for s in (model, base) if s is not None):
            raise EvalError("--base-logits compares GGUF files (llama-perplexity's format); convert the "
                            "Hugging Face folder first (llmquant convert)", base_logits)
        t0 = time.perf_counter()
        file = Path(base_logits)
        if not file.exists():
            if base is None:
                raise LogitsFileError(file, "no such file; give a base model to compute it")
            write_base_logits(base, file, text, ctx, chunks, threads, before_write=before_write, options=options)
        result = evaluate_against_logits(model, file, chunks=chunks, threads=threads, progress=progress,
                                         options=options)
        if base is not None:
            result.base = str(base)
            result.base_file_type, result.base_is_quantized = _check_file(Path(base), result.n_ctx)
            result.notes[:0] = _base_notes(Path(base), result.base_file_type, result.base_is_quantized)
        result.wall_seconds = time.perf_counter() - t0
        return result
    return _evaluate([as_ref(model)], as_ref(base) if base is not None else None, text, ctx, chunks, threads,
                     progress, llama_compat, options)[0]


@dataclass
class BaseLogitsInfo:
    """A written base-logits file: where, its dimensions, its exact size and the time it took."""

    path: str
    base: str
    n_ctx: int
    n_vocab: int
    n_chunks: int
    file_bytes: int
    seconds: float


def base_logits_layout(base: str | Path, text: str | Path | None = None, ctx: int = 512,
                       chunks: int | None = None) -> tuple[np.ndarray, int, int]:
    """(tokens to store, n_vocab, file size) of the base-logits file for ``base`` over ``text``,
    from the vocabulary alone (no weights loaded): its size can be announced and checked first."""
    from ..runtime.llama import Model

    check_ctx(ctx)
    content, _ = load_text(text)
    _check_file(Path(base), ctx)
    with Model(base, n_ctx=ctx, vocab_only=True) as vocab:
        tokens = np.asarray(vocab.tokenize(content, add_bos=True), dtype=np.int32)
        n_vocab = vocab.n_vocab
    n_chunk = chunk_layout(len(tokens), ctx, chunks)
    from .logits_file import file_size

    return tokens[:n_chunk * ctx], n_vocab, file_size(ctx, n_vocab, n_chunk)


def write_base_logits(base: str | Path, path: str | Path, text: str | Path | None = None, ctx: int = 512,
                      chunks: int | None = None, threads: int | None = None, *,
                      progress: Callable[[int, int], None] | None = None,
                      before_write: Callable[[int], None] | None = None, options=None) -> BaseLogitsInfo:
    """Run ``base`` over ``text`` once and store its log-probabilities as llama-perplexity's
    ``--kl-divergence-base`` does (same tokens, chunks and 16-bit rows), atomically.
    ``before_write(nbytes)`` is called with the exact file size before anything is written (to
    announce it or refuse it)."""
    from ..system import default_threads
    from ..runtime.llama import LoadOptions, Model
    from .logits_file import LogitsFileWriter, scored_per_chunk

    t0 = time.perf_counter()
    tokens, n_vocab, size = base_logits_layout(base, text, ctx, chunks)
    if before_write is not None:
        before_write(size)
    n_threads = default_threads(threads)
    n_chunk = len(tokens) // ctx
    kwargs = (options or LoadOptions()).model_kwargs(n_ctx=ctx, n_batch=ctx, threads=n_threads, flash_attn=FLASH_ATTN)
    with Model(base, **kwargs) as m, \
            LogitsFileWriter(path, ctx, n_vocab, tokens) as writer:
        n_scored = scored_per_chunk(ctx)
        for i, chunk, _ in _chunks(tokens, ctx, n_chunk, m.add_bos, m.bos):
            writer.add_chunk(m.chunk_logits(chunk, ctx // 2)[:n_scored])
            if progress is not None:
                progress(i + 1, n_chunk)
        writer.commit()
    return BaseLogitsInfo(str(path), str(base), ctx, n_vocab, n_chunk, Path(path).stat().st_size,
                          time.perf_counter() - t0)


def evaluate_against_logits(model: str | Path, base_logits: str | Path, *, chunks: int | None = None,
                            threads: int | None = None,
                            progress: Callable[[int, int], None] | None = None, options=None) -> EvalResult:
    """``model`` against a stored base (llama-perplexity --kl-divergence with --kl-divergence-base
    FILE): the file's tokens and context; one chunk of logits in memory at a time."""
    from ..system import default_threads
    from ..runtime.llama import LoadOptions, Model
    from .logits_file import LogitsFile

    t_start = time.perf_counter()
    path = Path(model)
    n_threads = default_threads(threads)
    with LogitsFile(base_logits) as file:
        h = file.header
        ctx = h.n_ctx
        check_ctx(ctx)
        n_chunk = h.n_chunk if chunks is None else min(chunks, h.n_chunk)
        if chunks is not None and chunks < 1:
            raise EvalError(f"chunks must be >= 1, got {chunks}", chunks)
        _check_file(path, ctx)
        stats, seconds = Statistics(), 0.0
        kwargs = (options or LoadOptions()).model_kwargs(n_ctx=ctx, n_batch=ctx, threads=n_threads, flash_attn=FLASH_ATTN)
        with Model(path, **kwargs) as m:
            offload = m.offload.to_dict()
            if m.n_vocab != h.n_vocab:
                raise LogitsFileError(file.path, f"holds a {h.n_vocab}-token vocabulary, {path.name} has "
                                                 f"{m.n_vocab}: KL divergence needs the same tokenizer")
            first = ctx // 2
            for i, chunk, targets in _chunks(file.tokens, ctx, n_chunk, m.add_bos, m.bos):
                t0 = time.perf_counter()
                base = BaseProbs.from_log_probs(file.log_probs(i), targets, threads=n_threads)
                logits = m.chunk_logits(chunk, first)[:h.n_scored]
                stats.add(compare(base, logits, targets, threads=n_threads))
                del logits, base
                seconds += time.perf_counter() - t0
                if progress is not None:
                    progress(i + 1, n_chunk)
    summary = stats.summary()
    return EvalResult(
        model=str(path), base=str(base_logits), text=f"the tokens stored in {Path(base_logits).name}",
        n_ctx=ctx, n_chunks=n_chunk, n_tokens_scored=stats.count, **summary, llama_compat=True,
        threads=n_threads, seconds=seconds, tokens_per_second=n_chunk * ctx / seconds if seconds > 0 else 0.0,
        wall_seconds=time.perf_counter() - t_start,
        notes=[f"base log-probabilities read from {Path(base_logits).name} (llama-perplexity's 16-bit storage)"],
        offload=offload,
    )


def _chunks(tokens: np.ndarray, ctx: int, n_chunk: int, add_bos: bool, bos: int):
    """(index, chunk to decode, scored targets) as llama-perplexity cuts the tokens: each chunk's
    first token becomes BOS when the vocabulary adds one; the targets are the original tokens."""
    first = ctx // 2
    for i in range(n_chunk):
        chunk = np.array(tokens[i * ctx:(i + 1) * ctx], dtype=np.int32)
        if add_bos:
            chunk[0] = bos
        yield i, chunk, np.asarray(tokens[i * ctx + first + 1:(i + 1) * ctx], dtype=np.int64)


def _base_notes(base_path: Path, base_type: str | None, base_quantized: bool | None) -> list[str]:
    if not base_quantized:
        return []
    return [f"the base {base_path.name} is itself quantized ({base_type}): KLD and ΔPPL "
            "measure the distance to it, not to the original weights"]


def evaluate_many(models: Sequence[ModelSpec], base: ModelSpec, text: str | Path | None = None, ctx: int = 512,
                  chunks: int | None = None, threads: int | None = None, *,
                  progress: Callable[[int, int], None] | None = None,
                  llama_compat: bool = False, options=None) -> list[EvalResult]:
    """``evaluate`` for several models against one base: the base runs once per chunk and every model
    over the same chunk right after, so memory holds one chunk of logits per model."""
    if not models:
        return []
    return _evaluate([as_ref(m) for m in models], as_ref(base), text, ctx, chunks, threads, progress, llama_compat,
                     options)


def _check_file(path: Path, ctx: int) -> tuple[str | None, bool]:
    """Refuse a ctx beyond the model's trained context before any context is allocated; return
    the file type name and whether the weights are quantized (from the GGUF header only)."""
    from ..gguf.source import GGUFSource

    with GGUFSource(path) as src:
        n_train = src.arch_get("context_length")
        if isinstance(n_train, int) and ctx > n_train:
            raise EvalError(f"ctx {ctx} exceeds the {n_train} tokens {path.name} was trained on", ctx)
        ftype = src.file_type
        return (ftype.name.removeprefix("MOSTLY_").removeprefix("ALL_") if ftype is not None else None,
                src.is_quantized)


def _check_model(ref: ModelRef, ctx: int) -> tuple[str | None, bool]:
    """``_check_file`` for a GGUF; for an HF folder the same checks from its config.json."""
    if not ref.is_hf:
        return _check_file(ref.path, ctx)
    from ..runtime.torch import describe, inspect_folder

    info = inspect_folder(ref.path, allow_pickle=ref.allow_pickle)
    n_train = info.max_positions
    if n_train is not None and ctx > n_train:
        raise EvalError(f"ctx {ctx} exceeds the {n_train} tokens {ref.path.name} was trained on", ctx)
    return describe(info, ref.load), info.method is not None or ref.load is not None


def _as_gguf(ref: ModelRef, work: Path, threads: int) -> Path:
    """An HF folder as an F32 GGUF for llama.cpp; a quantized checkpoint's weights dequantized first."""
    from ..convert import convert_model
    from ..runtime.torch import inspect_folder, write_dequantized

    folder = ref.path
    if inspect_folder(folder, allow_pickle=ref.allow_pickle).method is not None:
        folder = write_dequantized(ref.path, work / f"{ref.path.name}-dequantized", allow_pickle=ref.allow_pickle)
    dst = work / f"{ref.path.name}-F32.gguf"
    convert_model(folder, dst, "f32", threads=threads, allow_pickle=ref.allow_pickle)
    if folder != ref.path:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return dst


def _evaluate(refs: list[ModelRef], base_ref: ModelRef | None, text, ctx: int, chunks: int | None,
              threads: int | None, progress, llama_compat: bool, options=None) -> list[EvalResult]:
    import tempfile

    from ..system import default_threads
    from ..runtime.llama import LoadOptions, Model

    options = options or LoadOptions()

    t_start = time.perf_counter()
    check_ctx(ctx)
    content, text_name = load_text(text)
    n_threads = default_threads(threads)
    paths = [r.path for r in refs]
    base_path = base_ref.path if base_ref is not None else None
    with contextlib.ExitStack() as stack:
        def load(ref: ModelRef):
            if ref.uses_torch:
                from ..runtime.torch import TorchModel

                return stack.enter_context(TorchModel(ref.path, load=ref.load, threads=n_threads,
                                                      allow_pickle=ref.allow_pickle))
            path = ref.path
            if ref.is_hf:
                work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llmquant-eval-")))
                path = _as_gguf(ref, work, n_threads)
            return stack.enter_context(Model(path, **options.model_kwargs(n_ctx=ctx, n_batch=ctx, threads=n_threads,
                                                                          flash_attn=FLASH_ATTN)))

        kinds = [_check_model(r, ctx) for r in refs]
        base_type, base_quantized = _check_model(base_ref, ctx) if base_ref is not None else (None, None)

        base = load(base_ref) if base_ref is not None else None
        models = [load(r) for r in refs]
        if base is not None:
            digest = None
            for path, m in zip(paths, models):
                if m.n_vocab == base.n_vocab:
                    digest = digest or base.vocab_digest()
                if m.n_vocab != base.n_vocab or m.vocab_digest() != digest:
                    raise EvalError(
                        f"{path.name} and the base {base_path.name} have different vocabularies "
                        f"({m.n_vocab} vs {base.n_vocab} tokens{', different token texts' if m.n_vocab == base.n_vocab else ''}); "
                        "KL divergence needs the same tokenizer", path)
        tokenizer = base if base is not None else models[0]  # one tokenizer (the base's) for every model
        tokens = np.asarray(tokenizer.tokenize(content, add_bos=True), dtype=np.int32)
        n_chunk = chunk_layout(len(tokens), ctx, chunks)
        first = ctx // 2
        add_bos, bos = tokenizer.add_bos, tokenizer.bos

        stats = [Statistics() for _ in models]
        seconds = [0.0 for _ in models]
        base_seconds = 0.0
        for i in range(n_chunk):
            chunk = tokens[i * ctx:(i + 1) * ctx].copy()
            if add_bos:
                chunk[0] = bos
            targets = tokens[i * ctx + first + 1:(i + 1) * ctx]  # the original tokens
            n_scored = ctx - 1 - first
            base_probs = None
            if base is not None:
                t0 = time.perf_counter()
                base_logits = base.chunk_logits(chunk, first)[:n_scored]
                base_probs = BaseProbs.from_logits(base_logits, targets, llama_compat=llama_compat, threads=n_threads)
                del base_logits
                base_seconds += time.perf_counter() - t0
            for k, m in enumerate(models):
                t0 = time.perf_counter()
                logits = m.chunk_logits(chunk, first)[:n_scored]
                if base_probs is None:
                    stats[k].add_nll(token_nll(logits, targets, threads=n_threads))
                else:
                    stats[k].add(compare(base_probs, logits, targets, threads=n_threads))
                del logits
                seconds[k] += time.perf_counter() - t0
            if progress is not None:
                progress(i + 1, n_chunk)
        offloads = [m.offload.to_dict() if hasattr(m, "offload") else None for m in models]

    wall = time.perf_counter() - t_start
    results = []
    for ref, (kind, _), s, sec, offload in zip(refs, kinds, stats, seconds, offloads):
        path = ref.path
        summary = s.summary()
        notes = []
        if ref.is_hf and not ref.uses_torch:
            notes.append(f"{path.name} ran in llama.cpp as an F32 GGUF made from its "
                         + ("dequantized weights" if kind not in ("F32", "F16", "BF16") else "weights"))
        if base_path is not None:
            notes += _base_notes(base_path, base_type, base_quantized)
        results.append(EvalResult(
            model=str(path), base=str(base_path) if base_path is not None else None, text=text_name,
            n_ctx=ctx, n_chunks=n_chunk, n_tokens_scored=s.count, **summary,
            base_file_type=base_type, base_is_quantized=base_quantized, llama_compat=llama_compat,
            threads=n_threads, seconds=sec, tokens_per_second=n_chunk * ctx / sec if sec > 0 else 0.0,
            base_seconds=base_seconds if base is not None else None, wall_seconds=wall, notes=notes,
            offload=offload,
            model_format=kind, runtime="transformers" if ref.uses_torch else "llama.cpp",
        ))
    return results

