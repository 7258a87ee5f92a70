"""Determinism: the same seed and config give the same numbers on CPU, in one process and across processes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from oelm_ray.core.config import make_config

from helpers import TINY, World, losses, make_world, quiet, train_argv


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("world"))


def test_same_seed_same_numbers_in_one_process_and_across_processes(tmp_path, world):
    from oelm_ray.core.io import read_metrics
    from oelm_ray.core.trainer import train

    over = {**TINY, "max_steps": 20, "dropout": 0.1, "data_dir": str(world.data)}  # dropout: RNG in every step
    threads = torch.get_num_threads()
    try:
        for out, seed in (("a", 0), ("b", 0), ("other-seed", 1)):
            train(make_config("cpu", **over, seed=seed), tmp_path / out, log=quiet)
    finally:
        torch.set_num_threads(threads)
    a, b = (read_metrics(tmp_path / x / "metrics.jsonl") for x in ("a", "b"))
    assert len(a) == 2 and losses(a) == losses(b)
    wa = torch.load(tmp_path / "a" / "latest.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "latest.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # a different seed does differ (the comparison is not vacuous)
    assert losses(read_metrics(tmp_path / "other-seed" / "metrics.jsonl")) != losses(a)
    # a fresh interpreter (another day, or a Ray worker) gives the same numbers
    args = [
        sys.executable,
        "-m",
        "oelm_ray",
        *train_argv(max_steps=20, dropout=0.1),
        "--data-dir",
        str(world.data),
        "--out-dir",
        str(tmp_path / "c"),
        "--no-prepare",
    ]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert losses(read_metrics(tmp_path / "c" / "metrics.jsonl")) == losses(a)
