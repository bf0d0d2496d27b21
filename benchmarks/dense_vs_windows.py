"""Picking accuracy of pick's dense path vs explicit window-by-window scoring (prints figures).

Both paths use the same checkpoint, preprocessing, peak finding, NMS and evaluation; only the score
map differs: one fully-convolutional pass over the padded micrograph (what ``cryopick pick`` does) or
``model(window)`` on the window centred on every sample of the stride-8 grid. Two windows: the 128-px patch
(what the patch classifier sees) and, for backbones trained densely with context (ResNet-18/34/50: half the
receptive field on each side, ``cryopick.inference.context_pad``), the patch plus that context (what a
trained map sample saw, and what pick's map sample sees). Goal: AP within 0.01.

    python benchmarks/dense_vs_windows.py --model experiments/run/checkpoints/best.pt \
        --micrographs sim/micrographs.star --truth sim/truth [--limit 2] [--crop 512] [--device cuda]

``--crop PX`` scores only the top-left PX × PX original pixels of each micrograph (both paths, and the truth
inside it): window-by-window scoring of a ResNet-18 on a CPU is otherwise too slow. ``--self-check`` only
compares the two maps of a random ResNet-18 on a tiny image (checks the window code; no model needed).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from cryopick.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint
from cryopick.dataset import reflect_pad
from cryopick.evaluate import evaluate_coordinates
from cryopick.inference import MapGeometry, context_pad, dense_score_map
from cryopick.io.coords import read_coordinates
from cryopick.io.matching import match_coordinates
from cryopick.io.micrographs import find_micrographs
from cryopick.io.mrc import read_header, read_micrograph
from cryopick.model import PatchClassifier
from cryopick.nms import candidate_picks
from cryopick.preprocessing import micrograph_factor, preprocess


@torch.inference_mode()
def window_score_map(model, binned: torch.Tensor, pad: int, half: int, device: torch.device,
                     batch: int = 256) -> np.ndarray:
    """``model(window)`` for the ``2·half``-px window centred on every map sample (i, j) ↔ binned pixel
    (8i − pad, 8j − pad) (``pad``: pick's patch padding), cut from the micrograph reflected by ``half`` px
    (extract's patches for ``half = pad``, dense training's crops with context beyond it); zeros further out."""
    stride = model.output_stride
    # the dense map's shape: one sample per stride over the pad-padded image
    rows, cols = -(-(binned.shape[0] + 2 * pad) // stride), -(-(binned.shape[1] + 2 * pad) // stride)
    reflected = reflect_pad(binned[None, None], half)[0, 0]
    big = torch.nn.functional.pad(reflected, (pad, pad, pad, pad), mode="constant").to(device)
    size = 2 * half
    centres = [(i, j) for i in range(rows) for j in range(cols)]
    out = np.empty(len(centres), np.float32)
    for start in range(0, len(centres), batch):
        chunk = centres[start:start + batch]
        windows = torch.stack([big[i * stride: i * stride + size, j * stride: j * stride + size] for i, j in chunk])
        out[start:start + len(chunk)] = model(windows[:, None]).float().cpu().numpy()
    return out.reshape(rows, cols)


@torch.inference_mode()
def self_check(device: torch.device) -> None:
    """Max |Δlogit| between pick's dense map and the trained-context windows of a random-BN ResNet-18."""
    torch.manual_seed(0)
    model = PatchClassifier("resnet18", dropout=0.0).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    model = model.to(device)
    binned, pad = torch.randn(16, 24), 64
    dense = dense_score_map(model, binned[None].to(device), pad)[0].float().cpu().numpy()
    half = pad + context_pad(model, 2 * pad)
    windows = window_score_map(model, binned, pad, half, device, batch=8)
    print(f"resnet18, {2 * half}-px windows vs dense map {dense.shape}: max |Δlogit| "
          f"{np.abs(dense - windows).max():.2e} (map std {dense.std():.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--micrographs")
    ap.add_argument("--truth")
    ap.add_argument("--self-check", action="store_true",
                    help="only compare the two maps of a random-BatchNorm ResNet-18 on a 16×24 binned image "
                         "(the window code itself; ~2.5 min on 2 CPU cores)")
    ap.add_argument("--limit", type=int, default=2, help="micrographs to score (window-by-window is slow)")
    ap.add_argument("--crop", type=int, default=None,
                    help="score the top-left CROP × CROP original px of each micrograph (default: all of it)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.self_check:
        self_check(device)
        return
    if not (args.model and args.micrographs and args.truth):
        ap.error("--model, --micrographs and --truth are required (or --self-check)")
    ckpt = load_checkpoint(args.model)
    model, record = model_from_checkpoint(ckpt).to(device), preprocess_from_checkpoint(ckpt)
    dense_trained = ckpt.get("config", {}).get("data", {}).get("mode") == "dense"
    margin = context_pad(model, record.patch_size) if dense_trained else 0
    entries = find_micrographs(args.micrographs)[: args.limit]
    truth = match_coordinates(entries, read_coordinates(args.truth)).coords
    pad = record.patch_size // 2
    halves = {"patch": pad} | ({"trained": pad + margin} if margin else {})  # window half-widths, binned px
    names = ["dense", *halves]
    picks = {name: {} for name in names}
    seconds = dict.fromkeys(names, 0.0)
    refs, max_diff = {}, dict.fromkeys(halves, 0.0)
    for k, entry in enumerate(entries):
        pixel_size = entry.pixel_size or read_header(entry.path).pixel_size or record.pixel_size
        image = read_micrograph(entry.path)
        if args.crop:
            image = image[: args.crop, : args.crop]
        binned, scales = preprocess(image, micrograph_factor(record, pixel_size))
        geometry = MapGeometry(model.output_stride, pad, scales)
        radius = record.diameter_A / 2 / pixel_size
        maps = {}
        t = time.perf_counter()
        with torch.inference_mode():
            maps["dense"] = dense_score_map(model, binned[None].to(device), pad)[0].float().cpu().numpy()
        seconds["dense"] += time.perf_counter() - t
        inner = (slice(pad // model.output_stride, -(pad // model.output_stride)),) * 2
        for name, half in halves.items():
            t = time.perf_counter()
            maps[name] = window_score_map(model, binned, pad, half, device)
            seconds[name] += time.perf_counter() - t
            max_diff[name] = max(max_diff[name], float(np.abs(maps["dense"][inner] - maps[name][inner]).max()))
        for name, logits in maps.items():
            p = candidate_picks(logits, geometry, tuple(binned.shape), image.shape, radius)
            picks[name][entry.name] = pd.DataFrame({"x": p.x, "y": p.y, "score": p.score})
        ref = truth.get(k, pd.DataFrame({"x": [], "y": []}))
        inside = (ref["x"] < image.shape[1]) & (ref["y"] < image.shape[0])
        refs[entry.name] = ref[inside].reset_index(drop=True)
    radius = record.diameter_A / 2 / (entries[0].pixel_size or record.pixel_size)
    print(f"backbone {ckpt['model_spec']['backbone']} ({'dense' if dense_trained else 'patch'}-trained, context "
          f"margin {margin} px), {len(entries)} micrographs{f' (top-left {args.crop}² px)' if args.crop else ''}, "
          f"{sum(len(r) for r in refs.values())} particles, match radius {radius:.1f} px")
    aps = {}
    for name in names:
        report = evaluate_coordinates(picks[name], refs, radius)
        aps[name] = report.overall["ap"]
        window = "" if name == "dense" else f" ({2 * halves[name]}-px windows; max |Δlogit| {max_diff[name]:.2e})"
        print(f"{name:8s} AP {report.overall['ap']:.4f}  best F1 {report.overall['best_f1']:.4f}  "
              f"time {seconds[name]:.1f} s{window}")
    for name in halves:
        print(f"|ΔAP| dense vs {name} windows = {abs(aps['dense'] - aps[name]):.4f} (goal ≤ 0.01); "
              f"window-by-window / dense time = {seconds[name] / max(seconds['dense'], 1e-9):.0f}×")


if __name__ == "__main__":
    main()
