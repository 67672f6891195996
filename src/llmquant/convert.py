"""The convert pipeline: Hugging Face folder -> GGUF, as llama.cpp's convert_hf_to_gguf.py.

source (sources/hf_source.py) -> per-tensor type (``convert_type``, the converter's rules) ->
formats (byte-identical to libggml) -> atomic writer, one tensor at a time: peak memory is one
tensor's float32 copy plus its output bytes. ``quantize`` chains ``llmquant quantize`` on the
result (through a hidden intermediate file that is removed afterwards), which turns the usual
two steps (convert_hf_to_gguf.py, then llama-quantize) into one.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType, LlamaFileType, naming_convention

from .errors import TensorDataError, UnknownTypeError
from .formats import get_format
from .hf.source import HFSource, HFTensor
from .gguf.writer import TEMP_PREFIX, AtomicGGUFWriter, check_destination, tensor_nbytes

T = GGMLQuantizationType
OUTTYPES: dict[str, LlamaFileType | None] = {
    "f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0, "auto": None,
}
_FTYPE_TYPE = {LlamaFileType.ALL_F32: T.F32, LlamaFileType.MOSTLY_F16: T.F16,
               LlamaFileType.MOSTLY_BF16: T.BF16, LlamaFileType.MOSTLY_Q8_0: T.Q8_0}

# prepare_tensors: tensors kept in F32 whatever the outtype (they also stay F32 in llama-quantize)
_ALWAYS_F32 = tuple(TENSOR_NAMES[getattr(MODEL_TENSOR, k)] for k in (
    "FFN_GATE_INP", "FFN_GATE_INP_SHEXP", "POS_EMBD", "TOKEN_TYPES", "SSM_CONV1D", "SHORTCONV_CONV",
    "TIME_MIX_FIRST", "TIME_MIX_W1", "TIME_MIX_W2", "TIME_MIX_DECAY_W1", "TIME_MIX_DECAY_W2",
    "TIME_MIX_LERP_FUSED", "POSNET_NORM1", "POSNET_NORM2", "V_ENC_EMBD_POS", "A_ENC_EMBD_POS",
    "ALTUP_CORRECT_COEF", "ALTUP_PREDICT_COEF", "SSM_CONV1D_Q", "SSM_CONV1D_K", "SSM_CONV1D_V", "INDEXER_PROJ",
) if hasattr(MODEL_TENSOR, k))

_SLICE_VALUES = 1 << 21  # values per quantization slice (8 MiB of float32)

ProgressFn = Callable[[int, int, str], None]


def parse_outtype(name: str) -> LlamaFileType | None:
    try:
        return OUTTYPES[name.lower()]
    except KeyError:
        raise UnknownTypeError(name, list(OUTTYPES)) from None


def convert_type(name: str, n_dims: int, row_length: int, ftype: LlamaFileType) -> tuple[GGMLQuantizationType, str]:
    """(ggml type, reason) for one output tensor: convert_hf_to_gguf's ``prepare_tensors`` rules."""
    if n_dims <= 1 or name.endswith("_norm.weight"):
        return T.F32, "1-D or norm: always F32"
    stem = name.removesuffix(".weight")
    if any(stem == tpl or _matches_template(stem, tpl) for tpl in _ALWAYS_F32) or not name.endswith(".weight"):
        return T.F32, "kept in F32 by the converter"
    qtype = _FTYPE_TYPE[ftype]
    if qtype == T.Q8_0 and row_length % 32:
        return T.F16, f"row length {row_length} is not a multiple of 32: F16 (as the converter falls back)"
    return qtype, ""


def _matches_template(stem: str, template: str) -> bool:
    if "{bid}" not in template:
        return False
    head, _, tail = template.partition("{bid}")
    middle = stem[len(head):len(stem) - len(tail)] if stem.startswith(head) and stem.endswith(tail) else ""
    return middle.isdecimal()


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # ggml order
    src_dtype: str
    type: GGMLQuantizationType
    reason: str = ""


@dataclass
class ConvertResult:
    source: str
    destination: str
    architecture: str
    hf_architecture: str
    outtype: str
    plans: list[TensorPlan]
    n_params: int
    file_bytes: int
    seconds: float
    tokenizer: str
    pre_tokenizer: str
    vocab_size: int
    quantized_to: str | None = None
    notes: list[str] = field(default_factory=list)
    quantized_types: dict[str, dict[str, int]] | None = None  # per type, after --quantize

    @property
    def output_bytes(self) -> int:
        return sum(tensor_nbytes(p.shape, p.type) for p in self.plans)

    def type_counts(self) -> dict[str, dict[str, int]]:
        """Tensors, bytes and parameters per ggml type of the written file."""
        if self.quantized_types is not None:
            return self.quantized_types
        from .quantize import plan_type_counts

        return plan_type_counts(self.plans)

    def to_dict(self) -> dict:
        return {
            "source": self.source, "destination": self.destination, "architecture": self.architecture,
            "hf_architecture": self.hf_architecture, "outtype": self.outtype, "quantized_to": self.quantized_to,
            "n_params": self.n_params, "file_bytes": self.file_bytes, "seconds": round(self.seconds, 3),
            "tokenizer": self.tokenizer, "pre_tokenizer": self.pre_tokenizer, "vocab_size": self.vocab_size,
            "types": self.type_counts(), "notes": self.notes,
            "tensors": [{"name": p.name, "shape": list(p.shape), "source_dtype": p.src_dtype, "type": p.type.name,
                         "reason": p.reason} for p in self.plans],
        }


def plan_tensors(src: HFSource, ftype: LlamaFileType) -> list[TensorPlan]:
    return [TensorPlan(t.name, t.shape, t.src_dtype, *convert_type(t.name, len(t.shape), t.shape[0], ftype))
            for t in src.tensors]


def default_output_name(src: HFSource, ftype: LlamaFileType) -> str:
    """The converter's default file name (gguf naming convention), e.g. SmolLM2-135M-Instruct-F16.gguf."""
    from gguf import Metadata, size_label

    meta = Metadata.load(None, src.folder, None, src.n_params)
    name = meta.name or src.folder.name
    label = meta.size_label or size_label(src.n_params, src.n_params, 0, 0)
    return naming_convention(name, meta.basename, meta.finetune, meta.version, label, ftype.name.partition("_")[2]) + ".gguf"


def convert_model(
    hf_dir: str | Path,
    dst_path: str | Path | None = None,
    outtype: str | LlamaFileType | None = "auto",
    *,
    quantize: LlamaFileType | None = None,
    threads: int = 1,
    force: bool = False,
    allow_pickle: bool = False,
    progress: ProgressFn | None = None,
    split_max_size: int = 0,
) -> ConvertResult:
    """Convert the Hugging Face folder ``hf_dir`` to a GGUF at ``dst_path`` (written atomically).

    ``outtype``: "f32", "f16", "bf16", "q8_0" or "auto" (BF16/F16 as the weights are stored).
    ``quantize``: then quantize that GGUF to this file type with llmquant's quantizer (the
    intermediate file is removed; only ``dst_path`` remains)."""
    t0 = time.perf_counter()
    ftype = parse_outtype(outtype) if isinstance(outtype, str) else outtype  # None: auto
    with HFSource(hf_dir, allow_pickle=allow_pickle) as src:
        if ftype is None:
            ftype = src.guessed_ftype()
        if dst_path is None:
            dst_path = Path.cwd() / default_output_name(src, quantize or ftype)
        dst = check_destination(dst_path, force=force)
        plans = plan_tensors(src, ftype)
        notes: list[str] = []
        quantized_types = None
        if quantize is not None:
            mid = dst.parent / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-convert-{dst.name}"
            try:
                _write(src, mid, ftype, plans, force=False, progress=progress)
                from .quantize import quantize_model

                q = quantize_model(mid, dst, quantize, threads=threads, force=force, split_max_size=split_max_size)
                dst = Path(q.destination)
                notes += q.notes
                quantized_types = q.type_counts()
            finally:
                mid.unlink(missing_ok=True)
        else:
            dst = _write(src, dst, ftype, plans, force=force, progress=progress, split_max_size=split_max_size)
        from .gguf.recipes import ftype_name
        from .gguf.split import split_index, split_path

        parsed = split_index(dst)
        parts = [split_path(parsed[0], i, parsed[2]) for i in range(parsed[2])] if parsed and parsed[1] == 0 else [dst]

        return ConvertResult(
            source=str(src.folder), destination=str(dst), architecture=src.arch, hf_architecture=src.hf_arch,
            outtype=ftype.name.partition("_")[2], plans=plans, n_params=src.n_params, file_bytes=sum(p.stat().st_size for p in parts),
            seconds=time.perf_counter() - t0, tokenizer=src.vocab.model, pre_tokenizer=src.vocab.pre,
            vocab_size=len(src.vocab), quantized_to=ftype_name(quantize) if quantize is not None else None, notes=notes,
            quantized_types=quantized_types,
        )


def _write(src: HFSource, dst: Path, ftype: LlamaFileType, plans: list[TensorPlan], *, force: bool,
           progress: ProgressFn | None, split_max_size: int = 0) -> Path:
    """Write the GGUF (or its split parts); returns the file llama.cpp loads (the first part)."""
    with AtomicGGUFWriter(dst, src.arch, force=force, split_max_size=split_max_size) as writer:
        for f in src.fields(ftype):
            writer.add_field(f)
        for p in plans:
            writer.add_tensor_info(p.name, p.shape, p.type)
        writer.start()
        for i, p in enumerate(plans):
            if progress:
                progress(i, len(plans), f"{p.name} -> {p.type.name}")
            writer.write_tensor(p.name, _encode(src.info(p.name), p))
        if progress:
            progress(len(plans), len(plans), "done")
        writer.commit()
        return writer.destinations[0]


def _encode(t: HFTensor, plan: TensorPlan) -> np.ndarray:
    values = t.load()
    if values.shape != t.numpy_shape:
        raise TensorDataError(t.hf_name, f"read shape {values.shape}, expected {t.numpy_shape}")
    if plan.type == T.F32:
        return values
    # in slices of rows, so that a format's temporaries stay small beside the one float32 copy
    rows = values.reshape(-1, plan.shape[0])
    fmt = get_format(plan.type)
    out = np.empty((rows.shape[0], fmt.row_size(rows.shape[1])), dtype=np.uint8)
    step = max(1, _SLICE_VALUES // rows.shape[1])
    for i in range(0, rows.shape[0], step):
        out[i:i + step] = fmt.quantize(rows[i:i + step])
    return out
