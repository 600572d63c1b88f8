"""What a dataset may read: one rule for every reader, the extractor, the search page and fine-tuning.

A data folder is someone else's files. Whatever names a file or member there -- an annotations row, a
folder entry, a tar member, a link -- is a claim about where bytes are, and a hostile or careless one
can point anywhere: `../../etc/passwd` as a member name, a symlink to a JPEG in another user's home.
So a path is read only when it stays inside the data folder, judged on the resolved path (links
followed to where they lead), unless the user asked to follow links out of it (`--follow-links`,
recorded in the cache's provenance because it changes what is read). A link that stays inside the
folder is read like any file. Names that records are identified by never hold `..` or an absolute
part. Whatever is refused is counted with its reason (`Refusals`) and shown in the extract summary.
"""
from __future__ import annotations

import os
import re
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from medembed.cache import schema
from medembed.common.errors import MedembedError

LINK_OUTSIDE = "link outside the data folder (--follow-links reads it)"
OUTSIDE = "outside the data folder"
NOT_REGULAR = "not a regular file (a device, pipe or socket)"
FOLLOW_LINKS = "follow-links"  # the provenance value (`data_access`) of a cache read with --follow-links
MAX_EXAMPLES = 20  # refusals listed one by one in the summary (all are counted)


class OutsideDataFolder(MedembedError, PermissionError):
    """A location whose resolved path leaves the data folder; the message is the short reason."""


def _inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class DataAccess:
    """The rule for one data folder: `refusal(path)` says why a path may not be read (None: it may)."""

    root: str
    follow_links: bool = False
    _lexical: str = field(default="", init=False, repr=False, compare=False)
    _real: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_lexical", os.path.normpath(os.path.abspath(self.root)))
        object.__setattr__(self, "_real", os.path.realpath(self.root))

    @classmethod
    def of_cache(cls, attrs: dict, data_root: str) -> DataAccess | None:
        """The rule a cache was extracted under: its data folder, and whether links were followed. None
        for a cache that records no data folder (written before caches did: its locations are the
        absolute paths it was extracted from), which would otherwise be judged against the current
        folder and every image refused."""
        if not str(data_root or ""):
            return None
        return cls(data_root, follow_links=str(attrs.get(schema.DATA_ACCESS, "")) == FOLLOW_LINKS)

    def refusal(self, path: str) -> str | None:
        """Why `path` (a file or a container file) may not be read, or None when it may: its
        normalised path must lie in the folder, and, unless links are followed, so must its
        resolved one; and it must be a regular file (a pipe named x.jpg would block the reader)."""
        if not _inside(os.path.normpath(os.path.abspath(path)), self._lexical):
            return OUTSIDE
        if not self.follow_links and not _inside(os.path.realpath(path), self._real):
            return LINK_OUTSIDE
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return None  # missing: the reader reports it as such
        return None if stat.S_ISREG(mode) else NOT_REGULAR

    def check(self, path: str) -> None:
        """OutsideDataFolder with the reason when `path` may not be read."""
        why = self.refusal(path)
        if why is not None:
            raise OutsideDataFolder(why)

    def real_inside(self, path: str) -> bool:
        """Whether a resolved path lies in the folder (links inside it may be read)."""
        return _inside(os.path.realpath(path), self._real)


_DRIVE = re.compile(r"^[A-Za-z]:")


def name_problem(name: str) -> str | None:
    """Why a member or path name may not identify a record (None: it may): empty, absolute (a leading
    slash or backslash, a drive letter) or holding a `..` part, with either separator."""
    if not name or "\0" in name:
        return "unsafe name (empty or holding a NUL)"
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "unsafe name (an absolute path)"
    if ".." in re.split(r"[\\/]", name):
        return "unsafe name (a '..' part)"
    return None


@dataclass
class Refusals:
    """What a reader would not read, counted by reason, with the first few named (`where`: the path
    or member below the data folder)."""

    counts: Counter = field(default_factory=Counter)
    examples: list[tuple[str, str]] = field(default_factory=list)
    hide_names: bool = False  # the paths may identify patients: counted only, never named

    def add(self, where: str, reason: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append((where, reason))

    def __len__(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        """The summary's account: one line of counts by reason, then each named one."""
        if not self:
            return []
        by_reason = ", ".join(f"{n} {reason.split(' (', 1)[0]}" for reason, n in self.counts.most_common())
        out = [f"not read: {len(self)} ({by_reason})"]
        if self.hide_names:
            return [out[0] + "; their paths are not shown (they may identify patients; --readable-paths shows them)"]
        out += [f"not read: {where}: {reason}" for where, reason in self.examples]
        if len(self) > len(self.examples):
            out.append(f"... and {len(self) - len(self.examples)} more not read")
        return out


@dataclass(frozen=True)
class Entry:
    """A file met walking a data folder: its path, its path below the folder ("/"-separated), and
    why it may not be read (None: it may)."""

    path: str
    rel: str
    refusal: str | None = None


def walk(root: str, follow_links: bool = False, hidden: bool = True) -> Iterator[Entry]:
    """Every file under `root` in a stable order (a folder's files by name, then its subfolders by
    name, as `os.walk` gives them). A link to a file is given with its refusal when it leads outside;
    a link to a folder is entered only with `follow_links` and only when it leads outside (a folder it
    leads to inside is walked where it is), once per real folder, so a cycle ends; one leading outside
    without `follow_links` is given as a refused entry. `hidden`: whether names starting with "." count."""
    access = DataAccess(root, follow_links)
    seen = {os.path.realpath(root)}
    stack: list[tuple[str, str]] = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue  # an unreadable subfolder holds nothing we can list
        subfolders = []
        for e in entries:
            if not hidden and e.name.startswith("."):
                continue
            rel = f"{prefix}{e.name}"
            if e.is_symlink():
                try:
                    is_dir = e.is_dir()
                except OSError:
                    is_dir = False
                if is_dir:
                    real = os.path.realpath(e.path)
                    if access.real_inside(e.path) or real in seen:
                        continue  # walked where it leads (or already walked)
                    if follow_links:
                        seen.add(real)
                        subfolders.append((e.path, rel + "/"))
                    else:
                        yield Entry(e.path, rel, LINK_OUTSIDE)
                    continue
                yield Entry(e.path, rel, access.refusal(e.path))
            elif e.is_dir(follow_symlinks=False):
                seen.add(os.path.realpath(e.path))
                subfolders.append((e.path, rel + "/"))
            elif e.is_file(follow_symlinks=False):
                yield Entry(e.path, rel)
            else:
                yield Entry(e.path, rel, NOT_REGULAR)
        stack.extend(reversed(subfolders))
