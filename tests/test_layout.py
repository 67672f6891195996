"""The package layout DESIGN.md draws, checked on the source: imports only point down the data flow,
there are no import circles, and the CLI starts without the heavy runtimes.

The ranks below are the stages in data-flow order. A module may import its own stage or an earlier
one; importing a later stage (formats/ -> runtime/, say) is a layering error, wherever the import
sits (module top or inside a function).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import llmquant

PKG = Path(llmquant.__file__).parent

# stage of each top-level unit; an entry not listed here fails the test, so a new unit gets a place
RANK = {
    "llmquant": 0, "llmquant.errors": 0, "llmquant.system": 0, "llmquant.models": 0,
    "llmquant.formats": 1,
    "llmquant.gguf": 2,
    "llmquant.hf": 3,
    "llmquant.calib": 4,
    "llmquant.runtime": 5,
    "llmquant.quantize": 6, "llmquant.convert": 6, "llmquant.store": 6, "llmquant.calibrate": 6,
    "llmquant.measure": 7, "llmquant.fit": 7,
    "llmquant.serve": 8,
    "llmquant.cli": 9, "llmquant.__main__": 9,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every llmquant module this file imports, resolved to absolute dotted names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "llmquant")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "llmquant":
                target = node.module
            else:
                continue
            found.add(target)
            for alias in node.names:  # `from . import store` imports a module
                sub = f"{target}.{alias.name}"
                if _exists(sub):
                    found.add(sub)
    return {m for m in found if _exists(m)}


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:]) if "." in module else Path()
    return (PKG / rel).with_suffix(".py").is_file() or (PKG / rel / "__init__.py").is_file()


def _unit(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) - {_module_name(p)} for p in PKG.rglob("*.py")}


def test_every_unit_has_a_stage():
    units = {_unit(m) for m in _graph()}
    assert units <= RANK.keys(), f"give these units a stage in RANK: {sorted(units - RANK.keys())}"


def test_imports_point_down_the_data_flow():
    bad = []
    for mod, deps in _graph().items():
        for dep in deps:
            if dep in ("llmquant",):  # the package root holds only __version__
                continue
            if RANK[_unit(dep)] > RANK[_unit(mod)]:
                bad.append(f"{mod} (stage {RANK[_unit(mod)]}) imports {dep} (stage {RANK[_unit(dep)]})")
    assert not bad, "imports of a later stage:\n" + "\n".join(sorted(bad))


def test_no_import_circles():
    graph = _graph()
    # a package's __init__ importing its own submodules is not a circle through the package
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d.startswith(m + "."):
                continue
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_formats_and_calib_are_pure():
    forbidden = ("llmquant.runtime", "llmquant.cli", "llmquant.measure", "llmquant.serve")
    bad = [f"{m} imports {d}" for m, deps in _graph().items() if _unit(m) in ("llmquant.formats", "llmquant.calib")
           for d in deps if d.startswith(forbidden)]
    assert not bad, bad


def test_cli_import_is_light():
    """`import llmquant.cli` (what `llmquant --help` pays) loads no runtime and no compiled kernels."""
    code = ("import sys, llmquant.cli; heavy = ('llama_cpp', 'torch', 'transformers', 'numba', 'llmquant.formats', "
            "'llmquant.runtime', 'numpy'); print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or "
            "any(m == h or m.startswith(h + '.') for h in heavy)))")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert got == "[]", f"import llmquant.cli loaded: {got}"
