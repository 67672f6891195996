"""The model store: GGUF files under Ollama-like ``name:tag`` names.

Layout under ``$LLMQUANT_HOME`` (default ``~/.cache/llmquant``)::

    models/<name>/<tag>/model.gguf       # (or the parts of a split GGUF, under their own names)
    models/<name>/<tag>/manifest.json    # where it came from, size, type, parameters, sha256
    tmp/pull-<pid>-<random>/             # a pull in progress; renamed into models/ when complete

A pull validates the GGUF header first, hard-links (or copies) the file into a private folder
under ``tmp/``, writes the manifest, fsyncs, and renames the folder into place: an error, Ctrl-C
or SIGKILL never leaves a half-imported model visible, and the next store call sweeps the
folders of pulls whose process is gone. Sources: a GGUF file, a folder holding one, or a model
already in the local Hugging Face cache (``hf.co/ORG/REPO[:QUANT]``), read with huggingface_hub's
cache functions — a pull never touches the network.

The embedded default model is always listed and resolves without being pulled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import LlmquantError, ModelFileError
from .models import DEFAULT_MODEL_NAME, default_model_path

DEFAULT_TAG = "latest"
MANIFEST = "manifest.json"
_COMPONENT = r"[a-z0-9][a-z0-9._-]{0,79}"
_NAME_RE = re.compile(rf"^{_COMPONENT}(/{_COMPONENT})?$")
_TAG_RE = re.compile(r"^[a-z0-9_][a-z0-9._-]{0,127}$")
_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$", re.IGNORECASE)
_HF_PREFIXES = ("hf.co/", "huggingface.co/", "hf://", "hf:")
_SHORT_FINETUNES = re.compile(r"^[a-z]{2,12}$")


class StoreError(LlmquantError):
    """A store operation failed: bad name, unknown model, unusable source."""


class UnknownModelError(StoreError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f"{name}: no such file or model name (see `llmquant list`)")


@dataclass
class StoredModel:
    name: str
    path: str  # the GGUF llama.cpp loads (the first part of a split model)
    size: int  # bytes on disk, all parts
    file_type: str | None
    n_params: int
    architecture: str
    context_length: int | None
    modified: float  # seconds since the epoch
    source: str
    files: list[str] = field(default_factory=list)
    sha256: str | None = None
    embedded: bool = False
    config: dict = field(default_factory=dict)  # Modelfile settings: parameters, system, template

    @property
    def parameters(self) -> dict:
        return dict(self.config.get("parameters") or {})

    def to_dict(self) -> dict:
        return asdict(self)


def home() -> Path:
    return Path(os.environ.get("LLMQUANT_HOME") or Path.home() / ".cache" / "llmquant").expanduser()


def parse_name(spec: str) -> tuple[str, str]:
    """``name[:tag]`` -> (name, tag), lower-cased and validated; the tag defaults to ``latest``."""
    text = spec.strip().lower()
    name, _, tag = text.partition(":")
    tag = tag or DEFAULT_TAG
    if not _NAME_RE.match(name):
        raise StoreError(f"{spec!r}: a model name is letters, digits, '.', '_' or '-' (optionally NAMESPACE/NAME)")
    if not _TAG_RE.match(tag):
        raise StoreError(f"{spec!r}: a tag is up to 128 letters, digits, '.', '_' or '-'")
    return name, tag


def looks_like_name(spec: str) -> bool:
    try:
        parse_name(spec)
    except StoreError:
        return False
    return True


def _model_dir(name: str, tag: str, root: Path | None = None) -> Path:
    return (root or home()) / "models" / name / tag


# -- reading the store ---------------------------------------------------------------------------------
def _embedded() -> StoredModel | None:

    try:
        path = default_model_path()
    except ModelFileError:
        return None
    info = _describe([path])
    return StoredModel(name=DEFAULT_MODEL_NAME, path=str(path), size=info["size"], file_type=info["file_type"],
                       n_params=info["n_params"], architecture=info["architecture"],
                       context_length=info["context_length"], modified=path.stat().st_mtime,
                       source=f"embedded ({path.parent.name} package)", files=[path.name], embedded=True)


def _read_manifest(folder: Path) -> StoredModel | None:
    try:
        data = json.loads((folder / MANIFEST).read_text())
        model = StoredModel(**{**data, "path": str(folder / data["files"][0])})
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        return None
    return model if Path(model.path).is_file() else None


def list_models() -> list[StoredModel]:
    """Every stored model (newest first) and, last, the embedded default."""
    _sweep()
    models = []
    root = home() / "models"
    if root.is_dir():
        for manifest in root.rglob(MANIFEST):
            model = _read_manifest(manifest.parent)
            if model is not None:
                models.append(model)
    models.sort(key=lambda m: -m.modified)
    embedded = _embedded()
    return models + ([embedded] if embedded else [])


def get(spec: str) -> StoredModel:

    name, tag = parse_name(spec)
    if f"{name}:{tag}" == DEFAULT_MODEL_NAME or spec in ("default",):
        embedded = _embedded()
        if embedded is not None:
            return embedded
    model = _read_manifest(_model_dir(name, tag))
    if model is None:
        raise UnknownModelError(spec)
    return model


def resolve(spec: str) -> Path:
    return Path(get(spec).path)


def resolve_model(spec: str | Path | None) -> Path:
    """A model argument -> a GGUF path: None (or the default's name) -> the embedded default; an
    existing path -> itself; otherwise a ``name[:tag]`` in the store."""
    if spec is None or str(spec) in (DEFAULT_MODEL_NAME, "default"):
        return default_model_path()
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if isinstance(spec, str) and looks_like_name(spec):
        return resolve(spec)
    raise ModelFileError(path, "no such file")


def remove(spec: str) -> StoredModel:
    model = get(spec)
    if model.embedded:
        raise StoreError(f"{model.name} is the embedded default model; it cannot be removed")
    folder = Path(model.path).parent
    trash = _tmp_dir("rm")
    os.replace(folder, trash / "model")  # gone from the store at once, then deleted
    shutil.rmtree(trash, ignore_errors=True)
    for parent in (folder.parent, folder.parent.parent):  # drop empty name (and namespace) folders
        if parent != home() / "models":
            try:
                parent.rmdir()
            except OSError:
                break
    return model


# -- details (show) ---------------------------------------------------------------------------------------
_BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores")


def show(spec: str) -> dict[str, Any]:
    """Everything ``llmquant show`` prints: store entry, model facts, metadata, template, parameters."""
    from .gguf.source import GGUFSource

    model = get(spec)
    with GGUFSource(model.path) as src:
        metadata: dict[str, Any] = {}
        for key, fld in src.fields.items():
            value = fld.value
            if key == "tokenizer.chat_template":
                continue
            if key in _BIG_ARRAYS or (isinstance(value, list) and len(value) > 16):
                value = f"[{len(value)} items]"
            metadata[key] = value
        tokens = src.get("tokenizer.ggml.tokens") or []

        def token(key: str) -> str | None:
            i = src.get(key)
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

        details = {
            "architecture": src.arch,
            "parameters": model.n_params,
            "quantization": model.file_type,
            "context_length": src.arch_get("context_length"),
            "embedding_length": src.arch_get("embedding_length"),
            "layers": src.arch_get("block_count"),
            "heads": src.arch_get("attention.head_count"),
            "kv_heads": src.arch_get("attention.head_count_kv"),
            "vocabulary": len(tokens) or None,
            "bos_token": token("tokenizer.ggml.bos_token_id"),
            "eos_token": token("tokenizer.ggml.eos_token_id"),
            "license": src.get("general.license"),
        }
        stops = [t for t in (token("tokenizer.ggml.eos_token_id"), token("tokenizer.ggml.eot_token_id")) if t]
        template = src.get("tokenizer.chat_template")
    from .runtime.llama import Sampling

    defaults = Sampling()
    parameters = {"temperature": defaults.temperature, "top_p": defaults.top_p, "top_k": defaults.top_k,
                  "min_p": defaults.min_p, "repeat_penalty": defaults.repeat_penalty,
                  "stop": list(dict.fromkeys(stops))}
    return {"model": model.to_dict(), "details": details, "parameters": parameters,
            "chat_template": template, "metadata": metadata}


# -- pulling ---------------------------------------------------------------------------------------------
@dataclass
class Source:
    files: list[Path]  # the GGUF, or every part of a split GGUF in order
    origin: str  # what the manifest records as the source
    suggested: str | None = None  # a name:tag suggested by the origin (the HF repo)


def pull(
    src: str | Path,
    name: str | None = None,
    *,
    link: bool = True,
    hf_cache_dir: str | Path | None = None,
    copy_chunk: Callable[[Any, Any, int], None] | None = None,
    config: dict | None = None,
) -> StoredModel:
    """Import ``src`` (GGUF file, folder, or ``hf.co/ORG/REPO[:QUANT]`` from the local HF cache)
    under ``name`` (default: from the file's metadata). Replaces a model of the same name.

    ``link``: hard-link when the store is on the same filesystem (no extra disk), else copy.
    """

    _sweep()
    source = find_source(src, hf_cache_dir=hf_cache_dir)
    info = _describe(source.files)  # validates every part's header before anything is written
    full = _full_name(name or source.suggested or _suggest_name(source.files[0], info))
    if full == DEFAULT_MODEL_NAME:
        raise StoreError(f"{full} is the embedded default model's name; choose another with --name")
    n, tag = parse_name(full)
    work = _tmp_dir("pull")
    try:
        digest = hashlib.sha256()
        for part in source.files:
            _import_file(part, work / part.name, digest if len(source.files) == 1 else None, link, copy_chunk)
        manifest = {
            "name": full, "files": [p.name for p in source.files], "size": info["size"],
            "file_type": info["file_type"], "n_params": info["n_params"], "architecture": info["architecture"],
            "context_length": info["context_length"], "modified": time.time(), "source": source.origin,
            "sha256": digest.hexdigest() if len(source.files) == 1 else None,
            **({"config": config} if config else {}),
        }
        with open(work / MANIFEST, "w") as fh:
            json.dump(manifest, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        dest = _model_dir(n, tag)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():  # replace: move the old one aside first, so dest is never half-written
            os.replace(dest, work.parent / f"{work.name}-old")
        os.replace(work, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work.parent / f"{work.name}-old", ignore_errors=True)
    result = _read_manifest(dest)
    assert result is not None
    return result


def register(path: str | Path, name: str) -> StoredModel:
    """Add a file llmquant just wrote (quantize / ladder ``--name``) to the store."""
    return pull(Path(path), name)


def find_source(src: str | Path, *, hf_cache_dir: str | Path | None = None) -> Source:
    text = str(src)
    path = Path(text).expanduser()
    if path.is_file():
        return Source(_split_parts(path.resolve()), str(path.resolve()))
    if path.is_dir():
        return Source(_split_parts(_gguf_in_folder(path.resolve())), str(path.resolve()))
    lowered = text.lower()
    for prefix in _HF_PREFIXES:
        if lowered.startswith(prefix):
            return _from_hf_cache(text[len(prefix):], hf_cache_dir)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _from_hf_cache(text, hf_cache_dir)
    raise StoreError(f"{text}: no such file or folder (for a model in the Hugging Face cache write hf.co/ORG/REPO)")


def _gguf_in_folder(folder: Path) -> Path:
    ggufs = sorted(p for p in folder.glob("*.gguf") if "mmproj" not in p.name.lower())
    firsts = [p for p in ggufs if _split_index(p.name) in (None, 1)]
    if len(firsts) == 1:
        return firsts[0]
    if not firsts:
        if (folder / "config.json").is_file():
            raise StoreError(f"{folder}: a Hugging Face model folder without a GGUF file; convert it first "
                             f"(llmquant convert {folder}) and pull the GGUF")
        raise StoreError(f"{folder}: holds no .gguf file")
    names = ", ".join(p.name for p in firsts)
    raise StoreError(f"{folder}: holds several GGUF files ({names}); pull one of them by its path")


def _split_index(filename: str) -> int | None:
    """1 for ``x-00001-of-00003.gguf``, None for a file that is not part of a split model."""
    m = _SPLIT_RE.match(Path(filename).name)
    return int(m["i"]) if m else None


def _split_parts(first: Path) -> list[Path]:
    """All parts of a split GGUF (``x-00001-of-00003.gguf``), or just the file."""
    m = _SPLIT_RE.match(first.name)
    if not m:
        return [first]
    if int(m["i"]) != 1:
        raise StoreError(f"{first}: part {int(m['i'])} of a split model; pull its first part")
    n = int(m["n"])
    parts = [first.with_name(f"{m['stem']}-{i:05d}-of-{m['n']}.gguf") for i in range(1, n + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise StoreError(f"{first}: split model is missing {', '.join(missing)}")
    return parts


def _from_hf_cache(spec: str, cache_dir: str | Path | None) -> Source:
    """``ORG/REPO[:QUANT]`` (or ``ORG/REPO/FILE.gguf``) from the local Hugging Face cache; offline."""
    try:
        from huggingface_hub import scan_cache_dir
        try:
            from huggingface_hub.errors import CacheNotFound
        except ImportError:  # huggingface_hub < 0.24
            from huggingface_hub.utils import CacheNotFound
    except ImportError:
        raise StoreError("pulling from the Hugging Face cache needs huggingface_hub: pip install huggingface_hub") from None
    repo_part, _, quant = spec.partition(":")
    bits = repo_part.strip("/").split("/")
    if len(bits) < 2:
        raise StoreError(f"{spec}: expected ORG/REPO[:QUANT]")
    repo_id, file_hint = "/".join(bits[:2]), "/".join(bits[2:])
    try:
        cache = scan_cache_dir(cache_dir)
    except CacheNotFound as exc:
        raise StoreError(f"no Hugging Face cache at {exc.cache_dir}; llmquant pull never downloads — "
                         f"fetch the model first (hf download {repo_id})") from None
    repos = [r for r in cache.repos if r.repo_type == "model" and r.repo_id.lower() == repo_id.lower()]
    if not repos or not repos[0].revisions:
        raise StoreError(f"{repo_id} is not in the local Hugging Face cache; llmquant pull never downloads — "
                         f"fetch it first (hf download {repo_id})")
    repo = repos[0]
    revision = repo.refs.get("main") or max(repo.revisions, key=lambda r: r.last_modified)
    files = {f.file_name if not file_hint else str(f.file_path.relative_to(revision.snapshot_path)): f
             for f in revision.files if f.file_name.lower().endswith(".gguf")}
    if file_hint:
        candidates = [k for k in files if k == file_hint]
    else:
        candidates = [k for k in files if "mmproj" not in k.lower()
                      and _split_index(k) in (None, 1)]
        if quant:
            candidates = [k for k in candidates if re.search(rf"(^|[-._]){re.escape(quant)}([-._]|$)", k, re.IGNORECASE)]
    available = ", ".join(sorted(files)) or "none"
    if not candidates:
        raise StoreError(f"{repo.repo_id}: no GGUF file{' for ' + quant if quant else ''} in the cached "
                         f"revision {revision.commit_hash[:12]} (cached: {available})")
    if len(candidates) > 1:
        raise StoreError(f"{repo.repo_id}: several GGUF files match ({', '.join(sorted(candidates))}); "
                         f"say which with hf.co/{repo.repo_id}:QUANT")
    first = Path(files[candidates[0]].file_path)
    parts = _split_parts(first)
    origin = f"hf.co/{repo.repo_id}@{revision.commit_hash}/{first.name}"
    base = re.sub(r"[-_.]gguf$", "", repo.repo_id.split("/")[1], flags=re.IGNORECASE)
    qt = quant or _quant_in_filename(first.name) or DEFAULT_TAG
    return Source(parts, origin, suggested=f"{_sanitize(base)}:{_sanitize(qt)}")


def _quant_in_filename(filename: str) -> str | None:
    m = re.search(r"(?:^|[-._])((?:IQ|Q)\d[A-Z0-9_]*|F16|F32|BF16)(?:[-.]|$)", filename, re.IGNORECASE)
    return m.group(1) if m else None


def _describe(files: list[Path]) -> dict[str, Any]:
    """Header facts of a (possibly split) GGUF; every part's header is parsed and checked."""
    from .gguf.source import GGUFSource

    n_params, size, first = 0, 0, None
    for part in files:
        with GGUFSource(part) as src:
            n_params += src.n_params
            size += part.stat().st_size
            if first is None:
                ftype = src.file_type
                dominant: dict[str, int] = {}
                for t in src.tensors:
                    if len(t.shape) >= 2:
                        dominant[t.type.name] = dominant.get(t.type.name, 0) + t.n_bytes
                first = {
                    "architecture": src.arch,
                    "file_type": ftype.name.removeprefix("MOSTLY_") if ftype is not None
                    else (max(dominant, key=dominant.__getitem__) if dominant else None),
                    "context_length": src.arch_get("context_length"),
                    "basename": src.get("general.basename"), "model_name": src.get("general.name"),
                    "size_label": src.get("general.size_label"), "finetune": src.get("general.finetune"),
                }
    assert first is not None
    return {**first, "n_params": n_params, "size": size}


def _sanitize(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", str(text).lower()).strip("-._") or DEFAULT_TAG


def _suggest_name(path: Path, info: dict[str, Any]) -> str:
    """From GGUF metadata, Ollama-style: ``basename:size[-finetune]-quant`` (e.g. smollm2:135m-q8_0)."""
    base = info.get("basename") or info.get("model_name")
    if not isinstance(base, str) or not base.strip():
        stem = _SPLIT_RE.sub(lambda m: m["stem"], path.name)
        return f"{_sanitize(Path(stem).stem)}:{DEFAULT_TAG}"
    bits = [info.get("size_label")]
    finetune = info.get("finetune")
    if isinstance(finetune, str) and _SHORT_FINETUNES.match(finetune.lower()):
        bits.append(finetune)
    bits.append(info.get("file_type"))
    tag = "-".join(_sanitize(b) for b in bits if isinstance(b, str) and b.strip())
    return f"{_sanitize(base)}:{tag or DEFAULT_TAG}"


def _full_name(spec: str) -> str:
    name, tag = parse_name(spec)
    return f"{name}:{tag}"


def _import_file(src: Path, dst: Path, digest, link: bool, copy_chunk) -> None:
    """Hard-link ``src`` to ``dst`` if allowed and possible, else copy it; feed ``digest``."""
    src = src.resolve()  # the HF cache's snapshot entries are symlinks to blobs: link the blob
    linked = False
    if link:
        try:
            os.link(src, dst)
            linked = True
        except OSError:  # another filesystem, or links not supported: copy
            pass
    if linked:
        if digest is not None:
            with open(dst, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(chunk)
        return
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for chunk in iter(lambda: fin.read(1 << 22), b""):
            if digest is not None:
                digest.update(chunk)
            (copy_chunk or _write)(fout, chunk, len(chunk))
        fout.flush()
        os.fsync(fout.fileno())


def _write(fh, chunk: bytes, n: int) -> None:
    fh.write(chunk)


# -- temporary folders ---------------------------------------------------------------------------------
def _tmp_dir(kind: str) -> Path:
    tmp = home() / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    return path


def _sweep() -> None:
    """Remove the temporary folders of pulls whose process no longer runs (killed mid-pull)."""
    tmp = home() / "tmp"
    if not tmp.is_dir():
        return
    for entry in tmp.iterdir():
        m = re.match(r"^[a-z]+-(\d+)-", entry.name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rung_name(base: str, rung: str) -> str:
    """The store name of one ladder rung: ``smollm2:135m`` + ``Q4_K_M`` -> ``smollm2:135m-q4_k_m``
    (``smollm2`` + ``Q4_K_M`` -> ``smollm2:q4_k_m``)."""
    name, _, tag = base.strip().lower().partition(":")
    return f"{name}:{tag}-{rung.lower()}" if tag else f"{name}:{rung.lower()}"
