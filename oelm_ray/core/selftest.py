"""`oelm-ray selftest`: proves the trainer's fast path on the device it will run on, in minutes.

Each check runs the trainer's own pieces (`TrainStep`, `Batches`, `train`) on this device and
compares them with the plain way of computing the same thing:

- compiled-fp32 / compiled-bf16: the compiled step (the mode `compile=auto` picks on CUDA: CUDA
  graphs; `default` on CPU, which has no graphs) gives eager's losses (fp32 tightly, bf16 loosely);
- dropout: masks differ between replays of the compiled step (a graph must not freeze its RNG);
- tensor-lr: fused AdamW with learning rates as device tensors, updated in place, ends where a
  float-lr AdamW does;
- staging: the staged batches are the sampler's, also after a state restore;
- unfreeze: Q/K train after an unfreeze under the mode the trainer picks, and the Q/K check passes;
- resume: a run cut at the unfreeze step's checkpoint (written in the background) and resumed ends
  at the uninterrupted run's val loss;
- eval: the whole-split evaluation compiled equals eager, its shorter last window included;
- speed: the trainer's tok/s against the model step on one resident batch (same mode, clip
  included); on a GPU below 0.5 is a failure and below the 0.9 goal is said; on a CPU the figure is
  shown, not judged (`--`): a tiny model's timing there is noise.

No Ray and no downloads: the tokens are synthetic. `tune/selftest.py` runs this on every GPU of a
cluster.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .batches import Batches, Sampler, eval_batches, scored_tokens
from .config import Config, ConfigError, make_config
from .experiments import TINY_MODEL
from .io import read_metrics
from .model import GPT
from .optim import build_optimizer
from .prepared import Prepared
from .qkcheck import qk_digests
from .train_step import TrainStep, resolve_compile, resolve_device
from .trainer import train

CHECK_CPU = dict(
    **TINY_MODEL,
    vocab_size=257,
    tokenizer="bytes",
    num_threads=0,
)
CHECK_CUDA = dict(d_model=128, n_layer=2, n_head=4, d_ff=512, block_size=128, batch_size=8, vocab_size=50257)
SPEED_CPU = CHECK_CPU
SPEED_CUDA = {}  # medium-512 itself: the research's model at its batch of 8

TIMEOUT_S = 600  # a cluster run's wait for every GPU's answer (each should take at most ~3 minutes)
FAIL_ADVICE = (
    "a failed check means this device (or this torch build) would train wrongly or slowly: rerun the one "
    "check's run with compile=off to tell a compiler problem from a device one, try another torch build "
    "(cluster.yaml's TORCH), and report the lines above"
)


@dataclass
class Check:
    name: str
    ok: bool | None  # None: a figure, not judged (speed on a CPU, where a tiny model's timing is noise)
    detail: str


def synthetic_data(folder: Path, vocab: int, n_train: int, n_val: int, seed: int = 0) -> Prepared:
    """Uniform random token ids in uint16 memmaps, shaped like `oelm-ray prepare`'s output."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_val)):
        mm = np.memmap(folder / f"{split}.bin", dtype=np.uint16, mode="w+", shape=(n,))
        mm[:] = rng.integers(0, vocab, n, dtype=np.uint16)
        mm.flush()
        arrays[split] = np.memmap(folder / f"{split}.bin", dtype=np.uint16, mode="r")
    return Prepared(train=arrays["train"], val=arrays["val"], meta={"synthetic": True}, path=folder, vocab_size=vocab)


class SelfTest:
    """The checks on one device; `run()` returns one `Check` per line."""

    def __init__(
        self,
        device: torch.device,
        folder: Path,
        speed: bool = True,
        log: Callable[[str], None] | None = None,
        only: tuple[str, ...] = (),
    ):
        self.device, self.folder, self.speed, self.log = device, folder, speed, log or (lambda _: None)
        self.only = only
        cuda = device.type == "cuda"
        self.small = dict(CHECK_CUDA if cuda else CHECK_CPU, device=device.type, dropout=0.0)
        base = self.config()
        self.data = synthetic_data(
            folder, base.model.vocab_size, 200_000, 3 * base.model.block_size * base.train.batch_size + 45
        )
        # the mode compile=auto picks on this device, or torch.compile's default where that is eager (CPU)
        self.mode = resolve_compile(base.override({"compile": "auto"}), device)[0] or "default"
        self.tol = {"fp32": 2e-3 if cuda else 1e-4, "bf16": 5e-2, "resume": 2e-3 if cuda else 0.0}

    def config(self, **kw) -> Config:
        return make_config("cpu", **{**self.small, "dtype": "fp32", **kw})

    def plan(self) -> dict[str, Callable[[], list[Check]]]:
        """Check name -> what runs it (unfreeze and resume share one pair of runs)."""
        both = self.unfreeze_and_resume
        plan = {
            "compiled-fp32": lambda: [self.compiled_vs_eager("fp32")],
            "compiled-bf16": lambda: [self.compiled_vs_eager("bf16")],
            "dropout": lambda: [self.dropout_replays()],
            "tensor-lr": lambda: [self.tensor_lr()],
            "staging": lambda: [self.staging()],
            "unfreeze": both,
            "resume": both,
            "eval": lambda: [self.whole_split_eval()],
        }
        if self.speed:
            plan["speed"] = lambda: [self.trainer_speed()]
        return plan

    def run(self) -> list[Check]:
        plan, done, out = self.plan(), set(), []
        for name in self.only or plan:
            if name in done:
                continue
            checks = plan[name]()
            done |= {c.name for c in checks}
            out += [c for c in checks if not self.only or c.name in self.only]
        return out

    # -- pieces ---------------------------------------------------------------------------------

    def _step(self, cfg: Config, compile: str, seed: int = 0, fused: bool | None = None) -> TrainStep:
        torch.manual_seed(seed)
        model = GPT(cfg.model).to(self.device)
        cfg = cfg.override({"compile": compile})
        amp = {"fp32": None, "bf16": torch.bfloat16}[cfg.train.dtype]
        return TrainStep(
            model, build_optimizer(model, cfg, self.device, fused=fused), cfg, self.device, amp, 1, self.log
        )

    def _batches(self, cfg: Config, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        s = Sampler(self.data.train, cfg.model.block_size, cfg.train.batch_size, seed=seed)
        return [tuple(t.to(self.device) for t in s.next()) for _ in range(n)]

    def _losses(self, step: TrainStep, batches, lr: float = 1e-3) -> list[float]:
        out = []
        for x, y in batches:
            step.set_lr(lr)
            out.append(step(x, y).float().item())
        return out

    @staticmethod
    def _rel(a: list[float], b: list[float]) -> float:
        return max(abs(u - v) / max(abs(v), 1e-12) for u, v in zip(a, b))

    # -- the checks -----------------------------------------------------------------------------

    def compiled_vs_eager(self, dtype: str) -> Check:
        cfg = self.config(dtype=dtype)
        batches = self._batches(cfg, 4)
        eager = self._losses(self._step(cfg, "off"), batches)
        compiled_step = self._step(cfg, self.mode)
        compiled = self._losses(compiled_step, batches)
        rel, tol = self._rel(compiled, eager), self.tol[dtype]
        fell_back = compiled_step.mode is None
        ok = rel <= tol and not fell_back and all(map(math.isfinite, compiled))
        why = " (the compiler failed: it fell back to eager, see the log)" if fell_back else ""
        return Check(
            f"compiled-{dtype}", ok, f"{self.mode}: 4 steps, max rel diff vs eager {rel:.1e} (tol {tol:.0e}){why}"
        )

    def dropout_replays(self) -> Check:
        cfg = self.config(dropout=0.1)
        step = self._step(cfg, self.mode)
        ((x, y),) = self._batches(cfg, 1)
        losses = self._losses(step, [(x, y)] * 4, lr=0.0)  # lr 0: only the masks change between steps
        distinct = len(set(losses[1:]))  # the first call may be a warm-up run, outside any graph
        return Check(
            "dropout", distinct == 3, f"{self.mode}: the same batch 3x at lr 0 gave {distinct} distinct losses (want 3)"
        )

    def tensor_lr(self) -> Check:
        cfg = self.config()
        batches = self._batches(cfg, 5)
        fused, plain = self._step(cfg, "off", fused=True), self._step(cfg, "off", fused=False)
        for i, (x, y) in enumerate(batches):
            for s in (fused, plain):
                s.set_lr(1e-3 * (i + 1))  # a new lr every step, as the schedule does
                s(x, y)
        diff = max((a - b).abs().max().item() for a, b in zip(fused.raw.parameters(), plain.raw.parameters()))
        kind = type(fused.optimizer.param_groups[0]["lr"]).__name__
        ok = fused.tensor_lr and kind == "Tensor" and diff <= 1e-5
        return Check(
            "tensor-lr",
            ok,
            f"fused AdamW, lr as a device {kind}, 5 steps: max |param diff| vs float lr {diff:.1e} (tol 1e-05)",
        )

    def staging(self) -> Check:
        cfg = self.config()
        T, B = cfg.model.block_size, cfg.train.batch_size
        ref = Sampler(self.data.train, T, B, seed=3)
        a = Batches(Sampler(self.data.train, T, B, seed=3), self.device)
        same = True
        for _ in range(3):
            x, y = a.next()
            buf = ref.next_buf()
            same &= torch.equal(x.cpu(), buf[:, :-1]) and torch.equal(y.cpu(), buf[:, 1:])
        b = Batches(Sampler(self.data.train, T, B, seed=4), self.device)
        b.load_state_dict(a.state_dict())
        nxt = ref.next_buf()
        for batches in (a, b):
            x, y = batches.next()
            same &= torch.equal(x.cpu(), nxt[:, :-1]) and torch.equal(y.cpu(), nxt[:, 1:])
        where = "pinned, side stream" if a.stream is not None else "host"
        return Check(
            "staging", bool(same), f"4 staged batches ({where}) equal the sampler's, also after a state restore"
        )

    def unfreeze_and_resume(self) -> list[Check]:
        """A run through a Q/K unfreeze (auto's mode) straight, and one cut at the unfreeze step's checkpoint."""
        cfg = self.config(
            method="oelm_freeze",
            dropout=0.1,
            qk_unfreeze_step=10,
            max_steps=30,
            warmup_steps=5,
            eval_interval=10,
            log_interval=10,
            eval_batches=2,
            compile="auto",
        )
        lines: list[str] = []

        def run(out: str, **kw) -> dict:
            return train(cfg, self.folder / out, data=self.data, log=lines.append, background=True, **kw)

        straight = run("straight")
        end = torch.load(self.folder / "straight" / "latest.pt", weights_only=True)
        qk = [v for k, v in end["model"].items() if k.endswith("attn.c_qk.weight")]
        moved = all(a != b for a, b in zip(qk_digests(qk), end["qk_init"]))
        mode = resolve_compile(cfg, self.device)[0] or "eager"
        unfreeze = Check(
            "unfreeze",
            straight["qk_check"] == "ok" and moved and not any("failed" in l for l in lines),
            f"{mode}: Q/K moved after the step-10 unfreeze, Q/K check '{straight['qk_check'][:60]}'",
        )

        class Cut(Exception):
            pass

        def stop(m):
            if m["step"] == 10:
                raise Cut

        with contextlib.suppress(Cut):
            run("cut", report=stop)
        resumed = run("cut", resume=True)
        a, b = straight["final_val_ppl"], resumed["final_val_ppl"]
        rel = abs(a - b) / a
        return [
            unfreeze,
            Check(
                "resume",
                rel <= self.tol["resume"],
                f"background checkpoint at the unfreeze step, resumed: val ppl {b:.4f} vs {a:.4f} uninterrupted "
                f"(rel diff {rel:.1e}, tol {self.tol['resume']:.0e})",
            ),
        ]

    def whole_split_eval(self) -> Check:
        cfg = self.config(eval_batches=0)
        val = [(x.to(self.device), y.to(self.device)) for x, y in eval_batches(self.data.val, cfg)]
        tokens = scored_tokens(val)
        step = self._step(cfg, self.mode)
        compiled = step.val_loss(val, tokens)
        eager = self._step(cfg, "off").val_loss(val, tokens)  # the same init (seed 0)
        rel, tol = abs(compiled - eager) / eager, self.tol["fp32"]
        last = val[-1][1].shape
        return Check(
            "eval",
            rel <= tol and step.eval_compiled and last[1] < cfg.model.block_size,
            f"{self.mode}: whole split, {len(val)} batches, last window {last[1]} tokens: rel diff vs eager "
            f"{rel:.1e} (tol {tol:.0e})",
        )

    def trainer_speed(self) -> Check:
        cuda = self.device.type == "cuda"
        over = dict(SPEED_CUDA if cuda else SPEED_CPU, device=self.device.type)
        cfg = make_config("medium-512" if cuda else "cpu", **over)
        steps = 60 if cuda else 40
        data = (
            self.data
            if cfg.model.vocab_size == self.data.vocab_size
            else synthetic_data(self.folder, cfg.model.vocab_size, 2_000_000, 20 * cfg.model.block_size)
        )
        cfg = cfg.override(
            {
                "max_steps": 2 * steps,
                "warmup_steps": 10,
                "eval_interval": steps,
                "log_interval": steps,
                "eval_batches": 1,
            }
        )
        ceiling = self._ceiling(cfg, steps)
        summary = train(cfg, self.folder / "speed", data=data, log=self.log)
        rows = read_metrics(self.folder / "speed" / "metrics.jsonl")
        trainer = rows[-1]["tokens_per_s"]  # the second interval: compiling and warm-up are behind it
        ratio = trainer / ceiling
        goal = "" if ratio >= 0.9 else " (below the 0.9 goal)"
        judged = ratio >= 0.5 and summary["status"] == "completed"
        return Check(
            "speed",
            judged if cuda else (None if summary["status"] == "completed" else False),
            f"{'medium-512' if cuda else 'cpu preset'} batch {cfg.train.batch_size}: trainer {trainer:,.0f} tok/s, "
            f"model step {ceiling:,.0f} tok/s, ratio {ratio:.2f}{goal}",
        )

    def _ceiling(self, cfg: Config, steps: int) -> float:
        """Tokens/s of `TrainStep` alone on one resident batch, under the mode the trainer picks."""
        amp = resolve_device(cfg)[1]
        torch.manual_seed(0)
        model = GPT(cfg.model).to(self.device)
        step = TrainStep(model, build_optimizer(model, cfg, self.device), cfg, self.device, amp, 1, self.log)
        ((x, y),) = self._batches(cfg, 1)
        for _ in range(5):
            step(x, y)
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        _sync(self.device)
        return steps * x.numel() / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def where_local() -> str:
    """This machine and the device a local selftest runs on, as its lines name them."""
    import platform

    if torch.cuda.is_available():
        return f"{platform.node()} gpu{torch.cuda.current_device()} {torch.cuda.get_device_name()}"
    return f"{platform.node()} cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


CHECKS = ("compiled-fp32", "compiled-bf16", "dropout", "tensor-lr", "staging", "unfreeze", "resume", "eval", "speed")


def run_selftest(
    device: str = "auto", speed: bool = True, log: Callable[[str], None] | None = None, only: tuple[str, ...] = ()
) -> list[Check]:
    """The checks (`only` these, if given) on one device (auto: this process's CUDA GPU if it has one, else the CPU)."""
    unknown = [c for c in only if c not in CHECKS]
    if unknown:
        raise ConfigError(f"unknown check(s) {', '.join(unknown)}: choose from {', '.join(CHECKS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "selftest on cuda, but this torch sees no CUDA GPU (a CPU-only torch build, or no driver): "
            "`oelm-ray doctor` says which"
        )
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    with tempfile.TemporaryDirectory(prefix="oelm-selftest-") as tmp:
        return SelfTest(dev, Path(tmp), speed=speed and (not only or "speed" in only), log=log, only=only).run()


def render(where: str, checks: list[Check]) -> tuple[list[str], bool]:
    """One line per check, prefixed by where it ran; and whether all passed."""
    lines = [
        f"{where}: {c.name:<13} {'PASS' if c.ok else '--  ' if c.ok is None else 'FAIL'}  {c.detail}" for c in checks
    ]
    return lines, all(c.ok is not False for c in checks)
