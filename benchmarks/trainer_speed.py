"""Trainer throughput against a plain PyTorch loop doing the same math, and eval's share of wall time.

    python benchmarks/trainer_speed.py                 # cpu preset, 1 thread, 5 repeats
    python benchmarks/trainer_speed.py --preset medium-512 --steps 300 --threads 0   # on a GPU

Prints, per method, the median training tokens/s of `trainer.train` and of a bare loop (same model,
same AdamW groups, same clipping and batch sampling, no evaluation, checkpoints or logging), their
ratio (target >= 0.95) and the median and range of the paired ratios (each repeat runs the trainer
and the loop back to back, so a slow spell of a shared machine hits both), the frozen methods
against baseline (target: not slower), and the share of wall time that evaluation takes in a run
at the preset's default eval settings (target <= 10%).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time

import torch

from oelm_ray.core.batches import Sampler
from oelm_ray.core.config import METHODS, make_config
from oelm_ray.core.data import prepare
from oelm_ray.core.model import GPT
from oelm_ray.core.optim import build_optimizer, lr_at
from oelm_ray.core.prepared import load_prepared
from oelm_ray.core.train_step import resolve_device
from oelm_ray.core.trainer import train


def plain_loop(cfg, data, steps: int) -> float:
    """Tokens/s of the same math without the trainer around it."""
    device, amp = resolve_device(cfg)
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model).to(device)
    opt = build_optimizer(model, cfg, device)
    sampler = Sampler(data.train, cfg.model.block_size, cfg.train.batch_size, cfg.train.seed)
    ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
    params = [p for p in model.parameters() if p.requires_grad]
    warm = min(10, steps // 5)
    for step in range(steps + warm):
        if step == warm:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg) * g["lr_mult"]
        x, y = sampler.next()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with ctx():
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * cfg.train.batch_size * cfg.model.block_size / (time.perf_counter() - t0)


def trainer_tps(cfg, data) -> float:
    with tempfile.TemporaryDirectory() as d:
        s = train(cfg, d, data=data, log=lambda _: None)
    return s["tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    ap.add_argument("--data-dir", default="runs/data")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = dict(data_dir=args.data_dir, num_threads=args.threads)
    cfg0 = make_config(args.preset, **base)
    prepare(cfg0.data)
    data = load_prepared(cfg0.data)
    print(
        f"preset {args.preset}, {args.steps} steps x {args.repeats} repeats, device {resolve_device(cfg0)[0]}, "
        f"threads {torch.get_num_threads()}"
    )
    print(
        f"{'method':<12} {'trainer tok/s':>14} {'plain tok/s':>12} {'ratio':>6} {'paired ratio: median [min, max]':>32}"
    )
    tr: dict[str, list[float]] = {m: [] for m in METHODS}
    pl: dict[str, list[float]] = {m: [] for m in METHODS}
    cfgs = {  # one evaluation at the very end, so the timed part is training only, as in the plain loop
        m: make_config(
            args.preset,
            **base,
            method=m,
            max_steps=args.steps,
            warmup_steps=min(cfg0.train.warmup_steps, args.steps // 2),
            eval_interval=args.steps,
            log_interval=args.steps,
        )
        for m in METHODS
    }
    for _ in range(args.repeats):  # methods and loops interleaved: drift in machine speed hits all alike
        for m in METHODS:
            tr[m].append(trainer_tps(cfgs[m], data))
            pl[m].append(plain_loop(cfgs[m], data, args.steps))
    medians = {m: statistics.median(tr[m]) for m in METHODS}
    for m in METHODS:
        paired = [t / p for t, p in zip(tr[m], pl[m])]
        print(
            f"{m:<12} {medians[m]:>14,.0f} {statistics.median(pl[m]):>12,.0f} "
            f"{medians[m] / statistics.median(pl[m]):>6.3f} "
            f"{statistics.median(paired):>16.3f} [{min(paired):.3f}, {max(paired):.3f}]"
        )
    for m in METHODS[1:]:
        print(f"{m} vs baseline (trainer tok/s): {medians[m] / medians['baseline']:.3f}x")
    # eval share at the preset's own eval settings (a shortened run keeps the same interval/batches)
    steps = 2 * cfg0.train.eval_interval
    cfg = make_config(args.preset, **base, max_steps=steps, warmup_steps=min(cfg0.train.warmup_steps, steps // 2))
    with tempfile.TemporaryDirectory() as d:
        s = train(cfg, d, data=data, log=lambda _: None)
    print(
        f"eval share of wall time at eval_interval={cfg.train.eval_interval}, eval_batches={cfg.train.eval_batches}: "
        f"{100 * s['eval_time_s'] / s['total_wall_time']:.1f}% ({s['eval_time_s']:.2f}s of {s['total_wall_time']:.1f}s)"
    )


if __name__ == "__main__":
    main()
