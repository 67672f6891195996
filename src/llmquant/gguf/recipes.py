"""Which ggml type each tensor gets for an ftype: llama.cpp's quantization mixtures as a pure function.

Follows ``src/llama-quant.cpp`` of the llama.cpp vendored in llama-cpp-python 0.3.36:
``tensor_allows_quantization`` (what is never quantized), ``llama_tensor_get_type`` (user overrides,
then the mixture rules of ``llama_tensor_get_type_impl``, then ``tensor_type_fallback`` for rows not
divisible by the block size) and ``tensor_requires_imatrix``. llama.cpp keeps layer-position
counters in a mutable ``quantize_state_impl`` while it walks the model in its loader's order
(layer number, then name); ``plan_model`` replays that walk over a plain list and returns one
``TensorPlan`` per tensor, in the caller's order.

Covered ftypes: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q2_K_S, Q3_K_{S,M,L},
Q4_K_{S,M}, Q5_K_{S,M}, Q6_K, IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ2_M, IQ3_XXS, IQ3_XS, IQ3_S,
IQ3_M, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0. The MXFP4_MOE and Q1_0/Q2_0 branches are left out.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from gguf import GGMLQuantizationType, LlamaFileType
from gguf.constants import GGML_QUANT_SIZES

from ..errors import ImatrixRequiredError, RecipeError, RequantizeError, UnknownTypeError

Q = GGMLQuantizationType
F = LlamaFileType

# -- ftypes ----------------------------------------------------------------------------------------

# llama_ftype_get_default_type, restricted to the ftypes we cover
DEFAULT_TYPE: dict[LlamaFileType, GGMLQuantizationType] = {
    F.ALL_F32: Q.F32,
    F.MOSTLY_F16: Q.F16,
    F.MOSTLY_BF16: Q.BF16,
    F.MOSTLY_Q8_0: Q.Q8_0,
    F.MOSTLY_Q4_0: Q.Q4_0,
    F.MOSTLY_Q4_1: Q.Q4_1,
    F.MOSTLY_Q5_0: Q.Q5_0,
    F.MOSTLY_Q5_1: Q.Q5_1,
    F.MOSTLY_Q2_K: Q.Q2_K,
    F.MOSTLY_Q2_K_S: Q.Q2_K,
    F.MOSTLY_Q3_K_S: Q.Q3_K,
    F.MOSTLY_Q3_K_M: Q.Q3_K,
    F.MOSTLY_Q3_K_L: Q.Q3_K,
    F.MOSTLY_Q4_K_S: Q.Q4_K,
    F.MOSTLY_Q4_K_M: Q.Q4_K,
    F.MOSTLY_Q5_K_S: Q.Q5_K,
    F.MOSTLY_Q5_K_M: Q.Q5_K,
    F.MOSTLY_Q6_K: Q.Q6_K,
    F.MOSTLY_IQ2_XXS: Q.IQ2_XXS,
    F.MOSTLY_IQ2_XS: Q.IQ2_XS,
    F.MOSTLY_IQ2_S: Q.IQ2_XS,
    F.MOSTLY_IQ2_M: Q.IQ2_S,
    F.MOSTLY_IQ3_XXS: Q.IQ3_XXS,
    F.MOSTLY_IQ3_XS: Q.IQ3_S,
    F.MOSTLY_IQ3_S: Q.IQ3_S,
    F.MOSTLY_IQ3_M: Q.IQ3_S,
    F.MOSTLY_IQ1_S: Q.IQ1_S,
    F.MOSTLY_IQ1_M: Q.IQ1_M,
    F.MOSTLY_IQ4_NL: Q.IQ4_NL,
    F.MOSTLY_IQ4_XS: Q.IQ4_XS,
    F.MOSTLY_TQ1_0: Q.TQ1_0,
    F.MOSTLY_TQ2_0: Q.TQ2_0,
}

# names as llama-quantize spells them (QUANT_OPTIONS in tools/quantize/quantize.cpp), with its aliases
FTYPE_NAMES: dict[str, LlamaFileType] = {
    "F32": F.ALL_F32, "F16": F.MOSTLY_F16, "BF16": F.MOSTLY_BF16, "Q8_0": F.MOSTLY_Q8_0,
    "Q4_0": F.MOSTLY_Q4_0, "Q4_1": F.MOSTLY_Q4_1, "Q5_0": F.MOSTLY_Q5_0, "Q5_1": F.MOSTLY_Q5_1,
    "Q2_K": F.MOSTLY_Q2_K, "Q2_K_S": F.MOSTLY_Q2_K_S,
    "Q3_K_S": F.MOSTLY_Q3_K_S, "Q3_K_M": F.MOSTLY_Q3_K_M, "Q3_K_L": F.MOSTLY_Q3_K_L,
    "Q4_K_S": F.MOSTLY_Q4_K_S, "Q4_K_M": F.MOSTLY_Q4_K_M,
    "Q5_K_S": F.MOSTLY_Q5_K_S, "Q5_K_M": F.MOSTLY_Q5_K_M, "Q6_K": F.MOSTLY_Q6_K,
    "Q3_K": F.MOSTLY_Q3_K_M, "Q4_K": F.MOSTLY_Q4_K_M, "Q5_K": F.MOSTLY_Q5_K_M,
    "IQ2_XXS": F.MOSTLY_IQ2_XXS, "IQ2_XS": F.MOSTLY_IQ2_XS, "IQ2_S": F.MOSTLY_IQ2_S, "IQ2_M": F.MOSTLY_IQ2_M,
    "IQ1_S": F.MOSTLY_IQ1_S, "IQ1_M": F.MOSTLY_IQ1_M, "TQ1_0": F.MOSTLY_TQ1_0, "TQ2_0": F.MOSTLY_TQ2_0,
    "IQ3_XXS": F.MOSTLY_IQ3_XXS, "IQ3_XS": F.MOSTLY_IQ3_XS, "IQ3_S": F.MOSTLY_IQ3_S, "IQ3_M": F.MOSTLY_IQ3_M,
    "IQ4_NL": F.MOSTLY_IQ4_NL, "IQ4_XS": F.MOSTLY_IQ4_XS,
}


def parse_ftype(name: str) -> LlamaFileType:
    """``"q4_k_m"`` -> ``LlamaFileType.MOSTLY_Q4_K_M`` (case-insensitive; Q3_K/Q4_K/Q5_K mean _M)."""
    key = name.strip().upper()
    if key.startswith("MOSTLY_"):
        key = key[len("MOSTLY_"):]
    if key == "ALL_F32":
        key = "F32"
    if key not in FTYPE_NAMES:
        raise UnknownTypeError(name, list(FTYPE_NAMES))
    return FTYPE_NAMES[key]


def parse_ggml_type(name: str) -> GGMLQuantizationType:
    """``"q8_0"`` -> ``Q8_0``, case-insensitive (llama-quantize's parse_ggml_type)."""
    try:
        return GGMLQuantizationType[name.strip().upper()]
    except KeyError:
        raise UnknownTypeError(name, [t.name for t in GGMLQuantizationType]) from None


def parse_tensor_type(spec: str) -> tuple[str, GGMLQuantizationType]:
    """``"attn_v=q8_0"`` -> ``("attn_v", Q8_0)``: one ``--tensor-type``, the pattern lower-cased as
    llama-quantize does before handing it to the library."""
    pattern, sep, qtype = spec.partition("=")
    if not sep or not pattern or not qtype:
        raise RecipeError("", f"malformed tensor type {spec!r}: expected PATTERN=TYPE")
    return pattern.lower(), parse_ggml_type(qtype)


def ftype_name(ftype: LlamaFileType) -> str:
    """The llama-quantize name of an ftype (``MOSTLY_Q4_K_M`` -> ``Q4_K_M``)."""
    return "F32" if ftype == F.ALL_F32 else ftype.name.removeprefix("MOSTLY_")


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def is_quantized(qtype: GGMLQuantizationType) -> bool:
    """ggml_is_quantized: every block type (F32/F16/BF16 and the integer types are not)."""
    return block_size(qtype) > 1


# -- public data types -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] = row length (ne0)
    src_type: GGMLQuantizationType
    target: GGMLQuantizationType  # what the ftype rules / overrides chose, before the fallback
    type: GGMLQuantizationType  # final type after the fallback
    fell_back: bool
    reason: str  # e.g. "576 columns not divisible by 256: Q4_K -> Q5_0", "norm kept F32"
    quantizable: bool = True  # False for tensors llama.cpp never quantizes (1-D, norms, ...)

    @property
    def converts(self) -> bool:
        """Whether the tensor's data changes (llama.cpp copies it when the type stays the same)."""
        return self.type != self.src_type


@dataclass(frozen=True)
class RecipeOptions:
    pure: bool = False
    allow_requantize: bool = False
    quantize_output_tensor: bool = True  # False = --leave-output-tensor
    output_tensor_type: GGMLQuantizationType | None = None
    token_embedding_type: GGMLQuantizationType | None = None
    tensor_types: tuple[tuple[str, GGMLQuantizationType], ...] = ()  # regex -> type, first match wins
    has_imatrix: bool = False


# -- hyper-parameters ------------------------------------------------------------------------------

# architectures llama.cpp labels LLM_TYPE_70B, by block count (models/<arch>.cpp load_arch_hparams);
# llama additionally needs grouped-query attention (else it is 65B) and no 8 experts
_70B_BLOCK_COUNT = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}


@dataclass(frozen=True)
class _HParams:
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int
    n_layer_nextn: int

    @classmethod
    def of(cls, hp: Mapping[str, Any]) -> "_HParams":
        n_layer = hp.get("n_layer", hp.get("block_count"))
        if n_layer is None:
            raise RecipeError("", "hparams need n_layer (GGUF {arch}.block_count)")
        n_head = int(hp.get("n_head") or 0)
        n_head_kv = hp.get("n_head_kv")
        return cls(
            n_layer=int(n_layer),
            n_head=n_head,
            n_head_kv=n_head if n_head_kv is None else int(n_head_kv),
            n_expert=int(hp.get("n_expert") or 0),
            n_layer_nextn=int(hp.get("n_layer_nextn") or 0),
        )

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    def is_70b(self, arch: str) -> bool:
        if _70B_BLOCK_COUNT.get(arch) != self.n_layer - self.n_layer_nextn:
            return False
        if arch == "llama":
            return self.n_expert != 8 and self.n_head != self.n_head_kv
        return True


def hparams_from_fields(arch: str, fields: Mapping[str, Any]) -> dict[str, int]:
    """The hyper-parameters the rules need, from GGUF metadata.

    ``fields`` maps keys to plain values, to llmquant ``MetadataField`` (``.value``) or to gguf-py
    ``ReaderField`` (``.contents()``). Per-layer arrays give layer 0's value, as llama.cpp's
    ``n_gqa()`` uses.
    """

    def get(suffix: str) -> int | None:
        field = fields.get(f"{arch}.{suffix}")
        if field is None:
            return None
        value = field.value if hasattr(field, "value") else field.contents() if hasattr(field, "contents") else field
        if hasattr(value, "__len__") and not isinstance(value, (str, bytes)):
            value = value[0] if len(value) else None
        return None if value is None else int(value)

    n_layer = get("block_count")
    if n_layer is None:
        raise RecipeError("", f"metadata {arch}.block_count is missing")
    n_head = get("attention.head_count") or 0
    n_head_kv = get("attention.head_count_kv")
    return {
        "n_layer": n_layer,
        "n_head": n_head,
        "n_head_kv": n_head if n_head_kv is None else n_head_kv,
        "n_expert": get("expert_count") or 0,
        "n_embd": get("embedding_length") or 0,
        "n_layer_nextn": get("nextn_predict_layers") or 0,
    }


# -- what is never quantized (tensor_allows_quantization) -----------------------------------------

# substrings that keep a tensor in its source type, with why
_KEEP_SUBSTRINGS: tuple[tuple[str, str], ...] = (
    ("_norm.weight", "norm"),
    ("ffn_gate_inp.weight", "expert router"),
    ("ffn_gate_tid2eid.weight", "token->expert table"),
    ("altup", "altup (tiny)"),
    ("laurel", "laurel (tiny)"),
    ("per_layer_model_proj", "per-layer projection"),
    ("ssm_conv1d", "conv1d"),
    ("shortconv.conv.weight", "conv1d"),
    ("indexer.k_proj.weight", "indexer projection"),
    ("indexer.q_proj.weight", "indexer projection"),
    *((f"time_mix_{w}.weight", "RWKV small matrix") for w in (
        "first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2",
        "decay_w1", "decay_w2", "lerp_fused")),
    ("attn_rel_b.weight", "relative position bias"),
    (".position_embd", "positional embedding"),
    ("sam.pos_embd", "positional embedding"),
    ("sam.neck.", "multimodal"),
    ("sam.net_", "multimodal"),
    (".rel_pos", "positional embedding"),
    (".patch_embd", "patch embedding"),
    (".patch_merger", "patch merger"),
    ("a.rvq.codebook", "audio codebook"),
    ("mm.a.code_embd", "audio codebook"),
)
_KEEP_EXACT = {"position_embd.weight": "positional embedding", "token_types.weight": "token types"}
_KEEP_ARCH_SUBSTRINGS: dict[str, tuple[str, ...]] = {
    "glm5-next": ("hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
                  "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight",
                  "ssm_g_b.weight", "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight",
                  "attn_v_b.weight"),
}
# tensors these architectures never put below Q8_0 (start of llama_tensor_get_type_impl)
_ARCH_Q8_0_FLOOR: dict[str, tuple[str, ...]] = {"glm5-next": ("attn_q_a", "attn_q_b", "nextn.eh_proj")}


def n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count; at least 1."""
    dims = [i + 1 for i, ne in enumerate(shape) if ne != 1]
    return max(dims, default=1)


def kept_reason(name: str, shape: tuple[int, ...], arch: str, options: RecipeOptions) -> str | None:
    """Why llama.cpp never quantizes this tensor, or None if it may."""
    if n_dims(shape) < 2:
        return "1-D tensor"
    if not name.endswith("weight"):
        return "non-weight tensor"
    if not options.quantize_output_tensor and name == "output.weight":
        return "output (quantize_output_tensor=False)"
    for sub, why in _KEEP_SUBSTRINGS:
        if sub in name:
            return why
    if name in _KEEP_EXACT:
        return _KEEP_EXACT[name]
    if any(sub in name for sub in _KEEP_ARCH_SUBSTRINGS.get(arch, ())):
        return f"{arch} small tensor"
    return None


# -- tensor categories (tensor_get_category) -------------------------------------------------------

class Category(enum.Enum):
    TOKEN_EMBD = "token_embd"
    ATTN_Q = "attn_q"
    ATTN_V = "attn_v"
    ATTN_K = "attn_k"
    ATTN_QKV = "attn_qkv"
    ATTN_KV_B = "attn_kv_b"
    ATTN_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OUTPUT = "output"
    OTHER = "other"


_TOKEN_EMBD_NAMES = ("token_embd.weight", "per_layer_token_embd.weight")
# first matching substring decides, in this order
_CATEGORY_SUBSTRINGS: tuple[tuple[str, Category], ...] = (
    ("attn_qkv.weight", Category.ATTN_QKV),
    ("attn_kv_b.weight", Category.ATTN_KV_B),
    ("attn_v.weight", Category.ATTN_V),
    ("attn_k.weight", Category.ATTN_K),
    ("attn_q.weight", Category.ATTN_Q),
    ("attn_output.weight", Category.ATTN_OUTPUT),
    ("ffn_up", Category.FFN_UP),
    ("ffn_gate", Category.FFN_GATE),
    ("ffn_down", Category.FFN_DOWN),
)
# the "attention-v-like" tensors share one position counter and one rule set
_ATTN_V_LIKE = (Category.ATTN_V, Category.ATTN_QKV, Category.ATTN_KV_B)


def category(name: str) -> Category:
    if name == "output.weight":
        return Category.OUTPUT
    if name in _TOKEN_EMBD_NAMES:
        return Category.TOKEN_EMBD
    for sub, cat in _CATEGORY_SUBSTRINGS:
        if sub in name:
            return cat
    return Category.OTHER


# -- the mixtures (llama_tensor_get_type_impl) -----------------------------------------------------

def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The layers a _M mixture gives more bits: first and last eighth, and every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass(frozen=True)
class _At:
    """Where a tensor sits: its position ``i`` among ``n`` of its kind, plus the model facts rules use."""
    i: int
    n: int
    gqa: int
    falcon: bool
    has_imatrix: bool
    n_expert: int = 0


_Rule = Callable[[_At], "GGMLQuantizationType | None"]  # None = keep the ftype's default type


def _gqa4(t: GGMLQuantizationType) -> _Rule:
    """``t`` for models with grouped-query attention of 4 or more, else the default."""
    return lambda a: t if a.gqa >= 4 else None


# attn_v / attn_qkv / attn_kv_b: i counts these tensors in load order, n is their number
_ATTN_V_RULES: dict[LlamaFileType, _Rule] = {
    F.MOSTLY_Q2_K: lambda a: Q.Q4_K if a.gqa >= 4 else Q.Q3_K,
    F.MOSTLY_Q2_K_S: _gqa4(Q.Q4_K),
    F.MOSTLY_IQ3_XXS: lambda a: Q.Q4_K if a.gqa >= 4 else Q.IQ3_S if not a.has_imatrix else Q.IQ3_XXS,
    F.MOSTLY_IQ3_XS: _gqa4(Q.Q4_K),
    F.MOSTLY_IQ3_S: _gqa4(Q.Q4_K),
    F.MOSTLY_IQ3_M: lambda a: Q.Q4_K,
    F.MOSTLY_Q3_K_M: lambda a: Q.Q5_K if a.i < 2 else Q.Q4_K,
    F.MOSTLY_Q3_K_L: lambda a: Q.Q5_K,
    F.MOSTLY_IQ4_NL: _gqa4(Q.Q5_K),
    F.MOSTLY_IQ4_XS: _gqa4(Q.Q5_K),
    F.MOSTLY_Q4_K_M: lambda a: Q.Q6_K if use_more_bits(a.i, a.n) else None,
    F.MOSTLY_Q5_K_M: lambda a: Q.Q6_K if use_more_bits(a.i, a.n) else None,
    F.MOSTLY_Q4_K_S: lambda a: Q.Q5_K if a.i < 4 else None,
}

# ffn_down: i is the layer, n the block count
_FFN_DOWN_RULES: dict[LlamaFileType, _Rule] = {
    F.MOSTLY_Q2_K: lambda a: Q.Q3_K,
    F.MOSTLY_Q2_K_S: lambda a: Q.Q4_K if a.i < a.n // 8 else None,
    F.MOSTLY_IQ3_XXS: lambda a: None if a.has_imatrix else Q.Q4_K if a.i < a.n // 8 else Q.Q3_K,
    F.MOSTLY_Q3_K_M: lambda a: (Q.Q5_K if a.i < a.n // 16
                                else Q.Q4_K if not a.falcon or use_more_bits(a.i, a.n) else Q.Q3_K),
    F.MOSTLY_IQ3_M: lambda a: (Q.Q4_K if a.i < a.n // 8 or (a.n_expert == 8 and use_more_bits(a.i, a.n))
                               else None),
    F.MOSTLY_Q3_K_L: lambda a: Q.Q4_K if a.falcon else Q.Q5_K,
    F.MOSTLY_Q4_K_M: lambda a: ((Q.Q6_K if a.i < a.n // 16 else Q.Q5_K if use_more_bits(a.i, a.n) else Q.Q4_K)
                                if a.falcon else Q.Q6_K if use_more_bits(a.i, a.n) else None),
    # IQ4 without an imatrix: the first eighth of ffn_down gets Q5_K
    F.MOSTLY_IQ4_NL: lambda a: Q.Q5_K if a.i < a.n // 8 and not a.has_imatrix else None,
    F.MOSTLY_IQ4_XS: lambda a: Q.Q5_K if a.i < a.n // 8 and not a.has_imatrix else None,
    F.MOSTLY_Q5_K_M: lambda a: Q.Q6_K if use_more_bits(a.i, a.n) else None,
    F.MOSTLY_Q4_K_S: lambda a: Q.Q5_K if not a.falcon and a.i < a.n // 8 else None,
    # with an imatrix only, so that one can always reproduce the pre-imatrix Q4_0/Q5_0
    F.MOSTLY_Q4_0: lambda a: Q.Q4_1 if a.has_imatrix and a.i < a.n // 8 else None,
    F.MOSTLY_Q5_0: lambda a: Q.Q5_1 if a.has_imatrix and a.i < a.n // 8 else None,
}

# attn_k and attn_q (no experts): IQ3_XS / IQ3_XXS spend fewer bits there
_ATTN_K_Q: dict[LlamaFileType, GGMLQuantizationType] = {F.MOSTLY_IQ3_XS: Q.IQ3_XXS, F.MOSTLY_IQ3_XXS: Q.IQ2_S}

# ffn_gate / ffn_up of IQ3_XS: IQ3_XXS in the middle three quarters of the layers
_FFN_GATE_UP_RULES: dict[LlamaFileType, _Rule] = {
    F.MOSTLY_IQ3_XS: lambda a: Q.IQ3_XXS if a.n // 8 <= a.i < 7 * a.n // 8 else None,
}

# attn_output, by model kind
_ATTN_OUTPUT: dict[str, dict[LlamaFileType, GGMLQuantizationType]] = {
    "dense": {F.MOSTLY_Q2_K: Q.Q3_K, F.MOSTLY_IQ3_XXS: Q.IQ3_S, F.MOSTLY_Q3_K_M: Q.Q4_K,
              F.MOSTLY_Q3_K_L: Q.Q5_K, F.MOSTLY_IQ3_M: Q.Q4_K},
    "8 experts": {f: Q.Q5_K for f in (F.MOSTLY_Q2_K, F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_Q3_K_S,
                                      F.MOSTLY_Q3_K_M, F.MOSTLY_IQ4_NL, F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M,
                                      F.MOSTLY_IQ3_S, F.MOSTLY_IQ3_M, F.MOSTLY_IQ4_XS)},
    "falcon": {F.MOSTLY_Q3_K_L: Q.Q4_K},
}

# output (and a tied token_embd) of the 1- and 2-bit IQ ftypes and IQ3_XXS: Q5_K instead of Q6_K
_OUTPUT_Q5_K = frozenset({F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_IQ1_S,
                          F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_M})

# token_embd of an untied model
_TOKEN_EMBD: dict[LlamaFileType, GGMLQuantizationType] = {
    **{f: Q.Q2_K for f in (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M)},
    **{f: Q.IQ3_S for f in (F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ3_XXS)},
    **{f: Q.Q4_K for f in (F.MOSTLY_TQ1_0, F.MOSTLY_TQ2_0)},
}


@dataclass(frozen=True)
class _LowBit:
    """The 1- and 2-bit IQ ftypes share one rule set, tried before the per-category rules:
    what attn_v-like tensors and the first eighth of ffn_down get (``bump``), and attn_output."""
    bump: GGMLQuantizationType
    attn_output: GGMLQuantizationType | None


_LOW_BIT: dict[LlamaFileType, _LowBit] = {
    F.MOSTLY_IQ2_XXS: _LowBit(Q.Q2_K, None),
    F.MOSTLY_IQ2_XS: _LowBit(Q.Q2_K, None),
    F.MOSTLY_IQ1_S: _LowBit(Q.Q2_K, Q.IQ2_XXS),
    F.MOSTLY_IQ1_M: _LowBit(Q.Q2_K, Q.IQ2_XXS),
    F.MOSTLY_IQ2_S: _LowBit(Q.IQ3_S, Q.IQ3_S),
    F.MOSTLY_IQ2_M: _LowBit(Q.IQ3_S, Q.IQ3_S),
}


class _Walk:
    """The counters llama.cpp keeps in quantize_state_impl while it walks the model once."""

    def __init__(self, arch: str, hp: _HParams, ftype: LlamaFileType, options: RecipeOptions,
                 tied: bool, n_attention_wv: int):
        self.arch, self.hp, self.ftype, self.options = arch, hp, ftype, options
        self.tied = tied
        self.n_attention_wv = n_attention_wv
        self.i_attention_wv = 0
        self.i_ffn = {Category.FFN_DOWN: 0, Category.FFN_GATE: 0, Category.FFN_UP: 0}
        self.is_70b = hp.is_70b(arch)
        self.fname = ftype_name(ftype)

    def layer(self, cat: Category, name: str) -> tuple[int, int]:
        """(layer, n_layer) of an ffn tensor: a running count, or the name's blk.N with experts."""
        n_layer = self.hp.n_layer
        i_layer = self.i_ffn[cat]
        if max(1, self.hp.n_expert) > 1:
            # expert tensors are not in layer order in every model, so read the layer off the name
            parsed = _blk_number(name)
            if parsed is None:
                raise RecipeError(name, "cannot determine the layer (expected blk.N.)")
            if not 0 <= parsed < n_layer:
                raise RecipeError(name, f"layer {parsed} is outside [0, {n_layer})")
            i_layer = parsed
        return i_layer, n_layer

    def _at(self, i: int, n: int) -> _At:
        return _At(i, n, self.hp.n_gqa, self.arch == "falcon", self.options.has_imatrix, self.hp.n_expert)

    def low_bit(self, cat: Category, default: GGMLQuantizationType, rules: _LowBit
                ) -> tuple[GGMLQuantizationType, str]:
        """The 1-/2-bit IQ branch of llama_tensor_get_type_impl (plain counters, no layer parsing)."""
        hp, base = self.hp, f"{self.fname} default {default.name}"
        if cat in _ATTN_V_LIKE:
            i = self.i_attention_wv
            self.i_attention_wv += 1
            t = Q.Q4_K if hp.n_gqa >= 4 or hp.n_expert >= 4 else rules.bump
            return t, f"{self.fname} {cat.value} #{i} -> {t.name}"
        if hp.n_expert == 8 and cat == Category.ATTN_K:
            return Q.Q4_K, f"{self.fname} attn_k, 8 experts -> Q4_K"
        if cat == Category.FFN_DOWN:
            i = self.i_ffn[cat]
            self.i_ffn[cat] += 1
            if i < hp.n_layer // 8:
                return rules.bump, f"{self.fname} ffn_down #{i} of {hp.n_layer} -> {rules.bump.name}"
            return default, base
        if cat == Category.ATTN_OUTPUT:
            t = Q.Q5_K if hp.n_expert == 8 else rules.attn_output
            if t is not None:
                return t, f"{self.fname} attn_output -> {t.name}"
        return default, base

    def mixture(self, name: str, ncols: int, cat: Category, default: GGMLQuantizationType
                ) -> tuple[GGMLQuantizationType, str]:
        """llama_tensor_get_type_impl for the covered ftypes: (type, why)."""
        hp, f = self.hp, self.ftype
        base = f"{self.fname} default {default.name}"

        if any(s in name for s in _ARCH_Q8_0_FLOOR.get(self.arch, ())):
            return Q.Q8_0, f"{self.arch}: {name} kept at Q8_0"

        if cat == Category.OUTPUT or (self.tied and cat == Category.TOKEN_EMBD):
            what = "output" if cat == Category.OUTPUT else "tied token_embd (output rules)"
            if self.options.output_tensor_type is not None:
                t = self.options.output_tensor_type
                return t, f"{what}: output_tensor_type={t.name}"
            if self.arch == "falcon" or ncols % block_size(default) != 0:
                return Q.Q8_0, f"{what}: Q8_0"
            if f in _OUTPUT_Q5_K:
                return Q.Q5_K, f"{what}: Q5_K"
            if default != Q.Q8_0:
                return Q.Q6_K, f"{what}: Q6_K"
            return default, f"{what}: {default.name}"

        if cat == Category.TOKEN_EMBD:
            t = self.options.token_embedding_type
            t = _TOKEN_EMBD.get(f) if t is None else t
            return (t, f"{self.fname} token_embd -> {t.name}") if t is not None else (default, base)

        if f in _LOW_BIT:
            return self.low_bit(cat, default, _LOW_BIT[f])

        if cat in _ATTN_V_LIKE:
            at = self._at(self.i_attention_wv, self.n_attention_wv)
            self.i_attention_wv += 1
            rule = _ATTN_V_RULES.get(f)
            chosen = rule(at) if rule is not None else None
            t, why = (default, base) if chosen is None else (
                chosen, f"{self.fname} {cat.value} #{at.i} of {at.n} -> {chosen.name}")
            if self.is_70b and t in (Q.Q3_K, Q.Q4_K):
                # 8 heads share attn_v in the 70B: more bits cost almost nothing
                t, why = Q.Q5_K, f"{why}; 70B {cat.value} -> Q5_K"
            if hp.n_expert == 8:
                t, why = Q.Q8_0, f"{why}; 8 experts {cat.value} -> Q8_0"
            return t, why

        if cat == Category.ATTN_K and hp.n_expert == 8:
            return Q.Q8_0, f"{self.fname} attn_k, 8 experts -> Q8_0"
        if cat in (Category.ATTN_K, Category.ATTN_Q):
            t = _ATTN_K_Q.get(f)
            return (t, f"{self.fname} {cat.value} -> {t.name}") if t is not None else (default, base)

        if cat in self.i_ffn:
            i_layer, n_layer = self.layer(cat, name)
            self.i_ffn[cat] += 1
            rules = _FFN_DOWN_RULES if cat == Category.FFN_DOWN else _FFN_GATE_UP_RULES
            if f in rules:
                chosen = rules[f](self._at(i_layer, n_layer))
                if chosen is not None:
                    return chosen, f"{self.fname} {cat.value} layer {i_layer} of {n_layer} -> {chosen.name}"
            return default, base

        if cat == Category.ATTN_OUTPUT:
            kind = "falcon" if self.arch == "falcon" else "8 experts" if hp.n_expert == 8 else "dense"
            out = _ATTN_OUTPUT[kind].get(f)
            if out is not None:
                return out, f"{self.fname} attn_output ({kind}) -> {out.name}"
        return default, base


# -- fallback for rows not divisible by the block (tensor_type_fallback) ---------------------------

_FALLBACK: dict[GGMLQuantizationType, GGMLQuantizationType] = {
    **{t: Q.IQ4_NL for t in (Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_XS)},
    **{t: Q.Q4_0 for t in (Q.Q2_K, Q.Q3_K, Q.TQ1_0, Q.TQ2_0)},
    Q.Q4_K: Q.Q5_0,
    Q.Q5_K: Q.Q5_1,
    Q.Q6_K: Q.Q8_0,
}


def fallback(name: str, ncols: int, target: GGMLQuantizationType) -> tuple[GGMLQuantizationType, str | None]:
    """(type, why) for a row of ``ncols`` values: ``target`` if it fits, else llama.cpp's substitute."""
    qk = block_size(target)
    if ncols % qk == 0:
        return target, None
    if target in _FALLBACK:
        new = _FALLBACK[target]
    elif qk <= 32:
        new = target  # already a 32-block type: nothing smaller to demote to, F16 below
    else:
        raise RecipeError(name, f"no tensor type fallback is defined for type {target.name}")
    why = f"{ncols} columns not divisible by {qk}: {target.name} -> "
    if ncols % block_size(new) != 0:
        return Q.F16, why + "F16 (unusual shape)"
    return new, why + new.name


# -- importance-matrix requirement (tensor_requires_imatrix) ---------------------------------------

_IMATRIX_TYPES = frozenset({Q.IQ3_XXS, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ1_M, Q.IQ1_S})


def requires_imatrix(name: str, qtype: GGMLQuantizationType, ftype: LlamaFileType) -> bool:
    """Whether llama.cpp refuses to make this tensor ``qtype`` without an importance matrix."""
    if name in _TOKEN_EMBD_NAMES or name == "output.weight":
        return False
    # k-types do not need one, except the Q2_K tensors of a Q2_K_S file
    return qtype in _IMATRIX_TYPES or (qtype == Q.Q2_K and ftype == F.MOSTLY_Q2_K_S)


def tensors_requiring_imatrix(plans: list[TensorPlan], ftype: LlamaFileType) -> list[TensorPlan]:
    """The quantizable tensors whose planned type needs an importance matrix (llama.cpp refuses them)."""
    return [p for p in plans if p.quantizable and requires_imatrix(p.name, p.type, ftype)]


# -- the whole model -------------------------------------------------------------------------------

_BLK = re.compile(r"blk\.\s*([+-]?\d+)")  # sscanf(name, "blk.%d.", ...)


def _blk_number(name: str) -> int | None:
    m = _BLK.match(name)
    return int(m.group(1)) if m else None


def load_order_key(name: str) -> tuple[int, bytes]:
    """llama_model_loader's weights_map order: layer number (-1 outside blocks), then the name."""
    layer = _blk_number(name)
    return (-1 if layer is None else layer, name.encode())


def in_load_order(plans: list[TensorPlan]) -> list[TensorPlan]:
    """``plans`` in the order llama-quantize writes its output's tensors (llama_model_loader's
    weights_map order, whatever the source's order was)."""
    return sorted(plans, key=lambda p: load_order_key(p.name))


def plan_model(
    tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType]],
    arch: str,
    hparams: Mapping[str, Any],
    ftype: LlamaFileType | int,
    options: RecipeOptions = RecipeOptions(),
    *,
    dry_run: bool = False,
) -> list[TensorPlan]:
    """One ``TensorPlan`` per tensor, in the given order, as ``llama_model_quantize`` would choose.

    Raises ``ImatrixRequiredError`` / ``RequantizeError`` where llama.cpp refuses to quantize
    (unless ``dry_run``, which like llama.cpp's only plans), ``RecipeError`` for impossible plans.
    """
    try:
        ftype = LlamaFileType(ftype)
    except ValueError:
        raise UnknownTypeError(str(ftype), list(FTYPE_NAMES)) from None
    if ftype not in DEFAULT_TYPE:
        raise UnknownTypeError(ftype_name(ftype), list(FTYPE_NAMES))
    default = DEFAULT_TYPE[ftype]
    hp = _HParams.of(hparams)
    fname = ftype_name(ftype)

    names = [t[0] for t in tensors]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise RecipeError(dup, "tensor is duplicated")
    patterns = []
    for pattern, qtype in options.tensor_types:
        try:
            patterns.append((pattern, re.compile(pattern), GGMLQuantizationType(qtype)))
        except re.error as err:
            raise RecipeError("", f"bad tensor-type pattern {pattern!r}: {err}") from None

    walk = _Walk(arch, hp, ftype, options, tied="output.weight" not in names,
                 n_attention_wv=sum(category(n) in _ATTN_V_LIKE for n in names))

    def plan_one(name: str, shape: tuple[int, ...], src: GGMLQuantizationType) -> TensorPlan:
        shape = tuple(int(d) for d in shape)
        ncols = shape[0]
        cat = category(name)

        def fixed(t: GGMLQuantizationType, why: str) -> TensorPlan:
            if ncols % block_size(t) != 0:
                raise RecipeError(name, f"{why}: {ncols} columns are not divisible by {t.name}'s block "
                                        f"of {block_size(t)}")
            return TensorPlan(name, shape, src, t, t, False, why)

        kept = kept_reason(name, shape, arch, options)
        if kept is not None:
            return TensorPlan(name, shape, src, src, src, False, f"{kept} kept {src.name}", quantizable=False)
        if options.token_embedding_type is not None and cat == Category.TOKEN_EMBD and not (
                name == "per_layer_token_embd.weight" and any(rx.search(name) for _, rx, _ in patterns)):
            return fixed(options.token_embedding_type, f"token_embedding_type={options.token_embedding_type.name}")
        if options.output_tensor_type is not None and cat == Category.OUTPUT:
            return fixed(options.output_tensor_type, f"output_tensor_type={options.output_tensor_type.name}")
        if not is_quantized(default):
            return TensorPlan(name, shape, src, default, default, False, f"{fname}: {default.name}")

        manual = next(((p, t) for p, rx, t in patterns if rx.search(name)), None)
        if manual is not None:
            target, why = manual[1], f"override {manual[0]}={manual[1].name}"
        elif options.pure:
            target, why = default, f"pure {default.name}"
        else:
            target, why = walk.mixture(name, ncols, cat, default)
        final, fb = fallback(name, ncols, target)
        return TensorPlan(name, shape, src, target, final, fb is not None, why if fb is None else f"{why}; {fb}")

    plans: list[TensorPlan | None] = [None] * len(tensors)
    order = sorted(range(len(tensors)), key=lambda k: load_order_key(tensors[k][0]))
    for k in order:
        name, shape, src = tensors[k]
        plans[k] = plan_one(name, shape, GGMLQuantizationType(src))
    result: list[TensorPlan] = [p for p in plans if p is not None]

    if not dry_run:
        in_load_order = [result[k] for k in order]
        if not options.has_imatrix:
            for p in tensors_requiring_imatrix(in_load_order, ftype):
                raise ImatrixRequiredError(p.name, p.type.name, fname)
        if not options.allow_requantize:
            for p in in_load_order:
                if p.converts and is_quantized(p.src_type):
                    raise RequantizeError(
                        f"tensor {p.name!r} is already {p.src_type.name}; requantizing to {p.type.name} "
                        "needs --allow-requantize")
    return result
