"""Faults, end to end on local Ray on CPU: a trial SIGKILLed at a random step, the driver SIGKILLed
mid-sweep, a node dying in a simulated multi-node cluster, a diverging trial: the sweep goes on and
the same command resumes it, bit-exact, losing nothing."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from oelm_ray import results
from oelm_ray.core import experiments as E
from oelm_ray.core.experiments import Experiment
from oelm_ray.tune.sweep import Sweep, run

import faults  # tests/faults.py: a trainable that crashes once, at a given step
from helpers import NINE_TRIALS, final_log, losses, smoke, smoke_command
from trial_files import state_files


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
    sw = Sweep(
        "kill",
        twins,
        [0],
        str(tmp_path / "runs"),
        common=smoke(tmp_path, **extra),
        # only TWIN-2 carries the fault: TWIN-1 is the uninterrupted reference
        trainable=faults.trainable,
        extra_config={
            "fault": tune.sample_from(lambda spec: fault if spec.config.trial["experiment"]["id"] == "TWIN-2" else None)
        },
    )
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
    cmd = smoke_command("phase3", tmp_path, *NINE_TRIALS)
    run_dir = tmp_path / "runs" / "phase3-smoke"
    ray_procs: dict[int, str] = {}
    try:
        proc = subprocess.Popen(
            cmd, env=stale, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
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
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
        },
    )
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
                if len(recs) == 2 and all(
                    r.get("history") and r["history"][-1]["step"] >= 200 and r["status"] == "running" for r in recs
                ):
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
