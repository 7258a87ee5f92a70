"""Corpora prepared on the cluster while trials train: a Ray task per corpus, each trial waiting for its own.

    corpora = Corpora(trials)     # driver: prepared corpora verified now, a Ray task started for each other one
    WaitForData(scheduler)        # Tune scheduler: a trial whose corpus is being prepared waits PAUSED, holding nothing
    corpus_failure(cfg.data)      # trial: the one-line error its corpus's prepare ended with, if it failed

A prepare task runs `data.prepare` (under the corpus's file lock, so a second sweep or an `oelm-ray prepare` of the
same corpus waits for the first) on the driver's node: that node sees the data dir the driver named, which is
shared storage on a cluster. Its log lines (progress with total and ETA every 30 s) stream back to the driver,
which prints them as `data: ...` lines, then the corpus ready or failed. A failed corpus leaves
`<data_dir>/.<corpus>.failed.json` with its error: its trials start, end with that error (status error) and the
rest of the sweep goes on; the next run of the sweep removes the file and prepares the corpus again (a partial
build resumes where it stopped).

WaitForData keeps no state that matters across runs (Tune restores it from the run's tuner.pkl): a corpus is ready
when its prepared folder exists and failed when its failure file does, so a resumed sweep waits the same way and
one whose corpora are all prepared starts every trial as it comes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import ray
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..core.config import DataConfig
from ..core.data import check_source, fmt_secs, prepare
from ..core.io import UserError, one_line, write_json
from ..core.prepared import prepared_dir

READY, FAILED, PREPARING = "ready", "failed", "preparing"
QUIET_S = 600.0  # a prepare task silent this long gets a "still preparing" line on the driver
RECHECK_S = 1.0  # how often WaitForData looks for a corpus it holds trials back for
TUNE_STUCK_LOGGER = "ray.tune.execution.insufficient_resources_manager"
ENV_PREFIXES = ("OELM_", "TIKTOKEN_", "HF_", "HUGGINGFACE_")  # what preparing reads from the environment


def failure_path(cfg: DataConfig) -> Path:
    out = prepared_dir(cfg)
    return out.parent / f".{out.name}.failed.json"


def corpus_state(cfg: DataConfig) -> str:
    if prepared_dir(cfg).exists():
        return READY
    return FAILED if failure_path(cfg).exists() else PREPARING


def corpus_failure(cfg: DataConfig) -> str | None:
    """Why the sweep's prepare of cfg's corpus failed, where it did and the corpus is still not prepared."""
    if prepared_dir(cfg).exists():
        return None
    try:
        error = json.loads(failure_path(cfg).read_text())["error"]
    except (OSError, ValueError, KeyError):
        return None
    return f"corpus {prepared_dir(cfg).name} could not be prepared: {error}"


def say(line: str) -> None:
    print(f"data: {line}", flush=True)


# ------------------------------------------------------------------------------------------------
# the driver


@ray.remote(num_cpus=0, max_retries=0)
def _prepare_task(cfg: DataConfig):
    """Prepare cfg's corpus, yielding its log lines as they come and then its meta (a streaming generator)."""
    lines: queue.SimpleQueue = queue.SimpleQueue()
    end: dict = {}

    def work() -> None:
        try:
            end["meta"] = prepare(cfg, progress=False, log=lines.put)
        except BaseException as e:  # re-raised below, in the task, so that the driver gets it
            end["error"] = e
        lines.put(None)

    threading.Thread(target=work, name="prepare", daemon=True).start()
    while (line := lines.get()) is not None:
        yield line
    if "error" in end:
        raise end["error"]
    yield end["meta"]


class Corpora:
    """The sweep's distinct corpora, in trial order: each one already prepared is verified now (a corrupt copy
    raises DataError); each other one is checked (`check_source`: bad input raises now) and then prepared by a
    Ray task that starts right away, watched by a thread that prints its lines (`say`)."""

    def __init__(self, data: list[DataConfig], log: Callable[[str], None] = say):
        self.log = log
        todo = []
        for cfg in _distinct(data):
            if prepared_dir(cfg).exists():
                meta = prepare(cfg, log=log)  # verifies it
                log(_ready(cfg, meta))
            else:
                check_source(cfg)
                todo.append(cfg)
        self.tasks: list[tuple[DataConfig, ray.ObjectRefGenerator, threading.Thread]] = []
        for cfg in todo:
            failure_path(cfg).unlink(missing_ok=True)  # a failure of an earlier run: this one tries again
            task = _prepare_task.options(name=f"prepare {prepared_dir(cfg).name}", **_like_the_driver())
            gen = task.remote(_absolute(cfg))
            watch = threading.Thread(
                target=self._watch, args=(cfg, gen), name=f"watch {prepared_dir(cfg).name}", daemon=True
            )
            watch.start()
            self.tasks.append((cfg, gen, watch))
            log(f"preparing {prepared_dir(cfg).name} in a Ray task on this node; its trials start once it is ready")

    def _watch(self, cfg: DataConfig, gen: ray.ObjectRefGenerator) -> None:
        name, t0, heard, error = prepared_dir(cfg).name, time.monotonic(), time.monotonic(), None
        meta = None
        try:
            while True:
                ready, _ = ray.wait([gen], timeout=QUIET_S)
                if not ready:
                    self.log(
                        f"{name}: still being prepared ({fmt_secs(time.monotonic() - t0)} so far, nothing "
                        f"heard for {fmt_secs(time.monotonic() - heard)})"
                    )
                    continue
                try:
                    item = ray.get(next(gen))
                except StopIteration:
                    break
                heard = time.monotonic()
                if isinstance(item, str):
                    self.log(item)
                else:
                    meta = item
        except Exception as e:  # the task raised (bad data, the stream failed for good) or its worker died
            error = _one_line(e)
        if error is None and meta is None:
            error = "its prepare task ended without a result"
        if error is None:
            dt = time.monotonic() - t0
            self.log(_ready(cfg, meta) + f" (prepared in {fmt_secs(dt) if dt >= 60 else f'{dt:.1f} s'})")
            return
        try:
            write_json(failure_path(cfg), {"corpus": name, "error": error, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        except OSError as e:  # its trials then wait on: say why
            self.log(f"{name} failed and {failure_path(cfg)} cannot be written ({e}): stop the sweep (Ctrl-C)")
        self.log(f"{name} failed: {error}. Its trials end with this error; the rest of the sweep goes on")

    def close(self, timeout: float = 10.0) -> None:
        """Stop the prepare tasks still running (a sweep that ended early); they resume in the next run."""
        for _, gen, watch in self.tasks:
            if watch.is_alive():
                ray.cancel(gen, force=True)
        for _, _, watch in self.tasks:
            watch.join(timeout)


def _distinct(data: list[DataConfig]) -> list[DataConfig]:
    seen: dict[Path, DataConfig] = {}
    for cfg in data:
        seen.setdefault(prepared_dir(cfg), cfg)
    return list(seen.values())


def _ready(cfg: DataConfig, meta: dict) -> str:
    return f"{cfg.dataset} ({cfg.tokenizer}) ready: {meta['train_tokens']:,} train tokens"


def _absolute(cfg: DataConfig) -> DataConfig:
    """cfg with its paths as the driver resolves them (a Ray worker runs in another folder)."""
    paths = {
        k: str(Path(getattr(cfg, k)).expanduser().resolve())
        for k in ("data_dir", "gpt2_ranks", "hub_dir")
        if getattr(cfg, k)
    }
    if cfg.is_local_file:
        paths["dataset"] = str(Path(cfg.dataset).expanduser().resolve())
    return dataclasses.replace(cfg, **paths)


def _like_the_driver() -> dict:
    """Ray options that run a task on the driver's node (it sees the data dir the driver named) with the driver's
    settings for tokenizers and the hub (OELM_GPT2_RANKS, TIKTOKEN_*, HF_*, proxies): what preparing on the
    driver would have read."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.startswith(ENV_PREFIXES) or k.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    }
    opts: dict = {"runtime_env": {"env_vars": env}} if env else {}
    try:
        node = ray.get_runtime_context().get_node_id()
    except Exception:  # a client connection (ray://) has no node of its own: the head's storage is the cluster's
        return opts
    return {**opts, "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


def _one_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e  # a RayTaskError carries the task's own exception
    user = isinstance(cause, UserError)  # its message says what to fix: whole, without the type
    return one_line(cause, limit=None if user else 200, typed=not user)


# ------------------------------------------------------------------------------------------------
# the scheduler


class WaitForData(TrialScheduler):
    """Runs `scheduler` (default FIFO) over the trials whose corpus is ready; holds the others back.

    A trial added while its corpus is being prepared is set PAUSED, which Tune starts only when a scheduler chooses
    it: it holds no resources meanwhile, and the wrapped scheduler never sees it. Once its corpus is ready (or has
    failed) it is chosen, before anything the wrapped scheduler would choose. Trials keep their order in Tune.
    """

    def __init__(self, scheduler: TrialScheduler | None = None):
        super().__init__()
        self.inner = scheduler or FIFOScheduler()
        self.held: dict[Trial, DataConfig] = {}
        self.looked: dict[Path, tuple[float, str]] = {}  # prepared folder -> (when looked at, state)
        self.quiet: _InsteadOfTunesStuckWarning | None = None

    def __getstate__(self) -> dict:  # what Tune pickles into tuner.pkl: the wrapped scheduler, no trials
        return {**self.__dict__, "held": {}, "looked": {}, "quiet": None}

    def _hold(self, trial, cfg: DataConfig) -> None:
        trial.set_status(Trial.PAUSED)  # before Tune files it under its status: never staged
        self.held[trial] = cfg
        if self.quiet is None:
            self.quiet = _InsteadOfTunesStuckWarning(self)
            logging.getLogger(TUNE_STUCK_LOGGER).addFilter(self.quiet)

    def _release(self, trial) -> None:
        del self.held[trial]
        if not self.held and self.quiet is not None:
            logging.getLogger(TUNE_STUCK_LOGGER).removeFilter(self.quiet)
            self.quiet = None

    def state(self, cfg: DataConfig) -> str:
        out = prepared_dir(cfg)
        at, state = self.looked.get(out, (-math.inf, PREPARING))
        if state == PREPARING and time.monotonic() - at >= RECHECK_S:
            state = corpus_state(cfg)
            self.looked[out] = (time.monotonic(), state)
        return state

    def on_trial_add(self, tune_controller, trial):
        self.inner.on_trial_add(tune_controller, trial)
        if trial.status == Trial.PENDING:
            from .trial import trial_of

            cfg = trial_of(trial.config).config.data
            if self.state(cfg) == PREPARING:
                self._hold(trial, cfg)

    def choose_trial_to_run(self, tune_controller):
        for trial, cfg in list(self.held.items()):
            if trial.status != Trial.PAUSED:  # stopped meanwhile (the sweep is ending)
                self._release(trial)
            elif self.state(cfg) != PREPARING:
                self._release(trial)
                return trial
        return self.inner.choose_trial_to_run(_Without(tune_controller, self.held))

    # the rest is the wrapped scheduler's

    @property
    def metric(self):
        return self.inner.metric

    @property
    def supports_buffered_results(self):
        return self.inner.supports_buffered_results

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, **spec)

    def on_trial_result(self, tune_controller, trial, result):
        return self.inner.on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        self.inner.on_trial_complete(tune_controller, trial, result)

    def on_trial_error(self, tune_controller, trial):
        self.inner.on_trial_error(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial):
        if trial in self.held:
            self._release(trial)
        self.inner.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return self.inner.debug_string()

    def save(self, checkpoint_path: str):
        return self.inner.save(checkpoint_path)

    def restore(self, checkpoint_path: str):
        return self.inner.restore(checkpoint_path)


class _InsteadOfTunesStuckWarning(logging.Filter):
    """While trials wait for their corpus and none runs, Tune warns every minute that the cluster lacks the
    resources the trials ask for; this says what they wait for instead."""

    def __init__(self, gate: WaitForData):
        super().__init__()
        self.gate = gate

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.gate.held or "No trial is running" not in record.getMessage():
            return True
        names = sorted({prepared_dir(cfg).name for cfg in self.gate.held.values()})
        say(f"no trial is running: {len(self.gate.held)} trial(s) wait for {', '.join(names)} to be prepared")
        return False


class _Without:
    """The Tune controller as the wrapped scheduler sees it: without the trials held back."""

    def __init__(self, controller, held: dict):
        self._controller, self._held = controller, held

    def get_trials(self):
        return [t for t in self._controller.get_trials() if t not in self._held]

    def __getattr__(self, name):
        return getattr(self._controller, name)
