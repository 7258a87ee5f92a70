"""Does the early-stopped search find as good a learning rate as the full grid, for less compute, on every arm?

    python benchmarks/search_efficiency.py --train-seeds 0,1 --seed 0        # 4 arms x 2 training seeds, trained
    python benchmarks/search_efficiency.py --train-seeds 0,1 --seeds 0-19 --replay \
        --searcher sha-phase,sha-grid,asha-grid,tpe                          # every searcher, replayed on the grids
    python benchmarks/search_efficiency.py --experiments CPU-02 --seeds 0,1 --searcher tpe --samples 10

Per (experiment, training seed), one full grid (every candidate trained to max_steps) and, for each
searcher seed, one search over the same candidates (oelm_ray.tune.search.search_cells, as sweeps/lr_warmup.py
runs it, with the same training seed: a candidate scores exactly what it scores in the grid). The space: 5 lrs
(4e-3 ... 6.4e-2, doubling) x 5 warmups (10%, 30%, 60%, 90%, 99%) = 25 candidates. The cpu preset's model
on the stories corpus, shrunk to max_steps 300, eval every 30. Grids are trained once and kept under
<storage>/search_efficiency-grid-<experiment>-t<training seed>; their curves are cached in
<storage>/search_efficiency-cache/, which is all a replay reads.

Searchers (benchmarks/searchers.py): sha-phase, the product's (oelm_ray.tune.search.plan): synchronous
halving with rungs only before any candidate's lr has annealed to half its peak (here one, at 60 steps),
its survivors as many as 40% of the grid's trial-steps pays for (here 6); sha-grid: rungs at 60 and 240
(--grace-frac 0.2, --reduction-factor 4), a quarter kept at each; asha-grid: the same rungs, asynchronous
(Ray's ASHA); tpe: Optuna's TPE + ASHA, --samples trials (optuna: `pip install -e ".[bench]"`).
--replay replays each search on the grid's recorded curves instead of training it, the search's own
scheduler (and, for tpe, searcher) objects making every decision (exact but for timing: two trials at a
time, equal speed; tpe only approximately: its parameter names differ from a real search's, so its
proposals may too).
Pass, per search: the pick's final val PPL within 2% of the grid's best, for at most 40% of the grid's
trial-steps (steps actually trained, summed over trials). One table per searcher, over every (arm,
training seed, searcher seed), and the pass count. Everything resumes if re-run; the rows go to
<storage>/search_efficiency-<searcher>[-replay].json too.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import searchers as S  # noqa: E402
from oelm_ray import results  # noqa: E402
from oelm_ray.core import experiments as E  # noqa: E402
from oelm_ray.search_report import cell_summary  # noqa: E402
from oelm_ray.tune import search  # noqa: E402
from oelm_ray.tune.sweep import METRIC, MODE, Sweep, run  # noqa: E402

SPACE = search.Space(lrs=search.log_spaced(4e-3, 6.4e-2, 5), warmup_fracs=[0.1, 0.3, 0.6, 0.9, 0.99])
SHRINK = dict(max_steps=300, eval_interval=30, log_interval=30)
TRAIN_SEED = 0
PPL_TOL, STEPS_MAX = 1.02, 0.40
GRACE_FRAC, REDUCTION_FACTOR = 0.2, 4  # rungs at 60 and 240 steps; keep the best quarter at each


def parse_seed_list(text: str) -> list[int]:
    """'0-4' or '0,2,5' -> whole numbers."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, dash, hi = part.strip().partition("-")
            out += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    except ValueError:
        raise SystemExit(f"--seeds {text!r}: give whole numbers, e.g. 0-4 or 0,1,2") from None
    return out


def grid_name(exp, train_seed: int) -> str:
    return f"search_efficiency-grid-{exp.id}-t{train_seed}"


def grid_frame(exp, storage: str, common: dict, train_seed: int = TRAIN_SEED):
    """The full grid of `exp` with `train_seed`, trained once and kept under <storage>/<grid_name> (re-runs reuse it)."""
    grid = Sweep(
        name=grid_name(exp, train_seed),
        experiments=[exp],
        seeds=[train_seed],
        storage=storage,
        common=common,
        search=SPACE.grid(SHRINK["max_steps"]),
    )
    recs = results.load_records(grid.run_dir)
    if len([r for r in recs if r["status"] in search.TERMINAL]) < SPACE.size(SHRINK["max_steps"]):
        run(grid, report=False)
        recs = results.load_records(grid.run_dir)
    return results.trials_frame(recs)


def grid_curves(exp, storage: str, common: dict, train_seed: int) -> dict:
    """The grid's recorded val-loss curves, cached in <storage>/search_efficiency-cache/ once the grid is complete.

    {"configs": {cand: the trial's config}, "curves": {cand: [(step, val loss), ...]}} with cand "lr,warmup".
    A replay reads only this file: re-runs and other searchers' replays train nothing and parse no trial records.
    """
    path = Path(storage) / "search_efficiency-cache" / f"{grid_name(exp, train_seed)}.json"
    if path.exists():
        return json.loads(path.read_text())
    grid_frame(exp, storage, common, train_seed)
    recs = results.load_records(Path(storage) / grid_name(exp, train_seed))
    out = {"configs": {}, "curves": {}}
    for r in recs:
        t = r["config"]["train"]
        key = f"{t['lr']:g},{t['warmup_steps']}"
        out["configs"][key] = r["config"]
        out["curves"][key] = [(h["step"], h["val/loss"]) for h in r["history"]]
    if len(out["curves"]) == SPACE.size(SHRINK["max_steps"]):
        results.write_json(path, out)
    return out


def one_search(
    exp,
    storage: str,
    common: dict,
    seed: int,
    searcher: str,
    samples: int | None,
    grace_frac: float,
    reduction_factor: float = REDUCTION_FACTOR,
    train_seed: int = TRAIN_SEED,
) -> dict:
    tag = f"-{searcher}" + (f"{samples}" if searcher == "tpe" else "") + f"-g{grace_frac:g}-rf{reduction_factor:g}"
    base = Sweep(
        name=f"search_efficiency{tag}-t{train_seed}-s{seed}",
        experiments=[exp],
        seeds=[train_seed],
        storage=storage,
        common=common,
    )
    return search.search_cells(
        base,
        SPACE,
        seed=seed,
        train_seed=train_seed,
        grace_frac=grace_frac,
        reduction_factor=reduction_factor,
        budget_frac=STEPS_MAX,
        planner=S.planner(searcher, samples),
    )[0]


def replay(
    exp,
    seed: int,
    grid: dict,
    grace_frac: float = GRACE_FRAC,
    workers: int = 2,
    reduction_factor: float = REDUCTION_FACTOR,
    searcher: str = "sha-phase",
    samples: int | None = None,
    train_seed: int = TRAIN_SEED,
) -> dict:
    """The search of `seed` replayed on the grid's recorded curves (grid_curves), without training.

    Exact up to timing: a search trial's val losses are bit-identical to the grid trial's (tested), and
    the search's own scheduler and searcher objects (searchers.plan: SyncHalving, Ray's ASHA, seeded TPE)
    make every decision; only the timing is modelled: `workers` trials at a time, equal speed, pending
    trials in the searcher's order (grid_order(seed), or what TPE suggests from the results so far),
    then paused ones the scheduler promotes. Returns a cell like search_cells'.
    """
    import heapq

    max_steps, every = SHRINK["max_steps"], SHRINK["eval_interval"]
    configs = {(c["train"]["lr"], c["train"]["warmup_steps"]): c for c in grid["configs"].values()}
    curves = {cand: [tuple(h) for h in grid["curves"][f"{cand[0]:g},{cand[1]}"]] for cand in configs}
    n, alg, sched = S.plan(
        searcher, SPACE, max_steps, every, seed, grace_frac, reduction_factor, STEPS_MAX, samples=samples
    )
    if searcher == "tpe":
        alg.set_search_properties(METRIC, MODE, SPACE.domains(max_steps))

    class _T:  # what the schedulers read of a trial
        def __init__(self, cand, i):
            self.cand, self.trial_id, self.status, self.i, self.trained = cand, f"t{i}", "PENDING", 0, 0
            self.config = {"trial": {"config": configs[cand]}}

    class _Ctl:  # what they call on Tune's controller
        def get_trials(self):
            return trials

        def stop_trial(self, t):
            t.status = "TERMINATED"

    order = iter(search.grid_order(SPACE, max_steps, seed)) if searcher != "tpe" else None
    trials: list = []
    ctl = _Ctl()

    def add_trial() -> bool:
        # the searcher's next candidate, if it has one and the search wants more trials (Tune's num_samples)
        if len(trials) >= n:
            return False
        if order is not None:
            c = next(order, None)
            cand = None if c is None else (c["lr"], c["warmup_steps"])
        else:
            c = alg.suggest(f"t{len(trials)}")
            cand = None if not c else (c["lr"], c["warmup_steps"])
        if cand is None:
            return False
        t = _T(cand, len(trials))
        trials.append(t)
        sched.on_trial_add(ctl, t)
        return True

    running: list = []  # (time of its next report, tie-break, trial)
    now, tick = 0.0, 0

    def start_free():
        nonlocal tick
        while len(running) < workers:
            if not any(t.status == "PENDING" for t in trials):
                add_trial()
            t = sched.choose_trial_to_run(ctl)
            if t is None:
                return
            t.status = "RUNNING"
            tick += 1
            heapq.heappush(running, (now + 1.0, tick, t))

    def ended(t):  # the searcher hears of every finished or stopped trial (TPE models them; ASHA stops by STOP)
        if searcher == "tpe":
            step, loss = curves[t.cand][t.trained - 1]
            alg.on_trial_complete(t.trial_id, {METRIC: loss, "step": step})

    start_free()
    while running:
        now, _, t = heapq.heappop(running)
        step, loss = curves[t.cand][t.i]
        t.trained = t.i + 1
        action = sched.on_trial_result(ctl, t, {"step": step, METRIC: loss})
        if step >= max_steps or action == "STOP":
            t.status = "TERMINATED"
            if action != "STOP":
                sched.on_trial_complete(ctl, t, {})
            ended(t)
        elif action == "PAUSE":
            t.status = "PAUSED"
            t.i += 1
        else:
            t.i += 1
            tick += 1
            heapq.heappush(running, (now + 1.0, tick, t))
        start_free()
    left = [t.cand for t in trials if t.status != "TERMINATED"]
    assert not left, f"replay ended with trials neither run nor stopped: {left}"
    recs = [
        {
            "name": f"{t.cand}",
            "status": "completed" if curves[t.cand][t.trained - 1][0] >= max_steps else "stopped",
            "seed": train_seed,
            "experiment_id": exp.id,
            "dataset": "stories",
            "method": exp.method,
            "config": {"train": {"lr": t.cand[0], "warmup_steps": t.cand[1], "max_steps": max_steps}, "model": {}},
            "history": [
                {"step": st, "val/loss": lo, "val/ppl": math.exp(lo)} for st, lo in curves[t.cand][: t.trained]
            ],
        }
        for t in trials
    ]
    return cell_summary(exp, recs, SPACE.size(max_steps), max_steps, Path(f"replay of {grid_name(exp, train_seed)}"))


def grid_table(grid: dict) -> list[dict]:
    """Per candidate of a recorded grid: lr, warmup, the steps it trained and its final val PPL."""
    out = []
    for key, cfg in grid["configs"].items():
        hist = grid["curves"][key]
        out.append(
            {
                "lr": cfg["train"]["lr"],
                "warmup_steps": cfg["train"]["warmup_steps"],
                "steps": hist[-1][0],
                "final_val_ppl": math.exp(hist[-1][1]),
            }
        )
    return out


def rank_at(grid: dict, cand: tuple, step: int) -> int:
    """1-based rank of `cand` among the grid's candidates by val loss at `step` (how a rung there sees it)."""
    at = {k: dict(map(tuple, h)).get(step, math.inf) for k, h in grid["curves"].items()}
    key = f"{cand[0]:g},{cand[1]}"
    return 1 + sum(v < at[key] for v in at.values())


def row(exp, train_seed: int, seed: int, cell: dict, grid: list[dict]) -> dict:
    g_best = min(grid, key=lambda g: g["final_val_ppl"] if math.isfinite(g["final_val_ppl"]) else math.inf)
    grid_steps = sum(g["steps"] for g in grid)
    pick = cell["best"]
    same = [g for g in grid if (g["lr"], g["warmup_steps"]) == (pick["lr"], pick["warmup_steps"])]
    ratio = pick["final_val_ppl"] / g_best["final_val_ppl"]
    share = cell["trial_steps"] / grid_steps
    return {
        "experiment": exp.id,
        "method": exp.method,
        "train_seed": train_seed,
        "seed": seed,
        "grid_best_lr": g_best["lr"],
        "grid_best_warmup": g_best["warmup_steps"],
        "grid_best_ppl": g_best["final_val_ppl"],
        "grid_trial_steps": grid_steps,
        "pick_lr": pick["lr"],
        "pick_warmup": pick["warmup_steps"],
        "pick_ppl": pick["final_val_ppl"],
        "grid_ppl_same_candidate": same[0]["final_val_ppl"] if same else None,
        "trials": cell["trials"],
        "stopped_early": cell["stopped_early"],
        "trial_steps": cell["trial_steps"],
        "ppl_ratio": ratio,
        "steps_share": share,
        "passed": ratio <= PPL_TOL and share <= STEPS_MAX,
    }


def table(rows: list[dict]) -> str:
    """One searcher's rows: every (arm, training seed, searcher seed), then a line per (arm, training seed) and the count."""
    lines = [
        "| experiment | method | train seed | searcher seed | how | pick lr | pick warmup | pick PPL "
        "| grid best (lr, warmup): PPL | its rank at the first rung | PPL / grid best | trials (stopped) | trial-steps "
        "| share of grid | pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['experiment']} | {r['method']} | {r['train_seed']} | {r['seed']} | {'replay' if r['replayed'] else 'trained'} "
            f"| {r['pick_lr']:g} | {r['pick_warmup']} | {r['pick_ppl']:.3f} "
            f"| ({r['grid_best_lr']:g}, {r['grid_best_warmup']}): {r['grid_best_ppl']:.3f} | {r['best_rank_first_rung']} "
            f"| {r['ppl_ratio']:.4f} "
            f"| {r['trials']} ({r['stopped_early']}) | {r['trial_steps']:,} / {r['grid_trial_steps']:,} "
            f"| {100 * r['steps_share']:.1f}% | {'PASS' if r['passed'] else 'FAIL'} |"
        )
    lines.append("")
    for key in dict.fromkeys((r["experiment"], r["train_seed"]) for r in rows):
        rs = [r for r in rows if (r["experiment"], r["train_seed"]) == key]
        ratios, shares = [r["ppl_ratio"] for r in rs], [100 * r["steps_share"] for r in rs]
        lines.append(
            f"{key[0]} train seed {key[1]}: {sum(r['passed'] for r in rs)}/{len(rs)} pass; PPL / grid best min {min(ratios):.4f} "
            f"median {statistics.median(ratios):.4f} max {max(ratios):.4f} (<= {PPL_TOL}); share of grid min {min(shares):.1f}% "
            f"median {statistics.median(shares):.1f}% max {max(shares):.1f}% (<= {100 * STEPS_MAX:.0f}%)"
        )
    arms = {(r["experiment"], r["train_seed"]) for r in rows}
    good = {a for a in arms if all(r["passed"] for r in rows if (r["experiment"], r["train_seed"]) == a)}
    lines.append(
        f"\n{sum(r['passed'] for r in rows)}/{len(rows)} searches pass; {len(good)}/{len(arms)} (arm, training seed) "
        "pass for every searcher seed"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storage", default="runs")
    ap.add_argument(
        "--experiments",
        "--experiment",
        default="CPU-01,CPU-02,CPU-03,CPU-04",
        help="embedded experiments to tune (default: all four embedded arms)",
    )
    ap.add_argument("--train-seeds", default="0", help="training seeds of grid and search: 0,1 or 0-1 (default 0)")
    one = ap.add_mutually_exclusive_group()
    one.add_argument("--seed", type=int, help="one searcher seed (default 0)")
    one.add_argument("--seeds", help="several searcher seeds against one grid: 0-4 or 0,2,5")
    ap.add_argument(
        "--searcher",
        default=S.SEARCHERS[0],
        help=f"one or several of {', '.join(S.SEARCHERS)}, comma-separated: one table each (default %(default)s)",
    )
    ap.add_argument(
        "--samples", type=int, default=10, help="trials per search (tpe only; the others start every candidate)"
    )
    ap.add_argument(
        "--grace-frac",
        type=float,
        default=GRACE_FRAC,
        help="the first rung as a fraction of the run (rungs then x --reduction-factor); default %(default)s",
    )
    ap.add_argument(
        "--reduction-factor",
        type=float,
        default=REDUCTION_FACTOR,
        help="keep the best 1/rf at each rung (rungs rf apart); default %(default)s",
    )
    ap.add_argument(
        "--replay",
        action="store_true",
        help="replay each seed's search on the grid's recorded curves instead of training it (tpe: approximate)",
    )
    args = ap.parse_args(argv)
    seeds = parse_seed_list(args.seeds) if args.seeds else [args.seed or 0]
    train_seeds = parse_seed_list(args.train_seeds)
    searchers = [x.strip() for x in args.searcher.split(",") if x.strip()]
    bad = [x for x in searchers if x not in S.SEARCHERS]
    if bad or not searchers:
        ap.error(f"--searcher {args.searcher!r}: choose from {', '.join(S.SEARCHERS)}")
    try:
        exps = E.get(args.experiments.split(","))
    except ValueError as e:  # an unknown id: one clear error before any work
        ap.error(str(e))
    if "tpe" in searchers and args.samples < 1:
        ap.error("--samples must be >= 1")
    if args.reduction_factor <= 1:
        ap.error("--reduction-factor must be > 1")

    storage = str(Path(args.storage).resolve())
    common = {**SHRINK, "data_dir": str(Path(storage) / "data")}
    grids = {(exp.id, ts): grid_curves(exp, storage, common, ts) for exp in exps for ts in train_seeds}
    first_rung = search.halving_rungs(
        SHRINK["max_steps"], SHRINK["eval_interval"], args.grace_frac, args.reduction_factor
    )[0]
    ok = True
    for searcher in searchers:
        rows = []
        for exp in exps:
            for ts in train_seeds:
                grid = grids[(exp.id, ts)]
                for seed in seeds:
                    samples = args.samples if searcher == "tpe" else None
                    if args.replay:
                        cell = replay(
                            exp,
                            seed,
                            grid,
                            args.grace_frac,
                            reduction_factor=args.reduction_factor,
                            searcher=searcher,
                            samples=samples,
                            train_seed=ts,
                        )
                    else:
                        cell = one_search(
                            exp,
                            storage,
                            common,
                            seed,
                            searcher,
                            samples,
                            args.grace_frac,
                            args.reduction_factor,
                            train_seed=ts,
                        )
                    r = row(exp, ts, seed, cell, grid_table(grid))
                    r["best_rank_first_rung"] = rank_at(grid, (r["grid_best_lr"], r["grid_best_warmup"]), first_rung)
                    rows.append({**r, "replayed": args.replay})
        out = Path(storage) / f"search_efficiency-{searcher}{'-replay' if args.replay else ''}.json"
        results.write_json(
            out,
            {
                "searcher": searcher,
                "grace_frac": args.grace_frac,
                "reduction_factor": args.reduction_factor,
                "rows": rows,
            },
        )
        how = (
            " (REPLAYED on the grid, not trained" + ("; tpe approximately" if searcher == "tpe" else "") + ")"
            if args.replay
            else ""
        )
        print(
            f"\nsearcher {searcher}{how}, first rung {args.grace_frac:g} of the run, reduction factor "
            f"{args.reduction_factor:g}, {SPACE.size(SHRINK['max_steps'])} candidates x {SHRINK['max_steps']} steps, "
            f"training seeds {','.join(map(str, train_seeds))}\n\n{table(rows)}",
            flush=True,
        )
        ok = ok and all(r["passed"] for r in rows)
    print("\nPASS" if ok else "\nFAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
