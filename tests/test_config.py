import pytest
import yaml

from cryopick.cli import default_config_text
from cryopick.config import EvaluateConfig, PickConfig, TrainConfig, dump_yaml, from_dict, resolve, to_dict
from cryopick.errors import CryopickError


def test_shipped_config_equals_dataclass_defaults():
    assert yaml.safe_load(default_config_text()) == to_dict(TrainConfig())


def test_design_defaults():
    c = TrainConfig()
    # π: none given, so 0.3 for the design's patch classifier and 0 for dense training (trainstep.resolve_prior)
    assert (c.loss.prior, c.loss.consistency_threshold, c.loss.lambda_cons, c.loss.lambda_ent) == (None, 0.95, 1.0, 0.01)
    assert (c.data.mode, c.data.holdout_labels) == ("dense", 0.2)
    assert c.loss.cons_ramp_epochs == [0.0, 10.0] and c.loss.ent_ramp_epochs == [10.0, 20.0]
    assert (c.model.ema_decay, c.data.batch_size, c.data.batch_ratio) == (0.999, 32, [1, 4])


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  prior: 0.1\nmodel:\n  backbone: resnet8\ntrain:\n  epochs: 3\n")
    c = resolve(TrainConfig, path, {"train.epochs": 7, "loss.consistency": None})
    assert (c.loss.prior, c.model.backbone, c.train.epochs, c.loss.consistency) == (0.1, "resnet8", 7, "selective")


def test_resolved_config_round_trips_through_yaml():
    c = resolve(TrainConfig, None, {"data.batch_ratio": "1,3", "train.amp": "false"})
    assert from_dict(TrainConfig, yaml.safe_load(dump_yaml(c))) == c


@pytest.mark.parametrize("text,match", [("loss:\n  priorr: 0.1\n", "unknown key"), ("loss: 3\n", "mapping"),
                                        ("train:\n  epochs: many\n", "not a valid int"), ("- a\n", "mapping"),
                                        ("train:\n  epochs: true\n", "True is not a valid int"),
                                        ("optim:\n  lr: false\n", "False is not a valid float")])
def test_bad_config_files_name_the_problem(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(CryopickError, match=match):
        resolve(TrainConfig, path)


def test_config_files_that_are_not_text_or_whose_sections_are_values_name_the_file(tmp_path):
    binary = tmp_path / "best.pt"  # --config given a checkpoint by mistake
    binary.write_bytes(b"PK\x03\x04\xff\xfe\x00binary")
    with pytest.raises(CryopickError, match=r"best\.pt: not a text file"):
        resolve(TrainConfig, binary)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("train: 5\n")
    with pytest.raises(CryopickError, match=r"scalar\.yaml: 'train' must be a mapping, got 5"):
        resolve(TrainConfig, scalar, {"train.exp_name": "run"})


def test_configs_of_older_versions_load_under_the_new_names(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  unlabeled_from: labeled\n")
    assert resolve(TrainConfig, old).data.unlabeled_from == "labeled"
    assert from_dict(PickConfig, {"expected": 300}).expected_particles == 300.0
    assert from_dict(EvaluateConfig, {"radius": 12}).radius_px == 12.0
    assert "expected_particles: 300" in dump_yaml(from_dict(PickConfig, {"expected": 300}))  # saved as the new name
    with pytest.raises(CryopickError, match="not both"):
        from_dict(PickConfig, {"expected": 1, "expected_particles": 2})


@pytest.mark.parametrize("stride,ok", [(8, True), (16, True), (4, True), (12, False), (64, False)])
def test_output_stride_accepts_only_the_strides_the_model_builds(stride, ok):
    if ok:
        assert resolve(TrainConfig, None, {"model.output_stride": str(stride)}).model.output_stride == stride
    else:
        with pytest.raises(CryopickError, match=r"model.output_stride = 12|model.output_stride = 64"):
            resolve(TrainConfig, None, {"model.output_stride": str(stride)})
