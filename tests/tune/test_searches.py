"""The lr/warmup search, its report and the partial-unfreeze recipe: seeded searcher, early stopping, smoke runs.
The alternative searchers benchmarks/search_efficiency.py compares it with (benchmarks/searchers.py) too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oelm_ray import results, search_report
from oelm_ray.core.config import ConfigError, make_config
from oelm_ray.core.experiments import Experiment
from oelm_ray.tune import search

from helpers import BENCH_SEARCHERS as S
from helpers import PU_ARMS, load_module

ROOT = Path(__file__).resolve().parents[2]


def load_recipe(name: str):
    return load_module(ROOT / "sweeps" / f"{name}.py", f"recipe_{name}")


# ------------------------------------------------------------------------------------------------
# fast: no training


def test_seeded_searcher_proposes_the_same_configurations_twice():
    space = search.Space(lrs=search.log_spaced(5.6e-4, 1e-2, 6), warmup_fracs=[0.02, 0.1, 0.3])

    def proposals(seed: int) -> list[dict]:
        s = S.tpe(seed, n_startup=4)
        assert s.set_search_properties(None, None, {"search": space.domains(1000)})
        return [s.suggest(f"t{i}") for i in range(8)]

    a, b = proposals(0), proposals(0)
    assert a == b
    assert all(p["search"]["lr"] in space.lrs and p["search"]["warmup_steps"] in (20, 100, 300) for p in a)
    assert proposals(1) != a  # the seed, not a constant, fixes them


def test_every_candidate_starts_once_in_a_seeded_order():
    space = search.Space(lrs=search.log_spaced(2e-3, 3.2e-2, 5), warmup_fracs=[0.03, 0.1, 0.3, 0.6])
    a, b, c = (search.grid_order(space, 300, s) for s in (0, 0, 1))
    key = lambda cands: [(x["lr"], x["warmup_steps"]) for x in cands]
    assert key(a) == key(b) and key(a) != key(c)  # the seed, and only the seed, fixes the order
    assert sorted(key(a)) == sorted(key(c)) == sorted((lr, w) for lr in space.lrs for w in space.warmups(300))
    gen = search.every_candidate(space, 300, 0)
    assert [p["trial"]["config"]["train"] for p in gen._points_to_evaluate] == a  # at the fields they set


def test_sync_halving_waits_for_the_whole_field_then_keeps_the_best_quarter():
    assert search.halving_rungs(300, 30, 0.2, 4) == [60, 240]
    assert search.halving_rungs(30, 10, 0.34, 3) == [10]

    class T:
        def __init__(self, i):
            self.trial_id, self.status = f"t{i}", "RUNNING"

    class Ctl:
        stopped: list = []

        def get_trials(self):
            return trials

        def stop_trial(self, t):
            self.stopped.append(t)
            t.status = "TERMINATED"

    trials, ctl = [T(i) for i in range(8)], Ctl()
    sched = search.SyncHalving(8, search.halving_rungs(300, 30, 0.2, 4), 4)
    loss = [5.0, 1.0, 4.0, 2.0, 6.0, 3.0, 7.0, 8.0]  # at step 60: t1 and t3 are the best quarter
    for t in trials[:7]:
        assert sched.on_trial_result(ctl, t, {"step": 30, "val/loss": 0.0}) == "CONTINUE"  # before the rung
        assert sched.on_trial_result(ctl, t, {"step": 60, "val/loss": loss[int(t.trial_id[1:])]}) == "PAUSE"
        t.status = "PAUSED"
    assert sched.choose_trial_to_run(ctl) is None  # nobody goes on before the last trial reports
    last = trials[7]
    assert sched.on_trial_result(ctl, last, {"step": 60, "val/loss": 8.0}) == "STOP"  # the worst: stopped at once
    assert {t.trial_id for t in ctl.stopped} == {"t0", "t2", "t4", "t5", "t6"}
    assert {sched.choose_trial_to_run(ctl).trial_id for _ in range(2)} == {"t1", "t3"}  # the promoted resume
    assert sched.choose_trial_to_run(ctl) is None
    for t in (trials[1], trials[3]):
        t.status = "RUNNING"
        assert sched.on_trial_result(ctl, t, {"step": 90, "val/loss": 0.5}) == "CONTINUE"
    # next rung (240): one of the two goes on; a trial that diverged before it counts as the worst
    assert sched.on_trial_result(ctl, trials[3], {"step": 240, "val/loss": 0.4}) == "PAUSE"
    trials[3].status = "PAUSED"
    sched.on_trial_complete(ctl, trials[1], {})  # t1 ended (diverged) before 240
    assert sched.choose_trial_to_run(ctl) is trials[3]

    # a field that can never fill (scheduler state is not restored on resume): once nobody runs, the
    # rung is decided among the trials that reached it instead of waiting forever
    trials, ctl = [T(i) for i in range(4)], Ctl()
    sched = search.SyncHalving(5, search.halving_rungs(300, 30, 0.2, 2), 2)
    for t, v in zip(trials, (3.0, 1.0, 2.0, 4.0)):
        assert sched.on_trial_result(ctl, t, {"step": 60, "val/loss": v}) == "PAUSE"
        t.status = "PAUSED"
    assert sched.choose_trial_to_run(ctl) in (trials[1], trials[2])
    assert {t.trial_id for t in trials if t.status == "TERMINATED"} == {"t0", "t3"}

    # a rung decided while two trials' pauses are still in flight (Tune pauses after saving): the loser is
    # stopped and the winner resumed once they are paused, instead of both waiting forever
    trials, ctl = [T(i) for i in range(4)], Ctl()
    sched = search.SyncHalving(4, search.halving_rungs(300, 30, 0.2, 2), 2)
    for t, v in zip(trials[:3], (1.0, 4.0, 3.0)):
        assert sched.on_trial_result(ctl, t, {"step": 60, "val/loss": v}) == "PAUSE"  # t0..t2 still RUNNING
    assert sched.on_trial_result(ctl, trials[3], {"step": 60, "val/loss": 2.0}) == "CONTINUE"  # t3 and t0 go on
    assert trials[1].status == trials[2].status == "RUNNING"  # nothing to stop yet: they are still pausing
    for t in trials[:3]:
        t.status = "PAUSED"  # the pauses land
    assert sched.choose_trial_to_run(ctl) is trials[0]
    assert trials[1].status == trials[2].status == "TERMINATED"


def test_sha_phase_decides_only_before_annealing_and_keeps_what_the_budget_pays_for():
    space = search.Space(lrs=search.log_spaced(4e-3, 6.4e-2, 5), warmup_fracs=[0.1, 0.3, 0.6, 0.9, 0.99])
    # the 10% warmup's cosine is down to half its peak at step 30 + 270 / 2 = 165: the rung at 240 (80%),
    # where annealed candidates met ones still near their peak, is gone
    assert search.annealing_starts(space, 300) == 165
    assert search.annealing_starts(space, 300, min_lr_frac=0.6) == 300  # never below half: rungs anywhere
    rungs, keeps = search.phase_plan(25, 300, 30, 0.2, 4, 0.4, 165)
    assert (rungs, keeps) == ([60], [6])  # 25 x 60 + 6 x 240 = 2,940 <= 0.4 x 7,500
    assert search.phase_plan(25, 300, 30, 0.2, 4, 0.5, 165) == ([60], [9])  # a larger budget keeps more
    assert search.phase_plan(25, 300, 30, 0.2, 4, 0.4, 60) == ([], [])  # nothing before annealing: the full grid
    # two rungs before annealing starts: the first keeps a quarter, the last what the budget leaves
    assert search.phase_plan(25, 1000, 50, 0.1, 4, 0.3, 600) == ([100, 400], [7, 4])  # (7,500 - 4,600) // 600
    assert search.phase_plan(25, 1000, 50, 0.1, 4, 0.4, 600) == ([100, 400], [7, 7])  # never more than reach it
    # the searcher builds exactly that scheduler; the benchmark's sha-grid keeps every halving rung
    n, _, sched = search.plan(space, 300, 30)
    assert n == 25 and (sched.rungs, sched.keeps) == ([60], [6])
    assert S.plan("sha-grid", space, 300, 30)[2].rungs == [60, 240]
    assert S.plan("sha-phase", space, 300, 30)[2].keeps == [6]  # the benchmark's sha-phase is the product's
    with pytest.raises(ConfigError, match="budget_frac"):
        search.plan(space, 300, 30, budget_frac=0)

    class T:
        def __init__(self, i):
            self.trial_id, self.status = f"t{i}", "RUNNING"

    trials = [T(i) for i in range(25)]
    ctl = type(
        "Ctl", (), {"get_trials": lambda self: trials, "stop_trial": lambda self, t: setattr(t, "status", "TERMINATED")}
    )()
    for i, t in enumerate(trials[:24]):
        assert sched.on_trial_result(ctl, t, {"step": 60, "val/loss": float((7 * i) % 25)}) == "PAUSE"
        t.status = "PAUSED"
    assert sched.on_trial_result(ctl, trials[24], {"step": 60, "val/loss": float((7 * 24) % 25)}) == "STOP"
    trials[24].status = "TERMINATED"
    while (t := sched.choose_trial_to_run(ctl)) is not None:
        t.status = "RUNNING"
    kept = {t.trial_id for t in trials if t.status == "RUNNING"}
    assert kept == {f"t{i}" for i in range(25) if (7 * i) % 25 < 6}  # the best six at step 60 train to the end
    assert all(
        sched.on_trial_result(ctl, t, {"step": 270, "val/loss": 0.0}) == "CONTINUE"
        for t in trials
        if t.status == "RUNNING"
    )

    # an exact tie at the rung (same warmup slope: the same curve so far) is broken by config, not by arrival
    def survivor(order):
        ts = [T(i) for i in order]
        for t in ts:
            t.config = {"trial": {"config": {"train": {"lr": 8e-3 * (1 + t.trial_id[1:].count("1"))}}}}
        tie = search.SyncHalving(2, [60], 2)
        tie.on_trial_result(ctl, ts[0], {"step": 60, "val/loss": 1.0})
        return (
            ts[1].trial_id
            if tie.on_trial_result(ctl, ts[1], {"step": 60, "val/loss": 1.0}) == "CONTINUE"
            else ts[0].trial_id
        )

    assert survivor([0, 1]) == survivor([1, 0]) == "t0"

    # resumed (the scheduler's state is not restored): only 10 of the 25 can still reach the rung; once nobody
    # runs, it is decided among them, keeping its planned share: ceil(6 x 10 / 25) = 3, the best three
    trials = [T(i) for i in range(10)]
    sched = search.plan(space, 300, 30)[2]
    for i, t in enumerate(trials):
        assert sched.on_trial_result(ctl, t, {"step": 60, "val/loss": float(9 - i)}) == "PAUSE"
        t.status = "PAUSED"
    assert sched.choose_trial_to_run(ctl) in trials[7:]
    assert {t.trial_id for t in trials if t.status != "TERMINATED"} == {"t7", "t8", "t9"}


def test_every_experiment_gets_its_own_search(tmp_path):
    """CPU-03 and its control CPU-04 are both oelm_random on stories: each has a search run of its own, so
    neither cell can report the other's best as its own."""
    from oelm_ray.core import experiments as E
    from oelm_ray.core.io import write_json
    from oelm_ray.tune.sweep import Sweep

    base = Sweep(name="lw", experiments=list(E.EMBEDDED.values()), seeds=[1], storage=str(tmp_path))
    names = {search.cell_name(base, e) for e in base.experiments}
    assert len(names) == len(base.experiments)
    # a finished search is kept only if it is this search: another sweep under the name is refused
    space = search.Space(lrs=[1e-3], warmup_fracs=[0.1])
    other = Sweep(
        name=search.cell_name(base, E.EMBEDDED["CPU-04"]),
        experiments=[E.EMBEDDED["CPU-03"]],
        seeds=[0],
        storage=str(tmp_path),
    )
    write_json(other.run_dir / "sweep.json", other.identity())
    with pytest.raises(ConfigError, match="different sweep config"):
        search.search_cells(
            Sweep(name="lw", experiments=[E.EMBEDDED["CPU-04"]], seeds=[1], storage=str(tmp_path)), space
        )


def test_space_grid_and_cost_bookkeeping():
    space = search.Space(lrs=[1e-3, 2e-3, 4e-3], warmup_fracs=[0.1, 0.3])
    assert space.size(1000) == 6 and space.warmups(1000) == [100, 300]
    assert space.grid(1000)["lr"] == {"grid_search": [1e-3, 2e-3, 4e-3]}
    from oelm_ray.tune.sweep import _describe

    # stable across calls (and processes): the same command resumes only if sweep.json matches
    assert _describe(space.domains(1000)["lr"]) == _describe(space.domains(1000)["lr"])
    assert _describe(space.domains(1000)["lr"])["categories"] == [1e-3, 2e-3, 4e-3]
    assert search.log_spaced(1e-4, 1e-2, 3) == [1e-4, 1e-3, 1e-2]
    sched = S.asha(1000, 200)
    assert sched._time_attr == "step" and sched._max_t == 1000

    def rec(name, lr, steps, ppl, status):
        hist = [
            {"step": s, "val/ppl": ppl + (steps - s) / 100, "trainable_params": 10} for s in range(200, steps + 1, 200)
        ]
        return {
            "name": name,
            "experiment_id": "CPU-01",
            "dataset": "stories",
            "method": "baseline",
            "seed": 0,
            "config": {"train": {"lr": lr, "warmup_steps": 100, "max_steps": 1000}, "model": {}},
            "status": status,
            "history": hist,
        }

    recs = [
        rec("a", 1e-3, 1000, 5.0, "completed"),
        rec("b", 2e-3, 200, 4.0, "stopped"),
        rec("c", 4e-3, 1000, 4.5, "completed"),
    ]
    exp = Experiment("CPU-01", "cpu", {"method": "baseline"})
    cell = search_report.cell_summary(exp, recs, n_candidates=6, max_steps=1000, run_dir=Path("x"))
    # the stopped trial's early PPL is not a finished configuration: the best finished one wins
    assert cell["best"]["lr"] == 4e-3 and cell["stopped_early"] == 1
    assert cell["trial_steps"] == 2200 and cell["grid_trial_steps"] == 6000
    assert "37%" in search_report.search_markdown([cell])


def test_search_png_is_a_heatmap_whose_marks_follow_the_data(tmp_path):
    from matplotlib.patches import Rectangle

    def cell(eid, pick, stopped):
        tried = [
            {
                "trial": f"{lr}-{w}",
                "lr": lr,
                "warmup_steps": w,
                "steps": 60 if (lr, w) in stopped else 300,
                "best_val_ppl": 9.0 + lr * 100 + w / 100,
                "last_val_ppl": 9.5 + lr * 100 + w / 100,
                "status": "stopped" if (lr, w) in stopped else "completed",
            }
            for lr in (4e-3, 8e-3, 1.6e-2)
            for w in (30, 90)
        ]
        return {
            "experiment_id": eid,
            "dataset": "stories",
            "method": "baseline",
            "max_steps": 300,
            "trials": 6,
            "stopped_early": len(stopped),
            "candidates": 6,
            "trial_steps": 1200,
            "grid_trial_steps": 1800,
            "fraction_of_grid": 0.4,
            "tried": tried,
            "best": {"trial": "x", "lr": pick[0], "warmup_steps": pick[1], "best_val_ppl": 9.0, "final_val_ppl": 9.0},
        }

    cells = [cell("CPU-01", (8e-3, 90), {(4e-3, 30), (1.6e-2, 30)}), cell("CPU-04", (1.6e-2, 90), {(8e-3, 30)})]
    fig = search_report.search_figure(cells)
    for ax, c in zip(fig.axes, cells):  # the panels first, then their colour bars
        marks = {p.get_gid(): (p.get_x(), p.get_y()) for p in ax.patches if isinstance(p, Rectangle) and p.get_gid()}
        stopped = {
            tuple(float(x) if "." in x else int(x) for x in g.split(" ")[1].split(","))
            for g in marks
            if g.startswith("stopped")
        }
        assert stopped == {(t["lr"], t["warmup_steps"]) for t in c["tried"] if t["status"] == "stopped"}
        lrs, ws = [4e-3, 8e-3, 1.6e-2], [30, 90]
        pick = [xy for g, xy in marks.items() if g.startswith("pick")]
        assert pick == [
            (ws.index(c["best"]["warmup_steps"]) - 0.5, lrs.index(c["best"]["lr"]) - 0.5)
        ]  # framed where it is
        img = ax.images[0].get_array()
        assert img[lrs.index(1.6e-2), ws.index(90)] == pytest.approx(9.5 + 1.6 + 0.9)  # the last PPL reached
        assert any(t.get_text() == f"{9.5 + 0.4 + 0.3:.2f}\n@60" for t in ax.texts) == (c["experiment_id"] == "CPU-01")
    import matplotlib.pyplot as plt

    plt.close(fig)
    search_report.write_search_report(tmp_path, cells)
    assert (tmp_path / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "search.png" in (tmp_path / "search.md").read_text()
    assert search_report.load_cells(tmp_path / "best.json") == cells  # what partial_unfreeze --best reads back


def test_partial_unfreeze_variants_are_valid_and_named():
    pu = load_recipe("partial_unfreeze")
    for preset, n_layer in (("embedded", 2), ("paper", 6)):
        exps = pu.PRESETS[preset]["experiments"]
        ids = [e.id for e in exps]
        assert ids[2:] == [f"PU-k{k}" for k in range(1, n_layer)] + PU_ARMS
        for e in exps:
            e.config(0)  # validates
    cfgs = {e.id: e.config(0) for e in pu.PRESETS["embedded"]["experiments"]}
    assert cfgs["PU-k1"].model.frozen_qk_layers == (0,)
    assert cfgs["PU-unf0.50"].train.qk_unfreeze_step == round(0.5 * make_config("cpu").train.max_steps)
    assert cfgs["PU-mult0.1"].train.qk_lr_mult == 0.1


def test_partial_unfreeze_takes_each_arms_searched_lr(tmp_path):
    pu = load_recipe("partial_unfreeze")
    cell = lambda method, lr, w: {"method": method, "dataset": "stories", "best": {"lr": lr, "warmup_steps": w}}
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"cells": [cell("baseline", 1.6e-2, 30), cell("oelm_freeze", 8e-3, 300)]}))
    exps = pu.tuned(pu.PRESETS["embedded"]["experiments"], str(best), {})
    got = {e.id: (e.config(0).train.lr, e.config(0).train.warmup_steps) for e in exps}
    assert got.pop("CPU-01") == got.pop("PU-rand-train") == (1.6e-2, 30)  # the baseline and its init-scale control
    assert set(got.values()) == {(8e-3, 300)} and "PU-unf0.50" in got  # the freeze and every variant: oelm_freeze's
    best.write_text(json.dumps({"cells": [cell("baseline", 1.6e-2, 30)]}))
    with pytest.raises(ConfigError, match="no finished oelm_freeze search"):
        pu.tuned(pu.PRESETS["embedded"]["experiments"], str(best), {})
    best.write_text(json.dumps({"rows": []}))  # some other JSON: one error naming the option and the file
    with pytest.raises(ConfigError, match=f"^--best {best}: not a best.json written by sweeps/lr_warmup.py"):
        pu.tuned(pu.PRESETS["embedded"]["experiments"], str(best), {})


def test_partial_unfreeze_best_is_in_its_help_and_checked_before_ray(tmp_path, capsys):
    pu = load_recipe("partial_unfreeze")
    with pytest.raises(SystemExit):
        pu.main(["--help"])
    assert "--best BEST_JSON" in capsys.readouterr().out
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"rows": []}))
    assert pu.main(["--best", str(best), "--no-wandb", "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"partial_unfreeze: error: --best {best}: not a best.json"), err
    assert not (tmp_path / "runs").exists()


def test_recipes_build_their_smoke_specs(tmp_path):
    from oelm_ray.tune import recipe

    pu = load_recipe("partial_unfreeze")
    args = recipe.parser("partial_unfreeze", pu.PRESETS, options=pu.options).parse_args(
        ["--smoke-test", "--no-wandb", "--storage", str(tmp_path)]
    )
    sw = pu.at_run_size(recipe.build("partial_unfreeze", pu.PRESETS, args), args)
    unf = {e.id: e.config(0, **sw.common).train.qk_unfreeze_step for e in sw.experiments if e.id.startswith("PU-unf")}
    assert unf == {"PU-unf0.25": 8, "PU-unf0.50": 15, "PU-unf0.75": 22}  # fractions of the smoke run's 30 steps
    lw = load_recipe("lr_warmup")
    for preset in ("embedded", "paper"):
        p = lw.PRESETS[preset]
        for exp in p["experiments"]:
            exp = Experiment.from_dict(recipe.E.REGISTRY[exp].to_dict())
            steps = exp.config(0).train.max_steps
            for lr in p["space"].lrs:
                for w in p["space"].warmups(steps):
                    exp.config(0, lr=lr, warmup_steps=w)


def test_report_shows_params_saved_and_compute():
    def rec(eid, method, trainable, unfreeze=-1, status="completed", steps=30):
        return {
            "name": f"{eid}-{method}-s0",
            "experiment_id": eid,
            "dataset": "stories",
            "method": method,
            "seed": 0,
            "config": {"train": {"max_steps": 30, "qk_unfreeze_step": unfreeze}, "model": {}},
            "status": status,
            "history": [{"step": steps, "val/ppl": 10.0, "trainable_params": trainable}],
        }

    df = results.trials_frame(
        [
            rec("B", "baseline", 100),
            rec("F", "oelm_freeze", 80),
            rec("U", "oelm_freeze", 80, unfreeze=15),
            rec("S", "oelm_freeze", 80, status="stopped", steps=10),
        ]
    )
    text = results.summary_markdown(df, "t")
    assert "| stories | F | oelm_freeze | - | -1 | - | 80 | 20 (20.0%) | 100% |" in text
    assert "| stories | U | oelm_freeze | - | 15 | - | 80 | 20 (20.0%) | 50% |" in text
    assert (
        "Compute: 100 trial-steps over 4 trial(s) (1 stopped early by the scheduler); every trial to max_steps: 120."
        in text
    )


# ------------------------------------------------------------------------------------------------
# slow: real sweeps on local Ray
