"""Config: presets, dict round-trip, and one clear error per bad value."""

import pytest

from oelm_ray.core import config as C


@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_presets_validate_and_round_trip(name):
    cfg = C.preset(name).validate()
    assert C.Config.from_dict(cfg.to_dict()) == cfg


def test_medium_512_is_the_research_model():
    m = C.preset("medium-512").model
    assert (m.d_model, m.n_layer, m.n_head, m.d_ff, m.block_size, m.vocab_size) == (512, 6, 8, 2048, 512, 50257)
    assert C.preset("medium-512").train.batch_size == 8


def test_flat_overrides_coerce_cli_strings():
    cfg = C.make_config("cpu", lr="1e-3", max_steps="50", warmup_steps="5", eval_interval="10", method="oelm_freeze", compile="false")
    assert cfg.train.lr == 1e-3 and cfg.train.max_steps == 50 and cfg.model.method == "oelm_freeze"
    assert cfg.train.compile == "off"  # the legacy bool spelling still works


def test_every_field_has_a_docstring():
    for cls in C.section_classes().values():
        docs = C.field_docs(cls)
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
    with pytest.raises(C.ConfigError, match="preset='gpu' is unknown: choose one of cpu, small-256, medium-512, large-768"):
        C.preset("gpu")


def test_eval_batches_zero_means_whole_split_and_negative_is_refused():
    assert C.make_config("cpu", eval_batches=0).train.eval_batches == 0
    with pytest.raises(C.ConfigError, match=r"eval_batches=-1 must be a whole number >= 0 \(0 = the whole validation split\)"):
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
