"""The searchers benchmarks/search_efficiency.py compares with the product's sha-phase (oelm_ray.tune.search.plan).

    n, alg, scheduler = plan("asha-grid", space, max_steps, eval_interval, seed)  # what a search would run
    search.search_cells(base, space, planner=planner("tpe", samples=10))          # a real search with one

- "sha-phase": the product's searcher, search.plan itself.
- "sha-grid": synchronous successive halving at every halving rung (grace_frac, x reduction_factor, ...), the
  best 1/reduction_factor kept at each; a rung late in the run ranks annealed candidates against ones still at
  their peak lr.
- "asha-grid": every candidate, in the seed's order, stopped by Ray's ASHA at the same rungs: asynchronous, so
  an early arrival passes a rung before the field is known and the cost depends on the seed.
- "tpe": `samples` trials that Optuna's TPE (seeded) proposes, stopped by the same ASHA.

Each returns (trials, Tune searcher, Tune scheduler) like search.plan; every trial still trains with the
cell's train_seed, whatever the searcher's seed.
"""

from __future__ import annotations

import functools

from oelm_ray.core.config import ConfigError
from oelm_ray.tune import search
from oelm_ray.tune.sweep import METRIC, MODE

SEARCHERS = ("sha-phase", "sha-grid", "asha-grid", "tpe")


def tpe(seed: int, n_startup: int = 4):
    """Optuna's TPE through Tune, seeded: the same seed proposes the same configurations."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup)
    return OptunaSearch(metric=METRIC, mode=MODE, sampler=sampler)


def asha(max_steps: int, eval_interval: int, grace_frac: float = 0.1, reduction_factor: float = 3):
    """ASHA on val/loss at evaluation points; rungs at grace, grace*rf, ... (grace >= one eval)."""
    from ray.tune.schedulers import ASHAScheduler

    grace = max(eval_interval, int(round(grace_frac * max_steps / eval_interval)) * eval_interval)
    return ASHAScheduler(
        time_attr="step",
        metric=METRIC,
        mode=MODE,
        max_t=max_steps,
        grace_period=grace,
        reduction_factor=reduction_factor,
    )


def plan(
    kind: str,
    space: search.Space,
    max_steps: int,
    eval_interval: int,
    seed: int = 0,
    grace_frac: float = 0.2,
    reduction_factor: float = 4,
    budget_frac: float = 0.4,
    min_lr_frac: float = 0.0,
    samples: int | None = None,
    n_startup: int = 4,
):
    """(trials, Tune searcher, Tune scheduler) of one search by `kind` (SEARCHERS); search.plan's other arguments."""
    if kind not in SEARCHERS:
        raise ConfigError(f"searcher={kind!r} is unknown: choose one of {', '.join(SEARCHERS)}")
    if kind == "sha-phase":
        return search.plan(
            space, max_steps, eval_interval, seed, grace_frac, reduction_factor, budget_frac, min_lr_frac
        )
    if kind == "tpe":
        if not samples:
            raise ConfigError("searcher tpe needs samples >= 1")
        return samples, tpe(seed, n_startup), asha(max_steps, eval_interval, grace_frac, reduction_factor)
    n, alg = space.size(max_steps), search.every_candidate(space, max_steps, seed)
    if kind == "asha-grid":
        return n, alg, asha(max_steps, eval_interval, grace_frac, reduction_factor)
    rungs = search.halving_rungs(max_steps, eval_interval, grace_frac, reduction_factor)
    return n, alg, search.SyncHalving(n, rungs, reduction_factor)


def planner(kind: str, samples: int | None = None, n_startup: int = 4):
    """`plan` of one kind with search.plan's signature: search_cells(..., planner=...) runs that searcher."""
    return functools.partial(plan, kind, samples=samples, n_startup=n_startup)
