"""GPTQ / AWQ / RTN of the default model as an HF folder: quality (KLD, PPL, same-top vs the float
model on held-out text), wall time and peak RSS of each llmquant run; llm-compressor in its own venv
when ``--llmcompressor PYTHON`` is given (same model, calibration tokens, group size, eval).

    python bench/calib_quality.py [--samples 32 --seq-len 512] [--degrid] [--llmcompressor /work/venvs/gptq-llmcompressor/bin/python]

Text: ``pydoc`` renderings of standard-library modules: calibration from one list of modules, eval
from another (no overlap). Each quantization runs in its own subprocess (``/usr/bin/time``-free: RSS is
the child's ru_maxrss). Eval loads every result the same way: the float model from the source folder
with each linear's weight replaced by the export's weights as compressed-tensors' own decompress()
returns them (asymmetric pack-quantized folders do not load in transformers 5.24 itself).
"""

from __future__ import annotations

import argparse
import json
import os
import pydoc
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

CALIB_MODULES = ["argparse", "collections", "json", "pathlib", "subprocess", "threading", "typing", "logging", "unittest", "email"]
EVAL_MODULES = ["asyncio", "dataclasses", "functools", "itertools", "os", "re", "socket", "sqlite3", "tarfile", "zipfile"]


def _doc(mods: list[str]) -> str:
    import importlib

    return "\n\n".join(pydoc.plain(pydoc.render_doc(importlib.import_module(m))) for m in mods)


def _run_child(code: str, python: str = sys.executable, env: dict | None = None) -> tuple[float, int, str]:
    """(wall s, peak RSS bytes, stdout) of a child Python running ``code``."""
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(p.stderr[-4000:])
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, max(rss, before) * 1024, p.stdout  # ru_maxrss is the max over children so far: run the largest last


def _ct_state(folder: Path) -> dict:
    """Every tensor of an export, quantized linears decompressed by compressed-tensors."""
    import torch
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor as PQC
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
    raw = {}
    for f in folder.glob("*.safetensors"):
        raw.update(load_file(f))
    out, done = {}, set()
    for k in raw:
        if k.endswith(".weight_packed"):
            p = k[: -len(".weight_packed")]
            part = {s: raw[f"{p}.{s}"] for s in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point") if f"{p}.{s}" in raw}
            out[p + ".weight"] = PQC.decompress(part, scheme)["weight"].float()
            done.update(f"{p}.{s}" for s in part)
    for k, v in raw.items():
        if k not in done:
            out[k] = v.float() if v.is_floating_point() else v
    return out


def _evaluate(src: Path, states: dict[str, dict], ids: np.ndarray) -> dict[str, dict]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, device_map="cpu", dtype=torch.float32)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.from_numpy(ids)

    def logprobs():
        outs = []
        with torch.no_grad():
            for b in range(0, len(x), 2):
                outs.append(torch.log_softmax(model(x[b:b + 2]).logits.float(), -1))
        return torch.cat(outs)

    ref = logprobs()
    tgt = x[:, 1:]
    res = {}
    for name, sd in [("float", None), *states.items()]:
        model.load_state_dict(base_sd if sd is None else {**base_sd, **sd}, strict=True)
        lp = ref if sd is None else logprobs()
        nll = -lp[:, :-1].gather(-1, tgt[..., None])[..., 0]
        kld = (ref.exp() * (ref - lp)).sum(-1)[:, :-1]
        same = (lp.argmax(-1) == ref.argmax(-1))[:, :-1].float()
        res[name] = {"ppl": float(torch.exp(nll.mean())), "kld": float(kld.mean()), "kld_se": float(kld.std() / np.sqrt(kld.numel())),
                     "same_top": float(same.mean())}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-chunks", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--degrid", action="store_true", help="the de-gridded variant: each Q4_1 weight plus uniform noise within ± half its step")
    ap.add_argument("--methods", default="rtn,gptq,awq")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from hfmodel import export_default_model
    from tokenizers import Tokenizer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="calibq-"))
    src = work / "smol"
    if not (src / "config.json").is_file():
        export_default_model(src, shards=1)
        if args.degrid:
            _degrid(src)
    calib = work / "calib.txt"
    calib.write_text(_doc(CALIB_MODULES))
    evtext = _doc(EVAL_MODULES)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    ev = np.asarray(tok.encode(evtext, add_special_tokens=False).ids, np.int64)
    n = min(args.eval_chunks, len(ev) // args.seq_len)
    ids = ev[: n * args.seq_len].reshape(n, args.seq_len)

    rows, states = {}, {}
    for method in args.methods.split(","):
        dst = work / f"out-{method}"
        code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'src')!r}); from llmquant.calib.hf_quant import quantize_hf; "
                f"r = quantize_hf({str(src)!r}, {str(dst)!r}, method={method!r}, group_size={args.group_size}, calib={str(calib)!r}, "
                f"samples={args.samples}, seq_len={args.seq_len}, force=True); print(json.dumps(r.to_dict()))")
        wall, rss, out = _run_child(code)
        info = json.loads(out.strip().splitlines()[-1])
        rows[f"llmquant {method}"] = {"wall_s": wall, "quantize_s": info["seconds"], "peak_rss": rss, "sym": info["sym"],
                                      "act_order": info["act_order"]}
        states[f"llmquant {method}"] = _ct_state(dst)
    quality = _evaluate(src, states, ids)
    print(f"model: SmolLM2-135M-Instruct HF folder{' (de-gridded)' if args.degrid else ''}; calibration {args.samples} x {args.seq_len} tokens "
          f"(pydoc of {len(CALIB_MODULES)} modules), eval {n} x {args.seq_len} held-out tokens (pydoc of {len(EVAL_MODULES)} other modules), g{args.group_size}")
    print(f"{'run':<16} {'PPL':>8} {'KLD':>16} {'same-top':>9} {'wall s':>8} {'quant s':>8} {'peak RSS':>10}")
    for name, q in quality.items():
        r = rows.get(name, {})
        rss = f"{r['peak_rss'] / 2**20:.0f} MiB" if r else ""
        print(f"{name:<16} {q['ppl']:8.3f} {q['kld']:8.4f} ± {q['kld_se']:.4f} {q['same_top'] * 100:8.1f}% "
              f"{r.get('wall_s', float('nan')):8.1f} {r.get('quantize_s', float('nan')):8.1f} {rss:>10}")


def _degrid(folder: Path) -> None:
    """Each weight matrix plus seeded uniform noise within ± half its Q4_1 step (block of 32, step (max-min)/15)."""
    from hfmodel import write_safetensors
    from llmquant.hf.safetensors import parse_safetensors, read_float32

    f = folder / "model.safetensors"
    rng = np.random.default_rng(0)
    tensors = {}
    for e in parse_safetensors(f):
        w = read_float32(e)
        if w.ndim == 2 and w.shape[1] % 32 == 0:
            b = w.reshape(-1, 32)
            step = (b.max(1, keepdims=True) - b.min(1, keepdims=True)) / 15
            w = (b + rng.uniform(-0.5, 0.5, b.shape) * step).astype(np.float32).reshape(w.shape)
        tensors[e.name] = ("F32", w)
    write_safetensors(f.with_suffix(".tmp"), tensors)
    os.replace(f.with_suffix(".tmp"), f)


if __name__ == "__main__":
    main()
