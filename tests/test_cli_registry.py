"""Every choice and default the command line offers comes from one home: a choice list from the registry
beside the code that implements it, a default from the command's config dataclass (or the one constant
its config reads), so the command line, the Python API and the page cannot drift apart."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import click
import pytest

from medembed import api
from medembed.adapt.compact import CompactOptions
from medembed.adapt.config import AUGMENT_KINDS, HEAD_KINDS, LOSS_KINDS, AdaptConfig
from medembed.cli import main
from medembed.common.device import DEVICES
from medembed.common.planning import DEFAULT_MAX_MEMORY_GB
from medembed.evaluate.listing import SORT_KEYS, ListingOptions
from medembed.evaluate.plan import EVAL_SPLIT, EvalOptions
from medembed.evaluate.sweep import SweepOptions
from medembed.extract.backbones.onnx_runtime import DEFAULT_RUNTIME, RUNTIMES
from medembed.extract.datasets.mimic_cxr import REPORT_SECTIONS
from medembed.extract.distributed import DEFAULT_ENGINE, ENGINES
from medembed.extract.extraction import DEFAULT_FEATURES_ROOT, FEATURE_DTYPES, ExtractConfig
from medembed.serve.export import EXPORT_DTYPES, EXPORT_FORMATS, ROW_KINDS, ExportOptions
from medembed.serve.index import INDEX_ENGINES, IndexOptions
from medembed.serve.index_plan import KIND_CHOICES
from medembed.serve.page import ServeOptions
from medembed.serve.page_requests import search_args
from medembed.serve.search import Searcher, SearchOptions, search

CLI = Path(__file__).resolve().parents[1] / "cli.py"
APP_JS = Path(__file__).resolve().parents[1] / "serve" / "static" / "app.js"

# (command, parameter) -> the registry its choices must equal
CHOICES = {
    ("extract", "device"): DEVICES,
    ("extract", "dtype"): FEATURE_DTYPES,
    ("extract", "runtime"): RUNTIMES,
    ("extract", "report_sections"): REPORT_SECTIONS,
    ("extract", "engine"): ENGINES,
    ("adapt", "loss"): LOSS_KINDS,
    ("adapt", "head"): HEAD_KINDS,
    ("adapt", "augment"): AUGMENT_KINDS,
    ("adapt", "device"): DEVICES,
    ("search", "runtime"): RUNTIMES,
    ("serve", "runtime"): RUNTIMES,
    ("runs", "sort_key"): SORT_KEYS,
    ("index", "kind"): KIND_CHOICES,
    ("index", "engine"): INDEX_ENGINES,
    ("export", "fmt"): EXPORT_FORMATS,
    ("export", "rows"): ROW_KINDS,
    ("export", "dtype"): EXPORT_DTYPES,
}

SEARCH, SERVE = SearchOptions(), ServeOptions()
ADAPT = AdaptConfig(features_dir="features/x", out="runs/x")
# (command, parameter) -> the config value its default must equal
DEFAULTS = {
    ("extract", "out"): ExtractConfig().out,
    ("extract", "runtime"): ExtractConfig().runtime,
    ("extract", "device"): ExtractConfig().device,
    ("extract", "engine"): DEFAULT_ENGINE,
    ("extract", "max_memory_gb"): ExtractConfig().max_memory_gb,
    ("adapt", "device"): ADAPT.device,
    ("adapt", "max_memory_gb"): ADAPT.max_memory_gb,
    ("compact", "dims"): CompactOptions().dims,
    ("eval", "split"): EVAL_SPLIT,
    ("eval", "features_root"): EvalOptions().features_root,
    ("eval", "max_memory_gb"): EvalOptions().max_memory_gb,
    ("search", "k"): SEARCH.k,
    ("search", "features_root"): SEARCH.features_root,
    ("search", "runtime"): SEARCH.runtime,
    ("search", "max_memory_gb"): SEARCH.max_memory_gb,
    ("serve", "use_index"): SEARCH.use_index,
    ("serve", "features_root"): SEARCH.features_root,
    ("serve", "runtime"): SEARCH.runtime,
    ("serve", "max_memory_gb"): SEARCH.max_memory_gb,
    ("serve", "host"): SERVE.host,
    ("serve", "port"): SERVE.port,
    ("runs", "folder"): ListingOptions().folder,
    ("runs", "sort_key"): ListingOptions().sort,
    ("sweep", "seeds"): SweepOptions().seeds,
    ("index", "features_root"): IndexOptions().features_root,
    ("index", "engine"): IndexOptions().engine,
    ("export", "features_root"): ExportOptions().features_root,
}


def _commands(group: click.Group, prefix: str = ""):
    for name, cmd in group.commands.items():
        yield f"{prefix}{name}", cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, f"{prefix}{name} ")


def _param(command: str, name: str) -> tuple[click.Command, click.Parameter]:
    cmd = main.commands[command]
    return cmd, next(p for p in cmd.params if p.name == name)


def test_every_choice_is_its_registry():
    found = {}
    for path, cmd in _commands(main):
        for p in cmd.params:
            if isinstance(p.type, click.Choice):
                found[(path, p.name)] = tuple(p.type.choices)
    unlisted = sorted(set(found) - set(CHOICES))
    assert not unlisted, f"choices with no registry in this test's table: {unlisted}"
    assert {key: found.get(key) for key in CHOICES} == {key: tuple(reg) for key, reg in CHOICES.items()}


@pytest.mark.parametrize(("command", "name"), sorted(DEFAULTS))
def test_each_default_is_its_configs(command, name):
    cmd, param = _param(command, name)
    assert param.get_default(click.Context(cmd)) == DEFAULTS[(command, name)]


def _click_calls(tree: ast.AST):
    """Every call of click.option / click.argument / an option helper in cli.py."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("option", "argument", "_adapt_option"):
                yield node


def test_no_option_default_or_choice_list_is_a_literal():
    """A default or choice list restated in cli.py drifts from what Python callers get and what the code
    accepts: every one is read from its home."""
    tree = ast.parse(CLI.read_text())
    literals = []
    for call in _click_calls(tree):
        for kw in call.keywords:
            if kw.arg == "default" and isinstance(kw.value, ast.Constant) and kw.value.value is not None:
                literals.append(f"cli.py:{call.lineno}: default={kw.value.value!r}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "Choice"
                and any(isinstance(a, (ast.List, ast.Tuple)) for a in node.args)):
            literals.append(f"cli.py:{node.lineno}: a literal click.Choice list")
    assert not literals, "\n".join(literals)


def _default(fn, name: str):
    return inspect.signature(fn).parameters[name].default


def test_search_k_is_one_default_for_the_command_line_the_api_and_the_page():
    cmd, k = _param("search", "k")
    page_k = _default(search_args, "k").default  # FastAPI's Query(default, ...)
    assert k.get_default(click.Context(cmd)) == SEARCH.k == _default(api.search, "k") == _default(search, "k") == page_k
    assert SEARCH.k == 9  # the 3x3 grid `search --out` draws
    js = APP_JS.read_text()
    assert "perPage: null" in js and "state.perPage = info.k;" in js  # the page asks /api/info (test_serve)


def test_shared_defaults_are_one_constant():
    roots = {ExtractConfig().out, SEARCH.features_root, IndexOptions().features_root, ExportOptions().features_root,
             EvalOptions().features_root, _default(Searcher, "features_root"), _default(search, "features_root")}
    assert roots == {DEFAULT_FEATURES_ROOT}
    budgets = {ExtractConfig().max_memory_gb, ADAPT.max_memory_gb, EvalOptions().max_memory_gb,
               SEARCH.max_memory_gb, _default(Searcher, "max_memory_gb"), _default(search, "max_memory_gb")}
    assert budgets == {DEFAULT_MAX_MEMORY_GB}
    runtimes = {ExtractConfig().runtime, SEARCH.runtime, _default(Searcher, "runtime"), _default(search, "runtime")}
    assert runtimes == {DEFAULT_RUNTIME} and DEFAULT_RUNTIME in RUNTIMES
    assert _default(api.evaluate_run, "split") == EVAL_SPLIT
