"""What every `sweeps/*.py` recipe shares: its command line, and turning it into a `Sweep`.

A recipe declares named presets (which experiments, which seeds, any search space) and calls
`main(...)`; everything else (resume, resources, data, report, W&B) is the library's.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from ..core import experiments as E
from ..core import options as O
from ..core.config import ConfigError
from ..core.io import UserError

Presets = dict[str, dict[str, Any]]


def parser(
    name: str,
    presets: Presets,
    doc: str | None = None,
    options: Callable[[argparse.ArgumentParser], Any] | None = None,
) -> argparse.ArgumentParser:
    """Every recipe's options; `options(ap)` adds the recipe's own."""
    ap = O.ArgumentParser(
        prog=f"sweeps/{name}.py",
        description=doc,
        epilog=O.fields_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--preset",
        default="embedded",
        choices=sorted(presets),
        help="embedded: local Ray on this machine (CPU, minutes); paper: the research's runs on a cluster; "
        "others: see the recipe's docstring",
    )
    ap.add_argument("--seeds", default=None, help="comma-separated seeds, the seed axis (default: the preset's)")
    ap.add_argument("--experiments", default=None, help="comma-separated experiment ids to run (default: the preset's)")
    O.add_set_arguments(ap, defaults={"data_dir": "<storage>/data"})
    ap.add_argument("--storage", default="runs", help="folder (shared on a cluster) or URI for the run and its results")
    ap.add_argument("--name", default=None, help=f"run name (default: {name}-<preset>); the same name resumes")
    ap.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    ap.add_argument(
        "--connect-timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds joining a running Ray cluster may take, whatever state it is in (none, dead, "
        "unreachable, refusing the token, not answering): then one line says what is wrong, exit 2 "
        "(default 30)",
    )
    ap.add_argument(
        "--gpus-per-trial",
        type=float,
        default=None,
        help="0, a share of one GPU (e.g. 0.5) or whole GPUs (2: data-parallel); default: 1 where the "
        "cluster has GPUs, else 0 (--preset paper: an error)",
    )
    ap.add_argument(
        "--trials-per-gpu",
        type=int,
        default=None,
        help="pack N trials on each GPU: each asks for 1/N GPU (Ray fractional resources; they share its "
        "memory) and 1 CPU; see docs/speed.md",
    )
    ap.add_argument("--cpus-per-trial", type=float, default=None, help="default: 1 without GPUs, 2 with")
    ap.add_argument("--max-failures", type=int, default=2, help="retries of a crashed trial from its checkpoint (>= 0)")
    ap.add_argument(
        "--smoke-test", action="store_true", help="tiny model, few steps: checks every code path in seconds"
    )
    ap.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    ap.add_argument("--wandb-project", default="oelm-ray", help="W&B project")
    if options is not None:
        options(ap)
    return ap


def parse_seeds(text: str) -> list[int]:
    """--seeds 0,1,2 -> [0, 1, 2]: whole numbers, at least one, none twice."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} must be comma-separated whole numbers, e.g. 0,1,2") from None
    if not seeds:
        raise ConfigError(
            f"--seeds {text!r} names no seed: give comma-separated whole numbers, e.g. 0,1,2, "
            "or leave --seeds out for the preset's"
        )
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ConfigError(
            f"--seeds {text!r} names seed {', '.join(map(str, twice))} twice: two trials would share "
            "one name and folder; list each seed once"
        )
    return seeds


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_options(args: argparse.Namespace, presets: Presets) -> None:
    """The recipe's own options, checked like config fields before anything starts: one ConfigError each."""
    if args.name is not None and not (NAME.fullmatch(args.name) and ".." not in args.name):
        raise ConfigError(
            f"--name {args.name!r} must be one folder name under --storage: letters, digits, '.', '_' "
            "and '-', starting with a letter or digit, no '/' and no '..'"
        )
    if not args.storage.strip():
        raise ConfigError("--storage '' is empty: give the folder (or URI) that keeps the runs, e.g. --storage runs")
    if args.seeds is not None:
        parse_seeds(args.seeds)
    if args.experiments is not None:
        want = [i.strip() for i in args.experiments.split(",") if i.strip()]
        if not want:
            raise ConfigError(
                f"--experiments {args.experiments!r} names no experiment: give comma-separated ids, "
                "or leave it out for the preset's"
            )
        E.get(want)  # unknown ids -> one clear error
        have = [e if isinstance(e, str) else e.id for e in presets[args.preset]["experiments"]]
        missing = [i for i in want if i not in have]
        if missing:
            raise ConfigError(
                f"--experiments {', '.join(missing)}: not in --preset {args.preset}, whose experiments "
                f"are {', '.join(have)}"
            )
    gpus, cpus = args.gpus_per_trial, args.cpus_per_trial
    whole = gpus is not None and gpus > 1 and math.isfinite(gpus) and gpus.is_integer()
    if gpus is not None and not (gpus == 0 or 1e-4 <= gpus <= 1 or whole):
        raise ConfigError(
            f"--gpus-per-trial {gpus:g} must be 0 (CPU trials), a share of one GPU from 0.0001 to 1 "
            "(e.g. 0.5), or a whole number of GPUs (data-parallel): Ray can schedule nothing else"
        )
    if cpus is not None and not (cpus >= 1e-4 and math.isfinite(cpus)):
        raise ConfigError(
            f"--cpus-per-trial {cpus:g} must be a number of CPUs of at least 0.0001 (Ray's finest share), e.g. 1 or 0.5"
        )
    if args.trials_per_gpu is not None:
        if not 1 <= args.trials_per_gpu <= 10_000:
            raise ConfigError(
                f"--trials-per-gpu {args.trials_per_gpu} must be a whole number from 1 (a GPU per trial) "
                "to 10000 (Ray's finest share, 0.0001 GPU)"
            )
        if args.gpus_per_trial is not None:
            raise ConfigError(
                f"--trials-per-gpu {args.trials_per_gpu} and --gpus-per-trial {args.gpus_per_trial:g} "
                "both set each trial's GPU share: keep one"
            )
    if args.max_failures < 0:
        raise ConfigError(
            f"--max-failures {args.max_failures} must be a whole number >= 0 (the retries of a crashed "
            "trial; Tune's -1, retry forever, would never end a trial that always crashes)"
        )
    project = args.wandb_project
    if not project.strip() or len(project) > 128 or set(project) & set("/\\#?%:"):
        raise ConfigError(
            f"--wandb-project {project!r} is not a W&B project name: 1-128 characters, none of / \\ # ? % :"
        )


def gpu_share(trials_per_gpu: int) -> float:
    """Each trial's GPU fraction: 1/N rounded down to Ray's resource granularity (1e-4), so N fit on one GPU."""
    return math.floor(10_000 / trials_per_gpu) / 10_000


def build(name: str, presets: Presets, args: argparse.Namespace, **extra: Any):
    """The Sweep that a recipe's arguments describe (no Ray started yet)."""
    from pathlib import Path

    from .sweep import Sweep

    check_options(args, presets)
    p = presets[args.preset]
    exps = [E.REGISTRY[i] if isinstance(i, str) else i for i in p["experiments"]]
    if args.experiments:
        want = [i.strip() for i in args.experiments.split(",")]
        exps = [e for e in exps if e.id in want]
    sets = O.parse_sets(args)
    if "seed" in sets:
        raise ConfigError(f"--set seed={sets['seed']}: a sweep's seeds are its seed axis: use --seeds {sets['seed']}")
    if sets.get("data_dir") == "":
        raise ConfigError(
            "--data-dir '' is empty: give the folder of the prepared data, or leave it out for <storage>/data"
        )
    common: dict[str, Any] = dict(p.get("common", {}))
    if args.smoke_test:
        common.update(E.SMOKE)
    common.update(sets)
    storage = str(Path(args.storage).resolve()) if "://" not in args.storage else args.storage
    common["data_dir"] = str(Path(sets.get("data_dir") or Path(storage) / "data").resolve())
    run_name = args.name or f"{name}-{'smoke' if args.smoke_test else args.preset}"
    gpus, cpus = args.gpus_per_trial, args.cpus_per_trial
    if args.trials_per_gpu is not None:
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
        seeds=parse_seeds(args.seeds) if args.seeds is not None else list(p["seeds"]),
        storage=storage,
        common=common,
        sets={k: v for k, v in sets.items() if k != "data_dir"},
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


def main(
    name: str,
    presets: Presets,
    argv: list[str] | None = None,
    customize: Callable[[Any, argparse.Namespace], Any] | None = None,
    doc: str | None = None,
    options: Callable[[argparse.ArgumentParser], Any] | None = None,
) -> int:
    """Parse the recipe's arguments (every recipe's, plus what `options(ap)` adds), run the sweep (or
    resume it), write the report. `customize(sweep, args)` may change the Sweep before it runs.

    Every option and config value is checked before Ray starts: a bad one is one line and exit 2."""
    from . import sweep as S

    args = parser(name, presets, doc, options).parse_args(argv)
    if args.no_wandb:  # also for the W&B logger that Tune restores with a resumed run (it decides its mode at start)
        os.environ["WANDB_MODE"] = "disabled"
    try:
        sw = build(name, presets, args)
        if customize is not None:
            sw = customize(sw, args) or sw
        run_dir = S.run(sw)
        if not args.no_wandb:  # after the report: the W&B sweep view and results table (online), or how to sync
            from .wandb_sync import finish_sweep

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
