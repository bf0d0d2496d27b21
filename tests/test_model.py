import pytest
import torch

from cryopick.errors import CryopickError
from cryopick.model import BACKBONES, PatchClassifier, build_model


@pytest.mark.parametrize("backbone", BACKBONES)
def test_backbones_give_one_logit_per_patch_and_a_stride_8_map(backbone):
    model = PatchClassifier(backbone).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 1, 128, 128))
        maps = model.score_map(torch.randn(1, 1, 96, 160))
    assert logits.shape == (2,)
    assert maps.shape == (1, 12, 20)
    assert model.output_stride == 8


def test_patch_logit_is_the_map_sample_at_the_centre():
    torch.manual_seed(0)
    model = PatchClassifier("resnet8").eval()
    x = torch.randn(3, 1, 128, 128)
    with torch.no_grad():
        assert torch.allclose(model(x), model.score_map(x)[:, 8, 8])


def test_resnet8_centre_depends_only_on_the_patch_interior():
    """Receptive field 115 px < 128: the centre logit ignores everything beyond ±57 px, so the dense
    map over a large image equals the patch classifier exactly."""
    torch.manual_seed(0)
    model = PatchClassifier("resnet8").eval()
    big = torch.randn(1, 1, 256, 256)
    with torch.no_grad():
        dense = model.score_map(big)[0]
        for cy, cx in [(64, 64), (128, 96), (160, 192)]:
            patch = big[..., cy - 64:cy + 64, cx - 64:cx + 64]
            assert torch.allclose(model(patch)[0], dense[cy // 8, cx // 8], atol=1e-5)


def test_output_stride_options_and_errors():
    assert PatchClassifier("resnet8", output_stride=16).output_stride == 16
    with pytest.raises(CryopickError):
        PatchClassifier("resnet8", output_stride=12)
    with pytest.raises(CryopickError):
        PatchClassifier("vgg")
    with pytest.raises(CryopickError):
        PatchClassifier("resnet8", output_stride=32)(torch.randn(1, 1, 80, 80))  # centre 40 off the 32 grid


def test_build_model_from_spec_round_trip():
    model = PatchClassifier("resnet8", dropout=0.1)
    clone = build_model(model.spec)
    clone.load_state_dict(model.state_dict())
    assert clone.spec == model.spec
