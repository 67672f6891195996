"""``inspect`` for a Hugging Face folder: architecture, parameters, the quantization scheme of a
GPTQ / AWQ / compressed-tensors checkpoint (bits, group size, symmetry, act-order, on-disk format)
and what its weights take in memory. Headers only (config.json and the safetensors tables).

A quantized linear keeps its logical shape only implicitly: the packed int32 tensor holds
32 / bits codes per element, along the input for GPTQ v1 (``qweight`` [in·b/32, out]) and
compressed-tensors pack-quantized (``weight_packed`` [out, in·b/32]) and along the output for
AWQ GEMM (``qweight`` [in, out·b/32]); scales, zero points, ``g_idx`` and ``weight_shape`` are its
overhead, not parameters (as AutoGPTQ, AutoAWQ and compressed-tensors lay them out).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelFileError
from .safetensors import open_checkpoint

# per method: the packed tensor's suffix and the axis it packs (0 rows, 1 columns); then every
# tensor name part that belongs to a quantized linear's storage
PACKED = {
    "gptq": ("qweight", 0),
    "awq": ("qweight", 1),
    "compressed-tensors": ("weight_packed", 1),
}
QUANT_PARTS = {"qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_scale", "weight_zero_point",
               "weight_shape", "weight_g_idx"}


@dataclass
class Scheme:
    """How a checkpoint's linears are quantized."""

    method: str  # gptq | awq | compressed-tensors
    format: str  # gptq v1 | awq gemm | pack-quantized | ...
    bits: int
    group_size: int | None  # None: one scale per output channel
    symmetric: bool
    act_order: str | None  # static | group | None
    ignored: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        g = f" g{self.group_size}" if self.group_size else " per-channel"
        name = {"gptq": "GPTQ", "awq": "AWQ", "compressed-tensors": "compressed-tensors"}[self.method]
        return f"{name} W{self.bits}A16{g} {'sym' if self.symmetric else 'asym'}"


def scheme_of(config: dict, where: object) -> Scheme | None:
    """The scheme of config.json's ``quantization_config``; None for float weights."""
    q = config.get("quantization_config")
    if not isinstance(q, dict) or not q:
        return None
    method = str(q.get("quant_method", "")).lower()
    try:
        if method == "gptq":
            desc = bool(q.get("desc_act"))
            fmt = {"gptq": "gptq v1", "gptq_v2": "gptq v2"}.get(str(q.get("checkpoint_format", "gptq")), str(q.get("checkpoint_format")))
            return Scheme("gptq", fmt, int(q["bits"]),
                          _group(q.get("group_size")), bool(q.get("sym", True)), "group" if desc else None)
        if method == "awq":
            return Scheme("awq", f"awq {q.get('version', 'gemm')}", int(q.get("bits", q.get("w_bit", 4))),
                          _group(q.get("group_size", q.get("q_group_size"))), not bool(q.get("zero_point", True)),
                          None, list(q.get("modules_to_not_convert") or []))
        if method == "compressed-tensors":
            groups = q.get("config_groups") or {}
            g = next(iter(groups.values()))
            w = g["weights"]
            act = w.get("actorder")
            return Scheme("compressed-tensors", str(g.get("format") or q.get("format")), int(w["num_bits"]),
                          _group(w.get("group_size")), bool(w.get("symmetric", True)),
                          str(act) if act else None, list(q.get("ignore") or []))
    except (KeyError, TypeError, ValueError, StopIteration, AttributeError) as exc:
        raise ModelFileError(where, f"quantization_config for {method} lacks or mistypes a field ({exc!r})") from None
    return Scheme(method, method, 0, None, True, None)  # another method: named, not sized


def _group(v) -> int | None:
    return int(v) if isinstance(v, int) and v > 0 else None


@dataclass
class HFModelInfo:
    path: str
    architecture: str
    model_type: str | None
    dtype: str | None
    scheme: Scheme | None
    file_bytes: int
    tensor_bytes: int
    n_params: int  # logical: packed codes counted as the weights they hold
    n_tensors: int
    quantized_linears: int
    quantized_params: int
    quantized_bytes: int  # packed codes + scales + zero points + g_idx of the quantized linears
    context_length: int | None
    n_layer: int | None
    n_embd: int | None
    n_head: int | None
    n_head_kv: int | None
    n_ff: int | None
    vocab_size: int | None
    has_tokenizer: bool
    has_chat_template: bool
    kinds: dict[str, dict[str, int]]
    tensors: list[dict] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.tensor_bytes / max(self.n_params, 1)

    @property
    def quantized_bits_per_weight(self) -> float | None:
        return 8.0 * self.quantized_bytes / self.quantized_params if self.quantized_params else None

    @property
    def dequantized_bytes(self) -> int:
        """The weights once unpacked to the checkpoint's float dtype (what a dequantizing loader holds)."""
        size = {"float32": 4, "float16": 2, "bfloat16": 2}.get(self.dtype or "", 2)
        return self.tensor_bytes - self.quantized_bytes + size * self.quantized_params

    def to_dict(self, with_tensors: bool = False) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("tensors", "scheme")}
        d["format"] = "hf"
        d["scheme"] = None if self.scheme is None else {**self.scheme.__dict__, "label": self.scheme.label}
        d["bits_per_weight"] = round(self.bits_per_weight, 4)
        q = self.quantized_bits_per_weight
        d["quantized_bits_per_weight"] = None if q is None else round(q, 4)
        d["memory"] = {"as_stored": self.tensor_bytes, "dequantized": self.dequantized_bytes}
        if with_tensors:
            d["tensors"] = self.tensors
        return d


def _text_config(config: dict) -> dict:
    t = config.get("text_config")
    return t if isinstance(t, dict) else config


def inspect_hf(folder: str | Path) -> HFModelInfo:
    """What an HF folder holds, from config.json and the safetensors headers (no weights read)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelFileError(folder, "no config.json: not a Hugging Face model folder (or an incomplete download)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(cfg_path, f"is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelFileError(cfg_path, "expected a JSON object")
    scheme = scheme_of(config, cfg_path)
    checkpoint = open_checkpoint(folder)
    entries = checkpoint.entries
    if not entries:
        raise ModelFileError(folder, "no weights: expected model.safetensors (or model-*-of-*.safetensors)")
    dtype = config.get("torch_dtype") or config.get("dtype")
    by_module: dict[str, dict[str, object]] = {}
    for e in entries:
        module, _, part = e.name.rpartition(".")
        by_module.setdefault(module, {})[part] = e
    packed = PACKED.get(scheme.method) if scheme is not None else None  # another method: sized as stored
    n_params = quantized_params = quantized_bytes = quantized = 0
    kinds: dict[str, dict[str, int]] = {}
    tensors: list[dict] = []

    def add(kind: str, params: int, nbytes: int, n: int = 1) -> None:
        k = kinds.setdefault(kind, {"tensors": 0, "params": 0, "bytes": 0})
        k["tensors"] += n
        k["params"] += params
        k["bytes"] += nbytes

    for module, parts in by_module.items():
        core = parts.get(packed[0]) if packed else None
        if core is not None and scheme is not None and scheme.bits > 0:
            if len(core.shape) != 2 or core.dtype != "I32":
                raise ModelFileError(core.path, f"tensor {core.name}: a packed {scheme.method} weight should be "
                                     f"2-D int32, is {core.dtype} {list(core.shape)}")
            shape = list(core.shape)
            shape[packed[1]] = shape[packed[1]] * 32 // scheme.bits
            params = shape[0] * shape[1]
            own = [e for p, e in parts.items() if p in QUANT_PARTS]
            nbytes = sum(e.n_bytes for e in own)
            quantized += 1
            quantized_params += params
            quantized_bytes += nbytes
            n_params += params
            add(f"int{scheme.bits} packed", params, nbytes)
            logical = shape[::-1] if scheme.method in ("gptq", "awq") else shape  # torch's [out, in]
            tensors.append({"name": f"{module}.weight", "shape": logical, "dtype": f"int{scheme.bits}",
                            "bytes": nbytes, "stored_as": sorted(p for p in parts if p in QUANT_PARTS)})
            rest = [e for p, e in parts.items() if p not in QUANT_PARTS]
        else:
            rest = list(parts.values())
        for e in rest:
            n_params += e.n_elements
            add(e.dtype, e.n_elements, e.n_bytes)
            tensors.append({"name": e.name, "shape": list(e.shape), "dtype": e.dtype, "bytes": e.n_bytes})
    if packed and scheme is not None and scheme.bits > 0 and not quantized:
        raise ModelFileError(folder, f"config.json says {scheme.method}, but no tensor ends in .{packed[0]}")
    t = _text_config(config)

    def num(*keys):
        for k in keys:
            v = t.get(k)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        return None

    archs = config.get("architectures")
    tok = folder / "tokenizer_config.json"
    template = (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file()
    if not template and tok.is_file():
        try:
            template = bool(json.loads(tok.read_text(encoding="utf-8")).get("chat_template"))
        except (OSError, ValueError, AttributeError):
            template = False
    return HFModelInfo(
        path=str(folder), architecture=str(archs[0]) if isinstance(archs, list) and archs else "?",
        model_type=t.get("model_type") if isinstance(t.get("model_type"), str) else None,
        dtype=dtype if isinstance(dtype, str) else None, scheme=scheme,
        file_bytes=sum(f.stat().st_size for f in checkpoint.files),
        tensor_bytes=sum(e.n_bytes for e in entries), n_params=n_params, n_tensors=len(entries),
        quantized_linears=quantized, quantized_params=quantized_params, quantized_bytes=quantized_bytes,
        context_length=num("max_position_embeddings"), n_layer=num("num_hidden_layers", "n_layer"),
        n_embd=num("hidden_size", "n_embd"), n_head=num("num_attention_heads", "n_head"),
        n_head_kv=num("num_key_value_heads", "num_attention_heads"), n_ff=num("intermediate_size"),
        vocab_size=num("vocab_size"), has_tokenizer=(folder / "tokenizer.json").is_file(),
        has_chat_template=template, kinds=kinds, tensors=tensors,
    )
