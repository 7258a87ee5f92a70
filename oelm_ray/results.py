"""Results of a sweep: per-trial records -> trials.parquet, summary.md, val_ppl.png, status table.

The sweep driver keeps one JSON record per trial under `<run>/trials/` (written atomically at every
report, see `oelm_ray.tune.recorder.Recorder`). Everything here reads only those records, so `oelm-ray
report` and `oelm-ray status` work on a finished sweep, on a running one, and on a sweep whose
driver died, and need no Ray.

PPL in the tables is the research's "final perplexity": exp(best validation loss) of a trial.
The gap of a trial is measured against the baseline of the same dataset and seed (the best one
where a search ran several); the criterion is OELM PPL <= 1.05 x baseline PPL. A learning-rate
search's own report (best.json, search.md, search.png) is oelm_ray.search_report's, built on these records.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd

from .core.io import atomic_write, write_json

CRITERION = 1.05
TRIALS_DIR = "trials"
FACTORS = ("qk_freeze_layers", "qk_unfreeze_step", "qk_lr_mult", "qk_random_std")

# ------------------------------------------------------------------------------------------------
# records


def record_path(run: Path, name: str) -> Path:
    return Path(run) / TRIALS_DIR / f"{name}.json"


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_record(run: Path, rec: dict) -> None:
    write_json(record_path(run, rec["name"]), rec)


def load_records(run: Path) -> list[dict]:
    folder = Path(run) / TRIALS_DIR
    recs = [read_record(p) for p in sorted(folder.glob("*.json"))] if folder.exists() else []
    return [r for r in recs if r]


def find_run(storage: str | os.PathLike, run: str | None) -> Path:
    """A run folder from a path, a name under `storage`, or (None) the newest run under `storage`."""
    from .core.config import ConfigError

    if run:
        for cand in (Path(run), Path(storage) / run):
            if (cand / TRIALS_DIR).exists() or (cand / "sweep.json").exists():
                return cand
        raise ConfigError(f"no sweep run at {run!r} (looked in . and {storage}/): give a run folder or name")
    runs = [p.parent for p in Path(storage).glob("*/sweep.json")]
    if not runs:
        raise ConfigError(
            f"no sweep runs under {storage}/: start one with `python sweeps/phase3.py`, or pass --storage"
        )
    return max(runs, key=lambda p: (p / "sweep.json").stat().st_mtime)


# ------------------------------------------------------------------------------------------------
# the table


ALWAYS = ("d_model", "lr", "warmup_steps", "max_steps", "eval_batches")  # columns even where all trials agree


def _flat_config(cfg: dict) -> dict[str, Any]:
    """{field: value} over the config's sections, with qk_random_std as the std oelm_random used."""
    flat = {k: v for sec in cfg.values() if isinstance(sec, dict) for k, v in sec.items()}
    if flat.get("qk_random_std") == 0 and flat.get("d_model"):
        flat["qk_random_std"] = flat["d_model"] ** -0.5  # 0 means scale-matched: 1/sqrt(d_model)
    return flat


def qk_check_of(record: dict) -> str:
    """The trial's Q/K check: "ok", what failed, or "-" (a record from before the check)."""
    hist = record.get("history") or []
    return record.get("qk_check") or (hist[-1].get("qk_check") if hist else None) or "-"


def valid_ppls(record: dict) -> list[float]:
    """The trial's finite val PPLs in order; none where its Q/K broke the method's rule (no valid result)."""
    if qk_check_of(record) not in ("ok", "-"):
        return []
    return [h["val/ppl"] for h in record.get("history") or [] if finite(h.get("val/ppl"))]


def trials_frame(records: list[dict]) -> pd.DataFrame:
    rows, flats = [], []
    for r in records:
        hist = r.get("history") or []
        last = hist[-1] if hist else {}
        qk_check, ppls = qk_check_of(r), valid_ppls(r)
        cfg = r.get("config") or {}
        steps = [h for h in hist if h.get("step_time_s")]
        train_s = sum(h["step_time_s"] * _interval(hist, i) for i, h in enumerate(hist) if h.get("step_time_s"))
        n_steps = last.get("step", 0)
        flat = _flat_config(cfg)
        flats.append(flat)
        rows.append(
            {
                "name": r["name"],
                "experiment_id": r.get("experiment_id"),
                "role": "control" if r.get("isolates") else "protocol",
                "isolates": r.get("isolates", ""),
                "dataset": r.get("dataset"),
                "method": r.get("method"),
                "seed": r.get("seed"),
                **{f: flat.get(f) for f in ALWAYS + FACTORS},
                "steps": n_steps,
                "val_tokens": last.get("val/tokens"),
                "tokens": last.get("tokens", 0),
                "best_val_ppl": min(ppls) if ppls else math.nan,
                "final_val_ppl": ppls[-1] if ppls else math.nan,
                "trainable_params": last.get("trainable_params", r.get("trainable_params")),
                "total_params": last.get("total_params", r.get("total_params")),
                "tokens_per_s": (last.get("tokens", 0) / train_s) if train_s else math.nan,
                "mean_step_time_s": (train_s / n_steps) if n_steps and steps else math.nan,
                "wall_time_s": last.get("wall_time_s", math.nan),
                "status": r.get("status", "unknown"),
                "qk_check": qk_check,
                # the model's shape: gaps pair trials of one size (a scaling sweep has several)
                "model_size": "x".join(str(flat.get(k, "?")) for k in ("n_layer", "d_model", "d_ff")),
            }
        )
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    # every other config field in which the trials differ (a search's, a control's, a --set's)
    for f in sorted({k for fl in flats for k in fl}):
        values = [fl.get(f) for fl in flats]
        if f not in df.columns and any(v != values[0] for v in values):
            df[f] = values
    df["gap_vs_baseline_pct"] = math.nan
    df["meets_criterion"] = pd.NA
    df["gap_vs_freeze_pct"] = math.nan
    base, freeze = _reference(df, "baseline"), _reference(df, "oelm_freeze")
    for i, row in df.iterrows():
        if not finite(row.best_val_ppl):
            continue
        ref = base.get((row.dataset, row.model_size, row.seed))
        if ref is not None:
            df.at[i, "gap_vs_baseline_pct"] = 100.0 * (row.best_val_ppl / ref - 1.0)
            df.at[i, "meets_criterion"] = bool(row.best_val_ppl <= CRITERION * ref)
        ref = freeze.get((row.dataset, row.model_size, row.seed))
        if ref is not None and not (row.method == "oelm_freeze" and row.role == "protocol"):
            df.at[i, "gap_vs_freeze_pct"] = 100.0 * (row.best_val_ppl / ref - 1.0)
    df["meets_criterion"] = df["meets_criterion"].astype("boolean")
    return df.sort_values(["dataset", "experiment_id", "seed", "name"]).reset_index(drop=True)


def _reference(df: pd.DataFrame, method: str) -> pd.Series:
    """(dataset, size, seed) -> best PPL of the method's protocol arms (of any arm where no protocol arm ran)."""
    rows = df[(df.method == method) & df.best_val_ppl.notna()]
    key = ["dataset", "model_size", "seed"]
    ref = rows.groupby(key)["best_val_ppl"].min()
    protocol = rows[rows.role == "protocol"].groupby(key)["best_val_ppl"].min()
    return pd.concat([ref[~ref.index.isin(protocol.index)], protocol])


def _interval(hist: list[dict], i: int) -> int:
    return hist[i]["step"] - (hist[i - 1]["step"] if i else 0)


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def summary_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Per dataset x experiment: mean and std over seeds, the gap, the criterion."""
    if df.empty:
        return df
    g = df.groupby(["dataset", "experiment_id", "method"], sort=True, dropna=False)
    out = g.agg(
        role=("role", "first"),
        isolates=("isolates", "first"),
        lr=("lr", "first"),
        qk_random_std=("qk_random_std", "first"),
        seeds=("seed", "nunique"),
        ppl_mean=("best_val_ppl", "mean"),
        ppl_std=("best_val_ppl", "std"),
        gap_mean=("gap_vs_baseline_pct", "mean"),
        gap_std=("gap_vs_baseline_pct", "std"),
        freeze_gap_mean=("gap_vs_freeze_pct", "mean"),
        freeze_gap_std=("gap_vs_freeze_pct", "std"),
        val_tokens=("val_tokens", "max"),
        met=("meets_criterion", lambda s: int(s.fillna(False).sum())),
        trainable_params=("trainable_params", "first"),
        steps=("steps", "max"),
        statuses=("status", lambda s: ",".join(sorted(set(s)))),
    ).reset_index()
    return out


def summary_markdown(df: pd.DataFrame, title: str) -> str:
    s = summary_frame(df)
    lines = [f"# {title}", ""]
    if s.empty:
        return "\n".join(lines + ["No trial has reported yet.", ""])
    lines += [
        f"Val PPL = exp(best validation loss) on {_val_scope(df)}, mean ± std over seeds. Gap vs the "
        f"protocol baseline of the same dataset and seed; criterion: PPL <= {CRITERION} x baseline. "
        "Rows are the research's protocol unless marked control (see Controls below).",
        "",
        "| dataset | experiment | role | method | seeds | val PPL | gap vs baseline | meets 1.05 | trainable params | steps | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s.itertuples():
        is_ref = r.method == "baseline" and r.role == "protocol"
        met = "-" if is_ref or not finite(r.gap_mean) else f"{r.met}/{r.seeds}"
        params = f"{int(r.trainable_params):,}" if finite(r.trainable_params) else "-"
        lines.append(
            f"| {r.dataset} | {r.experiment_id} | {r.role} | {r.method} | {r.seeds} | {r.ppl_mean:.3f} ± {_std(r.ppl_std):.3f} "
            f"| {'-' if is_ref else _gap(r.gap_mean, r.gap_std)} | {met} | {params} | {r.steps} | {r.statuses} |"
        )
    lines += controls_markdown(s)
    broken = df[~df.qk_check.isin(["ok", "-"])] if "qk_check" in df else df.iloc[:0]
    for r in broken.itertuples():
        lines += ["", f"**{r.name}: no valid result.** {r.qk_check}"]
    lines += ["", "Per trial:", "", _trial_table(df), ""]
    lines += scaling_markdown(df) + savings_markdown(df) + compute_markdown(df)
    return "\n".join(lines)


def scaling_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Per dataset x model size (a sweep over several): parameters, the baseline's PPL, each frozen arm's gap over seeds."""
    if "model_size" not in df or df["model_size"].nunique() < 2:
        return pd.DataFrame()
    d = df[df.best_val_ppl.notna()]
    arm = d.method + d.role.map({"control": " (control)", "protocol": ""})
    g = d.assign(arm=arm).groupby(["dataset", "model_size", "arm"], sort=False)
    out = g.agg(
        params=("total_params", "max"),
        ppl=("best_val_ppl", "mean"),
        gap_mean=("gap_vs_baseline_pct", "mean"),
        gap_std=("gap_vs_baseline_pct", "std"),
        gap_min=("gap_vs_baseline_pct", "min"),
        gap_max=("gap_vs_baseline_pct", "max"),
        seeds=("seed", "nunique"),
    ).reset_index()
    return out.sort_values(["dataset", "params", "arm"]).reset_index(drop=True)


def scaling_markdown(df: pd.DataFrame) -> list[str]:
    """The freeze gap against model size: one row per size, one column per frozen arm (paired with its size's baseline)."""
    s = scaling_frame(df)
    if s.empty:
        return []
    arms = [a for a in dict.fromkeys(s.arm) if a != "baseline"]
    lines = [
        "",
        "Scaling: gap vs the baseline of the same size and seed (mean ± std over seeds).",
        "",
        "| dataset | size (layers x d_model x d_ff) | params | baseline PPL | " + " | ".join(arms) + " |",
        "|---|---|---|---|" + "---|" * len(arms),
    ]
    for (ds, size), rows in s.groupby(["dataset", "model_size"], sort=False):
        by = rows.set_index("arm")
        base = f"{by.loc['baseline', 'ppl']:.3f}" if "baseline" in by.index else "-"
        params = f"{int(rows.params.max()):,}" if pd.notna(rows.params.max()) else "-"
        gaps = [_gap(by.loc[a, "gap_mean"], by.loc[a, "gap_std"]) if a in by.index else "-" for a in arms]
        lines.append(f"| {ds} | {size} | {params} | {base} | " + " | ".join(gaps) + " |")
    return lines + [""]


def _gap(mean: float, std: float) -> str:
    return "-" if not finite(mean) else f"{mean:+.1f}% ± {_std(std):.1f}"


def _val_scope(df: pd.DataFrame) -> str:
    scopes = set()
    for eb, tok in zip(df.eval_batches, df.val_tokens):
        if eb is None or not finite(eb):  # a record from before eval_batches was kept
            continue
        tokens = f"{int(tok):,} tokens" if finite(tok) else "tokens not recorded"
        scopes.add(
            f"the whole validation split ({tokens})"
            if eb == 0
            else f"a fixed sample of {eb} validation batches ({tokens})"
        )
    return " / ".join(sorted(scopes)) or "the validation split"


def controls_markdown(s: pd.DataFrame) -> list[str]:
    """What each control isolates, and its paired gaps (same dataset and seed)."""
    ctl = s[s.role == "control"]
    if ctl.empty:
        return []
    lines = [
        "",
        "Controls: not part of the research's protocol; each changes one thing of a protocol arm to "
        "isolate a confound of the research's design. Gaps are paired (same dataset and seed) against "
        "the protocol's baseline and oelm_freeze.",
        "",
        "| dataset | experiment | method | lr | Q/K std | val PPL | vs baseline | vs oelm_freeze | isolates |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ctl.itertuples():
        std = f"{r.qk_random_std:.4g}" if r.method == "oelm_random" and finite(r.qk_random_std) else "-"
        lines.append(
            f"| {r.dataset} | {r.experiment_id} | {r.method} | {r.lr:g} | {std} | {r.ppl_mean:.3f} ± {_std(r.ppl_std):.3f} "
            f"| {_gap(r.gap_mean, r.gap_std)} | {_gap(r.freeze_gap_mean, r.freeze_gap_std)} | {r.isolates} |"
        )
    return lines


def savings_markdown(df: pd.DataFrame) -> list[str]:
    """Trainable parameters each experiment saves vs the baseline of its dataset and model size, and for how long."""
    base = df[df.method == "baseline"].groupby(["dataset", "model_size"])["trainable_params"].max()
    keys = pd.MultiIndex.from_frame(df[["dataset", "model_size"]])
    rows = df[(df.method != "baseline") & keys.isin(base.index) & df.trainable_params.notna()]
    if rows.empty:
        return []
    lines = [
        "Trainable parameters vs baseline (Q/K frozen at the start; an unfrozen Q/K saves only until its unfreeze step):",
        "",
        "| dataset | experiment | method | qk_freeze_layers | qk_unfreeze_step | qk_lr_mult | trainable params | saved vs baseline | frozen share of steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (ds, eid), g in rows.groupby(["dataset", "experiment_id"], sort=True):
        r = g.iloc[0]
        ref = base[(ds, r.model_size)]
        saved = int(ref - r.trainable_params)
        unf, max_steps = _num(r.qk_unfreeze_step), _num(r.max_steps)
        until = max_steps if not math.isfinite(unf) or unf == -1 else min(unf, max_steps)
        share = until / max_steps if saved and max_steps > 0 else 0.0
        lines.append(
            f"| {ds} | {eid} | {r.method} | {_fmt(r.qk_freeze_layers)} | {_fmt(r.qk_unfreeze_step)} | {_fmt(r.qk_lr_mult)} "
            f"| {int(r.trainable_params):,} | {saved:,} ({100 * saved / ref:.1f}%) | {100 * share:.0f}% |"
        )
    return lines + [""]


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def compute_markdown(df: pd.DataFrame) -> list[str]:
    """Trial-steps spent (steps actually trained, summed over trials) beside every trial to max_steps."""
    spent, full = int(df.steps.sum()), int(df.max_steps.fillna(0).sum())
    stopped = int((df.status == "stopped").sum())
    return [
        f"Compute: {spent:,} trial-steps over {len(df)} trial(s) ({stopped} stopped early by the scheduler); "
        f"every trial to max_steps: {full:,}.",
        "",
    ]


def _std(x: float) -> float:
    return x if finite(x) else 0.0


def _trial_table(df: pd.DataFrame) -> str:
    cols = [
        "name",
        "best_val_ppl",
        "final_val_ppl",
        "gap_vs_baseline_pct",
        "trainable_params",
        "tokens_per_s",
        "wall_time_s",
        "status",
    ]
    buf = io.StringIO()
    buf.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
    for r in df[cols].itertuples(index=False):
        buf.write("| " + " | ".join(_fmt(v) for v in r) + " |\n")
    return buf.getvalue().rstrip()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:,.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    return "-" if v is None or v is pd.NA else str(v)


# ------------------------------------------------------------------------------------------------
# the plot


def plot_val_ppl(records: list[dict], path: Path, df: pd.DataFrame | None = None) -> None:
    """Validation PPL against tokens per dataset (seed bands); with several model sizes, the freeze gap against size too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_ds: dict[str, dict[str, list[list[dict]]]] = {}
    for r in records:
        if r.get("history"):
            by_ds.setdefault(r["dataset"], {}).setdefault(f"{r['experiment_id']} {r['method']}", []).append(
                r["history"]
            )
    scaling = scaling_frame(df) if df is not None else pd.DataFrame()
    n = max(1, len(by_ds)) + (not scaling.empty)
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4), squeeze=False)
    if not scaling.empty:
        ax = axes[0][-1]
        for (ds, arm), rows in scaling[scaling.arm != "baseline"].groupby(["dataset", "arm"]):
            (line,) = ax.plot(rows.params, rows.gap_mean, marker="o", label=f"{ds}: {arm}")
            ax.fill_between(rows.params, rows.gap_min, rows.gap_max, color=line.get_color(), alpha=0.2)  # seed band
        ax.axhline(0, color="gray", lw=0.8)
        ax.set(
            title="gap vs baseline by model size",
            xlabel="parameters",
            ylabel="val PPL gap vs baseline (%)",
            xscale="log",
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax, (ds, groups) in zip(axes[0], sorted(by_ds.items())):
        for label, runs in sorted(groups.items()):
            frame = pd.concat(
                [
                    pd.DataFrame(h)[["tokens", "val/ppl"]].set_index("tokens")["val/ppl"].rename(i)
                    for i, h in enumerate(runs)
                ],
                axis=1,
            ).sort_index()
            frame = frame.replace([math.inf], math.nan)
            mean = frame.mean(axis=1)
            (line,) = ax.plot(frame.index, mean, label=f"{label} ({len(runs)} seeds)")
            if len(runs) > 1:
                ax.fill_between(frame.index, frame.min(axis=1), frame.max(axis=1), color=line.get_color(), alpha=0.2)
        ax.set(title=ds, xlabel="tokens seen", ylabel="validation PPL", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def save_png(fig, path: Path) -> None:
    """A matplotlib figure written to `path` as a PNG (atomically), then closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


# ------------------------------------------------------------------------------------------------
# entry points


def write_report(run: str | os.PathLike) -> list[Path]:
    """Write trials.parquet, summary.md and val_ppl.png into the run folder; return their paths."""
    run = Path(run)
    records = load_records(run)
    df = trials_frame(records)
    paths = [run / "trials.parquet", run / "summary.md", run / "val_ppl.png"]
    atomic_write(paths[0], lambda f: df.to_parquet(f, index=False))
    atomic_write(paths[1], lambda f: f.write(summary_markdown(df, f"Sweep {run.name}")), mode="w")
    plot_val_ppl(records, paths[2], df)
    return paths


def status_table(run: str | os.PathLike, now: float | None = None) -> str:
    """One line per trial: what `oelm-ray status` prints (works while the sweep runs)."""
    run = Path(run)
    now = time.time() if now is None else now
    head = [
        "trial",
        "dataset",
        "method",
        "seed",
        "state",
        "step",
        "last ppl",
        "best ppl",
        "tok/s",
        "node/gpu",
        "last report",
    ]
    rows = []
    for r in load_records(run):
        hist = r.get("history") or []
        last = hist[-1] if hist else {}
        ppls = valid_ppls(r)
        max_steps = (r.get("config") or {}).get("train", {}).get("max_steps", "?")
        age = now - r["last_report"] if r.get("last_report") else None
        rows.append(
            [
                r["name"],
                r.get("dataset", ""),
                r.get("method", ""),
                str(r.get("seed", "")),
                r.get("status", ""),
                f"{last.get('step', 0)}/{max_steps}",
                _fmt(ppls[-1]) if ppls else "-",
                _fmt(min(ppls)) if ppls else "-",
                f"{last['tokens_per_s']:,.0f}" if finite(last.get("tokens_per_s")) else "-",
                f"{last.get('node', r.get('node', '-'))}/{last.get('gpu', '-')}",
                "-" if age is None else _age(age),
            ]
        )
    if not rows:
        return f"{run}: no trial has started yet"
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([f"run {run}", fmt.format(*head)] + [fmt.format(*row) for row in rows])


def _age(s: float) -> str:
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"
