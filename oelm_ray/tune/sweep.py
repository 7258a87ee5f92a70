"""The Ray Tune adapter: one trial = one Ray actor running `trainer.train` on one GPU (or CPU slot).

The only library module besides the CLI and the W&B adapter that imports Ray. It turns the
trainer's report callback into `tune.report(metrics, checkpoint=...)`, restores a retried trial
from `tune.get_checkpoint()`, and drives a whole sweep:

    validate every trial config -> check the run folder -> connect to Ray -> check resources
    -> prepare each dataset once -> Tuner(...).fit() or Tuner.restore(...).fit() -> report

Everything that can fail on bad input fails before Ray starts or any data is tokenized.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune

from .. import results
from ..core.config import ConfigError
from ..core.io import tcp_error, write_json
from ..core.experiments import Experiment, trial_name
from ..core.trainer import read_metrics

STATE_DIR = "state"
METRIC, MODE = "val/loss", "min"


# ------------------------------------------------------------------------------------------------
# the trial


def trainable(config: dict) -> None:
    """Ray Tune function trainable around `trainer.train` (runs inside the trial's actor)."""
    from ..core.data import load_prepared, prepare
    from ..core.trainer import train

    exp = Experiment.from_dict(config["exp"])
    cfg = exp.config(config["seed"], **config.get("common", {}), **config.get("search", {}))
    if cfg.train.num_threads == 0:  # a CPU slot is a core: threads beyond it only fight each other
        cfg.train.num_threads = max(1, int(tune.get_context().get_trial_resources().required_resources.get("CPU", 1)))
    if not config.get("ddp"):  # a data-parallel trial's Ray Train workers hold its GPUs, not the trial itself
        cfg.train.device = trial_device(cfg.train.device, ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    out, in_storage = _state_dir()
    out.mkdir(parents=True, exist_ok=True)
    resume, known_step = _restore_into(out, in_storage)
    prepare(cfg.data, progress=False)  # idempotent: verifies the copy the driver prepared
    data = load_prepared(cfg.data)
    node, gpu = ray.util.get_node_ip_address(), os.environ.get("CUDA_VISIBLE_DEVICES", "-") or "-"
    node_id = ray.get_runtime_context().get_node_id()[:12]  # tells apart nodes that share an address
    fault = config.get("_fault")  # test hook: inject a crash once, at a given step

    def report(metrics: dict) -> None:
        if fault and metrics["step"] >= fault["step"]:
            _inject_fault(fault)
        # a data-parallel trial's rank 0 reports the GPUs its workers hold
        with _checkpoint_dir(out, in_storage, metrics["step"]) as ckpt_dir:
            tune.report({"node": node, "node_id": node_id, "gpu": gpu, **metrics},
                        checkpoint=tune.Checkpoint.from_directory(ckpt_dir))

    if resume:
        # evaluations the state holds but Tune never heard of (the trial died between writing its
        # state and reporting, or Tune's experiment state is older): report them first, in order
        for metrics in read_metrics(out / "metrics.jsonl"):
            if metrics["step"] > known_step:
                report(metrics)

    with open(out / "train.log", "a") as logf:  # the research's training.log; `oelm-ray status` is the live view
        def log(line: str) -> None:
            logf.write(f"{time.strftime('%H:%M:%S')} {line}\n")
            logf.flush()

        if config.get("ddp"):  # a multi-GPU (or multi-worker) trial: Ray Train workers, DDP
            from .ddp import train_ddp

            train_ddp(cfg.to_dict(), out, report=report, resume=resume, log=log, **config["ddp"])
        else:
            train(cfg, out, report=report, resume=resume, data=data, log=log)


def trial_device(want: str, gpu_ids: list, visible: str | None) -> str:
    """The device a trial trains on, from what Ray assigned it (`ray.get_gpu_ids()`), never from
    what the node has: a 0-GPU trial on a GPU node trains on CPU, a 1-GPU trial on its own GPU.

    Ray sets CUDA_VISIBLE_DEVICES (`visible`) to the trial's GPU ids, so "cuda" is the first of them.
    """
    ids = [str(i) for i in gpu_ids]
    if not ids:
        if want == "cuda":
            raise ConfigError("device=cuda but Ray assigned this trial no GPU: pass --gpus-per-trial 1 (or more)")
        return "cpu"
    if want == "cpu":
        return "cpu"  # asked for explicitly
    if visible is None or visible.split(",")[: len(ids)] != ids:
        raise ConfigError(
            f"Ray assigned GPU(s) {','.join(ids)} but CUDA_VISIBLE_DEVICES={visible!r}: the trial could train on "
            "another trial's GPU (is RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES set? unset it)"
        )
    return "cuda"


def _state_dir() -> tuple[Path, bool]:
    """Where the trial's trainer keeps latest.pt, best.pt, metrics.jsonl, summary.json and train.log.

    On a filesystem storage (a local folder, NFS) that is `<run>/<trial>/state/`: it outlives the
    driver and every retry, and always holds the newest state, written atomically. Tune's own
    checkpoints then only point at it (a few bytes each, all kept): Ray 2.60 may restore a killed
    driver's sweep from experiment state older than its newest checkpoints, and with `num_to_keep`
    the checkpoint it names may already be gone. On object storage (s3://...) the state lives in
    the trial's working folder and travels inside Tune's checkpoints instead.
    """
    storage = tune.get_context().get_storage()
    if storage.storage_filesystem.type_name == "local":
        return Path(storage.trial_fs_path) / STATE_DIR, True
    return Path(tune.get_context().get_trial_dir()) / STATE_DIR, False


@contextlib.contextmanager
def _checkpoint_dir(out: Path, in_storage: bool, step: int):
    """The folder handed to tune.report: the state itself, or a pointer to it in shared storage."""
    if not in_storage:
        yield str(out)
        return
    with tempfile.TemporaryDirectory(prefix="oelm-ckpt-") as d:
        (Path(d) / "state.json").write_text(json.dumps({"state_dir": str(out), "step": step}))
        yield d


def _restore_into(out: Path, in_storage: bool) -> tuple[bool, int]:
    """Bring the trial's newest state into `out`: (whether to resume, the last step Tune knows of)."""
    # the temp file of a checkpoint write the last attempt was killed in: it would ride along in every later checkpoint
    for p in out.glob(".*.tmp"):
        p.unlink(missing_ok=True)
    ckpt = tune.get_checkpoint()
    known_step = 0
    if ckpt is not None:
        with ckpt.as_directory() as d:
            pointer = Path(d) / "state.json"
            if pointer.exists():
                known_step = json.loads(pointer.read_text())["step"]
            elif not in_storage and Path(d).resolve() != out.resolve():  # it carries the state: copy it in
                for p in Path(d).iterdir():
                    if p.is_file() and p.name != "summary.json" and not (p.name.startswith(".") and p.name.endswith(".tmp")):
                        shutil.copy2(p, out / p.name)
                known_step = read_metrics(out / "metrics.jsonl")[-1]["step"] if (out / "metrics.jsonl").exists() else 0
    if (out / "latest.pt").exists() and (in_storage or ckpt is not None):
        # in storage: the newest state, whichever (possibly older) checkpoint Tune's experiment state names
        return True, known_step
    # a fresh trial: a leftover folder from an attempt that never checkpointed is stale
    for p in out.iterdir():
        p.unlink() if p.is_file() else shutil.rmtree(p)
    return False, 0


def _inject_fault(fault: dict) -> None:
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    if fault.get("kind") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault at step >= {fault['step']}")


# ------------------------------------------------------------------------------------------------
# the driver side: one record per trial for `oelm-ray status` and `oelm-ray report`


class Recorder(tune.Callback):
    """Keeps `<run>/trials/<trial>.json` current from the driver, at every report and state change."""

    def __init__(self, run: Path, quiet: bool = False):
        self.run, self.quiet = Path(run), quiet
        self.records: dict[str, dict] = {}

    def _rec(self, trial) -> dict:
        name = str(trial)
        if name not in self.records:
            rec = results.read_record(results.record_path(self.run, name))
            if rec is None:
                c = trial.config
                exp = Experiment.from_dict(c["exp"])
                cfg = exp.config(c["seed"], **c.get("common", {}), **c.get("search", {}))
                rec = {
                    "name": name, "trial_id": trial.trial_id, "experiment_id": exp.id, "isolates": exp.isolates,
                    "dataset": cfg.data.dataset, "method": cfg.model.method, "seed": c["seed"],
                    "config": cfg.to_dict(), "search": c.get("search", {}), "status": "pending", "history": [],
                }
            self.records[name] = rec
        return self.records[name]

    def _save(self, rec: dict) -> None:
        results.write_record(self.run, rec)

    def on_trial_start(self, iteration, trials, trial, **info):
        rec = self._rec(trial)
        rec["status"] = "running"
        self._save(rec)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        rec = self._rec(trial)
        row = {k: v for k, v in result.items() if k in _KEEP or k.startswith(("val/", "train/"))}
        # a trial resumed from a checkpoint re-reports the steps after it: keep one row per step, the newest
        by_step = {h["step"]: h for h in rec["history"]}
        new = row["step"] not in by_step  # a re-report is not news
        by_step[row["step"]] = row
        rec["history"] = [by_step[k] for k in sorted(by_step)]
        rec["status"] = "diverged" if result.get("diverged") else "running"
        rec["last_report"] = time.time()
        rec.update({k: result[k] for k in ("node", "gpu", "trainable_params", "total_params") if k in result})
        self._save(rec)
        if new and not self.quiet and _finite(result.get("val/ppl")):
            print(f"  {trial}: step {result['step']:>6}  val ppl {result['val/ppl']:8.3f}  {result.get('tokens_per_s', 0):,.0f} tok/s", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        rec = self._rec(trial)
        if rec["status"] != "diverged":
            max_steps = rec["config"]["train"]["max_steps"]
            done = rec["history"] and rec["history"][-1]["step"] >= max_steps
            rec["status"] = "completed" if done else "stopped"  # stopped: early-stopped by a scheduler
        self._save(rec)

    def on_trial_error(self, iteration, trials, trial, **info):
        rec = self._rec(trial)
        rec["status"] = "error"
        rec["error"] = str(getattr(trial, "error_file", "") or "")
        self._save(rec)


_KEEP = {"step", "tokens", "lr", "step_time_s", "tokens_per_s", "eval_time_s", "wall_time_s", "node", "node_id", "gpu",
         "trainable_params", "total_params", "diverged"}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ------------------------------------------------------------------------------------------------
# the sweep


@dataclass
class Sweep:
    """A declared sweep: experiments x seeds (x a search space), how to run it, where to keep it."""

    name: str
    experiments: list[Experiment]
    seeds: list[int]
    storage: str = "runs"
    common: dict[str, Any] = field(default_factory=dict)
    """Flat config overrides for every trial (max_steps, smoke sizes, data_dir, ...)."""
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
    callbacks: list[Any] = field(default_factory=list)
    extra_config: dict[str, Any] = field(default_factory=dict)
    """Additional entries in every trial's config (test hooks such as _fault)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.storage).resolve() / self.name

    def trial_configs(self) -> list[tuple[Experiment, int]]:
        return [(e, s) for e in self.experiments for s in self.seeds]

    def identity(self) -> dict[str, Any]:
        """What makes two invocations the same sweep (compared when a run folder exists)."""
        return {
            "name": self.name,
            "experiments": [e.to_dict() for e in self.experiments],
            "seeds": list(self.seeds),
            "common": self.common,
            "search": {k: _describe(v) for k, v in self.search.items()},
            "num_samples": self.num_samples,
            "search_alg": type(self.search_alg).__name__ if self.search_alg else None,
            "scheduler": type(self.scheduler).__name__ if self.scheduler else None,
        }


def _describe(v: Any) -> Any:
    """A Tune search domain as plain, stable data (its repr holds a memory address)."""
    if not isinstance(v, tune.search.sample.Domain):
        return v
    sampler = getattr(v, "sampler", None)
    return {
        "domain": type(v).__name__,
        **{k: getattr(v, k) for k in ("categories", "lower", "upper") if hasattr(v, k)},
        "sampler": type(sampler).__name__ if sampler is not None else None,
        **{k: getattr(sampler, k) for k in ("base", "q") if hasattr(sampler, k)},
    }


def validate(sweep: Sweep) -> None:
    """Build every trial's config (search domains at a sample value); raise ConfigError on the first bad one."""
    if not sweep.experiments:
        raise ConfigError("the sweep has no experiments")
    if not sweep.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in sweep.seeds):
        raise ConfigError(f"seeds={sweep.seeds!r} must be a non-empty list of whole numbers")
    sample = {k: _sample_value(v) for k, v in sweep.search.items()}
    for exp, seed in sweep.trial_configs():
        try:
            exp.config(seed, **sweep.common, **sample)
        except ConfigError as e:
            raise ConfigError(f"{exp.trial_name(seed)}: {e}") from None


def _sample_value(v: Any) -> Any:
    if isinstance(v, dict) and "grid_search" in v:
        return v["grid_search"][0]
    if hasattr(v, "sample"):
        return v.sample()
    return v


def check_run_dir(sweep: Sweep) -> bool:
    """True when the run exists and is the same sweep (resume); raise when it is another sweep."""
    run = sweep.run_dir
    try:
        run.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run.parent, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"storage {run.parent} is not writable ({e.strerror}): pass --storage with a writable folder") from None
    spec = run / "sweep.json"
    if not spec.exists():
        if run.exists() and any(run.iterdir()):
            raise ConfigError(f"{run} exists and is not an oelm-ray sweep: choose another --name (nothing was touched)")
        return False
    old = json.loads(spec.read_text())
    new = json.loads(json.dumps(sweep.identity(), default=str))
    if old != new:
        diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        raise ConfigError(
            f"run {run} exists with a different sweep config (differs in: {', '.join(diffs)}): "
            "run the same command to resume it, or choose another --name (nothing was touched)"
        )
    return True


def connect(address: str | None) -> None:
    """Join a running cluster (address or RAY_ADDRESS) or start a local Ray that listens on 127.0.0.1 only."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":  # "auto" joins the cluster that `ray start` left running here
        host, _, port = address.removeprefix("ray://").rpartition(":")
        if not address.startswith("ray://") and host and port.isdigit():
            why = tcp_error(host, int(port), timeout=5)
            if why:
                raise ConfigError(
                    f"cannot reach the Ray cluster at {address} ({why}): is the head up (`ray up cluster.yaml`, "
                    "`ray status`)? unset RAY_ADDRESS to run locally instead"
                ) from None
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError) as e:
            raise ConfigError(
                f"could not join the Ray cluster at {address}: {e}. If token auth is on (Ray >= 2.59), set "
                "RAY_AUTH_MODE=token and make the head's token readable (~/.ray/auth_token or RAY_AUTH_TOKEN)"
            ) from None
        return
    # a laptop or CI: keep every Ray process on loopback (see README, "Network"). Ray read this
    # variable when it was imported (above): set it for the processes it starts, and mirror it into
    # the constant this process already holds, or 127.0.0.1 is rewritten to the outward address
    if os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0") == "0":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    # address="local": always a Ray of our own, never one that another process left running here
    ray.init(address="local", include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False)


def resources(sweep: Sweep) -> dict[str, float]:
    """Per-trial resources, checked against the cluster: a GPU request on a GPU-less cluster fails now."""
    have = ray.cluster_resources()
    workers = sweep.workers_per_trial if sweep.workers_per_trial > 1 else int(sweep.gpus_per_trial or 0)
    if workers > 1:
        return _ddp_resources(sweep, workers, have)
    gpus_total, cpus_total = have.get("GPU", 0.0), have.get("CPU", 0.0)
    if sweep.gpus_per_trial is None and sweep.require_gpus and gpus_total < 1:
        raise ConfigError(
            "--preset paper trains Medium-512 for 100K+ steps a trial, on GPUs, but the Ray cluster has none: connect to a GPU "
            "cluster (--address or RAY_ADDRESS), or pass --gpus-per-trial 0 to train on CPUs on purpose"
        )
    gpu = sweep.gpus_per_trial if sweep.gpus_per_trial is not None else (1.0 if gpus_total >= 1 else 0.0)
    cpu = sweep.cpus_per_trial if sweep.cpus_per_trial is not None else (2.0 if gpu else 1.0)
    if gpu > gpus_total:
        raise ConfigError(
            f"each trial asks for {gpu:g} GPU(s) but the Ray cluster has {gpus_total:g}: Ray would leave the trials "
            "PENDING forever. Pass --gpus-per-trial 0 to train on CPUs, or connect to a GPU cluster (--address)"
        )
    if cpu > cpus_total:
        raise ConfigError(f"each trial asks for {cpu:g} CPUs but the cluster has {cpus_total:g}: lower --cpus-per-trial")
    return {"cpu": cpu, "gpu": gpu}


def _ddp_resources(sweep: Sweep, workers: int, have: dict) -> dict[str, Any]:
    """A data-parallel trial: 1 CPU for the trial (Ray Train's controller) + its workers' own bundles."""
    gpu = float(sweep.gpus_per_trial or 0)
    gpw = gpu / workers
    cpw = sweep.cpus_per_trial / workers if sweep.cpus_per_trial else (2.0 if gpu else 1.0)
    per_node = max((n["Resources"].get("GPU" if gpw else "CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
    need = workers * (gpw or cpw) + (0 if gpw else 1)
    if need > per_node:
        raise ConfigError(
            f"each trial trains on {workers} workers x ({cpw:g} CPU, {gpw:g} GPU), all on one node, but the largest "
            f"node has {per_node:g} {'GPU' if gpw else 'CPU'}(s): lower --gpus-per-trial / workers_per_trial"
        )
    if 1 + workers * cpw > have.get("CPU", 0.0):
        raise ConfigError(f"each trial needs {1 + workers * cpw:g} CPUs (1 + {workers} workers) but the cluster has "
                          f"{have.get('CPU', 0.0):g}: lower --cpus-per-trial")
    if sweep.max_concurrent is None:  # trials must not hold the CPUs their own workers wait for
        fit = [have.get("CPU", 0.0) // (1 + workers * cpw)] + ([have.get("GPU", 0.0) // (workers * gpw)] if gpw else [])
        sweep.max_concurrent = max(1, int(min(fit)))
    return {"cpu": 1.0, "gpu": 0.0, "ddp": {"workers": workers, "cpus_per_worker": cpw, "gpus_per_worker": gpw}}


def prepare_datasets(sweep: Sweep) -> None:
    """Tokenize each distinct corpus once, before its trials start (trials then only verify it)."""
    from ..core.data import prepare

    seen = set()
    for exp, seed in sweep.trial_configs():
        data = exp.config(seed, **sweep.common, **{k: _sample_value(v) for k, v in sweep.search.items()}).data
        key = json.dumps(dataclasses.asdict(data), sort_keys=True)
        if key not in seen:
            seen.add(key)
            meta = prepare(data)
            print(f"data: {data.dataset} ({data.tokenizer}) ready: {meta['train_tokens']:,} train tokens", flush=True)


def param_space(sweep: Sweep) -> dict[str, Any]:
    exps = [e.to_dict() for e in sweep.experiments]
    space: dict[str, Any] = {
        "exp": tune.grid_search(exps) if len(exps) > 1 else exps[0],
        "seed": tune.grid_search(list(sweep.seeds)) if len(sweep.seeds) > 1 else sweep.seeds[0],
        "common": sweep.common,
        "search": sweep.search,
    }
    return {**space, **sweep.extra_config}


def _name(trial) -> str:
    c = trial.config
    base = trial_name(c["exp"]["id"], c["exp"]["overrides"].get("method", "baseline"), c["seed"])
    return base if not c.get("search") else f"{base}-{trial.trial_id.split('_')[-1]}"


def run(sweep: Sweep, report: bool = True) -> Path:
    """Run (or resume) a sweep to its end and write its report; returns the run folder."""
    validate(sweep)
    # checkpoints every eval with num_to_keep=2 trip this warning on tiny runs; it is not actionable here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    resuming = check_run_dir(sweep)
    connect(sweep.address)
    res = resources(sweep)
    if "ddp" in res:  # the trial's config tells the trainable to train data-parallel
        sweep.extra_config = {**sweep.extra_config, "ddp": res.pop("ddp")}
    run_dir = sweep.run_dir
    if len(ray.nodes()) > 1 and not _is_shared_uri(sweep.storage):
        _check_shared_storage(run_dir.parent)
    prepare_datasets(sweep)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        write_json(run_dir / "sweep.json", sweep.identity())
    fn = tune.with_resources(trainable, res)
    callbacks = [Recorder(run_dir), *sweep.callbacks]
    run_config = tune.RunConfig(
        name=sweep.name,
        storage_path=str(run_dir.parent),
        failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
        # on filesystem storage checkpoints are pointers (bytes): keep them all, so that any one Tune's
        # experiment state names still exists; on object storage they carry the state: keep two
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2 if _is_shared_uri(sweep.storage) else None),
        callbacks=callbacks,
        verbose=0,
    )
    if resuming and tune.Tuner.can_restore(str(run_dir)):
        print(f"resuming {run_dir}: finished trials are kept, unfinished ones continue from their checkpoints", flush=True)
        tuner = tune.Tuner.restore(str(run_dir), fn, resume_unfinished=True, resume_errored=True, param_space=param_space(sweep))
        # the restored tuner keeps its own RunConfig: re-attach this process's callbacks
        tuner._local_tuner._run_config.callbacks = callbacks
    else:
        tuner = tune.Tuner(
            fn,
            param_space=param_space(sweep),
            tune_config=tune.TuneConfig(
                metric=METRIC if sweep.scheduler is None else None,
                mode=MODE if sweep.scheduler is None else None,
                search_alg=sweep.search_alg,
                scheduler=sweep.scheduler,
                num_samples=sweep.num_samples,
                max_concurrent_trials=sweep.max_concurrent,
                reuse_actors=True,  # a trial's actor keeps torch imported for the next: seconds per trial
                trial_name_creator=_name,
                trial_dirname_creator=_name,
            ),
            run_config=run_config,
        )
    n = len(sweep.trial_configs()) * sweep.num_samples
    print(f"sweep {sweep.name}: {n} trial(s), each {res['cpu']:g} CPU / {res['gpu']:g} GPU -> {run_dir}", flush=True)
    grid = tuner.fit()
    if grid.errors:
        print(f"{len(grid.errors)} trial(s) ended in error; see `oelm-ray status {run_dir}`", flush=True)
    if report:
        paths = results.write_report(run_dir)
        print((run_dir / "summary.md").read_text())
        print("results:", *map(str, paths), sep="\n  ")
    return run_dir


def _probe_nodes(path: str) -> list[tuple[str, bool]]:
    """(node address, whether `path` exists there) from a task pinned to each live node."""
    @ray.remote(num_cpus=0)
    def sees(path: str) -> tuple[str, bool]:
        return ray.util.get_node_ip_address(), os.path.exists(path)

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [
        sees.options(scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(path)
        for n in nodes
    ]
    return ray.get(refs, timeout=60)


def _is_shared_uri(storage: str) -> bool:
    return "://" in storage


def _check_shared_storage(folder: Path, probe: Callable[[str], list[tuple[str, bool]]] | None = None) -> None:
    """Multi-node: every node must see the storage folder; a local path on the head fails fast.

    `probe(path)` -> [(node, sees it)] for every node; the default asks each live node (tests inject one).
    """
    token = f".shared-check-{os.getpid()}-{time.time_ns()}"
    (folder / token).write_text("x")
    try:
        blind = [ip for ip, ok in (probe or _probe_nodes)(str(folder / token)) if not ok]
    finally:
        (folder / token).unlink(missing_ok=True)
    if blind:
        raise ConfigError(
            f"storage {folder} is not visible from node(s) {', '.join(blind)}: a multi-node sweep needs --storage on "
            "storage every node mounts (NFS path) or an object-store URI (s3://...), and --data-dir likewise"
        )
