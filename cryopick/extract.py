"""`cryopick extract`: micrographs + coordinates → a patch dataset for training.

Finds the micrographs and their labels, settles the pixel size and bin factor, preprocesses each
micrograph (in worker processes), samples unlabeled centres and splits micrographs into train and val;
``cryopick.dataset`` cuts the patches and writes the directory.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from cryopick.config import ExtractConfig, dump_yaml, validate
from cryopick.dataset import (
    CONFIG_NAME,
    DatasetWriter,
    crop_patches,
    fits_edge_padding,
    is_dataset_file,
    reflect_pad,
    to_binned_pixels,
)
from cryopick.errors import CryopickError, InputFileError
from cryopick.fsutil import (
    check_output_dir,
    recover_replaced_dir,
    staged_dir,
    write_text_atomic,
)
from cryopick.io.coords import read_coordinates
from cryopick.io.matching import MatchResult, match_coordinates
from cryopick.io.micrographs import MicrographEntry, find_micrographs
from cryopick.io.mrc import read_header, read_micrograph
from cryopick.preprocessing import (
    PreprocessRecord,
    binned_shape,
    choose_bin_factor,
    micrograph_pixel_size,
    preprocess,
)
from cryopick.progress import console, info, progress_bar, warn
from cryopick.report import holdout_warning, next_steps_extract


@dataclass
class MicrographJob:
    """What one worker needs to turn a micrograph into patches (picklable)."""

    index: int
    path: str
    factor: float
    patch_size: int
    positives: np.ndarray  # (n, 2) x, y original px
    n_unlabeled: int
    seed: int
    truth: np.ndarray | None  # (m, 2) x, y original px, or None


@dataclass
class MicrographPatches:
    index: int
    positive: np.ndarray  # float16 (n, P, P)
    positive_xy: np.ndarray  # (n, 2) original px of the patch centres
    unlabeled: np.ndarray
    unlabeled_xy: np.ndarray
    unlabeled_truth_distance: np.ndarray | None  # original px to the nearest true particle
    n_padded: int
    n_outside: int
    binned_shape: tuple[int, int]
    error: str | None = None
    binned: np.ndarray | None = None  # float16 binned micrograph, kept for labeled micrographs (calibration)
    scales: tuple[float, float] = (1.0, 1.0)  # (sy, sx) original px per binned px
    shape: tuple[int, int] = (0, 0)  # original (rows, cols)

    @classmethod
    def failed(cls, index: int, reason: str) -> "MicrographPatches":
        empty = np.empty(0)
        return cls(index, empty, empty, empty, empty, None, 0, 0, (0, 0), error=reason)


@dataclass
class ExtractSummary:
    out_dir: Path
    n_micrographs: int = 0
    n_used: int = 0
    n_positive: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    n_unlabeled: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    n_labeled_micrographs: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    inputs: dict = field(default_factory=dict)  # the micrographs and coordinates arguments, as given
    n_padded: int = 0
    n_outside: int = 0
    outside: list[tuple[str, int, int, tuple[int, int]]] = field(default_factory=list)  # path, n out, n, shape
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    record: PreprocessRecord | None = None


# ---------------------------------------------------------------------------------------------
# one micrograph (runs in a worker process)


def default_unlabeled_count(binned_shape: tuple[int, int], diameter_binned_px: float) -> int:
    """About one unlabeled centre per (particle radius)² of binned area, within [200, 2000]."""
    area = binned_shape[0] * binned_shape[1]
    radius = max(diameter_binned_px / 2, 1.0)
    return int(np.clip(area / radius**2, 200, 2000))


def nearest_distance(points: np.ndarray, references: np.ndarray) -> np.ndarray:
    if len(references) == 0:
        return np.full(len(points), np.inf, dtype=np.float32)
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(references).query(points, k=1)
    return dist.astype(np.float32)


def extract_micrograph(job: MicrographJob) -> MicrographPatches:
    """Read, preprocess and cut one micrograph's patches (runs in a worker process)."""
    try:
        image = read_micrograph(job.path)
    except InputFileError as exc:
        return MicrographPatches.failed(job.index, exc.problem)
    binned_t, scales = preprocess(image, job.factor)
    binned = binned_t.numpy()
    ny, nx = binned.shape
    half = job.patch_size // 2
    # float16 once for the whole image: the same values as converting each patch, 10× less work
    padded = reflect_pad(binned_t, half).numpy().astype(np.float16)

    pos_b = to_binned_pixels(job.positives, scales) if len(job.positives) else np.zeros((0, 2), np.int64)
    inside = (pos_b[:, 0] >= 0) & (pos_b[:, 0] < nx) & (pos_b[:, 1] >= 0) & (pos_b[:, 1] < ny)
    n_outside = int((~inside).sum())
    pos_b, pos_xy = pos_b[inside], job.positives[inside]

    rng = np.random.default_rng(job.seed)
    unl_b = np.stack([rng.integers(0, nx, job.n_unlabeled), rng.integers(0, ny, job.n_unlabeled)], axis=1)
    sy, sx = scales
    unl_xy = unl_b * np.array([sx, sy])

    centres = np.concatenate([pos_b, unl_b])
    near_edge = ((centres < half) | (centres > np.array([nx, ny]) - half)).any(axis=1)
    truth_distance = None if job.truth is None else nearest_distance(unl_xy, job.truth)
    return MicrographPatches(
        index=job.index,
        positive=crop_patches(padded, pos_b, job.patch_size),
        positive_xy=pos_xy.astype(np.float32),
        unlabeled=crop_patches(padded, unl_b, job.patch_size),
        unlabeled_xy=unl_xy.astype(np.float32),
        unlabeled_truth_distance=truth_distance,
        n_padded=int(near_edge.sum()),
        n_outside=n_outside,
        binned_shape=(ny, nx),
        binned=binned.astype(np.float16) if len(pos_b) else None,
        scales=(float(scales[0]), float(scales[1])),
        shape=(int(image.shape[0]), int(image.shape[1])),
    )


# ---------------------------------------------------------------------------------------------
# the command


def split_micrographs(n: int, labeled: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Deterministic split by micrograph, stratified so both splits get labeled micrographs when possible."""
    splits = np.array(["train"] * n, dtype=object)
    if val_fraction <= 0 or n < 2:
        return splits
    rng = np.random.default_rng(seed)
    for group in (np.flatnonzero(labeled), np.flatnonzero(~labeled)):
        if len(group) < 2:
            continue
        n_val = min(len(group) - 1, max(1, int(round(val_fraction * len(group)))))
        splits[rng.permutation(group)[:n_val]] = "val"
    return splits


def _check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Before any work: the dataset may be written (and, with ``overwrite``, replaced) at ``out_dir``.

    The new dataset is built beside ``out_dir`` and swapped in whole, so ``out_dir`` must hold nothing
    but a dataset: other files would be lost in the swap.
    """
    check_output_dir(out_dir, "--out")
    recover_replaced_dir(out_dir)
    if not out_dir.is_dir():
        return
    ours = [p for p in out_dir.iterdir() if is_dataset_file(p.name)]
    others = sorted(p.name for p in out_dir.iterdir() if p not in ours)
    if others:
        shown = ", ".join(others[:3]) + (", …" if len(others) > 3 else "")
        raise CryopickError(f"--out {out_dir}: holds files that are not a cryopick dataset ({shown}); "
                            "choose a new or empty directory")
    if ours and not overwrite:
        raise CryopickError(f"{out_dir}: already holds a dataset ({len(ours)} files); use --overwrite to replace it "
                            "(the new dataset is built aside and replaces the old one only when complete)")


def _usable_sizes(entries: list[MicrographEntry], shapes: list, labels: dict, truth: dict | None,
                  record: PreprocessRecord, config: ExtractConfig, summary: ExtractSummary):
    """The particle must fit in a patch, and a binned micrograph must exceed half a patch (edge padding);
    smaller micrographs are skipped and listed. Returns entries, shapes, labels and truth, renumbered."""
    factor = record.bin_factor
    if record.diameter_binned_px > config.patch_size:
        raise CryopickError(
            f"the particle spans {record.diameter_binned_px:.0f} binned px at bin ×{factor:g}, more than the "
            f"{config.patch_size}-px patch: raise --bin (or leave it out) or check --diameter ({config.diameter:g} Å)")
    keep, reason = [], ""
    for k, (entry, shape) in enumerate(zip(entries, shapes)):
        small = binned_shape(shape, factor)
        if fits_edge_padding(small, config.patch_size):
            keep.append(k)
            continue
        reason = (f"{shape[1]}×{shape[0]} px binned ×{factor:g} is {small[1]}×{small[0]} px, not more than half "
                  f"a {config.patch_size}-px patch")
        summary.skipped.append((str(entry.path), reason))
        warn(f"{entry.path}: {reason} (skipped)")
    if not keep:
        raise CryopickError(f"every micrograph is too small at bin ×{factor:g} (e.g. {reason}); "
                            f"check --diameter ({config.diameter:g} Å), --bin and --target-pixel-size")
    entries, shapes, labels, truth = _subset(keep, entries, shapes, labels, truth)
    if sum(len(df) for df in labels.values()) == 0:
        raise CryopickError("no labeled coordinate is on a micrograph large enough to use (listed above)")
    return entries, shapes, labels, truth


def _labeled_only(entries: list[MicrographEntry], shapes: list, labels: dict, truth: dict | None):
    """The micrographs with labels only (entries, shapes, labels and truth renumbered)."""
    return _subset([k for k in range(len(entries)) if len(labels.get(k, ())) > 0], entries, shapes, labels, truth)


def _subset(keep: list[int], entries: list[MicrographEntry], shapes: list, labels: dict, truth: dict | None):
    """Micrographs ``keep`` (indices) of entries and shapes, with labels and truth renumbered to match."""
    renumber = {old: new for new, old in enumerate(keep)}
    labels = {renumber[k]: v for k, v in labels.items() if k in renumber}
    truth = None if truth is None else {renumber[k]: v for k, v in truth.items() if k in renumber}
    return [entries[k] for k in keep], [shapes[k] for k in keep], labels, truth


def _deduplicate(coords: dict) -> dict:
    """Drop labels repeating another label's centre (to the pixel) on the same micrograph, with one warning."""
    out, dropped, where = {}, 0, 0
    for i, table in coords.items():
        key = np.rint(table[["x", "y"]].to_numpy(np.float64))
        _, first = np.unique(key, axis=0, return_index=True)
        n_dup = len(table) - len(first)
        if n_dup:
            dropped += n_dup
            where += 1
            table = table.iloc[np.sort(first)].reset_index(drop=True)
        out[i] = table
    if dropped:
        warn(f"{dropped} duplicate label(s) (same centre as another label on the same micrograph) dropped, "
             f"in {where} micrograph(s)")
    return out


def _pixel_sizes(entries: list[MicrographEntry], config: ExtractConfig, summary: ExtractSummary,
                 strict: bool) -> tuple[list[MicrographEntry], list[tuple[int, int]], float]:
    """Headers of every micrograph (bad ones skipped) and the common pixel size."""
    kept, shapes, sizes = [], [], []
    for entry in entries:
        try:
            header = read_header(entry.path)
        except InputFileError as exc:
            if strict:
                raise
            warn(str(exc))
            summary.skipped.append((str(entry.path), exc.problem))
            continue
        kept.append(entry)
        shapes.append(header.shape)
        sizes.append(micrograph_pixel_size(None, entry.pixel_size, header.pixel_size))
    if not kept:
        raise CryopickError("no usable micrographs: every micrograph failed to open (listed above)")
    if config.pixel_size is not None:
        return kept, shapes, float(config.pixel_size)
    if any(s is None for s in sizes):
        missing = [str(e.path) for e, s in zip(kept, sizes) if s is None][:3]
        raise CryopickError(f"no pixel size in the header of {', '.join(missing)}; give --pixel-size (Å)")
    distinct = sorted({round(float(s), 4) for s in sizes})
    if len(distinct) > 1:
        raise CryopickError(
            f"micrographs have different pixel sizes ({', '.join(map(str, distinct))} Å/px); "
            "extract them separately or force one with --pixel-size"
        )
    return kept, shapes, float(distinct[0])


def _jobs(entries, matched, truth_matched, factor, config, record, shapes) -> Iterator[MicrographJob]:
    for i, entry in enumerate(entries):
        coords = matched.get(i)
        positives = coords[["x", "y"]].to_numpy(np.float64) if coords is not None else np.zeros((0, 2))
        n_unl = config.unlabeled_per_micrograph
        if n_unl is None:
            n_unl = default_unlabeled_count(binned_shape(shapes[i], factor), record.diameter_binned_px)
        truth = None
        if truth_matched is not None:
            t = truth_matched.get(i)
            truth = t[["x", "y"]].to_numpy(np.float64) if t is not None else np.zeros((0, 2))
        yield MicrographJob(i, str(entry.path), factor, config.patch_size, positives, int(n_unl),
                            config.seed * 1_000_003 + i, truth)


def _run_jobs(jobs: Iterable[MicrographJob], workers: int) -> Iterator[MicrographPatches]:
    """Results in job order; at most 2×workers micrographs in flight, so memory stays bounded."""
    if workers <= 1:
        for job in jobs:
            yield extract_micrograph(job)
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_single_threaded) as pool:
        pending = []
        for job in jobs:
            pending.append(pool.submit(extract_micrograph, job))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def _single_threaded() -> None:
    """Worker processes use one torch thread each: the parallelism comes from the processes."""
    torch.set_num_threads(1)


def _match_usable(listed: list[MicrographEntry], usable: list[MicrographEntry], tables) -> MatchResult:
    """Coordinates matched against every listed micrograph, kept for the usable ones (indexed as ``usable``):
    the tables of a skipped micrograph are not reported as matching none."""
    match = match_coordinates(listed, tables)
    position = {entry.name: k for k, entry in enumerate(usable)}
    coords = {position[listed[i].name]: df for i, df in match.coords.items() if listed[i].name in position}
    return MatchResult(coords=dict(sorted(coords.items())), unmatched=match.unmatched)


def extract(micrographs: str | Path, coords: str | Path, out_dir: str | Path, config: ExtractConfig,
            truth: str | Path | None = None, project_dir: str | Path | None = None,
            quiet: bool = False) -> ExtractSummary:
    """Build a patch dataset; see the module docstring for the layout. Raises CryopickError when it cannot."""
    validate(config)
    out_dir = Path(out_dir)
    _check_output_dir(out_dir, config.overwrite)
    summary = ExtractSummary(out_dir=out_dir, inputs={"micrographs": str(micrographs), "coords": str(coords)})
    listed = find_micrographs(micrographs, project_dir=project_dir)
    summary.n_micrographs = len(listed)
    entries, shapes, pixel_size = _pixel_sizes(listed, config, summary, config.strict)
    tables = read_coordinates(coords, coord_scale=config.coord_scale, micrograph_pixel_size=pixel_size,
                              cs_flip_y=config.cs_flip_y)
    for message in tables.warnings:
        warn(message)
    if sum(len(table.coords) for table in tables) == 0:
        raise CryopickError(f"the coordinate files hold no coordinates ({len(tables)} empty table(s) in {coords})")
    match = _match_usable(listed, entries, tables)
    summary.unmatched = list(match.unmatched)
    for item in match.unmatched:
        warn(f"coordinates matched no micrograph: {item}")
    if sum(len(df) for df in match.coords.values()) == 0:
        raise CryopickError(f"no labeled coordinate matched any micrograph (coordinates: {coords})")
    labels = _deduplicate(match.coords)
    truth_coords = None
    if truth is not None:
        truth_tables = read_coordinates(truth)
        for message in truth_tables.warnings:
            warn(message)
        truth_coords = _match_usable(listed, entries, truth_tables).coords

    factor = choose_bin_factor(config.diameter, pixel_size, config.patch_size, config.bin, config.target_pixel_size)
    record = PreprocessRecord(pixel_size=pixel_size, bin_factor=factor, diameter_A=float(config.diameter),
                              patch_size=config.patch_size)
    summary.record = record
    entries, shapes, labels, truth_coords = _usable_sizes(entries, shapes, labels, truth_coords, record, config,
                                                          summary)
    if config.labeled_only:
        entries, shapes, labels, truth_coords = _labeled_only(entries, shapes, labels, truth_coords)
        info(f"{len(entries)} labeled micrographs of {summary.n_micrographs} extracted (labeled_only)", quiet)
    with staged_dir(out_dir) as stage:
        _extract_into(stage, entries, shapes, labels, truth_coords, factor, record, config, summary,
                      truth is not None, quiet)
    return summary


def _extract_into(out_dir: Path, entries: list[MicrographEntry], shapes: list, labels: dict, truth_coords,
                  factor: float, record: PreprocessRecord, config: ExtractConfig, summary: ExtractSummary,
                  has_truth: bool, quiet: bool) -> None:
    """Cut and write every micrograph's patches, the manifest and the config into ``out_dir`` (staging)."""
    pixel_size = record.pixel_size
    info(f"pixel size {pixel_size:.4g} Å/px, bin ×{factor:.4g} → {record.binned_pixel_size:.4g} Å/px; "
         f"particle {record.diameter_binned_px:.1f} binned px across a {config.patch_size}-px patch", quiet)

    labeled = np.array([len(labels.get(i, ())) > 0 for i in range(len(entries))])
    splits = split_micrographs(len(entries), labeled, config.val_fraction, config.seed)
    writer = DatasetWriter(out_dir, config.patch_size, config.chunk_size, [e.name for e in entries])
    mic_records: list[dict] = []
    jobs = _jobs(entries, labels, truth_coords, factor, config, record, shapes)
    with progress_bar(quiet, extra="{task.fields[patches]} patches") as progress:
        task = progress.add_task("extract", total=len(entries), patches=0)
        n_done = 0
        for result in _run_jobs(jobs, config.workers):
            entry = entries[result.index]
            if result.error:
                if config.strict:
                    raise CryopickError(f"{entry.path}: {result.error}")
                warn(f"{entry.path}: {result.error} (skipped)")
                summary.skipped.append((str(entry.path), result.error))
            else:
                _add_patches(writer, entry, splits[result.index], result, summary)
                n_done += len(result.positive) + len(result.unlabeled)
            mic_records.append(_micrograph_record(entry, splits[result.index], shapes[result.index], result))
            progress.update(task, advance=1, patches=n_done)
    if summary.n_used == 0:
        raise CryopickError("no usable micrographs: every micrograph failed (listed above)")
    if summary.n_positive["train"] == 0:
        raise CryopickError("no positive patch in the training split (all labeled coordinates fell outside?)")
    writer.finish(record, has_truth, mic_records, {
        "n_padded": summary.n_padded,
        "n_outside": summary.n_outside,
        "outside": [{"path": p, "n_outside": n_out, "n_labels": n} for p, n_out, n, _ in summary.outside],
        "skipped": [{"path": p, "reason": r} for p, r in summary.skipped],
        "inputs": summary.inputs,
        "unmatched_coordinates": summary.unmatched,
    })
    write_text_atomic(out_dir / CONFIG_NAME, dump_yaml(config))


def _add_patches(writer: DatasetWriter, entry: MicrographEntry, split: str, result: MicrographPatches,
                 summary: ExtractSummary) -> None:
    """One micrograph's patches (and, if labeled, its binned image) into the dataset, counted."""
    writer.add(split, "positive", result.positive, result.index, result.positive_xy)
    writer.add(split, "unlabeled", result.unlabeled, result.index, result.unlabeled_xy,
               result.unlabeled_truth_distance)
    summary.n_positive[split] += len(result.positive)
    summary.n_unlabeled[split] += len(result.unlabeled)
    summary.n_labeled_micrographs[split] += int(len(result.positive) > 0)
    summary.n_padded += result.n_padded
    summary.n_outside += result.n_outside
    if result.n_outside:
        summary.outside.append((str(entry.path), result.n_outside, result.n_outside + len(result.positive),
                                result.shape))
    summary.n_used += 1
    if result.binned is not None:
        writer.add_labeled_micrograph(entry.name, split, result.binned, result.scales, result.shape,
                                       result.positive_xy)


def _micrograph_record(entry: MicrographEntry, split: str, shape, result: MicrographPatches) -> dict:
    return {
        "name": entry.name,
        "path": str(entry.path),
        "split": split,
        "shape": [int(shape[0]), int(shape[1])],
        "binned_shape": [int(v) for v in result.binned_shape],
        "n_positive": int(len(result.positive)) if not result.error else 0,
        "n_unlabeled": int(len(result.unlabeled)) if not result.error else 0,
        "error": result.error,
    }


def print_summary(summary: ExtractSummary) -> None:
    from rich.table import Table

    table = Table(title=f"extract → {summary.out_dir}")
    for col in ("", "train", "val", "total"):
        table.add_column(col, justify="right")
    for label, d in (("positive patches", summary.n_positive), ("unlabeled patches", summary.n_unlabeled)):
        table.add_row(label, str(d["train"]), str(d["val"]), str(d["train"] + d["val"]))
    table.add_row("micrographs used", "", "", f"{summary.n_used}/{summary.n_micrographs}")
    table.add_row("patches padded at an edge", "", "", str(summary.n_padded))
    table.add_row("coordinates outside micrograph", "", "", str(summary.n_outside))
    console.print(table)
    for path, reason in summary.skipped:
        console.print(f"[yellow]skipped[/yellow] {path}: {reason}", highlight=False)
    for item in summary.unmatched:
        console.print(f"[yellow]unmatched coordinates[/yellow] {item}", highlight=False)
    for line in outside_lines(summary.outside):
        console.print(f"[yellow]coordinates outside[/yellow] {line}", highlight=False)
    holdout = holdout_warning(summary.n_positive, summary.n_labeled_micrographs)
    if holdout:
        console.print(f"[yellow]note:[/yellow] {holdout}", highlight=False)


def outside_lines(outside: list[tuple[str, int, int, tuple[int, int]]], shown: int = 10) -> list[str]:
    """One line per micrograph whose labels fall off it (the first ``shown``), with its size to compare against."""
    lines = [f"{path}: {n_out} of {n} labels lie beyond its {shape[1]}×{shape[0]} px"
             + (" (coordinates in other pixels? see --coord-scale)" if 2 * n_out > n else "")
             for path, n_out, n, shape in outside[:shown]]
    if len(outside) > shown:
        lines.append(f"… and {len(outside) - shown} more micrographs ({sum(o[1] for o in outside[shown:])} labels)")
    return lines


def next_steps(summary: ExtractSummary) -> list[str]:
    """What to run after extract: the train command for this dataset."""
    return next_steps_extract(summary.out_dir, torch.cuda.is_available())
