"""The W&B adapter: every sweep logs to Weights & Biases from the driver, online or offline.

One W&B run per trial (id = Tune trial id, name = trial name, group = the sweep's run name,
job_type = method, tags = dataset, method, seed=N), its config the trial's flat resolved config.
Ray's `WandbLoggerCallback` does the plumbing (one small logging actor per trial on the driver
node, so workers need neither network nor key); two things are changed, in the logging actor:

- the W&B step is the training `step` (Ray logs at `training_iteration`), so curves line up;
- a retried or restored trial continues its run (resume="allow") and logs only steps above the
  last one it logged, so a trial that re-reports the steps after its checkpoint adds no
  duplicate rows. Offline, each attempt is one more `offline-run-*-<id>` folder; `wandb sync`
  uploads the folders of one run in start order, so the history comes out in one piece.

Mode: WANDB_MODE=disabled/offline from the user wins; otherwise no API key (env or the netrc
entry `wandb login` writes, checked without any network call) or an unreachable host means
offline, said once. W&B files live under `<run>/wandb/`; `oelm-ray sync RUN` uploads them and
then adds what needs the server: a W&B sweep seeded from the trials' runs and the results table.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import urllib.error
import zlib
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from ray.air.integrations.wandb import WandbLoggerCallback, _clean_log, _QueueItem, _set_api_key, _WandbLoggingActor

from ..core.config import ConfigError
from ..core.io import url_reachable
from .trial import trial_of

DEFAULT_HOST = "https://api.wandb.ai"
META = "oelm-ray.json"  # under <run>/wandb/: project, entity, group, mode (read by sync and finish_sweep)
STEPS_DIR = "last-step"  # under <run>/wandb/: the last training step logged per trial id

# ------------------------------------------------------------------------------------------------
# mode: online, offline or disabled, decided once on the driver


def has_key() -> bool:
    """True when an API key is configured (env, or the netrc entry of `wandb login`); no network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST
    try:
        from wandb.sdk.lib.wbauth import wbnetrc

        return bool(wbnetrc.read_netrc_auth(host=host))
    except ImportError:  # another wandb layout: read the netrc ourselves
        import netrc

        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        try:
            return bool(netrc.netrc(path).authenticators(urlsplit(host).netloc))
        except (OSError, netrc.NetrcParseError):
            return False
    except Exception:  # a malformed key: online would fail too
        return False





def resolve_mode() -> tuple[str, str]:
    """(mode, why): the user's WANDB_MODE wins; else online with a key and a reachable host, else offline."""
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
        return "disabled", "WANDB_DISABLED is set"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    env = {"dryrun": "offline", "run": "online"}.get(env, env)
    if env in ("disabled", "offline"):
        return env, f"WANDB_MODE={env}"
    if not has_key():
        if env == "online":
            raise ConfigError("WANDB_MODE=online but no W&B API key: run `wandb login` or set WANDB_API_KEY (or pass --no-wandb)")
        return "offline", "no W&B API key (WANDB_API_KEY or `wandb login`)"
    host = os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST
    if env != "online" and not url_reachable(host):
        return "offline", f"{urlsplit(host).netloc} is not reachable"
    return "online", "API key found"


# ------------------------------------------------------------------------------------------------
# the trial's run: its init kwargs, computed on the driver


def trial_init(trial_config: dict, trial_id: str, trial_name: str) -> dict[str, Any]:
    """wandb.init kwargs of one trial: name, job_type, tags and the flat resolved config."""
    t = trial_of(trial_config)
    cfg = t.config
    flat: dict[str, Any] = {}
    for section in cfg.to_dict().values():  # field names are unique across sections
        flat.update(section)
    flat.update(experiment_id=t.experiment.id, preset=t.experiment.preset, trial_name=trial_name, trial_id=trial_id,
                search=sorted(t.searched), role=t.experiment.role, qk_std=cfg.model.qk_std)
    return dict(
        id=trial_id, name=trial_name, job_type=cfg.model.method,
        tags=[cfg.data.dataset, cfg.model.method, f"seed={t.seed}", t.experiment.role], config=_clean_log(flat),
    )


def _run_dir_of(trial) -> Path:
    """The sweep's run folder (local storage), else the driver's staging copy of it."""
    import pyarrow.fs

    if isinstance(trial.storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return Path(trial.remote_experiment_path)
    return Path(trial.local_experiment_path)


class _LoggingActor(_WandbLoggingActor):
    """Ray's per-trial logging actor, logging at the training step and never below the last one."""

    def __init__(self, logdir, queue, exclude, to_config, *args, **kwargs):
        self._last_file = Path(kwargs.pop("last_step_file"))
        super().__init__(logdir, queue, exclude, to_config, *args, **kwargs)

    def _last_logged(self) -> float:
        try:
            return float(self._last_file.read_text())
        except (OSError, ValueError):
            return -1

    def _init(self):
        mode = self.kwargs.get("mode", "offline")
        os.environ["WANDB_MODE"] = mode  # this actor's own process: the worker may carry another WANDB_MODE
        try:
            return self._wandb.init(*self.args, **self.kwargs)
        except Exception as e:  # the network went away between the driver's check and now
            if mode != "online":
                raise
            print(f"W&B: {self._trial_name}: online init failed ({e}); logging offline, `oelm-ray sync` uploads it", flush=True)
            os.environ["WANDB_MODE"] = "offline"
            return self._wandb.init(*self.args, **{**self.kwargs, "mode": "offline"})

    def run(self):
        # Ray's run(), with the step and resume handling changed (ray/air/integrations/wandb.py)
        os.environ["WANDB_START_METHOD"] = "thread"
        run = self._run = self._init()
        run.config.update({"trial_log_path": self._logdir}, allow_val_change=True)
        last = self._last_logged()
        if run.resumed and isinstance(run.summary.get("step"), (int, float)):  # online: the server knows
            last = max(last, run.summary["step"])
        while True:
            item_type, item = self.queue.get()
            if item_type == _QueueItem.END:
                break
            if item_type == _QueueItem.CHECKPOINT:
                self._handle_checkpoint(item)
                continue
            log, config_update = self._handle_result(item)
            step = log.get("step")
            if not isinstance(step, (int, float)) or step <= last:
                continue  # a resumed trial re-reports the steps after its checkpoint: logged already
            try:
                run.config.update(config_update, allow_val_change=True)
                run.log(log, step=int(step))
            except urllib.error.HTTPError as e:
                print(f"W&B: failed to log step {step} of {self._trial_name}: {e}", flush=True)
                continue
            last = step
            self._last_file.parent.mkdir(parents=True, exist_ok=True)
            self._last_file.write_text(str(int(step)))
        run.finish()
        # finish() can return before W&B's service has written the last records, and Ray kills
        # this actor right after run() returns: wait for the service to exit
        self._wandb.teardown()

    def _handle_checkpoint(self, checkpoint_path: str):
        artifact = self._wandb.Artifact(name=f"checkpoint_{self._trial_name}", type="model")
        artifact.add_dir(checkpoint_path)
        self._run.log_artifact(artifact)


class Callback(WandbLoggerCallback):
    """`WandbLoggerCallback` with the oelm-ray run layout; build it with `callback(...)`."""

    _logger_actor_cls = _LoggingActor
    # Tune's own experiment_id would overwrite ours (GPT-02) in the config: keep it out
    AUTO_CONFIG_KEYS = [k for k in WandbLoggerCallback.AUTO_CONFIG_KEYS if k != "experiment_id"] + ["node", "gpu"]
    _exclude_results = WandbLoggerCallback._exclude_results + ["experiment_id", "timestamp"]

    def __init__(self, project: str, group: str, mode: str, run_dir: str | os.PathLike | None = None, **kwargs):
        super().__init__(project=project, group=group, **kwargs)
        self.mode = mode
        self.run_dir = Path(run_dir) if run_dir else None

    def setup(self, *args, **kwargs):
        # resolve_mode() found a key already (env or netrc, which the driver-node actors read too);
        # Ray's own check only matters for an explicit api_key / api_key_file
        if self.mode == "online" and (self.api_key or self.api_key_path):
            _set_api_key(self.api_key_path and os.path.expanduser(self.api_key_path), self.api_key)

    def log_trial_start(self, trial):
        run_dir = self.run_dir or _run_dir_of(trial)
        wdir = run_dir / "wandb"
        wdir.mkdir(parents=True, exist_ok=True)
        meta = {"project": self.project, "entity": self.kwargs.get("entity") or os.environ.get("WANDB_ENTITY"),
                "group": self.group, "mode": self.mode}
        if _read_meta(run_dir) != meta:
            (wdir / META).write_text(json.dumps(meta, indent=1))
        exclude = self._exclude_results + self.excludes + ([] if self.log_config else ["config"])
        kwargs = dict(
            **trial_init(trial.config, trial.trial_id, str(trial)),
            project=self.project, group=self.group, dir=str(run_dir), mode=self.mode,
            resume="allow", reinit="create_new", allow_val_change=True,
            last_step_file=str(wdir / STEPS_DIR / trial.trial_id),
        )
        kwargs.update(self.kwargs)
        self._start_logging_actor(trial, exclude, **kwargs)


def callback(project: str, group: str, run_dir: str | os.PathLike | None = None, **kwargs: Any) -> Callback | None:
    """The sweep's W&B callback, or None when W&B is disabled; says once when it logs offline.

    run_dir: where `wandb/` goes (default: the sweep's run folder, from the trials' storage).
    kwargs: passed on to WandbLoggerCallback / wandb.init (entity, notes, upload_checkpoints, ...).
    """
    mode, why = resolve_mode()
    if mode == "disabled":
        print(f"W&B: off ({why})", flush=True)
        return None
    if mode == "offline":
        print(f"W&B: offline ({why}): runs are kept under <run>/wandb/; upload them later with `oelm-ray sync <run>`", flush=True)
    else:
        print(f"W&B: logging to project {project!r}, group {group!r}", flush=True)
    return Callback(project=project, group=group, mode=mode, run_dir=run_dir, **kwargs)


# ------------------------------------------------------------------------------------------------
# after the sweep: the W&B sweep view and the results table; `oelm-ray sync`


def _read_meta(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / "wandb" / META).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def offline_runs(run_dir: str | os.PathLike) -> list[Path]:
    """The offline run folders of a sweep, oldest first (one per trial attempt)."""
    return sorted(p for p in (Path(run_dir) / "wandb").glob("offline-run-*") if any(p.glob("*.wandb")))


def finish_sweep(run_dir: str | os.PathLike, project: str | None = None) -> None:
    """Call after the sweep's report: online, add the sweep view and table now; offline, say how to."""
    run_dir = Path(run_dir)
    meta = _read_meta(run_dir)
    if meta is None:  # no trial logged to W&B
        return
    if meta["mode"] != "online":
        n = len({p.name.rsplit("-", 1)[-1] for p in offline_runs(run_dir)})
        print(f"W&B: {n} offline run(s) in {run_dir / 'wandb'}; `oelm-ray sync {run_dir}` uploads them "
              "and adds the sweep view and results table", flush=True)
        return
    if offline_runs(run_dir):  # an actor fell back to offline mid-sweep
        print(f"W&B: some runs were kept offline; `oelm-ray sync {run_dir}` uploads them", flush=True)
    try:
        publish(run_dir, project=project or meta["project"], entity=meta.get("entity"), group=meta["group"])
    except Exception as e:  # the sweep itself is done and reported: never fail it here
        print(f"W&B: could not add the sweep view / results table ({e}); `oelm-ray sync {run_dir}` retries", flush=True)


def sync(run_dir: str | os.PathLike, project: str | None = None) -> None:
    """Upload a sweep's offline runs (`wandb sync`), then add its W&B sweep view and results table."""
    run_dir = Path(run_dir)
    meta = _read_meta(run_dir) or {}
    project = project or meta.get("project")
    if not project:
        raise ConfigError(f"{run_dir} has no W&B runs (was it run with --no-wandb?); pass --project to publish its table anyway")
    if not has_key():
        raise ConfigError("no W&B API key: run `wandb login` (or set WANDB_API_KEY), then `oelm-ray sync` again")
    runs = offline_runs(run_dir)
    if runs:
        cmd = [sys.executable, "-m", "wandb", "sync", "--project", project, *map(str, runs)]
        if meta.get("entity"):
            cmd[4:4] = ["--entity", meta["entity"]]
        env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
        print(f"W&B: uploading {len(runs)} offline run folder(s) to {project!r}", flush=True)
        if subprocess.run(cmd, env=env).returncode != 0:
            raise ConfigError(f"`wandb sync` failed for {run_dir / 'wandb'}: see its messages above; run `oelm-ray sync` again")
    publish(run_dir, project=project, entity=meta.get("entity"), group=meta.get("group") or run_dir.name)


def publish(run_dir: Path, project: str, entity: str | None, group: str, mode: str = "online") -> None:
    """Log trials.parquet as a W&B Table (a `report` run of the group); online, also create the sweep view."""
    import pandas as pd
    import wandb

    from .. import results

    run_dir = Path(run_dir)
    parquet = run_dir / "trials.parquet"
    df = pd.read_parquet(parquet) if parquet.exists() else results.trials_frame(results.load_records(run_dir))
    records = results.load_records(run_dir)
    ids = [r["trial_id"] for r in records if r.get("trial_id")]
    meta = _read_meta(run_dir) or {}
    report = wandb.init(project=project, entity=entity, group=group, job_type="report", name=f"{group}-report",
                        id=_report_id(group), resume="allow", dir=str(run_dir), mode=mode, reinit="create_new",
                        config={"run_dir": str(run_dir), "trials": len(ids)})
    table = {"trials": wandb.Table(dataframe=df.astype({c: "float64" for c in df.columns if str(df[c].dtype) == "boolean"}))}
    if (run_dir / "val_ppl.png").exists():
        table["val_ppl"] = wandb.Image(str(run_dir / "val_ppl.png"))
    report.log(table)
    report.finish()
    if mode == "online" and ids and not meta.get("sweep_id"):
        sweep_id = wandb.sweep(sweep_config(records, group), project=project, entity=entity, prior_runs=ids)
        (run_dir / "wandb").mkdir(exist_ok=True)
        (run_dir / "wandb" / META).write_text(json.dumps({**meta, "sweep_id": sweep_id}, indent=1))
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


# ------------------------------------------------------------------------------------------------
# reading .wandb files back (tests, debugging): the LevelDB-style log W&B writes


def read_records(path: str | os.PathLike) -> Iterator[Any]:
    """The protobuf `Record`s of a `.wandb` file (7-byte file header, 32 KiB blocks, chunked records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk  # full/first start a record, middle/last extend it
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def read_run(path: str | os.PathLike) -> dict:
    """id, group, job_type, tags, config and history ([{key: value, "_step": n}]) of one `.wandb` file."""
    out: dict[str, Any] = {"config": {}, "history": []}
    for rec in read_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(id=r.run_id, project=r.project, group=r.run_group, job_type=r.job_type,
                       name=r.display_name, tags=list(r.tags))
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            row = {"/".join(i.nested_key) if i.nested_key else i.key: _item_value(i) for i in rec.history.item}
            row["_step"] = rec.history.step.num if rec.history.HasField("step") else row.get("_step")
            out["history"].append(row)
    return out


def _item_value(item) -> Any:
    which = item.WhichOneof("value") if "value" in {o.name for o in item.DESCRIPTOR.oneofs} else None
    if which and which != "value_json":
        v = getattr(item, which)
        return None if which == "none" else (json.loads(v) if which == "json" else v)
    return json.loads(item.value_json) if item.value_json else None
