"""Training and validation batches from a prepared corpus's token memmaps.

`Sampler` draws random training windows (its state is one generator state); `Batches` stages this
rank's next batch ahead of the step; `eval_batches` is the fixed validation set every evaluation
scores, the same for every method and seed.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import Config, ConfigError

EVAL_SEED = 1337  # the validation windows are the same for every method and seed: a fair comparison


class Sampler:
    """Random training windows from the token memmap; its state is one generator state."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int):
        if len(tokens) <= block_size + 1:
            raise ConfigError(
                f"the training split has {len(tokens)} tokens, fewer than block_size+2={block_size + 2}: "
                "use a larger corpus or a smaller block_size"
            )
        self.tokens, self.T, self.B = tokens, block_size, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        buf = self.next_buf()
        return buf[:, :-1], buf[:, 1:]

    def next_buf(self) -> torch.Tensor:
        """The next B windows of T+1 tokens, (B, T+1) int64: inputs [:, :-1], targets [:, 1:]."""
        ix = torch.randint(len(self.tokens) - self.T - 1, (self.B,), generator=self.gen).tolist()
        return torch.from_numpy(np.stack([self.tokens[i : i + self.T + 1] for i in ix]).astype(np.int64))

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.gen.set_state(sd["gen"])


def windows(tokens: np.ndarray, starts: list[int], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    buf = torch.from_numpy(np.stack([tokens[i : i + T + 1] for i in starts]).astype(np.int64))  # (B, T+1)
    return buf[:, :-1], buf[:, 1:]


def eval_batches(val: np.ndarray, cfg: Config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The validation set every evaluation scores, in a fixed order, eval_batch_size windows a batch.

    eval_batches > 0: eval_batches x batch_size windows drawn once from EVAL_SEED (a sample).
    eval_batches = 0: the whole split, the research's definition: consecutive windows of
    block_size targets, then one shorter window for the remainder, so every token after the first
    is predicted exactly once. Which windows are scored does not depend on eval_batch_size (it
    only groups them into forward passes), nor does the val loss: their token-weighted mean.
    """
    T, B = cfg.model.block_size, cfg.train.eval_batch
    if len(val) <= T + 1:
        raise ConfigError(f"the validation split has {len(val)} tokens, fewer than block_size+2={T + 2}")
    if cfg.train.eval_batches == 0:
        return list(_whole_split(val, T, B))
    gen = torch.Generator().manual_seed(EVAL_SEED)
    starts = (
        torch.randint(len(val) - T - 1, (cfg.train.eval_batches, cfg.train.batch_size), generator=gen)
        .reshape(-1)
        .tolist()
    )
    return [windows(val, starts[i : i + B], T) for i in range(0, len(starts), B)]


def _whole_split(val: np.ndarray, T: int, B: int):
    n_full, rest = divmod(len(val) - 1, T)  # targets are val[1:]
    for i in range(0, n_full, B):
        yield windows(val, [s * T for s in range(i, min(i + B, n_full))], T)
    if rest:
        yield windows(val, [n_full * T], rest)


def scored_tokens(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Targets an evaluation over these batches scores."""
    return sum(y.numel() for _, y in batches)


class Batches:
    """This rank's training batches from the sampler, the next one always staged ahead.

    The batch after the current one is drawn (random windows from the memmap, on the host) when the
    current one is handed out; on CUDA it is pinned and copied to the GPU on a side stream while the
    current step runs, and the step's stream waits for that copy only. `state_dict()` is the
    sampler's state before the staged (not yet consumed) batch, so a resumed run draws exactly that
    batch next: resume stays exact. The same code stages on CPU, without the copy.
    """

    def __init__(self, sampler: Sampler, device: torch.device, rank: int = 0, world: int = 1):
        self.sampler, self.device = sampler, device
        b = sampler.B // world
        self.rows = slice(rank * b, (rank + 1) * b)  # every rank draws the global batch, keeps its slice
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.staged: tuple[dict, torch.Tensor, torch.Tensor] | None = None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.staged is None:
            self._stage()
        _, x, y = self.staged
        if self.stream is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self.stream)
            x.record_stream(main)  # allocated on the side stream, used on the main one
            y.record_stream(main)
        self._stage()
        return x, y

    def _stage(self) -> None:
        state = self.sampler.state_dict()
        buf = self.sampler.next_buf()[self.rows]  # (b, T+1)
        if self.stream is None:
            x, y = buf[:, :-1], buf[:, 1:]
        else:
            buf = buf.pin_memory()
            with torch.cuda.stream(self.stream):
                dev = buf.to(self.device, non_blocking=True)
                x, y = dev[:, :-1].contiguous(), dev[:, 1:].contiguous()
        self.staged = (state, x, y)

    def state_dict(self) -> dict:
        return self.staged[0] if self.staged is not None else self.sampler.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.sampler.load_state_dict(sd)
        self.staged = None
