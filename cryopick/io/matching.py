"""Which micrograph a coordinate table belongs to, by name, robust to the ways tools rename files.

A name matches a micrograph when, in this order: the paths are equal; the stems are equal; or the name's stem
is the micrograph stem + ``_`` + a picker suffix (``_autopick``, ``_manualpick``, ``_topazpicks`` …), the
longest micrograph stem winning so ``mic_1`` never takes ``mic_10``'s picks. Directories are ignored except
to choose between micrographs that share a stem. Case is ignored only when nothing matches with it. Last,
cryoSPARC's import id (``012345678901234567_mic001_patch_aligned_doseweighted.mrc``) is dropped from both
names, so picks made in cryoSPARC match the original micrographs (``mic001.mrc``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Sequence

import pandas as pd

from cryopick.io.coords import CoordinateTable, empty_coords
from cryopick.io.micrographs import MicrographEntry, micrograph_stem
from cryopick.io.relion import relion_post

_SHOWN_TIES = 3
# cryoSPARC renames imported files <uid>_<original name>; uids are long random integers (18+ digits seen)
_CRYOSPARC_UID = re.compile(r"^\d{6,}_(?=.)")


def coordinate_key(name: str) -> str:
    """The stem a name is matched by: basename, known extension removed (``Movies/mic001.mrc`` → ``mic001``)."""
    return micrograph_stem(name)


def without_cryosparc_uid(stem: str) -> str:
    """``012345678901234567_mic001`` → ``mic001``; other stems unchanged."""
    return _CRYOSPARC_UID.sub("", stem, count=1)


def _normalised_path(name: str) -> str:
    path = str(name).strip().replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return str(PurePosixPath(path)) if path else path


def _directories(name: str) -> tuple[str, ...]:
    """Parent directories after RELION's ``Job/jobNNN/`` prefix (the part that mirrors the micrograph's)."""
    return PurePosixPath(relion_post(_normalised_path(name))).parent.parts


def _shared_trailing_directories(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    count = 0
    for left, right in zip(reversed(a), reversed(b)):
        if left != right:
            break
        count += 1
    return count


class _MicrographIndex:
    """Micrograph names indexed by path and stem, so each lookup costs O(length of the name)."""

    def __init__(self, names: Sequence[str]):
        self.names = [str(n) for n in names]
        self.by_path: dict[str, list[int]] = defaultdict(list)
        self.by_stem: dict[str, list[int]] = defaultdict(list)
        self.by_lower_stem: dict[str, list[int]] = defaultdict(list)
        self.by_plain_stem: dict[str, list[int]] = defaultdict(list)  # cryoSPARC uid removed
        for index, name in enumerate(self.names):
            self.by_path[_normalised_path(name)].append(index)
            stem = coordinate_key(name)
            self.by_stem[stem].append(index)
            self.by_lower_stem[stem.lower()].append(index)
            self.by_plain_stem[without_cryosparc_uid(stem)].append(index)

    def lookup(self, name: str) -> tuple[int | None, list[int]]:
        """(index of the micrograph ``name`` refers to, or None; the tied candidates when ambiguous)."""
        same_path = self.by_path.get(_normalised_path(name))
        if same_path:
            return same_path[0], []
        key = coordinate_key(name)
        plain = without_cryosparc_uid(key)
        for stems, probe in ((self.by_stem, key), (self.by_lower_stem, key.lower()), (self.by_plain_stem, plain)):
            candidates = self._stem_candidates(stems, probe)
            if candidates:
                return self._choose_by_directory(name, candidates)
        return None, []

    @staticmethod
    def _stem_candidates(stems: dict[str, list[int]], key: str) -> list[int]:
        if key in stems:
            return stems[key]
        position = key.rfind("_")
        while position > 0:  # longest micrograph stem first: mic_10_autopick tries mic_10 before mic
            prefix = key[:position]
            if prefix in stems:
                return stems[prefix]
            position = key.rfind("_", 0, position)
        return []

    def _choose_by_directory(self, name: str, candidates: list[int]) -> tuple[int | None, list[int]]:
        if len(candidates) == 1:
            return candidates[0], []
        directories = _directories(name)
        scores = [_shared_trailing_directories(directories, _directories(self.names[i])) for i in candidates]
        best = max(scores)
        winners = [i for i, s in zip(candidates, scores) if s == best]
        return (winners[0], []) if len(winners) == 1 else (None, winners)


def match_name(name: str, candidates: Sequence[str]) -> int | None:
    """Index of the micrograph name in ``candidates`` that ``name`` (a coordinate file or micrograph) refers to."""
    return _MicrographIndex(candidates).lookup(name)[0]


@dataclass
class MatchResult:
    coords: dict[int, pd.DataFrame] = field(default_factory=dict)  # micrograph index -> x, y, score of its tables
    unmatched: list[str] = field(default_factory=list)  # tables that matched no micrograph, human-readable


def match_coordinates(micrographs: Sequence[MicrographEntry], tables: Sequence[CoordinateTable]) -> MatchResult:
    """Assign each table to a micrograph: by the micrograph name inside it, else by its file name."""
    index = _MicrographIndex([m.name for m in micrographs])
    matched: dict[int, list[pd.DataFrame]] = defaultdict(list)
    unmatched: list[str] = []
    for table in tables:
        name = table.micrograph if table.micrograph is not None else str(table.source)
        found, ties = index.lookup(name)
        if found is None:
            unmatched.append(_describe_unmatched(table, [index.names[i] for i in ties]))
        else:
            matched[found].append(table.coords)
    return MatchResult(coords={i: _concatenate(matched[i]) for i in sorted(matched)}, unmatched=unmatched)


def _concatenate(frames: list[pd.DataFrame]) -> pd.DataFrame:
    non_empty = [f for f in frames if len(f)]
    if not non_empty:
        return empty_coords()
    return pd.concat(non_empty, ignore_index=True)[["x", "y", "score"]]


def _describe_unmatched(table: CoordinateTable, ties: list[str]) -> str:
    notes = [] if table.micrograph is None else [f"micrograph {table.micrograph}"]
    if ties:
        shown = ", ".join(ties[:_SHOWN_TIES]) + (", …" if len(ties) > _SHOWN_TIES else "")
        notes.append(f"ambiguous: matches {shown}")
    return f"{table.source} ({'; '.join(notes)})" if notes else str(table.source)
