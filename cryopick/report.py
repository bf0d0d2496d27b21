"""Plain-language parts of the command summaries: what to run next, held-out labels, picks per micrograph.

Pure functions returning text (no printing, no torch), so each is tested on known numbers.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

HOLDOUT_WARN_SHARE = 0.25  # warn when validation takes more than this share of the labeled particles
OUTLIER_FACTOR = 3.0  # a micrograph with fewer than median/3 or more than 3·median picks is flagged
MAX_LISTED = 10


def _q(path: str | Path) -> str:
    return shlex.quote(str(path))


# ---------------------------------------------------------------------------------------------
# extract


def holdout_warning(positives: dict, labeled_micrographs: dict) -> str | None:
    """When validation holds out a large share of the labeled particles from patch training, say so with numbers.

    ``positives`` and ``labeled_micrographs`` map "train"/"val" to counts.
    """
    n_val, total = positives.get("val", 0), positives.get("train", 0) + positives.get("val", 0)
    if total == 0 or n_val / total <= HOLDOUT_WARN_SHARE:
        return None
    mics_val = labeled_micrographs.get("val", 0)
    mics_total = mics_val + labeled_micrographs.get("train", 0)
    return (f"validation holds out {mics_val} of {mics_total} labeled micrographs: {n_val} of {total} labeled "
            f"particles ({100 * n_val / total:.0f}%) will not train with train --mode patches (dense training, the "
            "default, trains on every labeled micrograph and holds out a fifth of each one's labels instead). For "
            "patches, hand-pick more micrographs or re-run extract with --val-fraction 0.")


def next_steps_extract(data_dir: str | Path, cuda: bool) -> list[str]:
    """The train command for this dataset (a small backbone on machines without a GPU)."""
    data_dir = Path(data_dir)
    name = data_dir.resolve().name or "run1"
    cpu = "" if cuda else " --backbone resnet8"  # resnet18, the default, is several times slower on a CPU
    return [f"next: cryopick train --data-dir {_q(data_dir)} --exp-name {_q(name)}{cpu}",
            "      no particle count is needed: train estimates it and prints the estimate; "
            "--expected-particles N overrides the estimate"]


# ---------------------------------------------------------------------------------------------
# train


def train_summary(monitor: str, best_value: float, best_epoch: int, epochs_run: int, exp_dir: Path,
                  recall: float | None = None, recall90_score: float | None = None) -> str:
    """The best epoch, where the checkpoints are, and how the held-out particles scored at that epoch."""
    if best_epoch < 0:
        return f"no epoch finished; checkpoints in {exp_dir / 'checkpoints'}"
    line = (f"best {monitor} {best_value:.4f} at epoch {best_epoch + 1} of {epochs_run}; "
            f"checkpoints in {exp_dir / 'checkpoints'}")
    if recall is not None and recall90_score is not None:
        line += (f"; there {100 * recall:.0f}% of held-out particles scored ≥ 0.5 and 90% scored ≥ "
                 f"{recall90_score:.2f}")
    return line


def next_steps_train(checkpoint: str | Path, micrographs: str | None) -> list[str]:
    """The pick command with this checkpoint, and how to choose its threshold."""
    mics = _q(micrographs) if micrographs else "MICROGRAPHS"
    return [f"next: cryopick pick {mics} --model {_q(checkpoint)} --out picks/ --preview 3",
            "      its histogram (and --expected-particles N, per micrograph) shows what another --threshold "
            "would give"]


# ---------------------------------------------------------------------------------------------
# pick


def next_steps_pick(out_dir: str | Path, coords_suffix_file: str, coordinate_list_file: str, suffix: str) -> list[str]:
    """Which file RELION's Particle extraction takes, for 3.1 and for 4/5."""
    out = Path(out_dir)
    return [f"next (RELION 3.1): Particle extraction, Input coordinates = {out / coords_suffix_file} "
            f"(relion_preprocess --coord_dir {out}/ --coord_suffix _{suffix}.star)",
            f"next (RELION 4/5): Particle extraction, Input coordinates = {out / coordinate_list_file} "
            f"(--coord_list); rlnAutopickFigureOfMerit holds each pick's probability"]


@dataclass
class PickCounts:
    """Picks per micrograph: spread and the micrographs far from the rest."""

    n: int
    minimum: int
    median: float
    maximum: int
    low: list[tuple[str, int]] = field(default_factory=list)  # fewer than median / OUTLIER_FACTOR
    high: list[tuple[str, int]] = field(default_factory=list)  # more than median · OUTLIER_FACTOR


def pick_counts(counts: dict[str, int], factor: float = OUTLIER_FACTOR) -> PickCounts | None:
    """Min / median / max and the outliers outside [median/factor, factor·median] (needs 3+ micrographs)."""
    if not counts:
        return None
    values = sorted(counts.values())
    n = len(values)
    median = float(values[n // 2]) if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
    stats = PickCounts(n, values[0], median, values[-1])
    if n >= 3 and median > 0:
        ordered = sorted(counts.items(), key=lambda kv: (kv[1], kv[0]))
        stats.low = [(k, v) for k, v in ordered if v < median / factor]
        stats.high = [(k, v) for k, v in reversed(ordered) if v > median * factor]
    return stats


def _listed(items: list[tuple[str, int]]) -> str:
    shown = ", ".join(f"{name} ({count})" for name, count in items[:MAX_LISTED])
    return shown + (f", … and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def pick_count_lines(stats: PickCounts | None) -> list[str]:
    """The spread line and, when there are outliers, one line each for too few and too many."""
    if stats is None:
        return []
    lines = [f"picks per micrograph: min {stats.minimum}, median {stats.median:g}, max {stats.maximum} "
             f"({stats.n} micrographs)"]
    if stats.n >= 3 and stats.median == 0:
        lines.append("most micrographs got no pick: try a lower --threshold (see the histogram) or check the model")
    if stats.low:
        lines.append(f"far fewer than the median (< {stats.median / OUTLIER_FACTOR:.3g}; empty, thick ice or off "
                     f"focus?): {_listed(stats.low)}")
    if stats.high:
        lines.append(f"far more than the median (> {stats.median * OUTLIER_FACTOR:.3g}; contamination, carbon or "
                     f"aggregates?): {_listed(stats.high)}")
    return lines
