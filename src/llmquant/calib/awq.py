"""AWQ (Lin et al., arXiv 2306.00978): activation-aware per-channel scales and clip search, pure numpy.

Follows AutoAWQ ``awq/quantize/quantizer.py`` (``_search_best_scale``, ``_compute_best_clip``) and
llm-compressor ``modifiers/transform/awq``: for the linears that read one input (q/k/v after the input
norm, ...), scales s = mean|x|^α / mean(ŵ)^(1−α) ("duo scaling"; ŵ the weight magnitudes normalised per
group), normalised by √(max·min), α on a grid of ``n_grid`` points; the α whose quantized weights
Q(W·s)/s change the linears' outputs least wins; s is folded into the op before (a norm's weight or a
previous linear's output rows) so the function of the float model is unchanged.

Loss: the output error ‖X(W − Q(W·s)/s)ᵀ‖² of the linears of the mapping, computed exactly from the
Gram matrix G = XᵀX/n as Σ G ⊙ (DᵀD) (D = W − Q(W·s)/s). AutoAWQ/llm-compressor measure the output
of the parent module (the attention block, the MLP) by re-running it per grid point; the Gram form
uses every calibration token at the cost of one symmetric (in × out × in) product per grid point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from .gptq import IntGrid, rtn


@dataclass(frozen=True)
class Mapping:
    """Linears (names inside a decoder layer) that read the output of ``prev`` (a norm or a linear)."""

    prev: str
    linears: tuple[str, ...]
    needs_equal_heads: bool = False  # v -> o: folds only when every q head has its own v head (no GQA)


_LLAMA = (
    Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Mapping("self_attn.v_proj", ("self_attn.o_proj",), needs_equal_heads=True),
    Mapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Mapping("mlp.up_proj", ("mlp.down_proj",)),
)

# per model_type, as llm-compressor's AWQ_MAPPING_REGISTRY (modifiers/transform/awq/mappings.py)
AWQ_MAPPINGS: dict[str, tuple[Mapping, ...]] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
}

# linears whose clip search AutoAWQ skips (attention scores are too sensitive): ``avoid_clipping``
NO_CLIP = ("q_proj", "k_proj")


def _rtn(W: np.ndarray, grid: IntGrid, g: int, clip: np.ndarray | None = None) -> np.ndarray:
    return rtn(W, grid, g, clip).weight


@njit(cache=True, nogil=True)
def _group_range(W, s, g):  # per (row, group): min and max of W·s, float32 as numpy computes them
    rows, cols = W.shape
    lo = np.empty((rows, cols // g), np.float32)
    hi = np.empty((rows, cols // g), np.float32)
    for r in range(rows):
        for k in range(cols // g):
            mn, mx = np.float32(np.inf), np.float32(-np.inf)
            for j in range(k * g, (k + 1) * g):
                v = W[r, j] * s[j]
                mn, mx = min(mn, v), max(mx, v)
            lo[r, k], hi[r, k] = mn, mx
    return lo, hi


@njit(cache=True, nogil=True)
def _error_kernel(W, s, scale, zero, maxq, g):  # W − Q(W·s)/s in numpy's float32 operation order
    rows, cols = W.shape
    D = np.empty_like(W)
    lo = np.float32(0.0)
    for r in range(rows):
        for k in range(cols // g):  # a group's (scale, zero) held across its columns: 1.6x faster
            sc, z = scale[r, k], zero[r, k]
            for j in range(k * g, (k + 1) * g):
                q = np.float32(np.rint((W[r, j] * s[j]) / sc)) + z
                q = min(max(q, lo), maxq)
                D[r, j] = W[r, j] - ((q - z) * sc) / s[j]
    return D


def scaled_error(W: np.ndarray, s: np.ndarray, grid: IntGrid, g: int) -> np.ndarray:
    """D = W − Q(W·s)/s, the weight change AWQ's scales s leave after round-to-nearest: the same
    values as ``W - _rtn(W * s, grid, g) / s``, in two compiled passes instead of ten numpy passes."""
    lo, hi = _group_range(W, s, g)
    p = grid.fit_range(lo, hi)
    return _error_kernel(W, s, p.scale.astype(np.float32), p.zero.astype(np.float32), np.float32(grid.maxq), g)


def output_loss(D: np.ndarray, G: np.ndarray) -> float:
    """Σ over outputs of the mean squared output change of weights changed by D, G = XᵀX/n:
    tr(D G Dᵀ) = Σ G ⊙ (DᵀD), DᵀD by one symmetric rank-k update (numpy's ``a.T @ a``), then one
    dot product — 1.2–1.4x faster than D·G and its elementwise sum (measured at 3072 x 576 and
    576 x 1536 with OpenBLAS; the product was a quarter of an AWQ run)."""
    G = np.asarray(G, np.float32)
    return float(np.vdot(G, D.T @ D))


def awq_scales(G: np.ndarray, x_mean: np.ndarray, weights: list[np.ndarray], grid: IntGrid, group_size: int, *,
               n_grid: int = 20, duo_scaling: bool = True) -> tuple[np.ndarray, float, list[float]]:
    """Best per-input-channel scales for the linears ``weights`` (each (out_i, in)) reading one input
    with Gram matrix ``G`` (in, in) and mean |x| ``x_mean`` (in,). Returns (scales, α, loss per grid point)."""
    W = np.concatenate([np.asarray(w, np.float32) for w in weights], axis=0)
    rows, cols = W.shape
    g = group_size or cols
    G = np.asarray(G, np.float32)
    a = np.abs(W).reshape(rows, cols // g, g)
    w_mean = (a / (a.max(axis=-1, keepdims=True) + 1e-6)).reshape(rows, cols).mean(axis=0)
    x_mean = np.asarray(x_mean, np.float64)
    best, best_s, best_alpha, losses = np.inf, np.ones(cols, np.float32), 0.0, []
    for r in range(n_grid):
        alpha = r / n_grid
        if duo_scaling:
            s = x_mean ** alpha / (w_mean ** (1 - alpha) + 1e-4)
        else:
            s = x_mean ** alpha
        s = np.maximum(s, 1e-4)
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        loss = output_loss(scaled_error(W, s, grid, g), G)
        losses.append(loss)
        if loss < best:
            best, best_s, best_alpha = loss, s, alpha
    return best_s, best_alpha, losses


def awq_clip(W: np.ndarray, G: np.ndarray, grid: IntGrid, group_size: int, *, n_grid: int = 20,
             max_shrink: float = 0.5) -> np.ndarray:
    """Per (output row, group) range factor in (1 − max_shrink, 1] that minimises that group's
    contribution to the output error (AutoAWQ ``_compute_best_clip``; G's diagonal blocks)."""
    W = np.asarray(W, np.float32)
    rows, cols = W.shape
    g = group_size or cols
    ng = cols // g
    Gb = np.stack([G[k * g:(k + 1) * g, k * g:(k + 1) * g] for k in range(ng)]).astype(np.float32)
    best_err = np.full((rows, ng), np.inf, np.float32)
    best = np.ones((rows, ng), np.float32)
    Wt = W.reshape(rows, ng, g).transpose(1, 0, 2)  # (groups, rows, g): one batched matmul per candidate
    for i in range(int(max_shrink * n_grid)):
        c = 1.0 - i / n_grid
        clip = np.full((rows, ng), c, np.float32)
        D = Wt - _rtn(W, grid, g, clip).reshape(rows, ng, g).transpose(1, 0, 2)
        err = (np.matmul(D, Gb) * D).sum(axis=-1).T  # d_rk G_k d_rkᵀ, 8x faster than the 3-operand einsum
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, c, best)
    return best


def fold_scales(prev: np.ndarray, weights: list[np.ndarray], s: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Divide the op before by s (a norm's weight, or a linear's output rows) and multiply the
    linears' input columns by s: the float function is unchanged."""
    prev = np.asarray(prev, np.float32)
    prev = prev / s if prev.ndim == 1 else prev / s[:, None]
    return prev, [np.asarray(w, np.float32) * s[None, :] for w in weights]
