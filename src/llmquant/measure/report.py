"""Render a ladder: a rich table for the terminal, ladder.json, ladder.md and ladder.png."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from .ladder import IMAT_SUFFIX, REFINE_SUFFIX, LadderResult

COLUMNS = ("rung", "size", "bpw", "PPL", "ΔPPL", "KLD mean", "KLD p99", "same top", "pp t/s", "tg t/s",
           "peak RSS", "RAM @ctx", "fallback")


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _calibrated(name: str) -> bool:
    return name.endswith((IMAT_SUFFIX, REFINE_SUFFIX))


def _has_imatrix(result: LadderResult) -> bool:
    return any(_calibrated(r.name) for r in result.rungs)


MARKERS = {"gguf": "o", "nf4": "s", "gptq": "^", "awq": "D"}


def _mixed(result: LadderResult) -> bool:
    """Whether the table compares formats (then it has format, memory and engine columns)."""
    return any(getattr(r, "format", "gguf") != "gguf" for r in result.rungs)


def columns(result: LadderResult) -> tuple[str, ...]:
    """COLUMNS, with "KLD gain" after "KLD mean" when the ladder has imatrix rungs, and format,
    memory and engine columns when it compares formats."""
    c = list(COLUMNS)
    if _has_imatrix(result):
        c.insert(c.index("KLD mean") + 1, "KLD gain")
    if _mixed(result):
        c.insert(1, "format")
        c.insert(3, "in memory")
        c.append("runs in")
    return tuple(c)


def kld_gain(result: LadderResult, name: str) -> float | None:
    """For ``X+imat`` and ``X+refine``: how much lower its mean KLD is than X's (0.25 = a quarter lower)."""
    if not _calibrated(name):
        return None
    by_name = {r.name: r for r in result.rungs}
    suffix = IMAT_SUFFIX if name.endswith(IMAT_SUFFIX) else REFINE_SUFFIX
    plain, imat = by_name.get(name[: -len(suffix)]), by_name.get(name)
    if not (plain and imat and plain.eval and imat.eval) or plain.eval["kld_mean"] <= 0:
        return None
    return 1.0 - imat.eval["kld_mean"] / plain.eval["kld_mean"]


def rows(result: LadderResult) -> list[list[str]]:
    out = [_row(result, r) for r in result.rungs]
    if _has_imatrix(result):
        at = COLUMNS.index("KLD mean") + 1
        for row, r in zip(out, result.rungs):
            gain = kld_gain(result, r.name)
            row.insert(at, f"{100 * gain:+.1f}%" if gain is not None else "-")
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
        f"base of comparison: {'the source itself' if result.base == result.model else 'its ' + result.base_type + ' rendering'}"
        f" ({result.base_type}: {result.base}); text: {result.text}; "
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


# columns dropped first when a plain table must fit a narrow width (a log, a pipe: 80 columns)
_DROP_ORDER = ("fallback", "pp t/s", "peak RSS", "KLD p99", "bpw", "ΔPPL", "tg t/s", "RAM @ctx")


def plain_table(result: LadderResult, width: int = 80) -> str:
    """The ladder table as plain text no wider than ``width``: PPL without its ± part, then
    columns dropped in _DROP_ORDER until it fits (the JSON and Markdown reports have them all)."""
    all_cols = list(columns(result))
    data = [[cell.split(" ± ")[0] if c == "PPL" else cell.replace(" MiB", "M") if "MiB" in cell else cell
             for c, cell in zip(all_cols, row)] for row in rows(result)]

    def render(cols: list[str]) -> list[str]:
        idx = [all_cols.index(c) for c in cols]
        widths = [max(len(c), *(len(r[i]) for r in data)) if data else len(c) for c, i in zip(cols, idx)]

        def fmt(cells: list[str]) -> str:
            return "  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(cells, widths)))

        lines = [fmt(cols), "  ".join("-" * w for w in widths)] + [fmt([r[i] for i in idx]) for r in data]
        return [line.rstrip() for line in lines]

    cols = list(all_cols)
    lines = render(cols)
    for c in _DROP_ORDER:
        if max(len(line) for line in lines) <= width:
            break
        cols.remove(c)
        lines = render(cols)
    dropped = [c for c in all_cols if c not in cols]
    if dropped:
        import textwrap

        lines += textwrap.wrap(f"(not shown at {width} columns: {', '.join(dropped)}; see ladder.md)", width)
    return "\n".join(lines)


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
        kinds = [2 if p[3].endswith(REFINE_SUFFIX) else 1 if p[3].endswith(IMAT_SUFFIX) else 0 for p in pts]
        imat = [k > 0 for k in kinds]
        colors = ["tab:red" if p[3] == result.recommendation else ("tab:blue", "tab:green", "tab:purple")[k]
                  for p, k in zip(pts, kinds)]
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        for want, color, kind in ((0, "tab:blue", "without imatrix"), (1, "tab:green", "with imatrix"),
                                  (2, "tab:purple", "refined (--refine)")):
            line = [i for i in order if kinds[i] == want]
            if line:  # one curve per kind, so the imatrix gain reads as the gap between them
                ax.plot([xs[i] for i in line], [ys[i] for i in line], color=color, alpha=0.45, zorder=2,
                        label=kind if any(imat) else None)
        for fmt in dict.fromkeys(p[4] for p in pts):  # one marker per format
            idx_f = [i for i, p in enumerate(pts) if p[4] == fmt]
            ax.scatter([xs[i] for i in idx_f], [ys[i] for i in idx_f], c=[colors[i] for i in idx_f], s=40, zorder=3,
                       marker=MARKERS.get(fmt, "o"), label=(fmt.upper() if fmt != "gguf" else "GGUF") if _mixed(result) else None)
        if any(imat) or _mixed(result):
            ax.legend(loc="best", fontsize=9)
        for rank, i in enumerate(order):  # alternate label sides so neighbours do not overlap
            right = not imat[i] if any(imat) else rank % 2 == 0  # with imatrix rows: +imat left, plain right
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
    from ..gguf.writer import write_failed

    texts = (("json", json.dumps(result.to_dict(), indent=2, default=str) + "\n"), ("md", markdown(result)), ("png", None))
    for key, text in texts:
        tmp = out_dir / f"ladder.tmp.{key}"
        try:
            if text is None:
                plot(result, tmp)
            else:
                tmp.write_text(text)
            tmp.replace(paths[key])
        except OSError as exc:  # disk full: no .tmp left behind, one line
            tmp.unlink(missing_ok=True)
            raise write_failed(paths[key], exc) from None
    return {k: str(v) for k, v in paths.items()}
