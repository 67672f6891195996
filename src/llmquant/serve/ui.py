"""The web page's data: the store's models with ``fit``'s verdict on this machine, and the ladder
reports (``ladder.json``) found in the store or the folders ``llmquant ui --reports`` names.
The page itself is static (serve/web/), served at ``/``; these routes honour the API key."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

_MACHINE: list = []  # this machine, measured once per process (bandwidth takes half a second)


def _this_machine():
    from ..fit.machines import this_machine

    if not _MACHINE:
        _MACHINE.append(this_machine())
    return _MACHINE[0]


def model_rows(n_ctx: int) -> dict[str, Any]:
    from ..fit.catalog import spec_from_gguf
    from ..fit.planner import fit
    from ..store import list_models
    from .modelfile import human_params

    machine = _this_machine()
    rows = []
    for m in list_models():
        row: dict[str, Any] = {"name": m.name, "size": m.size, "file_type": m.file_type,
                               "parameters": human_params(m.n_params), "architecture": m.architecture}
        try:
            spec = spec_from_gguf(m.path)
            rung = next(r for r in fit(spec, machine, n_ctx=min(n_ctx, spec.n_ctx_train or n_ctx), ladder=()).rungs
                        if r.weights.this_file)
            row.update(fits=rung.fits, tok_s=round(rung.tok_s, 1), need_bytes=rung.need, usable_bytes=rung.usable)
            row["verdict"] = (f"fits, ~{rung.tok_s:.0f} tok/s" if rung.fits
                              else f"needs {(rung.need - rung.usable) / 1e9:.1f} GB more")
        except Exception as exc:  # noqa: BLE001 — one unreadable model must not hide the others
            row.update(fits=False, verdict=f"cannot size it: {exc}")
        rows.append(row)
    return {"machine": machine.label, "n_ctx": n_ctx, "models": rows}


def find_reports(folders: list[Path], limit: int = 50) -> list[dict[str, Any]]:
    out = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("ladder.json"))[:limit]:
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and isinstance(data.get("rungs"), list):
                out.append({**data, "where": str(path.parent)})
    return out


def add_routes(app, pool, guarded, report_dirs: list[Path]) -> None:
    from ..store import home

    @app.get("/ui/api/models", dependencies=guarded)
    async def ui_models():
        return await asyncio.to_thread(model_rows, pool.n_ctx)

    @app.get("/ui/api/reports", dependencies=guarded)
    async def ui_reports():
        return {"reports": await asyncio.to_thread(find_reports, [home(), *report_dirs])}
