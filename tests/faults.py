"""A trainable that crashes once, at a given step: how the tests inject faults into real trials.

`Sweep(..., trainable=faults.trainable, extra_config={"fault": {"step": 20, "marker": path}})`:
the trial runs oelm-ray's own trainable and, at the first report at or after `step`, raises (or
SIGKILLs itself, kind="kill") -- once: the marker file says it happened, so the retry runs clean.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import ray.cloudpickle
from ray import tune

from oelm_ray.tune import trial

# Ray's workers cannot import this test module: ship the function itself
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def trainable(config: dict) -> None:
    fault = config.get("fault")
    real = tune.report

    def report(metrics, *args, **kwargs):
        if fault and metrics["step"] >= fault["step"]:
            inject(fault)
        return real(metrics, *args, **kwargs)

    tune.report = report  # what trial.trainable calls (the same module object, in this worker)
    try:
        trial.trainable(config)
    finally:
        tune.report = real


def inject(fault: dict) -> None:
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    if fault.get("kind") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault at step >= {fault['step']}")
