"""Filesystem helpers: atomic writes and output paths that cannot escape their directory."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from cryopick.errors import CryopickError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Readers never see a half-written file: an interrupted write leaves at most a hidden
    ``.tmp`` file, which is removed on exceptions (Ctrl-C included).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are shared on clusters
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_torch_atomic(path: str | Path, obj: Any) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def safe_join(root: str | Path, relative: str | Path) -> Path:
    """Join ``relative`` under ``root`` and refuse results outside ``root`` (``..``, absolute paths)."""
    root = Path(root).resolve()
    rel = Path(relative)
    if rel.is_absolute():
        rel = Path(*rel.parts[1:])
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        raise CryopickError(f"refusing to write {relative}: the path leaves the output directory {root}")
    return target
