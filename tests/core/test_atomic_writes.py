"""A crash or SIGKILL in the middle of a write keeps the previous file whole; many processes preparing
one corpus leave one verified copy."""

from __future__ import annotations

import errno
import multiprocessing as mp
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import torch

from oelm_ray import results
from oelm_ray.core import data, prepared
from oelm_ray.core.checkpoint import load_checkpoint, save_checkpoint
from oelm_ray.core.config import make_config
from oelm_ray.core.io import DiskFullError, atomic_write

from helpers import smoke


def test_crash_inside_a_write_keeps_the_previous_file(tmp_path):
    """A crash (exception, Ctrl-C, full disk) in the middle of writing a checkpoint or a result
    record leaves the previous file whole and loadable, and no temp file behind."""
    cfg = make_config("cpu", **smoke(tmp_path)).to_dict()
    path = tmp_path / "latest.pt"
    old = {"format": 1, "config": cfg, "model": {"w": torch.arange(1000.0)}, "step": 10}
    save_checkpoint(path, old)
    old_bytes = path.read_bytes()

    def torn(exc: BaseException) -> Callable:
        def write(f):
            f.write(old_bytes[: len(old_bytes) // 2])  # half of a checkpoint, then the crash
            raise exc

        return write

    for exc in (RuntimeError("boom"), KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")):
        with pytest.raises((RuntimeError, KeyboardInterrupt, DiskFullError)):
            atomic_write(path, torn(exc))
        assert path.read_bytes() == old_bytes
        ck = load_checkpoint(path, expect_config=cfg)
        assert ck["step"] == 10 and torch.equal(ck["model"]["w"], old["model"]["w"])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]

    run_dir = tmp_path / "run"
    rec = {"name": "T-s0", "status": "running", "history": [{"step": 10, "val/loss": 1.5}]}
    results.write_record(run_dir, rec)

    def torn_json(f):
        f.write('{"name": "T-s0", "hist')
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write(results.record_path(run_dir, "T-s0"), torn_json, mode="w")
    assert results.load_records(run_dir) == [rec]
    assert [p.name for p in (run_dir / "trials").iterdir()] == ["T-s0.json"]


_WRITER = """
import sys, torch
from oelm_ray.core.checkpoint import save_checkpoint
path = sys.argv[1]
for i in range(1, 10**6):
    # ~16 MB: slow enough that a kill often lands inside the write
    save_checkpoint(path, {"format": 1, "config": {}, "model": {"w": torch.full((4_000_000,), float(i))}, "step": i})
    print(i, flush=True)
"""


def test_sigkill_while_writing_a_checkpoint_leaves_one_whole(tmp_path):
    """A process SIGKILLed (a random moment, seeded) while it rewrites a large checkpoint in a loop:
    the file on disk is always one whole checkpoint, the last or the one before it."""
    rng = random.Random(11)
    path = tmp_path / "latest.pt"
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        want = rng.randint(2, 4)
        last = 0
        while last < want:
            line = proc.stdout.readline()
            assert line, "the writer died on its own"
            last = int(line)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside the next write
        proc.kill()
        rest, _ = proc.communicate(timeout=30)
        last = max([last] + [int(x) for x in rest.split()])
        ck = load_checkpoint(path)
        assert ck["step"] in (last, last + 1), (ck["step"], last)
        assert torch.equal(ck["model"]["w"], torch.full((4_000_000,), float(ck["step"])))
        # a killed writer may leave its temp file; it never shadows the real one and the next write works
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != "latest.pt"]
        assert all(re.fullmatch(r"\.latest\.pt\..+\.tmp", n) for n in leftovers), leftovers
        save_checkpoint(path, {"format": 1, "config": {}, "model": {}, "step": -attempt})
        assert load_checkpoint(path)["step"] == -attempt


def _prepare_in_child(cfg: dict) -> None:
    from oelm_ray.core.config import DataConfig

    data.prepare(DataConfig(**cfg), progress=False)


def test_four_processes_prepare_one_verified_copy(tmp_path):
    cfg = make_config("cpu", **smoke(tmp_path, stories_mb=0.2)).data
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_prepare_in_child, args=(vars(cfg),)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
        assert p.exitcode == 0
    root = tmp_path / "data"
    out = prepared.prepared_dir(cfg)
    assert [f.name for f in root.iterdir() if f.is_dir()] == [out.name]
    assert not [f.name for f in root.iterdir() if ".tmp" in f.name], "temp leftovers"
    assert sorted(f.name for f in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    prepared.verify_prepared(out, "full", tokenizer=cfg.tokenizer)
