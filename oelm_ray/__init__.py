"""oelm-ray: a Ray Tune sweep runner for OELM attention ablations.

`oelm_ray.core` (config, model, data, trainer) runs on its own, without Ray or W&B; `oelm_ray.tune`
runs it as Ray Tune trials and logs to W&B; `oelm_ray.results` turns a sweep's records into tables.
"""

__version__ = "0.1.0"
