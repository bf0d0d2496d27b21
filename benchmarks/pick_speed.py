"""Speed of ``cryopick pick`` against its floor and against window-by-window scoring (prints figures).

On simulated 4096×4096 micrographs binned ×4 (1024² binned), in one run:
  pick      micrographs/s of ``cryopick.pick.pick`` (reading, preprocessing, dense scoring, NMS, writing)
  floor     read + preprocess + one plain forward pass of ``model.backbone`` over the binned micrograph padded
            as pick pads it (half a patch, plus half the receptive field for ResNet-18/34/50)
  windows   ``model(patch)`` on every 128² window of the output-stride grid, timed on a subset and
            extrapolated to all grid positions (what a naive sliding-window picker costs)
and peak memory (process max RSS; peak CUDA memory on a GPU).

    python benchmarks/pick_speed.py [--backbone resnet8] [--device cpu|cuda|auto] [--quick]
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryopick.checkpoint import save_checkpoint  # noqa: E402
from cryopick.config import PickConfig  # noqa: E402
from cryopick.dataset import reflect_pad  # noqa: E402
from cryopick.device import autocast_factory, channels_last, resolve_device  # noqa: E402
from cryopick.inference import context_pad  # noqa: E402
from cryopick.io.mrc import read_micrograph, write_mrc  # noqa: E402
from cryopick.model import PatchClassifier  # noqa: E402
from cryopick.pick import pick  # noqa: E402
from cryopick.preprocessing import PreprocessRecord, preprocess  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet8")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="2 micrographs of 2048² (binned 512²), fewer windows")
    parser.add_argument("--micrographs", type=int, default=None, help="number of micrographs (default 4, quick 2)")
    parser.add_argument("--size", type=int, default=None, help="micrograph edge, px (default 4096, quick 2048)")
    parser.add_argument("--bin", type=int, default=4)
    parser.add_argument("--windows", type=int, default=None, help="windows timed for the extrapolation")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    return parser.parse_args(argv)


def simulated_micrograph(size: int, seed: int) -> np.ndarray:
    """Gaussian noise with a few hundred bright blobs (the content does not change the cost)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(size, size)).astype(np.float32)
    for x, y in rng.integers(40, size - 40, size=(size // 20, 2)):
        image[y - 8: y + 8, x - 8: x + 8] += 1.5
    return image


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_floor(paths: list[Path], model: PatchClassifier, factor: float, device: torch.device, pad: int
               ) -> tuple[float, float, float]:
    """Seconds per micrograph, serially: read + preprocess; backbone forward over the binned image reflect-padded
    as pick pads it (half a patch plus the backbone's context); the same forward over the bare binned image."""
    loading = forward = bare = 0.0
    context = context_pad(model, 2 * pad)
    with torch.inference_mode(), autocast_factory(device.type == "cuda")():
        for path in paths:
            start = time.perf_counter()
            binned, _ = preprocess(read_micrograph(path), factor)
            x = channels_last(binned[None, None].to(device), True)
            padded = channels_last(reflect_pad(x, pad + context), True)
            synchronise(device)
            middle = time.perf_counter()
            model.backbone(padded)
            synchronise(device)
            after = time.perf_counter()
            model.backbone(x)
            synchronise(device)
            loading += middle - start
            forward += after - middle
            bare += time.perf_counter() - after
    return loading / len(paths), forward / len(paths), bare / len(paths)


def time_windows(path: Path, model: PatchClassifier, factor: float, device: torch.device, n_windows: int,
                 patch_size: int = 128, batch: int = 64) -> tuple[float, int]:
    """Seconds per micrograph when every grid window is scored as its own patch (extrapolated)."""
    binned, _ = preprocess(read_micrograph(path), factor)
    stride, half = model.output_stride, patch_size // 2
    padded = reflect_pad(binned[None, None], half)[0, 0]
    rows, cols = math.ceil(binned.shape[0] / stride), math.ceil(binned.shape[1] / stride)
    total = rows * cols
    rng = np.random.default_rng(0)
    chosen = rng.choice(total, size=min(n_windows, total), replace=False)
    centres = [(k // cols * stride, k % cols * stride) for k in chosen]
    start = time.perf_counter()
    with torch.inference_mode(), autocast_factory(device.type == "cuda")():
        for k in range(0, len(centres), batch):
            chunk = centres[k: k + batch]
            patches = torch.stack([padded[cy: cy + patch_size, cx: cx + patch_size] for cy, cx in chunk])
            x = channels_last(patches[:, None].to(device), True)
            model(x)
        synchronise(device)
    seconds = time.perf_counter() - start
    return seconds / len(centres) * total, total


def main(argv=None) -> None:
    args = parse_args(argv)
    n = args.micrographs or (2 if args.quick else 4)
    size = args.size or (2048 if args.quick else 4096)
    n_windows = args.windows or (256 if args.quick else 1024)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = PatchClassifier(args.backbone, dropout=0.0).eval()
    record = PreprocessRecord(pixel_size=1.0, bin_factor=float(args.bin), diameter_A=64.0 * args.bin)
    with tempfile.TemporaryDirectory(prefix="cryopick-bench-") as tmp:
        tmp = Path(tmp)
        paths = []
        for k in range(n):
            paths.append(tmp / "mics" / f"mic{k:03d}.mrc")
            write_mrc(paths[-1], simulated_micrograph(size, k), pixel_size=1.0)
        ckpt = tmp / "model.pt"
        save_checkpoint(ckpt, model_spec=model.spec, model_state=model.state_dict(), ema_state=None, config={},
                        preprocess=record.to_dict())
        binned_edge = round(size / args.bin)
        print(f"{n} micrographs {size}×{size}, bin ×{args.bin} → {binned_edge}², {args.backbone} on {device} "
              f"({torch.get_num_threads()} CPU threads)")

        # warm-up (allocator, cuDNN autotuning, page cache) on one micrograph, not timed
        warm = PickConfig(device=str(device), workers=0, batch_size=1)
        pick(paths[0], ckpt, tmp / "warmup", warm, quiet=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        config = PickConfig(device=str(device), workers=args.workers, batch_size=args.batch_size)
        start = time.perf_counter()
        summary = pick(tmp / "mics", ckpt, tmp / "out", config, quiet=True)
        pick_seconds = (time.perf_counter() - start) / n
        rss_after_pick = max_rss_mib()
        cuda_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None

        model = channels_last(model.to(device), True)
        load_seconds, forward_seconds, bare_seconds = time_floor(paths, model, record.bin_factor, device,
                                                                 record.patch_size // 2)
        floor_seconds = load_seconds + forward_seconds
        window_seconds, total_windows = time_windows(paths[0], model, record.bin_factor, device, n_windows)

    print(f"pick            {1 / pick_seconds:8.3f} micrographs/s  ({pick_seconds:.3f} s each, "
          f"{summary.total_picks} picks from a random network)")
    print(f"floor           {1 / floor_seconds:8.3f} micrographs/s  ({floor_seconds:.3f} s = {load_seconds:.3f} s "
          f"read + preprocess + {forward_seconds:.3f} s backbone forward over the padded image, one after the other)")
    print(f"context cost    {forward_seconds / bare_seconds:8.2f}×  (forward over the image padded by "
          f"{record.patch_size // 2} + {context_pad(model, record.patch_size)} px vs the bare binned image)")
    print(f"window-by-window{1 / window_seconds:8.3f} micrographs/s  ({window_seconds:.1f} s: {total_windows} "
          f"windows, extrapolated from {min(n_windows, total_windows)})")
    print(f"pick / floor    {pick_seconds / floor_seconds:8.2f}×  (time; below 1 when background loading "
          "overlaps reading with scoring)")
    print(f"windows / pick  {window_seconds / pick_seconds:8.1f}×  (time; the dense map's speed-up)")
    print(f"peak memory     {rss_after_pick:8.0f} MiB max RSS after pick, {max_rss_mib():.0f} MiB at the end"
          + (f", {cuda_peak:.0f} MiB CUDA peak in pick" if cuda_peak is not None else ""))


if __name__ == "__main__":
    main()
