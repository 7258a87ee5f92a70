"""The searches end to end on local Ray: a candidate scores alike in a plain sweep and a search, early stopping stops, the lr_warmup and partial_unfreeze recipes' smoke runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from oelm_ray import results
from oelm_ray.tune import search

from helpers import BENCH_SEARCHERS as S
from helpers import PU_ARMS, ROOT, smoke_command


def run_recipe(name: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    # RAY_ADDRESS=local: a Ray of its own, never a cluster some other process left running on this machine
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "RAY_ADDRESS": "local"}
    proc = subprocess.run(
        smoke_command(name, tmp, *extra), env=env, capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sha-grid", "sha-phase"])
def test_a_candidate_scores_the_same_in_a_plain_sweep_and_in_a_search(tmp_path, ray_local, kind):
    # the searcher's seed (1 here) is not the trials' seed: every candidate trains with train_seed 0, as in the grid.
    # sha-grid (benchmarks/searchers.py) pauses and resumes trials at two rungs, sha-phase at one
    from oelm_ray.core import experiments as E
    from oelm_ray.tune.sweep import Sweep, run

    exp = E.get(["CPU-02"])[0]
    common = {**{k: v for k, v in E.SMOKE.items() if k != "warmup_steps"}, "data_dir": str(tmp_path / "data")}
    space = search.Space(lrs=[3e-3, 1e-2], warmup_fracs=[0.1, 0.3])  # 4 candidates x 30 steps
    # both sides: one CPU per trial, so num_threads 1 (the trainable derives it from the trial's CPUs)
    plain = Sweep(
        name="plain", experiments=[exp], seeds=[0], storage=str(tmp_path / "runs"), common=common, search=space.grid(30)
    )
    run(plain, report=False)
    base = Sweep(name="searched", experiments=[exp], seeds=[7], storage=str(tmp_path / "runs"), common=common)
    # sha-grid, rungs at 10 and 20 steps keeping half: trials pause and resume from their checkpoints;
    # sha-phase: the rung at 20 comes after the 10% warmup's lr is down to half its peak (step 17), so one rung, at
    # 10, keeping what 60% of the grid pays for ((72 - 40) // 20 = 1)
    cell = search.search_cells(
        base, space, seed=1, train_seed=0, grace_frac=0.34, reduction_factor=2, budget_frac=0.6, planner=S.planner(kind)
    )[0]

    def curves(run_dir):
        return {
            (r["config"]["train"]["lr"], r["config"]["train"]["warmup_steps"]): (
                r["seed"],
                r["config"]["train"]["num_threads"],
                [(h["step"], h["val/loss"]) for h in r["history"]],
            )
            for r in results.load_records(run_dir)
        }

    grid, searched = curves(plain.run_dir), curves(cell["run"])
    assert len(grid) == len(searched) == 4
    for cand, (seed, threads, hist) in searched.items():
        g_seed, g_threads, g_hist = grid[cand]
        assert (seed, threads) == (g_seed, g_threads) == (0, 0)
        # bit-identical val loss at every evaluation, across pauses (a stopped trial: a prefix of the grid's curve)
        assert hist and hist == g_hist[: len(hist)], cand
    pick = cell["best"]
    assert pick["final_val_ppl"] == math.exp(grid[(pick["lr"], pick["warmup_steps"])][2][-1][1])
    # synchronous halving: the best two at step 10 (on the grid's curves) reached step 20, the better of
    # those at step 20 finished; the other two stopped at 10
    at = lambda cand, step: dict(grid[cand][2])[step]
    top2 = sorted(grid, key=lambda c: at(c, 10))[:2]
    winner = min(top2, key=lambda c: at(c, 20)) if kind == "sha-grid" else top2[0]
    assert {c: h[-1][0] for c, (_, _, h) in searched.items()} == {
        c: 30 if c == winner else 20 if c in top2 and kind == "sha-grid" else 10 for c in grid
    }
    assert (pick["lr"], pick["warmup_steps"]) == winner


@pytest.fixture(scope="module")
def lr_warmup_smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lw")
    proc = run_recipe("lr_warmup", tmp, "--experiments", "CPU-01,CPU-02")
    return tmp / "runs", proc


@pytest.mark.slow
def test_lr_warmup_smoke_finds_best_and_compares_again(lr_warmup_smoke):
    runs, proc = lr_warmup_smoke
    final = runs / "lr_warmup-smoke"
    cells = json.loads((final / "best.json").read_text())["cells"]
    assert [c["method"] for c in cells] == ["baseline", "oelm_freeze"]
    for c in cells:
        assert c["best"] and c["trial_steps"] < c["grid_trial_steps"] == 6 * 30
        assert c["trials"] == 6  # every candidate started
    for f in ("summary.md", "trials.parquet", "val_ppl.png", "search.md"):
        assert (final / f).exists(), f
    df = results.trials_frame(results.load_records(final))
    assert sorted(df.experiment_id) == ["CPU-01-best", "CPU-02-best"]  # phase 2: each at its own best
    assert {(r.lr, r.warmup_steps) for r in df.itertuples()} == {
        (c["best"]["lr"], c["best"]["warmup_steps"]) for c in cells
    }
    assert "Learning-rate / warmup search" in proc.stdout and "share of grid" in proc.stdout


@pytest.mark.slow
def test_early_stopping_really_stops_trials(lr_warmup_smoke):
    runs, _ = lr_warmup_smoke
    recs = [r for cell in runs.glob("lr_warmup-smoke-search-*") for r in results.load_records(cell)]
    assert len(recs) == 12
    assert all(r["seed"] == 0 for r in recs)  # the search's training seed, not the comparison's seed 1
    stopped = [r for r in recs if r["status"] == "stopped"]
    assert stopped, [(r["name"], r["status"], r["history"][-1]["step"]) for r in recs]
    for r in stopped:
        assert r["history"][-1]["step"] < r["config"]["train"]["max_steps"]
    assert any(r["status"] == "completed" and r["history"][-1]["step"] == 30 for r in recs)


@pytest.mark.slow
def test_partial_unfreeze_smoke(tmp_path):
    proc = run_recipe("partial_unfreeze", tmp_path, "--seeds", "0")
    run_dir = tmp_path / "runs" / "partial_unfreeze-smoke"
    df = results.trials_frame(results.load_records(run_dir))
    assert sorted(df.experiment_id) == sorted(["CPU-01", "CPU-02", "PU-k1", *PU_ARMS])
    assert set(df.status) == {"completed"} and df[df.method != "baseline"].meets_criterion.notna().all()
    assert set(df.qk_check) == {"ok"}  # every arm's Q/K followed its own rule (periodic ones included)
    md = (run_dir / "summary.md").read_text()
    assert "Trainable parameters vs baseline" in md
    assert (
        "| PU-rand-train | oelm_random |" in md and "isolates the Q/K init scale" in md
    )  # a control row says what it isolates
    assert "saved vs baseline" in proc.stdout
