"""Command line: parses options and calls library functions (each usable without the CLI)."""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

import typer

from cryopick import __version__
from cryopick.errors import CryopickError

app = typer.Typer(
    name="cryopick",
    help="Positive-unlabeled cryo-EM particle picking (nnPU + Selective FixMatch) with RELION-ready output.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars or info lines (warnings and errors still print).")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cryopick {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """cryopick: simulate, extract, train, pick, evaluate."""


def user_errors(func: Callable) -> Callable:
    """Turn CryopickError into one line on stderr and exit 1; Ctrl-C into exit 130. Never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from cryopick.progress import console

        try:
            return func(*args, **kwargs)
        except CryopickError as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            console.print("[red]interrupted[/red]")
            raise typer.Exit(130)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # a bug, not bad input: still one line, the traceback on request
            if os.environ.get("CRYOPICK_DEBUG"):
                raise
            console.print(f"[red]internal error:[/red] {type(exc).__name__}: {exc} "
                          "(please report it; set CRYOPICK_DEBUG=1 for the traceback)", highlight=False)
            raise typer.Exit(2)

    return wrapper


# ---------------------------------------------------------------------------------------------


@app.command()
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
    label_fraction: float = typer.Option(0.15, "--label-fraction", help="Fraction of particles labelled (sparse picks)."),
    dtype: str = typer.Option("float32", "--dtype", help="MRC data type: float32, float16 or int16."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same files)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing simulation in OUT."),
    quiet: bool = QUIET,
) -> None:
    """Write synthetic micrographs with full ground truth and sparse hand-pick-like labels."""
    from cryopick.simulate import SimulationParams
    from cryopick.simulate import simulate as run

    params = SimulationParams(n_micrographs=micrographs, shape=_parse_size(size), pixel_size=pixel_size,
                              diameter=diameter, particle=particle, particles_per_micrograph=per_micrograph, snr=snr,
                              seed=seed, label_fraction=label_fraction, dtype=dtype)
    case = run(out, params, quiet=quiet, overwrite=overwrite)
    if not quiet:
        typer.echo(f"wrote {case.get('n_micrographs', micrographs)} micrographs to {out}")


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


@app.command()
@user_errors
def extract(
    micrographs: str = typer.Argument(..., help="Micrographs: a directory, a glob ('mics/*.mrc') or a RELION micrographs STAR."),
    coords: str = typer.Option(..., "--coords", "-c", help="Labelled coordinates: a directory, a glob or one file "
                               "(RELION STAR, coordinate_files list, particles STAR, .box, .cbox, Topaz table)."),
    diameter: float = typer.Option(..., "--diameter", "-d", help="Particle diameter, Å. Sets the default binning "
                                   "(particle ≈ half the patch) and pick's NMS radius."),
    out: Path = typer.Option(..., "--out", "-o", help="Output dataset directory."),
    bin_factor: Optional[int] = typer.Option(None, "--bin", help="Integer bin factor (original px per binned px)."),
    target_pixel_size: Optional[float] = typer.Option(None, "--target-pixel-size", help="Pixel size after binning, Å/px."),
    pixel_size: Optional[float] = typer.Option(None, "--pixel-size", help="Pixel size of the input micrographs, Å/px "
                                               "(overrides the MRC headers and the STAR optics)."),
    unlabeled: Optional[int] = typer.Option(None, "--unlabeled-per-micrograph", help="Unlabeled patches per micrograph "
                                            "(default: about one per particle radius² of area, 200–2000)."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Fraction of micrographs held out for validation."),
    chunk_size: int = typer.Option(2048, "--chunk-size", help="Patches per chunk_NNNNN.pt file."),
    workers: int = typer.Option(1, "--workers", "-j", help="Parallel worker processes (micrographs)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the validation split and unlabeled centres."),
    coord_scale: float = typer.Option(1.0, "--coord-scale", help="Multiply input coordinates by this (e.g. Topaz "
                                      "tables in binned pixels) to get original micrograph pixels."),
    truth: Optional[str] = typer.Option(None, "--truth", help="Full ground truth (simulated data): recorded so "
                                        "training can report true validation metrics. Never used for training."),
    project_dir: Optional[Path] = typer.Option(None, "--project-dir", help="RELION project directory that "
                                               "rlnMicrographName paths are relative to (default: searched)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with ExtractConfig keys (CLI wins)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a dataset already in --out."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable micrograph instead of skipping it."),
    quiet: bool = QUIET,
) -> None:
    """Cut 128×128 positive patches at labelled centres and unlabeled patches at random centres."""
    from cryopick.config import ExtractConfig, resolve
    from cryopick.extract import extract as run
    from cryopick.extract import print_summary

    overrides = {"diameter": diameter, "bin": bin_factor, "target_pixel_size": target_pixel_size,
                 "pixel_size": pixel_size, "unlabeled_per_micrograph": unlabeled, "val_fraction": val_fraction,
                 "chunk_size": chunk_size, "workers": workers, "seed": seed, "overwrite": overwrite or None,
                 "strict": strict or None, "coord_scale": coord_scale}
    cfg = resolve(ExtractConfig, config, overrides)
    summary = run(micrographs, coords, out, cfg, truth=truth, project_dir=project_dir, quiet=quiet)
    if not quiet:
        print_summary(summary)


def default_config_text() -> str:
    return resources.files("cryopick").joinpath("configs/pu_selective_fixmatch.yaml").read_text()


@app.command()
@user_errors
def train(
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Dataset from extract (directory) or a "
                                            "preprocessed_data.pt file."),
    exp_name: Optional[str] = typer.Option(None, "--exp-name", help="Experiment name: output goes to OUTPUT_ROOT/NAME."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (keys as in --print-config); CLI wins."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (one epoch shows every positive once)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Patches per batch, positives + unlabeled."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="resnet8 (small, CPU), resnet18, resnet34, resnet50."),
    prior: Optional[float] = typer.Option(None, "--prior", help="Class prior π: fraction of unlabeled patch centres "
                                          "within the positive radius of a particle (default 0.3)."),
    expected_particles: Optional[float] = typer.Option(None, "--expected-particles", help="Particles per micrograph; "
                                                       "sets π from the positive radius and micrograph area."),
    consistency: Optional[str] = typer.Option(None, "--consistency", help="selective (unlabeled only), all (standard "
                                              "FixMatch) or none (PU only)."),
    no_ema: bool = typer.Option(False, "--no-ema", help="No EMA teacher: pseudo-labels and validation use the student."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate."),
    steps_per_epoch: Optional[int] = typer.Option(None, "--steps-per-epoch", help="Batches per epoch (default: one pass "
                                                  "over the unlabeled patches; positives cycle, each seen every epoch)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (runs are deterministic on the CPU)."),
    output_root: Optional[str] = typer.Option(None, "--output-root", help="Directory holding experiments (default experiments)."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model (CUDA)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from checkpoints/last.pt of this experiment."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an experiment directory that has a run."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the default configuration and exit."),
    quiet: bool = QUIET,
) -> None:
    """Train the picker with nnPU + Selective FixMatch and an EMA teacher; writes experiments/NAME/."""
    from cryopick.config import TrainConfig, resolve

    if print_config:
        typer.echo(default_config_text())
        return
    from cryopick.train import train as run

    overrides = {
        "data.data_dir": str(data_dir) if data_dir else None, "train.exp_name": exp_name, "train.epochs": epochs,
        "data.batch_size": batch_size, "model.backbone": backbone, "loss.prior": prior,
        "loss.expected_particles": expected_particles, "loss.consistency": consistency,
        "model.use_ema": False if no_ema else None, "optim.lr": lr, "train.steps_per_epoch": steps_per_epoch,
        "train.device": device, "train.seed": seed, "train.output_root": output_root,
        "train.compile": True if compile_model else None,
    }
    cfg = resolve(TrainConfig, config, overrides)
    if not cfg.data.data_dir:
        raise CryopickError("give --data-dir (or data.data_dir in the config)")
    if cfg.loss.consistency not in ("selective", "all", "none"):
        raise CryopickError(f"--consistency must be selective, all or none, got {cfg.loss.consistency}")
    result = run(cfg, resume=resume, overwrite=overwrite, quiet=quiet)
    if result.interrupted:
        raise typer.Exit(130)
    if not quiet:
        typer.echo(f"best {cfg.train.monitor} {result.best_metric:.4f} at epoch {result.best_epoch}; "
                   f"checkpoints in {result.exp_dir / 'checkpoints'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
