"""cryopick pick: NMS, peaks, coordinate mapping, dense = patch scoring, tiling, output files, reruns, shards.

End-to-end tests use a hand-built resnet8 ("blob detector") whose logit map is a gain times a
box-filtered, max-pooled copy of the binned micrograph minus a level: its map peaks on bright blobs,
so the picks' positions test the whole chain index → binned → original pixel.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import starfile
import torch

from cryopick.checkpoint import save_checkpoint
from cryopick.config import PickConfig, resolve
from cryopick.errors import CryopickError
from cryopick.inference import MapGeometry, context_pad, dense_score_map, receptive_field, tile_margin
from cryopick.io.mrc import write_mrc
from cryopick.io.outputs import coordinate_file_name, read_coordinate_star
from cryopick.io.relion import write_micrographs_star
from cryopick.model import PatchClassifier
from cryopick.nms import (
    Picks,
    away_from_edges,
    candidate_picks,
    greedy_nms,
    inside_probability,
    local_maxima,
    refine_peaks,
    score_histogram,
    select_picks,
    threshold_for_expected,
)
from cryopick.pick import histogram_lines, parse_shard, pick, shard_items
from cryopick.preprocessing import PreprocessRecord, axis_scales, preprocess

OS = 8
PAD = 64


# ------------------------------------------------------------------ helpers


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def blob_detector(gain: float = 4.0, level: float = 1.0) -> PatchClassifier:
    """resnet8 whose logit at sample (i, j) is gain·(max-pooled 7×7 mean of the input at (8i, 8j)) − gain·level.

    Stem: channel 0 = 7×7 box mean, ReLU, 3×3 max-pool; residual convs zero so blocks pass their
    shortcut; stride-2 and widening 1×1 shortcuts copy channel 0; head reads channel 0. Every step is
    centred, so the response to a round blob peaks on the blob's centre.
    """
    model = PatchClassifier("resnet8", dropout=0.0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.zero_()
        model.backbone.stem[0].weight[0, 0] = 1.0 / 49
        for stage in model.backbone.stages:
            shortcut = stage[0].shortcut
            if isinstance(shortcut, torch.nn.Sequential):
                shortcut[0].weight[0, 0, 0, 0] = 1.0
        model.head.weight[0, 0, 0, 0] = gain
        model.head.bias.fill_(-gain * level)
    return model.eval()


def save_model(path, model: PatchClassifier, record: PreprocessRecord):
    save_checkpoint(path, model_spec=model.spec, model_state=model.state_dict(), ema_state=None,
                    config={}, preprocess=record.to_dict())
    return path


def blob_image(shape, centres_xy, sigma, amplitude=6.0, noise=1.0, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    image = noise * rng.normal(size=shape)
    for x, y in centres_xy:
        image += amplitude * np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * sigma**2))
    return image.astype(np.float32)


def randomised_bn(model: PatchClassifier, seed: int = 0) -> PatchClassifier:
    """Non-trivial BatchNorm statistics, so equivalence tests exercise every layer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return model.eval()


def strict_star_loop(text: str) -> tuple[str, list[str], list[list[str]]]:
    """Parse one RELION loop block, failing on any deviation from RELION's own layout (formats.md §1.2)."""
    lines = text.split("\n")
    assert lines[0] == "# version 30001"
    assert lines[1] == ""
    assert lines[2].startswith("data_")
    assert lines[3] == ""
    assert lines[4] == "loop_ "
    labels, k = [], 5
    while lines[k].startswith("_"):
        name, number = lines[k].split(" #")
        assert number == f"{len(labels) + 1} ", lines[k]
        labels.append(name[1:])
        k += 1
    rows = []
    while lines[k] != " ":
        assert lines[k].endswith(" "), f"row without RELION's trailing space: {lines[k]!r}"
        tokens = lines[k].split()
        assert len(tokens) == len(labels), lines[k]
        rows.append(tokens)
        k += 1
    assert all(line == "" for line in lines[k + 1:])
    return lines[2][len("data_"):], labels, rows


# ------------------------------------------------------------------ NMS and peaks


def test_nms_keeps_the_highest_and_respects_the_radius():
    # C(10,0) 0.95 first; A(0,0) 0.9 is 10 px from C; B(3,4) is exactly 5 px from A (not closer: kept);
    # D(14,0) is 4 px from C (suppressed); E(2,1) is √5 px from A (suppressed).
    x = np.array([0.0, 3.0, 10.0, 14.0, 2.0])
    y = np.array([0.0, 4.0, 0.0, 0.0, 1.0])
    s = np.array([0.9, 0.8, 0.95, 0.7, 0.85])
    assert greedy_nms(x, y, s, radius=5.0).tolist() == [2, 0, 1]
    assert greedy_nms(x, y, s, radius=5.01).tolist() == [2, 0]
    assert greedy_nms(x, y, s, radius=0.0).tolist() == [2, 0, 4, 1, 3]


def test_nms_ties_are_broken_by_position_whatever_the_input_order():
    x = np.array([5.0, 5.0, 1.0])
    y = np.array([5.0, 2.0, 9.0])
    s = np.array([0.5, 0.5, 0.5])
    kept = [(x[i], y[i]) for i in greedy_nms(x, y, s, radius=4.0)]
    assert kept == [(5.0, 2.0), (1.0, 9.0)]  # (5,2) before (5,5) by y; (1,9) is 7.6 px from (5,2)
    order = np.array([2, 0, 1])
    kept_permuted = [(x[order][i], y[order][i]) for i in greedy_nms(x[order], y[order], s[order], radius=4.0)]
    assert kept_permuted == kept


def test_local_maxima_and_quadratic_refinement_recover_an_off_grid_peak():
    # f(v, u) = −(u − 2.3)² − 2(v − 3.4)² + 0.5(u − 2.3)(v − 3.4)
    # negative definite, vertex at row 3.4, column 2.3
    v, u = np.mgrid[0:7, 0:6].astype(np.float64)
    f = -((u - 2.3) ** 2) - 2 * (v - 3.4) ** 2 + 0.5 * (u - 2.3) * (v - 3.4)
    rows, cols = local_maxima(f)
    assert (rows.tolist(), cols.tolist()) == ([3], [2])
    drow, dcol = refine_peaks(f, rows, cols)
    assert drow[0] == pytest.approx(0.4, abs=1e-9)
    assert dcol[0] == pytest.approx(0.3, abs=1e-9)


def test_refinement_leaves_border_peaks_and_saddles_sensible():
    f = np.array([[5.0, 3.0, 1.0], [4.0, 2.0, 0.0], [3.0, 1.0, -1.0]])  # maximum at the corner (0, 0)
    drow, dcol = refine_peaks(f, np.array([0]), np.array([0]))
    assert (drow[0], dcol[0]) == pytest.approx((0.0, 0.0), abs=1e-12)  # mirrored border: symmetric, no shift
    # ridge along columns: 1-D parabola across rows only; l=1, c=3, r=2 → (1−2)/(2·(1−6+2)) = 1/6
    ridge = np.array([[1.0, 1.0, 1.0], [3.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
    drow, dcol = refine_peaks(ridge, np.array([1]), np.array([1]))
    assert drow[0] == pytest.approx(1 / 6)
    assert dcol[0] == 0.0


# ------------------------------------------------------------------ geometry


def test_map_index_to_original_pixel_hand_values():
    geometry = MapGeometry(output_stride=8, pad=64, scales=(2.0, 2.5))
    x, y = geometry.to_original(np.array([8, 10, 10.5]), np.array([8, 13, 8]))
    # sample (8, 8) → binned (0, 0); (10, 13) → binned y=16, x=40 → original y=32, x=100; row 10.5 → y = 20·2
    assert x.tolist() == [0.0, 100.0, 0.0]
    assert y.tolist() == [0.0, 32.0, 40.0]
    rows, cols = geometry.to_map(x, y)
    assert rows.tolist() == [8.0, 10.0, 10.5]
    assert cols.tolist() == [8.0, 13.0, 8.0]


def test_original_to_binned_to_original_round_trip_uses_preprocess_scales():
    shape, factor = (517, 703), 2.0
    binned, scales = preprocess(np.zeros(shape, np.float32), factor)
    assert tuple(binned.shape) == (258, 352)  # round(517/2)=258, round(703/2)=352 (banker's rounding of 351.5)
    assert scales == axis_scales(shape, factor) == (517 / 258, 703 / 352)
    geometry = MapGeometry(OS, PAD, scales)
    x0, y0 = np.array([0.0, 123.4, 702.0]), np.array([0.0, 77.7, 516.0])
    x1, y1 = geometry.to_original(*geometry.to_map(x0, y0))
    np.testing.assert_allclose(x1, x0, atol=1e-9)
    np.testing.assert_allclose(y1, y0, atol=1e-9)


def test_receptive_fields_and_tile_margins():
    # resnet8: stem 7 (jump 2) → pool +2·2 = 11 (jump 4) → stage1 2 convs +8+8 = 27 → stage2 +8 (jump 8) +16 = 51
    # → stage3 dilation 2: +32 +32 = 115; margin = ceil(57/8)·8 = 64
    assert receptive_field(PatchClassifier("resnet8")) == 115
    assert tile_margin(PatchClassifier("resnet8")) == 64
    # resnet18: 11 after the stem; stage1 4 convs ·8 = 43; stage2 +8 (jump 8) +3·16 = 99;
    # stage3 (dilation 2) 4·32 = 227; stage4 (dilation 4) 4·64 = 483; margin = ceil(241/8)·8 = 248
    assert receptive_field(PatchClassifier("resnet18")) == 483
    assert tile_margin(PatchClassifier("resnet18")) == 248


# ------------------------------------------------------------------ dense scoring


def test_dense_map_equals_patch_logits_for_resnet8_including_edges():
    torch.manual_seed(0)
    model = randomised_bn(PatchClassifier("resnet8", dropout=0.3))
    binned = torch.randn(1, 150, 233)
    padded = np.pad(binned[0].numpy(), PAD, mode="reflect")  # extract's padding of edge patches
    with torch.inference_mode():
        dense = dense_score_map(model, binned, PAD)[0]
        centres = [(cy, cx) for cy in (0, 8, 72, 144) for cx in (0, 16, 120, 232)]
        patches = torch.stack([torch.from_numpy(padded[cy: cy + 128, cx: cx + 128].copy()) for cy, cx in centres])
        patch_logits = model(patches[:, None])
    dense_at = torch.stack([dense[(cy + PAD) // OS, (cx + PAD) // OS] for cy, cx in centres])
    assert dense.std() > 0.01  # the comparison is not between constants
    torch.testing.assert_close(patch_logits, dense_at, atol=1e-4, rtol=0)


def test_dense_map_differs_from_patch_logits_for_resnet18_within_a_loose_bound(capsys):
    # resnet18 sees 483 px; a 128-px training patch is zero-padded where the dense map sees real context
    torch.manual_seed(1)
    model = randomised_bn(PatchClassifier("resnet18", dropout=0.0), seed=1)
    binned = torch.randn(1, 136, 136)
    padded = torch.nn.functional.pad(binned[:, None], (PAD,) * 4, mode="reflect")
    centres = [(cy, cx) for cy in (0, 64, 128) for cx in (0, 64, 128)]
    with torch.inference_mode():
        dense = dense_score_map(model, binned, PAD)[0]
        patch_logits = model(torch.cat([padded[:, :, cy: cy + 128, cx: cx + 128] for cy, cx in centres]))
    dense_at = torch.stack([dense[(cy + PAD) // OS, (cx + PAD) // OS] for cy, cx in centres])
    difference = (patch_logits - dense_at).abs().max().item()
    spread = dense.std().item()
    with capsys.disabled():
        print(f"\nresnet18 dense vs patch: max |Δlogit| = {difference:.3f}, map std = {spread:.3f}")
    assert math.isfinite(difference) and difference < 10 * spread


def test_a_trained_resnet18_crop_is_exactly_picks_map_edges_included():
    """Train = pick: a dense-training crop of ResNet-18 (483-px receptive field) carries pick's context, so all
    its trained samples have the very logits pick's map has there, at the micrograph's corner (reflected
    context) and inside it."""
    model = randomised_bn(PatchClassifier("resnet18", dropout=0.0), seed=4)
    context = context_pad(model, 2 * PAD)
    assert context == 248
    binned, sampler = _crop_sampler(context)
    k, n = context // OS, 128 // OS
    with torch.inference_mode():
        dense = dense_score_map(model, binned, PAD)[0]
        for top, left in ((context, context), (context + 48, context + 96)):  # the corner; inside (map 6, 12)
            crop_map = model.score_map(_crop(sampler, top, left))[0]
            i, j = (top - context) // OS, (left - context) // OS
            torch.testing.assert_close(crop_map[k: k + n, k: k + n], dense[i: i + n, j: j + n], atol=1e-4, rtol=0)
    assert dense.std() > 0.01


def test_resnet8_crops_equal_picks_map_where_the_receptive_field_fits_the_crop():
    """ResNet-8 (115 px) trains on bare 128-px crops: the crop's centre sample sees only the crop and equals pick's
    map exactly; samples nearer the crop's border see its zero padding in training, real micrograph in pick."""
    model = randomised_bn(PatchClassifier("resnet8", dropout=0.0), seed=4)
    assert context_pad(model, 2 * PAD) == 0
    binned, sampler = _crop_sampler(0)
    with torch.inference_mode():
        dense = dense_score_map(model, binned, PAD)[0]
        crop_map = model.score_map(_crop(sampler, 48, 96))[0]
    i, j = 48 // OS, 96 // OS
    torch.testing.assert_close(crop_map[8, 8], dense[i + 8, j + 8], atol=1e-4, rtol=0)
    assert (crop_map[0] - dense[i, j: j + 16]).abs().max() > 1e-3


def _crop_sampler(context: int):
    from cryopick.crops import CropSampler, crop_sources

    binned = torch.randn(1, 176, 216, generator=torch.Generator().manual_seed(4)).half()
    mic = {"name": "m", "binned": binned[0], "scales": torch.tensor([1.0, 1.0]), "labels": torch.tensor([[100.0, 90.0]])}
    sampler = CropSampler(crop_sources([mic], PAD + context), 128, OS, 8.0, 1, 1, seed=0, margin=context)
    return binned.float(), sampler


def _crop(sampler, top: int, left: int) -> torch.Tensor:
    crops, _ = sampler._cut([(0, top, left, 0)])  # one crop at (top, left) of the padded micrograph, unturned
    return crops[:, None].float()


def test_tiled_map_equals_untiled_map():
    torch.manual_seed(2)
    model = randomised_bn(PatchClassifier("resnet8", dropout=0.0), seed=2)
    binned = torch.randn(2, 150, 233)
    with torch.inference_mode():
        whole = dense_score_map(model, binned, PAD)
        for tile in (200, 300):  # 6×4 and 3×2 tiles of a 278×361 padded input
            torch.testing.assert_close(dense_score_map(model, binned, PAD, tile_size=tile), whole, atol=1e-5, rtol=0)
        # a margin below half the receptive field (57 px) changes samples near the seams: the check is sharp
        short = dense_score_map(model, binned, PAD, tile_size=200, margin=48)
    assert (short - whole).abs().max() > 1e-4


def test_tiled_map_equals_untiled_map_for_resnet18():
    torch.manual_seed(3)
    model = randomised_bn(PatchClassifier("resnet18", dropout=0.0), seed=3)
    binned = torch.randn(1, 120, 250)
    with torch.inference_mode():
        whole = dense_score_map(model, binned, PAD)
        tiled = dense_score_map(model, binned, PAD, tile_size=800)  # 3×3 tiles of the 744×874 input (context 248)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)


def test_tile_too_small_for_the_margin_is_a_clear_error():
    with pytest.raises(CryopickError, match="tile size 100"):
        dense_score_map(PatchClassifier("resnet8"), torch.zeros(1, 200, 200), PAD, tile_size=100)


# ------------------------------------------------------------------ picks from a map


def test_candidates_threshold_max_picks_and_edge_on_a_hand_made_map():
    # 20×22 map of a 100×120 binned micrograph, scales 2: sample (i, j) → original (16j − 128, 16i − 128)
    logits = np.full((20, 22), -10.0)
    logits[10, 10] = 3.0  # original (32, 32)
    logits[10, 12] = 1.0  # (64, 32): 32 px from the first
    logits[14, 10] = -1.0  # (32, 96): p = 0.269
    logits[8, 20] = 2.0  # (192, 0): on the top edge
    geometry = MapGeometry(OS, PAD, (2.0, 2.0))
    candidates = candidate_picks(logits, geometry, (100, 120), (200, 240), radius_px=10.0)
    assert candidates.x.tolist()[:4] == [32.0, 192.0, 64.0, 32.0]
    assert candidates.y.tolist()[:4] == [32.0, 0.0, 32.0, 96.0]
    np.testing.assert_allclose(candidates.score[:4], 1 / (1 + np.exp(-np.array([3.0, 2.0, 1.0, -1.0]))))
    assert len(select_picks(candidates, 0.5)) == 3
    assert select_picks(candidates, 0.5, max_picks=2).x.tolist() == [32.0, 192.0]
    near_edge = candidate_picks(logits, geometry, (100, 120), (200, 240), radius_px=10.0, edge=20.0)
    assert select_picks(near_edge, 0.5).x.tolist() == [32.0, 64.0]
    merged = candidate_picks(logits, geometry, (100, 120), (200, 240), radius_px=40.0)
    assert select_picks(merged, 0.5).x.tolist() == [32.0, 192.0]  # (64, 32) is 32 px from the best


def test_a_particle_straddling_the_right_or_bottom_border_is_picked_inside():
    # binned 103 × 103 (original 206 × 206, scales 2): the last pixel, the mirror axis, is binned 102; samples
    # lie at binned 8j − 64, i.e. 96 (inside) and 104 (outside). A bump centred on the axis peaks on the
    # outside sample; its inside neighbour must give the pick (it was lost when only map-wide maxima counted)
    geometry = MapGeometry(OS, PAD, (2.0, 2.0))
    j = np.arange(24)
    binned = 8.0 * j - 64
    for axis in ("x", "y"):
        bump_x, bump_y = (102.0, 48.0) if axis == "x" else (48.0, 102.0)
        logits = 4.0 * np.exp(-((binned[None, :] - bump_x) ** 2 + (binned[:, None] - bump_y) ** 2) / (2 * 10.0**2)) - 3.0
        assert logits[14, 21] > logits[14, 20] if axis == "x" else logits[21, 14] > logits[20, 14]
        candidates = candidate_picks(logits, geometry, (103, 103), (206, 206), radius_px=20.0)
        best = int(np.argmax(candidates.score))
        x, y = candidates.x[best], candidates.y[best]
        assert (x, y) == ((200.0, 96.0) if axis == "x" else (96.0, 200.0))  # half a sample towards the axis
        np.testing.assert_allclose(candidates.score[best], 1 / (1 + np.exp(3.0 - 4.0 * np.exp(-6.0**2 / 200))))
        assert np.all((candidates.x <= 205) & (candidates.y <= 205))  # never outside the micrograph


def test_inside_probability_halves_peaks_on_the_mirror_axis():
    # 200 × 240 micrograph (rows × cols), band (4, 6): x < 6 or x > 233, y < 4 or y > 195 is on the axis
    x = np.array([5.9, 6.0, 233.0, 233.1, 100.0, 100.0, 100.0])
    y = np.array([100.0, 100.0, 100.0, 100.0, 3.9, 4.0, 195.5])
    np.testing.assert_array_equal(inside_probability(x, y, (200, 240), (4.0, 6.0)),
                                  [0.5, 1.0, 1.0, 0.5, 0.5, 1.0, 0.5])
    assert MapGeometry(OS, PAD, (2.0, 3.0)).mirror_band() == (8.0, 12.0)  # half a sample: 4 binned px


def test_pick_candidates_halve_axis_peaks_before_nms():
    # as above: sample (i, j) → original (16j − 128, 16i − 128); band = 8 original px
    logits = np.full((20, 22), -10.0)
    logits[8, 20] = 2.0  # (192, 0): on the top edge's axis, p = 0.881
    logits[10, 20] = 1.5  # (192, 32): inside, p = 0.818, 32 px from the axis peak
    logits[10, 10] = 3.0  # (32, 32)
    geometry = MapGeometry(OS, PAD, (2.0, 2.0))
    raw = candidate_picks(logits, geometry, (100, 120), (200, 240), radius_px=40.0)
    assert list(zip(raw.x, raw.y))[:2] == [(32.0, 32.0), (192.0, 0.0)]  # the axis peak suppresses (192, 32)
    assert (192.0, 32.0) not in list(zip(raw.x, raw.y))
    halved = candidate_picks(logits, geometry, (100, 120), (200, 240), radius_px=40.0,
                             halve_border_peaks=True)
    assert list(zip(halved.x, halved.y))[:2] == [(32.0, 32.0), (192.0, 32.0)]
    np.testing.assert_allclose(halved.score[:2], 1 / (1 + np.exp(-np.array([3.0, 1.5]))))
    assert (192.0, 0.0) not in list(zip(halved.x, halved.y))  # now the one suppressed


def test_edge_keeps_exactly_the_centres_whose_box_fits():
    # nx = 100, ny = 80, edge 10 (box 20): RELION cuts x−10 … x+9, inside for 10 ≤ x ≤ 90
    x = np.array([9.0, 10.0, 90.0, 91.0, 50.0, 50.0, 50.0])
    y = np.array([40.0, 40.0, 40.0, 40.0, 9.0, 70.0, 71.0])
    assert away_from_edges(x, y, (80, 100), 10.0).tolist() == [False, True, True, False, False, True, False]
    assert away_from_edges(x, y, (80, 100), 0.0).all()


def test_expected_threshold_and_histogram():
    scores = np.array([0.96, 0.92, 0.86, 0.65, 0.35, 0.05, 0.05])
    assert threshold_for_expected(scores, n_micrographs=2, expected=1.5) == 0.86  # 3 picks wanted
    assert threshold_for_expected(scores, n_micrographs=2, expected=100) == 0.05
    assert score_histogram(scores) == [2, 0, 0, 1, 0, 0, 1, 0, 1, 2]
    lines = histogram_lines([2, 0, 0, 1, 0, 0, 1, 0, 1, 2], 0.5, width=4)
    assert lines[5] == "0.5–0.6      0 ← threshold"
    assert lines[9] == "0.9–1.0 ████ 2"


# ------------------------------------------------------------------ names and shards


@pytest.mark.parametrize("name, expected", [
    ("MotionCorr/job002/Movies/mic001.mrc", "Movies/mic001_cryopick.star"),
    ("Micrographs/mic001.mrc", "Micrographs/mic001_cryopick.star"),
    ("/abs/path/mic001.mrc", "abs/path/mic001_cryopick.star"),
    ("../data/mic001.mrc", "data/mic001_cryopick.star"),
    ("mic.tiff.mrc", "mic.tiff_cryopick.star"),
])
def test_coordinate_file_names_follow_relion(name, expected):
    assert coordinate_file_name(name, "cryopick") == expected


def test_parse_shard_and_torchrun_environment():
    assert parse_shard("1/4", {}) == (1, 4)
    assert parse_shard(None, {}) == (0, 1)
    assert parse_shard(None, {"WORLD_SIZE": "3", "RANK": "2"}) == (2, 3)
    assert parse_shard(None, {"WORLD_SIZE": "1", "RANK": "0"}) == (0, 1)
    for bad in ("4/4", "a/b", "1/0"):
        with pytest.raises(CryopickError):
            parse_shard(bad, {})


def test_shards_cover_every_micrograph_exactly_once():
    items = list(range(11))
    shards = [shard_items(items, i, 3) for i in range(3)]
    assert shards[0] == [0, 3, 6, 9]
    assert sorted(sum(shards, [])) == items


# ------------------------------------------------------------------ end to end

RECORD = PreprocessRecord(pixel_size=2.0, bin_factor=2.0, diameter_A=40.0)  # particle 20 original px
BLOBS = {  # original px (x, y) on 360×440 (rows × cols) micrographs
    "mic001": [(100.0, 90.0), (300.0, 200.0), (205.0, 310.0)],
    "mic002": [(60.0, 250.0), (380.0, 80.0)],
    "mic003": [],
}


@pytest.fixture(scope="module")
def blob_checkpoint(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("model") / "blob.pt", blob_detector(), RECORD)


@pytest.fixture
def relion_project(tmp_path, monkeypatch):
    """Project dir with MotionCorr/job002/Movies/*.mrc and a micrographs STAR of relative names."""
    monkeypatch.chdir(tmp_path)
    names = []
    for k, (stem, blobs) in enumerate(BLOBS.items()):
        name = f"MotionCorr/job002/Movies/{stem}.mrc"
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        write_mrc(tmp_path / name, blob_image((360, 440), blobs, sigma=6.0, seed=k), pixel_size=2.0)
        names.append(name)
    write_micrographs_star(tmp_path / "micrographs.star", names, pixel_size=2.0)
    return tmp_path


def quiet_config(**overrides) -> PickConfig:
    return PickConfig(workers=0, **overrides)


def nearest_distances(found: Picks, truth) -> np.ndarray:
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, 2)
    points = np.stack([found.x, found.y], axis=1)
    return np.sqrt(((points[:, None, :] - truth[None]) ** 2).sum(-1)).min(axis=1)


def test_pick_finds_blobs_and_writes_relion_files(relion_project, blob_checkpoint):
    summary = pick("micrographs.star", blob_checkpoint, "AutoPick/job010", quiet_config(), quiet=True)
    out = relion_project / "AutoPick/job010"
    assert summary.counts == {f"MotionCorr/job002/Movies/{s}.mrc": len(b) for s, b in BLOBS.items()}
    assert summary.radius_px == 10.0  # half of 40 Å at 2 Å/px
    for stem, blobs in BLOBS.items():
        path = out / "Movies" / f"{stem}_cryopick.star"
        if not blobs:
            assert path.stat().st_size == 0  # RELION's empty coordinate file
            continue
        block, labels, rows = strict_star_loop(path.read_text())
        assert block == ""
        assert labels == ["rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit", "rlnClassNumber",
                          "rlnAnglePsi"]
        table = starfile.read(path)
        assert len(table) == len(rows) == len(blobs)
        found = read_coordinate_star(path)
        assert nearest_distances(found, blobs).max() <= OS * RECORD.bin_factor / 2  # within half a map step
        assert (found.score >= 0.5).all() and (np.diff(found.score) <= 0).all()
        assert np.array_equal(found.x, np.rint(found.x))  # whole pixels: RELION truncates
    assert (out / "coords_suffix_cryopick.star").read_text() == "micrographs.star\n"
    block, labels, rows = strict_star_loop((out / "coordinates_cryopick.star").read_text())
    assert (block, labels) == ("coordinate_files", ["rlnMicrographName", "rlnMicrographCoordinates"])
    assert rows == [[f"MotionCorr/job002/Movies/{s}.mrc", f"AutoPick/job010/Movies/{s}_cryopick.star"]
                    for s in BLOBS]
    assert resolve(PickConfig, out / "pick_config.yaml").radius_px == 10.0
    assert (out / ".cryopick_pick.json").is_file()
    assert not (out / "micrographs_cryopick.star").exists()  # the input STAR is the micrographs node


def test_background_loading_batching_and_tiling_do_not_change_results(relion_project, blob_checkpoint):
    pick("micrographs.star", blob_checkpoint, "a", PickConfig(workers=0, batch_size=1), quiet=True)
    pick("micrographs.star", blob_checkpoint, "b", PickConfig(workers=2, batch_size=3), quiet=True)
    pick("micrographs.star", blob_checkpoint, "c", PickConfig(workers=1, batch_size=2, tile_size=200), quiet=True)
    for stem in BLOBS:
        a = (relion_project / "a/Movies" / f"{stem}_cryopick.star").read_bytes()
        assert a == (relion_project / "b/Movies" / f"{stem}_cryopick.star").read_bytes()
        assert a == (relion_project / "c/Movies" / f"{stem}_cryopick.star").read_bytes()


def test_directory_input_writes_its_own_micrographs_star(tmp_path, monkeypatch, blob_checkpoint):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mics").mkdir()
    write_mrc(tmp_path / "mics/m1.mrc", blob_image((300, 260), [(130.0, 150.0)], sigma=6.0), pixel_size=2.0)
    summary = pick("mics", blob_checkpoint, "out", quiet_config(), quiet=True)
    assert summary.counts == {"mics/m1.mrc": 1}
    assert (tmp_path / "out/coords_suffix_cryopick.star").read_text() == "out/micrographs_cryopick.star\n"
    blocks = starfile.read(tmp_path / "out/micrographs_cryopick.star", parse_as_string=["rlnMicrographName"])
    assert blocks["micrographs"]["rlnMicrographName"].tolist() == ["mics/m1.mrc"]
    assert blocks["optics"]["rlnMicrographPixelSize"].tolist() == [2.0]
    assert (tmp_path / "out/mics/m1_cryopick.star").is_file()


def test_rescales_micrographs_at_another_pixel_size(tmp_path, monkeypatch, blob_checkpoint):
    # 1 Å/px: the same 40-Å particle is 40 px; factor 4 brings it to the trained 4 Å/px binned
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mics").mkdir()
    blobs = [(200.0, 180.0), (520.0, 430.0)]
    write_mrc(tmp_path / "mics/fine.mrc", blob_image((640, 720), blobs, sigma=12.0), pixel_size=1.0)
    summary = pick("mics/fine.mrc", blob_checkpoint, "out", quiet_config(), quiet=True)
    assert summary.radius_px == 20.0
    found = read_coordinate_star(tmp_path / "out/mics/fine_cryopick.star")
    assert len(found) == 2
    assert nearest_distances(found, blobs).max() <= OS * 4 / 2


def test_upsamples_micrographs_coarser_than_training(tmp_path, monkeypatch, blob_checkpoint):
    # 5 Å/px, coarser than the trained 4 Å/px binned pixel: upsampled ×1.25 (was "cannot Fourier-crop")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mics").mkdir()
    blobs = [(40.0, 36.0), (104.0, 86.0)]
    write_mrc(tmp_path / "mics/coarse.mrc", blob_image((128, 144), blobs, sigma=12.0 / 5), pixel_size=5.0)
    summary = pick("mics/coarse.mrc", blob_checkpoint, "out", quiet_config(), quiet=True)
    assert summary.failed == {} and summary.radius_px == 4.0
    found = read_coordinate_star(tmp_path / "out/mics/coarse_cryopick.star")
    assert len(found) == 2
    assert nearest_distances(found, blobs).max() <= OS * 0.8 / 2  # half a map step, in 5-Å pixels


def test_picking_another_micrograph_set_into_one_out_says_the_lists_name_this_run_only(relion_project,
                                                                                       blob_checkpoint, capsys):
    pick("micrographs.star", blob_checkpoint, "out", quiet_config(), quiet=True)
    assert "earlier run" not in capsys.readouterr().err
    pick("MotionCorr/job002/Movies/mic002.mrc", blob_checkpoint, "out", quiet_config(), quiet=True)
    text = " ".join(capsys.readouterr().err.split())
    assert "2 coordinate file(s) in out (e.g. Movies/mic001_cryopick.star) belong to micrographs of an earlier" in text
    block, labels, rows = strict_star_loop((relion_project / "out/coordinates_cryopick.star").read_text())
    assert [row[0] for row in rows] == ["MotionCorr/job002/Movies/mic002.mrc"]


def test_rerun_skips_existing_files_and_overwrite_redoes_them(relion_project, blob_checkpoint):
    pick("micrographs.star", blob_checkpoint, "out", quiet_config(), quiet=True)
    star = relion_project / "out/Movies/mic001_cryopick.star"
    star.write_text(star.read_text())  # same content, new mtime we can recognise
    os.utime(star, ns=(1, 1))
    again = pick("micrographs.star", blob_checkpoint, "out", quiet_config(), quiet=True)
    assert again.counts == {}
    assert len(again.skipped) == 3
    assert star.stat().st_mtime_ns == 1
    assert len(strict_star_loop((relion_project / "out/coordinates_cryopick.star").read_text())[2]) == 3
    redone = pick("micrographs.star", blob_checkpoint, "out", quiet_config(overwrite=True), quiet=True)
    assert len(redone.counts) == 3 and star.stat().st_mtime_ns != 1


def test_interrupted_run_resumes_where_it_stopped(relion_project, blob_checkpoint, monkeypatch):
    import cryopick.pick as pick_module

    real_writer = pick_module.write_coordinate_star
    calls = []

    def interrupt_on_second(path, *args):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while writing the second micrograph's file
        real_writer(path, *args)

    monkeypatch.setattr(pick_module, "write_coordinate_star", interrupt_on_second)
    with pytest.raises(KeyboardInterrupt):
        pick("micrographs.star", blob_checkpoint, "out", PickConfig(workers=2, batch_size=1), quiet=True)
    monkeypatch.setattr(pick_module, "write_coordinate_star", real_writer)
    written = sorted(p.name for p in (relion_project / "out/Movies").iterdir())
    assert written == ["mic001_cryopick.star"]  # no partial file of the interrupted one
    resumed = pick("micrographs.star", blob_checkpoint, "out", quiet_config(), quiet=True)
    assert resumed.skipped == ["MotionCorr/job002/Movies/mic001.mrc"]
    assert sorted(resumed.counts) == ["MotionCorr/job002/Movies/mic002.mrc", "MotionCorr/job002/Movies/mic003.mrc"]


def test_shards_compose_into_one_directory(relion_project, blob_checkpoint):
    first = pick("micrographs.star", blob_checkpoint, "out", quiet_config(shard="0/2"), quiet=True)
    listed = strict_star_loop((relion_project / "out/coordinates_cryopick.star").read_text())[2]
    assert [r[0] for r in listed] == list(first.counts)  # lists cover what exists so far
    second = pick("micrographs.star", blob_checkpoint, "out", quiet_config(shard="1/2"), quiet=True)
    assert sorted(first.counts) == ["MotionCorr/job002/Movies/mic001.mrc", "MotionCorr/job002/Movies/mic003.mrc"]
    assert sorted(second.counts) == ["MotionCorr/job002/Movies/mic002.mrc"]
    listed = strict_star_loop((relion_project / "out/coordinates_cryopick.star").read_text())[2]
    assert len(listed) == 3


def test_torchrun_environment_selects_the_shard(relion_project, blob_checkpoint, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    summary = pick("micrographs.star", blob_checkpoint, "out", quiet_config(), quiet=True)
    assert list(summary.counts) == ["MotionCorr/job002/Movies/mic002.mrc"]
    assert summary.shard == (1, 3)


def test_refuses_to_overwrite_foreign_files(relion_project, blob_checkpoint):
    foreign = relion_project / "out/Movies/mic002_cryopick.star"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("someone else's picks\n")
    (relion_project / "out/note.txt").write_text("RELION's job note\n")  # unrelated files are fine
    with pytest.raises(CryopickError, match="mic002_cryopick.star"):
        pick("micrographs.star", blob_checkpoint, "out", quiet_config(overwrite=True), quiet=True)
    assert foreign.read_text() == "someone else's picks\n"
    assert not (relion_project / "out/Movies/mic001_cryopick.star").exists()


def test_unreadable_micrographs_are_skipped_and_all_failed_is_an_error(tmp_path, monkeypatch, blob_checkpoint):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mics").mkdir()
    write_mrc(tmp_path / "mics/bad.mrc", np.zeros((300, 260), np.float32), pixel_size=2.0)
    with open(tmp_path / "mics/bad.mrc", "r+b") as handle:
        handle.truncate(5000)  # header intact, data cut short
    write_mrc(tmp_path / "mics/good.mrc", blob_image((300, 260), [(130.0, 150.0)], sigma=6.0), pixel_size=2.0)
    summary = pick("mics", blob_checkpoint, "out", quiet_config(), quiet=True)
    assert list(summary.counts) == ["mics/good.mrc"]
    assert list(summary.failed) == ["mics/bad.mrc"]
    assert summary.failed["mics/bad.mrc"].startswith("corrupt or truncated MRC file")
    (tmp_path / "mics/good.mrc").unlink()
    with pytest.raises(CryopickError, match="every micrograph failed"):
        pick("mics", blob_checkpoint, "out2", quiet_config(), quiet=True)
    assert not (tmp_path / "out2").exists()  # no empty lists that look like a finished job
    (tmp_path / "out3").mkdir()
    with pytest.raises(CryopickError, match="every micrograph failed"):
        pick("mics", blob_checkpoint, "out3", quiet_config(), quiet=True)
    assert list((tmp_path / "out3").iterdir()) == []  # an empty --out given is left, empty
    with pytest.raises(CryopickError, match="every micrograph failed"):  # the earlier --out keeps its picks
        pick("mics", blob_checkpoint, "out", quiet_config(), quiet=True)
    assert (tmp_path / "out/mics/good_cryopick.star").is_file()


def test_a_micrograph_missing_from_the_star_is_skipped_and_listed(tmp_path, monkeypatch, blob_checkpoint):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mics").mkdir()
    write_mrc(tmp_path / "mics/good.mrc", blob_image((300, 260), [(130.0, 150.0)], sigma=6.0), pixel_size=2.0)
    write_micrographs_star(tmp_path / "mics.star", ["mics/good.mrc", "mics/deleted.mrc"], 2.0)
    summary = pick("mics.star", blob_checkpoint, "out", quiet_config(), quiet=True)
    assert list(summary.counts) == ["mics/good.mrc"]
    assert summary.failed == {"mics/deleted.mrc": "file not found"}


def test_extra_outputs_box_topaz_particles_and_preview(relion_project, blob_checkpoint):
    config = quiet_config(write_box=True, write_topaz=True, write_particles=True, preview=1, expected_particles=1.0)
    summary = pick("micrographs.star", blob_checkpoint, "out", config, quiet=True)
    out = relion_project / "out"
    found = read_coordinate_star(out / "Movies/mic001_cryopick.star")
    box_lines = (out / "Movies/mic001_cryopick.box").read_text().splitlines()
    # box = diameter 20 px: corner = centre − 10
    assert box_lines == [f"{int(x) - 10}\t{int(y) - 10}\t20\t20" for x, y in zip(found.x, found.y)]
    assert (out / "Movies/mic003_cryopick.box").read_text() == ""
    topaz = (out / "topaz_cryopick.txt").read_text().splitlines()
    assert topaz[0] == "image_name\tx_coord\ty_coord\tscore" and len(topaz) == 1 + 5
    assert topaz[1].startswith(f"mic001\t{int(found.x[0])}\t{int(found.y[0])}\t")
    block, labels, rows = strict_star_loop((out / "particles_cryopick.star").read_text())
    assert labels == ["rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit"]
    assert len(rows) == 5 and rows[0][0] == "MotionCorr/job002/Movies/mic001.mrc"
    import imageio.v3 as iio

    image = iio.imread(out / "preview/Movies/mic001_cryopick.png")
    assert image.shape == (180, 220, 3) and image.dtype == np.uint8
    assert not (out / "preview/Movies/mic002_cryopick.png").exists()
    # 5 candidates well above 0.5 plus weaker noise peaks: the 3rd best of all candidates is a blob
    assert summary.expected_threshold is not None and summary.expected_threshold > 0.5
    assert sum(summary.histogram) >= 5 and sum(summary.histogram[5:]) == 5


def test_a_pick_directory_reads_as_its_per_micrograph_stars_wherever_it_lies(relion_project, blob_checkpoint):
    # evaluate picks/ (and extract --coords picks/) found the same picks in the particles STAR, the .cs, the
    # .box copies and the lists too: "both ... hold coordinates for micrograph ..."
    import shutil

    from cryopick.evaluate import evaluate
    from cryopick.io.coords import find_coordinate_files

    config = quiet_config(write_box=True, write_topaz=True, write_particles=True, write_cryosparc=True)
    pick("micrographs.star", blob_checkpoint, "out", config, quiet=True)
    stars = [f"Movies/mic00{i}_cryopick.star" for i in (1, 2, 3)]
    assert [p.relative_to("out").as_posix() for p in find_coordinate_files("out")] == stars
    shutil.copytree(relion_project / "out", relion_project / "moved")
    assert [p.relative_to("moved").as_posix() for p in find_coordinate_files("moved")] == stars
    report = evaluate("moved", "out", radius=5.0)  # the picks against themselves
    o = report.overall
    assert o["n_picks"] == o["n_truth"] == o["n_matched"] == 5 and o["f1"] == 1.0 and len(report.per_micrograph) == 3


@pytest.mark.parametrize("estimated_f1, method, threshold, mic002_picks",
                         [(0.5, "mixture", 0.25, 3), (0.98, "mixture", 0.4, 2), (0.5, "labels", 0.4, 2)])
def test_default_threshold_is_half_the_calibrations_best_f1_at_most_0_4(relion_project, blob_checkpoint,
                                                                          estimated_f1, method, threshold,
                                                                          mic002_picks):
    """Without --threshold pick cuts at F1*/2 (the F1-optimal cut of a posterior) of a mixture calibration,
    capped at 0.4, and at 0.4 on the labels' coarse step posterior; the cut is recorded in the summary and the
    saved config, and picks exactly what that explicit --threshold picks.

    The calibration maps logit z to (z + 3)/6: raw 0.212 (mic002's best noise peak) → 0.28, 0.173 → 0.24;
    the blobs (raw ≈ 1) → 0.99."""
    from cryopick.calibrate import Calibration
    from cryopick.checkpoint import load_checkpoint

    calibration = Calibration((-3.0, 3.0), (0.0, 1.0), 2.5, 2, 100, 5, 5, True, best_f1_estimate=estimated_f1,
                              method=method)
    ckpt = load_checkpoint(blob_checkpoint)
    ckpt["calibration"] = calibration.to_dict()
    model = relion_project / "calibrated.pt"
    torch.save(ckpt, model)
    default = pick("micrographs.star", model, "default", quiet_config(), quiet=True)
    explicit = pick("micrographs.star", model, "explicit", quiet_config(threshold=threshold), quiet=True)
    assert default.threshold == pytest.approx(threshold)
    assert resolve(PickConfig, relion_project / "default" / "pick_config.yaml").threshold == pytest.approx(threshold)
    movies = "MotionCorr/job002/Movies"
    assert default.counts == explicit.counts == {f"{movies}/mic001.mrc": 3, f"{movies}/mic002.mrc": mic002_picks,
                                                 f"{movies}/mic003.mrc": 0}
    for stem in ("mic001", "mic002"):
        picked = read_coordinate_star(relion_project / "default" / "Movies" / f"{stem}_cryopick.star")
        assert (picked.score >= threshold).all()
