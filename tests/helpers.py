"""What the end-to-end and bad-input tests share: the tiny run, its world, the phase-3 recipe."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from oelm_ray.core import data
from oelm_ray.core import experiments as E
from oelm_ray.core.config import make_config
from oelm_ray.core.experiments import TINY_MODEL
from oelm_ray.tune import wandb_sync as WS
from oelm_ray.tune.sweep import Sweep

from wandb_files import read_finished  # tests/wandb_files.py: .wandb files read back

ROOT = Path(__file__).resolve().parents[1]
PHASE3 = ROOT / "sweeps" / "phase3.py"
LOSS_KEYS = ("step", "tokens", "train/loss", "val/loss", "val/ppl", "lr")

# a tiny `oelm-ray train` run, as config overrides and as the same command line
TINY = dict(
    stories_mb=0.3,
    **TINY_MODEL,
    max_steps=10,
    warmup_steps=2,
    eval_interval=10,
    eval_batches=1,
    log_interval=10,
    num_threads=1,
)


# the phase-3 smoke recipe's arguments for the interrupt tests: 9 trials of 600 steps (~2 s of training each,
# 20x the smoke run's), so several are unfinished or running at an interrupt whatever the machine's speed;
# they checkpoint every 100 steps
NINE_TRIALS = (
    "--seeds",
    "0,1,2",
    "--experiments",
    "CPU-01,CPU-02,CPU-03",
    "--set",
    "max_steps=600",
    "eval_interval=100",
)


def smoke_command(recipe: str, tmp: Path, *extra: str) -> list[str]:
    """`python sweeps/<recipe>.py --smoke-test --no-wandb --storage <tmp>/runs ...`: a recipe's smoke run."""
    return [
        sys.executable,
        str(ROOT / "sweeps" / f"{recipe}.py"),
        "--smoke-test",
        "--no-wandb",
        "--storage",
        str(tmp / "runs"),
        *extra,
    ]


def phase3_presets() -> dict:
    spec = importlib.util.spec_from_file_location("phase3_recipe", PHASE3)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # the recipe's `main` is guarded by __name__
    return mod.PRESETS


def smoke(tmp: Path, **kw) -> dict:
    return {**E.SMOKE, "data_dir": str(tmp / "data"), **kw}


def final_log(run_dir: Path, trial: str) -> str:
    """The trial's train.log, kept with its state in the run folder."""
    return (run_dir / trial / "state" / "train.log").read_text()


def losses(history: list[dict]) -> list[tuple]:
    return [tuple(h.get(k) for k in LOSS_KEYS) for h in history]


def quiet(_):
    pass


def train_argv(**fields) -> list[str]:
    """`oelm-ray train --preset cpu --set ...` of the tiny run, with `fields` changed or added."""
    return ["train", "--preset", "cpu", "--set", *[f"{k}={v}" for k, v in {**TINY, **fields}.items()]]


@dataclass
class World:
    """What the bad-input cases start from: a prepared corpus and a finished tiny run (never modified)."""

    root: Path
    data: Path
    ckpt: Path


def make_world(root: Path) -> World:
    """A prepared tiny corpus and a finished tiny run under `root`."""
    from oelm_ray.core.trainer import train

    cfg = make_config("cpu", **TINY, data_dir=str(root / "data"))
    data.prepare(cfg.data, progress=False)
    threads = torch.get_num_threads()
    try:
        train(cfg, root / "ckpt", log=quiet)
    finally:
        torch.set_num_threads(threads)
    return World(root, root / "data", root / "ckpt")


def smoke_sweep(tmp: Path, name: str, **kw) -> Sweep:
    common = {**E.SMOKE, "data_dir": str(tmp / "data"), **kw.pop("common", {})}
    return Sweep(
        name=name, experiments=list(E.EMBEDDED.values()), seeds=[0, 1], storage=str(tmp / "runs"), common=common, **kw
    )


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BENCH_SEARCHERS = load_module(ROOT / "benchmarks" / "searchers.py", "bench_searchers")  # the alternatives


def steps_of(run_dir: Path, trial_id: str) -> list[int]:
    """Training steps with val/ppl across every offline segment of one trial, in start order."""
    out = []
    for seg in WS.offline_runs(run_dir):
        if WS.offline_run_id(seg) == trial_id:
            out += [h["_step"] for h in read_finished(seg)["history"] if "val/ppl" in h]
    return out


# the partial-unfreezing recipe's arms after its per-depth PU-k<k> rows, in order
PU_ARMS = ["PU-unf0.25", "PU-unf0.50", "PU-unf0.75", "PU-mult0.1", "PU-every10", "PU-lrd0.5",
           "PU-rand-unf0.25", "PU-rand-mult0.1", "PU-orth-train", "PU-rand-train"]  # fmt: skip

# a tiny training run (the tiny model, 40 steps, dropout on: RNG in every step)
TINY_RUN = dict(**TINY_MODEL, max_steps=40, warmup_steps=4, eval_interval=10, eval_batches=2, log_interval=10,
                stories_mb=0.2, num_threads=1, dropout=0.1)  # fmt: skip
