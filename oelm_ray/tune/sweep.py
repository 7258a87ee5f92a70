"""A sweep: experiments x seeds (x a search space), run or resumed with Ray Tune.

    build every trial's config once, validated (TrialSpec) -> check the run folder -> connect to Ray
    -> check resources -> check each corpus, start preparing those not prepared (a Ray task each)
    -> Tuner(...).fit() or Tuner.restore(...).fit(), each trial starting once its corpus is ready -> report

Everything that can fail on bad input fails before Ray starts or any data is tokenized (a corpus that
fails while it is being prepared ends its own trials in error, not the sweep: tune/preparing.py). Tune's
param space carries each trial's whole config as plain data (`trial.TrialSpec.to_dict()`; a
search's domains sit in it at their fields), so the trial, the Recorder, the W&B logger and the
report all read one copy, and two invocations whose trials have equal configs are the same sweep.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune

from .. import results
from ..core.config import Config, ConfigError, field_sections
from ..core.experiments import Experiment, per_arm
from ..core.io import write_json
from .preparing import Corpora, WaitForData
from .recorder import Recorder
from .resources import CONNECT_TIMEOUT_S, check_shared_storage, connect, is_uri, resources
from .trial import TrialSpec, trainable

METRIC, MODE = "val/loss", "min"
FORMAT = 2
"""sweep.json's format: 2 = one config per trial (1, before it, kept the raw flat overrides)."""


@dataclass
class Sweep:
    """A declared sweep: experiments x seeds (x a search space), how to run it, where to keep it."""

    name: str
    experiments: list[Experiment]
    seeds: list[int]
    storage: str = "runs"
    common: dict[str, Any] = field(default_factory=dict)
    """Flat config overrides for every trial (smoke sizes, --set, data_dir, ...): the --set layer of `make_config`."""
    sets: dict[str, Any] = field(default_factory=dict)
    """The command line's own --set values (also in common): one that replaces a value the experiments set
    per arm is named in a warning when the sweep starts."""
    search: dict[str, Any] = field(default_factory=dict)
    """Flat config overrides that may be Tune domains (tune.loguniform, ...): a search space."""
    num_samples: int = 1
    search_alg: Any = None
    scheduler: Any = None
    gpus_per_trial: float | None = None
    """None: 1 where the cluster has GPUs, else 0 (unless require_gpus)."""
    require_gpus: bool = False
    """With gpus_per_trial None, a cluster without GPUs is an error, not CPU trials (the paper preset)."""
    cpus_per_trial: float | None = None
    """None: 1 without GPUs (one single-thread trial per core), 2 with."""
    workers_per_trial: int = 1
    """>1: each trial trains data-parallel on this many Ray Train workers (also implied by gpus_per_trial > 1)."""
    max_concurrent: int | None = None
    max_failures: int = 2
    address: str | None = None
    """Ray cluster address; None uses RAY_ADDRESS or starts a local Ray on 127.0.0.1."""
    connect_timeout: float = CONNECT_TIMEOUT_S
    """Seconds joining a running cluster may take before it is one error line (resources.join)."""
    callbacks: list[Any] = field(default_factory=list)
    extra_config: dict[str, Any] = field(default_factory=dict)
    """Additional entries in every trial's Tune config, beside "trial" (a wrapped trainable's own settings)."""
    trainable: Callable[[dict], None] = trainable
    """The function each trial runs (Tune function API); tests wrap it to inject faults."""

    @property
    def run_dir(self) -> Path:
        return Path(self.storage).resolve() / self.name

    def trials(self) -> list[TrialSpec]:
        """Every trial's config, built and validated here (search domains checked at a sample value)."""
        if not self.experiments:
            raise ConfigError("the sweep has no experiments")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ConfigError(f"seeds={self.seeds!r} must be a non-empty list of whole numbers")
        sample = {k: _sample_value(v) for k, v in self.search.items()}
        out = []
        for exp in self.experiments:
            for seed in self.seeds:
                try:
                    cfg = exp.config(seed, self.common, sample)
                except ConfigError as e:
                    raise ConfigError(f"{exp.trial_name(seed)}: {e}") from None
                out.append(TrialSpec(exp, seed, cfg, tuple(self.search)))
        return out

    def param_space(self, trials: list[TrialSpec]) -> dict[str, Any]:
        """Tune's param space: the trials as plain data, a search's domains at their config fields."""
        where = field_sections()
        specs = []
        for t in trials:
            d = t.to_dict()
            for k, v in self.search.items():
                d["config"][where[k]][k] = v
            specs.append(d)
        return {"trial": tune.grid_search(specs) if len(specs) > 1 else specs[0], **self.extra_config}

    def identity(self, trials: list[TrialSpec] | None = None) -> dict[str, Any]:
        """What makes two invocations the same sweep (compared when a run folder exists): equal configs."""
        space = self.param_space(trials if trials is not None else self.trials())["trial"]
        specs = space["grid_search"] if isinstance(space, dict) and "grid_search" in space else [space]
        return json.loads(
            json.dumps(
                {
                    "format": FORMAT,
                    "name": self.name,
                    "trials": [
                        {
                            **s,
                            "config": {
                                sec: {k: _describe(v) for k, v in part.items()} for sec, part in s["config"].items()
                            },
                        }
                        for s in specs
                    ],
                    "num_samples": self.num_samples,
                    "search_alg": type(self.search_alg).__name__ if self.search_alg else None,
                    "scheduler": type(self.scheduler).__name__ if self.scheduler else None,
                },
                default=str,
            )
        )


def point(values: dict[str, Any]) -> dict[str, Any]:
    """Flat field values as a point of the param space (a searcher's points_to_evaluate)."""
    where = field_sections()
    config: dict[str, dict[str, Any]] = {}
    for k, v in values.items():
        config.setdefault(where[k], {})[k] = v
    return {"trial": {"config": config}}


def _describe(v: Any) -> Any:
    """A Tune search domain as plain, stable data (its repr holds a memory address)."""
    if isinstance(v, dict) and "grid_search" in v:
        return {"grid_search": list(v["grid_search"])}
    if not isinstance(v, tune.search.sample.Domain):
        return v
    sampler = getattr(v, "sampler", None)
    return {
        "domain": type(v).__name__,
        **{k: getattr(v, k) for k in ("categories", "lower", "upper") if hasattr(v, k)},
        "sampler": type(sampler).__name__ if sampler is not None else None,
        **{k: getattr(sampler, k) for k in ("base", "q") if hasattr(sampler, k)},
    }


def _sample_value(v: Any) -> Any:
    if isinstance(v, dict) and "grid_search" in v:
        return v["grid_search"][0]
    if hasattr(v, "sample"):
        return v.sample()
    return v


def check_run_dir(sweep: Sweep, trials: list[TrialSpec] | None = None) -> bool:
    """True when the run exists and is the same sweep (resume); raise when it is another sweep."""
    run = sweep.run_dir
    try:
        run.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run.parent, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"storage {run.parent} is not writable ({e.strerror}): pass --storage with a writable folder"
        ) from None
    spec = run / "sweep.json"
    if not spec.exists():
        if run.exists() and any(run.iterdir()):
            raise ConfigError(f"{run} exists and is not an oelm-ray sweep: choose another --name (nothing was touched)")
        return False
    old = json.loads(spec.read_text())
    if old.get("format") != FORMAT:
        raise ConfigError(
            f"run {run} was started by an older oelm-ray (sweep.json format {old.get('format', 1)}, this one writes "
            f"{FORMAT}): finish it with the version that started it (git checkout b476dbd), or choose another --name "
            "(nothing was touched)"
        )
    new = sweep.identity(trials)
    old = _with_new_fields(old)
    if old != new:
        diffs = [k for k in sorted(set(old) | set(new)) if k != "trials" and old.get(k) != new.get(k)]
        if old.get("trials") != new.get("trials"):
            diffs += _trial_diffs(old.get("trials") or [], new.get("trials") or []) or ["trials"]
        raise ConfigError(
            f"run {run} exists with a different sweep config (differs in: {', '.join(diffs)}): "
            "run the same command to resume it, or choose another --name (nothing was touched)"
        )
    return True


def _with_new_fields(old: dict) -> dict:
    """A stored identity with every config field added since it was written, at its default.

    A sweep started before a field existed ran with what its default now says, so it is the same
    sweep as one that leaves the field at its default; one that sets the field is another sweep.
    """
    defaults = Config().to_dict()
    for t in old.get("trials") or []:
        for sec, part in (t.get("config") or {}).items():
            for k, v in defaults.get(sec, {}).items():
                part.setdefault(k, v)
    return old


def _trial_diffs(old: list[dict], new: list[dict]) -> list[str]:
    """Which trials and config fields differ, e.g. 'CPU-01-baseline-s0: lr'."""
    by_name = {t["name"]: t for t in old}
    out = []
    for t in new:
        o = by_name.get(t["name"])
        if o is None:
            out.append(f"{t['name']}: new trial")
            continue
        fields = [
            k for sec in t["config"] for k in t["config"][sec] if o["config"].get(sec, {}).get(k) != t["config"][sec][k]
        ]
        if fields:
            out.append(f"{t['name']}: {', '.join(fields)}")
    out += [f"{n}: dropped" for n in by_name if n not in {t["name"] for t in new}]
    return out[:4] + ([f"{len(out) - 4} more trials"] if len(out) > 4 else [])


def prepare_datasets(trials: list[TrialSpec]) -> Corpora:
    """Each distinct corpus once: verified now where it is prepared, else prepared by a Ray task started now,
    while the trials whose corpus is ready train (the Tuner's WaitForData holds the others back)."""
    return Corpora([t.config.data for t in trials])


def _name(trial) -> str:
    t = trial.config["trial"]
    return t["name"] if not t.get("searched") else f"{t['name']}-{trial.trial_id.split('_')[-1]}"


def run(sweep: Sweep, report: bool = True) -> Path:
    """Run (or resume) a sweep to its end and write its report; returns the run folder."""
    trials = sweep.trials()
    for line in per_arm(sweep.experiments, sweep.sets):  # the protocol's per-arm values, replaced: said first
        print(f"{sweep.name}: warning: {line}", file=sys.stderr, flush=True)
    # checkpoints every eval with num_to_keep=2 trip this warning on tiny runs; it is not actionable here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    resuming = check_run_dir(sweep, trials)
    connect(sweep.address, sweep.connect_timeout)
    res = resources(sweep)
    if "ddp" in res:  # the trial's config tells the trainable to train data-parallel
        sweep.extra_config = {**sweep.extra_config, "ddp": res.pop("ddp")}
    run_dir = sweep.run_dir
    if len(ray.nodes()) > 1 and not is_uri(sweep.storage):
        check_shared_storage(run_dir.parent)
    corpora = prepare_datasets(trials)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        write_json(run_dir / "sweep.json", sweep.identity(trials))
    fn = tune.with_resources(sweep.trainable, res)
    space = sweep.param_space(trials)
    if resuming and tune.Tuner.can_restore(str(run_dir)):
        # Tune restores the run's own RunConfig, callbacks included (they keep no state of their own:
        # the Recorder reads the records on disk, the W&B logger decides its mode in setup())
        print(
            f"resuming {run_dir}: finished trials are kept, unfinished ones continue from their checkpoints", flush=True
        )
        tuner = tune.Tuner.restore(str(run_dir), fn, resume_unfinished=True, resume_errored=True, param_space=space)
    else:
        tuner = tune.Tuner(
            fn,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=METRIC if sweep.scheduler is None else None,
                mode=MODE if sweep.scheduler is None else None,
                search_alg=sweep.search_alg,
                scheduler=WaitForData(sweep.scheduler),  # restored with the run: it keeps no state of its own
                num_samples=sweep.num_samples,
                max_concurrent_trials=sweep.max_concurrent,
                reuse_actors=True,  # a trial's actor keeps torch imported for the next: seconds per trial
                trial_name_creator=_name,
                trial_dirname_creator=_name,
            ),
            run_config=tune.RunConfig(
                name=sweep.name,
                storage_path=str(run_dir.parent),
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                # on filesystem storage checkpoints are pointers (bytes): keep them all, so that any one Tune's
                # experiment state names still exists; on object storage they carry the state: keep two
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2 if is_uri(sweep.storage) else None),
                callbacks=[Recorder(run_dir), *sweep.callbacks],
                verbose=0,
            ),
        )
    n = len(trials) * sweep.num_samples
    print(f"sweep {sweep.name}: {n} trial(s), each {res['cpu']:g} CPU / {res['gpu']:g} GPU -> {run_dir}", flush=True)
    try:
        grid = tuner.fit()
    finally:
        corpora.close()
    if grid.errors:
        print(f"{len(grid.errors)} trial(s) ended in error; see `oelm-ray status {run_dir}`", flush=True)
    if report:
        paths = results.write_report(run_dir)
        print((run_dir / "summary.md").read_text())
        print("results:", *map(str, paths), sep="\n  ")
    return run_dir
