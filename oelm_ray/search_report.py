"""The report of a learning-rate / warmup search (oelm_ray.tune.search): per searched cell, the best
configuration and what the search spent beside the full grid.

    cell = cell_summary(exp, records, n_candidates, max_steps, run_dir)   # one cell, from its trial records
    write_search_report(run_dir, cells)                                   # best.json, search.md, search.png
    cells = load_cells(run_dir / "best.json")                             # what another recipe reads back

Like oelm_ray.results (whose trial records and frame it reads), it needs neither Ray nor torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .core.config import ConfigError
from .core.experiments import Experiment
from .core.io import write_json, write_text
from .results import finite, save_png, trials_frame


def cell_summary(exp: Experiment, recs: list[dict], n_candidates: int, max_steps: int, run_dir: Path) -> dict:
    """The best configuration of a searched cell and what the search spent beside the full grid."""
    df = trials_frame(recs)
    done = df[(df.steps >= max_steps) & df.best_val_ppl.notna()] if not df.empty else df
    pick = done if not done.empty else df[df.best_val_ppl.notna()] if not df.empty else df
    best = pick.loc[pick.best_val_ppl.idxmin()] if not pick.empty else None
    spent = int(df.steps.sum()) if not df.empty else 0  # trial-steps: the last step each trial trained
    grid = n_candidates * max_steps
    return {
        "experiment_id": exp.id,
        "dataset": exp.dataset,
        "method": exp.method,
        "run": str(run_dir),
        "best": None
        if best is None
        else {
            "trial": best["name"],
            "lr": float(best.lr),
            "warmup_steps": int(best.warmup_steps),
            "best_val_ppl": float(best.best_val_ppl),
            "final_val_ppl": float(best.final_val_ppl),
        },
        "trials": len(recs),
        "stopped_early": sum(r["status"] == "stopped" for r in recs),
        "candidates": n_candidates,
        "max_steps": max_steps,
        "trial_steps": spent,
        "grid_trial_steps": grid,
        "fraction_of_grid": spent / grid if grid else math.nan,
        "tried": []
        if df.empty
        else [
            {
                "trial": r.name,
                "lr": float(r.lr),
                "warmup_steps": int(r.warmup_steps),
                "steps": int(r.steps),
                "best_val_ppl": float(r.best_val_ppl),
                "last_val_ppl": float(r.final_val_ppl),
                "status": r.status,
            }
            for r in df.sort_values(["lr", "warmup_steps"]).itertuples()
        ],
    }


def search_markdown(cells: list[dict]) -> str:
    """search.md: the best configuration per cell and the trial-steps spent beside the full grid, then each
    search's trials."""
    lines = [
        "# Learning-rate / warmup search",
        "",
        "Best configuration per method (lowest val PPL among the trials trained to max_steps), and the compute",
        "the search spent in trial-steps (steps actually trained, summed over trials) beside a full grid over",
        "the same candidates (every candidate trained to max_steps).",
        "",
        "| dataset | experiment | method | best lr | best warmup | val PPL | trials | stopped early | trial-steps "
        "| full grid | share of grid |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        b = c["best"] or {}
        head = f"| {c['dataset']} | {c['experiment_id']} | {c['method']} "
        lines.append(
            head + f"| {b.get('lr', '-'):} | {b.get('warmup_steps', '-')} "
            f"| {b['best_val_ppl']:.3f} | {c['trials']} | {c['stopped_early']} | {c['trial_steps']:,} "
            f"| {c['grid_trial_steps']:,} ({c['candidates']} x {c['max_steps']:,}) "
            f"| {100 * c['fraction_of_grid']:.0f}% |"
            if b
            else head + f"| - | - | - | {c['trials']} | - | - | - | - |"
        )
    spent, grid = sum(c["trial_steps"] for c in cells), sum(c["grid_trial_steps"] for c in cells)
    if grid:
        lines += [
            "",
            f"All cells: {spent:,} trial-steps searched vs {grid:,} for the full grids ({100 * spent / grid:.0f}%).",
        ]
    for c in cells:
        if c.get("tried"):
            lines += [
                "",
                f"{c['experiment_id']} ({c['method']}, {c['dataset']}): the trials of the search",
                "",
                "| trial | lr | warmup | steps | val PPL | status |",
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {t['trial']} | {t['lr']:g} | {t['warmup_steps']} | {t['steps']} | {t['best_val_ppl']:.3f} "
                f"| {t['status']} |"
                for t in c["tried"]
            ]
    lines += [
        "",
        "The searches as heatmaps (lr x warmup, val PPL; stopped candidates hatched, the pick framed): search.png.",
        "The methods compared again at their own best settings, over fresh seeds: summary.md.",
        "",
    ]
    return "\n".join(lines)


def write_search_report(run_dir: Path, cells: list[dict]) -> str:
    """best.json, search.md and search.png (plot_search) next to the comparison's summary.md; returns the markdown."""
    text = search_markdown(cells)
    write_json(Path(run_dir) / "best.json", {"cells": cells})
    write_text(Path(run_dir) / "search.md", text)
    plot_search(cells, Path(run_dir) / "search.png")
    return text


def load_cells(best_json: str | Path) -> list[dict]:
    """The cells of a best.json that write_search_report wrote; a file that is not one is a ConfigError."""
    try:
        return json.loads(Path(best_json).read_text())["cells"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{best_json}: not a best.json written by sweeps/lr_warmup.py ({e})") from None


def search_figure(cells: list[dict]):
    """A learning-rate search as a heatmap per searched cell: lr (rows) x warmup (columns), coloured by the val
    PPL each candidate last reached; a candidate a rung stopped is hatched and labelled with its last step,
    the pick (the cell's best) is framed, candidates the search never tried are grey. Returns the figure.

    `cells`: cell_summary's dicts (best.json's cells), each with its "tried" trials.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    cells = [c for c in cells if c.get("tried")]
    n = max(1, len(cells))
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.2), squeeze=False)
    for ax, c in zip(axes[0], cells):
        tried = c["tried"]
        lrs = sorted({t["lr"] for t in tried} | ({c["best"]["lr"]} if c.get("best") else set()))
        warmups = sorted({t["warmup_steps"] for t in tried})
        grid = np.full((len(lrs), len(warmups)), np.nan)
        for t in tried:
            v = t.get("last_val_ppl", t["best_val_ppl"])
            grid[lrs.index(t["lr"]), warmups.index(t["warmup_steps"])] = v if finite(v) else np.nan
        ok = grid[np.isfinite(grid)]
        norm = LogNorm(vmin=ok.min(), vmax=max(ok.max(), ok.min() * 1.0001)) if ok.size else None
        cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad="#d9d9d9")
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, origin="lower", aspect="auto")
        fig.colorbar(im, ax=ax, label="val PPL (last value reached)")
        for t in tried:
            y, x = lrs.index(t["lr"]), warmups.index(t["warmup_steps"])
            v = t.get("last_val_ppl", t["best_val_ppl"])
            stopped = t["status"] != "completed" or t["steps"] < c["max_steps"]
            label = f"{v:.2f}" if finite(v) else t["status"]
            if stopped:
                label += f"\n@{t['steps']}"
                ax.add_patch(
                    Rectangle(
                        (x - 0.5, y - 0.5),
                        1,
                        1,
                        fill=False,
                        hatch="///",
                        edgecolor="#bbbbbb",
                        lw=0,
                        gid=f"stopped {t['lr']:g},{t['warmup_steps']}",
                    )
                )
            dark = norm is not None and finite(v) and norm(v) > 0.5  # viridis_r: high PPL is dark
            ax.text(x, y, label, ha="center", va="center", fontsize=7, color="white" if dark else "black")
        if c.get("best"):
            b = c["best"]
            ax.add_patch(
                Rectangle(
                    (warmups.index(b["warmup_steps"]) - 0.5, lrs.index(b["lr"]) - 0.5),
                    1,
                    1,
                    fill=False,
                    edgecolor="red",
                    lw=2.5,
                    gid=f"pick {b['lr']:g},{b['warmup_steps']}",
                )
            )
        ax.set_xticks(range(len(warmups)), [f"{w}\n({100 * w / c['max_steps']:.0f}%)" for w in warmups], fontsize=7)
        ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs], fontsize=7)
        ax.set(
            xlabel="warmup steps",
            ylabel="peak lr",
            title=f"{c['experiment_id']} {c['method']} ({c['dataset']})\n"
            f"{100 * c['fraction_of_grid']:.0f}% of the grid's "
            f"trial-steps; hatched: stopped at a rung",
        )
        ax.title.set_fontsize(8)
    fig.tight_layout()
    return fig


def plot_search(cells: list[dict], path: Path) -> None:
    """search_figure written to `path` as a PNG (atomically)."""
    save_png(search_figure(cells), path)
