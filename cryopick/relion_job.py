"""cryopick as a RELION External job: ``cryopick relion --o External/job005/ --in_mics ... [--in_coords|--in_parts]``.

The contract, as RELION's External job type defines it (RELION docs "External jobs"; ``pipeline_jobs.cpp
getCommandsExternalJob``; ``pipeliner.cpp PipeLine::getOutputNodesFromStarFile``; public wrappers such as
azazellochg/relion-external-jobs ``external_job_cryolo.py`` and DiamondLightSource/python-relion-yolo-it):

- RELION runs the executable from the project directory with ``--o JOBDIR/``, the Input tab's nodes
  (``--in_mics``, ``--in_coords``, ``--in_parts``, ...), ``--j N``, ``--pipeline_control JOBDIR/`` and every
  row of the Params tab as ``--LABEL VALUE``.
- The job writes ``RELION_JOB_EXIT_SUCCESS`` or ``RELION_JOB_EXIT_FAILURE`` into JOBDIR. When the user presses
  Abort, RELION creates ``RELION_JOB_ABORT_NOW``; the job stops, removes it and writes ``RELION_JOB_EXIT_ABORTED``.
- ``RELION_OUTPUT_NODES.star`` (block ``output_nodes``) declares the outputs. RELION 4/5 read
  ``rlnPipeLineNodeName`` + ``rlnPipeLineNodeTypeLabel``; a picker's node is its ``coordinate_files`` list
  labeled ``LABEL_AUTOPICK_COORDS`` of ``pipeline_jobs.h`` (AutoPick writes ``AutoPick/jobNNN/autopick.star``
  with it): ``MicrographsCoords.star.relion.autopick`` in RELION 4.0, ``MicrographCoordsGroup.star.relion.autopick``
  in 5.0, whose node types were renamed (``MicrographGroupMetadata``, ``ParticleGroupMetadata``, ...). The GUI
  lists a node as coordinates by that type name. RELION 3.1 reads ``rlnPipeLineNodeName`` + the integer
  ``rlnPipeLineNodeType``, 2 = a ``coords_suffix_*.star`` node. The version comes from the project's
  ``default_pipeline.star`` (its columns, ``# version`` line and type names) unless a Params row says.

Outputs in JOBDIR: ``<post of rlnMicrographName without extension>_autopick.star`` per micrograph (AutoPick's
naming, e.g. ``External/job005/Movies/mic001_autopick.star``), ``autopick.star`` (``coordinate_files`` list,
project-relative paths), ``coords_suffix_autopick.star`` (RELION 3.1), ``RELION_OUTPUT_NODES.star`` and the
exit file. Training mode keeps its dataset and experiment in ``JOBDIR/cryopick/``. "Continue" re-runs the
same command: extraction and training already finished are kept, an interrupted training resumes from
``last.pt``, micrographs already picked are skipped, and the list and node files are rewritten.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from cryopick.config import DEFAULT_THRESHOLD
from cryopick.errors import CryopickError
from cryopick.fsutil import run_lock, write_json_atomic, write_text_atomic
from cryopick.io.micrographs import find_micrographs
from cryopick.io.pickmarker import ListFiles
from cryopick.io.relion import star_loop, write_coordinate_files_list
from cryopick.progress import console, info, warn

EXIT_SUCCESS = "RELION_JOB_EXIT_SUCCESS"
EXIT_FAILURE = "RELION_JOB_EXIT_FAILURE"
EXIT_ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
OUTPUT_NODES = "RELION_OUTPUT_NODES.star"
COORDINATE_LIST = "autopick.star"
SUFFIX = "autopick"  # per-micrograph files <post>_autopick.star, as RELION's own AutoPick names them
LABEL_AUTOPICK_COORDS = {4: "MicrographsCoords.star.relion.autopick",  # RELION 4.0 pipeline_jobs.h
                         5: "MicrographCoordsGroup.star.relion.autopick"}  # RELION 5.0 pipeline_jobs.h
NODE_TYPE_COORDS_31 = 2  # RELION 3.1 NODE_MIC_COORDS: a coords_suffix file
WORK_DIR = "cryopick"  # JOBDIR/cryopick/{dataset,experiment}
TRAINED_MARKER = "trained.json"
ABORT_POLL_S = 0.2


@dataclass(frozen=True)
class Param:
    kind: type
    help: str


# Rows a user may put in the External job's Params tab (label → value). Hyphens and underscores are equal.
PARAMS: dict[str, Param] = {
    "model": Param(str, "checkpoint from cryopick train (best.pt): pick only, no training"),
    "diameter": Param(float, "particle diameter, Å (needed to train on hand picks)"),
    "threshold": Param(float, f"probability 0–1 a pick must reach (default: as cryopick pick, "
                       f"{DEFAULT_THRESHOLD:g} or lower for a weak model; also select later on the FOM)"),
    "epochs": Param(int, "training epochs"),
    "steps_per_epoch": Param(int, "batches per training epoch"),
    "backbone": Param(str, "resnet8 (small, CPU), resnet18, resnet34, resnet50"),
    "device": Param(str, "auto (GPU when present), cpu, cuda or cuda:N"),
    "expected_particles": Param(float, "particles per micrograph: calibrates the picks, reports its pick "
                                "threshold"),
    "balanced_prior": Param(float, "imbalanced nnPU prior π' (e.g. 0.5)"),
    "val_fraction": Param(float, "extract's val split (micrographs); training holds out a fifth of each "
                                    "micrograph's labels instead"),
    "unlabeled_per_micrograph": Param(int, "extract's unlabeled patches per micrograph (default: by area; "
                                            "not used by the job's dense training)"),
    "edge": Param(float, "drop picks closer than this to an edge, original px"),
    "max_picks": Param(int, "at most this many picks per micrograph"),
    "seed": Param(int, "random seed"),
    "relion_version": Param(str, "auto (from default_pipeline.star), 3 (3.1), 4 or 5: the output node's type"),
}
RENAMED_PARAMS = {"expected": "expected_particles"}  # old row labels still accepted


@dataclass
class RelionJobInputs:
    """What RELION passes besides the Params rows."""

    out: str  # JOBDIR as given, e.g. External/job005/
    in_mics: str | None = None
    in_coords: str | None = None
    in_parts: str | None = None
    threads: int = 1
    project_dir: Path = field(default_factory=Path.cwd)


@dataclass
class RelionJobSettings:
    """The Params rows, typed. ``model`` set: pick only; else train on the hand picks, then pick."""

    model: str | None = None
    diameter: float | None = None
    threshold: float | None = None  # None: pick's default (cryopick.calibrate.default_threshold)
    epochs: int | None = None
    steps_per_epoch: int | None = None
    backbone: str | None = None
    device: str = "auto"
    expected_particles: float | None = None
    balanced_prior: float | None = None
    val_fraction: float | None = None
    unlabeled_per_micrograph: int | None = None
    edge: float = 0.0
    max_picks: int | None = None
    seed: int | None = None
    relion_version: str = "auto"


def parse_params(args: list[str]) -> RelionJobSettings:
    """``--label value`` pairs (also ``--label=value``) → settings; unknown labels are a clear error.

    RELION writes a Params row as `` --label value`` even when the value is empty, so a label followed by
    another option (or nothing) keeps its default.
    """
    values: dict[str, Any] = {}
    k = 0
    while k < len(args):
        token = args[k]
        if not token.startswith("--") or len(token) < 3:
            raise CryopickError(f"unexpected argument {token!r}: parameters come as --name value")
        name, sep, value = token[2:].partition("=")
        if not sep:
            has_value = k + 1 < len(args) and (not args[k + 1].startswith("--") or _is_number(args[k + 1]))
            value = args[k + 1] if has_value else ""
            k += 1 if has_value else 0
        k += 1
        key = name.replace("-", "_")
        key = RENAMED_PARAMS.get(key, key)
        if key not in PARAMS:
            known = ", ".join(PARAMS)
            raise CryopickError(f"unknown parameter --{name} (the Params tab accepts: {known})")
        if value.strip() == "":
            continue  # an empty Params row: keep the default
        values[key] = _convert(key, value.strip())
    return RelionJobSettings(**values)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _convert(key: str, value: str) -> Any:
    kind = PARAMS[key].kind
    try:
        return kind(float(value)) if kind is int and float(value).is_integer() else kind(value)
    except ValueError:
        raise CryopickError(f"parameter --{key} {value!r}: expected {kind.__name__} ({PARAMS[key].help})") from None


# ---------------------------------------------------------------------------------------------
# abort


class AbortWatch:
    """RELION's abort request: the file ``RELION_JOB_ABORT_NOW`` in the job directory."""

    def __init__(self, job_dir: Path):
        self.path = job_dir / ABORT_NOW
        self.seen = False

    def requested(self) -> bool:
        self.seen = self.seen or self.path.exists()
        return self.seen

    @contextlib.contextmanager
    def interrupting(self) -> Iterator[None]:
        """While inside, an abort file sends this process SIGINT once.

        The StopRequest train installs (cryopick.runtime) turns SIGINT into "finish this step, save last.pt,
        return interrupted", so an abort during training stops cleanly and "continue" resumes it. Only from the
        main thread, where Python delivers signals.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        done = threading.Event()

        def poll() -> None:
            while not done.wait(ABORT_POLL_S):
                if self.requested():
                    os.kill(os.getpid(), signal.SIGINT)
                    return

        watcher = threading.Thread(target=poll, name="cryopick-relion-abort", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()


# ---------------------------------------------------------------------------------------------
# the job


def run_external_job(inputs: RelionJobInputs, params: list[str], quiet: bool = False) -> int:
    """Run the External job and write its exit file; returns the exit status (0 done, 1 failed, 2 aborted)."""
    problem = job_dir_problem(inputs.out)
    if problem:  # no job directory to write a verdict file into
        console.print(f"[red]error:[/red] --o {inputs.out!r}: {problem}", highlight=False, soft_wrap=True)
        return 1
    job_dir = _job_dir(inputs)
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        console.print(f"[red]error:[/red] --o {inputs.out}: cannot create the job directory ({exc.strerror})",
                      highlight=False, soft_wrap=True)
        return 1
    try:
        with run_lock(job_dir):
            return _run_locked(inputs, params, job_dir, quiet)
    except CryopickError as exc:  # the lock: another run of this job is going on; its verdict is its own
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 1


def _run_locked(inputs: RelionJobInputs, params: list[str], job_dir: Path, quiet: bool) -> int:
    for name in (EXIT_SUCCESS, EXIT_FAILURE, EXIT_ABORTED):
        (job_dir / name).unlink(missing_ok=True)  # a continued job starts without a verdict
    abort = AbortWatch(job_dir)
    try:
        finished = _run(inputs, parse_params(params), abort, quiet)
    except CryopickError as exc:
        return _fail(job_dir, in_relion_terms(str(exc)))
    except KeyboardInterrupt:
        if not abort.requested():
            return _fail(job_dir, "interrupted (Ctrl-C or SIGTERM); continue the job to resume")
        finished = False
    except Exception as exc:  # a bug, not bad input: still a verdict file for RELION
        if os.environ.get("CRYOPICK_DEBUG"):
            raise
        return _fail(job_dir, f"internal error: {type(exc).__name__}: {exc} (please report it; "
                              "set CRYOPICK_DEBUG=1 for the traceback)")
    if not finished:
        abort.path.unlink(missing_ok=True)
        (job_dir / EXIT_ABORTED).touch()
        console.print(f"aborted as RELION asked; continue the job to finish it ({job_dir / EXIT_ABORTED})",
                      highlight=False)
        return 2
    (job_dir / EXIT_SUCCESS).touch()
    return 0


def in_relion_terms(message: str) -> str:
    """A library message whose advice names command-line options a RELION user cannot give, with what to do
    in RELION instead."""
    if any(option in message for option in ("--overwrite", "--resume", "--out")):
        return message + " [in RELION: run a new External job (the job's own --o is fixed)]"
    return message


def job_dir_problem(out: str) -> str | None:
    """Why ``out`` is not a job directory as RELION passes it (``External/job012/``: relative, inside the
    project, not the project itself), or None."""
    path = PurePosixPath(str(out).replace("\\", "/"))
    if not str(out).strip() or path.is_absolute() or path.parts in ((), (".",)):
        return "expected the job directory RELION passes, relative to the project (e.g. External/job012/)"
    if ".." in path.parts:
        return "the job directory must lie inside the project (no '..')"
    return None


def _job_dir(inputs: RelionJobInputs) -> Path:
    out = Path(inputs.out)
    return out if out.is_absolute() else inputs.project_dir / out


def _fail(job_dir: Path, message: str) -> int:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)  # stderr: RELION's run.err
    write_text_atomic(job_dir / EXIT_FAILURE, message + "\n")
    return 1


def _run(inputs: RelionJobInputs, settings: RelionJobSettings, abort: AbortWatch, quiet: bool) -> bool:
    """True when every step finished, False when RELION asked to abort."""
    if not inputs.in_mics:
        raise CryopickError("no input micrographs: set 'Input micrographs' (--in_mics) in the Input tab")
    if abort.requested():
        return False
    pick_config = _pick_config(settings)  # bad pick settings fail now, not after a whole training
    version = relion_version(inputs.project_dir, settings.relion_version)
    _use_threads(inputs.threads, settings.device)
    if settings.model:
        model = Path(settings.model)
        model = model if model.is_absolute() else inputs.project_dir / model
        if model.is_dir():
            raise CryopickError(f"model {settings.model}: is a directory; give the checkpoint file from cryopick "
                                "train (e.g. its checkpoints/best.pt)")
        if not model.is_file():
            raise CryopickError(f"model {settings.model}: file not found (give a checkpoint from cryopick train)")
    else:
        model = _train(inputs, settings, abort, quiet)
        if model is None:
            return False
    summary = _pick(inputs, pick_config, model, abort, quiet)
    write_relion_outputs(inputs, str(version))
    node = ListFiles(SUFFIX).coords_suffix if version == 3 else COORDINATE_LIST  # what the version's Extract reads
    info(f"{len(summary.counts)} micrographs picked now ({summary.total_picks} particles), "
         f"{len(summary.skipped)} kept from before; coordinates for Particle extraction: "
         f"{_node_name(inputs.out, node)}", quiet)
    return not (summary.stopped or abort.requested())


def _use_threads(threads: int, device: str) -> None:
    """RELION's --j: torch's CPU threads (on a GPU the job's threads only read micrographs)."""
    import torch

    if threads >= 1 and not (device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())):
        torch.set_num_threads(threads)


def _train(inputs: RelionJobInputs, settings: RelionJobSettings, abort: AbortWatch, quiet: bool) -> Path | None:
    """Extract + train inside the job directory; the best checkpoint, or None when aborted."""
    from cryopick.config import ExtractConfig, TrainConfig, resolve
    from cryopick.dataset import MANIFEST
    from cryopick.extract import extract, print_summary
    from cryopick.train import train

    coords = inputs.in_coords or inputs.in_parts
    if inputs.in_coords and inputs.in_parts:
        warn(f"both input coordinates ({inputs.in_coords}) and input particles ({inputs.in_parts}) given: "
             "training on the coordinates; the particles are not used")
    if not coords:
        raise CryopickError("nothing to train on and no model: give hand picks (Input tab: coordinates from "
                            "Manual picking, --in_coords, or a particles STAR, --in_parts), or a 'model' "
                            "row in the Params tab to pick with a trained checkpoint")
    if settings.diameter is None:
        raise CryopickError("training needs the particle diameter: add a Params row 'diameter' (Å)")
    if settings.diameter <= 0:
        raise CryopickError(f"parameter --diameter {settings.diameter:g}: expected a positive diameter in Å")
    work = _job_dir(inputs) / WORK_DIR
    dataset, exp_dir = work / "dataset", work / "experiment"
    best = exp_dir / "checkpoints" / "best.pt"
    # every setting is checked before the extraction, which can take long
    extract_cfg = resolve(ExtractConfig, None, {
        "diameter": settings.diameter, "val_fraction": settings.val_fraction, "seed": settings.seed,
        "unlabeled_per_micrograph": settings.unlabeled_per_micrograph, "workers": 1, "overwrite": True,
        "labeled_only": True})  # dense training reads only the labeled micrographs
    train_cfg = resolve(TrainConfig, None, {
        "data.data_dir": str(dataset), "train.output_root": str(work), "train.exp_name": exp_dir.name,
        "train.epochs": settings.epochs, "train.steps_per_epoch": settings.steps_per_epoch,
        "model.backbone": settings.backbone, "train.device": settings.device, "train.seed": settings.seed,
        "loss.expected_particles": settings.expected_particles, "loss.balanced_prior": settings.balanced_prior})
    if (work / TRAINED_MARKER).is_file() and best.is_file():
        _check_same_training(best, train_cfg, settings.diameter)
        info(f"continuing: training already finished ({best})", quiet)
        return best
    if not (dataset / MANIFEST).is_file():
        # overwrite=True: replaces the remains of an extraction that was aborted before its manifest
        summary = extract(inputs.in_mics, coords, dataset, extract_cfg, project_dir=inputs.project_dir, quiet=quiet)
        if not quiet:
            print_summary(summary)
    if abort.requested():
        return None
    resume = (exp_dir / "checkpoints" / "last.pt").is_file()
    with abort.interrupting():
        result = train(train_cfg, resume=resume, quiet=quiet)
    if result.interrupted:
        if abort.requested():
            return None
        raise KeyboardInterrupt
    write_json_atomic(work / TRAINED_MARKER, {"checkpoint": str(best), "best_epoch": result.best_epoch})
    return best


def _check_same_training(best: Path, train_cfg, diameter: float) -> None:
    """Continue of a finished training must ask for the same training: other Params rows need a new job."""
    from cryopick.checkpoint import load_checkpoint
    from cryopick.config import to_dict
    from cryopick.trainplan import resume_differences

    ckpt = load_checkpoint(best)
    saved = ckpt.get("config")
    record = ckpt.get("preprocess") if isinstance(ckpt.get("preprocess"), dict) else {}
    differences = resume_differences(saved if isinstance(saved, dict) else {}, to_dict(train_cfg),
                                     {"diameter_A": record.get("diameter_A")}, {"diameter_A": float(diameter)})
    if differences:
        raise CryopickError(f"this job already trained {best} with other Params ({'; '.join(differences[:4])}); "
                            "a finished training is not redone: run a new job for other training settings")


def _pick_config(settings: RelionJobSettings):
    """The Params rows as a validated PickConfig."""
    from cryopick.config import PickConfig, resolve

    return resolve(PickConfig, None, {"threshold": settings.threshold, "suffix": SUFFIX, "device": settings.device,
                                      "expected_particles": settings.expected_particles, "edge": settings.edge,
                                      "max_picks": settings.max_picks})


def _pick(inputs: RelionJobInputs, config, model: Path, abort: AbortWatch, quiet: bool):
    from cryopick.pick import pick

    # the job directory as RELION gave it (relative to the project), so pick's own lists use RELION's paths
    return pick(inputs.in_mics, model, inputs.out, config, quiet=quiet, project_dir=inputs.project_dir,
                stop=abort.requested)


# ---------------------------------------------------------------------------------------------
# RELION's list and node files


def _node_name(out: str, relative: str) -> str:
    """A job-directory file as RELION names nodes: ``External/job005/autopick.star``."""
    return str(PurePosixPath(str(out).replace("\\", "/").rstrip("/") or ".") / relative)


def relion_version(project_dir: Path, setting: str = "auto") -> int:
    """3, 4 or 5 (major): the Params row, else the project's ``default_pipeline.star``, else 5 (current)."""
    if setting.strip() not in ("auto", ""):
        major = setting.strip().split(".")[0]
        if major not in ("3", "4", "5"):
            raise CryopickError(f"parameter --relion_version {setting!r}: expected auto, 3, 4 or 5")
        return int(major)
    try:
        text = (project_dir / "default_pipeline.star").read_text(errors="replace")
    except OSError:
        return 5
    if "_rlnPipeLineNodeTypeLabel" not in text:
        return 3 if "_rlnPipeLineNodeType" in text else 5
    # 5.0 writes "# version 50001", the optional depth column and the renamed *Group* node types
    new_names = ("# version 5", "_rlnPipeLineNodeTypeLabelDepth", "GroupMetadata.star", "MicrographCoordsGroup")
    return 5 if any(marker in text for marker in new_names) else 4


def write_relion_outputs(inputs: RelionJobInputs, version_setting: str = "auto") -> list[Path]:
    """``autopick.star`` for every micrograph pick wrote a coordinate file for, and ``RELION_OUTPUT_NODES.star``.

    The micrographs are paired with their files as pick planned them: two micrographs whose names give the
    same file name (``job002/Movies/a.mrc``, ``job009/Movies/a.mrc``) leave the second unpicked, not listed
    with the first one's picks."""
    from cryopick.io.outputs import plan_outputs

    job_dir = _job_dir(inputs)
    entries = sorted(find_micrographs(inputs.in_mics, project_dir=inputs.project_dir), key=lambda e: e.name)
    plans, _ = plan_outputs(entries, SUFFIX, ListFiles(SUFFIX).all())
    rows = [(p.entry.name, _node_name(inputs.out, p.star)) for p in plans if (job_dir / p.star).is_file()]
    write_coordinate_files_list(job_dir / COORDINATE_LIST, rows)
    version = relion_version(inputs.project_dir, version_setting)
    if version == 3:
        node = star_loop("output_nodes", ["rlnPipeLineNodeName", "rlnPipeLineNodeType"],
                         [(_node_name(inputs.out, ListFiles(SUFFIX).coords_suffix), NODE_TYPE_COORDS_31)])
    else:
        node = star_loop("output_nodes", ["rlnPipeLineNodeName", "rlnPipeLineNodeTypeLabel"],
                         [(_node_name(inputs.out, COORDINATE_LIST), LABEL_AUTOPICK_COORDS[version])])
    write_text_atomic(job_dir / OUTPUT_NODES, node)
    return [job_dir / COORDINATE_LIST, job_dir / OUTPUT_NODES]

