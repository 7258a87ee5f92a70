"""After a sweep: its W&B runs uploaded and the views that need the server (`oelm-ray sync`, finish_sweep).

    finish_sweep(run_dir)   # the recipe, after the report: online, add the sweep view and table; offline, say how
    sync(run_dir)           # `oelm-ray sync RUN`: `wandb sync` the offline runs, then publish
    publish(run_dir, ...)   # trials.parquet as a W&B Table in a `report` run; online, a W&B sweep seeded from the runs

It reads what the Tune callback (oelm_ray.tune.wandb_logger) left under `<run>/wandb/`: the offline run
folders and META (project, entity, group, mode).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import wandb

from ..core.config import ConfigError
from ..core.io import write_json
from .wandb_key import has_key
from .wandb_logger import META, read_meta


def offline_runs(run_dir: str | os.PathLike) -> list[Path]:
    """The offline run folders of a sweep, oldest first (one per trial attempt)."""
    return sorted(p for p in (Path(run_dir) / "wandb").glob("offline-run-*") if any(p.glob("*.wandb")))


def offline_run_id(folder: Path) -> str:
    """The W&B run id (= the trial id) of one offline run folder, from its `run-<id>.wandb` file.

    Not from the folder's name: two attempts started in the same second get `...-<id>` and `...-<id>-1`.
    """
    return next(folder.glob("run-*.wandb")).stem[len("run-") :]


def finish_sweep(run_dir: str | os.PathLike, project: str | None = None) -> None:
    """Call after the sweep's report: online, add the sweep view and table now; offline, say how to."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    if meta is None:  # no trial logged to W&B
        return
    if meta["mode"] != "online":
        n = len({offline_run_id(p) for p in offline_runs(run_dir)})
        print(
            f"W&B: {n} offline run(s) in {run_dir / 'wandb'}; `oelm-ray sync {run_dir}` uploads them "
            "and adds the sweep view and results table",
            flush=True,
        )
        return
    if offline_runs(run_dir):  # an actor fell back to offline mid-sweep
        print(f"W&B: some runs were kept offline; `oelm-ray sync {run_dir}` uploads them", flush=True)
    try:
        publish(run_dir, project=project or meta["project"], entity=meta.get("entity"), group=meta["group"])
    except Exception as e:  # the sweep itself is done and reported: never fail it here
        print(f"W&B: could not add the sweep view / results table ({e}); `oelm-ray sync {run_dir}` retries", flush=True)


SYNC_TIMEOUT_S = 3600.0  # one `wandb sync` of a sweep's offline runs, at most


def sync(run_dir: str | os.PathLike, project: str | None = None) -> None:
    """Upload a sweep's offline runs (`wandb sync`), then add its W&B sweep view and results table."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir) or {}
    project = project or meta.get("project")
    if not project:
        raise ConfigError(
            f"{run_dir} has no W&B runs (was it run with --no-wandb?); pass --project to publish its table anyway"
        )
    if not has_key():
        raise ConfigError("no W&B API key: run `wandb login` (or set WANDB_API_KEY), then `oelm-ray sync` again")
    runs = offline_runs(run_dir)
    if runs:
        cmd = [sys.executable, "-m", "wandb", "sync", "--project", project, *map(str, runs)]
        if meta.get("entity"):
            cmd[4:4] = ["--entity", meta["entity"]]
        env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
        print(f"W&B: uploading {len(runs)} offline run folder(s) to {project!r}", flush=True)
        try:
            rc = subprocess.run(cmd, env=env, timeout=SYNC_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            raise ConfigError(
                f"`wandb sync` of {run_dir / 'wandb'} did not finish within {SYNC_TIMEOUT_S:g}s (a stalled upload?): "
                "run `oelm-ray sync` again (run folders already synced are skipped)"
            ) from None
        if rc != 0:
            raise ConfigError(
                f"`wandb sync` failed for {run_dir / 'wandb'}: see its messages above; run `oelm-ray sync` again"
            )
    publish(run_dir, project=project, entity=meta.get("entity"), group=meta.get("group") or run_dir.name)


def publish(run_dir: Path, project: str, entity: str | None, group: str, mode: str = "online") -> None:
    """Log trials.parquet as a W&B Table (a `report` run of the group); online, also create the sweep view."""
    import pandas as pd

    from .. import results

    run_dir = Path(run_dir)
    parquet = run_dir / "trials.parquet"
    records = results.load_records(run_dir)
    df = pd.read_parquet(parquet) if parquet.exists() else results.trials_frame(records)
    ids = [r["trial_id"] for r in records if r.get("trial_id")]
    meta = read_meta(run_dir) or {}
    report = wandb.init(
        project=project,
        entity=entity,
        group=group,
        job_type="report",
        name=f"{group}-report",
        id=_report_id(group),
        resume="allow",
        dir=str(run_dir),
        mode=mode,
        reinit="create_new",
        config={"run_dir": str(run_dir), "trials": len(ids)},
    )
    floats = {c: "float64" for c in df.columns if str(df[c].dtype) == "boolean"}  # W&B tables take no nullable bools
    table = {"trials": wandb.Table(dataframe=df.astype(floats))}
    if (run_dir / "val_ppl.png").exists():
        table["val_ppl"] = wandb.Image(str(run_dir / "val_ppl.png"))
    report.log(table)
    report.finish()
    if mode == "online" and ids and not meta.get("sweep_id"):
        sweep_id = wandb.sweep(sweep_config(records, group), project=project, entity=entity, prior_runs=ids)
        write_json(run_dir / "wandb" / META, {**meta, "sweep_id": sweep_id})
        print(f"W&B: sweep view {sweep_id} with {len(ids)} run(s); results table in run {group}-report", flush=True)


def sweep_config(records: list[dict], group: str) -> dict:
    """A grid sweep over the factors that vary between the trials (the view, not an agent's plan)."""
    from .sweep import METRIC, MODE

    flat = []
    for r in records:
        row = {"experiment_id": r.get("experiment_id"), "seed": r.get("seed")}
        for section in (r.get("config") or {}).values():
            row.update(section)
        flat.append(row)
    keys = sorted({k for row in flat for k in row})
    params = {}
    for k in keys:
        vals = sorted({json.dumps(row.get(k), default=str) for row in flat})
        if len(vals) > 1 or k in ("experiment_id", "method", "dataset", "seed"):
            params[k] = {"values": [json.loads(v) for v in vals]}
    return {"name": group, "method": "grid", "metric": {"name": METRIC, "goal": MODE + "imize"}, "parameters": params}


def _report_id(group: str) -> str:
    return f"report-{zlib.crc32(group.encode()):08x}"
