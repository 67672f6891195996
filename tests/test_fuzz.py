"""Fuzzing the parsers of files strangers publish (GGUF header, safetensors header, both imatrix
readers) and the chat-template sandbox. Per target: 10k seeded mutations of real files (a plain
loop: hypothesis costs ~10 ms a case, more than the parsers), then a few hundred hypothesis cases
(mutation op lists it can shrink, and generated GGUF / safetensors structures), each case bounded
to CASE_SECONDS, plus the saved regression inputs. Every case must return or raise one
LlmquantError (see tests/fuzzing.py; bench/fuzz.py runs >= 1M per target under an RLIMIT_AS).
About 100 s in all on 2 cores, most of it compiling 10k mutated chat templates.

Set LLMQUANT_FUZZ_SAVE=1 to keep a failing input under tests/fuzz_regressions/.
"""

from __future__ import annotations

import json
import os
import struct
import traceback

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fuzzing  # noqa: E402

# mutated templates with stray backslashes make Jinja's lexer warn about escape sequences
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CASES = int(os.environ.get("LLMQUANT_FUZZ_CASES", "10000"))
HYPOTHESIS_CASES = int(os.environ.get("LLMQUANT_FUZZ_HYPOTHESIS", "300"))
FUZZ = settings(max_examples=HYPOTHESIS_CASES, deadline=None, database=None, derandomize=True, print_blob=True,
                suppress_health_check=list(HealthCheck))

OPS = st.lists(st.tuples(st.integers(0, 9), st.integers(0, 2**40), st.binary(max_size=8)), min_size=1, max_size=8)


def _check(target: str, data: bytes):
    try:
        return fuzzing.run_case(target, data)
    except Exception as exc:
        if os.environ.get("LLMQUANT_FUZZ_SAVE"):
            fuzzing.save_regression(target, data, traceback.format_exc())
        raise AssertionError(f"{target}: {type(exc).__name__}: {exc} for input {data[:200]!r}...") from exc


@pytest.mark.slow
@pytest.mark.parametrize("target", list(fuzzing.TARGETS))
def test_ten_thousand_mutations_are_parsed_or_refused(target):
    import random

    rng = random.Random(f"llmquant-fuzz-{target}")
    seeds = fuzzing.seeds()[target]
    pool = [s for t in fuzzing.seeds().values() for s in t]
    refused = 0
    for _ in range(CASES):
        data = fuzzing.mutate(rng.choice(seeds), fuzzing.random_ops(rng), rng.choice(pool))
        refused += _check(target, data) is not None
    assert 0 < refused < CASES  # the mutations reach both outcomes: still valid, and refused


def _mutation_test(target: str):
    @pytest.mark.slow
    @FUZZ
    @given(which=st.integers(0, 100), ops=OPS, other=st.integers(0, 100))
    def test(which, ops, other):
        seeds = fuzzing.seeds()[target]
        pool = [s for t in fuzzing.seeds().values() for s in t]
        _check(target, fuzzing.mutate(seeds[which % len(seeds)], ops, pool[other % len(pool)]))

    test.__name__ = f"test_mutated_{target}_is_parsed_or_refused"
    return test


test_mutated_gguf_header = _mutation_test("gguf_header")
test_mutated_safetensors_header = _mutation_test("safetensors_header")
test_mutated_imatrix_gguf = _mutation_test("imatrix_gguf")
test_mutated_imatrix_legacy = _mutation_test("imatrix_legacy")
test_mutated_chat_template = _mutation_test("chat_template")


# -- generated structures --------------------------------------------------------------------------------
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}


@st.composite
def gguf_files(draw) -> bytes:
    """A GGUF assembled field by field: counts, key/value types, array lengths and tensor infos
    drawn freely (often lying), then random tail bytes."""
    u32 = st.one_of(st.sampled_from(fuzzing.INTERESTING), st.integers(0, 2**32 - 1)).map(lambda v: v % 2**32)
    u64 = st.one_of(st.sampled_from(fuzzing.INTERESTING), st.integers(0, 64))
    text = st.binary(max_size=12)
    kvs, tensors = draw(st.lists(st.tuples(text, st.integers(0, 13), u64, st.binary(max_size=24)), max_size=6)), \
        draw(st.lists(st.tuples(text, st.integers(0, 5), st.lists(u64, max_size=5), u32, u64), max_size=4))
    out = [b"GGUF", struct.pack("<I", draw(st.sampled_from([2, 3, 3, 3, 1, 4]))),
           struct.pack("<QQ", draw(st.one_of(st.just(len(tensors)), u64)), draw(st.one_of(st.just(len(kvs)), u64)))]
    for key, vtype, count, raw in kvs:
        out += [struct.pack("<Q", len(key)), key, struct.pack("<I", vtype)]
        if vtype == 8:
            out += [struct.pack("<Q", len(raw)), raw]
        elif vtype == 9:
            out += [struct.pack("<IQ", draw(st.integers(0, 13)), count % 2**64), raw]
        elif vtype in SCALARS:
            out += [raw[:struct.calcsize(SCALARS[vtype])].ljust(struct.calcsize(SCALARS[vtype]), b"\0")]
        else:
            out += [raw]
    for name, n_dims, dims, ttype, offset in tensors:
        out += [struct.pack("<Q", len(name)), name, struct.pack("<I", n_dims)]
        out += [struct.pack("<Q", d % 2**64) for d in dims[:n_dims]]
        out += [struct.pack("<I", ttype % 40), struct.pack("<Q", offset % 2**64)]
    out.append(draw(st.binary(max_size=256)))
    return b"".join(out)


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8))
JSON = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                    max_leaves=12)


@st.composite
def safetensors_files(draw) -> bytes:
    """A safetensors header built from plausible and implausible entries, then a data section."""
    dtypes = st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "f32", ""]), JSON)
    dims = st.lists(st.one_of(st.integers(0, 16), st.sampled_from(fuzzing.INTERESTING), JSON), max_size=5)
    entry = st.fixed_dictionaries({}, optional={
        "dtype": dtypes, "shape": st.one_of(dims, JSON),
        "data_offsets": st.one_of(st.lists(st.integers(-2, 300), min_size=2, max_size=2), JSON)})
    header = draw(st.dictionaries(st.text(max_size=10), st.one_of(entry, JSON), max_size=5))
    if draw(st.booleans()):
        header["__metadata__"] = draw(JSON)
    raw = json.dumps(header).encode()
    if draw(st.integers(0, 9)) == 0:  # deep nesting, which json.loads turns into a RecursionError
        depth = draw(st.integers(1000, 20_000))
        raw = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
    length = draw(st.one_of(st.just(len(raw)), st.integers(0, len(raw) + 16), st.sampled_from(fuzzing.INTERESTING)))
    return struct.pack("<Q", length % 2**64) + raw + draw(st.binary(max_size=300))


@pytest.mark.slow
@settings(FUZZ, max_examples=HYPOTHESIS_CASES * 2 // 3)
@given(data=gguf_files())
def test_generated_gguf_headers_are_parsed_or_refused(data):
    _check("gguf_header", data)


@pytest.mark.slow
@settings(FUZZ, max_examples=HYPOTHESIS_CASES * 2 // 3)
@given(data=safetensors_files())
def test_generated_safetensors_headers_are_parsed_or_refused(data):
    _check("safetensors_header", data)


# -- saved findings --------------------------------------------------------------------------------------
REGRESSION_FILES = sorted(fuzzing.REGRESSIONS.glob("*/*.bin"))


@pytest.mark.parametrize("path", REGRESSION_FILES, ids=[f"{p.parent.name}/{p.stem}" for p in REGRESSION_FILES])
def test_saved_findings_are_refused_with_a_named_error(path):
    _check(path.parent.name, path.read_bytes())


def test_budget_breaking_templates_are_refused_quickly():
    """The template attacks the sandbox alone does not stop: each is one named error within the
    render budget, the allocation bounded (the bench checks it under an RLIMIT_AS)."""
    import time

    from llmquant.runtime.chat import RENDER_SECONDS, ChatTemplateError, render_chat

    attacks = [
        "{{ 'a' * 10**9 }}", "{{ 10**(10**9) }}", "{{ 'a'|center(10**9) }}", "{{ 'a'.ljust(10**9) }}",
        "{{ '%999999999s' % 1 }}", "{{ '{:>999999999}'.format(1) }}", "{{ '{:{}}'.format(1, 10**9) }}",
        "{{ '%999999999s'|format(1) }}", "{{ messages|tojson(indent=10**8) }}",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
        "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}",
        "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "{{ 1/0 }}", "{{ lipsum(10**9) }}",
        "{% for i in range(100000) %}" + "x" * 1000 + "{% endfor %}", "{{" + "(" * 5000 + "}}",
    ]
    for template in attacks:
        t0 = time.perf_counter()
        with pytest.raises(ChatTemplateError):
            render_chat(template, fuzzing.MESSAGES)
        assert time.perf_counter() - t0 < RENDER_SECONDS + 2, template
    # real templates still render
    for seed in fuzzing.seeds()["chat_template"][:5]:
        assert render_chat(seed.partition(b"\n")[2].decode(), fuzzing.MESSAGES[:3]) if b"raise_exception" not in seed \
            else True
