"""The trainer on its own: freezing, exact resume, divergence, checkpoints, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from oelm_ray.core.batches import eval_batches
from oelm_ray.core.checkpoint import CheckpointError
from oelm_ray.core.config import make_config
from oelm_ray.core.data import prepare
from oelm_ray.core.model import GPT
from oelm_ray.core.optim import build_optimizer
from oelm_ray.core.prepared import load_prepared
from oelm_ray.core.qkcheck import QKCheckError
from oelm_ray.core.train_step import TrainStep
from oelm_ray.core.trainer import RunExistsError, train

from helpers import TINY_RUN

TINY = dict(TINY_RUN)


def cfg(data_dir, **kw):
    return make_config("cpu", **{**TINY, "data_dir": data_dir, **kw})


def quiet(_):
    pass


def _train_keeping_qk(c, out):
    """Train; return (the Q/K weights at init, the final weights)."""
    torch.manual_seed(c.train.seed)
    init = {k: v.clone() for k, v in GPT(c.model).qk_params().items()}
    train(c, out, log=quiet)
    return init, torch.load(out / "latest.pt", weights_only=True)["model"]


def test_frozen_qk_unchanged_and_absent_from_optimizer(tmp_path, data_dir):
    c = cfg(data_dir, method="oelm_freeze")
    init, final = _train_keeping_qk(c, tmp_path)
    for name, w in init.items():
        assert torch.equal(final[name], w), name
    model = GPT(c.model)
    opt_params = {id(p) for g in build_optimizer(model, c, torch.device("cpu")).param_groups for p in g["params"]}
    assert not any(id(p) in opt_params for p in model.qk_params().values())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["frozen_params"] == list(init)
    assert summary["trainable_params"] == summary["total_params"] - sum(v.numel() for v in init.values())


def test_baseline_qk_do_train(tmp_path, data_dir):
    init, final = _train_keeping_qk(cfg(data_dir, method="baseline"), tmp_path)
    assert all(not torch.equal(final[k], v) for k, v in init.items())


def _straight_and_cut(c, tmp_path, at: int):
    """Train c straight through into straight/, and into cut/ interrupted after the evaluation at step
    `at`, then resumed; returns both summaries."""
    straight = train(c, tmp_path / "straight", log=quiet)

    class Stop(Exception):
        pass

    def stop(m):
        if m["step"] == at:
            raise Stop

    with pytest.raises(Stop):
        train(c, tmp_path / "cut", report=stop, log=quiet)
    return straight, train(c, tmp_path / "cut", resume=True, log=quiet)


@pytest.mark.parametrize(
    "method,extra",
    [
        ("baseline", {}),
        ("oelm_freeze", {"qk_unfreeze_step": 15, "qk_lr_mult": 0.5, "qk_freeze_layers": 1}),
        ("oelm_freeze", {"qk_unfreeze_step": 20}),  # cut at the checkpoint of the unfreeze step itself
        ("baseline", {"dtype": "fp16"}),  # fp16 autocast: the gradient scaler's state resumes too
        ("oelm_freeze", {"qk_update_every": 5}),  # cut at step 20, right after an update step
        ("oelm_freeze", {"qk_update_every": 3, "qk_freeze_layers": 1}),  # cut between two updates
        ("oelm_freeze", {"lr_layer_decay": 0.7, "qk_unfreeze_step": 15}),  # per-layer groups, also the unfrozen Q/K's
    ],
)
def test_resume_is_bit_for_bit(tmp_path, data_dir, method, extra):
    c = cfg(data_dir, method=method, **extra)
    straight, resumed = _straight_and_cut(c, tmp_path, at=20)
    a = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [10, 20, 30, 40]
    untimed = lambda rows: [{k: v for k, v in r.items() if not k.endswith(("_s", "per_s"))} for r in rows]
    assert untimed(a) == untimed(b)  # losses, lr, tokens and the parameter counts (frozen at the start)
    assert resumed["best_val_ppl"] == straight["best_val_ppl"]
    assert [resumed[k] for k in ("trainable_params", "frozen_param_count")] == [
        straight[k] for k in ("trainable_params", "frozen_param_count")
    ]
    sa = torch.load(tmp_path / "straight" / "latest.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "cut" / "latest.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_partial_unfreeze_trains_qk_only_after_the_step(tmp_path, data_dir):
    c = cfg(data_dir, method="oelm_freeze", qk_unfreeze_step=20, max_steps=40)
    snaps = {}

    def grab(m):
        snaps[m["step"]] = torch.load(tmp_path / "latest.pt", weights_only=True)["model"][
            "transformer.h.0.attn.c_qk.weight"
        ]

    train(c, tmp_path, report=grab, log=quiet)
    assert torch.equal(snaps[10], snaps[20])  # frozen through step 20
    assert not torch.equal(snaps[20], snaps[30])  # trains after it
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["frozen_params"] == [] and summary["qk_check"] == "ok"


def test_divergence_ends_with_status_diverged(tmp_path, data_dir):
    c = cfg(data_dir, lr=1e6, grad_clip=0.0, warmup_steps=1)
    reports = []
    s = train(c, tmp_path, report=reports.append, log=quiet)
    assert s["status"] == "diverged"
    assert reports and reports[-1]["diverged"] == 1
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


def test_checkpoint_refusals(tmp_path, data_dir):
    c = cfg(data_dir, max_steps=10, warmup_steps=2, eval_interval=10)
    with pytest.raises(CheckpointError, match="no checkpoint at .*run without --resume"):
        train(c, tmp_path / "none", resume=True, log=quiet)
    train(c, tmp_path / "a", log=quiet)
    before = (tmp_path / "a" / "latest.pt").read_bytes()
    with pytest.raises(RunExistsError, match="already holds a run: pass --resume"):
        train(c, tmp_path / "a", log=quiet)
    other = cfg(data_dir, max_steps=10, warmup_steps=2, eval_interval=10, d_model=48)
    with pytest.raises(CheckpointError, match=r"another model/corpus \(model.d_model: checkpoint 32 vs config 48"):
        train(other, tmp_path / "a", resume=True, log=quiet)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "latest.pt").write_bytes(before[: len(before) // 2])  # torn
    with pytest.raises(CheckpointError, match="cannot be read"):
        train(c, tmp_path / "b", resume=True, log=quiet)
    assert (tmp_path / "a" / "latest.pt").read_bytes() == before  # nothing overwritten


def test_summary_and_metrics_files(tmp_path, data_dir):
    s = train(cfg(data_dir), tmp_path, log=quiet)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    for key in ("step", "tokens", "train/loss", "val/loss", "val/ppl", "lr", "step_time_s", "tokens_per_s"):
        assert key in rows[0]
    assert rows[-1]["val/ppl"] == pytest.approx(math.exp(rows[-1]["val/loss"]))
    for key in (
        "model_type",
        "init_method",
        "final_perplexity",
        "total_wall_time",
        "mean_step_time",
        "method",
        "final_val_ppl",
        "best_val_ppl",
        "tokens_per_s",
        "trainable_params",
        "total_params",
        "frozen_params",
        "status",
        "config",
    ):
        assert key in s
    assert (tmp_path / "best.pt").exists() and (tmp_path / "latest.pt").exists()


def test_cli_train_says_what_prepare_says_while_it_prepares_the_corpus(tmp_path, monkeypatch, capsys):
    """`oelm-ray train` on a corpus not yet prepared builds it with `oelm-ray prepare`'s lines on stderr
    (progress, a held lock, a resume), not silently."""
    from oelm_ray import cli
    from oelm_ray.core import data

    monkeypatch.setattr(data, "LOG_SECONDS", 0.0)  # a line at every chunk and a summary for this tiny build
    tiny = ["stories_mb=0.2", "d_model=32", "n_layer=2", "n_head=2", "d_ff=64", "block_size=32", "batch_size=4"]
    tiny += ["warmup_steps=1", "eval_interval=2", "eval_batches=1", "num_threads=1"]
    argv = ["train", "--out-dir", str(tmp_path / "x"), "--data-dir", str(tmp_path / "data"), "--max-steps", "2"]
    assert cli.main([*argv, "--set", *tiny]) == 0
    err = capsys.readouterr().err
    assert "prepare stories-0.2mb-s1234-bytes: 384 documents" in err and ", done in " in err, err


def test_cli_train_and_resume(tmp_path, data_dir):
    args = [
        sys.executable,
        "-m",
        "oelm_ray",
        "train",
        "--preset",
        "cpu",
        "--out-dir",
        str(tmp_path / "x"),
        "--data-dir",
        data_dir,
        "--set",
        "method=oelm_freeze",
        "seed=0",
        "stories_mb=0.2",
        "d_model=32",
        "n_layer=2",
        "n_head=2",
        "d_ff=64",
        "block_size=32",
        "batch_size=4",
        "warmup_steps=2",
        "eval_interval=5",
        "eval_batches=1",
        "num_threads=1",
    ]
    r = subprocess.run(args + ["--max-steps", "10"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "val ppl" in r.stdout
    r = subprocess.run(args + ["--max-steps", "20", "--resume"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    assert json.loads((tmp_path / "x" / "summary.json").read_text())["steps"] == 20
    bad = subprocess.run(args + ["--max-steps", "10", "--set", "lr=-1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["oelm-ray train: error: lr=-1.0 must be a finite number > 0"]


def test_whole_split_scores_every_target_exactly_once():
    T, B = 32, 4
    n_full, rest = 11, 17  # 11 full windows -> batches of 4, 4, 3; then one window of 17 targets
    val = np.arange(n_full * T + rest + 1) % 50000
    batches = eval_batches(val, make_config("cpu", block_size=T, batch_size=B, eval_batches=0))
    assert [tuple(y.shape) for _, y in batches] == [(4, T), (4, T), (3, T), (1, rest)]
    targets = torch.cat([y.reshape(-1) for _, y in batches])
    inputs = torch.cat([x.reshape(-1) for x, _ in batches])
    assert torch.equal(targets, torch.from_numpy(val[1:]).long())  # in order, none skipped or repeated
    assert torch.equal(inputs, torch.from_numpy(val[:-1]).long())  # each target's input is its predecessor


@pytest.mark.parametrize("n_batches", [0, 2])
def test_val_loss_is_the_token_mean_over_what_val_tokens_says(tmp_path, data_dir, n_batches):
    c = cfg(data_dir, eval_batches=n_batches, max_steps=10, eval_interval=10, dropout=0.0)
    train(c, tmp_path, log=quiet)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    val = load_prepared(c.data).val
    want_tokens = len(val) - 1 if n_batches == 0 else n_batches * c.train.batch_size * c.model.block_size
    assert row["val/tokens"] == want_tokens
    model = GPT(c.model)
    model.load_state_dict(torch.load(tmp_path / "latest.pt", weights_only=True)["model"])
    with torch.no_grad():
        total = sum(
            torch.nn.functional.cross_entropy(
                model.eval()(x)[0].reshape(-1, c.model.vocab_size), y.reshape(-1), reduction="sum"
            ).item()
            for x, y in eval_batches(val, c)
        )
    assert row["val/loss"] == pytest.approx(total / want_tokens, rel=1e-5)


def test_val_loss_does_not_depend_on_the_eval_batch_size(tmp_path, data_dir):
    """The whole split (its shorter last window included) at two eval batch sizes, fp32 on CPU: the
    same targets, the same token-weighted mean to 1e-6; training is untouched (bit-for-bit)."""
    runs = {}
    for size in (3, 8):
        c = cfg(data_dir, eval_batches=0, eval_batch_size=size, max_steps=20, dropout=0.0)
        batches = eval_batches(load_prepared(c.data).val, c)
        assert batches[-1][1].shape[1] < c.model.block_size  # the remainder: one shorter window
        assert {y.shape[0] for _, y in batches[:-2]} == {size}
        train(c, tmp_path / str(size), log=quiet)
        runs[size] = [json.loads(l) for l in (tmp_path / str(size) / "metrics.jsonl").read_text().splitlines()]
    a, b = runs[3], runs[8]
    assert [r["train/loss"] for r in a] == [r["train/loss"] for r in b]
    assert [r["val/tokens"] for r in a] == [r["val/tokens"] for r in b]
    for ra, rb in zip(a, b):
        assert abs(ra["val/loss"] - rb["val/loss"]) < 1e-6, (ra["val/loss"], rb["val/loss"])


def test_sampled_eval_scores_the_same_windows_at_any_eval_batch_size(data_dir):
    c = cfg(data_dir, eval_batches=3)
    val = load_prepared(c.data).val
    a, b = eval_batches(val, c), eval_batches(val, c.override({"eval_batch_size": 5}))
    assert [y.shape[0] for _, y in a] == [4, 4, 4] and [y.shape[0] for _, y in b] == [5, 5, 2]
    assert torch.equal(torch.cat([x for x, _ in a]), torch.cat([x for x, _ in b]))


def test_checkpoint_interval_writes_latest_less_often_and_resume_redoes_the_rest(tmp_path, data_dir):
    """latest.pt every 20 steps, evaluations every 10: a run stopped at step 30 (after an evaluation
    without a latest.pt) resumes from step 20, redoes 30, and ends bit-for-bit as an uninterrupted run."""
    c = cfg(data_dir, checkpoint_interval=20)
    assert [s for s in (10, 20, 30, 40) if c.train.checkpoints_at(s)] == [20, 40]
    latest_at = {}

    def record(m):
        latest_at[m["step"]] = (
            torch.load(tmp_path / "straight" / "latest.pt", weights_only=True)["step"]
            if (tmp_path / "straight" / "latest.pt").exists()
            else None
        )

    train(c, tmp_path / "straight", report=record, log=quiet)
    assert latest_at == {10: None, 20: 20, 30: 20, 40: 40}
    lines = []

    class Stop(Exception):
        pass

    def stop(m):
        if m["step"] == 30:
            raise Stop

    with pytest.raises(Stop):
        train(c, tmp_path / "cut", report=stop, log=quiet)
    assert torch.load(tmp_path / "cut" / "latest.pt", weights_only=True)["step"] == 20
    resumed = train(c, tmp_path / "cut", resume=True, log=lines.append)
    assert any("at step 20" in l for l in lines)
    a = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [10, 20, 30, 40]  # step 30 redone once, not twice
    untimed = lambda rows: [
        {k: v for k, v in r.items() if not k.endswith(("_s", "per_s")) and k != "warmup"} for r in rows
    ]
    assert untimed(a) == untimed(b)
    assert resumed["best_val_ppl"] == math.exp(min(r["val/loss"] for r in a))
    for name in ("latest.pt", "best.pt"):
        sa = torch.load(tmp_path / "straight" / name, weights_only=True)
        sb = torch.load(tmp_path / "cut" / name, weights_only=True)
        assert sa["step"] == sb["step"] and all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
        if name == "best.pt":
            assert "optimizer" not in sa  # weights only


def test_interval_speed_leaves_out_the_warmup_steps(tmp_path, data_dir, monkeypatch):
    """The first steps of a process (compiling, CUDA graph recording on a GPU) are left out of an
    interval's tokens/s; summary.json's tokens_per_s is the steady-state figure."""
    slow = {1, 2, 3}  # the first three steps take 0.3 s each: a stand-in for compiling
    real = TrainStep.__call__
    calls = []

    def step(self, x, y, *rest):
        calls.append(1)
        if len(calls) in slow:
            import time

            time.sleep(0.3)
        return real(self, x, y, *rest)

    monkeypatch.setattr(TrainStep, "__call__", step)
    s = train(cfg(data_dir, max_steps=20), tmp_path, log=quiet)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["warmup"] for r in rows] == [0, 0]
    assert rows[0]["step_time_s"] < 0.1 and rows[0]["step_time_s"] == pytest.approx(rows[1]["step_time_s"], rel=2.0)
    assert s["warmup_s"] >= 0.85  # what the warm-up cost is still in the summary
    assert s["train_time_s"] >= s["warmup_s"]
    assert s["tokens_per_s"] == pytest.approx(4 * 32 * 20 / sum(10 * r["step_time_s"] for r in rows))
    # an interval that ends inside its warm-up is timed whole, and says so
    s = train(cfg(data_dir, max_steps=4, eval_interval=2, warmup_steps=1), tmp_path / "short", log=quiet)
    assert [json.loads(l)["warmup"] for l in (tmp_path / "short" / "metrics.jsonl").read_text().splitlines()] == [1, 0]


def test_summary_reports_trainable_frozen_and_total(tmp_path, data_dir):
    lines = []
    s = train(cfg(data_dir, method="oelm_freeze", max_steps=10, eval_interval=10), tmp_path, log=lines.append)
    n_qk = 2 * 2 * 32 * 32  # n_layer x [W_q; W_k] x d_model^2
    assert s["frozen_param_count"] == n_qk and s["trainable_params"] + n_qk == s["total_params"]
    assert f"{s['trainable_params']:,} trainable + {n_qk:,} frozen = {s['total_params']:,} parameters" in lines[0]


# ------------------------------------------------------------------------------------------------
# bf16 autocast and torch.compile, on CPU: the paths a GPU run takes (dtype auto = bf16 on CUDA)


def _evals(out) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def _learns(rows: list[dict]) -> None:
    losses = [(r["train/loss"], r["val/loss"]) for r in rows]
    assert all(math.isfinite(x) for pair in losses for x in pair), losses
    assert rows[-1]["val/loss"] < rows[0]["val/loss"] and rows[-1]["train/loss"] < rows[0]["train/loss"], losses
    assert rows[-1]["val/loss"] < math.log(257) - 1.5, losses  # far below chance (uniform over the bytes)


def test_bf16_autocast_trains_on_cpu(tmp_path, data_dir):
    lines = []
    train(cfg(data_dir, dtype="bf16", max_steps=30), tmp_path / "bf16", log=lines.append)
    assert any("on cpu (bf16 autocast)" in l for l in lines), lines[:3]
    bf16 = _evals(tmp_path / "bf16")
    assert [r["step"] for r in bf16] == [10, 20, 30]
    _learns(bf16)
    train(cfg(data_dir, dtype="fp32", max_steps=30), tmp_path / "fp32", log=quiet)
    fp32 = _evals(tmp_path / "fp32")
    # bf16 really ran (other numbers than fp32) and learns about as well (same data, same init)
    assert [r["val/loss"] for r in bf16] != [r["val/loss"] for r in fp32]
    assert abs(bf16[-1]["val/loss"] - fp32[-1]["val/loss"]) < 0.1


@pytest.mark.slow
def test_compile_trains_and_resumes_bit_for_bit_on_cpu(tmp_path, data_dir):
    c = cfg(data_dir, compile=True, method="oelm_freeze", max_steps=20, eval_interval=5, warmup_steps=2)
    torch._dynamo.reset()
    straight, resumed = _straight_and_cut(c, tmp_path, at=10)
    rows = _evals(tmp_path / "straight")
    _learns(rows)
    cut = _evals(tmp_path / "cut")
    assert [r["step"] for r in cut] == [5, 10, 15, 20]
    assert [(r["train/loss"], r["val/loss"]) for r in cut] == [(r["train/loss"], r["val/loss"]) for r in rows]
    assert resumed["best_val_ppl"] == straight["best_val_ppl"]
    sa = torch.load(tmp_path / "straight" / "latest.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "cut" / "latest.pt", weights_only=True)["model"]
    assert not any(k.startswith("_orig_mod.") for k in sa)  # checkpoints hold the plain model's names
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------
# the research's model: medium-512 on GPT-2 tokens


@pytest.mark.slow
def test_medium_512_takes_an_optimizer_step_on_gpt2_tokens(tmp_path, gpt2_ranks):
    """The real Medium-512 (d_model 512, 6 layers, 8 heads, d_ff 2048, context 512, vocab 50257) on
    GPT-2 tokens: one optimizer step, on CPU. Only the batch is smaller than the research's (8)."""
    c = make_config(
        "medium-512",
        dataset="stories",
        stories_mb=0.3,
        gpt2_ranks=str(gpt2_ranks),
        data_dir=str(tmp_path / "data"),
        method="oelm_freeze",
        lr=1e-3,
        batch_size=2,
        max_steps=1,
        warmup_steps=0,
        eval_interval=1,
        eval_batches=1,
        log_interval=1,
        num_threads=2,
    )
    assert (c.model.d_model, c.model.n_layer, c.model.n_head, c.model.d_ff, c.model.block_size) == (
        512,
        6,
        8,
        2048,
        512,
    )
    assert c.model.vocab_size == 50257 and c.data.tokenizer == "gpt2"
    meta = prepare(c.data, progress=False)
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    assert int(load_prepared(c.data).train.max()) > 256  # GPT-2 tokens, not bytes
    threads = torch.get_num_threads()
    try:
        summary = train(c, tmp_path / "run", log=quiet)
    finally:
        torch.set_num_threads(threads)
    (row,) = _evals(tmp_path / "run")
    assert row["step"] == 1 and summary["status"] == "completed"
    # at init the model predicts close to uniformly over the 50257 tokens
    assert abs(row["train/loss"] - math.log(50257)) < 0.5 and math.isfinite(row["val/loss"])
    ckpt = torch.load(tmp_path / "run" / "latest.pt", weights_only=True)
    assert ckpt["step"] == 1 and all(int(s["step"]) == 1 for s in ckpt["optimizer"]["state"].values())
    qk = [w for k, w in ckpt["model"].items() if ".attn.c_qk." in k]
    assert len(qk) == 6
    # the research's counts for OELM at Medium-512, as summary.json (what `oelm-ray train` writes) reports them
    assert (summary["trainable_params"], summary["frozen_param_count"], summary["total_params"]) == (
        41_751_040,
        3_145_728,
        44_896_768,
    )
    for w in qk:  # still the head-wise orthogonal init: each head's 64 rows orthonormal (a step would break it)
        heads = w.reshape(16, 64, 512)  # (2 * n_head, d_head, d_model): Q heads, then K heads
        assert torch.allclose(heads @ heads.transpose(1, 2), torch.eye(64).expand(16, 64, 64), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# the method's invariant, checked at every checkpoint


@pytest.mark.parametrize(
    "method,extra",
    [
        ("baseline", {}),
        ("oelm_freeze", {}),
        ("oelm_random", {"qk_freeze_layers": 1}),
        ("oelm_freeze", {"qk_unfreeze_step": 20}),
    ],
)
def test_every_checkpoint_checks_the_qk_policy(tmp_path, data_dir, method, extra):
    summary = train(cfg(data_dir, method=method, **extra), tmp_path, log=quiet)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["qk_check"] == "ok" and [r["qk_check"] for r in rows] == ["ok"] * 4
    assert len(torch.load(tmp_path / "latest.pt", weights_only=True)["qk_init"]) == 2  # one digest per block


def test_qk_that_never_unfreeze_stop_the_run(tmp_path, data_dir, monkeypatch):
    """An unfreeze that does nothing (as a stale compiled graph would): Q/K unchanged where they should train."""
    real = GPT.set_qk_trainable
    monkeypatch.setattr(GPT, "set_qk_trainable", lambda self, unfrozen: real(self, False))
    reports = []
    with pytest.raises(
        QKCheckError, match=r"at step 30: Q/K of block\(s\) 0, 1 should have trained but are bit-identical"
    ):
        train(cfg(data_dir, method="oelm_freeze", qk_unfreeze_step=20), tmp_path, report=reports.append, log=quiet)
    assert [m["step"] for m in reports] == [10, 20]  # step 30 is never reported, nor written
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["step"] == 20
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "qk_check_failed" and "should have trained" in summary["qk_check"]


def test_frozen_qk_that_move_stop_the_run(tmp_path, data_dir, monkeypatch):
    """An optimizer that reaches the frozen Q/K: the first checkpoint says which blocks changed."""
    from oelm_ray.core import trainer

    def leaky(model, c, device, qk_unfrozen=False):
        for w in model.qk_params().values():
            w.requires_grad_(True)
        return build_optimizer(model, c, device, qk_unfrozen=True)

    monkeypatch.setattr(trainer, "build_optimizer", leaky)  # the name `setup` calls
    with pytest.raises(
        QKCheckError, match=r"at step 10: Q/K of block\(s\) 0, 1 should be frozen \(oelm_freeze\) but changed"
    ):
        train(cfg(data_dir, method="oelm_freeze"), tmp_path, log=quiet)
    assert not (tmp_path / "latest.pt").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "qk_check_failed"


# ------------------------------------------------------------------------------------------------
# the research's next experiments: periodic Q/K updates, layer-wise learning rates


def test_periodic_qk_change_only_on_their_update_steps(tmp_path, data_dir):
    c = cfg(data_dir, method="oelm_freeze", qk_update_every=5, eval_interval=3, max_steps=15, log_interval=3)
    torch.manual_seed(c.train.seed)
    init = GPT(c.model).qk_params()["transformer.h.0.attn.c_qk.weight"].detach().clone()
    qk = {}

    def grab(m):
        qk[m["step"]] = torch.load(tmp_path / "latest.pt", weights_only=True)["model"][
            "transformer.h.0.attn.c_qk.weight"
        ]

    summary = train(c, tmp_path, report=grab, log=quiet)
    # updates after 5, 10, 15 steps (0-based steps 4, 9, 14): checkpoints after 3, 6, 9, 12, 15 steps
    assert torch.equal(qk[3], init) and not torch.equal(qk[6], init)
    assert torch.equal(qk[6], qk[9]) and not torch.equal(qk[9], qk[12]) and not torch.equal(qk[12], qk[15])
    opt = torch.load(tmp_path / "latest.pt", weights_only=True)["optimizer"]
    (g,) = [g for g in opt["param_groups"] if g["name"] == "qk_periodic"]
    assert {float(opt["state"][i]["step"]) for i in g["params"]} == {3.0}  # AdamW stepped them on updates only
    assert summary["qk_check"] == "ok" and summary["trainable_params"] == summary["total_params"]


def test_periodic_qk_changed_between_updates_stop_the_run(tmp_path, data_dir, monkeypatch):
    from oelm_ray.core import trainer

    monkeypatch.setattr(
        trainer, "qk_update_at", lambda step, c: True
    )  # the loop's: every step updates, whatever N says
    with pytest.raises(QKCheckError, match=r"at step 10: Q/K of block\(s\) 0, 1 should be frozen"):
        train(cfg(data_dir, method="oelm_freeze", qk_update_every=20, max_steps=40), tmp_path, log=quiet)


def test_layer_wise_learning_rates(tmp_path, data_dir):
    c = cfg(data_dir, method="oelm_freeze", qk_freeze_layers=1, lr_layer_decay=0.5)
    torch.manual_seed(0)
    model = GPT(c.model)
    groups = {g["name"]: g for g in build_optimizer(model, c, torch.device("cpu")).param_groups}
    L = c.model.n_layer
    assert {n: g["lr_mult"] for n, g in groups.items()} == {
        "decay.embed": 0.5**L,
        "decay.h0": 0.5,
        "decay.h1": 1.0,
        "no_decay.h0": 0.5,
        "no_decay.h1": 1.0,
        "no_decay.top": 1.0,
        "qk.h1": 1.0,
    }  # block 0's Q/K are frozen: in no group
    assert groups["decay.embed"]["params"][0] is model.lm_head.weight  # the tied embedding, once
    n_opt = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n_opt == model.param_counts()["trainable"]
    plain = build_optimizer(model, cfg(data_dir, method="oelm_freeze", qk_freeze_layers=1), torch.device("cpu"))
    assert [g["name"] for g in plain.param_groups] == ["decay", "no_decay", "qk"]  # decay 1: the groups as ever
    summary = train(c, tmp_path, log=quiet)
    assert summary["lr_mults"]["decay.embed"] == 0.25 and summary["qk_check"] == "ok"


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(method="baseline", qk_update_every=10), "freezes no Q/K: drop qk_update_every"),
        (dict(method="oelm_freeze", qk_update_every=10, qk_unfreeze_step=20), "two schedules for the same Q/K"),
        (dict(method="oelm_freeze", qk_update_every=-1), "must be a whole number >= 0"),
        (dict(lr_layer_decay=0), "lr_layer_decay=0.0 must be a number > 0"),
        (dict(lr_layer_decay=-0.5), "lr_layer_decay=-0.5 must be a number > 0"),
    ],
)
def test_bad_next_experiment_settings_are_one_line(kw, msg):
    from oelm_ray.core.config import ConfigError

    with pytest.raises(ConfigError, match=msg):
        make_config("cpu", **kw)
