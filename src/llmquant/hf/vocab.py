"""Tokenizer of a Hugging Face folder -> GGUF vocabulary, as convert_hf_to_gguf.py builds it.

Two kinds, tried in llama.cpp's order:

- SentencePiece (``tokenizer.model``): pieces, scores and types read from the protobuf directly
  (``_create_vocab_sentencepiece`` in llama.cpp ``conversion/base.py``; no sentencepiece package).
- GPT-2 style BPE (``tokenizer.json``): vocabulary and added tokens through the ``tokenizers``
  package (``get_vocab_base``), and the pre-tokenizer identified as llama.cpp does
  (``get_vocab_base_pre``): SHA-256 of the token ids of a fixed check string, looked up in the
  table of ``data/bpe_pre_hashes.json`` (copied from llama.cpp by scripts/gen_bpe_pre_table.py).

Special tokens, add_bos/add_eos, merges and the chat template come from ``SpecialVocab``
(hf_special.py, a copy of the converter's own gguf-py code).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from hashlib import sha256
from importlib import resources
from pathlib import Path
from typing import Any

from gguf import TokenType

from ..errors import ModelFileError, UnsupportedModelError
from .special import SpecialVocab

SPM_FILE = "tokenizer.model"
BPE_FILE = "tokenizer.json"

# transformers "fast" tokenizer classes that rebuild the post-processor from add_bos_token /
# add_eos_token (``update_post_processor``), with those flags' defaults; the pre-tokenizer hash
# is computed on the ids *with* the special tokens transformers adds.
_TEMPLATE_CLASSES = {
    "LlamaTokenizer": (True, False), "LlamaTokenizerFast": (True, False),
    "CodeLlamaTokenizer": (True, False), "CodeLlamaTokenizerFast": (True, False),
    "GemmaTokenizer": (True, False), "GemmaTokenizerFast": (True, False),
    "CohereTokenizer": (True, False), "CohereTokenizerFast": (True, False),
    "GPTNeoXTokenizer": (False, False), "GPTNeoXTokenizerFast": (False, False),
}
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    special: SpecialVocab

    def __len__(self) -> int:
        return len(self.tokens)


@lru_cache(maxsize=1)
def pre_tokenizer_table() -> dict[str, Any]:
    text = resources.files("llmquant").joinpath("data", "bpe_pre_hashes.json").read_text(encoding="utf-8")
    return json.loads(text)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(path, f"not valid JSON: {exc}") from None


def load_vocab(folder: Path, hparams: dict[str, Any], kinds: tuple[str, ...] = ("spm", "gpt2")) -> Vocab:
    """The GGUF vocabulary of ``folder``: the first of ``kinds`` that applies, in the converter's
    order ("spm": tokenizer.model, "llama_hf": byte-fallback BPE tokenizer.json, "gpt2")."""
    for kind in kinds:
        if kind == "spm" and (folder / SPM_FILE).is_file():
            return sentencepiece_vocab(folder, hparams)
        if kind == "llama_hf" and (vocab := llama_hf_vocab(folder, hparams)) is not None:
            return vocab
        if kind == "gpt2" and (folder / BPE_FILE).is_file():
            return bpe_vocab(folder, hparams)
    raise ModelFileError(folder, f"no tokenizer: expected {BPE_FILE} or {SPM_FILE}")


# -- GPT-2 style BPE ------------------------------------------------------------------------------
def does_token_look_special(token: str) -> bool:
    """``TextModel.does_token_look_special``: added tokens some models forget to mark special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _token_content(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _clean_up_tokenization(text: str) -> str:
    # transformers PreTrainedTokenizerBase.clean_up_tokenization
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _load_hf_tokenizer(folder: Path, config: dict[str, Any]):
    """A ``tokenizers.Tokenizer`` set up the way transformers' AutoTokenizer leaves it."""
    try:
        from tokenizers import AddedToken, Tokenizer, processors
    except ImportError:  # pragma: no cover - a core dependency
        raise UnsupportedModelError("the 'tokenizers' package is needed for tokenizer.json: pip install tokenizers") from None
    doc = read_json(folder / BPE_FILE)
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise ModelFileError(folder / BPE_FILE, "has no 'model' object")
    # PreTrainedTokenizerFast.__init__: a top-level pre-tokenizer takes add_prefix_space from the config
    pre = doc.get("pre_tokenizer")
    want = config.get("add_prefix_space", False)
    if isinstance(pre, dict) and "add_prefix_space" in pre and pre["add_prefix_space"] != want:
        pre["add_prefix_space"] = want
    try:
        tok = Tokenizer.from_str(json.dumps(doc))
    except Exception as exc:  # tokenizers raises its own exception type
        raise ModelFileError(folder / BPE_FILE, f"cannot be loaded: {exc}") from None
    # special tokens declared only in tokenizer_config.json become added tokens
    declared = [_token_content(config.get(k)) for k in _SPECIAL_KEYS]
    declared += [_token_content(t) for t in config.get("additional_special_tokens") or []]
    present = {t.content for t in tok.get_added_tokens_decoder().values()}
    missing = [t for t in dict.fromkeys(declared) if t and t not in present]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    cls = config.get("tokenizer_class")
    if cls in _TEMPLATE_CLASSES:
        add_bos = config.get("add_bos_token", _TEMPLATE_CLASSES[cls][0])
        add_eos = config.get("add_eos_token", _TEMPLATE_CLASSES[cls][1])
        bos, eos = _token_content(config.get("bos_token")), _token_content(config.get("eos_token"))
        single = ([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else [])
        pair = single + ([f"{bos}:1"] if add_bos and bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos and eos else [])
        specials = [(t, tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on and t]
        if all(i is not None for _, i in specials):
            tok.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=specials)
    return tok


def identify_pre_tokenizer(tok) -> tuple[str | None, str]:
    """(llama.cpp's pre-tokenizer name or None, the hash) for a loaded tokenizer."""
    table = pre_tokenizer_table()
    ids = tok.encode(table["chktxt"], add_special_tokens=True).ids
    chkhsh = sha256(str(list(ids)).encode()).hexdigest()
    entry = table["hashes"].get(chkhsh)
    return (entry["pre"] if entry else None), chkhsh


def bpe_vocab(folder: Path, hparams: dict[str, Any]) -> Vocab:
    config_path = folder / "tokenizer_config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    if not isinstance(config, dict):
        raise ModelFileError(config_path, "expected a JSON object")
    tok = _load_hf_tokenizer(folder, config)
    vocab = tok.get_vocab(with_added_tokens=True)
    vocab_size = hparams.get("vocab_size", len(vocab))
    if vocab and max(vocab.values()) >= vocab_size:
        raise ModelFileError(folder / BPE_FILE, f"token id {max(vocab.values())} is outside config.json vocab_size {vocab_size}")
    pre, chkhsh = identify_pre_tokenizer(tok)
    if pre is None:
        raise UnsupportedModelError(
            f"{folder / BPE_FILE}: BPE pre-tokenizer not recognized (hash {chkhsh}); llama.cpp would not "
            "know how to split text for it. convert_hf_to_gguf.py refuses it the same way."
        )
    reverse = {i: t for t, i in vocab.items()}
    decoder = tok.get_added_tokens_decoder()
    added = {t.content for t in decoder.values()}
    cleanup = config.get("clean_up_tokenization_spaces", False) is True
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        if token in added:
            info = decoder.get(i)
            if info is not None and not info.normalized:
                # llama.cpp assumes CONTROL and USER_DEFINED tokens are pre-normalized
                text = tok.decode(tok.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
                token = _clean_up_tokenization(text) if cleanup else text
            if (info is not None and info.special) or does_token_look_special(token):
                types.append(TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")  # pre-normalize user-defined spaces
                types.append(TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(token)
    special = SpecialVocab(folder, load_merges=True)
    if not special.merges:
        raise ModelFileError(folder / BPE_FILE, "a BPE tokenizer without merges (neither tokenizer.json nor merges.txt has them)")
    return Vocab("gpt2", pre, tokens, [int(t) for t in types], None, special)


# -- SentencePiece ----------------------------------------------------------------------------------
# sentencepiece_model.proto: ModelProto.pieces = 1 (repeated SentencePiece {piece = 1, score = 2,
# type = 3}); type NORMAL=1 UNKNOWN=2 CONTROL=3 USER_DEFINED=4 UNUSED=5 BYTE=6.
_SPM_TO_GGUF = {1: TokenType.NORMAL, 2: TokenType.UNKNOWN, 3: TokenType.CONTROL, 4: TokenType.NORMAL,
                5: TokenType.UNUSED, 6: TokenType.BYTE}  # as the converter: USER_DEFINED pieces read as NORMAL


def _varint(buf: bytes, pos: int, end: int, path: Path) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ModelFileError(path, f"corrupt SentencePiece model: bad varint at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes, pos: int, end: int, path: Path):
    """(field number, wire type, value) of one protobuf message in ``buf[pos:end]``."""
    while pos < end:
        key, pos = _varint(buf, pos, end, path)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end, path)
        elif wire == 1:
            if pos + 8 > end:
                raise ModelFileError(path, f"corrupt SentencePiece model: truncated field {field} at byte {pos}")
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos, end, path)
            if pos + n > end:
                raise ModelFileError(path, f"corrupt SentencePiece model: field {field} claims {n} bytes, only {end - pos} left")
            value, pos = (pos, pos + n), pos + n
        elif wire == 5:
            if pos + 4 > end:
                raise ModelFileError(path, f"corrupt SentencePiece model: truncated field {field} at byte {pos}")
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ModelFileError(path, f"corrupt SentencePiece model: wire type {wire} at byte {pos}")
        yield field, wire, value


def read_sentencepiece(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, sentencepiece type) for every piece of a ``tokenizer.model``."""
    buf = path.read_bytes()
    pieces = []
    for field, wire, value in _fields(buf, 0, len(buf), path):
        if field != 1 or wire != 2:
            continue
        start, stop = value
        piece, score, kind = "", 0.0, 1
        for f2, w2, v2 in _fields(buf, start, stop, path):
            if f2 == 1 and w2 == 2:
                piece = buf[v2[0]:v2[1]].decode("utf-8", "replace")
            elif f2 == 2 and w2 == 5:
                (score,) = struct.unpack("<f", v2)
            elif f2 == 3 and w2 == 0:
                kind = v2
        pieces.append((piece, score, kind))
    if not pieces:
        raise ModelFileError(path, "not a SentencePiece model: no pieces")
    return pieces


def sentencepiece_vocab(folder: Path, hparams: dict[str, Any]) -> Vocab:
    """``_create_vocab_sentencepiece``: pieces, then added_tokens.json and tokenizer_config's
    added_tokens_decoder on top, padded to config.json's vocab_size."""
    pieces = read_sentencepiece(folder / SPM_FILE)
    vocab_size = hparams.get("vocab_size") or len(pieces)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for i, (piece, score, kind) in enumerate(pieces[:vocab_size]):
        tokens[i] = piece
        scores[i] = score
        types[i] = int(_SPM_TO_GGUF.get(kind, TokenType.NORMAL))
    added_path = folder / "added_tokens.json"
    if added_path.is_file():
        for text, i in read_json(added_path).items():
            if isinstance(i, int) and 0 <= i < vocab_size:
                tokens[i], scores[i], types[i] = text, -1000.0, int(TokenType.USER_DEFINED)
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        config = read_json(config_path)
        for key, data in (config.get("added_tokens_decoder") or {}).items():
            i = int(key)
            if not 0 <= i < vocab_size or not isinstance(data, dict):
                continue
            text = data.get("content", "")
            if data.get("special") or does_token_look_special(text):
                types[i] = int(TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types[i] = int(TokenType.USER_DEFINED)
            scores[i] = -1000.0
            tokens[i] = text
    special = SpecialVocab(folder, n_vocab=len(tokens))
    return Vocab("llama", "default", tokens, types, scores, special)


def llama_hf_vocab(folder: Path, hparams: dict[str, Any]) -> Vocab | None:
    """gguf-py ``LlamaHfVocab``: a SentencePiece-like BPE (byte fallback) given only as tokenizer.json.
    None when tokenizer.json is not of that kind (the caller then reads it as GPT-2 BPE)."""
    path = folder / BPE_FILE
    if not path.is_file():
        return None
    doc = read_json(path)
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        return None
    if model.get("ignore_merges", False) and not model.get("byte_fallback", True):
        return None  # Llama 3 style: GPT-2 BPE
    if not model.get("byte_fallback", False) or (doc.get("decoder") or {}).get("type") != "Sequence":
        return None
    config_path = folder / "tokenizer_config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    tok = _load_hf_tokenizer(folder, config)
    vocab = tok.get_vocab(with_added_tokens=True)
    reverse = {i: t for t, i in vocab.items()}
    n_base = tok.get_vocab_size(with_added_tokens=False)
    decoder = tok.get_added_tokens_decoder()
    added = [(i, t.content) for i, t in sorted(decoder.items()) if i >= n_base]
    declared = [_token_content(config.get(k)) for k in _SPECIAL_KEYS]
    declared += [_token_content(t) for t in config.get("additional_special_tokens") or []]
    special_ids = {vocab[t] for t in declared if t and t in vocab}
    tokens, types = [], []
    for i in range(n_base):
        if i not in reverse:
            raise ModelFileError(path, f"token id {i} is missing from the vocabulary")
        text = reverse[i]
        tokens.append(text)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types.append(int(TokenType.BYTE))
        else:
            types.append(int(TokenType.CONTROL if i in special_ids else TokenType.NORMAL))
    for i, text in added:
        tokens.append(text)
        types.append(int(TokenType.CONTROL if vocab.get(text) in special_ids else TokenType.USER_DEFINED))
    scores = [-1000.0] * len(tokens)
    return Vocab("llama", "default", tokens, types, scores, SpecialVocab(folder, n_vocab=len(tokens)))
