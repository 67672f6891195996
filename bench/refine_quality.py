"""quantize --refine vs llama.cpp's own imatrix quants, same run, same per-tensor types and bytes.

    python bench/refine_quality.py [--types Q4_K_M,Q3_K_M,Q2_K,Q4_0,Q5_K_M] [--models default,degridded]
                                   [--kb 200] [--chunks 32] [--threads 2] [--autoround PYTHON]
                                   [--autoround-types Q4_K_M]

Sides, for each model and type:
- llama.cpp imatrix: llama-imatrix (built from the vendored source) on the first --kb kB of the
  shipped calibration text, then llama-quantize --imatrix; wall time = imatrix + quantize.
- llmquant: ``llmquant quantize MODEL OUT TYPE --refine --calib TEXT --calib-chunks N``, one
  process per type (calibration included in its wall time).
- AutoRound (``--autoround PYTHON``: an interpreter with ``auto-round``, ``gguf`` and ``sentencepiece``
  — its llama converter imports it before it falls back to the GPT-2 vocabulary — in its own venv as
  the other anchors): its GGUF export in RTN mode (``iters=0``, "opt-RTN", AutoRound's default for
  GGUF) of the same model as a Hugging Face folder, calibrated on the same token chunks as llmquant
  (the text cut into --chunks x 512 tokens), ``quantize_and_save(format="gguf:<type>")``. Without
  --autoround its rows are left out and the run says so.
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
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
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


def calibration_text(folder: Path, kb: int) -> Path:
    """The first ``kb`` kB of the shipped calibration text (cut at a whole UTF-8 character) as a file."""
    text = folder / "calib.txt"
    raw = default_calibration_path().read_bytes()[: kb * 1000]
    text.write_bytes(raw[: len(raw.decode("utf-8", "ignore").encode("utf-8"))])
    return text


def bench_models(threads: int) -> dict:
    """The bench's two models by name, each made (once, cached) when called."""
    return {"default": lambda: f32_model(threads), "degridded": lambda: degridded_model(threads)}


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


AUTOROUND = r"""
import glob, json, sys, time
import numpy as np, torch
from auto_round import AutoRound
src, dst, ftype, ids_path = sys.argv[1:5]
ids = np.load(ids_path)
t0 = time.perf_counter()
ar = AutoRound(src, scheme=f"gguf:{ftype.lower()}", iters=0, nsamples=len(ids), seqlen=ids.shape[1],
               dataset=[torch.from_numpy(r[None].astype(np.int64)) for r in ids])
ar.quantize_and_save(dst, format=f"gguf:{ftype.lower()}")
print(json.dumps({"seconds": time.perf_counter() - t0, "files": sorted(glob.glob(dst + "/**/*.gguf", recursive=True))}))
"""


def autoround_side(model: Path, text: Path, ftype: str, tmp: Path, args) -> tuple[Path, float, int]:
    """AutoRound's GGUF of ``model`` (its HF folder made once per model), same calibration tokens."""
    from hfmodel import export_default_model
    from tokenizers import Tokenizer

    folder = tmp / f"{model.stem}-hf"
    if not (folder / "config.json").is_file():
        export_default_model(folder, shards=1, source=model)
    ids_path = tmp / "autoround_ids.npy"
    if not ids_path.exists():
        ids = np.asarray(Tokenizer.from_file(str(folder / "tokenizer.json")).encode(
            text.read_text(encoding="utf-8"), add_special_tokens=False).ids, np.int64)
        n = min(args.chunks, len(ids) // 512)
        np.save(ids_path, ids[: n * 512].reshape(n, 512))
    dst = tmp / f"{model.stem}-{ftype}-autoround"
    script = tmp / "autoround_child.py"
    script.write_text(AUTOROUND)
    t, rss, out = timed([args.autoround, str(script), str(folder), str(dst), ftype, str(ids_path)])
    files = json.loads(out.strip().splitlines()[-1])["files"]
    if len(files) != 1:
        raise SystemExit(f"AutoRound wrote {len(files)} GGUF files for {ftype} in {dst}; expected one")
    return Path(files[0]), t, rss


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
    ap.add_argument("--autoround", help="a Python with auto-round, gguf and sentencepiece (its own venv)")
    ap.add_argument("--autoround-types", default="Q4_K_M", help="the types AutoRound makes (it is the slowest side)")
    args = ap.parse_args()
    models = bench_models(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp = Path(tmp)
        text = calibration_text(tmp, args.kb)
        cache: dict = {}
        for mname in args.models.split(","):
            model = models[mname]()
            for ftype in args.types.split(","):
                print(f"{mname} {ftype}", flush=True)
                theirs, t_theirs, rss_theirs = llama_side(model, text, ftype, tmp, args, cache)
                ours, t_ours, rss_ours = ours_side(model, text, ftype, tmp, args)
                if not same_layout(ours, theirs):
                    raise SystemExit(f"{ours} and {theirs} differ in tensor names, types, shapes or bytes")
                sides = [("llama.cpp imatrix", theirs, t_theirs, rss_theirs), ("llmquant --refine", ours, t_ours, rss_ours)]
                if args.autoround and ftype in args.autoround_types.split(","):
                    ar, t_ar, rss_ar = autoround_side(model, text, ftype, tmp, args)
                    sides.append(("AutoRound RTN", ar, t_ar, rss_ar))
                    if not same_layout(ar, theirs):
                        print(f"    AutoRound's {ftype} differs from llama.cpp's in tensor types or bytes", flush=True)
                kld, wall = {}, {}
                for side, path, t, rss in sides:
                    e = evaluate(path, model, args)
                    kld[side], wall[side] = e["kld_mean"], t
                    rows.append((mname, ftype, side, e, t, rss, path.stat().st_size))
                    print(f"    {side:18} KLD {e['kld_mean']:.5f} ± {e['kld_err']:.5f}  same-top "
                          f"{e['top1']:.2f}%  PPL {e['ppl']:.4f}  {t:6.1f} s  {rss / 2**20:5.0f} MiB",
                          flush=True)
                for other in ("llama.cpp imatrix", "AutoRound RTN"):
                    if other in kld:
                        print(f"    ratio refine / {other}: KLD {kld['llmquant --refine'] / kld[other]:.3f}, "
                              f"time {t_ours / wall[other]:.2f}", flush=True)
    if not args.autoround:
        print("AutoRound not run: pass --autoround PYTHON (a venv with auto-round, gguf and sentencepiece)")
    print("\n| model | type | side | mean KLD | same-top | PPL | wall s | peak RSS MiB | file bytes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mname, ftype, side, e, t, rss, size in rows:
        print(f"| {mname} | {ftype} | {side} | {e['kld_mean']:.5f} ± {e['kld_err']:.5f} | {e['top1']:.2f}% "
              f"| {e['ppl']:.4f} | {t:.0f} | {rss / 2**20:.0f} | {size:,} |")


if __name__ == "__main__":
    main()
