"""``inspect``: what a GGUF holds — architecture, sizes, bits per weight, hyper-parameters,
tokenizer and chat template, and a per-type summary of its tensors. Metadata only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .source import GGUFSource


@dataclass
class ModelInfo:
    path: str
    architecture: str
    name: str | None
    file_type: str | None
    file_bytes: int
    tensor_bytes: int
    n_params: int
    n_tensors: int
    context_length: int | None
    n_layer: int | None
    n_embd: int | None
    n_head: int | None
    n_head_kv: int | None
    n_ff: int | None
    vocab_size: int | None
    tokenizer_model: str | None
    has_chat_template: bool
    gguf_version: int
    types: dict[str, dict[str, int]]
    tensors: list[dict] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.tensor_bytes / max(self.n_params, 1)

    def to_dict(self, with_tensors: bool = False) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "tensors"}
        d["bits_per_weight"] = round(self.bits_per_weight, 4)
        if with_tensors:
            d["tensors"] = self.tensors
        return d


def inspect_model(path: str | Path) -> ModelInfo:
    with GGUFSource(path) as src:
        types: dict[str, dict[str, int]] = {}
        tensors = []
        for t in src.tensors:
            entry = types.setdefault(t.type.name, {"tensors": 0, "bytes": 0, "params": 0})
            entry["tensors"] += 1
            entry["bytes"] += t.n_bytes
            entry["params"] += t.n_elements
            tensors.append({"name": t.name, "shape": list(t.shape), "type": t.type.name, "bytes": t.n_bytes})
        tokens = src.get("tokenizer.ggml.tokens")
        ftype = src.file_type
        return ModelInfo(
            path=str(src.path),
            architecture=src.arch,
            name=src.get("general.name"),
            file_type=ftype.name.removeprefix("MOSTLY_") if ftype is not None else None,
            file_bytes=src.file_bytes,
            tensor_bytes=src.tensor_bytes,
            n_params=src.n_params,
            n_tensors=len(src.tensors),
            context_length=src.arch_get("context_length"),
            n_layer=src.arch_get("block_count"),
            n_embd=src.arch_get("embedding_length"),
            n_head=src.arch_get("attention.head_count"),
            n_head_kv=src.arch_get("attention.head_count_kv"),
            n_ff=src.arch_get("feed_forward_length"),
            vocab_size=len(tokens) if isinstance(tokens, list) else src.arch_get("vocab_size"),
            tokenizer_model=src.get("tokenizer.ggml.model"),
            has_chat_template=bool(src.get("tokenizer.chat_template")),
            gguf_version=src.header.version,
            types=dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"])),
            tensors=tensors,
        )
