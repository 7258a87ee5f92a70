"""The experiment registry: the research's GPT-01 ... GPT-07, controls for its confounds, the embedded CPU matrix.

An `Experiment` is a named, reproducible point: a preset plus flat config overrides. Seeds are a
separate grid axis, so one experiment over three seeds is three trials named
`GPT-02-oelm_freeze-s0`, `-s1`, `-s2`. No Ray here: the registry is plain data that recipes,
tests and the report share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import METHODS, Config, make_config


@dataclass(frozen=True)
class Experiment:
    id: str
    """Stable id, e.g. GPT-02: names folders, W&B runs and table rows."""
    preset: str
    """Config preset the overrides apply to."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Flat config overrides (dataset, method, lr, max_steps, ...)."""
    isolates: str = ""
    """For a control: what it isolates, in a sentence; empty for the protocol's own arms."""

    @property
    def role(self) -> str:
        return "control" if self.isolates else "protocol"

    @property
    def method(self) -> str:
        return self.overrides.get("method", "baseline")

    @property
    def dataset(self) -> str:
        return self.overrides.get("dataset") or make_config(self.preset).data.dataset

    def trial_name(self, seed: int) -> str:
        return trial_name(self.id, self.method, seed)

    def config(self, seed: int, *layers: dict[str, Any], **extra: Any) -> Config:
        """The validated config of one trial: this experiment's preset and overrides, then `layers` (the
        sweep's --set, a search's values) and `extra`, then the seed (`make_config` has the order)."""
        return make_config(self.preset, self.overrides, *layers, extra, {"seed": seed})

    def to_dict(self) -> dict[str, Any]:
        d = {"id": self.id, "preset": self.preset, "overrides": dict(self.overrides)}
        return d | ({"isolates": self.isolates} if self.isolates else {})  # protocol arms: as before

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Experiment:
        return cls(d["id"], d["preset"], dict(d["overrides"]), d.get("isolates", ""))


def trial_name(experiment_id: str, method: str, seed: int) -> str:
    return f"{experiment_id}-{method}-s{seed}"


# the research's phase 3: Medium-512, baseline at 3e-4, the frozen variants at 1e-3
_PAPER_ROWS = [
    ("GPT-01", "tinystories", "baseline", 3e-4, 100_000),
    ("GPT-02", "tinystories", "oelm_freeze", 1e-3, 100_000),
    ("GPT-03", "tinystories", "oelm_random", 1e-3, 100_000),
    ("GPT-04", "openwebtext", "baseline", 3e-4, 150_000),
    ("GPT-05", "openwebtext", "oelm_freeze", 1e-3, 150_000),
    ("GPT-06", "wikitext103", "baseline", 3e-4, 200_000),
    ("GPT-07", "wikitext103", "oelm_freeze", 1e-3, 200_000),
]


def _split(dataset: str) -> dict[str, Any]:
    # OpenWebText has no validation split: hold out 0.05% of its documents (nanoGPT's share, ~4M
    # tokens, the size of TinyStories' validation split), small enough to score whole at every
    # evaluation; the other corpora have their own
    return {"val_fraction": 0.0005} if dataset == "openwebtext" else {}


PAPER = {
    eid: Experiment(eid, "medium-512", {"dataset": ds, "method": m, "lr": lr, "max_steps": steps, **_split(ds)})
    for eid, ds, m, lr, steps in _PAPER_ROWS
}

# controls for the two confounds of the research's design, per dataset at the frozen arms' rate
# and budget: each differs from a protocol arm in the one thing it isolates
LR_CONTROL = (
    "learning rate: baseline at the frozen arms' 1e-3 (the protocol's baseline runs at 3e-4), "
    "so oelm_freeze vs this row compares the methods at one rate"
)
SCALE_CONTROL = (
    "init scale: random frozen Q/K at the orthogonal rows' std 1/sqrt(d_model) (the research's random "
    "arm used 0.02), so oelm_freeze vs this row compares orthogonal with random at one scale"
)
_CONTROL_ROWS = [
    ("CTL-01", "tinystories", "baseline", {}, LR_CONTROL),
    ("CTL-02", "tinystories", "oelm_random", {"qk_random_std": 0.0}, SCALE_CONTROL),
    ("CTL-03", "openwebtext", "baseline", {}, LR_CONTROL),
    ("CTL-04", "openwebtext", "oelm_random", {"qk_random_std": 0.0}, SCALE_CONTROL),
    ("CTL-05", "wikitext103", "baseline", {}, LR_CONTROL),
    ("CTL-06", "wikitext103", "oelm_random", {"qk_random_std": 0.0}, SCALE_CONTROL),
]
_STEPS = {ds: steps for _, ds, _, _, steps in _PAPER_ROWS}
CONTROLS = {
    eid: Experiment(
        eid,
        "medium-512",
        {"dataset": ds, "method": m, "lr": 1e-3, "max_steps": _STEPS[ds], **_split(ds), **extra},
        isolates,
    )
    for eid, ds, m, extra, isolates in _CONTROL_ROWS
}

# the embedded default: the three methods on the generated stories corpus, one learning rate for
# all (at this scale the research's split learning rates would dominate what freezing Q/K does),
# and the scale-matched random control: at d_model 64 the research's 0.02 is 1/6 of the
# orthogonal rows' std, so its attention logits start ~40x smaller
EMBEDDED = {f"CPU-{i:02d}": Experiment(f"CPU-{i:02d}", "cpu", {"method": m}) for i, m in enumerate(METHODS, start=1)}
EMBEDDED["CPU-04"] = Experiment("CPU-04", "cpu", {"method": "oelm_random", "qk_random_std": 0.0}, SCALE_CONTROL)

REGISTRY = {**PAPER, **CONTROLS, **EMBEDDED}

# the tiny model of the smoke tests, the selftest and the test suite
TINY_MODEL = dict(d_model=32, n_layer=2, n_head=2, d_ff=64, block_size=32, batch_size=4)

# what --smoke-test shrinks every trial to: a few seconds each, every code path still runs
SMOKE = dict(
    **TINY_MODEL,
    max_steps=30,
    warmup_steps=5,
    eval_interval=10,
    eval_batches=2,
    log_interval=10,
    stories_mb=0.3,
)


def per_arm(experiments: list[Experiment], flat: dict[str, Any]) -> list[str]:
    """One line per field of `flat` that replaces a value the experiments set per arm: the field, the
    arms whose own value it replaces, and those values (e.g. --set lr over GPT-01's 3e-4)."""
    lines = []
    for key, value in flat.items():
        own: dict[Any, list[str]] = {}
        for e in experiments:
            if key in e.overrides and e.overrides[key] != value:
                own.setdefault(e.overrides[key], []).append(e.id)
        if own:
            arms = "; ".join(f"{', '.join(ids)}: {v!r}" for v, ids in own.items())
            lines.append(
                f"--set {key}={value!r} replaces the per-arm {key} of the experiments ({arms}): "
                f"every trial runs at {key}={value!r}, not at its experiment's own value"
            )
    return lines


def get(ids: list[str]) -> list[Experiment]:
    unknown = [i for i in ids if i not in REGISTRY]
    if unknown:
        from .config import ConfigError

        raise ConfigError(f"unknown experiment id(s) {', '.join(unknown)}: choose from {', '.join(REGISTRY)}")
    return [REGISTRY[i] for i in ids]
