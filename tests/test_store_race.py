"""Two processes pulling and removing the same ``name:tag`` at once (real subprocesses): every
state anyone sees, and the state at the end, is one of the two valid ones — absent, or a complete
model whose manifest and file agree — never a half-written manifest, a failed rename or a
leftover temporary folder."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tinymodel import write_tiny_llama

from llmquant import store

NAME = "race:tag"
ROUNDS = 40

WORKER = textwrap.dedent("""
    import sys
    from llmquant import store
    role, rounds, a, b = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    for i in range(rounds):
        if role == "puller":
            store.pull(a if i % 2 else b, "race:tag", link=bool(i % 3))
        else:
            store.pull(b, "race:tag", link=False)
            try:
                store.remove("race:tag")
            except store.UnknownModelError:
                pass
    print("done", role)
""")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_state(home: Path, valid: set[str]) -> str:
    """'absent' or the sha256 of the complete model; fails on anything else."""
    folder = home / "models" / "race" / "tag"
    try:
        model = store.get(NAME)
    except store.UnknownModelError:
        return "absent"
    manifest = json.loads((folder / "manifest.json").read_text())  # complete JSON, or this raises
    assert manifest["sha256"] in valid, manifest
    assert Path(model.path).stat().st_size == manifest["size"]
    return manifest["sha256"]


@pytest.mark.slow
def test_concurrent_pull_and_remove_end_in_a_valid_state(tmp_path, monkeypatch):
    home = tmp_path / "home"
    a = write_tiny_llama(tmp_path / "a.gguf", seed=1)
    b = write_tiny_llama(tmp_path / "b.gguf", seed=2)
    valid = {_sha(a), _sha(b)}
    monkeypatch.setenv("LLMQUANT_HOME", str(home))
    env = {**os.environ, "LLMQUANT_HOME": str(home)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, role, str(ROUNDS), str(a), str(b)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for role in ("puller", "remover")]
    seen: dict[str, int] = {}
    while any(p.poll() is None for p in procs):  # a third process looks while they race
        try:
            state = _check_state(home, valid)
        except FileNotFoundError:  # the folder went between get() and reading it: a removal, not damage
            state = "absent"
        seen[state] = seen.get(state, 0) + 1
        time.sleep(0.002)
    for p in procs:
        out, err = p.communicate()
        assert p.returncode == 0 and "done" in out, err[-3000:]
    final = _check_state(home, valid)
    assert final in valid | {"absent"}
    assert [e.name for e in (home / "tmp").iterdir()] == []  # no temporary folder left
    tag_dir = home / "models" / "race"
    if final == "absent":
        assert not (tag_dir / "tag").exists()
    else:
        assert sorted(p.name for p in (tag_dir / "tag").iterdir()) == ["a.gguf", "manifest.json"] or \
            sorted(p.name for p in (tag_dir / "tag").iterdir()) == ["b.gguf", "manifest.json"]
    print("states seen while racing:", seen)
    assert sum(seen.values()) > 10, seen
