"""Atomic file writes and checkpoint loading that refuses what does not belong to the run."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or from another model; the message says what to do."""


class DiskFullError(CheckpointError):
    """A write ran out of space (ENOSPC, EDQUOT); the file it was to replace is still whole."""


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through `write(fileobj)` into a temp file beside `path`, fsync, then rename over it.

    A crash at any point leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        full = _disk_full(e)
        if full is not None:
            raise DiskFullError(
                f"no space left on the device while writing {path} ({full.strerror}); the previous "
                f"{path.name} is untouched: free space, then run the same command again"
            ) from None
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _disk_full(e: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT error in e's chain (writers such as torch.save may wrap it), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        e = e.__cause__ or e.__context__
    return None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str) + "\n"), mode="w")


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike, expect_config: dict | None = None) -> dict:
    """Load with weights_only=True; refuse a checkpoint whose model (or corpus) config differs."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"no checkpoint at {path}: run without --resume to start a new run in that folder"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: say which and what to do
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
            "delete it to fall back to a fresh run, or restore it from a copy"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not an oelm-ray checkpoint (no model/config entries)")
    if expect_config is not None:
        diffs = config_diff(ckpt["config"], expect_config, sections=("model",))
        diffs += config_diff(ckpt["config"], expect_config, sections=("data",), keys=("dataset", "tokenizer"))
        if diffs:
            raise CheckpointError(
                f"checkpoint {path} belongs to another model/corpus ({'; '.join(diffs)}): "
                "resume with the config it was trained with, or use another --out-dir"
            )
    return ckpt


def config_diff(a: dict, b: dict, sections: tuple[str, ...], keys: tuple[str, ...] | None = None) -> list[str]:
    out = []
    for sec in sections:
        sa, sb = a.get(sec, {}), b.get(sec, {})
        for k in keys or sorted(set(sa) | set(sb)):
            if sa.get(k) != sb.get(k):
                out.append(f"{sec}.{k}: checkpoint {sa.get(k)!r} vs config {sb.get(k)!r}")
    return out
