"""Bad input: every case in `BAD_INPUT` ends in one line on stderr naming what to fix, exit 2, before
any training (and before Ray starts), with every existing file untouched. docs/reliability.md's table
is generated from it."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from oelm_ray import cli, results
from oelm_ray.core.io import write_json
from oelm_ray.tune import recipe
from oelm_ray.tune import sweep as sweep_mod

from helpers import PHASE3, ROOT, World, make_world, phase3_presets, train_argv


@dataclass
class Bad:
    case: str
    """What is wrong (the docs table's first column)."""
    entry: str
    """oelm-ray (cli.main in-process), phase3 (recipe.main in-process) or subprocess (phase3.py)."""
    argv: Callable[[Path, World], list[str]]
    expect: str
    """Regex the one-line message must match: it names what to fix."""
    setup: Callable[[Path, World], None] | None = None
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    env: Callable[[Path], dict] | None = None
    ray: bool = False
    """Needs the shared local Ray (the check asks the cluster); otherwise the check must come before Ray starts."""
    usage: bool = False
    """argparse's own error: its usage lines, then the one message."""
    example: str = ""
    """The bad input, in words (docs/reliability.md)."""
    says: str = ""
    """What the message tells the user (docs/reliability.md)."""


def _train(d: Path, w: World, *extra: str, data_dir: Path | None = None, **fields) -> list[str]:
    return [*train_argv(**fields), "--data-dir", str(data_dir or w.data), *extra]


def _sweep(d: Path, w: World, *extra: str) -> list[str]:
    return ["--smoke-test", "--no-wandb", "--storage", str(d / "runs"), "--data-dir", str(w.data), *extra]


def _copy_data(d: Path, w: World) -> Path:
    shutil.copytree(w.data, d / "data")
    return next(p for p in (d / "data").iterdir() if p.is_dir())


def _truncate(d, w):
    f = _copy_data(d, w) / "train.bin"
    f.write_bytes(f.read_bytes()[:-2])


def _flip(d, w):
    f = _copy_data(d, w) / "train.bin"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))


def _other_tokenizer(d, w):
    meta = _copy_data(d, w) / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "tokenizer": "gpt2"}))


def _copy_run(d, w):
    shutil.copytree(w.ckpt, d / "x")


def _torn_checkpoint(d, w):
    (d / "x").mkdir()
    full = (w.ckpt / "latest.pt").read_bytes()
    (d / "x" / "latest.pt").write_bytes(full[: len(full) // 2])


def _existing_sweep(d, w):
    presets = phase3_presets()
    args = recipe.parser("phase3", presets).parse_args(_sweep(d, w))
    sw = recipe.build("phase3", presets, args)
    write_json(sw.run_dir / "sweep.json", sw.identity())
    results.write_record(sw.run_dir, {"name": "CPU-01-baseline-s0", "status": "completed", "history": []})


def _blocked_storage(d, w):
    (d / "file.txt").write_text("a regular file: nothing can be created below it, not even by root\n")


def _finished_report(d, w):
    hist = [
        {
            "step": 10,
            "tokens": 1280,
            "val/loss": 2.0,
            "val/ppl": 7.39,
            "step_time_s": 0.1,
            "tokens_per_s": 1e4,
            "wall_time_s": 1.0,
            "trainable_params": 100,
            "total_params": 100,
        }
    ]
    results.write_record(
        d / "run",
        {
            "name": "CPU-01-baseline-s0",
            "experiment_id": "CPU-01",
            "dataset": "stories",
            "method": "baseline",
            "seed": 0,
            "status": "completed",
            "history": hist,
            "config": {"train": {"max_steps": 10}, "model": {}},
        },
    )
    write_json(d / "run" / "sweep.json", {"name": "run"})
    results.write_report(d / "run")


def _disk_full(mp: pytest.MonkeyPatch) -> None:
    def fsync(fd):  # the disk fills up while the results are flushed
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    mp.setattr(os, "fsync", fsync)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: nothing listens there


BAD_INPUT = [
    Bad(
        "unknown method",
        "phase3",
        lambda d, w: _sweep(d, w, "--set", "method=oelm_magic"),
        r"method='oelm_magic' is unknown: choose one of baseline, oelm_freeze, oelm_random",
        example="`--set method=oelm_magic`",
        says="names the trial and lists baseline, oelm_freeze, oelm_random",
    ),
    Bad(
        "unknown dataset",
        "oelm-ray",
        lambda d, w: _train(d, w, "--out-dir", str(d / "x"), dataset="nosuch"),
        r"dataset='nosuch' is unknown: choose one of stories, tinystories",
        example="`--set dataset=nosuch`",
        says="lists the known corpora and the local file suffixes",
    ),
    Bad(
        "unknown preset",
        "oelm-ray",
        lambda d, w: [*_train(d, w, "--out-dir", str(d / "x")), "--preset", "huge"],
        r"preset='huge' is unknown: choose one of cpu, small-256, medium-512, large-768",
        example="`--preset huge`",
        says="lists the presets (cpu, medium-512)",
    ),
    Bad(
        "unknown experiment id",
        "phase3",
        lambda d, w: _sweep(d, w, "--experiments", "GPT-99"),
        r"unknown experiment id\(s\) GPT-99: choose from GPT-01",
        example="`--experiments GPT-99`",
        says="lists the registry's ids",
    ),
    Bad(
        "unknown config field",
        "phase3",
        lambda d, w: _sweep(d, w, "--set", "learning_rate=1e-3"),
        r"unknown config field 'learning_rate'",
        example="`--set learning_rate=1e-3`",
        says="points to `oelm-ray train --help` for the fields",
    ),
    Bad(
        "d_model not divisible by n_head",
        "phase3",
        lambda d, w: _sweep(d, w, "--set", "d_model=33"),
        r"d_model=33 is not divisible by n_head=2: choose d_model as a multiple of n_head",
        example="`--set d_model=33`",
        says="asks for a multiple of n_head, with an example",
    ),
    Bad(
        "lr <= 0",
        "phase3",
        lambda d, w: _sweep(d, w, "--set", "lr=0"),
        r"lr=0.0 must be a finite number > 0",
        example="`--set lr=0`",
        says="lr must be a finite number > 0",
    ),
    Bad(
        "warmup_steps >= max_steps",
        "phase3",
        lambda d, w: _sweep(d, w, "--set", "warmup_steps=30"),
        r"warmup_steps=30 must be >= 0 and smaller than max_steps=30",
        example="`--set warmup_steps=30` (30 steps)",
        says="warmup must be smaller than max_steps",
    ),
    Bad(
        "seeds not integers",
        "phase3",
        lambda d, w: _sweep(d, w, "--seeds", "0,one"),
        r"--seeds '0,one' must be comma-separated whole numbers",
        example="`--seeds 0,one`",
        says="comma-separated whole numbers, e.g. 0,1,2",
    ),
    Bad(
        "seeds empty",
        "phase3",
        lambda d, w: _sweep(d, w, "--seeds", ","),
        r"--seeds ',' names no seed: give comma-separated",
        example="`--seeds ,`",
        says="give comma-separated whole numbers, or leave `--seeds` out for the preset's",
    ),
    Bad(
        "seed given twice",
        "phase3",
        lambda d, w: _sweep(d, w, "--seeds", "0,1,0"),
        r"--seeds '0,1,0' names seed 0 twice: .*list each seed once",
        example="`--seeds 0,1,0`",
        says="which seed repeats (two trials would share a name and folder)",
    ),
    Bad(
        "seed set as a field",
        "phase3",
        lambda d, w: _sweep(d, w, "--set", "seed=3"),
        r"--set seed=3: a sweep's seeds are its seed axis: use --seeds 3",
        example="`--set seed=3`",
        says="use `--seeds`",
    ),
    Bad(
        "experiment not in the preset",
        "phase3",
        lambda d, w: _sweep(d, w, "--experiments", "GPT-01"),
        r"--experiments GPT-01: not in --preset embedded, whose experiments are CPU-01, CPU-02, CPU-03, CPU-04",
        example="`--experiments GPT-01` with the embedded preset",
        says="lists the preset's experiments",
    ),
    Bad(
        "bad --set item",
        "phase3",
        lambda d, w: _sweep(d, w, "--set", "lr"),
        r"--set 'lr' must look like FIELD=VALUE",
        example="`--set lr`",
        says="FIELD=VALUE, with an example",
    ),
    Bad(
        "field given twice",
        "phase3",
        lambda d, w: _sweep(d, w, "--max-steps", "20", "--set", "max_steps=30"),
        r"--max-steps 20 and --set max_steps=30 set the same field: keep one",
        example="`--max-steps 20 --set max_steps=30`",
        says="the two spellings; keep one",
    ),
    Bad(
        "value of the wrong type",
        "phase3",
        lambda d, w: _sweep(d, w, "--set", "max_steps=1e3"),
        r"max_steps='1e3' is not a valid int: give a whole number, e.g. max_steps=1000",
        example="`--set max_steps=1e3`",
        says="the field's type, with an example",
    ),
    Bad(
        "negative GPUs per trial",
        "phase3",
        lambda d, w: _sweep(d, w, "--gpus-per-trial", "-1"),
        r"--gpus-per-trial -1 must be 0 \(CPU trials\), a share of one GPU from 0.0001 to 1 .*or a whole number",
        example="`--gpus-per-trial -1`",
        says="0, a share of one GPU, or whole GPUs (before Ray starts)",
    ),
    Bad(
        "fractional GPUs above one",
        "phase3",
        lambda d, w: _sweep(d, w, "--gpus-per-trial", "1.5"),
        r"--gpus-per-trial 1.5 must be 0 \(CPU trials\), a share of one GPU",
        example="`--gpus-per-trial 1.5`",
        says="0, a share of one GPU, or whole GPUs",
    ),
    Bad(
        "zero CPUs per trial",
        "phase3",
        lambda d, w: _sweep(d, w, "--cpus-per-trial", "0"),
        r"--cpus-per-trial 0 must be a number of CPUs of at least 0.0001",
        example="`--cpus-per-trial 0`",
        says="at least 0.0001 CPU (e.g. 1 or 0.5)",
    ),
    Bad(
        "zero trials per GPU",
        "phase3",
        lambda d, w: _sweep(d, w, "--trials-per-gpu", "0"),
        r"--trials-per-gpu 0 must be a whole number from 1 .* to 10000",
        example="`--trials-per-gpu 0`",
        says="a whole number from 1 to 10000",
    ),
    Bad(
        "trials per GPU and GPUs per trial",
        "phase3",
        lambda d, w: _sweep(d, w, "--trials-per-gpu", "2", "--gpus-per-trial", "1"),
        r"--trials-per-gpu 2 and --gpus-per-trial 1 both set each trial's GPU share: keep one",
        example="`--trials-per-gpu 2 --gpus-per-trial 1`",
        says="both set the GPU share: keep one",
    ),
    Bad(
        "negative retries",
        "phase3",
        lambda d, w: _sweep(d, w, "--max-failures", "-1"),
        r"--max-failures -1 must be a whole number >= 0",
        example="`--max-failures -1`",
        says=">= 0 (Tune's -1 would retry an always-crashing trial forever)",
    ),
    Bad(
        "run name with a path",
        "phase3",
        lambda d, w: _sweep(d, w, "--name", "../elsewhere"),
        r"--name '../elsewhere' must be one folder name under --storage: .*no '/' and no '..'",
        example="`--name ../elsewhere` (or `a/b`)",
        says="one folder name: letters, digits, '.', '_', '-'",
    ),
    Bad(
        "empty storage",
        "phase3",
        lambda d, w: [*_sweep(d, w), "--storage", ""],
        r"--storage '' is empty",
        example="`--storage ''`",
        says="give the folder or URI for the runs",
    ),
    Bad(
        "bad W&B project",
        "phase3",
        lambda d, w: [*_sweep(d, w), "--wandb-project", "team/project"],
        r"--wandb-project 'team/project' is not a W&B project name",
        example="`--wandb-project team/project`",
        says="1-128 characters, none of `/ \\ # ? % :`",
    ),
    Bad(
        "config field as a flag",
        "oelm-ray",
        lambda d, w: [*_train(d, w, "--out-dir", str(d / "x")), "--lr", "1e-3"],
        r"--lr is not a flag: set config fields with --set, e.g. --set lr=VALUE",
        usage=True,
        example="`oelm-ray train --lr 1e-3`",
        says="use `--set lr=...`",
    ),
    Bad(
        "token file truncated",
        "oelm-ray",
        lambda d, w: _train(d, w, "--out-dir", str(d / "x"), data_dir=d / "data"),
        r"train.bin is \d+ bytes, expected \d+ .*truncated or incomplete.*delete",
        setup=_truncate,
        example="train.bin cut short",
        says="the size it has and should have; delete and prepare again (`--force`)",
    ),
    Bad(
        "token file corrupted (checksum)",
        "oelm-ray",
        lambda d, w: _train(d, w, "--out-dir", str(d / "x"), data_dir=d / "data"),
        r"train.bin fails its sha256 checksum.*delete",
        setup=_flip,
        example="one byte of train.bin flipped",
        says="fails its sha256; delete and prepare again (`--force`)",
    ),
    Bad(
        "prepared with another tokenizer",
        "oelm-ray",
        lambda d, w: _train(d, w, "--out-dir", str(d / "x"), data_dir=d / "data"),
        r"was prepared with tokenizer 'gpt2', not 'bytes'",
        setup=_other_tokenizer,
        example="meta.json says gpt2, config says bytes",
        says="which tokenizer it was prepared with; delete and prepare again",
    ),
    Bad(
        "no prepared data (--no-prepare)",
        "oelm-ray",
        lambda d, w: _train(d, w, "--out-dir", str(d / "x"), "--no-prepare", data_dir=d / "nodata"),
        r"no prepared data at .*run `oelm-ray prepare --set dataset=stories tokenizer=bytes stories_mb=0.3 "
        r"--data-dir .*nodata`",
        example="empty `--data-dir`",
        says="the `oelm-ray prepare ...` command to run",
    ),
    Bad(
        "checkpoint from another model config",
        "oelm-ray",
        lambda d, w: _train(d, w, "--out-dir", str(d / "x"), "--resume", d_model=48),
        r"belongs to another model/corpus \(model.d_model: checkpoint 32 vs config 48",
        setup=_copy_run,
        example="`--resume --set d_model=48` on a d_model 32 run",
        says="the differing fields; resume with the original config or another `--out-dir`",
    ),
    Bad(
        "--resume with no checkpoint",
        "oelm-ray",
        lambda d, w: _train(d, w, "--out-dir", str(d / "x"), "--resume"),
        r"no checkpoint at .*latest.pt: run without --resume",
        example="`--resume` into an empty folder",
        says="run without `--resume`",
    ),
    Bad(
        "torn checkpoint",
        "oelm-ray",
        lambda d, w: _train(d, w, "--out-dir", str(d / "x"), "--resume"),
        r"latest.pt cannot be read .*delete it .* or restore it",
        setup=_torn_checkpoint,
        example="half a latest.pt",
        says="cannot be read; delete it or restore it from a copy",
    ),
    Bad(
        "out-dir holds a run, no --resume",
        "oelm-ray",
        lambda d, w: _train(d, w, "--out-dir", str(d / "x")),
        r"already holds a run: pass --resume to continue it, or choose another --out-dir",
        setup=_copy_run,
        example="train twice into one `--out-dir`",
        says="pass `--resume`, or choose another `--out-dir`; nothing overwritten",
    ),
    Bad(
        "GPU request, no GPUs",
        "phase3",
        lambda d, w: _sweep(d, w, "--gpus-per-trial", "1"),
        r"asks for 1 GPU\(s\) but the Ray cluster has 0.*Pass --gpus-per-trial 0",
        ray=True,
        example="`--gpus-per-trial 1` on a CPU-only Ray",
        says="the GPUs asked for and present; `--gpus-per-trial 0` or `--address`",
    ),
    Bad(
        "paper preset, no GPUs",
        "phase3",
        lambda d, w: ["--preset", "paper", "--no-wandb", "--storage", str(d / "runs")],
        r"--preset paper trains Medium-512 .* the Ray cluster has none: .*--gpus-per-trial 0 to train on CPUs on purpose",
        ray=True,
        example="`--preset paper` on a CPU-only Ray (no `--gpus-per-trial`)",
        says="it needs GPUs: `--address` a GPU cluster, or `--gpus-per-trial 0` on purpose",
    ),
    Bad(
        "unreachable RAY_ADDRESS",
        "subprocess",
        lambda d, w: _sweep(d, w),
        r"cannot reach the Ray cluster at 127.0.0.1:\d+ \(Connection refused\): is the head up .*runs on a local Ray instead",
        env=lambda d: {"RAY_ADDRESS": f"127.0.0.1:{_closed_port()}"},
        example="`RAY_ADDRESS=127.0.0.1:<closed port>`",
        says="is the head up (`ray status`, `ray up`), is it its GCS address? without one a local Ray runs",
    ),
    Bad(
        "malformed cluster.yaml",
        "oelm-ray",
        lambda d, w: ["check-cluster", str(d / "cluster.yaml")],
        r"cluster.yaml: not valid YAML at line \d+",
        setup=lambda d, w: (d / "cluster.yaml").write_text("cluster_name: x\nprovider: {type: local\n"),
        example="`oelm-ray check-cluster` on broken YAML",
        says="line and column of the syntax error",
    ),
    Bad(
        "run name exists with another config",
        "phase3",
        lambda d, w: _sweep(d, w, "--set", "lr=1e-3"),
        r"exists with a different sweep config \(differs in: CPU-01-baseline-s0: lr, .* more trials\).*choose another --name",
        setup=_existing_sweep,
        example="same `--name`, different `--set lr`",
        says="which part differs; the same command resumes, or another `--name`",
    ),
    Bad(
        "storage not writable",
        "phase3",
        lambda d, w: [*_sweep(d, w), "--storage", str(d / "file.txt" / "sub")],
        r"storage .*file.txt/sub is not writable .*pass --storage with a writable folder",
        setup=_blocked_storage,
        example="`--storage <regular file>/sub`",
        says="pass `--storage` with a writable folder",
    ),
    Bad(
        "disk full while writing results",
        "oelm-ray",
        lambda d, w: ["report", str(d / "run")],
        r"no space left on the device while writing .*trials.parquet .*previous trials.parquet is untouched",
        setup=_finished_report,
        patch=_disk_full,
        example="ENOSPC during `oelm-ray report`",
        says="the file, that its previous copy is untouched; free space and rerun",
    ),
]


def bad_input_markdown() -> str:
    """docs/reliability.md's bad-input table, from BAD_INPUT."""
    entry = {"oelm-ray": "`oelm-ray`", "phase3": "`sweeps/*.py`", "subprocess": "`sweeps/*.py`"}
    rows = ["| bad input | example | command | the one-line message |", "|---|---|---|---|"]
    rows += [f"| {b.case} | {b.example} | {entry[b.entry]} | {b.says} |" for b in BAD_INPUT]
    return "\n".join(rows)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("world"))


def _snapshot(*dirs: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for d in dirs for p in sorted(d.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("bad", BAD_INPUT, ids=[b.case for b in BAD_INPUT])
def test_bad_input_fails_in_one_line_before_any_work(bad: Bad, tmp_path, world, capsys, monkeypatch, request):
    d = tmp_path
    if bad.setup:
        bad.setup(d, world)
    if bad.ray:
        request.getfixturevalue("ray_local")
    argv = bad.argv(d, world)
    before = _snapshot(d, world.root)
    capsys.readouterr()
    t = time.perf_counter()
    if bad.entry == "subprocess":
        env = {**os.environ, **(bad.env(d) if bad.env else {})}
        r = subprocess.run([sys.executable, str(PHASE3), *argv], env=env, capture_output=True, text=True, timeout=300)
        rc, err, prefix, limit = r.returncode, r.stderr, "phase3: error: ", 120.0
    else:
        with monkeypatch.context() as mp_:
            if bad.patch:
                bad.patch(mp_)
            if not bad.ray:  # the check comes before Ray: joining or starting one here is a failure

                def no_ray(*_):
                    raise AssertionError(f"{bad.case}: Ray was started before the bad input was found")

                mp_.setattr(sweep_mod, "connect", no_ray)
            try:
                if bad.entry == "oelm-ray":
                    rc = cli.main(argv)
                else:
                    rc = recipe.main("phase3", phase3_presets(), argv)
            except SystemExit as e:  # argparse's own errors
                rc = e.code
        err, prefix, limit = capsys.readouterr().err, ("oelm-ray " if bad.entry == "oelm-ray" else "phase3: "), 30.0
    elapsed = time.perf_counter() - t
    lines = err.strip().splitlines()
    assert rc == 2, err
    if bad.usage:  # argparse: the usage, then `<prog>: error: <message>` as the last line
        lines, prefix = lines[-1:], "oelm-ray" if bad.entry == "oelm-ray" else "sweeps/phase3.py"
        assert err.startswith("usage: "), err
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix) and ": error: " in lines[0], lines[0]
    assert re.search(bad.expect, lines[0]), lines[0]
    assert elapsed < limit, f"took {elapsed:.1f}s: the check must come before any expensive work"
    after = _snapshot(d, world.root)
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not changed, f"touched: {changed}"
    created = [p for p in set(after) - set(before) if not p.endswith(".lock")]
    assert not created, f"created: {created}"  # no checkpoint, metrics or trial folder: nothing ran


def test_bad_input_table_has_enough_cases_and_matches_the_docs():
    assert len({b.case for b in BAD_INPUT}) == len(BAD_INPUT)
    assert all(b.example and b.says for b in BAD_INPUT)
    readme = (ROOT / "docs" / "reliability.md").read_text()
    assert bad_input_markdown() in readme
