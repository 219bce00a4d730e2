"""Plots of a run: validation AUC per task over epochs, and the task weights over training steps.

matplotlib is imported inside the functions (Agg backend), so importing this module is cheap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .training import RunResult


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (the per-step weights are noisy)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(runs: Mapping[str, RunResult], path: str | Path, title: str = "") -> Path:
    """One figure for one or more runs (labelled by the mapping's keys), saved as PNG.

    Left: validation AUC per task per epoch (line style per run, colour per task). Right: the
    weight of each task applied at each training step (normalised to sum to 1; smoothed over 20
    steps), which is ``1/K`` throughout for equal weighting.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_auc, ax_w) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    styles = ["-", "--", ":", "-."]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r, (label, run) in enumerate(runs.items()):
        style = styles[r % len(styles)]
        for i, task in enumerate(run.task_names):
            colour = colours[i % len(colours)]
            epochs = [row["epoch"] + 1 for row in run.history if f"val/auc/{task}" in row]
            aucs = [row[f"val/auc/{task}"] for row in run.history if f"val/auc/{task}" in row]
            ax_auc.plot(epochs, aucs, style, color=colour, marker=".", label=f"{task} ({label})")
            steps = [row["step"] for row in run.weights]
            weights = _smooth([row[task] for row in run.weights], 20)
            ax_w.plot(steps, weights, style, color=colour, label=f"{task} ({label})")
        if run.best_epoch >= 0:
            ax_auc.axvline(run.best_epoch + 1, color="grey", linestyle=style, linewidth=0.8)
    ax_auc.set_xlabel("epoch")
    ax_auc.set_ylabel("validation AUC")
    ax_auc.set_title("validation AUC per task (grey: best epoch)")
    ax_auc.legend(fontsize=8)
    ax_auc.grid(alpha=0.3)
    ax_w.set_xlabel("training step")
    ax_w.set_ylabel("task weight (sum 1, 20-step mean)")
    ax_w.set_title("task weights over training")
    ax_w.set_ylim(0, 1)
    ax_w.legend(fontsize=8)
    ax_w.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
