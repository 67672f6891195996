"""Run one quantizer in a fresh subprocess; report wall time and that process's peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
from gguf import LlamaFileType
kind, src, dst, ftype, threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
imatrix = sys.argv[6] if len(sys.argv) > 6 and sys.argv[6] else None
ft = LlamaFileType[ftype]
entries = None
if imatrix:  # loaded before the clock starts, on both sides
    from llmquant.gguf.imatrix import load_imatrix
    entries = load_imatrix(imatrix).entries
if kind == "llmquant":
    from llmquant.quantize import quantize_model
    from llmquant.gguf.recipes import RecipeOptions
    quantize_model(src, dst, LlamaFileType.MOSTLY_Q4_0, threads=1, force=True, options=RecipeOptions(allow_requantize=True))  # warm the JIT cache
    if entries is not None:  # and the IQ kernels' lattice tables
        quantize_model(src, dst, ft, threads=threads, force=True, options=RecipeOptions(allow_requantize=True), importance=entries)
    t0 = time.perf_counter()
    quantize_model(src, dst, ft, threads=threads, force=True, options=RecipeOptions(allow_requantize=True), importance=entries)
else:
    from llmquant.runtime import reference
    reference.llama()
    t0 = time.perf_counter()
    reference.model_quantize(src, dst, ft, threads=threads, allow_requantize=True, imatrix=entries)
seconds = time.perf_counter() - t0
from llmquant.measure.memprobe import peak_rss
print(json.dumps({"seconds": seconds, "peak_rss": peak_rss()}))
"""


def measure(kind: str, src: str, dst: str, ftype: str, threads: int, imatrix: str | None = None) -> dict:
    """Wall seconds of the quantization itself and the peak RSS of the fresh process that ran it
    (VmHWM, which, unlike ru_maxrss, is not inherited from this parent)."""
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, src, dst, ftype, str(threads), imatrix or ""],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])
