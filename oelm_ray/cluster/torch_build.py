"""Which PyTorch CUDA build fits a node's NVIDIA driver (stdlib only: cluster.yaml's setup runs it as
a script before anything is installed, `python3 ~/oelm-ray/oelm_ray/cluster/torch_build.py [TAG|auto]`).

PyTorch publishes one wheel index per CUDA build, https://download.pytorch.org/whl/<tag>; each build
needs a driver at least as new as the one its CUDA toolkit shipped with (NVIDIA's CUDA release
notes, "CUDA Toolkit and Corresponding Driver Versions", Linux x86_64). `auto` picks the newest build
this node's driver runs (`nvidia-smi`), `cpu` where there is no NVIDIA driver.
"""

from __future__ import annotations

import re
import subprocess
import sys

# tag -> (CUDA version, minimum Linux driver); docs/cluster.md, "The torch build", shows the same table
BUILDS: dict[str, tuple[str, str]] = {
    "cu118": ("11.8", "520.61.05"),
    "cu121": ("12.1", "530.30.02"),
    "cu124": ("12.4", "550.54.14"),
    "cu126": ("12.6", "560.28.03"),
    "cu128": ("12.8", "570.26"),
    "cu129": ("12.9", "575.51.03"),
    "cu130": ("13.0", "580.65.06"),
}
INDEX = "https://download.pytorch.org/whl/{tag}"


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


def driver_version() -> str | None:
    """The NVIDIA driver version from `nvidia-smi`, or None without a driver."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [x.strip() for x in out.stdout.splitlines() if x.strip()]
    return lines[0] if out.returncode == 0 and lines else None


def min_driver_for_cuda(cuda: str) -> str | None:
    """The minimum driver of a CUDA version torch was built with ("12.6" -> "560.28.03"), if known."""
    for c, drv in BUILDS.values():
        if version_tuple(c)[:2] == version_tuple(cuda)[:2]:
            return drv
    return None


def pick(driver: str | None) -> str:
    """The newest build `driver` runs; `cpu` without a driver; an error when the driver is older than all."""
    if driver is None:
        return "cpu"
    fits = [tag for tag, (_, need) in BUILDS.items() if version_tuple(driver) >= version_tuple(need)]
    if not fits:
        oldest = min(BUILDS.items(), key=lambda kv: version_tuple(kv[1][1]))
        raise SystemExit(
            f"NVIDIA driver {driver} is older than every PyTorch CUDA build ({oldest[0]} needs "
            f">= {oldest[1][1]}): update the driver, or set TORCH=cpu in cluster.yaml"
        )
    return max(fits, key=lambda t: version_tuple(BUILDS[t][1]))


def resolve(choice: str, driver: str | None) -> str:
    """`auto` -> pick(driver); `cpu` or a known tag as given; anything else one clear error."""
    choice = choice.strip().lower()
    if choice == "auto":
        return pick(driver)
    if choice == "cpu" or choice in BUILDS:
        return choice
    raise SystemExit(f"unknown torch build {choice!r}: use auto, cpu or one of {', '.join(BUILDS)}")


if __name__ == "__main__":
    print(resolve(sys.argv[1] if len(sys.argv) > 1 else "auto", driver_version()))
