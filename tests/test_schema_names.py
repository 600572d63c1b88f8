"""The names a cache file and a ranking's numbers are known by each have one home, checked on the
source: a split or shard file is named by `cache.schema` (`split_file`, `shard_file`, ...), a recall
number by `common.recall_keys` (`recall_key`, `MEAN_RECALL`, `DEFAULT_KS`). Anywhere else, spelling
`{split}.h5` or `{d}_R@{k}` again would let two places drift apart on what they read and write.
Tests keep their literals: they assert the format on disk."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("common", "cache", "extract", "adapt", "model", "evaluate", "serve", "benchmarks")
SCHEMA = Path("cache/schema.py")
RECALL_KEYS = Path("common/recall_keys.py")

FILE_NAME = re.compile(r"^[\w*.-]*\.h5$")  # a whole string that is a cache file's name or glob: "test.h5", "*.h5"
IN_TEXT = re.compile(r"\.h5\b|\.shard-")  # a cache file's name inside a message or path being built
RECALL_NAME = re.compile(r"^(t2i|i2t)_R@|^mean_recall$")


def _python_files(root: Path) -> list[Path]:
    files = [p for d in SOURCE_DIRS for p in (root / d).rglob("*.py")]
    return files + [p for p in (root / "cli.py", root / "api.py") if p.exists()]


def _strings(tree: ast.AST):
    """(line, text, inside an f-string) of every string constant; an f-string's pieces and the strings
    of the expressions inside it (`f"{test['t2i_R@10']}"`) count as inside it."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            inside.update(id(n) for n in ast.walk(node) if isinstance(n, ast.Constant))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value, id(node) in inside


def _scan(root: Path, home: Path, found) -> list[str]:
    """`path:line: what` of everything `found(tree)` yields (line, what) in every module but `home`."""
    out = []
    for path in _python_files(root):
        rel = path.relative_to(root)
        if rel != home:
            out += [f"{rel}:{line}: {what}" for line, what in found(ast.parse(path.read_text(), filename=str(path)))]
    return out


def _file_names(tree: ast.AST):
    for line, text, in_f in _strings(tree):
        if (in_f and IN_TEXT.search(text)) or FILE_NAME.match(text):
            yield line, repr(text)


def _recall_names(tree: ast.AST):
    for line, text, in_f in _strings(tree):
        if (in_f and "_R@" in text) or RECALL_NAME.match(text):
            yield line, repr(text)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List)) and [getattr(e, "value", None) for e in node.elts] == [1, 5, 10]:
            yield node.lineno, "the default Ks (1, 5, 10)"


def cache_file_names(root: Path = REPO) -> list[str]:
    """Where a module other than cache/schema.py spells a cache file's name: an f-string holding `.h5`
    or `.shard-` (`f"{split}.h5"`, `f"no {split}.h5 (found ..."`), or a string that is a file name or glob
    ending in `.h5`."""
    return _scan(root, SCHEMA, _file_names)


def recall_names(root: Path = REPO) -> list[str]:
    """Where a module other than common/recall_keys.py spells a recall number's name: `_R@` anywhere in
    an f-string, a string that is one (`"t2i_R@10"`, `"mean_recall"`), or the default Ks as a literal
    `(1, 5, 10)`."""
    return _scan(root, RECALL_KEYS, _recall_names)


def test_cache_file_names_are_spelled_in_the_schema_only():
    assert cache_file_names() == [], "name cache files with cache.schema (split_file, shard_file, FILE_GLOB, ...)"


def test_recall_names_are_spelled_in_recall_keys_only():
    assert recall_names() == [], "name recall numbers with common.recall_keys (recall_key, MEAN_RECALL, DEFAULT_KS)"


def _tree(tmp_path: Path, module: str, source: str) -> Path:
    (tmp_path / module).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / module).write_text(source)
    return tmp_path


def test_the_scan_finds_a_split_file_named_again(tmp_path):
    root = _tree(tmp_path, "serve/x.py", 'def f(d, split):\n    """Reads `{split}.h5`."""\n    return d / f"{split}.h5"\n')
    assert cache_file_names(root) == ["serve/x.py:3: '.h5'"]
    for line in ('raise ValueError(f"{d}: no {split}.h5 (found: x)")', 'return d / "train.h5"',
                 'return d.glob("*.h5")', 'return f"{split}.shard-{i:04d}-of-{n:04d}.h5"'):
        root = _tree(tmp_path, "evaluate/y.py", f"def f(d, split, i, n):\n    {line}\n")
        assert [x for x in cache_file_names(root) if x.startswith("evaluate/")], line
    _tree(tmp_path, "cache/schema.py", 'def split_file(split):\n    return f"{split}.h5"\n')
    assert not [x for x in cache_file_names(root) if x.startswith("cache/")]


def test_the_scan_finds_a_recall_name_spelled_again(tmp_path):
    for line in ('return {f"{d}_R@{k}": 1 for d in ("t2i", "i2t") for k in ks}',
                 "return f\"R@10 {row['t2i_R@10']:.1f}\"", 'return row["mean_recall"]', 'return row["i2t_R@5"]',
                 "return (1, 5, 10)"):
        root = _tree(tmp_path, "adapt/x.py", f"def f(row, ks):\n    {line}\n")
        assert [x for x in recall_names(root) if x.startswith("adapt/")], line
    root = _tree(tmp_path, "adapt/x.py", 'def f(row):\n    """Early stopping keeps the best `mean_recall`."""\n    return row\n')
    assert recall_names(root) == []
    _tree(tmp_path, "common/recall_keys.py", 'DEFAULT_KS = (1, 5, 10)\n\ndef recall_key(d, k):\n    return f"{d}_R@{k}"\n')
    assert recall_names(root) == []
