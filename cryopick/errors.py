"""User-facing errors. The CLI prints their message (never a traceback) and exits non-zero."""

from __future__ import annotations

from pathlib import Path


class CryopickError(Exception):
    """An error the user can act on; the message says what is wrong and where."""


class InputFileError(CryopickError):
    """A specific input file is unusable; carries the path so runs can skip and list it."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")
