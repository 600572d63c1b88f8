"""The layering ARCHITECTURE.md describes, checked on the source: every import points down, there
are no import cycles, and nothing imports the phase folders under a global name."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# lowest first; a module may import its own layer's package and any layer ranked below it.
# Layers that share a rank never see each other: extract and the adapt core, evaluate and serve.
LAYERS = {
    "common": 0,
    "cache": 1,
    "extract": 2,
    "adapt": 2,
    "adapt.tuning": 3,
    "model": 4,
    "evaluate": 5,
    "serve": 5,
    "api": 6,
    "cli": 6,
    "": 7,  # the package root (medembed/__init__)
}
SOURCE_DIRS = ("common", "cache", "extract", "adapt", "model", "evaluate", "serve")
PHASES = ("common", "cache", "extract", "adapt", "model", "evaluate", "serve")


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


def _package(path: Path, module: str) -> str:
    """The package a relative import in this file starts from: the module itself for an __init__."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _imports(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """(line, imported module) of every import of medembed in a file, top level and inside functions.
    A relative import (`from . import x`, `from ..evaluate import y`) is resolved against the file's
    package (`module`: the file's dotted name, by default from its place in the repository)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module == "medembed"]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            parts = _package(path, module or _module(path)).split(".")
            base = ".".join(parts[: len(parts) - (node.level - 1)])
            if node.module:
                out.append((node.lineno, f"{base}.{node.module}"))
            else:  # `from . import x`: each name is a module (or attribute) of the package
                out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return [(line, m) for line, m in out if m == "medembed" or m.startswith("medembed.")]


def _imports_against_the_layers(path: Path, module: str | None = None) -> list[str]:
    """Each import of the file that does not point down: to its own layer or one ranked below."""
    module = module or _module(path)
    own = _layer(module)
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    wrong = []
    for line, target in _imports(path, module):
        to = _layer(target)
        if to == own or LAYERS[to] < LAYERS[own]:
            continue
        wrong.append(f"{where}:{line}: {own or 'medembed'} imports {target} ({to or 'medembed'})")
    return wrong


def test_every_import_points_down_the_layers():
    wrong = [w for path in _source_files() for w in _imports_against_the_layers(path)]
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
    (wrong,) = _imports_against_the_layers(fake, "medembed.adapt.trainer")
    assert "imports medembed.extract.backbones (extract)" in wrong


def test_the_layer_rule_catches_a_relative_upward_import(tmp_path):
    """Relative imports are resolved against the importing module's package and checked like absolute
    ones: a serve module reaching beside itself into evaluate is flagged, its own package is not."""
    fake = tmp_path / "probe.py"
    fake.write_text("from . import search\nfrom .pool import SearchPool\n\n\ndef grid():\n"
                    "    from ..evaluate.plots import recall_curves\n    from .. import evaluate\n")
    assert sorted(t for _, t in _imports(fake, "medembed.serve.probe")) == [
        "medembed.evaluate", "medembed.evaluate.plots", "medembed.serve.pool", "medembed.serve.search"]
    wrong = _imports_against_the_layers(fake, "medembed.serve.probe")
    assert sorted(w.split(": ", 1)[1] for w in wrong) == ["serve imports medembed.evaluate (evaluate)",
                                                         "serve imports medembed.evaluate.plots (evaluate)"]
    init = tmp_path / "__init__.py"  # a package's __init__ resolves `.` to the package itself
    init.write_text("from .search import Searcher\nfrom ..model import runs\n")
    assert [t for _, t in _imports(init, "medembed.serve")] == ["medembed.serve.search", "medembed.model"]
    assert not _imports_against_the_layers(init, "medembed.serve")


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


def _reaches_into(target: str, layer: str) -> bool:
    return target == f"medembed.{layer}" or target.startswith(f"medembed.{layer}.")


def test_serving_and_evaluation_never_import_each_other():
    """Serving a run (search, the page, index, export, explanation maps) and scoring it share only what
    lies below both (`model`, the ranking math); neither imports anything of the other."""
    wrong = []
    for layer, other in (("serve", "evaluate"), ("evaluate", "serve")):
        for path in (REPO / layer).rglob("*.py"):
            wrong += [f"{path.relative_to(REPO)}:{line}: imports {target}" for line, target in _imports(path)
                      if _reaches_into(target, other)]
    assert not wrong, "\n".join(wrong)


def test_tuning_evaluation_and_serving_never_name_a_backbone_family(tmp_path):
    """What differs between backbone families (unlocking, checkpointing, cached tops, saliency maps,
    the portable tokenizer) is asked of the family record (`BackboneFamily`), so adding a family
    touches no generic code: adapt/, evaluate/, model/ and serve/ import no family module and use no
    library-specific name. The check itself flags such an import."""
    family_modules = {_module(p) for p in (REPO / "extract" / "backbones").glob("*.py")
                      if any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "FAMILY" for t in n.targets)
                             for n in ast.parse(p.read_text()).body)}
    library_names = ("open_clip", "openclip", "effnet", "efficientnet", "minilm", "resblocks", "lock_image_tower",
                     "lock_text_tower", "set_grad_checkpointing", "backend_tokenizer", "hftokenize")

    def family_specifics(path: Path) -> list[str]:
        found = [f"{line}: imports {target}" for line, target in _imports(path)
                 if any(target == m or target.startswith(m + ".") for m in family_modules)]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [getattr(node, a, None) for a in ("attr", "id", "name", "asname", "module")]
            found += [f"{getattr(node, 'lineno', '?')}: names {n}" for n in names
                      if isinstance(n, str) and any(token in n.lower() for token in library_names)]
        return found

    assert {"medembed.extract.backbones.effnet_minilm", "medembed.extract.backbones.open_clip_family"} <= family_modules
    generic = [p for d in ("adapt", "evaluate", "model", "serve") if (REPO / d).is_dir() for p in (REPO / d).rglob("*.py")]
    wrong = [f"{p.relative_to(REPO)}:{hit}" for p in generic for hit in family_specifics(p)]
    assert not wrong, "family specifics outside the family modules:\n" + "\n".join(wrong)
    probe = tmp_path / "probe.py"
    probe.write_text("from medembed.extract.backbones.open_clip_family import open_clip_model\n")
    assert family_specifics(probe)
