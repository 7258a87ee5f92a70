"""`oelm-ray` (also `python -m oelm_ray`): prepare data, train one model, watch and report sweeps.

A config field is set as in every sweep recipe: `--set FIELD=VALUE` (e.g. `--set lr=1e-3 seed=1`),
with `--max-steps` and `--data-dir` as the two everyday aliases; `oelm-ray train --help` lists the
fields, their docstrings and the precedence. A user error (bad value, missing data, foreign
checkpoint, existing run) ends in one message and exit code 2, before any expensive work; a
traceback means a bug.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core import config as C
from .core import options as O
from .core.io import UserError


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter  # descriptions and epilogs keep their line breaks
    ap = O.ArgumentParser(prog="oelm-ray", description=__doc__, formatter_class=raw)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def command(name: str, help: str, epilog: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=raw)

    p = command("prepare", "tokenize a corpus into train.bin / val.bin / meta.json", O.fields_help(("data",)))
    p.add_argument(
        "--preset", default="cpu", help=f"preset whose data settings are the defaults ({', '.join(C.PRESETS)})"
    )
    p.add_argument("--force", action="store_true", help="rebuild even if a prepared copy exists")
    p.add_argument("--verify", default="quick", choices=("quick", "full"), help="how an existing copy is checked")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="tokenizer processes (default: the usable cores; 0: tokenize in this process)",
    )
    O.add_set_arguments(p, ("data_dir",))

    p = command("train", "train one model (no Ray)", O.fields_help())
    p.add_argument("--preset", default="cpu", help=f"config preset: {', '.join(C.PRESETS)}")
    p.add_argument("--out-dir", required=True, help="folder for metrics.jsonl, latest.pt, best.pt, summary.json")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/latest.pt")
    p.add_argument("--no-prepare", action="store_true", help="fail instead of preparing missing data")
    O.add_set_arguments(p)

    p = command("status", "table of a sweep's trials (works while it runs)")
    p.add_argument("run", nargs="?", default=None, help="run folder or name (default: the newest under --storage)")
    p.add_argument("--storage", default="runs", help="storage folder that holds the runs")

    p = command("report", "write trials.parquet, summary.md and val_ppl.png for a sweep")
    p.add_argument("run", nargs="?", default=None, help="run folder or name (default: the newest under --storage)")
    p.add_argument("--storage", default="runs", help="storage folder that holds the runs")

    p = command("sync", "upload a sweep's offline W&B runs, then add its W&B sweep view and results table")
    p.add_argument("run", nargs="?", default=None, help="run folder or name (default: the newest under --storage)")
    p.add_argument("--storage", default="runs", help="storage folder that holds the runs")
    p.add_argument("--project", default=None, help="W&B project (default: the one the sweep logged to)")

    p = command("check-cluster", "validate a Ray cluster-launcher YAML offline with Ray's own schema")
    p.add_argument("yaml", nargs="?", default="cluster.yaml", help="cluster config (default: cluster.yaml)")
    p.add_argument(
        "--strict",
        action="store_true",
        help="placeholder hosts (*_TODO) and a missing ssh key file are errors, as right before `ray up`",
    )

    p = command("selftest", "prove the fast path on this hardware: one line per check per GPU (exit 2 if any fails)")
    p.add_argument(
        "--local", action="store_true", help="this machine only, without Ray (its GPU if it has one, else the CPU)"
    )
    p.add_argument("--address", default=None, help="the Ray cluster (default: RAY_ADDRESS, else the one running here)")
    p.add_argument("--checks", default="", help="only these checks, comma-separated (default: all)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed check (the correctness checks only)")
    p.add_argument(
        "--timeout", type=float, default=None, help="seconds to wait for every GPU's answer on a cluster (default 600)"
    )

    p = command("doctor", "is this node ready for a --preset paper sweep? one line per check (exit 2 if not)")
    p.add_argument("--storage", default="runs", help="the sweep's --storage (checked writable and seen by every node)")
    p.add_argument("--data-dir", default=None, help="the sweep's --data-dir (default: <storage>/data)")
    p.add_argument("--address", default=None, help="the Ray cluster (default: RAY_ADDRESS, else the one running here)")
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds joining the Ray cluster may take, whatever state it is in (none, dead, unreachable, "
        "refusing the token, not answering): then one line says what is wrong (default 30)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # user errors become one line; anything else is a bug and keeps its traceback
        if isinstance(e, UserError):
            print(f"oelm-ray {args.cmd}: error: {e}", file=sys.stderr)
            return 2
        raise


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _dispatch(args: argparse.Namespace) -> int:
    if args.cmd == "prepare":
        from .core.data import prepare

        cfg = C.make_config(args.preset, O.parse_sets(args, sections=("data",)))
        meta = prepare(cfg.data, force=args.force, workers=args.workers, log=_to_stderr)
        print(f"prepared {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens")
        return 0
    if args.cmd == "train":
        from .core.data import prepare
        from .core.prepared import load_prepared
        from .core.trainer import train

        cfg = C.make_config(args.preset, O.parse_sets(args))
        data = load_prepared(cfg.data) if args.no_prepare else None
        if data is None:  # prepares what is missing, saying what `oelm-ray prepare` says (a held lock, progress)
            prepare(cfg.data, log=_to_stderr)
        train(cfg, Path(args.out_dir), resume=args.resume, data=data)
        return 0
    if args.cmd in ("status", "report"):
        from . import results

        run = results.find_run(args.storage, args.run)
        if args.cmd == "status":
            print(results.status_table(run))
        else:
            for path in results.write_report(run):
                print(path)
        return 0
    if args.cmd == "sync":
        from . import results
        from .tune import wandb_sync

        wandb_sync.sync(results.find_run(args.storage, args.run), project=args.project)
        return 0
    if args.cmd == "check-cluster":
        from .cluster import launcher

        print(launcher.check_cluster(args.yaml, allow_placeholders=not args.strict))
        return 0
    if args.cmd == "selftest":
        return _selftest(args)
    if args.cmd == "doctor":
        from .cluster import doctor

        return doctor.main(args.storage, args.data_dir, args.address, args.connect_timeout)
    raise AssertionError(args.cmd)


def _selftest(args: argparse.Namespace) -> int:
    from .core import selftest

    only = tuple(c for c in args.checks.split(",") if c)
    if args.local:
        lines, ok = selftest.render(
            selftest.where_local(), selftest.run_selftest("auto", speed=not args.no_speed, only=only)
        )
        print("\n".join(lines))
    else:
        from .tune.selftest import run_on_cluster

        ok = run_on_cluster(
            args.address, speed=not args.no_speed, only=only, timeout_s=args.timeout or selftest.TIMEOUT_S
        )
    if ok:
        print("selftest passed: the fast path computes what eager does on this hardware")
        return 0
    print(f"selftest FAILED: {selftest.FAIL_ADVICE}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
