"""Run one quantizer in a fresh subprocess; report wall time and peak RSS (shared by bench scripts)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
from gguf import LlamaFileType
kind, src, dst, ftype, threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
ft = LlamaFileType[ftype]
if kind == "llmquant":
    from llmquant.quantize import quantize_model
    from llmquant.recipes import RecipeOptions
    quantize_model(src, dst, LlamaFileType.MOSTLY_Q4_0, threads=1, force=True, options=RecipeOptions(allow_requantize=True))  # warm the JIT cache
    t0 = time.perf_counter()
    quantize_model(src, dst, ft, threads=threads, force=True, options=RecipeOptions(allow_requantize=True))
else:
    from llmquant import reference
    reference.llama()
    t0 = time.perf_counter()
    reference.model_quantize(src, dst, ft, threads=threads, allow_requantize=True)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def measure(kind: str, src: str, dst: str, ftype: str, threads: int) -> dict:
    """Wall seconds of the quantization itself and the child's peak RSS in bytes."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, src, dst, ftype, str(threads)],
                          capture_output=True, text=True, check=True)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib < before:
        peak_kib = before
    return {"seconds": json.loads(proc.stdout.strip().splitlines()[-1])["seconds"], "peak_rss": peak_kib * 1024}


def peak_rss_of(kind, *args):
    """ru_maxrss of RUSAGE_CHILDREN is a max over all children; run each measurement in its own
    grandchild so every reading is that process's own peak."""
    code = (
        "import json,resource,sys; sys.path.insert(0, %r); from _measure import measure; "
        "r = measure(*sys.argv[1:5], int(sys.argv[5])); print(json.dumps(r))" % str(__import__("pathlib").Path(__file__).parent)
    )
    proc = subprocess.run([sys.executable, "-c", code, kind, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])
