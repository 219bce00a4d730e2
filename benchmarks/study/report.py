"""Aggregate the study's cached runs into a markdown report and PNG plots.

Layout: the verdict first (:mod:`benchmarks.study.verdict`: per setting, which PUB variants beat
equal weighting, by how much, with a 95% confidence interval, the Holm-adjusted p within the
primary family and the smallest detectable effect; then the baselines as the secondary family),
the figure of the paired differences, then how it was run and the details per dataset.

Per (dataset, model, method), over seeds: per-task test AUC mean and standard deviation (ddof 1),
the mean over tasks, Delta-m against equal weighting and a paired test against it.

* Delta-m (Maninis, Radosavovic, Kokkinos, CVPR 2019): ``100/T sum_t (-1)^{l_t} (M_t - B_t) / B_t``
  with ``M_t`` / ``B_t`` the method's / equal weighting's mean test AUC on task t and ``l_t = 0``
  (higher AUC is better), in percent.
* Paired test: two-sided paired t-test (``scipy.stats.ttest_rel``) of the per-seed mean-over-tasks
  test AUC of the method against equal weighting on the same seeds (same seed = same initial
  weights and batch order), Holm-Bonferroni within its family (primary / secondary).
* One report covers the runs of one code state on one CPU model (``provenance``); two-task cells
  of a method that duplicates another (``protocol.K2_DUPLICATES``) are reported once.

    .venv/bin/python -m benchmarks.study.report --run-dir benchmarks/study/records/full-<id> \
        --out docs/results/study.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .methods import BASELINE, METHODS
from .protocol import K2_DUPLICATES, Paired, is_primary, task_score
from .provenance import ProvenanceError, check_one_code_state
from .train import RunKey

ALPHA = 0.05


@dataclass
class Cell:
    """One (dataset, model, method) over its seeds."""

    dataset: str
    model: str
    method: str
    task_names: tuple[str, ...]
    #: seed -> per-task test AUC
    aucs: dict[int, list[float]] = field(default_factory=dict)
    wall: list[float] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return sorted(self.aucs)

    def task_values(self, t: int) -> list[float]:
        return [self.aucs[s][t] for s in self.seeds]

    def mean_values(self) -> dict[int, float]:
        return {s: sum(v) / len(v) for s, v in self.aucs.items()}


@dataclass
class Comparison:
    delta_m: float
    diff_mean: float
    diff_sd: float
    t: float
    p: float
    n: int
    p_holm: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan


def load_runs(folder: Path, keys: Iterable[RunKey] | None = None) -> list[dict[str, Any]]:
    """The cached run JSONs of ``keys`` (all under ``folder`` when None) that exist."""
    if keys is None:
        paths = sorted(folder.glob("*/*/*/seed*.json"))
    else:
        paths = [k.path(folder) for k in keys]
    runs = []
    for path in paths:
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return runs


def build_cells(runs: list[dict[str, Any]]) -> dict[tuple[str, str, str], Cell]:
    cells: dict[tuple[str, str, str], Cell] = {}
    for run in runs:
        key = run["key"]
        index = (key["dataset"], key["model"], key["method"])
        tasks = tuple(run["task_names"])
        cell = cells.setdefault(index, Cell(*index, task_names=tasks))
        cell.aucs[int(key["seed"])] = [task_score(run["test"], t) for t in tasks]
        cell.wall.append(float(run["wall_time_s"]))
        cell.epochs.append(int(run["epochs_run"]))
    return cells


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _sd(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def compare(cell: Cell, base: Cell) -> Comparison:
    """Delta-m (on the seed means) and the paired t-test on the common seeds."""
    k = len(cell.task_names)
    delta = 100.0 * _mean(
        [
            (_mean(cell.task_values(t)) - _mean(base.task_values(t))) / _mean(base.task_values(t))
            for t in range(k)
        ]
    )
    common = sorted(set(cell.aucs) & set(base.aucs))
    mine, theirs = cell.mean_values(), base.mean_values()
    diffs = [mine[s] - theirs[s] for s in common]
    t_stat, p_value = math.nan, math.nan
    if len(diffs) >= 2:
        if max(diffs) == min(diffs):
            t_stat, p_value = (math.nan, 1.0) if diffs[0] == 0 else (math.inf, 0.0)
        else:
            from scipy import stats

            res = stats.ttest_rel([mine[s] for s in common], [theirs[s] for s in common])
            t_stat, p_value = float(res.statistic), float(res.pvalue)
    paired = Paired.of(diffs)
    return Comparison(
        delta, _mean(diffs), _sd(diffs), t_stat, p_value, len(diffs),
        ci_low=paired.ci_low, ci_high=paired.ci_high,
    )  # fmt: skip


def drop_k2_duplicates(cells: dict[tuple[str, str, str], Cell]) -> list[str]:
    """Remove (in place) two-task cells of a method that duplicates another present in the same
    setting (``protocol.K2_DUPLICATES``); returns what was folded, for the report."""
    folded = []
    for d, m, n in list(cells):
        twin = K2_DUPLICATES.get(n)
        if twin is None or len(cells[(d, m, n)].task_names) != 2 or (d, m, twin) not in cells:
            continue
        mine, theirs = cells[(d, m, n)].aucs, cells[(d, m, twin)].aucs
        same = all(
            abs(x - y) < 1e-6
            for s in set(mine) & set(theirs)
            for x, y in zip(mine[s], theirs[s], strict=True)
        )
        if same:  # as the protocol says; otherwise both stay and the report shows them
            del cells[(d, m, n)]
            folded.append(f"{d}/{m}: {METHODS[n].label} = {METHODS[twin].label}")
    return folded


def holm(comparisons: list[Comparison]) -> None:
    """Holm-Bonferroni adjusted p-values (in place) over the comparisons with a p-value."""
    tested = sorted((c for c in comparisons if not math.isnan(c.p)), key=lambda c: c.p)
    m = len(tested)
    running = 0.0
    for i, c in enumerate(tested):
        running = max(running, min(1.0, (m - i) * c.p))
        c.p_holm = running


def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _pm(values: Sequence[float]) -> str:
    sd = _sd(values)
    return f"{_mean(values):.4f}" + ("" if math.isnan(sd) else f" ± {sd:.4f}")


def _p(c: Comparison) -> str:
    if math.isnan(c.p):
        return "n/a"
    mark = ""
    if c.p < ALPHA:
        mark = " *" if c.diff_mean > 0 else " (worse) *"
    return f"{c.p:.3f}{mark}"


def _shown(folder: Path) -> str:
    """``folder`` relative to the repository where it lies inside it."""
    try:
        return str(folder.resolve().relative_to(Path(__file__).resolve().parents[2]))
    except ValueError:
        return str(folder)


def checked_invocations(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's invocations, refusing any the runner did not write (digest mismatch)."""
    from .run_study import invocation_digest

    invocations = list(manifest.get("invocations", []))
    for i, entry in enumerate(invocations):
        if entry.get("digest") != invocation_digest(entry):
            raise ProvenanceError(
                f"manifest invocation {i + 1} ({entry.get('command', '?')!r}) was not written by "
                "the runner as it stands (its digest does not match): manifests are not edited "
                "by hand; rerun the invocation, or remove the entry and its runs"
            )
    return invocations


# ----------------------------------------------------------------------------------- plots
def plot_auc(cells: dict[tuple[str, str, str], Cell], dataset: str, path: Path) -> None:
    """Per-task test AUC (mean ± sd over seeds) per method, one panel per (task, model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({m for d, m, _ in cells if d == dataset})
    methods = [n for n in METHODS if any((dataset, m, n) in cells for m in models)]
    tasks = next(c.task_names for (d, _, _), c in cells.items() if d == dataset)
    fig, axes = plt.subplots(
        len(tasks), len(models), figsize=(3.4 * len(models), 2.9 * len(tasks)),
        squeeze=False, constrained_layout=True,
    )  # fmt: skip
    for ti, task in enumerate(tasks):
        for mi, model in enumerate(models):
            ax = axes[ti][mi]
            base = cells.get((dataset, model, BASELINE))
            for x, name in enumerate(methods):
                cell = cells.get((dataset, model, name))
                if cell is None:
                    continue
                values = cell.task_values(ti)
                sd = _sd(values)
                colour = "C0" if name.startswith("pub") else ("C3" if name == BASELINE else "C7")
                ax.errorbar(
                    x, _mean(values), yerr=0.0 if math.isnan(sd) else sd,
                    fmt="o", color=colour, capsize=3, markersize=4,
                )  # fmt: skip
            if base is not None:
                ax.axhline(_mean(base.task_values(ti)), color="C3", linewidth=0.8, alpha=0.6)
            ax.set_xticks(range(len(methods)))
            ax.set_xticklabels([METHODS[n].label for n in methods], rotation=70, fontsize=7)
            ax.set_title(f"{model}: {task}", fontsize=9)
            ax.tick_params(axis="y", labelsize=7)
            ax.grid(alpha=0.3, axis="y")
            if mi == 0:
                ax.set_ylabel("test AUC (mean ± sd)", fontsize=8)
    fig.suptitle(f"{dataset}: test AUC, mean ± sd over seeds (red: equal)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_weights(runs: list[dict[str, Any]], path: Path) -> str:
    """Weight of the first task over training for every method of one (dataset, model, seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [r["key"] for r in runs]
    preferred = [k for k in keys if k["model"] == "mmoe"] or keys
    first = min(preferred, key=lambda k: (k["dataset"], k["seed"]))
    chosen = [
        r for r in runs
        if all(r["key"][f] == first[f] for f in ("dataset", "model", "seed"))
    ]  # fmt: skip
    chosen.sort(key=lambda r: list(METHODS).index(r["key"]["method"]))
    fig, ax = plt.subplots(figsize=(8, 4.2), constrained_layout=True)
    task = chosen[0]["task_names"][0]
    for r in chosen:
        rows = r["weights"]["rows"]
        if not rows:
            continue
        name = r["key"]["method"]
        style = "-" if name.startswith("pub") else ("--" if name != BASELINE else ":")
        ax.plot(
            [row[0] for row in rows], [row[1] for row in rows], style,
            label=METHODS[name].label, linewidth=1.2,
        )  # fmt: skip
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"weight of task '{task}' (weights sum to 1)")
    what = f"{first['dataset']}, {first['model']}, seed {first['seed']}"
    ax.set_title(
        f"Task weights over training ({what}; every {chosen[0]['weights']['every']} steps)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return what


# ---------------------------------------------------------------------------------- report
def write_report(
    folder: Path,
    out: Path,
    keys: Sequence[RunKey] | None = None,
    profile: str = "full",
    command: str = "",
    allow_dirty: bool = False,
) -> str:
    """Write ``out`` (markdown) and its PNGs next to it; returns the markdown.

    Refuses (:class:`ProvenanceError`) records of more than one code state, or from a dirty
    checkout unless ``allow_dirty`` (a smoke check; the report then says it is not evidence).
    """
    runs = load_runs(folder, keys)
    if not runs:
        raise ProvenanceError(f"no cached runs under {folder}")
    origin = check_one_code_state(runs, allow_dirty=allow_dirty)
    cells = build_cells(runs)
    duplicates = drop_k2_duplicates(cells)
    comparisons: dict[tuple[str, str, str], Comparison] = {}
    for (d, m, n), cell in cells.items():
        base = cells.get((d, m, BASELINE))
        if n != BASELINE and base is not None:
            comparisons[(d, m, n)] = compare(cell, base)
    primary = [c for k, c in comparisons.items() if is_primary(k[2])]
    holm(primary)
    holm([c for k, c in comparisons.items() if not is_primary(k[2])])
    datasets = sorted({d for d, _, _ in cells})
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.stem
    lines: list[str] = []
    quick = profile == "quick"
    title = "Quality study: PUB against multi-task baselines"
    if quick:
        title = "Quick smoke run of the quality study (NOT the study)"
    lines += [f"# {title}", ""]
    from .verdict import plot_differences, verdict_section

    lines += verdict_section(cells, comparisons, len(primary), duplicates)
    png = out.with_name(f"{stem}_differences.png")
    if plot_differences(cells, comparisons, len(primary), png):
        lines += [f"![paired differences against equal weighting]({png.name})", ""]
    if origin["dirty"]:
        lines += [
            "> **Not evidence: trained on a checkout with uncommitted code changes**, so no commit",
            "> names the code these numbers came from.",
            "",
        ]
    if quick:
        lines += [
            "> **Quick smoke run, not the study.** Two epochs on 8,000 training rows, two seeds:",
            "> it checks that every method trains on every model and that this report is produced.",
            "> These numbers say nothing about which method is better; see `study.md` for the",
            "> full study (5 seeds, full data, early stopping).",
            "",
        ]
    seeds = sorted({int(r["key"]["seed"]) for r in runs})
    env = runs[0].get("environment", {})
    versions = origin["versions"]
    commits = origin["commits"]
    settings = runs[0].get("settings", {})
    total_run_s = sum(float(r["wall_time_s"]) for r in runs)
    manifest: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        manifest = json.loads((folder / "manifest.json").read_text())
    invocations = checked_invocations(manifest)
    wall_s = sum(float(i.get("wall_time_s", 0.0)) for i in invocations)
    jobs = ", ".join(str(j) for j in sorted({int(i.get("jobs", 1)) for i in invocations}))
    import scipy

    lines += [
        "## How it was run",
        "",
        "- Command: "
        + ", then ".join(f"`{c}`" for c in dict.fromkeys([i["command"] for i in invocations]))
        + f" ({len(invocations)} invocation(s); the cache makes it resumable)"
        if not command
        else f"- Command: `{command}` ({len(invocations)} invocation(s); resumable)",
        f"- Runs: {len(runs)} over datasets {datasets}, models "
        f"{sorted({r['key']['model'] for r in runs})}, {len({r['key']['method'] for r in runs})}"
        f" methods, seeds {seeds} (methods that duplicate another at K = 2 are not run)",
        f"- Settings: epochs {settings.get('epochs')} (early stopping on the mean validation AUC, "
        f"patience {settings.get('patience')}; the best epoch is restored before testing), batch "
        f"{settings.get('batch_size')}, Adam lr {settings.get('lr')}, weight decay "
        f"{settings.get('weight_decay')}, embedding dim {settings.get('embed_dim')}, training rows "
        f"{settings.get('max_train_rows') or 'all'}, evaluation rows "
        f"{settings.get('max_eval_rows') or 'all'}, CAGrad c {settings.get('cagrad_c')}",
        f"- Wall time: {wall_s / 60:.1f} min over the invocations ({jobs} job(s)); the runs "
        f"themselves took {total_run_s / 60:.1f} min of worker time in total",
        f"- Code: commit{'s' if len(commits) > 1 else ''} "
        + ", ".join(f"`{c[:12]}`" for c in commits)
        + f" (code id `{origin['code_id']}`: every run executed the same code; commits that "
        "only add records share it), clean checkout",
        f"- Machine: {origin['cpu_model']}, {env.get('platform', '?')}, {env.get('cpus', '?')} "
        f"CPUs (shared with other work), {env.get('torch_threads', '?')} torch thread per run; "
        f"python {versions['python']}, torch {versions['torch']}, pytorch-lightning "
        f"{versions['pytorch_lightning']}, numpy {versions['numpy']}, pub_optim "
        f"{versions['pub_optim']}, scipy {scipy.__version__} (report). Bit-identical when rerun "
        "on this CPU model with these versions; on another CPU model per-seed AUCs can differ "
        "by ~1e-3 (see `benchmarks/study/provenance.py`)",
        f"- Records: `{_shown(folder)}` (one JSON per run; the full profile's are committed)",
        "",
        "Statistics: per-task test AUC mean ± standard deviation over seeds. Delta-m (Maninis et "
        "al. 2019) against equal weighting in percent, `100/T sum_t (M_t - B_t) / B_t` on the "
        "seed means (AUC: higher is better). *p*: two-sided paired t-test (`scipy.stats."
        "ttest_rel`) of the per-seed mean-over-tasks AUC against equal weighting on the same "
        f"seeds; `*` marks p < {ALPHA} (uncorrected), `(worse)` a significant loss; *p Holm*: "
        f"Holm-Bonferroni within the comparison's family (primary: the {len(primary)} PUB "
        f"variants against equal weighting; secondary: the other "
        f"{len(comparisons) - len(primary)}).",
        "",
    ]
    for dataset in datasets:
        tasks = next(c.task_names for (d, _, _), c in cells.items() if d == dataset)
        lines += [f"## {dataset}", ""]
        header = (
            "| model | method | "
            + " | ".join(f"AUC {t}" for t in tasks)
            + " | mean AUC | Δ mean AUC vs equal (sd) | Δm % | p | p Holm | n |"
        )
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        models = sorted({m for d, m, _ in cells if d == dataset})
        for model in models:
            for name in METHODS:
                found = cells.get((dataset, model, name))
                if found is None:
                    continue
                cell = found
                per_task = [_pm(cell.task_values(t)) for t in range(len(tasks))]
                mean = _pm(list(cell.mean_values().values()))
                c = comparisons.get((dataset, model, name))
                if c is None:
                    extra = ["—", "—", "—", "—", str(len(cell.seeds))]
                else:
                    diff = f"{c.diff_mean:+.4f}" + (
                        "" if math.isnan(c.diff_sd) else f" ({c.diff_sd:.4f})"
                    )
                    extra = [diff, f"{c.delta_m:+.3f}", _p(c), _fmt(c.p_holm, 3), str(c.n)]
                label = (
                    f"**{METHODS[name].label}**"
                    if name.startswith("pub")
                    else (METHODS[name].label)
                )
                lines.append(
                    f"| {model} | {label} | " + " | ".join([*per_task, mean, *extra]) + " |"
                )
        png = out.with_name(f"{stem}_{dataset}_auc.png")
        plot_auc(cells, dataset, png)
        lines += ["", f"![per-task test AUC on {dataset}]({png.name})", ""]

    # Summary per method across (dataset, model) settings.
    lines += [
        "## Summary per method (all datasets and models)",
        "",
        "| method | settings | Δm > 0 | mean Δm % | better, p < 0.05 | worse, p < 0.05 "
        "| better after Holm | worse after Holm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_method: dict[str, list[Comparison]] = defaultdict(list)
    for (_, _, name), c in comparisons.items():
        by_method[name].append(c)
    for name in METHODS:
        cs = by_method.get(name)
        if not cs:
            continue
        better = sum(1 for c in cs if c.p < ALPHA and c.diff_mean > 0)
        worse = sum(1 for c in cs if c.p < ALPHA and c.diff_mean < 0)
        hb = sum(1 for c in cs if c.p_holm < ALPHA and c.diff_mean > 0)
        hw = sum(1 for c in cs if c.p_holm < ALPHA and c.diff_mean < 0)
        lines.append(
            f"| {METHODS[name].label} | {len(cs)} | {sum(1 for c in cs if c.delta_m > 0)} | "
            f"{_mean([c.delta_m for c in cs]):+.3f} | {better} | {worse} | {hb} | {hw} |"
        )
    lines += ["", "## What the data shows", ""]
    lines += findings(comparisons, cells, quick)
    what = plot_weights(runs, out.with_name(f"{stem}_weights.png"))
    lines += [
        "",
        f"## Task weights over training ({what})",
        "",
        "Weights on the task gradients (loss weighting: `exp(-s_k)` for UW, FAMO's effective "
        "weights), on the task gradients' Gram matrix (MGDA, IMTL-G, Nash-MTL, PCGrad, CAGrad) "
        "or on the task updates' Gram matrix (PUB), normalised to sum to one; equal weighting is "
        "constant.",
        "",
        f"![task weights]({stem}_weights.png)",
        "",
        "## Methods and implementations",
        "",
        "All methods are this project's own implementations (no TorchJD code is used in the "
        "study; TorchJD 0.18 is the test oracle for PCGrad and CAGrad and the cost reference "
        "for UPGrad in `cost.py`). Gradient-space methods run through the `UpdateBalancing` "
        'callback with `space="gradient"`; all weights are normalised to sum to one, so Adam '
        "keeps its step size.",
        "",
    ]
    lines += [f"- **{m.label}** (`{m.name}`): {m.source}" for m in METHODS.values()]
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def findings(
    comparisons: dict[tuple[str, str, str], Comparison],
    cells: dict[tuple[str, str, str], Cell],
    quick: bool,
) -> list[str]:
    """Plain statements of what the numbers say (including where PUB does not help)."""
    lines: list[str] = []
    if quick:
        lines.append(
            "- This is a smoke run (two epochs, subsampled data, two seeds): the comparisons "
            "below are printed to check the machinery, not to draw conclusions."
        )
    for name in ("pub-pareto", "pub-min-norm", "pub-equal-magnitude"):
        cs = {k: c for k, c in comparisons.items() if k[2] == name}
        if not cs:
            continue
        pos = [k for k, c in cs.items() if c.delta_m > 0]
        sig_better = [k for k, c in cs.items() if c.p < ALPHA and c.diff_mean > 0]
        sig_worse = [k for k, c in cs.items() if c.p < ALPHA and c.diff_mean < 0]
        no_help = [f"{d}/{m}" for (d, m, _), c in sorted(cs.items()) if c.delta_m <= 0]
        lines.append(
            f"- {METHODS[name].label}: Δm > 0 in {len(pos)} of {len(cs)} (dataset, model) "
            f"settings; significantly better than equal weighting (p < {ALPHA}, uncorrected) in "
            f"{len(sig_better)}, significantly worse in {len(sig_worse)}. "
            + (f"No gain (Δm ≤ 0) on: {', '.join(no_help)}." if no_help else "")
        )
    # PUB against its own gradient-space counterpart, setting by setting.
    pairs = (
        ("pub-pareto", "nash-mtl"),
        ("pub-min-norm", "mgda"),
        ("pub-equal-magnitude", "imtl-g"),
    )
    for pub, grad in pairs:
        both = [
            (comparisons[k], comparisons[(k[0], k[1], grad)])
            for k in comparisons
            if k[2] == pub and (k[0], k[1], grad) in comparisons
        ]
        if both:
            wins = sum(1 for a, b in both if a.delta_m > b.delta_m)
            lines.append(
                f"- {METHODS[pub].label} vs {METHODS[grad].label} (same strategy on gradients): "
                f"higher Δm in {wins} of {len(both)} settings."
            )
    for a, b in (("pub-pareto", "pub-equal-magnitude"), ("nash-mtl", "imtl-g")):
        same = [
            f"{d}/{m}"
            for (d, m, n), cell in sorted(cells.items())
            if n == a
            and (d, m, b) in cells
            and cell.aucs.keys() == cells[(d, m, b)].aucs.keys()
            and all(
                abs(x - y) < 1e-6
                for s in cell.aucs
                for x, y in zip(cell.aucs[s], cells[(d, m, b)].aucs[s], strict=True)
            )
        ]
        if same:
            lines.append(
                f"- {METHODS[a].label} and {METHODS[b].label} give the same test AUC on every "
                f"seed in {len(same)} setting(s) ({', '.join(same)}): with K = 2 tasks the Nash "
                "condition `alpha_k (G alpha)_k = 1` and equal projections both reduce to "
                "`alpha_1 ||d_1|| = alpha_2 ||d_2||`, so the two strategies choose the same "
                "weights (up to solver rounding). They differ only for K >= 3."
            )
    best = sorted(comparisons.items(), key=lambda kv: -kv[1].delta_m)[:3]
    if best:
        lines.append(
            "- Largest Δm: "
            + "; ".join(
                f"{METHODS[k[2]].label} on {k[0]}/{k[1]} ({c.delta_m:+.3f}%)" for k, c in best
            )
            + "."
        )
    sds = [
        _sd(list(cell.mean_values().values()))
        for (_, _, n), cell in cells.items()
        if n == BASELINE and len(cell.seeds) > 1
    ]
    if sds:
        lines.append(
            f"- Seed-to-seed sd of equal weighting's mean AUC: {min(sds):.4f} .. {max(sds):.4f}; "
            "differences between methods smaller than this need the paired test to mean anything."
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Aggregate the study's cached runs.")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", choices=("full", "quick"), default="full")
    parser.add_argument(
        "--allow-dirty", action="store_true",
        help="accept records from a dirty checkout (the report is marked as not evidence)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        write_report(args.run_dir, args.out, profile=args.profile, allow_dirty=args.allow_dirty)
    except ProvenanceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
