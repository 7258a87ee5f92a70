"""Does the cost of frozen Q/K grow or shrink with model size? The three arms at several sizes, one dataset.

    python sweeps/scaling.py                  # embedded: three CPU sizes on the stories corpus, seeds 0 and 1
    python sweeps/scaling.py --preset paper   # small-256, medium-512, large-768 on TinyStories (cluster)

At each size: the baseline, oelm_freeze, and the scale-matched random control (oelm_random at std
1/sqrt(d_model)), named SC-<size>-B / -F / -R. summary.md gets a table of each frozen arm's gap
against the baseline of the same size and seed, and val_ppl.png a panel of that gap against the
parameter count (mean, with the seeds' range as a band).

Budget rule: every size trains the same number of tokens per parameter (all parameters, the tied
embedding counted once), the one its base preset's own budget gives: the research's Medium-512,
100,000 steps x 8 x 512 tokens over 44,896,768 parameters = 9.1 tokens per parameter (paper); the
cpu preset's 500 steps x 16 x 128 over 124,224 = 8.2 (embedded). So max_steps = round(tokens per
parameter x parameters / (batch x context)); warmup keeps its share of the run; evaluations stay
every 1000 steps (paper, as the research's) or five per run (embedded). Learning rates: the research's per method (paper: 3e-4 for the baseline, 1e-3 for the
frozen arms) or the cpu preset's one rate (embedded), the same at every size: a size that wants
another rate shows it as a larger gap for every arm, which the paired gaps cancel only in part.
"""

from __future__ import annotations

import torch

from oelm_ray.core import experiments as E
from oelm_ray.core.config import make_config
from oelm_ray.core.experiments import Experiment
from oelm_ray.core.model import GPT
from oelm_ray.tune import recipe

ARMS = {
    "B": {"method": "baseline"},
    "F": {"method": "oelm_freeze"},
    "R": {"method": "oelm_random", "qk_random_std": 0.0},
}
# embedded: the cpu preset (d_model 64) with a smaller and a larger sibling, 2 blocks each (CPU minutes)
CPU_SIZES = {"d32": dict(d_model=32, n_head=4, d_ff=128), "d64": {}, "d80": dict(d_model=80, n_head=4, d_ff=320)}
PAPER_SIZES = {"small-256": "small-256", "medium-512": "medium-512", "large-768": "large-768"}
PAPER_LR = {"baseline": 3e-4, "oelm_freeze": 1e-3, "oelm_random": 1e-3}  # the research's rates (GPT-01 / GPT-02)


def budget(preset: str, size: dict, base_preset: str) -> dict:
    """max_steps, warmup_steps and eval_interval for a size, at the base preset's tokens per parameter."""

    def params(p: str, over: dict) -> int:
        with torch.device("meta"):
            return GPT(make_config(p, **over).model).param_counts()["total"]

    base = make_config(base_preset)
    t = base.train
    per_param = t.max_steps * t.batch_size * base.model.block_size / params(base_preset, {})
    cfg = make_config(preset, **size)
    steps = max(1, round(per_param * params(preset, size) / (cfg.train.batch_size * cfg.model.block_size)))
    if steps < t.eval_interval or base_preset == "cpu":  # CPU runs: as many evaluations as the base run has
        evals = max(1, t.max_steps // t.eval_interval)
        interval = max(1, round(steps / evals))
        steps = interval * evals  # the last evaluation at the last step (within half an interval of the budget)
    else:
        interval = t.eval_interval  # the base preset's: paper, every 1000 steps, as the research evaluated
    return {"max_steps": steps, "warmup_steps": round(steps * t.warmup_steps / t.max_steps), "eval_interval": interval}


def experiments(sizes: dict, base_preset: str, paper: bool) -> list[Experiment]:
    out = []
    for label, size in sizes.items():
        preset, over = (size, {}) if paper else ("cpu", size)
        steps = budget(preset, over, base_preset)
        for tag, arm in ARMS.items():
            lr = {"lr": PAPER_LR[arm["method"]]} if paper else {}
            out.append(
                Experiment(
                    f"SC-{label}-{tag}", preset, {**over, **arm, **steps, **lr}, E.SCALE_CONTROL if tag == "R" else ""
                )
            )
    return out


PRESETS = {
    "embedded": dict(experiments=experiments(CPU_SIZES, "cpu", paper=False), seeds=[0, 1]),
    "paper": dict(experiments=experiments(PAPER_SIZES, "medium-512", paper=True), seeds=[0]),
}
for _p in PRESETS.values():  # --experiments SC-... selects arms: make their ids known to the registry
    E.REGISTRY.update({e.id: e for e in _p["experiments"]})

if __name__ == "__main__":
    raise SystemExit(recipe.main("scaling", PRESETS, doc=__doc__))
