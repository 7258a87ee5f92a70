"""Ray's side of a sweep: join or start Ray, per-trial resources checked against the cluster, shared storage.

Every check fails with one ConfigError before any trial starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from ..core.config import ConfigError
from ..core.io import DeadlineExceeded, call_within, one_line, tcp_error

if TYPE_CHECKING:
    from .sweep import Sweep


CONNECT_TIMEOUT_S = 30.0
"""How long joining a running Ray cluster may take (`--connect-timeout`) before it is one error line."""

# what an HTTP/2 (gRPC) client sends first: a Ray GCS (or Ray Client server) answers it with a SETTINGS frame at once
_H2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
_CHECK_HEAD = "is the head up (`ray status` on it; `ray up cluster.yaml` starts it)"


class ClusterUnreachable(ConfigError):
    """A Ray cluster that cannot be joined: `what` is wrong and `fix` what to do (the message: both, one line)."""

    def __init__(self, what: str, fix: str):
        super().__init__(f"{what}: {fix}")
        self.what, self.fix = what, fix


def running_cluster(address: str | None) -> str:
    """The cluster a tool that inspects one means: `address`, else RAY_ADDRESS, else "auto" (the one
    `ray start` left running on this node); never a new local Ray, unlike a sweep."""
    return address or os.environ.get("RAY_ADDRESS") or "auto"


def connect(address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Join a running cluster (address or RAY_ADDRESS) or start a local Ray that listens on 127.0.0.1 only."""
    _check_timeout(timeout)
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":  # "auto" joins the cluster that `ray start` left running here
        join(address, timeout)
        return
    # a laptop or CI: keep every Ray process on loopback (see README, "Network"). Ray read this
    # variable when it was imported (above): set it for the processes it starts, and mirror it into
    # the constant this process already holds, or 127.0.0.1 is rewritten to the outward address
    if os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0") == "0":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    # address="local": always a Ray of our own, never one that another process left running here
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)


def join(address: str, timeout: float = CONNECT_TIMEOUT_S, quiet: bool = False) -> None:
    """ray.init on a running cluster ("auto": the one `ray start` left on this node; host:port; ray://host:port),
    done or refused with a ClusterUnreachable within `timeout` seconds, whatever state the cluster is in.

    Cheap checks first, each within what is left of `timeout`: the address ("auto" resolved by Ray's own
    rules: none running, or an address file whose cluster is gone), a TCP connect (nothing listens, or
    no route), an HTTP/2 hello (a socket that accepts and never answers), one request to the GCS (a
    refused token fails there in under a second, where ray.init retries it for 20 s); then ray.init
    itself, in a thread, with the rest of the deadline. `quiet`: Ray logs errors only.
    """
    _check_timeout(timeout)
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(deadline - time.monotonic(), 0.1)

    target, from_file = _resolve(address)
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if host and port.isdigit() and "://" not in target.removeprefix("ray://"):
        why = tcp_error(host, int(port), timeout=min(5.0, left()))
        if why and from_file:
            raise ClusterUnreachable(
                f"the Ray address file {from_file} names {target}, but nothing listens there ({why}): "
                "the cluster `ray start` left on this node is gone",
                "start it again (`ray up cluster.yaml`, or `ray start --head`), or pass --address / RAY_ADDRESS",
            )
        if why:
            raise ClusterUnreachable(
                f"cannot reach the Ray cluster at {target} ({why})",
                f"{_CHECK_HEAD}, and is this its GCS address (port 6379 by default)? "
                "(a sweep without --address / RAY_ADDRESS runs on a local Ray instead)",
            )
        why = tcp_error(host, int(port), timeout=min(5.0, left()), hello=_H2_HELLO)
        if why:
            raise ClusterUnreachable(
                f"the Ray cluster at {target} does not answer ({why})",
                "this is not a Ray head's GCS port (6379 by default), or that head hangs: "
                "check the address and `ray status` on the head",
            )
        if not target.startswith("ray://"):
            _ask_gcs(target, left())
    try:
        _init_within(target, left(), **({"logging_level": "ERROR"} if quiet else {}))
    except DeadlineExceeded:
        raise ClusterUnreachable(
            f"joining the Ray cluster at {target} did not finish within {timeout:g}s",
            "check `ray status` on the head; if it is only slow, pass a larger --connect-timeout",
        ) from None
    except (ConnectionError, RuntimeError, ray.exceptions.RayError) as e:
        raise ClusterUnreachable(
            f"could not join the Ray cluster at {target} ({one_line(e)})", f"{_CHECK_HEAD}? {_TOKEN_FIX}"
        ) from None


def _check_timeout(timeout: float) -> None:
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ConfigError(f"--connect-timeout {timeout!r} must be a number of seconds > 0")


_TOKEN_FIX = (
    "with token auth on the cluster, run with RAY_AUTH_MODE=token and the head's token here "
    "(~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN; "
    "`ray up cluster.yaml` copies it to every node)"
)


def _resolve(address: str) -> tuple[str, str | None]:
    """(the address ray.init will contact, the Ray address file it was read from if "auto" found it there)."""
    if "://" in address:
        return address, None
    from ray._common.utils import get_ray_address_file
    from ray._private import services
    from ray._private.utils import read_ray_address

    try:
        target = services.canonicalize_bootstrap_address(address)
    except ConnectionError:  # "auto", and neither an address file nor a Ray process on this node
        raise ClusterUnreachable(
            "no Ray cluster is running on this node (no address file from `ray start`, no Ray process)",
            "start one (`ray up cluster.yaml`, or `ray start --head` here), or pass --address / RAY_ADDRESS",
        ) from None
    except ValueError as e:
        raise ConfigError(
            f"Ray address {address!r}: {e}: pass host:port (the head's GCS, port 6379 by default), "
            "ray://host:port or auto"
        ) from None
    from_file = address == "auto" and read_ray_address() == target
    return target, get_ray_address_file(None) if from_file else None


def _ask_gcs(target: str, timeout: float) -> None:
    """One request to the GCS, as ray.init makes first: a refused token or a non-Ray server fails here at once."""
    from ray._raylet import GcsClient

    try:
        with _held_stderr() as held:  # Ray's C++ client logs its failed attempt; the error below says it in one line
            call_within(lambda: GcsClient(address=target), timeout)
        held.release()
    except DeadlineExceeded:
        raise ClusterUnreachable(
            f"the Ray cluster at {target} accepts connections but its GCS does not answer within {timeout:g}s",
            "check `ray status` on the head",
        ) from None
    except ray.exceptions.AuthenticationError:
        mode = os.environ.get("RAY_AUTH_MODE") or "not set"
        raise ClusterUnreachable(
            f"the Ray cluster at {target} refuses this process's token "
            f"(InvalidAuthToken; here RAY_AUTH_MODE is {mode})",
            _TOKEN_FIX,
        ) from None
    except Exception as e:  # anything else that speaks HTTP/2 but is no GCS
        raise ClusterUnreachable(
            f"the server at {target} answers but not as a Ray cluster ({one_line(e)})",
            "pass the head's GCS address (port 6379 by default)",
        ) from None


class _held_stderr(contextlib.AbstractContextManager):
    """File descriptor 2 into a temporary file while the block runs; `release()` then writes what it held."""

    def __enter__(self):
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, exc_type, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        if exc_type is not None:  # the caller's one-line error replaces what Ray wrote
            self.file.close()

    def release(self) -> None:
        self.file.seek(0)
        held = self.file.read()
        self.file.close()
        if held:
            sys.stderr.write(held.decode(errors="replace"))
            sys.stderr.flush()


def _init_within(target: str, timeout: float, **kwargs: Any) -> None:
    """ray.init(address=target) in a thread that may take `timeout` seconds (ray.init can block for minutes).

    On the main thread, SIGTERM gets the handler ray.init itself installs there (exit, so Ray shuts down)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    quiet = _DropMessage("SIGTERM handler is not set")
    log = logging.getLogger("ray._private.worker")
    log.addFilter(quiet)
    try:
        call_within(lambda: ray.init(address=target, log_to_driver=False, **kwargs), timeout)
    finally:
        log.removeFilter(quiet)


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


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
        raise ConfigError(
            f"each trial asks for {cpu:g} CPUs but the cluster has {cpus_total:g}: lower --cpus-per-trial"
        )
    return {"cpu": cpu, "gpu": gpu}


def _ddp_resources(sweep: Sweep, workers: int, have: dict) -> dict[str, Any]:
    """A data-parallel trial: 1 CPU for the trial (Ray Train's controller) + its workers' own bundles."""
    gpu = float(sweep.gpus_per_trial or 0)
    gpw = gpu / workers
    cpw = sweep.cpus_per_trial / workers if sweep.cpus_per_trial else (2.0 if gpu else 1.0)
    per_node = max(
        (n["Resources"].get("GPU" if gpw else "CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0
    )
    need = workers * (gpw or cpw) + (0 if gpw else 1)
    if need > per_node:
        raise ConfigError(
            f"each trial trains on {workers} workers x ({cpw:g} CPU, {gpw:g} GPU), all on one node, but the largest "
            f"node has {per_node:g} {'GPU' if gpw else 'CPU'}(s): lower --gpus-per-trial / workers_per_trial"
        )
    if 1 + workers * cpw > have.get("CPU", 0.0):
        raise ConfigError(
            f"each trial needs {1 + workers * cpw:g} CPUs (1 + {workers} workers) but the cluster has "
            f"{have.get('CPU', 0.0):g}: lower --cpus-per-trial"
        )
    if sweep.max_concurrent is None:  # trials must not hold the CPUs their own workers wait for
        fit = [have.get("CPU", 0.0) // (1 + workers * cpw)] + ([have.get("GPU", 0.0) // (workers * gpw)] if gpw else [])
        sweep.max_concurrent = max(1, int(min(fit)))
    return {"cpu": 1.0, "gpu": 0.0, "ddp": {"workers": workers, "cpus_per_worker": cpw, "gpus_per_worker": gpw}}


PROBE_TIMEOUT_S = 60.0


def probe_nodes(path: str) -> list[tuple[str, bool]]:
    """(node address, whether `path` exists there) from a task pinned to each live node, within PROBE_TIMEOUT_S."""

    @ray.remote(num_cpus=0)
    def sees(path: str) -> tuple[str, bool]:
        return ray.util.get_node_ip_address(), os.path.exists(path)

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [
        sees.options(
            scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(path)
        for n in nodes
    ]
    try:
        return ray.get(refs, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise ConfigError(
            f"{len(nodes)} node(s) were asked whether they see {Path(path).parent} and not all answered within "
            f"{PROBE_TIMEOUT_S:g}s: a node without a free worker or a hung one (`ray status` on the head)"
        ) from None


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
