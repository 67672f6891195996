"""llama.cpp's split GGUF files: ``NAME-00001-of-00003.gguf`` ...

Layout as tools/gguf-split/gguf-split.cpp writes it (and gguf-py's GGUFWriter with
``split_max_size``, which convert_hf_to_gguf.py --split-max-size uses): every part is a GGUF of
its own holding a run of the tensors in order; the first part holds all the metadata; every part
holds ``split.no`` (uint16, 0-based), ``split.count`` (uint16) and ``split.tensors.count`` (int32,
the tensors of all parts). llama.cpp loads the model from the first part (``llama_split_path``:
``"%s-%05d-of-%05d.gguf"``, numbers 1-based).
"""

from __future__ import annotations

import re
from pathlib import Path

from gguf import Keys

from ..errors import ModelFileError

SPLIT_NO = Keys.Split.LLM_KV_SPLIT_NO  # "split.no"
SPLIT_COUNT = Keys.Split.LLM_KV_SPLIT_COUNT  # "split.count"
SPLIT_TENSORS = Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT  # "split.tensors.count"
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS)
_NAME = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


def split_path(prefix: str | Path, i: int, n: int) -> Path:
    """llama_split_path: part ``i`` (0-based) of ``n``."""
    return Path(f"{prefix}-{i + 1:05d}-of-{n:05d}.gguf")


def part_paths(dst: str | Path, n: int) -> list[Path]:
    """The files a split write of ``dst`` (``model.gguf``) into ``n`` parts produces
    (``model-00001-of-0000n.gguf`` ...); just ``dst`` for one part."""
    dst = Path(dst)
    if n <= 1:
        return [dst]
    return [split_path(dst.with_suffix(""), i, n) for i in range(n)]


def split_index(path: str | Path) -> tuple[str, int, int] | None:
    """(prefix, 0-based part, parts) from a part's name, None for a name without the pattern."""
    m = _NAME.match(Path(path).name)
    if not m:
        return None
    return str(Path(path).with_name(m["stem"])), int(m["i"]) - 1, int(m["n"])


def parse_size(text: str) -> int:
    """gguf-split's --split-max-size: N followed by M (10^6 bytes) or G (10^9 bytes)."""
    m = re.fullmatch(r"\s*(\d+)\s*([MG])\s*", str(text), re.IGNORECASE)
    if not m or int(m[1]) <= 0:
        raise ValueError(f"split size {text!r}: expected a positive number followed by M or G (e.g. 50G)")
    return int(m[1]) * (10**6 if m[2].upper() == "M" else 10**9)


def other_parts(first: Path, n_split: int, split_no: int) -> list[Path]:
    """The remaining parts of a split model whose first part is ``first`` (checked to exist)."""
    if split_no != 0:
        raise ModelFileError(first, f"is part {split_no + 1} of a split model; give its first part")
    parsed = split_index(first)
    if parsed is None or parsed[1] != 0 or parsed[2] != n_split:
        raise ModelFileError(first, f"{SPLIT_COUNT} is {n_split}, but the name is not NAME-00001-of-{n_split:05d}.gguf")
    parts = [split_path(parsed[0], i, n_split) for i in range(1, n_split)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise ModelFileError(first, f"split model is missing {', '.join(missing)}")
    return parts
