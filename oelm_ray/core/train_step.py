"""The training step: the device and precision a run uses, whether it compiles, and `TrainStep`
(forward, backward, clip, AdamW), eager or compiled, with its fallback to eager when the compiler fails."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch

from .checkpoint import rng_state, set_rng_state
from .config import Config, ConfigError
from .io import one_line
from .model import GPT
from .optim import group_kind, qk_unfrozen_groups, qk_unfrozen_in


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
        return (
            None,
            f"torch.compile needs a GPU of compute capability >= 7.0, this one is {torch.cuda.get_device_capability(device)}",
        )
    mode = "reduce-overhead" if want == "auto" else want
    if mode == "reduce-overhead" and device.type != "cuda":
        return "default", "reduce-overhead needs CUDA (graphs): default mode on CPU"
    if mode == "reduce-overhead" and world > 1:
        return "default", "DDP's gradient all-reduce cannot live inside a CUDA graph: default mode under DDP"
    return mode, f"compile={want}"


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

    def __init__(
        self,
        raw_model: GPT,
        optimizer: torch.optim.Optimizer,
        cfg: Config,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        world: int,
        log: Callable[[str], None],
    ):
        self.raw, self.optimizer, self.cfg, self.device, self.world, self.log = (
            raw_model,
            optimizer,
            cfg,
            device,
            world,
            log,
        )
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        self.mode, why = resolve_compile(cfg, device, world)
        self.tensor_lr = bool(optimizer.defaults.get("fused"))  # fused AdamW takes lr as a device tensor
        self._set_lr_types()
        self.eval_failed = False  # a compiled evaluation failed once: evaluations run eager from then on
        self._build()
        self.describe = (
            f"training step: {'torch.compile(mode=' + repr(self.mode) + ')' if self.mode else 'eager'} ({why})"
        )

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
        self.periodic = [p for g in self.optimizer.param_groups if group_kind(g) == "qk_periodic" for p in g["params"]]
        self.unproven = GUARDED_STEPS if self.mode else 0
        self.eval_proven = False  # whether a compiled evaluation has run since this build

    @property
    def eval_compiled(self) -> bool:
        """Whether evaluations run compiled: the step is compiled and no compiled evaluation has failed."""
        return self.mode is not None and not self.eval_failed

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
        return qk_unfrozen_in(self.optimizer.param_groups)

    def unfreeze_qk(self, interval: Interval) -> None:
        """Frozen Q/K train from now on: they join the optimizer, the step is compiled afresh, and the
        training `interval` leaves the next steps (compiling) out of its timing."""
        self.raw.set_qk_trainable(True)
        for group in qk_unfrozen_groups(self.raw, self.cfg):
            self.optimizer.add_param_group(group)
        self._set_lr_types()
        self._build()  # also rebuilds DDP, which fixes its parameter set when built
        interval.rewarm()

    def _forward(
        self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
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
        self.log(
            f"torch.compile(mode={self.mode!r}) failed {where} ({one_line(e, typed=True)}): "
            f"{'training' if where == 'in a training step' else 'evaluating'} eager"
        )

    def __call__(self, x: torch.Tensor, y: torch.Tensor, qk_update: bool = True) -> torch.Tensor:
        """One optimizer step on (x, y); returns the loss (on the device, detached).

        `qk_update` (qk_update_every): whether this step updates the periodic Q/K (`optim.qk_update_at`).
        """
        if not self.unproven:
            loss = self._forward_backward(x, y)
        else:  # just (re)compiled: a compiler that fails here leaves nothing half-done
            rng = rng_state(self.device)
            try:
                loss = self._forward_backward(x, y)
                self.unproven -= 1
            except Exception as e:
                self._compiler_failed("in a training step", e)
                self.optimizer.zero_grad(set_to_none=True)
                set_rng_state(rng, self.device)  # the eager redo draws the same dropout masks
                self.mode = None
                self._build()
                loss = self._forward_backward(x, y)
        if self.periodic and not qk_update:
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

    def val_loss(self, val_set: list[tuple[torch.Tensor, torch.Tensor]], val_tokens: int) -> float:
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
                    self.eval_failed = True
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


def _ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)


# ------------------------------------------------------------------------------------------------
# the training since the last evaluation: its loss and steady-state speed


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
