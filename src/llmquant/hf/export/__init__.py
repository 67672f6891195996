"""Quantized Hugging Face folders, written atomically: compressed-tensors, GPTQ v1, AWQ GEMM.

``ExportFolder`` builds the folder under a temporary name beside the destination (one safetensors
shard per decoder layer, written as soon as that layer is quantized, so nothing accumulates in
memory), then writes the index, config.json with its ``quantization_config`` and the tokenizer /
chat-template / generation files of the source, fsyncs and renames. An error or a kill leaves no
destination folder (a SIGKILL can leave only the hidden ``.NAME.partial-PID`` folder, removed by
the next run into the same destination).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ...errors import DestinationError

# the non-weight files a model folder carries that a loader or a chat front-end reads
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json",
    "preprocessor_config.json",
)
SIDE_PREFIXES = ("LICENSE", "NOTICE", "tokenizer.", "chat_template")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


def side_files(src: Path) -> list[Path]:
    found = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        if p.name in SIDE_FILES or p.name.startswith(SIDE_PREFIXES):
            found.append(p)
    return found


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ExportFolder:
    """``with ExportFolder(dst, n_shards, force) as out: out.shard(i, tensors) ...; out.finish(config, src)``."""

    def __init__(self, dst: str | Path, n_shards: int, *, force: bool = False):
        self.dst = Path(dst)
        self.n_shards = n_shards
        self.force = force
        self.tmp = self.dst.parent / f".{self.dst.name}.partial-{os.getpid()}"
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self.done = False

    def __enter__(self) -> "ExportFolder":
        if not self.dst.parent.is_dir():
            raise DestinationError(self.dst, f"folder {self.dst.parent} does not exist")
        if self.dst.exists() and not self.force:
            raise DestinationError(self.dst, "exists (pass --force to replace it)")
        for stale in self.dst.parent.glob(f".{self.dst.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp.mkdir()
        return self

    def shard(self, index: int, tensors: dict) -> None:
        """Write shard ``index`` (0-based) of torch tensors {name: tensor}."""
        from safetensors.torch import save_file

        name = "model.safetensors" if self.n_shards == 1 else f"model-{index + 1:05d}-of-{self.n_shards:05d}.safetensors"
        path = self.tmp / name
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
        for k, v in tensors.items():
            self.weight_map[k] = name
            self.total += v.numel() * v.element_size()

    def finish(self, config: dict, src: Path, extra: dict[str, dict] | None = None) -> Path:
        """config.json, ``extra`` JSON files (quantize_config.json ...), the source's side files; rename."""
        if self.n_shards > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, doc in (extra or {}).items():
            (self.tmp / name).write_text(json.dumps(doc, indent=2) + "\n")
        for p in side_files(src):
            shutil.copyfile(p, self.tmp / p.name)
        for p in self.tmp.iterdir():
            _fsync(p)
        old = None
        if self.dst.exists():
            old = self.dst.parent / f".{self.dst.name}.old-{os.getpid()}"
            os.replace(self.dst, old)
        os.replace(self.tmp, self.dst)
        _fsync(self.dst.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        self.done = True
        return self.dst

    def __exit__(self, *exc) -> None:
        if not self.done:
            shutil.rmtree(self.tmp, ignore_errors=True)
