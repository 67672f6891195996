"""Render a ladder: a rich table for the terminal, ladder.json, ladder.md and ladder.png."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from .ladder import LadderResult

COLUMNS = ("rung", "size", "bpw", "PPL", "ΔPPL", "KLD mean", "KLD p99", "same top", "pp t/s", "tg t/s",
           "peak RSS", "RAM @ctx", "fallback")


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


MARKERS = {"gguf": "o", "nf4": "s", "gptq": "^", "awq": "D"}


def _mixed(result: LadderResult) -> bool:
    """Whether the table compares formats (then it has format, memory and engine columns)."""
    return any(getattr(r, "format", "gguf") != "gguf" for r in result.rungs)


def columns(result: LadderResult) -> tuple[str, ...]:
    if not _mixed(result):
        return COLUMNS
    c = list(COLUMNS)
    c.insert(1, "format")
    c.insert(3, "in memory")
    return (*c, "runs in")


def rows(result: LadderResult) -> list[list[str]]:
    out = [_row(result, r) for r in result.rungs]
    if _mixed(result):
        for row, r in zip(out, result.rungs):
            row.insert(1, f"{r.format} ({r.runtime})")
            row.insert(3, _mib(r.memory_bytes) if r.memory_bytes else "-")
            row.append(r.engines)
    return out


def _row(result: LadderResult, r) -> list[str]:
    e, s = r.eval, r.speed
    return [
        r.name + (" *" if r.name == result.recommendation else ""),
        _mib(r.file_bytes),
        f"{r.bits_per_weight:.2f}",
        f"{e['ppl']:.3f} ± {e['ppl_err']:.3f}" if e else "-",
        f"{100 * (e['ppl_ratio'] - 1):+.2f}%" if e else "-",
        f"{e['kld_mean']:.5f}" if e else "-",
        f"{e['kld_p99']:.4f}" if e else "-",
        f"{e['top1']:.2f}%" if e else "-",
        f"{s['pp_tps']:.0f}" if s else "-",
        f"{s['tg_tps']:.1f}" if s else "-",
        _mib(s["peak_rss"]) if s and s.get("peak_rss") else "-",
        (_mib(r.fit["total_bytes"]) + ("" if r.fit["fits"] else " (no fit)")) if r.fit else "-",
        f"{100 * r.fallback_share:.0f}%",
    ]


def header_lines(result: LadderResult) -> list[str]:
    lines = [
        f"model: {result.model_name or result.model} ({result.source_type or '?'} file: {result.model})",
        f"base of comparison: {result.base_type} rendering ({result.base}); text: {result.text}; "
        f"ctx {result.ctx}, {result.chunks} chunks, second half of each chunk scored; {result.threads} threads",
    ]
    if result.machine:
        name = result.machine.get("name") or "this machine"
        lines.append(f"RAM @ctx = llmquant fit's total for a {result.fit_ctx}-token context on "
                     f"{'this machine' if name == 'this' else name} (usable {result.machine.get('usable_bytes', 0) / 2**30:.1f} GiB); "
                     "peak RSS = measured while benchmarking (short context)")
    return lines


def footer_lines(result: LadderResult) -> list[str]:
    lines = []
    if any(r.fallback_share > 0 for r in result.rungs):
        lines.append("fallback = share of quantized weights stored in another type than the rung's rule asks for, "
                     "because their row length is not a multiple of the block size (256 for K types):")
        for r in result.rungs:
            if r.fallbacks:
                lines.append(f"  {r.name}: " + ", ".join(f"{n} x {k}" for k, n in r.fallbacks.items()))
    lines += [f"note: {n}" for n in result.notes]
    lines += [f"inversion: {i}" for i in result.inversions]
    if result.recommendation:
        lines.append(f"recommendation: {result.recommendation} (*) - " + "; ".join(result.reasons) + ".")
    return lines


def table(result: LadderResult) -> Table:
    t = Table(title="llmquant ladder", title_justify="left")
    for c in columns(result):
        t.add_column(c, justify="left" if c in ("rung", "format", "runs in") else "right")
    for row in rows(result):
        t.add_row(*row)
    return t


def markdown(result: LadderResult) -> str:
    out = ["# llmquant ladder", ""]
    out += [f"- {line}" for line in header_lines(result)]
    cols = columns(result)
    out += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(r) + " |" for r in rows(result)]
    out.append("")
    out += [f"- {line.strip()}" if not line.startswith("  ") else f"  - {line.strip()}" for line in footer_lines(result)]
    return "\n".join(out) + "\n"


def plot(result: LadderResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    pts = [(r.file_bytes / 2**20, r.eval["kld_mean"], r.eval.get("ppl_ratio", 1.0), r.name, getattr(r, "format", "gguf"))
           for r in result.rungs if r.eval]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    for ax, idx, label in ((ax1, 1, "mean KL-divergence to the base (log)"),
                           (ax2, 2, "perplexity increase vs base (%)")):
        xs = [p[0] for p in pts]
        ys = [max(p[1], 1e-7) if idx == 1 else 100 * (p[2] - 1) for p in pts]
        colors = ["tab:red" if p[3] == result.recommendation else "tab:blue" for p in pts]
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        ax.plot([xs[i] for i in order], [ys[i] for i in order], color="tab:gray", alpha=0.4, zorder=2)
        for fmt in dict.fromkeys(p[4] for p in pts):  # one marker per format
            idx_f = [i for i, p in enumerate(pts) if p[4] == fmt]
            ax.scatter([xs[i] for i in idx_f], [ys[i] for i in idx_f], c=[colors[i] for i in idx_f], s=40, zorder=3,
                       marker=MARKERS.get(fmt, "o"), label=fmt.upper() if fmt != "gguf" else "GGUF")
        if _mixed(result):
            ax.legend(loc="best", fontsize=9)
        for rank, i in enumerate(order):  # alternate label sides so neighbours do not overlap
            right = rank % 2 == 0
            ax.annotate(pts[i][3], (xs[i], ys[i]), textcoords="offset points", fontsize=9,
                        xytext=(7, 4) if right else (-7, -4), ha="left" if right else "right",
                        va="bottom" if right else "top")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.tick_params(axis="x", which="minor", labelsize=8)
        if idx == 1:
            ax.set_yscale("log")
        ax.set_xlabel("file size (MiB, log)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    title = f"{result.model_name or Path(result.model).name}: quality loss vs size (base: {result.base_type} rendering)"
    if result.source_was_quantized:
        title += f"\nsource was {result.source_type}: losses are optimistic"
    if result.recommendation:
        title += f"  -  red: recommended ({result.recommendation})"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(result: LadderResult, out_dir: Path) -> dict[str, str]:
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "ladder.json", "md": out_dir / "ladder.md", "png": out_dir / "ladder.png"}
    for key, text in (("json", json.dumps(result.to_dict(), indent=2, default=str) + "\n"), ("md", markdown(result))):
        tmp = paths[key].with_suffix(paths[key].suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(paths[key])
    tmp_png = out_dir / "ladder.tmp.png"
    plot(result, tmp_png)
    tmp_png.replace(paths["png"])
    return {k: str(v) for k, v in paths.items()}
