"""Hugging Face model folder source: config.json + safetensors + tokenizer -> GGUF tensors and metadata.

Follows llama.cpp's convert_hf_to_gguf.py (``conversion/base.py`` TextModel, ``conversion/llama.py``,
``conversion/qwen.py``): the same tensor names (gguf-py's ``TensorNameMap``), the same Q/K row
permutation for llama's rotary layout, the same hyper-parameter keys, vocabulary, special tokens,
chat template and ``general.*`` metadata (gguf-py's ``Metadata``), in the same order. Tensors are
yielded one at a time as float32, read through memory maps (sources/safetensors.py).

Per-architecture knowledge is the ``ARCHITECTURES`` table below: adding a llama-like
architecture is adding an entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from gguf import (
    MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES, GGUFValueType, GGUFWriter,
    LlamaFileType, Metadata, PoolingType, RopeScalingType, get_tensor_name_map,
)
from gguf import size_label as gguf_size_label
from gguf.gguf_writer import GGUFValue

from ..errors import ModelFileError, TensorDataError, UnsafeFormatError, UnsupportedModelError
from ..gguf.header import MetadataField
from .vocab import Vocab, load_vocab, read_json
from .safetensors import FLOAT_DTYPES, open_checkpoint, read_float32

GGML_QUANT_VERSION = 2


# -- the architecture registry ---------------------------------------------------------------------
@dataclass(frozen=True)
class HFArchitecture:
    """What convert_hf_to_gguf.py's model class for these HF architectures does, as data."""

    gguf_arch: MODEL_ARCH
    hf_names: tuple[str, ...]  # config.json "architectures"[0]
    vocab: tuple[str, ...] = ("spm", "gpt2")  # tokenizer kinds tried in order (set_vocab)
    # HF tensor-name suffix -> which head count to permute its rows for (LlamaModel.undo_permute)
    permute: dict[str, str] = field(default_factory=dict)
    bare_models: tuple[str, ...] = ()  # HF names whose tensors lack the "model." prefix
    llama_extras: bool = False  # LlamaModel: vocab_size + rope dims keys, tokenizer quirks, llama3 rope_freqs
    pooling: bool = False  # _try_set_pooling_type (sentence-transformers modules.json)


ARCHITECTURES: tuple[HFArchitecture, ...] = (
    HFArchitecture(
        MODEL_ARCH.LLAMA,
        ("LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM", "LlamaModel"),
        vocab=("spm", "llama_hf", "gpt2"),
        permute={"q_proj": "n_head", "k_proj": "n_head_kv"},
        bare_models=("LlamaModel",),
        llama_extras=True,
    ),
    HFArchitecture(
        MODEL_ARCH.QWEN2,
        ("Qwen2ForCausalLM", "Qwen2Model"),
        bare_models=("Qwen2Model",),
        pooling=True,
    ),
)

# transformers' AutoConfig defaults (v4.57, the version llama.cpp pins) for the keys the
# conversion reads, by config.json "model_type"; None entries are derived in ``_apply_defaults``.
CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"vocab_size": 32000, "max_position_embeddings": 2048, "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": None, "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0, "rope_scaling": None, "head_dim": None, "tie_word_embeddings": False},
    "mistral": {"vocab_size": 32000, "max_position_embeddings": 131072, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None,
                "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False},
    "qwen2": {"vocab_size": 151936, "max_position_embeddings": 32768, "hidden_size": 4096, "intermediate_size": 22016,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0, "rope_scaling": None, "use_sliding_window": False, "sliding_window": None,
              "tie_word_embeddings": False},
}
# which derived values each config class fills in when left None
_DERIVED = {"llama": ("num_key_value_heads", "head_dim"), "mistral": ("num_key_value_heads",), "qwen2": ("num_key_value_heads",)}

# Expected numpy shape of each weight in terms of the hyper-parameters (llama family); a bias has
# the first dimension only. Checked before anything is written.
EXPECTED_SHAPES: dict[MODEL_TENSOR, tuple[str, ...]] = {
    MODEL_TENSOR.TOKEN_EMBD: ("n_vocab", "n_embd"), MODEL_TENSOR.OUTPUT: ("n_vocab", "n_embd"),
    MODEL_TENSOR.OUTPUT_NORM: ("n_embd",), MODEL_TENSOR.ATTN_NORM: ("n_embd",), MODEL_TENSOR.FFN_NORM: ("n_embd",),
    MODEL_TENSOR.ATTN_Q: ("q_dim", "n_embd"), MODEL_TENSOR.ATTN_K: ("kv_dim", "n_embd"),
    MODEL_TENSOR.ATTN_V: ("kv_dim", "n_embd"), MODEL_TENSOR.ATTN_OUT: ("n_embd", "q_dim"),
    MODEL_TENSOR.FFN_GATE: ("n_ff", "n_embd"), MODEL_TENSOR.FFN_UP: ("n_ff", "n_embd"),
    MODEL_TENSOR.FFN_DOWN: ("n_embd", "n_ff"),
}

# tensors convert_hf_to_gguf.py drops or never maps (TextModel.filter_tensors, prepare_tensors)
_SKIP_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
_MULTIMODAL_PREFIXES = ("mlp", "vit.", "vpm.", "siglip2.", "conformer.", "merger.", "resampler.", "sound_encoder.",
                        "sound_projection.", "speech_embeddings.")
_MULTIMODAL_PARTS = ("visual.", "vision.", "audio.", "talker.", "vision_", "audio_", "token2wav.", "code2wav.",
                     "projector.", "pre_mm_projector_norm", "image_newline", "view_seperator", "patch_embed",
                     "patch_embedding", "patch_merger.", "patch_merge_mlp.", "model.connector.")


def supported_architectures() -> list[str]:
    return sorted(name for a in ARCHITECTURES for name in a.hf_names)


def find_architecture(hf_name: str) -> HFArchitecture:
    for a in ARCHITECTURES:
        if hf_name in a.hf_names:
            return a
    raise UnsupportedModelError(
        f"architecture {hf_name!r} is not supported; llmquant converts: {', '.join(supported_architectures())}"
    )


# -- tensors --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HFTensor:
    """One output tensor: GGUF name, ggml-order shape, and where its values come from."""

    name: str
    shape: tuple[int, ...]  # ggml order (ne0 first)
    hf_name: str
    src_dtype: str  # safetensors dtype (F32, F16, BF16, ...) or "generated"
    kind: MODEL_TENSOR | None
    load: Callable[[], np.ndarray] = field(repr=False, compare=False)

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """LlamaModel.permute: HF's rotary layout (halves) -> llama.cpp's (interleaved pairs), by rows."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def unpermute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of ``permute_qk`` (llama.cpp layout -> HF layout)."""
    return weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def llama3_rope_factors(rope: dict[str, Any], hparams: dict[str, Any]) -> np.ndarray:
    """LlamaModel.generate_extra_tensors for rope_type "llama3", in float32 like its torch code."""
    base = rope.get("rope_theta", 10000.0)
    dim = hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    freqs = np.float32(1.0) / np.power(np.float32(base), exponent, dtype=np.float32)
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context_len = rope.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = (np.float32(1.0) / freq) * np.float32(2 * math.pi)  # torch: scalar / t == t.reciprocal() * scalar
        if wavelen < high_freq_wavelen:
            out.append(np.float32(1))
        elif wavelen > low_freq_wavelen:
            out.append(np.float32(factor))
        else:
            smooth = (np.float32(old_context_len) * (np.float32(1.0) / wavelen) - np.float32(low_freq_factor)) / np.float32(high_freq_factor - low_freq_factor)
            out.append(np.float32(1.0) / ((np.float32(1) - smooth) / np.float32(factor) + smooth))
    return np.array(out, dtype=np.float32)


class _KV(GGUFWriter):
    """gguf-py's writer used only to collect typed key/values in call order (nothing is written):
    its ``add_*`` helpers give every key the name and type the converter gives it."""

    def add_key_value(self, key, val, vtype, sub_type=None):
        # a key set twice keeps its first position and takes the last value, without gguf-py's warning
        self.kv_data[0][key] = GGUFValue(value=val, type=vtype, sub_type=sub_type)

    def fields(self) -> list[MetadataField]:
        out = []
        for key, v in self.kv_data[0].items():
            sub = v.sub_type
            if v.type == GGUFValueType.ARRAY and sub is None:
                sub = GGUFValueType.get_type(v.value[0]) if len(v.value) else GGUFValueType.UINT8
            value = v.value
            if isinstance(value, np.generic):
                value = value.item()
            out.append(MetadataField(key, value, v.type, sub))
        return out


class HFSource:
    """An opened Hugging Face folder: ``arch``, ``hparams``, ``tensors``, ``vocab``,
    ``fields(ftype)`` and ``read(name)`` (float32, numpy order)."""

    def __init__(self, folder: str | Path, *, allow_pickle: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ModelFileError(self.folder, "not a folder; expected a Hugging Face model folder with config.json")
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise ModelFileError(self.folder, "no config.json: not a Hugging Face model folder (or an incomplete download)")
        config = read_json(config_path)
        if not isinstance(config, dict):
            raise ModelFileError(config_path, "expected a JSON object")
        self.config = config
        arches = config.get("architectures")
        if not (isinstance(arches, list) and arches and isinstance(arches[0], str)):
            raise ModelFileError(config_path, f"has no \"architectures\" list; llmquant converts: {', '.join(supported_architectures())}")
        self.hf_arch: str = arches[0]
        self.spec = find_architecture(self.hf_arch)
        self.arch: str = MODEL_ARCH_NAMES[self.spec.gguf_arch]
        quant = config.get("quantization_config")
        if isinstance(quant, dict):
            method = quant.get("quant_method") or quant.get("quant_algo") or "unknown"
            raise UnsupportedModelError(
                f"{config_path}: the weights are already quantized ({method}); convert the original float checkpoint"
            )
        self.hparams = _apply_defaults(config)
        self.block_count = int(self.hparams["num_hidden_layers"])
        self.rope = _rope_parameters(self.hparams)
        self.tensors = self._plan_tensors(allow_pickle)
        self._by_name = {t.name: t for t in self.tensors}
        self.vocab: Vocab = load_vocab(self.folder, self.hparams, self.spec.vocab)

    # -- tensors ---------------------------------------------------------------------------------
    def _raw_tensors(self, allow_pickle: bool) -> list[tuple[str, str, tuple[int, ...], Callable[[int | None], np.ndarray]]]:
        """(HF name, dtype, numpy shape, loader(permute_heads)) in the converter's order."""
        has_index = (self.folder / "model.safetensors.index.json").is_file()
        if has_index or any(self.folder.glob("model*.safetensors")):
            ckpt = open_checkpoint(self.folder)
            return [(e.name, e.dtype, e.shape, (lambda heads, e=e: read_float32(e, heads))) for e in ckpt.entries]
        pickles = sorted(self.folder.glob("pytorch_model*.bin"))
        if pickles:
            if not allow_pickle:
                raise UnsafeFormatError(
                    pickles[0], "is a PyTorch pickle; unpickling can run arbitrary code, so llmquant reads only "
                    "safetensors. Convert it to safetensors, or pass --allow-pickle if you trust its origin "
                    "(needs torch; it is loaded with weights_only=True)"
                )
            return _pickle_tensors(pickles)
        raise ModelFileError(self.folder, "no weights: expected model.safetensors (or model-*-of-*.safetensors with model.safetensors.index.json)")

    def _plan_tensors(self, allow_pickle: bool) -> list[HFTensor]:
        hp = self.hparams
        dims = _dims(hp)
        name_map = get_tensor_name_map(self.spec.gguf_arch, self.block_count)
        out: list[HFTensor] = []
        if self.spec.llama_extras and str(self.rope.get("rope_type", "")).lower() == "llama3":
            factors = llama3_rope_factors(self.rope, hp)
            out.append(HFTensor(TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight", (factors.size,), "(generated)", "generated",
                                MODEL_TENSOR.ROPE_FREQS, lambda f=factors: f.copy()))
        blocks: set[int] = set()
        seen: set[str] = set()
        for hf_name, dtype, shape, loader in self._raw_tensors(allow_pickle):
            name = _filter_name(hf_name)
            if name is None or name.endswith(_SKIP_SUFFIXES):
                continue
            if self.hf_arch in self.spec.bare_models:
                name = "model." + name
            if dtype not in FLOAT_DTYPES:
                raise UnsupportedModelError(f"tensor {hf_name!r} is {dtype}; llmquant converts float weights (F32, F16, BF16)")
            bid = next((int(p) for p in name.split(".") if p.isdecimal()), None)
            mapped = name_map.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
            if mapped is None:
                if bid is not None and bid >= self.block_count:
                    raise TensorDataError(hf_name, f"belongs to layer {bid} but config.json num_hidden_layers is {self.block_count}")
                raise UnsupportedModelError(f"tensor {hf_name!r} has no GGUF name for architecture {self.arch} (convert_hf_to_gguf.py refuses it too)")
            kind, gguf_name = mapped
            if bid is not None:
                blocks.add(bid)
            _check_shape(hf_name, kind, gguf_name.endswith(".bias"), shape, dims)
            heads = None
            for suffix, which in self.spec.permute.items():
                if name.endswith((f"{suffix}.weight", f"{suffix}.bias")):
                    heads = dims["n_head_kv"] if which == "n_head_kv" and dims["n_head_kv"] != dims["n_head"] else dims["n_head"]
                    if shape[0] % (2 * heads):
                        raise TensorDataError(hf_name, f"{shape[0]} rows cannot be split into {heads} rotary heads of pairs")
            if gguf_name in seen:
                raise ModelFileError(self.folder, f"two tensors map to {gguf_name!r} (the second is {hf_name!r})")
            seen.add(gguf_name)
            out.append(HFTensor(gguf_name, tuple(reversed(shape)), hf_name, dtype, kind,
                                (lambda loader=loader, heads=heads: loader(heads))))
        missing = sorted(set(range(self.block_count)) - blocks)
        if missing:
            raise TensorDataError(
                f"layer {missing[0]}", f"config.json num_hidden_layers is {self.block_count} but the weights have no tensors for "
                f"{len(missing)} layer(s) ({', '.join(map(str, missing[:5]))}{'...' if len(missing) > 5 else ''}); is a shard missing?"
            )
        if not any(t.kind == MODEL_TENSOR.TOKEN_EMBD for t in out):
            raise TensorDataError("token_embd.weight", "the weights have no token embedding (model.embed_tokens.weight)")
        return out

    def info(self, name: str) -> HFTensor:
        return self._by_name[name]

    def read(self, name: str) -> np.ndarray:
        """One tensor as float32, numpy order (rows last), permuted as llama.cpp expects."""
        return self._by_name[name].load()

    def iter_tensors(self) -> Iterator[tuple[HFTensor, np.ndarray]]:
        for t in self.tensors:
            yield t, t.load()

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def guessed_ftype(self) -> LlamaFileType:
        """``--outtype auto``: the type of the first 2-D+ tensor if it is BF16 or F16, else F16."""
        for t in self.tensors:
            if t.src_dtype == "generated" or len(t.shape) < 2:
                continue
            return LlamaFileType.MOSTLY_BF16 if t.src_dtype == "BF16" else LlamaFileType.MOSTLY_F16
        return LlamaFileType.MOSTLY_F16

    # -- metadata --------------------------------------------------------------------------------
    def fields(self, ftype: LlamaFileType) -> list[MetadataField]:
        """Every metadata key/value the converter writes, in its order (general.architecture first)."""
        kv = _KV(None, self.arch)
        kv.add_type("model")
        meta = Metadata.load(None, self.folder, None, self.n_params)
        gen = Metadata.load_generation_config(self.folder) or {}
        if "penalty_repeat" not in gen and "repetition_penalty" in gen:  # newer gguf-py than PyPI's 0.19.0
            meta.sampling_penalty_repeat = gen["repetition_penalty"]
        if meta.name is None:
            meta.name = self.folder.name
        if meta.size_label is None and self.n_params > 0:
            meta.size_label = gguf_size_label(self.n_params, self.n_params, 0, 0)
        meta.set_gguf_meta_model(kv)
        self._hparam_fields(kv, ftype)
        kv.add_quantization_version(GGML_QUANT_VERSION)
        self._vocab_fields(kv)
        return kv.fields()

    def _hparam_fields(self, kv: _KV, ftype: LlamaFileType) -> None:
        """TextModel.set_gguf_parameters (+ LlamaModel / Qwen2Model additions)."""
        hp = self.hparams
        kv.add_block_count(self.block_count)
        if (n_ctx := _find(hp, "max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length", "model_max_length")) is not None:
            kv.add_context_length(n_ctx)
        if (n_embd := _find(hp, "hidden_size", "n_embd", "dim")) is not None:
            kv.add_embedding_length(n_embd)
        if (n_ff := _find(hp, "prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size", "n_inner", "hidden_dim")) is not None:
            kv.add_feed_forward_length(n_ff)
        if (n_head := _find(hp, "num_attention_heads", "n_head", "n_heads")) is not None:
            kv.add_head_count(n_head)
        if (n_head_kv := _find(hp, "num_key_value_heads", "n_kv_heads")) is not None:
            kv.add_head_count_kv(n_head_kv)
        if hp.get("is_causal") is False:
            kv.add_causal_attention(False)
        rope = self.rope.get("full_attention", self.rope)
        if (rope_type := rope.get("rope_type")) is not None:
            factor = rope.get("factor")
            if rope_type == "linear" and factor is not None:
                kv.add_rope_scaling_type(RopeScalingType.LINEAR)
                kv.add_rope_scaling_factor(factor)
            elif rope_type == "yarn" and factor is not None:
                kv.add_rope_scaling_type(RopeScalingType.YARN)
                kv.add_rope_scaling_factor(factor)
                kv.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
                if (v := rope.get("extrapolation_factor")) is not None:
                    kv.add_rope_scaling_yarn_ext_factor(v)
                if (v := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
                    kv.add_rope_scaling_yarn_attn_factor(v)
                if (v := rope.get("beta_fast")) is not None:
                    kv.add_rope_scaling_yarn_beta_fast(v)
                if (v := rope.get("beta_slow")) is not None:
                    kv.add_rope_scaling_yarn_beta_slow(v)
            elif rope_type in ("su", "longrope"):
                kv.add_rope_scaling_type(RopeScalingType.LONGROPE)
        if (theta := rope.get("rope_theta")) is not None:
            kv.add_rope_freq_base(theta)
        if (swa_theta := self.rope.get("sliding_attention", {}).get("rope_theta")) is not None:
            kv.add_rope_freq_base_swa(swa_theta)
        if (eps := _find(hp, "rms_norm_eps", "norm_eps")) is not None:
            kv.add_layer_norm_rms_eps(eps)
        if (eps := _find(hp, "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")) is not None:
            kv.add_layer_norm_eps(eps)
        if (n := _find(hp, "num_local_experts", "num_experts", "n_routed_experts")) is not None:
            kv.add_expert_count(n)
        if (n := _find(hp, "num_experts_per_tok", "num_experts_per_token", "top_k_experts")) is not None:
            kv.add_expert_used_count(n)
        if (head_dim := hp.get("head_dim")) is not None:
            kv.add_key_length(head_dim)
            kv.add_value_length(head_dim)
        kv.add_file_type(ftype)
        if self.spec.llama_extras:
            kv.add_vocab_size(hp["vocab_size"])
            kv.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])
        if self.spec.pooling:
            _pooling_fields(kv, self.folder, hp)

    def _vocab_fields(self, kv: _KV) -> None:
        v = self.vocab
        if self.spec.llama_extras:
            tc_path = self.folder / "tokenizer_config.json"
            tc = read_json(tc_path) if tc_path.is_file() else {}
            if isinstance(tc, dict) and (add_prefix_space := tc.get("add_prefix_space")) is not None:
                kv.add_add_space_prefix(add_prefix_space)
        kv.add_tokenizer_model(v.model)
        kv.add_tokenizer_pre(v.pre)
        kv.add_token_list(v.tokens)
        if v.scores is not None:
            kv.add_token_scores(v.scores)
        kv.add_token_types(v.types)
        v.special.add_to_gguf(kv, quiet=True)
        if self.spec.llama_extras and self.hparams.get("vocab_size") == 49152:
            kv.add_add_bos_token(False)  # LlamaModel.set_vocab: granite small models (and SmolLM)

    def close(self) -> None:
        pass

    def __enter__(self) -> "HFSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- helpers ----------------------------------------------------------------------------------------
def _find(hp: dict[str, Any], *keys: str) -> Any:
    return next((hp[k] for k in keys if k in hp), None)


def _apply_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as transformers' AutoConfig would hand it to the converter."""
    model_type = config.get("model_type")
    defaults = CONFIG_DEFAULTS.get(model_type, {})
    hp = {**defaults, **{k: v for k, v in config.items() if not (v is None and k in defaults)}}
    for key in _DERIVED.get(model_type, ()):
        if hp.get(key) is None:
            if key == "num_key_value_heads":
                hp[key] = hp["num_attention_heads"]
            elif key == "head_dim":
                hp[key] = hp["hidden_size"] // hp["num_attention_heads"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        value = hp.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ModelFileError("config.json", f"{key} is {value!r}, expected a positive integer")
    return hp


def _rope_parameters(hp: dict[str, Any]) -> dict[str, Any]:
    """TextModel.__init__: rope_scaling (or rope_parameters) with rope_theta etc. mirrored in."""
    rope = dict(hp.get("rope_parameters", hp.get("rope_scaling")) or {})
    theta = _find(hp, "global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base")
    local_theta = _find(hp, "local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta", "rope_local_base_freq")
    partial = _find(hp, "partial_rotary_factor", "rope_pct", "rope_percent")
    orig_ctx = hp.get("original_max_position_embeddings")
    if "full_attention" not in rope and "sliding_attention" not in rope:
        if local_theta is not None:
            rope["sliding_attention"] = {"rope_theta": local_theta}
        if "rope_theta" not in rope and theta is not None:
            rope["rope_theta"] = theta
        if "rope_type" not in rope and (t := rope.get("type")) is not None:
            rope["rope_type"] = t
        if "partial_rotary_factor" not in rope and partial is not None:
            rope["partial_rotary_factor"] = partial
        if "original_max_position_embeddings" not in rope and orig_ctx is not None:
            rope["original_max_position_embeddings"] = orig_ctx
    return rope


def _dims(hp: dict[str, Any]) -> dict[str, int]:
    n_head = hp["num_attention_heads"]
    n_head_kv = hp.get("num_key_value_heads") or n_head
    head_dim = hp.get("head_dim") or hp["hidden_size"] // n_head
    return {"n_embd": hp["hidden_size"], "n_ff": hp.get("intermediate_size") or 0, "n_vocab": hp["vocab_size"],
            "n_head": n_head, "n_head_kv": n_head_kv, "q_dim": n_head * head_dim, "kv_dim": n_head_kv * head_dim}


def _check_shape(hf_name: str, kind: MODEL_TENSOR, is_bias: bool, shape: tuple[int, ...], dims: dict[str, int]) -> None:
    want = EXPECTED_SHAPES.get(kind)
    if want is None:
        return
    if is_bias:
        want = want[:1]
    expected = tuple(dims[s] for s in want)
    if tuple(shape) != expected:
        names = " x ".join(f"{s}={dims[s]}" for s in want)
        raise TensorDataError(hf_name, f"has shape {list(shape)} but config.json implies {list(expected)} ({names})")


def _filter_name(name: str) -> str | None:
    """TextModel / ModelBase / LlamaModel.filter_tensors: drop multimodal tensors, strip wrappers."""
    if name.startswith(_MULTIMODAL_PREFIXES) or any(p in name for p in _MULTIMODAL_PARTS):
        return None
    if name.endswith("e_score_correction_bias"):
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
    name = name.replace("language_model.", "").replace("text_model.", "")
    return name


def _pooling_fields(kv: _KV, folder: Path, hp: dict[str, Any]) -> None:
    """TextModel._try_set_pooling_type (sentence-transformers folders)."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return
    path = next((m["path"] for m in read_json(modules) if str(m.get("type", "")).endswith("Pooling")), None)
    if path is None:
        return
    pooling = read_json(folder / path / "config.json")
    modes = {"mean": PoolingType.MEAN, "cls": PoolingType.CLS, "lasttoken": PoolingType.LAST}
    if pooling.get("pooling_mode_mean_tokens"):
        kv.add_pooling_type(PoolingType.MEAN)
    elif pooling.get("pooling_mode_cls_token"):
        kv.add_pooling_type(PoolingType.CLS)
    elif pooling.get("pooling_mode_lasttoken"):
        kv.add_pooling_type(PoolingType.LAST)
    elif pooling.get("pooling_mode") in modes:
        kv.add_pooling_type(modes[pooling["pooling_mode"]])
    else:
        raise UnsupportedModelError(f"{folder / path}: only mean, cls and last-token pooling are supported")


def _pickle_tensors(files: list[Path]):
    """PyTorch .bin checkpoints, only when explicitly allowed: torch.load(weights_only=True, mmap=True)."""
    try:
        import torch
    except ImportError:
        raise UnsupportedModelError("reading PyTorch .bin checkpoints needs torch (pip install torch)") from None
    names = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}
    out = []
    for f in files:
        state = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
        for name, t in state.items():
            def load(heads, t=t):
                a = t.to(torch.float32).numpy()
                return np.ascontiguousarray(permute_qk(a, heads) if heads else a)
            out.append((name, names.get(t.dtype, str(t.dtype)), tuple(t.shape), load))
    return out
