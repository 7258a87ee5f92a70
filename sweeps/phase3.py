"""Phase 3 of the OELM study: baseline / oelm_freeze / oelm_random, every dataset, over seeds.

    python sweeps/phase3.py                  # embedded default: local Ray, cpu preset, stories corpus
    python sweeps/phase3.py --preset paper   # GPT-01 ... GPT-07 on the running cluster (RAY_ADDRESS)
    python sweeps/phase3.py --preset paper-controls   # ... and CTL-01 ... CTL-06, the confound controls

Run the same command again after an interruption: finished trials are kept, the others resume.
"""

from oelm_ray.core import experiments
from oelm_ray.tune import recipe

PRESETS = {
    "embedded": dict(experiments=list(experiments.EMBEDDED), seeds=[0, 1]),
    "paper": dict(experiments=list(experiments.PAPER), seeds=[0]),
    "paper-controls": dict(experiments=list(experiments.PAPER) + list(experiments.CONTROLS), seeds=[0]),
}

if __name__ == "__main__":
    raise SystemExit(recipe.main("phase3", PRESETS, doc=__doc__))
