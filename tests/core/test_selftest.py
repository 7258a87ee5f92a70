"""`oelm-ray selftest`: every check passes on this CPU, a broken piece fails its own check, the cluster runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oelm_ray import cli
from oelm_ray.core import selftest
from oelm_ray.core.batches import Batches
from oelm_ray.core.train_step import TrainStep

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_selftest_local_passes_on_this_cpu():
    p = subprocess.run(
        [sys.executable, "-m", "oelm_ray", "selftest", "--local"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    lines = p.stdout.splitlines()
    for name in selftest.CHECKS:  # one line per check, each passed (speed on a CPU: a figure, not judged)
        (line,) = [l for l in lines if l.split(": ", 1)[-1].split()[:1] == [name]]
        assert (" -- " if name == "speed" else " PASS ") in line and " cpu " in line, line
    assert "trainer " in line and "model step " in line and "ratio " in line  # the speed line's figures
    assert lines[-1].startswith("selftest passed")


def test_broken_staging_fails_its_check_and_the_command_exits_2(monkeypatch, capsys):
    # a staged batch whose saved state is the one after it: a resumed run would skip a batch
    monkeypatch.setattr(Batches, "state_dict", lambda self: self.sampler.state_dict())
    assert cli.main(["selftest", "--local", "--checks", "staging,tensor-lr"]) == 2
    out = capsys.readouterr().out.splitlines()
    assert [l.split(": ", 1)[1].split()[:2] for l in out[:2]] == [["staging", "FAIL"], ["tensor-lr", "PASS"]]
    assert out[-1].startswith("selftest FAILED: a failed check means")


def test_a_tensor_lr_that_is_not_updated_fails_its_check(monkeypatch):
    real = TrainStep.set_lr
    monkeypatch.setattr(TrainStep, "set_lr", lambda self, lr: None if self.tensor_lr else real(self, lr))
    (check,) = selftest.run_selftest("cpu", only=("tensor-lr",))
    assert not check.ok and "lr as a device Tensor" in check.detail


def test_dropout_frozen_across_replays_fails_its_check(monkeypatch):
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda x, p=0.5, training=True, inplace=False: x * (1 - p))
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda *a, dropout_p=0.0, **kw: sdpa(*a, dropout_p=0.0, **kw),
    )
    monkeypatch.setattr(torch, "compile", lambda m, **kw: m)  # eager stands in for the compiled step
    (check,) = selftest.run_selftest("cpu", only=("dropout",))
    assert not check.ok and "distinct losses" in check.detail


@pytest.mark.slow
def test_selftest_on_a_cluster_runs_a_task_per_node_and_times_out_with_a_line(ray_local):
    from oelm_ray.tune.selftest import run_on_cluster

    lines = []
    assert run_on_cluster(None, only=("staging",), print_line=lines.append)
    assert len(lines) == 1 and lines[0].startswith("127.0.0.1 cpu: staging") and " PASS " in lines[0]
    lines.clear()
    assert not run_on_cluster(None, only=("resume",), timeout_s=0.5, print_line=lines.append)
    assert lines == [
        "127.0.0.1 cpu: selftest      FAIL  no answer within 0.5s (a hung GPU or a node without free "
        "resources: `ray status`)"
    ]


def test_selftest_on_a_cluster_joins_the_one_running_here_not_a_ray_of_its_own(monkeypatch):
    from oelm_ray.tune import selftest as cluster_selftest

    asked = []

    def stop(address, *_):
        asked.append(address)
        raise RuntimeError("stop")

    monkeypatch.setattr(cluster_selftest, "connect", stop)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for address, env, want in ((None, None, "auto"), (None, "10.0.0.1:6379", "10.0.0.1:6379"), ("h:1", None, "h:1")):
        if env:
            monkeypatch.setenv("RAY_ADDRESS", env)
        with pytest.raises(RuntimeError, match="stop"):
            cluster_selftest.run_on_cluster(address)
        assert asked.pop() == want
