"""Build src/llmquant/data/calibration.txt, the default text of ``llmquant imatrix``.

Deterministic (fixed seed, fixed Python 3.11.7 standard library). Sources and licenses (see
data/NOTICE):
- prose: docstrings of Python standard-library modules, and IDLE's help page (idlelib/help.html),
  PSF License;
- code: Python standard-library source (PSF License);
- non-English: the UTF-8 samples of Lib/test/cjkencodings (PSF License) and scripts/calib_own.txt;
- dialogue, lists, a recipe, paragraphs in 17 languages: scripts/calib_own.txt, written for
  llmquant (CC0);
- numbers, tables, JSON, arithmetic, dates: generated below (CC0).
Nothing comes from pydoc_data/topics.py (the Language Reference), the source of data/eval.txt.

    python scripts/make_calib_text.py   # writes src/llmquant/data/calibration.txt
"""

from __future__ import annotations

import ast
import datetime as dt
import html.parser
import json
import random
import re
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
OUT = ROOT / "src" / "llmquant" / "data" / "calibration.txt"
SEED = 20261201

DOC_MODULES = [
    "argparse", "collections/__init__", "dataclasses", "json/__init__", "json/decoder", "logging/__init__",
    "logging/handlers", "pathlib", "subprocess", "textwrap", "statistics", "fractions", "_pydecimal",
    "datetime", "calendar", "heapq", "bisect", "functools", "enum", "typing", "unittest/case",
    "http/client", "http/server", "urllib/parse", "urllib/request", "csv", "configparser", "tarfile",
    "zipfile/__init__", "shutil", "tempfile", "threading", "queue", "sched", "asyncio/events",
    "asyncio/tasks", "asyncio/queues", "email/message", "email/utils", "email/policy", "difflib",
    "inspect", "pickle", "random", "string", "smtplib", "socketserver", "optparse", "gettext",
    "locale", "pprint", "reprlib", "shelve", "sqlite3/__init__", "timeit", "trace", "uuid", "wave",
    "xml/dom/minidom", "xml/etree/ElementTree", "ipaddress", "imaplib", "mailbox", "netrc", "cmd",
    "codecs", "contextlib", "copy", "doctest", "filecmp", "fileinput", "fnmatch", "glob", "graphlib",
    "gzip", "hashlib", "hmac", "importlib/metadata/__init__", "io", "mimetypes", "numbers", "operator",
    "os", "pdb", "platform", "plistlib", "pydoc", "quopri", "selectors", "shlex", "signal", "site",
    "socket", "ssl", "stat", "struct", "symtable", "tabnanny", "tokenize", "traceback", "tracemalloc",
    "turtle", "types", "warnings", "weakref", "webbrowser", "zipapp", "zipimport",
]
CODE_MODULES = [
    "heapq", "bisect", "textwrap", "fractions", "statistics", "colorsys", "graphlib", "shlex",
    "fnmatch", "glob", "reprlib", "sched", "queue", "string", "calendar", "difflib", "csv",
    "json/encoder", "json/decoder", "base64", "dataclasses", "functools", "copy", "pprint",
    "ipaddress", "tokenize", "enum", "contextlib", "argparse", "configparser", "random",
]
CJK = ["big5-utf8.txt", "cp949-utf8.txt", "euc_jp-utf8.txt", "gb18030-utf8.txt", "euc_jisx0213-utf8.txt"]

PROSE_BUDGET = 250_000
CODE_BUDGET = 170_000
GEN_BUDGET = 70_000


def _source(mod: str) -> str:
    return (STDLIB / f"{mod}.py").read_text(encoding="utf-8")


def docstrings() -> list[str]:
    pieces = []
    for mod in DOC_MODULES:
        try:
            tree = ast.parse(_source(mod))
        except FileNotFoundError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    title = getattr(node, "name", mod.replace("/", "."))
                    pieces.append(f"{title}\n\n{doc.strip()}")
    return pieces


class _HelpText(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "head"):
            self.skip += 1
        if tag in ("p", "li", "h1", "h2", "h3", "dt", "dd", "pre", "br"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "head") and self.skip:
            self.skip -= 1

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def idle_help() -> list[str]:
    p = _HelpText()
    p.feed((STDLIB / "idlelib" / "help.html").read_text(encoding="utf-8"))
    text = "".join(p.parts)
    text = re.sub(r"[ \t]+", " ", text)
    paras = [" ".join(x.split()) for x in re.split(r"\n\s*\n|\n", text)]
    paras = [x for x in paras if len(x) > 60 and "©" not in x and "Copyright" not in x]
    return _group(paras, 1500)


def code() -> list[str]:
    pieces = []
    for mod in CODE_MODULES:
        try:
            tree = ast.parse(src := _source(mod))
        except FileNotFoundError:
            continue
        lines = src.splitlines()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                body = "\n".join(lines[node.lineno - 1 - len(node.decorator_list):node.end_lineno])
                if 300 < len(body) < 6000:
                    pieces.append(f"# {mod.replace('/', '.')}.py\n{body}")
    return pieces


def own() -> list[str]:
    text = (ROOT / "scripts" / "calib_own.txt").read_text(encoding="utf-8")
    return [p.split("\n", 1)[1].strip() for p in text.split("=== ")[1:]]


def cjk() -> list[str]:
    return [(STDLIB / "test" / "cjkencodings" / f).read_text(encoding="utf-8").strip() for f in CJK]


def generated(rng: random.Random) -> list[str]:
    out = []
    cities = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Toronto", "Perth", "Kraków", "Osaka", "Quito",
              "Tunis", "Tallinn", "Denver", "Porto", "Cairo", "Seoul", "Dublin", "Austin", "Bergen", "Cusco"]
    items = ["apples", "bolts", "cables", "desks", "envelopes", "filters", "gloves", "hinges", "inks",
             "jars", "keyboards", "lamps", "magnets", "nails", "oil", "paper", "quilts", "rope"]
    first = ["Ana", "Ben", "Chloe", "Dmitri", "Emeka", "Fatima", "Gustav", "Hana", "Ivan", "Jun", "Kofi",
             "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Sven", "Tariq", "Uma", "Yusuf"]
    while sum(map(len, out)) < GEN_BUDGET:
        kind = rng.randrange(6)
        if kind == 0:  # CSV table
            rows = ["date,city,item,quantity,unit_price,total"]
            d = dt.date(2020, 1, 1) + dt.timedelta(days=rng.randrange(2000))
            for _ in range(rng.randrange(8, 16)):
                q, p = rng.randrange(1, 500), round(rng.uniform(0.2, 90.0), 2)
                rows.append(f"{d.isoformat()},{rng.choice(cities)},{rng.choice(items)},{q},{p:.2f},{q * p:.2f}")
                d += dt.timedelta(days=rng.randrange(1, 9))
            out.append("\n".join(rows))
        elif kind == 1:  # JSON records
            recs = [{"id": rng.randrange(10**5, 10**6), "name": f"{rng.choice(first)} {rng.choice(first)}son",
                     "age": rng.randrange(18, 90), "city": rng.choice(cities),
                     "score": round(rng.gauss(70, 12), 1), "active": rng.random() < 0.7,
                     "tags": rng.sample(items, rng.randrange(1, 4))} for _ in range(rng.randrange(2, 5))]
            out.append(json.dumps(recs, indent=2, ensure_ascii=False))
        elif kind == 2:  # arithmetic, worked
            lines = []
            for _ in range(rng.randrange(6, 12)):
                a, b = rng.randrange(2, 9999), rng.randrange(2, 999)
                op = rng.choice("+-*/")
                if op == "/":
                    lines.append(f"{a * b} / {b} = {a}")
                else:
                    lines.append(f"{a} {op} {b} = {eval(f'{a}{op}{b}')}")
            pct = rng.randrange(5, 95)
            base = rng.randrange(100, 100000)
            lines.append(f"{pct}% of {base:,} is {base * pct / 100:,.2f}.")
            out.append("\n".join(lines))
        elif kind == 3:  # timetable
            t = dt.datetime(2024, rng.randrange(1, 13), rng.randrange(1, 28), rng.randrange(5, 10), 0)
            lines = [f"Departures from {rng.choice(cities)}, {t:%A %d %B %Y}:"]
            for _ in range(rng.randrange(5, 10)):
                t += dt.timedelta(minutes=rng.randrange(7, 75))
                lines.append(f"  {t:%H:%M}  {rng.choice(cities):<10} platform {rng.randrange(1, 14):>2}  "
                             f"{rng.choice(['on time', 'on time', 'delayed 5 min', 'delayed 12 min', 'cancelled'])}")
            out.append("\n".join(lines))
        elif kind == 4:  # measurements
            lines = ["| sample | mass (g) | length (mm) | temperature (°C) |", "|---|---|---|---|"]
            for i in range(rng.randrange(5, 10)):
                lines.append(f"| S-{rng.randrange(100, 999)} | {rng.uniform(0.1, 500):.3f} | "
                             f"{rng.uniform(1, 300):.1f} | {rng.uniform(-20, 45):.1f} |")
            out.append("\n".join(lines))
        else:  # a numbered inventory
            lines = [f"Inventory, warehouse {rng.randrange(1, 40)}:"]
            for i in range(1, rng.randrange(6, 12)):
                lines.append(f"{i}. {rng.randrange(1, 2000)} {rng.choice(items)} "
                             f"(shelf {rng.choice('ABCDEFGH')}{rng.randrange(1, 30)}, reorder at {rng.randrange(5, 200)})")
            out.append("\n".join(lines))
    return out


def _group(paras: list[str], size: int) -> list[str]:
    out, cur = [], []
    for p in paras:
        cur.append(p)
        if sum(map(len, cur)) >= size:
            out.append("\n\n".join(cur))
            cur = []
    if cur:
        out.append("\n\n".join(cur))
    return out


def _take(pieces: list[str], budget: int, rng: random.Random) -> list[str]:
    pieces = pieces[:]
    rng.shuffle(pieces)
    out, n = [], 0
    for p in pieces:
        if n >= budget:
            break
        out.append(p)
        n += len(p)
    return out


def build() -> str:
    if sys.version_info[:3] != (3, 11, 7):
        print(f"warning: built from Python {sys.version.split()[0]}, not 3.11.7: the text will differ", file=sys.stderr)
    rng = random.Random(SEED)
    streams = [
        _take(docstrings(), PROSE_BUDGET, rng) + idle_help(),
        _take(code(), CODE_BUDGET, rng),
        own() + cjk(),
        generated(rng),
    ]
    for s in streams:
        rng.shuffle(s)
    # interleave: every stretch of a few kB mixes prose, code, other languages, numbers
    pos = [0] * len(streams)
    parts = []
    while any(p < len(s) for p, s in zip(pos, streams)):
        weights = [len(s) - p for p, s in zip(pos, streams)]
        k = rng.choices(range(len(streams)), weights=weights)[0]
        parts.append(streams[k][pos[k]])
        pos[k] += 1
    return "\n\n".join(p.strip() for p in parts) + "\n"


if __name__ == "__main__":
    text = build()
    OUT.write_text(text, encoding="utf-8")
    print(f"{OUT}: {len(text.encode('utf-8')):,} bytes, {len(text):,} characters")
