"""cryopick as a RELION External job, run on a real project layout with the arguments RELION passes.

Layout: MotionCorr/job002/Movies/*.mrc, CtfFind/job003/micrographs_ctf.star, ManualPick/job004/ hand picks
(a coordinate_files list + per-micrograph STARs), External/job005/ for our job. The commands run from the
project directory, as RELION runs them. The RELION 3.1 ``relion_preprocess --extract`` check is skipped when
RELION is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import starfile
from test_pick import RECORD, blob_detector, blob_image, save_model
from typer.testing import CliRunner

from cryopick import pick as pick_module
from cryopick.cli import app
from cryopick.io.mrc import write_mrc
from cryopick.io.outputs import read_coordinate_star
from cryopick.io.relion import star_loop, write_coordinate_files_list, write_coordinate_star, write_micrographs_star
from cryopick.relion_job import (
    ABORT_NOW,
    EXIT_ABORTED,
    EXIT_FAILURE,
    EXIT_SUCCESS,
    AbortWatch,
    RelionJobInputs,
    parse_params,
    relion_version,
    write_relion_outputs,
)
from cryopick.runtime import StopRequest

JOB = "External/job005/"
MICS_STAR = "CtfFind/job003/micrographs_ctf.star"
BLOBS = {  # original px (x, y) on 384×448 (rows × cols) micrographs
    "mic001": [(100.0, 90.0), (300.0, 200.0), (205.0, 300.0)],
    "mic002": [(60.0, 250.0), (380.0, 80.0)],
    "mic003": [(220.0, 190.0)],
}
SHAPE = (384, 448)
PIPELINE = {  # the node table of default_pipeline.star as each RELION version writes it
    3: "# version 30001\n\ndata_pipeline_nodes\n\nloop_ \n_rlnPipeLineNodeName #1 \n_rlnPipeLineNodeType #2 \n"
       "CtfFind/job003/micrographs_ctf.star            1 \n",
    4: "# version 30001\n\ndata_pipeline_nodes\n\nloop_ \n_rlnPipeLineNodeName #1 \n_rlnPipeLineNodeTypeLabel #2 \n"
       "CtfFind/job003/micrographs_ctf.star MicrographsData.star.relion.ctf \n",
    5: "# version 50001\n\ndata_pipeline_nodes\n\nloop_ \n_rlnPipeLineNodeName #1 \n_rlnPipeLineNodeTypeLabel #2 \n"
       "_rlnPipeLineNodeTypeLabelDepth #3 \n"
       "CtfFind/job003/micrographs_ctf.star MicrographGroupMetadata.star.relion.ctf            1 \n",
}
runner = CliRunner()

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def mic_name(stem: str) -> str:
    return f"MotionCorr/job002/Movies/{stem}.mrc"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A RELION 4/5 project directory (the current directory during the test)."""
    monkeypatch.chdir(tmp_path)
    for k, (stem, blobs) in enumerate(BLOBS.items()):
        (tmp_path / mic_name(stem)).parent.mkdir(parents=True, exist_ok=True)
        write_mrc(mic_name(stem), blob_image(SHAPE, blobs, sigma=6.0, amplitude=6.0, noise=0.1, seed=k),
                  pixel_size=2.0)
    names = [mic_name(s) for s in BLOBS]
    (tmp_path / "CtfFind/job003").mkdir(parents=True)
    write_micrographs_star(MICS_STAR, names, pixel_size=2.0, extra={
        "rlnDefocusU": [15000.0] * 3, "rlnDefocusV": [14500.0] * 3, "rlnDefocusAngle": [30.0] * 3})
    for stem in ("mic001", "mic002"):  # hand picks on two micrographs, as ManualPick 4/5 writes them
        xy = np.asarray(BLOBS[stem])
        write_coordinate_star(f"ManualPick/job004/Movies/{stem}_manualpick.star", xy[:, 0], xy[:, 1],
                              np.zeros(len(xy)))
    write_coordinate_files_list("ManualPick/job004/manualpick.star",
                                [(mic_name(s), f"ManualPick/job004/Movies/{s}_manualpick.star")
                                 for s in ("mic001", "mic002")])
    (tmp_path / "default_pipeline.star").write_text(PIPELINE[4])
    (tmp_path / "models").mkdir()
    save_model(tmp_path / "models/blob.pt", blob_detector(), RECORD)
    return tmp_path


def relion_args(*extra: str) -> list[str]:
    """The command line RELION 4/5 builds for an External job (getCommandsExternalJob)."""
    return ["relion", "--o", JOB, "--in_mics", MICS_STAR, *extra, "--j", "1", "--pipeline_control", JOB]


def run_job(*extra: str):
    return runner.invoke(app, relion_args(*extra), catch_exceptions=False)


def exit_files(job_dir) -> set[str]:
    return {p.name for p in job_dir.glob("RELION_JOB_*")}


def test_pick_mode_writes_every_file_relion_reads(project):
    result = run_job("--model", "models/blob.pt", "--threshold", "0.5", "--device", "cpu")
    job_dir = project / JOB
    assert result.exit_code == 0, result.output
    assert exit_files(job_dir) == {EXIT_SUCCESS}
    for stem, blobs in BLOBS.items():  # per-micrograph files mirror the micrograph paths (AutoPick's naming)
        picks = read_coordinate_star(job_dir / f"Movies/{stem}_autopick.star")
        assert len(picks) == len(blobs)
        for x, y in blobs:
            assert np.min(np.hypot(picks.x - x, picks.y - y)) <= 4
    listing = starfile.read(job_dir / "autopick.star", always_dict=True)
    assert list(listing) == ["coordinate_files"]
    table = listing["coordinate_files"]
    assert list(table["rlnMicrographName"]) == [mic_name(s) for s in BLOBS]  # exactly as in the micrographs STAR
    assert list(table["rlnMicrographCoordinates"]) == [f"{JOB}Movies/{s}_autopick.star" for s in BLOBS]
    assert all((project / p).is_file() for p in table["rlnMicrographCoordinates"])  # project-relative
    nodes = starfile.read(job_dir / "RELION_OUTPUT_NODES.star", always_dict=True)
    assert list(nodes) == ["output_nodes"]
    assert nodes["output_nodes"].to_dict("records") == [
        {"rlnPipeLineNodeName": f"{JOB}autopick.star",
         "rlnPipeLineNodeTypeLabel": "MicrographsCoords.star.relion.autopick"}]  # RELION 4.0's AutoPick label
    assert (job_dir / "coords_suffix_autopick.star").read_text().strip() == MICS_STAR


@pytest.mark.skipif(shutil.which("relion_preprocess") is None, reason="relion_preprocess not on PATH")
def test_relion_extracts_exactly_the_picks_of_the_job(project):
    assert run_job("--model", "models/blob.pt", "--device", "cpu").exit_code == 0
    # RELION 3.1 has no --coord_list; the coords_suffix node gives --coord_dir/--coord_suffix (formats.md §1.3)
    result = subprocess.run(
        ["relion_preprocess", "--i", MICS_STAR, "--coord_dir", JOB, "--coord_suffix", "_autopick.star",
         "--part_star", "Extract/job006/particles.star", "--part_dir", "Extract/job006/", "--extract",
         "--extract_size", "64"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    particles = starfile.read("Extract/job006/particles.star", parse_as_string=["rlnMicrographName"])["particles"]
    listing = starfile.read(project / JOB / "autopick.star")
    expected = set()
    for name, coords in zip(listing["rlnMicrographName"], listing["rlnMicrographCoordinates"]):
        picks = read_coordinate_star(coords)
        expected |= {(name, x, y) for x, y in zip(picks.x, picks.y)}
    got = {(r["rlnMicrographName"], r["rlnCoordinateX"], r["rlnCoordinateY"]) for r in particles.to_dict("records")}
    assert got == expected and len(particles) == sum(len(b) for b in BLOBS.values())


@pytest.mark.parametrize("version, node", [
    (3, {"rlnPipeLineNodeName": f"{JOB}coords_suffix_autopick.star", "rlnPipeLineNodeType": 2}),
    (4, {"rlnPipeLineNodeName": f"{JOB}autopick.star",
         "rlnPipeLineNodeTypeLabel": "MicrographsCoords.star.relion.autopick"}),
    (5, {"rlnPipeLineNodeName": f"{JOB}autopick.star",
         "rlnPipeLineNodeTypeLabel": "MicrographCoordsGroup.star.relion.autopick"}),
])
def test_output_node_follows_the_projects_relion_version(project, version, node):
    (project / "default_pipeline.star").write_text(PIPELINE[version])
    (project / JOB / "Movies").mkdir(parents=True)
    (project / JOB / "Movies/mic001_autopick.star").write_text("")
    write_relion_outputs(RelionJobInputs(out=JOB.rstrip("/"), in_mics=MICS_STAR, project_dir=project))
    assert starfile.read(project / JOB / "RELION_OUTPUT_NODES.star").to_dict("records") == [node]
    assert relion_version(project, "auto") == version
    assert relion_version(project, "4.0") == 4  # a Params row wins over the pipeline file
    listing = starfile.read(project / JOB / "autopick.star")  # only micrographs with a coordinate file
    assert list(listing["rlnMicrographName"]) == [mic_name("mic001")]
    assert list(listing["rlnMicrographCoordinates"]) == [f"{JOB}Movies/mic001_autopick.star"]


def test_continue_picks_only_what_is_missing_and_relists_everything(project):
    assert run_job("--model", "models/blob.pt", "--device", "cpu").exit_code == 0
    job_dir = project / JOB
    kept = job_dir / "Movies/mic001_autopick.star"
    before = kept.stat().st_mtime_ns
    (job_dir / "Movies/mic003_autopick.star").unlink()
    (job_dir / EXIT_SUCCESS).unlink()
    (job_dir / EXIT_FAILURE).write_text("an earlier failure\n")
    result = run_job("--model", "models/blob.pt", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert exit_files(job_dir) == {EXIT_SUCCESS}
    assert kept.stat().st_mtime_ns == before
    assert len(read_coordinate_star(job_dir / "Movies/mic003_autopick.star")) == 1
    assert len(starfile.read(job_dir / "autopick.star")) == 3


def test_abort_stops_between_micrographs_and_continue_finishes(project, monkeypatch):
    job_dir = project / JOB
    original = pick_module._pick_one

    def pick_then_abort(*args, **kwargs):  # the user presses Abort while the first micrograph is picked
        found = original(*args, **kwargs)
        (job_dir / ABORT_NOW).touch()
        return found

    monkeypatch.setattr(pick_module, "_pick_one", pick_then_abort)
    result = run_job("--model", "models/blob.pt", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert exit_files(job_dir) == {EXIT_ABORTED}  # the abort request is removed, the verdict written
    assert sorted(p.name for p in (job_dir / "Movies").iterdir()) == ["mic001_autopick.star"]
    assert len(starfile.read(job_dir / "autopick.star")) == 1

    monkeypatch.setattr(pick_module, "_pick_one", original)
    result = run_job("--model", "models/blob.pt", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert exit_files(job_dir) == {EXIT_SUCCESS}
    assert len(starfile.read(job_dir / "autopick.star")) == 3


def test_abort_before_start_does_nothing_but_say_so(project):
    (project / JOB).mkdir(parents=True)
    (project / JOB / ABORT_NOW).touch()
    assert run_job("--model", "models/blob.pt").exit_code == 2
    assert exit_files(project / JOB) == {EXIT_ABORTED}
    assert not (project / JOB / "Movies").exists()


def test_abort_during_training_becomes_a_clean_stop_request(tmp_path):
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a job started in the background
    watch = AbortWatch(tmp_path)
    stop = StopRequest()  # what cryopick.train installs (cryopick.runtime): SIGINT → stop after this step
    try:
        with watch.interrupting():
            (tmp_path / ABORT_NOW).touch()
            deadline = time.monotonic() + 5
            while not stop.requested and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        stop.close()
    assert stop.requested and watch.requested()
    assert signal.getsignal(signal.SIGINT) is before


TRAIN_PARAMS = ("--diameter", "40", "--epochs", "1", "--steps_per_epoch", "2", "--backbone", "resnet8",
                "--unlabeled_per_micrograph", "40", "--device", "cpu", "--threshold", "0.0", "--max_picks", "5")


def write_particles_star(path: str) -> None:
    """Hand picks as a particles STAR (e.g. from Select or a subset of an Extract job)."""
    rows = [(mic_name(s), float(x), float(y)) for s in ("mic001", "mic002") for x, y in BLOBS[s]]
    (Path(path).parent).mkdir(parents=True, exist_ok=True)
    Path(path).write_text(star_loop("particles", ["rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY"], rows))


@pytest.mark.parametrize("hand_picks", [("--in_coords", "ManualPick/job004/manualpick.star"),
                                        ("--in_parts", "Select/job004/particles.star")])
def test_train_then_pick_in_one_job(project, hand_picks):
    write_particles_star("Select/job004/particles.star")
    result = run_job(*hand_picks, *TRAIN_PARAMS)
    job_dir = project / JOB
    assert result.exit_code == 0, result.output
    assert exit_files(job_dir) == {EXIT_SUCCESS}
    manifest = json.loads((job_dir / "cryopick/dataset/manifest.json").read_text())
    # only the hand-picked micrographs are extracted: dense training reads nothing else
    assert sorted(Path(m["path"]).name for m in manifest["micrographs"]) == ["mic001.mrc", "mic002.mrc"]
    assert (job_dir / "cryopick/experiment/checkpoints/best.pt").is_file()
    listing = starfile.read(job_dir / "autopick.star")
    assert list(listing["rlnMicrographName"]) == [mic_name(s) for s in BLOBS]
    assert all(len(read_coordinate_star(p)) == 5 for p in listing["rlnMicrographCoordinates"])
    # continue: training is kept, nothing is redone
    result = run_job(*hand_picks, *TRAIN_PARAMS)
    assert result.exit_code == 0, result.output
    assert "training already finished" in result.output
    # continue with other training rows: not silently the old training
    changed = [("3" if value == "1" else value) for value in TRAIN_PARAMS]  # --epochs 3
    result = run_job(*hand_picks, *changed)
    assert result.exit_code == 1 and exit_files(job_dir) == {EXIT_FAILURE}
    assert "train.epochs: 1 → 3" in (job_dir / EXIT_FAILURE).read_text()


def test_bad_parameters_fail_with_one_clear_line(project):
    result = run_job("--model", "models/blob.pt", "--box_size", "128")
    assert result.exit_code == 1
    assert exit_files(project / JOB) == {EXIT_FAILURE}
    message = (project / JOB / EXIT_FAILURE).read_text()
    assert "unknown parameter --box_size" in message and "diameter" in message
    assert "Traceback" not in result.output
    result = run_job("--in_coords", "ManualPick/job004/manualpick.star")
    assert result.exit_code == 1 and "diameter" in (project / JOB / EXIT_FAILURE).read_text()
    result = run_job("--in_coords", "ManualPick/job004/manualpick.star", "--diameter", "-150")
    assert "--diameter -150: expected a positive diameter in Å" in (project / JOB / EXIT_FAILURE).read_text()
    result = run_job("--model", "models")
    assert result.exit_code == 1 and "models: is a directory" in (project / JOB / EXIT_FAILURE).read_text()


def test_parse_params_types_spellings_and_errors():
    settings = parse_params(["--diameter", "150", "--balanced-prior=0.5", "--epochs", "10", "--threshold", "",
                             "--edge", "-1"])
    assert (settings.diameter, settings.balanced_prior, settings.epochs, settings.threshold, settings.edge) == (
        150.0, 0.5, 10, None, -1.0)  # threshold None: pick's default for the model
    with pytest.raises(Exception, match="expected float"):
        parse_params(["--diameter", "big"])
    with pytest.raises(Exception, match="expected auto, 3, 4 or 5"):
        relion_version(Path("."), "6")
    assert parse_params(["--threshold", "--diameter", "80"]).threshold is None  # an empty Params value
    assert parse_params(["--threshold", "0.3"]).threshold == 0.3
    with pytest.raises(Exception, match="unexpected argument"):
        parse_params(["150"])
    assert parse_params(["--expected", "250"]).expected_particles == 250.0  # the row's old label
    assert parse_params(["--expected-particles", "250"]).expected_particles == 250.0


def test_cryopick_relion_entry_point_takes_relion_command_line(project):
    """The console script `cryopick-relion`, called as RELION calls it (an empty Params value included)."""
    script = "import sys; from cryopick.cli import relion_main; sys.argv[0] = 'cryopick-relion'; relion_main()"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-c", script, "--o", JOB, "--in_mics", MICS_STAR, "--model", "models/blob.pt",
               "--device", "cpu", "--threshold", "--j", "1", "--pipeline_control", JOB]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert exit_files(project / JOB) == {EXIT_SUCCESS}
    assert len(starfile.read(project / JOB / "autopick.star")) == 3


def test_micrographs_of_one_name_in_two_jobs_are_not_listed_with_each_others_picks(project):
    # MotionCorr/job002/Movies/mic001.mrc and job009/Movies/mic001.mrc give one coordinate file name: the second
    # fails in pick, and autopick.star must not pair it with the first one's picks
    other = "MotionCorr/job009/Movies/mic001.mrc"
    Path(other).parent.mkdir(parents=True)
    shutil.copy(mic_name("mic001"), other)
    write_micrographs_star(MICS_STAR, [mic_name(s) for s in BLOBS] + [other], pixel_size=2.0)
    result = run_job("--model", "models/blob.pt", "--threshold", "0.5", "--device", "cpu")
    assert result.exit_code == 0, result.output
    listing = starfile.read(project / JOB / "autopick.star")
    assert list(listing["rlnMicrographName"]) == [mic_name(s) for s in BLOBS]
    assert list(listing["rlnMicrographCoordinates"]) == [f"{JOB}Movies/{s}_autopick.star" for s in BLOBS]


@pytest.mark.parametrize("out", ["../elsewhere/", "/tmp/job/", ".", ""])
def test_a_job_directory_outside_the_project_is_refused(project, out):
    result = runner.invoke(app, ["relion", "--o", out, "--in_mics", MICS_STAR, "--model", "models/blob.pt"])
    assert result.exit_code == 1 and "--o" in result.output
    assert not (project / "autopick.star").exists() and not (project.parent / "elsewhere").exists()


def test_bad_pick_settings_fail_before_any_training(project):
    result = run_job("--in_coords", "ManualPick/job004/manualpick.star", "--diameter", "150", "--threshold", "1.5")
    assert result.exit_code == 1 and exit_files(project / JOB) == {EXIT_FAILURE}
    assert "--threshold" in (project / JOB / EXIT_FAILURE).read_text()
    assert not (project / JOB / "cryopick").exists()  # nothing was extracted or trained


def test_advice_naming_command_line_options_says_what_to_do_in_relion():
    from cryopick.relion_job import in_relion_terms

    assert in_relion_terms("x already holds picks made with another model; Use --overwrite").endswith(
        "[in RELION: run a new External job (the job's own --o is fixed)]")
    assert in_relion_terms("parameter --diameter -1: expected a positive diameter in Å") == (
        "parameter --diameter -1: expected a positive diameter in Å")


def test_two_runs_of_one_job_at_once_are_refused_and_a_killed_runs_lock_is_taken_over(project):
    import socket

    job_dir = project / JOB
    job_dir.mkdir(parents=True)
    lock = job_dir / ".cryopick.lock"
    lock.write_text(f"{socket.gethostname()} {os.getpid()}\n")  # a live run (this process) holds the job
    result = run_job("--model", "models/blob.pt", "--device", "cpu")
    assert result.exit_code == 1 and "another run is using it" in result.output
    assert exit_files(job_dir) == set()  # the running job's verdict is its own to write
    lock.write_text(f"{socket.gethostname()} 999999999\n")  # left by a killed run
    result = run_job("--model", "models/blob.pt", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert exit_files(job_dir) == {EXIT_SUCCESS} and not lock.exists()


def test_the_last_line_names_the_node_relion_3_extracts_from(project):
    (project / "default_pipeline.star").write_text(PIPELINE[3])
    result = run_job("--model", "models/blob.pt", "--device", "cpu")
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and f"coordinates for Particle extraction: {JOB}coords_suffix_autopick.star" in text
