"""Checkpoints round-trip and refuse other formats; unlabeled patches can be limited to labeled micrographs."""

import pytest
import torch

from cryopick.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, model_from_checkpoint, save_checkpoint
from cryopick.errors import CryopickError
from cryopick.model import PatchClassifier
from cryopick.preprocessing import PreprocessRecord

RECORD = PreprocessRecord(pixel_size=1.5, bin_factor=2.0, diameter_A=150.0)


def _save(path, **over):
    model = PatchClassifier("resnet8").eval()
    kwargs = dict(model_spec=model.spec, model_state=model.state_dict(), ema_state=model.state_dict(),
                  config={"loss": {"prior": 0.3}}, preprocess=RECORD.to_dict(), metrics={"val_auc_pn": 0.9})
    kwargs.update(over)
    save_checkpoint(path, **kwargs)
    return model


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = _save(tmp_path / "c.pt")
    raw = torch.load(tmp_path / "c.pt", weights_only=True)  # plain tensors and primitives only
    assert raw["format_version"] == CHECKPOINT_FORMAT and raw["preprocess"]["bin_factor"] == 2.0
    loaded = model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))
    x = torch.randn(2, 1, 128, 128)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x))


def test_checkpoint_of_another_format_version_fails_clearly(tmp_path):
    _save(tmp_path / "c.pt")
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    raw["format_version"] = CHECKPOINT_FORMAT + 1
    torch.save(raw, tmp_path / "future.pt")
    with pytest.raises(CryopickError, match="format 2 is not supported"):
        load_checkpoint(tmp_path / "future.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CryopickError, match="not a cryopick checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    torch.save({"format": "cryopick-checkpoint", "obj": object()}, tmp_path / "evil.pt")
    with pytest.raises(CryopickError, match=r"evil\.pt: not a readable cryopick checkpoint \(it holds Python objects"):
        load_checkpoint(tmp_path / "evil.pt")


def test_files_that_are_not_checkpoints_say_why(tmp_path):
    _save(tmp_path / "c.pt")
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "mic.mrc").write_bytes(b"\x00\x02\x00\x00" * 256)  # a micrograph given as --model
    for name, why in (("cut.pt", "truncated or damaged: its zip archive is incomplete"),
                      ("mic.mrc", "not a PyTorch file")):
        with pytest.raises(CryopickError) as caught:
            load_checkpoint(tmp_path / name)
        assert str(caught.value) == f"{tmp_path / name}: not a readable cryopick checkpoint ({why})"


def test_unlabeled_can_be_restricted_to_labeled_micrographs():
    from cryopick.config import TrainConfig
    from cryopick.data import SplitData
    from cryopick.train import select_unlabeled

    split = SplitData(torch.zeros(3, 8, 8), torch.arange(6.0)[:, None, None].expand(6, 8, 8), torch.arange(6.0),
                      positive_micrograph=torch.tensor([0, 0, 2]),
                      unlabeled_micrograph=torch.tensor([0, 1, 2, 3, 0, 1]))
    cfg = TrainConfig()
    chosen = select_unlabeled(split, cfg, quiet=True)
    assert chosen.unlabeled[:, 0, 0].tolist() == [0.0, 2.0, 4.0]  # micrographs 0 and 2 only
    assert chosen.unlabeled_truth_distance.tolist() == [0.0, 2.0, 4.0]
    cfg.data.unlabeled_from = "all"
    assert len(select_unlabeled(split, cfg, quiet=True).unlabeled) == 6
    cfg.data.unlabeled_from = "some"
    with pytest.raises(CryopickError, match="unlabeled_from"):
        select_unlabeled(split, cfg, quiet=True)
