"""Does the early-stopped search find as good a learning rate as the full grid, for less compute?

    python benchmarks/search_efficiency.py [--storage runs] [--seed 0] [--samples 10]

One cell of the lr/warmup search (sweeps/lr_warmup.py's machinery, oelm_ray.search) against the
full grid over the same candidates: 6 log-spaced lrs x 3 warmups = 18 candidates, every one
trained to max_steps. The cpu preset's model on the stories corpus, shrunk in steps to fit ~10
minutes on 2 cores: max_steps 300 (not 1000), eval every 30, ASHA rungs at 60 and 180.
Pass: the search's pick has a final val PPL within 2% of the grid's best, for at most 40% of the
grid's trial-steps (steps actually trained, summed over trials). Both runs resume if re-run.

Measured (searcher seed 0, CPU-02 oelm_freeze, 2-core box shared with other jobs, load 8-22):
grid 18 x 300 = 5,400 trial-steps, best lr 0.01 warmup 90, final val PPL 10.152; search 10 trials
(5 stopped early) = 1,920 trial-steps (35.6%), pick lr 0.01 warmup 90, PPL 10.152 (ratio 1.000):
PASS. 23 min wall under that load. The best candidate sits at the top lr with the longest warmup
(a corner of the space: at 300 steps high lr wins once warmed up); TPE proposed one candidate twice.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oelm_ray import experiments as E  # noqa: E402
from oelm_ray import results, search  # noqa: E402
from oelm_ray.sweep import Sweep, run  # noqa: E402

SPACE = search.Space(lrs=search.log_spaced(5.6e-4, 1e-2, 6), warmup_fracs=[0.02, 0.1, 0.3])
SHRINK = dict(max_steps=300, eval_interval=30, log_interval=30)
PPL_TOL, STEPS_MAX = 1.02, 0.40


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storage", default="runs")
    ap.add_argument("--experiment", default="CPU-02", help="embedded experiment to tune (default: oelm_freeze)")
    ap.add_argument("--seed", type=int, default=0, help="searcher seed")
    ap.add_argument("--samples", type=int, default=10, help="search trials")
    args = ap.parse_args(argv)

    storage = str(Path(args.storage).resolve())
    common = {**SHRINK, "data_dir": str(Path(storage) / "data")}
    exp = E.get([args.experiment])[0]
    max_steps = SHRINK["max_steps"]

    grid = Sweep(name=f"search_efficiency-grid-{exp.id}", experiments=[exp], seeds=[0], storage=storage,
                 common=common, search=SPACE.grid(max_steps))
    run(grid, report=False)
    gdf = results.trials_frame(results.load_records(grid.run_dir))

    base = Sweep(name=f"search_efficiency-s{args.seed}", experiments=[exp], seeds=[0], storage=storage, common=common)
    cell = search.search_cells(base, SPACE, args.samples, seed=args.seed, n_startup=4, grace_frac=0.2)[0]

    g_best = gdf.loc[gdf.final_val_ppl.idxmin()]
    pick = cell["best"]
    same = gdf[(gdf.lr == pick["lr"]) & (gdf.warmup_steps == pick["warmup_steps"])]
    grid_steps = int(gdf.steps.sum())
    out = {
        "experiment": exp.id, "candidates": len(gdf), "max_steps": max_steps,
        "grid": {"best_lr": float(g_best.lr), "best_warmup": int(g_best.warmup_steps),
                 "final_val_ppl": float(g_best.final_val_ppl), "trial_steps": grid_steps},
        "search": {"seed": args.seed, "trials": cell["trials"], "stopped_early": cell["stopped_early"],
                   "lr": pick["lr"], "warmup": pick["warmup_steps"], "final_val_ppl": pick["final_val_ppl"],
                   "grid_final_val_ppl_same_candidate": float(same.final_val_ppl.iloc[0]) if len(same) else None,
                   "trial_steps": cell["trial_steps"]},
    }
    ppl_ratio = pick["final_val_ppl"] / out["grid"]["final_val_ppl"]
    steps_ratio = cell["trial_steps"] / grid_steps
    out.update(ppl_ratio=ppl_ratio, steps_ratio=steps_ratio, passed=ppl_ratio <= PPL_TOL and steps_ratio <= STEPS_MAX)
    results.write_json(Path(storage) / f"search_efficiency-s{args.seed}.json", out)

    print(f"\nfull grid : {len(gdf)} candidates x {max_steps} steps = {grid_steps:,} trial-steps; best lr "
          f"{g_best.lr:g} warmup {int(g_best.warmup_steps)}: final val PPL {g_best.final_val_ppl:.3f}")
    print(f"search    : {cell['trials']} trials ({cell['stopped_early']} stopped early) = {cell['trial_steps']:,} "
          f"trial-steps; pick lr {pick['lr']:g} warmup {pick['warmup_steps']}: final val PPL {pick['final_val_ppl']:.3f}")
    print(f"search/grid: PPL {ppl_ratio:.4f} (<= {PPL_TOL}), trial-steps {100 * steps_ratio:.1f}% (<= {100 * STEPS_MAX:.0f}%)"
          f" -> {'PASS' if out['passed'] else 'FAIL'}")
    print(json.dumps(out, indent=2))
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
