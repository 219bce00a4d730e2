"""Plots of a run: validation AUC per task over epochs, the task weights over training steps, and
(for MoE models that route per task) the experts' routing share per task.

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

    Left: validation AUC (R² of a regression task) per task per epoch (line style per run,
    colour per task). Right: the weight of each task applied at each training step (normalised
    to sum to 1; smoothed over 20 steps), which is ``1/K`` throughout for equal weighting.
    """
    from ._extras import require

    matplotlib = require("matplotlib", "plotting the runs")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_auc, ax_w) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    styles = ["-", "--", ":", "-."]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r, (label, run) in enumerate(runs.items()):
        style = styles[r % len(styles)]
        for i, task in enumerate(run.task_names):
            colour = colours[i % len(colours)]
            key = f"val/auc/{task}"
            if not any(key in row for row in run.history):
                key = f"val/r2/{task}"
            epochs = [row["epoch"] + 1 for row in run.history if key in row]
            scores = [row[key] for row in run.history if key in row]
            ax_auc.plot(epochs, scores, style, color=colour, marker=".", label=f"{task} ({label})")
            steps = [row["step"] for row in run.weights]
            weights = _smooth([row[task] for row in run.weights], 20)
            ax_w.plot(steps, weights, style, color=colour, label=f"{task} ({label})")
        if run.best_epoch >= 0:
            ax_auc.axvline(run.best_epoch + 1, color="grey", linestyle=style, linewidth=0.8)
    ax_auc.set_xlabel("epoch")
    ax_auc.set_ylabel("validation AUC (R² for regression)")
    ax_auc.set_title("validation score per task (grey: best epoch)")
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


def plot_expert_load(expert_load: Mapping[str, float], path: str | Path, title: str = "") -> Path:
    """Heatmap of the routing share of each expert (columns) per task (rows), one panel per group
    of experts, from a run's expert-load statistics (``experts/<group>@<task>/share_<i>``).

    Raises ``ValueError`` when ``expert_load`` holds no per-task shares (dense models, PLE).
    """
    from .metrics import task_shares

    groups = task_shares(expert_load)
    if not groups:
        raise ValueError("the expert load has no per-task routing shares to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(
        1, len(groups), figsize=(1.5 + 4.5 * len(groups), 3.2), constrained_layout=True,
        squeeze=False,
    )  # fmt: skip
    for ax, (group, per_task) in zip(axes[0], groups.items(), strict=True):
        tasks = list(per_task)
        shares = np.array([per_task[t] for t in tasks], dtype=float)
        image = ax.imshow(shares, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(shares.shape[1]))
        ax.set_yticks(range(len(tasks)), labels=tasks)
        ax.set_xlabel("expert")
        ax.set_title(f"{group}: share of each task's routing")
        for (i, j), value in np.ndenumerate(shares):
            if np.isfinite(value):
                colour = "black" if value > 0.5 else "white"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
        fig.colorbar(image, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
