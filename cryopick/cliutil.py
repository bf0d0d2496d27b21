"""Command-line plumbing: option helpers, renamed options, one-line errors and exit codes."""

from __future__ import annotations

import functools
import os
import signal
import threading
from typing import Callable

import typer
from typer.core import TyperCommand, TyperGroup

from cryopick.errors import CryopickError


def renamed_option(value, old_value, name: str, old_name: str):
    """The value of an option renamed in this version, given by its new or (hidden) old name."""
    if value is not None and old_value is not None:
        raise CryopickError(f"give {name} or its old name {old_name}, not both")
    return value if value is not None else old_value


def flag(*names: str, help: str) -> bool:
    """An on/off option shown as a flag (no value) in --help."""
    return typer.Option(False, *names, help=help, metavar="")


def default(cls: type, key: str) -> str:
    """`` [default: X]`` for --help, read from the config dataclass (the one source of defaults)."""
    from rich.markup import escape

    value = cls()
    for part in key.split("."):
        value = getattr(value, part)
    if value is None:
        return ""
    if isinstance(value, bool):
        value = "on" if value else "off"
    return " " + escape(f"[default: {value}]")


QUIET = flag("--quiet", "-q", help="No progress bars or info lines (warnings and errors still print).")


def user_errors(func: Callable) -> Callable:
    """Turn CryopickError into one line on stderr and exit 1; Ctrl-C into exit 130. Never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from rich.markup import escape

        from cryopick.progress import console

        previous = _terminate_as_interrupt()
        try:
            return func(*args, **kwargs)
        except CryopickError as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            console.print("[red]interrupted[/red]")
            raise typer.Exit(130)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except OSError as exc:  # the file system refused (permissions, full disk, a directory for a file)
            where = f"{exc.filename}: " if exc.filename else ""
            console.print(f"[red]error:[/red] {escape(where + (exc.strerror or str(exc)))}", highlight=False)
            raise typer.Exit(1)
        except Exception as exc:  # a bug, not bad input: still one line, the traceback on request
            if _TERMINATED.is_set():  # SIGTERM inside a library's import or C code can surface as any exception
                console.print("[red]interrupted[/red]")
                raise typer.Exit(130)
            if os.environ.get("CRYOPICK_DEBUG"):
                raise
            console.print(f"[red]internal error:[/red] {type(exc).__name__}: {exc} "
                          "(please report it; set CRYOPICK_DEBUG=1 for the traceback)", highlight=False)
            raise typer.Exit(2)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


_TERMINATED = threading.Event()


def _terminate_as_interrupt():
    """SIGTERM (cluster schedulers, kill) unwinds like Ctrl-C, so partial outputs are cleaned up."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        _TERMINATED.set()
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


class Command(TyperCommand):
    """Typer's command whose --help shows no value placeholder (click ≥ 8.3 renders one as '<bool>')."""

    def get_help_option(self, ctx):
        return _without_metavar(super().get_help_option(ctx))


class Group(TyperGroup):
    """Typer's group whose --help shows no value placeholder (see ``Command``)."""

    def get_help_option(self, ctx):
        return _without_metavar(super().get_help_option(ctx))


def _without_metavar(option):
    if option is not None:
        option.metavar = ""
    return option
