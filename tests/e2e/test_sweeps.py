"""Whole sweeps on local Ray, end to end: the smoke matrix, a crashed trial, an interrupted sweep, the paper recipe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest

from oelm_ray import results
from oelm_ray.core import experiments as E
from oelm_ray.tune import recipe
from oelm_ray.tune.sweep import Sweep, run

import faults  # tests/faults.py: a trainable that crashes once, at a given step
from helpers import NINE_TRIALS, smoke_command, smoke_sweep
from trial_files import state_files

COLUMNS = [
    "experiment_id",
    "dataset",
    "method",
    "seed",
    "lr",
    "warmup_steps",
    "max_steps",
    "best_val_ppl",
    "final_val_ppl",
    "gap_vs_baseline_pct",
    "meets_criterion",
    "trainable_params",
    "total_params",
    "tokens_per_s",
    "mean_step_time_s",
    "wall_time_s",
    "status",
]


@pytest.mark.slow
def test_smoke_sweep_runs_the_matrix_and_writes_results(tmp_path, ray_local):
    run_dir = run(smoke_sweep(tmp_path, "smoke"))
    df = pd.read_parquet(run_dir / "trials.parquet")
    assert len(df) == 8 and set(COLUMNS) <= set(df.columns)
    assert set(df.status) == {"completed"} and set(df.qk_check) == {"ok"}
    assert sorted(df.method.unique()) == ["baseline", "oelm_freeze", "oelm_random"]
    # the scale-matched control follows the smoke model's d_model, and the table says it is a control
    ctl = df[df.experiment_id == "CPU-04"]
    assert set(ctl.role) == {"control"} and set(ctl.qk_random_std) == {E.SMOKE["d_model"] ** -0.5}
    assert set(df[df.experiment_id == "CPU-03"].qk_random_std) == {0.02}
    frozen = df[df.method != "baseline"]
    # each frozen trial's gap is against the baseline of its own seed (the two baselines differ, so pairing matters)
    base = df[df.method == "baseline"].set_index("seed").best_val_ppl
    assert base[0] != base[1]
    for _, r in frozen.iterrows():
        assert r.gap_vs_baseline_pct == pytest.approx(100 * (r.best_val_ppl / base[r.seed] - 1))
    assert (frozen.trainable_params < df[df.method == "baseline"].trainable_params.iloc[0]).all()
    assert (df.steps == E.SMOKE["max_steps"]).all()
    assert "CPU-02" in (run_dir / "summary.md").read_text()
    assert (run_dir / "val_ppl.png").read_bytes()[:4] == b"\x89PNG"
    # names are readable and match the registry
    assert set(df.name) == {e.trial_name(s) for e in E.EMBEDDED.values() for s in (0, 1)}


@pytest.mark.slow
def test_crashed_trial_resumes_from_checkpoint_with_identical_metrics(tmp_path, ray_local):
    one = [E.EMBEDDED["CPU-02"]]
    clean = run(
        Sweep("clean", one, [0], str(tmp_path / "runs"), common={**E.SMOKE, "data_dir": str(tmp_path / "data")}),
        report=False,
    )
    marker = tmp_path / "crashed-once"
    faulty = run(
        Sweep(
            "faulty",
            one,
            [0],
            str(tmp_path / "runs"),
            common={**E.SMOKE, "data_dir": str(tmp_path / "data")},
            trainable=faults.trainable,
            extra_config={"fault": {"step": 20, "marker": str(marker)}},
        ),
        report=False,
    )
    assert marker.exists(), "the fault was never injected"
    name = one[0].trial_name(0)
    a = results.read_record(results.record_path(clean, name))
    b = results.read_record(results.record_path(faulty, name))
    assert b["status"] == a["status"] == "completed"
    assert [h["step"] for h in b["history"]] == [10, 20, 30]
    # resumed from the step-10 checkpoint: the losses after it are bit-for-bit the clean run's
    assert [h["val/loss"] for h in b["history"]] == [h["val/loss"] for h in a["history"]]
    assert [h["train/loss"] for h in b["history"]] == [h["train/loss"] for h in a["history"]]


@pytest.mark.slow
def test_interrupted_sweep_resumes_with_the_same_command(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = smoke_command("phase3", tmp_path, *NINE_TRIALS)
    run_dir = tmp_path / "runs" / "phase3-smoke"
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    deadline = time.time() + 240
    done_before: set[str] = set()
    while time.time() < deadline:
        recs = results.load_records(run_dir)
        done_before = {r["name"] for r in recs if r["status"] == "completed"}
        if len(done_before) >= 2:
            break
        time.sleep(0.5)
    assert len(done_before) >= 2, "the sweep never got going"
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
    first_out, _ = proc.communicate(timeout=120)
    unfinished = {r["name"] for r in results.load_records(run_dir) if r["status"] != "completed"}
    assert unfinished or len(results.load_records(run_dir)) < 9, first_out[-2000:]
    finished_files = state_files(run_dir, done_before)

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming" in second.stdout
    recs = results.load_records(run_dir)
    assert len(recs) == 9 and {r["status"] for r in recs} == {"completed"}
    # finished trials were not run again: their train.log, latest.pt, metrics.jsonl are untouched
    assert state_files(run_dir, done_before) == finished_files
    assert len(pd.read_parquet(run_dir / "trials.parquet")) == 9


@pytest.mark.slow
def test_paper_recipe_smoke_on_cpu_through_gpt2_tokens(tmp_path, ray_local, gpt2_ranks, capsys):
    """`sweeps/phase3.py --preset paper --smoke-test --gpus-per-trial 0 --set dataset=stories`, in-process on
    the shared local Ray. The dataset override turns every paper experiment into a stories one (GPT-04..07
    too); `--experiments` keeps the TinyStories three, GPT-01..03, each with the paper's method and lr."""
    from helpers import phase3_presets as _phase3_presets

    argv = [
        "--preset",
        "paper",
        "--smoke-test",
        "--gpus-per-trial",
        "0",
        "--set",
        "dataset=stories",
        "--set",
        f"gpt2_ranks={gpt2_ranks}",
        "--experiments",
        "GPT-01,GPT-02,GPT-03",
        "--no-wandb",
        "--storage",
        str(tmp_path / "runs"),
    ]
    rc = recipe.main("phase3", _phase3_presets(), argv)
    assert rc == 0, capsys.readouterr().err[-3000:]
    run_dir = tmp_path / "runs" / "phase3-smoke"
    df = pd.read_parquet(run_dir / "trials.parquet").set_index("name")
    assert sorted(df.index) == ["GPT-01-baseline-s0", "GPT-02-oelm_freeze-s0", "GPT-03-oelm_random-s0"]
    assert set(df.status) == {"completed"} and (df.steps == E.SMOKE["max_steps"]).all()
    assert df.lr.to_dict() == {"GPT-01-baseline-s0": 3e-4, "GPT-02-oelm_freeze-s0": 1e-3, "GPT-03-oelm_random-s0": 1e-3}
    for name in df.index:
        cfg = results.read_record(results.record_path(run_dir, name))["config"]
        assert cfg["data"]["tokenizer"] == "gpt2" and cfg["data"]["dataset"] == "stories"
        assert cfg["model"]["vocab_size"] == 50257
        assert " on cpu;" in (run_dir / name / "state" / "train.log").read_text()
    # the tokens the trials trained on are GPT-2's (ids beyond the 257 bytes), prepared once
    (prepared,) = [p for p in (tmp_path / "runs" / "data").iterdir() if p.is_dir()]
    assert prepared.name.endswith("-gpt2")
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    assert np.fromfile(prepared / "train.bin", dtype=np.uint16).max() > 256
    # the frozen methods train fewer parameters than the baseline of the same (vocab 50257) model
    assert (df.total_params > 50257 * E.SMOKE["d_model"]).all()
    assert (
        df.trainable_params[["GPT-02-oelm_freeze-s0", "GPT-03-oelm_random-s0"]]
        < df.trainable_params["GPT-01-baseline-s0"]
    ).all()
