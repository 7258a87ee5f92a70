"""Hyper-parameter search on top of `sweep.run`: synchronous successive halving over every candidate.

    space = Space(lrs=[...], warmup_fracs=[...])        # discrete, log-spaced candidates
    best = search_cells(base, space)                     # one Tune run per method x dataset cell
    final = compare_sweep(base, best)                    # each method again at its own best, over seeds

Why one run per cell: Ray 2.60 refuses `grid_search` together with a searcher, so experiments are
not a grid axis here; each cell is a `Sweep` of one experiment.

The searcher ("sha-phase", `plan`): every candidate starts, in an order the search seed shuffles
(Tune's variant generator fed them as points to evaluate), and synchronous successive halving
(SyncHalving, a Tune scheduler) pauses each trial at a rung until every live trial has reached it,
then keeps the best (`val/loss`). Its rungs (phase_plan) are the halving rungs (20%, x4, ... of the
run) that come before any candidate's learning rate has annealed to half its peak (annealing_starts,
from the trainer's own lr_at): a raw val loss is comparable only between candidates in the same phase
of their schedules, and a rung after some have annealed cuts those still near their peak lr by
construction. The last rung keeps as many trials as `budget_frac` (40%) of the full grid's trial-steps
pays for; they train to the end, where every schedule has annealed. Being synchronous, its survivors
and cost do not depend on the searcher's seed. benchmarks/search_efficiency.py measures it against the
full grid and against the alternatives in benchmarks/searchers.py (which it runs through
`search_cells(..., planner=...)`).
Every trial trains with the cell's `train_seed`, never the searcher's seed: a candidate scores
bit-for-bit what it scores in a plain sweep (tests/test_searches.py).

The candidates are discrete (learning rates evenly spaced in log, warmups as fractions of the
run), so the full grid over the same candidates is well defined and "the search spent X
trial-steps where the grid costs Y" is a fair comparison. A trial-step is one optimizer step of
one trial: the cost of a trial is the last step it trained. What a cell found and what it cost
(cell_summary, search.md, search.png, best.json) is written by oelm_ray.search_report.

Resume: the same command again resumes every cell (Tuner.restore; the searcher's state is
restored, the scheduler's is not, ray#30838: a rung that can no longer fill is decided among the
trials that reached it, keeping its planned share of them) and skips cells that are done.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from .. import results
from ..core.config import ConfigError
from ..core.experiments import Experiment
from ..search_report import cell_summary
from .sweep import METRIC, MODE, Sweep, check_run_dir, point, run

TERMINAL = ("completed", "stopped", "diverged")


def log_spaced(lo: float, hi: float, n: int) -> list[float]:
    """n values from lo to hi, evenly spaced in log (rounded to 3 significant digits)."""
    if n == 1:
        return [lo]
    r = (hi / lo) ** (1 / (n - 1))
    return [float(f"{lo * r**i:.3g}") for i in range(n)]


@dataclass
class Space:
    """The discrete search space: learning rates x warmups (as fractions of max_steps)."""

    lrs: list[float]
    warmup_fracs: list[float] = field(default_factory=lambda: [0.1])

    def warmups(self, max_steps: int) -> list[int]:
        return sorted({min(max_steps - 1, int(round(f * max_steps))) for f in self.warmup_fracs})

    def size(self, max_steps: int) -> int:
        return len(self.lrs) * len(self.warmups(max_steps))

    def domains(self, max_steps: int) -> dict[str, Any]:
        """For a searcher: every candidate equally likely until the model has seen results."""
        return {"lr": tune.choice(self.lrs), "warmup_steps": tune.choice(self.warmups(max_steps))}

    def grid(self, max_steps: int) -> dict[str, Any]:
        """The full grid over the same candidates (no searcher: Tune expands it)."""
        return {"lr": tune.grid_search(list(self.lrs)), "warmup_steps": tune.grid_search(self.warmups(max_steps))}


def grid_order(space: Space, max_steps: int, seed: int) -> list[dict[str, Any]]:
    """Every candidate once, in an order shuffled by `seed` (the order their trials start in)."""
    import random

    cands = [{"lr": lr, "warmup_steps": w} for lr in space.lrs for w in space.warmups(max_steps)]
    random.Random(seed).shuffle(cands)
    return cands


def every_candidate(space: Space, max_steps: int, seed: int):
    """Tune's variant generator fed the whole grid as points to evaluate, in grid_order(seed)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(points_to_evaluate=[point(c) for c in grid_order(space, max_steps, seed)])


def halving_rungs(max_steps: int, eval_interval: int, first_frac: float, reduction_factor: float) -> list[int]:
    """Rung steps first, first*rf, ... below max_steps, each on an evaluation point (at least one eval in)."""
    first = max(eval_interval, int(round(first_frac * max_steps / eval_interval)) * eval_interval)
    rungs, r = [], float(first)
    while r < max_steps:
        step = max(eval_interval, int(round(r / eval_interval)) * eval_interval)
        if step < max_steps and (not rungs or step > rungs[-1]):
            rungs.append(step)
        r *= reduction_factor
    return rungs


def annealing_starts(space: Space, max_steps: int, min_lr_frac: float = 0.0) -> int:
    """The first step at which some candidate's learning rate has come down to half its peak (the trainer's own
    lr_at: linear warmup, then cosine to lr * min_lr_frac); max_steps if none does before the end."""
    from ..core.config import Config
    from ..core.optim import lr_at

    first = max_steps
    for w in space.warmups(max_steps):
        cfg = Config.from_dict(
            {"train": {"lr": 1.0, "warmup_steps": w, "max_steps": max_steps, "min_lr_frac": min_lr_frac}}
        )
        first = min([first] + [s for s in range(w, max_steps) if lr_at(s, cfg) <= 0.5][:1])
    return first


def phase_plan(
    n: int,
    max_steps: int,
    eval_interval: int,
    first_frac: float,
    reduction_factor: float,
    budget_frac: float,
    anneal_step: int,
) -> tuple[list[int], list[int]]:
    """(rungs, trials kept at each) for sha-phase: the halving rungs that come before `anneal_step`, each keeping
    ceil(its field / reduction_factor) but the last, which keeps as many as the budget (budget_frac of the full
    grid's trial-steps) leaves room for once every survivor trains to max_steps (at least one). No rung before
    annealing starts: no rung at all (the full grid)."""
    rungs = [r for r in halving_rungs(max_steps, eval_interval, first_frac, reduction_factor) if r < anneal_step]
    keeps, alive, spent, prev = [], n, 0, 0
    for r in rungs:
        spent += alive * (r - prev)
        keeps.append(max(1, math.ceil(alive / reduction_factor)))
        alive, prev = keeps[-1], r
    if rungs:
        reach = keeps[-2] if len(keeps) > 1 else n  # the trials that get to the last rung
        room = int((budget_frac * n * max_steps - spent) // (max_steps - rungs[-1]))
        keeps[-1] = max(1, min(reach, room))
    return rungs, keeps


def _config_key(trial) -> str:
    return json.dumps(getattr(trial, "config", None), sort_keys=True, default=str)


class SyncHalving(FIFOScheduler):
    """Synchronous successive halving: each trial pauses at a rung until every live trial has reached
    it; then the best ceil(n / reduction_factor) of the n go on and the others stop.

    Unlike ASHA (asynchronous), no trial passes a rung before the whole field is known, so which
    candidates survive and what the search costs do not depend on the order trials start in.
    Paused trials resume from their checkpoint (the rungs sit on checkpoint steps), bit-for-bit. Like Ray's
    HyperBandScheduler, it stops paused losers through the controller it is handed. A trial that
    ends before a rung (diverged) counts there as the worst.
    """

    _supports_buffered_results = False  # a decision per evaluation, as Ray's HyperBandScheduler

    def __init__(
        self,
        n_trials: int,
        rungs: list[int],
        reduction_factor: float,
        time_attr: str = "step",
        keeps: list[int] | None = None,
    ):
        super().__init__()
        if (
            n_trials < 1
            or reduction_factor <= 1
            or list(rungs) != sorted(set(rungs))
            or (keeps is not None and (len(keeps) != len(rungs) or min(keeps, default=1) < 1))
        ):
            raise ConfigError(
                f"sync halving: n_trials {n_trials}, rungs {rungs}, reduction_factor {reduction_factor}, keeps {keeps}"
            )
        self.n, self.rungs, self.rf, self.time_attr = n_trials, list(rungs), reduction_factor, time_attr
        self.keeps = list(keeps) if keeps is not None else None  # trials kept at each rung (None: ceil(n / rf))
        self.sign = 1.0 if MODE == "min" else -1.0
        self.values: list[dict] = [{} for _ in self.rungs]  # rung -> {trial: metric at the rung}
        self.expected = [n_trials] + [0] * (len(self.rungs) - 1)  # trials that will report at each rung
        self.level: dict = {}  # trial -> index of its next rung
        self.losers: set = set()
        self.resume: set = set()

    def on_trial_result(self, tune_controller, trial, result):
        if trial in self.losers:
            return TrialScheduler.STOP
        k = self.level.get(trial, 0)
        if k >= len(self.rungs) or result.get(self.time_attr, 0) < self.rungs[k]:
            return TrialScheduler.CONTINUE
        self.values[k][trial] = self.sign * float(result[METRIC])
        self.level[trial] = k + 1
        return self._process(tune_controller, k, trial)

    def _process(self, tune_controller, k: int, current=None) -> str:
        vals = self.values[k]
        if len(vals) < self.expected[k]:
            return TrialScheduler.PAUSE  # wait for the rest of the field
        keep = max(1, math.ceil(len(vals) / self.rf))
        if self.keeps is not None:  # a planned count; a field smaller than planned (a resume) keeps its share
            keep = max(1, min(self.keeps[k], math.ceil(self.keeps[k] * len(vals) / self._planned(k))))
        # ties by config, not arrival: two candidates with the same warmup slope (lr / warmup_steps) have the same
        # curve, bit-for-bit, until the shorter warmup ends, so a rung during warmup can tie them exactly
        ranked = sorted(vals, key=lambda t: (math.isnan(vals[t]), vals[t], _config_key(t)))
        good, bad = ranked[:keep], ranked[keep:]
        if k + 1 < len(self.rungs):
            self.expected[k + 1] = len(good)
        action = TrialScheduler.CONTINUE
        for t in bad:
            self.losers.add(t)
            if t is current:
                action = TrialScheduler.STOP
            elif t.status == Trial.PAUSED:
                tune_controller.stop_trial(t)
            # else its pause is still in flight (Tune saves, then pauses): choose_trial_to_run stops it once paused
        self.resume.update(t for t in good if t is not current)  # paused, or about to be: resumed once paused
        return action

    def _planned(self, k: int) -> int:
        return self.n if k == 0 else self.keeps[k - 1]

    def _ended(self, tune_controller, trial):
        # a trial that ended before its next rung (diverged, errored) counts there as the worst
        k = self.level.get(trial, 0)
        if trial in self.losers or k >= len(self.rungs):
            return
        self.values[k][trial] = math.inf
        self.level[trial] = len(self.rungs)
        self._process(tune_controller, k)

    def on_trial_complete(self, tune_controller, trial, result):
        self._ended(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial):
        self._ended(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        trials = tune_controller.get_trials()
        for trial in trials:  # losers whose pause was still in flight when their rung was decided
            if trial.status == Trial.PAUSED and trial in self.losers:
                tune_controller.stop_trial(trial)
        for trial in trials:
            if trial.status == Trial.PENDING:
                return trial
        for trial in trials:
            if trial.status == Trial.PAUSED and trial in self.resume:
                self.resume.discard(trial)
                return trial
        paused = [t for t in trials if t.status == Trial.PAUSED and t not in self.losers]
        if paused and not any(t.status == Trial.RUNNING for t in trials):
            # nobody runs, yet some wait: the field a rung waits for cannot all arrive (after a resume,
            # whose scheduler state Ray does not restore; or a trial lost). Decide that rung with those there.
            for k, vals in enumerate(self.values):
                if vals and len(vals) < self.expected[k]:
                    self.expected[k] = len(vals)
                    self._process(tune_controller, k)
                    return self.choose_trial_to_run(tune_controller)
            return paused[0]  # paused before an interrupt: it reports to this scheduler when it resumes
        return None

    def debug_string(self) -> str:
        kept = f"keeping {self.keeps}" if self.keeps is not None else f"reduction factor {self.rf:g}"
        return f"Synchronous successive halving: rungs {self.rungs}, {kept}, {self.n} trials."


def budget(sw: Sweep, exp: Experiment) -> tuple[int, int, float]:
    """(max_steps, the step grid of its rungs, min_lr_frac) of an experiment under the sweep's common overrides.

    The grid is the checkpoint steps (`checkpoint_every`: the eval interval unless checkpoint_interval
    is larger), so a trial paused at a rung resumes from a latest.pt of that very step.
    """
    cfg = _one_config(sw, exp)
    return cfg.train.max_steps, cfg.train.checkpoint_every, cfg.train.min_lr_frac


def _one_config(sw: Sweep, exp: Experiment):
    # warmup 0: the searched warmups replace the common one, which may not even fit a short run
    one = dataclasses.replace(
        sw, experiments=[exp], seeds=sw.seeds[:1], common={**sw.common, "warmup_steps": 0}, search={}
    )
    return one.trials()[0].config


# ------------------------------------------------------------------------------------------------
# phase 1: one search per cell


def cell_name(base: Sweep, exp: Experiment) -> str:
    # the experiment's id too: two experiments of one method (CPU-03 and its control CPU-04) are two searches
    return f"{base.name}-search-{exp.id}-{exp.dataset}-{exp.method}"


def plan(
    space: Space,
    max_steps: int,
    eval_interval: int,
    seed: int = 0,
    grace_frac: float = 0.2,
    reduction_factor: float = 4,
    budget_frac: float = 0.4,
    min_lr_frac: float = 0.0,
):
    """(trials, Tune searcher, Tune scheduler) of one sha-phase search: every candidate in grid_order(seed),
    SyncHalving at the rungs phase_plan gives; what search_cells runs and the benchmark replays."""
    if not 0 < budget_frac <= 1:
        raise ConfigError(f"budget_frac={budget_frac} must be in (0, 1]: the share of the full grid's trial-steps")
    n = space.size(max_steps)
    rungs, keeps = phase_plan(
        n,
        max_steps,
        eval_interval,
        grace_frac,
        reduction_factor,
        budget_frac,
        annealing_starts(space, max_steps, min_lr_frac),
    )
    return n, every_candidate(space, max_steps, seed), SyncHalving(n, rungs, reduction_factor, keeps=keeps)


def search_cells(
    base: Sweep,
    space: Space,
    seed: int = 0,
    train_seed: int = 0,
    grace_frac: float = 0.2,
    reduction_factor: float = 4,
    budget_frac: float = 0.4,
    planner: Callable = plan,
) -> list[dict]:
    """Search every experiment of `base` (its own run each); return each cell's summary (search_report.cell_summary).

    Every candidate starts, in an order shuffled by `seed`, and synchronous successive halving (SyncHalving)
    decides only at rungs (grace_frac, x reduction_factor, ... of the run) that come before any candidate's
    learning rate has annealed to half its peak; the last of them keeps as many trials as `budget_frac` of the
    full grid's trial-steps pays for, and those train to the end (plan, phase_plan). Every trial trains with
    `train_seed` (init and data order), whatever the searcher's `seed`: a candidate scores exactly what it scores
    in a plain sweep with that seed. `planner`: another function with plan's signature and result runs another
    searcher (benchmarks/searchers.py).
    """
    out = []
    for exp in base.experiments:
        max_steps, eval_interval, min_lr_frac = budget(base, exp)
        domains = space.domains(max_steps)
        n, alg, scheduler = planner(
            space,
            max_steps,
            eval_interval,
            seed,
            grace_frac,
            reduction_factor,
            budget_frac,
            min_lr_frac,
        )
        cell = dataclasses.replace(
            base,
            name=cell_name(base, exp),
            experiments=[exp],
            seeds=[train_seed],
            common=_without(base.common, domains),
            search=domains,
            num_samples=n,
            search_alg=alg,
            scheduler=scheduler,
        )
        recs = results.load_records(cell.run_dir)
        if check_run_dir(cell) and sum(r["status"] in TERMINAL for r in recs) >= n:  # the same search, finished
            print(f"search {cell.name}: done ({len(recs)} trials), kept", flush=True)
        else:
            print(
                f"search {cell.name} ({type(scheduler).__name__}, seed {seed}): {n} trials of "
                f"{space.size(max_steps)} candidates",
                flush=True,
            )
            run(cell, report=False)
            results.write_report(cell.run_dir)
            recs = results.load_records(cell.run_dir)
        out.append(cell_summary(exp, recs, space.size(max_steps), max_steps, cell.run_dir))
    return out


# ------------------------------------------------------------------------------------------------
# phase 2: each method again at its own best, over seeds


def compare_sweep(base: Sweep, cells: list[dict]) -> Sweep:
    """`base` with each experiment replaced by `<id>-best` at its cell's best lr and warmup."""
    by_id = {c["experiment_id"]: c for c in cells if c["best"]}
    exps = []
    for e in base.experiments:
        b = by_id.get(e.id)
        if b is None:
            print(f"no finished trial in the search of {e.id}: left out of the comparison", flush=True)
            continue
        over = {**e.overrides, "lr": b["best"]["lr"], "warmup_steps": b["best"]["warmup_steps"]}
        exps.append(Experiment(f"{e.id}-best", e.preset, over))
    return dataclasses.replace(base, experiments=exps, common=_without(base.common, ("lr", "warmup_steps")))


def _without(common: dict, keys) -> dict:
    # searched (or tuned) fields must not also come from the common overrides: those win over both
    return {k: v for k, v in common.items() if k not in keys}
