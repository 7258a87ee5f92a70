"""W&B logging, offline only: mode choice without network, training-step history, resume without
duplicates, sync and the sweep view. Runs are read back from their `.wandb` files."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from oelm_ray import results
from oelm_ray.core import experiments as E
from oelm_ray.core.config import ConfigError
from oelm_ray.tune import recipe
from oelm_ray.tune import wandb_logger as W
from oelm_ray.tune import wandb_sync as WS
from oelm_ray.tune.trial import TrialSpec

from helpers import phase3_presets, steps_of
from wandb_files import read_finished  # tests/wandb_files.py: .wandb files read back

PRESETS = phase3_presets()

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------
# mode


def test_no_key_means_offline_without_touching_the_network(no_key, capsys):
    assert not W.has_key()
    assert W.resolve_mode()[0] == "offline"
    cb = W.callback(project="p", group="g")
    assert cb is not None and cb.mode == "offline"
    cb.setup()  # Tune calls it when the sweep starts: the mode is said there, once
    out = capsys.readouterr().out
    assert out.count("W&B: offline") == 1 and "oelm-ray sync" in out


def test_user_mode_and_stored_key_are_respected(no_key, monkeypatch):
    (no_key / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    (no_key / ".netrc").chmod(0o600)
    assert W.has_key()  # what `wandb login` writes
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert W.resolve_mode()[0] == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert W.callback(project="p", group="g") is None
    # a key but an unreachable host (a closed loopback port): offline, not a failed sweep
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setattr(W, "url_reachable", lambda url, timeout=3.0: False)
    assert W.resolve_mode() == ("offline", "api.wandb.ai is not reachable")
    with socket.socket() as s:  # the real probe, on loopback only
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.undo()
    assert not W.url_reachable(f"http://127.0.0.1:{port}", timeout=1)


def test_recipe_builds_the_callback_unless_no_wandb(tmp_path, no_key):
    argv = ["--smoke-test", "--storage", str(tmp_path / "runs")]
    assert [
        type(c) for c in recipe.build("phase3", PRESETS, recipe.parser("phase3", PRESETS).parse_args(argv)).callbacks
    ] == [W.Callback]
    assert (
        recipe.build("phase3", PRESETS, recipe.parser("phase3", PRESETS).parse_args(argv + ["--no-wandb"])).callbacks
        == []
    )
    # --no-wandb also reaches the logger Tune restores with a resumed run: it decides its mode from WANDB_MODE
    # (a bad --set ends the recipe before any sweep starts; the mode is set by then)
    assert os.environ.get("WANDB_MODE") is None
    assert recipe.main("phase3", PRESETS, argv + ["--no-wandb", "--set", "lr=fast"]) == 2
    assert os.environ.pop("WANDB_MODE") == "disabled"


# ------------------------------------------------------------------------------------------------
# the callback, without Ray: step = training step, a resumed run adds no duplicate rows


class FakeTrial:
    """What the callback reads of a Tune trial: id, name, resolved config, the run folder."""

    def __init__(self, run_dir: Path, exp: str = "CPU-02"):
        spec = TrialSpec(E.EMBEDDED[exp], 0, E.EMBEDDED[exp].config(0, **E.SMOKE))
        self.trial_id, self.name, self.config = "trial_00000", spec.name, {"trial": spec.to_dict()}
        self.remote_experiment_path, self.local_experiment_path = str(run_dir), str(run_dir / "staging")

    def __str__(self):
        return self.name


def _result(it: int, step: int) -> dict:
    return {
        "training_iteration": it,
        "step": step,
        "val/ppl": 100.0 / step,
        "trial_id": "trial_00000",
        "hostname": "h",
        "node": "127.0.0.1",
        "done": False,
        "config": {"trial": {}},
        "qk_check": "ok",
    }


def test_callback_logs_at_the_training_step_and_a_restored_copy_adds_no_duplicates(
    tmp_path, no_key, monkeypatch, capsys
):
    t = FakeTrial(tmp_path)
    cb = W.callback(project="p", group="g")
    cb.setup()
    cb.on_trial_start(0, [t], t)
    state = pickle.dumps(cb)  # Tune pickles its callbacks into tuner.pkl: live runs stay out
    for it, step in ((1, 10), (2, 20)):
        cb.on_trial_result(it, [t], t, _result(it, step))
    cb.on_trial_start(0, [t], t)  # a retry in the same driver, from the step-10 checkpoint: the same run
    cb.on_trial_result(3, [t], t, _result(3, 20))
    cb.on_trial_error(0, [t], t)
    assert (tmp_path / "wandb" / W.STEPS_DIR / t.trial_id).read_text() == "20"
    assert W.read_meta(tmp_path) == {"project": "p", "entity": None, "group": "g", "mode": "offline"}

    # a new driver: Tune.restore unpickles the callback; setup() decides the mode again, as a fresh one
    restored = pickle.loads(state)
    assert restored.mode is None and not restored._open
    restored.setup()
    assert restored.mode == "offline" and capsys.readouterr().out.count("W&B: offline") == 2
    restored.on_trial_start(0, [t], t)
    for it, step in ((1, 20), (2, 30)):  # the restored trial re-reports step 20
        restored.on_trial_result(it, [t], t, _result(it, step))
    restored.on_trial_complete(0, [t], t)

    segs = WS.offline_runs(tmp_path)
    assert len(segs) == 2 and all(WS.offline_run_id(s) == "trial_00000" for s in segs)
    assert steps_of(tmp_path, "trial_00000") == [10, 20, 30]
    first, second = read_finished(segs[0]), read_finished(segs[1])
    assert [h["step"] for h in first["history"]] == [h["_step"] for h in first["history"]] == [10, 20]
    assert (first["exit_code"], second["exit_code"]) == (1, 0)  # the errored attempt is marked failed
    assert (first["id"], first["name"], first["group"], first["job_type"]) == (
        "trial_00000",
        t.name,
        "g",
        "oelm_freeze",
    )
    assert first["config"]["lr"] == E.EMBEDDED["CPU-02"].config(0, **E.SMOKE).train.lr
    assert first["config"]["hostname"] == "h" and first["config"]["node"] == "127.0.0.1"
    assert not any("hostname" in h or "done" in h or "trial" in first["config"] for h in first["history"])
    assert first["summary"]["qk_check"] == "ok" and not any("qk_check" in h for h in first["history"])

    # restored where W&B is now off: it logs nothing
    off = pickle.loads(state)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    off.setup()
    off.on_trial_start(0, [t], t)
    off.on_trial_result(1, [t], t, _result(1, 40))
    assert off.mode == "disabled" and not off._open and len(WS.offline_runs(tmp_path)) == 2


def test_online_init_failure_falls_back_to_offline_once(tmp_path, no_key, monkeypatch, capsys):
    import wandb

    real_init, modes = wandb.init, []

    def init(**kw):
        modes.append(kw["mode"])
        if kw["mode"] == "online":
            raise wandb.errors.CommError("host unreachable")  # the network went away after the mode check
        return real_init(**kw)

    monkeypatch.setattr(wandb, "init", init)
    cb = W.Callback(project="p", group="g", mode="online", why="API key found")
    cb.setup()
    a, b = FakeTrial(tmp_path), FakeTrial(tmp_path, "CPU-01")
    b.trial_id = "trial_00001"
    for t in (a, b):
        cb.on_trial_start(0, [t], t)
        cb.on_trial_result(1, [t], t, _result(1, 10))
        cb.on_trial_complete(0, [t], t)
    assert modes == ["online", "offline", "offline"]  # one failed attempt per sweep, not one wait per trial
    assert capsys.readouterr().out.count("online init failed") == 1
    assert [WS.offline_run_id(s) for s in WS.offline_runs(tmp_path)] == ["trial_00000", "trial_00001"]
    assert W.read_meta(tmp_path)["mode"] == "offline"  # so finish_sweep says to `oelm-ray sync`, which uploads them


# ------------------------------------------------------------------------------------------------
# sync and the sweep view (no server: `wandb sync` and `wandb.sweep` are stand-ins)


def test_sync_uploads_offline_runs_then_publishes_table_and_sweep(tmp_path, monkeypatch, no_key):
    run_dir = tmp_path / "run"
    (run_dir / "wandb").mkdir(parents=True)
    (run_dir / "wandb" / W.META).write_text('{"project": "proj", "entity": null, "group": "run", "mode": "offline"}')
    for tid in ("a_00000", "a_00001"):
        seg = run_dir / "wandb" / f"offline-run-20260101_000000-{tid}"
        seg.mkdir()
        (seg / f"run-{tid}.wandb").write_bytes(b":W&B")
    recs = [
        {
            "name": f"CPU-0{i}-m-s0",
            "trial_id": f"a_0000{i - 1}",
            "experiment_id": f"CPU-0{i}",
            "seed": 0,
            "method": m,
            "dataset": "stories",
            "config": {"model": {"method": m, "d_model": 32}, "train": {"lr": 1e-3}},
            "status": "completed",
            "history": [{"step": 10, "tokens": 1280, "val/ppl": 9.0, "val/loss": 2.2, "step_time_s": 0.01}],
        }
        for i, m in ((1, "baseline"), (2, "oelm_freeze"))
    ]
    for r in recs:
        results.write_record(run_dir, r)
    results.write_report(run_dir)

    with pytest.raises(ConfigError, match="wandb login"):
        WS.sync(run_dir)  # no key: a clear message, nothing uploaded
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    calls, sweeps = [], []
    real_run = subprocess.run

    def fake_run(cmd, *a, **kw):  # `wandb sync` only: W&B's own subprocesses (git, its service) run for real
        if cmd[1:4] != ["-m", "wandb", "sync"]:
            return real_run(cmd, *a, **kw)
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(WS.subprocess, "run", fake_run)
    import wandb

    real_init = wandb.init
    monkeypatch.setattr(wandb, "init", lambda **kw: real_init(**{**kw, "mode": "offline"}))  # never online in tests
    monkeypatch.setattr(wandb, "sweep", lambda cfg, **kw: sweeps.append((cfg, kw)) or "swp123")
    WS.sync(run_dir)
    assert calls and calls[0][2:6] == ["wandb", "sync", "--project", "proj"] and len(calls[0]) == 8
    ((cfg, kw),) = sweeps
    assert kw["prior_runs"] == ["a_00000", "a_00001"] and kw["project"] == "proj"
    assert cfg["parameters"]["method"] == {"values": ["baseline", "oelm_freeze"]} and "d_model" not in cfg["parameters"]
    assert W.read_meta(run_dir)["sweep_id"] == "swp123"
    report = [s for s in WS.offline_runs(run_dir) if "report-" in s.name]
    assert len(report) == 1
    rows = read_finished(report[0])["history"]
    assert rows and rows[0]["trials/_type"] == "table-file" and rows[0]["trials/nrows"] == 2
    # a `wandb sync` that hangs ends in one line within its timeout
    monkeypatch.setattr(WS, "SYNC_TIMEOUT_S", 0.5)
    monkeypatch.setattr(
        WS.subprocess,
        "run",
        lambda cmd, *a, **kw: real_run([sys.executable, "-c", "import time; time.sleep(30)"], **kw),
    )
    with pytest.raises(ConfigError, match=r"`wandb sync` of .* did not finish within 0.5s"):
        WS.sync(run_dir)


# ------------------------------------------------------------------------------------------------
# end to end on local Ray
