"""``fit``: what fits where. For every rung of the quantization ladder: weights, KV cache, compute
buffer and runtime overhead -> total memory; whether it fits a machine and with what headroom; the
generation speed its memory bandwidth allows; and a recommendation with its reasons.

Pure arithmetic over a ``ModelSpec`` (fitmodels.py) and a ``Machine`` (machines.py); nothing is
loaded. Where llama.cpp decides, the numbers follow its source (llama.cpp vendored in
llama-cpp-python 0.3.36):

- weights: the exact per-tensor types of ``recipes.plan_model`` (llama_tensor_get_type) and
  ggml_row_size bytes; on CPU the file is mmap'd, so its tensor data counts once it is touched;
- KV cache: ``llama_kv_cache`` allocates, per layer, ``cells x (row(type_k, n_embd_k_gqa) +
  row(type_v, n_embd_v_gqa))`` and zeroes it (so it is resident at once). Cells = n_ctx rounded up
  to 256 (llama_context); sliding-window layers get ``min(n_ctx, pad256(n_swa + n_ubatch))``
  (llama_kv_cache_iswa);
- compute buffer: ggml-alloc's peak over one ubatch graph of T tokens (see ``graph_bytes``);
  llama.cpp *reserves* the graph with n_kv = every cell and logits for T outputs, but on CPU only
  the pages the real graphs touch become resident: at a full context that is T tokens against all
  cells with logits for the last token only (generation asks for one row of logits). Next to it the
  CPU backend mallocs a work buffer as large as its largest conversion (``cpu_work_bytes``);
- CPU repack (ggml-cpu/repack.cpp): on AVX2/NEON some types (Q4_0, Q4_K, ...) are copied into an
  interleaved anonymous buffer; the mmap'd pages they came from stay resident until the kernel
  needs them back, so peak RSS counts them twice while the requirement counts them once;
- runtime overhead: the Python interpreter + llama-cpp-python import baseline, the loader's fixed
  cost and the tokenizer tables, measured (``python -m llmquant.measure.memprobe``) and documented below.

The prediction is checked against the peak RSS of a real llama-cpp-python process in
tests/test_fit.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES

from ..errors import LlmquantError
from .catalog import ModelSpec
from .machines import GiB, Machine
from ..gguf.recipes import RecipeOptions, ftype_name, in_load_order, parse_ftype, plan_model

Q = GGMLQuantizationType
MiB = 1 << 20


class FitError(LlmquantError):
    def __init__(self, what: object, problem: str):
        self.what = what
        super().__init__(f"{what}: {problem}")


# -- runtime constants (llama.cpp / llama-cpp-python) -------------------------------------------------

CTX_PAD = 256  # llama_context: cparams.n_ctx = GGML_PAD(n_ctx, 256); KV n_kv is padded to 256 too
UBATCH_MAX = 512  # llama-cpp-python: n_ubatch = min(n_batch, 512)
GGUF_ALIGNMENT = 32

# Runtime overhead, measured on this project's reference environment (CPython 3.11, numpy 2,
# llama-cpp-python 0.3.36, x86-64 Linux) with ``python -m llmquant.measure.memprobe --baseline`` and loads
# of SmolLM2-135M and tokenizer-less test models (tests/test_fit.py re-measures the baseline):
RUNTIME_BASELINE = int(42.4 * MiB)  # interpreter + numpy + ``import llama_cpp`` (ggml/llama shared libraries)
LOAD_FIXED = int(7.5 * MiB)  # loader: shared-library pages touched by a load, thread stack, graph metadata
VOCAB_BYTES_PER_TOKEN = 400  # tokenizer: token strings, token<->id maps, BPE merges, piece cache, sampler arrays

# on GPUs: CUDA context + cuBLAS workspace per device (not measured here: an assumption, stated)
GPU_CONTEXT_BYTES = 512 * MiB

KV_TYPES = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "f32": Q.F32, "bf16": Q.BF16}

# the ladder fit walks, smallest first; a GGUF's own type joins it
LADDER = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16")
# quality order of every ftype (higher is better): K-quants above the legacy type of the same bits
QUALITY = ("Q2_K_S", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1",
           "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "BF16", "F16", "F32")

# llama.cpp CPU repack (ggml_repack_get_optimal_repack_type): type -> rows (ne[1]) must be a multiple of
REPACK: dict[str, dict[GGMLQuantizationType, int]] = {
    "avx2": {Q.Q4_0: 8, Q.Q4_K: 8, Q.IQ4_NL: 8, Q.MXFP4: 8},
    "avx512": {Q.Q4_0: 8, Q.Q4_K: 8, Q.IQ4_NL: 8, Q.MXFP4: 8, Q.Q2_K: 8},
    "neon": {Q.Q4_0: 4, Q.Q4_K: 8, Q.Q5_K: 8, Q.Q6_K: 8, Q.IQ4_NL: 4, Q.MXFP4: 4, Q.Q8_0: 4},
    "neon_i8mm": {Q.Q4_0: 4, Q.Q4_K: 8, Q.Q5_K: 8, Q.Q6_K: 8, Q.IQ4_NL: 4, Q.MXFP4: 4, Q.Q8_0: 4},
    "none": {},
}

TASKS = {
    # task -> (preferred rung, floor below which the task visibly suffers)
    "chat": ("Q4_K_M", "Q4_K_M"), "summarise": ("Q4_K_M", "Q4_K_M"), "rag": ("Q4_K_M", "Q4_K_M"),
    "code": ("Q8_0", "Q5_K_M"), "math": ("Q8_0", "Q5_K_M"), "reasoning": ("Q8_0", "Q5_K_M"),
}
TASK_ALIASES = {"summarize": "summarise", "summarisation": "summarise", "summarization": "summarise",
                "coding": "code", "maths": "math", "agent": "reasoning"}


def row_bytes(qtype: GGMLQuantizationType, n: int) -> int:
    """ggml_row_size: bytes of ``n`` values of ``qtype``."""
    block, size = GGML_QUANT_SIZES[qtype]
    return n // block * size


def pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def tensor_bytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return row_bytes(qtype, shape[0]) * n


# -- weights ------------------------------------------------------------------------------------------

@dataclass
class Weights:
    """One rung's weights: exact per-tensor types and bytes."""
    ftype: str
    tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]]  # name, shape, type, bytes
    header_bytes: int
    this_file: bool = False  # the GGUF as it is, not a requantization of it

    @property
    def tensor_bytes(self) -> int:
        return sum(t[3] for t in self.tensors)

    @property
    def data_bytes(self) -> int:
        """The mmap'd tensor-data region (each tensor aligned to 32 bytes): what loading touches."""
        return sum(pad(t[3], GGUF_ALIGNMENT) for t in self.tensors)

    @property
    def file_bytes(self) -> int:
        return pad(self.header_bytes, GGUF_ALIGNMENT) + self.data_bytes

    @property
    def n_params(self) -> int:
        n = 0
        for _, shape, _, _ in self.tensors:
            k = 1
            for d in shape:
                k *= d
            n += k
        return n

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.tensor_bytes / max(self.n_params, 1)

    def bytes_where(self, pred) -> int:
        return sum(t[3] for t in self.tensors if pred(t[0]))

    def repacked_bytes(self, isa: str) -> int:
        """Bytes llama.cpp's CPU backend copies into a repacked buffer (matmul weights only)."""
        rules = REPACK.get(isa, {})
        total = 0
        for name, shape, qtype, nbytes in self.tensors:
            rows = rules.get(qtype)
            if rows and len(shape) >= 2 and shape[1] % rows == 0 and name not in ("token_embd.weight",):
                total += nbytes
        return total


def rung_weights(spec: ModelSpec, ftype: str) -> Weights:
    """The weights of ``spec`` quantized to ``ftype`` (or as they are, for a GGUF's own type)."""
    if spec.source == "gguf" and spec.file_type and ftype == spec.file_type:
        tensors = [(n, s, t, tensor_bytes(s, t)) for n, s, t in spec.tensors]
        return Weights(ftype, tensors, spec.header_bytes, this_file=True)
    plans = plan_model(spec.tensors, spec.arch, spec.hparams(), parse_ftype(ftype),
                       RecipeOptions(allow_requantize=True), dry_run=True)
    # the table as quantize writes it: its order decides the alignment padding between tensors
    tensors = [(p.name, p.shape, p.type, tensor_bytes(p.shape, p.type)) for p in in_load_order(plans)]
    return Weights(ftype_name(parse_ftype(ftype)), tensors, spec.header_bytes)


def is_layer_tensor(name: str, il: int | None = None) -> bool:
    if il is None:
        return name.startswith("blk.")
    return name.startswith(f"blk.{il}.")


# -- KV cache --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Context:
    """The runtime settings a prediction is for."""
    n_ctx: int  # as asked
    kv_type: str = "f16"
    n_batch: int = 512
    flash_attn: bool = False
    ubatch: int = UBATCH_MAX  # n_ubatch as asked (llama-cpp-python: 512)

    @property
    def cells(self) -> int:
        return pad(max(self.n_ctx, 1), CTX_PAD)

    @property
    def n_batch_eff(self) -> int:
        return min(self.n_ctx, self.n_batch)  # llama-cpp-python: n_batch = min(n_ctx, n_batch)

    @property
    def n_ubatch(self) -> int:
        return min(self.n_batch_eff, self.ubatch, self.cells)

    @property
    def kv_qtype(self) -> GGMLQuantizationType:
        return KV_TYPES[self.kv_type]


def swa_cells(spec: ModelSpec, ctx: Context) -> int:
    """llama_kv_cache_iswa: the sliding-window layers' cache size."""
    return min(ctx.cells, pad(spec.n_swa + ctx.n_ubatch, CTX_PAD))


def layer_cells(spec: ModelSpec, ctx: Context, il: int) -> int:
    return swa_cells(spec, ctx) if spec.is_swa(il) else ctx.cells


def kv_layer_bytes(spec: ModelSpec, ctx: Context, il: int) -> int:
    t = ctx.kv_qtype
    cells = layer_cells(spec, ctx, il)
    return cells * (row_bytes(t, spec.n_embd_k_gqa(il)) + row_bytes(t, spec.n_embd_v_gqa(il)))


def kv_bytes(spec: ModelSpec, ctx: Context, layers: Iterable[int] | None = None) -> int:
    return sum(kv_layer_bytes(spec, ctx, il) for il in (range(spec.n_layer) if layers is None else layers))


def kv_formula(spec: ModelSpec, ctx: Context) -> str:
    t = ctx.kv_qtype
    per = row_bytes(t, 1024 * 32) / (1024 * 32)
    kinds = []
    n_swa = sum(spec.swa_layers)
    full = spec.n_layer - n_swa
    if full:
        kinds.append(f"2 x {full} layers x {ctx.cells} cells x {spec.n_embd_k_gqa(0)} x {per:g} B")
    if n_swa:
        kinds.append(f"2 x {n_swa} sliding layers x {swa_cells(spec, ctx)} cells x {spec.n_embd_k_gqa(0)} x {per:g} B")
    return " + ".join(kinds)


# -- compute buffer ------------------------------------------------------------------------------------

def graph_bytes(spec: ModelSpec, *, n_tokens: int, n_kv: int, n_kv_swa: int, n_outputs: int,
                flash_attn: bool) -> int:
    """Peak bytes ggml-alloc needs for one ubatch graph: the largest of three moments.

    With E = 4 n_embd T and F = 4 n_ff T (f32 activations of T tokens) and the KQ masks (f32, or f16
    with flash attention, n_kv x T per attention kind), which are graph inputs live until the last layer:

    - attention: KQ scores (f32, n_head x n_kv x T; none with flash attention) + masks + 6 E
      (residual, normed input, Q, K, V, attention output);
    - feed-forward: gate, up and their product (3 F) + masks + 4 E;
    - output: logits (f32, n_vocab x outputs) + 3 E.

    The multiples of E and F were read off llama.cpp's own reservations over 105 configurations
    (SmolLM2 and four test models, n_ctx 256-8192, n_ubatch 32-1024, f16/q8_0/q4_0 caches): every
    one is within 5% (tests/test_fit.py compares against llama.cpp for the default model).
    """
    T = n_tokens
    E = 4 * spec.n_embd * T
    F = 4 * spec.n_ff * T
    n_swa_layers = sum(spec.swa_layers)
    kinds = [n_kv] if n_swa_layers < spec.n_layer else []
    if n_swa_layers:
        kinds.append(n_kv_swa)
    mask_elt = 2 if flash_attn else 4
    masks = sum(mask_elt * k * T for k in kinds)
    kq = 0 if flash_attn else 4 * spec.n_head * max(kinds) * T
    attention = kq + masks + 6 * E
    ffn = 3 * F + masks + 4 * E
    output = 4 * spec.n_vocab * n_outputs + 3 * E
    return max(attention, ffn, output)


def cpu_work_bytes(spec: ModelSpec, *, n_tokens: int, n_kv: int, flash_attn: bool) -> int:
    """The CPU backend's work buffer (ggml_graph_plan's work_size, malloc'd next to the compute buffer
    and grown to the largest op): without flash attention the softmaxed KQ (n_head x n_kv x T) is
    converted to f16 for the product with V; otherwise the activations a quantized matmul converts to
    8 bits (about T x n_ff bytes) dominate."""
    T = n_tokens
    act = T * max(spec.n_ff, spec.n_embd) * 34 // 32
    return act if flash_attn else max(act, 2 * spec.n_head * n_kv * T)


def compute_reserved(spec: ModelSpec, ctx: Context) -> int:
    """What llama.cpp reserves (and prints as "compute buffer size"); GPUs allocate all of it."""
    T = ctx.n_ubatch
    return graph_bytes(spec, n_tokens=T, n_kv=ctx.cells, n_kv_swa=swa_cells(spec, ctx),
                       n_outputs=min(T, ctx.n_batch_eff), flash_attn=ctx.flash_attn)


def compute_touched(spec: ModelSpec, ctx: Context, prompt_tokens: int | None = None, gen_tokens: int = 0) -> int:
    """The part of the compute buffer a CPU process touches (= becomes resident) while it evaluates a
    prompt of ``prompt_tokens`` (None: one that fills the context, the worst case) in ubatches and
    then generates ``gen_tokens`` one at a time, with logits for the last token of each ubatch: the
    largest graph's share of the compute buffer plus the largest CPU work buffer (both high-water marks)."""
    cells = ctx.cells
    P = cells if prompt_tokens is None else min(prompt_tokens, cells)
    u = ctx.n_ubatch
    s_cells = swa_cells(spec, ctx)

    def at(T: int, end: int) -> tuple[int, int]:
        n_kv = min(cells, max(CTX_PAD, pad(end, CTX_PAD)))
        graph = graph_bytes(spec, n_tokens=T, n_kv=n_kv, n_kv_swa=min(s_cells, n_kv), n_outputs=1,
                            flash_attn=ctx.flash_attn)
        return graph, cpu_work_bytes(spec, n_tokens=T, n_kv=n_kv, flash_attn=ctx.flash_attn)

    peaks = [(0, 0)]
    if P:
        # llama-cpp-python cuts the prompt into n_batch chunks, llama.cpp each chunk into ubatches
        starts = []
        for c0 in range(0, P, ctx.n_batch_eff):
            c1 = min(P, c0 + ctx.n_batch_eff)
            starts += [(s, min(c1, s + u)) for s in range(c0, c1, u)]
        # the peak is at the longest ubatch against the most cells: the last one of each length
        last_by_len: dict[int, int] = {}
        for s, e in starts:
            last_by_len[e - s] = e
        peaks += [at(T, e) for T, e in last_by_len.items()]
    if gen_tokens:
        peaks.append(at(1, min(cells, P + gen_tokens)))
    return max(g for g, _ in peaks) + max(w for _, w in peaks)


def output_bytes(spec: ModelSpec) -> int:
    """llama_context::output_reserve(n_seq_max=1): one row of f32 logits."""
    return 4 * spec.n_vocab


def runtime_overhead(spec: ModelSpec) -> int:
    return RUNTIME_BASELINE + LOAD_FIXED + VOCAB_BYTES_PER_TOKEN * spec.n_vocab


# -- one rung on the CPU -----------------------------------------------------------------------------------

@dataclass
class Memory:
    """Where the bytes of one running model go (CPU backend, llama-cpp-python)."""
    weights: int  # mmap'd tensor data
    kv: int
    compute: int  # resident part of the compute buffer
    compute_reserved: int  # what llama.cpp reserves (virtual on CPU)
    output: int
    overhead: int
    repacked: int  # repacked copies (anonymous); their file pages stay resident but are reclaimable

    @property
    def total(self) -> int:
        """What the process needs: every byte of weights once, KV, compute, output, overhead."""
        return self.weights + self.kv + self.compute + self.output + self.overhead

    @property
    def peak_rss(self) -> int:
        """What ps/top show when memory is plentiful: total plus the repacked tensors' file pages."""
        return self.total + self.repacked

    def to_dict(self) -> dict:
        return {"weights_bytes": self.weights, "kv_bytes": self.kv, "compute_bytes": self.compute,
                "compute_reserved_bytes": self.compute_reserved, "output_bytes": self.output,
                "overhead_bytes": self.overhead, "repacked_bytes": self.repacked,
                "total_bytes": self.total, "peak_rss_bytes": self.peak_rss}


def cpu_memory(spec: ModelSpec, weights: Weights, ctx: Context, *, isa: str = "none",
               prompt_tokens: int | None = None, gen_tokens: int = 0) -> Memory:
    """Memory of a llama-cpp-python process on the CPU backend. ``prompt_tokens=None`` is the worst
    case of a full context; a number predicts a concrete run (what the validation test measures)."""
    return Memory(
        weights=weights.data_bytes, kv=kv_bytes(spec, ctx),
        compute=compute_touched(spec, ctx, prompt_tokens, gen_tokens),
        compute_reserved=compute_reserved(spec, ctx), output=output_bytes(spec),
        overhead=runtime_overhead(spec), repacked=weights.repacked_bytes(isa),
    )


# -- speed -------------------------------------------------------------------------------------------------

def bytes_per_token(spec: ModelSpec, weights: Weights) -> int:
    """Weight bytes one generated token reads: every matrix once; of the token embedding only a row,
    unless it is tied and doubles as the output matrix."""
    if spec.tied:
        return weights.tensor_bytes
    return weights.tensor_bytes - weights.bytes_where(lambda n: n == "token_embd.weight")


def tok_per_s(bytes_read: float, bandwidth_gbs: float) -> float:
    return bandwidth_gbs * 1e9 / max(bytes_read, 1)


# -- placement on a machine ---------------------------------------------------------------------------

def os_reserve(ram: int) -> int:
    """What to leave to the OS and other programs: an eighth of RAM, at least 1.5 GiB."""
    return max(ram // 8, int(1.5 * GiB))


def usable_memory(machine: Machine) -> int:
    """Bytes a model may use: free memory (this machine), the Metal working-set limit (Apple: about
    2/3 of RAM up to 36 GiB, 3/4 above), or RAM minus the OS reserve."""
    if machine.available is not None:
        return machine.available
    if machine.kind == "apple":
        return machine.ram * 2 // 3 if machine.ram <= 36 * GiB else machine.ram * 3 // 4
    return machine.ram - os_reserve(machine.ram)


@dataclass
class Rung:
    ftype: str
    weights: Weights
    memory: Memory  # the CPU-backend breakdown (the one validated against measured RSS)
    placement: str  # "cpu" | "apple" | "gpu" | "gpu+cpu" | "none" (does not fit)
    compute: int  # compute buffer as counted for this placement (CPU: resident part; GPU/Metal: reserved)
    total: int  # every byte the running model needs, wherever it sits
    need: int  # bytes counted against ``usable`` on the tightest device
    usable: int
    fits: bool
    headroom: int
    gpu_layers: int | None  # llama.cpp --gpu-layers (n_layer + 1 = every layer and the output)
    host_need: int | None  # RAM next to a GPU
    vram_need: int | None
    tok_s: float  # bandwidth bound, short context
    tok_s_full_ctx: float  # bandwidth bound, context full (the KV cache is read too)
    bytes_per_token: int
    max_ctx: int  # the largest context (up to the trained one) that still fits this way, 0 if none

    @property
    def tight(self) -> bool:
        return self.fits and self.headroom < margin(self.usable)

    def to_dict(self) -> dict:
        w, m = self.weights, self.memory
        return {
            "ftype": self.ftype, "this_file": w.this_file, "bits_per_weight": round(w.bits_per_weight, 3),
            "tensor_bytes": w.tensor_bytes, "file_bytes": w.file_bytes,
            "weights_bytes": m.weights, "kv_bytes": m.kv, "compute_bytes": self.compute, "output_bytes": m.output,
            "overhead_bytes": m.overhead, "total_bytes": self.total,
            "cpu": {"compute_resident_bytes": m.compute, "compute_reserved_bytes": m.compute_reserved,
                    "repacked_bytes": m.repacked, "total_bytes": m.total, "peak_rss_bytes": m.peak_rss},
            "placement": self.placement, "gpu_layers": self.gpu_layers, "vram_bytes": self.vram_need,
            "ram_bytes": self.host_need, "need_bytes": self.need, "usable_bytes": self.usable,
            "fits": self.fits, "tight": self.tight, "headroom_bytes": self.headroom,
            "bytes_per_token": self.bytes_per_token, "tok_s": round(self.tok_s, 1),
            "tok_s_full_ctx": round(self.tok_s_full_ctx, 1), "max_ctx": self.max_ctx,
        }


def _gpu_offload(spec: ModelSpec, w: Weights, ctx: Context, machine: Machine, mem: Memory):
    """(gpu_layers, vram_need, host_need, bytes_gpu, bytes_cpu) of the best offload on CUDA GPUs."""
    vram_total = machine.vram * machine.gpus
    gpu_fixed = GPU_CONTEXT_BYTES * machine.gpus + compute_reserved(spec, ctx)
    embd = w.bytes_where(lambda n: n == "token_embd.weight")
    out = w.bytes_where(lambda n: n == "output.weight") if not spec.tied else embd  # tied: output is a copy
    nonlayer = w.bytes_where(lambda n: not n.startswith("blk.") and n not in ("token_embd.weight", "output.weight"))
    layer_w = [w.bytes_where(lambda n, il=il: is_layer_tensor(n, il)) for il in range(spec.n_layer)]
    layer_kv = [kv_layer_bytes(spec, ctx, il) for il in range(spec.n_layer)]
    host_base = mem.overhead + embd + mem.output
    reads_embd = embd if spec.tied else 0

    def plan(n: int):
        # llama.cpp offloads the last n layers; n = n_layer + 1 adds the output layer
        gpu_layers = range(spec.n_layer - min(n, spec.n_layer), spec.n_layer)
        on_gpu = set(gpu_layers)
        out_gpu = n > spec.n_layer
        vram = gpu_fixed + sum(layer_w[i] + layer_kv[i] for i in on_gpu) + (out + nonlayer if out_gpu else 0)
        cpu_layers = [i for i in range(spec.n_layer) if i not in on_gpu]
        host = host_base + sum(layer_w[i] + layer_kv[i] for i in cpu_layers) + (0 if out_gpu else out + nonlayer)
        if cpu_layers:  # the CPU backend needs its own compute buffer for its part of the graph
            host += compute_reserved(spec, ctx)
        b_gpu = sum(layer_w[i] for i in on_gpu) + (out if out_gpu else 0)
        b_cpu = sum(layer_w[i] for i in cpu_layers) + (0 if out_gpu else (out if not spec.tied else 0)) + \
            (reads_embd if not out_gpu else 0)
        return n, vram, host, b_gpu, b_cpu

    for n in range(spec.n_layer + 1, -1, -1):
        p = plan(n)
        if p[1] <= vram_total:
            return p
    return plan(0)


def place(spec: ModelSpec, w: Weights, ctx: Context, machine: Machine) -> Rung:
    """How rung ``w`` sits on ``machine``: placement, the memory it needs there, speed, max context."""
    mem = cpu_memory(spec, w, ctx, isa=machine.isa if machine.kind == "cpu" else "none")
    kv_full = kv_bytes(spec, ctx)
    bpt = bytes_per_token(spec, w)
    usable = usable_memory(machine)
    gpu_layers = host_need = vram_need = None
    if machine.kind in ("cpu", "apple"):
        # Metal allocates the whole reserved compute buffer; the CPU only touches part of it
        compute = mem.compute if machine.kind == "cpu" else compute_reserved(spec, ctx)
        need = total = host_need = mem.weights + mem.kv + compute + mem.output + mem.overhead
        placement = machine.kind
        tok, tok_full = tok_per_s(bpt, machine.bandwidth), tok_per_s(bpt + kv_full, machine.bandwidth)
        fits = need <= usable
    else:
        vram_usable = machine.vram * machine.gpus
        n, vram, host, b_gpu, b_cpu = _gpu_offload(spec, w, ctx, machine, mem)
        gpu_layers, vram_need, host_need = n, vram, host
        compute = compute_reserved(spec, ctx)
        total = vram + host
        fits = vram <= vram_usable and host <= usable
        placement = "gpu" if n == spec.n_layer + 1 else "gpu+cpu" if n > 0 else "cpu"
        t = b_gpu / (machine.gpu_bandwidth * 1e9) + b_cpu / (machine.bandwidth * 1e9)
        kv_gpu = sum(kv_layer_bytes(spec, ctx, il) for il in range(spec.n_layer - min(n, spec.n_layer), spec.n_layer))
        t_full = t + kv_gpu / (machine.gpu_bandwidth * 1e9) + (kv_full - kv_gpu) / (machine.bandwidth * 1e9)
        tok, tok_full = 1 / max(t, 1e-12), 1 / max(t_full, 1e-12)
        # headroom is reported where it is smallest
        need, usable = (vram, vram_usable) if vram_usable - vram <= usable - host else (host, usable)
    if not fits:
        placement = "none"
    rung = Rung(w.ftype, w, mem, placement, compute, total, need, usable, fits, usable - need, gpu_layers,
                host_need, vram_need, tok, tok_full, bpt, 0)
    rung.max_ctx = max_context(spec, w, ctx, machine, whole=placement != "gpu+cpu")
    return rung


def _fits_at(spec: ModelSpec, w: Weights, ctx: Context, machine: Machine, whole: bool = True) -> bool:
    usable = usable_memory(machine)
    if machine.kind == "cpu":
        return cpu_memory(spec, w, ctx).total <= usable
    if machine.kind == "apple":
        mem = cpu_memory(spec, w, ctx)
        return mem.weights + mem.kv + compute_reserved(spec, ctx) + mem.output + mem.overhead <= usable
    mem = cpu_memory(spec, w, ctx)
    n, vram, host, _, _ = _gpu_offload(spec, w, ctx, machine, mem)
    return (n == spec.n_layer + 1 or not whole) and vram <= machine.vram * machine.gpus and host <= usable


def max_context(spec: ModelSpec, w: Weights, ctx: Context, machine: Machine, whole: bool = True) -> int:
    """The largest context (multiple of 256, up to the trained context or 1M) that fits; with
    ``whole``, entirely on the machine's fastest memory. 0 if not even 256 tokens do."""
    hi_limit = spec.n_ctx_train or (1 << 20)
    lo, hi = 0, hi_limit // CTX_PAD
    if not _fits_at(spec, w, replace(ctx, n_ctx=CTX_PAD), machine, whole):
        return 0
    if _fits_at(spec, w, replace(ctx, n_ctx=hi * CTX_PAD), machine, whole):
        return hi * CTX_PAD
    lo = 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _fits_at(spec, w, replace(ctx, n_ctx=mid * CTX_PAD), machine, whole):
            lo = mid
        else:
            hi = mid
    return lo * CTX_PAD


# -- recommendation (the seeds' decision rules) ----------------------------------------------------------

def quality(ftype: str) -> int:
    return QUALITY.index(ftype) if ftype in QUALITY else -1


def margin(usable: int) -> int:
    """Headroom below which a fit is called tight: 5% of usable memory, at least 256 MiB."""
    return max(256 * MiB, usable // 20)


@dataclass
class Recommendation:
    ftype: str | None
    gpu_layers: int | None
    reasons: list[str]
    verdict: str

    def to_dict(self) -> dict:
        return {"ftype": self.ftype, "gpu_layers": self.gpu_layers, "reasons": self.reasons, "verdict": self.verdict}


def small_model_floor(n_params: int) -> tuple[str | None, str]:
    """Small models lose proportionally more at low bits: the rung they should not go below."""
    if n_params < 1e9:
        return "Q8_0", (f"at {n_params / 1e6:.0f}M parameters it is a small model, and small models lose "
                        "proportionally more at low bits, so Q8_0")
    if n_params < 3e9:
        return "Q5_K_M", (f"at {n_params / 1e9:.1f}B parameters it is a small model, and small models lose "
                          "proportionally more at low bits, so at least Q5_K_M")
    return None, ""


_WHERE = {"cpu": "in RAM", "apple": "in unified memory (Metal)", "gpu": "entirely in VRAM"}


def recommend(spec: ModelSpec, rungs: list[Rung], machine: Machine, ctx: Context, task: str) -> Recommendation:
    """The seeds' rules: the largest-quality rung that leaves headroom for the context, capped at what
    the task needs (chat, summaries, RAG: Q4_K_M; code, maths, multi-step reasoning: Q8_0, not below
    Q5_K_M), raised for small models, and a partial GPU offload when VRAM is short."""
    preferred, floor = TASKS[task]
    if task in ("code", "math", "reasoning"):
        reasons = [f"for {task}, multi-step work compounds small errors: prefer Q8_0 and stay at or above {floor}"]
    else:
        reasons = [f"for {task}, Q4_K_M keeps nearly all the quality and is the fastest good rung"]
    bump, why = small_model_floor(spec.n_params)
    if bump and quality(bump) > quality(preferred):
        preferred = bump
        floor = bump if quality(bump) > quality(floor) else floor
        reasons.append(why)
    whole = [r for r in rungs if r.fits and r.placement in _WHERE]
    roomy = [r for r in whole if r.headroom >= margin(r.usable)]
    partial = [r for r in rungs if r.fits and r.placement == "gpu+cpu"]
    by_name = {r.ftype: r for r in rungs}
    target = by_name.get(preferred)
    def best(pool: list[Rung]) -> Rung | None:
        under = [r for r in pool if quality(r.ftype) <= quality(preferred)]
        if under:
            return max(under, key=lambda r: quality(r.ftype))
        return min(pool, key=lambda r: quality(r.ftype)) if pool else None

    pick = best(roomy or whole)
    tight_pick = best(whole)
    if pick is not None and tight_pick is not None and quality(pick.ftype) < quality("Q3_K_M") <= quality(tight_pick.ftype):
        pick = tight_pick  # a tight fit beats falling off the low-bit cliff
    if pick is not None and pick.ftype == preferred:
        bigger = [r.ftype for r in roomy if quality(r.ftype) > quality(pick.ftype)]
        if bigger and task not in ("code", "math", "reasoning"):
            reasons.append(f"{', '.join(bigger)} also fit{'s' if len(bigger) == 1 else ''} but would cost speed for "
                           f"little gain at {task}")
    elif pick is not None:
        if target is not None and target.fits:
            reasons.append(f"{preferred} would fit but leave only {_gib(target.headroom)}, too little to be safe")
        elif target is not None:
            short = f"{preferred} needs {_gib(target.need)} against {_gib(target.usable)} usable"
            if target.max_ctx:
                short += f" (it fits with a context of up to {target.max_ctx} tokens)"
            reasons.append(short)
        reasons.append(f"{pick.ftype} is the largest-quality rung that leaves headroom for the context "
                       f"({_gib(pick.headroom)} spare {_WHERE[pick.placement]})")
        if quality(pick.ftype) < quality(floor):
            reasons.append(f"{pick.ftype} is below {floor}, where {task} quality visibly drops: a shorter context, "
                           "a q8_0 KV cache or a smaller model would do better")
        if quality(pick.ftype) < quality("Q3_K_M"):
            reasons.append("below Q3_K_M quality falls off a cliff; a smaller model at Q4_K_M usually beats it")
    if pick is not None and pick not in roomy:
        reasons.append(f"it is tight: only {_gib(pick.headroom)} would be left for everything else")
    if machine.kind == "gpu" and partial and (pick is None or quality(pick.ftype) < quality(floor)):
        # VRAM is short: a partial offload of the task's rung beats a full offload below the floor
        cand = [r for r in partial if quality(r.ftype) <= quality(preferred)]
        if cand:
            p = max(cand, key=lambda r: quality(r.ftype))
            if pick is None or quality(p.ftype) > quality(pick.ftype):
                reasons.append(f"VRAM is short for {p.ftype}: offload {p.gpu_layers} of {spec.n_layer} layers "
                               f"(--gpu-layers {p.gpu_layers}) and keep the rest in RAM, at about "
                               f"{p.tok_s:.0f} tok/s" + (f" instead of {pick.tok_s:.0f} with {pick.ftype}" if pick else ""))
                pick = p
    if pick is None:
        smallest = min(rungs, key=lambda r: r.need - r.usable)
        verdict = (f"Nothing fits on {machine.label} at {ctx.n_ctx} tokens of context: even {smallest.ftype} needs "
                   f"{_gib(smallest.need)} against {_gib(smallest.usable)} usable.")
        if smallest.max_ctx:
            verdict += f" {smallest.ftype} would fit with a context of {smallest.max_ctx} tokens."
        verdict += " Use a smaller model or a machine with more memory."
        return Recommendation(None, None, reasons, verdict)
    return Recommendation(pick.ftype, pick.gpu_layers if pick.placement == "gpu+cpu" else None, reasons,
                          _verdict(pick, machine, ctx, task, reasons))


def _gib(n: float) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / MiB:.0f} MiB"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _verdict(r: Rung, machine: Machine, ctx: Context, task: str, reasons: list[str]) -> str:
    if r.placement == "gpu+cpu":
        where = (f"split between GPU and CPU (--gpu-layers {r.gpu_layers}): {_gib(r.vram_need or 0)} of VRAM and "
                 f"{_gib(r.host_need or 0)} of RAM")
    elif r.placement == "gpu":
        where = f"entirely in VRAM: {_gib(r.need)} ({_gib(r.host_need or 0)} of RAM besides)"
    else:
        where = f"{_WHERE[r.placement]}: {_gib(r.need)}"
    s = (f"Use {r.ftype} for {task} on {machine.label}. It runs {where} for {_gib(r.weights.tensor_bytes)} of "
         f"weights and {_gib(r.memory.kv)} of KV cache at {ctx.n_ctx} tokens, leaving {_gib(r.headroom)}; "
         f"memory bandwidth allows at most ~{r.tok_s:.0f} tok/s (~{r.tok_s_full_ctx:.0f} with the context full).")
    if r.max_ctx and r.max_ctx > ctx.n_ctx:
        s += f" The context could grow to {r.max_ctx} tokens."
    return s + " " + " ".join(_sentence(x) for x in reasons)


# -- the whole report ---------------------------------------------------------------------------------------

@dataclass
class FitReport:
    spec: ModelSpec
    machine: Machine
    ctx: Context
    task: str
    rungs: list[Rung]
    recommendation: Recommendation
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        c = self.ctx
        return {
            "schema": "llmquant.fit/1",
            "model": self.spec.to_dict(),
            "settings": {"n_ctx": c.n_ctx, "kv_cells": c.cells, "kv_type": c.kv_type, "n_batch": c.n_batch_eff,
                         "n_ubatch": c.n_ubatch, "flash_attn": c.flash_attn, "task": self.task},
            "machine": {**self.machine.to_dict(), "usable_bytes": usable_memory(self.machine)},
            "rungs": [r.to_dict() for r in self.rungs],
            "recommendation": self.recommendation.to_dict(),
            "warnings": self.warnings,
            "notes": self.spec.notes,
        }


def normalize_task(task: str) -> str:
    key = task.strip().lower()
    key = TASK_ALIASES.get(key, key)
    if key not in TASKS:
        raise FitError(f"task {task!r}", f"expected one of: {', '.join(TASKS)}")
    return key


def fit(spec: ModelSpec, machine: Machine, *, n_ctx: int | None = None, kv_type: str = "f16",
        n_batch: int = 512, task: str = "chat", ladder: Iterable[str] = LADDER) -> FitReport:
    """Every rung of ``ladder`` (plus a GGUF's own type) of ``spec`` on ``machine`` at ``n_ctx``."""
    warnings: list[str] = []
    task = normalize_task(task)
    kv_key = kv_type.strip().lower()
    if kv_key not in ("f16", "q8_0", "q4_0"):
        raise FitError(f"--kv-type {kv_type!r}", "expected f16, q8_0 or q4_0")
    if n_ctx is None:
        n_ctx = min(spec.n_ctx_train or 4096, 4096)
    if n_ctx < 1 or n_ctx > 1 << 24:
        raise FitError(f"--ctx {n_ctx}", "context must be between 1 and 16,777,216 tokens")
    if n_batch < 1 or n_batch > 1 << 16:
        raise FitError(f"--batch {n_batch}", "batch must be between 1 and 65,536 tokens")
    if spec.n_ctx_train and n_ctx > spec.n_ctx_train:
        warnings.append(f"--ctx {n_ctx} is beyond the {spec.n_ctx_train} tokens {spec.name} was trained on: "
                        "llama.cpp will run it, but quality degrades past the trained context (computed anyway)")
    if kv_key != "f16":
        for il in range(spec.n_layer):
            if spec.n_embd_k_gqa(il) % 32 or spec.n_embd_v_gqa(il) % 32:
                raise FitError(f"--kv-type {kv_key}", f"layer {il}'s K/V width {spec.n_embd_k_gqa(il)} is not a "
                                                      "multiple of 32, which a quantized cache needs")
    # quantized V needs flash attention; llama.cpp's GPU backends turn it on by default ("auto")
    flash = kv_key != "f16" or machine.kind in ("apple", "gpu")
    ctx = Context(n_ctx, kv_key, n_batch, flash)
    if pad(n_ctx, CTX_PAD) != n_ctx:
        warnings.append(f"llama.cpp rounds the context up to {ctx.cells} cells; sizes are for {ctx.cells}")
    names = list(dict.fromkeys(ftype_name(parse_ftype(f)) for f in ladder))
    if spec.source == "gguf" and spec.file_type and spec.file_type not in names:
        names.append(spec.file_type)
    names.sort(key=quality)
    rungs = []
    for name in names:
        w = rung_weights(spec, name)
        rungs.append(place(spec, w, ctx, machine))
    rec = recommend(spec, rungs, machine, ctx, task)
    if spec.source == "gguf" and spec.file_type and quality(spec.file_type) >= 0:
        src_q = quality(spec.file_type)
        above = [r.ftype for r in rungs if quality(r.ftype) > src_q and not r.weights.this_file]
        if above and src_q < quality("F16"):
            warnings.append(f"the source is {spec.file_type}: rungs above it ({', '.join(above)}) are sized exactly "
                            "but cannot recover quality the source already lost")
    if machine.kind == "cpu":
        rep = [r for r in rungs if r.memory.repacked]
        if rep:
            warnings.append(f"on {machine.isa.upper()} CPUs llama.cpp repacks " + ", ".join(
                f"{_gib(r.memory.repacked)} of {r.ftype}" for r in rep) + " into an interleaved copy; the file pages "
                "it came from stay in RSS until memory is needed (peak_rss_bytes), the requirement counts them once")
    return FitReport(spec, machine, ctx, task, rungs, rec, warnings)


def gpu_layers_that_fit(spec: ModelSpec, machine: Machine, *, n_ctx: int | None = None, kv_type: str = "f16",
                        n_batch: int = 512, ftype: str | None = None) -> int:
    """llama.cpp's ``--gpu-layers`` for ``spec`` (its own type, or ``ftype``) on ``machine``, as ``fit``
    plans it: 0 on a CPU-only machine; every layer and the output (n_layer + 1) on Apple silicon, whose
    GPU shares the memory; on CUDA GPUs the most layers whose weights, KV cache and compute buffer fit
    in VRAM (``_gpu_offload``). This is what ``-ngl auto`` asks llama.cpp for."""
    if machine.kind == "cpu":
        return 0
    if machine.kind == "apple":
        return spec.n_layer + 1
    name = ftype_name(parse_ftype(ftype or spec.file_type or "F16"))
    report = fit(spec, machine, n_ctx=n_ctx, kv_type=kv_type, n_batch=n_batch, ladder=[name])
    rung = next(r for r in report.rungs if r.ftype == name)
    return int(rung.gpu_layers or 0)


def resolve_machine(machine: str | None = None, ram: str | None = None, vram: str | None = None) -> Machine:
    """``--machine NAME`` (catalog or ``this``), or ``--ram SIZE [--vram SIZE]``; default ``this``."""
    from .machines import custom_machine, find_machine, parse_size

    if machine is not None and (ram is not None or vram is not None):
        raise FitError("--machine", "give either --machine or --ram/--vram, not both")
    if vram is not None and ram is None:
        raise FitError("--vram", "needs --ram too (the host memory next to the GPU)")
    if ram is not None:
        return custom_machine(parse_size(ram, what="--ram"), parse_size(vram, what="--vram") if vram else None)
    return find_machine(machine or "this")


def fit_for(model: str | None = None, *, machine: str | None = None, ram: str | None = None,
            vram: str | None = None, n_ctx: int | None = None, kv_type: str = "f16", n_batch: int = 512,
            task: str = "chat") -> FitReport:
    """``llmquant fit`` as a function: resolve MODEL (GGUF, HF folder, preset or size) and the machine,
    then size every rung."""
    from .catalog import load_spec

    mach = resolve_machine(machine, ram, vram)
    return fit(load_spec(model), mach, n_ctx=n_ctx, kv_type=kv_type, n_batch=n_batch, task=task)


# -- serving: what one loaded model costs (the server's memory budget) -------------------------------------

def serving_bytes(path: str, *, n_ctx: int, parallel: int = 1, n_batch: int = 512) -> int:
    """Memory a server needs to hold the GGUF at ``path`` with ``parallel`` slots of ``n_ctx`` each:
    the weights once (memory-mapped, shared by the slots) plus, per slot, its KV cache, compute and
    output buffers and runtime overhead (each slot is its own llama.cpp context)."""
    from .catalog import spec_from_gguf

    spec = spec_from_gguf(path)
    w = Weights(spec.file_type or "?", [(n, s, t, tensor_bytes(s, t)) for n, s, t in spec.tensors],
                spec.header_bytes, this_file=True)
    mem = cpu_memory(spec, w, Context(n_ctx, "f16", min(n_batch, n_ctx)))
    return mem.weights + parallel * (mem.kv + mem.compute + mem.output) + mem.overhead
