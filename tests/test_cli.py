"""The command line: help with units, clear one-line errors (never a traceback), exit codes."""

import re

import numpy as np
import pytest
from helpers import unstyled as _plain
from typer.testing import CliRunner

from cryopick import __version__
from cryopick.cli import app
from cryopick.io.mrc import write_mrc

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout


@pytest.mark.parametrize("command,needles", [
    ("extract", ["Å", "--diameter", "--bin", "--target-pixel-size", "--workers", "--strict", "--overwrite"]),
    ("train", ["--data-dir", "--exp-name", "--epochs", "--backbone", "--resume", "--consistency", "--print-config"]),
    ("pick", ["--model", "--threshold", "--radius", "--shard", "--preview", "--overwrite", "px",
              "--expected-particles"]),
    ("evaluate", ["--truth", "--radius-px", "--json", "--csv", "--plot", "px"]),
    ("simulate", ["--snr", "--size", "Å"]),
    ("demo", ["--epochs"]),
])
def test_every_command_documents_its_options(command, needles):
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = _plain(result.stdout)
    for needle in needles:
        assert needle in text, f"{command} --help lacks {needle}"


def test_missing_micrographs_give_one_line_and_exit_1(tmp_path):
    result = runner.invoke(app, ["extract", str(tmp_path / "none"), "--coords", str(tmp_path), "--diameter", "150",
                                 "--out", str(tmp_path / "ds")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "none" in _plain(result.output) and "error" in _plain(result.output)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    write_mrc(tmp_path / "m.mrc", np.zeros((64, 64), np.float32), 1.0)
    result = runner.invoke(app, ["pick", str(tmp_path / "m.mrc"), "--model", str(tmp_path / "bad.pt"),
                                 "--out", str(tmp_path / "picks")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "bad.pt" in _plain(result.output)


def test_train_print_config_shows_design_defaults():
    result = runner.invoke(app, ["train", "--print-config"])
    assert result.exit_code == 0
    assert "consistency_threshold: 0.95" in result.stdout and "mode: dense" in result.stdout


def test_train_rejects_unknown_consistency(tmp_path):
    result = runner.invoke(app, ["train", "--data-dir", str(tmp_path), "--exp-name", "x", "--consistency", "some"])
    assert result.exit_code == 1 and "selective" in _plain(result.output)


def test_renamed_options_keep_their_old_names_hidden(tmp_path, monkeypatch):
    import cryopick.pick

    seen = []
    monkeypatch.setattr(cryopick.pick, "next_steps", lambda summary: [])
    monkeypatch.setattr(cryopick.pick, "pick", lambda *a, **k: seen.append(a[3]))
    for flag in ("--expected-particles", "--expected"):
        result = runner.invoke(app, ["pick", "M", "-m", "X", "-o", "O", flag, "120"])
        assert result.exit_code == 0, result.output
    assert [c.expected_particles for c in seen] == [120.0, 120.0]
    both = runner.invoke(app, ["pick", "M", "-m", "X", "-o", "O", "--expected", "1", "--expected-particles", "2"])
    assert both.exit_code == 1 and "not both" in _plain(both.output)
    pick_help = _plain(runner.invoke(app, ["pick", "--help"], terminal_width=200).stdout)
    evaluate_help = _plain(runner.invoke(app, ["evaluate", "--help"], terminal_width=200).stdout)
    assert "--expected " not in pick_help and not re.search(r"--radius\b(?!-)", evaluate_help)


def test_evaluate_old_radius_flag_is_the_match_radius_in_px(tmp_path):
    from cryopick.io.relion import write_coordinate_star

    star = tmp_path / "mic_picks.star"
    write_coordinate_star(star, np.array([10.0, 50.0]), np.array([10.0, 50.0]), np.array([0.9, 0.8]))
    truth = tmp_path / "mic.star"
    write_coordinate_star(truth, np.array([13.0, 90.0]), np.array([10.0, 90.0]), np.zeros(2))
    for flag in ("--radius-px", "--radius"):
        result = runner.invoke(app, ["evaluate", str(star), "--truth", str(truth), flag, "5", "-q"])
        assert result.exit_code == 0, result.output
        assert "precision 0.5000 recall 0.5000" in result.stdout
