"""User-facing errors. The CLI prints their message (never a traceback) and exits non-zero."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class CryopickError(Exception):
    """An error the user can act on; the message says what is wrong and where."""


class InputFileError(CryopickError):
    """A specific input file is unusable; carries the path so runs can skip and list it."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@contextmanager
def naming(path: str | Path, within: str | Path | None = None) -> Iterator[None]:
    """CryopickErrors raised in the block name ``path`` in front, unless they already name ``within`` (default:
    ``path``) or a file under it: errors about a checkpoint's record or calibration, a manifest's entries."""
    try:
        yield
    except CryopickError as exc:
        if str(exc).startswith(str(within if within is not None else path)):
            raise
        raise CryopickError(f"{path}: {exc}") from None
