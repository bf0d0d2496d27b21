"""Faults and nonsense options: one clear line, never a lost or mixed output, never success without output.

One test per class of fault (bad option values, config values surviving CLI defaults, bad files, bad inputs
that are skipped or repaired, replacing an output that then fails, unwritable outputs). The kill-at-random
test lives in test_faults_kill.py.
"""

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import unstyled as _plain
from typer.testing import CliRunner

from cryopick.checkpoint import load_checkpoint
from cryopick.cli import app
from cryopick.config import DEFAULT_THRESHOLD, ExtractConfig, PickConfig, TrainConfig, resolve
from cryopick.dataset import load_dataset
from cryopick.errors import CryopickError
from cryopick.extract import extract
from cryopick.io.mrc import write_mrc
from cryopick.io.relion import write_coordinate_star
from cryopick.pick import pick
from cryopick.simulate import SimulationParams, simulate
from cryopick.train import train

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) → SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny simulated set, its dataset, a 1-epoch resnet8 experiment and its picks."""
    root = tmp_path_factory.mktemp("faults")
    simulate(root / "sim", SimulationParams(n_micrographs=3, shape=(320, 320), seed=2, label_fraction=0.5,
                                            labeled_micrograph_fraction=0.67), quiet=True)
    extract(str(root / "sim/micrographs"), str(root / "sim/labels"), root / "ds",
            ExtractConfig(diameter=160.0, unlabeled_per_micrograph=40, val_fraction=0.34), quiet=True)
    cfg = train_config(root, "run")
    train(cfg, quiet=True)
    return root


def train_config(root: Path, name: str, **over) -> TrainConfig:
    base = {"data.data_dir": str(root / "ds"), "train.output_root": str(root / "exp"), "train.exp_name": name,
            "model.backbone": "resnet8", "train.epochs": 1, "train.steps_per_epoch": 2, "train.device": "cpu",
            "optim.warmup_epochs": 0.0}
    base.update(over)
    return resolve(TrainConfig, None, base)


# ---------------------------------------------------------------------------------------------
# bad option and config values: one line naming the option, the config key and the accepted range


@pytest.mark.parametrize("args,needles", [
    (["extract", "M", "-c", "C", "-d", "160", "-o", "O", "--chunk-size", "0"], ["--chunk-size", "chunk_size", "1 ≤"]),
    (["extract", "M", "-c", "C", "-d", "nan", "-o", "O"], ["--diameter", "diameter", "0 <"]),
    (["extract", "M", "-c", "C", "-d", "160", "-o", "O", "--val-fraction", "2"], ["--val-fraction", "< 1"]),
    (["extract", "M", "-c", "C", "-d", "160", "-o", "O", "--workers", "0"], ["--workers", "1 ≤"]),
    (["extract", "M", "-c", "C", "-d", "160", "-o", "O", "--unlabeled-per-micrograph", "-5"], ["--unlabeled"]),
    (["extract", "M", "-c", "C", "-d", "160", "-o", "O", "--bin", "2", "--target-pixel-size", "4"], ["not both"]),
    (["train", "--data-dir", "D", "--epochs", "0"], ["--epochs", "train.epochs", "1 ≤"]),
    (["train", "--data-dir", "D", "--steps-per-epoch", "-2"], ["--steps-per-epoch", "train.steps_per_epoch"]),
    (["train", "--data-dir", "D", "--lr", "-1"], ["--lr", "optim.lr", "0 <"]),
    (["train", "--data-dir", "D", "--backbone", "resnet9"], ["--backbone", "resnet8, resnet18"]),
    (["train", "--data-dir", "D", "--balanced-prior", "7"], ["--balanced-prior", "loss.balanced_prior", "< 1"]),
    (["train", "--data-dir", "D", "--consistency", "some"], ["--consistency", "selective, all, none"]),
    (["train", "--data-dir", "D", "--device", "gpu0"], ["--device", "cuda:N"]),
    (["pick", "M", "-m", "X.pt", "-o", "O", "--threshold", "2"], ["--threshold", "threshold", "≤ 1"]),
    (["pick", "M", "-m", "X.pt", "-o", "O", "--shard", "3/2"], ["--shard", "0 ≤ i < n"]),
    (["pick", "M", "-m", "X.pt", "-o", "O", "--tile-size", "0"], ["--tile-size"]),
    (["evaluate", "P", "--truth", "T", "--pixel-size", "0", "--diameter", "150"], ["--pixel-size", "0 <"]),
    (["evaluate", "P", "--truth", "T", "--radius-px", "inf"], ["--radius-px", "radius_px"]),
    (["evaluate", "P", "--truth", "T", "--radius", "inf"], ["--radius-px"]),  # the old name, still accepted
    (["evaluate", "P", "--truth", "T", "--method", "best"], ["--method", "hungarian, greedy"]),
    (["evaluate", "--model", "X.pt", "--data-dir", "D", "--threshold", "1.5"], ["--threshold", "probability", "1.5"]),
])
def test_bad_option_values_are_one_line_errors(tmp_path, monkeypatch, args, needles):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    text = _plain(result.output)
    assert result.exit_code == 1, text
    assert "error:" in text and "internal error" not in text and "Traceback" not in text
    for needle in needles:
        assert needle in text, (needle, text)
    assert list(tmp_path.iterdir()) == []  # checked before any work or write


@pytest.mark.parametrize("text,needles", [
    ("train:\n  monitor: nonsense\n", ["train.monitor", "auc_pn"]),
    ("train:\n  epochs: -3\n", ["--epochs", "train.epochs"]),
    ("model:\n  dropout: 2\n", ["model.dropout", "< 1"]),
    ("optim:\n  lr: -1\n", ["optim.lr"]),
    ("optim:\n  scheduler: linear\n", ["optim.scheduler", "cosine, none"]),
    ("data:\n  unlabeled_from: some\n", ["data.unlabeled_from", "labeled, all"]),
    ("loss:\n  ent_ramp_epochs: [20, 10]\n", ["loss.ent_ramp_epochs"]),
])
def test_bad_config_values_name_the_key_and_range(tmp_path, text, needles):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(CryopickError) as caught:
        resolve(TrainConfig, path, {"data.data_dir": "D"})
    for needle in needles:
        assert needle in str(caught.value)


def test_library_entry_points_validate_before_any_write(tmp_path):
    with pytest.raises(CryopickError, match="chunk_size"):
        extract("M", "C", tmp_path / "ds", ExtractConfig(diameter=160.0, chunk_size=0))
    with pytest.raises(CryopickError, match="train.epochs"):
        train(TrainConfig(**{"train": TrainConfig().train.__class__(epochs=0, output_root=str(tmp_path))}))
    with pytest.raises(CryopickError, match="threshold"):
        pick("M", tmp_path / "x.pt", tmp_path / "out", PickConfig(threshold=float("nan")))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# the config file's values survive the CLI; --help shows the dataclass defaults


def test_config_file_values_survive_cli_defaults(tmp_path, monkeypatch):
    import cryopick.extract
    import cryopick.pick

    seen = {}
    monkeypatch.setattr(cryopick.extract, "extract", lambda *a, **k: seen.setdefault("extract", a[3]))
    monkeypatch.setattr(cryopick.extract, "print_summary", lambda summary: None)
    monkeypatch.setattr(cryopick.extract, "next_steps", lambda summary: [])
    monkeypatch.setattr(cryopick.pick, "next_steps", lambda summary: [])
    monkeypatch.setattr(cryopick.pick, "pick", lambda *a, **k: seen.setdefault("pick", a[3]))
    (tmp_path / "e.yaml").write_text("val_fraction: 0.5\nchunk_size: 64\nworkers: 2\n")
    (tmp_path / "p.yaml").write_text("threshold: 0.2\nedge: 30\nworkers: 0\n")
    r = runner.invoke(app, ["extract", "M", "-c", "C", "-d", "160", "-o", "O", "--config", str(tmp_path / "e.yaml"),
                            "--seed", "4"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["pick", "M", "-m", "X", "-o", "O", "--config", str(tmp_path / "p.yaml")])
    assert r.exit_code == 0, r.output
    e, p = seen["extract"], seen["pick"]
    assert (e.val_fraction, e.chunk_size, e.workers, e.seed, e.diameter) == (0.5, 64, 2, 4, 160.0)
    assert (p.threshold, p.edge, p.workers, p.tile_size) == (0.2, 30.0, 0, PickConfig().tile_size)


def test_help_shows_defaults_flags_examples_and_install_hints():
    texts = {c: _plain(runner.invoke(app, [c, "--help"], env={"COLUMNS": "250"}).stdout)
             for c in ("simulate", "extract", "train", "pick", "evaluate", "demo")}
    train_help = texts["train"]
    for needle in ("[default: resnet18]", "[default: 50]", "[default: dense]", "(default: 0 for dense", "[default: selective]",
                   "--amp", "--no-amp", "--no-ema"):
        assert needle in train_help, needle
    assert f"Default: {DEFAULT_THRESHOLD:g}, or lower for a weak model" in texts["pick"]  # --threshold's default
    assert "[default: 0.2]" in texts["extract"]
    assert "cryopick[plot]" in texts["evaluate"]
    for command, text in texts.items():
        assert "Example: cryopick " + command in text, command
        flags = [line for line in text.splitlines() if "<bool>" in line]  # --help included (cliutil.Command)
        assert flags == [], (command, flags)


# ---------------------------------------------------------------------------------------------
# bad files: one clear line, not an internal error


def test_bad_files_are_clear_errors(chain, tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    manifest = json.loads((chain / "ds/manifest.json").read_text())
    for chunk in manifest["chunks"]:
        (ds / chunk["file"]).write_bytes((chain / "ds" / chunk["file"]).read_bytes())
    del manifest["chunks"]
    (ds / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CryopickError, match="damaged manifest"):
        train(train_config(chain, "x", **{"data.data_dir": str(ds), "train.output_root": str(tmp_path)}), quiet=True)

    with pytest.raises(CryopickError, match="model") as caught:  # resume with another backbone
        train(train_config(chain, "run", **{"model.backbone": "resnet18"}), resume=True, quiet=True)
    assert len(str(caught.value).splitlines()) == 1 and "--overwrite" in str(caught.value)

    best = load_checkpoint(chain / "exp/run/checkpoints/best.pt")
    no_record = dict(best, preprocess=None)
    torch.save(no_record, tmp_path / "no_record.pt")
    wrong = dict(best, model_spec=dict(best["model_spec"], backbone="resnet18"))
    torch.save(wrong, tmp_path / "wrong.pt")
    for name, needle in (("no_record.pt", "preprocessing record"), ("wrong.pt", "do not match")):
        result = runner.invoke(app, ["pick", str(chain / "sim/micrographs"), "-m", str(tmp_path / name),
                                     "-o", str(tmp_path / "picks"), "-q"])
        text = _plain(result.output)
        assert result.exit_code == 1 and needle in text and len(text.strip().splitlines()) <= 3, text


def test_damaged_checkpoints_and_manifests_name_the_file(chain, tmp_path):
    """Each was an "internal error" or a message without the file (a read-only audit of train and pick)."""
    best = load_checkpoint(chain / "exp/run/checkpoints/best.pt")
    torch.save(dict(best, calibration="broken"), tmp_path / "cal.pt")
    torch.save(dict(best, model_spec=dict(best["model_spec"], backbone="resnet999")), tmp_path / "net.pt")
    nan_state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in best["ema_state"].items()}
    torch.save(dict(best, ema_state=nan_state), tmp_path / "nan.pt")  # picked nothing and exited 0
    (tmp_path / "text.pt").write_text("hello\n")
    for name, needle in (("cal.pt", "calibration is malformed"), ("net.pt", "resnet999"),
                         ("text.pt", "not a PyTorch file"), ("nan.pt", "NaN or infinite values")):
        with pytest.raises(CryopickError, match=needle) as caught:
            pick(str(chain / "sim/micrographs"), tmp_path / name, tmp_path / "picks", PickConfig(device="cpu"),
                 quiet=True)
        assert str(caught.value).startswith(str(tmp_path / name)), caught.value
    with pytest.raises(CryopickError, match="is a directory; give the checkpoint file"):
        pick(str(chain / "sim/micrographs"), chain / "exp/run", tmp_path / "picks", PickConfig(device="cpu"),
             quiet=True)

    manifest = json.loads((chain / "ds/manifest.json").read_text())
    for name, damage, needle in (("mics", {"micrographs": "abc"}, "damaged manifest"),
                                 ("escape", {"chunks": [dict(manifest["chunks"][0], file="../x.pt")]},
                                  "'../x.pt' is not a file name in the dataset"),
                                 ("record", {"preprocess": "abc"}, "preprocessing record must be a mapping")):
        ds = tmp_path / name
        ds.mkdir()
        for chunk in manifest["chunks"]:
            (ds / chunk["file"]).write_bytes((chain / "ds" / chunk["file"]).read_bytes())
        (ds / "manifest.json").write_text(json.dumps({**manifest, **damage}))
        with pytest.raises(CryopickError, match=needle) as caught:
            load_dataset(ds)
        assert str(caught.value).startswith(str(ds / "manifest.json")), caught.value


# ---------------------------------------------------------------------------------------------
# bad inputs among good ones: skipped and listed, or repaired with a count


def test_constant_micrographs_duplicate_and_nonfinite_labels(chain, tmp_path, capsys):
    mics, labels = tmp_path / "mics", tmp_path / "labels"
    for p in (chain / "sim/micrographs").iterdir():
        (mics / p.name).parent.mkdir(exist_ok=True)
        (mics / p.name).write_bytes(p.read_bytes())
    write_mrc(mics / "flat.mrc", np.full((320, 320), 3.0, np.float32), pixel_size=2.0)
    labels.mkdir()
    stars = sorted((chain / "sim/labels").glob("*.star"))
    for p in stars:
        (labels / p.name).write_bytes(p.read_bytes())
    write_coordinate_star(labels / "flat_manualpick.star", [100.0], [100.0], [0.0])
    first = next(p for p in stars if p.stat().st_size > 0)
    text = first.read_text()
    row = next(line for line in text.splitlines() if re.match(r"^\s*[0-9.]+\s+[0-9.]+", line))
    bad_row = re.sub(r"^(\s*)[0-9.]+", r"\1nan", row)
    (labels / first.name).write_text(text.rstrip("\n") + "\n" + "\n".join([row] * 50 + [bad_row]) + "\n")
    summary = extract(str(mics), str(labels), tmp_path / "ds", ExtractConfig(diameter=160.0, val_fraction=0.0,
                                                                             unlabeled_per_micrograph=10), quiet=True)
    err = _plain(capsys.readouterr().err).replace("\n", "")  # rich wraps long lines
    assert any("flat.mrc" in path and "constant" in reason for path, reason in summary.skipped)
    assert "50 duplicate label(s)" in err
    assert f"{first.name}: 1 coordinate row(s) without a finite x/y" in err
    original = sum(1 for p in stars for line in p.read_text().splitlines() if re.match(r"^\s*[0-9.]+\s+[0-9.]", line))
    assert summary.n_positive["train"] <= original  # 50 duplicates added, none kept


def test_micrographs_smaller_than_a_patch_stop_the_run(chain, tmp_path):
    for option in ({"diameter": 50000.0}, {"diameter": 160.0, "bin": 1000}):
        with pytest.raises(CryopickError, match="too small"):
            extract(str(chain / "sim/micrographs"), str(chain / "sim/labels"), tmp_path / "ds",
                    ExtractConfig(**option), quiet=True)
    with pytest.raises(CryopickError, match="raise --bin"):
        extract(str(chain / "sim/micrographs"), str(chain / "sim/labels"), tmp_path / "ds",
                ExtractConfig(diameter=1000.0, bin=1), quiet=True)
    assert not (tmp_path / "ds").exists()


# ---------------------------------------------------------------------------------------------
# replacing an output: the old one stays byte-identical unless the new one is complete


@pytest.mark.filterwarnings("ignore:Data array contains NaN:RuntimeWarning")  # mrcfile, writing the bad file
def test_failed_extract_overwrite_keeps_the_old_dataset(chain, tmp_path):
    ds = tmp_path / "ds"
    extract(str(chain / "sim/micrographs"), str(chain / "sim/labels"), ds,
            ExtractConfig(diameter=160.0, unlabeled_per_micrograph=10), quiet=True)
    before = tree_digest(ds)
    nan_mics = tmp_path / "nan"
    nan_mics.mkdir()
    image = np.random.default_rng(0).normal(size=(320, 320)).astype(np.float32)
    image[5, 5] = np.nan
    name = sorted((chain / "sim/micrographs").iterdir())[0].name
    write_mrc(nan_mics / name, image, pixel_size=2.0)
    outside = tmp_path / "outside"
    outside.mkdir()
    for p in (chain / "sim/micrographs").iterdir():
        write_coordinate_star(outside / (p.stem + "_manualpick.star"), [5000.0], [5000.0], [0.0])
    for mics, labels in ((nan_mics, chain / "sim/labels"), (chain / "sim/micrographs", outside)):
        with pytest.raises(CryopickError):
            extract(str(mics), str(labels), ds, ExtractConfig(diameter=160.0, overwrite=True), quiet=True)
        assert tree_digest(ds) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    extract(str(chain / "sim/micrographs"), str(chain / "sim/labels"), ds,
            ExtractConfig(diameter=160.0, unlabeled_per_micrograph=12, overwrite=True), quiet=True)
    assert json.loads((ds / "manifest.json").read_text())["counts"]["train"]["unlabeled"] % 12 == 0


def test_failed_or_interrupted_train_overwrite_keeps_the_old_run(chain, tmp_path, monkeypatch):
    import cryopick.train as tr

    exp = chain / "exp"
    cfg = train_config(chain, "keep", **{"train.output_root": str(tmp_path)})
    train(cfg, quiet=True)
    before = tree_digest(tmp_path / "keep")
    with pytest.raises(CryopickError, match="balanced"):
        train(resolve(TrainConfig, None, {**_flat(cfg), "loss.balanced_prior": 7.0}), overwrite=True, quiet=True)
    real = tr.optimisation_step
    monkeypatch.setattr(tr, "optimisation_step", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    result = train(train_config(chain, "keep", **{"train.output_root": str(tmp_path), "train.seed": 9}),
                   overwrite=True, quiet=True)
    assert result.interrupted
    monkeypatch.setattr(tr, "optimisation_step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        train(train_config(chain, "keep", **{"train.output_root": str(tmp_path)}), overwrite=True, quiet=True)
    assert tree_digest(tmp_path / "keep") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    monkeypatch.setattr(tr, "optimisation_step", real)
    train(train_config(chain, "keep", **{"train.output_root": str(tmp_path), "train.seed": 9}), overwrite=True,
          quiet=True)
    assert load_checkpoint(tmp_path / "keep/checkpoints/best.pt")["config"]["train"]["seed"] == 9
    assert exp.is_dir()


def _flat(cfg: TrainConfig) -> dict:
    from cryopick.config import to_dict

    return {f"{section}.{k}": v for section, values in to_dict(cfg).items() for k, v in values.items()}


def test_pick_rerun_with_other_model_or_settings_is_refused_and_overwrite_swaps(chain, tmp_path, monkeypatch):
    import cryopick.pick as pick_module

    model = chain / "exp/run/checkpoints/best.pt"
    mics = str(chain / "sim/micrographs")
    out = tmp_path / "picks"
    pick(mics, model, out, PickConfig(workers=0, threshold=0.3), quiet=True)
    before = tree_digest(out)
    again = pick(mics, model, out, PickConfig(workers=0, threshold=0.3), quiet=True)  # resume-by-rerun
    assert again.counts == {} and len(again.skipped) == 3
    other_model = tmp_path / "other.pt"
    ckpt = load_checkpoint(model)
    ckpt["metrics"] = {"changed": 1.0}
    torch.save(ckpt, other_model)
    for model_path, config, needle in ((model, PickConfig(workers=0, threshold=0.6), "threshold 0.3 (now 0.6)"),
                                       (other_model, PickConfig(workers=0, threshold=0.3), "another checkpoint")):
        with pytest.raises(CryopickError, match=re.escape(needle)):
            pick(mics, model_path, out, config, quiet=True)
    assert tree_digest(out) == before

    real, calls = pick_module.write_coordinate_star, []

    def interrupt_on_second(path, *args):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(path, *args)

    monkeypatch.setattr(pick_module, "write_coordinate_star", interrupt_on_second)
    with pytest.raises(KeyboardInterrupt):
        pick(mics, model, out, PickConfig(workers=0, threshold=0.6, overwrite=True), quiet=True)
    monkeypatch.setattr(pick_module, "write_coordinate_star", real)
    assert tree_digest(out) == before
    pick(mics, model, out, PickConfig(workers=0, threshold=0.6, overwrite=True), quiet=True)
    marker = json.loads((out / ".cryopick_pick.json").read_text())
    assert marker["produced_by"]["settings"]["threshold"] == 0.6
    assert not [p for p in out.iterdir() if p.name.startswith(".cryopick_pick.staging")]
    resumed = pick(mics, model, out, PickConfig(workers=0, threshold=0.6), quiet=True)
    assert resumed.counts == {} and len(resumed.skipped) == 3


# ---------------------------------------------------------------------------------------------
# outputs that cannot be written: one line, exit 1, before the work


def test_unwritable_outputs_are_one_line_errors(chain, tmp_path):
    (tmp_path / "afile").write_text("")
    model = str(chain / "exp/run/checkpoints/best.pt")
    picks = str(chain / "sim/labels")
    cases = [
        (["extract", str(chain / "sim/micrographs"), "-c", picks, "-d", "160", "-o", str(tmp_path / "afile")],
         "not a directory"),
        (["pick", str(chain / "sim/micrographs"), "-m", model, "-o", str(tmp_path / "afile/out")], "not a directory"),
        (["evaluate", picks, "--truth", picks, "--radius-px", "40", "--json", str(tmp_path)], "is a directory"),
        (["evaluate", picks, "--truth", picks, "--radius-px", "40", "--csv", str(tmp_path / "afile/r.csv")],
         "not a directory"),
    ]
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        cases.append((["evaluate", picks, "--truth", picks, "--radius-px", "40", "--csv", str(ro / "r.csv")],
                      "no permission"))
        cases.append((["pick", str(chain / "sim/micrographs"), "-m", model, "-o", str(ro / "out")], "no permission"))
    for args, needle in cases:
        result = runner.invoke(app, args + ["-q"])
        text = _plain(result.output)
        assert result.exit_code == 1 and needle in text and "internal error" not in text, (args, text)
