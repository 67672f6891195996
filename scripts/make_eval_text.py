"""Regenerate src/llmquant/data/eval.txt: English prose from the Python Language Reference.

The source is ``pydoc_data/topics.py`` of the running Python's standard library (PSF License;
see src/llmquant/data/NOTICE). Grammar productions, code examples, tables and headings are
dropped; the remaining paragraphs are re-flowed to one line each, in topic order, until the
text reaches ``--tokens`` tokens with the embedded model's tokenizer (default ~12.5 chunks of 512).

    python scripts/make_eval_text.py [--tokens 6500]
"""

from __future__ import annotations

import argparse
import platform
import re
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "llmquant" / "data" / "eval.txt"
HEADER = ("# Prose from the Python {ver} Language Reference (pydoc_data/topics.py), "
          "Copyright (c) 2001 Python Software Foundation; PSF License Version 2. See NOTICE.")


def prose_paragraphs(text: str) -> list[str]:
    """Paragraphs that read as prose: unindented, mostly letters, ending like a sentence."""
    kept = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if not lines or any(line.startswith((" ", "\t")) for line in lines):
            continue  # grammar productions, code and examples are indented
        if any(set(line.strip()) <= set("*=-+|~^") for line in lines):
            continue  # headings and tables
        para = " ".join(line.strip() for line in lines)
        letters = sum(c.isalpha() or c == " " for c in para)
        if len(para) < 120 or letters / len(para) < 0.85 or para[-1] != ".":
            continue
        if para.startswith((">>>", "[", "Note:", "See also:", "Changed in", "New in", "Added in", "Deprecated")):
            continue
        kept.append(para)
    return kept


def main() -> None:
    from pydoc_data import topics

    from llmquant.models import default_model_path
    from llmquant.runtime.llama import Model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=6500)
    args = ap.parse_args()
    paragraphs, seen = [], set()
    for name in topics.topics:  # the file's own (alphabetical) order
        for para in prose_paragraphs(topics.topics[name]):
            if para not in seen:
                seen.add(para)
                paragraphs.append(para)
    with Model(default_model_path(), n_ctx=512, threads=1) as model:
        text = HEADER.format(ver=platform.python_version()) + "\n\n"
        for para in paragraphs:
            text += para + "\n\n"
            if len(model.tokenize(text)) >= args.tokens:
                break
        n = len(model.tokenize(text))
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}: {len(text):,} characters, {n:,} tokens, {n // 512} chunks of 512")


if __name__ == "__main__":
    main()
