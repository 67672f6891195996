"""AWQ-style per-channel scales for a GGUF model, folded into the op before (zero extra bytes).

For linears that read one input (q/k/v after ``attn_norm``, gate/up after ``ffn_norm``, down after
``ffn_up``, o after ``attn_v``), input channel j of each linear is multiplied by s_j and the output
channel j of the op before divided by it (a norm's weight, or a matrix's row and bias), so the float
model computes the same function (AWQ, Lin et al. arXiv 2306.00978; AutoAWQ ``_search_best_scale``).
Quantizing W·diag(s) instead of W spends the grid's resolution on the loud input channels.

s = rms(x)^α normalised by √(max·min), with α on ``ALPHAS``; the α whose plain encoding (the real
ggml encoder of the tensor's type, weighted by E[x²]/s², as the runtime will decode it) gives the
least layer-output error Σ tr(ΔHΔᵀ) under the shrunk statistics (``refine.shrink_hessian``) wins,
found by a local search on the grid; α = 0 (no scaling) is always tried, so a fold never makes the
plain encoding worse on that objective.
Under grouped-query attention v → o folds too: o's input channel (head h, c) carries v's row
(kv head of h, c), so s is chosen per v row from the rms over the q heads that share it.

The search is per decoder layer, on the tensors as llama.cpp's mixture types them, before GPTQ
(``refine.Refiner``) runs on the folded weights with H/(s sᵀ) — the statistics of the folded inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .refine import shrink_hessian

ALPHAS = np.linspace(0.0, 0.5, 6)  # on SmolLM2 no layer's best α was above 0.5 on a 0 … 1 grid
ROW_STEP = 2


@dataclass(frozen=True)
class Fold:
    """Linears of a block (names without ``blk.N.`` and ``.weight``) that read the output of ``prev``:
    a norm (its weight is divided) or a matrix (its rows, and bias if any, are divided)."""

    prev: str
    linears: tuple[str, ...]
    heads: bool = False  # prev's rows are kv heads and the linear's columns q heads (v -> o)


_LLAMA = (
    Fold("attn_norm", ("attn_q", "attn_k", "attn_v")),
    Fold("ffn_norm", ("ffn_gate", "ffn_up")),
    Fold("ffn_up", ("ffn_down",)),
    Fold("attn_v", ("attn_output",), heads=True),
)

# per GGUF architecture: plain RMSNorm weights before attention and MLP, SiLU-gated MLP, no norm on v
FOLDS: dict[str, tuple[Fold, ...]] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA}

Encode = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (rows, importance) -> bytes
Decode = Callable[[np.ndarray, tuple], np.ndarray]


def _rms(H: np.ndarray, tie: tuple[int, int, int] | None) -> np.ndarray:
    xr = np.sqrt(np.maximum(np.diag(H) / 2.0, 1e-12))
    if tie is not None:
        n_kv, group, hd = tie
        xr = np.sqrt((xr.reshape(n_kv, group, hd) ** 2).mean(axis=1)).reshape(-1)
    return xr


def fold_error(weights: list[tuple[np.ndarray, Encode, Decode]], H: np.ndarray, alpha: float, *,
               Hs: np.ndarray, tie: tuple[int, int, int] | None = None,
               row_step: int = ROW_STEP) -> tuple[np.ndarray, float]:
    """(s, Σ tr(ΔHsΔᵀ)) at one α: s = rms(x)^α normalised by √(max·min), each linear encoded
    plainly (importance E[x²]/s²) on W·diag(s) and decoded back to W's space; the error over every
    ``row_step``-th output row against ``Hs`` (float32: 2x faster products, the same choice)."""
    s = _rms(H, tie) ** alpha
    s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
    cols = expand(s, tie)
    imp = (np.diag(H) / 2.0 / cols.astype(np.float64) ** 2).astype(np.float32)
    e = 0.0
    for W, encode, decode in weights:
        W = W[::row_step]
        Ws = W * cols[None, :]
        q = np.asarray(decode(encode(Ws, imp), Ws.shape), np.float32).reshape(Ws.shape) / cols[None, :]
        D = q - W
        e += float(np.vdot(D @ Hs, D))  # tr(ΔHΔᵀ), as refine.output_error
    return s, e


def fold_scale(weights: list[tuple[np.ndarray, Encode, Decode]], H: np.ndarray, *, shrink: float,
               alphas: Iterable[float] = ALPHAS, tie: tuple[int, int, int] | None = None,
               row_step: int = ROW_STEP) -> tuple[np.ndarray, float, float, float]:
    """Best scales for linears reading one input with statistics H = 2/n·XᵀX: returns (s, α, error at
    α = 0, error at α). ``weights``: (W (out, in), encode, decode) per linear. ``tie`` (n_kv, group,
    head_dim): s has one value per v row (n_kv·head_dim), repeated over the ``group`` q heads of
    each kv head to scale the linears' columns (``expand``). The errors are summed over every
    ``row_step``-th output row of each linear (``fold_error``): α is one number for the whole fold,
    and half the rows choose it as well as all (SmolLM2) at half the encoding time.

    ``alphas`` must start at 0. Not every point is encoded: α = 0 and the grid's third point first,
    then a climb to the better neighbour while it improves (or, where the third point is no better
    than 0, the points between): on SmolLM2's Q4_K_M the whole grid's best in 118 and 119 of 120
    folds (default and de-gridded model; error sums +0.03 % and +0.001 %) at 61 % and 68 % of the
    encodings."""
    alphas = [float(a) for a in alphas]
    if not alphas or alphas[0] != 0.0:
        raise ValueError(f"alphas {alphas}: expected a grid starting at 0 (no scaling)")
    Hs = shrink_hessian(H, shrink).astype(np.float32)
    tried: dict[int, tuple[np.ndarray, float]] = {}

    def error(i: int) -> float:
        if i not in tried:
            tried[i] = fold_error(weights, H, alphas[i], Hs=Hs, tie=tie, row_step=row_step)
        return tried[i][1]

    start = min(2, len(alphas) - 1)
    i = start if error(start) < error(0) else 0
    if i == 0:
        for j in range(1, start):
            if error(j) < error(i):
                i = j
    else:
        for step in (1, -1):
            j = i
            while 0 <= j + step < len(alphas) and error(j + step) < error(j):
                j += step
            if j != i:
                i = j
                break
    return tried[i][0], alphas[i], tried[0][1], tried[i][1]


def expand(s: np.ndarray, tie: tuple[int, int, int] | None) -> np.ndarray:
    """A v → o scale per v row as o's column scale: each kv head's values repeated for its q heads."""
    if tie is None:
        return s
    n_kv, group, hd = tie
    return np.repeat(s.reshape(n_kv, 1, hd), group, axis=1).reshape(-1)


@dataclass
class FoldedScales:
    """The scales chosen for a model: ``columns[name]`` multiplies that weight's input columns,
    ``rows[name]`` divides a tensor's output rows (a norm's values, a matrix's rows, a bias)."""

    columns: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    vectors: set[str] = field(default_factory=set)  # the names in ``rows`` that are 1-D (norms, biases)
    report: list[dict] = field(default_factory=list)  # per fold: prev, α, plain error before / after

    def touches(self, name: str) -> bool:
        return name in self.columns or name in self.rows

    def apply(self, name: str, values: np.ndarray) -> np.ndarray:
        """The values of tensor ``name`` folded: a matrix (rows, cols), or a norm's or bias's vector
        in any shape (its values are divided one for one)."""
        out = np.asarray(values, np.float32)
        r = self.rows.get(name)
        if r is not None:
            out = (out.reshape(-1) / r).reshape(out.shape) if name in self.vectors else out / r[:, None]
        c = self.columns.get(name)
        if c is not None:
            out = out * c[None, :]
        return np.ascontiguousarray(out, np.float32)

    def unfold(self, name: str, values: np.ndarray) -> np.ndarray:
        """The inverse of ``apply`` for a weight matrix: folded values back in the source's space."""
        out = np.asarray(values, np.float64)
        c = self.columns.get(name)
        if c is not None:
            out = out / c[None, :]
        r = self.rows.get(name)
        if r is not None:
            out = out * r[:, None]
        return out

    def hessian_scale(self, name: str) -> np.ndarray | None:
        """The column scale of weight ``name``: its folded input statistics are H/(s sᵀ)."""
        return self.columns.get(name)


def search_folds(arch: str, n_layer: int, read: Callable[[str], np.ndarray],
                 codecs: Mapping[str, tuple[Encode, Decode]], hessian: Callable[[str], np.ndarray | None], *,
                 shrink: float, heads: tuple[int, int] | None, shape: Callable[[str], tuple[int, ...] | None],
                 map_layers: Callable = map) -> FoldedScales:
    """The folds of every decoder layer of a model of ``arch`` (``FOLDS``): ``read(name)`` a weight's
    float32 rows (out, in); ``codecs[name]`` the encoder/decoder of the type the weight will have;
    ``hessian(name)`` its input statistics; ``heads`` (n_head, n_kv) for v → o; ``shape(name)``
    the tensor's shape as (rows, cols) or (n,), None where the model has no such tensor. A fold is skipped where a linear has no
    statistics, no refinable type, or shapes that do not chain. ``map_layers`` runs the layers
    (``ThreadPoolExecutor.map`` for several at once)."""
    folds = FOLDS.get(arch)
    out = FoldedScales()
    if folds is None:
        return out

    def layer(i: int) -> list[tuple[Fold, list[str], str, np.ndarray, np.ndarray, float, float, float]]:
        p = f"blk.{i}."
        found = []
        for f in folds:
            names = [f"{p}{n}.weight" for n in f.linears]
            prev = f"{p}{f.prev}.weight"
            pshape = shape(prev)
            if pshape is None or not all(n in codecs and shape(n) is not None for n in names):
                continue
            H = hessian(names[0])
            if H is None or any(hessian(n) is not H for n in names) or any(shape(n)[1] != H.shape[0] for n in names):
                continue
            tie = None
            if f.heads:
                if heads is None or len(pshape) != 2:
                    continue
                n_head, n_kv = heads
                hd = H.shape[0] // n_head
                if n_head % n_kv or hd * n_head != H.shape[0] or pshape[0] != n_kv * hd:
                    continue
                tie = (n_kv, n_head // n_kv, hd)
            elif pshape[0] != H.shape[0]:
                continue
            Ws = [read(n) for n in names]
            s, a, e0, e = fold_scale([(W, *codecs[n]) for W, n in zip(Ws, names)], H, shrink=shrink, tie=tie)
            found.append((f, names, prev, s, expand(s, tie), a, e0, e))
        return found

    for found in map_layers(layer, range(n_layer)):
        for f, names, prev, s, cols, a, e0, e in found:
            if a == 0:
                out.report.append({"prev": prev, "alpha": 0.0, "gain": 1.0})
                continue
            for n in names:  # each linear and each op before belongs to one fold (FOLDS)
                out.columns[n] = cols
            out.rows[prev] = s
            if f.prev.endswith("norm"):
                out.vectors.add(prev)
            bias = prev.removesuffix(".weight") + ".bias"
            if shape(bias) is not None:
                out.rows[bias] = s
                out.vectors.add(bias)
            out.report.append({"prev": prev, "alpha": round(a, 4), "gain": round(e0 / e, 4) if e else 1.0})
    return out
