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
from .qkcheck import QKCheckError, check_qk, qk_digests

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
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "fp32" if dev.type != "cuda" else "bf16" if native_bf16(dev) else "fp16"
    return dev, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def native_bf16(device: torch.device) -> bool:
    """Whether this CUDA GPU computes bf16 natively: compute capability 8.0 (Ampere) and newer, or ROCm.

    `torch.cuda.is_bf16_supported()` also says yes where bf16 is only emulated (V100, T4), and asks
    about the current device rather than this one.
    """
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


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


def build_optimizer(model: GPT, cfg: Config, device: torch.device, qk_unfrozen: bool = False,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over trainable parameters only: matrices decay, norms and biases do not, Q/K get lr_mult.

    The groups follow the policy, not the current requires_grad flags: the policy's frozen Q/K are
    left out, or with `qk_update_every` form the `qk_periodic` groups; `qk_unfrozen` adds the groups
    the frozen Q/K join at their unfreeze, last, as `TrainStep.unfreeze_qk` does: a resumed run passes
    what its checkpoint's optimizer holds (`qk_unfrozen_in`), so the groups match. With
    `lr_layer_decay` != 1 every kind splits by layer (`decay.h0`, ...), each with its rate multiplier.
    `fused` (default: on CUDA) is the fused AdamW, whose `TrainStep` keeps the lr as a device tensor.
    """
    frozen_qk = {id(model.transformer.h[i].attn.c_qk.weight) for i in cfg.model.frozen_qk_layers}
    qk = {id(p) for p in model.qk_params().values()}
    kinds: dict[str, list] = {"decay": [], "no_decay": [], "qk": [], "qk_periodic": []}
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen or (id(p) in frozen_qk and not cfg.train.qk_update_every):  # tied weights once; frozen Q/K never
            continue
        seen.add(id(p))
        kind = ("qk_periodic" if id(p) in frozen_qk else "qk") if id(p) in qk else "decay" if p.dim() >= 2 else "no_decay"
        kinds[kind].append(p)
    param_groups = [g for kind, ps in kinds.items() for g in _groups(model, cfg, kind, ps)]
    if qk_unfrozen:
        param_groups += qk_unfrozen_groups(model, cfg)
    t = cfg.train
    fused = device.type == "cuda" if fused is None else fused
    return torch.optim.AdamW(param_groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)


def qk_unfrozen_groups(model: GPT, cfg: Config) -> list[dict]:
    """The optimizer groups that the policy's frozen Q/K join once they are unfrozen."""
    return _groups(model, cfg, "qk_unfrozen", [model.transformer.h[i].attn.c_qk.weight for i in cfg.model.frozen_qk_layers])


def layer_lr_mults(model: GPT, cfg: Config) -> dict[int, tuple[str, float]]:
    """id(parameter) -> (its layer, lr_layer_decay's multiplier for it).

    Block i of L: decay^(L-1-i), the top block at 1; the embeddings (the token embedding is tied to
    the LM head) below the first block, decay^L; the final LayerNorm on top, 1.
    """
    d, L = cfg.train.lr_layer_decay, cfg.model.n_layer
    out = {id(p): ("top", 1.0) for p in model.transformer.ln_f.parameters()}
    for name in ("wte", "wpe"):
        out[id(model.transformer[name].weight)] = ("embed", d**L)
    for i, block in enumerate(model.transformer.h):
        out.update({id(p): (f"h{i}", d ** (L - 1 - i)) for p in block.parameters()})
    return out


def _groups(model: GPT, cfg: Config, kind: str, params: list) -> list[dict]:
    """One optimizer group of `kind` (decay, no_decay, qk, qk_periodic, qk_unfrozen), or one per layer under lr_layer_decay."""
    t = cfg.train
    wd = 0.0 if kind == "no_decay" else t.weight_decay
    mult = t.qk_lr_mult if kind.startswith("qk") else 1.0
    if t.lr_layer_decay == 1.0:
        return [{"params": params, "weight_decay": wd, "lr_mult": mult, "name": kind}] if params else []
    layers = layer_lr_mults(model, cfg)
    by_layer: dict[str, list] = {}
    for p in params:
        by_layer.setdefault(layers[id(p)][0], []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr_mult": mult * layers[id(ps[0])][1], "name": f"{kind}.{layer}"}
            for layer, ps in by_layer.items()]


def qk_unfrozen_in(optimizer_state: dict) -> bool:
    """Whether a saved optimizer state holds the unfrozen Q/K's groups.

    The checkpoint of step `qk_unfreeze_step` is written before the loop unfreezes (at the top of the
    next step), so the step number alone does not say; the optimizer's own groups do.
    """
    return any(_is_unfrozen(g) for g in optimizer_state["param_groups"])


def _is_unfrozen(group: dict) -> bool:
    return str(group.get("name", "")).split(".")[0] == "qk_unfrozen"


def qk_update_at(step: int, cfg: Config) -> bool:
    """Whether step `step` (0-based) updates the periodic Q/K: the N-th, 2N-th, ... step of the run."""
    n = cfg.train.qk_update_every
    return bool(n) and (step + 1) % n == 0


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
    """This rank's training batches from the sampler, the next one always staged ahead.

    The batch after the current one is drawn (random windows from the memmap, on the host) when the
    current one is handed out; on CUDA it is pinned and copied to the GPU on a side stream while the
    current step runs, and the step's stream waits for that copy only. `state_dict()` is the
    sampler's state before the staged (not yet consumed) batch, so a resumed run draws exactly that
    batch next: resume stays exact. The same code stages on CPU, without the copy.
    """

    def __init__(self, sampler: Sampler, device: torch.device, rank: int = 0, world: int = 1):
        self.sampler, self.device = sampler, device
        b = sampler.B // world
        self.rows = slice(rank * b, (rank + 1) * b)  # every rank draws the global batch, keeps its slice
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.staged: tuple[dict, torch.Tensor, torch.Tensor] | None = None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.staged is None:
            self._stage()
        _, x, y = self.staged
        if self.stream is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self.stream)
            x.record_stream(main)  # allocated on the side stream, used on the main one
            y.record_stream(main)
        self._stage()
        return x, y

    def _stage(self) -> None:
        state = self.sampler.state_dict()
        buf = self.sampler.next_buf()[self.rows]  # (b, T+1)
        if self.stream is None:
            x, y = buf[:, :-1], buf[:, 1:]
        else:
            buf = buf.pin_memory()
            with torch.cuda.stream(self.stream):
                dev = buf.to(self.device, non_blocking=True)
                x, y = dev[:, :-1].contiguous(), dev[:, 1:].contiguous()
        self.staged = (state, x, y)

    def state_dict(self) -> dict:
        return self.staged[0] if self.staged is not None else self.sampler.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.sampler.load_state_dict(sd)
        self.staged = None


GUARDED_STEPS = 3
"""Steps after every (re)compile that fall back to eager if the compiler fails: the first compiles
the forward and (lazily) the backward, the next ones record and replay the CUDA graphs."""


class TrainStep:
    """The model, its optimizer and one training step (fwd, bwd, clip, AdamW), eager or compiled.

    On CUDA the AdamW is fused and its learning rates are device tensors updated in place, so a new
    lr every step needs neither a host sync nor a recompile; under reduce-overhead the compiled
    forward and backward replay as CUDA graphs (cudagraph_mark_step_begin marks each step). Under
    fp16 autocast a GradScaler scales the loss. A compiler failure in the first `GUARDED_STEPS`
    steps after a (re)compile, or in the first compiled evaluation, is logged and that work redone
    eager from the same RNG state; the run goes on eager (evaluation alone, if only it failed).
    """

    def __init__(self, raw_model: GPT, optimizer: torch.optim.Optimizer, cfg: Config, device: torch.device,
                 amp_dtype: torch.dtype | None, world: int, log: Callable[[str], None]):
        self.raw, self.optimizer, self.cfg, self.device, self.world, self.log = raw_model, optimizer, cfg, device, world, log
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        self.mode, why = resolve_compile(cfg, device, world)
        self.tensor_lr = bool(optimizer.defaults.get("fused"))  # fused AdamW takes lr as a device tensor
        self._set_lr_types()
        self.eval_failed = False  # a compiled evaluation failed once: evaluations run eager from then on
        self.qk_update = True  # qk_update_every: whether this step updates the periodic Q/K (the loop sets it)
        self._build()
        self.describe = f"training step: {'torch.compile(mode=' + repr(self.mode) + ')' if self.mode else 'eager'} ({why})"

    def _build(self) -> None:
        """(Re)build the step's model: compiled afresh (no graph compiled before is reused), DDP-wrapped under DDP.

        A fresh compile at the Q/K unfreeze, rather than trusting dynamo to notice the new
        requires_grad flags: with skip_tensor_guards_with_matching_dict_tags (on by default) some
        torch versions keep replaying the frozen graph, in which Q/K get no gradient.
        """
        if self.mode:
            torch._dynamo.reset()  # also the CUDA graph trees of the old graphs
            self.compiled = torch.compile(self.raw, mode=self.mode, dynamic=False)
        else:
            self.compiled = self.raw
        self.model = _ddp(self.compiled, self.device) if self.world > 1 else self.compiled
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.periodic = [p for g in self.optimizer.param_groups if g["name"].startswith("qk_periodic") for p in g["params"]]
        self.unproven = GUARDED_STEPS if self.mode else 0
        self.eval_compiled, self.eval_proven = self.mode is not None and not self.eval_failed, False

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

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the step: the optimizer's state and the gradient scaler's (fp16)."""
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        self._set_lr_types()
        if self.scaler is not None and sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            if self.tensor_lr:
                g["lr"].fill_(lr * g["lr_mult"])  # in place, no sync: the compiled/fused code sees it
            else:
                g["lr"] = lr * g["lr_mult"]

    @property
    def qk_unfrozen(self) -> bool:
        """Whether the policy's frozen Q/K have joined the optimizer (`unfreeze_qk`, or a resumed run's groups)."""
        return any(_is_unfrozen(g) for g in self.optimizer.param_groups)

    def unfreeze_qk(self) -> None:
        """Frozen Q/K train from now on: they join the optimizer, and the step is compiled afresh."""
        self.raw.set_qk_trainable(True)
        for group in qk_unfrozen_groups(self.raw, self.cfg):
            self.optimizer.add_param_group(group)
        self._set_lr_types()
        self._build()  # also rebuilds DDP, which fixes its parameter set when built

    def _forward(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if self.mode == "reduce-overhead" and model is not self.raw:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are consumed
        with self._autocast():
            return model(x, y, reduction=reduction)[1]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self._forward(self.model, x, y)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        return loss

    def _compiler_failed(self, where: str, e: Exception) -> None:
        self.log(f"torch.compile(mode={self.mode!r}) failed {where} ({type(e).__name__}: "
                 f"{(str(e).splitlines() or [''])[0][:200]}): {'training' if where == 'in a training step' else 'evaluating'} eager")

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on (x, y); returns the loss (on the device, detached)."""
        if not self.unproven:
            loss = self._forward_backward(x, y)
        else:  # just (re)compiled: a compiler that fails here leaves nothing half-done
            rng = _rng_state(self.device)
            try:
                loss = self._forward_backward(x, y)
                self.unproven -= 1
            except Exception as e:
                self._compiler_failed("in a training step", e)
                self.optimizer.zero_grad(set_to_none=True)
                _set_rng_state(self.device, rng)  # the eager redo draws the same dropout masks
                self.mode = None
                self._build()
                loss = self._forward_backward(x, y)
        if self.periodic and not self.qk_update:
            # not an update step: the periodic Q/K's gradients are dropped before clipping, so AdamW skips
            # them (moments and step count stand still) and the clip norm is over what updates
            for p in self.periodic:
                p.grad = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped where the fp16 gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # graph outputs must not be kept across steps
        return loss.detach()

    def evaluate(self, val_set: list[tuple[torch.Tensor, torch.Tensor]], val_tokens: int) -> float:
        """Mean loss per scored token over the validation set (one host sync).

        Each forward returns only its summed loss (no logits kept); the sums are added in float64,
        so the result is the token-weighted mean whatever the batches' sizes.
        """
        self.model.eval()
        try:
            if self.eval_compiled and not self.eval_proven:  # the first compiled evaluation may fail to compile
                try:
                    total = self._score(val_set)
                    self.eval_proven = True
                    return total / val_tokens
                except Exception as e:
                    self._compiler_failed("in evaluation", e)
                    self.eval_compiled, self.eval_failed = False, True
            return self._score(val_set) / val_tokens
        finally:
            self.model.train()

    def _score(self, val_set: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Summed loss over the scored tokens: compiled (if `eval_compiled`) for the main batch shape."""
        main_shape = val_set[0][0].shape
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for x, y in val_set:
                # the whole split's last, smaller batches run uncompiled: no recompile for two shapes
                m = self.compiled if self.eval_compiled and x.shape == main_shape else self.raw
                total += self._forward(m, x, y, reduction="sum")
        return total.item()


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


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
                run.trainer.unfreeze_qk()
                interval.rewarm()  # the step recompiles
                log(f"step {run.step}: Q/K unfrozen in {len(cfg.model.frozen_qk_layers)} block(s)"
                    + ("; the training step is compiled afresh" if run.trainer.mode else ""))
            lr = lr_at(run.step, cfg)
            run.trainer.set_lr(lr)
            run.trainer.qk_update = qk_update_at(run.step, cfg)
            x, y = run.batches.next()
            interval.add(run.trainer(x, y))
            if run.trainer.periodic and run.trainer.qk_update:  # what the Q/K check holds them to until the next update
                run.qk_since_update = [p.detach().clone() for p in run.trainer.periodic]
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


WARMUP_STEPS = GUARDED_STEPS  # the steps after a (re)compile: compiling, recording CUDA graphs
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


def setup(cfg: Config, out: Path, resume: bool, data: Prepared | None, log: Callable[[str], None],
          background: bool | None = None) -> Run:
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
    qk_init = qk_digests(model.qk_params().values())  # a resumed run checks against the digest its first process took
    if t.qk_update_every:  # periodic Q/K get a gradient every step; the step drops it where it is no update step
        model.set_qk_trainable(True)
    counts = model.param_counts()  # as the run starts (Q/K frozen), also when it resumes after an unfreeze
    batches = Batches(Sampler(data.train, cfg.model.block_size, t.batch_size, seed=t.seed), device, rank, world)
    val_set = eval_batches(data.val, cfg)
    state: dict[str, Any] = {}
    if ckpt is not None:
        qk_init = ckpt.get("qk_init", qk_init)
        model.load_state_dict(ckpt["model"])
        state = {"step": ckpt["step"], "tokens": ckpt["tokens"], "best_val": ckpt["best_val_loss"],
                 "elapsed": ckpt["elapsed_s"], "train_time": ckpt["train_time_s"]}
        log(f"resumed from {out / 'latest.pt'} at step {state['step']}")
    step = state.get("step", 0)
    unfrozen = ckpt is not None and qk_unfrozen_in(ckpt["optimizer"])
    if unfrozen:
        model.set_qk_trainable(True)
    model.to(device)
    trainer = TrainStep(model, build_optimizer(model, cfg, device, unfrozen), cfg, device, amp_dtype, world, log)
    if ckpt is not None:
        trainer.load_state(ckpt)
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
    if background is None:
        background = device.type == "cuda" and world == 1
    run = Run(cfg, out, device, amp_dtype, rank, world, model, trainer, batches, val_set,
              scored_tokens(val_set), counts, CheckpointWriter(background), qk_init, **state)
    if trainer.periodic:  # as loaded: the checkpoint's own Q/K check found them as their last update left them
        run.qk_since_update = [p.detach().clone() for p in trainer.periodic]
    return run


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
    """The Q/K check, this evaluation's metrics row, latest.pt where `checkpoints_at` says so, best.pt
    when val improved, then the report.

    A failed Q/K check (`QKCheckError`) comes first: nothing of that state is written or reported.
    The report follows this evaluation's files (and every earlier report): at once when writing
    inline, else when the background write lands. Rank 0 writes; the other ranks hold identical
    weights. An evaluation without a latest.pt is redone by a run resumed from the one before it.
    """
    run.qk_check = metrics["qk_check"] = check_qk(run.model, run.cfg, run.qk_init, run.step, fp16=run.trainer.scaler is not None,
                                                  since_update=run.qk_since_update)
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
        **run.trainer.state_dict(),  # optimizer (and fp16's gradient scaler)
        "sampler": run.batches.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if run.device.type == "cuda" else None,
        },
        "best_val_loss": min(run.best_val, val_loss),
        "qk_init": run.qk_init,
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
