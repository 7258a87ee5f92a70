"""Learning-rate / warmup search per method, with early stopping, then the methods compared again.

    python sweeps/lr_warmup.py                  # embedded default: local Ray, cpu preset, stories corpus
    python sweeps/lr_warmup.py --preset paper   # GPT-01..03 (TinyStories) on the running cluster

Phase 1: for each method (x dataset) its own Tune run, `<name>-search-<experiment>-<dataset>-<method>`, where
every lr x warmup candidate (log-spaced lrs, warmups as fractions of the run) starts, in an order
the search seed shuffles, and synchronous successive halving keeps the best quarter at 20% and at
80% of the run (trials pause at a rung until all have reached it): chosen by
benchmarks/search_efficiency.py (seeded TPE missed the best candidate for some seeds; asynchronous
ASHA either cut the best or cost over 40% of the grid for some seeds; searcher="asha-grid" / "tpe"
in a preset still run them). Every search trial trains with seed 0.
Phase 2: each method at its own best lr and warmup over fresh seeds, in `<name>` (summary.md as
phase 3, plus search.md and best.json: the best settings and the compute the search spent beside a
full grid). Run the same command again to resume either phase.
"""

from oelm_ray.core import experiments
from oelm_ray.tune import recipe, search

PRESETS = {
    # 6 lrs (1e-3 ... 3.2e-2, doubling) x 3 warmups = 18 candidates per method, around the cpu preset's
    # 1e-2 and up into the range where training blows up; every candidate starts, synchronous halving
    # (rungs at 100 and 400 of 500 steps, the best quarter goes on: as in benchmarks/search_efficiency.py)
    "embedded": dict(experiments=list(experiments.EMBEDDED), seeds=[1, 2], searcher="sha-grid", search_seed=0,
                     train_seed=0, grace_frac=0.2, reduction_factor=4,
                     space=search.Space(lrs=search.log_spaced(1e-3, 3.2e-2, 6), warmup_fracs=[0.02, 0.1, 0.3])),
    # quarter-decade lrs around the research's 3e-4 / 1e-3; warmups 1% (theirs) to 10%
    "paper": dict(experiments=["GPT-01", "GPT-02", "GPT-03"], seeds=[1, 2, 3], searcher="sha-grid", search_seed=0,
                  train_seed=0, grace_frac=0.2, reduction_factor=4,
                  space=search.Space(lrs=search.log_spaced(1e-4, 3.2e-3, 7), warmup_fracs=[0.01, 0.03, 0.1])),
}
# 3 x 2 candidates of 30 steps: one rung, at 10 steps (the best 2 of 6 finish)
SMOKE = dict(seeds=[1], space=search.Space(lrs=[1e-3, 4e-3, 1.6e-2], warmup_fracs=[0.1, 0.3]))


def main(argv=None) -> int:
    done = {}

    def two_phases(sw, args):
        p = {**PRESETS[args.preset], **(SMOKE if args.smoke_test else {})}
        if args.smoke_test and not args.seeds:
            sw.seeds = p["seeds"]
        cells = search.search_cells(sw, p["space"], p.get("num_samples"), seed=p["search_seed"], train_seed=p["train_seed"],
                                    searcher_kind=p["searcher"], n_startup=p.get("n_startup", 4),
                                    grace_frac=p["grace_frac"], reduction_factor=p["reduction_factor"])
        done.update(run_dir=sw.run_dir, cells=cells)
        print(search.search_markdown(cells), flush=True)
        return search.compare_sweep(sw, cells)

    rc = recipe.main("lr_warmup", PRESETS, argv, customize=two_phases, doc=__doc__)
    if rc == 0:
        print(search.write_search_report(done["run_dir"], done["cells"]))
        print(f"  {done['run_dir'] / 'search.md'}\n  {done['run_dir'] / 'best.json'}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
