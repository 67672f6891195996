"""Verbs over the model store: pull, list, show, create, rm."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.table import Table

from .options import JsonOpt, _human_bytes, _human_count, _print_json, app, err, out

# -- store: pull / list / show / rm --------------------------------------------------------------------------
NameArg = Annotated[str, typer.Argument(help="A model name, NAME[:TAG] (see llmquant list).", show_default=False)]


@app.command()
def pull(
    src: Annotated[str, typer.Argument(help="A GGUF file, a folder holding one, or hf.co/ORG/REPO[:QUANT] from the local Hugging Face cache.", show_default=False)],
    name: Annotated[Optional[str], typer.Option("--name", help="Store it as NAME[:TAG] (default: from the model's metadata).", show_default=False)] = None,
    copy: Annotated[bool, typer.Option("--copy", help="Always copy (default: hard-link when on the same disk).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Add a local model to the store under a name:tag (offline: never downloads)."""
    from ..store import pull as pull_model

    m = pull_model(src, name, link=not copy)
    if as_json:
        _print_json(m.to_dict())
        return
    out.print(f"pulled {m.name} ({_human_bytes(m.size)}, {m.file_type or '?'}, "
              f"{_human_count(m.n_params)} parameters) from {m.source}", highlight=False, soft_wrap=True)


@app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """List the models in the store (and the embedded default)."""
    import datetime

    from ..store import home, list_models

    models = list_models()
    if as_json:
        _print_json([m.to_dict() for m in models])
        return
    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("NAME", "SIZE", "QUANT", "PARAMS", "MODIFIED"):
        t.add_column(col, justify="right" if col in ("SIZE", "PARAMS") else "left")
    now = datetime.datetime.now().timestamp()
    for m in models:
        when = "embedded" if m.embedded else _ago(now - m.modified)
        t.add_row(m.name, _human_bytes(m.size), m.file_type or "?", _human_count(m.n_params), when)
    out.print(t)
    err.print(f"[dim]store: {home()}[/dim]", highlight=False)


def _ago(seconds: float) -> str:
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= n:
            k = int(seconds // n)
            return f"{k} {unit}{'s' if k > 1 else ''} ago"
    return "just now"


@app.command()
def show(
    name: NameArg,
    template: Annotated[bool, typer.Option("--template", help="Print only the chat template.")] = False,
    modelfile: Annotated[bool, typer.Option("--modelfile", help="Print its Modelfile (Ollama's form: FROM, TEMPLATE, SYSTEM, PARAMETER).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show a stored model: details, default parameters, chat template and metadata."""
    from ..store import show as show_model

    if modelfile:
        from ..serve.modelfile import show_model as ollama_show

        text = ollama_show(name)["modelfile"]
        if as_json:
            _print_json({"name": name, "modelfile": text})
        else:
            sys.stdout.write(text)
        return
    info = show_model(name)
    if as_json:
        _print_json(info)
        return
    if template:
        sys.stdout.write((info["chat_template"] or "") + "\n")
        return
    m, d = info["model"], info["details"]

    def section(title: str, rows: list[tuple[str, str]]) -> None:
        t = Table(show_header=False, box=None, pad_edge=False, title=title, title_justify="left", title_style="bold")
        t.add_column(style="dim", no_wrap=True)
        t.add_column(overflow="fold")
        for k, v in rows:
            t.add_row(k, v)
        out.print(t)
        out.print()

    section("Model", [
        ("name", m["name"]), ("file", m["path"]), ("source", m["source"]),
        ("architecture", str(d["architecture"])),
        ("parameters", f"{_human_count(d['parameters'])} ({d['parameters']:,})"),
        ("quantization", str(d["quantization"] or "?")), ("size", _human_bytes(m["size"])),
        ("context length", str(d["context_length"] or "-")), ("embedding length", str(d["embedding_length"] or "-")),
        ("layers", str(d["layers"] or "-")), ("heads / kv heads", f"{d['heads'] or '-'} / {d['kv_heads'] or '-'}"),
        ("vocabulary", str(d["vocabulary"] or "-")), ("license", str(d["license"] or "-")),
    ] + ([("sha256", m["sha256"])] if m.get("sha256") else []))
    p = info["parameters"]
    section("Parameters", [(k, json.dumps(v) if k == "stop" else str(v)) for k, v in p.items()])
    out.print("[bold]Chat template[/bold]")
    out.print(info["chat_template"] or "(none: chat uses ChatML)", markup=False, highlight=False, soft_wrap=True)
    out.print()
    section("Metadata", [(k, str(v)) for k, v in info["metadata"].items()])


@app.command()
def create(
    name: NameArg,
    file: Annotated[str, typer.Option("--file", "-f", help="The Modelfile (FROM a GGUF or a stored model; PARAMETER, SYSTEM, TEMPLATE, MESSAGE).")] = "Modelfile",
    as_json: JsonOpt = False,
) -> None:
    """Create a model from a Modelfile, as `ollama create NAME -f Modelfile` does (the GGUF is linked, not copied)."""
    from ..serve.modelfile import create_model

    m = create_model(name, file)
    if as_json:
        _print_json(m.to_dict())
        return
    params = m.config.get("parameters") or {}
    out.print(f"created {m.name} from {m.source} ({len(params)} parameter{'s' if len(params) != 1 else ''}"
              f"{', system prompt' if m.config.get('system') else ''}{', template' if m.config.get('template') else ''})",
              highlight=False, soft_wrap=True)


@app.command()
def rm(names: Annotated[list[str], typer.Argument(help="Model names to remove.", show_default=False)]) -> None:
    """Remove models from the store (their files too, unless still linked elsewhere)."""
    from ..store import remove

    for name in names:
        m = remove(name)
        out.print(f"deleted {m.name}", highlight=False)
