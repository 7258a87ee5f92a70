"""Data-parallel training: N ranks on slices of one global batch train like one process on it.

Tolerance: the ranks see exactly the single process's data (every rank draws the same global
batch and keeps its slice), start from the same init, and DDP averages their gradients, so the
only difference is the order of float additions (a mean of per-rank means vs one mean, an
all-reduce vs a local sum). Over a few dozen fp32 steps that stays near 1e-6 relative; we allow
1e-5 (measured: ~2e-7). The runs use lr 2e-3, not the cpu preset's 1e-2: at 1e-2 Adam carries the
same rounding differences into visibly different losses within 20 steps (1.3e-5 relative seen), an
effect of the step size, not of data parallelism.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from oelm_ray.core.config import ConfigError, make_config
from oelm_ray.core.data import prepare
from oelm_ray.core.experiments import SMOKE
from oelm_ray.core.io import read_metrics
from oelm_ray.core.prepared import load_prepared
from oelm_ray.core.trainer import train

RTOL = 1e-5


def _cfg(tmp: Path, **kw):
    return make_config(
        "cpu", **{**SMOKE, "data_dir": str(tmp / "data"), "num_threads": 1, "max_steps": 20, "lr": 2e-3, **kw}
    )


def _rank(rank: int, world: int, port: int, cfg_dict: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train(cfg_dict, out, log=lambda s: None)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a: list[dict], b: list[dict], keys=("train/loss", "val/loss")) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for ra, rb in zip(a, b):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=RTOL), (ra["step"], k, ra[k], rb[k])


def test_two_gloo_ranks_match_one_process_on_the_same_global_batch(tmp_path):
    cfg = _cfg(tmp_path, qk_unfreeze_step=10, method="oelm_freeze")  # the unfreeze re-wraps DDP mid-run
    prepare(cfg.data, progress=False)
    train(cfg, tmp_path / "single", data=load_prepared(cfg.data), log=lambda s: None)
    mp.spawn(_rank, args=(2, _free_port(), cfg.to_dict(), str(tmp_path / "ddp")), nprocs=2, join=True)
    _close(read_metrics(tmp_path / "ddp" / "metrics.jsonl"), read_metrics(tmp_path / "single" / "metrics.jsonl"))
    a = torch.load(tmp_path / "ddp" / "latest.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "single" / "latest.pt", weights_only=True)["model"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["steps"] == 20


def test_batch_must_split_evenly_over_ranks(tmp_path, monkeypatch):
    import oelm_ray.core.trainer as T

    cfg = _cfg(tmp_path, batch_size=3)
    prepare(cfg.data, progress=False)
    monkeypatch.setattr(T, "_distributed", lambda: (0, 2))  # rank 0 of 2
    with pytest.raises(ConfigError, match="batch_size=3 must be divisible by the 2 data-parallel workers"):
        T.train(cfg, tmp_path / "o", log=lambda s: None)


@pytest.mark.slow
def test_ddp_trial_in_a_sweep_matches_a_single_process_run(tmp_path, ray_local):
    """A Tune trial with workers_per_trial=2 trains through Ray Train's TorchTrainer (gloo)."""
    import ray

    from oelm_ray.core import experiments as E
    from oelm_ray.tune.sweep import Sweep, run

    ray.shutdown()  # the trial needs 1 CPU + 2 workers: a 3-CPU Ray of our own
    ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        common = {**SMOKE, "max_steps": 20, "data_dir": str(tmp_path / "data"), "num_threads": 1}
        sw = Sweep(
            name="ddp",
            experiments=[E.EMBEDDED["CPU-02"]],
            seeds=[0],
            storage=str(tmp_path / "runs"),
            common=common,
            workers_per_trial=2,
            max_failures=0,
        )
        run_dir = run(sw, report=False)
        assert sw.max_concurrent == 1  # 3 CPUs fit one trial (1 + 2 workers)
        rec = json.loads((run_dir / "trials" / "CPU-02-oelm_freeze-s0.json").read_text())
        assert rec["status"] == "completed", rec
        cfg = E.EMBEDDED["CPU-02"].config(0, **common)
        train(cfg, tmp_path / "single", log=lambda s: None)
        _close(rec["history"], read_metrics(tmp_path / "single" / "metrics.jsonl"))
        trial_run = run_dir / "CPU-02-oelm_freeze-s0" / "state"
        assert (trial_run / "latest.pt").exists() and "[ddp]" in (trial_run / "train.log").read_text()
        assert not [pg for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED"]
    finally:
        ray.shutdown()
