"""Samples/s of a full cryopick training step vs the same step on pre-made tensors, for patch and dense training.

Not a test: prints figures. Patches: "full" = sample a P:U batch from the in-memory dataset, weak + strong
augmentation on the training device, student forward (P weak, U weak, U strong), EMA-teacher forward,
all loss terms, backward, optimizer step, EMA update. Dense (the default mode): "full" = cut a batch of
crops (with the backbone's context) and their target maps from in-memory micrographs (``cryopick.crops.CropSampler``), strong view,
student forward (weak + strong maps), teacher forward, loss, backward, step, EMA. "Pre-made" = the same step
on fixed tensors. Their ratio is the data + augmentation overhead (goal ≤ 1.1). Samples = patches or crops.

    python benchmarks/train_speed.py --backbone resnet8 --steps 20
    python benchmarks/train_speed.py --mode dense --layout nchw nhwc nchw nhwc   # channels-last on a CPU
    python benchmarks/train_speed.py --backbone resnet18 --device cuda --steps 200   # GPU, bf16 AMP
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time

import torch

from cryopick.config import TrainConfig
from cryopick.crops import CropSampler, crop_sources
from cryopick.data import PUBatchSampler, batch_composition
from cryopick.device import autocast_factory, resolve_device, to_input
from cryopick.ema import EMATeacher
from cryopick.inference import context_pad
from cryopick.model import PatchClassifier
from cryopick.trainstep import dense_step_loss, make_optimizer, make_views, optimisation_step, step_loss


def run(backbone: str, device: torch.device, steps: int, batch: int, amp: bool, compile_model: bool,
        mode: str = "patches", channels_last: bool | None = None) -> dict:
    cfg = TrainConfig()
    cfg.model.backbone, cfg.data.batch_size, cfg.data.mode = backbone, batch, mode
    on_cuda = device.type == "cuda"
    channels_last = True if channels_last is None else channels_last  # None: as train does
    model = PatchClassifier(backbone, cfg.model.dropout).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    teacher = EMATeacher(model, cfg.model.ema_decay)
    opt = make_optimizer(model, cfg)
    fwd = torch.compile(model) if compile_model else model
    n_p, n_u = batch_composition(batch, cfg.data.batch_ratio)
    pos = torch.randn(2000, 128, 128, device=device).half()
    unl = torch.randn(8000, 128, 128, device=device).half()
    sampler = PUBatchSampler(len(pos), len(unl), n_p, n_u, seed=0, steps_per_epoch=steps * 4)
    gen = torch.Generator(device=device).manual_seed(0)

    autocast = autocast_factory(amp and on_cuda)

    def sync():
        if on_cuda:
            torch.cuda.synchronize()

    batches = (b for epoch in itertools.count() for b in sampler.epoch(epoch))
    if mode == "dense":
        full_step, premade_step = _dense_steps(cfg, fwd, teacher, opt, model, device, channels_last, autocast, gen,
                                               n_p, n_u, steps)
        return _time(full_step, premade_step, steps, batch, sync)

    def full_step():
        ip, iu = next(batches)
        xp = to_input(pos[ip.to(device)], channels_last)
        xu = to_input(unl[iu.to(device)], channels_last)
        views = make_views(xp, xu, cfg, 8.0, gen)
        loss, _ = step_loss(fwd, teacher.module, views, cfg, 0.3, 15.0, autocast)
        optimisation_step(loss, opt, teacher, model)

    ip, iu = next(batches)
    fixed = make_views(to_input(pos[ip.to(device)], channels_last), to_input(unl[iu.to(device)], channels_last),
                       cfg, 8.0, gen)

    def premade_step():
        loss, _ = step_loss(fwd, teacher.module, fixed, cfg, 0.3, 15.0, autocast)
        optimisation_step(loss, opt, teacher, model)

    return _time(full_step, premade_step, steps, batch, sync)


def _dense_steps(cfg, fwd, teacher, opt, model, device, channels_last, autocast, gen, n_p, n_u, steps):
    """(full, pre-made) dense training steps on four random 2048² micrographs with 170 labels each; crops carry
    the backbone's context, as train gives them (ResNet-18: 128 + 2·248 px)."""
    context = context_pad(model, 128)
    g = torch.Generator().manual_seed(0)
    mics = [{"name": f"m{i}", "binned": torch.randn(2048, 2048, generator=g).half(),
             "scales": torch.ones(2, dtype=torch.float64), "shape": torch.tensor([2048, 2048]),
             "labels": torch.rand(170, 2, generator=g) * 2048} for i in range(4)]
    sampler = CropSampler(crop_sources(mics, 64 + context), 128, 8, 8.0, n_p, n_u, seed=0, steps_per_epoch=steps * 4,
                          margin=context)
    batches = (b for epoch in itertools.count() for b in sampler.epoch(epoch))

    def full_step():
        crops, targets = next(batches)
        loss, _ = dense_step_loss(fwd, teacher.module, to_input(crops.to(device), channels_last), targets.to(device),
                                  cfg, 0.0, 15.0, autocast, gen)
        optimisation_step(loss, opt, teacher, model)

    crops, targets = next(batches)
    fixed = to_input(crops.to(device), channels_last), targets.to(device)

    def premade_step():
        loss, _ = dense_step_loss(fwd, teacher.module, *fixed, cfg, 0.0, 15.0, autocast, gen)
        optimisation_step(loss, opt, teacher, model)

    return full_step, premade_step


def _time(full_step, premade_step, steps: int, batch: int, sync) -> dict:
    out = {}
    for name, fn in (("premade", premade_step), ("full", full_step), ("premade2", premade_step), ("full2", full_step)):
        for _ in range(max(3, steps // 10)):  # warm-up (cudnn autotune, compile)
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        out[name] = steps * batch / (time.perf_counter() - t0)
    # interleaved twice so drift (thermal, other load) hits both; keep the better of each
    return {"full": max(out["full"], out["full2"]), "premade": max(out["premade"], out["premade2"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", nargs="+", default=["resnet8"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--mode", nargs="+", default=["dense", "patches"], choices=["dense", "patches"])
    ap.add_argument("--layout", nargs="+", default=["auto"], choices=["auto", "nchw", "nhwc"],
                    help="memory layout of model and batches: auto = as train (channels-last); "
                         "give several to compare them in one process")
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"machine: {platform.node()}, device: {name}, batch {args.batch_size} (P:U 1:4), "
          f"AMP {'bf16' if device.type == 'cuda' and not args.no_amp else 'off'}")
    print(f"{'backbone':10s}{'mode':>8s}{'layout':>8s}{'full samples/s':>16s}{'pre-made samples/s':>20s}{'ratio':>8s}")
    layouts = {"auto": None, "nchw": False, "nhwc": True}
    for backbone in args.backbone:
        for mode in args.mode:
            for layout in args.layout:
                r = run(backbone, device, args.steps, args.batch_size, not args.no_amp, args.compile, mode,
                        layouts[layout])
                print(f"{backbone:10s}{mode:>8s}{layout:>8s}{r['full']:16.1f}{r['premade']:20.1f}"
                      f"{r['premade'] / r['full']:8.3f}")


if __name__ == "__main__":
    main()
