"""llmquant convert vs llama.cpp's convert_hf_to_gguf.py on the same Hugging Face folders.

For every case and --outtype both tools convert the same folder in the same run; the two GGUFs
must have identical tensor names (and order), shapes, types and data, and the same metadata keys,
types and values (provenance keys apart: none are written today). Also prints each tool's wall
time and peak RSS (its own process, from wait4) and the ratios.

    python bench/convert_parity.py                      # all cases, all outtypes
    python bench/convert_parity.py --cases smollm-f32 --outtypes f16

The converter runs in its own environment (torch is not an llmquant dependency):
    python3 -m venv /work/venv-convert
    /work/venv-convert/bin/pip install torch==2.13.0 numpy sentencepiece transformers==4.57.6 safetensors 'protobuf<5'
(transformers 4.57.6 is what llama.cpp's requirements/requirements-convert_hf_to_gguf.txt pins.)

Cases: the embedded SmolLM2-135M rebuilt as its HF repository (F32 and BF16 safetensors,
sharded), and small random models: Qwen2 with Q/K/V biases, Mistral with a SentencePiece
tokenizer.model (trained here with the converter environment's sentencepiece), Llama with
llama3 rope scaling (rope_freqs) and an F16 checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hfmodel import export_default_model, write_tiny_model  # noqa: E402

from llmquant.gguf.source import GGUFSource  # noqa: E402

DEFAULT_LLAMA_CPP = "/tmp/src/llama_cpp_python-0.3.36/vendor/llama.cpp"
DEFAULT_PYTHON = "/work/venv-convert/bin/python"
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")
PROVENANCE_KEYS: set[str] = set()  # llmquant convert writes none today; listed here if it ever does


WRAPPER = r"""
import os, sys, json, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvpe(sys.argv[1], sys.argv[1:], os.environ)
_, status, ru = os.wait4(pid, 0)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": ru.ru_maxrss * 1024, "status": status}))
"""


def measure(cmd: list[str], env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    if result["status"] != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return result


def compare(ours: Path, ref: Path) -> list[str]:
    """Every difference between two GGUFs, as readable lines (empty: identical)."""
    a, b = GGUFSource(ours), GGUFSource(ref)
    diffs = []
    ka = [k for k in a.fields if k not in PROVENANCE_KEYS]
    kb = [k for k in b.fields if k not in PROVENANCE_KEYS]
    for k in ka:
        if k not in b.fields:
            diffs.append(f"key only in llmquant: {k} = {a.fields[k].value!r:.80}")
    for k in kb:
        if k not in a.fields:
            diffs.append(f"key only in convert_hf_to_gguf: {k} = {b.fields[k].value!r:.80}")
    if [k for k in ka if k in b.fields] != [k for k in kb if k in a.fields]:
        diffs.append("metadata key order differs")
    for k in ka:
        if k in b.fields:
            fa, fb = a.fields[k], b.fields[k]
            if (fa.type, fa.sub_type) != (fb.type, fb.sub_type):
                diffs.append(f"{k}: type {fa.type.name}/{fa.sub_type} vs {fb.type.name}/{fb.sub_type}")
            elif fa.value != fb.value:
                if isinstance(fa.value, list):
                    bad = [i for i, (x, y) in enumerate(zip(fa.value, fb.value)) if x != y]
                    diffs.append(f"{k}: {len(bad)} of {len(fa.value)} entries differ (first at {bad[:1]}), lengths {len(fa.value)}/{len(fb.value)}")
                else:
                    diffs.append(f"{k}: {fa.value!r:.60} vs {fb.value!r:.60}")
    names_a, names_b = [t.name for t in a.tensors], [t.name for t in b.tensors]
    if set(names_a) != set(names_b):
        diffs.append(f"tensor names differ: only llmquant {sorted(set(names_a) - set(names_b))[:5]}, only reference {sorted(set(names_b) - set(names_a))[:5]}")
    elif names_a != names_b:
        diffs.append("tensor order differs")
    for t in a.tensors:
        if t.name not in b._entries:
            continue
        u = b.info(t.name)
        if (t.shape, t.type) != (u.shape, u.type):
            diffs.append(f"tensor {t.name}: {t.type.name}{list(t.shape)} vs {u.type.name}{list(u.shape)}")
        elif not np.array_equal(a.raw(t.name), b.raw(t.name)):
            n = int((a.raw(t.name) != b.raw(t.name)).sum())
            diffs.append(f"tensor {t.name} ({t.type.name}): {n} of {t.n_bytes} bytes differ")
    return diffs


def largest_tensor_f32(path: Path) -> int:
    with GGUFSource(path) as s:
        return max(t.n_elements for t in s.tensors) * 4


def train_spm(folder: Path, python: str) -> None:
    """A 640-piece BPE SentencePiece model (byte fallback) trained on llmquant's evaluation text."""
    text = (ROOT / "src" / "llmquant" / "data" / "eval.txt").read_text()
    code = (
        "import sentencepiece as spm, sys\n"
        "spm.SentencePieceTrainer.train(input=sys.argv[1], model_prefix=sys.argv[2], vocab_size=640, model_type='bpe',"
        " byte_fallback=True, character_coverage=0.9995, bos_id=1, eos_id=2, unk_id=0, minloglevel=2)\n"
    )
    corpus = folder / "corpus.txt"
    corpus.write_text(text)
    subprocess.run([python, "-c", code, str(corpus), str(folder / "tokenizer")], check=True, capture_output=True)
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "legacy": False, "tokenizer_class": "LlamaTokenizer",
        "chat_template": "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}",
        "added_tokens_decoder": {"0": {"content": "<unk>", "special": True}, "1": {"content": "<s>", "special": True},
                                 "2": {"content": "</s>", "special": True}},
    }, indent=2))


def build_cases(work: Path, python: str) -> dict[str, Path]:
    cases = {}
    smol = work / "SmolLM2-135M-Instruct"
    if not (smol / "config.json").is_file():
        export_default_model(smol, shards=2, dtype="F32")
    cases["smollm-f32"] = smol
    smol_bf16 = work / "bf16" / "SmolLM2-135M-Instruct"
    if not (smol_bf16 / "config.json").is_file():
        export_default_model(smol_bf16, shards=1, dtype="BF16")
    cases["smollm-bf16"] = smol_bf16
    qwen = work / "tiny-qwen2"
    if not (qwen / "config.json").is_file():
        write_tiny_model(qwen, arch="Qwen2ForCausalLM", model_type="qwen2", bias=True, tokenizer_from=smol, dtype="BF16")
    cases["qwen2-bf16"] = qwen
    mistral = work / "tiny-mistral-spm"
    if not (mistral / "config.json").is_file():
        mistral.mkdir(parents=True, exist_ok=True)
        train_spm(mistral, python)
        write_tiny_model(mistral, arch="MistralForCausalLM", model_type="mistral", vocab_size=640, dtype="BF16",
                         extra_config={"sliding_window": None})
    cases["mistral-spm"] = mistral
    llama3 = work / "tiny-llama3-rope"
    if not (llama3 / "config.json").is_file():
        write_tiny_model(llama3, tokenizer_from=smol, dtype="F16", extra_config={
            "rope_theta": 500000.0, "max_position_embeddings": 131072,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}})
    cases["llama3-rope-f16"] = llama3
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmquant-convert-parity"))
    ap.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR", DEFAULT_LLAMA_CPP))
    ap.add_argument("--python", default=os.environ.get("CONVERT_PYTHON", DEFAULT_PYTHON), help="python with torch for convert_hf_to_gguf.py")
    ap.add_argument("--cases", default="")
    ap.add_argument("--outtypes", default=",".join(OUTTYPES))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cases = build_cases(args.work, args.python)
    if args.cases:
        cases = {k: v for k, v in cases.items() if k in args.cases.split(",")}
    env = {**os.environ, "PYTHONPATH": str(Path(args.llama_cpp) / "gguf-py")}
    script = str(Path(args.llama_cpp) / "convert_hf_to_gguf.py")
    out_dir = args.work / "out"
    out_dir.mkdir(exist_ok=True)
    rows, all_diffs = [], {}
    for case, folder in cases.items():
        for outtype in args.outtypes.split(","):
            ref = out_dir / f"{case}-{outtype}-ref.gguf"
            ours = out_dir / f"{case}-{outtype}-llmquant.gguf"
            r = measure([args.python, script, str(folder), "--outfile", str(ref), "--outtype", outtype], env=env)
            o = measure([sys.executable, "-m", "llmquant", "convert", str(folder), str(ours), "--outtype", outtype, "--force"])
            diffs = compare(ours, ref)
            all_diffs[(case, outtype)] = diffs
            largest = largest_tensor_f32(ours)
            rows.append((case, outtype, "identical" if not diffs else f"{len(diffs)} diffs", o["seconds"], r["seconds"],
                         o["peak_rss"], r["peak_rss"], largest + (300 << 20)))
            ref.unlink()
            ours.unlink()
            print(f"{case:16} {outtype:5} {rows[-1][2]}", file=sys.stderr, flush=True)
    mib = 1 << 20
    print(f"{'case':16} {'outtype':7} {'parity':10} {'llmquant s':>10} {'convert s':>9} {'ratio':>6} "
          f"{'llmquant RSS':>12} {'convert RSS':>11} {'RSS goal':>9}")
    for case, outtype, parity, so, sr, mo, mr, goal in rows:
        print(f"{case:16} {outtype:7} {parity:10} {so:10.2f} {sr:9.2f} {so / sr:6.2f} "
              f"{mo / mib:8.0f} MiB {mr / mib:7.0f} MiB {goal / mib:5.0f} MiB")
    for key, diffs in all_diffs.items():
        for d in diffs:
            print(f"  {key[0]} {key[1]}: {d}")
    if any(all_diffs.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
