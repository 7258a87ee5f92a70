"""Multi-GPU trials: one Tune trial trains data-parallel through Ray Train's `TorchTrainer`.

The Tune function (trial.trainable) calls `train_ddp`, which starts N Ray Train workers (DDP over
NCCL on GPUs, gloo on CPUs) that each run `trainer.train` under torch.distributed. The trainer
then draws the same global batch on every rank and trains on its rank's slice, DDP averages the
gradients: the run sees exactly the data of a single-process run with the same batch_size.

Only rank 0 writes metrics and checkpoints (into the trial's folder) and relays each report to
the Tune function, which calls `tune.report` with the checkpoint and only then lets rank 0 go on:
the same synchronous checkpoint-per-report contract as a single-process trial. Every rank calls
`ray.train.report`, which Ray Train requires (it is a barrier across the workers).

Resources: the trial itself holds 1 CPU (it runs the Ray Train controller); the workers hold
their own placement group of N x (cpus, gpus) on the trial's node (a multi-GPU trial uses the
GPUs of one server). Ray 2.60 frees that placement group when Tune stops the trial early only
with the dashboard installed (`ray[default]`, a dependency of this project).
"""

from __future__ import annotations

import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

RELAY_TIMEOUT_S = 24 * 3600.0  # rank 0 waits this long for the trial to take a report (a stuck trial ends)


@ray.remote(num_cpus=0, max_concurrency=4)
class _Relay:
    """Carries rank 0's reports to the Tune function and its acknowledgement back."""

    def __init__(self) -> None:
        self.reports: queue.Queue = queue.Queue()
        self.acks: queue.Queue = queue.Queue()

    def put(self, metrics: dict) -> None:
        self.reports.put(metrics)
        self.acks.get(timeout=RELAY_TIMEOUT_S)  # go on once the trial has reported (and saved the checkpoint)

    def get(self, timeout: float) -> dict | None:
        try:
            return self.reports.get(timeout=timeout)
        except queue.Empty:
            return None

    def ack(self) -> None:
        self.acks.put(True)


def train_ddp(
    cfg_dict: dict,
    out: Path,
    report: Callable[[dict], None],
    resume: bool,
    workers: int,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    log: Callable[[str], None] = print,
) -> None:
    """Train `cfg_dict` data-parallel on `workers` Ray Train workers; `report` gets rank 0's metrics."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    relay = _Relay.remote()
    node_id = ray.get_runtime_context().get_node_id()
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "cfg": cfg_dict,
            "out": str(out),
            "resume": resume,
            "relay": relay,
            "threads": max(1, int(cpus_per_worker)),
        },
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=gpus_per_worker > 0,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})},
            label_selector={"ray.io/node-id": node_id},  # rank 0 writes the trial's folder on this node
        ),
        # Ray Train's own run state only (no Train checkpoints): beside the trial's run folder
        run_config=RunConfig(name=f"ddp-{uuid.uuid4().hex[:8]}", storage_path=str(out.parent / "ddp")),
    )
    log(f"data-parallel: {workers} workers x ({cpus_per_worker:g} CPU, {gpus_per_worker:g} GPU)")
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the trial's thread: Tune retries the trial
            outcome["error"] = e

    th = threading.Thread(target=fit, name="ddp-fit", daemon=True)
    th.start()
    try:
        while True:
            metrics = ray.get(relay.get.remote(1.0))
            if metrics is not None:
                report(metrics)
                relay.ack.remote()
            elif not th.is_alive():
                break
    finally:
        th.join(timeout=5)
        ray.kill(relay)
    if "error" in outcome:
        raise outcome["error"]
    res = outcome.get("result")
    if res is not None and getattr(res, "error", None):
        raise res.error


def _worker_loop(c: dict) -> None:
    """One Ray Train worker: `trainer.train` under torch.distributed (set up by TorchTrainer)."""
    import ray.train
    import torch
    from ray.train import get_context

    from ..core.config import Config
    from ..core.trainer import train

    rank = get_context().get_world_rank()
    if torch.cuda.is_available():
        torch.cuda.set_device(ray.train.torch.get_device())
    cfg = Config.from_dict(c["cfg"])
    cfg.train.num_threads = c["threads"]
    relay = c["relay"]

    def report(metrics: dict) -> None:
        if rank == 0:  # returns once the Tune trial has reported it; gpu: the worker group's GPU ids
            ray.get(relay.put.remote({**metrics, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES") or "-"}))
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def log(line: str) -> None:
        if rank == 0:
            with open(Path(c["out"]) / "train.log", "a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} [ddp] {line}\n")

    train(cfg, c["out"], report=report, resume=c["resume"], log=log)
