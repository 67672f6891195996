"""Fuzz targets shared by tests/test_fuzz.py (hypothesis, >= 10k cases each) and bench/fuzz.py
(a plain seeded mutator, >= 1M cases each under an RLIMIT_AS).

Each target takes bytes and feeds them to one parser held in memory (no file, no subprocess):
the GGUF header parser, the safetensors header reader, the GGUF and legacy ``.dat`` imatrix
readers and the sandboxed chat-template renderer. The seeds are real: the embedded model's
own header bytes (its first 64 KiB, and its metadata re-serialised with arrays cut short), its
chat template, and small files built here as gguf-py / llama-imatrix / safetensors write them.
The only acceptable outcomes are a return or one ``LlmquantError``; anything else, a case over
``CASE_SECONDS`` or a MemoryError is a finding.
"""

from __future__ import annotations

import json
import random
import signal
import struct
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGUFWriter

from llmquant.errors import LlmquantError

CASE_SECONDS = 5.0
REAL_PREFIX = 64 << 10  # bytes of the embedded model's header used as a raw seed
REGRESSIONS = Path(__file__).parent / "fuzz_regressions"


class CaseTimeout(Exception):
    """A single case ran past CASE_SECONDS."""


# -- the targets ---------------------------------------------------------------------------------------
def gguf_header(data: bytes) -> None:
    from llmquant.gguf.header import parse_gguf_buffer

    parse_gguf_buffer(data, "fuzz.gguf")


def safetensors_header(data: bytes) -> None:
    from llmquant.hf.safetensors import parse_safetensors_buffer

    parse_safetensors_buffer(data, "fuzz.safetensors")


def imatrix(data: bytes) -> None:
    from llmquant.gguf.imatrix import load_imatrix_buffer

    im = load_imatrix_buffer(data, "fuzz.imatrix")
    for name, values in im.entries.items():  # what quantize then asks of it
        im.for_tensor(name, max(values.size, 1))
    im.provenance()


MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello! ünïcødé 1234567"},
    {"role": "assistant", "content": "Hi, how can I help?"},
    {"role": "user", "content": "{{ not a template }}"},
]


def chat_template(data: bytes) -> None:
    """The first line of ``data`` picks the conversation (how many messages), the rest is the template."""
    from llmquant.runtime.chat import render_chat

    head, _, body = data.partition(b"\n")
    n = head[0] % (len(MESSAGES) + 1) if head else len(MESSAGES)
    render_chat(body.decode("utf-8", "replace"), MESSAGES[:n] or MESSAGES[:1],
                bos_token="<s>", eos_token="</s>", add_generation_prompt=bool(len(head) % 2))


TARGETS = {
    "gguf_header": gguf_header,
    "safetensors_header": safetensors_header,
    "imatrix_gguf": imatrix,
    "imatrix_legacy": imatrix,
    "chat_template": chat_template,
}


def _on_alarm(signum, frame):
    raise CaseTimeout(f"a case ran past {CASE_SECONDS:g} s")


def run_case(target: str, data: bytes) -> LlmquantError | None:
    """Run one case under the time bound; returns the named error it raised (or None). Any other
    exception propagates: that is a finding."""
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        TARGETS[target](data)
    except LlmquantError as exc:
        return exc
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return None


# -- seeds ---------------------------------------------------------------------------------------------
def _gguf_bytes(fill) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seed.gguf"
        w = GGUFWriter(str(path), "llama")
        fill(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


def _tiny_tensors(w: GGUFWriter) -> None:
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((8, 32)).astype(np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((32, 32)).astype(np.float16))
    q8 = np.zeros((4, 34), np.uint8)  # 4 rows of one Q8_0 block each
    from gguf import GGMLQuantizationType
    w.add_tensor("blk.0.ffn_up.weight", q8, raw_shape=(4, 34), raw_dtype=GGMLQuantizationType.Q8_0)


@lru_cache(maxsize=1)
def _real_header() -> tuple[bytes, dict]:
    from llmquant.gguf.header import parse_gguf
    from llmquant.models import default_model_path

    path = default_model_path()
    with open(path, "rb") as f:
        prefix = f.read(REAL_PREFIX)
    return prefix, parse_gguf(path).fields


def _real_metadata_gguf() -> bytes:
    """The embedded model's metadata (every key and value type; arrays cut to 16 items) over tiny tensors."""
    _, fields = _real_header()

    def fill(w: GGUFWriter) -> None:
        for key, f in fields.items():
            if key in ("general.architecture", "general.alignment"):
                continue
            value = f.value[:16] if isinstance(f.value, list) else f.value
            w.add_key_value(key, value, f.type, sub_type=f.sub_type)
        _tiny_tensors(w)

    return _gguf_bytes(fill)


def _safetensors_bytes(tensors: dict[str, tuple[str, np.ndarray]], metadata: dict | None = None) -> bytes:
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, (dtype, arr) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(np.ascontiguousarray(a).tobytes() for _, a in tensors.values())


def _imatrix_gguf_bytes() -> bytes:
    rng = np.random.default_rng(1)

    def fill(w: GGUFWriter) -> None:
        w.kv_data[0].pop("general.architecture")  # imatrix.cpp writes no architecture
        w.add_string("general.type", "imatrix")
        w.add_array("imatrix.datasets", ["calibration.txt"])
        w.add_uint32("imatrix.chunk_count", 8)
        w.add_uint32("imatrix.chunk_size", 512)
        for name, shape in (("blk.0.attn_q.weight", (1, 32)), ("blk.0.ffn_down.weight", (2, 16))):
            w.add_tensor(f"{name}.in_sum2", rng.random(shape, dtype=np.float32) * 100)
            w.add_tensor(f"{name}.counts", np.full((shape[0], 1), 4096, np.float32))

    return _gguf_bytes(fill)


def _imatrix_legacy_bytes() -> bytes:
    rng = np.random.default_rng(2)
    out = [struct.pack("<i", 2)]
    for name, n in (("blk.0.attn_q.weight", 32), ("output.weight", 16)):
        raw = name.encode()
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", 8, n), rng.random(n, dtype=np.float32).tobytes()]
    out += [struct.pack("<i", 8), struct.pack("<i", 15), b"calibration.txt"]
    return b"".join(out)


# representative chat templates (ChatML, Llama-3 and Mistral styles, as their tokenizer_config.json has them)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
TOOLS_TEMPLATE = (
    "{%- set ns = namespace(system='', n=0) -%}{%- for m in messages if m.role == 'system' -%}"
    "{%- set ns.system = ns.system ~ m.content -%}{%- endfor -%}{{ ns.system|tojson(indent=2) }}"
    "{%- for m in messages|selectattr('role', 'ne', 'system')|list -%}{%- set ns.n = ns.n + 1 -%}"
    "{{ '%s: %s' % (m.role|upper, m.content|replace('\n', ' ')|truncate(40)) }}{{ '{:>4}'.format(ns.n) }}"
    "{%- endfor -%}{{ strftime_now('%Y-%m-%d')|length }}{{ messages|map(attribute='role')|join(',') }}"
)


@lru_cache(maxsize=1)
def seeds() -> dict[str, list[bytes]]:
    from llmquant.runtime.chat import CHATML_TEMPLATE

    prefix, fields = _real_header()
    rng = np.random.default_rng(3)
    real_template = fields["tokenizer.chat_template"].value
    return {
        "gguf_header": [prefix, _real_metadata_gguf(), _gguf_bytes(_tiny_tensors)],
        "safetensors_header": [
            _safetensors_bytes({"model.embed_tokens.weight": ("F32", rng.random((4, 8), dtype=np.float32)),
                                "model.norm.weight": ("BF16", np.ones(8, np.uint16)),
                                "lm_head.weight": ("F16", np.zeros((2, 8), np.float16)),
                                "step": ("I64", np.zeros((), np.int64))}),
            _safetensors_bytes({"a": ("U8", np.zeros(0, np.uint8)), "b": ("BOOL", np.ones(3, np.uint8))}, {"k": "v"}),
        ],
        "imatrix_gguf": [_imatrix_gguf_bytes()],
        "imatrix_legacy": [_imatrix_legacy_bytes()],
        "chat_template": [b"\x04\n" + t.encode() for t in
                          (real_template, CHATML_TEMPLATE, LLAMA3_TEMPLATE, MISTRAL_TEMPLATE, TOOLS_TEMPLATE)]
                         + [b"\x02\n" + MISTRAL_TEMPLATE.encode()],
    }


# -- mutation ------------------------------------------------------------------------------------------
INTERESTING = [0, 1, 2, 3, 4, 7, 8, 16, 31, 32, 255, 256, 4095, 65535, 2**31 - 1, 2**31, 2**32 - 1,
               2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
# pieces a template mutation splices in: syntax, sandbox escapes and budget breakers
JINJA_TOKENS = [
    "{{", "}}", "{%", "%}", "{#", "#}", "{%-", "-%}", " for x in messages ", " endfor ", " if ", " endif ",
    " else ", " set ns = namespace(a=1) ", " set ns.a = ns.a ~ ns.a ", " macro m(n) ", " endmacro ", "m(n-1)",
    " range(100000) ", "|join", "|tojson", "|list", "|length", "|center(99999)", "|indent(99999)", "|format(1)",
    " * 99999", " ** 999", " ~ ", " + ", "%", "'%s'", "'{}'.format", ".__class__", ".__mro__", "__globals__",
    "raise_exception('x')", "strftime_now('%Y')", "loop.index", "loop.cycle(1,2)", "message['content']",
    "messages[-1]", "bos_token", "eos_token", "add_generation_prompt", "(", ")", "[", "]", "'", '"', "\\",
    " recursive ", "loop(x)", " break ", " continue ", "1/0", "x[::-1]", "dict(a=1)", "cycler(1)", "joiner()",
]


def mutate(data: bytes, ops: list[tuple[int, int, bytes]], other: bytes = b"") -> bytes:
    """Apply ``ops`` (kind, position/value, bytes) in order: the same op list always gives the same
    bytes, so hypothesis can shrink the list and the bench can replay a seed."""
    buf = bytearray(data)
    for kind, x, blob in ops:
        n = len(buf)
        pos = x % (n + 1)
        kind %= 10
        if kind == 0 and n:  # flip a bit
            buf[pos % n] ^= 1 << (x >> 20) % 8
        elif kind == 1 and n:  # set a byte
            buf[pos % n] = (x >> 8) & 0xFF
        elif kind in (2, 3):  # an interesting u32 / u64 (what counts, lengths and offsets are)
            value = INTERESTING[(x >> 8) % len(INTERESTING)]
            fmt = "<I" if kind == 2 else "<Q"
            raw = struct.pack(fmt, value % (1 << (32 if kind == 2 else 64)))
            if kind == 3 and (x >> 16) % 2:
                pos -= pos % 8  # often aligned, as fields are
            buf[pos:pos + len(raw)] = raw
        elif kind == 4:  # insert bytes
            buf[pos:pos] = blob
        elif kind == 5 and n:  # delete a range
            buf[pos:pos + 1 + (x >> 12) % 64] = b""
        elif kind == 6 and n:  # duplicate a range
            chunk = buf[pos:pos + 1 + (x >> 12) % 256]
            buf[pos:pos] = chunk * (1 + (x >> 24) % 4)
        elif kind == 7:  # truncate
            del buf[pos:]
        elif kind == 8 and other:  # splice in part of another seed
            start = (x >> 8) % len(other)
            buf[pos:pos + len(blob)] = other[start:start + 1 + (x >> 16) % 512]
        elif kind == 9:  # a template token (harmless noise for the binary targets)
            buf[pos:pos] = JINJA_TOKENS[(x >> 8) % len(JINJA_TOKENS)].encode()
    return bytes(buf)


def random_ops(rng: random.Random, n_max: int = 6) -> list[tuple[int, int, bytes]]:
    return [(rng.randrange(10), rng.getrandbits(40), rng.randbytes(rng.randrange(0, 9)))
            for _ in range(rng.randrange(1, n_max + 1))]


def save_regression(target: str, data: bytes, why: str) -> Path:
    """Keep a finding as tests/fuzz_regressions/<target>/<sha>.bin (replayed by test_fuzz.py)."""
    import hashlib

    folder = REGRESSIONS / target
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    (folder / f"{path.stem}.txt").write_text(why.strip() + "\n")
    return path
