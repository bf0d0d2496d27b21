"""Benchmark `cryopick extract` against the floor of reading + binning the same micrographs.

Not a test: prints figures. Both runs use the same worker processes and the same code
(cryopick.io.mrc.read_micrograph + cryopick.preprocessing.preprocess), in one process tree.
Peak memory is measured for two dataset sizes to show it does not grow with the micrograph count.

    python benchmarks/extract_speed.py --micrographs 20 --size 4096 --workers 2
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from cryopick.io.mrc import read_micrograph, write_mrc
from cryopick.io.relion import write_coordinate_star
from cryopick.preprocessing import preprocess


def make_micrographs(root: Path, n: int, size: int, pixel_size: float, seed: int = 0) -> None:
    """Gaussian noise plus bright disks; labels on every other micrograph."""
    rng = np.random.default_rng(seed)
    (root / "mics").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    base = rng.normal(0, 1, (size, size)).astype(np.float32)
    for i in range(n):
        image = np.roll(base, shift=(37 * i, 91 * i), axis=(0, 1))
        xy = rng.uniform(200, size - 200, (40, 2))
        write_mrc(root / "mics" / f"mic{i:03d}.mrc", image, pixel_size)
        if i % 2 == 0:
            write_coordinate_star(root / "labels" / f"mic{i:03d}_manualpick.star", xy[:, 0], xy[:, 1], np.ones(40))


def _floor_one(args: tuple[str, float]) -> int:
    import torch

    torch.set_num_threads(1)
    path, factor = args
    binned, _ = preprocess(read_micrograph(path), factor)
    return binned.numel()


def run_floor(paths: list[Path], factor: float, workers: int) -> float:
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_floor_one, [(str(p), factor) for p in paths]))
    return time.perf_counter() - t0


def run_extract_child(root: Path, n: int, workers: int, diameter: float) -> dict:
    """extract in a fresh process so its peak RSS (self + workers) is its own."""
    code = f"""
import json, resource, time
from pathlib import Path
from cryopick.config import ExtractConfig
from cryopick.extract import extract
root = Path({str(root)!r})
mics = sorted((root / 'mics').glob('*.mrc'))[:{n}]
sub = root / 'subset_{n}'
sub.mkdir(exist_ok=True)
for p in mics:
    link = sub / p.name
    if not link.exists():
        link.symlink_to(p)
t0 = time.perf_counter()
extract(str(sub), str(root / 'labels'), root / 'out_{n}', ExtractConfig(diameter={diameter}, workers={workers}, overwrite=True), quiet=True)
dt = time.perf_counter() - t0
kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({{'seconds': dt, 'peak_rss_mb': kb / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--micrographs", type=int, default=20)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pixel-size", type=float, default=1.0)
    ap.add_argument("--diameter", type=float, default=256.0, help="Å; 256 Å at 1 Å/px gives bin ×4")
    ap.add_argument("--keep", type=Path, default=None, help="work directory to keep (default: a temp dir)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        make_micrographs(root, args.micrographs, args.size, args.pixel_size)
        paths = sorted((root / "mics").glob("*.mrc"))
        factor = round(args.diameter / args.pixel_size / 64)
        run_floor(paths[:2], factor, args.workers)  # warm the page cache and imports alike for both
        floor = run_floor(paths, factor, args.workers)
        full = run_extract_child(root, args.micrographs, args.workers, args.diameter)
        half = run_extract_child(root, max(1, args.micrographs // 2), args.workers, args.diameter)
    ratio = full["seconds"] / floor
    print(f"machine: {platform.node()} ({platform.processor() or platform.machine()}), "
          f"{args.micrographs} × {args.size}² float32, bin ×{factor}, workers {args.workers}")
    print(f"{'':28s}{'seconds':>10s}{'mic/s':>10s}")
    print(f"{'floor (read + bin)':28s}{floor:10.2f}{args.micrographs / floor:10.2f}")
    print(f"{'cryopick extract':28s}{full['seconds']:10.2f}{args.micrographs / full['seconds']:10.2f}")
    print(f"ratio extract / floor: {ratio:.2f}  (goal ≤ 1.3)")
    print(f"peak RSS: {full['peak_rss_mb']:.0f} MB with {args.micrographs} micrographs, "
          f"{half['peak_rss_mb']:.0f} MB with {max(1, args.micrographs // 2)} (bounded if about equal)")


if __name__ == "__main__":
    main()
