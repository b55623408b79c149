"""The import graph runs one way (DESIGN.md's layers) and has no cycle.

kernels → ops → nn / functional → swap, integrations, models → tools: a module imports
only modules of its own layer or below, the library never imports the tools, and no
chain of imports comes back to where it started. Read from the source (``ast``), so
imports inside functions count too.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Layer of each module, by name prefix (the longest matching prefix wins).
LAYERS = {
    "fastattn.kernels": 1,
    "fastattn.reference": 2, "fastattn._warnings": 2, "fastattn.backends": 2,
    "fastattn.ext": 2, "fastattn._ext_build": 2, "fastattn._C": 2,   # _C: the built extension
    "fastattn.ops": 3,
    "fastattn.nn": 4, "fastattn.functional": 4, "fastattn.flash_attn_interface": 4,
    "fastattn._swap": 5, "fastattn.integrations": 5, "fastattn.models": 5,
    "fastattn.train": 5, "fastattn.sample": 5, "fastattn.data": 5,
    "fastattn": 5,                                     # the package's public API
    "fastattn.tools": 6, "fastattn.__main__": 6,
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / "fastattn").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "kernels").glob("*.py"):
        found["fastattn.kernels" if path.stem == "__init__"
              else f"fastattn.kernels.{path.stem}"] = path
    return found


MODULES = _modules()
KNOWN = set(MODULES) | {"fastattn._C"}


def _layer(name: str) -> int:
    prefix = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def _imports(name: str, path: Path) -> set[str]:
    """The fastattn modules ``name`` imports; ``from fastattn import nn`` is the module
    ``fastattn.nn``, not the package's ``__init__``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in KNOWN:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_imports_go_down_only():
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m, targets in GRAPH.items() for t in targets if _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    # The package __init__ imports its submodules, which import each other: only the
    # edges between modules count, not those into the package API ("fastattn").
    graph = {m: {t for t in ts if t != "fastattn"} for m, ts in GRAPH.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_python_file_over_500_lines():
    """Kernel files hold one family each (forward, backward, launchers; STYLE.md), so
    they may run longer; every other file stays readable in one sitting."""
    long = [f"{p.relative_to(ROOT)}: {n}" for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > 500 and p.parent.name != "kernels"]
    assert not long, long
