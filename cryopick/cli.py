"""Command line: parses options and calls library functions (each usable without the CLI)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Optional

import typer

from cryopick import __version__
from cryopick.cliutil import QUIET, Command, Group, default, flag, renamed_option, user_errors
from cryopick.config import DEFAULT_THRESHOLD, EvaluateConfig, ExtractConfig, PickConfig, TrainConfig, resolve
from cryopick.errors import CryopickError

app = typer.Typer(
    cls=Group,
    name="cryopick",
    help="Positive-unlabeled cryo-EM particle picking (nnPU + Selective FixMatch) with RELION-ready output.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cryopick {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, metavar="",
                                       help="Print the version and exit.")) -> None:
    """cryopick: simulate, extract, train, pick, evaluate."""


# ---------------------------------------------------------------------------------------------


@app.command(cls=Command, epilog="Example: cryopick simulate sim/ -n 4 --size 1024 --particle shell --snr 0.05")
@user_errors
def simulate(
    out: Path = typer.Argument(..., help="Output directory (micrographs/, truth/, labels/, micrographs.star, case.json)."),
    micrographs: int = typer.Option(4, "--micrographs", "-n", help="Number of micrographs."),
    size: str = typer.Option("1024", "--size", help="Micrograph size in pixels: N (square) or NXxNY, e.g. 1536x1024."),
    pixel_size: float = typer.Option(2.0, "--pixel-size", help="Pixel size, Å/px (written in the MRC headers)."),
    diameter: float = typer.Option(160.0, "--diameter", help="Particle diameter, Å."),
    particle: str = typer.Option("shell", "--particle", help="Particle shape: shell, blob, rod, ring."),
    per_micrograph: Optional[int] = typer.Option(None, "--particles", help="Particles per micrograph (default: ~30% area)."),
    snr: float = typer.Option(0.05, "--snr", help="Per-pixel signal-to-noise ratio over the particles."),
    label_fraction: float = typer.Option(0.15, "--label-fraction", help="Fraction of particles labeled (sparse picks)."),
    dtype: str = typer.Option("float32", "--dtype", help="MRC data type: float32, float16 or int16."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same files)."),
    overwrite: bool = flag("--overwrite", help="Replace an existing simulation in OUT."),
    quiet: bool = QUIET,
) -> None:
    """Write synthetic micrographs with full ground truth and sparse hand-pick-like labels."""
    from cryopick.simulate import SimulationParams
    from cryopick.simulate import simulate as run

    params = SimulationParams(n_micrographs=micrographs, shape=_parse_size(size), pixel_size=pixel_size,
                              diameter=diameter, particle=particle, particles_per_micrograph=per_micrograph, snr=snr,
                              seed=seed, label_fraction=label_fraction, dtype=dtype)
    run(out, params, quiet=quiet, overwrite=overwrite)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise CryopickError(f"--size {text!r}: expected N or NXxNY in pixels") from None
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[1], parts[0]  # NX x NY → (rows, columns)
    raise CryopickError(f"--size {text!r}: expected N or NXxNY in pixels")


@app.command(cls=Command, epilog="Example: cryopick extract CtfFind/job003/micrographs_ctf.star --coords ManualPick/job004/ "
                     "--diameter 150 --out ds/ -j 8")
@user_errors
def extract(
    micrographs: str = typer.Argument(..., help="Micrographs: a directory, a glob ('mics/*.mrc') or a RELION micrographs STAR."),
    coords: str = typer.Option(..., "--coords", "-c", help="Labeled coordinates: a directory, a glob or one file "
                               "(RELION STAR, coordinate_files list, particles STAR, .box, .cbox, Topaz table, cryoSPARC .cs)."),
    diameter: float = typer.Option(..., "--diameter", "-d", help="Particle diameter, Å. Sets the default binning "
                                   "(particle ≈ half the patch) and pick's NMS radius."),
    out: Path = typer.Option(..., "--out", "-o", help="Output dataset directory (new, or a dataset to --overwrite)."),
    bin_factor: Optional[int] = typer.Option(None, "--bin", help="Integer bin factor (original px per binned px) "
                                             "\\[default: particle ≈ half the patch]."),
    target_pixel_size: Optional[float] = typer.Option(None, "--target-pixel-size", help="Pixel size after binning, Å/px."),
    pixel_size: Optional[float] = typer.Option(None, "--pixel-size", help="Pixel size of the input micrographs, Å/px "
                                               "(overrides the MRC headers and the STAR optics)."),
    unlabeled: Optional[int] = typer.Option(None, "--unlabeled-per-micrograph", help="Unlabeled patches per micrograph "
                                            "(default: about one per particle radius² of area, 200–2000)."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Fraction of micrographs put in the val "
                                                 "split, 0 ≤ f < 1: held out of training by train --mode patches "
                                                 "(dense training, the default, trains on every labeled micrograph "
                                                 "and holds out a fifth of each one's labels instead)."
                                                 + default(ExtractConfig, "val_fraction")),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size", help="Patches per chunk_NNNNN.pt file."
                                             + default(ExtractConfig, "chunk_size")),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Parallel worker processes (micrographs)."
                                          + default(ExtractConfig, "workers")),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the validation split and unlabeled centres."
                                       + default(ExtractConfig, "seed")),
    coord_scale: Optional[float] = typer.Option(None, "--coord-scale", help="Multiply input coordinates by this (e.g. "
                                                "Topaz tables in binned pixels) to get original micrograph pixels."
                                                + default(ExtractConfig, "coord_scale")),
    cs_flip_y: Optional[bool] = typer.Option(None, "--cs-flip-y/--no-cs-flip-y", metavar="", help="cryoSPARC .cs "
                                             "labels: y = (1 − center_y_frac)·ny (cryoSPARC's lower-left origin, right "
                                             "for the micrographs cryoSPARC picked on); --no-cs-flip-y for picks made "
                                             "on cryoSPARC Patch Motion output used with RELION/MotionCor2 micrographs."
                                             + default(ExtractConfig, "cs_flip_y")),
    truth: Optional[str] = typer.Option(None, "--truth", help="Full ground truth (simulated data): recorded so "
                                        "train --mode patches and evaluate --data-dir can report true metrics. Never "
                                        "used for training."),
    project_dir: Optional[Path] = typer.Option(None, "--project-dir", help="RELION project directory that "
                                               "rlnMicrographName paths are relative to (default: searched)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with ExtractConfig keys (CLI wins)."),
    overwrite: bool = flag("--overwrite", help="Replace a dataset already in --out (built aside, swapped in only "
                           "when complete)."),
    strict: bool = flag("--strict", help="Stop at the first unreadable micrograph instead of skipping it."),
    labeled_only: bool = flag("--labeled-only", help="Extract only the micrographs with labels: all that dense "
                              "training (the default) reads; saves the time and disk of thousands of unlabeled "
                              "micrographs (--mode patches then has no unlabeled micrographs to validate on)."),
    quiet: bool = QUIET,
) -> None:
    """Keep the binned labeled micrographs (dense training) and cut 128×128 patches (--mode patches)."""
    from cryopick.extract import extract as run
    from cryopick.extract import next_steps, print_summary

    overrides = {"diameter": diameter, "bin": bin_factor, "target_pixel_size": target_pixel_size,
                 "pixel_size": pixel_size, "unlabeled_per_micrograph": unlabeled, "val_fraction": val_fraction,
                 "chunk_size": chunk_size, "workers": workers, "seed": seed, "overwrite": overwrite or None,
                 "strict": strict or None, "coord_scale": coord_scale, "cs_flip_y": cs_flip_y,
                 "labeled_only": labeled_only or None}
    cfg = resolve(ExtractConfig, config, overrides)
    summary = run(micrographs, coords, out, cfg, truth=truth, project_dir=project_dir, quiet=quiet)
    if not quiet:
        print_summary(summary)
        typer.echo("\n".join(next_steps(summary)))


def default_config_text() -> str:
    return resources.files("cryopick").joinpath("configs/pu_selective_fixmatch.yaml").read_text()


@app.command(cls=Command, epilog="Example: cryopick train --data-dir ds/ --exp-name run1   (--print-config shows every key)")
@user_errors
def train(
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Dataset from extract (directory), or a "
                                            "preprocessed_data.pt file (--mode patches only)."),
    exp_name: Optional[str] = typer.Option(None, "--exp-name", help="Experiment name: output goes to OUTPUT_ROOT/NAME."
                                           + default(TrainConfig, "train.exp_name")),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (keys as in --print-config); CLI wins."),
    mode: Optional[str] = typer.Option(None, "--mode", help="dense: every score-map sample of random crops of the "
                                       "labeled micrographs is a PU sample (labels within the positive radius, D/8, "
                                       "are positive); patches: one sample per extracted patch (the design "
                                       "document's classifier)." + default(TrainConfig, "data.mode")),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (patches: one pass over the "
                                         "unlabeled patches, every positive shown at least once; dense: crops covering the labeled micrographs 4 times)."
                                         + default(TrainConfig, "train.epochs")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Patches (dense: crops of patch size) per "
                                             "batch; P:U 1:4 (dense: 1 of 5 crops centred near a label)."
                                             + default(TrainConfig, "data.batch_size")),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="resnet8 (small, CPU), resnet18, resnet34, resnet50."
                                           + default(TrainConfig, "model.backbone")),
    prior: Optional[float] = typer.Option(None, "--prior", help="Class prior π: fraction of unlabeled patch centres "
                                          "(dense: map samples) within the positive radius of a particle, 0 ≤ π < 1 "
                                          "(default: 0 for dense, the balanced positive-vs-unlabeled risk that needs no "
                                          "count; 0.3 for patches, where 0 needs --balanced-prior and "
                                          "--expected-particles, when given, sets π instead)."),
    expected_particles: Optional[float] = typer.Option(None, "--expected-particles", help="Particles per micrograph; "
                                                       "replaces the estimated count in pick's calibration (and, "
                                                       "for --mode patches, sets π from the positive radius and "
                                                       "micrograph area)."),
    balanced_prior: Optional[float] = typer.Option(None, "--balanced-prior", help="Imbalanced nnPU (Su et al. 2021): "
                                                   "weigh the risks as if the prior were this (e.g. 0.5) so rare "
                                                   "particles reach probabilities above 0.5; 0 < value < 1 (default: "
                                                   "0.5 for dense, plain nnPU for patches)."),
    consistency: Optional[str] = typer.Option(None, "--consistency", help="selective (unlabeled only), all (standard "
                                              "FixMatch) or none (PU only)." + default(TrainConfig, "loss.consistency")),
    ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", metavar="", help="EMA teacher (--no-ema: pseudo-labels "
                                       "and validation use the student)." + default(TrainConfig, "model.use_ema")),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate." + default(TrainConfig, "optim.lr")),
    steps_per_epoch: Optional[int] = typer.Option(None, "--steps-per-epoch", help="Batches per epoch (default: dense, "
                                                  "crops covering the labeled micrographs 4 times; patches, one pass "
                                                  "over whichever of positives and unlabeled patches needs more "
                                                  "batches, the other cycled)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."
                                         + default(TrainConfig, "train.device")),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", metavar="", help="bf16 autocast on CUDA."
                                       + default(TrainConfig, "train.amp")),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (runs are deterministic on the CPU)."
                                       + default(TrainConfig, "train.seed")),
    output_root: Optional[str] = typer.Option(None, "--output-root", help="Directory holding experiments."
                                              + default(TrainConfig, "train.output_root")),
    compile_model: bool = flag("--compile", help="torch.compile the model (CUDA)."),
    resume: bool = flag("--resume", help="Continue from checkpoints/last.pt of this experiment."),
    overwrite: bool = flag("--overwrite", help="Start over in an experiment directory that has a run (the new run "
                           "replaces the old one only when it completes)."),
    print_config: bool = flag("--print-config", help="Print the default configuration and exit."),
    quiet: bool = QUIET,
) -> None:
    """Train the picker with nnPU + Selective FixMatch and an EMA teacher; writes experiments/NAME/."""
    if print_config:
        typer.echo(default_config_text())
        return
    from cryopick.train import train as run

    overrides = {
        "data.data_dir": str(data_dir) if data_dir else None, "train.exp_name": exp_name, "train.epochs": epochs,
        "data.batch_size": batch_size, "data.mode": mode, "model.backbone": backbone, "loss.prior": prior,
        "loss.expected_particles": expected_particles, "loss.consistency": consistency,
        "loss.balanced_prior": balanced_prior,
        "model.use_ema": ema, "optim.lr": lr, "train.amp": amp, "train.steps_per_epoch": steps_per_epoch,
        "train.device": device, "train.seed": seed, "train.output_root": output_root,
        "train.compile": True if compile_model else None,
    }
    cfg = resolve(TrainConfig, config, overrides)
    if not cfg.data.data_dir:
        raise CryopickError("give --data-dir (or data.data_dir in the config)")
    result = run(cfg, resume=resume, overwrite=overwrite, quiet=quiet)
    if result.interrupted:
        raise typer.Exit(130)
    if not quiet:
        from cryopick.train import summary_lines

        typer.echo("\n".join(summary_lines(result, cfg)))


@app.command(cls=Command, epilog="Example: cryopick pick CtfFind/job003/micrographs_ctf.star --model "
                     "experiments/run1/checkpoints/best.pt --out External/job010/")
@user_errors
def pick(
    micrographs: str = typer.Argument(..., help="Micrographs: a directory, a glob or a RELION micrographs STAR."),
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint from cryopick train (best.pt); it carries the "
                               "binning and normalisation, which are applied to every micrograph."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (e.g. a RELION External/jobNNN/)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Calibrated probability (0–1) that a peak is "
                                              "a particle a pick must reach; it is written as "
                                              "rlnAutopickFigureOfMerit, so you can also select later in RELION. "
                                              f"Default: {DEFAULT_THRESHOLD:g}, or lower for a weak model whose "
                                              "calibration fitted a mixture: the F1-optimal cut, half the best F1 "
                                              "it estimated; 0.5 keeps "
                                              "only the peaks more likely particles than not."),
    radius: Optional[float] = typer.Option(None, "--radius", help="NMS radius, Å (default: half the particle "
                                           "diameter given to extract)."),
    radius_px: Optional[float] = typer.Option(None, "--radius-px", help="NMS radius in original micrograph pixels "
                                              "(overrides --radius)."),
    suffix: Optional[str] = typer.Option(None, "--suffix", help="Coordinate files are <micrograph>_<suffix>.star."
                                         + default(PickConfig, "suffix")),
    edge: Optional[float] = typer.Option(None, "--edge", help="Drop picks closer than this to a micrograph edge, "
                                         "original px (half your extraction box keeps every box inside)."
                                         + default(PickConfig, "edge")),
    max_picks: Optional[int] = typer.Option(None, "--max-picks", help="At most this many picks per micrograph (best kept)."),
    expected_particles: Optional[float] = typer.Option(None, "--expected-particles", help="Particles you expect "
                                                       "per micrograph: the summary reports the threshold that "
                                                       "gives that many."),
    expected_old: Optional[float] = typer.Option(None, "--expected", hidden=True),  # before --expected-particles
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: pick only micrographs k with k mod n = i "
                                        "(array jobs; under torchrun RANK/WORLD_SIZE are used)."),
    preview: Optional[int] = typer.Option(None, "--preview", help="Write PNG previews (binned, low-passed, picks as "
                                          "circles coloured red at the threshold to green at 1) of this many "
                                          "micrographs to OUT/preview/<coordinate STAR's path under OUT, "
                                          "without .star>.png."
                                          + default(PickConfig, "preview")),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."
                                         + default(PickConfig, "device")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Micrographs of equal size scored together "
                                             "(GPU)." + default(PickConfig, "batch_size")),
    tile_size: Optional[int] = typer.Option(None, "--tile-size", help="Largest binned-pixel edge scored at once; "
                                            "bigger micrographs are tiled with overlap." + default(PickConfig, "tile_size")),
    pixel_size: Optional[float] = typer.Option(None, "--pixel-size", help="Micrograph pixel size, Å/px (overrides "
                                               "STAR and headers); a size other than training's is rescaled."),
    box: bool = flag("--box", help="Also write EMAN .box files (box = particle diameter)."),
    topaz: bool = flag("--topaz", help="Also write one Topaz coordinate table."),
    particles: bool = flag("--particles", help="Also write one combined particles-style STAR."),
    cryosparc: bool = flag("--cryosparc", help="Also write particles_<suffix>.cs for cryoSPARC "
                           "(location fields; with --particles, the STAR its Import Particle Stack reads)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Background threads reading the next micrographs "
                                          "(0: none)." + default(PickConfig, "workers")),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", metavar="", help="bf16 autocast on CUDA."
                                       + default(PickConfig, "amp")),
    project_dir: Optional[Path] = typer.Option(None, "--project-dir", help="RELION project directory for relative "
                                               "rlnMicrographName paths (default: searched)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with PickConfig keys (CLI wins)."),
    overwrite: bool = flag("--overwrite", help="Replace the picks in OUT (also those of another model or settings); "
                           "the new picks are built aside and replace the old only when the run succeeds."),
    quiet: bool = QUIET,
) -> None:
    """Score every micrograph densely, threshold, NMS, and write RELION coordinate STARs.

    Re-running the same command resumes (micrographs already picked are kept); another model or other
    settings into the same OUT need --overwrite.
    """
    from cryopick.pick import next_steps
    from cryopick.pick import pick as run

    overrides = {"threshold": threshold, "radius": radius, "radius_px": radius_px, "suffix": suffix, "edge": edge,
                 "max_picks": max_picks, "expected_particles": renamed_option(expected_particles, expected_old,
                                                                        "--expected-particles", "--expected"),
                 "shard": shard, "preview": preview, "device": device,
                 "batch_size": batch_size, "tile_size": tile_size, "pixel_size": pixel_size,
                 "write_box": box or None, "write_topaz": topaz or None, "write_particles": particles or None,
                 "write_cryosparc": cryosparc or None,
                 "workers": workers, "amp": amp, "overwrite": overwrite or None}
    cfg = resolve(PickConfig, config, overrides)
    summary = run(micrographs, model, out, cfg, quiet=quiet, project_dir=project_dir)  # raises if every one failed
    if not quiet:
        typer.echo("\n".join(next_steps(summary)))


@app.command(cls=Command, epilog="Example: cryopick evaluate picks/ --truth reference_picks/ --model "
                     "experiments/run1/checkpoints/best.pt --json report.json")
@user_errors
def evaluate(
    picks: Optional[str] = typer.Argument(None, help="Picks: a directory, glob or file in any format extract reads "
                                          "(scores from rlnAutopickFigureOfMerit, Topaz score, cbox confidence)."),
    truth: Optional[str] = typer.Option(None, "--truth", "-t", help="Reference coordinates: directory, glob or file."),
    radius_px: Optional[float] = typer.Option(None, "--radius-px", help="Match radius, original micrograph px "
                                              "(default: half the particle diameter from --model or --diameter)."),
    radius_old: Optional[float] = typer.Option(None, "--radius", hidden=True),  # before --radius-px
    diameter: Optional[float] = typer.Option(None, "--diameter", help="Particle diameter, Å (with --pixel-size)."),
    pixel_size: Optional[float] = typer.Option(None, "--pixel-size", help="Micrograph pixel size, Å/px."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Score threshold for precision/recall/F1, "
                                              "on the picks' own scale (cryopick and cbox: probability 0–1; Topaz: "
                                              "log-odds). Default: every pick counts; patch-level mode: 0.5. AP "
                                              "always uses all picks."),
    method: str = typer.Option("hungarian", "--method", help="One-to-one matching: hungarian (most matches, as "
                               "Topaz) or greedy (by descending score)."),
    coord_scale: float = typer.Option(1.0, "--coord-scale", help="Multiply pick coordinates by this first, "
                                      "to get original micrograph pixels (e.g. 4 for a Topaz table picked on 4× "
                                      "binned micrographs)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Write per-micrograph rows as CSV."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Precision-recall curve PNG (needs "
                                        "matplotlib: pip install 'cryopick\\[plot]')."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Checkpoint: gives the diameter for the default "
                                         "radius; with --data-dir, evaluates the model on patches instead."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Patch-level mode: dataset from extract "
                                            "(with --truth at extract time for true metrics)."),
    split: str = typer.Option("val", "--split", help="Patch-level mode: val, train or all."),
    device: str = typer.Option("auto", "--device", help="Patch-level mode: auto, cpu, cuda or cuda:N."),
    quiet: bool = QUIET,
) -> None:
    """Score picks against reference coordinates (precision, recall, F1, AP), or a checkpoint on patches."""
    from cryopick.config import validate
    from cryopick.fsutil import check_output_file
    from cryopick.progress import console

    radius_px = renamed_option(radius_px, radius_old, "--radius-px", "--radius")
    validate(EvaluateConfig(radius_px=radius_px, diameter=diameter, pixel_size=pixel_size, threshold=threshold,
                            method=method, coord_scale=coord_scale, split=split, device=device))
    for path, option in ((json_out, "--json"), (csv_out, "--csv"), (plot, "--plot")):
        if path is not None:
            check_output_file(path, option)
    if plot is not None:
        from cryopick.evaluate import require_matplotlib

        require_matplotlib()  # before the work, not after it

    if data_dir is not None:
        if model is None:
            raise CryopickError("patch-level evaluation needs --model CKPT with --data-dir")
        from cryopick.fsutil import write_json_atomic
        from cryopick.validation import evaluate_patches

        metrics = evaluate_patches(model, data_dir, split, threshold if threshold is not None else 0.5, device)
        _print_patch_metrics(metrics)
        if json_out:
            write_json_atomic(json_out, metrics)
        return
    from cryopick import evaluate as ev

    if picks is None or truth is None:
        raise CryopickError("give PICKS and --truth REFERENCE (or --model with --data-dir for patch metrics)")
    radius = _match_radius(radius_px, diameter, pixel_size, model)
    report = ev.evaluate(picks, truth, radius, threshold=threshold, method=method, coord_scale=coord_scale)
    if not quiet:
        ev.print_report(report, console)
    else:
        o = report.overall
        typer.echo(f"precision {o['precision']:.4f} recall {o['recall']:.4f} f1 {o['f1']:.4f} ap {o['ap']:.4f}")
    if json_out:
        ev.write_report_json(report, json_out)
    if csv_out:
        ev.write_report_csv(report, csv_out)
    if plot:
        ev.plot_pr_curve(report, plot)


def _match_radius(radius_px, diameter, pixel_size, model) -> float:
    if radius_px is not None:
        return radius_px
    if model is not None:
        from cryopick.checkpoint import load_checkpoint, preprocess_from_checkpoint
        from cryopick.errors import naming

        ckpt = load_checkpoint(model)
        with naming(model):
            record = preprocess_from_checkpoint(ckpt)
        return record.diameter_A / 2 / (pixel_size or record.pixel_size)
    if diameter is not None and pixel_size is not None:
        return diameter / 2 / pixel_size
    raise CryopickError("give --radius-px, or --diameter (Å) with --pixel-size (Å/px), or --model CKPT")


def _print_patch_metrics(metrics: dict) -> None:
    from rich.table import Table

    from cryopick.progress import console

    table = Table(title=f"patch metrics ({metrics['split']}, threshold {metrics['threshold']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if key in ("split", "threshold"):
            continue
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


@app.command(cls=Command, epilog="Example: cryopick demo cryopick-demo   (about 3.5 minutes on 2 CPU cores)")
@user_errors
def demo(
    out: Path = typer.Argument(Path("cryopick-demo"), help="Working directory for the demo (must be new or empty)."),
    micrographs: int = typer.Option(6, "--micrographs", "-n", help="Simulated micrographs (1024×1024 px, 2 Å/px)."),
    epochs: int = typer.Option(12, "--epochs", help="Training epochs."),
    steps_per_epoch: int = typer.Option(36, "--steps-per-epoch", help="Batches of 32 training crops per epoch."),
    snr: float = typer.Option(0.05, "--snr", help="Per-pixel SNR of the simulated particles."),
    particle: str = typer.Option("shell", "--particle", help="Particle shape: shell, blob, rod, ring."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    overwrite: bool = flag("--overwrite", help="Reuse a non-empty OUT, replacing its files."),
    quiet: bool = QUIET,
) -> None:
    """Simulate → extract → train → pick → evaluate on a CPU in a few minutes; prints precision/recall/AP."""
    from cryopick.demo import DemoSettings, run_demo

    settings = DemoSettings(micrographs=micrographs, epochs=epochs, steps_per_epoch=steps_per_epoch, snr=snr,
                            particle=particle, device=device, seed=seed)
    report, times = run_demo(out, settings, quiet=quiet, overwrite=overwrite)
    o = report.overall
    typer.echo(f"demo: precision {o['precision']:.3f}  recall {o['recall']:.3f}  F1 {o['f1']:.3f}  "
               f"AP {o['ap']:.3f}  (picks {o['n_picks']}, true particles {o['n_truth']}; "
               f"{sum(times.values()):.0f} s)")


RELION_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
RELION_HELP = (
    "RELION External job: pick with a trained model (Params row 'model'), or train on the hand picks and pick."
    "\n\nParams tab rows (label, value): model (checkpoint), diameter (Å, to train), threshold (0–1), epochs, "
    "steps_per_epoch, backbone, device, expected_particles (per micrograph), balanced_prior, val_fraction, "
    "unlabeled_per_micrograph, edge (original micrograph px), max_picks, seed, relion_version (auto, 3, 4 or 5)."
    "\n\nWrites per-micrograph *_autopick.star, autopick.star (coordinate_files), RELION_OUTPUT_NODES.star and "
    "RELION_JOB_EXIT_SUCCESS / _FAILURE / _ABORTED into the job directory; RELION_JOB_ABORT_NOW stops it cleanly."
    "\n\nExample (what RELION runs): cryopick relion --o External/job005/ --in_mics "
    "CtfFind/job003/micrographs_ctf.star --in_coords ManualPick/job004/manualpick.star --diameter 150 --j 8"
)


@app.command("relion", cls=Command, context_settings=RELION_CONTEXT, help=RELION_HELP)
@user_errors  # SIGTERM from a cluster scheduler becomes an interrupt, which the job records as its failure
def relion(
    ctx: typer.Context,
    out: str = typer.Option(..., "--o", help="Job directory RELION gives, e.g. External/job005/ (run from the "
                            "project directory, as RELION does)."),
    in_mics: Optional[str] = typer.Option(None, "--in_mics", help="Micrographs STAR (e.g. "
                                          "CtfFind/job003/micrographs_ctf.star): every micrograph is picked."),
    in_coords: Optional[str] = typer.Option(None, "--in_coords", help="Hand picks to train on: a coordinate_files "
                                            "list (ManualPick/job004/manualpick.star) or a 3.1 coords_suffix file."),
    in_parts: Optional[str] = typer.Option(None, "--in_parts", help="Hand picks to train on, as a particles STAR."),
    in_movies: Optional[str] = typer.Option(None, "--in_movies", hidden=True),
    in_3dref: Optional[str] = typer.Option(None, "--in_3dref", hidden=True),
    in_mask: Optional[str] = typer.Option(None, "--in_mask", hidden=True),
    threads: int = typer.Option(1, "--j", help="Threads (RELION's 'Number of threads'): torch's CPU threads."),
    pipeline_control: Optional[str] = typer.Option(None, "--pipeline_control", help="Given by RELION; the exit "
                                                   "files go to the job directory (--o) either way."),
    quiet: bool = QUIET,
) -> None:
    """RELION External job (help: RELION_HELP); the work is cryopick.relion_job.run_external_job."""
    from cryopick.relion_job import RelionJobInputs, run_external_job

    ignored = [name for name, value in (("--in_movies", in_movies), ("--in_3dref", in_3dref),
                                        ("--in_mask", in_mask)) if value]
    if ignored and not quiet:
        typer.echo(f"ignoring {', '.join(ignored)}: cryopick picks micrographs (--in_mics)", err=True)
    inputs = RelionJobInputs(out=out, in_mics=in_mics, in_coords=in_coords, in_parts=in_parts, threads=threads)
    raise typer.Exit(run_external_job(inputs, list(ctx.args), quiet=quiet))


def relion_main() -> None:
    """``cryopick-relion``: the External job command alone, for RELION's 'External executable' field."""
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command(cls=Command, context_settings=RELION_CONTEXT, help=RELION_HELP)(relion)
    single()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
