"""Command line: ``fit`` (one training run), ``demo`` (the main job: Adult, equal vs pareto) and
``predict`` (one task's scores from a ``fit`` run's ``model.pt``).

Examples::

    python -m integrations.moe_ranking demo
    python -m integrations.moe_ranking fit --data adult --model mmoe --balancer pareto
    python -m integrations.moe_ranking fit --data movielens --model ple --esmm --balancer equal
    python -m integrations.moe_ranking fit --data aliexpress --data-dir data --country NL
    python -m integrations.moe_ranking predict --run outputs/run --task income --out scores.csv

Exit status: 0 on success, 2 for a problem the user can fix (bad option, missing or invalid data;
the message says what to do), 130 when interrupted. A failed run leaves no output folder behind.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .checks import check_args
from .data import DATASETS
from .errors import ConfigError, UserError
from .models import MODELS
from .models.grec import ROUTINGS as GREC_ROUTINGS

BALANCER_CHOICES = (
    "equal",
    "pareto",
    "min-norm",
    "equal-magnitude",
    "pareto-per-task",
    "pareto-marginal",
    "mgda",
    "imtl-g",
    "nash-mtl",
)
DEMO_BALANCERS = ("equal", "pareto")
DEMO_OUT = Path("outputs/demo")
#: The main job's settings (``demo``): small enough for 5 minutes on 2 CPU cores, both runs.
DEMO_DEFAULTS: dict[str, Any] = {
    "model": "mmoe",
    "epochs": 20,
    "batch_size": 512,
    "lr": 3e-3,
    "patience": 3,
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _finite_positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _add_common(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    p.add_argument("--model", choices=MODELS, default=defaults.get("model", "mmoe"))
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--epochs", type=_positive_int, default=defaults.get("epochs", 20))
    p.add_argument("--batch-size", type=_positive_int, default=defaults.get("batch_size", 512))
    p.add_argument("--lr", type=_positive_float, default=defaults.get("lr", 3e-3))
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument(
        "--patience",
        type=_positive_int,
        default=defaults.get("patience", 3),
        help="early stopping: epochs without a better mean validation AUC",
    )
    p.add_argument("--embed-dim", type=_positive_int, default=8)
    p.add_argument(
        "--experts", type=_positive_int, default=None, help="experts (MMoE, sparse MoE, GRec)"
    )
    p.add_argument(
        "--top-k", type=_positive_int, default=None, help="experts per token (sparse MoE, GRec)"
    )
    p.add_argument(
        "--routing",
        choices=GREC_ROUTINGS,
        default=None,
        help="GRec: route every token, each task sentence, or on the task token alone (default "
        "task: a task's experts are then fixed, serving one task runs only those)",
    )
    p.add_argument(
        "--capacity-factor",
        type=_finite_positive_float,
        default=None,
        help="GRec: expert capacity factor, units beyond capacity are dropped (default dropless)",
    )
    p.add_argument(
        "--router-jitter",
        type=_unit_interval,
        default=None,
        help="GRec: multiplicative router jitter eps in [0, 1) while training (default 0, off)",
    )
    p.add_argument("--levels", type=_positive_int, default=None, help="CGC levels (PLE)")
    p.add_argument("--shared-experts", type=_positive_int, default=None, help="PLE shared experts")
    p.add_argument("--task-experts", type=_positive_int, default=None, help="PLE experts per task")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads (default 1: the models are small and cores are often shared)",
    )
    p.add_argument(
        "--accelerator",
        choices=("cpu", "gpu", "auto"),
        default="cpu",
        help="Lightning accelerator (default cpu, deterministic)",
    )
    progress = p.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None)
    progress.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m integrations.moe_ranking",
        description="Multi-task ranking models trained with and without Parameter Update "
        "Balancing (PUB).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{fit,demo,predict}")
    fit = sub.add_parser("fit", help="train one model and write metrics and a plot")
    fit.add_argument("--data", choices=DATASETS, default="adult")
    fit.add_argument("--balancer", choices=BALANCER_CHOICES, default="equal")
    fit.add_argument(
        "--esmm", action="store_true", help="ESMM for funnel tasks (CTCVR = CTR x CVR)"
    )
    _add_common(fit, {})
    fit.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default outputs/<data>-<model>-<balancer>-seed<seed>, replaced "
        "on re-runs; an explicit folder that is not empty needs --overwrite)",
    )
    data = fit.add_argument_group("data options")
    data.add_argument("--data-path", type=Path, help="adult: a copy of the Adult file")
    data.add_argument(
        "--data-dir", type=Path, help="aliexpress: folder holding AliExpress_<country>/ "
        "(default ./data); movielens: folder holding the MovieLens100k_*.parquet.brotli files; "
        "rf1: folder holding rf1_train.parquet.brotli and rf1_test.parquet.brotli"
    )  # fmt: skip
    data.add_argument("--country", choices=("NL", "ES", "FR", "US"), default="NL")
    data.add_argument("--max-rows", type=_positive_int, help="aliexpress: read only this many rows")
    data.add_argument(
        "--impute-missing",
        action="store_true",
        help="aliexpress: impute missing numeric values (default: report them as an error)",
    )
    data.add_argument(
        "--conflict", type=float, default=0.5, help="synthetic: 0 same task .. 1 opposed tasks"
    )
    data.add_argument("--funnel", action="store_true", help="synthetic: nested (funnel) tasks")
    data.add_argument(
        "--num-tasks", type=int, default=None, metavar="K",
        help="movielens: K genre tasks (2..16; 'liked' within a group of genres, each on its own "
        "rows) instead of like / five_star",
    )  # fmt: skip
    data.add_argument("--n-train", type=_positive_int, default=None, help="synthetic: rows")

    demo = sub.add_parser(
        "demo", help="the main job: Adult, equal weighting vs PUB pareto, per-task test AUC"
    )
    _add_common(demo, DEMO_DEFAULTS)
    demo.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default {DEMO_OUT}, replaced on re-runs; an explicit folder that "
        "is not empty needs --overwrite)",
    )
    predict = sub.add_parser(
        "predict",
        help="score the test rows for one task with a fit run's model.pt (only that task's "
        "tower runs)",
    )
    predict.add_argument("--run", type=Path, required=True, help="the --out folder of a fit run")
    predict.add_argument("--task", required=True, help="the task to score (one of the run's)")
    predict.add_argument("--out", type=Path, required=True, help="CSV file: row,logit,probability")
    predict.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    predict.add_argument(
        "--data-path", type=Path, help="adult: where the Adult file is now (default: the run's)"
    )
    predict.add_argument(
        "--data-dir", type=Path, help="aliexpress, movielens, rf1: where the files are now"
    )
    predict.add_argument("--batch-size", type=_positive_int, default=4096)
    predict.add_argument("--threads", type=_positive_int, default=1)
    return parser


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    from .checks import model_options

    return model_options(args)


def _data_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.data == "adult":
        return {"path": args.data_path}
    if args.data == "movielens":
        return {"data_dir": args.data_dir, "num_tasks": args.num_tasks}
    if args.data == "rf1":
        return {"data_dir": args.data_dir}
    if args.data == "aliexpress":
        return {
            "root": args.data_dir if args.data_dir is not None else Path("data"),
            "country": args.country,
            "max_rows": args.max_rows,
            "numeric_missing": "impute" if args.impute_missing else "error",
        }
    if not 0.0 <= args.conflict <= 1.0:
        raise ConfigError(f"--conflict must be in [0, 1], got {args.conflict}")
    return {"conflict": args.conflict, "funnel": args.funnel, "n_train": args.n_train}


def _progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() if args.progress is None else bool(args.progress)


def environment() -> dict[str, str]:
    """Machine and versions, written next to every result."""
    import pytorch_lightning
    import torch
    import torchmetrics

    return {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "pytorch_lightning": pytorch_lightning.__version__,
        "torchmetrics": torchmetrics.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "command": " ".join(["python -m integrations.moe_ranking", *sys.argv[1:]]),
    }


def write_run(folder: Path, result: Any, title: str) -> None:
    """metrics.json, history.csv (per epoch), task_weights.csv (per step), plot.png and, for MoE
    models that route per task, experts.png (routing share per task and expert, last epoch)."""
    from .metrics import task_shares
    from .outputs import write_csv, write_json
    from .plots import plot_expert_load, plot_runs

    payload = result.to_json()
    payload["environment"] = environment()
    write_json(folder / "metrics.json", payload)
    write_csv(folder / "history.csv", result.history)
    write_csv(folder / "task_weights.csv", result.weights)
    plot_runs({result.config.balancer: result}, folder / "plot.png", title=title)
    if task_shares(result.expert_load):
        plot_expert_load(result.expert_load, folder / "experts.png", title=f"{title}: expert load")


def _metric_key(test: dict[str, float], metric: str, task: str) -> str:
    """``test/<metric>/<task>``; the metric ``score`` is the AUC of a binary task and the R² of
    a regression task."""
    from .metrics import score_key

    return score_key(test, task) if metric == "score" else f"test/{metric}/{task}"


def format_table(results: dict[str, Any], metric: str = "auc") -> str:
    """Per-task table of a test metric, one column per run, plus the difference to the first;
    the last row is the mean over tasks. ``metric="score"``: AUC of binary tasks, R² of
    regression tasks."""
    names = list(results)
    first = results[names[0]]
    tasks = list(first.task_names)
    header = f"{'task':<16}" + "".join(f"{n:>12}" for n in names)
    if len(names) > 1:
        header += "".join(f"{n + ' - ' + names[0]:>22}" for n in names[1:])
    lines = [header, "-" * len(header)]
    rows = [*tasks, "mean"]
    per_task = {
        n: [
            results[n].test.get(_metric_key(results[n].test, metric, t), float("nan"))
            for t in tasks
        ]
        for n in names
    }
    for row, task in enumerate(rows):
        if task == "mean":
            values = [sum(per_task[n]) / len(tasks) for n in names]
        else:
            values = [per_task[n][row] for n in names]
        line = f"{task:<16}" + "".join(f"{v:>12.4f}" for v in values)
        line += "".join(f"{v - values[0]:>+22.4f}" for v in values[1:])
        lines.append(line)
    return "\n".join(lines)


def cmd_fit(args: argparse.Namespace) -> int:
    import torch

    from .data import load_data
    from .outputs import atomic_output_dir, check_output_dir
    from .serving import MODEL_FILE, save_model
    from .training import TrainConfig, make_balancer_callback, run_training

    torch.set_num_threads(args.threads)
    suffix = "-esmm" if args.esmm else ""
    default_out = (
        Path("outputs") / f"{args.data}-{args.model}{suffix}-{args.balancer}-seed{args.seed}"
    )
    out = args.out if args.out is not None else default_out
    overwrite, replace_own = args.overwrite, args.out is None
    config = TrainConfig(
        data=args.data,
        model=args.model,
        balancer=args.balancer,
        esmm=args.esmm,
        seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        patience=args.patience,
        embed_dim=args.embed_dim,
        accelerator=args.accelerator,
        model_options=_model_options(args),
        data_options={
            k: str(v) if isinstance(v, Path) else v for k, v in _data_options(args).items()
        },
    )
    # Everything that can be checked without training is checked before any training.
    config.validate()
    make_balancer_callback(config.balancer)
    check_output_dir(out, overwrite, replace_own)
    data = load_data(args.data, **_data_options(args))
    print(data.describe())
    result = run_training(config, data, progress=_progress(args))
    with atomic_output_dir(out, overwrite, replace_own) as folder:
        title = f"{data.name}, {args.model}{suffix}, {args.balancer}, seed {args.seed}"
        write_run(folder, result, title)
        save_model(folder / MODEL_FILE, result.model, asdict(result.config), data)
    metric = "AUC" if "regression" not in data.kinds() else "AUC / R² (regression tasks)"
    print(f"\n{data.name} / {args.model}{suffix} / {args.balancer}: test {metric} "
          f"(best epoch {result.best_epoch + 1}, {result.wall_time_s:.0f} s)")  # fmt: skip
    print(format_table({args.balancer: result}, "score"))
    if result.expert_load:
        dead = {k: int(v) for k, v in result.expert_load.items() if k.endswith("/dead")}
        print(f"expert load (last epoch): dead experts {dead}")
    files = "metrics.json, history.csv, task_weights.csv, plot.png"
    files += ", experts.png" if (out / "experts.png").exists() else ""
    print(f"wrote {out}/ ({files}, {MODEL_FILE})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Score the test rows for one task with a fit run's model (only that task's tower runs)."""
    import torch

    from .serving import (
        build_saved_model,
        check_output_file,
        load_data_for,
        predict,
        read_run,
        write_scores,
    )

    torch.set_num_threads(args.threads)
    run = read_run(args.run)  # before any data: the run folder, its model file and the task
    run.check_task(args.task)
    check_output_file(args.out, args.overwrite)
    model = build_saved_model(run)
    overrides: dict[str, Any] = {}
    if args.data_path is not None:
        overrides["path"] = str(args.data_path)
    if args.data_dir is not None:
        key = "root" if run.config["data"] == "aliexpress" else "data_dir"
        overrides[key] = str(args.data_dir)
    data = load_data_for(run, **overrides)
    rows, logits = predict(model, data.test, args.task, batch_size=args.batch_size)
    index = data.task_names.index(args.task)
    kind, units = data.kinds()[index], (0.0, 1.0)
    if "target_scale" in data.info:  # regression labels centred and scaled by the loader
        units = (data.info["target_mean"][index], data.info["target_scale"])  # type: ignore[index]
    write_scores(args.out, rows, logits, kind=kind, units=units)
    print(f"{data.name} / {run.config['model']}: scored {len(rows)} of {len(data.test)} test "
          f"rows for task {args.task}; wrote {args.out}")  # fmt: skip
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: train on Adult with equal weighting and with PUB pareto, print the table."""
    import torch

    from .data import load_adult
    from .outputs import atomic_output_dir, check_output_dir, write_json
    from .plots import plot_runs
    from .serving import MODEL_FILE, save_model
    from .training import TrainConfig, make_balancer_callback, run_training

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    for balancer in DEMO_BALANCERS:
        make_balancer_callback(balancer)
    out = args.out if args.out is not None else DEMO_OUT
    replace_own = args.out is None
    check_output_dir(out, args.overwrite, replace_own)
    data = load_adult()
    print(data.describe())
    options = _model_options(args)
    results = {}
    for i, balancer in enumerate(DEMO_BALANCERS, 1):
        config = TrainConfig(
            data="adult",
            model=args.model,
            balancer=balancer,
            seed=args.seed,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            patience=args.patience,
            embed_dim=args.embed_dim,
            accelerator=args.accelerator,
            model_options=options,
        )
        head = f"[{i}/{len(DEMO_BALANCERS)}] {args.model}, balancer {balancer}, seed {args.seed}"
        print(f"{head} ...", flush=True)
        results[balancer] = run_training(config, data, progress=_progress(args))
        r = results[balancer]
        print(f"      {r.wall_time_s:.0f} s, {r.epochs_run} epochs, best epoch {r.best_epoch + 1}",
              flush=True)  # fmt: skip
    wall = time.perf_counter() - start
    table = format_table(results, "auc")
    logloss = format_table(results, "logloss")
    with atomic_output_dir(out, args.overwrite, replace_own) as folder:
        for balancer, result in results.items():
            (folder / balancer).mkdir()
            write_run(folder / balancer, result, f"adult, {args.model}, {balancer}")
            save_model(folder / balancer / MODEL_FILE, result.model, asdict(result.config), data)
        plot_runs(results, folder / "comparison.png", title=f"Adult, {args.model}: equal vs pareto")
        summary = {
            "test_auc": {b: {t: r.test_auc(t) for t in r.task_names} for b, r in results.items()},
            "wall_time_s": wall,
            "environment": environment(),
        }
        write_json(folder / "summary.json", summary)
        (folder / "table.txt").write_text(f"test AUC\n{table}\n\ntest log loss\n{logloss}\n")
    print(f"\nAdult (official test split, {len(data.test)} rows), {args.model}, seed {args.seed}")
    print("test AUC")
    print(table)
    print("\ntest log loss")
    print(logloss)
    print(f"\nmain job wall time: {wall:.0f} s; wrote {out}/")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ConfigError as exc:
        parser.error(str(exc))  # exit 2 with "error: ...", before any work
    try:
        if args.command == "fit":
            return cmd_fit(args)
        if args.command == "predict":
            return cmd_predict(args)
        return cmd_demo(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


__all__ = ["build_parser", "format_table", "main"]
