"""The marker files by which ``cryopick pick`` owns its output directory, and the names of its run-level files.

Kept apart from ``cryopick.io.outputs`` (which writes them) so that readers of coordinates can recognise a pick
output directory and read its per-micrograph coordinate files only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cryopick.errors import CryopickError

MARKER_NAME = ".cryopick_pick.json"
MARKER_GLOB = ".cryopick_pick*.json"
CONFIG_NAME = "pick_config.yaml"


@dataclass(frozen=True)
class ListFiles:
    """Names of the run-level files in the output directory."""

    suffix: str

    @property
    def coords_suffix(self) -> str:
        return f"coords_suffix_{self.suffix}.star"

    @property
    def coordinate_list(self) -> str:
        return f"coordinates_{self.suffix}.star"

    @property
    def micrographs(self) -> str:
        return f"micrographs_{self.suffix}.star"

    @property
    def topaz(self) -> str:
        return f"topaz_{self.suffix}.txt"

    @property
    def particles(self) -> str:
        return f"particles_{self.suffix}.star"

    @property
    def cryosparc(self) -> str:
        return f"particles_{self.suffix}.cs"

    def all(self) -> list[str]:
        return [self.coords_suffix, self.coordinate_list, self.micrographs, self.topaz, self.particles,
                self.cryosparc, CONFIG_NAME]


def marked_coordinate_files(directory: Path) -> list[Path] | None:
    """The per-micrograph coordinate STARs of a ``cryopick pick`` output directory, as its markers list them
    (the list files, particles and box copies left out); None for a directory without markers."""
    markers = sorted(directory.glob(MARKER_GLOB))
    if not markers:
        return None
    files: set[str] = set()
    run_level: set[str] = set()
    for marker in markers:
        names, producer = read_marker(marker)
        files |= names
        suffix = (producer or {}).get("settings", {}).get("suffix", "cryopick")
        run_level |= set(ListFiles(str(suffix)).all())
    return sorted(directory / name for name in files
                  if name.endswith(".star") and name not in run_level and (directory / name).is_file())


def read_marker(path: Path) -> tuple[set[str], dict | None]:
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise TypeError("files is not a list of names")
        producer = data.get("produced_by")
        if producer is not None and not isinstance(producer, dict):
            raise TypeError("produced_by is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CryopickError(f"{path}: damaged cryopick pick marker ({exc}); remove it to continue") from None
    return set(files), producer
