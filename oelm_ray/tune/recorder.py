"""The driver's record of every trial: `<run>/trials/<trial>.json`, what `oelm-ray status` and the report read."""

from __future__ import annotations

import time
from pathlib import Path

from ray import tune

from .. import results
from ..results import finite
from .trial import trial_of


class Recorder(tune.Callback):
    """Keeps `<run>/trials/<trial>.json` current from the driver, at every report and state change."""

    def __init__(self, run: Path, quiet: bool = False):
        self.run, self.quiet = Path(run), quiet
        self.records: dict[str, dict] = {}

    def _rec(self, trial) -> dict:
        name = str(trial)
        if name not in self.records:
            rec = results.read_record(results.record_path(self.run, name))
            if rec is None:
                t = trial_of(trial.config)
                rec = {
                    "name": name,
                    "trial_id": trial.trial_id,
                    "experiment_id": t.experiment.id,
                    "isolates": t.experiment.isolates,
                    "dataset": t.config.data.dataset,
                    "method": t.config.model.method,
                    "seed": t.seed,
                    "config": t.config.to_dict(),
                    "search": t.search,
                    "status": "pending",
                    "history": [],
                }
            self.records[name] = rec
        return self.records[name]

    def _save(self, rec: dict) -> None:
        results.write_record(self.run, rec)

    def on_trial_start(self, iteration, trials, trial, **info):
        rec = self._rec(trial)
        rec["status"] = "running"
        self._save(rec)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        rec = self._rec(trial)
        row = {k: v for k, v in result.items() if k in _KEEP or k.startswith(("val/", "train/"))}
        # a trial resumed from a checkpoint re-reports the steps after it: keep one row per step, the newest
        by_step = {h["step"]: h for h in rec["history"]}
        new = row["step"] not in by_step  # a re-report is not news
        by_step[row["step"]] = row
        rec["history"] = [by_step[k] for k in sorted(by_step)]
        rec["status"] = "diverged" if result.get("diverged") else "running"
        rec["last_report"] = time.time()
        rec.update({k: result[k] for k in ("node", "gpu", "trainable_params", "total_params") if k in result})
        self._save(rec)
        if new and not self.quiet and finite(result.get("val/ppl")):
            print(
                f"  {trial}: step {result['step']:>6}  val ppl {result['val/ppl']:8.3f}  {result.get('tokens_per_s', 0):,.0f} tok/s",
                flush=True,
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        rec = self._rec(trial)
        if rec["status"] != "diverged":
            max_steps = rec["config"]["train"]["max_steps"]
            done = rec["history"] and rec["history"][-1]["step"] >= max_steps
            rec["status"] = "completed" if done else "stopped"  # stopped: early-stopped by a scheduler
        self._save(rec)

    def on_trial_error(self, iteration, trials, trial, **info):
        rec = self._rec(trial)
        rec["status"] = "error"
        rec["error"] = str(getattr(trial, "error_file", "") or "")
        failed = _qk_check_failure(rec["error"])
        if failed:
            rec["qk_check"] = failed
        self._save(rec)


def _qk_check_failure(error_file: str) -> str | None:
    """The trainer's 'Q/K check failed ...' line from a trial's error file, if that is how it ended."""
    try:
        text = Path(error_file).read_text(errors="replace") if error_file else ""
    except OSError:  # on another node's disk: the trial's own summary.json still says it
        return None
    for line in text.splitlines():
        if "Q/K check failed" in line:
            return line[line.index("Q/K check failed") :]
    return None


_KEEP = {
    "step",
    "tokens",
    "lr",
    "step_time_s",
    "tokens_per_s",
    "eval_time_s",
    "wall_time_s",
    "node",
    "node_id",
    "gpu",
    "trainable_params",
    "total_params",
    "diverged",
    "qk_check",
}
