"""Reliability: faults, bad input, data integrity, security and determinism, end to end.

A sweep is days of GPU time; losing it is the worst thing this tool can do. Each test here would
fail if the guarantee it names broke:

1. faults on local Ray on CPU: a trial SIGKILLed at a random step, the driver SIGKILLed mid-sweep,
   a node dying in a simulated multi-node cluster, a crash in the middle of a checkpoint/result write;
2. bad input: every case in `BAD_INPUT` ends in one line on stderr naming what to fix, exit 2,
   before any training, with every existing file untouched;
3. divergence: a NaN/inf trial is marked `diverged` and the sweep goes on;
4. concurrency: many processes preparing one corpus leave one verified copy;
5. security: torch.load(weights_only=True) everywhere, no secrets, Ray on loopback only;
6. determinism: same seed and config, same numbers on CPU (in one process and across processes).
"""

from __future__ import annotations

import ast
import errno
import hashlib
import importlib.util
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import torch

from oelm_ray import cli, results
from oelm_ray.core import data
from oelm_ray.tune import recipe
from oelm_ray.tune import sweep as sweep_mod
from oelm_ray.core import experiments as E
from oelm_ray.core.checkpoint import load_checkpoint, save_checkpoint
from oelm_ray.core.io import DiskFullError, atomic_write, write_json
from oelm_ray.core.config import make_config
from oelm_ray.core.experiments import Experiment
from trial_files import state_files
from oelm_ray.tune.sweep import Sweep, run
import faults  # tests/faults.py: a trainable that crashes once, at a given step

ROOT = Path(__file__).resolve().parents[1]
PHASE3 = ROOT / "sweeps" / "phase3.py"
LOSS_KEYS = ("step", "tokens", "train/loss", "val/loss", "val/ppl", "lr")


def _phase3_presets() -> dict:
    spec = importlib.util.spec_from_file_location("phase3_recipe", PHASE3)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # the recipe's `main` is guarded by __name__
    return mod.PRESETS


def smoke(tmp: Path, **kw) -> dict:
    return {**E.SMOKE, "data_dir": str(tmp / "data"), **kw}


def final_log(run_dir: Path, trial: str) -> str:
    """The trial's train.log, kept with its state in the run folder."""
    return (run_dir / trial / "state" / "train.log").read_text()


def losses(history: list[dict]) -> list[tuple]:
    return [tuple(h.get(k) for k in LOSS_KEYS) for h in history]


def quiet(_):
    pass


# ================================================================================================
# 1. faults, end to end


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["every-eval", "checkpoint-interval"])
def test_trial_sigkilled_at_a_random_step_resumes_bit_exact(tmp_path, ray_local, policy):
    """Two identical trials side by side; one is SIGKILLed at a seeded random step. The killed one
    is retried from its last checkpoint and ends with exactly the clean twin's numbers.

    checkpoint-interval: latest.pt at 20 and 40 only; the kill comes in the report of step 30 (an
    evaluation without a latest.pt), so the retry resumes from step 20 and redoes step 30."""
    from ray import tune

    if policy == "every-eval":
        kill_at, extra, steps = random.Random(7).randint(11, 29), {}, [10, 20, 30]  # after the step-10 checkpoint
    else:
        kill_at, extra, steps = 30, {"max_steps": 40, "checkpoint_interval": 20}, [10, 20, 30, 40]
    marker = tmp_path / "killed-once"
    fault = {"step": kill_at, "marker": str(marker), "kind": "kill"}
    twins = [Experiment(f"TWIN-{i}", "cpu", {"method": "oelm_freeze"}) for i in (1, 2)]
    sw = Sweep("kill", twins, [0], str(tmp_path / "runs"), common=smoke(tmp_path, **extra),
               # only TWIN-2 carries the fault: TWIN-1 is the uninterrupted reference
               trainable=faults.trainable,
               extra_config={"fault": tune.sample_from(lambda spec: fault if spec.config.trial["experiment"]["id"] == "TWIN-2" else None)})
    run_dir = run(sw, report=False)
    assert marker.exists(), "the fault was never injected"
    clean = results.read_record(results.record_path(run_dir, twins[0].trial_name(0)))
    killed = results.read_record(results.record_path(run_dir, twins[1].trial_name(0)))
    assert clean["status"] == killed["status"] == "completed"
    assert [h["step"] for h in killed["history"]] == steps
    assert losses(killed["history"]) == losses(clean["history"])  # bit for bit
    assert "resumed from" in final_log(run_dir, twins[1].trial_name(0)), "the killed trial restarted from scratch"
    if policy == "checkpoint-interval":  # from the latest.pt before the killed evaluation
        assert "latest.pt at step 20" in final_log(run_dir, twins[1].trial_name(0))
    assert "resumed from" not in final_log(run_dir, twins[0].trial_name(0))


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, state, start time) from /proc."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(p.name)] = (int(fields[1]), fields[0], fields[19])
    return out


def _descendants(pid: int) -> dict[int, str]:
    """Every process below `pid`, with its start time (to tell it from a reused pid later)."""
    table = _proc_table()
    kids: dict[int, list[int]] = {}
    for p, (pp, _, _) in table.items():
        kids.setdefault(pp, []).append(p)
    out, todo = {}, [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in out:
                out[c] = table[c][2]
                todo.append(c)
    return out


def _still_running(procs: dict[int, str]) -> list[int]:
    table = _proc_table()
    return [p for p, start in procs.items() if p in table and table[p][2] == start and table[p][1] != "Z"]


def _error_text(run_dir: Path, trial: str) -> str:
    rec = results.read_record(results.record_path(run_dir, trial)) or {}
    files = [run_dir / trial / "error.txt", Path(rec.get("error") or "/nonexistent")]
    return "".join(f.read_text(errors="ignore") for f in files if f.is_file())


def _tune_trial_states(run_dir: Path) -> dict[str, str]:
    """Trial name -> its status in Tune's saved experiment state (experiment_state-*.json)."""
    (path,) = run_dir.glob("experiment_state-*.json")
    states = [json.loads(state) for state, _ in json.loads(path.read_text())["trial_data"]]
    return {s["custom_trial_name"]: s["status"] for s in states}


@pytest.mark.slow
def test_driver_sigkilled_mid_sweep_resumes_with_the_same_command(tmp_path):
    """SIGKILL the whole driver process group once 2 trials are done: no Ray process outlives it,
    and the same command finishes the sweep without re-running or losing a finished trial.

    The race this guards, on purpose: the first driver saves Tune's experiment state only once, at
    its start (TUNE_GLOBAL_CHECKPOINT_S; Ray's default is every >= 10 s), so at the kill that state
    names the finished trials as unfinished, with no checkpoint. The second run must still keep them."""
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": ray_tmp}
    stale = {**env, "TUNE_GLOBAL_CHECKPOINT_S": "3600"}
    cmd = [sys.executable, str(PHASE3), "--smoke-test", "--no-wandb", "--storage", str(tmp_path / "runs"),
           "--seeds", "0,1,2", "--experiments", "CPU-01,CPU-02,CPU-03"]  # 9 trials
    run_dir = tmp_path / "runs" / "phase3-smoke"
    ray_procs: dict[int, str] = {}
    try:
        proc = subprocess.Popen(cmd, env=stale, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        deadline = time.time() + 300
        done: dict[str, dict] = {}
        while time.time() < deadline and proc.poll() is None:
            done = {r["name"]: r for r in results.load_records(run_dir) if r["status"] == "completed"}
            if len(done) >= 2:
                break
            time.sleep(0.3)
        assert len(done) >= 2, "the sweep never got going"
        ray_procs = _descendants(proc.pid)
        assert ray_procs, "the driver started no Ray processes?"
        os.killpg(proc.pid, signal.SIGKILL)
        first_out, _ = proc.communicate(timeout=60)
        # the driver's local Ray (GCS, raylet, workers) shares its fate: nothing may linger
        deadline = time.time() + 60
        while _still_running(ray_procs) and time.time() < deadline:
            time.sleep(0.5)
        leaked = _still_running(ray_procs)
        assert not leaked, f"Ray processes outlived the killed driver: {leaked}"
        before = {r["name"]: r for r in results.load_records(run_dir)}
        finished_files = state_files(run_dir, done)
        assert len(before) < 9 or {r["status"] for r in before.values()} != {"completed"}, first_out[-2000:]
        tune_view = _tune_trial_states(run_dir)  # what the second run will restore from
        stale_done = [n for n in done if tune_view.get(n) != "TERMINATED"]
        assert stale_done, f"Tune's saved state already knew every finished trial: the race did not happen {tune_view}"

        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert "resuming" in second.stdout
        recs = {r["name"]: r for r in results.load_records(run_dir)}
        for name, rec in done.items():  # no finished result lost or changed, whatever else happened
            assert losses(recs[name]["history"]) == losses(rec["history"])
        # Tune's experiment state may be older than the trials' newest checkpoints after a SIGKILL
        # (it is saved every >= 10 s); the trials' state folders are always current, so a finished
        # trial Tune starts again does no work and reports nothing, and none is lost
        rerun = {f for f, v in state_files(run_dir, done).items() if finished_files.get(f) != v}
        assert not rerun, f"finished trials trained again, rewriting {sorted(rerun)}"
        lost = [n for n in recs if "does not exist on storage anymore" in _error_text(run_dir, n)]
        assert not lost, lost
        assert len(recs) == 9 and {r["status"] for r in recs.values()} == {"completed"}
        df = pd.read_parquet(run_dir / "trials.parquet")
        assert len(df) == 9 and set(df.status) == {"completed"}
    finally:
        for p in _still_running(ray_procs):  # `ray stop`, scoped to the processes this test started
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_node_death_moves_its_trial_to_another_node(tmp_path):
    """A 3-node cluster (head with no CPUs, two 1-CPU workers); one worker dies mid-trial. Its
    trial continues on the other node from its checkpoint and the sweep completes."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the shared local Ray; the next test that needs it starts it again
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
    })
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    try:
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        exps = [E.EMBEDDED["CPU-01"], E.EMBEDDED["CPU-02"]]
        # long enough (about 10 s a trial) that the node dies well inside training, not after it:
        # Tune hears of a report a moment after the trainer makes it
        common = smoke(tmp_path, max_steps=1500, eval_interval=100, log_interval=100)
        sw = Sweep("nodes", exps, [0], str(tmp_path / "runs"), common=common, max_failures=3)
        removed = threading.Event()

        def kill_a_node_mid_trial():
            deadline = time.time() + 400
            while time.time() < deadline:
                recs = results.load_records(sw.run_dir)
                # once both trials are past their second report, their first checkpoint is surely registered
                if len(recs) == 2 and all(r.get("history") and r["history"][-1]["step"] >= 200 and r["status"] == "running"
                                          for r in recs):
                    cluster.remove_node(workers[0], allow_graceful=False)  # both nodes are busy: one trial dies
                    removed.set()
                    return
                time.sleep(0.1)

        killer = threading.Thread(target=kill_a_node_mid_trial, daemon=True)
        killer.start()
        run_dir = run(sw, report=True)
        killer.join(5)
        assert removed.is_set(), "no moment with both trials running was seen"
        df = pd.read_parquet(run_dir / "trials.parquet")
        assert len(df) == 2 and set(df.status) == {"completed"} and (df.steps == 1500).all()
        logs = [final_log(run_dir, e.trial_name(0)) for e in exps]
        assert sum("resumed from" in log for log in logs) == 1, f"one trial must continue from its checkpoint: {logs}"
        for e in exps:
            hist = results.read_record(results.record_path(run_dir, e.trial_name(0)))["history"]
            assert [h["step"] for h in hist] == list(range(100, 1501, 100))
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_crash_inside_a_write_keeps_the_previous_file(tmp_path):
    """A crash (exception, Ctrl-C, full disk) in the middle of writing a checkpoint or a result
    record leaves the previous file whole and loadable, and no temp file behind."""
    cfg = make_config("cpu", **smoke(tmp_path)).to_dict()
    path = tmp_path / "latest.pt"
    old = {"format": 1, "config": cfg, "model": {"w": torch.arange(1000.0)}, "step": 10}
    save_checkpoint(path, old)
    old_bytes = path.read_bytes()

    def torn(exc: BaseException) -> Callable:
        def write(f):
            f.write(old_bytes[: len(old_bytes) // 2])  # half of a checkpoint, then the crash
            raise exc
        return write

    for exc in (RuntimeError("boom"), KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")):
        with pytest.raises((RuntimeError, KeyboardInterrupt, DiskFullError)):
            atomic_write(path, torn(exc))
        assert path.read_bytes() == old_bytes
        ck = load_checkpoint(path, expect_config=cfg)
        assert ck["step"] == 10 and torch.equal(ck["model"]["w"], old["model"]["w"])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]

    run_dir = tmp_path / "run"
    rec = {"name": "T-s0", "status": "running", "history": [{"step": 10, "val/loss": 1.5}]}
    results.write_record(run_dir, rec)

    def torn_json(f):
        f.write('{"name": "T-s0", "hist')
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write(results.record_path(run_dir, "T-s0"), torn_json, mode="w")
    assert results.load_records(run_dir) == [rec]
    assert [p.name for p in (run_dir / "trials").iterdir()] == ["T-s0.json"]


_WRITER = """
import sys, torch
from oelm_ray.core.checkpoint import save_checkpoint
path = sys.argv[1]
for i in range(1, 10**6):
    # ~16 MB: slow enough that a kill often lands inside the write
    save_checkpoint(path, {"format": 1, "config": {}, "model": {"w": torch.full((4_000_000,), float(i))}, "step": i})
    print(i, flush=True)
"""


def test_sigkill_while_writing_a_checkpoint_leaves_one_whole(tmp_path):
    """A process SIGKILLed (a random moment, seeded) while it rewrites a large checkpoint in a loop:
    the file on disk is always one whole checkpoint, the last or the one before it."""
    rng = random.Random(11)
    path = tmp_path / "latest.pt"
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        want = rng.randint(2, 4)
        last = 0
        while last < want:
            line = proc.stdout.readline()
            assert line, "the writer died on its own"
            last = int(line)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside the next write
        proc.kill()
        rest, _ = proc.communicate(timeout=30)
        last = max([last] + [int(x) for x in rest.split()])
        ck = load_checkpoint(path)
        assert ck["step"] in (last, last + 1), (ck["step"], last)
        assert torch.equal(ck["model"]["w"], torch.full((4_000_000,), float(ck["step"])))
        # a killed writer may leave its temp file; it never shadows the real one and the next write works
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != "latest.pt"]
        assert all(re.fullmatch(r"\.latest\.pt\..+\.tmp", n) for n in leftovers), leftovers
        save_checkpoint(path, {"format": 1, "config": {}, "model": {}, "step": -attempt})
        assert load_checkpoint(path)["step"] == -attempt


def test_retried_trial_drops_the_temp_file_of_a_killed_checkpoint_write(tmp_path, monkeypatch):
    """A trial killed inside a checkpoint write leaves `.latest.pt.*.tmp` in its working folder; the
    retry must not carry that (possibly GBs) into every later checkpoint."""
    from ray import tune

    from oelm_ray.tune import trial

    ck = tmp_path / "checkpoint_000001"
    save_checkpoint(ck / "latest.pt", {"format": 1, "config": {}, "model": {}, "step": 10})
    (ck / "train.log").write_text("step 10\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".latest.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    (out / "latest.pt").write_bytes(b"newer, never registered")
    monkeypatch.setattr(tune, "get_checkpoint", lambda: tune.Checkpoint.from_directory(str(ck)))
    # state carried inside Tune's checkpoints (object storage): the checkpoint is the truth
    assert trial._restore_into(out, in_storage=False) == (True, 0)
    assert sorted(p.name for p in out.iterdir()) == ["latest.pt", "train.log"]
    assert load_checkpoint(out / "latest.pt")["step"] == 10
    # state in the run folder (filesystem storage): the newest latest.pt there wins over an older
    # checkpoint that a stale experiment state names
    save_checkpoint(out / "latest.pt", {"format": 1, "config": {}, "model": {}, "step": 20})
    (out / ".latest.pt.zz.tmp").write_bytes(b"torn")
    assert trial._restore_into(out, in_storage=True) == (True, 0)
    assert sorted(p.name for p in out.iterdir()) == ["latest.pt", "train.log"]
    assert load_checkpoint(out / "latest.pt")["step"] == 20


def test_trial_checkpoints_only_where_latest_was_written_and_replays_up_to_it():
    """checkpoint_interval 20, evaluations every 10: Tune gets a checkpoint with the reports at 20
    and 40 only; a restore replays the rows Tune missed up to the resume point (latest.pt at 20),
    and leaves step 30 to the trainer, which redoes and reports it."""
    from oelm_ray.tune import trial

    t = _train_config(checkpoint_interval=20).train
    assert [s for s in (10, 20, 30, 40) if trial.wrote_latest(t, {"step": s})] == [20, 40]
    assert not trial.wrote_latest(t, {"step": 40, "diverged": 1})
    rows = [{"step": s} for s in (10, 20, 30)]
    assert [r["step"] for r in trial.replayed(rows, 0, t)] == [10, 20]
    assert trial.replayed(rows, 20, t) == []
    every = _train_config().train  # checkpoint_interval 0: every evaluation, as before
    assert [r["step"] for r in trial.replayed(rows, 10, every)] == [20, 30]


def _train_config(**kw):
    from oelm_ray.core.config import make_config

    return make_config("cpu", max_steps=40, eval_interval=10, warmup_steps=2, **kw)


# ================================================================================================
# 2. bad input: one line, exit 2, before any training, nothing overwritten


# a tiny `oelm-ray train` run, as config overrides and as the same command line
TINY = dict(stories_mb=0.3, d_model=32, n_layer=2, n_head=2, d_ff=64, block_size=32, batch_size=4, max_steps=10,
            warmup_steps=2, eval_interval=10, eval_batches=1, log_interval=10, num_threads=1)


def train_argv(**fields) -> list[str]:
    """`oelm-ray train --preset cpu --set ...` of the tiny run, with `fields` changed or added."""
    return ["train", "--preset", "cpu", "--set", *[f"{k}={v}" for k, v in {**TINY, **fields}.items()]]


@dataclass
class World:
    """What the bad-input cases start from: a prepared corpus and a finished tiny run (never modified)."""

    root: Path
    data: Path
    ckpt: Path


@dataclass
class Bad:
    case: str
    """What is wrong (the README's first column)."""
    entry: str
    """oelm-ray (cli.main in-process), phase3 (recipe.main in-process) or subprocess (phase3.py)."""
    argv: Callable[[Path, World], list[str]]
    expect: str
    """Regex the one-line message must match: it names what to fix."""
    setup: Callable[[Path, World], None] | None = None
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    env: Callable[[Path], dict] | None = None
    ray: bool = False
    """Needs the shared local Ray (the check asks the cluster); otherwise the check must come before Ray starts."""
    usage: bool = False
    """argparse's own error: its usage lines, then the one message."""
    example: str = ""
    """The bad input, in words (README)."""
    says: str = ""
    """What the message tells the user (README)."""


def _train(d: Path, w: World, *extra: str, data_dir: Path | None = None, **fields) -> list[str]:
    return [*train_argv(**fields), "--data-dir", str(data_dir or w.data), *extra]


def _sweep(d: Path, w: World, *extra: str) -> list[str]:
    return ["--smoke-test", "--no-wandb", "--storage", str(d / "runs"), "--data-dir", str(w.data), *extra]


def _copy_data(d: Path, w: World) -> Path:
    shutil.copytree(w.data, d / "data")
    return next(p for p in (d / "data").iterdir() if p.is_dir())


def _truncate(d, w):
    f = _copy_data(d, w) / "train.bin"
    f.write_bytes(f.read_bytes()[:-2])


def _flip(d, w):
    f = _copy_data(d, w) / "train.bin"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))


def _other_tokenizer(d, w):
    meta = _copy_data(d, w) / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "tokenizer": "gpt2"}))


def _copy_run(d, w):
    shutil.copytree(w.ckpt, d / "x")


def _torn_checkpoint(d, w):
    (d / "x").mkdir()
    full = (w.ckpt / "latest.pt").read_bytes()
    (d / "x" / "latest.pt").write_bytes(full[: len(full) // 2])


def _existing_sweep(d, w):
    presets = _phase3_presets()
    args = recipe.parser("phase3", presets).parse_args(_sweep(d, w))
    sw = recipe.build("phase3", presets, args)
    write_json(sw.run_dir / "sweep.json", sw.identity())
    results.write_record(sw.run_dir, {"name": "CPU-01-baseline-s0", "status": "completed", "history": []})


def _blocked_storage(d, w):
    (d / "file.txt").write_text("a regular file: nothing can be created below it, not even by root\n")


def _finished_report(d, w):
    hist = [{"step": 10, "tokens": 1280, "val/loss": 2.0, "val/ppl": 7.39, "step_time_s": 0.1, "tokens_per_s": 1e4,
             "wall_time_s": 1.0, "trainable_params": 100, "total_params": 100}]
    results.write_record(d / "run", {"name": "CPU-01-baseline-s0", "experiment_id": "CPU-01", "dataset": "stories",
                                     "method": "baseline", "seed": 0, "status": "completed", "history": hist,
                                     "config": {"train": {"max_steps": 10}, "model": {}}})
    write_json(d / "run" / "sweep.json", {"name": "run"})
    results.write_report(d / "run")


def _disk_full(mp: pytest.MonkeyPatch) -> None:
    def fsync(fd):  # the disk fills up while the results are flushed
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    mp.setattr(os, "fsync", fsync)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: nothing listens there


BAD_INPUT = [
    Bad("unknown method", "phase3", lambda d, w: _sweep(d, w, "--set", "method=oelm_magic"),
        r"method='oelm_magic' is unknown: choose one of baseline, oelm_freeze, oelm_random",
        example='`--set method=oelm_magic`', says='names the trial and lists baseline, oelm_freeze, oelm_random'),
    Bad("unknown dataset", "oelm-ray", lambda d, w: _train(d, w, "--out-dir", str(d / "x"), dataset="nosuch"),
        r"dataset='nosuch' is unknown: choose one of stories, tinystories",
        example='`--set dataset=nosuch`', says='lists the known corpora and the local file suffixes'),
    Bad("unknown preset", "oelm-ray", lambda d, w: [*_train(d, w, "--out-dir", str(d / "x")), "--preset", "huge"],
        r"preset='huge' is unknown: choose one of cpu, small-256, medium-512, large-768",
        example='`--preset huge`', says='lists the presets (cpu, medium-512)'),
    Bad("unknown experiment id", "phase3", lambda d, w: _sweep(d, w, "--experiments", "GPT-99"),
        r"unknown experiment id\(s\) GPT-99: choose from GPT-01",
        example='`--experiments GPT-99`', says="lists the registry's ids"),
    Bad("unknown config field", "phase3", lambda d, w: _sweep(d, w, "--set", "learning_rate=1e-3"),
        r"unknown config field 'learning_rate'",
        example='`--set learning_rate=1e-3`', says='points to `oelm-ray train --help` for the fields'),
    Bad("d_model not divisible by n_head", "phase3", lambda d, w: _sweep(d, w, "--set", "d_model=33"),
        r"d_model=33 is not divisible by n_head=2: choose d_model as a multiple of n_head",
        example='`--set d_model=33`', says='asks for a multiple of n_head, with an example'),
    Bad("lr <= 0", "phase3", lambda d, w: _sweep(d, w, "--set", "lr=0"), r"lr=0.0 must be a finite number > 0",
        example='`--set lr=0`', says='lr must be a finite number > 0'),
    Bad("warmup_steps >= max_steps", "phase3", lambda d, w: _sweep(d, w, "--set", "warmup_steps=30"),
        r"warmup_steps=30 must be >= 0 and smaller than max_steps=30",
        example='`--set warmup_steps=30` (30 steps)', says='warmup must be smaller than max_steps'),
    Bad("seeds not integers", "phase3", lambda d, w: _sweep(d, w, "--seeds", "0,one"),
        r"--seeds '0,one' must be comma-separated whole numbers",
        example='`--seeds 0,one`', says='comma-separated whole numbers, e.g. 0,1,2'),
    Bad("seeds empty", "phase3", lambda d, w: _sweep(d, w, "--seeds", ","),
        r"--seeds ',' names no seed: give comma-separated",
        example='`--seeds ,`', says='give comma-separated whole numbers, or leave `--seeds` out for the preset\'s'),
    Bad("seed given twice", "phase3", lambda d, w: _sweep(d, w, "--seeds", "0,1,0"),
        r"--seeds '0,1,0' names seed 0 twice: .*list each seed once",
        example='`--seeds 0,1,0`', says='which seed repeats (two trials would share a name and folder)'),
    Bad("seed set as a field", "phase3", lambda d, w: _sweep(d, w, "--set", "seed=3"),
        r"--set seed=3: a sweep's seeds are its seed axis: use --seeds 3",
        example='`--set seed=3`', says='use `--seeds`'),
    Bad("experiment not in the preset", "phase3", lambda d, w: _sweep(d, w, "--experiments", "GPT-01"),
        r"--experiments GPT-01: not in --preset embedded, whose experiments are CPU-01, CPU-02, CPU-03, CPU-04",
        example='`--experiments GPT-01` with the embedded preset', says="lists the preset's experiments"),
    Bad("bad --set item", "phase3", lambda d, w: _sweep(d, w, "--set", "lr"), r"--set 'lr' must look like FIELD=VALUE",
        example='`--set lr`', says='FIELD=VALUE, with an example'),
    Bad("field given twice", "phase3", lambda d, w: _sweep(d, w, "--max-steps", "20", "--set", "max_steps=30"),
        r"--max-steps 20 and --set max_steps=30 set the same field: keep one",
        example='`--max-steps 20 --set max_steps=30`', says='the two spellings; keep one'),
    Bad("value of the wrong type", "phase3", lambda d, w: _sweep(d, w, "--set", "max_steps=1e3"),
        r"max_steps='1e3' is not a valid int: give a whole number, e.g. max_steps=1000",
        example='`--set max_steps=1e3`', says="the field's type, with an example"),
    Bad("negative GPUs per trial", "phase3", lambda d, w: _sweep(d, w, "--gpus-per-trial", "-1"),
        r"--gpus-per-trial -1 must be 0 \(CPU trials\), a share of one GPU from 0.0001 to 1 .*or a whole number",
        example='`--gpus-per-trial -1`', says='0, a share of one GPU, or whole GPUs (before Ray starts)'),
    Bad("fractional GPUs above one", "phase3", lambda d, w: _sweep(d, w, "--gpus-per-trial", "1.5"),
        r"--gpus-per-trial 1.5 must be 0 \(CPU trials\), a share of one GPU",
        example='`--gpus-per-trial 1.5`', says='0, a share of one GPU, or whole GPUs'),
    Bad("zero CPUs per trial", "phase3", lambda d, w: _sweep(d, w, "--cpus-per-trial", "0"),
        r"--cpus-per-trial 0 must be a number of CPUs of at least 0.0001",
        example='`--cpus-per-trial 0`', says='at least 0.0001 CPU (e.g. 1 or 0.5)'),
    Bad("zero trials per GPU", "phase3", lambda d, w: _sweep(d, w, "--trials-per-gpu", "0"),
        r"--trials-per-gpu 0 must be a whole number from 1 .* to 10000",
        example='`--trials-per-gpu 0`', says='a whole number from 1 to 10000'),
    Bad("trials per GPU and GPUs per trial", "phase3",
        lambda d, w: _sweep(d, w, "--trials-per-gpu", "2", "--gpus-per-trial", "1"),
        r"--trials-per-gpu 2 and --gpus-per-trial 1 both set each trial's GPU share: keep one",
        example='`--trials-per-gpu 2 --gpus-per-trial 1`', says='both set the GPU share: keep one'),
    Bad("negative retries", "phase3", lambda d, w: _sweep(d, w, "--max-failures", "-1"),
        r"--max-failures -1 must be a whole number >= 0",
        example='`--max-failures -1`', says=">= 0 (Tune's -1 would retry an always-crashing trial forever)"),
    Bad("run name with a path", "phase3", lambda d, w: _sweep(d, w, "--name", "../elsewhere"),
        r"--name '../elsewhere' must be one folder name under --storage: .*no '/' and no '..'",
        example="`--name ../elsewhere` (or `a/b`)", says="one folder name: letters, digits, '.', '_', '-'"),
    Bad("empty storage", "phase3", lambda d, w: [*_sweep(d, w), "--storage", ""], r"--storage '' is empty",
        example="`--storage ''`", says='give the folder or URI for the runs'),
    Bad("bad W&B project", "phase3", lambda d, w: [*_sweep(d, w), "--wandb-project", "team/project"],
        r"--wandb-project 'team/project' is not a W&B project name",
        example='`--wandb-project team/project`', says='1-128 characters, none of `/ \\ # ? % :`'),
    Bad("config field as a flag", "oelm-ray", lambda d, w: [*_train(d, w, "--out-dir", str(d / "x")), "--lr", "1e-3"],
        r"--lr is not a flag: set config fields with --set, e.g. --set lr=VALUE", usage=True,
        example='`oelm-ray train --lr 1e-3`', says='use `--set lr=...`'),
    Bad("token file truncated", "oelm-ray", lambda d, w: _train(d, w, "--out-dir", str(d / "x"), data_dir=d / "data"),
        r"train.bin is \d+ bytes, expected \d+ .*truncated or incomplete.*delete", setup=_truncate,
        example='train.bin cut short', says='the size it has and should have; delete and prepare again (`--force`)'),
    Bad("token file corrupted (checksum)", "oelm-ray",
        lambda d, w: _train(d, w, "--out-dir", str(d / "x"), data_dir=d / "data"),
        r"train.bin fails its sha256 checksum.*delete", setup=_flip,
        example='one byte of train.bin flipped', says='fails its sha256; delete and prepare again (`--force`)'),
    Bad("prepared with another tokenizer", "oelm-ray",
        lambda d, w: _train(d, w, "--out-dir", str(d / "x"), data_dir=d / "data"),
        r"was prepared with tokenizer 'gpt2', not 'bytes'", setup=_other_tokenizer,
        example='meta.json says gpt2, config says bytes', says='which tokenizer it was prepared with; delete and prepare again'),
    Bad("no prepared data (--no-prepare)", "oelm-ray",
        lambda d, w: _train(d, w, "--out-dir", str(d / "x"), "--no-prepare", data_dir=d / "nodata"),
        r"no prepared data at .*run `oelm-ray prepare --set dataset=stories tokenizer=bytes stories_mb=0.3 "
        r"--data-dir .*nodata`",
        example='empty `--data-dir`', says='the `oelm-ray prepare ...` command to run'),
    Bad("checkpoint from another model config", "oelm-ray",
        lambda d, w: _train(d, w, "--out-dir", str(d / "x"), "--resume", d_model=48),
        r"belongs to another model/corpus \(model.d_model: checkpoint 32 vs config 48", setup=_copy_run,
        example='`--resume --set d_model=48` on a d_model 32 run',
        says='the differing fields; resume with the original config or another `--out-dir`'),
    Bad("--resume with no checkpoint", "oelm-ray", lambda d, w: _train(d, w, "--out-dir", str(d / "x"), "--resume"),
        r"no checkpoint at .*latest.pt: run without --resume",
        example='`--resume` into an empty folder', says='run without `--resume`'),
    Bad("torn checkpoint", "oelm-ray", lambda d, w: _train(d, w, "--out-dir", str(d / "x"), "--resume"),
        r"latest.pt cannot be read .*delete it .* or restore it", setup=_torn_checkpoint,
        example='half a latest.pt', says='cannot be read; delete it or restore it from a copy'),
    Bad("out-dir holds a run, no --resume", "oelm-ray", lambda d, w: _train(d, w, "--out-dir", str(d / "x")),
        r"already holds a run: pass --resume to continue it, or choose another --out-dir", setup=_copy_run,
        example='train twice into one `--out-dir`', says='pass `--resume`, or choose another `--out-dir`; nothing overwritten'),
    Bad("GPU request, no GPUs", "phase3", lambda d, w: _sweep(d, w, "--gpus-per-trial", "1"),
        r"asks for 1 GPU\(s\) but the Ray cluster has 0.*Pass --gpus-per-trial 0", ray=True,
        example='`--gpus-per-trial 1` on a CPU-only Ray', says='the GPUs asked for and present; `--gpus-per-trial 0` or `--address`'),
    Bad("paper preset, no GPUs", "phase3", lambda d, w: ["--preset", "paper", "--no-wandb", "--storage", str(d / "runs")],
        r"--preset paper trains Medium-512 .* the Ray cluster has none: .*--gpus-per-trial 0 to train on CPUs on purpose",
        ray=True, example='`--preset paper` on a CPU-only Ray (no `--gpus-per-trial`)',
        says='it needs GPUs: `--address` a GPU cluster, or `--gpus-per-trial 0` on purpose'),
    Bad("unreachable RAY_ADDRESS", "subprocess", lambda d, w: _sweep(d, w),
        r"cannot reach the Ray cluster at 127.0.0.1:\d+ .*unset RAY_ADDRESS to run locally",
        env=lambda d: {"RAY_ADDRESS": f"127.0.0.1:{_closed_port()}"},
        example='`RAY_ADDRESS=127.0.0.1:<closed port>`', says='is the head up (`ray up`, `ray status`)? or unset RAY_ADDRESS'),
    Bad("malformed cluster.yaml", "oelm-ray", lambda d, w: ["check-cluster", str(d / "cluster.yaml")],
        r"cluster.yaml: not valid YAML at line \d+",
        setup=lambda d, w: (d / "cluster.yaml").write_text("cluster_name: x\nprovider: {type: local\n"),
        example='`oelm-ray check-cluster` on broken YAML', says='line and column of the syntax error'),
    Bad("run name exists with another config", "phase3", lambda d, w: _sweep(d, w, "--set", "lr=1e-3"),
        r"exists with a different sweep config \(differs in: CPU-01-baseline-s0: lr, .* more trials\).*choose another --name", setup=_existing_sweep,
        example='same `--name`, different `--set lr`', says='which part differs; the same command resumes, or another `--name`'),
    Bad("storage not writable", "phase3",
        lambda d, w: [*_sweep(d, w), "--storage", str(d / "file.txt" / "sub")],
        r"storage .*file.txt/sub is not writable .*pass --storage with a writable folder", setup=_blocked_storage,
        example='`--storage <regular file>/sub`', says='pass `--storage` with a writable folder'),
    Bad("disk full while writing results", "oelm-ray", lambda d, w: ["report", str(d / "run")],
        r"no space left on the device while writing .*trials.parquet .*previous trials.parquet is untouched",
        setup=_finished_report, patch=_disk_full,
        example='ENOSPC during `oelm-ray report`', says='the file, that its previous copy is untouched; free space and rerun'),
]


def bad_input_markdown() -> str:
    """The README's "Bad input" table, from BAD_INPUT."""
    entry = {"oelm-ray": "`oelm-ray`", "phase3": "`sweeps/*.py`", "subprocess": "`sweeps/*.py`"}
    rows = ["| bad input | example | command | the one-line message |", "|---|---|---|---|"]
    rows += [f"| {b.case} | {b.example} | {entry[b.entry]} | {b.says} |" for b in BAD_INPUT]
    return "\n".join(rows)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from oelm_ray.core.trainer import train

    root = tmp_path_factory.mktemp("world")
    cfg = make_config("cpu", **TINY, data_dir=str(root / "data"))
    data.prepare(cfg.data, progress=False)
    threads = torch.get_num_threads()
    try:
        train(cfg, root / "ckpt", log=quiet)
    finally:
        torch.set_num_threads(threads)
    return World(root, root / "data", root / "ckpt")


def _snapshot(*dirs: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("bad", BAD_INPUT, ids=[b.case for b in BAD_INPUT])
def test_bad_input_fails_in_one_line_before_any_work(bad: Bad, tmp_path, world, capsys, monkeypatch, request):
    d = tmp_path
    if bad.setup:
        bad.setup(d, world)
    if bad.ray:
        request.getfixturevalue("ray_local")
    argv = bad.argv(d, world)
    before = _snapshot(d, world.root)
    capsys.readouterr()
    t = time.perf_counter()
    if bad.entry == "subprocess":
        env = {**os.environ, **(bad.env(d) if bad.env else {})}
        r = subprocess.run([sys.executable, str(PHASE3), *argv], env=env, capture_output=True, text=True, timeout=300)
        rc, err, prefix, limit = r.returncode, r.stderr, "phase3: error: ", 120.0
    else:
        with monkeypatch.context() as mp_:
            if bad.patch:
                bad.patch(mp_)
            if not bad.ray:  # the check comes before Ray: joining or starting one here is a failure

                def no_ray(address):
                    raise AssertionError(f"{bad.case}: Ray was started before the bad input was found")
                mp_.setattr(sweep_mod, "connect", no_ray)
            try:
                if bad.entry == "oelm-ray":
                    rc = cli.main(argv)
                else:
                    rc = recipe.main("phase3", _phase3_presets(), argv)
            except SystemExit as e:  # argparse's own errors
                rc = e.code
        err, prefix, limit = capsys.readouterr().err, ("oelm-ray " if bad.entry == "oelm-ray" else "phase3: "), 30.0
    elapsed = time.perf_counter() - t
    lines = err.strip().splitlines()
    assert rc == 2, err
    if bad.usage:  # argparse: the usage, then `<prog>: error: <message>` as the last line
        lines, prefix = lines[-1:], "oelm-ray" if bad.entry == "oelm-ray" else "sweeps/phase3.py"
        assert err.startswith("usage: "), err
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix) and ": error: " in lines[0], lines[0]
    assert re.search(bad.expect, lines[0]), lines[0]
    assert elapsed < limit, f"took {elapsed:.1f}s: the check must come before any expensive work"
    after = _snapshot(d, world.root)
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not changed, f"touched: {changed}"
    created = [p for p in set(after) - set(before) if not p.endswith(".lock")]
    assert not created, f"created: {created}"  # no checkpoint, metrics or trial folder: nothing ran


def test_bad_input_table_has_enough_cases_and_matches_the_docs():
    assert len({b.case for b in BAD_INPUT}) == len(BAD_INPUT)
    assert all(b.example and b.says for b in BAD_INPUT)
    readme = (ROOT / "docs" / "reliability.md").read_text()
    assert bad_input_markdown() in readme


# ================================================================================================
# 3. divergence


@pytest.mark.slow
def test_diverging_trial_is_marked_and_the_sweep_goes_on(tmp_path, ray_local):
    blowup = Experiment("DIV-01", "cpu", {"method": "baseline", "lr": 1e6, "grad_clip": 0.0})
    sw = Sweep("div", [E.EMBEDDED["CPU-01"], blowup], [0], str(tmp_path / "runs"), common=smoke(tmp_path))
    run_dir = run(sw)
    df = pd.read_parquet(run_dir / "trials.parquet").set_index("name")
    assert df.loc[blowup.trial_name(0), "status"] == "diverged"
    assert df.loc[E.EMBEDDED["CPU-01"].trial_name(0), "status"] == "completed"
    assert df.loc[E.EMBEDDED["CPU-01"].trial_name(0), "steps"] == E.SMOKE["max_steps"]
    assert "diverged" in (run_dir / "summary.md").read_text()


# ================================================================================================
# 4. concurrency


def _prepare_in_child(cfg: dict) -> None:
    from oelm_ray.core.config import DataConfig

    data.prepare(DataConfig(**cfg), progress=False)


def test_four_processes_prepare_one_verified_copy(tmp_path):
    cfg = make_config("cpu", **smoke(tmp_path, stories_mb=0.2)).data
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_prepare_in_child, args=(vars(cfg),)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
        assert p.exitcode == 0
    root = tmp_path / "data"
    out = data.prepared_dir(cfg)
    assert [f.name for f in root.iterdir() if f.is_dir()] == [out.name]
    assert not [f.name for f in root.iterdir() if ".tmp" in f.name], "temp leftovers"
    assert sorted(f.name for f in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    data.verify_prepared(out, "full", tokenizer=cfg.tokenizer)


# ================================================================================================
# 5. security


def _python_files() -> list[Path]:
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                               capture_output=True, text=True).stdout.split()
    return [ROOT / f for f in files + untracked if (ROOT / f).exists()]


def unsafe_torch_loads(source: str) -> list[int]:
    """Lines of torch.load(...) calls without a literal weights_only=True."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            kw = {k.arg: k.value for k in node.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                bad.append(node.lineno)
    return bad


def test_every_torch_load_uses_weights_only():
    assert unsafe_torch_loads("import torch\ntorch.load(p)\ntorch.load(p, weights_only=False)\n") == [2, 3]
    files = _python_files()
    assert any(f.name == "checkpoint.py" for f in files)
    hits = {str(f.relative_to(ROOT)): lines for f in files if (lines := unsafe_torch_loads(f.read_text()))}
    assert not hits, f"torch.load without weights_only=True (unpickling can run code): {hits}"


SECRET_FILES = re.compile(r"(^|/)(\.netrc|\.env|auth_token|id_rsa|id_ed25519|credentials)$|\.(pem|key|p12)$")
SECRET_VALUES = [
    re.compile(r"(WANDB_API_KEY|api_key|token)\s*[=:]\s*[\"']?[0-9a-f]{32,}", re.I),  # W&B keys are 40 hex chars
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b(ghp|gho|hf)_[A-Za-z0-9]{20,}"),
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"RAY_AUTH_TOKEN\s*[=:]\s*[\"']?[A-Za-z0-9_\-]{16,}"),
    re.compile(r"\blocal-[0-9a-f]{40}\b"),  # a W&B local-server key
    re.compile(r"password\s*[=:]\s*[\"'][^\"'\s]{6,}[\"']", re.I),
]
_NOT_SOURCE = {".git", "__pycache__", ".pytest_cache", "runs", "data", "wandb"}


def project_files(root: Path) -> list[str]:
    """What the secret scan reads: in a git checkout, the tracked files and the untracked ones git does
    not ignore (about to be committed); elsewhere (an unpacked sdist, a copy) every file below root."""
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                       capture_output=True, text=True)
    if r.returncode == 0 and (root / ".git").exists():
        return sorted({f for f in r.stdout.split("\0") if f and (root / f).is_file()})
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not _NOT_SOURCE & set(p.relative_to(root).parts) and ".egg-info" not in str(p))


def secret_hits(root: Path) -> list[str]:
    """Key files by name, and API keys, tokens, private keys and passwords in the files' text."""
    hits = []
    for f in project_files(root):
        if SECRET_FILES.search(f):
            hits.append(f"{f}: a secret file")
        p = root / f
        if p.stat().st_size < 2_000_000:
            text = p.read_text(errors="ignore")
            hits += [f"{f}: {pat.pattern}" for pat in SECRET_VALUES if pat.search(text)]
    return hits


def test_no_secrets_in_the_repository():
    files = project_files(ROOT)
    assert {"README.md", "oelm_ray/tune/sweep.py", "tests/test_reliability.py"} <= set(files), files[:20]  # it reads the project
    hits = secret_hits(ROOT)
    assert not hits, hits


@pytest.mark.parametrize("git", [True, False], ids=["git-checkout", "plain-folder"])
def test_secret_scan_finds_planted_secrets(tmp_path, git):
    """The scan, file listing included, catches what it is for, in a git checkout and outside one."""
    hex40 = "0123456789abcdef" * 2 + "01234567"  # built at run time, so this file holds no key
    planted = {
        "wandb.cfg": "WANDB_API_KEY=" + hex40,
        "deploy/notes.md": "export RAY_AUTH_" + "TOKEN=" + "a1B2c3D4e5F6g7H8i9",
        "cluster/auth_token": "anything",
        "keys/head.pem": "-----BEGIN RSA PRIVATE" + " KEY-----\n",
        "wb.py": "key = 'local-" + hex40 + "'",
    }
    for name, text in {**planted, "clean.py": "token = os.environ['RAY_AUTH_TOKEN']\n"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    if git:
        subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
        subprocess.run(["git", "add", "wandb.cfg", "deploy", "cluster", "keys"], cwd=tmp_path, check=True)
        # wb.py stays untracked (about to be committed): the scan reads it too
    assert sorted({h.split(":")[0] for h in secret_hits(tmp_path)}) == sorted(planted)


_LISTEN_PROBE = """
import json, os, subprocess, sys
from oelm_ray.tune import resources
resources.connect(None)  # what `python sweeps/phase3.py` does on a laptop
import ray
ray.get(ray.remote(lambda: 1).remote())  # a worker up too
me = os.getpid()
kids = {}
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            kids.setdefault(int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]), []).append(int(p))
        except OSError:
            pass
mine, todo = {me}, [me]
while todo:
    for c in kids.get(todo.pop(), []):
        if c not in mine:
            mine.add(c); todo.append(c)
import psutil
rows = []
for p in mine:
    try:
        conns = psutil.Process(p).net_connections(kind="inet")
    except psutil.Error:  # exited meanwhile
        continue
    rows += [f"{c.laddr.ip}:{c.laddr.port} pid={p}" for c in conns if c.status == psutil.CONN_LISTEN]
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "listening": rows}))
ray.shutdown()
"""


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only(tmp_path):
    """The local Ray that `resources.connect(None)` starts (no RAY_* settings in the environment, as for
    a user) has no listening socket beyond 127.0.0.1, and no dashboard."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    ray_tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")
    env["RAY_TMPDIR"] = ray_tmp
    try:
        r = subprocess.run([sys.executable, "-c", _LISTEN_PROBE], env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["gcs"].startswith("127.0.0.1:"), out
    assert out["listening"], "found none of Ray's sockets: the probe is broken"
    loopback = re.compile(r"^(127\.0\.0\.1|::ffff:127\.0\.0\.1|::1):\d+ ")
    exposed = [row for row in out["listening"] if not loopback.match(row)]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert not [row for row in out["listening"] if ":8265 " in row], "the dashboard is up"


def test_docs_document_token_auth_for_clusters():
    readme = (ROOT / "docs" / "cluster.md").read_text()
    assert re.search(r"^## Cluster", readme, re.M), "docs/cluster.md has no Cluster section"
    assert "RAY_AUTH" in readme, "the Cluster section must say how token auth is set up (RAY_AUTH_MODE / RAY_AUTH_TOKEN)"


# ================================================================================================
# 6. determinism


def test_same_seed_same_numbers_in_one_process_and_across_processes(tmp_path, world):
    from oelm_ray.core.io import read_metrics
    from oelm_ray.core.trainer import train

    over = {**TINY, "max_steps": 20, "dropout": 0.1, "data_dir": str(world.data)}  # dropout: RNG in every step
    threads = torch.get_num_threads()
    try:
        for out, seed in (("a", 0), ("b", 0), ("other-seed", 1)):
            train(make_config("cpu", **over, seed=seed), tmp_path / out, log=quiet)
    finally:
        torch.set_num_threads(threads)
    a, b = (read_metrics(tmp_path / x / "metrics.jsonl") for x in ("a", "b"))
    assert len(a) == 2 and losses(a) == losses(b)
    wa = torch.load(tmp_path / "a" / "latest.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "latest.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # a different seed does differ (the comparison is not vacuous)
    assert losses(read_metrics(tmp_path / "other-seed" / "metrics.jsonl")) != losses(a)
    # a fresh interpreter (another day, or a Ray worker) gives the same numbers
    args = [sys.executable, "-m", "oelm_ray", *train_argv(max_steps=20, dropout=0.1), "--data-dir", str(world.data),
            "--out-dir", str(tmp_path / "c"), "--no-prepare"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert losses(read_metrics(tmp_path / "c" / "metrics.jsonl")) == losses(a)
