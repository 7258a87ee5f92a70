"""`oelm-ray selftest` on a Ray cluster: the checks of `core/selftest.py` on every GPU, one task each.

Each alive node gets one task per GPU (`num_gpus=1`, pinned to that node), or one CPU task where
the node has no GPU. Lines come back as tasks finish; a task that has not finished within the
timeout, or that raised, is a failure line of its own. Exit code 2 if any check failed.
"""

from __future__ import annotations

import os
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..core import selftest
from ..core.io import one_line
from .resources import connect, running_cluster


@ray.remote(max_retries=0)
def _checks_here(device: str, speed: bool, only: tuple[str, ...]) -> tuple[str, list[tuple[str, bool, str]]]:
    import torch

    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    where = ray.util.get_node_ip_address()
    if device == "cuda":
        where += f" gpu{gpu or '?'} " + (
            torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(torch sees no GPU)"
        )
    else:
        where += " cpu"
    checks = selftest.run_selftest(device, speed=speed, only=only)
    return where, [(c.name, c.ok, c.detail) for c in checks]


def run_on_cluster(
    address: str | None,
    speed: bool = True,
    only: tuple[str, ...] = (),
    timeout_s: float = selftest.TIMEOUT_S,
    print_line=print,
) -> bool:
    """Run the checks on every GPU (or CPU-only node) of the cluster; print one line per check. True if all passed."""
    connect(running_cluster(address))  # the cluster running here, never a Ray of its own
    refs: dict = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        gpus = int(node["Resources"].get("GPU", 0))
        pin = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        for _ in range(gpus or 1):
            ref = _checks_here.options(num_gpus=1 if gpus else 0, num_cpus=1, scheduling_strategy=pin).remote(
                "cuda" if gpus else "cpu", speed, tuple(only)
            )
            refs[ref] = f"{node['NodeManagerAddress']} {'gpu' if gpus else 'cpu'}"
    ok, deadline = True, time.monotonic() + timeout_s
    while refs:
        done, _ = ray.wait(list(refs), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not done:  # past the deadline: every task still out is a failure of its own
            for ref, where in refs.items():
                print_line(
                    f"{where}: selftest      FAIL  no answer within {timeout_s:g}s (a hung GPU or a node "
                    "without free resources: `ray status`)"
                )
                ray.cancel(ref, force=True)
            return False
        ref = done[0]
        where = refs.pop(ref)
        try:
            where, rows = ray.get(ref, timeout=10)
        except Exception as e:  # the task raised, or its worker died
            print_line(f"{where}: selftest      FAIL  {one_line(e, 300, typed=True)}")
            ok = False
            continue
        lines, passed = selftest.render(where, [selftest.Check(*r) for r in rows])
        for line in lines:
            print_line(line)
        ok &= passed
    return ok
