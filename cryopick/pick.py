"""``cryopick pick``: the run. Load and preprocess each micrograph as training did, score it densely
(``cryopick.inference``), keep its peaks (``cryopick.nms``) and write RELION coordinate files
(``cryopick.io.outputs``); shards, reruns and ``--overwrite`` compose in one output directory.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.table import Table

from cryopick.calibrate import Calibration, default_cut
from cryopick.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint
from cryopick.config import DEFAULT_THRESHOLD, PickConfig, dump_yaml, validate
from cryopick.dataset import fits_edge_padding
from cryopick.device import resolve_device
from cryopick.errors import CryopickError, InputFileError, naming
from cryopick.fsutil import check_output_dir, discard_dir, safe_join, write_text_atomic
from cryopick.inference import DenseScorer, LoadedMicrograph, LoadFailure, iter_batches, iter_loaded
from cryopick.io.micrographs import find_micrographs
from cryopick.io.mrc import read_header, read_micrograph
from cryopick.io.outputs import (
    OutputFormats,
    OutputLedger,
    PlannedMicrograph,
    dotdot_names,
    plan_outputs,
    preview_file_name,
    producer_record,
    promote_staged,
    same_producer,
    staging_dir,
    write_extra_formats,
    write_list_files,
)
from cryopick.io.pickmarker import CONFIG_NAME, ListFiles
from cryopick.io.relion import write_coordinate_star
from cryopick.nms import (
    HISTOGRAM_BINS,
    Picks,
    candidate_picks,
    score_histogram,
    select_picks,
    threshold_for_expected,
)
from cryopick.preprocessing import PreprocessRecord, micrograph_factor, micrograph_pixel_size, preprocess
from cryopick.preview import preview_image, write_png
from cryopick.progress import console, info, progress_bar, warn
from cryopick.report import next_steps_pick, pick_count_lines, pick_counts

PIXEL_SIZE_TOLERANCE = 1e-3  # relative difference below which pixel sizes count as equal
# the settings that change which picks are written: a rerun into the same --out must use the same ones
PROVENANCE_KEYS = ("threshold", "radius", "radius_px", "edge", "max_picks", "pixel_size", "suffix")


# ---------------------------------------------------------------------------------------------
# set-up: shards, sizes


def parse_shard(spec: str | None, environ=os.environ) -> tuple[int, int]:
    """``"i/n"`` → (i, n); without one, torchrun's RANK/WORLD_SIZE when WORLD_SIZE > 1, else (0, 1)."""
    if spec is None:
        world = int(environ.get("WORLD_SIZE", "1") or 1)
        return (int(environ.get("RANK", "0") or 0), world) if world > 1 else (0, 1)
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not match:
        raise CryopickError(f"shard '{spec}' must look like i/n, e.g. 0/4")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise CryopickError(f"shard '{spec}': need 0 ≤ i < n")
    return index, count


def shard_items(items: list, index: int, count: int) -> list:
    """Item k of the (sorted) list belongs to shard k mod n."""
    return [item for k, item in enumerate(items) if k % count == index]


def nms_radius_px(config: PickConfig, record: PreprocessRecord, pixel_size: float) -> float:
    """--radius-px, else --radius Å, else half the trained particle diameter, in original px."""
    if config.radius_px is not None:
        return float(config.radius_px)
    radius_A = config.radius if config.radius is not None else record.diameter_A / 2
    return float(radius_A) / pixel_size


def box_size_px(record: PreprocessRecord, pixel_size: float) -> int:
    """Box edge in original px: the particle diameter."""
    return max(1, int(round(record.diameter_A / pixel_size)))


# ---------------------------------------------------------------------------------------------
# loading: the checkpoint's preprocessing at each micrograph's own pixel size


def load_micrograph(plan: PlannedMicrograph, record: PreprocessRecord, config: PickConfig) -> LoadedMicrograph:
    """Read and preprocess exactly as training did, at the trained binned pixel size."""
    header = read_header(plan.entry.path)
    pixel_size = micrograph_pixel_size(config.pixel_size, plan.entry.pixel_size, header.pixel_size)
    image = read_micrograph(plan.entry.path)
    binned, scales = preprocess(image, micrograph_factor(record, pixel_size))
    if not fits_edge_padding(binned.shape, record.patch_size):
        raise InputFileError(plan.entry.path, f"too small: {tuple(binned.shape)} binned px, needs more than "
                             f"{record.patch_size // 2}")
    return LoadedMicrograph(plan, binned, scales, tuple(image.shape), pixel_size or record.pixel_size,
                            pixel_size is not None)


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class PickSummary:
    counts: dict[str, int] = field(default_factory=dict)  # micrograph name → picks written this run
    skipped: list[str] = field(default_factory=list)  # coordinate file already there (rerun without --overwrite)
    failed: dict[str, str] = field(default_factory=dict)  # micrograph name → reason
    threshold: float = DEFAULT_THRESHOLD
    radius_px: float | None = None  # NMS radius, original px (of the first micrograph's pixel size)
    histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)  # candidates per 0.1 of probability
    expected: float | None = None
    expected_threshold: float | None = None  # threshold giving `expected` picks per micrograph
    estimated_particles: float | None = None  # Σ calibrated p over candidates per micrograph (calibrated models)
    outputs: list[Path] = field(default_factory=list)
    shard: tuple[int, int] = (0, 1)
    device: str = "cpu"
    seconds: float = 0.0
    stopped: bool = False  # the caller's stop() asked to stop between micrographs (e.g. a RELION abort)
    out_dir: Path | None = None  # as the user gave it
    suffix: str = "cryopick"

    @property
    def total_picks(self) -> int:
        return sum(self.counts.values())

    @property
    def micrographs_per_second(self) -> float:
        return len(self.counts) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _RunState:
    summary: PickSummary
    candidate_scores: list[np.ndarray] = field(default_factory=list)
    pixel_sizes_seen: set[float] = field(default_factory=set)
    preview_stars: set[str] = field(default_factory=set)  # coordinate files whose micrograph gets a preview
    processed_pixel_sizes: dict[str, float] = field(default_factory=dict)
    calibration: Calibration | None = None  # score → P(particle | peak), from train; None: raw σ(logit)


def pick(micrographs: str | Path, model: str | Path, out_dir: str | Path, config: PickConfig,
         quiet: bool = False, project_dir: str | Path | None = None,
         stop: Callable[[], bool] | None = None) -> PickSummary:
    """Pick particles in ``micrographs`` with checkpoint ``model``; RELION coordinate files in ``out_dir``.

    ``stop`` is polled between micrographs; when it returns True the run stops there (``summary.stopped``),
    still writing the list files for the micrographs done, so a rerun continues where it stopped.
    """
    started = time.perf_counter()
    validate(config)
    ckpt = load_checkpoint(model)
    with naming(model):
        calibration = _calibration(ckpt, Path(model), quiet)
        record = preprocess_from_checkpoint(ckpt)
        network = model_from_checkpoint(ckpt)
    config = _with_threshold(config, calibration, quiet)
    device = resolve_device(config.device)
    shard = parse_shard(config.shard)
    out_root = check_output_dir(out_dir, "--out")
    entries = sorted(find_micrographs(micrographs, project_dir), key=lambda e: e.name)
    lists = ListFiles(config.suffix)
    plans, plan_failures = plan_outputs(entries, config.suffix, lists.all())

    if dotdot_names(plans):
        warn("micrograph names containing '..' are written without it; RELION 3.1's coords_suffix lookup "
             "will not find those files (RELION 4/5 --coord_list with the coordinates list will)")
    my_names = {e.name for e in shard_items(entries, *shard)}
    existed = out_root.exists()
    fresh = shard[1] == 1 and not (existed and any(out_root.iterdir()))  # shards may share an --out: never fresh
    ledger, producer, my_plans, todo, preview_stars = _prepare_outputs(model, config, out_root, plans, lists,
                                                                       shard, my_names)

    summary = PickSummary(threshold=config.threshold, shard=shard, device=str(device), expected=config.expected_particles,
                          out_dir=Path(out_dir), suffix=config.suffix)
    summary.failed.update({n: r for n, r in plan_failures.items() if n in my_names})
    todo_names = {p.entry.name for p in todo}
    summary.skipped = [p.entry.name for p in my_plans if p.entry.name not in todo_names]
    if shard[1] > 1:
        info(f"shard {shard[0]}/{shard[1]}: {len(my_plans)} of {len(plans)} micrographs", quiet)
    if summary.skipped:
        info(f"{len(summary.skipped)} micrographs already picked in {out_root} with the same model and settings "
             "(kept; --overwrite redoes them)", quiet)
    state = _RunState(summary, preview_stars=preview_stars, calibration=calibration)
    if todo:
        scorer = DenseScorer(network, device, record.patch_size // 2, config.tile_size, config.amp)
        if config.overwrite:
            _pick_aside(todo, scorer, record, config, out_root, state, ledger, producer, shard, quiet, stop)
        else:
            _pick_all(todo, scorer, record, config, out_root, state, quiet, stop)
    _finish_scores(state, config)
    failed_all = bool(todo or summary.failed) and not summary.counts and not summary.stopped
    if failed_all and fresh:
        _discard_output(out_root, existed)  # nothing that looks like a finished job is left behind
    else:
        summary.outputs += write_run_files(micrographs, out_root, Path(out_dir), plans, ledger, lists, record,
                                           config, state.processed_pixel_sizes)
    summary.seconds = time.perf_counter() - started
    if not quiet:
        print_summary(summary)
    if failed_all:
        raise CryopickError(f"every micrograph failed ({len(summary.failed)}); e.g. "
                            + "; ".join(f"{n}: {r}" for n, r in list(summary.failed.items())[:3]))
    return summary


def _discard_output(out_root: Path, existed: bool) -> None:
    """Empty an --out this run found empty (or created), and remove it if it created it."""
    for child in out_root.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    if not existed:
        out_root.rmdir()


def _prepare_outputs(model: str | Path, config: PickConfig, out_root: Path, plans: list[PlannedMicrograph],
                     lists: ListFiles, shard: tuple[int, int], my_names: set[str]):
    """Claim this run's files in the ledger: ``(ledger, producer, my plans, plans to pick, preview stars)``.

    Refuses to mix models or settings in one --out and to overwrite files cryopick pick did not write.
    """
    out_root.mkdir(parents=True, exist_ok=True)
    ledger = OutputLedger(out_root, shard)
    producer = producer_record(model, {k: getattr(config, k) for k in PROVENANCE_KEYS})
    _refuse_mixing(ledger, producer, config.overwrite, out_root)
    discard_dir(staging_dir(out_root, shard))  # left by a killed --overwrite run
    my_plans = [p for p in plans if p.entry.name in my_names]
    todo = [p for p in my_plans if config.overwrite or not (out_root / p.star).exists()]
    preview_stars = {p.star for p in todo[: config.preview]}
    previews = sorted(preview_file_name(star) for star in preview_stars)
    our_files = [p.star for p in plans] + ([p.box for p in plans] if config.write_box else []) + lists.all()
    ledger.refuse_foreign(our_files + previews)
    ledger.claim(our_files + previews)
    if not config.overwrite and not same_producer(ledger.my_producer, producer):
        ledger.set_producer(producer)  # recorded before the first pick is written
    return ledger, producer, my_plans, todo, preview_stars


def _refuse_mixing(ledger: OutputLedger, producer: dict, overwrite: bool, out_root: Path) -> None:
    """One --out holds the picks of one model and one set of settings, so its files never come from two."""
    differences = ledger.conflicts(producer, own_only=overwrite)
    if differences and not overwrite:
        raise CryopickError(
            f"{out_root} already holds picks made with {'; '.join(differences)}; a rerun must use the same "
            "--model and settings to resume. Use --overwrite to replace those picks (the new ones are built "
            "aside and replace the old only when the run succeeds), or choose another --out")


def _pick_aside(todo: list[PlannedMicrograph], scorer: DenseScorer, record: PreprocessRecord, config: PickConfig,
                out_root: Path, state: _RunState, ledger: OutputLedger, producer: dict, shard: tuple[int, int],
                quiet: bool, stop: Callable[[], bool] | None = None) -> None:
    """--overwrite: pick into a hidden staging directory, then move the new files over the old ones.

    A failed or interrupted run leaves the old picks untouched; old coordinate files of micrographs that
    failed this time are removed, so no file of the previous model stays behind.
    """
    stage = staging_dir(out_root, shard).resolve()
    stage.mkdir()
    try:
        _pick_all(todo, scorer, record, config, stage, state, quiet, stop)
        if not state.summary.counts or state.summary.stopped:
            return  # every micrograph failed (pick() reports it) or the run was stopped: the old picks stay
        ledger.set_producer(None)  # between old and new: a rerun without --overwrite must not resume
        failed = [plan for plan in todo if plan.entry.name not in state.summary.counts]
        promote_staged(stage, out_root, [f for p in failed for f in (p.star, p.box, preview_file_name(p.star))])
        ledger.set_producer(producer)
        state.summary.outputs = [out_root / p.relative_to(stage) for p in state.summary.outputs]
    finally:
        discard_dir(stage)


def _calibration(ckpt: dict, model: Path, quiet: bool) -> Calibration | None:
    """The checkpoint's calibration (scores become P(particle | peak)); a warning when it has none."""
    data = ckpt.get("calibration")
    best = model.with_name("best.pt")
    if not data and model.name == "last.pt" and best.is_file():
        warn(f"{model} is the latest training state, never calibrated; pick with {best} (the model train "
             "validated and calibrated) unless you mean to: scores are the network's raw probabilities")
        return None
    if not data:
        warn("this model has no pick calibration (trained by an older cryopick, or calibration failed): scores "
             "are the network's raw probabilities and the default threshold may over- or under-pick; --expected-particles N prints the "
             "threshold giving N picks per micrograph")
        return None
    calibration = Calibration.from_dict(data)
    info(f"calibrated scores: {calibration.describe()}", quiet)
    return calibration


def _with_threshold(config: PickConfig, calibration: Calibration | None, quiet: bool) -> PickConfig:
    """``config`` with its threshold set: the user's, else the model's default (``default_cut``), which the
    saved config and the outputs' provenance then record."""
    if config.threshold is not None:
        return config
    threshold, reason = default_cut(calibration)
    info(f"threshold p ≥ {threshold:.3g}: {reason} (--threshold sets your own)", quiet)
    return replace(config, threshold=threshold)


def validate_pick_config(config: PickConfig) -> None:
    """Kept for callers; the checks live in cryopick.config.validate."""
    validate(config)


def _pick_all(todo: list[PlannedMicrograph], scorer: DenseScorer, record: PreprocessRecord, config: PickConfig,
              out_root: Path, state: _RunState, quiet: bool, stop: Callable[[], bool] | None = None) -> None:
    def stopping() -> bool:
        state.summary.stopped = state.summary.stopped or (stop is not None and stop())
        return state.summary.stopped

    found = done = 0
    start = time.perf_counter()
    with progress_bar(quiet, extra="{task.fields[particles]} particles · {task.fields[rate]} mic/s") as bar:
        task = bar.add_task("picking", total=len(todo), particles=0, rate="–")
        loaded = iter_loaded(todo, lambda plan: load_micrograph(plan, record, config), config.workers,
                             lookahead=max(2 * config.workers, 2 * config.batch_size))
        for batch in iter_batches(loaded, config.batch_size):
            if stopping():
                break
            if isinstance(batch, LoadFailure):
                warn(f"{batch.plan.entry.name}: {batch.reason} (skipped)")
                state.summary.failed[batch.plan.entry.name] = batch.reason
                done += 1
                bar.update(task, completed=done)
                continue
            maps = scorer(torch.stack([m.binned for m in batch]))
            for loaded, logits in zip(batch, maps):
                if stopping():
                    break
                found += _pick_one(loaded, logits, scorer, record, config, out_root, state, quiet)
                done += 1
            rate = len(state.summary.counts) / max(time.perf_counter() - start, 1e-9)
            bar.update(task, completed=done, particles=found, rate=f"{rate:.2f}")


def _pick_one(loaded: LoadedMicrograph, logits: np.ndarray, scorer: DenseScorer, record: PreprocessRecord,
              config: PickConfig, out_root: Path, state: _RunState, quiet: bool) -> int:
    _note_pixel_size(loaded, record, state, quiet)
    radius = nms_radius_px(config, record, loaded.pixel_size)
    if state.summary.radius_px is None:
        state.summary.radius_px = radius
    calibrate = state.calibration.apply if state.calibration is not None else None
    candidates = candidate_picks(logits, scorer.geometry(loaded.scales), tuple(loaded.binned.shape), loaded.shape,
                                 radius, config.edge, calibrate, halve_border_peaks=True)
    picks = select_picks(candidates, config.threshold, config.max_picks)
    star_path = safe_join(out_root, loaded.plan.star)
    write_coordinate_star(star_path, picks.x, picks.y, picks.score)
    name = loaded.plan.entry.name
    state.summary.counts[name] = len(picks)
    state.summary.outputs.append(star_path)
    state.candidate_scores.append(candidates.score)
    state.processed_pixel_sizes[name] = loaded.pixel_size
    if loaded.plan.star in state.preview_stars:
        particle_radius = record.diameter_A / 2 / loaded.pixel_size
        state.summary.outputs.append(_write_preview(loaded, picks, particle_radius, config, out_root))
    return len(picks)


def _note_pixel_size(loaded: LoadedMicrograph, record: PreprocessRecord, state: _RunState, quiet: bool) -> None:
    """One line per distinct pixel size that differs from training (or is unknown)."""
    key = round(loaded.pixel_size, 6) if loaded.pixel_size_known else -1.0
    if key in state.pixel_sizes_seen:
        return
    state.pixel_sizes_seen.add(key)
    if not loaded.pixel_size_known:
        warn(f"{loaded.plan.entry.name}: no pixel size in the STAR or MRC header; assuming the training pixel "
             f"size {record.pixel_size:.4g} Å/px (give --pixel-size to set it)")
    elif abs(loaded.pixel_size - record.pixel_size) > PIXEL_SIZE_TOLERANCE * record.pixel_size:
        factor = micrograph_factor(record, loaded.pixel_size)
        info(f"micrographs at {loaded.pixel_size:.4g} Å/px (training: {record.pixel_size:.4g} Å/px): rescaling by "
             f"{factor:.4g} to the trained binned pixel size {record.binned_pixel_size:.4g} Å/px"
             + (" (upsampled: they hold less detail than the model trained on)" if factor < 1 else ""), quiet)


def _write_preview(loaded: LoadedMicrograph, picks: Picks, radius_px: float, config: PickConfig,
                   out_root: Path) -> Path:
    """The binned micrograph with a circle of the particle's radius at each pick."""
    sy, sx = loaded.scales
    image = preview_image(loaded.binned.numpy(), picks.x / sx, picks.y / sy, picks.score, radius_px / sx,
                          config.threshold)
    path = safe_join(out_root, preview_file_name(loaded.plan.star))
    write_png(path, image)
    return path


def _finish_scores(state: _RunState, config: PickConfig) -> None:
    scores = np.concatenate(state.candidate_scores) if state.candidate_scores else np.zeros(0)
    state.summary.histogram = score_histogram(scores)
    if state.calibration is not None and state.summary.counts:
        state.summary.estimated_particles = float(scores.sum()) / len(state.summary.counts)
    if config.expected_particles is not None:
        state.summary.expected_threshold = threshold_for_expected(scores, len(state.summary.counts),
                                                                  config.expected_particles)


# ---------------------------------------------------------------------------------------------
# run-level files, rebuilt from every coordinate file present (so shards and reruns compose)


def _pixel_size_for_outputs(plan: PlannedMicrograph, config: PickConfig, record: PreprocessRecord,
                            known: dict[str, float]) -> float:
    if plan.entry.name in known:
        return known[plan.entry.name]
    try:
        header_pixel_size = read_header(plan.entry.path).pixel_size
    except InputFileError:
        header_pixel_size = None
    return micrograph_pixel_size(config.pixel_size, plan.entry.pixel_size, header_pixel_size) or record.pixel_size


def _warn_unlisted(out_root: Path, plans: list[PlannedMicrograph], ledger: OutputLedger, lists: ListFiles) -> None:
    """Coordinate files an earlier run wrote for other micrographs stay, but this run's lists do not name them."""
    planned = {p.star for p in plans} | set(lists.all())
    unlisted = sorted(f for f in ledger.owned if f.endswith(".star") and f not in planned and (out_root / f).is_file())
    if unlisted:
        warn(f"{len(unlisted)} coordinate file(s) in {out_root} (e.g. {unlisted[0]}) belong to micrographs of an "
             "earlier run and are not in this run's list files, which name this run's micrographs only: pick "
             "all micrographs in one run (or one micrographs STAR), or give each set its own --out")


def write_run_files(micrographs: str | Path, out_root: Path, out_dir_given: Path, plans: list[PlannedMicrograph],
                    ledger: OutputLedger, lists: ListFiles, record: PreprocessRecord, config: PickConfig,
                    known_pixel_sizes: dict[str, float]) -> list[Path]:
    """Suffix file, coordinate-files list, optional box/Topaz/particles files and the resolved config."""
    present = [p for p in plans if ledger.owns(p.star) and (out_root / p.star).is_file()]
    _warn_unlisted(out_root, plans, ledger, lists)
    pixel_sizes = {p.entry.name: _pixel_size_for_outputs(p, config, record, known_pixel_sizes) for p in present}
    input_is_star = Path(micrographs).suffix.lower() == ".star" and Path(micrographs).is_file()
    common = Counter(pixel_sizes.values()).most_common(1)
    written = write_list_files(out_root, out_dir_given, lists, present, str(micrographs) if input_is_star else None,
                               common[0][0] if common else record.pixel_size)
    formats = OutputFormats(config.write_box, config.write_topaz, config.write_particles, config.write_cryosparc)
    box_sizes = {name: box_size_px(record, size) for name, size in pixel_sizes.items()}
    written += write_extra_formats(out_root, lists, present, formats, box_sizes)
    resolved = config
    if config.radius_px is None and pixel_sizes:
        first_pixel_size = next(iter(pixel_sizes.values()))
        resolved = dataclasses.replace(config, radius_px=nms_radius_px(config, record, first_pixel_size))
    written.append(safe_join(out_root, CONFIG_NAME))
    write_text_atomic(written[-1], dump_yaml(resolved))
    return written


# ---------------------------------------------------------------------------------------------
# report


def histogram_lines(histogram: list[int], threshold: float, width: int = 40) -> list[str]:
    """One text bar per probability bin; the bin holding the threshold is marked."""
    peak = max(max(histogram), 1)
    lines = []
    for k, count in enumerate(histogram):
        low, high = k / HISTOGRAM_BINS, (k + 1) / HISTOGRAM_BINS
        mark = " ← threshold" if low <= threshold < high or (k == HISTOGRAM_BINS - 1 and threshold >= high) else ""
        lines.append(f"{low:.1f}–{high:.1f} {'█' * round(width * count / peak):<{width}} {count}{mark}")
    return lines


def print_summary(summary: PickSummary) -> None:
    table = Table(title="cryopick pick", show_header=False)
    table.add_column("item")
    table.add_column("value")
    n = len(summary.counts)
    table.add_row("micrographs picked", str(n))
    if summary.skipped:
        table.add_row("already picked (kept)", str(len(summary.skipped)))
    table.add_row("failed", str(len(summary.failed)))
    table.add_row("particles", f"{summary.total_picks} ({summary.total_picks / n:.1f} per micrograph)" if n else "0")
    table.add_row("threshold", f"{summary.threshold:g}")
    if summary.estimated_particles is not None:
        table.add_row("estimated particles (Σ p)", f"{summary.estimated_particles:.1f} per micrograph")
    if summary.radius_px is not None:
        table.add_row("NMS radius", f"{summary.radius_px:.1f} px")
    if summary.expected_threshold is not None:
        table.add_row(f"threshold for {summary.expected:g}/micrograph", f"{summary.expected_threshold:.3f}")
    table.add_row("speed", f"{summary.micrographs_per_second:.2f} micrographs/s on {summary.device}")
    console.print(table)
    if n:
        console.print("candidate peaks by probability:")
        for line in histogram_lines(summary.histogram, summary.threshold):
            console.print(line, highlight=False)
    for line in pick_count_lines(pick_counts(summary.counts)):
        console.print(line, highlight=False, markup=False)  # micrograph names may hold [brackets]
    for name, reason in list(summary.failed.items())[:10]:
        console.print(f"[red]failed[/red] {name}: {reason}", highlight=False)
    if len(summary.failed) > 10:
        console.print(f"… and {len(summary.failed) - 10} more failures", highlight=False)


def next_steps(summary: PickSummary) -> list[str]:
    """Which of the written files RELION's Particle extraction takes (3.1 and 4/5)."""
    lists = ListFiles(summary.suffix)
    return next_steps_pick(summary.out_dir or Path("."), lists.coords_suffix, lists.coordinate_list, summary.suffix)
