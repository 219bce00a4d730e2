"""Why PUB's weights stay near equal under Adam, and what ``state`` and ``space`` change.

Two tasks of UCI Adult (income, never-married) on a shared-bottom MLP, the income loss multiplied
by ``--scale`` (default 100), Adam(lr=1e-3), batch 512. For each variant the balancer's
diagnostics (``PUB(diagnostics=True)``) are recorded at every step: the weight on the scaled task,
the update-space and gradient-space cosines, the update and gradient norm ratios, and each task's
attributable share ``||d_k - d_0|| / ||d_k||``; test AUC per task at the end.

    .venv/bin/python -m benchmarks.mechanism          # docs/results/mechanism.{md,json,png}
    .venv/bin/python -m benchmarks.mechanism --steps 40 --out /tmp/m     # a quick look

Variants: PUB pareto with the shared state (the paper's), with ``state="per_task"``, in the
``space="marginal"``; Nash-MTL (pareto on the gradients, ``space="gradient"``); equal weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.machine import header_lines
from benchmarks.study.provenance import code_state
from pub_optim import PUB

REPO = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, Any]] = {
    "PUB shared (paper)": {"strategy": "pareto"},
    "PUB per-task state": {"strategy": "pareto", "state": "per_task"},
    "PUB marginal": {"strategy": "pareto", "space": "marginal"},
    "Nash-MTL (gradient)": {"strategy": "pareto", "space": "gradient"},
    "equal": {"strategy": "equal"},
}


class SharedBottom(nn.Module):
    def __init__(self, cardinalities: tuple[int, ...], num_features: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embeddings = nn.ModuleList(nn.Embedding(c, 8) for c in cardinalities)
        width = 8 * len(cardinalities) + num_features
        self.bottom = nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.towers = nn.ModuleList(nn.Linear(32, 1) for _ in range(2))

    def forward(self, cat: Tensor, num: Tensor) -> list[Tensor]:
        x = torch.cat([e(cat[:, i]) for i, e in enumerate(self.embeddings)] + [num], dim=1)
        z = self.bottom(x)
        return [tower(z).squeeze(-1) for tower in self.towers]


def auc(scores: Tensor, labels: Tensor) -> float:
    order = torch.argsort(scores)
    ranks = torch.empty_like(order, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    pos = labels > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def run_variant(data: Any, options: dict[str, Any], scale: float, steps: int, seed: int) -> dict:
    model = SharedBottom(data.cat_cardinalities, len(data.num_names), seed)
    shared = [*model.embeddings.parameters(), *model.bottom.parameters()]
    pub = PUB(
        torch.optim.Adam(model.parameters(), lr=1e-3),
        options["strategy"],
        space=options.get("space", "update"),
        state=options.get("state", "shared"),
        diagnostics=True,
        shared_params=shared,
    )
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(seed)
    train = data.train
    trace: dict[str, list[float]] = {
        key: []
        for key in (
            "weight_scaled",
            "update_cosine",
            "gradient_cosine",
            "update_norm_ratio",
            "gradient_norm_ratio",
            "attributable_scaled",
            "attributable_other",
        )
    }
    started = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(0, len(train), (512,), generator=gen)
        b = train.batch(index)
        logits = model(b["cat"], b["num"])
        losses = [loss_fn(logits[k], b["labels"][:, k].float()) for k in range(2)]
        pub.zero_grad()
        pub.backward([losses[0] * scale, losses[1]])
        pub.step()
        stats = pub.last_stats
        assert stats is not None and stats.diagnostics is not None
        d = stats.diagnostics
        assert d.gradient_norms is not None and d.gradient_cosines is not None
        trace["weight_scaled"].append(float(stats.weights[0]))
        trace["gradient_cosine"].append(float(d.gradient_cosines[0, 1]))
        g = d.gradient_norms
        trace["gradient_norm_ratio"].append(float(g[0] / g[1]) if float(g[1]) > 0 else float("nan"))
        if d.update_cosines is not None and d.update_norms is not None:
            u = d.update_norms
            trace["update_cosine"].append(float(d.update_cosines[0, 1]))
            trace["update_norm_ratio"].append(float(u[0] / u[1]))
        else:
            trace["update_cosine"].append(float("nan"))
            trace["update_norm_ratio"].append(float("nan"))
        a = d.attributable
        trace["attributable_scaled"].append(float("nan") if a is None else float(a[0]))
        trace["attributable_other"].append(float("nan") if a is None else float(a[1]))
    seconds = time.perf_counter() - started
    with torch.no_grad():
        logits = model(data.test.cat, data.test.num)
    aucs = [auc(logits[k], data.test.labels[:, k]) for k in range(2)]
    return {"trace": trace, "test_auc": aucs, "seconds": seconds}


def summarise(trace: dict[str, list[float]], skip: int) -> dict[str, str]:
    def q(key: str) -> str:
        values = np.asarray(trace[key][skip:], dtype=float)
        values = values[np.isfinite(values)]
        if not len(values):
            return "-"
        lo, med, hi = np.percentile(values, [5, 50, 95])
        return f"{med:.3g} [{lo:.3g}, {hi:.3g}]"

    return {key: q(key) for key in trace}


def plot(results: dict[str, dict], out: Path, scale: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("weight_scaled", f"weight on the x{scale:g} task"),
        ("update_cosine", "cosine of the two look-ahead updates"),
        ("gradient_cosine", "cosine of the two gradients"),
        ("attributable_scaled", "attributable share ||d-d0||/||d||, x100 task"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    colours = {name: f"C{i}" for i, name in enumerate(results)}  # one colour per variant
    for ax, (key, title) in zip(axes, panels, strict=True):
        for name, result in results.items():
            values = np.asarray(result["trace"][key], dtype=float)
            if np.isfinite(values).any():
                ax.plot(values, label=name, linewidth=1, color=colours[name])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=100.0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    args = parser.parse_args(argv)
    if not args.scale > 0 or not np.isfinite(args.scale):
        parser.error(f"--scale must be a positive number, got {args.scale}")
    if args.steps < 20:
        parser.error(
            f"--steps must be at least 20 (the summary skips the first 10), got {args.steps}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    from integrations.moe_ranking.data import load_data

    torch.set_num_threads(2)
    data = load_data("adult")
    results = {
        name: run_variant(data, options, args.scale, args.steps, args.seed)
        for name, options in VARIANTS.items()
    }
    state = code_state(REPO)
    command = "python -m benchmarks.mechanism " + " ".join(sys.argv[1:] if argv is None else argv)
    keys = [
        ("weight_scaled", "weight on scaled task"),
        ("update_cosine", "update cos"),
        ("gradient_cosine", "gradient cos"),
        ("update_norm_ratio", "update norm ratio"),
        ("gradient_norm_ratio", "gradient norm ratio"),
        ("attributable_scaled", "attributable (scaled)"),
        ("attributable_other", "attributable (other)"),
    ]
    lines = [
        f"# Mechanism: Adult, income loss x{args.scale:g}, Adam, shared-bottom MLP",
        "",
        *header_lines(),
        f"- commit: {state.get('commit', '?')}{' (dirty)' if state.get('dirty') else ''}",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- command: `{command.strip()}`",
        f"- {args.steps} steps of batch 512, seed {args.seed}; per step median [5th, 95th "
        "percentile] over steps 10 onwards; test AUC after the last step (one seed: a look at "
        "the mechanism, not a quality comparison)",
        "",
        "| variant | "
        + " | ".join(label for _, label in keys)
        + " | test AUC income | never-married |",
        "|---|" + "---|" * (len(keys) + 2),
    ]
    for name, result in results.items():
        summary = summarise(result["trace"], 10)
        aucs = result["test_auc"]
        lines.append(
            f"| {name} | "
            + " | ".join(summary[key] for key, _ in keys)
            + f" | {aucs[0]:.4f} | {aucs[1]:.4f} |"
        )
    lines += ["", "![mechanism](mechanism.png)", ""]
    (args.out / "mechanism.md").write_text("\n".join(lines))
    (args.out / "mechanism.json").write_text(
        json.dumps(
            {"provenance": state, "args": vars(args) | {"out": str(args.out)}, "results": results}
        )
    )
    plot(results, args.out / "mechanism.png", args.scale)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
