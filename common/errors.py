"""The one base of the errors medembed raises for input or state a user can fix.

Each names the file, line, flag or folder and what to do, in one line; the command line catches
this base in one place and prints that line, never a traceback. Beside it, it catches only the
operating system's refusals of a path the user named (FileNotFoundError, PermissionError,
IsADirectoryError, NotADirectoryError), whose message names the path; anything else, a plain
ValueError included, is a bug and keeps its traceback. Each subclass also derives from the
standard exception it is a kind of, so code that catches, say, ValueError keeps working.
"""
from __future__ import annotations


class MedembedError(Exception):
    """Bad input or state, explained in the message."""


class ToolError(MedembedError, RuntimeError):
    """A step that cannot go on with what it was given: an unreadable input met mid-way, a model
    that cannot be built, a missing optional library."""


class BadOption(MedembedError, ValueError):
    """A flag, argument or setting whose value cannot work: outside its range, not one of its
    choices, missing where it is required, or given with another flag that excludes it. Fixed on
    the command line alone."""


class NotFound(MedembedError, FileNotFoundError):
    """A file or folder that was named -- by the user, or by a run or cache that records it -- and
    is not there: a cache, a features folder, a split, a run's config or checkpoint."""


class AlreadyExists(MedembedError, FileExistsError):
    """An output path that already holds something this command would overwrite; the message says
    which flag replaces or continues it, or to choose another --out."""


class BadInput(MedembedError, ValueError):
    """A file that is there but cannot be used as what it was given as: the wrong kind of file,
    damaged or altered since it was written, or holding values that cannot be trusted."""


class Incompatible(MedembedError, ValueError):
    """Inputs and flags that are each sound but do not go together: a step asked of data that lacks
    what it needs (concept labels, captions, enough pairs), features that are not the ones a run was
    trained on, a resumed run given other settings."""


class BadRun(MedembedError, ValueError):
    """A run folder (or the checkpoint given for one) that cannot be used: a file where a run folder
    was expected, a config.json that another program wrote, heads that do not match their config, a
    finished run whose last checkpoint was removed."""
