"""The model store: pull -> list -> show -> run by name -> rm in a temporary $LLMQUANT_HOME, with
the network switched off; pulls that fail half-way leave nothing; the local Hugging Face cache."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import default_model_path

from llmquant import store
from llmquant.errors import LlmquantError
from llmquant.models import DEFAULT_MODEL_NAME
from llmquant.store import resolve_model


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("LLMQUANT_HOME", str(h))
    return h


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection from this process fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def llmquant(home: Path, *args: str, timeout: int = 120):
    env = {**os.environ, "LLMQUANT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "llmquant", *args], capture_output=True, text=True, env=env, check=False,
                          timeout=timeout)


def leftovers(home: Path) -> list[str]:
    """Everything under the store except empty folders and its lock file."""
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file() and p.name != "store.lock")


# -- the whole cycle through the CLI -----------------------------------------------------------------------
def cli(*args: str):
    """The CLI in this process (typer's runner): the same commands, without a new interpreter each."""
    from typer.testing import CliRunner

    from llmquant.cli import app

    return CliRunner().invoke(app, list(args))


def test_pull_list_show_run_rm_by_name(home, tmp_path, offline):
    src = tmp_path / "my model.gguf"
    shutil.copyfile(default_model_path(), src)

    r = cli("pull", str(src), "--name", "Smol:Test", "--json")
    assert r.exit_code == 0, r.output
    pulled = json.loads(r.stdout)
    assert pulled["name"] == "smol:test" and pulled["file_type"] == "Q4_1" and pulled["n_params"] == 134515008

    listed = json.loads(cli("list", "--json").stdout)
    assert [m["name"] for m in listed] == ["smol:test", DEFAULT_MODEL_NAME]
    assert listed[0]["size"] == src.stat().st_size and listed[1]["embedded"]
    table = cli("list").stdout
    assert "smol:test" in table and "Q4_1" in table and "134.52M" in table and "MODIFIED" in table

    shown = json.loads(cli("show", "smol:test", "--json").stdout)
    assert shown["details"]["architecture"] == "llama" and shown["details"]["context_length"] == 8192
    assert "<|im_start|>" in shown["chat_template"]
    assert shown["parameters"]["stop"] == ["<|im_end|>"]
    assert shown["metadata"]["tokenizer.ggml.tokens"] == "[49152 items]"
    assert "Chat template" in cli("show", "smol:test").stdout

    by_name = cli("run", "smol:test", "-p", "Hello", "-n", "4", "--temp", "0", "-t", "1", "--json")
    by_path = cli("run", str(src), "-p", "Hello", "-n", "4", "--temp", "0", "-t", "1", "--json")
    assert by_name.exit_code == 0, by_name.output
    assert json.loads(by_name.stdout)["text"] == json.loads(by_path.stdout)["text"]
    assert json.loads(by_name.stdout)["model"].startswith(str(home))

    assert cli("rm", "smol:test").exit_code == 0
    assert [m["name"] for m in json.loads(cli("list", "--json").stdout)] == [DEFAULT_MODEL_NAME]
    gone = cli("run", "smol:test", "-p", "x")
    assert isinstance(gone.exception, store.UnknownModelError) and "smol:test" in str(gone.exception)
    assert leftovers(home) == [] and src.is_file()  # the source is untouched


def test_cli_errors_are_one_line(tmp_path):
    home = tmp_path / "home"
    r = llmquant(home, "rm", "nothing:here")
    assert r.returncode == 1 and "nothing:here" in r.stderr and "Traceback" not in r.stderr
    r = llmquant(home, "pull", str(tmp_path / "missing.gguf"))
    assert r.returncode == 1 and "missing.gguf" in r.stderr and "Traceback" not in r.stderr


def test_library_cycle_is_offline(home, offline):
    m = store.pull(default_model_path(), "smol")
    assert m.name == "smol:latest" and m.sha256 and len(m.sha256) == 64
    assert resolve_model("smol") == resolve_model("smol:latest") == Path(m.path)
    assert store.show("smol")["details"]["quantization"] == "Q4_1"
    store.pull(default_model_path(), "smol")  # pulling again replaces it
    assert [x.name for x in store.list_models()] == ["smol:latest", DEFAULT_MODEL_NAME]
    store.remove("smol")
    assert leftovers(home) == []


def test_name_from_metadata_and_copy_mode(home):
    m = store.pull(default_model_path(), link=False)
    assert m.name == "smollm2:135m-q4_1"
    assert os.stat(m.path).st_nlink == 1  # a real copy


# -- failures leave nothing -----------------------------------------------------------------------------
@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_half_finished_pull_leaves_nothing(home, exc):
    calls = {"n": 0}

    def failing_write(fh, chunk, n):
        calls["n"] += 1
        if calls["n"] == 3:
            raise exc
        fh.write(chunk)

    from llmquant.errors import DestinationError

    # an OSError while copying is one named error (disk full: DiskFullError, a subclass)
    with pytest.raises(DestinationError if isinstance(exc, OSError) else type(exc)):
        store.pull(default_model_path(), "broken:one", link=False, copy_chunk=failing_write)
    assert calls["n"] == 3
    assert leftovers(home) == []
    assert [m.name for m in store.list_models()] == [DEFAULT_MODEL_NAME]
    with pytest.raises(store.UnknownModelError):
        store.get("broken:one")


def test_a_failed_replace_keeps_the_old_model(home):
    old = store.pull(default_model_path(), "keep:me")

    def failing_write(fh, chunk, n):
        raise OSError("disk full")

    from llmquant.errors import DestinationError

    with pytest.raises(DestinationError, match="disk full"):
        store.pull(default_model_path(), "keep:me", link=False, copy_chunk=failing_write)
    assert store.get("keep:me").sha256 == old.sha256 and Path(old.path).is_file()


def test_a_killed_pull_is_swept(home):
    dead = home / "tmp" / "pull-999999999-abcd"  # no such process
    dead.mkdir(parents=True)
    (dead / "model.gguf").write_bytes(b"GGUF partial")
    assert [m.name for m in store.list_models()] == [DEFAULT_MODEL_NAME]
    assert not dead.exists()


def test_a_killed_pull_subprocess_leaves_nothing_visible(tmp_path):
    home = tmp_path / "home"
    src = tmp_path / "big.gguf"
    shutil.copyfile(default_model_path(), src)
    code = (
        "import os, signal, sys\n"
        "from llmquant import store\n"
        "def die(fh, chunk, n):\n"
        "    fh.write(chunk); os.kill(os.getpid(), signal.SIGKILL)\n"
        f"store.pull({str(src)!r}, 'half:done', link=False, copy_chunk=die)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], check=False, env={**os.environ, "LLMQUANT_HOME": str(home)})
    assert r.returncode == -9
    assert any((home / "tmp").iterdir())  # the partial copy exists, but only under tmp/
    assert [m["name"] for m in json.loads(llmquant(home, "list", "--json").stdout)] == [DEFAULT_MODEL_NAME]
    assert leftovers(home) == []  # and the next store command swept it


def test_not_a_gguf_is_refused_before_anything_is_written(home, tmp_path):
    bad = tmp_path / "fake.gguf"
    bad.write_bytes(b"not a gguf at all" * 100)
    with pytest.raises(LlmquantError, match="fake.gguf"):
        store.pull(bad, "fake")
    assert leftovers(home) == []


# -- names and sources ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["", "UPPER CASE", "a:b:c", "-dash", "name:", "x/y/z", "a:" + "t" * 200, "../up"])
def test_bad_names_are_refused(bad):
    with pytest.raises(store.StoreError):
        store.parse_name(bad if bad != "name:" else "name:-bad")


def test_name_rules():
    assert store.parse_name("Llama3.2") == ("llama3.2", "latest")
    assert store.parse_name("me/smol:135m-Q4_K_M") == ("me/smol", "135m-q4_k_m")
    assert store.rung_name("smollm2:135m", "Q4_K_M") == "smollm2:135m-q4_k_m"
    assert store.rung_name("smollm2", "Q8_0") == "smollm2:q8_0"


def test_embedded_model_is_always_there_and_cannot_be_removed(home):
    assert store.get(DEFAULT_MODEL_NAME).embedded
    assert resolve_model(DEFAULT_MODEL_NAME) == resolve_model(None) == default_model_path()
    with pytest.raises(store.StoreError, match="embedded"):
        store.remove(DEFAULT_MODEL_NAME)
    with pytest.raises(store.StoreError, match="embedded"):
        store.pull(default_model_path(), DEFAULT_MODEL_NAME)


def test_folders(home, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    os.link(default_model_path(), one / "m.gguf")
    (one / "mmproj-m.gguf").write_bytes(b"ignored")
    assert store.pull(one, "folder:one").files == ["m.gguf"]
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a.gguf", "b.gguf"):
        os.link(default_model_path(), two / n)
    with pytest.raises(store.StoreError, match="several GGUF files"):
        store.pull(two)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(store.StoreError, match="convert"):
        store.pull(hf)


def test_a_path_wins_over_a_name(home, tmp_path, monkeypatch):
    store.pull(default_model_path(), "local")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").write_bytes(b"a file called local")
    assert resolve_model("local") == Path("local")
    assert resolve_model("local:latest") == Path(store.get("local").path)
    with pytest.raises(LlmquantError, match="no such file or model name"):
        resolve_model("nothing-here:1b")


# -- the local Hugging Face cache --------------------------------------------------------------------------
def fake_hf_cache(root: Path, repo: str, files: dict[str, Path], revision: str = "a" * 40) -> Path:
    """The layout huggingface_hub writes: blobs/, snapshots/REV/FILE -> ../../blobs/HASH, refs/main."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    snap = folder / "snapshots" / revision
    snap.mkdir(parents=True)
    for i, (name, src) in enumerate(files.items()):
        blob = folder / "blobs" / f"{i:064x}"
        os.link(src, blob)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    return root


def test_pull_from_the_hf_cache_offline(home, tmp_path, offline):
    pytest.importorskip("huggingface_hub")
    cache = fake_hf_cache(tmp_path / "hub", "SomeOrg/SmolLM2-135M-Instruct-GGUF", {
        "SmolLM2-135M-Instruct-Q4_1.gguf": default_model_path(),
        "SmolLM2-135M-Instruct-Q8_0.gguf": default_model_path(),
    })
    m = store.pull("hf.co/SomeOrg/SmolLM2-135M-Instruct-GGUF:Q4_1", hf_cache_dir=cache)
    assert m.name == "smollm2-135m-instruct:q4_1"
    assert m.source == f"hf.co/SomeOrg/SmolLM2-135M-Instruct-GGUF@{'a' * 40}/SmolLM2-135M-Instruct-Q4_1.gguf"
    assert Path(m.path).stat().st_size == default_model_path().stat().st_size
    with pytest.raises(store.StoreError, match="several GGUF files match"):
        store.pull("hf.co/SomeOrg/SmolLM2-135M-Instruct-GGUF", hf_cache_dir=cache)
    with pytest.raises(store.StoreError, match="no GGUF file for Q2_K"):
        store.pull("hf.co/SomeOrg/SmolLM2-135M-Instruct-GGUF:Q2_K", hf_cache_dir=cache)
    with pytest.raises(store.StoreError, match="never downloads"):
        store.pull("hf.co/Other/Missing-GGUF", hf_cache_dir=cache)


def test_hf_cache_without_huggingface_hub_says_how_to_install(home, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(store.StoreError, match="pip install huggingface_hub"):
        store.pull("hf.co/SomeOrg/Model-GGUF")


# -- quantize registers its output ---------------------------------------------------------------------
def test_quantize_name_registers_the_output(tmp_path):
    home = tmp_path / "home"
    out = tmp_path / "smol-q8.gguf"
    r = llmquant(home, "quantize", "--type", "Q8_0", str(out), "--name", "smol:q8", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "stored as smol:q8" in r.stdout
    listed = {m["name"]: m for m in json.loads(llmquant(home, "list", "--json").stdout)}
    assert listed["smol:q8"]["file_type"] == "Q8_0"
    bad = llmquant(home, "quantize", "--type", "Q8_0", str(tmp_path / "x.gguf"), "--name", "Bad Name!")
    assert bad.returncode == 1 and not (tmp_path / "x.gguf").exists()
