"""Ollama's Modelfile: ``llmquant show NAME --modelfile`` prints one, ``llmquant create NAME -f
Modelfile`` reads one; and what ``/api/show`` answers.

The syntax as Ollama's parser (``parser/parser.go``) reads it: one instruction per line —
``FROM``, ``PARAMETER key value``, ``SYSTEM``, ``TEMPLATE``, ``MESSAGE role text``, ``LICENSE``,
``ADAPTER``, ``REQUIRES`` — case-insensitive, ``#`` comments, a value bare to the end of the line,
in ``"..."``, or in triple quotes across lines. PARAMETER names and types follow Ollama's
``api.Options`` (a repeated ``stop`` accumulates). ``FROM`` is a GGUF (relative to the Modelfile's
folder) or a store name; the new model links the same file, with its settings in the manifest.
TEMPLATE is kept as written (Ollama's Go-template form) and printed back by ``show --modelfile``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LlmquantError


def now_iso(t: float | None = None) -> str:
    dt = datetime.datetime.fromtimestamp(time.time() if t is None else t, datetime.timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def human_params(n: int) -> str:
    """Ollama's parameter_size ("8.0B", "134.52M")."""
    if n >= 1_000_000_000:
        return f"{n / 1e9:.1f}B"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.2f}K" if n >= 1000 else str(n)


def digest_of(m: Any) -> str:
    """The file's sha256 when the store has it; else a stable id of path, size and mtime."""
    if getattr(m, "sha256", None):
        return m.sha256
    return hashlib.sha256(f"{m.path}:{m.size}:{m.modified}".encode()).hexdigest()


def details_of(m: Any) -> dict:
    return {"parent_model": "", "format": "gguf", "family": m.architecture, "families": [m.architecture],
            "parameter_size": human_params(m.n_params), "quantization_level": m.file_type or "unknown"}


def _param_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v)


def parameters_text(params: dict[str, Any]) -> str:
    """Ollama's ``parameters`` string: one ``key value`` per line, a list as repeated lines."""
    lines = []
    for k, v in params.items():
        for item in v if isinstance(v, list) else [v]:
            lines.append(f"{k:<16}{_param_value(item)}")
    return "\n".join(lines)


def show_model(name: str, *, verbose: bool = False) -> dict[str, Any]:
    from ..store import get, show

    m = get(name)
    info = show(name)
    settings = model_settings(m, info)
    metadata = dict(info["metadata"])
    if not verbose:  # as Ollama: the big tokenizer arrays only with verbose
        metadata = {k: (None if isinstance(v, str) and v.endswith(" items]") else v) for k, v in metadata.items()}
    metadata.setdefault("general.parameter_count", m.n_params)
    caps = ["completion"]
    template = info["chat_template"] or ""
    if "tools" in template:
        caps.append("tools")
    return {
        "modelfile": render_modelfile(m, settings),
        "parameters": parameters_text(settings["parameters"]),
        "template": settings["template"] or template,
        "system": settings["system"] or "",
        "details": details_of(m),
        "model_info": metadata,
        "capabilities": caps,
        "modified_at": now_iso(m.modified),
    }


def model_settings(m: Any, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """A stored model's Modelfile settings: PARAMETER values (the GGUF's stop tokens, then what
    ``create`` recorded), SYSTEM and TEMPLATE (None when not set)."""
    cfg = getattr(m, "config", None) or {}
    params: dict[str, Any] = {}
    if info is not None and info["parameters"].get("stop"):
        params["stop"] = list(info["parameters"]["stop"])
    params.update(cfg.get("parameters") or {})
    return {"parameters": params, "system": cfg.get("system"), "template": cfg.get("template"),
            "messages": cfg.get("messages") or [], "license": cfg.get("license")}


# -- Modelfile text ------------------------------------------------------------------------------------
class ModelfileError(LlmquantError):
    """A Modelfile that cannot be read: names the file, the line and what was expected."""


INT_PARAMS = {"num_ctx", "num_predict", "top_k", "seed", "num_keep", "repeat_last_n", "num_batch", "num_gpu",
              "main_gpu", "num_thread", "mirostat"}
FLOAT_PARAMS = {"temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                "frequency_penalty", "mirostat_tau", "mirostat_eta", "tfs_z"}
BOOL_PARAMS = {"penalize_newline", "numa", "low_vram", "use_mmap", "use_mlock", "vocab_only"}
COMMANDS = ("from", "parameter", "system", "template", "message", "license", "adapter", "requires")


@dataclass
class Modelfile:
    source: str  # FROM
    parameters: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    template: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    license: str | None = None

    def config(self) -> dict[str, Any]:
        """What the store's manifest records."""
        out: dict[str, Any] = {"parameters": self.parameters}
        for key in ("system", "template", "license"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.messages:
            out["messages"] = self.messages
        return out


def _typed(key: str, raw: str, where: str) -> Any:
    try:
        if key in INT_PARAMS:
            return int(raw)
        if key in FLOAT_PARAMS:
            return float(raw)
        if key in BOOL_PARAMS:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
    except ValueError:
        kind = "an integer" if key in INT_PARAMS else "a number" if key in FLOAT_PARAMS else "true or false"
        raise ModelfileError(f"{where}: PARAMETER {key} must be {kind}, not {raw!r}") from None
    if key == "stop":
        return raw
    raise ModelfileError(f"{where}: unknown PARAMETER {key!r} (Ollama's are: "
                         f"{', '.join(sorted(INT_PARAMS | FLOAT_PARAMS | BOOL_PARAMS | {'stop'}))})")


def _value(text: str, pos: int, lines_of: str, where: str) -> tuple[str, int]:
    """A value starting at ``text[pos]``: \"\"\"...\"\"\", "...", or the rest of the line. -> (value, end)."""
    if text.startswith('"""', pos):
        end = text.find('"""', pos + 3)
        if end < 0:
            raise ModelfileError(f"{where}: unterminated \"\"\" (opened here)")
        return text[pos + 3:end], end + 3
    if text.startswith('"', pos):
        end = text.find('"', pos + 1)
        nl = text.find("\n", pos)
        if end < 0 or (0 <= nl < end):
            raise ModelfileError(f"{where}: unterminated quote")
        return text[pos + 1:end], end + 1
    nl = text.find("\n", pos)
    nl = len(text) if nl < 0 else nl
    return text[pos:nl].strip(), nl


def parse_modelfile(text: str, *, name: str = "Modelfile") -> Modelfile:
    source = None
    mf = Modelfile(source="")
    pos, n = 0, len(text)
    while pos < n:
        line_no = text.count("\n", 0, pos) + 1
        where = f"{name}:{line_no}"
        # skip blank space and comments
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        if pos >= n:
            break
        if text[pos] == "#":
            nl = text.find("\n", pos)
            pos = n if nl < 0 else nl + 1
            continue
        line_no = text.count("\n", 0, pos) + 1
        where = f"{name}:{line_no}"
        end = pos
        while end < n and text[end] not in " \t\r\n":
            end += 1
        command = text[pos:end].lower()
        if command not in COMMANDS:
            raise ModelfileError(f"{where}: unknown instruction {text[pos:end]!r} "
                                 f"(expected one of {', '.join(c.upper() for c in COMMANDS)})")
        pos = end
        while pos < n and text[pos] in " \t":
            pos += 1
        if command in ("parameter", "message"):
            end = pos
            while end < n and text[end] not in " \t\r\n":
                end += 1
            key = text[pos:end].lower()
            if not key:
                raise ModelfileError(f"{where}: {command.upper()} needs a name and a value")
            pos = end
            while pos < n and text[pos] in " \t":
                pos += 1
            raw, pos = _value(text, pos, text, where)
            if command == "parameter":
                value = _typed(key, raw, where)
                if key == "stop":
                    mf.parameters.setdefault("stop", []).append(value)
                else:
                    mf.parameters[key] = value
            else:
                if key not in ("system", "user", "assistant", "tool"):
                    raise ModelfileError(f"{where}: MESSAGE role must be system, user, assistant or tool; got {key!r}")
                mf.messages.append({"role": key, "content": raw})
            continue
        raw, pos = _value(text, pos, text, where)
        if command == "from":
            source = raw
        elif command in ("system", "template", "license"):
            setattr(mf, command, raw)
        elif command == "adapter":
            raise ModelfileError(f"{where}: ADAPTER (LoRA) is not supported")
        # REQUIRES (a minimum Ollama version) has nothing to check here
    if not source:
        raise ModelfileError(f"{name}: no FROM line (FROM a GGUF file or a stored model name)")
    mf.source = source
    return mf


def _quoted(value: str, what: str) -> str:
    if '"""' in value:
        raise ModelfileError(f"the {what} contains \"\"\", which a Modelfile cannot quote")
    return f'"""{value}"""' if ('"' in value or "\n" in value) else f'"{value}"'


def render_modelfile(m: Any, settings: dict[str, Any]) -> str:
    """The Modelfile of stored model ``m`` (``settings`` from ``model_settings``), as
    ``ollama show --modelfile`` prints one."""
    lines = ["# Modelfile generated by \"llmquant show\"", "# To build a new Modelfile based on this, replace FROM with:",
             f"# FROM {m.name}", "", f"FROM {m.path}"]
    return "\n".join(lines + setting_lines(settings)) + "\n"


def setting_lines(settings: dict[str, Any], *, keep_empty: bool = False) -> list[str]:
    """The TEMPLATE, SYSTEM, PARAMETER, MESSAGE and LICENSE lines of ``settings`` (``model_settings``'
    keys; ``license`` a string or a list). ``keep_empty``: an empty TEMPLATE or SYSTEM is written too."""
    lines = []
    for key, label in (("template", "template"), ("system", "system prompt")):
        value = settings.get(key)
        if value is not None and (value or keep_empty):
            lines.append(f"{key.upper()} {_quoted(value, label)}")
    for k, v in (settings.get("parameters") or {}).items():
        for item in v if isinstance(v, list) else [v]:
            text = str(item).lower() if isinstance(item, bool) else str(item)
            lines.append(f"PARAMETER {k} {_quoted(text, k) if isinstance(item, str) else text}")
    for msg in settings.get("messages") or []:
        lines.append(f"MESSAGE {msg.get('role')} {_quoted(str(msg.get('content', '')), 'message')}")
    lic = settings.get("license")
    for one in [lic] if isinstance(lic, str) else lic or []:
        lines.append(f"LICENSE {_quoted(one, 'license')}")
    return lines


def create_model(name: str, modelfile: str | Path, *, text: str | None = None) -> Any:
    """``llmquant create NAME -f Modelfile``: the FROM model stored under NAME with the Modelfile's
    settings (the file is linked, not copied, when it can be). Returns the StoredModel."""
    from ..store import StoreError, get, looks_like_name, pull

    path = Path(modelfile)
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ModelfileError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    mf = parse_modelfile(text, name=str(path))
    src = Path(mf.source).expanduser()
    if not src.is_absolute():
        src = path.parent / src
    base_config: dict[str, Any] = {}
    if src.exists():
        origin: Path = src
    elif looks_like_name(mf.source):
        try:
            base = get(mf.source)
        except StoreError:
            raise ModelfileError(f"{path}: FROM {mf.source}: no such file or stored model") from None
        origin, base_config = Path(base.path), dict(base.config)
    else:
        raise ModelfileError(f"{path}: FROM {mf.source}: no such file or stored model")
    config = {**base_config, **{k: v for k, v in mf.config().items() if k != "parameters"}}
    config["parameters"] = {**(base_config.get("parameters") or {}), **mf.parameters}
    return pull(origin, name, config=config)
