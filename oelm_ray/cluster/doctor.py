"""`oelm-ray doctor`: is this node (the head, via `ray exec cluster.yaml 'oelm-ray doctor'`) ready for
a `--preset paper` sweep? One line per check, and what to do where one fails.

Every check is a function of plain facts returning `(ok, line, fix)`: `ok` is True, False, or None
(nothing to judge, e.g. a one-node cluster has no other node to see the storage). `gather()` collects
the facts from torch, nvidia-smi, Ray and the filesystem; tests call the checks with faked ones.
Exit code 2 when a check a paper sweep needs (`PAPER_NEEDS`) fails, else 0.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..core.io import DeadlineExceeded, call_within, one_line
from . import torch_build

Result = tuple  # (ok: bool | None, line: str, fix: str)
RAY_PIN = "2.60.0"
MIN_TORCH = (2, 4)


# ------------------------------------------------------------------------------------------------
# the checks: pure functions of facts


def check_torch(version: str | None, cuda: str | None) -> Result:
    """torch >= 2.4 with a CUDA build (the paper preset trains on GPUs)."""
    if version is None:
        return False, "torch: not importable", "install the project on this node (`ray up cluster.yaml`)"
    if torch_build.version_tuple(version)[:2] < MIN_TORCH:
        return False, f"torch {version}: older than 2.4", "install torch >= 2.4 (cluster.yaml's TORCH picks the build)"
    if not cuda:
        return (
            False,
            f"torch {version}: a CPU-only build",
            (
                "install a CUDA build: TORCH=auto (or cuXXX for the driver) in cluster.yaml's setup, then `ray up --no-restart`"
            ),
        )
    return True, f"torch {version}, CUDA {cuda} build", ""


def check_driver(driver: str | None, cuda: str | None) -> Result:
    """An NVIDIA driver new enough for the CUDA build torch was built with."""
    if driver is None:
        return (
            False,
            "NVIDIA driver: none (nvidia-smi not found or failed)",
            ("install the NVIDIA driver on this node; a GPU server without one trains nothing"),
        )
    if not cuda:
        return True, f"NVIDIA driver {driver} (torch has no CUDA build to check it against)", ""
    need = torch_build.min_driver_for_cuda(cuda)
    if need and torch_build.version_tuple(driver) < torch_build.version_tuple(need):
        try:
            fits = f"set TORCH={torch_build.pick(driver)} in cluster.yaml's setup"
        except SystemExit:
            fits = "update the driver"
        return (
            False,
            f"NVIDIA driver {driver}: older than {need}, which torch's CUDA {cuda} build needs",
            (f'{fits} (README, "The torch build") and run `ray up --no-restart cluster.yaml`, or update the driver'),
        )
    return True, f"NVIDIA driver {driver} (CUDA {cuda} needs >= {need or 'unknown'})", ""


def check_gpus(available: bool, names: list[str]) -> Result:
    """The GPUs torch sees on this node."""
    if not available or not names:
        return (
            False,
            "GPUs torch sees: none",
            ("check `nvidia-smi`, CUDA_VISIBLE_DEVICES and that torch's CUDA build fits the driver (lines above)"),
        )
    kinds = ", ".join(f"{names.count(n)} x {n}" for n in dict.fromkeys(names))
    return True, f"GPUs torch sees: {len(names)} ({kinds})", ""


def check_bf16(available: bool, supported: bool) -> Result:
    """The precision dtype=auto trains in: bf16 where the GPUs have it natively, else fp16 with a gradient scaler."""
    if not available:
        return None, "precision: not checked (no GPU)", ""
    if not supported:
        return (
            False,
            "precision: these GPUs have no native bf16 (pre-Ampere): dtype=auto trains fp16 with a gradient scaler",
            ("nothing needed (the research trained fp16 with a GradScaler); `--set dtype=fp32` for full precision"),
        )
    return True, "precision: bf16 (native on these GPUs)", ""


def check_ray(version: str | None) -> Result:
    """The pinned Ray, the same on every node and driver."""
    if version is None:
        return False, "Ray: not importable", "install the project (`ray up cluster.yaml`)"
    if version != RAY_PIN:
        return (
            False,
            f"Ray {version}: the project pins {RAY_PIN}",
            f"pip install 'ray[default]=={RAY_PIN}' on every node",
        )
    return True, f"Ray {version}", ""


def check_cluster(resources: dict | None, nodes: int, error: str | None, fix: str | None = None) -> Result:
    """A running Ray cluster this node can join, and its GPUs."""
    if resources is None:
        return (
            False,
            f"Ray cluster: cannot join: {error}",
            fix
            or ("start it with `ray up cluster.yaml` (on the head: `ray status`); set RAY_ADDRESS if it is elsewhere"),
        )
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    line = f"Ray cluster: {nodes} node(s), {cpus:g} CPUs, {gpus:g} GPUs"
    if gpus < 1:
        return (
            False,
            line,
            (
                "a paper sweep asks for 1 GPU per trial and waits forever without one: check the GPU lines above, "
                "or append --num-gpus=N to cluster.yaml's start commands"
            ),
        )
    return True, line, ""


def check_token(mode: str | None, token_file: Path, token_env: bool) -> Result:
    """Token authentication: on, and a token this node's drivers and `ray` CLI can read."""
    mode = (mode or "").lower()
    if mode == "token":
        if token_env or token_file.is_file():
            return True, f"Ray token mode: on ({'RAY_AUTH_TOKEN' if token_env else token_file})", ""
        return (
            False,
            f"Ray token mode: on, but no token ({token_file} missing)",
            ("`ray get-auth-token --generate` on your machine, then `ray up --no-restart cluster.yaml` copies it"),
        )
    if mode == "disabled":
        return True, "Ray token mode: disabled (RAY_AUTH_MODE=disabled: only on a network nothing else reaches)", ""
    return (
        False,
        "Ray token mode: RAY_AUTH_MODE is not set, the `ray` command-line tool runs without the token",
        ("`export RAY_AUTH_MODE=token` (cluster.yaml's setup puts it in ~/.oelm-env, sourced by ~/.bashrc)"),
    )


def check_writable(what: str, path: Path) -> Result:
    """A folder this node can create and write files in (atomically: write, rename, delete)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".doctor-{os.getpid()}-{time.time_ns()}"
        probe.with_suffix(".tmp").write_text("x")
        probe.with_suffix(".tmp").replace(probe)
        probe.unlink()
    except OSError as e:
        return (
            False,
            f"{what} {path}: not writable ({e.strerror or e})",
            f"pass a writable folder with --{what.split()[0]}",
        )
    return True, f"{what} {path}: writable", ""


def check_shared(what: str, path: Path, seen: list[tuple[str, bool]] | None) -> Result:
    """On a multi-node cluster every node sees the folder (NFS at the same path)."""
    if seen is None or len(seen) < 2:
        return None, f"{what} {path}: one node, nothing to share", ""
    blind = [ip for ip, ok in seen if not ok]
    if blind:
        return (
            False,
            f"{what} {path}: not visible from {', '.join(blind)}",
            ("mount the same shared storage (NFS) at the same path on every node, or use s3://"),
        )
    return True, f"{what} {path}: visible from all {len(seen)} nodes", ""


def check_gpt2(error: str | None) -> Result:
    """GPT-2's ranks for the paper preset's tokenizer: from tiktoken's cache or download, or a local file."""
    if error:
        return (
            False,
            f"GPT-2 ranks: not available ({error})",
            ("give this node network once, or set OELM_GPT2_RANKS to a local gpt2.tiktoken (README, offline use)"),
        )
    return True, "GPT-2 ranks: available", ""


def check_wandb(key: bool, mode: str | None) -> Result:
    """A W&B key, or offline/disabled mode (then `oelm-ray sync` uploads later)."""
    mode = (mode or "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return True, f"W&B: WANDB_MODE={mode}", ""
    if key:
        return True, "W&B: API key found", ""
    return (
        False,
        "W&B: no API key: a sweep logs offline under <run>/wandb/",
        (
            "`wandb login` or WANDB_API_KEY on the head to log online; or `oelm-ray sync` later from a machine with a key"
        ),
    )


# what a `--preset paper` sweep cannot do without: a failure of one of these exits 2
PAPER_NEEDS = {"torch", "driver", "gpus", "ray", "cluster", "storage", "data", "storage_shared", "data_shared", "gpt2"}


# ------------------------------------------------------------------------------------------------
# the facts


@dataclass
class Facts:
    torch_version: str | None = None
    torch_cuda: str | None = None
    cuda_available: bool = False
    gpu_names: list[str] = field(default_factory=list)
    bf16: bool = False
    driver: str | None = None
    ray_version: str | None = None
    resources: dict | None = None
    nodes: int = 0
    cluster_error: str | None = None
    cluster_fix: str | None = None
    storage_seen: list | None = None
    data_seen: list | None = None
    gpt2_error: str | None = None


def gather(
    storage: Path, data_dir: Path, address: str | None, timeout: float = 60, connect_timeout: float | None = None
) -> Facts:
    """The facts; `timeout` bounds the GPT-2 download, `connect_timeout` joining the Ray cluster
    (tune.resources.join)."""
    f = Facts(driver=torch_build.driver_version())
    try:
        import torch

        f.torch_version, f.torch_cuda = torch.__version__.split("+")[0], torch.version.cuda
        f.cuda_available = torch.cuda.is_available()
        if f.cuda_available:
            f.gpu_names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            from ..core.train_step import native_bf16

            f.bf16 = all(native_bf16(torch.device("cuda", i)) for i in range(torch.cuda.device_count()))
    except ImportError:
        pass
    f.gpt2_error = _bounded(_load_gpt2, timeout)
    try:
        import ray

        f.ray_version = ray.__version__
    except ImportError:
        return f
    from ..tune.resources import CONNECT_TIMEOUT_S, ClusterUnreachable, join, running_cluster

    address = running_cluster(address)
    try:
        join(address, CONNECT_TIMEOUT_S if connect_timeout is None else connect_timeout, quiet=True)
    except ClusterUnreachable as e:  # none, dead, unreachable, silent, refusing the token: what and what to do
        f.cluster_error, f.cluster_fix = e.what, e.fix
        return f
    try:
        f.resources = dict(ray.cluster_resources())
        f.nodes = len([n for n in ray.nodes() if n.get("Alive")])
        if f.nodes > 1:
            from ..tune.resources import probe_nodes

            for attr, folder in (("storage_seen", storage), ("data_seen", data_dir)):
                token = folder / f".doctor-shared-{os.getpid()}-{time.time_ns()}"
                try:
                    token.write_text("x")
                    setattr(f, attr, probe_nodes(str(token)))
                except OSError:
                    pass  # not writable: its own check says so
                finally:
                    token.unlink(missing_ok=True)
    finally:
        ray.shutdown()
    return f


def _load_gpt2() -> None:
    from ..core.config import DataConfig
    from ..core.prepared import get_tokenizer

    get_tokenizer(DataConfig(tokenizer="gpt2", gpt2_ranks=os.environ.get("OELM_GPT2_RANKS", "")))


def _bounded(fn: Callable[[], None], timeout: float) -> str | None:
    """fn's error as one short line (None if it worked); a hung download is an error after `timeout`."""
    try:
        call_within(fn, timeout)
    except DeadlineExceeded:
        return f"timed out after {timeout:g}s"
    except Exception as e:
        return one_line(e, 160)
    return None


def checks(f: Facts, storage: Path, data_dir: Path, env: dict | None = None) -> list[tuple[str, Result]]:
    from ..tune.wandb_key import has_key

    env = os.environ if env is None else env
    home = Path(env.get("HOME", str(Path.home())))
    token_file = Path(env.get("RAY_AUTH_TOKEN_PATH") or home / ".ray" / "auth_token")
    return [
        ("torch", check_torch(f.torch_version, f.torch_cuda)),
        ("driver", check_driver(f.driver, f.torch_cuda)),
        ("gpus", check_gpus(f.cuda_available, f.gpu_names)),
        ("bf16", check_bf16(f.cuda_available, f.bf16)),
        ("ray", check_ray(f.ray_version)),
        ("cluster", check_cluster(f.resources, f.nodes, f.cluster_error, f.cluster_fix)),
        ("token", check_token(env.get("RAY_AUTH_MODE"), token_file, bool(env.get("RAY_AUTH_TOKEN")))),
        ("storage", check_writable("storage", storage)),
        ("data", check_writable("data-dir", data_dir)),
        ("storage_shared", check_shared("storage", storage, f.storage_seen)),
        ("data_shared", check_shared("data-dir", data_dir, f.data_seen)),
        ("gpt2", check_gpt2(f.gpt2_error)),
        ("wandb", check_wandb(has_key(env), env.get("WANDB_MODE"))),  # the sweep's own key check
    ]


def render(results: list[tuple[str, Result]]) -> tuple[str, int]:
    """The report (one line per check, its fix indented below) and the exit code.

    `ok` passed, `--` nothing to judge, `FAIL` a paper sweep needs it (exit 2), `warn` it does not."""
    lines, missing = [], []
    for name, (ok, line, fix) in results:
        needed = name in PAPER_NEEDS
        lines.append(f"{'ok  ' if ok else '--  ' if ok is None else 'FAIL' if needed else 'warn'}  {line}")
        if ok is False:
            lines.append(f"        fix: {fix}")
            if needed:
                missing.append(name)
    if missing:
        lines.append(f"not ready for a --preset paper sweep: {', '.join(missing)} (exit 2)")
    else:
        lines.append("next: `oelm-ray selftest` proves the trainer's fast path on every GPU of the cluster (minutes)")
        lines.append("ready for a --preset paper sweep")
    return "\n".join(lines), 2 if missing else 0


def main(storage: str, data_dir: str | None, address: str | None, connect_timeout: float | None = None) -> int:
    s = Path(storage).expanduser()
    d = Path(data_dir).expanduser() if data_dir else s / "data"
    text, code = render(checks(gather(s, d, address, connect_timeout=connect_timeout), s, d))
    print(text)
    return code
