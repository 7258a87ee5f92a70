"""The trial's state across retries: what a restore brings back, what Tune gets a checkpoint for."""

from __future__ import annotations

from oelm_ray.core.checkpoint import load_checkpoint, save_checkpoint


def test_retried_trial_drops_the_temp_file_of_a_killed_checkpoint_write(tmp_path, monkeypatch):
    """A trial killed inside a checkpoint write leaves `.latest.pt.*.tmp` in its working folder; the
    retry must not carry that (possibly GBs) into every later checkpoint."""
    from ray import tune

    from oelm_ray.tune import trial

    ck = tmp_path / "checkpoint_000001"
    save_checkpoint(ck / "latest.pt", {"format": 1, "config": {}, "model": {}, "step": 10})
    (ck / "train.log").write_text("step 10\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".latest.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    (out / "latest.pt").write_bytes(b"newer, never registered")
    monkeypatch.setattr(tune, "get_checkpoint", lambda: tune.Checkpoint.from_directory(str(ck)))
    # state carried inside Tune's checkpoints (object storage): the checkpoint is the truth
    assert trial._restore_into(out, in_storage=False) == (True, 0)
    assert sorted(p.name for p in out.iterdir()) == ["latest.pt", "train.log"]
    assert load_checkpoint(out / "latest.pt")["step"] == 10
    # state in the run folder (filesystem storage): the newest latest.pt there wins over an older
    # checkpoint that a stale experiment state names
    save_checkpoint(out / "latest.pt", {"format": 1, "config": {}, "model": {}, "step": 20})
    (out / ".latest.pt.zz.tmp").write_bytes(b"torn")
    assert trial._restore_into(out, in_storage=True) == (True, 0)
    assert sorted(p.name for p in out.iterdir()) == ["latest.pt", "train.log"]
    assert load_checkpoint(out / "latest.pt")["step"] == 20


def test_trial_checkpoints_only_where_latest_was_written_and_replays_up_to_it():
    """checkpoint_interval 20, evaluations every 10: Tune gets a checkpoint with the reports at 20
    and 40 only; a restore replays the rows Tune missed up to the resume point (latest.pt at 20),
    and leaves step 30 to the trainer, which redoes and reports it."""
    from oelm_ray.tune import trial

    t = _train_config(checkpoint_interval=20).train
    assert [s for s in (10, 20, 30, 40) if trial.wrote_latest(t, {"step": s})] == [20, 40]
    assert not trial.wrote_latest(t, {"step": 40, "diverged": 1})
    rows = [{"step": s} for s in (10, 20, 30)]
    assert [r["step"] for r in trial.replayed(rows, 0, t)] == [10, 20]
    assert trial.replayed(rows, 20, t) == []
    every = _train_config().train  # checkpoint_interval 0: every evaluation, as before
    assert [r["step"] for r in trial.replayed(rows, 10, every)] == [20, 30]


def _train_config(**kw):
    from oelm_ray.core.config import make_config

    return make_config("cpu", max_steps=40, eval_interval=10, warmup_steps=2, **kw)
