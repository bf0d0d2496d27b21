"""Picking accuracy of pick's dense path vs explicit window-by-window scoring (prints figures).

Both paths use the same checkpoint, preprocessing, peak finding, NMS and evaluation; only the score
map differs: one fully-convolutional pass over the padded micrograph (what ``cryopick pick`` does) or
``model(window)`` on the window centred on every sample of the stride-8 grid. Two windows: the 128-px patch
(what the patch classifier sees) and, for backbones trained densely with a context margin (ResNet-18/34/50),
the patch plus that margin on each side (what a trained map sample saw). Goal: AP within 0.01.

    python benchmarks/dense_vs_windows.py --model experiments/run/checkpoints/best.pt \
        --micrographs sim/micrographs.star --truth sim/truth [--limit 2] [--crop 512] [--device cuda]

``--crop PX`` scores only the top-left PX × PX original pixels of each micrograph (both paths, and the truth
inside it): window-by-window scoring of a ResNet-18 on a CPU is otherwise too slow.
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
from cryopick.inference import MapGeometry, dense_score_map
from cryopick.io.coords import read_coordinates
from cryopick.io.matching import match_coordinates
from cryopick.io.micrographs import find_micrographs
from cryopick.io.mrc import read_header, read_micrograph
from cryopick.nms import candidate_picks
from cryopick.preprocessing import micrograph_factor, preprocess
from cryopick.train import context_margin


@torch.inference_mode()
def window_score_map(model, binned: torch.Tensor, pad: int, half: int, device: torch.device,
                     batch: int = 256) -> np.ndarray:
    """``model(window)`` for the ``2·half``-px window centred on every map sample (i, j) ↔ padded pixel (8i, 8j)
    (``pad``: pick's reflection padding; beyond it, zeros)."""
    padded = reflect_pad(binned[None, None], pad)[0, 0]
    size, stride = 2 * half, model.output_stride
    # the dense map's shape: one sample per stride over the padded image
    rows, cols = -(-padded.shape[0] // stride), -(-padded.shape[1] // stride)
    big = torch.nn.functional.pad(padded, (half, half, half, half), mode="constant").to(device)
    centres = [(i, j) for i in range(rows) for j in range(cols)]
    out = np.empty(len(centres), np.float32)
    for start in range(0, len(centres), batch):
        chunk = centres[start:start + batch]
        windows = torch.stack([big[i * stride: i * stride + size, j * stride: j * stride + size] for i, j in chunk])
        out[start:start + len(chunk)] = model(windows[:, None]).float().cpu().numpy()
    return out.reshape(rows, cols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--micrographs", required=True)
    ap.add_argument("--truth", required=True)
    ap.add_argument("--limit", type=int, default=2, help="micrographs to score (window-by-window is slow)")
    ap.add_argument("--crop", type=int, default=None,
                    help="score the top-left CROP × CROP original px of each micrograph (default: all of it)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    device = torch.device(args.device)
    ckpt = load_checkpoint(args.model)
    model, record = model_from_checkpoint(ckpt).to(device), preprocess_from_checkpoint(ckpt)
    dense_trained = ckpt.get("config", {}).get("data", {}).get("mode") == "dense"
    margin = context_margin(model, record.patch_size) if dense_trained else 0
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
