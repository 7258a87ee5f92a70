"""oelm-ray: a Ray Tune sweep runner for OELM attention ablations.

The trainer (`oelm_ray.trainer.train`) runs on its own; Ray lives in `oelm_ray.tune`, W&B in
`oelm_ray.wandb`.
"""

__version__ = "0.1.0"
