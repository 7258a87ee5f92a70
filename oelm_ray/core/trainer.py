"""The training loop: runs on its own (`oelm-ray train`) and inside a Ray trial alike.

`train(config, out_dir, report=...)` trains one model and calls `report(metrics)` at every
evaluation, after that evaluation's files are written: `latest.pt` where
`TrainConfig.checkpoints_at(step)` (every checkpoint_interval steps and at the last), `best.pt`
when the val loss improved. latest.pt holds model, optimizer, step, RNG and data-sampler state, so
a run resumed from it redoes the evaluations after it and produces exactly the losses of one never
interrupted (bit-for-bit on CPU).

Speed notes (README, "Speed on a GPU"): no host sync per step (the loss is accumulated on the
device and read at log and eval points only). On CUDA: the step compiled with CUDA graphs
(`compile=auto` -> reduce-overhead), fused AdamW with lr as device tensors, bf16 autocast, SDPA's
flash kernels, the next batch staged from pinned memory on a side stream, checkpoints written in a
background thread after a device-to-host copy. Evaluation runs on a fixed, pre-staged set of
validation batches (a sample, or the whole split with eval_batches=0).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .checkpoint import CheckpointError, CheckpointWriter, host_copy, load_checkpoint
from .io import UserError, atomic_write, write_json
from .config import Config, ConfigError
from .data import Prepared, load_prepared
from .model import GPT

Report = Callable[[dict[str, Any]], None]
EVAL_SEED = 1337  # the validation windows are the same for every method and seed: a fair comparison


class RunExistsError(UserError, RuntimeError):
    """The out-dir already holds a run and --resume was not given."""


# ------------------------------------------------------------------------------------------------
# pieces


def resolve_device(cfg: Config) -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None for plain fp32)."""
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible: use device=auto or cpu")
    dev = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
    use_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and dev.type == "cuda")
    return dev, (torch.bfloat16 if use_bf16 else None)


class Sampler:
    """Random training windows from the token memmap; its state is one generator state."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int):
        if len(tokens) <= block_size + 1:
            raise ConfigError(
                f"the training split has {len(tokens)} tokens, fewer than block_size+2={block_size + 2}: "
                "use a larger corpus or a smaller block_size"
            )
        self.tokens, self.T, self.B = tokens, block_size, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        buf = self.next_buf()
        return buf[:, :-1], buf[:, 1:]

    def next_buf(self) -> torch.Tensor:
        """The next B windows of T+1 tokens, (B, T+1) int64: inputs [:, :-1], targets [:, 1:]."""
        ix = torch.randint(len(self.tokens) - self.T - 1, (self.B,), generator=self.gen).tolist()
        return torch.from_numpy(np.stack([self.tokens[i : i + self.T + 1] for i in ix]).astype(np.int64))

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.gen.set_state(sd["gen"])


def windows(tokens: np.ndarray, starts: list[int], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    buf = torch.from_numpy(np.stack([tokens[i : i + T + 1] for i in starts]).astype(np.int64))  # (B, T+1)
    return buf[:, :-1], buf[:, 1:]


def eval_batches(val: np.ndarray, cfg: Config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The validation set every evaluation scores, in a fixed order, eval_batch_size windows a batch.

    eval_batches > 0: eval_batches x batch_size windows drawn once from EVAL_SEED (a sample).
    eval_batches = 0: the whole split, the research's definition: consecutive windows of
    block_size targets, then one shorter window for the remainder, so every token after the first
    is predicted exactly once. Which windows are scored does not depend on eval_batch_size (it
    only groups them into forward passes), nor does the val loss: their token-weighted mean.
    """
    T, B = cfg.model.block_size, cfg.train.eval_batch
    if len(val) <= T + 1:
        raise ConfigError(f"the validation split has {len(val)} tokens, fewer than block_size+2={T + 2}")
    if cfg.train.eval_batches == 0:
        return list(_whole_split(val, T, B))
    gen = torch.Generator().manual_seed(EVAL_SEED)
    starts = torch.randint(len(val) - T - 1, (cfg.train.eval_batches, cfg.train.batch_size), generator=gen).reshape(-1).tolist()
    return [windows(val, starts[i : i + B], T) for i in range(0, len(starts), B)]


def _whole_split(val: np.ndarray, T: int, B: int):
    n_full, rest = divmod(len(val) - 1, T)  # targets are val[1:]
    for i in range(0, n_full, B):
        yield windows(val, [s * T for s in range(i, min(i + B, n_full))], T)
    if rest:
        yield windows(val, [n_full * T], rest)


def scored_tokens(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Targets an evaluation over these batches scores."""
    return sum(y.numel() for _, y in batches)


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to lr, then cosine decay to lr * min_lr_frac at max_steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    floor = t.lr * t.min_lr_frac
    return floor + 0.5 * (t.lr - floor) * (1.0 + math.cos(math.pi * progress))


def qk_unfrozen_at(step: int, cfg: Config) -> bool:
    return cfg.train.qk_unfreeze_step != -1 and step >= cfg.train.qk_unfreeze_step


def build_optimizer(model: GPT, cfg: Config, device: torch.device, step: int = 0) -> torch.optim.AdamW:
    """AdamW over trainable parameters only: matrices decay, norms and biases do not, Q/K get lr_mult.

    The groups follow the policy, not the current requires_grad flags: a run resumed after a Q/K
    unfreeze rebuilds exactly the groups (and their order) that its checkpoint's optimizer holds.
    """
    frozen_qk = {id(model.transformer.h[i].attn.c_qk.weight) for i in cfg.model.frozen_qk_layers}
    qk = {id(p) for p in model.qk_params().values()}
    groups: dict[str, list] = {"decay": [], "no_decay": [], "qk": []}
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen or id(p) in frozen_qk:  # tied weights appear once; frozen Q/K never
            continue
        seen.add(id(p))
        groups["qk" if id(p) in qk else "decay" if p.dim() >= 2 else "no_decay"].append(p)
    t = cfg.train
    spec = {"decay": (t.weight_decay, 1.0), "no_decay": (0.0, 1.0), "qk": (t.weight_decay, t.qk_lr_mult)}
    param_groups = [
        {"params": ps, "weight_decay": spec[name][0], "lr_mult": spec[name][1], "name": name}
        for name, ps in groups.items()
        if ps
    ]
    if qk_unfrozen_at(step, cfg):
        param_groups.append(qk_unfrozen_group(model, cfg))
    return torch.optim.AdamW(param_groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type == "cuda")


def qk_unfrozen_group(model: GPT, cfg: Config) -> dict:
    """The optimizer group that the policy's frozen Q/K join once they are unfrozen."""
    params = [model.transformer.h[i].attn.c_qk.weight for i in cfg.model.frozen_qk_layers]
    return {"params": params, "weight_decay": cfg.train.weight_decay, "lr_mult": cfg.train.qk_lr_mult, "name": "qk_unfrozen"}


def qk_init_name(cfg: Config) -> str:
    return {
        "baseline": "normal(0.02), trained",
        "oelm_freeze": "head-wise orthogonal (QR per head), frozen",
        "oelm_random": f"normal({cfg.model.qk_std:.4g}), frozen",
    }[cfg.model.method]


def resolve_compile(cfg: Config, device: torch.device, world: int = 1) -> tuple[str | None, str]:
    """(torch.compile mode, or None for eager; why) for this run, from the `compile` field.

    auto: reduce-overhead (CUDA graphs: at batch 8 Medium-512 is launch-bound, the graphs double the
    step rate) on one CUDA GPU, default under DDP, eager on CPU (compiling costs more than it saves
    on runs as short as the cpu preset's).
    """
    want = cfg.train.compile
    if want == "off":
        return None, "compile=off"
    if want == "auto" and device.type != "cuda":
        return None, "compile=auto trains eager on CPU"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (7, 0):
        return None, f"torch.compile needs a GPU of compute capability >= 7.0, this one is {torch.cuda.get_device_capability(device)}"
    mode = "reduce-overhead" if want == "auto" else want
    if mode == "reduce-overhead" and device.type != "cuda":
        return "default", "reduce-overhead needs CUDA (graphs): default mode on CPU"
    if mode == "reduce-overhead" and world > 1:
        return "default", "DDP's gradient all-reduce cannot live inside a CUDA graph: default mode under DDP"
    return mode, f"compile={want}"


class Batches:
    """This rank's training batches from the sampler; on CUDA the next one is staged ahead.

    On CUDA a batch is drawn (random windows from the memmap, on the host), pinned and copied to the
    GPU on a side stream while the current step runs; the step's stream waits for that copy only.
    `state_dict()` is the sampler's state before the staged (not yet consumed) batch, so a resumed
    run draws exactly that batch next: resume stays exact.
    """

    def __init__(self, sampler: Sampler, device: torch.device, rank: int = 0, world: int = 1):
        self.sampler, self.device = sampler, device
        b = sampler.B // world
        self.rows = slice(rank * b, (rank + 1) * b)  # every rank draws the global batch, keeps its slice
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.staged: tuple[dict, torch.Tensor, torch.Tensor] | None = None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stream is None:
            buf = self.sampler.next_buf()[self.rows]  # (b, T+1)
            return buf[:, :-1], buf[:, 1:]
        if self.staged is None:
            self._stage()
        _, x, y = self.staged
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self.stream)
        x.record_stream(main)  # allocated on the side stream, used on the main one
        y.record_stream(main)
        self._stage()
        return x, y

    def _stage(self) -> None:
        state = self.sampler.state_dict()
        buf = self.sampler.next_buf()[self.rows].pin_memory()  # (b, T+1)
        with torch.cuda.stream(self.stream):
            dev = buf.to(self.device, non_blocking=True)
            x, y = dev[:, :-1].contiguous(), dev[:, 1:].contiguous()
        self.staged = (state, x, y)

    def state_dict(self) -> dict:
        return self.staged[0] if self.staged is not None else self.sampler.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.sampler.load_state_dict(sd)
        self.staged = None


class TrainStep:
    """The model, its optimizer and one training step (fwd, bwd, clip, AdamW), eager or compiled.

    On CUDA the AdamW is fused and its learning rates are device tensors updated in place, so a new
    lr every step needs neither a host sync nor a recompile; under reduce-overhead the compiled
    forward and backward replay as CUDA graphs (cudagraph_mark_step_begin marks each step). If
    compiling fails at the first step, training goes on eager and the log says why.
    """

    def __init__(self, raw_model: GPT, optimizer: torch.optim.Optimizer, cfg: Config, device: torch.device,
                 amp_dtype: torch.dtype | None, world: int, log: Callable[[str], None]):
        self.raw, self.optimizer, self.cfg, self.device, self.world, self.log = raw_model, optimizer, cfg, device, world, log
        self.amp_dtype = amp_dtype
        self.mode, why = resolve_compile(cfg, device, world)
        self.tensor_lr = device.type == "cuda"  # fused AdamW takes lr as a device tensor
        self._set_lr_types()
        self.proven = self.mode is None
        if self.mode:  # one run per process: earlier runs' compiled frames would count against the recompile limit
            torch._dynamo.reset()
        self.compiled = torch.compile(raw_model, mode=self.mode, dynamic=False) if self.mode else raw_model
        self.model = self._wrap()
        self._params()
        self.describe = f"training step: {'torch.compile(mode=' + repr(self.mode) + ')' if self.mode else 'eager'} ({why})"

    def _wrap(self) -> torch.nn.Module:  # DDP averages the gradients; each rank trains on its slice of the batch
        return _ddp(self.compiled, self.device) if self.world > 1 else self.compiled

    def _params(self) -> None:
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def _set_lr_types(self) -> None:
        """lr as a device tensor (fused AdamW on CUDA) or a float, whatever a new group or a loaded state held."""
        for g in self.optimizer.param_groups:
            lr = g["lr"]
            if not self.tensor_lr:
                g["lr"] = float(lr)
            elif not isinstance(lr, torch.Tensor):
                g["lr"] = torch.tensor(float(lr), device=self.device)
            elif lr.device != self.device:
                g["lr"] = lr.to(self.device)

    def load_optimizer(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd)
        self._set_lr_types()

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            if self.tensor_lr:
                g["lr"].fill_(lr * g["lr_mult"])  # in place, no sync: the compiled/fused code sees it
            else:
                g["lr"] = lr * g["lr_mult"]

    @property
    def qk_unfrozen(self) -> bool:
        """Whether the policy's frozen Q/K have joined the optimizer (`unfreeze_qk`, or a resumed run's groups)."""
        return any(g["name"] == "qk_unfrozen" for g in self.optimizer.param_groups)

    def unfreeze_qk(self) -> None:
        """Frozen Q/K train from now on (a compiled model recompiles once: requires_grad changed)."""
        self.raw.set_qk_trainable(True)
        self.optimizer.add_param_group(qk_unfrozen_group(self.raw, self.cfg))
        self._set_lr_types()
        self._params()
        if self.world > 1:  # DDP fixes its parameter set when built: rebuild it with the unfrozen Q/K
            self.model = self._wrap()

    def _forward(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if self.mode == "reduce-overhead" and model is not self.raw:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are consumed
        with self._autocast():
            return model(x, y, reduction=reduction)[1]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on (x, y); returns the loss (on the device, detached)."""
        if self.proven:
            loss = self._forward(self.model, x, y)
        else:  # the first compiled step: a compiler that fails here leaves nothing half-done
            try:
                loss = self._forward(self.model, x, y)
            except Exception as e:
                self.log(f"torch.compile(mode={self.mode!r}) failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}): training eager")
                self.mode, self.compiled = None, self.raw
                self.model = self._wrap()
                loss = self._forward(self.model, x, y)
            self.proven = True
        loss.backward()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # graph outputs must not be kept across steps
        return loss.detach()

    def evaluate(self, val_set: list[tuple[torch.Tensor, torch.Tensor]], val_tokens: int) -> float:
        """Mean loss per scored token over the validation set (one host sync).

        Each forward returns only its summed loss (no logits kept); the sums are added in float64,
        so the result is the token-weighted mean whatever the batches' sizes.
        """
        self.model.eval()
        main_shape = val_set[0][0].shape
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for x, y in val_set:
                # the whole split's last, smaller batches run uncompiled: no recompile for two shapes
                m = self.compiled if x.shape == main_shape else self.raw
                total += self._forward(m, x, y, reduction="sum")
        self.model.train()
        return total.item() / val_tokens


BACKGROUND_CHECKPOINTS: bool | None = None
"""None: write checkpoints in the background on one CUDA GPU (the step is fast, the write is not),
inline on CPU and under DDP (every rank reports at once); tests set True or False."""


# ------------------------------------------------------------------------------------------------
# the loop: setup -> for each step: Q/K unfreeze, lr, step, log -> evaluate -> checkpoint -> finish


def train(
    config: Config | dict,
    out_dir: str | os.PathLike,
    report: Report | None = None,
    resume: bool = False,
    data: Prepared | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train one model into `out_dir`; returns the summary (also written to summary.json).

    `setup` (checks, model, optimizer, data, resume) -> every step: Q/K unfreeze, lr, `TrainStep`,
    log -> at every evaluation: `evaluate`, `checkpoint` (metrics row, latest.pt, report) -> `finish`.
    """
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    cfg.validate()
    t = cfg.train
    run = setup(cfg, Path(out_dir), resume, data, log)
    interval = Interval(run.device)
    status, train_loss = "completed", math.nan
    run.model.train()
    try:
        while run.step < t.max_steps:
            if qk_unfrozen_at(run.step, cfg) and not run.trainer.qk_unfrozen:
                run.trainer.unfreeze_qk()
                interval.rewarm()  # the step recompiles
                log(f"step {run.step}: Q/K unfrozen in {len(cfg.model.frozen_qk_layers)} block(s)")
            lr = lr_at(run.step, cfg)
            run.trainer.set_lr(lr)
            x, y = run.batches.next()
            interval.add(run.trainer(x, y))
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
                    log(f"step {run.step}/{t.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | {dt * 1000:.1f} ms/step | {run.tok_per_step / dt:,.0f} tok/s")
            if not is_eval:
                continue
            metrics = evaluate(run, interval, train_loss, lr)
            if not math.isfinite(metrics["val/loss"]):
                status = "diverged"
                log(f"step {run.step}: validation loss is {metrics['val/loss']}: the run diverged; stopping")
                break
            log(f"step {run.step}: val loss {metrics['val/loss']:.4f} | val ppl {metrics['val/ppl']:.3f} | eval {metrics['eval_time_s']:.2f}s")
            checkpoint(run, metrics, report)
            interval.reset()
        run.writer.wait()
    finally:
        run.writer.close()
    return finish(run, status, report, log)


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
    counts: dict[str, int]  # trainable / frozen / total parameters at setup: the run's figures
    writer: CheckpointWriter
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


WARMUP_STEPS = 3
"""Steps after the start of a process and after every (re)compile that an interval's speed leaves
out: they compile the step and record its CUDA graphs (seconds each on a GPU), or warm the allocator."""


class Interval:
    """The training since the last evaluation: losses summed on the device, step count, timing.

    Its speed is steady-state: the clock of `step_time` starts after the first `WARMUP_STEPS` steps
    of a process (and again after a recompile, `rewarm`), with one device sync there. An interval
    that ends inside its warm-up is timed over all its steps and says so (`warmup`).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.loss_sum = torch.zeros((), device=device)
        self.steps = 0
        self.start = time.perf_counter()
        self.rewarm()

    def rewarm(self) -> None:
        """The next WARMUP_STEPS steps compile or warm up: leave them out of the timing."""
        self.untimed = self.steps + WARMUP_STEPS
        self.timed_start = None

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss  # no host sync
        self.steps += 1
        if self.steps == self.untimed:  # warm-up done: the steady-state clock starts once its work has run
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.timed_start = time.perf_counter()

    @property
    def warmup(self) -> bool:
        """Whether this interval's timing includes warm-up steps (it ended before they were over)."""
        return self.timed_start is None or self.steps == self.untimed

    def step_time(self) -> float:
        """Seconds per step, steady-state: warm-up steps left out (all steps where `warmup`)."""
        if self.warmup:
            return self.seconds() / self.steps
        return (time.perf_counter() - self.timed_start) / (self.steps - self.untimed)

    def mean_loss(self, world: int) -> float:
        if world > 1:  # the global batch's mean loss, as one process would see it
            torch.distributed.all_reduce(self.loss_sum)
            self.loss_sum /= world
        return self.loss_sum.item() / self.steps

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.untimed = max(0, self.untimed - self.steps)  # a warm-up this interval did not finish goes on
        self.steps = 0
        self.start = time.perf_counter()
        self.timed_start = None if self.untimed else self.start


def setup(cfg: Config, out: Path, resume: bool, data: Prepared | None, log: Callable[[str], None]) -> Run:
    """Checks, data, model, optimizer, batches and validation set; restored from latest.pt on resume."""
    t = cfg.train
    # every check that can fail cheaply runs before the model is built
    ckpt = _checkpoint_to_resume(out, cfg) if resume else _refuse_existing_run(out)
    data = data or load_prepared(cfg.data)
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the prepared data has vocabulary {data.vocab_size} but vocab_size={cfg.model.vocab_size}"
        )
    device, amp_dtype = resolve_device(cfg)
    rank, world = _distributed()  # (0, 1) unless oelm_ray.ddp runs this under torch.distributed
    if t.batch_size % world:
        raise ConfigError(f"batch_size={t.batch_size} must be divisible by the {world} data-parallel workers")
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(t.seed)
    model = GPT(cfg.model)
    counts = model.param_counts()  # as the run starts (Q/K frozen), also when it resumes after an unfreeze
    batches = Batches(Sampler(data.train, cfg.model.block_size, t.batch_size, seed=t.seed), device, rank, world)
    val_set = eval_batches(data.val, cfg)
    state: dict[str, Any] = {}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        state = {"step": ckpt["step"], "tokens": ckpt["tokens"], "best_val": ckpt["best_val_loss"],
                 "elapsed": ckpt["elapsed_s"], "train_time": ckpt["train_time_s"]}
        log(f"resumed from {out / 'latest.pt'} at step {state['step']}")
    step = state.get("step", 0)
    if qk_unfrozen_at(step, cfg):
        model.set_qk_trainable(True)
    model.to(device)
    trainer = TrainStep(model, build_optimizer(model, cfg, device, step), cfg, device, amp_dtype, world, log)
    if ckpt is not None:
        trainer.load_optimizer(ckpt["optimizer"])
        batches.load_state_dict(ckpt["sampler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    if rank == 0:
        _truncate_metrics(out / "metrics.jsonl", step)
    val_set = [(x.to(device), y.to(device)) for x, y in val_set]
    log(
        f"{cfg.model.method}: {counts['trainable']:,} trainable + {counts['frozen']:,} frozen = {counts['total']:,} parameters "
        f"on {device}{' (bf16 autocast)' if amp_dtype else ''}; steps {step} -> {t.max_steps}"
    )
    log(trainer.describe)
    background = BACKGROUND_CHECKPOINTS if BACKGROUND_CHECKPOINTS is not None else (device.type == "cuda" and world == 1)
    return Run(cfg, out, device, amp_dtype, rank, world, model, trainer, batches, val_set,
               scored_tokens(val_set), counts, CheckpointWriter(background), **state)


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


def evaluate(run: Run, interval: Interval, train_loss: float, lr: float) -> dict[str, Any]:
    """Close the training interval, score the validation set: this evaluation's metrics row."""
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    interval_s = interval.seconds()
    run.train_time += interval_s
    step_s = interval.step_time()  # steady-state: compiling and warm-up left out (unless `warmup`)
    t_eval = time.perf_counter()
    val_loss = run.trainer.evaluate(run.val_set, run.val_tokens)
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


def checkpoint(run: Run, metrics: dict[str, Any], report: Report | None) -> None:
    """This evaluation's metrics row, latest.pt where `checkpoints_at` says so, best.pt when val
    improved, then the report.

    The report follows this evaluation's files (and every earlier report): at once when writing
    inline, else when the background write lands. Rank 0 writes; the other ranks hold identical
    weights. An evaluation without a latest.pt is redone by a run resumed from the one before it.
    """
    after = (lambda m=metrics: report(m)) if report is not None else None
    if run.rank == 0:
        _append_jsonl(run.metrics_path, metrics)
        save(run, metrics["val/loss"], after, latest=run.cfg.train.checkpoints_at(run.step))
    else:
        run.best_val = min(run.best_val, metrics["val/loss"])
        if after is not None:
            after()


def save(run: Run, val_loss: float, after: Callable[[], None] | None, latest: bool = True) -> None:
    """latest.pt (if `latest`) and best.pt (weights only, when val improved), then `after` once they are on disk."""
    improved = val_loss < run.best_val
    if not latest and not improved:
        run.writer.save([], after)
        return
    payload = {
        "format": 1,
        "config": run.cfg.to_dict(),
        "step": run.step,
        "tokens": run.tokens,
        "model": run.model.state_dict(),
        "optimizer": run.trainer.optimizer.state_dict(),
        "sampler": run.batches.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if run.device.type == "cuda" else None,
        },
        "best_val_loss": min(run.best_val, val_loss),
        "elapsed_s": run.wall(),
        "train_time_s": run.train_time,
    }
    if not latest:  # best.pt alone: copy (background) and write only the weights
        payload = {k: payload[k] for k in ("format", "config", "step", "tokens", "model")}
    if run.writer.background:  # a device-to-host copy now; the file is written while training goes on
        payload = host_copy(payload)
    files = []
    if improved:
        run.best_val = val_loss
        best = {k: payload[k] for k in ("format", "config", "step", "tokens", "model")} | {"val_loss": val_loss}
        files.append((run.out / "best.pt", best))
    if latest:
        files.append((run.out / "latest.pt", payload))
    run.writer.save(files, after)


def finish(run: Run, status: str, report: Report | None, log: Callable[[str], None]) -> dict[str, Any]:
    """The summary: written to summary.json (rank 0), logged and returned; a diverged run reports it.

    Speed: `tokens_per_s` is steady-state, the global batch's tokens over the evaluation intervals'
    steady-state step times (`step_time_s`: compiling and warm-up steps left out) weighted by their
    steps; `train_time_s` is the wall time spent training, warm-up included, and `warmup_s` what
    the warm-up steps cost beyond steady state.
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


def _distributed() -> tuple[int, int]:
    """(rank, world size) under torch.distributed (oelm_ray.ddp), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)


# ------------------------------------------------------------------------------------------------
# metrics file: one JSON line per evaluation


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line after a crash: drop it
            break
    return rows


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only evaluations up to the checkpoint's step: later ones will be redone."""
    rows = read_metrics(path)
    keep = [r for r in rows if r["step"] <= step]
    if len(keep) != len(rows) or (path.exists() and not rows and path.stat().st_size):
        atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in keep)), mode="w")


__all__ = ["train", "read_metrics", "RunExistsError", "CheckpointError", "lr_at", "build_optimizer"]
