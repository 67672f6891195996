"""What ``fit`` knows about a model: hyper-parameters and the tensor list in GGUF naming, from a GGUF
(metadata and tensor table only), a Hugging Face folder (config.json plus safetensors *headers*; no
weight is read) or a size spec resolved against the preset table (``8B``, ``qwen2.5:7b``).

For an HF folder or a preset the tensor list is synthesized the way ``convert_hf_to_gguf.py`` names
and shapes it (ggml order: ``shape[0]`` is the row length), so ``recipes.plan_model`` applies the same
mixture rules it applies to a real file. Per-architecture knowledge is the ``ARCHS`` table; the
presets are the published ``config.json`` values of each model.
"""

from __future__ import annotations

import difflib
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType

from ..errors import LlmquantError

Q = GGMLQuantizationType


class ModelSpecError(LlmquantError):
    """A model argument fit cannot describe (missing config.json, unknown architecture or size, ...)."""

    def __init__(self, what: object, problem: str):
        self.what = what
        self.problem = problem
        super().__init__(f"{what}: {problem}")


# -- per-architecture knowledge (data) -------------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    """How one architecture lays out its tensors and attention (llama.cpp ``src/models/<arch>.cpp``)."""
    gguf: str  # GGUF general.architecture
    qkv_bias: bool = False  # attn_{q,k,v}.bias (qwen2)
    qk_norm: bool = False  # attn_{q,k}_norm.weight of head_dim (gemma3)
    post_norms: bool = False  # post_attention_norm / post_ffw_norm (gemma2, gemma3)
    swa_pattern: int = 0  # llama.cpp set_swa_pattern(n): layer il is sliding iff il % n < n - 1; 0 = none
    swa_default: int = 0  # window when the config does not say


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama"),
    # llama.cpp converts Mistral to the llama architecture and gives it full attention (its
    # sliding_window of 4096 is ignored), so its KV cache is full-size
    "mistral": Arch("llama"),
    "qwen2": Arch("qwen2", qkv_bias=True),
    "gemma2": Arch("gemma2", post_norms=True, swa_pattern=2, swa_default=4096),
    "gemma3": Arch("gemma3", qk_norm=True, post_norms=True, swa_pattern=6, swa_default=1024),
}
# transformers class name -> ARCHS key
HF_CLASSES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
    "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3", "Gemma3ForConditionalGeneration": "gemma3",
}
# GGUF architecture -> ARCHS key, for the SWA layout of a GGUF
_GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "gemma2": "gemma2", "gemma3": "gemma3"}


# -- the description --------------------------------------------------------------------------------

Tensor = tuple[str, tuple[int, ...], GGMLQuantizationType]


@dataclass
class ModelSpec:
    name: str
    source: str  # "gguf" | "hf" | "preset"
    path: str | None
    arch: str  # GGUF architecture name
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: tuple[int, ...]  # per layer
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    tied: bool
    tensors: list[Tensor]
    n_swa: int = 0  # sliding-window size (0: none)
    swa_layers: tuple[bool, ...] = ()  # per layer: is it a sliding-window layer
    file_type: str | None = None  # the GGUF's own ftype ("Q4_1"), None for HF / presets
    header_bytes: int = 0  # GGUF metadata + tensor table (exact for a GGUF, estimated otherwise)
    source_dtype: str = "F16"
    notes: list[str] = field(default_factory=list)
    checkpoint: dict | None = None  # a quantized HF folder: its scheme and sizes (hf.inspect)

    @property
    def n_params(self) -> int:
        total = 0
        for _, shape, _ in self.tensors:
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def n_embd_k_gqa(self, il: int) -> int:
        return self.head_dim_k * self.n_head_kv[il]

    def n_embd_v_gqa(self, il: int) -> int:
        return self.head_dim_v * self.n_head_kv[il]

    def is_swa(self, il: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[il]

    def hparams(self) -> dict[str, int]:
        """What recipes.plan_model needs."""
        return {"n_layer": self.n_layer, "n_head": self.n_head, "n_head_kv": self.n_head_kv[0],
                "n_expert": 0, "n_embd": self.n_embd, "n_layer_nextn": 0}

    def to_dict(self) -> dict:
        kv = sorted(set(self.n_head_kv))
        return {
            "name": self.name, "source": self.source, "path": self.path, "architecture": self.arch,
            "n_params": self.n_params, "n_layer": self.n_layer, "n_embd": self.n_embd, "n_head": self.n_head,
            "n_head_kv": kv[0] if len(kv) == 1 else list(self.n_head_kv),
            "head_dim_k": self.head_dim_k, "head_dim_v": self.head_dim_v, "n_ff": self.n_ff,
            "n_vocab": self.n_vocab, "n_ctx_train": self.n_ctx_train, "tied_embeddings": self.tied,
            "sliding_window": self.n_swa, "n_swa_layers": sum(self.swa_layers),
            "file_type": self.file_type, "source_dtype": self.source_dtype, "checkpoint": self.checkpoint,
        }


def swa_layout(n_layer: int, pattern: int | list | None) -> tuple[bool, ...]:
    """llama_hparams::set_swa_pattern (dense_first=false), or an explicit per-layer list."""
    if isinstance(pattern, (list, tuple)):
        if len(pattern) != n_layer:
            raise ModelSpecError("sliding_window_pattern", f"has {len(pattern)} entries for {n_layer} layers")
        return tuple(bool(x) for x in pattern)
    if not pattern:
        return ()
    return tuple(pattern == 0 or il % pattern < pattern - 1 for il in range(n_layer))


# -- tensor synthesis (convert_hf_to_gguf naming) --------------------------------------------------

def synthesize_tensors(arch: Arch, *, n_layer: int, n_embd: int, n_head: int, n_head_kv: tuple[int, ...],
                       head_dim_k: int, head_dim_v: int, n_ff: int, n_vocab: int, tied: bool,
                       dtype: GGMLQuantizationType, rope_freqs: bool = False) -> list[Tensor]:
    """The tensor table a converted GGUF would have, in its file order. Weights are ``dtype``; 1-D
    tensors (norms, biases) are F32, as convert_hf_to_gguf writes them."""
    f32 = Q.F32
    out: list[Tensor] = [("token_embd.weight", (n_embd, n_vocab), dtype)]
    if rope_freqs:
        out.append(("rope_freqs.weight", (head_dim_k // 2,), f32))
    for i in range(n_layer):
        q, k, v = n_head * head_dim_k, n_head_kv[i] * head_dim_k, n_head_kv[i] * head_dim_v
        b = f"blk.{i}."
        out.append((b + "attn_norm.weight", (n_embd,), f32))
        out += [(b + "attn_q.weight", (n_embd, q), dtype), (b + "attn_k.weight", (n_embd, k), dtype),
                (b + "attn_v.weight", (n_embd, v), dtype)]
        if arch.qkv_bias:
            out += [(b + "attn_q.bias", (q,), f32), (b + "attn_k.bias", (k,), f32), (b + "attn_v.bias", (v,), f32)]
        if arch.qk_norm:
            out += [(b + "attn_q_norm.weight", (head_dim_k,), f32), (b + "attn_k_norm.weight", (head_dim_k,), f32)]
        out.append((b + "attn_output.weight", (n_head * head_dim_v, n_embd), dtype))
        if arch.post_norms:
            out.append((b + "post_attention_norm.weight", (n_embd,), f32))
        out.append((b + "ffn_norm.weight", (n_embd,), f32))
        out += [(b + "ffn_gate.weight", (n_embd, n_ff), dtype), (b + "ffn_up.weight", (n_embd, n_ff), dtype),
                (b + "ffn_down.weight", (n_ff, n_embd), dtype)]
        if arch.post_norms:
            out.append((b + "post_ffw_norm.weight", (n_embd,), f32))
    out.append(("output_norm.weight", (n_embd,), f32))
    if not tied:
        out.append(("output.weight", (n_embd, n_vocab), dtype))
    return out


# GGUF metadata of a converted model besides the tensor table: the tokenizer dominates it (token
# strings, types, merges). Calibrated on SmolLM2 (49152 tokens + 48900 merges: 1,785,664 header bytes).
HEADER_BYTES_PER_TOKEN = 36
HEADER_BYTES_PER_TENSOR = 64  # name, dims, type, offset


# -- from a config.json ----------------------------------------------------------------------------

_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "BF16": "BF16", "F16": "F16", "F32": "F32"}


def _need(cfg: Mapping[str, Any], key: str, where: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelSpecError(where, f"config.json needs a positive integer {key!r} (got {value!r})")
    return value


def spec_from_config(config: Mapping[str, Any], *, name: str, source: str, path: str | None,
                     where: str, tied_hint: bool | None = None, dtype: str | None = None) -> ModelSpec:
    """A ModelSpec from transformers' config.json values (text_config of multimodal configs is used)."""
    cfg = dict(config)
    if isinstance(cfg.get("text_config"), dict):  # Gemma3ForConditionalGeneration and kin
        cfg = {**cfg, **cfg["text_config"]}
    classes = cfg.get("architectures") or []
    key = next((HF_CLASSES[c] for c in classes if c in HF_CLASSES), None)
    if key is None:
        key = cfg.get("model_type") if cfg.get("model_type") in ARCHS else None
    if key is None:
        raise ModelSpecError(where, f"architecture {classes or cfg.get('model_type')!r} is not supported by fit "
                                    f"(supported: {', '.join(sorted(HF_CLASSES))})")
    arch = ARCHS[key]
    n_layer = _need(cfg, "num_hidden_layers", where)
    n_embd = _need(cfg, "hidden_size", where)
    n_head = _need(cfg, "num_attention_heads", where)
    n_head_kv = cfg.get("num_key_value_heads") or n_head
    if not isinstance(n_head_kv, int) or n_head_kv <= 0 or n_head % n_head_kv:
        raise ModelSpecError(where, f"num_key_value_heads {n_head_kv!r} does not divide num_attention_heads {n_head}")
    head_dim = cfg.get("head_dim") or n_embd // n_head
    n_ff = _need(cfg, "intermediate_size", where)
    n_vocab = _need(cfg, "vocab_size", where)
    n_ctx_train = cfg.get("max_position_embeddings") or 0
    tied = bool(cfg.get("tie_word_embeddings", key in ("gemma2", "gemma3")))
    if tied_hint is not None:
        tied = tied_hint
    dt = _DTYPES.get(str(dtype or cfg.get("torch_dtype") or cfg.get("dtype") or "float16"), "F16")
    # llama-quantize's F16 rung is F16 whatever the source; BF16 sources convert to BF16 by default
    wtype = {"BF16": Q.BF16, "F32": Q.F32}.get(dt, Q.F16)
    rope = cfg.get("rope_scaling") or {}
    rope_freqs = isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "llama3"
    n_swa = 0
    swa: tuple[bool, ...] = ()
    if arch.swa_pattern:
        n_swa = cfg.get("sliding_window") or arch.swa_default
        layer_types = cfg.get("layer_types")
        if isinstance(layer_types, list):
            swa = swa_layout(n_layer, [t == "sliding_attention" for t in layer_types])
        else:
            swa = swa_layout(n_layer, cfg.get("sliding_window_pattern") or arch.swa_pattern)
    kv = (n_head_kv,) * n_layer
    tensors = synthesize_tensors(arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=kv,
                                 head_dim_k=head_dim, head_dim_v=head_dim, n_ff=n_ff, n_vocab=n_vocab,
                                 tied=tied, dtype=wtype, rope_freqs=rope_freqs)
    return ModelSpec(
        name=name, source=source, path=path, arch=arch.gguf, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
        n_head_kv=kv, head_dim_k=head_dim, head_dim_v=head_dim, n_ff=n_ff, n_vocab=n_vocab,
        n_ctx_train=int(n_ctx_train), tied=tied, tensors=tensors, n_swa=int(n_swa), swa_layers=swa,
        header_bytes=HEADER_BYTES_PER_TOKEN * n_vocab + HEADER_BYTES_PER_TENSOR * len(tensors),
        source_dtype=wtype.name,
    )


# -- Hugging Face folder ---------------------------------------------------------------------------

def _safetensors_header(path: Path) -> dict:
    """The JSON header of one .safetensors file (8-byte little-endian length, then JSON): no weights."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelSpecError(path, "truncated safetensors file (no header length)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > min(size - 8, 100 << 20):
            raise ModelSpecError(path, f"safetensors header length {n} is impossible for a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelSpecError(path, f"safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ModelSpecError(path, "safetensors header is not a JSON object")
    return header


def spec_from_hf_dir(folder: str | Path) -> ModelSpec:
    """config.json + the safetensors headers (tensor names, shapes, dtype) of an HF model folder."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelSpecError(folder, "no config.json in this folder (fit reads an HF model folder's config.json "
                                     "and safetensors headers)")
    try:
        config = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSpecError(cfg_path, f"not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelSpecError(cfg_path, "expected a JSON object")
    shards = sorted(folder.glob("*.safetensors"))
    names: dict[str, tuple[list[int], str]] = {}
    for shard in shards:
        for tname, meta in _safetensors_header(shard).items():
            if tname != "__metadata__" and isinstance(meta, dict):
                names[tname] = (list(meta.get("shape", [])), str(meta.get("dtype", "")))
    tied_hint = None
    dtype = None
    if names:
        tied_hint = not any(n.endswith("lm_head.weight") for n in names)
        dtypes = [dt for shape, dt in names.values() if len(shape) == 2]
        dtype = max(set(dtypes), key=dtypes.count) if dtypes else None
    name = config.get("_name_or_path") or folder.name
    spec = spec_from_config(config, name=str(name), source="hf", path=str(folder), where=str(cfg_path),
                            tied_hint=tied_hint, dtype=dtype)
    counted = False
    if isinstance(config.get("quantization_config"), dict) and names:
        # GPTQ / AWQ / compressed-tensors: packed int32 codes, counted as the weights they hold
        from ..hf.inspect import inspect_hf

        info = inspect_hf(folder)
        if info.scheme is not None and info.quantized_linears:
            sc = info.scheme
            spec.checkpoint = {"scheme": sc.label, "method": sc.method, "format": sc.format, "bits": sc.bits,
                               "group_size": sc.group_size, "symmetric": sc.symmetric, "act_order": sc.act_order,
                               "n_params": info.n_params, "weight_bytes": info.tensor_bytes,
                               "dequantized_bytes": info.dequantized_bytes,
                               "bits_per_weight": round(info.bits_per_weight, 4),
                               "quantized_bits_per_weight": round(info.quantized_bits_per_weight or 0, 4)}
            gib = 2**30
            spec.notes.append(
                f"this folder holds a checkpoint in {sc.label} ({sc.format}): {info.tensor_bytes / gib:.2f} GiB of weights "
                f"as stored ({info.bits_per_weight:.2f} bits per weight; its {info.quantized_linears} quantized linears "
                f"{info.quantized_bits_per_weight or 0:.2f}), {info.dequantized_bytes / gib:.2f} GiB dequantized. "
                "llama.cpp runs GGUF only: the rungs are this model converted from a float original; "
                "--engine vllm plans the checkpoint itself")
            counted = True  # the logical parameter count: no header-count note
    if names and not counted:
        # the safetensors count includes vision towers etc. of multimodal folders: report, don't refuse
        n_st = 0
        for shape, _ in names.values():
            n = 1
            for d in shape:
                n *= int(d)
            n_st += n
        if abs(n_st - spec.n_params) > 0.01 * spec.n_params:
            spec.notes.append(f"the safetensors headers hold {n_st:,} parameters, the text model from config.json "
                              f"{spec.n_params:,}; fit sizes the text model")
    elif not names:
        spec.notes.append("no .safetensors files: sizes come from config.json alone")
    return spec


# -- GGUF --------------------------------------------------------------------------------------------

def spec_from_gguf(path: str | Path) -> ModelSpec:
    """Hyper-parameters and the real tensor table of a GGUF (metadata only, no tensor data read)."""
    from ..gguf.source import GGUFSource

    with GGUFSource(path) as src:
        arch = src.arch

        def get(suffix: str, default=None):
            return src.arch_get(suffix, default)

        def first(v):
            return v[0] if isinstance(v, list) and v else v

        n_layer = get("block_count")
        n_embd = get("embedding_length")
        n_head = first(get("attention.head_count"))
        if not all(isinstance(v, int) and v > 0 for v in (n_layer, n_embd, n_head)):
            raise ModelSpecError(src.path, f"metadata {arch}.block_count / embedding_length / attention.head_count "
                                           "are missing or not positive")
        kv = get("attention.head_count_kv", n_head)
        kv_layers = tuple(int(x) for x in kv) if isinstance(kv, list) else (int(kv),) * n_layer
        if len(kv_layers) != n_layer:
            raise ModelSpecError(src.path, f"{arch}.attention.head_count_kv has {len(kv_layers)} entries for {n_layer} layers")
        hd_k = get("attention.key_length") or n_embd // n_head
        hd_v = get("attention.value_length") or n_embd // n_head
        tokens = src.get("tokenizer.ggml.tokens")
        n_vocab = len(tokens) if isinstance(tokens, list) else int(get("vocab_size") or 0)
        names = {t.name for t in src.tensors}
        if not n_vocab:
            embd = next((t for t in src.tensors if t.name == "token_embd.weight"), None)
            n_vocab = embd.shape[1] if embd is not None and len(embd.shape) > 1 else 0
        n_swa = 0
        swa: tuple[bool, ...] = ()
        a = ARCHS.get(_GGUF_ARCHS.get(arch, ""), None)
        window = get("attention.sliding_window")
        if a is not None and a.swa_pattern and (window or arch == "gemma2"):
            n_swa = int(window or a.swa_default)
            swa = swa_layout(n_layer, get("attention.sliding_window_pattern") or a.swa_pattern)
        ftype = src.file_type
        return ModelSpec(
            name=src.get("general.name") or src.path.stem, source="gguf", path=str(src.path), arch=arch,
            n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=kv_layers, head_dim_k=int(hd_k),
            head_dim_v=int(hd_v), n_ff=int(first(get("feed_forward_length")) or 0), n_vocab=n_vocab,
            n_ctx_train=int(get("context_length") or 0), tied="output.weight" not in names,
            tensors=[(t.name, t.shape, t.type) for t in src.tensors], n_swa=n_swa, swa_layers=swa,
            file_type=None if ftype is None else ("F32" if ftype.name == "ALL_F32" else ftype.name.removeprefix("MOSTLY_")),
            header_bytes=src.header.data_start,
            source_dtype=max((t.type for t in src.tensors), key=lambda q: sum(
                t.n_bytes for t in src.tensors if t.type == q)).name,
        )


# -- presets (published config.json values) --------------------------------------------------------

def _cfg(cls: str, hidden: int, ff: int, heads: int, layers: int, kv: int, vocab: int, ctx: int,
         tied: bool = False, head_dim: int | None = None, dtype: str = "bfloat16", **extra: Any) -> dict:
    cfg = {"architectures": [cls], "hidden_size": hidden, "intermediate_size": ff, "num_attention_heads": heads,
           "num_hidden_layers": layers, "num_key_value_heads": kv, "vocab_size": vocab,
           "max_position_embeddings": ctx, "tie_word_embeddings": tied, "torch_dtype": dtype, **extra}
    if head_dim:
        cfg["head_dim"] = head_dim
    return cfg


_L3_ROPE: dict[str, Any] = {"rope_type": "llama3", "factor": 8.0}
# name -> (family, size label, config.json); families in the order a bare size prefers them
PRESETS: dict[str, tuple[str, str, dict]] = {
    "llama-3.2-1b": ("llama-3", "1B", _cfg("LlamaForCausalLM", 2048, 8192, 32, 16, 8, 128256, 131072, True, 64, rope_scaling=_L3_ROPE)),
    "llama-3.2-3b": ("llama-3", "3B", _cfg("LlamaForCausalLM", 3072, 8192, 24, 28, 8, 128256, 131072, True, 128, rope_scaling=_L3_ROPE)),
    "llama-3-8b": ("llama-3", "8B", _cfg("LlamaForCausalLM", 4096, 14336, 32, 32, 8, 128256, 8192)),
    "llama-3.1-8b": ("llama-3", "8B", _cfg("LlamaForCausalLM", 4096, 14336, 32, 32, 8, 128256, 131072, rope_scaling=_L3_ROPE)),
    "llama-3-70b": ("llama-3", "70B", _cfg("LlamaForCausalLM", 8192, 28672, 64, 80, 8, 128256, 8192)),
    "llama-3.1-70b": ("llama-3", "70B", _cfg("LlamaForCausalLM", 8192, 28672, 64, 80, 8, 128256, 131072, rope_scaling=_L3_ROPE)),
    "qwen2.5-0.5b": ("qwen2.5", "0.5B", _cfg("Qwen2ForCausalLM", 896, 4864, 14, 24, 2, 151936, 32768, True)),
    "qwen2.5-1.5b": ("qwen2.5", "1.5B", _cfg("Qwen2ForCausalLM", 1536, 8960, 12, 28, 2, 151936, 32768, True)),
    "qwen2.5-3b": ("qwen2.5", "3B", _cfg("Qwen2ForCausalLM", 2048, 11008, 16, 36, 2, 151936, 32768, True)),
    "qwen2.5-7b": ("qwen2.5", "7B", _cfg("Qwen2ForCausalLM", 3584, 18944, 28, 28, 4, 152064, 32768)),
    "qwen2.5-14b": ("qwen2.5", "14B", _cfg("Qwen2ForCausalLM", 5120, 13824, 40, 48, 8, 152064, 32768)),
    "qwen2.5-32b": ("qwen2.5", "32B", _cfg("Qwen2ForCausalLM", 5120, 27648, 40, 64, 8, 152064, 32768)),
    "qwen2.5-72b": ("qwen2.5", "72B", _cfg("Qwen2ForCausalLM", 8192, 29568, 64, 80, 8, 152064, 32768)),
    "mistral-7b": ("mistral", "7B", _cfg("MistralForCausalLM", 4096, 14336, 32, 32, 8, 32000, 32768, sliding_window=4096)),
    "mistral-nemo-12b": ("mistral", "12B", _cfg("MistralForCausalLM", 5120, 14336, 32, 40, 8, 131072, 131072, head_dim=128)),
    "gemma-2-2b": ("gemma-2", "2B", _cfg("Gemma2ForCausalLM", 2304, 9216, 8, 26, 4, 256000, 8192, True, 256, sliding_window=4096)),
    "gemma-2-9b": ("gemma-2", "9B", _cfg("Gemma2ForCausalLM", 3584, 14336, 16, 42, 8, 256000, 8192, True, 256, sliding_window=4096)),
    "gemma-2-27b": ("gemma-2", "27B", _cfg("Gemma2ForCausalLM", 4608, 36864, 32, 46, 16, 256000, 8192, True, 128, sliding_window=4096)),
    "gemma-3-4b": ("gemma-3", "4B", _cfg("Gemma3ForCausalLM", 2560, 10240, 8, 34, 4, 262208, 131072, True, 256, sliding_window=1024, sliding_window_pattern=6)),
    "gemma-3-12b": ("gemma-3", "12B", _cfg("Gemma3ForCausalLM", 3840, 15360, 16, 48, 8, 262208, 131072, True, 256, sliding_window=1024, sliding_window_pattern=6)),
    "gemma-3-27b": ("gemma-3", "27B", _cfg("Gemma3ForCausalLM", 5376, 21504, 32, 62, 16, 262208, 131072, True, 128, sliding_window=1024, sliding_window_pattern=6)),
    "llama-2-7b": ("llama-2", "7B", _cfg("LlamaForCausalLM", 4096, 11008, 32, 32, 32, 32000, 4096, dtype="float16")),
    "llama-2-13b": ("llama-2", "13B", _cfg("LlamaForCausalLM", 5120, 13824, 40, 40, 40, 32000, 4096, dtype="float16")),
    "smollm2-135m": ("smollm2", "135M", _cfg("LlamaForCausalLM", 576, 1536, 9, 30, 3, 49152, 8192, True)),
    "smollm2-1.7b": ("smollm2", "1.7B", _cfg("LlamaForCausalLM", 2048, 8192, 32, 24, 32, 49152, 8192, True)),
}
FAMILIES = ("llama-3", "qwen2.5", "mistral", "gemma-3", "gemma-2", "llama-2", "smollm2")
# a bare size picks the first family (in FAMILIES order) that has it; llama-3 means 3.1 for 8B/70B
_BARE_PREFERRED = {"8B": "llama-3.1-8b", "70B": "llama-3.1-70b"}

_SIZE_RX = re.compile(r"^(?:(?P<family>[a-z][\w.\-]*?)[:\-])?(?P<num>\d+(?:\.\d+)?)(?P<unit>[bm])$", re.IGNORECASE)


def spec_from_preset(arg: str) -> ModelSpec:
    """``llama-3-8b`` (a preset name), ``8B`` (a bare size) or ``qwen2.5:7b`` (family and size)."""
    key = arg.strip().lower()
    if key in PRESETS:
        name = key
    else:
        m = _SIZE_RX.match(key)
        if not m:
            raise ModelSpecError(arg, "not a file, folder, preset or size; presets: " + ", ".join(PRESETS))
        label = f"{m['num']}{m['unit']}".upper()
        family = m["family"]
        if family is not None and family not in FAMILIES:
            close = difflib.get_close_matches(family, FAMILIES, n=3, cutoff=0.5)
            raise ModelSpecError(arg, f"unknown family {family!r}" + (f"; did you mean {', '.join(close)}?" if close
                                 else f"; families: {', '.join(FAMILIES)}"))
        candidates = [n for n, (fam, size, _) in PRESETS.items()
                      if size == label and (family is None or fam == family)]
        if family is None and label in _BARE_PREFERRED:
            candidates = [_BARE_PREFERRED[label]]
        candidates.sort(key=lambda n: FAMILIES.index(PRESETS[n][0]))
        if not candidates:
            sizes = sorted({s for fam, s, _ in PRESETS.values() if family is None or fam == family},
                           key=lambda s: float(s[:-1]) * (1e-3 if s.endswith("M") else 1))
            where = f"in family {family}" if family else "among the presets"
            raise ModelSpecError(arg, f"no {label} model {where}; sizes: {', '.join(sizes)}")
        name = candidates[-1] if family is not None else candidates[0]
    family, label, config = PRESETS[name]
    spec = spec_from_config(config, name=name, source="preset", path=None, where=f"preset {name}")
    if key != name:
        spec.notes.append(f"{arg} -> preset {name} (published config.json values)")
    return spec


def load_spec(arg: str | Path | None) -> ModelSpec:
    """Any MODEL argument of ``fit``: None (the embedded default), a GGUF file, an HF folder, a preset."""
    from ..models import DEFAULT_MODEL_NAME, default_model_path

    if arg is None or str(arg) in (DEFAULT_MODEL_NAME, "default"):
        return spec_from_gguf(default_model_path())
    path = Path(str(arg)).expanduser()
    if path.is_dir():
        return spec_from_hf_dir(path)
    if path.is_file():
        return spec_from_gguf(path)
    from .. import store

    if store.looks_like_name(str(arg)):  # a model in the store (llmquant list) before a preset
        try:
            return spec_from_gguf(store.resolve(str(arg)))
        except store.UnknownModelError:
            pass
    if path.suffix.lower() == ".gguf" or "/" in str(arg):
        raise ModelSpecError(path, "no such file or folder")
    return spec_from_preset(str(arg))
