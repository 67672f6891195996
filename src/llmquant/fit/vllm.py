"""``fit --engine vllm --gpu A100-80G[:N]``: the vLLM deployment plan for an HF checkpoint.

The KV-cache arithmetic is vLLM's own (v1 engine, ``vllm/v1/core/kv_cache_utils.py`` and
``vllm/v1/kv_cache_interface.py``):

- a full-attention layer's page is ``2 * block_size * num_kv_heads * head_size * dtype_size`` bytes
  (``FullAttentionSpec.page_size_bytes``; K and V), block_size 16 tokens by default, with
  ``num_kv_heads`` the heads on one GPU: ``max(1, total_kv_heads // tensor_parallel_size)``;
- ``num_blocks = available_memory // page_size // num_layers`` (``get_num_blocks``);
- "GPU KV cache size" = ``num_blocks * block_size`` tokens, and "Maximum concurrency for
  max_model_len tokens per request" = ``num_blocks / cdiv(max_model_len, block_size)``
  (``get_max_concurrency_for_kv_cache_config``);
- ``available_memory`` = ``gpu_memory_utilization * total GPU memory`` minus what the profile run
  measured (weights, peak activations, non-torch memory). vLLM measures that on the GPU; here it is
  an estimate (the weights exactly from the checkpoint's files; activations and overhead by the
  rule below), so block counts from a real GPU can differ by the estimate's error — the formulas
  themselves are exact, and tests check them against vLLM's published logs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LlmquantError
from .catalog import ModelSpec
from .machines import CATALOG, GiB, Machine

BLOCK_SIZE = 16  # vLLM CacheConfig.block_size default (CUDA)
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default
NON_TORCH_BYTES = int(0.5 * GiB)  # CUDA context, NCCL, cuBLAS workspaces: vLLM logs show 0.35-0.6 GiB
CUDA_GRAPH_BYTES = int(0.5 * GiB)  # captured graphs (vLLM's logs: "Graph capturing ... took 0.2-1 GiB")
MAX_NUM_BATCHED_TOKENS = 8192  # the profile run's token budget (vLLM v1 online-serving default on big GPUs)
MAX_NUM_SEQS = 256


class VllmPlanError(LlmquantError):
    pass


def page_size_bytes(num_kv_heads: int, head_size: int, dtype_size: int, block_size: int = BLOCK_SIZE) -> int:
    """FullAttentionSpec.page_size_bytes: one layer's K and V for one block."""
    return 2 * block_size * num_kv_heads * head_size * dtype_size


def num_blocks(available_memory: int, page_size: int, num_layers: int) -> int:
    """kv_cache_utils.get_num_blocks."""
    return max(int(available_memory // page_size // num_layers), 0)


def max_concurrency(blocks: int, max_model_len: int, block_size: int = BLOCK_SIZE) -> float:
    """kv_cache_utils.get_max_concurrency_for_kv_cache_config (full attention, one group)."""
    return blocks / math.ceil(max_model_len / block_size)


def kv_heads_per_gpu(total_kv_heads: int, tp: int) -> int:
    """vLLM replicates KV heads when there are fewer than GPUs (ModelConfig.get_num_kv_heads)."""
    return max(1, total_kv_heads // tp)


def parse_gpu(text: str) -> tuple[Machine, int]:
    """``A100-80G``, ``h100-80gb:4``, ``rtx-4090:2`` -> (catalog GPU, count)."""
    name, _, count = text.strip().lower().partition(":")
    try:
        n = int(count) if count else 1
    except ValueError:
        raise VllmPlanError(f"--gpu {text!r}: the count after ':' must be a whole number") from None
    if not 1 <= n <= 64:
        raise VllmPlanError(f"--gpu {text!r}: between 1 and 64 GPUs")
    key = name + "b" if name.endswith(("0g", "4g", "2g", "6g", "8g")) else name
    gpus = [m for m in CATALOG if m.kind == "gpu"]
    for m in gpus:
        if m.name in (key, name) or m.name.removeprefix("2x-") == key:
            return m, n
    raise VllmPlanError(f"--gpu {text!r}: not a catalog GPU; expected one of "
                        f"{', '.join(m.name for m in gpus if not m.name.startswith('2x-'))}[:N]")


@dataclass
class VllmPlan:
    model: str
    gpu: str
    tp: int
    gpu_memory_utilization: float
    max_model_len: int
    kv_cache_dtype: str
    block_size: int
    weights_bytes: int  # whole checkpoint
    weights_per_gpu: int
    activation_bytes: int  # estimate of the profile run's peak
    overhead_bytes: int  # non-torch + CUDA graphs (estimate)
    available_kv_bytes: int
    page_size: int
    num_layers: int
    num_blocks: int
    kv_tokens: int
    max_concurrency: float
    max_context: int  # the longest max_model_len one request can have with these blocks
    command: str
    fits: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def checkpoint_bytes(spec: ModelSpec) -> tuple[int, str]:
    """Weight bytes as vLLM loads them: the safetensors files of a folder (GPTQ/AWQ packed weights
    included), else parameters at 2 bytes (bf16)."""
    if spec.path and Path(spec.path).is_dir():
        files = list(Path(spec.path).glob("*.safetensors"))
        if files:
            return sum(f.stat().st_size for f in files), "the checkpoint's safetensors files"
    return spec.n_params * 2, "parameters x 2 bytes (bf16)"


def activation_bytes(spec: ModelSpec, tp: int, tokens: int = MAX_NUM_BATCHED_TOKENS) -> int:
    """Estimate of the profile run's peak activations on one GPU: a layer's widest intermediates for
    ``tokens`` tokens (MLP gate+up and their product, attention q/k/v/out, residual), plus the
    sampler's float32 logits for MAX_NUM_SEQS sequences. vLLM measures this; ~±30%."""
    per_token = (3 * spec.n_ff // tp + 6 * spec.n_embd) * 2
    return tokens * per_token + MAX_NUM_SEQS * spec.n_vocab * 4


def plan(spec: ModelSpec, gpu: Machine, tp: int, *, gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION,
         max_model_len: int | None = None, kv_cache_dtype: str = "auto", block_size: int = BLOCK_SIZE,
         model_ref: str | None = None) -> VllmPlan:
    if not 0 < gpu_memory_utilization <= 1:
        raise VllmPlanError(f"--gpu-memory-utilization {gpu_memory_utilization}: must be in (0, 1]")
    if spec.n_head % tp:
        raise VllmPlanError(f"{spec.name} has {spec.n_head} attention heads, which {tp} GPUs cannot split evenly "
                            "(vLLM needs num_attention_heads % tensor_parallel_size == 0)")
    kv_key = kv_cache_dtype.lower()
    if kv_key not in ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2"):
        raise VllmPlanError(f"--kv-cache-dtype {kv_cache_dtype!r}: expected auto, fp8, fp8_e4m3 or fp8_e5m2")
    dtype_size = 1 if kv_key.startswith("fp8") else 2
    max_len = max_model_len or spec.n_ctx_train or 4096
    notes: list[str] = []
    total, how = checkpoint_bytes(spec)
    notes.append(f"weights from {how}, split over {tp} GPU(s) (tensor parallel)")
    if spec.checkpoint:
        c = spec.checkpoint
        notes.append(f"{c['scheme']} ({c['format']}): the linears stay packed on the GPU at "
                     f"{c['quantized_bits_per_weight']:.2f} bits per weight with their scales")
    per_gpu = total // tp
    act = activation_bytes(spec, tp)
    overhead = NON_TORCH_BYTES + CUDA_GRAPH_BYTES
    notes.append(f"activations (~{act / GiB:.2f} GiB) and runtime overhead ({overhead / GiB:.1f} GiB) are estimates; "
                 "vLLM measures them in its profile run")
    budget = int(gpu_memory_utilization * gpu.vram)
    available = budget - per_gpu - act - overhead
    kv_heads = kv_heads_per_gpu(spec.n_head_kv[0], tp)
    if spec.n_head_kv[0] < tp:
        notes.append(f"{spec.n_head_kv[0]} KV heads over {tp} GPUs: vLLM replicates them (1 per GPU)")
    page = page_size_bytes(kv_heads, spec.head_dim_k, dtype_size, block_size)
    blocks = num_blocks(max(available, 0), page, spec.n_layer)
    conc = max_concurrency(blocks, max_len, block_size)
    ref = model_ref or spec.path or spec.name
    cmd = [f"vllm serve {ref}", f"--tensor-parallel-size {tp}" if tp > 1 else "",
           f"--gpu-memory-utilization {gpu_memory_utilization:g}", f"--max-model-len {max_len}",
           f"--kv-cache-dtype {kv_key}" if kv_key != "auto" else ""]
    fits = blocks * block_size >= max_len
    if not fits:
        notes.append(f"one request of {max_len} tokens needs {math.ceil(max_len / block_size)} blocks but only "
                     f"{blocks} fit: vLLM refuses to start; lower --max-model-len to {blocks * block_size} or add GPUs")
    return VllmPlan(spec.name, gpu.name, tp, gpu_memory_utilization, max_len, kv_key, block_size, total, per_gpu, act,
                    overhead, available, page, spec.n_layer, blocks, blocks * block_size, conc, blocks * block_size,
                    " ".join(c for c in cmd if c), fits, notes)


def plan_for(model: str | None, gpu: str, **kw) -> VllmPlan:
    from .catalog import load_spec

    spec = load_spec(model)
    if spec.source == "gguf":
        raise VllmPlanError(f"{model}: vLLM serves Hugging Face checkpoints (bf16, GPTQ, AWQ, compressed-tensors); "
                            "give the HF folder or a preset")
    machine, n = parse_gpu(gpu)
    return plan(spec, machine, n, model_ref=model, **kw)
