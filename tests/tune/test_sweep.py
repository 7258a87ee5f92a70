"""The sweep runner on local Ray: smoke matrix, resume, crash recovery, fail-fast checks."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from oelm_ray import results
from oelm_ray.core import experiments as E
from oelm_ray.core.config import ConfigError
from oelm_ray.tune import recipe
from oelm_ray.tune.resources import resources
from oelm_ray.tune.sweep import Sweep
from oelm_ray.tune.trial import trial_device

from helpers import smoke_sweep

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_runs_never_fall_back_to_cpu_silently(tmp_path, ray_local):
    """--preset paper (require_gpus) on a GPU-less Ray is refused unless 0 GPUs were asked for explicitly.
    (The full command, one line / exit 2 / nothing prepared, is a case in test_bad_input's BAD_INPUT.)"""
    assert ray_local.cluster_resources().get("GPU", 0) == 0
    with pytest.raises(ConfigError, match="--preset paper .* has none: .*--gpus-per-trial 0"):
        resources(smoke_sweep(tmp_path, "paper", require_gpus=True))
    assert resources(smoke_sweep(tmp_path, "paper", require_gpus=True, gpus_per_trial=0)) == {"cpu": 1.0, "gpu": 0.0}
    assert resources(smoke_sweep(tmp_path, "embedded")) == {"cpu": 1.0, "gpu": 0.0}  # the CPU default stays CPU
    args = recipe.parser("phase3", {"paper": {}, "embedded": {}}).parse_args
    assert recipe.build(
        "phase3",
        {"paper": {"experiments": ["GPT-01"], "seeds": [0]}},
        args(["--preset", "paper", "--no-wandb", "--storage", str(tmp_path)]),
    ).require_gpus
    assert not recipe.build(
        "phase3",
        {"embedded": {"experiments": ["CPU-01"], "seeds": [0]}},
        args(["--no-wandb", "--storage", str(tmp_path)]),
    ).require_gpus


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
    from oelm_ray.core.io import write_json
    from oelm_ray.tune.sweep import check_run_dir

    sw = smoke_sweep(tmp_path, "same")
    write_json(sw.run_dir / "sweep.json", sw.identity())
    assert check_run_dir(sw) is True
    other = smoke_sweep(tmp_path, "same", common={"lr": 1e-3})
    with pytest.raises(ConfigError, match="exists with a different sweep config .*CPU-01-baseline-s0: lr"):
        check_run_dir(other)


def test_a_run_from_before_a_new_config_field_resumes_at_its_default(tmp_path):
    from oelm_ray.core.io import write_json
    from oelm_ray.tune.sweep import check_run_dir

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
    import runpy

    from oelm_ray.core.io import write_json
    from oelm_ray.tune import recipe
    from oelm_ray.tune.sweep import check_run_dir

    presets = runpy.run_path(str(ROOT / "sweeps" / "phase3.py"))["PRESETS"]

    def build(*sets):
        args = recipe.parser("phase3", presets).parse_args(
            ["--smoke-test", "--no-wandb", "--storage", str(tmp_path), *[a for s in sets for a in ("--set", s)]]
        )
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
    from oelm_ray.tune import sweep as S

    from helpers import phase3_presets as _phase3_presets

    def stop(*_):
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
        assert (
            capsys.readouterr().err.strip()
            == "lr_warmup: error: this recipe searches lr and warmup_steps for each arm: drop --set lr / --set "
            "warmup_steps"
        )
    assert not (tmp_path / "lr_warmup-smoke").exists()


def test_report_from_synthetic_records(tmp_path):
    run_dir = tmp_path / "synthetic"

    def rec(name, method, seed, ppls, params, status="completed", lr=1e-3, qk_std=0.02, isolates=""):
        hist = [
            {
                "step": 100 * (i + 1),
                "tokens": 1000 * (i + 1),
                "val/ppl": p,
                "val/loss": __import__("math").log(p),
                "step_time_s": 0.1,
                "tokens_per_s": 1e4,
                "wall_time_s": 10.0 * (i + 1),
                "trainable_params": params,
                "total_params": 1000,
                "val/tokens": 4096,
            }
            for i, p in enumerate(ppls)
        ]
        return {
            "name": name,
            "experiment_id": name.split("-s")[0],
            "dataset": "stories",
            "method": method,
            "seed": seed,
            "config": {
                "train": {"lr": lr, "warmup_steps": 10, "max_steps": 100 * len(ppls), "eval_batches": 0},
                "model": {"d_model": 64, "qk_random_std": qk_std},
            },
            "status": status,
            "history": hist,
            "isolates": isolates,
        }

    for r in [
        rec("B-s0", "baseline", 0, [5.0, 4.0], 1000, lr=3e-4),
        rec("B-s1", "baseline", 1, [5.0, 4.4], 1000, lr=3e-4),
        rec("F-s0", "oelm_freeze", 0, [5.0, 4.1], 900),
        rec("F-s1", "oelm_freeze", 1, [5.0, 4.84], 900),
        rec("R-s0", "oelm_random", 0, [6.0, 5.0, float("inf")], 900, status="diverged"),
        # controls: a better baseline at the frozen arms' rate must not become the reference
        rec("L-s0", "baseline", 0, [5.0, 3.9], 1000, isolates="learning rate"),
        rec("S-s0", "oelm_random", 0, [5.0, 4.52], 900, qk_std=0.0, isolates="init scale"),
        # a trial stopped by the Q/K check: what it reported before is no valid result
        rec("Q-s0", "oelm_freeze", 0, [5.0, 3.0], 900, status="error")
        | {"qk_check": "Q/K check failed at step 300: x"},
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
    assert (
        df.loc["B-s0", "lr"] == 3e-4 and df.loc["S-s0", "qk_random_std"] == 64**-0.5 and df.loc["S-s0", "d_model"] == 64
    )
    assert df.loc["B-s0", "val_tokens"] == 4096
    assert math.isnan(df.loc["Q-s0", "best_val_ppl"]) and df.loc["Q-s0", "qk_check"].startswith("Q/K check failed")
    assert df.loc["F-s0", "qk_check"] == "-"  # records from before the check: unknown, not failed
    md = paths[1].read_text()
    assert "**Q-s0: no valid result.** Q/K check failed at step 300: x" in md
    assert "| stories | F | protocol | oelm_freeze | 2 | 4.470 ± 0.523 | +6.2% ± 5.3 | 1/2 | 900 |" in md
    assert "whole validation split (4,096 tokens)" in md
    assert "| stories | L | baseline | 0.001 | - | 3.900 ± 0.000 | -2.5% ± 0.0 | -4.9% ± 0.0 | learning rate |" in md
    assert (
        "| stories | S | oelm_random | 0.001 | 0.125 | 4.520 ± 0.000 | +13.0% ± 0.0 | +10.2% ± 0.0 | init scale |" in md
    )
    assert paths[2].stat().st_size > 1000
    status = results.status_table(run_dir, now=0)
    assert "F-s1" in status and "diverged" in status
    assert results.find_run(tmp_path, "synthetic") == run_dir


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
        r = subprocess.run(
            [sys.executable, "-c", _GPU_NODE_PROBE],
            env={**os.environ, "RAY_TMPDIR": ray_tmp},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["one"]["ids"]) == 1 and out["one"]["visible"] == out["one"]["ids"][0], out
    assert out["one"]["device"] == "cuda"
    assert out["zero"]["ids"] == [] and out["zero"]["device"] == "cpu", out
