"""GPTQ / AWQ / RTN / NF4 of the default model as an HF folder: quality (KLD, PPL, same-top against the
float model on held-out text), wall time and peak RSS of each run; llm-compressor's GPTQ and AWQ in its
own venv beside ours when ``--llmcompressor PYTHON`` is given (same model, same calibration token ids,
same group size, same eval), with the ratios.

    python bench/calib_quality.py --samples 8 --seq-len 512 [--degrid] \
        --llmcompressor /work/venvs/gptq-llmcompressor/bin/python

Text: ``pydoc`` renderings of standard-library modules: calibration from one list of modules, eval
from another (no overlap). The calibration ids are cut once (llmquant's ``calibration_tokens``:
consecutive chunks) and handed to both tools. Each quantization runs in its own subprocess; its
peak RSS is that child's own VmHWM at exit (not wait4's ru_maxrss, which also counts the parent's
pages the child held between fork and exec). llm-compressor runs as its docs say on CPU:
``oneshot`` with GPTQModifier (W4A16 sym, group G, actorder static, damp 0.01) or AWQModifier +
QuantizationModifier (W4A16 asym, group G, duo scaling), with ``IntermediatesCache.pin_memory``
patched out (it needs an accelerator). Eval loads every result the same way: the float model from
the source folder with each linear's weight replaced by the export's weights as compressed-tensors'
own decompress() returns them (asymmetric pack-quantized folders do not load in transformers 5.24
itself); NF4 is bitsandbytes' load-time quantization (blocksize 64, double quant), dequantized by
bitsandbytes.
"""

from __future__ import annotations

import argparse
import json
import os
import pydoc
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


# the child's own VmHWM, printed last: ru_maxrss from wait4 would count the parent's resident pages
# the child held between fork and exec (this bench's parent holds every result loaded so far)
_HWM = "\nimport sys as _s; _s.stderr.write('\\nVmHWM ' + open('/proc/self/status').read().split('VmHWM:')[1].split()[0] + '\\n')\n"


def _run_child(code: str, python: str = sys.executable, env: dict | None = None) -> tuple[float, int, str]:
    """(wall s, the child's own peak RSS bytes, stdout) of a child Python running ``code``."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        p = subprocess.Popen([python, "-c", code + _HWM], stdout=out, stderr=err, text=True, env=env)
        _, status, _usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        log = err.read()
        if p.returncode:
            raise SystemExit(f"{python} child exited {p.returncode}:\n{log[-4000:]}")
        hwm = int(log.rsplit("VmHWM ", 1)[1].split()[0]) * 1024  # kB
        return wall, hwm, out.read()


LLMCOMPRESSOR = r"""
import json, sys, time
import numpy as np, torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from transformers import AutoModelForCausalLM

src, dst, method, group, ids_path = sys.argv[1:6]
ids = np.load(ids_path)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
sym = method == "gptq"
weights = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group", group_size=int(group),
                           actorder="static" if sym else None)
groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
if method == "gptq":
    recipe = [GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=0.01, block_size=128)]
else:
    from llmcompressor.modifiers.transform import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache
    IntermediatesCache.pin_memory = lambda self, *a, **k: None  # needs an accelerator; none here
    recipe = [AWQModifier(duo_scaling=True), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
t1 = time.perf_counter()
oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=len(ids))
t2 = time.perf_counter()
model.save_pretrained(dst, save_compressed=True)
print(json.dumps({"seconds": time.perf_counter() - t0, "oneshot_s": t2 - t1}))
"""


def _llmcompressor(python: str, src: Path, dst: Path, method: str, group: int, ids_path: Path) -> tuple[float, int, dict]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = f"import sys; sys.argv = ['lc', {str(src)!r}, {str(dst)!r}, {method!r}, '{group}', {str(ids_path)!r}]\n" + LLMCOMPRESSOR
    wall, rss, out = _run_child(code, python, env)
    return wall, rss, json.loads(out.strip().splitlines()[-1])


def _nf4_state(src: Path) -> dict:
    """Every linear of the model as bitsandbytes NF4 (blocksize 64, double quant) dequantizes it."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.uint8)
    model = AutoModelForCausalLM.from_pretrained(src, device_map="cpu", dtype=torch.float32, quantization_config=cfg)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            out[f"{name}.weight"] = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
    return out


def _ct_state(folder: Path) -> dict:
    """Every tensor of an export, quantized linears decompressed by compressed-tensors."""
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
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-chunks", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--degrid", action="store_true", help="the de-gridded variant: each Q4_1 weight plus uniform noise within ± half its step")
    ap.add_argument("--methods", default="rtn,gptq,gptq-minmax,awq,nf4", help="gptq-minmax: GPTQ with --range-search 0")
    ap.add_argument("--llmcompressor", metavar="PYTHON", help="llm-compressor's venv python: run its GPTQ and AWQ beside ours")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    args = ap.parse_args()

    from hfmodel import export_default_model
    from tokenizers import Tokenizer

    from llmquant.calib.hf_quant import calibration_tokens

    work = Path(args.workdir or tempfile.mkdtemp(prefix="calibq-"))
    src = work / "smol"
    if not (src / "config.json").is_file():
        export_default_model(src, shards=1)
        if args.degrid:
            _degrid(src)
    calib = work / "calib.txt"
    calib.write_text(_doc(CALIB_MODULES))
    ids_path = work / "calib_ids.npy"
    np.save(ids_path, calibration_tokens(src, calib, args.samples, args.seq_len))
    evtext = _doc(EVAL_MODULES)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    ev = np.asarray(tok.encode(evtext, add_special_tokens=False).ids, np.int64)
    n = min(args.eval_chunks, len(ev) // args.seq_len)
    ids = ev[: n * args.seq_len].reshape(n, args.seq_len)

    rows, states = {}, {}
    for method in args.methods.split(","):
        if method == "nf4":
            states["NF4 (bitsandbytes)"] = _nf4_state(src)
            continue
        dst = work / f"out-{method}"
        extra = ", range_search=0" if method == "gptq-minmax" else ""  # GPTQ with llm-compressor's min/max group ranges
        code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'src')!r}); from llmquant.calib.hf_quant import quantize_hf; "
                f"r = quantize_hf({str(src)!r}, {str(dst)!r}, method={method.split('-')[0]!r}, group_size={args.group_size}, calib={str(calib)!r}, "
                f"samples={args.samples}, seq_len={args.seq_len}, force=True{extra}); print(json.dumps(r.to_dict()))")
        wall, rss, out = _run_child(code)
        info = json.loads(out.strip().splitlines()[-1])
        rows[f"llmquant {method}"] = {"wall_s": wall, "quantize_s": info["seconds"], "peak_rss": rss,
                                      "forward_s": info["forward_seconds"], "solve_s": info["solve_seconds"]}
        states[f"llmquant {method}"] = _ct_state(dst)
        print(f"llmquant {method}: {wall:.1f} s ({info['forward_seconds']:.1f} s forward passes, {info['solve_seconds']:.1f} s "
              f"solving), {rss / 2**20:.0f} MiB", flush=True)
        if args.llmcompressor and method in ("gptq", "awq"):
            dst = work / f"lc-{method}"
            wall, rss, info = _llmcompressor(args.llmcompressor, src, dst, method, args.group_size, ids_path)
            rows[f"llm-compressor {method}"] = {"wall_s": wall, "quantize_s": info["seconds"], "peak_rss": rss}
            states[f"llm-compressor {method}"] = _ct_state(dst)
            print(f"llm-compressor {method}: {wall:.1f} s, {rss / 2**20:.0f} MiB", flush=True)
    quality = _evaluate(src, states, ids)
    print(f"model: SmolLM2-135M-Instruct HF folder{' (de-gridded)' if args.degrid else ''}; calibration {args.samples} x {args.seq_len} tokens "
          f"(pydoc of {len(CALIB_MODULES)} modules), eval {n} x {args.seq_len} held-out tokens (pydoc of {len(EVAL_MODULES)} other modules), g{args.group_size}")
    print(f"{'run':<22} {'PPL':>8} {'KLD':>16} {'same-top':>9} {'wall s':>8} {'peak RSS':>10}")
    for name, q in quality.items():
        r = rows.get(name, {})
        rss = f"{r['peak_rss'] / 2**20:.0f} MiB" if r else ""
        print(f"{name:<22} {q['ppl']:8.3f} {q['kld']:8.4f} ± {q['kld_se']:.4f} {q['same_top'] * 100:8.1f}% "
              f"{r.get('wall_s', float('nan')):8.1f} {rss:>10}")
    ratios = {}
    for method in ("gptq", "awq"):
        ours, theirs = f"llmquant {method}", f"llm-compressor {method}"
        if ours in rows and theirs in rows:
            ratios[method] = {"kld": quality[ours]["kld"] / quality[theirs]["kld"],
                              "wall": rows[ours]["wall_s"] / rows[theirs]["wall_s"],
                              "peak_rss": rows[ours]["peak_rss"] / rows[theirs]["peak_rss"]}
            r = ratios[method]
            print(f"{method}: llmquant / llm-compressor  KLD {r['kld']:.3f}x (goal <= 1)  wall {r['wall']:.3f}x (goal <= 0.25)  "
                  f"peak RSS {r['peak_rss']:.2f}x (goal <= 1)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "quality": quality, "runs": rows, "ratios": ratios}, indent=2))


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
