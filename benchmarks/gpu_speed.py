"""The trainer's tokens/s against the model-step ceiling on the same shapes, batch and device,
and what the research's protocol (whole-split evaluations, checkpoints) adds to the wall time.

    python benchmarks/gpu_speed.py                    # on a GPU: Medium-512, batch 8, bf16 (< 5 min on an H100/H200)
    python benchmarks/gpu_speed.py --batch-size 32    # other shapes: any config field via --set FIELD=VALUE
    python benchmarks/gpu_speed.py --smoke            # CPU, tiny model (vocab 257), eager: every code path in seconds (CI)

Ceiling: the bare model step (forward, backward, fused AdamW on the trainable parameters; no
clipping, no lr schedule, one batch resident on the device) under each --modes entry (eager,
torch.compile default, reduce-overhead = CUDA graphs); the fastest is the ceiling. "ceiling +
clip": the same step in the fastest mode plus the trainer's gradient-norm clipping, so that
trainer / ceiling+clip is the trainer's own overhead. Trainer: `trainer.train` on the same config
(its own step: dropout, clipping, a new lr every step, batches sampled from a token memmap and
staged from pinned memory, loss accumulated on the device), two eval intervals, each ending in an
evaluation of the whole (synthetic) validation split of --val-tokens tokens at the preset's
eval_batch_size and a checkpoint; its tok/s is summary.json's steady-state figure (compiling and
warm-up steps left out). Printed per method: tok/s, TFLOP/s (nanoGPT's 6N + 12 L d T FLOPs per
token, position embeddings left out of N, frozen Q/K counted: their forward and input gradients
still run) and trainer / ceiling (the goal: >= 0.9 on an H100/H200 at batch 8).

The protocol, per method: seconds per whole-split evaluation (the trainer's second one: the
first compiles), seconds per latest.pt and best.pt (the host copy, which is all a background write
leaves on the critical path on one GPU, and the write with fsync, inline on CPU) into --ckpt-dir,
and the share of wall time each takes at the paper's settings: an evaluation every
--paper-eval-interval (1000) steps on --paper-val-tokens (TinyStories' 4.6M), latest.pt every
checkpoint_every steps of the preset, best.pt at every evaluation (an upper bound: it is written
when the val loss improved).

Needs only torch, numpy, tiktoken, filelock and tqdm (no Ray, datasets or W&B; no download: the
tokens are a synthetic memmap of vocab_size ids). Run from the repository root with PYTHONPATH=.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's oelm_ray, installed or not

from oelm_ray.core.checkpoint import host_copy, save_checkpoint  # noqa: E402
from oelm_ray.core.config import make_config  # noqa: E402
from oelm_ray.core.experiments import TINY_MODEL  # noqa: E402
from oelm_ray.core.io import read_metrics  # noqa: E402
from oelm_ray.core.model import GPT  # noqa: E402
from oelm_ray.core.optim import build_optimizer  # noqa: E402
from oelm_ray.core.options import parse_sets  # noqa: E402
from oelm_ray.core.selftest import synthetic_data  # noqa: E402
from oelm_ray.core.train_step import resolve_device  # noqa: E402
from oelm_ray.core.trainer import train  # noqa: E402

SMOKE = dict(
    **TINY_MODEL,
    vocab_size=257,
    dropout=0.1,
    tokenizer="bytes",
)


def flops_per_token(model: GPT) -> float:
    c = model.cfg
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    L, d, T = c.n_layer, c.d_model, c.block_size
    return 6 * n + 12 * L * d * T


def ceiling(cfg, mode: str, steps: int, warmup: int, clip: bool = False) -> float:
    """Tokens/s of the bare model step under one torch.compile mode ("eager" = none), with the
    trainer's gradient clipping if `clip`."""
    device, amp = resolve_device(cfg)
    torch.manual_seed(0)
    if mode != "eager":
        torch._dynamo.reset()  # a fresh compile per mode and method
    model = GPT(cfg.model).to(device)
    opt = build_optimizer(model, cfg, device)
    step_model = model if mode == "eager" else torch.compile(model, mode=mode, dynamic=False)
    B, T = cfg.train.batch_size, cfg.model.block_size
    x = torch.randint(cfg.model.vocab_size, (B, T), device=device)
    y = torch.randint(cfg.model.vocab_size, (B, T), device=device)
    ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
    params = [p for g in opt.param_groups for p in g["params"]]

    def step():
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with ctx():
            _, loss = step_model(x, y)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * B * T / (time.perf_counter() - t0)


def trainer_run(cfg, data) -> tuple[dict, list[dict], str]:
    """The trainer's summary (steady-state tok/s), its metrics rows, and its step line."""
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as d:
        summary = train(cfg, d, data=data, log=lines.append)
        rows = read_metrics(Path(d) / "metrics.jsonl")
    mode = next((l for l in lines if l.startswith("training step:")), "?")
    fallback = [l for l in lines if "eager" in l and "failed" in l]
    return summary, rows, "; ".join([mode.removeprefix("training step: ")] + fallback)


def checkpoint_costs(cfg, folder: Path) -> dict[str, tuple[float, float, float]]:
    """{"latest.pt" | "best.pt": (MB, seconds of the host copy, seconds of the write with fsync)}.

    The payloads are what the trainer writes: model and AdamW state (after one step, so the moments
    exist), and the weights alone. On one GPU the trainer copies to host memory on the training
    thread and writes in the background; on CPU (and under DDP) it writes inline.
    """
    device, amp = resolve_device(cfg)
    torch.manual_seed(0)
    model = GPT(cfg.model).to(device)
    opt = build_optimizer(model, cfg, device)
    x = torch.randint(cfg.model.vocab_size, (cfg.train.batch_size, cfg.model.block_size), device=device)
    with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
        model(x, x)[1].backward()
    opt.step()
    out = {}
    for name, payload in (
        ("latest.pt", {"model": model.state_dict(), "optimizer": opt.state_dict()}),
        ("best.pt", {"model": model.state_dict()}),
    ):
        sync(device)
        t0 = time.perf_counter()
        host = host_copy(payload)
        t1 = time.perf_counter()
        save_checkpoint(folder / name, host)
        t2 = time.perf_counter()
        out[name] = ((folder / name).stat().st_size / 1e6, t1 - t0, t2 - t1)
        (folder / name).unlink()
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, eager, few steps (CI)")
    ap.add_argument("--preset", default="medium-512")
    ap.add_argument("--methods", default="baseline,oelm_freeze")
    ap.add_argument(
        "--modes",
        default=None,
        help="ceiling modes, comma-separated (default eager,default,reduce-overhead; smoke: eager)",
    )
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps of each ceiling (default 300; smoke 5)")
    ap.add_argument(
        "--interval",
        type=int,
        default=None,
        help="the trainer's eval interval; it runs two and the second is timed, with the first one's "
        "checkpoint being written meanwhile, as in a real run (default: the preset's; smoke 5)",
    )
    ap.add_argument(
        "--trainer-compile", default="auto", help="the trainer's compile field (auto: reduce-overhead on CUDA)"
    )
    ap.add_argument(
        "--val-tokens",
        type=int,
        default=None,
        help="size of the synthetic validation split the trainer scores whole (default 4.6M, TinyStories'; smoke: ~45 windows)",
    )
    ap.add_argument(
        "--paper-eval-interval", type=int, default=1000, help="the paper's steps between evaluations, for the shares"
    )
    ap.add_argument(
        "--paper-val-tokens",
        type=int,
        default=4_600_000,
        help="the paper's validation tokens per evaluation, for the shares",
    )
    ap.add_argument("--ckpt-dir", default=None, help="where to time the checkpoint writes (default: a temp folder)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="any other config field")
    args = ap.parse_args(argv)
    steps = args.steps or (5 if args.smoke else 300)
    warmup = 2 if args.smoke else 20
    modes = (args.modes or ("eager" if args.smoke else "eager,default,reduce-overhead")).split(",")
    over = parse_sets(args.set)
    if args.smoke:
        over = {**SMOKE, "device": "cpu", "num_threads": 1, **over}
        torch.set_num_threads(1)
    if args.batch_size:
        over["batch_size"] = args.batch_size
    methods = args.methods.split(",")
    base = make_config(args.preset, **over)
    device, amp = resolve_device(base)
    if base.train.num_threads:  # the ceilings too, not only the trainer
        torch.set_num_threads(base.train.num_threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"device {device} ({name}), torch {torch.__version__}, {amp or 'fp32'}, preset {args.preset} "
        f"(d_model {base.model.d_model}, {base.model.n_layer} layers, context {base.model.block_size}), "
        f"batch {base.train.batch_size}, {steps} timed steps; command: {' '.join([Path(sys.argv[0]).name] + (argv or sys.argv[1:]))}",
        flush=True,
    )
    B, T = base.train.batch_size, base.model.block_size
    n_val = args.val_tokens or ((45 * T + T // 2 + 1) if args.smoke else 4_600_000)
    background = device.type == "cuda"  # train's background=None rule for one process
    with tempfile.TemporaryDirectory() as d:
        data = synthetic_data(
            Path(d), base.model.vocab_size, n_train=64 * B * (T + 1) if args.smoke else 8 << 20, n_val=n_val
        )
        print(f"{'method':<12} {'what':<34} {'tok/s':>10} {'TFLOP/s':>8} {'vs ceiling':>10}")
        worst = None
        for method in methods:
            cfg = make_config(args.preset, **over, method=method)
            fpt = flops_per_token(GPT(cfg.model))
            best, best_mode = 0.0, None
            for mode in modes:
                t0 = time.perf_counter()
                tps = ceiling(cfg, mode, steps, warmup)
                print(
                    f"{method:<12} {'ceiling ' + mode:<34} {tps:>10,.0f} {tps * fpt / 1e12:>8.2f} {'':>10}  ({time.perf_counter() - t0:.0f} s incl. compiling)",
                    flush=True,
                )
                if tps > best:
                    best, best_mode = tps, mode
            clipped = ceiling(cfg, best_mode, steps, warmup, clip=True)
            print(
                f"{method:<12} {'ceiling + clip ' + best_mode:<34} {clipped:>10,.0f} {clipped * fpt / 1e12:>8.2f} "
                f"{clipped / best:>10.3f}  (what clipping costs the fastest step)",
                flush=True,
            )
            # two eval intervals, each ending in a whole-split evaluation and a checkpoint; the speed
            # is the steady-state one (the warm-up steps left out), the second evaluation is timed
            iv = args.interval or (5 if args.smoke else base.train.eval_interval)
            tcfg = make_config(
                args.preset,
                **{
                    **over,
                    "method": method,
                    "compile": args.trainer_compile,
                    "max_steps": 2 * iv,
                    "warmup_steps": min(iv, base.train.warmup_steps),
                    "eval_interval": iv,
                    "log_interval": iv,
                    "eval_batches": 0,
                    "checkpoint_interval": 0,
                },
            )
            t0 = time.perf_counter()
            summary, rows, how = trainer_run(tcfg, data)
            tps = summary["tokens_per_s"]
            ratio = tps / best
            worst = ratio if worst is None else min(worst, ratio)
            print(
                f"{method:<12} {'trainer':<34} {tps:>10,.0f} {tps * fpt / 1e12:>8.2f} {ratio:>10.3f}"
                f"  (steady state; vs ceiling + clip {tps / clipped:.3f}; best ceiling: {best_mode}; "
                f"warm-up {summary['warmup_s']:.1f} s; {time.perf_counter() - t0:.0f} s in all)",
                flush=True,
            )
            print(f"{'':<12} trainer step: {how}", flush=True)
            eval_s = rows[-1]["eval_time_s"]
            print(
                f"{method:<12} {'evaluation (whole split)':<34} {rows[-1]['val/tokens'] / eval_s:>10,.0f} {'':>8} {'':>10}"
                f"  ({eval_s:.3f} s per evaluation of {rows[-1]['val/tokens']:,} tokens, eval batch {tcfg.train.eval_batch}; "
                f"the first, compiling: {rows[0]['eval_time_s']:.3f} s)",
                flush=True,
            )
            with contextlib.nullcontext(args.ckpt_dir) if args.ckpt_dir else tempfile.TemporaryDirectory() as cd:
                costs = checkpoint_costs(cfg, Path(cd))
            stall = {n: (copy_s if background else write_s) for n, (_, copy_s, write_s) in costs.items()}
            for n, (mb, copy_s, write_s) in costs.items():
                print(
                    f"{method:<12} {'checkpoint ' + n:<34} {'':>10} {'':>8} {'':>10}  ({mb:,.1f} MB: host copy {copy_s:.3f} s, "
                    f"write + fsync {write_s:.3f} s = {mb / write_s:,.0f} MB/s; on the critical path: "
                    f"{stall[n]:.3f} s, {'the copy (background write)' if background else 'the write (inline)'})",
                    flush=True,
                )
            # the paper's protocol: per eval interval, its training, one evaluation of the paper's
            # split, best.pt (upper bound: at every evaluation) and latest.pt every checkpoint_every steps
            pe = args.paper_eval_interval
            parts = {
                "training": pe * B * T / tps,
                "evaluation": eval_s * args.paper_val_tokens / rows[-1]["val/tokens"],
                "checkpoints": stall["best.pt"] + stall["latest.pt"] * pe / max(pe, cfg.train.checkpoint_every),
            }
            wall = sum(parts.values())
            print(
                f"{method:<12} protocol at the paper's settings: "
                + ", ".join(f"{k} {v:.3f} s = {100 * v / wall:.1f}%" for k, v in parts.items())
                + f" of each {pe}-step interval's wall time (eval on {args.paper_val_tokens:,} tokens, "
                f"latest.pt every {max(pe, cfg.train.checkpoint_every)} steps, best.pt every evaluation)",
                flush=True,
            )
    print(f"worst trainer / ceiling: {worst:.3f} (goal on an H100/H200 at batch 8: >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
