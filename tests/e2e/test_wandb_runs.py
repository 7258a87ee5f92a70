"""W&B end to end: a smoke sweep without a key logs one offline run per trial; retried and restored trials continue their run."""

from __future__ import annotations

import pytest

from oelm_ray import results
from oelm_ray.core import experiments as E
from oelm_ray.tune import recipe
from oelm_ray.tune import wandb_logger as W
from oelm_ray.tune import wandb_sync as WS
from oelm_ray.tune.sweep import Sweep, run

import faults  # tests/faults.py: a trainable that crashes once, at a given step
from helpers import phase3_presets, steps_of
from wandb_files import read_finished  # tests/wandb_files.py: .wandb files read back

PRESETS = phase3_presets()


@pytest.mark.slow
def test_smoke_sweep_without_key_logs_one_offline_run_per_trial(tmp_path, ray_local, no_key, capsys):
    argv = ["--smoke-test", "--storage", str(tmp_path / "runs"), "--experiments", "CPU-01,CPU-02", "--seeds", "0"]
    sw = recipe.build("phase3", PRESETS, recipe.parser("phase3", PRESETS).parse_args(argv))
    run_dir = run(sw, report=True)
    WS.finish_sweep(run_dir)
    captured = capsys.readouterr()
    out = captured.out
    assert out.count("W&B: offline (no W&B API key") == 1 and f"oelm-ray sync {run_dir}" in out
    # W&B itself prints nothing into the sweep's console (no banner or run summary per trial)
    assert "wandb:" not in out + captured.err
    records = results.load_records(run_dir)
    segs = WS.offline_runs(run_dir)
    assert len(records) == len(segs) == 2
    for rec in records:
        (seg,) = [s for s in segs if WS.offline_run_id(s) == rec["trial_id"]]
        r = read_finished(seg)
        method = rec["method"]
        assert (r["id"], r["name"], r["group"], r["job_type"]) == (rec["trial_id"], rec["name"], "phase3-smoke", method)
        assert r["project"] == "oelm-ray" and r["tags"] == ["stories", method, "seed=0", "protocol"]
        cfg = r["config"]
        for k in (
            "method",
            "dataset",
            "lr",
            "warmup_steps",
            "max_steps",
            "seed",
            "qk_freeze_layers",
            "qk_unfreeze_step",
            "qk_lr_mult",
            "qk_random_std",
            "d_model",
            "n_layer",
            "n_head",
        ):
            assert k in cfg, k
        assert (cfg["experiment_id"], cfg["method"], cfg["d_model"], cfg["max_steps"]) == (
            rec["experiment_id"],
            method,
            32,
            30,
        )
        assert cfg["role"] == "protocol" and cfg["qk_std"] == 0.02
        hist = [h for h in r["history"] if "val/ppl" in h]
        assert (
            [h["_step"] for h in hist] == [h["step"] for h in hist] == [10, 20, 30]
        )  # the training step, not training_iteration
        assert [h["val/ppl"] for h in hist] == pytest.approx([h["val/ppl"] for h in rec["history"]])


@pytest.mark.slow
def test_retried_and_restored_trials_continue_their_run(tmp_path, ray_local, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    one = [E.EMBEDDED["CPU-02"]]
    common = {**E.SMOKE, "data_dir": str(tmp_path / "data")}

    def sweep(name, fault=None, max_failures=2):
        return Sweep(
            name,
            one,
            [0],
            str(tmp_path / "runs"),
            common=common,
            max_failures=max_failures,
            callbacks=[W.callback(project="p", group=name)],
            trainable=faults.trainable,
            extra_config={"fault": {"step": 20, "marker": str(tmp_path / f"{name}.crashed")}} if fault else {},
        )

    # crash at step 20, retried in the same Tuner from the step-10 checkpoint: one run, one history
    retried = run(sweep("retried", fault=True), report=False)
    (rec,) = results.load_records(retried)
    assert rec["status"] == "completed" and (tmp_path / "retried.crashed").exists()
    assert len(WS.offline_runs(retried)) == 1
    assert steps_of(retried, rec["trial_id"]) == [10, 20, 30]

    # crash with no retries left, then the same command again: Tuner.restore continues the same W&B run
    restored = run(sweep("restored", fault=True, max_failures=0), report=False)
    (rec,) = results.load_records(restored)
    assert rec["status"] == "error" and steps_of(restored, rec["trial_id"]) == [10]
    run(sweep("restored", fault=True, max_failures=0), report=False)  # same param_space; the fault fired already
    (rec2,) = results.load_records(restored)
    assert rec2["status"] == "completed" and rec2["trial_id"] == rec["trial_id"]
    segs = WS.offline_runs(restored)
    assert len(segs) == 2 and all(WS.offline_run_id(s) == rec["trial_id"] for s in segs)  # two segments, one run id
    assert steps_of(restored, rec["trial_id"]) == [10, 20, 30]  # `wandb sync` replays them in order: no duplicates
