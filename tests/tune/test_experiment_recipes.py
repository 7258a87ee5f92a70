"""The research's next experiments as configuration: the scaling recipe, the partial-unfreezing arms and controls."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pandas as pd
import pytest

from oelm_ray import results

ROOT = Path(__file__).resolve().parents[2]


def _recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "sweeps" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------
# sweeps/scaling.py: the freeze gap against model size


def test_scaling_budgets_are_equal_tokens_per_parameter():
    import torch

    from oelm_ray.core.model import GPT

    sc = _recipe("scaling")
    for preset in ("embedded", "paper"):
        exps = sc.PRESETS[preset]["experiments"]
        assert len(exps) == 9 and {e.id[-1] for e in exps} == {"B", "F", "R"}
        ratios = []
        for e in exps:
            c = e.config(0)
            with torch.device("meta"):
                n = GPT(c.model).param_counts()["total"]
            ratios.append(c.train.max_steps * c.train.batch_size * c.model.block_size / n)
        assert max(ratios) / min(ratios) < 1.01  # one budget in tokens per parameter at every size
        sizes = {e.config(0).model.d_model for e in exps}
        assert len(sizes) == 3
    paper = {e.id: e.config(0) for e in sc.PRESETS["paper"]["experiments"]}
    assert paper["SC-medium-512-B"].train.max_steps == 100_000 and paper["SC-medium-512-F"].train.lr == 1e-3
    assert paper["SC-large-768-R"].model.qk_random_std == 0.0 and paper["SC-large-768-R"].model.n_layer == 12


def test_scaling_report_pairs_gaps_within_a_size_and_plots_them(tmp_path):
    run_dir = tmp_path / "scaling"

    def rec(name, method, seed, d, ppl, params, isolates=""):
        return {
            "name": name,
            "experiment_id": name.rsplit("-s", 1)[0],
            "dataset": "stories",
            "method": method,
            "seed": seed,
            "isolates": isolates,
            "status": "completed",
            "config": {"train": {"max_steps": 100, "lr": 1e-2}, "model": {"d_model": d, "n_layer": 2, "d_ff": 4 * d}},
            "history": [
                {
                    "step": 100,
                    "tokens": 1000,
                    "val/ppl": ppl,
                    "val/loss": math.log(ppl),
                    "total_params": params,
                    "trainable_params": params - (0 if method == "baseline" else d * d),
                    "val/tokens": 100,
                }
            ],
        }

    for seed, k in ((0, 1.0), (1, 1.1)):
        for d, base, params in ((32, 8.0, 40_000), (64, 5.0, 124_000)):
            results.write_record(run_dir, rec(f"SC-d{d}-B-s{seed}", "baseline", seed, d, base * k, params))
            results.write_record(
                run_dir, rec(f"SC-d{d}-F-s{seed}", "oelm_freeze", seed, d, base * k * (1.2 if d == 32 else 1.1), params)
            )
            results.write_record(
                run_dir, rec(f"SC-d{d}-R-s{seed}", "oelm_random", seed, d, base * k * 1.5, params, "init scale")
            )
    (run_dir / "sweep.json").write_text("{}")
    paths = results.write_report(run_dir)
    df = pd.read_parquet(paths[0]).set_index("name")
    # each size's frozen arm against its own size's baseline, not the other one's
    assert df.loc["SC-d32-F-s0", "gap_vs_baseline_pct"] == pytest.approx(20.0)
    assert df.loc["SC-d64-F-s1", "gap_vs_baseline_pct"] == pytest.approx(10.0)
    md = paths[1].read_text()
    assert "| stories | SC-d32-F | oelm_freeze | - | - | - | 38,976 | 1,024 (2.6%) | 100% |" in md  # vs its own size
    assert "| stories | 2x32x128 | 40,000 | 8.400 | +20.0% ± 0.0 | +50.0% ± 0.0 |" in md
    assert "| stories | 2x64x256 | 124,000 | 5.250 | +10.0% ± 0.0 | +50.0% ± 0.0 |" in md
    from PIL import Image

    with Image.open(paths[2]) as im:  # the gap panel beside the dataset's curves: two panels wide
        assert im.size[0] > 1.8 * im.size[1]


def test_partial_unfreeze_arms_and_their_controls():
    pu = _recipe("partial_unfreeze")
    exps = {e.id: e for e in pu.PRESETS["embedded"]["experiments"]}
    every, lrd = exps["PU-every10"].config(0), exps["PU-lrd0.5"].config(0)
    assert every.train.qk_update_every == 10 and every.model.method == "oelm_freeze"
    assert lrd.train.lr_layer_decay == 0.5 and lrd.train.qk_unfreeze_step == 1
    for cid, method, std in (
        ("PU-rand-unf0.25", "oelm_random", 0.0),
        ("PU-rand-mult0.1", "oelm_random", 0.0),
        ("PU-orth-train", "oelm_freeze", 0.02),
        ("PU-rand-train", "oelm_random", 0.0),
    ):
        e = exps[cid]
        assert e.role == "control" and e.isolates and e.config(0).model.method == method
        assert e.config(0).model.qk_random_std == std
    # each random control repeats its orthogonal arm's schedule exactly
    a, b = exps["PU-unf0.25"].config(0).train, exps["PU-rand-unf0.25"].config(0).train
    assert (a.qk_unfreeze_step, a.qk_lr_mult) == (b.qk_unfreeze_step, b.qk_lr_mult)
    assert len(exps) * len(pu.PRESETS["embedded"]["seeds"]) == 26  # the embedded default's trials
