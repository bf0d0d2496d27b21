"""The first hour: summaries that say what happened and what to run next (values checked, not just presence)."""

from pathlib import Path

from helpers import plain as _plain
from typer.testing import CliRunner

from cryopick.cli import app
from cryopick.config import ExtractConfig
from cryopick.extract import extract, print_summary
from cryopick.pick import PickSummary
from cryopick.pick import next_steps as pick_next_steps
from cryopick.pick import print_summary as print_pick_summary
from cryopick.report import (
    holdout_warning,
    next_steps_extract,
    next_steps_train,
    pick_count_lines,
    pick_counts,
    train_summary,
)

# ---------------------------------------------------------------------------------------------- pick


def test_pick_counts_min_median_max_and_outliers():
    counts = {"m1": 40, "m2": 50, "m3": 45, "m4": 10, "m5": 200, "m6": 55, "m7": 0}
    stats = pick_counts(counts)
    assert (stats.n, stats.minimum, stats.median, stats.maximum) == (7, 0, 45.0, 200)
    # outside [45/3, 3·45] = [15, 135]: m7 (0) and m4 (10) are low, m5 (200) is high
    assert stats.low == [("m7", 0), ("m4", 10)] and stats.high == [("m5", 200)]
    lines = pick_count_lines(stats)
    assert lines[0] == "picks per micrograph: min 0, median 45, max 200 (7 micrographs)"
    assert "< 15" in lines[1] and "m7 (0), m4 (10)" in lines[1]
    assert "> 135" in lines[2] and "m5 (200)" in lines[2]


def test_pick_counts_even_median_few_micrographs_and_cap():
    assert pick_counts({"a": 1, "b": 4}).median == 2.5
    assert pick_counts({"a": 1, "b": 100}).low == []  # two micrographs: nothing to compare against
    assert pick_counts({}) is None and pick_count_lines(None) == []
    many = {f"low{i:02d}": 1 for i in range(12)} | {f"ok{i:02d}": 30 for i in range(20)}
    lines = pick_count_lines(pick_counts(many))
    assert "low00 (1)" in lines[1] and "low09 (1)" in lines[1] and "low10" not in lines[1]
    assert lines[1].endswith("… and 2 more")
    zero = pick_count_lines(pick_counts({"a": 0, "b": 0, "c": 5}))
    assert "lower --threshold" in zero[1]


def test_pick_summary_prints_the_spread_and_next_steps(capsys):
    summary = PickSummary(counts={"mic_a": 30, "mic_b": 33, "mic_c": 2, "mic_d": 31}, out_dir=Path("External/job010"),
                          suffix="cryopick", seconds=1.0)
    print_pick_summary(summary)
    err = _plain(capsys.readouterr().err)
    assert "picks per micrograph: min 2, median 30.5, max 33 (4 micrographs)" in err
    assert "mic_c (2)" in err
    lines = pick_next_steps(summary)
    assert len(lines) == 2
    assert "RELION 3.1" in lines[0] and "External/job010/coords_suffix_cryopick.star" in lines[0]
    assert "--coord_suffix _cryopick.star" in lines[0]
    assert "RELION 4/5" in lines[1] and "External/job010/coordinates_cryopick.star" in lines[1]


# ---------------------------------------------------------------------------------------------- extract


def test_holdout_warning_numbers():
    text = holdout_warning({"train": 41, "val": 41}, {"train": 1, "val": 1})
    assert "1 of 2 labeled micrographs: 41 of 82 labeled particles (50%) will not train with train --mode patches" \
        in text
    assert "--val-fraction 0" in text
    assert holdout_warning({"train": 80, "val": 20}, {"train": 8, "val": 2}) is None  # 20%: expected
    assert holdout_warning({"train": 0, "val": 0}, {}) is None


def test_extract_summary_says_how_many_labels_are_held_out(tiny_project, capsys):
    root, coords = tiny_project  # mic_a: 3 labels, mic_b: 2 labels, mic_c: none
    summary = extract(str(root / "mics"), str(root / "labels"), root / "ds",
                      ExtractConfig(diameter=128.0, bin=2, unlabeled_per_micrograph=20, val_fraction=0.5, seed=3),
                      quiet=True)
    assert summary.n_labeled_micrographs == {"train": 1, "val": 1}
    held = summary.n_positive["val"]
    assert held in (2, 3) and summary.n_positive["train"] == 5 - held
    print_summary(summary)
    err = _plain(capsys.readouterr().err)
    assert f"1 of 2 labeled micrographs: {held} of 5 labeled particles ({100 * held / 5:.0f}%)" in err
    assert "--val-fraction 0" in err
    import json

    manifest = json.loads((root / "ds" / "manifest.json").read_text())
    assert manifest["inputs"]["micrographs"] == str(root / "mics")


def test_extract_next_step_is_the_train_command():
    cpu = next_steps_extract("work/ds", cuda=False)
    assert cpu[0] == "next: cryopick train --data-dir work/ds --exp-name ds --backbone resnet8"
    assert "no particle count is needed" in cpu[1] and "--expected-particles" in cpu[1]
    gpu = next_steps_extract("my data/ds", cuda=True)
    assert gpu[0] == "next: cryopick train --data-dir 'my data/ds' --exp-name ds"


def test_cli_extract_prints_next_step_and_quiet_suppresses_it(tiny_project):
    root, _ = tiny_project
    args = ["extract", str(root / "mics"), "--coords", str(root / "labels"), "--diameter", "128", "--bin", "2",
            "--unlabeled-per-micrograph", "10", "--val-fraction", "0"]
    runner = CliRunner()
    loud = runner.invoke(app, args + ["--out", str(root / "a")], terminal_width=200)
    assert loud.exit_code == 0, loud.output
    assert f"next: cryopick train --data-dir {root / 'a'} --exp-name a" in loud.stdout
    quiet = runner.invoke(app, args + ["--out", str(root / "b"), "--quiet"], terminal_width=200)
    assert quiet.exit_code == 0 and "next:" not in quiet.output


# ---------------------------------------------------------------------------------------------- train


def test_train_summary_and_next_step():
    line = train_summary("auc_pn", 0.91234, 2, 10, Path("experiments/run1"), 0.625, 0.3125)
    assert line == ("best auc_pn 0.9123 at epoch 3 of 10; checkpoints in experiments/run1/checkpoints; "
                    "there 62% of held-out particles scored ≥ 0.5 and 90% scored ≥ 0.31")
    assert train_summary("auc_pn", 0.9, 0, 1, Path("e"), None, None) == "best auc_pn 0.9000 at epoch 1 of 1; " \
        "checkpoints in e/checkpoints"
    cmd, hint = next_steps_train(Path("experiments/run1/checkpoints/best.pt"), "CtfFind/job003/micrographs_ctf.star")
    assert cmd == ("next: cryopick pick CtfFind/job003/micrographs_ctf.star --model "
                   "experiments/run1/checkpoints/best.pt --out picks/ --preview 3")
    assert "--expected-particles N" in hint and "--threshold" in hint
    cmd, _ = next_steps_train(Path("e/best.pt"), None)
    assert cmd == "next: cryopick pick MICROGRAPHS --model e/best.pt --out picks/ --preview 3"
