"""The one base of the errors medembed raises for input or state a user can fix.

Each names the file, line, flag or folder and what to do, in one line; the command line catches
this base (with the standard ValueError / FileNotFoundError / FileExistsError that checks raise)
in one place and prints that line, never a traceback. Each subclass also derives from the
standard exception it is a kind of, so code that catches, say, ValueError keeps working.
"""
from __future__ import annotations


class MedembedError(Exception):
    """Bad input or state, explained in the message."""


class ToolError(MedembedError, RuntimeError):
    """A step that cannot go on with what it was given: an unreadable input met mid-way, a model
    that cannot be built, a missing optional library."""
