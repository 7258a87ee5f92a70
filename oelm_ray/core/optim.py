"""The optimizer and its schedule: AdamW's parameter groups, the learning rate at each step, and when
the policy's frozen Q/K update (periodically) or unfreeze."""

from __future__ import annotations

import math

import torch

from .config import Config
from .model import GPT


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to lr, then cosine decay to lr * min_lr_frac at max_steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    floor = t.lr * t.min_lr_frac
    return floor + 0.5 * (t.lr - floor) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: GPT, cfg: Config, device: torch.device, qk_unfrozen: bool = False, fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW over trainable parameters only: matrices decay, norms and biases do not, Q/K get lr_mult.

    The groups follow the policy, not the current requires_grad flags: the policy's frozen Q/K are
    left out, or with `qk_update_every` form the `qk_periodic` groups; `qk_unfrozen` adds the groups
    the frozen Q/K join at their unfreeze, last, as `TrainStep.unfreeze_qk` does: a resumed run passes
    what its checkpoint's optimizer holds (`qk_unfrozen_in`), so the groups match. With
    `lr_layer_decay` != 1 every kind splits by layer (`decay.h0`, ...), each with its rate multiplier.
    `fused` (default: on CUDA) is the fused AdamW, whose `TrainStep` keeps the lr as a device tensor.
    """
    frozen_qk = {id(model.transformer.h[i].attn.c_qk.weight) for i in cfg.model.frozen_qk_layers}
    qk = {id(p) for p in model.qk_params().values()}
    kinds: dict[str, list] = {"decay": [], "no_decay": [], "qk": [], "qk_periodic": []}
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen or (
            id(p) in frozen_qk and not cfg.train.qk_update_every
        ):  # tied weights once; frozen Q/K never
            continue
        seen.add(id(p))
        kind = (
            ("qk_periodic" if id(p) in frozen_qk else "qk") if id(p) in qk else "decay" if p.dim() >= 2 else "no_decay"
        )
        kinds[kind].append(p)
    param_groups = [g for kind, ps in kinds.items() for g in _groups(model, cfg, kind, ps)]
    if qk_unfrozen:
        param_groups += qk_unfrozen_groups(model, cfg)
    t = cfg.train
    fused = device.type == "cuda" if fused is None else fused
    return torch.optim.AdamW(param_groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)


def _groups(model: GPT, cfg: Config, kind: str, params: list) -> list[dict]:
    """One optimizer group of `kind` (decay, no_decay, qk, qk_periodic, qk_unfrozen), or one per layer under lr_layer_decay."""
    t = cfg.train
    wd = 0.0 if kind == "no_decay" else t.weight_decay
    mult = t.qk_lr_mult if kind.startswith("qk") else 1.0
    if t.lr_layer_decay == 1.0:
        return [{"params": params, "weight_decay": wd, "lr_mult": mult, "name": kind}] if params else []
    layers = layer_lr_mults(model, cfg)
    by_layer: dict[str, list] = {}
    for p in params:
        by_layer.setdefault(layers[id(p)][0], []).append(p)
    return [
        {"params": ps, "weight_decay": wd, "lr_mult": mult * layers[id(ps[0])][1], "name": f"{kind}.{layer}"}
        for layer, ps in by_layer.items()
    ]


def layer_lr_mults(model: GPT, cfg: Config) -> dict[int, tuple[str, float]]:
    """id(parameter) -> (its layer, lr_layer_decay's multiplier for it).

    Block i of L: decay^(L-1-i), the top block at 1; the embeddings (the token embedding is tied to
    the LM head) below the first block, decay^L; the final LayerNorm on top, 1.
    """
    d, L = cfg.train.lr_layer_decay, cfg.model.n_layer
    out = {id(p): ("top", 1.0) for p in model.transformer.ln_f.parameters()}
    for name in ("wte", "wpe"):
        out[id(model.transformer[name].weight)] = ("embed", d**L)
    for i, block in enumerate(model.transformer.h):
        out.update({id(p): (f"h{i}", d ** (L - 1 - i)) for p in block.parameters()})
    return out


def qk_unfrozen_groups(model: GPT, cfg: Config) -> list[dict]:
    """The optimizer groups that the policy's frozen Q/K join once they are unfrozen."""
    return _groups(
        model, cfg, "qk_unfrozen", [model.transformer.h[i].attn.c_qk.weight for i in cfg.model.frozen_qk_layers]
    )


def group_kind(group: dict) -> str:
    """An optimizer group's kind (`build_optimizer`): its name without lr_layer_decay's layer (`qk_periodic.h1`)."""
    return str(group.get("name", "")).split(".")[0]


def qk_unfrozen_in(param_groups: list[dict]) -> bool:
    """Whether these optimizer groups (live, or a saved state's) hold the unfrozen Q/K's.

    The checkpoint of step `qk_unfreeze_step` is written before the loop unfreezes (at the top of the
    next step), so the step number alone does not say; the optimizer's own groups do.
    """
    return any(group_kind(g) == "qk_unfrozen" for g in param_groups)


def qk_unfrozen_at(step: int, cfg: Config) -> bool:
    """Whether the policy's frozen Q/K train at step `step` (from qk_unfreeze_step on; -1: never)."""
    return cfg.train.qk_unfreeze_step != -1 and step >= cfg.train.qk_unfreeze_step


def qk_update_at(step: int, cfg: Config) -> bool:
    """Whether step `step` (0-based) updates the periodic Q/K: the N-th, 2N-th, ... step of the run."""
    n = cfg.train.qk_update_every
    return bool(n) and (step + 1) % n == 0
