"""The report's first section: per setting, which methods beat equal weighting, by how much, with
a 95% confidence interval and the smallest effect the setting could detect; and its figure.

Primary family: the PUB variants against equal weighting, Holm-Bonferroni over them; the verdict
of a primary comparison is *better* / *worse* when its Holm-adjusted p is below 0.05, else *no
difference detected*, next to the smallest true difference that would have been detected with
80% power at that setting's seeds and spread at ``0.05 / m`` (see
:mod:`benchmarks.study.protocol`). Secondary comparisons (the baselines) follow in the same form,
with Holm over their own family.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .methods import BASELINE, METHODS
from .protocol import ALPHA, corrected_alpha, detectable_effect, is_primary


def _verdict(c: Any) -> str:
    if math.isnan(c.p_holm):
        return "n/a (too few seeds)"
    if c.p_holm < ALPHA:
        return "**better**" if c.diff_mean > 0 else "**worse**"
    return "no difference detected"


def _ci(c: Any) -> str:
    if math.isnan(c.ci_low):
        return "n/a"
    return f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}]"


def _label(name: str) -> str:
    return METHODS[name].label if name in METHODS else name


def _rows(
    comparisons: Mapping[tuple[str, str, str], Any], primary: bool, alpha: float
) -> list[str]:
    lines = [
        "| setting | method | seeds | Δ mean AUC vs equal | 95% CI | p (Holm) | verdict "
        "| detectable at 80% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = list(METHODS)
    keys = sorted(
        (k for k in comparisons if is_primary(k[2]) == primary),
        key=lambda k: (k[0], k[1], order.index(k[2]) if k[2] in order else len(order)),
    )
    for d, m, n in keys:
        c = comparisons[(d, m, n)]
        mde = detectable_effect(c.diff_sd, c.n, alpha)
        p = "n/a" if math.isnan(c.p_holm) else f"{c.p_holm:.3f}"
        lines.append(
            f"| {d} / {m} | {_label(n)} | {c.n} | {c.diff_mean:+.4f} | {_ci(c)} | {p} | "
            f"{_verdict(c)} | {'n/a' if math.isnan(mde) else f'±{mde:.4f}'} |"
        )
    return lines


def verdict_section(
    cells: Mapping[tuple[str, str, str], Any],
    comparisons: Mapping[tuple[str, str, str], Any],
    num_primary: int,
    duplicates: Sequence[str],
) -> list[str]:
    alpha = corrected_alpha(num_primary)
    lines = ["## Verdict", ""]
    better: dict[str, list[str]] = {}
    worse: dict[str, list[str]] = {}
    for (d, m, n), c in comparisons.items():
        if not is_primary(n) or math.isnan(c.p_holm) or c.p_holm >= ALPHA:
            continue
        (better if c.diff_mean > 0 else worse).setdefault(_label(n), []).append(f"{d}/{m}")
    settings = sorted({(d, m) for d, m, _ in cells})
    lines.append(
        f"Primary comparisons: {num_primary} (each PUB variant against equal weighting in each of "
        f"{len(settings)} settings), Holm-Bonferroni over them; power computed at "
        f"0.05 / {num_primary} = {alpha:.1e}."
    )
    lines.append("")
    if better:
        lines += [
            f"- {name} beats equal weighting in: {', '.join(v)}." for name, v in better.items()
        ]
    if worse:
        lines += [
            f"- {name} is worse than equal weighting in: {', '.join(v)}."
            for name, v in worse.items()
        ]
    if not better and not worse:
        lines.append(
            "- No PUB variant differs from equal weighting after Holm in any setting; the last "
            "column says how large a difference each setting could have detected."
        )
    lines.append("")
    if duplicates:
        by_pair: dict[str, list[str]] = {}
        for entry in duplicates:
            where, pair = entry.split(": ", 1)
            by_pair.setdefault(pair, []).append(where)
        parts = [
            f"{pair} in {'every setting' if len(w) == len(settings) else ', '.join(w)}"
            for pair, w in by_pair.items()
        ]
        lines += [
            "Reported once (identical on every seed, as the two strategies coincide at K = 2): "
            + "; ".join(parts)
            + ".",
            "",
        ]
    lines += ["### Primary: PUB variants against equal weighting", ""]
    lines += _rows(comparisons, True, alpha)
    lines += ["", "### Secondary: baselines against equal weighting", ""]
    secondary = sum(1 for k in comparisons if not is_primary(k[2]))
    lines += _rows(comparisons, False, corrected_alpha(secondary))
    lines += [
        "",
        "*Δ*: mean over seeds of the paired difference of the per-seed mean test AUC (same seed: "
        "same initial weights and batch order). *95% CI*: t interval of that mean. *p (Holm)*: "
        "paired t-test, Holm-adjusted within its family. *Detectable at 80%*: the smallest true "
        "difference the paired t-test would detect with 80% power at this setting's seeds and "
        'paired spread at the family\'s Bonferroni level; a "no difference" verdict excludes '
        "differences of about that size, not smaller ones.",
        "",
    ]
    return lines


def plot_differences(
    cells: Mapping[tuple[str, str, str], Any],
    comparisons: Mapping[tuple[str, str, str], Any],
    num_primary: int,
    path: Path,
) -> bool:
    """Forest plot: per setting, every method's paired difference with its 95% CI, zero and the
    smallest detectable effect shaded. False when there is nothing to plot."""
    if not comparisons:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(d, m) for d, m, _ in comparisons})
    methods = [n for n in METHODS if n != BASELINE and any(k[2] == n for k in comparisons)]
    cols = min(4, len(settings))
    rows = math.ceil(len(settings) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.6 * cols, 0.32 * len(methods) * rows + 1.4 * rows),
        squeeze=False, constrained_layout=True, sharey=True,
    )  # fmt: skip
    alpha = corrected_alpha(num_primary)
    for i, (d, m) in enumerate(settings):
        ax = axes[i // cols][i % cols]
        mdes = []
        for y, n in enumerate(methods):
            c = comparisons.get((d, m, n))
            if c is None or math.isnan(c.diff_mean):
                continue
            low = c.diff_mean - c.ci_low if not math.isnan(c.ci_low) else 0.0
            high = c.ci_high - c.diff_mean if not math.isnan(c.ci_high) else 0.0
            colour = "C0" if is_primary(n) else "C7"
            ax.errorbar(c.diff_mean, y, xerr=[[low], [high]], fmt="o", color=colour,
                        capsize=2, markersize=3)  # fmt: skip
            if is_primary(n):
                mdes.append(detectable_effect(c.diff_sd, c.n, alpha))
        finite = [x for x in mdes if not math.isnan(x)]
        if finite:
            mde = max(finite)
            ax.axvspan(-mde, mde, color="C2", alpha=0.12, linewidth=0)
        ax.axvline(0.0, color="C3", linewidth=0.8)
        ax.axvline(0.002, color="k", linewidth=0.6, linestyle=":")
        ax.set_title(f"{d} / {m}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, axis="x")
    for j in range(len(settings), rows * cols):
        axes[j // cols][j % cols].axis("off")
    for r in range(rows):
        axes[r][0].set_yticks(range(len(methods)))
        axes[r][0].set_yticklabels([_label(n) for n in methods], fontsize=7)
    fig.suptitle(
        "Paired difference of mean test AUC against equal weighting (95% CI; blue: PUB; "
        "green band: detectable at 80% power; dotted: +0.002)", fontsize=9,
    )  # fmt: skip
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
