"""Ray's side of a sweep: join or start Ray, per-trial resources checked against the cluster, shared storage.

Every check fails with one ConfigError before any trial starts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import ray

from ..core.config import ConfigError
from ..core.io import tcp_error

if TYPE_CHECKING:
    from .sweep import Sweep


def connect(address: str | None) -> None:
    """Join a running cluster (address or RAY_ADDRESS) or start a local Ray that listens on 127.0.0.1 only."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":  # "auto" joins the cluster that `ray start` left running here
        host, _, port = address.removeprefix("ray://").rpartition(":")
        if not address.startswith("ray://") and host and port.isdigit():
            why = tcp_error(host, int(port), timeout=5)
            if why:
                raise ConfigError(
                    f"cannot reach the Ray cluster at {address} ({why}): is the head up (`ray up cluster.yaml`, "
                    "`ray status`)? unset RAY_ADDRESS to run locally instead"
                ) from None
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError) as e:
            raise ConfigError(
                f"could not join the Ray cluster at {address}: {e}. If token auth is on (Ray >= 2.59), set "
                "RAY_AUTH_MODE=token and make the head's token readable (~/.ray/auth_token or RAY_AUTH_TOKEN)"
            ) from None
        return
    # a laptop or CI: keep every Ray process on loopback (see README, "Network"). Ray read this
    # variable when it was imported (above): set it for the processes it starts, and mirror it into
    # the constant this process already holds, or 127.0.0.1 is rewritten to the outward address
    if os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0") == "0":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    # address="local": always a Ray of our own, never one that another process left running here
    ray.init(address="local", include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False)


def resources(sweep: Sweep) -> dict[str, float]:
    """Per-trial resources, checked against the cluster: a GPU request on a GPU-less cluster fails now."""
    have = ray.cluster_resources()
    workers = sweep.workers_per_trial if sweep.workers_per_trial > 1 else int(sweep.gpus_per_trial or 0)
    if workers > 1:
        return _ddp_resources(sweep, workers, have)
    gpus_total, cpus_total = have.get("GPU", 0.0), have.get("CPU", 0.0)
    if sweep.gpus_per_trial is None and sweep.require_gpus and gpus_total < 1:
        raise ConfigError(
            "--preset paper trains Medium-512 for 100K+ steps a trial, on GPUs, but the Ray cluster has none: connect to a GPU "
            "cluster (--address or RAY_ADDRESS), or pass --gpus-per-trial 0 to train on CPUs on purpose"
        )
    gpu = sweep.gpus_per_trial if sweep.gpus_per_trial is not None else (1.0 if gpus_total >= 1 else 0.0)
    cpu = sweep.cpus_per_trial if sweep.cpus_per_trial is not None else (2.0 if gpu else 1.0)
    if gpu > gpus_total:
        raise ConfigError(
            f"each trial asks for {gpu:g} GPU(s) but the Ray cluster has {gpus_total:g}: Ray would leave the trials "
            "PENDING forever. Pass --gpus-per-trial 0 to train on CPUs, or connect to a GPU cluster (--address)"
        )
    if cpu > cpus_total:
        raise ConfigError(f"each trial asks for {cpu:g} CPUs but the cluster has {cpus_total:g}: lower --cpus-per-trial")
    return {"cpu": cpu, "gpu": gpu}


def _ddp_resources(sweep: Sweep, workers: int, have: dict) -> dict[str, Any]:
    """A data-parallel trial: 1 CPU for the trial (Ray Train's controller) + its workers' own bundles."""
    gpu = float(sweep.gpus_per_trial or 0)
    gpw = gpu / workers
    cpw = sweep.cpus_per_trial / workers if sweep.cpus_per_trial else (2.0 if gpu else 1.0)
    per_node = max((n["Resources"].get("GPU" if gpw else "CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
    need = workers * (gpw or cpw) + (0 if gpw else 1)
    if need > per_node:
        raise ConfigError(
            f"each trial trains on {workers} workers x ({cpw:g} CPU, {gpw:g} GPU), all on one node, but the largest "
            f"node has {per_node:g} {'GPU' if gpw else 'CPU'}(s): lower --gpus-per-trial / workers_per_trial"
        )
    if 1 + workers * cpw > have.get("CPU", 0.0):
        raise ConfigError(f"each trial needs {1 + workers * cpw:g} CPUs (1 + {workers} workers) but the cluster has "
                          f"{have.get('CPU', 0.0):g}: lower --cpus-per-trial")
    if sweep.max_concurrent is None:  # trials must not hold the CPUs their own workers wait for
        fit = [have.get("CPU", 0.0) // (1 + workers * cpw)] + ([have.get("GPU", 0.0) // (workers * gpw)] if gpw else [])
        sweep.max_concurrent = max(1, int(min(fit)))
    return {"cpu": 1.0, "gpu": 0.0, "ddp": {"workers": workers, "cpus_per_worker": cpw, "gpus_per_worker": gpw}}


def probe_nodes(path: str) -> list[tuple[str, bool]]:
    """(node address, whether `path` exists there) from a task pinned to each live node."""
    @ray.remote(num_cpus=0)
    def sees(path: str) -> tuple[str, bool]:
        return ray.util.get_node_ip_address(), os.path.exists(path)

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [
        sees.options(scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(path)
        for n in nodes
    ]
    return ray.get(refs, timeout=60)


def is_uri(storage: str) -> bool:
    return "://" in storage


def check_shared_storage(folder: Path, probe: Callable[[str], list[tuple[str, bool]]] | None = None) -> None:
    """Multi-node: every node must see the storage folder; a local path on the head fails fast.

    `probe(path)` -> [(node, sees it)] for every node; the default asks each live node (tests inject one).
    """
    token = f".shared-check-{os.getpid()}-{time.time_ns()}"
    (folder / token).write_text("x")
    try:
        blind = [ip for ip, ok in (probe or probe_nodes)(str(folder / token)) if not ok]
    finally:
        (folder / token).unlink(missing_ok=True)
    if blind:
        raise ConfigError(
            f"storage {folder} is not visible from node(s) {', '.join(blind)}: a multi-node sweep needs --storage on "
            "storage every node mounts (NFS path) or an object-store URI (s3://...), and --data-dir likewise"
        )
