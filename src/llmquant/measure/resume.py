"""What a ladder has finished, on disk, so that an interrupted run (Ctrl-C, kill, power loss)
restarts where it stopped.

``ladder-state.json`` in the out folder records each finished unit of work (the conversion of a
Hugging Face folder, the base logits, each rung's measurements) under a fingerprint of its inputs:
source content, recipe, text, context, chunks. A unit is reused only when its fingerprint is the
one the new run computes; anything else is redone. The file is rewritten atomically after every
unit (temporary name, fsync, rename), so a kill at any moment leaves the previous complete state.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

STATE_NAME = "ladder-state.json"
VERSION = 1


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def text_digest(content: str) -> str:
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:32]


def folder_fingerprint(folder: str | Path) -> str:
    """A Hugging Face folder's content fingerprint: every file's name and size, the JSON files in
    full and the first and last MiB of each weight file (safetensors headers hold every offset)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        rel = p.relative_to(folder).as_posix()
        if rel.startswith("."):
            continue
        size = p.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with open(p, "rb") as f:
            if p.suffix == ".json" or size <= 2 << 20:
                h.update(f.read())
            else:
                h.update(f.read(1 << 20))
                f.seek(size - (1 << 20))
                h.update(f.read())
    return h.hexdigest()[:32]


class LadderState:
    """``ladder-state.json``: ``get(unit, key)`` returns the record saved under that fingerprint
    (None when absent or made from other inputs); ``put`` saves one and writes the file."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / STATE_NAME
        self.units: dict[str, dict] = {}
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") == VERSION and isinstance(data.get("units"), dict):
                self.units = data["units"]
        except (OSError, ValueError):
            pass  # no state, or an unreadable one: start afresh

    def get(self, unit: str, key: str) -> dict | None:
        rec = self.units.get(unit)
        return rec["data"] if isinstance(rec, dict) and rec.get("key") == key else None

    def put(self, unit: str, key: str, data: dict) -> None:
        self.units[unit] = {"key": key, "data": data}
        self._write()

    def _write(self) -> None:
        tmp = self.path.parent / f".llmquant-partial-{os.getpid()}-{secrets.token_hex(4)}-{self.path.name}"
        try:
            with open(tmp, "w") as f:
                json.dump({"version": VERSION, "units": self.units}, f, indent=1, default=str)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
