"""Corpora prepared on the cluster while trials train: a ready corpus's trials do not wait for another one, and a
corpus that fails to prepare ends only its own trials."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from filelock import FileLock

from oelm_ray import results
from oelm_ray.core import experiments as E
from oelm_ray.core.config import DataConfig
from oelm_ray.core.corpora import DataError
from oelm_ray.core.experiments import Experiment
from oelm_ray.core.prepared import prepared_dir
from oelm_ray.tune.preparing import Corpora, failure_path
from oelm_ray.tune.sweep import Sweep, run


def _sweep(tmp: Path, name: str, datasets: dict[str, str], **kw) -> Sweep:
    """One smoke trial (seed 0) per corpus, in the order given: experiment id -> dataset."""
    exps = [Experiment(eid, "cpu", {"dataset": ds}) for eid, ds in datasets.items()]
    return Sweep(name, exps, [0], str(tmp / "runs"), common={**E.SMOKE, "data_dir": str(tmp / "data")}, **kw)


def _stories_file(path: Path, n: int = 300) -> Path:
    path.write_text(
        "\n\n".join(f"Story {i}: the cat sat on the mat, then the dog ran to the park. " * 3 for i in range(n)) + "\n"
    )
    return path


def _record(sweep: Sweep, trial: str) -> dict | None:
    return results.read_record(results.record_path(sweep.run_dir, trial))


@pytest.mark.slow
def test_a_ready_corpus_trains_while_another_is_still_being_prepared(tmp_path, ray_local, capsys):
    """The slow corpus's trial comes first in the sweep; its corpus is held by "another process" (the test holds
    its build lock) until the stories trial has written metrics rows. Meanwhile the slow trial never starts (it
    holds no CPU), and afterwards its corpus is prepared and it trains to the end."""
    sweep = _sweep(tmp_path, "gated", {"SLOW-01": str(_stories_file(tmp_path / "slow.txt")), "FAST-01": "stories"})
    slow_trial, fast_trial = [t.name for t in sweep.trials()]
    slow = prepared_dir(sweep.trials()[0].config.data)
    slow.parent.mkdir(parents=True)
    held, seen = threading.Event(), {}

    def another_process_prepares_it():
        with FileLock(str(slow) + ".lock"):
            held.set()
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and not (_record(sweep, fast_trial) or {}).get("history"):
                time.sleep(0.2)
            seen.update(fast=_record(sweep, fast_trial), slow=_record(sweep, slow_trial), prepared=slow.exists())

    holder = threading.Thread(target=another_process_prepares_it, daemon=True)
    holder.start()
    assert held.wait(30)
    run(sweep, report=False)
    holder.join(10)
    out = capsys.readouterr().out

    assert seen["fast"] and seen["fast"]["history"], "the stories trial never reported while the slow corpus waited"
    assert not seen["prepared"] and seen["slow"] is None  # not prepared yet, and its trial not even started
    for name in (slow_trial, fast_trial):
        rec = _record(sweep, name)
        assert rec["status"] == "completed" and rec["history"][-1]["step"] == E.SMOKE["max_steps"], name
    # the prepare task's lines reach the driver's console: it waited for the lock, then built the corpus
    assert f"data: prepare {slow.name}: another process is preparing it" in out
    assert out.index("data: stories (bytes) ready:") < out.index(f"data: {tmp_path / 'slow.txt'} (bytes) ready:")


@pytest.mark.slow
def test_a_corpus_that_fails_to_prepare_ends_only_its_own_trials(tmp_path, ray_local, capsys):
    """A .jsonl whose third line is not JSON: its trial ends in error with that line's message (also in its
    train.log), the stories trial completes and the report is written; fixed, the same command prepares it
    and the errored trial trains."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one story"}\n{"text": "two stories"}\nnot json\n')
    sweep = _sweep(tmp_path, "failing", {"BAD-01": str(bad), "FAST-01": "stories"}, max_failures=1)
    bad_trial, fast_trial = [t.name for t in sweep.trials()]
    run(sweep)
    out = capsys.readouterr().out

    rec = _record(sweep, bad_trial)
    assert rec["status"] == "error" and not rec["history"]
    assert _record(sweep, fast_trial)["status"] == "completed"
    why = f'{bad}:3: expected a JSON object with a "text" field'
    assert why in json.loads(failure_path(sweep.trials()[0].config.data).read_text())["error"]
    assert f"could not be prepared: {why}" in (sweep.run_dir / bad_trial / "state" / "train.log").read_text()
    assert "failed: " + why in out and "Its trials end with this error" in out
    assert "error" in (sweep.run_dir / "summary.md").read_text()

    bad.write_text("".join(json.dumps({"text": f"story {i}: the cat sat on the mat. " * 4}) + "\n" for i in range(200)))
    run(sweep, report=False)
    assert _record(sweep, bad_trial)["status"] == "completed"
    assert not failure_path(sweep.trials()[0].config.data).exists()


def test_a_missing_corpus_file_fails_before_anything_is_prepared(tmp_path):
    """Bad input stays a one-line error before any trial (no Ray task is started: no Ray here)."""
    missing = DataConfig(dataset=str(tmp_path / "nope.txt"), data_dir=str(tmp_path / "data"))
    with pytest.raises(DataError, match=r"nope.txt does not exist: fix the dataset path"):
        Corpora([DataConfig(data_dir=str(tmp_path / "data"), stories_mb=0.1), missing])
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())
