"""Typed run configuration: model, data and training, with presets and validation.

Imports neither torch nor Ray, so the CLI, the sweep recipes and the tests can build and check a
config cheaply. Every field carries a docstring (the string literal under it), which
`options.field_docs()` reads back for `--help` and the table of options in docs/options.md.

A config round-trips through plain dicts (`to_dict` / `from_dict`), which is how Ray hands it to a
trial. Field names are unique across the three sections, so a flat override such as
`{"lr": 1e-3, "d_model": 256}` is unambiguous. `make_config` resolves a run's config from its
layers (preset < experiment < --set < search < seed: its docstring is the one statement of that
order), and `typed` is the one coercion of a value to its field's type. The command line's
`--set FIELD=VALUE` (the one spelling of a field in `oelm-ray` and every recipe) is `options.py`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from .io import UserError

METHODS = ("baseline", "oelm_freeze", "oelm_random")
HUB_DATASETS = ("tinystories", "openwebtext", "wikitext103")
DATASETS = ("stories",) + HUB_DATASETS
TOKENIZERS = ("bytes", "gpt2")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("auto", "off", "default", "reduce-overhead")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


class ConfigError(UserError, ValueError):
    """A config value a user must fix; the message names the field and what is allowed."""


@dataclass
class ModelConfig:
    vocab_size: int = 257
    """Vocabulary size of the embedding and LM head; must cover the tokenizer (bytes: 257, gpt2: 50257)."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; d_model must be divisible by it."""
    d_model: int = 128
    """Residual stream width."""
    d_ff: int = 512
    """Hidden width of the GELU MLP."""
    block_size: int = 128
    """Context length in tokens."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention weights and output, after the GELU and on the MLP output (the research used 0.1)."""
    method: str = "baseline"
    """Q/K policy: baseline (standard init, trained), oelm_freeze (head-wise orthogonal, frozen), oelm_random (random normal, frozen)."""
    qk_random_std: float = 0.02
    """Std of the oelm_random Q/K init; the research used 0.02; 0 means 1/sqrt(d_model), the orthogonal rows' scale (the scale-matched control)."""
    qk_freeze_layers: int = -1
    """For frozen methods: Q/K are frozen in the lowest k blocks only; -1 freezes every block."""

    def validate(self) -> None:
        _choice("method", self.method, METHODS)
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "block_size"):
            _positive(name, getattr(self, name))
        if self.d_model % self.n_head:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}: "
                f"choose d_model as a multiple of n_head (e.g. {self.n_head * max(1, self.d_model // self.n_head)})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if not (self.qk_random_std >= 0 and math.isfinite(self.qk_random_std)):
            raise ConfigError(f"qk_random_std={self.qk_random_std} must be > 0, or 0 for 1/sqrt(d_model)")
        if not -1 <= self.qk_freeze_layers <= self.n_layer:
            raise ConfigError(
                f"qk_freeze_layers={self.qk_freeze_layers} must be -1 (all) or between 0 and n_layer={self.n_layer}"
            )

    @property
    def qk_std(self) -> float:
        """The std oelm_random draws Q/K from: qk_random_std, or 1/sqrt(d_model) where that is 0."""
        return self.qk_random_std or self.d_model**-0.5

    @property
    def frozen_qk_layers(self) -> tuple[int, ...]:
        """Indices of the blocks whose Q/K start frozen."""
        if self.method == "baseline":
            return ()
        k = self.n_layer if self.qk_freeze_layers < 0 else self.qk_freeze_layers
        return tuple(range(k))


@dataclass
class DataConfig:
    dataset: str = "stories"
    """Corpus: stories (generated offline), tinystories, openwebtext, wikitext103, or a path to a local .txt/.jsonl/.parquet file."""
    tokenizer: str = "bytes"
    """Tokenizer: bytes (tiktoken byte-level, vocabulary 257) or gpt2 (tiktoken r50k_base, vocabulary 50257)."""
    data_dir: str = "data"
    """Where prepared token files live (one sub-folder per corpus and tokenizer); shared storage on a cluster."""
    stories_mb: float = 4.0
    """Size of the generated stories corpus in MB of text."""
    stories_seed: int = 1234
    """Seed of the stories generator (the corpus is a pure function of it and stories_mb)."""
    val_fraction: float = 0.02
    """Share of documents held out for validation where the corpus has no validation split."""
    max_train_tokens: int = 0
    """Stop tokenizing the training split after this many tokens; 0 takes all of it."""
    gpt2_ranks: str = ""
    """Path to a local GPT-2 ranks file (gpt2.tiktoken) for offline use; empty uses tiktoken's download or TIKTOKEN_CACHE_DIR."""
    hub_dir: str = ""
    """Read a hub corpus from this local folder of parquet files laid out like the hub, instead of downloading it."""

    def validate(self) -> None:
        if self.dataset not in DATASETS and not self.dataset.endswith(LOCAL_SUFFIXES):
            raise ConfigError(
                f"dataset={self.dataset!r} is unknown: choose one of {', '.join(DATASETS)} "
                f"or a local file ending in {', '.join(LOCAL_SUFFIXES)}"
            )
        _choice("tokenizer", self.tokenizer, TOKENIZERS)
        if not self.data_dir.strip():
            raise ConfigError("data_dir='' is empty: give the folder of the prepared data (default: data)")
        if not self.stories_mb > 0:
            raise ConfigError(f"stories_mb={self.stories_mb} must be > 0")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in (0, 0.5)")
        if self.max_train_tokens < 0:
            raise ConfigError(f"max_train_tokens={self.max_train_tokens} must be >= 0 (0 = all)")

    @property
    def is_local_file(self) -> bool:
        return self.dataset not in DATASETS


@dataclass
class TrainConfig:
    seed: int = 0
    """Seed of the init, the data order and dropout."""
    max_steps: int = 1000
    """Optimizer steps in the run."""
    batch_size: int = 16
    """Sequences per optimizer step."""
    lr: float = 2e-3
    """Peak learning rate (after warmup)."""
    min_lr_frac: float = 0.0
    """Cosine decay ends at lr * min_lr_frac (the research decayed to 0)."""
    warmup_steps: int = 100
    """Linear warmup steps; must be smaller than max_steps."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices and embeddings (not on norms and biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    eval_interval: int = 200
    """Evaluate every this many steps, and at the last step."""
    eval_batches: int = 8
    """Validation batches per evaluation, a fixed sample the same at every evaluation; 0 scores the whole validation split (the research's definition)."""
    eval_batch_size: int = 0
    """Sequences per forward pass of an evaluation; 0 = batch_size. It changes only the speed: the same targets are scored, and the val loss is their token-weighted mean at any size."""
    checkpoint_interval: int = 0
    """Write latest.pt (the resume point) every this many steps, rounded up to whole eval intervals, and at the last step; 0 = at every evaluation. best.pt (weights only) is written at every evaluation that improves the val loss."""
    log_interval: int = 50
    """Print training progress (and check the loss for NaN/inf) every this many steps."""
    qk_unfreeze_step: int = -1
    """Step at which frozen Q/K start training; -1 keeps them frozen for the whole run."""
    qk_lr_mult: float = 1.0
    """Learning-rate multiplier for the Q/K projections whenever they train."""
    qk_update_every: int = 0
    """For frozen methods: the frozen Q/K get their gradient and an AdamW update only on every N-th step (steps N, 2N, ...), and stay fixed in between (their AdamW moments too); 0 never updates them, 1 updates them every step."""
    lr_layer_decay: float = 1.0
    """Layer-wise learning rates: block i of L trains at lr x decay^(L-1-i) (the top block at lr), the embeddings (tied with the LM head) at lr x decay^L, the final LayerNorm at lr; 1 is one rate for all."""
    device: str = "auto"
    """auto (cuda when available; in a Ray trial, cuda only if Ray assigned it a GPU), cpu or cuda."""
    dtype: str = "auto"
    """auto (bf16 autocast on a CUDA GPU with native bf16, fp16 autocast with a gradient scaler on one without, fp32 on CPU), fp32, bf16 or fp16."""
    compile: str = "auto"
    """torch.compile of the training step: off (eager), default, reduce-overhead (CUDA graphs), or auto (reduce-overhead on one CUDA GPU, default under DDP, off on CPU); true/false mean default/off."""
    num_threads: int = 0
    """torch CPU threads for this run; 0 leaves torch's default."""

    def __post_init__(self) -> None:
        # the field was a bool once: --compile true/false (and old configs) keep their meaning
        legacy = str(self.compile).strip().lower()
        self.compile = "default" if legacy in _TRUE else "off" if legacy in _FALSE else legacy

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "eval_interval", "log_interval"):
            _positive(name, getattr(self, name))
        for name, zero in (
            ("eval_batches", "the whole validation split"),
            ("eval_batch_size", "batch_size"),
            ("checkpoint_interval", "every evaluation"),
            ("qk_update_every", "off"),
        ):
            _whole(name, getattr(self, name), zero)
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"lr={self.lr} must be a finite number > 0")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ConfigError(
                f"warmup_steps={self.warmup_steps} must be >= 0 and smaller than max_steps={self.max_steps}"
            )
        if self.eval_interval > self.max_steps:
            raise ConfigError(
                f"eval_interval={self.eval_interval} is larger than max_steps={self.max_steps}: "
                "the run would never be evaluated; lower eval_interval"
            )
        if not 0.0 <= self.min_lr_frac <= 1.0:
            raise ConfigError(f"min_lr_frac={self.min_lr_frac} must be in [0, 1]")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("weight_decay and grad_clip must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.qk_unfreeze_step < -1 or self.qk_unfreeze_step == 0:
            raise ConfigError(f"qk_unfreeze_step={self.qk_unfreeze_step} must be -1 (never) or a step >= 1")
        if not self.qk_lr_mult > 0:
            raise ConfigError(f"qk_lr_mult={self.qk_lr_mult} must be > 0")
        if not (self.lr_layer_decay > 0 and math.isfinite(self.lr_layer_decay)):
            raise ConfigError(
                f"lr_layer_decay={self.lr_layer_decay} must be a number > 0 (1 = one rate for all blocks)"
            )
        _choice("device", self.device, DEVICES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("compile", self.compile, COMPILE_MODES)
        if self.num_threads < 0:
            raise ConfigError(f"num_threads={self.num_threads} must be >= 0")

    @property
    def eval_batch(self) -> int:
        """Sequences per evaluation forward pass: eval_batch_size, or batch_size where that is 0."""
        return self.eval_batch_size or self.batch_size

    @property
    def checkpoint_every(self) -> int:
        """Steps between latest.pt writes: checkpoint_interval rounded up to whole eval intervals."""
        return self.eval_interval * max(1, -(-self.checkpoint_interval // self.eval_interval))

    def checkpoints_at(self, step: int) -> bool:
        """Whether the evaluation at `step` writes latest.pt (a pure function of the step: resume-safe)."""
        return step >= self.max_steps or step % self.checkpoint_every == 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> Config:
        self.model.validate()
        self.data.validate()
        self.train.validate()
        need = VOCAB_SIZES[self.data.tokenizer]
        if self.model.vocab_size < need:
            raise ConfigError(
                f"vocab_size={self.model.vocab_size} is smaller than the {self.data.tokenizer} "
                f"tokenizer's vocabulary ({need}): set vocab_size >= {need}"
            )
        if self.train.qk_update_every and not self.model.frozen_qk_layers:
            raise ConfigError(
                f"qk_update_every={self.train.qk_update_every} is set but method={self.model.method} with "
                f"qk_freeze_layers={self.model.qk_freeze_layers} freezes no Q/K: drop qk_update_every, or use a frozen method"
            )
        if self.train.qk_update_every and self.train.qk_unfreeze_step != -1:
            raise ConfigError(
                f"qk_update_every={self.train.qk_update_every} and qk_unfreeze_step={self.train.qk_unfreeze_step} are "
                "two schedules for the same Q/K: choose one"
            )
        if not self.model.frozen_qk_layers and self.train.qk_unfreeze_step != -1:
            raise ConfigError(
                f"qk_unfreeze_step={self.train.qk_unfreeze_step} is set but method={self.model.method} with "
                f"qk_freeze_layers={self.model.qk_freeze_layers} freezes no Q/K: drop qk_unfreeze_step"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Build from a nested dict ({"model": {...}, ...}), e.g. what Ray hands a trial; unknown keys are an error."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
        where = field_sections()
        for sec, part in d.items():
            misplaced = sorted(k for k in part or {} if where.get(k) != sec)
            if misplaced:
                raise ConfigError(f"unknown {sec} config field(s): {', '.join(misplaced)}")
        return cls().override({k: v for part in d.values() for k, v in (part or {}).items()})

    def override(self, flat: dict[str, Any]) -> Config:
        """A copy with flat overrides (field name -> value) applied, each value coerced by `typed`."""
        where, flat = field_sections(), typed(flat)
        return Config(
            **{
                sec: dataclasses.replace(getattr(self, sec), **{k: v for k, v in flat.items() if where[k] == sec})
                for sec in section_classes()
            }
        )


VOCAB_SIZES = {"bytes": 257, "gpt2": 50257}

# ---------------------------------------------------------------------------------------------
# presets


def _cpu_preset() -> Config:
    # two single-thread trials side by side on a 2-core laptop, ~55 ms/step each; two blocks are the
    # least that can form induction heads, which the stories corpus rewards (README, "The embedded default").
    # lr 1e-2 is the best of a scan (2e-3 ... 2.5e-2, warmup 100, seed 0) for baseline and oelm_freeze
    # alike; 2.5e-2 blows up (docs/searches.md). 500 steps keep the embedded
    # default's eight trials (four arms x two seeds) within 5 minutes on 2 cores
    return Config(
        ModelConfig(vocab_size=257, n_layer=2, n_head=4, d_model=64, d_ff=256, block_size=128),
        DataConfig(dataset="stories", tokenizer="bytes"),
        TrainConfig(max_steps=500, batch_size=16, lr=1e-2, warmup_steps=100, eval_interval=100, eval_batches=8),
    )


def _medium_512_preset() -> Config:
    # the research's "Medium-512"; lr is the baseline's, recipes set it per method.
    # eval_batches=0: every evaluation scores the whole validation split, as the research did, so
    # best_val_ppl / final_val_ppl are the research's "final perplexity" (docs/protocol.md, "Validation").
    # At the trainer's GPU speed the protocol decides the wall time (docs/speed.md): the
    # whole split is scored 32 sequences per forward (4x fewer launches than at the training batch
    # of 8), and latest.pt (539 MB with AdamW state) is written every 5 evaluations, ~30 s of GPU
    # time at the target speed: a crash redoes at most that, a disk needs ~20 MB/s per trial
    return Config(
        ModelConfig(vocab_size=50257, n_layer=6, n_head=8, d_model=512, d_ff=2048, block_size=512, dropout=0.1),
        DataConfig(dataset="tinystories", tokenizer="gpt2"),
        TrainConfig(
            max_steps=100_000,
            batch_size=8,
            lr=3e-4,
            warmup_steps=1000,
            eval_interval=1000,
            eval_batches=0,
            eval_batch_size=32,
            checkpoint_interval=5000,
            log_interval=100,
            compile="auto",
        ),
    )


def _sized(n_layer: int, n_head: int, d_model: int) -> Callable[[], Config]:
    """Medium-512's data and training, another model size (d_ff = 4 d_model, context 512): the scaling presets."""

    def make() -> Config:
        c = _medium_512_preset()
        c.model = dataclasses.replace(c.model, n_layer=n_layer, n_head=n_head, d_model=d_model, d_ff=4 * d_model)
        return c

    return make


# the research's Medium-512 with a smaller (d_model 256, 4 blocks) and a larger sibling (GPT-2 small's
# 768 / 12 blocks / 12 heads); tests/test_model.py pins their parameter counts
PRESETS = {
    "cpu": _cpu_preset,
    "small-256": _sized(4, 4, 256),
    "medium-512": _medium_512_preset,
    "large-768": _sized(12, 12, 768),
}


def preset(name: str) -> Config:
    """A fresh config for a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is unknown: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def typed(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat overrides with every value coerced to its field's type ("5e-3" -> 0.005, "500" -> 500).

    The one coercion of config values, wherever they come from (`--set`, an experiment, a search, the
    dict Ray hands a trial). An unknown field, or a value its field's type cannot take, is one
    ConfigError naming the field and the type. Equal values are then equal however they were spelled.
    """
    where, classes = field_sections(), section_classes()
    out = {}
    for key, value in flat.items():
        key = key.replace("-", "_")
        if key not in where:
            near = difflib.get_close_matches(key, where, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"unknown config field {key!r}{hint}; see `oelm-ray train --help` for the fields")
        out[key] = _coerce(classes[where[key]], key, value)
    return out


def make_config(preset_name: str = "cpu", *layers: dict[str, Any], **overrides: Any) -> Config:
    """The config of one run, resolved from its layers and validated: the one way the CLI, the
    recipes and Ray trials build configs. Each layer is a dict of flat overrides (field -> value)
    and replaces the fields it names; the later layer wins:

      1. preset      the named preset's defaults (`--preset`; each experiment names its own)
      2. experiment  the experiment's per-arm overrides (GPT-01's dataset, method, lr, max_steps)
      3. --set       FIELD=VALUE from the command line (after --smoke-test's sizes), for every trial;
                     a sweep's first lines warn of each per-arm value of layer 2 that it replaces
      4. search      the value a search tries for its fields (sweeps/lr_warmup.py: lr, warmup_steps)
      5. seed        the trial's seed, from the sweep's seed axis (--seeds)

    `oelm-ray train` has layers 1 and 3 (`seed` is a field like any other there). Keyword
    overrides are one more layer, after the others.
    """
    merged: dict[str, Any] = {}
    for layer in (*layers, overrides):
        merged.update(layer)
    return preset(preset_name).override(merged).validate()


def precedence() -> str:
    """The numbered precedence list of `make_config`'s docstring, for `--help`."""
    doc = (inspect.getdoc(make_config) or "").splitlines()
    first = next(i for i, line in enumerate(doc) if re.match(r"\s+1\. ", line))
    last = next((i for i in range(first, len(doc)) if not doc[i].strip()), len(doc))
    return "\n".join(doc[first:last])


# ---------------------------------------------------------------------------------------------
# helpers


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is unknown: choose one of {', '.join(allowed)}")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a whole number > 0")


def _whole(name: str, value: Any, zero_means: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name}={value!r} must be a whole number >= 0 (0 = {zero_means})")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Coerce strings (CLI) and floats that are whole (JSON, Ray) to the field's declared type."""
    typ = {f.name: f.type for f in fields(cls)}[name]
    try:
        if typ == "bool":
            if isinstance(value, str):
                if value.lower() in _TRUE | _FALSE:
                    return value.lower() in _TRUE
                raise ValueError
            return bool(value)
        if typ == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(value) if isinstance(value, str) else value
        if typ == "float":
            return float(value)
        if typ == "str":
            return str(value)
    except (TypeError, ValueError):
        example = {"int": "a whole number", "float": "a number", "bool": "true or false"}.get(typ, typ)
        raise ConfigError(
            f"{name}={value!r} is not a valid {typ}: give {example}, e.g. {name}={getattr(cls(), name)!r}"
        ) from None
    return value


def field_sections() -> dict[str, str]:
    """Flat field name -> section name ("model", "data" or "train")."""
    out: dict[str, str] = {}
    for sec in fields(Config):
        for f in fields(sec.default_factory):  # type: ignore[misc]
            assert f.name not in out, f"duplicate config field {f.name}"
            out[f.name] = sec.name
    return out


def section_classes() -> dict[str, type]:
    return {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]
