"""Checkpoints: what a run's latest.pt and best.pt hold, saving (atomic, in the background on CUDA), and
loading that refuses what does not belong to the run."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .io import UserError, atomic_write

if TYPE_CHECKING:
    from .trainer import Run

WEIGHTS = ("format", "config", "step", "tokens", "model")
"""What best.pt keeps of latest.pt's entries (with its `val_loss`)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable or from another model; the message says what to do."""


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


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike, expect_config: dict | None = None) -> dict:
    """Load with weights_only=True; refuse a checkpoint whose model (or corpus) config differs."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: run without --resume to start a new run in that folder")
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


class CheckpointWriter:
    """Writes checkpoints through `save_checkpoint` (atomic), inline or in one background thread.

    In the background, `save(files, after)` starts writing and returns at once; the payloads must be
    host copies (`host_copy`). Writes never overlap: a second `save` first waits for the one in flight.
    `after` (e.g. the trial's report, which must follow a complete latest.pt) runs on the caller's
    thread once every file of its save is on disk: from `poll()` (cheap, call it every step) or
    `wait()`. A crash mid-write leaves the previous complete file (plus a temp file), never a torn one;
    an error in the thread (a full disk) is raised by the next poll, save or wait.
    """

    def __init__(self, background: bool):
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._after: Callable[[], None] | None = None

    def save(self, files: list[tuple[Path, dict]], after: Callable[[], None] | None = None) -> None:
        """Write `files`, then run `after`; with no files, `after` runs at once (after the write in flight)."""
        self.wait()
        if not self.background or not files:
            for path, payload in files:
                save_checkpoint(path, payload)
            if after is not None:
                after()
            return

        def write() -> None:
            try:
                for path, payload in files:
                    save_checkpoint(path, payload)
            except BaseException as e:  # raised on the training thread by poll/wait
                self._error = e

        self._after = after
        self._thread = threading.Thread(target=write, name="checkpoint-writer", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def poll(self) -> None:
        """Finish a background save that is done (raise its error, run its `after`); never blocks."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight (if any) is on disk, then raise its error or run its `after`."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread, after, self._after = None, self._after, None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        if after is not None:
            after()

    def close(self) -> None:
        """Join a save in flight without running its `after` (the run is ending with an error)."""
        if self._thread is not None:
            self._thread.join()
        self._thread, self._after, self._error = None, None, None
