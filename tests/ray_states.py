"""The states a Ray cluster can be found in, made on 127.0.0.1 for the tests that join one.

A token-auth head (`head`, stopped by killing exactly its own processes: `ray stop` would end every
Ray session on this machine), a dead one (`head(kill=True)`: its address file stays behind), a port
nothing listens on, a socket that accepts and never answers, and one whose TCP connect times out;
CLUSTER_STATES: what a driver's one line must say in each. `joining(...)` runs a command with Ray's
scan of this machine's processes emptied: for "auto", Ray also adopts any Ray process it sees in
`ps`, and the machine is shared with other test runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


CLUSTER_STATES = {  # state: (what the one line says is wrong, regex; what to do, a fragment of it)
    "none": (r"no Ray cluster is running on this node", "ray up cluster.yaml"),
    "dead-address-file": (
        r"the Ray address file \S+/ray/ray_current_cluster names 127\.0\.0\.1:\d+, but nothing "
        r"listens there \(Connection refused\): the cluster `ray start` left on this node is gone",
        "start it again",
    ),
    "dead-ray-address": (r"cannot reach the Ray cluster at 127\.0\.0\.1:\d+ \(Connection refused\)", "is the head up"),
    "unreachable-free-port": (
        r"cannot reach the Ray cluster at 127\.0\.0\.1:\d+ \(Connection refused\)",
        "is the head up",
    ),
    "unreachable-no-route": (
        r"cannot reach the Ray cluster at 127\.0\.0\.1:\d+ \(no answer to a TCP connect "
        r"within 5s\)",
        "is the head up",
    ),
    "refusing-the-token": (
        r"the Ray cluster at 127\.0\.0\.1:\d+ refuses this process's token \(InvalidAuthToken; "
        r"here RAY_AUTH_MODE is token\)",
        "RAY_AUTH_MODE=token and the head's token",
    ),
    "listening-not-answering": (
        r"the Ray cluster at 127\.0\.0\.1:\d+ does not answer \(it accepts connections but "
        r"sends nothing back within 5s\)",
        "not a Ray head's GCS port",
    ),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**kw) -> dict:
    """This process's environment for a Ray driver or head on loopback, without RAY_ADDRESS, plus `kw`."""
    out = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    out.pop("RAY_ADDRESS", None)
    out.update(kw)
    return out


@contextlib.contextmanager
def head(kill: bool = False):
    """A Ray head on 127.0.0.1 with token auth (its own token file) and the dashboard on loopback.

    Yields address, dashboard, env (token mode, its token), tmpdir (RAY_TMPDIR: its address file is
    tmpdir/ray/ray_current_cluster). kill=True: SIGKILLed before it is yielded, so its address file
    names a GCS that is gone.
    """
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token = tmp / "auth_token"
    token.write_text(generate_new_authentication_token())
    port, dash = free_port(), free_port()
    e = env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_TMPDIR=str(tmp))
    cmd = [
        "ray",
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=2",
        "--disable-usage-stats",
        f"--temp-dir={tmp / 'ray'}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={free_port()}",
    ]  # not its fixed default: other heads run on this machine
    r = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        if kill:
            _stop(tmp, ((signal.SIGKILL, 10),))
            assert (tmp / "ray" / "ray_current_cluster").read_text().strip() == f"127.0.0.1:{port}"
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": e, "tmpdir": tmp}
    finally:
        _stop(tmp, ((signal.SIGTERM, 5), (signal.SIGKILL, 5)))
        shutil.rmtree(tmp, ignore_errors=True)


def _stop(tmp: Path, steps) -> None:
    for sig, wait in steps:
        pids = pids_of(tmp)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.time() + wait
        while pids and time.time() < deadline and pids_of(tmp):
            time.sleep(0.5)


def pids_of(tmp: Path) -> list[int]:
    """Processes whose command line names this head's folder: its GCS, raylet, dashboard, workers."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            with contextlib.suppress(OSError):
                if str(tmp).encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
    return out


@contextlib.contextmanager
def silent_server():
    """host:port of a socket that accepts every connection and never writes a byte."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []

    def accept():
        with contextlib.suppress(OSError):
            while True:
                held.append(srv.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"127.0.0.1:{srv.getsockname()[1]}"
    finally:
        srv.close()
        for c in held:
            c.close()


@contextlib.contextmanager
def connect_times_out():
    """host:port whose TCP connect times out, as an unroutable address does: a listening socket with a
    backlog of 0 that one unaccepted connection fills (Linux then drops further SYNs)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    filler = socket.create_connection(srv.getsockname(), timeout=5)
    try:
        yield f"127.0.0.1:{srv.getsockname()[1]}"
    finally:
        filler.close()
        srv.close()


JOINING = """
import runpy, sys
import ray._private.services as services

def no_scan():
    return frozenset()

no_scan.cache_clear = lambda: None
services.find_gcs_addresses = no_scan  # "auto" sees no Ray process of other test runs on this machine
sys.argv = sys.argv[1:]
if sys.argv[0].endswith(".py"):
    runpy.run_path(sys.argv[0], run_name="__main__")
else:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def joining(*cmd: str, env: dict, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd` (a script path or a module name, then its arguments) with Ray's process scan emptied;
    return the finished process and its wall time in seconds."""
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-c", JOINING, *cmd], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    return r, time.monotonic() - t0
