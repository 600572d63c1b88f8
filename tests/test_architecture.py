"""The layering ARCHITECTURE.md describes, checked on the source: every import points down, there
are no import cycles, and nothing imports the phase folders under a global name."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# lowest first; a module may import its own layer's package and any layer ranked below it.
# extract and the adapt core share a rank: neither may import the other.
LAYERS = {
    "common": 0,
    "cache": 1,
    "extract": 2,
    "adapt": 2,
    "adapt.tuning": 3,
    "evaluate": 4,
    "serve": 5,
    "api": 6,
    "cli": 6,
    "": 7,  # the package root (medembed/__init__)
}
SOURCE_DIRS = ("common", "cache", "extract", "adapt", "evaluate", "serve")
PHASES = ("common", "cache", "extract", "adapt", "evaluate", "serve")


def _source_files() -> list[Path]:
    files = [p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py")]
    return files + [REPO / "cli.py", REPO / "api.py", REPO / "__init__.py"]


def _module(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["medembed", *parts])


def _layer(module: str) -> str:
    name = module.removeprefix("medembed").lstrip(".")
    best = ""
    for layer in LAYERS:
        if layer and (name == layer or name.startswith(layer + ".")) and len(layer) > len(best):
            best = layer
    return best


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import of medembed in a file, top level and inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module == "medembed"]
    return [(line, m) for line, m in out if m == "medembed" or m.startswith("medembed.")]


def test_every_import_points_down_the_layers():
    wrong = []
    for path in _source_files():
        own = _layer(_module(path))
        for line, target in _imports(path):
            to = _layer(target)
            if to == own or LAYERS[to] < LAYERS[own]:
                continue
            wrong.append(f"{path.relative_to(REPO)}:{line}: {own or 'medembed'} imports {target} ({to or 'medembed'})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_import_cycles():
    modules = {_module(p): p for p in _source_files()}
    graph = {m: {t for _, t in _imports(p)} for m, p in modules.items()}

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    edges = {m: {r for t in ts if (r := resolve(t)) and r != m} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack + [m, n]
            if n not in state and (cycle := visit(n, stack + [m])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(modules):
        if m not in state and (cycle := visit(m, [])):
            pytest.fail("import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]):]))


def test_no_phase_is_imported_under_a_global_name():
    """Installed as medembed.*: a bare `import evaluate` would pick up another distribution's module."""
    files = [p for p in REPO.rglob("*.py") if ".venv" not in p.parts and "build" not in p.parts]
    bare = []
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            bare += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in names
                     if n.split(".")[0] in PHASES or n == "cli"]
    assert not bare, "\n".join(bare)


def test_the_layer_rule_catches_an_upward_import(tmp_path):
    """The check itself can fail: an adapt-core module importing a backbone is flagged."""
    fake = tmp_path / "probe.py"
    fake.write_text("from medembed.extract.backbones import create_backbone\n")
    (line, target), = _imports(fake)
    assert _layer("medembed.adapt.trainer") == "adapt" and _layer(target) == "extract"
    assert LAYERS[_layer(target)] >= LAYERS["adapt"] and _layer(target) != "adapt"
    assert _layer("medembed.adapt.tuning.unfreeze") == "adapt.tuning"


def test_every_source_package_is_installed():
    """`pip install .` ships exactly the packages pyproject.toml lists: a new subpackage must be listed."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"medembed", *(_module(p.parent / "__init__.py") for d in SOURCE_DIRS
                           for p in (REPO / d).rglob("__init__.py"))}
    assert found == listed, f"missing from pyproject: {found - listed}; listed but absent: {listed - found}"


def test_the_command_line_fixes_the_allocator_threshold_where_glibc_runs_it():
    """cli.py's start-up setting (common.memory) is applied on glibc, where the fragmentation it
    prevents happens, and is a harmless no-op elsewhere."""
    import platform

    from medembed.common.memory import release_large_blocks

    assert release_large_blocks() is (platform.libc_ver()[0] == "glibc")


def test_serving_never_imports_the_eval_pipeline():
    """Serving a run (search, the page, index, export, explanation maps) shares with scoring only what
    lies below both; it never reaches into the eval pipeline or its report."""
    wrong = []
    for path in (REPO / "serve").rglob("*.py"):
        for line, target in _imports(path):
            if target.startswith(("medembed.evaluate.pipeline", "medembed.evaluate.report")):
                wrong.append(f"{path.relative_to(REPO)}:{line}: imports {target}")
    assert not wrong, "\n".join(wrong)
