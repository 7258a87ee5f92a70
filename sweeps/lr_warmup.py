"""Learning-rate / warmup search per method, with early stopping, then the methods compared again.

    python sweeps/lr_warmup.py                  # embedded default: local Ray, cpu preset, stories corpus
    python sweeps/lr_warmup.py --preset paper   # GPT-01..03 (TinyStories) on the running cluster

Phase 1: for each method (x dataset) its own Tune run, `<name>-search-<experiment>-<dataset>-<method>`, where
every lr x warmup candidate (log-spaced lrs, warmups as fractions of the run) starts, in an order the
search seed shuffles, and synchronous successive halving ("sha-phase") decides once, at 20% of the run,
before any candidate's learning rate has annealed to half its peak: the best trials that 40% of the full
grid's trial-steps pays for train to the end, where every schedule has annealed (trials pause at the rung
until all have reached it). A rung later in the run would rank annealed candidates against ones still near
their peak lr, whose loss annealing has yet to bring down (benchmarks/search_efficiency.py measures this
searcher against the full grid and against the alternatives in benchmarks/searchers.py). Every search
trial trains with seed 0.
Phase 2: each method at its own best lr and warmup over fresh seeds, in `<name>` (summary.md as
phase 3, plus search.md, search.png and best.json: the best settings, the searches as lr x warmup heatmaps
and the compute the search spent beside a full grid). Run the same command again to resume either phase.
"""

from oelm_ray import search_report
from oelm_ray.core import experiments
from oelm_ray.core.config import ConfigError
from oelm_ray.tune import recipe, search

# every preset's search: searcher seed 0, trials trained with seed 0, one rung at 20% keeping a quarter, 40% budget
HALVING = dict(search_seed=0, train_seed=0, grace_frac=0.2, reduction_factor=4, budget_frac=0.4)

PRESETS = {
    # 4 lrs (4e-3 ... 3.2e-2, doubling) x 4 warmups (10-90% of the 500 steps) = 16 candidates per method: at 300
    # steps benchmarks/search_efficiency.py's bests sit at lr 8e-3 ... 3.2e-2 and warmup 60-99% on every arm.
    # One rung at 100 of 500 steps keeping 4: 3,200 trial-steps per method (40% of the grid's 8,000)
    "embedded": dict(
        experiments=list(experiments.EMBEDDED),
        seeds=[1, 2],
        **HALVING,
        space=search.Space(lrs=search.log_spaced(4e-3, 3.2e-2, 4), warmup_fracs=[0.1, 0.3, 0.6, 0.9]),
    ),
    # doubling lrs around the research's 3e-4 / 1e-3; warmups 1% (theirs) to 30% (the research's "longer warmup"
    # for the frozen variants; a long run's best warmup is short, a 300-step run's long: the grid spans both)
    "paper": dict(
        experiments=["GPT-01", "GPT-02", "GPT-03"],
        seeds=[1, 2, 3],
        **HALVING,
        space=search.Space(lrs=search.log_spaced(1e-4, 3.2e-3, 6), warmup_fracs=[0.01, 0.03, 0.1, 0.3]),
    ),
}
# 3 x 2 candidates of 30 steps: one rung, at 10 steps (the best one of 6 finishes: 40% of the 180 grid steps)
SMOKE = dict(seeds=[1], space=search.Space(lrs=[1e-3, 4e-3, 1.6e-2], warmup_fracs=[0.1, 0.3]))


def main(argv=None) -> int:
    done = {}

    def two_phases(sw, args):
        if {"lr", "warmup_steps"} & set(sw.sets):
            raise ConfigError(
                "this recipe searches lr and warmup_steps for each arm: drop --set lr / --set warmup_steps"
            )
        p = {**PRESETS[args.preset], **(SMOKE if args.smoke_test else {})}
        if args.smoke_test and not args.seeds:
            sw.seeds = p["seeds"]
        cells = search.search_cells(
            sw,
            p["space"],
            seed=p["search_seed"],
            train_seed=p["train_seed"],
            grace_frac=p["grace_frac"],
            reduction_factor=p["reduction_factor"],
            budget_frac=p["budget_frac"],
        )
        done.update(run_dir=sw.run_dir, cells=cells)
        print(search_report.search_markdown(cells), flush=True)
        return search.compare_sweep(sw, cells)

    rc = recipe.main("lr_warmup", PRESETS, argv, customize=two_phases, doc=__doc__)
    if rc == 0:
        print(search_report.write_search_report(done["run_dir"], done["cells"]))
        print(f"  {done['run_dir'] / 'search.md'}\n  {done['run_dir'] / 'best.json'}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
