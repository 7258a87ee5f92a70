"""The method under study, checked in every run: Q/K frozen where the policy says, trained where it says.

Frozen Q/K are the experiment. At every checkpoint the trainer compares each block's `c_qk` weight
with the digest (sha256 of its bytes) it had at init, which the checkpoint keeps:

- a block whose Q/K are frozen now must be bit-identical to its init;
- a block whose Q/K have trained (the baseline's, blocks above `qk_freeze_layers`, every frozen
  block once `qk_unfreeze_step` has passed, or once its first `qk_update_every` update is done) must
  have moved from it;
- periodic Q/K (`qk_update_every`) must still be exactly what their last update left.

A violation (a frozen tensor that an optimizer reached, a compiled graph that kept Q/K frozen after
an unfreeze) stops the run with `QKCheckError` naming the blocks; the run's summary says so, and its
result is never reported as valid.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

from .config import Config
from .io import UserError

SCALER_GRACE_STEPS = 8
"""Under fp16 the gradient scaler skips the steps whose gradients overflowed (a few after init, or
after an unfreeze): Q/K that should train are required to have moved only after this many steps."""


class QKCheckError(UserError, RuntimeError):
    """Q/K did not behave as the run's method says: the result is not valid."""


def qk_digests(weights: Iterable[torch.Tensor]) -> list[str]:
    """sha256 of each block's [W_q; W_k] bytes (`model.qk_params().values()`, block 0 first)."""
    out = []
    for w in weights:
        host = w.detach().to("cpu").contiguous()
        out.append(hashlib.sha256(host.view(torch.uint8).numpy().tobytes()).hexdigest())
    return out


def trained_steps(cfg: Config, block: int, step: int) -> int:
    """Optimizer steps in which this block's Q/K trained, out of the first `step`.

    The unfreeze happens at the top of step `qk_unfreeze_step` (0-based), so a checkpoint written
    after exactly that many steps still holds the frozen Q/K.
    """
    if block not in cfg.model.frozen_qk_layers:
        return step
    if cfg.train.qk_update_every:  # updated on steps N-1, 2N-1, ... (0-based)
        return step // cfg.train.qk_update_every
    u = cfg.train.qk_unfreeze_step
    return max(0, step - u) if u != -1 else 0


def check_qk(
    model, cfg: Config, init: list[str], step: int, fp16: bool = False, since_update: list[torch.Tensor] | None = None
) -> str:
    """'ok', or raise QKCheckError naming the blocks whose Q/K broke the method's rule at `step`.

    `since_update` (qk_update_every): the periodic Q/K as their last update left them; they must
    still be exactly that, i.e. nothing changed them on the steps in between.
    """
    now = qk_digests(model.qk_params().values())
    changed_frozen, unchanged_trained = [], []
    drifted = []
    if since_update is not None:
        for i, snap in zip(cfg.model.frozen_qk_layers, since_update):
            if not torch.equal(model.transformer.h[i].attn.c_qk.weight.detach(), snap):
                drifted.append(i)
    for i, (a, b) in enumerate(zip(init, now)):
        n = trained_steps(cfg, i, step)
        if n == 0 and a != b:
            changed_frozen.append(i)
        elif n >= (SCALER_GRACE_STEPS if fp16 else 1) and a == b:
            unchanged_trained.append(i)
    if not changed_frozen and not unchanged_trained and not drifted:
        return "ok"
    parts = []
    if drifted:
        parts.append(
            f"Q/K of block(s) {_blocks(drifted)} changed on a step that was no update step "
            f"(qk_update_every={cfg.train.qk_update_every})"
        )
    if changed_frozen:
        parts.append(
            f"Q/K of block(s) {_blocks(changed_frozen)} should be frozen ({cfg.model.method}) but changed since init"
        )
    if unchanged_trained:
        parts.append(
            f"Q/K of block(s) {_blocks(unchanged_trained)} should have trained but are bit-identical to their init"
        )
    raise QKCheckError(
        f"Q/K check failed at step {step}: {'; '.join(parts)}. The run is stopped and its result is not valid. "
        "This is a trainer or torch bug (a stale compiled graph?): rerun with --set compile=off to tell, and report it"
    )


def _blocks(ix: list[int]) -> str:
    return ", ".join(map(str, ix))
