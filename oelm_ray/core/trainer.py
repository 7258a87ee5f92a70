"""The training loop: runs on its own (`oelm-ray train`) and inside a Ray trial alike.

`train(config, out_dir, report=...)` trains one model and calls `report(metrics)` at every
evaluation, after that evaluation's files are written: `latest.pt` where
`TrainConfig.checkpoints_at(step)` (every checkpoint_interval steps and at the last), `best.pt`
when the val loss improved. latest.pt holds model, optimizer, step, RNG and data-sampler state, so
a run resumed from it redoes the evaluations after it and produces exactly the losses of one never
interrupted (bit-for-bit on CPU).

This module reads top-down: `train` (the loop), then what it calls in order: `setup`, the
training `Interval`, `evaluate`, `checkpoint`, `finish`. Its parts live beside it: `batches`
(training windows, the validation set), `optim` (AdamW's groups, the lr schedule, the Q/K unfreeze
and update steps), `train_step` (`TrainStep`, eager or compiled), `checkpoint` (what latest.pt and
best.pt hold, the background writer), `io` (the metrics file).

Speed: no host sync per step (the loss is accumulated on the device and read at log and eval
points only). On CUDA: the step compiled with CUDA graphs (`compile=auto` -> reduce-overhead),
fused AdamW with lr as device tensors, bf16 autocast, SDPA's flash kernels, the next batch staged
from pinned memory on a side stream, checkpoints written in a background thread after a
device-to-host copy. Evaluation runs on a fixed, pre-staged set of validation batches (a sample, or
the whole split with eval_batches=0).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .batches import Batches, Sampler, eval_batches, scored_tokens
from .checkpoint import CheckpointWriter, checkpoint_files, load_checkpoint, set_rng_state
from .config import Config, ConfigError
from .io import UserError, append_metrics, read_metrics, truncate_metrics, write_json
from .model import GPT
from .optim import build_optimizer, lr_at, qk_unfrozen_at, qk_unfrozen_in, qk_update_at
from .prepared import Prepared, load_prepared
from .qkcheck import QKCheckError, check_qk, qk_digests
from .train_step import Interval, TrainStep, resolve_device

Report = Callable[[dict[str, Any]], None]


class RunExistsError(UserError, RuntimeError):
    """The out-dir already holds a run and --resume was not given."""


# ------------------------------------------------------------------------------------------------
# the loop: setup -> for each step: Q/K unfreeze, lr, step, log -> evaluate -> checkpoint -> finish


def train(
    config: Config | dict,
    out_dir: str | os.PathLike,
    report: Report | None = None,
    resume: bool = False,
    data: Prepared | None = None,
    log: Callable[[str], None] = print,
    background: bool | None = None,
) -> dict[str, Any]:
    """Train one model into `out_dir`; returns the summary (also written to summary.json).

    `background`: write checkpoints in a background thread (True) or inline (False); None (the
    default) writes in the background on one CUDA GPU (the step is fast, the write is not) and inline
    on CPU and under DDP (every rank reports at once).

    `setup` (checks, model, optimizer, data, resume) -> every step: Q/K unfreeze, lr, `TrainStep`,
    log -> at every evaluation: `evaluate`, `checkpoint` (metrics row, latest.pt, report) -> `finish`.
    """
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    cfg.validate()
    t = cfg.train
    run = setup(cfg, Path(out_dir), resume, data, log, background)
    interval = Interval(run.device)
    status, train_loss = "completed", math.nan
    run.model.train()
    try:
        while run.step < t.max_steps:
            if qk_unfrozen_at(run.step, cfg) and not run.trainer.qk_unfrozen:
                run.trainer.unfreeze_qk(interval)  # the step is rebuilt: the interval's timing warms up again
                log(
                    f"step {run.step}: Q/K unfrozen in {len(cfg.model.frozen_qk_layers)} block(s)"
                    + ("; the training step is compiled afresh" if run.trainer.mode else "")
                )
            lr = lr_at(run.step, cfg)
            run.trainer.set_lr(lr)
            qk_update = qk_update_at(run.step, cfg)
            x, y = run.batches.next()
            interval.add(run.trainer(x, y, qk_update))
            if qk_update and run.trainer.periodic:  # what the Q/K check holds them to until the next update
                with torch.no_grad():
                    torch._foreach_copy_(run.qk_since_update, run.trainer.periodic)
            run.writer.poll()  # a background checkpoint that has landed: its report goes out now
            run.step += 1
            run.tokens += run.tok_per_step
            is_eval = run.step % t.eval_interval == 0 or run.step == t.max_steps
            if run.step % t.log_interval == 0 or is_eval:
                train_loss = interval.mean_loss(run.world)  # the one host sync per log interval
                if not math.isfinite(train_loss):
                    status = "diverged"
                    log(f"step {run.step}: training loss is {train_loss}: the run diverged; stopping")
                    break
                if run.step % t.log_interval == 0:
                    dt = interval.step_time()
                    log(
                        f"step {run.step}/{t.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | {dt * 1000:.1f} ms/step | {run.tok_per_step / dt:,.0f} tok/s"
                    )
            if not is_eval:
                continue
            metrics = evaluate(run, interval, train_loss, lr)
            if not math.isfinite(metrics["val/loss"]):
                status = "diverged"
                log(f"step {run.step}: validation loss is {metrics['val/loss']}: the run diverged; stopping")
                break
            log(
                f"step {run.step}: val loss {metrics['val/loss']:.4f} | val ppl {metrics['val/ppl']:.3f} | eval {metrics['eval_time_s']:.2f}s"
            )
            try:
                checkpoint(run, metrics, report)
            except QKCheckError as e:  # the method broke: the summary says so, nothing more is reported
                run.qk_check = str(e)
                log(f"step {run.step}: {e}")
                finish(run, "qk_check_failed", None, log)
                raise
            interval.reset()
        run.writer.wait()
    finally:
        run.writer.close()
    return finish(run, status, report, log)


# ------------------------------------------------------------------------------------------------
# setup


def setup(
    cfg: Config,
    out: Path,
    resume: bool,
    data: Prepared | None,
    log: Callable[[str], None],
    background: bool | None = None,
) -> Run:
    """Checks, data, model, optimizer, batches and validation set; restored from latest.pt on resume."""
    t = cfg.train
    # every check that can fail cheaply runs before the model is built
    ckpt = _checkpoint_to_resume(out, cfg) if resume else _refuse_existing_run(out)
    data = data or load_prepared(cfg.data)
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the prepared data has vocabulary {data.vocab_size} but vocab_size={cfg.model.vocab_size}")
    device, amp_dtype = resolve_device(cfg)
    rank, world = _distributed()  # (0, 1) unless oelm_ray.tune.ddp runs this under torch.distributed
    if t.batch_size % world:
        raise ConfigError(f"batch_size={t.batch_size} must be divisible by the {world} data-parallel workers")
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(t.seed)
    model = GPT(cfg.model)
    qk_init = qk_digests(model.qk_params().values())  # a resumed run checks against the digest its first process took
    if t.qk_update_every:  # periodic Q/K get a gradient every step; the step drops it where it is no update step
        model.set_qk_trainable(True)
    counts = model.param_counts()  # the run's figures, as `finish` says: before any unfreeze, periodic Q/K trainable
    batches = Batches(Sampler(data.train, cfg.model.block_size, t.batch_size, seed=t.seed), device, rank, world)
    val_set = eval_batches(data.val, cfg)
    state: dict[str, Any] = {}
    if ckpt is not None:
        qk_init = ckpt.get("qk_init", qk_init)
        model.load_state_dict(ckpt["model"])
        state = {
            "step": ckpt["step"],
            "tokens": ckpt["tokens"],
            "best_val": ckpt["best_val_loss"],
            "elapsed": ckpt["elapsed_s"],
            "train_time": ckpt["train_time_s"],
        }
        log(f"resumed from {out / 'latest.pt'} at step {state['step']}")
    step = state.get("step", 0)
    unfrozen = ckpt is not None and qk_unfrozen_in(ckpt["optimizer"]["param_groups"])
    if unfrozen:
        model.set_qk_trainable(True)
    model.to(device)
    trainer = TrainStep(model, build_optimizer(model, cfg, device, unfrozen), cfg, device, amp_dtype, world, log)
    if ckpt is not None:
        trainer.load_state(ckpt)
        batches.load_state_dict(ckpt["sampler"])
        set_rng_state(ckpt["rng"], device)
    if rank == 0:
        truncate_metrics(out / "metrics.jsonl", step)
    val_set = [(x.to(device), y.to(device)) for x, y in val_set]
    log(
        f"{cfg.model.method}: {counts['trainable']:,} trainable + {counts['frozen']:,} frozen = {counts['total']:,} parameters "
        f"on {device}{' (bf16 autocast)' if amp_dtype else ''}; steps {step} -> {t.max_steps}"
    )
    log(trainer.describe)
    if background is None:
        background = device.type == "cuda" and world == 1
    run = Run(
        cfg,
        out,
        device,
        amp_dtype,
        rank,
        world,
        model,
        trainer,
        batches,
        val_set,
        scored_tokens(val_set),
        counts,
        CheckpointWriter(background, log),
        qk_init,
        **state,
    )
    if trainer.periodic:  # as loaded: the checkpoint's own Q/K check found them as their last update left them
        run.qk_since_update = [p.detach().clone() for p in trainer.periodic]  # the loop copies each update into it
    return run


@dataclass
class Run:
    """One run between steps: what `setup` builds, the loop advances and a checkpoint saves."""

    cfg: Config
    out: Path
    device: torch.device
    amp_dtype: torch.dtype | None  # bf16 autocast, or None for plain fp32
    rank: int  # this process under DDP (rank 0 writes the files), else 0 of 1
    world: int
    model: GPT  # the raw model: what checkpoints hold; `trainer` may run it compiled or DDP-wrapped
    trainer: TrainStep
    batches: Batches
    val_set: list[tuple[torch.Tensor, torch.Tensor]]  # on the device, scored in this order
    val_tokens: int  # targets an evaluation scores
    counts: dict[str, int]  # trainable / frozen / total parameters, as `setup` counts them (see `finish`)
    writer: CheckpointWriter
    qk_init: list[str]  # each block's Q/K digest at init (qkcheck), kept in every checkpoint
    qk_check: str = "not checked yet"  # the last checkpoint's Q/K check: "ok", or what failed
    qk_since_update: list[torch.Tensor] | None = None  # qk_update_every: the periodic Q/K after their last update
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # training tokens seen (global batch)
    best_val: float = math.inf
    elapsed: float = 0.0  # wall time of the processes before this one (resume)
    train_time: float = 0.0  # seconds in training intervals, evaluations excluded
    t0: float = field(default_factory=time.perf_counter)  # this process's clock starts here

    @property
    def tok_per_step(self) -> int:
        return self.cfg.train.batch_size * self.cfg.model.block_size

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def wall(self) -> float:
        """Wall time of the whole run, earlier processes included."""
        return self.elapsed + time.perf_counter() - self.t0


def _checkpoint_to_resume(out: Path, cfg: Config) -> dict:
    """latest.pt, checked against the config; a write the last process was killed in is removed."""
    for p in out.glob(".*.pt.*.tmp"):  # latest.pt itself is whole: writes are atomic
        p.unlink(missing_ok=True)
    return load_checkpoint(out / "latest.pt", expect_config=cfg.to_dict())


def _refuse_existing_run(out: Path) -> None:
    if (out / "latest.pt").exists() or (out / "summary.json").exists():
        raise RunExistsError(
            f"{out} already holds a run: pass --resume to continue it, or choose another --out-dir "
            "(nothing was overwritten)"
        )


def _distributed() -> tuple[int, int]:
    """(rank, world size) under torch.distributed (oelm_ray.tune.ddp), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------------------------------
# evaluation, checkpoint, summary


def evaluate(run: Run, interval: Interval, train_loss: float, lr: float) -> dict[str, Any]:
    """Close the training interval, score the validation set: this evaluation's metrics row."""
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    interval_s = interval.seconds()
    run.train_time += interval_s
    step_s = interval.step_time()  # steady-state: compiling and warm-up left out (unless `warmup`)
    t_eval = time.perf_counter()
    val_loss = run.trainer.val_loss(run.val_set, run.val_tokens)
    eval_s = time.perf_counter() - t_eval
    return {
        "step": run.step,
        "tokens": run.tokens,
        "train/loss": train_loss,
        "val/loss": val_loss,
        "val/ppl": math.exp(val_loss),
        "val/best_ppl": math.exp(min(run.best_val, val_loss)),
        "lr": lr,
        "step_time_s": step_s,
        "tokens_per_s": run.tok_per_step / step_s,
        "warmup": int(interval.warmup),  # 1: this interval was too short to time without its warm-up steps
        "eval_time_s": eval_s,
        "val/tokens": run.val_tokens,
        "wall_time_s": run.wall(),
        "trainable_params": run.counts["trainable"],
        "total_params": run.counts["total"],
    }


# ------------------------------------------------------------------------------------------------
# checkpoint and finish


def checkpoint(run: Run, metrics: dict[str, Any], report: Report | None) -> None:
    """The Q/K check, this evaluation's metrics row, latest.pt where `checkpoints_at` says so, best.pt
    when val improved (`checkpoint_files`), then the report.

    A failed Q/K check (`QKCheckError`) comes first: nothing of that state is written or reported.
    The report follows this evaluation's files (and every earlier report): at once when writing
    inline, else when the background write lands. Rank 0 writes; the other ranks hold identical
    weights. An evaluation without a latest.pt is redone by a run resumed from the one before it.
    """
    run.qk_check = metrics["qk_check"] = check_qk(
        run.model, run.cfg, run.qk_init, run.step, fp16=run.trainer.scaler is not None, since_update=run.qk_since_update
    )
    after = (lambda m=metrics: report(m)) if report is not None else None
    files = []
    if run.rank == 0:
        append_metrics(run.metrics_path, metrics)
        files = checkpoint_files(run, metrics["val/loss"], latest=run.cfg.train.checkpoints_at(run.step))
    run.best_val = min(run.best_val, metrics["val/loss"])
    run.writer.save(files, after)


def finish(run: Run, status: str, report: Report | None, log: Callable[[str], None]) -> dict[str, Any]:
    """The summary: written to summary.json (rank 0), logged and returned; a diverged run reports it.

    Speed: `tokens_per_s` is steady-state, the global batch's tokens over the evaluation intervals'
    steady-state step times (`step_time_s`: compiling and warm-up steps left out) weighted by their
    steps; `train_time_s` is the wall time spent training, warm-up included, and `warmup_s` what
    the warm-up steps cost beyond steady state.

    Parameters (here and in every metrics row): `trainable_params` are those the optimizer updates from
    the first step: periodic Q/K (`qk_update_every`, updated every N-th step) count as trainable; Q/K
    that unfreeze at `qk_unfreeze_step` count as frozen, also in a process resumed after the unfreeze
    (`frozen_params` names what is still frozen at the end).
    """
    cfg, t = run.cfg, run.cfg.train
    wall = run.wall()
    history = read_metrics(run.metrics_path)
    steady_s = sum(h["step_time_s"] * (h["step"] - prev["step"]) for prev, h in zip([{"step": 0}] + history, history))
    best_ppl = math.exp(run.best_val) if math.isfinite(run.best_val) else math.nan
    counts = run.counts
    summary = {
        "model_type": "gpt",
        "method": cfg.model.method,
        "init_method": qk_init_name(cfg),
        "status": status,
        "steps": run.step,
        "tokens": run.tokens,
        "final_val_ppl": history[-1]["val/ppl"] if history else math.nan,
        "best_val_ppl": best_ppl,
        "final_perplexity": best_ppl,
        "total_wall_time": wall,
        "train_time_s": run.train_time,
        "mean_step_time": run.train_time / run.step if run.step else math.nan,
        "tokens_per_s": run.tok_per_step * history[-1]["step"] / steady_s if steady_s else math.nan,
        "warmup_s": max(0.0, run.train_time - steady_s) if history else math.nan,
        "eval_time_s": sum(h["eval_time_s"] for h in history),
        "trainable_params": counts["trainable"],
        "frozen_param_count": counts["frozen"],
        "total_params": counts["total"],
        "frozen_params": run.model.frozen_param_names(),
        "lr_mults": {g["name"]: g["lr_mult"] for g in run.trainer.optimizer.param_groups},
        "qk_check": run.qk_check,
        "val_tokens": run.val_tokens,
        "val_scope": "whole split" if t.eval_batches == 0 else f"{t.eval_batches} sampled batches",
        "device": str(run.device),
        "config": cfg.to_dict(),
    }
    if status == "diverged" and report is not None:
        report({"step": run.step, "tokens": run.tokens, "val/loss": math.inf, "val/ppl": math.inf, "diverged": 1})
    if run.rank == 0:
        write_json(run.out / "summary.json", summary)
    log(f"done ({status}): best val ppl {summary['best_val_ppl']:.3f}, wall {wall:.1f}s -> {run.out}")
    return summary


def qk_init_name(cfg: Config) -> str:
    """How the method initializes and trains Q/K, as the summary says it."""
    return {
        "baseline": "normal(0.02), trained",
        "oelm_freeze": "head-wise orthogonal (QR per head), frozen",
        "oelm_random": f"normal({cfg.model.qk_std:.4g}), frozen",
    }[cfg.model.method]


__all__ = ["train", "RunExistsError"]
