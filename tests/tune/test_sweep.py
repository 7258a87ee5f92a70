"""The sweep runner on local Ray: smoke matrix, resume, crash recovery, fail-fast checks."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from oelm_ray.core import experiments as E
from oelm_ray.tune import recipe
from oelm_ray import results
from oelm_ray.core.config import ConfigError
from oelm_ray.tune.resources import resources
from oelm_ray.tune.sweep import Sweep, run
from oelm_ray.tune.trial import trial_device
import faults  # tests/faults.py: a trainable that crashes once, at a given step
from trial_files import state_files

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = [
    "experiment_id", "dataset", "method", "seed", "lr", "warmup_steps", "max_steps", "best_val_ppl",
    "final_val_ppl", "gap_vs_baseline_pct", "meets_criterion", "trainable_params", "total_params",
    "tokens_per_s", "mean_step_time_s", "wall_time_s", "status",
]


def smoke_sweep(tmp: Path, name: str, **kw) -> Sweep:
    common = {**E.SMOKE, "data_dir": str(tmp / "data"), **kw.pop("common", {})}
    return Sweep(name=name, experiments=list(E.EMBEDDED.values()), seeds=[0, 1], storage=str(tmp / "runs"),
                 common=common, **kw)


@pytest.mark.slow
def test_smoke_sweep_runs_the_matrix_and_writes_results(tmp_path, ray_local):
    run_dir = run(smoke_sweep(tmp_path, "smoke"))
    df = pd.read_parquet(run_dir / "trials.parquet")
    assert len(df) == 8 and set(COLUMNS) <= set(df.columns)
    assert set(df.status) == {"completed"} and set(df.qk_check) == {"ok"}
    assert sorted(df.method.unique()) == ["baseline", "oelm_freeze", "oelm_random"]
    # the scale-matched control follows the smoke model's d_model, and the table says it is a control
    ctl = df[df.experiment_id == "CPU-04"]
    assert set(ctl.role) == {"control"} and set(ctl.qk_random_std) == {E.SMOKE["d_model"] ** -0.5}
    assert set(df[df.experiment_id == "CPU-03"].qk_random_std) == {0.02}
    frozen = df[df.method != "baseline"]
    # each frozen trial's gap is against the baseline of its own seed (the two baselines differ, so pairing matters)
    base = df[df.method == "baseline"].set_index("seed").best_val_ppl
    assert base[0] != base[1]
    for _, r in frozen.iterrows():
        assert r.gap_vs_baseline_pct == pytest.approx(100 * (r.best_val_ppl / base[r.seed] - 1))
    assert (frozen.trainable_params < df[df.method == "baseline"].trainable_params.iloc[0]).all()
    assert (df.steps == E.SMOKE["max_steps"]).all()
    assert "CPU-02" in (run_dir / "summary.md").read_text()
    assert (run_dir / "val_ppl.png").read_bytes()[:4] == b"\x89PNG"
    # names are readable and match the registry
    assert set(df.name) == {e.trial_name(s) for e in E.EMBEDDED.values() for s in (0, 1)}


@pytest.mark.slow
def test_crashed_trial_resumes_from_checkpoint_with_identical_metrics(tmp_path, ray_local):
    one = [E.EMBEDDED["CPU-02"]]
    clean = run(Sweep("clean", one, [0], str(tmp_path / "runs"), common={**E.SMOKE, "data_dir": str(tmp_path / "data")}),
                report=False)
    marker = tmp_path / "crashed-once"
    faulty = run(
        Sweep("faulty", one, [0], str(tmp_path / "runs"), common={**E.SMOKE, "data_dir": str(tmp_path / "data")},
              trainable=faults.trainable, extra_config={"fault": {"step": 20, "marker": str(marker)}}),
        report=False,
    )
    assert marker.exists(), "the fault was never injected"
    name = one[0].trial_name(0)
    a = results.read_record(results.record_path(clean, name))
    b = results.read_record(results.record_path(faulty, name))
    assert b["status"] == a["status"] == "completed"
    assert [h["step"] for h in b["history"]] == [10, 20, 30]
    # resumed from the step-10 checkpoint: the losses after it are bit-for-bit the clean run's
    assert [h["val/loss"] for h in b["history"]] == [h["val/loss"] for h in a["history"]]
    assert [h["train/loss"] for h in b["history"]] == [h["train/loss"] for h in a["history"]]


def test_gpu_runs_never_fall_back_to_cpu_silently(tmp_path, ray_local):
    """--preset paper (require_gpus) on a GPU-less Ray is refused unless 0 GPUs were asked for explicitly.
    (The full command, one line / exit 2 / nothing prepared, is a case in test_bad_input's BAD_INPUT.)"""
    assert ray_local.cluster_resources().get("GPU", 0) == 0
    with pytest.raises(ConfigError, match="--preset paper .* has none: .*--gpus-per-trial 0"):
        resources(smoke_sweep(tmp_path, "paper", require_gpus=True))
    assert resources(smoke_sweep(tmp_path, "paper", require_gpus=True, gpus_per_trial=0)) == {"cpu": 1.0, "gpu": 0.0}
    assert resources(smoke_sweep(tmp_path, "embedded")) == {"cpu": 1.0, "gpu": 0.0}  # the CPU default stays CPU
    args = recipe.parser("phase3", {"paper": {}, "embedded": {}}).parse_args
    assert recipe.build("phase3", {"paper": {"experiments": ["GPT-01"], "seeds": [0]}},
                        args(["--preset", "paper", "--no-wandb", "--storage", str(tmp_path)])).require_gpus
    assert not recipe.build("phase3", {"embedded": {"experiments": ["CPU-01"], "seeds": [0]}},
                            args(["--no-wandb", "--storage", str(tmp_path)])).require_gpus


def test_trial_device_comes_from_rays_assignment():
    # a 0-GPU trial on a GPU node: CPU, whatever torch.cuda.is_available() says there
    assert trial_device("auto", [], None) == "cpu"
    assert trial_device("auto", [], "0,1,2,3") == "cpu"
    with pytest.raises(ConfigError, match="assigned this trial no GPU"):
        trial_device("cuda", [], "0")
    # a 1-GPU trial: its own GPU, which Ray made the first visible one
    assert trial_device("auto", [2], "2") == "cuda"
    assert trial_device("auto", ["1", "3"], "1,3") == "cuda"
    assert trial_device("cpu", [0], "0") == "cpu"  # an explicit device=cpu is kept
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):  # cuda:0 would be another trial's GPU
        trial_device("auto", [2], "0,1,2,3")


def test_existing_run_with_different_config_is_refused(tmp_path):
    from oelm_ray.tune.sweep import check_run_dir
    from oelm_ray.core.io import write_json

    sw = smoke_sweep(tmp_path, "same")
    write_json(sw.run_dir / "sweep.json", sw.identity())
    assert check_run_dir(sw) is True
    other = smoke_sweep(tmp_path, "same", common={"lr": 1e-3})
    with pytest.raises(ConfigError, match="exists with a different sweep config .*CPU-01-baseline-s0: lr"):
        check_run_dir(other)


def test_a_run_from_before_a_new_config_field_resumes_at_its_default(tmp_path):
    from oelm_ray.tune.sweep import check_run_dir
    from oelm_ray.core.io import write_json

    sw = smoke_sweep(tmp_path, "older")
    old = sw.identity()
    for t in old["trials"]:  # written before these fields existed
        del t["config"]["train"]["qk_update_every"], t["config"]["train"]["lr_layer_decay"]
    write_json(sw.run_dir / "sweep.json", old)
    assert check_run_dir(sw) is True
    with pytest.raises(ConfigError, match="CPU-01-baseline-s0: lr_layer_decay"):
        check_run_dir(smoke_sweep(tmp_path, "older", common={"lr_layer_decay": 0.5}))


def test_equal_values_are_one_sweep_however_spelled(tmp_path):
    """--set values are typed before they enter a trial's config: 0.005 and 5e-3 are one sweep."""
    from oelm_ray.core.io import write_json
    from oelm_ray.tune import recipe
    from oelm_ray.tune.sweep import check_run_dir

    import runpy

    presets = runpy.run_path(str(ROOT / "sweeps" / "phase3.py"))["PRESETS"]

    def build(*sets):
        args = recipe.parser("phase3", presets).parse_args(
            ["--smoke-test", "--no-wandb", "--storage", str(tmp_path), *[a for s in sets for a in ("--set", s)]])
        return recipe.build("phase3", presets, args)

    a, b = build("lr=0.005", "compile=off"), build("lr=5e-3", "compile=false")
    assert a.common["lr"] == 0.005 and isinstance(a.common["lr"], float)
    assert a.identity() == b.identity()
    write_json(a.run_dir / "sweep.json", a.identity())
    assert check_run_dir(b) is True  # resumes
    # the cpu preset's own lr, said explicitly, is the same sweep as saying nothing
    assert build("lr=1e-2").identity() == build().identity()
    with pytest.raises(ConfigError, match="CPU-01-baseline-s0: lr"):
        check_run_dir(build("lr=6e-3"))
    with pytest.raises(ConfigError, match="lr='fast' is not a valid float"):
        build("lr=fast")
    # a run written before one-config-per-trial (no format 2) is refused, untouched
    old = {"name": a.name, "experiments": [], "seeds": [0, 1], "common": {"lr": "0.005"}}
    write_json(a.run_dir / "sweep.json", old)
    with pytest.raises(ConfigError, match="started by an older oelm-ray .*format 1.*nothing was touched"):
        check_run_dir(a)
    assert json.loads((a.run_dir / "sweep.json").read_text()) == old


def test_trial_config_is_plain_data_read_back_whole(tmp_path):
    """What Tune carries is the driver's validated config: reading it back gives that config, search values in place."""
    from ray import tune
    from ray.tune.search.variant_generator import generate_variants

    from oelm_ray.tune.trial import trial_of

    sw = smoke_sweep(tmp_path, "plain", search={"lr": tune.grid_search([1e-3, 4e-3])})
    trials = sw.trials()
    assert [t.name for t in trials] == [e.trial_name(s) for e in E.EMBEDDED.values() for s in (0, 1)]
    seen = []
    for _, resolved in generate_variants(sw.param_space(trials)):
        t = trial_of(json.loads(json.dumps(resolved)))  # plain data: survives JSON
        seen.append((t.name, t.config.train.lr))
        want = next(x for x in trials if x.name == t.name).config.to_dict()
        want["train"]["lr"] = t.config.train.lr
        assert t.config.to_dict() == want and t.search == {"lr": t.config.train.lr}
    assert sorted(seen) == sorted((t.name, lr) for t in trials for lr in (1e-3, 4e-3))


def test_bad_trial_config_is_caught_before_ray(tmp_path):
    with pytest.raises(ConfigError, match="CPU-01-baseline-s0: lr=-1.0"):
        smoke_sweep(tmp_path, "bad", common={"lr": -1.0}).trials()
    with pytest.raises(ConfigError, match="seeds"):
        Sweep("bad", list(E.EMBEDDED.values()), ["a"], str(tmp_path)).trials()


def test_a_set_over_per_arm_values_is_said_in_the_sweeps_first_lines(tmp_path, monkeypatch, capsys):
    """--set lr / --max-steps on the paper rows: a warning per field, naming the arms and the values it replaces."""
    from helpers import phase3_presets as _phase3_presets
    from oelm_ray.tune import sweep as S

    def stop(address):
        raise ConfigError("stopped where Ray would start")

    monkeypatch.setattr(S, "connect", stop)
    argv = ["--preset", "paper", "--no-wandb", "--storage", str(tmp_path), "--set", "lr=2e-3", "weight_decay=0.1"]
    assert recipe.main("phase3", _phase3_presets(), argv + ["--max-steps", "5000"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.splitlines() == [
        "phase3-paper: warning: --set lr=0.002 replaces the per-arm lr of the experiments (GPT-01, GPT-04, "
        "GPT-06: 0.0003; GPT-02, GPT-03, GPT-05, GPT-07: 0.001): every trial runs at lr=0.002, not at its "
        "experiment's own value",
        "phase3-paper: warning: --set max_steps=5000 replaces the per-arm max_steps of the experiments (GPT-01, "
        "GPT-02, GPT-03: 100000; GPT-04, GPT-05: 150000; GPT-06, GPT-07: 200000): every trial runs at "
        "max_steps=5000, not at its experiment's own value",
        "phase3: error: stopped where Ray would start",
    ]
    # no per-arm field: no warning
    assert recipe.main("phase3", _phase3_presets(), argv[:-2] + ["weight_decay=0.1"]) == 2
    assert capsys.readouterr().err.splitlines() == ["phase3: error: stopped where Ray would start"]


def test_a_search_recipe_refuses_a_set_of_what_it_searches(tmp_path, capsys):
    import runpy

    lw = runpy.run_path(str(ROOT / "sweeps" / "lr_warmup.py"))
    for field in ("lr=1e-3", "warmup_steps=10"):
        assert lw["main"](["--smoke-test", "--no-wandb", "--storage", str(tmp_path), "--set", field]) == 2
        assert capsys.readouterr().err.strip() == \
            "lr_warmup: error: this recipe searches lr and warmup_steps for each arm: drop --set lr / --set " \
            "warmup_steps"
    assert not (tmp_path / "lr_warmup-smoke").exists()


def _recipe(tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "sweeps" / "phase3.py"), "--smoke-test", "--no-wandb",
            "--storage", str(tmp_path / "runs"), *extra]


@pytest.mark.slow
def test_interrupted_sweep_resumes_with_the_same_command(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = _recipe(tmp_path, "--seeds", "0,1,2", "--experiments", "CPU-01,CPU-02,CPU-03")  # 9 trials: some unfinished at the interrupt
    run_dir = tmp_path / "runs" / "phase3-smoke"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 240
    done_before: set[str] = set()
    while time.time() < deadline:
        recs = results.load_records(run_dir)
        done_before = {r["name"] for r in recs if r["status"] == "completed"}
        if len(done_before) >= 2:
            break
        time.sleep(0.5)
    assert len(done_before) >= 2, "the sweep never got going"
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
    first_out, _ = proc.communicate(timeout=120)
    unfinished = {r["name"] for r in results.load_records(run_dir) if r["status"] != "completed"}
    assert unfinished or len(results.load_records(run_dir)) < 9, first_out[-2000:]
    finished_files = state_files(run_dir, done_before)

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming" in second.stdout
    recs = results.load_records(run_dir)
    assert len(recs) == 9 and {r["status"] for r in recs} == {"completed"}
    # finished trials were not run again: their train.log, latest.pt, metrics.jsonl are untouched
    assert state_files(run_dir, done_before) == finished_files
    assert len(pd.read_parquet(run_dir / "trials.parquet")) == 9


def test_report_from_synthetic_records(tmp_path):
    run_dir = tmp_path / "synthetic"

    def rec(name, method, seed, ppls, params, status="completed", lr=1e-3, qk_std=0.02, isolates=""):
        hist = [
            {"step": 100 * (i + 1), "tokens": 1000 * (i + 1), "val/ppl": p, "val/loss": __import__("math").log(p),
             "step_time_s": 0.1, "tokens_per_s": 1e4, "wall_time_s": 10.0 * (i + 1), "trainable_params": params,
             "total_params": 1000, "val/tokens": 4096}
            for i, p in enumerate(ppls)
        ]
        return {"name": name, "experiment_id": name.split("-s")[0], "dataset": "stories", "method": method, "seed": seed,
                "config": {"train": {"lr": lr, "warmup_steps": 10, "max_steps": 100 * len(ppls), "eval_batches": 0},
                           "model": {"d_model": 64, "qk_random_std": qk_std}},
                "status": status, "history": hist, "isolates": isolates}

    for r in [
        rec("B-s0", "baseline", 0, [5.0, 4.0], 1000, lr=3e-4), rec("B-s1", "baseline", 1, [5.0, 4.4], 1000, lr=3e-4),
        rec("F-s0", "oelm_freeze", 0, [5.0, 4.1], 900), rec("F-s1", "oelm_freeze", 1, [5.0, 4.84], 900),
        rec("R-s0", "oelm_random", 0, [6.0, 5.0, float("inf")], 900, status="diverged"),
        # controls: a better baseline at the frozen arms' rate must not become the reference
        rec("L-s0", "baseline", 0, [5.0, 3.9], 1000, isolates="learning rate"),
        rec("S-s0", "oelm_random", 0, [5.0, 4.52], 900, qk_std=0.0, isolates="init scale"),
        # a trial stopped by the Q/K check: what it reported before is no valid result
        rec("Q-s0", "oelm_freeze", 0, [5.0, 3.0], 900, status="error") | {"qk_check": "Q/K check failed at step 300: x"},
    ]:
        results.write_record(run_dir, r)
    (run_dir / "sweep.json").write_text("{}")
    paths = results.write_report(run_dir)
    df = pd.read_parquet(paths[0]).set_index("name")
    assert df.loc["F-s0", "gap_vs_baseline_pct"] == pytest.approx(2.5)
    assert bool(df.loc["F-s0", "meets_criterion"]) is True
    assert df.loc["F-s1", "gap_vs_baseline_pct"] == pytest.approx(10.0)
    assert bool(df.loc["F-s1", "meets_criterion"]) is False
    assert df.loc["R-s0", "status"] == "diverged" and df.loc["R-s0", "best_val_ppl"] == 5.0
    assert df.loc["B-s0", "tokens_per_s"] == pytest.approx(2000 / 20.0)  # tokens / (0.1 s x 200 steps)
    assert df.loc["L-s0", "gap_vs_baseline_pct"] == pytest.approx(-2.5) and df.loc["L-s0", "role"] == "control"
    assert df.loc["L-s0", "gap_vs_freeze_pct"] == pytest.approx(100 * (3.9 / 4.1 - 1))
    assert df.loc["S-s0", "gap_vs_freeze_pct"] == pytest.approx(100 * (4.52 / 4.1 - 1))
    assert math.isnan(df.loc["F-s0", "gap_vs_freeze_pct"]) and df.loc["F-s0", "role"] == "protocol"
    # the config fields that differ between trials, with the scale-matched std resolved
    assert df.loc["B-s0", "lr"] == 3e-4 and df.loc["S-s0", "qk_random_std"] == 64**-0.5 and df.loc["S-s0", "d_model"] == 64
    assert df.loc["B-s0", "val_tokens"] == 4096
    assert math.isnan(df.loc["Q-s0", "best_val_ppl"]) and df.loc["Q-s0", "qk_check"].startswith("Q/K check failed")
    assert df.loc["F-s0", "qk_check"] == "-"  # records from before the check: unknown, not failed
    md = paths[1].read_text()
    assert "**Q-s0: no valid result.** Q/K check failed at step 300: x" in md
    assert "| stories | F | protocol | oelm_freeze | 2 | 4.470 ± 0.523 | +6.2% ± 5.3 | 1/2 | 900 |" in md
    assert "whole validation split (4,096 tokens)" in md
    assert "| stories | L | baseline | 0.001 | - | 3.900 ± 0.000 | -2.5% ± 0.0 | -4.9% ± 0.0 | learning rate |" in md
    assert "| stories | S | oelm_random | 0.001 | 0.125 | 4.520 ± 0.000 | +13.0% ± 0.0 | +10.2% ± 0.0 | init scale |" in md
    assert paths[2].stat().st_size > 1000
    status = results.status_table(run_dir, now=0)
    assert "F-s1" in status and "diverged" in status
    assert results.find_run(tmp_path, "synthetic") == run_dir


@pytest.mark.slow
def test_paper_recipe_smoke_on_cpu_through_gpt2_tokens(tmp_path, ray_local, gpt2_ranks, capsys):
    """`sweeps/phase3.py --preset paper --smoke-test --gpus-per-trial 0 --set dataset=stories`, in-process on
    the shared local Ray. The dataset override turns every paper experiment into a stories one (GPT-04..07
    too); `--experiments` keeps the TinyStories three, GPT-01..03, each with the paper's method and lr."""
    from helpers import phase3_presets as _phase3_presets

    argv = ["--preset", "paper", "--smoke-test", "--gpus-per-trial", "0", "--set", "dataset=stories",
            "--set", f"gpt2_ranks={gpt2_ranks}", "--experiments", "GPT-01,GPT-02,GPT-03", "--no-wandb",
            "--storage", str(tmp_path / "runs")]
    rc = recipe.main("phase3", _phase3_presets(), argv)
    assert rc == 0, capsys.readouterr().err[-3000:]
    run_dir = tmp_path / "runs" / "phase3-smoke"
    df = pd.read_parquet(run_dir / "trials.parquet").set_index("name")
    assert sorted(df.index) == ["GPT-01-baseline-s0", "GPT-02-oelm_freeze-s0", "GPT-03-oelm_random-s0"]
    assert set(df.status) == {"completed"} and (df.steps == E.SMOKE["max_steps"]).all()
    assert df.lr.to_dict() == {"GPT-01-baseline-s0": 3e-4, "GPT-02-oelm_freeze-s0": 1e-3, "GPT-03-oelm_random-s0": 1e-3}
    for name in df.index:
        cfg = results.read_record(results.record_path(run_dir, name))["config"]
        assert cfg["data"]["tokenizer"] == "gpt2" and cfg["data"]["dataset"] == "stories"
        assert cfg["model"]["vocab_size"] == 50257
        assert " on cpu;" in (run_dir / name / "state" / "train.log").read_text()
    # the tokens the trials trained on are GPT-2's (ids beyond the 257 bytes), prepared once
    (prepared,) = [p for p in (tmp_path / "runs" / "data").iterdir() if p.is_dir()]
    assert prepared.name.endswith("-gpt2")
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    assert np.fromfile(prepared / "train.bin", dtype=np.uint16).max() > 256
    # the frozen methods train fewer parameters than the baseline of the same (vocab 50257) model
    assert (df.total_params > 50257 * E.SMOKE["d_model"]).all()
    assert (df.trainable_params[["GPT-02-oelm_freeze-s0", "GPT-03-oelm_random-s0"]] < df.trainable_params["GPT-01-baseline-s0"]).all()


_GPU_NODE_PROBE = """
import json, os, ray
from oelm_ray.tune.trial import trial_device
ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")

def probe():
    ids, visible = ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")
    return {"ids": [str(i) for i in ids], "visible": visible, "device": trial_device("auto", ids, visible)}

one, zero = (ray.get(ray.remote(num_cpus=1, num_gpus=g)(probe).remote()) for g in (1, 0))
print(json.dumps({"one": one, "zero": zero}))
ray.shutdown()
"""


@pytest.mark.slow
def test_trial_device_on_a_node_with_logical_gpus(tmp_path):
    """On a Ray node that declares 2 (logical) GPUs: a 1-GPU task sees its GPU as CUDA_VISIBLE_DEVICES and
    trains on cuda; a 0-GPU task on the same node trains on CPU. Its own Ray, in a subprocess."""
    ray_tmp = tempfile.mkdtemp(prefix="rg", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    try:
        r = subprocess.run([sys.executable, "-c", _GPU_NODE_PROBE], env={**os.environ, "RAY_TMPDIR": ray_tmp},
                           capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["one"]["ids"]) == 1 and out["one"]["visible"] == out["one"]["ids"][0], out
    assert out["one"]["device"] == "cuda"
    assert out["zero"]["ids"] == [] and out["zero"]["device"] == "cpu", out
