"""Checkpoints: what a run's latest.pt and best.pt hold, saving (atomic, in the background on CUDA), and
loading that refuses what does not belong to the run."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .io import UserError, atomic_write, one_line

if TYPE_CHECKING:
    from .trainer import Run

WEIGHTS = ("format", "config", "step", "tokens", "model")
"""What best.pt keeps of latest.pt's entries (with its `val_loss`)."""

STALL_S = 600.0
"""A checkpoint write that hands no byte to its file for this long is given up (CheckpointStallError)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable or from another model; the message says what to do."""


class CheckpointStallError(UserError, OSError):
    """A checkpoint write that made no progress for STALL_S (stalled storage); the previous file is whole."""


def checkpoint_files(run: Run, val_loss: float, latest: bool) -> list[tuple[Path, dict]]:
    """The files one evaluation writes, as (path, payload): best.pt (the weights) when `val_loss` beats
    the run's best, latest.pt (everything a resume needs: weights, optimizer, sampler and RNG state,
    the run's clock) if `latest`.

    When the run writes in the background the payloads are host copies (one device-to-host copy
    now, shared by both files), so the files can be written while training goes on.
    """
    improved = val_loss < run.best_val
    if not latest and not improved:
        return []
    payload = {
        "format": 1,
        "config": run.cfg.to_dict(),
        "step": run.step,
        "tokens": run.tokens,
        "model": run.model.state_dict(),
        **run.trainer.state_dict(),  # optimizer (and fp16's gradient scaler)
        "sampler": run.batches.state_dict(),
        "rng": rng_state(run.device),
        "best_val_loss": min(run.best_val, val_loss),
        "qk_init": run.qk_init,
        "elapsed_s": run.wall(),
        "train_time_s": run.train_time,
    }
    if not latest:  # best.pt alone: copy (background) and write only the weights
        payload = {k: payload[k] for k in WEIGHTS}
    if run.writer.background:
        payload = host_copy(payload)
    files = []
    if improved:
        files.append((run.out / "best.pt", {k: payload[k] for k in WEIGHTS} | {"val_loss": val_loss}))
    if latest:
        files.append((run.out / "latest.pt", payload))
    return files


def rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    """The CPU generator's state and, on CUDA, the device's: {"torch", "cuda"}, as latest.pt keeps it."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict[str, torch.Tensor | None], device: torch.device) -> None:
    """Restore what `rng_state` took; a CUDA state is restored on CUDA only (a CPU run's has none)."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: str | os.PathLike, payload: dict, progress: _SaveProgress | None = None) -> None:
    """Write `payload` to `path` atomically. With a CheckpointWriter's `progress`, every byte written and the
    final fsync count as progress, and a write the writer gave up on stops there and keeps the old file."""
    if progress is None:
        atomic_write(path, lambda f: torch.save(payload, f))
    else:
        # the temp file's fsync returning is progress too; a write given up meanwhile raises there, not renamed
        atomic_write(path, lambda f: torch.save(payload, _Counted(f, progress)), before_replace=progress.advance)


def load_checkpoint(path: str | os.PathLike, expect_config: dict | None = None) -> dict:
    """Load with weights_only=True; refuse a checkpoint whose model (or corpus) config differs."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: run without --resume to start a new run in that folder")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: say which and what to do
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({one_line(e, typed=True)}); "
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


def host_copy(obj: Any) -> Any:
    """A copy of obj whose tensors live in host memory and no longer alias the training state.

    CUDA tensors are copied device-to-host without blocking (into pinned memory) and waited for
    once; CPU tensors are cloned, since training goes on updating them in place. Tensors that are
    the same view of one storage (the tied embedding and LM head: two state-dict entries) become
    one copy, so `torch.save` writes it once, as it does for the live tensors.
    """
    cuda = []
    seen: dict[tuple, torch.Tensor] = {}

    def copy(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            key = (o.device, o.untyped_storage().data_ptr(), o.storage_offset(), o.dtype, tuple(o.shape), o.stride())
            if key not in seen:
                if o.is_cuda:
                    cuda.append(o.device)
                    seen[key] = o.detach().to("cpu", non_blocking=True)
                else:
                    seen[key] = o.detach().clone()
            return seen[key]
        if isinstance(o, dict):
            return {k: copy(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return type(o)(copy(v) for v in o)
        return o

    out = copy(obj)
    for dev in set(cuda):  # the copies above are queued on the device's stream: wait for them
        torch.cuda.synchronize(dev)
    return out


class _SaveProgress:
    """How far one save got: the file it is writing, bytes handed to it, when it last moved, the error it
    ended with; `given_up` (set by the waiting thread) makes the next write or the final fsync raise
    instead of finishing."""

    def __init__(self, path: Path):
        self.path, self.bytes, self.last, self.given_up = path, 0, time.monotonic(), False
        self.error: BaseException | None = None

    def advance(self, n: int = 0) -> None:
        if self.given_up:
            raise CheckpointStallError(f"the write of {self.path} was given up after it stalled")
        self.bytes += n
        self.last = time.monotonic()

    def start(self, path: Path) -> None:
        self.path, self.bytes = path, 0
        self.advance()


class _Counted:
    """The file object torch.save writes to, counting what it writes into a _SaveProgress."""

    def __init__(self, f, progress: _SaveProgress):
        self.f, self.progress = f, progress

    def write(self, data) -> int:
        self.progress.advance()
        n = self.f.write(data)
        self.progress.advance(memoryview(data).nbytes if n is None else n)
        return n

    def flush(self) -> None:
        self.f.flush()


class CheckpointWriter:
    """Writes checkpoints through `save_checkpoint` (atomic) in a thread of its own, waited for at once
    (inline) or in the background.

    In the background, `save(files, after)` starts writing and returns at once; the payloads must be
    host copies (`host_copy`). Writes never overlap: a second `save` first waits for the one in flight.
    `after` (e.g. the trial's report, which must follow a complete latest.pt) runs on the caller's
    thread once every file of its save is on disk: from `poll()` (cheap, call it every step) or
    `wait()`. A crash mid-write leaves the previous complete file (plus a temp file), never a torn one;
    an error in the thread (a full disk) is raised by the next poll, save or wait.

    No wait blocks on stalled storage for good: a write that hands no byte to its file for STALL_S
    (a hung NFS mount) is given up, and `wait` raises CheckpointStallError naming the file. A slow write
    that keeps moving is waited for however long it takes.
    """

    def __init__(self, background: bool, log: Callable[[str], None] | None = None):
        self.background = background
        self.log = log  # hears a write that `close` gives up on
        self._thread: threading.Thread | None = None
        self._progress: _SaveProgress | None = None
        self._after: Callable[[], None] | None = None

    def save(self, files: list[tuple[Path, dict]], after: Callable[[], None] | None = None) -> None:
        """Write `files`, then run `after`; with no files, `after` runs at once (after the write in flight)."""
        self.wait()
        if not files:
            if after is not None:
                after()
            return
        progress = _SaveProgress(files[0][0])

        def write() -> None:
            try:
                for path, payload in files:
                    progress.start(path)
                    save_checkpoint(path, payload, progress)
            except BaseException as e:  # raised on the training thread by poll/wait
                progress.error = e

        self._after, self._progress = after, progress
        self._thread = threading.Thread(target=write, name="checkpoint-writer", daemon=True)
        self._thread.start()
        if not self.background:
            self.wait()

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def poll(self) -> None:
        """Finish a background save that is done (raise its error, run its `after`); never blocks."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight (if any) is on disk, then raise its error or run its `after`;
        raise CheckpointStallError if it makes no progress for STALL_S."""
        if self._thread is None:
            return
        stalled = self._join()
        error = self._progress.error
        self._thread, self._progress, after, self._after = None, None, self._after, None
        if stalled:
            raise CheckpointStallError(stalled)
        if error is not None:
            raise error
        if after is not None:
            after()

    def close(self) -> None:
        """Join a save in flight without running its `after` (the run is ending with an error); one that
        stalls for STALL_S is given up, with a line to `log`."""
        if self._thread is not None:
            stalled = self._join()
            if stalled and self.log is not None:
                self.log(stalled)
        self._thread, self._progress, self._after = None, None, None

    def _join(self) -> str | None:
        """Join the writer thread in slices; give its save up once it made no progress for STALL_S, and
        return then the one-line message saying so (else None)."""
        thread, progress = self._thread, self._progress
        while True:
            idle = time.monotonic() - progress.last
            thread.join(min(5.0, max(0.01, STALL_S - idle)))
            if not thread.is_alive():
                return None
            idle = time.monotonic() - progress.last
            if idle >= STALL_S:
                progress.given_up = True
                return (
                    f"writing checkpoint {progress.path} made no progress for {idle:.0f}s "
                    f"({progress.bytes:,} bytes written): is its storage ({progress.path.parent}) stalled or "
                    f"unreachable (a hung NFS mount, a server down)? The previous {progress.path.name} is untouched: "
                    "once the storage answers, a retry (or --resume) continues from it"
                )
