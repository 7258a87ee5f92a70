"""The trial side of the Ray Tune adapter: one trial = one Ray actor running `trainer.train`.

A trial's config arrives as plain data, built and validated once on the driver (`TrialSpec`, in
Tune's param space under "trial"; a search's sampled values already in place). `trial_of` reads
it back; the trial, the Recorder and the W&B logger all read that one copy.

`trainable` turns the trainer's report callback into `tune.report(metrics, checkpoint=...)` and
restores a retried trial from `tune.get_checkpoint()`. A report carries a Tune checkpoint only
where the trainer wrote latest.pt (`TrainConfig.checkpoints_at`); the others are plain results,
which a trial restored from the checkpoint before them redoes and reports again (as Tune expects
of a trainable that checkpoints less often than it reports).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

from ..core.config import Config, ConfigError
from ..core.experiments import Experiment
from ..core.io import read_metrics

STATE_DIR = "state"


@dataclass(frozen=True)
class TrialSpec:
    """One trial: an experiment at a seed, and its whole validated config."""

    experiment: Experiment
    seed: int
    config: Config
    searched: tuple[str, ...] = ()
    """Config fields a search sets (their values are in `config`)."""

    @property
    def name(self) -> str:
        return self.experiment.trial_name(self.seed)

    @property
    def search(self) -> dict[str, Any]:
        """The searched fields and the values this trial got."""
        flat = {k: v for section in self.config.to_dict().values() for k, v in section.items()}
        return {k: flat[k] for k in self.searched}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "experiment": self.experiment.to_dict(),
            "seed": self.seed,
            "config": self.config.to_dict(),
            "searched": list(self.searched),
        }


def trial_of(config: dict) -> TrialSpec:
    """The trial a Tune trial config describes (the param space's "trial" entry, resolved)."""
    t = config["trial"]
    cfg = Config.from_dict(t["config"])
    if t.get("searched"):  # sampled by the searcher after the driver validated the space: check the sample
        cfg.validate()
    return TrialSpec(Experiment.from_dict(t["experiment"]), t["seed"], cfg, tuple(t.get("searched", ())))


# ------------------------------------------------------------------------------------------------
# the trial


def trainable(config: dict) -> None:
    """Ray Tune function trainable around `trainer.train` (runs inside the trial's actor)."""
    from ..core.corpora import DataError
    from ..core.data import prepare
    from ..core.prepared import load_prepared
    from ..core.trainer import train
    from .preparing import corpus_failure

    cfg = trial_of(config).config
    if cfg.train.num_threads == 0:  # a CPU slot is a core: threads beyond it only fight each other
        cfg.train.num_threads = max(1, int(tune.get_context().get_trial_resources().required_resources.get("CPU", 1)))
    if not config.get("ddp"):  # a data-parallel trial's Ray Train workers hold its GPUs, not the trial itself
        cfg.train.device = trial_device(cfg.train.device, ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    out, in_storage = _state_dir()
    out.mkdir(parents=True, exist_ok=True)
    resume, known_step = _restore_into(out, in_storage)
    failed = corpus_failure(cfg.data)
    if failed:  # the sweep's prepare task for this corpus failed: end with its error, the sweep goes on
        with open(out / "train.log", "a") as logf:
            logf.write(f"{time.strftime('%H:%M:%S')} {failed}\n")
        raise DataError(failed)
    node, gpu = ray.util.get_node_ip_address(), os.environ.get("CUDA_VISIBLE_DEVICES", "-") or "-"
    node_id = ray.get_runtime_context().get_node_id()[:12]  # tells apart nodes that share an address

    def report(metrics: dict) -> None:
        # a data-parallel trial's rank 0 reports the GPUs its workers hold
        if not wrote_latest(cfg.train, metrics):  # latest.pt is older: a restore resumes from there
            tune.report({"node": node, "node_id": node_id, "gpu": gpu, **metrics})
            return
        with _checkpoint_dir(out, in_storage, metrics["step"]) as ckpt_dir:
            tune.report(
                {"node": node, "node_id": node_id, "gpu": gpu, **metrics},
                checkpoint=tune.Checkpoint.from_directory(ckpt_dir),
            )

    if resume:
        # evaluations the state holds but Tune never heard of (the trial died between writing its
        # state and reporting, or Tune's experiment state is older): report them first, in order. A
        # complete run (a killed driver's stale state started it again) reports them all and stops
        # there, leaving its files (train.log, summary.json, ...) as they are
        rows, done = read_metrics(out / "metrics.jsonl"), finished(out)
        for metrics in [r for r in rows if r["step"] > known_step] if done else replayed(rows, known_step, cfg.train):
            report(metrics)
        if done:
            return
    prepare(cfg.data, progress=False)  # idempotent: verifies the copy the sweep prepared
    data = load_prepared(cfg.data)

    with open(out / "train.log", "a") as logf:  # the research's training.log; `oelm-ray status` is the live view

        def log(line: str) -> None:
            logf.write(f"{time.strftime('%H:%M:%S')} {line}\n")
            logf.flush()

        if config.get("ddp"):  # a multi-GPU (or multi-worker) trial: Ray Train workers, DDP
            from .ddp import train_ddp

            train_ddp(cfg.to_dict(), out, report=report, resume=resume, log=log, **config["ddp"])
        else:
            train(cfg, out, report=report, resume=resume, data=data, log=log)


def finished(out: Path) -> bool:
    """Whether the trial's state holds a run that completed (its summary.json says so)."""
    try:
        return json.loads((out / "summary.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def wrote_latest(train_cfg, metrics: dict) -> bool:
    """Whether the evaluation these metrics come from wrote latest.pt (a diverged run's last report did not)."""
    return not metrics.get("diverged") and train_cfg.checkpoints_at(metrics["step"])


def replayed(rows: list[dict], known_step: int, train_cfg) -> list[dict]:
    """The metrics rows to report again on resume: after the last step Tune knows of, up to the last
    one that wrote latest.pt (the resume point; the trainer redoes and reports the rows after it)."""
    resume_at = max((r["step"] for r in rows if wrote_latest(train_cfg, r)), default=0)
    return [r for r in rows if known_step < r["step"] <= resume_at]


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
                    if (
                        p.is_file()
                        and p.name != "summary.json"
                        and not (p.name.startswith(".") and p.name.endswith(".tmp"))
                    ):
                        shutil.copy2(p, out / p.name)
                known_step = read_metrics(out / "metrics.jsonl")[-1]["step"] if (out / "metrics.jsonl").exists() else 0
    if (out / "latest.pt").exists() and (in_storage or ckpt is not None):
        # in storage: the newest state, whichever (possibly older) checkpoint Tune's experiment state names
        return True, known_step
    # a fresh trial: a leftover folder from an attempt that never checkpointed is stale
    for p in out.iterdir():
        p.unlink() if p.is_file() else shutil.rmtree(p)
    return False, 0
