"""Config: presets, dict round-trip, and one clear error per bad value."""

from pathlib import Path

import pytest

from oelm_ray.core import config as C
from oelm_ray.core import options as O

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_presets_validate_and_round_trip(name):
    cfg = C.preset(name).validate()
    assert C.Config.from_dict(cfg.to_dict()) == cfg


def test_medium_512_is_the_research_model():
    m = C.preset("medium-512").model
    assert (m.d_model, m.n_layer, m.n_head, m.d_ff, m.block_size, m.vocab_size) == (512, 6, 8, 2048, 512, 50257)
    assert C.preset("medium-512").train.batch_size == 8


def test_flat_overrides_coerce_cli_strings():
    cfg = C.make_config(
        "cpu", lr="1e-3", max_steps="50", warmup_steps="5", eval_interval="10", method="oelm_freeze", compile="false"
    )
    assert cfg.train.lr == 1e-3 and cfg.train.max_steps == 50 and cfg.model.method == "oelm_freeze"
    assert cfg.train.compile == "off"  # the legacy bool spelling still works


def test_every_field_has_a_docstring():
    for cls in C.section_classes().values():
        docs = O.field_docs(cls)
        missing = [f for f in cls.__dataclass_fields__ if not docs.get(f)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


BAD = [
    (dict(d_model=130, n_head=4), "d_model=130 is not divisible by n_head=4"),
    (dict(lr=0), "lr=0"),
    (dict(lr=-1e-3), "lr=-0.001"),
    (dict(warmup_steps=1000, max_steps=1000), "warmup_steps=1000 must be >= 0 and smaller than max_steps=1000"),
    (dict(method="oelm"), "method='oelm' is unknown: choose one of baseline, oelm_freeze, oelm_random"),
    (dict(dataset="imagenet"), "dataset='imagenet' is unknown"),
    (dict(tokenizer="sentencepiece"), "tokenizer='sentencepiece' is unknown"),
    (dict(eval_interval=5000), "eval_interval=5000 is larger than max_steps=500"),
    (dict(eval_batch_size=-1), "eval_batch_size=-1 must be a whole number >= 0 (0 = batch_size)"),
    (dict(checkpoint_interval=-5), "checkpoint_interval=-5 must be a whole number >= 0 (0 = every evaluation)"),
    (dict(seed="abc"), "seed='abc' is not a valid int"),
    (dict(seed=1.5), "seed=1.5 is not a valid int"),
    (dict(max_steps=0), "max_steps=0 must be a whole number > 0"),
    (dict(dropout=1.0), "dropout=1.0 must be in [0, 1)"),
    (dict(vocab_size=100), "vocab_size=100 is smaller than the bytes tokenizer's vocabulary (257)"),
    (dict(qk_unfreeze_step=10), "method=baseline with qk_freeze_layers=-1 freezes no Q/K"),
    (dict(method="oelm_freeze", qk_freeze_layers=9), "qk_freeze_layers=9 must be -1 (all) or between 0 and n_layer=2"),
    (dict(qk_lr_mult=0), "qk_lr_mult=0"),
    (dict(device="tpu"), "device='tpu' is unknown"),
    (dict(no_such_field=1), "unknown config field 'no_such_field'"),
]


def test_checkpoint_interval_rounds_up_to_whole_eval_intervals():
    every = C.make_config("cpu").train  # 0: every evaluation (100 steps), and the last step
    assert every.checkpoint_every == 100 and all(every.checkpoints_at(s) for s in (100, 200, 500))
    t = C.make_config("cpu", checkpoint_interval=250).train  # rounded up to 300
    assert t.checkpoint_every == 300 and [s for s in range(100, 501, 100) if t.checkpoints_at(s)] == [300, 500]
    med = C.make_config("medium-512").train
    assert (med.eval_batch, med.checkpoint_every, C.make_config("cpu").train.eval_batch) == (32, 5000, 16)


@pytest.mark.parametrize("overrides,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_values_give_one_clear_error(overrides, message):
    with pytest.raises(C.ConfigError) as e:
        C.make_config("cpu", **overrides)
    assert message in str(e.value)


def test_unknown_preset():
    with pytest.raises(
        C.ConfigError, match="preset='gpu' is unknown: choose one of cpu, small-256, medium-512, large-768"
    ):
        C.preset("gpu")


def test_eval_batches_zero_means_whole_split_and_negative_is_refused():
    assert C.make_config("cpu", eval_batches=0).train.eval_batches == 0
    with pytest.raises(
        C.ConfigError, match=r"eval_batches=-1 must be a whole number >= 0 \(0 = the whole validation split\)"
    ):
        C.make_config("cpu", eval_batches=-1)


def test_paper_preset_scores_the_whole_validation_split():
    assert C.preset("medium-512").train.eval_batches == 0


def test_controls_differ_from_a_protocol_arm_in_exactly_what_they_isolate():
    from oelm_ray.core import experiments as E

    def diff(a, b):
        fa, fb = (a.config(0).to_dict(), b.config(0).to_dict())
        return {k for sec in fa for k in fa[sec] if fa[sec][k] != fb[sec][k]}

    for ds in ("tinystories", "openwebtext", "wikitext103"):
        proto = {e.method: e for e in E.PAPER.values() if e.dataset == ds}
        ctl = {e.method: e for e in E.CONTROLS.values() if e.dataset == ds}
        assert set(ctl) == {"baseline", "oelm_random"} and all(e.role == "control" for e in ctl.values())
        assert diff(ctl["baseline"], proto["baseline"]) == {"lr"}
        assert ctl["baseline"].config(0).train.lr == proto["oelm_freeze"].config(0).train.lr
        assert diff(ctl["oelm_random"], proto["oelm_freeze"]) == {"method", "qk_random_std"}
        assert ctl["oelm_random"].config(0).model.qk_std == 512**-0.5
    assert all(e.role == "protocol" for e in E.PAPER.values())
    cpu_ctl = [e for e in E.EMBEDDED.values() if e.role == "control"]
    assert [e.config(0).model.qk_std for e in cpu_ctl] == [64**-0.5]


# ------------------------------------------------------------------------------------------------
# one spelling (--set FIELD=VALUE), one coercion, one precedence


def test_a_value_is_the_same_however_it_arrives():
    """--set strings, Python values (an experiment) and the JSON floats Ray hands a trial: one Config."""
    import json

    from oelm_ray.core.experiments import Experiment

    cli = C.make_config("cpu", O.parse_sets(["lr=5e-3", "max_steps=300", "method=oelm_freeze", "compile=false"]))
    py = C.make_config("cpu", {"lr": 0.005, "max_steps": 300, "method": "oelm_freeze", "compile": "off"})
    ray = C.Config.from_dict(
        json.loads(
            json.dumps(
                {
                    "train": {**py.to_dict()["train"], "max_steps": 300.0},
                    "model": py.to_dict()["model"],
                    "data": py.to_dict()["data"],
                }
            )
        )
    )
    exp = Experiment("X", "cpu", {"lr": "0.005", "method": "oelm_freeze"}).config(
        0, {"max_steps": "300", "compile": "off"}
    )
    assert cli == py == ray == exp
    assert type(cli.train.max_steps) is int and type(ray.train.max_steps) is int and type(exp.train.lr) is float


def test_precedence_preset_experiment_set_search_seed():
    from oelm_ray.core.experiments import Experiment

    exp = Experiment("X", "cpu", {"lr": 1e-3, "warmup_steps": 10, "max_steps": 300, "seed": 5})
    assert C.preset("cpu").train.lr == 1e-2
    t = exp.config(7).train  # the experiment over the preset, the seed axis over everything
    assert (t.lr, t.warmup_steps, t.max_steps, t.seed) == (1e-3, 10, 300, 7)
    t = exp.config(7, {"lr": 2e-3, "max_steps": 400}).train  # --set over the experiment
    assert (t.lr, t.warmup_steps, t.max_steps) == (2e-3, 10, 400)
    t = exp.config(7, {"lr": 2e-3}, {"lr": 4e-3, "warmup_steps": 20}).train  # a search over --set
    assert (t.lr, t.warmup_steps, t.seed) == (4e-3, 20, 7)
    assert exp.config(7, {"seed": 1}, {"seed": 2}).train.seed == 7


def test_the_precedence_is_written_once_and_shown_by_help(capsys):
    import inspect

    from oelm_ray import cli

    doc = inspect.getdoc(C.make_config)
    layers = [line.split()[1] for line in C.precedence().splitlines() if line.split()[0].endswith(".")]
    assert layers == ["preset", "experiment", "--set", "search", "seed"]
    assert C.precedence() in doc
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert C.precedence() in out  # verbatim: its line breaks kept
    for sec in ("model", "data", "train"):  # every field, with its docstring
        for f in C.section_classes()[sec].__dataclass_fields__:
            assert f"\n  {f} (" in out


SET_ERRORS = [
    (["lr"], "--set 'lr' must look like FIELD=VALUE, e.g. --set lr=1e-3"),
    (["=1"], "--set '=1' must look like FIELD=VALUE"),
    (["lr=1e-3", "lr=2e-3"], "--set lr= is given twice ('1e-3' and '2e-3'): keep one"),
    (["learning_rate=1e-3"], "unknown config field 'learning_rate'; see `oelm-ray train --help` for the fields"),
    (["max_step=10"], "unknown config field 'max_step' (did you mean max_steps?)"),
    (["max_steps=1e3"], "max_steps='1e3' is not a valid int: give a whole number, e.g. max_steps=1000"),
    (["lr=fast"], "lr='fast' is not a valid float: give a number, e.g. lr=0.002"),
]


@pytest.mark.parametrize("items,message", SET_ERRORS, ids=[m[:30] for _, m in SET_ERRORS])
def test_a_bad_set_is_one_error_naming_the_field_and_its_type(items, message):
    with pytest.raises(C.ConfigError) as e:
        O.parse_sets(items)
    assert message in str(e.value)


def test_aliases_are_set_and_conflict_with_it():
    import argparse

    ap = argparse.ArgumentParser()
    O.add_set_arguments(ap)
    assert O.parse_sets(ap.parse_args(["--max-steps", "20", "--set", "lr=1e-3", "d-model=32"])) == {
        "lr": 1e-3,
        "d_model": 32,
        "max_steps": 20,
    }
    with pytest.raises(C.ConfigError, match="--max-steps 20 and --set max_steps=30 set the same field: keep one"):
        O.parse_sets(ap.parse_args(["--max-steps", "20", "--set", "max_steps=30"]))
    with pytest.raises(C.ConfigError, match="lr: not a data field; this command reads only those"):
        O.parse_sets(["lr=1e-3"], sections=("data",))


def test_a_field_spelled_as_a_flag_is_told_the_spelling(capsys):
    from oelm_ray import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--out-dir", "x", "--lr", "1e-3"])
    assert e.value.code == 2
    assert (
        capsys.readouterr().err.splitlines()[-1]
        == "oelm-ray: error: --lr is not a flag: set config fields with --set, e.g. --set lr=VALUE"
    )


def test_per_arm_fields_come_from_the_experiments():
    from oelm_ray.core import experiments as E

    paper = list(E.PAPER.values())
    per_arm = {k for e in paper for k in e.overrides}  # what the paper rows set, not a hand-written list
    assert {"lr", "max_steps", "method", "dataset"} <= per_arm
    lines = E.per_arm(paper, {"lr": 2e-3, "weight_decay": 0.1})
    assert lines == [
        "--set lr=0.002 replaces the per-arm lr of the experiments (GPT-01, GPT-04, GPT-06: 0.0003; "
        "GPT-02, GPT-03, GPT-05, GPT-07: 0.001): every trial runs at lr=0.002, not at its experiment's "
        "own value"
    ]
    (steps,) = E.per_arm(paper, {"max_steps": 100_000})  # arms already at that value are not replaced
    assert "(GPT-04, GPT-05: 150000; GPT-06, GPT-07: 200000)" in steps and "GPT-01" not in steps
    assert E.per_arm(paper[:3], {"max_steps": 100_000}) == []
    assert E.per_arm(list(E.EMBEDDED.values()), {"lr": 1e-3}) == []  # the embedded arms share the preset's lr


def test_help_keeps_the_docstrings_line_breaks(capsys):
    import runpy

    from oelm_ray import cli
    from oelm_ray.tune import recipe

    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(line in out.splitlines() for line in cli.__doc__.strip().splitlines())
    for cmd in ("prepare", "train", "status", "report", "sync", "check-cluster", "selftest", "doctor"):
        with pytest.raises(SystemExit):
            cli.main([cmd, "--help"])
        assert capsys.readouterr().out.startswith("usage: ")
    for name in ("phase3", "lr_warmup", "partial_unfreeze", "scaling"):
        mod = runpy.run_path(str(ROOT / "sweeps" / f"{name}.py"))
        text = recipe.parser(name, mod["PRESETS"], mod["__doc__"]).format_help()
        lines = text.splitlines()
        missing = [line for line in mod["__doc__"].strip().splitlines() if line.rstrip() not in lines]
        assert not missing, f"sweeps/{name}.py --help reflowed {missing[:2]}"
        assert C.precedence() in text
