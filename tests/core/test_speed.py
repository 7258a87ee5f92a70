"""The fast path: the compiled step, staged batches, background checkpoints, trial packing, gpu_speed.py.

The CUDA-only parts (CUDA graphs, pinned copies on a side stream, the device-to-host snapshot) need
a GPU: `benchmarks/gpu_speed.py` checks them there. Everything else runs here on CPU.
"""

from __future__ import annotations

import io
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from oelm_ray.core import checkpoint
from oelm_ray.core.batches import Batches, Sampler
from oelm_ray.core.checkpoint import CheckpointStallError, CheckpointWriter, load_checkpoint, save_checkpoint
from oelm_ray.core.config import ConfigError, make_config
from oelm_ray.core.io import DiskFullError, read_metrics
from oelm_ray.core.train_step import resolve_compile, resolve_device
from oelm_ray.core.trainer import train

from helpers import TINY_RUN

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(TINY_RUN, max_steps=20, device="cpu")  # CPU semantics (bit-for-bit); the CUDA test at the end sets cuda


def cfg(data_dir, **kw):
    return make_config("cpu", **{**TINY, "data_dir": data_dir, **kw})


class Stop(Exception):
    pass


def stop_at(step):
    def report(m):
        if m["step"] == step:
            raise Stop

    return report


def rows(out):
    return [(r["train/loss"], r["val/loss"]) for r in read_metrics(Path(out) / "metrics.jsonl")]


def flat(out):
    return [v for r in rows(out) for v in r]


# ------------------------------------------------------------------------------------------------
# compile: what each choice means


def test_compile_choices_resolve_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile(make_config("cpu"), cpu)[0] is None  # auto: eager on CPU
    assert resolve_compile(make_config("cpu", compile="default"), cpu)[0] == "default"
    assert resolve_compile(make_config("cpu", compile="reduce-overhead"), cpu)[0] == "default"  # no CUDA graphs on CPU
    assert resolve_compile(make_config("cpu", compile="true"), cpu)[0] == "default"  # the old bool spelling
    assert resolve_compile(make_config("cpu", compile="off"), cpu)[0] is None
    with pytest.MonkeyPatch.context() as mp:  # a CUDA GPU as resolve_compile sees one: its capability
        mp.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        assert resolve_compile(make_config("medium-512"), cuda)[0] == "reduce-overhead"
        assert resolve_compile(make_config("medium-512"), cuda, world=2)[0] == "default"
        assert resolve_compile(make_config("medium-512", compile="off"), cuda)[0] is None
        mp.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
        assert resolve_compile(make_config("medium-512"), cuda)[0] is None  # too old for torch.compile
    with pytest.raises(ConfigError, match="compile='fast' is unknown"):
        make_config("cpu", compile="fast")


@pytest.mark.slow
def test_compiled_step_matches_eager_resumes_exactly_and_unfreezes(tmp_path, data_dir, monkeypatch):
    """torch.compile (default mode, the one CPUs have) through a Q/K unfreeze and a resume."""
    from torch._dynamo.utils import counters

    # the compiled dropout draws from eager's RNG ops, so eager and compiled see the same masks
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    c = cfg(data_dir, method="oelm_freeze", qk_unfreeze_step=15, n_layer=1)  # one block: half the kernels to build
    train(c.override({"compile": "off"}), tmp_path / "eager", log=lambda _: None)
    counters.clear()
    qk = {}

    def grab(m):
        qk[m["step"]] = torch.load(tmp_path / "straight" / "latest.pt", weights_only=True)["model"][
            "transformer.h.0.attn.c_qk.weight"
        ]

    lines = []
    c = c.override({"compile": "default"})
    train(c, tmp_path / "straight", report=grab, log=lines.append)
    assert "training step: torch.compile(mode='default')" in "\n".join(lines)
    assert counters["frames"]["ok"] > 0 and not counters["graph_break"]  # it compiled, the model in one graph
    assert flat(tmp_path / "straight") == pytest.approx(flat(tmp_path / "eager"), rel=1e-4)
    assert not torch.equal(qk[10], qk[20])  # the unfrozen Q/K train under compile (a recompile at step 15)

    with pytest.raises(Stop):
        train(c, tmp_path / "cut", report=stop_at(10), log=lambda _: None)
    train(c, tmp_path / "cut", resume=True, log=lambda _: None)
    assert rows(tmp_path / "cut") == rows(tmp_path / "straight")  # bit-for-bit under compile too
    a = torch.load(tmp_path / "straight" / "latest.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "latest.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_compiler_that_fails_falls_back_to_eager_and_says_why(tmp_path, data_dir, monkeypatch):
    def broken(model, **kw):
        def fail(*a, **k):
            raise RuntimeError("no C++ compiler found")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    lines = []
    train(cfg(data_dir, compile="default"), tmp_path / "a", log=lines.append)
    train(cfg(data_dir, compile="off"), tmp_path / "b", log=lambda _: None)
    assert any("failed in a training step (RuntimeError: no C++ compiler found): training eager" in l for l in lines)
    assert rows(tmp_path / "a") == rows(tmp_path / "b")  # the failed attempt left no trace in the run


# ------------------------------------------------------------------------------------------------
# the input pipeline's state


def test_batches_stage_ahead_and_their_state_is_the_one_before_the_staged_batch(data_dir):
    """The staging path runs on CPU too: next() hands out the staged batch and stages the following one."""
    from oelm_ray.core.prepared import load_prepared

    data = load_prepared(cfg(data_dir).data)
    ref = Sampler(data.train, 32, 4, seed=0)
    a = Batches(Sampler(data.train, 32, 4, seed=0), torch.device("cpu"))
    for _ in range(3):
        x, y = a.next()
        buf = ref.next_buf()
        assert torch.equal(x, buf[:, :-1]) and torch.equal(y, buf[:, 1:])  # the sampler's batches, in order
    assert a.staged is not None  # the fourth batch is already drawn...
    b = Batches(Sampler(data.train, 32, 4, seed=1), torch.device("cpu"))
    b.load_state_dict(a.state_dict())  # ...but the state is from before it: a restore draws it again
    fourth = ref.next_buf()
    for batches in (a, b):
        x, y = batches.next()
        assert torch.equal(x, fourth[:, :-1]) and torch.equal(y, fourth[:, 1:])
    assert all(torch.equal(u, v) for u, v in zip(a.next(), b.next()))


# ------------------------------------------------------------------------------------------------
# checkpoints written in the background


def test_background_checkpoints_report_after_the_write_and_resume_exactly(tmp_path, data_dir, monkeypatch):
    c = cfg(data_dir, method="oelm_freeze", qk_unfreeze_step=15)
    train(c, tmp_path / "inline", log=lambda _: None, background=False)
    writers, real_save, real_poll = [], checkpoint.save_checkpoint, checkpoint.CheckpointWriter.poll
    polled, trained_meanwhile = threading.Event(), []

    def poll(self):  # the loop calls it once a step
        polled.set()
        real_poll(self)

    def save(path, payload, progress=None):  # a background write: the training steps go on while it is written
        writers.append(threading.current_thread().name)
        polled.clear()
        trained_meanwhile.append(polled.wait(timeout=2.0))
        real_save(path, payload, progress)

    monkeypatch.setattr(checkpoint.CheckpointWriter, "poll", poll)
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    seen = []

    def check(m):  # the report comes once latest.pt holds this very step
        seen.append((m["step"], torch.load(tmp_path / "bg" / "latest.pt", weights_only=True)["step"]))

    train(c, tmp_path / "bg", report=check, log=lambda _: None, background=True)
    assert seen == [(10, 10), (20, 20)]
    assert writers and set(writers) == {"checkpoint-writer"}  # every file written off the training thread
    assert trained_meanwhile[0]  # ... and the steps after step 10 ran while its files were written
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    with pytest.raises(Stop):
        train(c, tmp_path / "cut", report=stop_at(10), log=lambda _: None, background=True)
    train(c, tmp_path / "cut", resume=True, log=lambda _: None, background=True)
    assert rows(tmp_path / "bg") == rows(tmp_path / "inline") == rows(tmp_path / "cut")
    for name in ("latest.pt", "best.pt"):
        a = torch.load(tmp_path / "inline" / name, weights_only=True)["model"]
        b = torch.load(tmp_path / "cut" / name, weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_background_write_error_surfaces_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"model": {}, "config": {}, "step": 1})
    w = CheckpointWriter(background=True)
    ran = []

    def full(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    w.save([(path, {"model": {}, "config": {}, "step": 2})], after=lambda: ran.append(1))
    with pytest.raises(DiskFullError, match="previous latest.pt is untouched"):
        w.wait()
    monkeypatch.undo()
    assert ran == [] and load_checkpoint(path)["step"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("background", [True, False])
@pytest.mark.timeout(60)
def test_a_stalled_checkpoint_write_is_given_up_with_one_line(tmp_path, monkeypatch, background):
    """A write that stops moving (stalled storage) ends the wait after STALL_S, inline or in the background,
    with one line naming the file; the previous latest.pt stays, and the stuck write, once it moves again,
    stops instead of replacing it. `close` gives such a write up too, with that line to its log."""
    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"model": {}, "config": {}, "step": 1})
    monkeypatch.setattr(checkpoint, "STALL_S", 0.5)
    storage = threading.Event()

    def stalls(obj, f):
        f.write(b"x" * 1000)
        storage.wait(30)  # the NFS server is away
        f.write(b"y" * 1000)

    monkeypatch.setattr(torch, "save", stalls)
    w, ran = CheckpointWriter(background), []
    t0 = time.monotonic()
    with pytest.raises(CheckpointStallError) as e:
        w.save([(path, {"model": {}, "config": {}, "step": 2})], after=lambda: ran.append(1))
        w.wait()
    assert time.monotonic() - t0 < 0.5 + 3
    msg = str(e.value)
    assert "\n" not in msg and f"writing checkpoint {path} made no progress for" in msg
    assert "1,000 bytes written" in msg and "is its storage" in msg and "previous latest.pt is untouched" in msg
    assert ran == []
    w.close()  # nothing in flight any more: returns at once

    lines, bg = [], CheckpointWriter(background=True, log=lambda line: lines.append(line))
    bg.save([(tmp_path / "best.pt", {"model": {}, "config": {}, "step": 2})], after=lambda: ran.append(2))
    t0 = time.monotonic()
    bg.close()
    assert time.monotonic() - t0 < 0.5 + 3 and ran == []
    assert len(lines) == 1 and f"writing checkpoint {tmp_path / 'best.pt'} made no progress" in lines[0]

    storage.set()  # the storage is back: the given-up writes stop at their next byte and leave no temp file
    deadline = time.monotonic() + 10
    while list(tmp_path.glob(".*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.05)
    monkeypatch.undo()
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "best.pt").exists()
    assert load_checkpoint(path)["step"] == 1


@pytest.mark.parametrize("background", [True, False])
def test_a_slow_checkpoint_write_that_keeps_moving_is_waited_for(tmp_path, monkeypatch, background):
    """Slow storage is not stalled storage: a write that takes 3x STALL_S but hands bytes over every 0.2 s
    completes, and its `after` runs."""
    path, real_save = tmp_path / "latest.pt", torch.save
    monkeypatch.setattr(checkpoint, "STALL_S", 0.5)

    def slow(obj, f):
        buf = io.BytesIO()
        real_save(obj, buf)
        data, pieces = buf.getvalue(), 8
        for i in range(pieces):
            f.write(data[i * len(data) // pieces : (i + 1) * len(data) // pieces])
            time.sleep(0.2)

    monkeypatch.setattr(torch, "save", slow)
    w, ran = CheckpointWriter(background), []
    t0 = time.monotonic()
    w.save([(path, {"model": {"w": torch.arange(100.0)}, "config": {}, "step": 2})], after=lambda: ran.append(1))
    w.wait()
    assert time.monotonic() - t0 > 3 * 0.5 and ran == [1]
    monkeypatch.undo()
    ck = load_checkpoint(path)
    assert ck["step"] == 2 and torch.equal(ck["model"]["w"], torch.arange(100.0))


KILL_MID_WRITE = r"""
import sys, time, torch
from pathlib import Path
from oelm_ray.core.checkpoint import CheckpointWriter, host_copy, save_checkpoint
out = Path(sys.argv[1])
save_checkpoint(out / "latest.pt", {"model": {"w": torch.zeros(4)}, "config": {}, "step": 1})
w = CheckpointWriter(background=True)
w.save([(out / "latest.pt", host_copy({"model": {"w": torch.ones(64 << 20)}, "config": {}, "step": 2}))])
print("writing", flush=True)
time.sleep(60)
"""


def test_a_kill_during_a_background_write_leaves_the_previous_latest_whole(tmp_path, data_dir):
    p = subprocess.Popen(
        [sys.executable, "-c", KILL_MID_WRITE, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert p.stdout.readline().strip() == "writing"
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".latest.pt.*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert list(tmp_path.glob(".latest.pt.*.tmp")), "the background write never started"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 1  # the old file, whole
    # a real run in that state: resume clears the dead write's temp file and uses the whole latest.pt
    run = tmp_path / "run"
    train(cfg(data_dir, max_steps=10), run, report=None, log=lambda _: None)
    (run / ".latest.pt.dead.tmp").write_bytes(b"half")
    train(cfg(data_dir), run, resume=True, log=lambda _: None)
    assert not list(run.glob(".*.tmp")) and load_checkpoint(run / "latest.pt")["step"] == 20


# ------------------------------------------------------------------------------------------------
# packing trials on a GPU


def phase3_presets():
    import importlib.util

    spec = importlib.util.spec_from_file_location("phase3_recipe", ROOT / "sweeps" / "phase3.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.PRESETS


@pytest.mark.parametrize("n,share", [(1, 1.0), (2, 0.5), (3, 0.3333), (4, 0.25)])
def test_trials_per_gpu_asks_ray_for_a_share_of_one_gpu(n, share, monkeypatch, tmp_path):
    from oelm_ray.tune import recipe, resources

    PRESETS = phase3_presets()
    args = recipe.parser("phase3", PRESETS).parse_args(
        ["--trials-per-gpu", str(n), "--no-wandb", "--storage", str(tmp_path)]
    )
    sw = recipe.build("phase3", PRESETS, args)
    monkeypatch.setattr(resources.ray, "cluster_resources", lambda: {"GPU": 1.0, "CPU": 8.0})
    res = resources.resources(sw)
    assert res == {"cpu": 1.0, "gpu": share} and n * res["gpu"] <= 1.0  # n trials fit on one GPU, no more
    monkeypatch.setattr(resources.ray, "cluster_resources", lambda: {"CPU": 8.0})
    with pytest.raises(ConfigError, match="Pass --gpus-per-trial 0"):
        resources.resources(sw)  # a GPU share on a cluster without GPUs fails at once, as a whole GPU does


def test_trials_per_gpu_refuses_nonsense(tmp_path):
    from oelm_ray.tune import recipe

    PRESETS = phase3_presets()
    for bad in (["--trials-per-gpu", "0"], ["--trials-per-gpu", "2", "--gpus-per-trial", "1"]):
        args = recipe.parser("phase3", PRESETS).parse_args(bad + ["--no-wandb", "--storage", str(tmp_path)])
        with pytest.raises(ConfigError, match="--trials-per-gpu"):
            recipe.build("phase3", PRESETS, args)


# ------------------------------------------------------------------------------------------------
# benchmarks/gpu_speed.py


@pytest.mark.slow
def test_gpu_speed_smoke_runs_with_the_trainer_deps_only():
    """--smoke on CPU, with Ray, W&B, datasets, pandas and pyarrow unimportable (the GPU machine has none)."""
    block = "import sys, runpy; [sys.modules.__setitem__(m, None) for m in ('ray', 'wandb', 'datasets', 'pandas', 'pyarrow', 'optuna')]; "
    run = "sys.argv = ['gpu_speed.py', '--smoke']; runpy.run_path('benchmarks/gpu_speed.py', run_name='__main__')"
    p = subprocess.run(
        [sys.executable, "-c", block + run],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    for method in ("baseline", "oelm_freeze"):
        ceil = [l for l in lines if l.startswith(method) and "ceiling eager" in l]
        tr = [l for l in lines if l.startswith(method) and " trainer " in l]
        assert ceil and tr, p.stdout
        assert float(tr[0].split()[2].replace(",", "")) > 0 and float(tr[0].split()[4]) > 0  # tok/s and the ratio
        assert "steady state" in tr[0]
        # the protocol: clipping's cost, a whole-split evaluation, both checkpoints, and their shares
        for what in ("ceiling + clip eager", "evaluation (whole split)", "checkpoint latest.pt", "checkpoint best.pt"):
            assert [l for l in lines if l.startswith(method) and what in l], (what, p.stdout)
        (share,) = [l for l in lines if l.startswith(method) and "protocol at the paper's settings" in l]
        pcts = [float(v) for v in re.findall(r"([\d.]+)%", share)]
        assert len(pcts) == 3 and abs(sum(pcts) - 100) < 0.5, share  # training, evaluation, checkpoints
    assert "worst trainer / ceiling:" in lines[-1]


# ------------------------------------------------------------------------------------------------
# CUDA only (CI has no GPU; a GPU session runs this with benchmarks/gpu_speed.py)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA graphs, pinned copies, the side stream"
)
def test_cuda_fast_path_through_unfreeze_background_checkpoints_and_resume(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    c = cfg(data_dir, method="oelm_freeze", qk_unfreeze_step=15, device="cuda", dtype="fp32", num_threads=0)
    train(c.override({"compile": "off"}), tmp_path / "eager", log=lambda _: None)
    lines, seen = [], []

    def check(m):
        seen.append((m["step"], torch.load(tmp_path / "fast" / "latest.pt", weights_only=True)["step"]))

    train(c, tmp_path / "fast", report=check, log=lines.append)
    assert "training step: torch.compile(mode='reduce-overhead')" in "\n".join(lines), lines
    assert not any("training eager" in l for l in lines), lines
    assert seen == [(10, 10), (20, 20)]  # background writes, each report after its own latest.pt
    assert flat(tmp_path / "fast") == pytest.approx(flat(tmp_path / "eager"), rel=1e-3)
    with pytest.raises(Stop):
        train(c, tmp_path / "cut", report=stop_at(10), log=lambda _: None)
    train(c, tmp_path / "cut", resume=True, log=lambda _: None)
    assert flat(tmp_path / "cut") == pytest.approx(flat(tmp_path / "fast"), rel=1e-3)


# ------------------------------------------------------------------------------------------------
# the Q/K unfreeze under compile, and compiler failures after the first forward


class StaleGraph(torch.nn.Module):
    """A stand-in for torch.compile that behaves like a graph compiled once and reused whatever changes.

    It keeps the requires_grad flags the Q/K had when it was built, as dynamo does on torch versions
    that skip the tensor guards of parameters whose module dict did not change: Q/K frozen at compile
    time get no gradient from it, even after `set_qk_trainable(True)`.
    """

    def __init__(self, model, **kw):
        super().__init__()
        self.inner = model
        self.frozen = [p for p in model.qk_params().values() if not p.requires_grad]

    def forward(self, x, y, **kw):
        flags = [p.requires_grad for p in self.frozen]
        for p in self.frozen:
            p.requires_grad_(False)
        try:
            return self.inner(x, y, **kw)
        finally:
            for p, f in zip(self.frozen, flags):
                p.requires_grad_(f)


def test_unfrozen_qk_train_even_where_the_compiled_graph_would_be_stale(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(torch, "compile", StaleGraph)
    lines = []
    c = cfg(data_dir, method="oelm_freeze", qk_unfreeze_step=15, compile="default")
    summary = train(c, tmp_path / "a", log=lines.append)
    train(c.override({"compile": "off"}), tmp_path / "eager", log=lambda _: None)
    assert summary["qk_check"] == "ok"
    assert rows(tmp_path / "a") == rows(tmp_path / "eager")  # the same run as eager: Q/K trained from step 15
    assert any("Q/K unfrozen in 2 block(s); the training step is compiled afresh" in l for l in lines), lines


def test_the_step_compiles_once_at_start_and_once_at_the_unfreeze(tmp_path, data_dir, monkeypatch):
    """One compile per process, plus one at the Q/K unfreeze if this process crosses it; a process resumed
    from a checkpoint whose optimizer already holds the unfrozen Q/K compiles once, for the unfrozen model."""
    compiles = []

    def counting(model, **kw):
        compiles.append(sorted(n for n, p in model.qk_params().items() if p.requires_grad))
        return model  # eager stands in for the compiled model

    monkeypatch.setattr(torch, "compile", counting)
    c = cfg(data_dir, method="oelm_freeze", qk_unfreeze_step=20, max_steps=40, compile="default")
    frozen, unfrozen = [], ["transformer.h.0.attn.c_qk.weight", "transformer.h.1.attn.c_qk.weight"]

    def processes(out, cut=None):
        """The compiles of a run straight through (cut=None), or of its two processes, cut at step `cut`."""
        compiles.clear()
        if cut is None:
            train(c, tmp_path / out, log=lambda _: None)
            return [list(compiles)]
        with pytest.raises(Stop):
            train(c, tmp_path / out, report=stop_at(cut), log=lambda _: None)
        first = list(compiles)
        compiles.clear()
        train(c, tmp_path / out, resume=True, log=lambda _: None)
        return [first, list(compiles)]

    assert processes("straight") == [[frozen, unfrozen]]
    assert processes("cut10", cut=10) == [[frozen], [frozen, unfrozen]]
    # step 20's checkpoint is written before the unfreeze (at the top of the next step): the resumed process crosses it
    assert processes("cut20", cut=20) == [[frozen], [frozen, unfrozen]]
    assert processes("cut30", cut=30) == [[frozen, unfrozen], [unfrozen]]  # resumed unfrozen: no second compile
    for out in ("cut10", "cut20", "cut30"):
        assert rows(tmp_path / out) == rows(tmp_path / "straight")
    compiles.clear()
    train(c.override({"method": "baseline", "qk_unfreeze_step": -1}), tmp_path / "baseline", log=lambda _: None)
    assert len(compiles) == 1  # nothing to unfreeze: one compile


def test_a_compiled_run_evaluates_again_and_again(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(torch, "compile", StaleGraph)  # no unfreeze here: the same as a real compiled model
    c = cfg(data_dir, max_steps=30)
    train(c.override({"compile": "default"}), tmp_path / "a", log=lambda _: None)
    train(c.override({"compile": "off"}), tmp_path / "b", log=lambda _: None)
    assert len(rows(tmp_path / "a")) == 3 and rows(tmp_path / "a") == rows(tmp_path / "b")


class FailingCompile(torch.nn.Module):
    """torch.compile whose result fails at one point: the forward of a given call, its backward, or in eval mode."""

    calls = 0

    def __init__(self, model, fail: str, **kw):
        super().__init__()
        self.inner, self.fail, self.n = model, fail, 0
        FailingCompile.calls += 1
        self.nth_compile = FailingCompile.calls

    def forward(self, x, y, **kw):
        self.n += 1
        if self.fail == "eval" and not self.training:
            raise RuntimeError("inductor: eval graph failed")
        if self.fail == "second call" and self.n == 2 and self.training:
            raise RuntimeError("cudagraphs: recording failed")
        if self.fail == "after unfreeze" and self.nth_compile == 2:
            raise RuntimeError("inductor: recompile failed")
        logits, loss = self.inner(x, y, **kw)
        return logits, (_FailInBackward.apply(loss) if self.fail == "backward" and self.training else loss)


class _FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("aot_autograd: backward compile failed")


@pytest.mark.parametrize(
    "fail,where",
    [
        ("backward", "in a training step"),
        ("second call", "in a training step"),
        ("eval", "in evaluation"),
        ("after unfreeze", "in a training step"),
    ],
)
def test_a_compiler_failure_after_the_first_forward_falls_back_too(tmp_path, data_dir, monkeypatch, fail, where):
    FailingCompile.calls = 0
    monkeypatch.setattr(torch, "compile", lambda model, **kw: FailingCompile(model, fail, **kw))
    c = cfg(data_dir, method="oelm_freeze", qk_unfreeze_step=15)
    lines = []
    train(c.override({"compile": "default"}), tmp_path / "a", log=lines.append)
    train(c.override({"compile": "off"}), tmp_path / "b", log=lambda _: None)
    assert sum(f"failed {where} (RuntimeError:" in l for l in lines) == 1, lines  # said once, with the reason
    assert rows(tmp_path / "a") == rows(tmp_path / "b")  # redone eager from the same RNG state: no trace


# ------------------------------------------------------------------------------------------------
# checkpoints and precision on GPUs


def test_a_host_copy_keeps_the_tied_embedding_once(tmp_path):
    from oelm_ray.core.checkpoint import host_copy
    from oelm_ray.core.model import GPT

    model = GPT(make_config("cpu").model)
    sd = model.state_dict()
    copy = host_copy(sd)
    assert copy["lm_head.weight"] is copy["transformer.wte.weight"]  # one tensor, as the live ones share storage
    assert copy["lm_head.weight"].data_ptr() != sd["lm_head.weight"].data_ptr()  # and a copy, not an alias
    save_checkpoint(tmp_path / "live.pt", sd)
    save_checkpoint(tmp_path / "copy.pt", copy)
    assert (tmp_path / "copy.pt").stat().st_size == pytest.approx((tmp_path / "live.pt").stat().st_size, rel=0.01)


@pytest.mark.parametrize(
    "capability,dtype",
    [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
)
def test_auto_precision_is_bf16_only_where_the_gpu_has_it(monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: True
    )  # V100 and T4 emulate it
    monkeypatch.setattr(torch.version, "hip", None)
    assert resolve_device(make_config("medium-512"))[1] == dtype
    assert resolve_device(make_config("medium-512", dtype="bf16"))[1] == torch.bfloat16  # asked for: as asked
    assert resolve_device(make_config("cpu", device="cpu"))[1] is None  # fp32 on CPU


def test_fp16_trains_with_a_gradient_scaler(tmp_path, data_dir):
    lines = []
    summary = train(cfg(data_dir, dtype="fp16"), tmp_path, log=lines.append)
    ckpt = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert ckpt["scaler"]["scale"] > 0 and summary["qk_check"] == "ok"
    assert math.isfinite(summary["best_val_ppl"])
