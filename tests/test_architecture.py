"""The shape of the code, as docs/ARCHITECTURE.md draws it: the layers of pyproject.toml's import-linter contracts
hold on the package as installed (d2v.kernels and d2v.bench come from kernels/ and bench/), no import cycle among
d2v's modules counting every import (inside functions too), no module imports another's _private name, every
function body fits on a screen, and the architecture document lists the layers and modules the code has."""
import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"d2v": ROOT / "d2v", "d2v.kernels": ROOT / "kernels", "d2v.bench": ROOT / "bench"}
MAX_BODY_LINES = 100
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def modules() -> dict[str, Path]:
    """Module name -> source file of every Python module of the installed package."""
    out = {}
    for package, root in SOURCES.items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "d2v" and parts and parts[0] in ("kernels", "bench"):
                continue
            out[".".join([package, *parts])] = path
    return out


MODULES = modules()


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package as pip installs it (pure Python), in a folder of its own."""
    target = tmp_path_factory.mktemp("site")
    env = {**os.environ, "D2V_BUILD_EXT": "0"}
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(ROOT)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return target


def test_the_layer_contracts_hold(installed, tmp_path):
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(installed)}
    proc = subprocess.run([str(lint), str(ROOT / "pyproject.toml")], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "BROKEN" not in proc.stdout


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module of a `from X import ...` statement in `module`."""
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def imports_of(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) of every import statement of a module, anywhere in it."""
    tree = ast.parse(MODULES[module].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                out.append((sub, None, node.lineno) if sub in MODULES else (source, alias.name, node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    """module -> the d2v modules it imports (the nearest existing module of a dotted import)."""
    edges = {}
    for module in MODULES:
        targets = set()
        for name, _, _ in imports_of(module):
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module and name.startswith("d2v"):
                targets.add(name)
        edges[module] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_counting_every_import():
    edges = graph()
    # a package's __init__ importing its own modules is how a package presents itself, not a cycle to remove
    edges = {m: {t for t in ts if not (MODULES[m].name == "__init__.py" and t.startswith(m + "."))} for m, ts in
             edges.items()}
    assert cycles(edges) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(module: str) -> list[str]:
    """'module:line name' for each _private name of another d2v module that `module` imports or reads."""
    found = []
    tree = ast.parse(MODULES[module].read_text())
    aliases = {}  # local name -> d2v module it is bound to
    for imported, name, line in imports_of(module):
        if name is not None and imported.startswith("d2v") and imported != module and _private(name):
            found.append(f"{module}:{line} {imported}.{name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES and alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and aliases[node.value.id] != module and _private(node.attr)):
            found.append(f"{module}:{node.lineno} {aliases[node.value.id]}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    assert [use for module in MODULES for use in private_uses(module)] == []


def long_functions() -> list[str]:
    out = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.end_lineno - node.body[0].lineno + 1
                if body > MAX_BODY_LINES:
                    out.append(f"{module}.{node.name} ({body} lines)")
    return out


def test_every_function_body_fits_on_a_screen():
    assert long_functions() == []


def test_the_architecture_document_matches_the_code():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = re.search(r"## Layers\n.*?```\n(.*?)```", doc, re.S)
    assert block, "docs/ARCHITECTURE.md has no ## Layers section with a code block"
    drawn = [re.sub(r"\s+#.*", "", line).strip() for line in block.group(1).splitlines()]
    drawn = [" | ".join(part.strip() for part in line.split("|")) for line in drawn if line]
    contract = next(c for c in CONFIG["contracts"] if c["type"] == "layers")
    assert drawn == [" | ".join(p.strip() for p in layer.split("|")) for layer in contract["layers"]]
    for module in MODULES:  # every module of the package by name; kernels/ and bench/ as wholes
        if module in ("d2v", "d2v.__main__") or module.startswith(("d2v.kernels.", "d2v.bench.")):
            continue
        name = module.rsplit(".", 1)[1]
        assert re.search(rf"\b{name}\b", doc), f"docs/ARCHITECTURE.md does not mention {module}"
