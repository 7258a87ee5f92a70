"""What every `sweeps/*.py` recipe shares: its command line, and turning it into a `Sweep`.

A recipe declares named presets (which experiments, which seeds, any search space) and calls
`main(...)`; everything else (resume, resources, data, report, W&B) is the library's.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Callable

from ..core import experiments as E
from ..core import config as C
from ..core.config import ConfigError
from ..core.io import UserError

Presets = dict[str, dict[str, Any]]


def parser(name: str, presets: Presets, doc: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"sweeps/{name}.py", description=doc)
    ap.add_argument("--preset", default="embedded", choices=sorted(presets),
                    help="embedded: local Ray on this machine (CPU, minutes); paper: the research's runs on a cluster; "
                         "others: see the recipe's docstring")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's)")
    ap.add_argument("--experiments", default=None, help="comma-separated experiment ids to run (default: the preset's)")
    ap.add_argument("--max-steps", type=int, default=None, help="override every trial's max_steps")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override any config field for every trial (repeatable), e.g. --set lr=1e-3")
    ap.add_argument("--storage", default="runs", help="folder (shared on a cluster) or URI for the run and its results")
    ap.add_argument("--data-dir", default=None, help="prepared data (default: <storage>/data)")
    ap.add_argument("--name", default=None, help=f"run name (default: {name}-<preset>); the same name resumes")
    ap.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    ap.add_argument("--connect-timeout", type=float, default=None, metavar="S",
                    help="seconds joining a running Ray cluster may take, whatever state it is in (none, dead, "
                         "unreachable, refusing the token, not answering): then one line says what is wrong, exit 2 "
                         "(default 30)")
    ap.add_argument("--gpus-per-trial", type=float, default=None, help="default: 1 where the cluster has GPUs, else 0 (--preset paper: an error)")
    ap.add_argument("--trials-per-gpu", type=int, default=None,
                    help="pack N trials on each GPU: each asks for 1/N GPU (Ray fractional resources; they share its "
                         "memory) and 1 CPU; see the README's 'Speed on a GPU'")
    ap.add_argument("--cpus-per-trial", type=float, default=None, help="default: 1 without GPUs, 2 with")
    ap.add_argument("--max-failures", type=int, default=2, help="retries of a crashed trial from its checkpoint")
    ap.add_argument("--smoke-test", action="store_true", help="tiny model, few steps: checks every code path in seconds")
    ap.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    ap.add_argument("--wandb-project", default="oelm-ray", help="W&B project")
    return ap


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} must be comma-separated whole numbers, e.g. 0,1,2") from None


def parse_sets(items: list[str]) -> dict[str, Any]:
    """--set FIELD=VALUE items -> {field: value of the field's type}; a bad field or value is one error."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set {item!r} must look like FIELD=VALUE, e.g. --set lr=1e-3")
        out[key.strip().replace("-", "_")] = value.strip()
    return C.typed(out)


def gpu_share(trials_per_gpu: int) -> float:
    """Each trial's GPU fraction: 1/N rounded down to Ray's resource granularity (1e-4), so N fit on one GPU."""
    return math.floor(10_000 / trials_per_gpu) / 10_000


def build(name: str, presets: Presets, args: argparse.Namespace, **extra: Any):
    """The Sweep that a recipe's arguments describe (no Ray started yet)."""
    from pathlib import Path

    from .sweep import Sweep

    p = presets[args.preset]
    exps = [E.REGISTRY[i] if isinstance(i, str) else i for i in p["experiments"]]
    if args.experiments:
        want = args.experiments.split(",")
        E.get(want)  # unknown ids -> one clear error
        exps = [e for e in exps if e.id in want]
    common: dict[str, Any] = dict(p.get("common", {}))
    if args.smoke_test:
        common.update(E.SMOKE)
    common.update(parse_sets(args.set))
    if args.max_steps is not None:
        common["max_steps"] = args.max_steps
    storage = str(Path(args.storage).resolve()) if "://" not in args.storage else args.storage
    common["data_dir"] = str(Path(args.data_dir or Path(storage) / "data").resolve())
    run_name = args.name or f"{name}-{'smoke' if args.smoke_test else args.preset}"
    gpus, cpus = args.gpus_per_trial, args.cpus_per_trial
    if args.trials_per_gpu is not None:
        if args.trials_per_gpu < 1 or gpus is not None:
            raise ConfigError(f"--trials-per-gpu {args.trials_per_gpu} must be a whole number >= 1 and excludes --gpus-per-trial")
        gpus = gpu_share(args.trials_per_gpu)
        cpus = 1.0 if cpus is None else cpus
    callbacks = []
    if not args.no_wandb:
        from .wandb_logger import callback as wandb_callback

        cb = wandb_callback(project=args.wandb_project, group=run_name)
        callbacks += [cb] if cb else []
    kwargs = dict(
        name=run_name,
        experiments=exps,
        seeds=parse_seeds(args.seeds) if args.seeds else list(p["seeds"]),
        storage=storage,
        common=common,
        search=dict(p.get("search", {})),
        address=args.address,
        **({"connect_timeout": args.connect_timeout} if args.connect_timeout is not None else {}),
        gpus_per_trial=gpus,
        require_gpus=args.preset.startswith("paper"),  # no silent fallback to days on one CPU core
        cpus_per_trial=cpus,
        max_failures=args.max_failures,
        callbacks=callbacks,
    )
    kwargs.update(extra)
    return Sweep(**kwargs)


def main(name: str, presets: Presets, argv: list[str] | None = None,
         customize: Callable[[Any, argparse.Namespace], Any] | None = None, doc: str | None = None) -> int:
    """Parse the recipe's arguments, run the sweep (or resume it), write the report."""
    from . import sweep as S

    args = parser(name, presets, doc).parse_args(argv)
    if args.no_wandb:  # also for the W&B logger that Tune restores with a resumed run (it decides its mode at start)
        os.environ["WANDB_MODE"] = "disabled"
    try:
        sw = build(name, presets, args)
        if customize is not None:
            sw = customize(sw, args) or sw
        run_dir = S.run(sw)
        if not args.no_wandb:  # after the report: the W&B sweep view and results table (online), or how to sync
            from .wandb_logger import finish_sweep

            finish_sweep(run_dir, project=args.wandb_project)
    except Exception as e:  # user errors become one line; anything else is a bug and keeps its traceback
        if not isinstance(e, UserError):
            raise
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0
