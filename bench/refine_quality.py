"""quantize --refine vs llama.cpp's own imatrix quants, same run, same per-tensor types and bytes.

    python bench/refine_quality.py [--types Q4_K_M,Q3_K_M,Q2_K,Q4_0,Q5_K_M] [--models default,degridded]
                                   [--kb 200] [--chunks 32] [--threads 2]

Sides, for each model and type:
- llama.cpp imatrix: llama-imatrix (built from the vendored source) on the first --kb kB of the
  shipped calibration text, then llama-quantize --imatrix; wall time = imatrix + quantize.
- llmquant: ``llmquant quantize MODEL OUT TYPE --refine --calib TEXT --calib-chunks N``, one
  process per type (calibration included in its wall time).
- AutoRound's GGUF export runs when ``auto_round`` imports in this interpreter (``pip install
  auto-round`` with the CPU torch); otherwise the row says so.
Each file is evaluated with ``llmquant eval`` (llama-perplexity's numbers) against its model on
data/eval.txt, which shares no 64-token window with the calibration text.

Models: ``default`` is the F32 rendering of the embedded SmolLM2-135M (its weights sit on a Q4_1
grid); ``degridded`` is the same with each Q4_1 block's weights plus seeded uniform noise within
± half the block's step, so that no method gains by re-finding the source grid.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import numpy as np
from _llama_build import CACHE, build_tool
from imatrix_speed import f32_model, timed

from llmquant.calib.stats import default_calibration_path


def degridded_model(threads: int, seed: int = 0) -> Path:
    """The default model with every Q4_1 weight moved by U(−d/2, d/2), d its block's step; F32."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFValueType

    from llmquant.gguf.source import GGUFSource
    from llmquant.gguf.writer import AtomicGGUFWriter
    from llmquant.models import default_model_path

    dst = CACHE / f"smollm2-135m-degridded-s{seed}-F32.gguf"
    if dst.exists():
        return dst
    rng = np.random.default_rng(seed)
    with GGUFSource(default_model_path()) as src:
        w = AtomicGGUFWriter(dst, src.arch, force=True, alignment=src.header.alignment)
        for f in src.fields.values():
            w.add_field(f)
        w.set("general.file_type", 0, GGUFValueType.UINT32)
        for t in src.tensors:
            w.add_tensor_info(t.name, t.shape, T.F32)
        w.start()
        for t in src.tensors:
            values = src.read(t.name).astype(np.float32).reshape(-1)
            if t.type == T.Q4_1:
                raw = np.ascontiguousarray(src.raw(t.name)).view(np.uint8).reshape(-1, 20)
                d = raw[:, 0:2].copy().view(np.float16).astype(np.float32).reshape(-1)
                noise = rng.uniform(-0.5, 0.5, (d.size, 32)).astype(np.float32) * np.abs(d)[:, None]
                values = values + noise.reshape(-1)
            w.write_tensor(t.name, values.astype(np.float32))
        w.commit()
    return dst


def llama_side(model: Path, text: Path, ftype: str, tmp: Path, args, cache: dict) -> tuple[Path, float, int]:
    imat = cache.get(model)
    if imat is None:
        out = tmp / f"{model.stem}.imatrix.gguf"
        t, rss, _ = timed([str(build_tool("llama-imatrix")), "-m", str(model), "-f", str(text), "-o", str(out),
                           "-c", "512", "-t", str(args.threads), "--no-ppl"])
        imat = cache[model] = (out, t, rss)
    out, t_imat, rss_imat = imat
    dst = tmp / f"{model.stem}-{ftype}-llama.gguf"
    t, rss, _ = timed([str(build_tool("llama-quantize")), "--imatrix", str(out), str(model), str(dst), ftype,
                       str(args.threads)])
    return dst, t_imat + t, max(rss, rss_imat)


def ours_side(model: Path, text: Path, ftype: str, tmp: Path, args) -> tuple[Path, float, int]:
    dst = tmp / f"{model.stem}-{ftype}-refine.gguf"
    t, rss, out = timed([sys.executable, "-m", "llmquant", "quantize", str(model), str(dst), ftype, str(args.threads),
                         "--refine", "--calib", str(text), "--calib-chunks", str(args.chunks), "--json"])
    res = json.loads(out)
    print(f"    llmquant refine: statistics {res['refine']['statistics_seconds']:.0f} s, "
          f"{res['refine']['tensors_refined']} tensors refined, {res['refine']['tensors_kept_plain']} kept plain",
          flush=True)
    return dst, t, rss


def evaluate(path: Path, base: Path, args) -> dict:
    p = subprocess.run([sys.executable, "-m", "llmquant", "eval", str(path), "--base", str(base), "--json",
                        "-t", str(args.threads)], capture_output=True, text=True, check=False)
    if p.returncode:
        raise SystemExit(f"eval of {path} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout)


def same_layout(a: Path, b: Path) -> bool:
    from llmquant.gguf.source import GGUFSource

    with GGUFSource(a) as x, GGUFSource(b) as y:
        return ({t.name: (tuple(t.shape), t.type) for t in x.tensors} == {t.name: (tuple(t.shape), t.type) for t in y.tensors}
                and x.tensor_bytes == y.tensor_bytes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q4_K_M,Q3_K_M,Q2_K,Q4_0,Q5_K_M")
    ap.add_argument("--models", default="default,degridded")
    ap.add_argument("--kb", type=int, default=200, help="kilobytes of the calibration text (both sides)")
    ap.add_argument("--chunks", type=int, default=32, help="--calib-chunks for llmquant")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    models = {"default": lambda: f32_model(args.threads), "degridded": lambda: degridded_model(args.threads)}
    rows = []
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp = Path(tmp)
        text = tmp / "calib.txt"
        raw = default_calibration_path().read_bytes()[: args.kb * 1000]
        text.write_bytes(raw[: len(raw.decode("utf-8", "ignore").encode("utf-8"))])
        cache: dict = {}
        for mname in args.models.split(","):
            model = models[mname]()
            for ftype in args.types.split(","):
                print(f"{mname} {ftype}", flush=True)
                theirs, t_theirs, rss_theirs = llama_side(model, text, ftype, tmp, args, cache)
                ours, t_ours, rss_ours = ours_side(model, text, ftype, tmp, args)
                if not same_layout(ours, theirs):
                    raise SystemExit(f"{ours} and {theirs} differ in tensor names, types, shapes or bytes")
                for side, path, t, rss in (("llama.cpp imatrix", theirs, t_theirs, rss_theirs),
                                           ("llmquant --refine", ours, t_ours, rss_ours)):
                    e = evaluate(path, model, args)
                    rows.append((mname, ftype, side, e, t, rss, path.stat().st_size))
                    print(f"    {side:18} KLD {e['kld_mean']:.5f} ± {e['kld_err']:.5f}  same-top "
                          f"{e['top1']:.2f}%  PPL {e['ppl']:.4f}  {t:6.1f} s  {rss / 2**20:5.0f} MiB",
                          flush=True)
                base, mine = rows[-2][3]["kld_mean"], rows[-1][3]["kld_mean"]
                print(f"    ratio refine / llama.cpp imatrix: KLD {mine / base:.3f}, time {t_ours / t_theirs:.2f}",
                      flush=True)
            print(f"    AutoRound: {'installed' if _has_autoround() else 'not installed here (pip install auto-round)'}")
    print("\n| model | type | side | mean KLD | same-top | PPL | wall s | peak RSS MiB | file bytes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mname, ftype, side, e, t, rss, size in rows:
        print(f"| {mname} | {ftype} | {side} | {e['kld_mean']:.5f} ± {e['kld_err']:.5f} | {e['top1']:.2f}% "
              f"| {e['ppl']:.4f} | {t:.0f} | {rss / 2**20:.0f} | {size:,} |")


def _has_autoround() -> bool:
    import importlib.util

    return importlib.util.find_spec("auto_round") is not None


if __name__ == "__main__":
    main()
