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


@contextlib.contextmanager
def run_lock(directory: str | Path, name: str = ".cryopick.lock") -> Iterator[None]:
    """One run at a time in ``directory``: a lock file holding host and pid, taken with O_EXCL. A lock left by
    a dead process on this host is taken over; one from another host is refused (its process cannot be
    checked from here), naming the file to remove."""
    import socket

    path = Path(directory) / name
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = path.read_text(errors="replace").split() if path.is_file() else []
            host, pid = (holder + ["?", "0"])[:2]
            if host == socket.gethostname() and not (pid.isdigit() and int(pid) > 0 and _pid_alive(int(pid))):
                path.unlink(missing_ok=True)  # left by a killed run
                continue
            raise CryopickError(f"{directory}: another run is using it ({host}, pid {pid}); wait for it, or remove "
                                f"{path} if no run is active") from None
        with os.fdopen(fd, "w") as handle:
            handle.write(me + "\n")
        break
    try:
        yield
    finally:
        if path.is_file() and path.read_text(errors="replace").strip() == me:
            path.unlink(missing_ok=True)


def load_torch_weights(path: str | Path, what: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code. A file that is
    not that is a CryopickError ``<path>: not a readable <what> (<why>)``."""
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's notes on pickle protocols mean nothing to users
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt, foreign or unsafe files
        raise CryopickError(f"{path}: not a readable {what} ({_load_failure(path, exc, pickle.UnpicklingError)})"
                            ) from None


def _load_failure(path: str | Path, exc: Exception, unpickling_error: type) -> str:
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # neither torch's zip nor a pickle: e.g. an MRC or a text file
        return "not a PyTorch file"
    text = str(exc).strip()
    if "Weights only load failed" in text:
        return "it holds Python objects, not only tensors; cryopick loads weights only, never code"
    if isinstance(exc, (KeyError, unpickling_error)) or "invalid load key" in text:
        return "not a PyTorch file"
    if "central directory" in text or "zip archive" in text:
        return "truncated or damaged: its zip archive is incomplete"
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= 200 else first[:first.rfind(" ", 0, 200)] + " …"


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


# ---------------------------------------------------------------------------------------------
# replacing a whole output directory: build the new one beside it, swap only when complete

STAGING_TAG = ".cryopick-new-"
RETIRED_TAG = ".cryopick-old-"


def check_output_dir(path: str | Path, option: str) -> Path:
    """Refuse, in one line, an output directory that is a file or cannot be created or written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CryopickError(f"{option} {path}: exists and is not a directory")
    parent = path if path.is_dir() else _existing_ancestor(path)
    if not parent.is_dir():
        raise CryopickError(f"{option} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CryopickError(f"{option} {path}: no permission to write in {parent}")
    return path


def check_output_file(path: str | Path, option: str) -> Path:
    """Refuse an output file path that is a directory or whose directory cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise CryopickError(f"{option} {path}: is a directory; give a file name")
    check_output_dir(path.parent if str(path.parent) else Path("."), option)
    return path


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_replaced_dir(target: str | Path) -> None:
    """Undo what a killed swap or build left beside ``target``: restore a retired copy when the target is
    missing, and remove staging/retired directories of processes that are no longer running."""
    import shutil

    target = Path(target).resolve()
    if not target.parent.is_dir():
        return
    for tag in (RETIRED_TAG, STAGING_TAG):
        for path in sorted(target.parent.glob(f".{target.name}{tag}*")):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
                continue
            if tag == RETIRED_TAG and not target.exists():
                os.replace(path, target)  # killed between the two renames of a swap
            else:
                shutil.rmtree(path, ignore_errors=True)


def new_staging_dir(target: str | Path) -> Path:
    """An empty hidden sibling of ``target`` to build its replacement in (leftovers of killed runs removed)."""
    import shutil

    target = Path(target).resolve()  # "." has no name to put a sibling beside
    recover_replaced_dir(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}{STAGING_TAG}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def discard_dir(path: str | Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty sibling directory; when the block succeeds it replaces ``target`` (old contents
    removed), when it fails or is interrupted it is deleted and ``target`` is left exactly as it was."""
    staging = new_staging_dir(target)
    try:
        yield staging
        swap_in(staging, Path(target))
    except BaseException:
        discard_dir(staging)
        raise


def swap_in(new: Path, target: Path) -> None:
    """Put directory ``new`` at ``target``; an existing ``target`` is retired first and then removed."""
    import shutil

    target = Path(target).resolve()
    retired = None
    if target.exists():
        retired = target.parent / f".{target.name}{RETIRED_TAG}{os.getpid()}"
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(target, retired)
    os.replace(new, target)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
