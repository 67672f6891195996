"""GPTQ / AWQ / RTN of a Hugging Face checkpoint, one decoder layer at a time on the CPU.

The sequential pipeline of llm-compressor (``pipelines/sequential``) without the whole model in memory:
the calibration tokens are embedded once; then for each decoder layer its weights are read from the
safetensors memory map into a transformers decoder layer built from the config (so the forward is
transformers' own: RMSNorm, rotary, GQA attention, SwiGLU), the calibration activations run through
it while hooks accumulate XᵀX and Σ|x| for every group of linears that read the same input, the
layer's linears are quantized (calib/gptq.py, calib/awq.py); for GPTQ the *quantized* layer's outputs
become the next layer's inputs (a second pass), for AWQ the float layer's outputs of the calibration
pass do (AutoAWQ's order: each layer's scales are searched against the float model's activations —
on SmolLM2 that measured both lower KLD, 0.124 vs 0.135, and 11 s faster than propagating the
quantized layer). The layer's packed tensors go to their own shard at once. Peak memory: one layer
in float32, the activations (samples × seq_len × hidden, twice) and the Gram matrices.

GPTQ goes one step further where the whole calibration batch fits in memory at once (``_one_pass``):
one forward pass per layer, each group of linears quantized by a hook the moment the pass reaches
it, so o_proj's Hessian sees the outputs of the already-quantized q/k/v, the MLP's those of the
quantized attention ("true sequential", as the GPTQ reference code and AutoGPTQ do), and the pass's
output is the next layer's input — half the forward work of calibrate-then-propagate.

torch and transformers are imported inside the functions: ``import llmquant.calib`` needs neither.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import CalibrationError, ModelFileError
from ..hf.export import ExportFolder
from ..hf.export.formats import QLinear, check_format, pack, quantization_config, scale_dtype
from ..hf.safetensors import open_checkpoint, read_float32
from .awq import AWQ_MAPPINGS, NO_CLIP, awq_clip, awq_scales
from ..system import available_memory
from .gptq import ACT_ORDERS, IntGrid, gptq, int_codes, inverse_upper, rtn

METHODS = ("gptq", "awq", "rtn")
DATA = Path(__file__).parent.parent / "data"
GROUP_SIZES = (128, 64, 32, 16)
MAX_DEFAULT_SAMPLES = 128


def default_calibration_text() -> tuple[Path, bool]:
    """(file, is_fallback): the calibration text shipped with llmquant (``data/calibration.txt``, sources
    in data/NOTICE; disjoint from the evaluation text)."""
    return DATA / "calibration.txt", False


def calibration_tokens(folder: Path, text_file: Path, samples: int | None, seq_len: int) -> np.ndarray:
    """(samples, seq_len) int64 token ids: consecutive chunks of the text, tokenized by the model's
    tokenizer.json. ``samples=None``: as many chunks as the text holds, up to 128."""
    from tokenizers import Tokenizer

    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise CalibrationError(f"{folder}: no tokenizer.json to tokenize the calibration text with")
    if not Path(text_file).is_file():
        raise CalibrationError(f"{text_file}: no such calibration text file")
    text = Path(text_file).read_text(encoding="utf-8", errors="replace")
    ids = np.asarray(Tokenizer.from_file(str(tok_file)).encode(text, add_special_tokens=False).ids, np.int64)
    if seq_len < 1:
        raise CalibrationError(f"--seq-len {seq_len}: expected at least 1")
    have = len(ids) // seq_len
    if samples is None:
        samples = min(have, MAX_DEFAULT_SAMPLES)
    if samples < 1 or samples > have:
        raise CalibrationError(
            f"{text_file}: {len(ids)} tokens hold {have} samples of {seq_len} tokens, but {samples} were asked for "
            "(pass fewer --samples, a smaller --seq-len or a longer --calib file)")
    return ids[:samples * seq_len].reshape(samples, seq_len)


def choose_group_size(widths: dict[str, int], requested: int | None) -> tuple[int, str]:
    """(group size, why): ``requested`` if every input width divides by it, else CalibrationError naming
    the layers; by default 128 where the widths allow, else the largest of 64/32/16 that divides them."""
    if requested is not None:
        if requested < 0:
            raise CalibrationError(f"--group-size {requested}: expected 0 (per channel) or a positive size")
        bad = sorted(n for n, w in widths.items() if requested and w % requested)
        if bad:
            shown = ", ".join(f"{n} ({widths[n]})" for n in bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
            raise CalibrationError(f"--group-size {requested} does not divide the input width of {len(bad)} linear(s): {shown}")
        return requested, f"group size {requested} (as asked)" if requested else "per channel (group size 0, as asked)"
    for g in GROUP_SIZES:
        if all(w % g == 0 for w in widths.values()):
            if g == 128:
                return g, "group size 128"
            odd = sorted({w for w in widths.values() if w % 128})
            return g, f"group size {g}: input widths {', '.join(map(str, odd))} are not multiples of 128"
    return 0, "per channel: no group size of 16 or more divides every input width"


@dataclass
class CalibResult:
    dst: str
    method: str
    format: str
    bits: int
    group_size: int
    group_note: str
    sym: bool
    act_order: str
    damp: float
    calibration: str
    calibration_fallback: bool
    samples: int
    seq_len: int
    layers: int
    linears: int
    seconds: float
    out_bytes: int
    range_search: int = 0  # GPTQ: points of each group's range search (0: min/max)
    forward_seconds: float = 0.0  # calibration + propagation passes through the decoder layers
    solve_seconds: float = 0.0  # GPTQ / AWQ / RTN on the arrays
    awq_alphas: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _read_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise ModelFileError(src, "no config.json: not a Hugging Face model folder")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(path, f"not valid JSON ({exc})") from None
    qc = cfg.get("quantization_config")
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        if method != "gguf":  # a model rebuilt from GGUF keeps this key over float weights
            raise CalibrationError(f"{path}: the model is already quantized (quant_method {method!r}); start from float weights")
    return cfg


def _torch_dtype_name(cfg: dict) -> str:
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return name if name in ("float32", "float16", "bfloat16") else "float32"


def quantize_hf(src: str | Path, dst: str | Path, *, method: str = "gptq", fmt: str = "compressed-tensors", bits: int = 4,
                group_size: int | None = None, sym: bool | None = None, act_order: str | None = None, damp: float = 0.01,
                calib: str | Path | None = None, samples: int | None = None, seq_len: int = 512, force: bool = False,
                threads: int = 0, awq_grid: int = 20, awq_clip_search: bool = True, batch: int = 4, range_search: int = 20,
                progress: Callable[[int, int, str], None] | None = None,
                on_layer: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> CalibResult:
    """Quantize the Hugging Face folder ``src`` into the folder ``dst`` (see the module docstring).

    ``on_layer(i, {module path: dequantized weight})`` sees the weights each layer propagates with.
    ``range_search`` (GPTQ): points of each group's range search (``gptq.range_search``); 0: min/max."""
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if method not in METHODS:
        raise CalibrationError(f"unknown method {method!r}; expected one of: {', '.join(METHODS)}")
    if range_search < 0:
        raise CalibrationError(f"--range-search {range_search}: expected 0 (min/max) or a number of points")
    if method != "gptq":
        range_search = 0
    if sym is None:
        sym = method != "awq"  # AWQ is asymmetric (zero_point=True) by design; GPTQ's W4A16 preset is symmetric
    if act_order is None:
        act_order = "static" if method == "gptq" else "none"
    if act_order not in ACT_ORDERS:
        raise CalibrationError(f"--act-order {act_order!r}; expected one of: {', '.join(ACT_ORDERS)}")
    if method != "gptq" and act_order != "none":
        raise CalibrationError(f"--act-order {act_order} is a GPTQ option; {method} quantizes columns in order")
    check_format(fmt, bits, sym, act_order)
    cfg_json = _read_config(src)
    model_type = cfg_json.get("model_type")
    if model_type not in AWQ_MAPPINGS:
        raise CalibrationError(
            f"{src / 'config.json'}: model_type {model_type!r} has no layer mappings; known: {', '.join(sorted(AWQ_MAPPINGS))}")
    ckpt = open_checkpoint(src)
    if not ckpt.entries:
        raise ModelFileError(src, "no model*.safetensors files")
    by_name = {e.name: e for e in ckpt.entries}

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    cfg = AutoConfig.from_pretrained(src)
    if getattr(cfg, "quantization_config", None) is not None:
        del cfg.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    layers_name, layers = next(((n, m) for n, m in skeleton.named_modules() if n.endswith("layers") and isinstance(m, torch.nn.ModuleList)), (None, None))
    if layers is None:
        raise CalibrationError(f"{src}: found no decoder layer list in {type(skeleton).__name__}")
    emb_name = next(n for n, m in skeleton.named_modules() if m is skeleton.get_input_embeddings())
    n_layers = len(layers)
    linears = {f"{layers_name}.{i}.{n}": m.in_features for i, layer in enumerate(layers)
               for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    g, group_note = choose_group_size(linears, group_size)
    grid = IntGrid(bits, sym, scale_dtype(fmt, _torch_dtype_name(cfg_json)))
    model_dtype = _torch_dtype_name(cfg_json)
    store_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(model_dtype, torch.float32)
    notes: list[str] = []
    calib_file, fallback = (Path(calib), False) if calib else default_calibration_text()
    if fallback and method != "rtn":
        notes.append(f"no shipped calibration text yet: calibrated on {calib_file.name} (fallback; do not evaluate on it)")

    hidden = None
    if method != "rtn":
        tokens = calibration_tokens(src, calib_file, samples, seq_len)
        emb = read_float32(by_name[f"{emb_name}.weight"])
        hidden = torch.from_numpy(emb[tokens])  # (samples, seq_len, hidden)
        del emb
        rotary_mod = next(m for n, m in skeleton.named_modules() if n.endswith("rotary_emb"))
        rotary = type(rotary_mod)(config=skeleton.config)
        pos = torch.arange(seq_len).unsqueeze(0)
        cos, sin = rotary(hidden[:1], pos)
        mask = torch.full((seq_len, seq_len), float("-inf")).triu(1)[None, None]
        samples = tokens.shape[0]
    else:
        samples, seq_len = 0, 0
    n_heads, n_kv = cfg_json.get("num_attention_heads"), cfg_json.get("num_key_value_heads") or cfg_json.get("num_attention_heads")

    one_pass = method == "gptq" and _one_pass_bytes(cfg_json, samples, seq_len) <= ONE_PASS_SHARE * available_memory()
    if method == "gptq" and not one_pass:
        notes.append(f"{samples} x {seq_len} calibration tokens do not fit one pass: each layer is calibrated, then propagated, {batch} samples at a time")

    def run(layer, h):
        outs = []
        with torch.no_grad():
            for b in range(0, h.shape[0], batch):
                o = layer(h[b:b + batch], attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
                outs.append(o[0] if isinstance(o, tuple) else o)
        return torch.cat(outs)

    def gptq_rows(weights, members, H):
        """GPTQ of the linears ``members`` (one input, one H) as one matrix of stacked rows: {name:
        (dequantized, codes, scales, zeros, g_idx)}, each its own rows."""
        res = gptq(np.concatenate([weights[n] for n in members]), H, grid, g, act_order=act_order, damp=damp,
                   factor=_torch_factor, range_points=range_search)
        codes, scales, zeros = int_codes(res, grid)
        out, r0 = {}, 0
        for n in members:
            r1 = r0 + weights[n].shape[0]
            out[n] = (res.weight[r0:r1], codes[r0:r1], scales[r0:r1], zeros[r0:r1], res.g_idx)
            r0 = r1
        return out

    alphas: list[float] = []
    groups = None  # one_pass: the linears that read each input, in the order the forward reaches them
    n_linears = 0
    timing = [0.0, 0.0]
    qcfg, extra = quantization_config(fmt, bits=bits, group_size=g, sym=sym, act_order=act_order, damp=damp, method=method,
                                      ignore=["lm_head"])
    with ExportFolder(dst, n_layers + 1, force=force) as out:
        for i, layer in enumerate(layers):
            if progress:
                progress(i, n_layers, f"layer {i}")
            prefix = f"{layers_name}.{i}."
            layer.to_empty(device="cpu")
            state = {}
            for k in layer.state_dict():
                if prefix + k not in by_name:
                    raise ModelFileError(src, f"tensor {prefix + k!r} is missing")
                state[k] = torch.from_numpy(read_float32(by_name[prefix + k]))
            layer.load_state_dict(state)
            layer.float()
            mods = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
            stats, leader_of, float_out = {}, {}, None
            weights = {n: m.weight.detach().numpy().astype(np.float32, copy=True) for n, m in mods.items()}
            results: dict[str, tuple] = {}
            t0 = time.perf_counter()
            if one_pass:
                if groups is None:
                    groups = _input_groups(layer, mods, hidden[:1, :8], mask[..., :8, :8], pos[:, :8], (cos[:, :8], sin[:, :8]))

                def solve(members, x):  # the Gram matrix counts as statistics (forward), as in _collect
                    x2 = x.reshape(-1, x.shape[-1]).float()
                    G = _gram(x2)
                    t = time.perf_counter()
                    results.update(gptq_rows(weights, members, 2.0 * G / x2.shape[0]))
                    for n in members:
                        mods[n].weight.copy_(torch.from_numpy(results[n][0]))
                    timing[1] += time.perf_counter() - t

                solved = timing[1]
                with _torch_threads():
                    hidden = _one_pass(layer, mods, groups, hidden, mask, pos, (cos, sin), solve)
                timing[0] += time.perf_counter() - t0 - (timing[1] - solved)
            elif method != "rtn":
                with _torch_threads():
                    stats, leader_of, float_out = _collect(layer, mods, hidden, run)
            t1 = time.perf_counter()
            timing[0] += (t1 - t0) if not one_pass else 0.0
            if method == "gptq" and not one_pass:
                for leader in stats:
                    members = [n for n in mods if leader_of[n] == leader]
                    G, n_tok, _ = stats[leader]
                    results.update(gptq_rows(weights, members, 2.0 * G / n_tok))
            elif not one_pass:
                scale_in = {n: np.ones(m.in_features, np.float32) for n, m in mods.items()}
                if method == "awq":
                    for mp in AWQ_MAPPINGS[model_type]:
                        if mp.needs_equal_heads and n_heads != n_kv:
                            if i == 0:
                                notes.append(f"AWQ mapping {mp.prev} -> {', '.join(mp.linears)} skipped: {n_heads} query heads share {n_kv} KV heads")
                            continue
                        leads = {leader_of.get(n) for n in mp.linears}
                        if len(leads) != 1 or None in leads or mp.prev not in dict(layer.named_modules()):
                            raise CalibrationError(f"AWQ mapping {mp.prev} -> {', '.join(mp.linears)} does not fit layer {i} of {model_type}")
                        G, n_tok, absx = stats[leads.pop()]
                        s, alpha, _ = awq_scales(G / n_tok / np.outer(scale_in[mp.linears[0]], scale_in[mp.linears[0]]),
                                                 absx / n_tok / scale_in[mp.linears[0]], [weights[n] for n in mp.linears], grid, g,
                                                 n_grid=awq_grid)
                        alphas.append(alpha)
                        prev = dict(layer.named_modules())[mp.prev]
                        with torch.no_grad():
                            if isinstance(prev, torch.nn.Linear):
                                weights[mp.prev] /= s[:, None]
                                if prev.bias is not None:
                                    prev.bias.div_(torch.from_numpy(s))
                            else:  # a norm: its weight, rounded to what the checkpoint stores
                                prev.weight.copy_((prev.weight / torch.from_numpy(s)).to(store_dtype).float())
                        for n in mp.linears:
                            weights[n] *= s[None, :]
                            scale_in[n] = scale_in[n] * s
                for n in mods:
                    clip = None
                    if method == "awq" and awq_clip_search and not n.endswith(NO_CLIP):
                        G, n_tok, _ = stats[leader_of[n]]
                        clip = awq_clip(weights[n], G / n_tok / np.outer(scale_in[n], scale_in[n]), grid, g, n_grid=awq_grid)
                    res = rtn(weights[n], grid, g, clip)
                    codes, scales, zeros = int_codes(res, grid)
                    results[n] = (res.weight, codes, scales, zeros, res.g_idx)
            if not one_pass:
                timing[1] += time.perf_counter() - t1
            tensors = {}
            with torch.no_grad():
                for n, m in mods.items():
                    deq, codes, scales, zeros, g_idx = results[n]
                    m.weight.copy_(torch.from_numpy(deq))
                    bias = m.bias.detach().numpy() if m.bias is not None else None
                    tensors.update(pack(fmt, QLinear(prefix + n, codes, scales, zeros, g_idx, bias), bits, sym, act_order, model_dtype))
                    n_linears += 1
                for k, v in layer.state_dict().items():
                    if k.rsplit(".", 1)[0] not in mods:
                        tensors[prefix + k] = v.to(store_dtype).clone()
            out.shard(i, tensors)
            if on_layer:
                on_layer(i, {prefix + n: r[0] for n, r in results.items()})
            if hidden is not None and method == "awq":
                hidden = float_out  # AutoAWQ's order: every layer calibrated on the float model's activations
            elif hidden is not None and i + 1 < n_layers and not one_pass:
                t0 = time.perf_counter()
                with _torch_threads():
                    hidden = run(layer, hidden)
                timing[0] += time.perf_counter() - t0
            layer.to("meta")
            del state, weights, results, stats, tensors, float_out
        # everything outside the decoder layers, as stored
        rest = {}
        for e in ckpt.entries:
            if not e.name.startswith(f"{layers_name}."):
                rest[e.name] = torch.from_numpy(read_float32(e)).to(store_dtype) if e.dtype in ("F32", "F16", "BF16", "F64") else None
                if rest[e.name] is None:
                    raise ModelFileError(e.path, f"tensor {e.name!r} is {e.dtype}; expected a float type")
        out.shard(n_layers, rest)
        del rest
        config = {k: v for k, v in cfg_json.items() if k != "quantization_config"}
        config["quantization_config"] = qcfg
        out.finish(config, src, extra)
    if progress:
        progress(n_layers, n_layers, "done")
    size = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    return CalibResult(str(dst), method, fmt, bits, g, group_note, sym, act_order, damp, str(calib_file) if method != "rtn" else "",
                       fallback and method != "rtn", samples, seq_len, n_layers, n_linears, time.perf_counter() - start, size,
                       range_search, timing[0], timing[1], [round(a, 3) for a in alphas], notes)


def _torch_threads():
    """numpy's BLAS on one thread while torch runs a forward: OpenBLAS's idle workers spin for a
    while after each numpy product and take a core from torch's next one. A GPTQ of SmolLM2 on the
    2-core machine (its solves run inside the forward) took 39 s with both pools, 23–25 s so; AWQ's
    forwards 13.8 → 12.2 s (its scale search, after the forward, keeps both BLAS threads: 29 s
    instead of 35 s on one)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


ONE_PASS_SHARE = 0.25  # of the available memory, for one forward over every calibration sample at once


def _one_pass_bytes(cfg: dict, samples: int, seq_len: int) -> int:
    """Upper estimate of the activations of one decoder layer's forward over ``samples`` × ``seq_len``
    tokens at once: a few hidden-wide tensors, the MLP's intermediates and (the math kernel of
    scaled_dot_product_attention) one float32 score matrix per head."""
    hidden = int(cfg.get("hidden_size") or 0)
    inter = int(cfg.get("intermediate_size") or 4 * hidden)
    heads = int(cfg.get("num_attention_heads") or 1)
    tokens = samples * seq_len
    return 4 * (tokens * (8 * hidden + 3 * inter) + 2 * samples * heads * seq_len * seq_len)


def _torch_factor(Hd: np.ndarray) -> np.ndarray:
    """``gptq.inverse_factor`` by torch in float32, as llm-compressor and the GPTQ reference factor
    the Hessian (float32), on every thread (numpy's Cholesky runs on one): U = R⁻¹ with Hd = RRᵀ, R
    the reversed Cholesky factor of the reversed Hd. 33 ms at 1536 wide instead of 121 ms (float64,
    numpy's inverse of the triangle); U differs from the float64 one by ~1e-7 of its largest entry."""
    import torch

    L, info = torch.linalg.cholesky_ex(torch.from_numpy(np.ascontiguousarray(Hd[::-1, ::-1], np.float32)))
    if int(info):
        raise np.linalg.LinAlgError("not positive definite")

    # the triangle inverted by halves, triangular solves below 256 rows: half the time of one solve
    # against the identity at 1536
    def leaf(A):
        return torch.linalg.solve_triangular(A, torch.eye(len(A), dtype=A.dtype), upper=True)

    return inverse_upper(L.flip(0, 1).contiguous(), leaf, 256, torch.zeros_like).numpy()


def _input_groups(layer, mods, h, mask, pos, rotary) -> list[list[str]]:
    """The linears of ``layer`` grouped by the tensor they read, each group in call order, the groups
    in the order a forward reaches them (one forward of a few tokens)."""
    import torch

    order: list[tuple[str, object]] = []

    def hook(name):
        def fn(module, args):
            order.append((name, args[0]))
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    try:
        with torch.no_grad():
            layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rotary)
    finally:
        for hd in handles:
            hd.remove()
    groups: list[list[str]] = []
    seen: list[object] = []
    for name, x in order:
        k = next((j for j, y in enumerate(seen) if y is x), None)
        if k is None:
            seen.append(x)
            groups.append([name])
        elif name not in groups[k]:
            groups[k].append(name)
    return groups


def _one_pass(layer, mods, groups, hidden, mask, pos, rotary, solve):
    """One forward of every calibration sample through ``layer``: a pre-hook on each group's first
    linear hands the group's input to ``solve(members, x)``, which quantizes the members' weights in
    place before any of them runs. Returns the layer's output (the next layer's input)."""
    import torch

    leaders = {grp[0]: grp for grp in groups}
    done: set[str] = set()

    def hook(name):
        def fn(module, args):
            if name in done:
                raise CalibrationError(f"{name} ran twice in one decoder-layer forward; its layer cannot be quantized in one pass")
            done.add(name)
            solve(leaders[name], args[0])
        return fn

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in leaders]
    try:
        with torch.no_grad():
            out = layer(hidden, attention_mask=mask, position_ids=pos, position_embeddings=rotary)
    finally:
        for hd in handles:
            hd.remove()
    missing = [n for n in leaders if n not in done]
    if missing:
        raise CalibrationError(f"the decoder layer's forward never called {', '.join(missing)}")
    return out[0] if isinstance(out, tuple) else out


def _gram(x) -> np.ndarray:
    """xᵀx in float64 of a float32 torch (tokens, cols) by torch (on its threads), only the panels
    on and above the diagonal (four row panels: 5/8 of a general product's flops), the rest mirrored."""
    import torch

    n = x.shape[1]
    b = -(-n // 4)
    G = torch.empty((n, n), dtype=torch.float32)
    for i in range(0, n, b):
        G[i:i + b, i:] = x[:, i:i + b].T @ x[:, i:]
    G.triu_()  # the lower panels were never written
    return (G + G.triu(1).T).numpy().astype(np.float64)


def _collect(layer, mods, hidden, run):
    """Run the calibration activations through ``layer`` with hooks on its linears. Returns
    ({leader: (Σxᵀx float64, tokens, Σ|x| float64)}, {linear: leader}, the layer's output); linears
    fed by the same tensor (q/k/v, gate/up) share one leader and one set of statistics."""

    stats: dict[str, list] = {}
    leader_of: dict[str, str] = {}
    live: dict[int, tuple] = {}  # data_ptr -> (tensor kept alive, leader), for one batch

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0]
            if name not in leader_of:
                held = live.get(x.data_ptr())
                leader_of[name] = held[1] if held is not None and held[0] is x else name
                live[x.data_ptr()] = (x, leader_of[name])
            if leader_of[name] != name:
                return
            x2 = x.reshape(-1, x.shape[-1]).float()
            gram = _gram(x2)
            x2 = x2.numpy()
            absx = np.abs(x2).sum(0, dtype=np.float64)
            if name in stats:
                s = stats[name]
                s[0] += gram
                s[1] += x2.shape[0]
                s[2] += absx
            else:
                stats[name] = [gram, x2.shape[0], absx]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    try:
        out = run(layer, hidden)
    finally:
        for h in handles:
            h.remove()
        live.clear()
    return {k: tuple(v) for k, v in stats.items()}, leader_of, out
