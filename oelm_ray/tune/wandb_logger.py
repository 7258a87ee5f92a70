"""The W&B adapter: every sweep logs to Weights & Biases from the driver, online or offline.

One W&B run per trial (id = Tune trial id, name = trial name, group = the sweep's run name,
job_type = method, tags = dataset, method, seed=N), its config the trial's flat resolved config.
A Tune `LoggerCallback` holds each trial's run in the driver process (`wandb.init(...,
reinit="create_new")`, several live runs at once), so workers need neither network nor key:

- each row is logged at the training `step` (`run.log(..., step=step)`), so W&B's step axis is
  the training step and the rows of every attempt of a trial share one axis;
- a retried trial keeps its open run; a restored one (a new driver) continues it (online: resume="allow");
  either way only steps above the last one logged (`<run>/wandb/last-step/<trial id>`) are
  logged, so a trial that re-reports the steps after its checkpoint adds no duplicate rows.
  Offline, each driver's attempt is one more `offline-run-*-<id>` folder; `wandb sync` uploads
  the folders of one run in start order, so the history comes out in one piece.

Mode: WANDB_MODE=disabled/offline from the user wins; otherwise no API key (env or the netrc
entry `wandb login` writes, checked without any network call: has_key, which `oelm-ray doctor`
uses too) or an unreachable host means offline, said once. W&B files live under `<run>/wandb/`,
with the sweep's settings in META (read_meta); after the sweep, oelm_ray.tune.wandb_sync uploads
offline runs (`oelm-ray sync RUN`) and adds the W&B sweep view and the results table.
"""

from __future__ import annotations

import json
import os
import urllib.error
from numbers import Number
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import wandb
from ray.tune.logger import LoggerCallback

from ..core.config import ConfigError
from ..core.io import url_reachable, write_json, write_text
from .trial import trial_of
from .wandb_key import DEFAULT_HOST, has_key

META = "oelm-ray.json"  # under <run>/wandb/: project, entity, group, mode (read by wandb_sync)
STEPS_DIR = "last-step"  # under <run>/wandb/: the last training step logged per trial id

# ------------------------------------------------------------------------------------------------
# mode: online, offline or disabled, decided on the driver when the sweep starts


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
            raise ConfigError(
                "WANDB_MODE=online but no W&B API key: run `wandb login` or set WANDB_API_KEY (or pass --no-wandb)"
            )
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
    flat.update(
        experiment_id=t.experiment.id,
        preset=t.experiment.preset,
        trial_name=trial_name,
        trial_id=trial_id,
        search=sorted(t.searched),
        role=t.experiment.role,
        qk_std=cfg.model.qk_std,
    )
    return dict(
        id=trial_id,
        name=trial_name,
        job_type=cfg.model.method,
        tags=[cfg.data.dataset, cfg.model.method, f"seed={t.seed}", t.experiment.role],
        config=flat,
    )


def _run_dir_of(trial) -> Path:
    """The sweep's run folder when the storage is a local (or mounted) folder, else the driver's
    staging copy of it, which Tune syncs to the storage."""
    remote = trial.remote_experiment_path  # on object storage: "bucket/prefix/run", not a local path
    return Path(remote) if os.path.isabs(remote) and os.path.isdir(remote) else Path(trial.local_experiment_path)


class Callback(LoggerCallback):
    """Tune callback holding one W&B run per trial in the driver; build it with `callback(...)`.

    Pickles without its runs (Tune keeps it in the run's tuner.pkl and restores it on resume);
    `setup()` decides the mode again when it was restored, so it behaves like a fresh one.
    """

    # logged as config, not history (Tune's own experiment_id would overwrite ours, GPT-02: left out)
    TO_CONFIG = ("trial_id", "experiment_tag", "node_ip", "hostname", "pid", "date", "node", "gpu")
    EXCLUDE = ("done", "should_checkpoint", "experiment_id", "timestamp", "config")

    def __init__(
        self,
        project: str,
        group: str,
        mode: str | None = None,
        why: str = "",
        run_dir: str | os.PathLike | None = None,
        **init_kwargs: Any,
    ):
        self.project, self.group = project, group
        self.mode, self.why = mode, why
        self.run_dir = Path(run_dir) if run_dir else None
        self.init_kwargs = init_kwargs  # more wandb.init arguments: entity, notes, ...
        self._open: dict[str, _Open] = {}  # trial id -> its live run

    def __getstate__(self) -> dict:
        # no live runs in tuner.pkl; the mode is decided again when the sweep (re)starts
        return {**self.__dict__, "mode": None, "why": "", "_open": {}}

    def setup(self, *args, **kwargs) -> None:
        if self.mode is None:
            self.mode, self.why = resolve_mode()
        _say_mode(self.mode, self.why, self.project, self.group)

    def log_trial_start(self, trial) -> None:
        if self.mode in (None, "disabled") or trial.trial_id in self._open:
            return  # a retried trial keeps its open run
        run_dir = self.run_dir or _run_dir_of(trial)
        kwargs = dict(
            **trial_init(trial.config, trial.trial_id, str(trial)),
            project=self.project,
            group=self.group,
            dir=str(run_dir),
            reinit="create_new",
            allow_val_change=True,
            # online, a restored trial continues its run on the server; offline has nothing to resume
            # (each attempt is one more folder) and W&B would warn on the console that it ignores it
            resume="allow" if self.mode == "online" else None,
            # the driver's console is the sweep's: no trial output there, and no W&B banner or summary per run
            # (this logger says the mode once; `oelm-ray sync` and the report say the rest)
            settings=wandb.Settings(console="off", silent=True),
        )
        kwargs.update(self.init_kwargs)
        run = self._init(kwargs, str(trial))
        meta = {
            "project": self.project,
            "entity": self.init_kwargs.get("entity") or os.environ.get("WANDB_ENTITY"),
            "group": self.group,
            "mode": self.mode,
        }  # the mode after a fallback: offline, `sync` uploads
        if read_meta(run_dir) != meta:
            write_json(run_dir / "wandb" / META, meta)
        live = self._open[trial.trial_id] = _Open(run, run_dir / "wandb" / STEPS_DIR / trial.trial_id)
        if run.resumed and isinstance(run.summary.get("step"), (int, float)):  # online: the server knows
            live.last = max(live.last, run.summary["step"])

    def _init(self, kwargs: dict, name: str):
        try:
            return wandb.init(**kwargs, mode=self.mode)
        except Exception as e:  # the network went away between the check and now
            if self.mode != "online":
                raise
            print(
                f"W&B: {name}: online init failed ({e}); logging offline from now on, `oelm-ray sync` uploads it",
                flush=True,
            )
            self.mode = "offline"  # one wait for a timeout per sweep, not one per trial
            return wandb.init(**{**kwargs, "resume": None}, mode="offline")

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if trial.trial_id not in self._open:
            self.log_trial_start(trial)
        live = self._open.get(trial.trial_id)
        step = result.get("step")
        if live is None or not isinstance(step, (int, float)) or step <= live.last:
            return  # a resumed trial re-reports the steps after its checkpoint: logged already
        flat = _flatten({k: v for k, v in result.items() if k not in self.EXCLUDE})
        config = {k: v for k, v in flat.items() if k in self.TO_CONFIG}
        log = {k: v for k, v in flat.items() if k not in config and isinstance(v, Number)}
        try:
            if config != live.config:
                live.run.config.update(config, allow_val_change=True)
                live.config = config
            live.run.log(log, step=int(step))
            if "qk_check" in result:  # the method's invariant at this checkpoint: a summary field, not a curve
                live.run.summary["qk_check"] = result["qk_check"]
        except urllib.error.HTTPError as e:
            print(f"W&B: failed to log step {step} of {trial}: {e}", flush=True)
            return
        live.last = step
        write_text(live.step_file, str(int(step)))

    def log_trial_end(self, trial, failed: bool = False) -> None:
        live = self._open.pop(trial.trial_id, None)
        if live is not None:
            live.run.finish(exit_code=1 if failed else 0)

    def on_experiment_end(self, trials, **info) -> None:
        while self._open:
            self._open.popitem()[1].run.finish()


class _Open:
    """A trial's live run, the last training step it logged, the config entries its results set."""

    def __init__(self, run, step_file: Path):
        self.run, self.step_file, self.config = run, step_file, {}
        try:
            self.last: float = float(step_file.read_text())
        except (OSError, ValueError):
            self.last = -1


def _say_mode(mode: str, why: str, project: str, group: str) -> None:
    if mode == "disabled":
        print(f"W&B: off ({why})", flush=True)
    elif mode == "offline":
        print(
            f"W&B: offline ({why}): runs are kept under <run>/wandb/; upload them later with `oelm-ray sync <run>`",
            flush=True,
        )
    else:
        print(f"W&B: logging to project {project!r}, group {group!r}", flush=True)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def callback(project: str, group: str, run_dir: str | os.PathLike | None = None, **kwargs: Any) -> Callback | None:
    """The sweep's W&B callback, or None when W&B is disabled (said here); its `setup()` says the mode.

    run_dir: where `wandb/` goes (default: the sweep's run folder, from the trials' storage).
    kwargs: passed on to wandb.init (entity, notes, ...).
    """
    mode, why = resolve_mode()  # a bad setting (WANDB_MODE=online without a key) fails before Ray starts
    if mode == "disabled":
        _say_mode(mode, why, project, group)
        return None
    return Callback(project=project, group=group, mode=mode, why=why, run_dir=run_dir, **kwargs)


def read_meta(run_dir: Path) -> dict | None:
    """The sweep's W&B settings the callback wrote (<run>/wandb/oelm-ray.json), or None before any trial logged."""
    try:
        return json.loads((Path(run_dir) / "wandb" / META).read_text())
    except (OSError, json.JSONDecodeError):
        return None
