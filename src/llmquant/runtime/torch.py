"""Hugging Face checkpoints on CPU through torch + transformers: the only module that imports them
(the optional ``[hf]`` extra: ``pip install 'llmquant[hf]'``).

``TorchModel(folder)`` loads an HF folder — fp32 / bf16 / fp16 safetensors, and the quantized
checkpoints transformers loads on CPU: compressed-tensors (decompressed on the first forward, as
transformers does it) and bitsandbytes 4-bit — or quantizes a float folder at load time with
``load="nf4"`` (bitsandbytes NF4, double quant, 64-element blocks, fp32 compute: bf16 is emulated
on AVX2 CPUs and slower). It has the surface of ``runtime.llama.Model`` that eval and bench use:
``n_vocab``, ``add_bos``, ``bos``, ``tokenize``, ``vocab_digest``, ``chunk_logits`` (logits of the
positions ``first..n-1`` of one sequence decoded from an empty cache), ``eval_tokens`` (with a KV
cache, for speed probes) and ``complete`` (greedy text).

Weights are computed in float32 by default whatever their stored dtype (bf16/fp16 are exact in
float32), so a float checkpoint measures like its F32 GGUF rendering in llama.cpp. The folder is
checked before torch is imported: config.json, safetensors weights (PyTorch ``.bin`` pickles only
with ``allow_pickle``, loaded with ``weights_only=True``), and whether its quantization format can
load on CPU here; a load that still fails names the format.

``write_dequantized`` writes a quantized checkpoint's dequantized weights as a float safetensors
folder: the fast path of evaluating a weight-only quantized checkpoint through llama.cpp.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointLoadError, DestinationError, MissingExtraError, ModelFileError, UnsafeFormatError

LOADS = ("nf4",)  # quantize-at-load methods
NF4_BLOCKSIZE = 64  # bitsandbytes' 4-bit block size (Params4bit's default)
# quantization formats transformers loads on CPU with the [hf] extra's packages
CPU_METHODS = ("compressed-tensors", "bitsandbytes")
# formats whose loader needs a package outside the [hf] extra
NEEDS_PACKAGE = {"gptq": "gptqmodel", "awq": "gptqmodel"}
# tokenizer / generation files a saved checkpoint keeps next to its weights
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "chat_template.jinja", "chat_template.json", "generation_config.json", "vocab.json", "merges.txt")


def require_hf(what: str = "Hugging Face formats") -> None:
    """Import torch and transformers, or fail with the one-line install hint."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise MissingExtraError("hf", what) from None


def hf_available() -> bool:
    try:
        require_hf()
    except MissingExtraError:
        return False
    return True


# -- the folder, before any import of torch ----------------------------------------------------------

@dataclass
class FolderInfo:
    """What an HF folder holds, read from its files only."""

    folder: Path
    config: dict
    method: str | None  # quantization_config.quant_method, None for float weights
    quant: dict  # the quantization_config (empty for float weights)
    weight_files: list[Path]
    pickled: bool  # weights only as PyTorch .bin pickles

    @property
    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.weight_files)

    @property
    def max_positions(self) -> int | None:
        n = self.config.get("max_position_embeddings") or (self.config.get("text_config") or {}).get("max_position_embeddings")
        return int(n) if isinstance(n, int) else None

    @property
    def dtype(self) -> str | None:
        d = self.config.get("torch_dtype") or self.config.get("dtype")
        return d if isinstance(d, str) else None


def is_hf_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def inspect_folder(folder: str | Path, *, allow_pickle: bool = False) -> FolderInfo:
    """Validate an HF folder without loading anything heavy."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFileError(folder, "no such folder; expected a Hugging Face model folder with config.json")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelFileError(folder, "no config.json: not a Hugging Face model folder (or an incomplete download)")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFileError(cfg_path, f"is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelFileError(cfg_path, "expected a JSON object")
    quant = config.get("quantization_config")
    quant = quant if isinstance(quant, dict) else {}
    method = quant.get("quant_method") if quant else None
    if method is not None:
        method = str(method)
    weights = sorted(folder.glob("*.safetensors"))
    pickled = False
    if not weights:
        pickles = sorted(folder.glob("pytorch_model*.bin"))
        if not pickles:
            raise ModelFileError(folder, "no weights: expected model.safetensors (or model-*-of-*.safetensors)")
        if not allow_pickle:
            raise UnsafeFormatError(
                pickles[0], "is a PyTorch pickle; unpickling can run arbitrary code, so llmquant reads only "
                "safetensors. Convert it to safetensors, or pass --allow-pickle if you trust its origin "
                "(it is then loaded with weights_only=True)")
        weights, pickled = pickles, True
    return FolderInfo(folder, config, method, quant, weights, pickled)


def describe(info: FolderInfo, load: str | None = None) -> str:
    """A short format label: F32, BF16, NF4, compressed-tensors W4A16 g64, ..."""
    if load == "nf4" or (info.method == "bitsandbytes" and info.quant.get("bnb_4bit_quant_type") == "nf4"):
        return "NF4"
    if info.method == "bitsandbytes":
        return "bnb 4-bit FP4" if info.quant.get("load_in_4bit") else "bnb int8"
    if info.method == "compressed-tensors":
        groups = info.quant.get("config_groups") or {}
        w = next(iter(groups.values()), {}).get("weights") or {}
        bits, gs = w.get("num_bits"), w.get("group_size")
        return f"compressed-tensors W{bits}A16" + (f" g{gs}" if gs else "")
    if info.method is not None:
        return info.method
    return {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(info.dtype or "", info.dtype or "?")


def _check_loadable(info: FolderInfo) -> None:
    method = info.method
    if method is None or method in CPU_METHODS:
        return
    pkg = NEEDS_PACKAGE.get(method.lower())
    if pkg is not None:
        import importlib.util

        if importlib.util.find_spec(pkg) is None:
            raise CheckpointLoadError(
                info.folder, method, f"transformers loads {method} checkpoints only through {pkg} "
                f"(pip install {pkg}), which is not installed; compressed-tensors and bitsandbytes load natively")


# -- the model ----------------------------------------------------------------------------------------

@dataclass
class Quantization:
    method: str | None  # None: float weights
    label: str  # F32, NF4, compressed-tensors W4A16 g64, ...
    details: dict = field(default_factory=dict)


class TorchModel:
    """A Hugging Face folder loaded with transformers on CPU: ``TorchModel(folder, load="nf4")``."""

    def __init__(self, folder: str | Path, *, load: str | None = None, dtype: str = "float32",
                 threads: int | None = None, allow_pickle: bool = False, dequantize: bool = False):
        self.path = Path(folder)
        self.info = inspect_folder(self.path, allow_pickle=allow_pickle)
        if load is not None and load not in LOADS:
            raise ValueError(f"unknown load-time quantization {load!r}; expected one of: {', '.join(LOADS)}")
        if load is not None and self.info.method is not None:
            raise CheckpointLoadError(self.path, self.info.method,
                                      f"--load {load} quantizes a float checkpoint; this one is already quantized")
        require_hf(f"loading {self.path.name} with transformers")
        _check_loadable(self.info)
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..system import default_threads

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        torch.set_num_threads(default_threads(threads))  # torch's pool is process-wide
        self.load = load
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                       "auto": "auto"}[dtype]
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "device_map": "cpu",
                                  "use_safetensors": not self.info.pickled}
        if load == "nf4":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32 if torch_dtype == "auto" else torch_dtype)
        elif dequantize and self.info.method == "compressed-tensors":
            from transformers import CompressedTensorsConfig

            kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        t0 = time.perf_counter()
        method = "bitsandbytes NF4" if load == "nf4" else (self.info.method or "float")
        try:
            with warnings.catch_warnings():  # "the quantization_config from the model will be used" etc.
                warnings.simplefilter("ignore")
                self._model = AutoModelForCausalLM.from_pretrained(str(self.path), **kwargs)
            self._tok = AutoTokenizer.from_pretrained(str(self.path))
        except (ImportError, OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointLoadError(self.path, method, first[:300]) from None
        self.load_seconds = time.perf_counter() - t0
        self._model.eval()
        if torch_dtype != "auto":
            for m in self._model.modules():  # a saved bnb checkpoint records bf16 compute: run fp32 here
                if hasattr(m, "compute_dtype") and getattr(m, "compute_dtype", None) is not None:
                    m.compute_dtype = torch_dtype
        if dequantize and getattr(self._model, "hf_quantizer", None) is not None and self.info.method != "compressed-tensors":
            self._model = self._model.dequantize()
        self._past = None
        cfg = self._model.config.get_text_config() if hasattr(self._model.config, "get_text_config") else self._model.config
        self._n_vocab = int(self._model.get_output_embeddings().weight.shape[0]) if load is None and self.info.method is None \
            else int(cfg.vocab_size)
        self._n_ctx_train = int(getattr(cfg, "max_position_embeddings", 0) or 0) or None

    # -- facts ----------------------------------------------------------------------------------------
    @property
    def quantization(self) -> Quantization:
        if self.load == "nf4" or self.info.method == "bitsandbytes":
            qs = None
            for p in self._model.parameters():
                if hasattr(p, "quant_state") and p.quant_state is not None:
                    qs = p.quant_state
                    break
            details = {"quant_type": getattr(qs, "quant_type", None), "blocksize": getattr(qs, "blocksize", None),
                       "double_quant": bool(getattr(qs, "nested", False)),
                       "compute_dtype": str(next((m.compute_dtype for m in self._model.modules()
                                                  if getattr(m, "compute_dtype", None) is not None), None)).removeprefix("torch.")}
            return Quantization("bitsandbytes", describe(self.info, self.load), details)
        if self.info.method is not None:
            return Quantization(self.info.method, describe(self.info), dict(self.info.quant))
        return Quantization(None, describe(self.info), {"dtype": self.info.dtype})

    @property
    def memory_bytes(self) -> int:
        """Bytes of the parameters and buffers as loaded (transformers' get_memory_footprint)."""
        return int(self._model.get_memory_footprint())

    @property
    def file_bytes(self) -> int:
        return self.info.file_bytes

    @property
    def n_params(self) -> int:
        """Parameters of the original (unquantized) model: 4-bit packed weights count by their shape."""
        total = 0
        seen: set[int] = set()  # a tied output matrix is one parameter
        for _, module in self._model.named_modules():
            shape = getattr(module, "weight_shape", None)
            for name, p in module.named_parameters(recurse=False):
                if id(p) in seen or (shape is not None and name.startswith("weight")):
                    continue
                seen.add(id(p))
                qs = getattr(p, "quant_state", None)
                total += int(np.prod(qs.shape)) if qs is not None else p.numel()
            if shape is not None:
                total += int(np.prod([int(x) for x in shape.tolist()]))
        return total

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def n_ctx_train(self) -> int | None:
        return self._n_ctx_train

    # -- tokenizer ------------------------------------------------------------------------------------
    @property
    def bos(self) -> int:
        b = self._tok.bos_token_id
        return int(b) if b is not None else -1

    @property
    def eos(self) -> int:
        e = self._tok.eos_token_id
        return int(e) if e is not None else -1

    @property
    def add_bos(self) -> bool:
        """Whether the tokenizer puts BOS in front of a text (its post-processor does)."""
        ids = self._tok("a", add_special_tokens=True).input_ids
        return self._tok.bos_token_id is not None and bool(ids) and ids[0] == self._tok.bos_token_id

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        ids = list(self._tok(text, add_special_tokens=False, split_special_tokens=not special).input_ids)
        return ([self.bos] if add_bos and self.add_bos else []) + ids

    def detokenize(self, tokens: list[int]) -> str:
        return self._tok.decode(list(tokens))

    def vocab_digest(self) -> str:
        """SHA-256 of every token's text in id order — the digest runtime.llama.Model computes from
        a GGUF's vocabulary (ids past the tokenizer padded as convert_hf_to_gguf pads them)."""
        import hashlib

        h = hashlib.sha256()
        n_tok = len(self._tok)
        texts = self._tok.convert_ids_to_tokens(list(range(min(n_tok, self.n_vocab))))
        for i in range(self.n_vocab):
            t = texts[i] if i < len(texts) and texts[i] is not None else f"[PAD{i}]"
            h.update(t.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()

    # -- logits -----------------------------------------------------------------------------------------
    def chunk_logits(self, tokens: list[int] | np.ndarray, first: int = 0) -> np.ndarray:
        """Logits of positions ``first..len(tokens)-1`` of ``tokens`` decoded as one sequence from an
        empty cache: (len(tokens) - first, n_vocab) float32. The output layer runs on those only."""
        import torch

        ids = np.asarray(tokens, dtype=np.int64)
        n = len(ids)
        if not 0 <= first < n:
            raise ValueError(f"chunk of {n} tokens with first output {first}")
        with torch.inference_mode():
            out = self._model(input_ids=torch.from_numpy(ids)[None], use_cache=False, logits_to_keep=n - first)
        return out.logits[0].to(torch.float32).numpy()

    def eval_tokens(self, tokens: list[int], *, reset: bool = False) -> None:
        """Run ``tokens`` through the model, appending to the KV cache unless ``reset``."""
        import torch

        if reset:
            self._past = None
        with torch.inference_mode():
            out = self._model(input_ids=torch.tensor([list(tokens)], dtype=torch.long),
                              past_key_values=self._past, use_cache=True, logits_to_keep=1)
        self._past = out.past_key_values

    def complete(self, prompt: str, *, max_tokens: int = 16) -> str:
        """Greedy continuation of ``prompt`` (text only)."""
        import torch

        ids = torch.tensor([self.tokenize(prompt, add_bos=True)], dtype=torch.long)
        with torch.inference_mode():
            out = self._model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                       do_sample=False, pad_token_id=self._tok.pad_token_id or self.eos)
        return self._tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    # -- saving -------------------------------------------------------------------------------------------
    def save_pretrained(self, dst: str | Path, *, force: bool = False) -> Path:
        """The loaded model (NF4 after ``load="nf4"``) as an HF folder, written atomically."""
        dst = Path(dst)
        with _atomic_folder(dst, force) as tmp:
            self._model.save_pretrained(str(tmp))
            self._tok.save_pretrained(str(tmp))
            _copy_side_files(self.path, tmp)
        return dst

    def close(self) -> None:
        self._model = None
        self._past = None

    def __enter__(self) -> "TorchModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _atomic_folder:
    """A temporary folder beside ``dst`` renamed to ``dst`` when the block succeeds."""

    def __init__(self, dst: Path, force: bool):
        if dst.exists() and not force:
            raise DestinationError(dst, "exists; pass force=True (--force) to replace it")
        if not dst.parent.is_dir():
            raise DestinationError(dst, "its parent folder does not exist")
        self.dst = dst
        self.tmp = dst.parent / f".llmquant-tmp-{os.getpid()}-{dst.name}"

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for p in self.tmp.iterdir():
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        if self.dst.exists():
            old = self.dst.parent / f".llmquant-old-{os.getpid()}-{self.dst.name}"
            self.dst.rename(old)
            self.tmp.rename(self.dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(self.dst)


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in SIDE_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


def write_dequantized(folder: str | Path, dst: str | Path, *, dtype: str = "float32",
                      allow_pickle: bool = False, force: bool = False) -> Path:
    """The dequantized weights of a quantized checkpoint (compressed-tensors, bitsandbytes, or any
    format transformers dequantizes on load) as a float safetensors folder with the same config
    (less ``quantization_config``) and tokenizer files: what llmquant convert turns into an
    F32/F16 GGUF for the fast path."""
    from safetensors.torch import save_file

    dst = Path(dst)
    with TorchModel(folder, dtype=dtype, allow_pickle=allow_pickle, dequantize=True) as m:
        model = m._model
        state: dict = {}
        seen: set[int] = set()
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        for name, t in model.state_dict().items():
            if tied and name == "lm_head.weight":
                continue
            if not t.is_floating_point():
                raise CheckpointLoadError(m.path, m.info.method or "float",
                                          f"tensor {name} is still {t.dtype} after dequantizing")
            if t.data_ptr() in seen and t.numel():
                continue
            seen.add(t.data_ptr())
            state[name] = t.detach().to(getattr(__import__("torch"), dtype)).contiguous()
        config = dict(m.info.config)
        config.pop("quantization_config", None)
        config["torch_dtype"] = dtype
        config.pop("dtype", None)
        with _atomic_folder(dst, force) as tmp:
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            _copy_side_files(m.path, tmp)
    return dst
