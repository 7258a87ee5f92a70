"""Partial unfreezing of the OELM Q/K, beside the baseline and the full freeze.

    python sweeps/partial_unfreeze.py                  # embedded default: local Ray, cpu preset, stories corpus
    python sweeps/partial_unfreeze.py --preset paper   # on GPT-01 / GPT-02 (TinyStories) on the running cluster

Variants of the full freeze (oelm_freeze), each an Experiment so tables and folders read:
  PU-k<k>        Q/K frozen in the lowest k blocks only, 0 < k < L (k = 0 is the baseline's
                 policy, k = L the full freeze);
  PU-unf<f>      all Q/K frozen, then trained from step f x max_steps on (f = 0.25, 0.50, 0.75);
  PU-mult<m>     orthogonal Q/K trained from step 1 at m x the learning rate (a soft freeze);
  PU-every<N>    orthogonal Q/K updated only on every N-th step, fixed in between (qk_update_every);
  PU-lrd<d>      orthogonal Q/K trained from step 1, every block at lr x d^(L-1-i) (lr_layer_decay):
                 the lower blocks, Q/K included, nearly frozen.
and the controls that tell init scale, orthogonality and freezing apart (summary.md says what each
isolates): the PU-unf/PU-mult schedules from scale-matched random Q/K (PU-rand-unf0.25,
PU-rand-mult0.1: oelm_random at std 1/sqrt(d_model)), orthogonal Q/K trained from step 1 at the
full rate (PU-orth-train), and a baseline whose Q/K start random at the orthogonal rows' scale
(PU-rand-train: oelm_random at 1/sqrt(d_model), trained from step 1).
summary.md says which meet the 1.05 criterion and how many trainable parameters each saves.
Run the same command again after an interruption to resume.

    python sweeps/partial_unfreeze.py --best runs/lr_warmup-embedded/best.json

--best trains each arm at the learning rate and warmup that sweeps/lr_warmup.py's search (synchronous
successive halving over every candidate) found: the baseline at the baseline's, the full freeze and every PU-
variant at oelm_freeze's (same dataset). The run is then named <name>-tuned unless --name is given.
"""

import argparse
import dataclasses

from oelm_ray.core import experiments as E
from oelm_ray.core.config import ConfigError, make_config
from oelm_ray.core.experiments import Experiment
from oelm_ray.search_report import load_cells
from oelm_ray.tune import recipe

UNFREEZE_FRACS = (0.25, 0.5, 0.75)
QK_LR_MULTS = (0.1,)
BASELINE_RATE = ("CPU-01", "GPT-01", "PU-rand-train")  # --best: these train at the baseline's searched rate
UPDATE_EVERY = (10,)  # a tenth of the Q/K updates
LAYER_DECAYS = (0.5,)
SCALED = {"method": "oelm_random", "qk_random_std": 0.0}  # random Q/K at the orthogonal rows' std 1/sqrt(d_model)
ORTHO = (
    "orthogonality: the same schedule from random Q/K at the orthogonal rows' scale (oelm_random, std 1/sqrt(d_model)), "
    "so {arm} vs this row compares orthogonal with random Q/K, everything else equal"
)
FREEZING = (
    "freezing: orthogonal Q/K trained from step 1 at the full rate, so the PU-unf and PU-mult rows vs this one "
    "isolate the frozen (or slowed) phase, and this row vs the baseline the orthogonal init of trained Q/K"
)
INIT_SCALE = (
    "init scale: a baseline whose Q/K start random at the orthogonal rows' scale (std 1/sqrt(d_model), "
    "the baseline's is 0.02) and train from step 1, so baseline vs this row isolates the Q/K init scale"
)


def variants(baseline: Experiment, freeze: Experiment, n_layer: int, max_steps: int) -> list[Experiment]:
    """baseline, full freeze, and the partial variants of `freeze` for a model of n_layer blocks."""
    f, pre = freeze.overrides, freeze.preset
    return [
        baseline,
        freeze,
        *[Experiment(f"PU-k{k}", pre, {**f, "qk_freeze_layers": k}) for k in range(1, n_layer)],
        *[
            Experiment(f"PU-unf{x:.2f}", pre, {**f, "qk_unfreeze_step": max(1, round(x * max_steps))})
            for x in UNFREEZE_FRACS
        ],
        *[Experiment(f"PU-mult{m:g}", pre, {**f, "qk_unfreeze_step": 1, "qk_lr_mult": m}) for m in QK_LR_MULTS],
        *[Experiment(f"PU-every{n}", pre, {**f, "qk_update_every": n}) for n in UPDATE_EVERY],
        *[Experiment(f"PU-lrd{d:g}", pre, {**f, "qk_unfreeze_step": 1, "lr_layer_decay": d}) for d in LAYER_DECAYS],
        # the controls, paired with the PU arms that beat the baseline in the embedded default
        Experiment(
            f"PU-rand-unf{UNFREEZE_FRACS[0]:.2f}",
            pre,
            {**f, **SCALED, "qk_unfreeze_step": max(1, round(UNFREEZE_FRACS[0] * max_steps))},
            ORTHO.format(arm=f"PU-unf{UNFREEZE_FRACS[0]:.2f}"),
        ),
        Experiment(
            f"PU-rand-mult{QK_LR_MULTS[0]:g}",
            pre,
            {**f, **SCALED, "qk_unfreeze_step": 1, "qk_lr_mult": QK_LR_MULTS[0]},
            ORTHO.format(arm=f"PU-mult{QK_LR_MULTS[0]:g}"),
        ),
        Experiment("PU-orth-train", pre, {**f, "qk_unfreeze_step": 1}, FREEZING),
        Experiment("PU-rand-train", pre, {**f, **SCALED, "qk_unfreeze_step": 1}, INIT_SCALE),
    ]


def _defaults(base: str, freeze: str) -> list[Experiment]:
    cfg = E.REGISTRY[freeze].config(0)
    return variants(E.REGISTRY[base], E.REGISTRY[freeze], cfg.model.n_layer, cfg.train.max_steps)


PRESETS = {
    "embedded": dict(experiments=_defaults("CPU-01", "CPU-02"), seeds=[0, 1]),
    "paper": dict(experiments=_defaults("GPT-01", "GPT-02"), seeds=[0]),
}
# --experiments PU-... selects variants: make their ids known to the registry
for _p in PRESETS.values():
    E.REGISTRY.update({e.id: e for e in _p["experiments"] if e.id.startswith("PU-")})


def tuned(exps: list[Experiment], best_json: str, common: dict) -> list[Experiment]:
    """Each experiment at its method's searched lr and warmup (PU- variants and the freeze: oelm_freeze's)."""
    try:
        cells = load_cells(best_json)
    except ConfigError as e:
        raise ConfigError(f"--best {e}") from None
    out = []
    for e in exps:
        cfg = e.config(0, common)
        method = "baseline" if e.id in BASELINE_RATE else "oelm_freeze"
        hit = [c["best"] for c in cells if c["method"] == method and c["dataset"] == cfg.data.dataset and c.get("best")]
        if not hit:
            raise ConfigError(
                f"--best {best_json} has no finished {method} search on {cfg.data.dataset} (needed by {e.id})"
            )
        out.append(
            dataclasses.replace(
                e, overrides={**e.overrides, "lr": hit[0]["lr"], "warmup_steps": hit[0]["warmup_steps"]}
            )
        )
    return out


def at_run_size(sw, args):
    """Re-derive the variants for the trials' real size (--smoke-test, --set max_steps=... n_layer=...);
    with --best, each at its method's searched lr and warmup."""
    base, freeze = PRESETS[args.preset]["experiments"][:2]
    cfg = make_config(freeze.preset, freeze.overrides, sw.common)
    keep = {e.id for e in sw.experiments}
    sw.experiments = [
        e
        for e in variants(base, freeze, cfg.model.n_layer, cfg.train.max_steps)
        if e.id in keep or e.id.startswith("PU-k") and not args.experiments
    ]
    if args.best:
        if {"lr", "warmup_steps"} & set(sw.common):
            raise ConfigError("--best sets lr and warmup_steps per arm: drop --set lr / --set warmup_steps")
        sw.experiments = tuned(sw.experiments, args.best, sw.common)
        if not args.name:
            sw.name = f"{sw.name}-tuned"
    return sw


def options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--best",
        default=None,
        metavar="BEST_JSON",
        help="train each arm at the lr and warmup that sweeps/lr_warmup.py found (its best.json): the baseline "
        "at the baseline's, the freeze and the PU- variants at oelm_freeze's; the run is named <name>-tuned",
    )


def main(argv=None) -> int:
    return recipe.main(
        "partial_unfreeze",
        PRESETS,
        argv,
        customize=at_run_size,
        doc=__doc__,
        options=options,
    )


if __name__ == "__main__":
    raise SystemExit(main())
