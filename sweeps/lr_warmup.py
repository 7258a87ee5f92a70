"""Learning-rate / warmup search per method, with early stopping, then the methods compared again.

    python sweeps/lr_warmup.py                  # embedded default: local Ray, cpu preset, stories corpus
    python sweeps/lr_warmup.py --preset paper   # GPT-01..03 (TinyStories) on the running cluster

Phase 1: for each method (x dataset) its own Tune run, `<name>-search-<dataset>-<method>`, where
Optuna's TPE (seeded) proposes lr x warmup from log-spaced candidates and ASHA stops poor trials
at evaluation points. Phase 2: each method at its own best lr and warmup over fresh seeds, in
`<name>` (summary.md as phase 3, plus search.md and best.json: the best settings and the compute
the search spent beside a full grid). Run the same command again to resume either phase.
"""

from oelm_ray import experiments, recipe, search

PRESETS = {
    # 6 lrs (1e-3 ... 3.2e-2, doubling) x 3 warmups = 18 candidates per method, around the cpu preset's
    # 1e-2 and up into the range where training blows up; 6 samples each (3 random, then TPE) with ASHA
    # (rungs at 200, 600): ~4 full trials per method + 6 to compare, ~13 min on 2 cores
    "embedded": dict(experiments=list(experiments.EMBEDDED), seeds=[1, 2], search_seed=0, num_samples=6, n_startup=3,
                     space=search.Space(lrs=search.log_spaced(1e-3, 3.2e-2, 6), warmup_fracs=[0.02, 0.1, 0.3])),
    # quarter-decade lrs around the research's 3e-4 / 1e-3; warmups 1% (theirs) to 10%
    "paper": dict(experiments=["GPT-01", "GPT-02", "GPT-03"], seeds=[1, 2, 3], search_seed=0, num_samples=16, n_startup=6,
                  space=search.Space(lrs=search.log_spaced(1e-4, 3.2e-3, 7), warmup_fracs=[0.01, 0.03, 0.1])),
}
SMOKE = dict(num_samples=4, seeds=[1])


def main(argv=None) -> int:
    done = {}

    def two_phases(sw, args):
        p = {**PRESETS[args.preset], **(SMOKE if args.smoke_test else {})}
        if args.smoke_test and not args.seeds:
            sw.seeds = p["seeds"]
        cells = search.search_cells(sw, p["space"], p["num_samples"], seed=p["search_seed"], n_startup=p["n_startup"])
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
