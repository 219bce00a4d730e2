"""The quality study of issue 6: one command, resumable, parallel across runs.

Every (dataset, model, method, seed) is one training run whose result is cached as one JSON file
under ``<cache>/<profile>-<settings id>/<dataset>/<model>/<method>/seed<N>.json``; a rerun skips
the runs already there (same settings), so an interrupted study resumes where it stopped. Runs go
to ``--jobs`` worker processes (``concurrent.futures.ProcessPoolExecutor``, one torch thread each).
At the end :mod:`benchmarks.study.report` aggregates the cache into ``docs/results/``.

    # the full study (hours on 2 CPU cores; resumable; the lead schedules it)
    .venv/bin/python -m benchmarks.study.run_study --jobs 2
    # the smoke check (< 15 minutes on 2 cores): subsampled data, 2 epochs, 2 seeds
    .venv/bin/python -m benchmarks.study.run_study --quick --jobs 2

Profiles: ``full`` is 20 epochs (early stopping on the mean validation AUC, patience 3), batch
512, Adam lr 1e-3, weight decay 1e-6, embedding dim 8, every model's default size, seeds 0-4.
``quick`` trains 2 epochs on 8,000 training rows (validation and test: 8,000 rows) with seeds 0-1:
it checks that every method runs on every model and that the report is produced; its numbers are
not the study.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import platform
import shlex
import sys
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.study.methods import (  # noqa: E402
    METHOD_NAMES,
    STUDY_METHODS,
    get_method,
    unavailable,
)
from benchmarks.study.protocol import runs_at  # noqa: E402
from benchmarks.study.provenance import ProvenanceError, code_state, cpu_model  # noqa: E402
from benchmarks.study.scenarios import SCENARIOS, get_scenario  # noqa: E402
from benchmarks.study.train import (  # noqa: E402
    RunKey,
    Settings,
    load_cached,
    read_record,
    run_one,
    utc_now,
    write_json_atomic,
)

DATASETS = tuple(SCENARIOS)
DEFAULT_DATASETS = ("adult", "movielens")
MODELS = ("shared-bottom", "mmoe", "ple", "sparse-moe")
PROFILES: dict[str, tuple[Settings, tuple[int, ...]]] = {
    "full": (Settings(), (0, 1, 2, 3, 4)),
    "quick": (Settings(epochs=2, max_train_rows=8000, max_eval_rows=8000), (0, 1)),
}
# The full study's records are evidence (one small JSON per run), so they are committed; the quick
# profile's are a smoke check and stay in the ignored runs/ folder.
DEFAULT_CACHE = {
    "full": REPO / "benchmarks" / "study" / "records",
    "quick": REPO / "runs" / "study",
}
REPORTS = {"full": "docs/results/study.md", "quick": "docs/results/study_quick.md"}


def run_dir(cache: Path, profile: str, settings: Settings) -> Path:
    return cache / f"{profile}-{settings.identity()}"


def plan(
    datasets: list[str], models: list[str], methods: list[str], seeds: list[int]
) -> list[RunKey]:
    """All runs, grouped by dataset (each worker loads a dataset once) then model and method.

    A method that duplicates another at the scenario's number of tasks (K = 2: PUB
    equal-magnitude = PUB pareto, IMTL-G = Nash-MTL; see ``protocol``) is left out.
    """
    keys = []
    for d in datasets:
        scenario = get_scenario(d)
        k = scenario.num_tasks if scenario is not None else 0
        keys += [
            RunKey(d, m, meth, s)
            for m in models
            for meth in methods
            if k == 0 or runs_at(meth, k)
            for s in seeds
        ]
    return keys


def refusals(datasets: list[str], methods: list[str]) -> list[str]:
    """Why some of these scenarios or methods cannot run with the installed code."""
    out = []
    for d in datasets:
        scenario = get_scenario(d)
        reason = scenario.unavailable() if scenario is not None else None
        if reason:
            out.append(reason)
    out += [r for r in (unavailable(get_method(m)) for m in methods) if r]
    return out


def invocation_digest(entry: Mapping[str, Any]) -> str:
    """Hash of a manifest entry without its ``digest``: an entry edited by hand no longer
    matches, and the report refuses it."""
    body = {k: v for k, v in entry.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def update_manifest(folder: Path, entry: dict[str, Any], settings: Settings) -> None:
    """Append one invocation (signed with :func:`invocation_digest`) to ``manifest.json``."""
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        manifest = {"settings": settings.to_json(), "settings_id": settings.identity()}
    entry = {**entry, "digest": invocation_digest(entry)}
    manifest.setdefault("invocations", []).append(entry)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, manifest)


def check_code_state(
    keys: list[RunKey], settings: Settings, folder: Path, allow_dirty: bool, rerun_stale: bool
) -> dict[str, Any]:
    """The checkout's code state, after refusing a dirty tree (unless ``allow_dirty``) and
    cached records of other code (unless ``rerun_stale``, which retrains them)."""
    state = code_state()
    if state["dirty"] and not allow_dirty:
        raise ProvenanceError(
            "the checkout has uncommitted changes to the code the study runs ("
            + ", ".join(state["dirty_files"][:5])
            + "): commit them first, so every record names the code it ran (--allow-dirty "
            "trains anyway, and the report refuses those records)"
        )
    stale = []
    for key in keys:
        record = read_record(key.path(folder))
        if record is None or record.get("settings_id") != settings.identity():
            continue
        if load_cached(key.path(folder), settings, state["code_id"], allow_dirty) is None:
            stale.append(key.label())
    if stale and not rerun_stale:
        raise ProvenanceError(
            f"{len(stale)} cached records under {folder} ran at other code (or on a dirty "
            f"checkout), e.g. {stale[0]}: a study's runs share one code state. Pass "
            "--rerun-stale to retrain them at this commit, or use another --cache"
        )
    return state


def execute(
    keys: list[RunKey],
    settings: Settings,
    folder: Path,
    jobs: int,
    log: Any = print,
    allow_dirty: bool = False,
    rerun_stale: bool = False,
) -> tuple[int, int, list[tuple[RunKey, str]]]:
    """Train the runs not yet cached at this code state; returns ``(done, cached, failures)``.

    Raises :class:`ProvenanceError` before any work on a dirty checkout or stale records (see
    :func:`check_code_state`).
    """
    code_id = check_code_state(keys, settings, folder, allow_dirty, rerun_stale)["code_id"]
    pending = [
        k for k in keys if load_cached(k.path(folder), settings, code_id, allow_dirty) is None
    ]
    cached = len(keys) - len(pending)
    log(f"{len(keys)} runs: {cached} cached, {len(pending)} to train with {jobs} job(s)")
    failures: list[tuple[RunKey, str]] = []
    done = 0
    start = time.perf_counter()

    def report(key: RunKey, status: str, seconds: float) -> None:
        nonlocal done
        done += 1
        elapsed = time.perf_counter() - start
        log(f"[{done}/{len(pending)}] {key.label()}: {status} in {seconds:.1f} s "
            f"(elapsed {elapsed / 60:.1f} min)")  # fmt: skip

    if jobs <= 1:
        for key in pending:
            try:
                report(*run_one(key, settings, str(folder), code_id, allow_dirty))
            except Exception as exc:  # one failed run must not stop the study
                failures.append((key, f"{type(exc).__name__}: {exc}"))
                log(f"FAILED {key.label()}: {type(exc).__name__}: {exc}")
        return done, cached, failures
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures: dict[Future[tuple[RunKey, str, float]], RunKey] = {
            pool.submit(run_one, key, settings, str(folder), code_id, allow_dirty): key
            for key in pending
        }
        remaining = set(futures)
        while remaining:
            finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
            for future in finished:
                key = futures[future]
                try:
                    report(*future.result())
                except Exception as exc:
                    failures.append((key, f"{type(exc).__name__}: {exc}"))
                    log(f"FAILED {key.label()}: {type(exc).__name__}: {exc}")
    return done, cached, failures


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.study.run_study", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="the smoke-check profile (see above)")
    p.add_argument("--seeds", type=int, nargs="+", help="default: 0-4 (quick: 0 1)")
    p.add_argument(
        "--datasets", nargs="+", choices=DATASETS, default=list(DEFAULT_DATASETS),
        help="scenarios (benchmarks/study/scenarios.py; default: adult movielens)",
    )  # fmt: skip
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--methods", nargs="+", choices=METHOD_NAMES, default=list(STUDY_METHODS))
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument(
        "--cache", type=Path, default=None,
        help="where the per-run JSON records live (default: full: benchmarks/study/records, "
        "committed with the repository so the study resumes across machines; quick: runs/study)",
    )  # fmt: skip
    p.add_argument(
        "--report", type=Path, default=None,
        help="markdown report to write (default docs/results/study.md, quick: study_quick.md)",
    )  # fmt: skip
    p.add_argument(
        "--plan", type=Path, default=None,
        help="a plan written by python -m benchmarks.study.plan (with --tranche)",
    )  # fmt: skip
    p.add_argument("--tranche", type=int, default=None, help="the plan's tranche to run (1-based)")
    p.add_argument("--no-report", action="store_true", help="train only")
    p.add_argument(
        "--allow-dirty", action="store_true",
        help="train on a checkout with uncommitted code changes (its records are marked dirty and "
        "no report accepts them; for development only)",
    )  # fmt: skip
    p.add_argument(
        "--rerun-stale", action="store_true",
        help="retrain cached records that ran at other code instead of refusing them",
    )  # fmt: skip
    p.add_argument("--report-only", action="store_true", help="aggregate the cache only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    profile = "quick" if args.quick else "full"
    settings, default_seeds = PROFILES[profile]
    seeds = list(args.seeds) if args.seeds else list(default_seeds)
    if "equal" not in args.methods:
        args.methods = ["equal", *args.methods]  # the baseline of every comparison
    cache = args.cache if args.cache is not None else DEFAULT_CACHE[profile]
    folder = run_dir(cache, profile, settings)
    if (args.plan is None) != (args.tranche is None):
        print("error: --plan and --tranche go together", file=sys.stderr)
        return 2
    if args.plan is not None:
        from benchmarks.study.plan import tranche_keys

        try:
            keys = tranche_keys(json.loads(args.plan.read_text()), args.tranche)
        except (OSError, ValueError, KeyError) as exc:
            print(
                f"error: cannot use tranche {args.tranche} of {args.plan}: {exc}", file=sys.stderr
            )
            return 2
        args.datasets = sorted({k.dataset for k in keys})
        args.methods = sorted({k.method for k in keys})
    else:
        keys = plan(args.datasets, args.models, args.methods, seeds)
    problems = refusals(args.datasets, args.methods)
    if problems and not args.report_only:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    command = "python -m benchmarks.study.run_study " + shlex.join(argv or sys.argv[1:])
    started = time.perf_counter()
    failures: list[tuple[RunKey, str]] = []
    if not args.report_only:
        print(f"profile {profile}, settings {settings.identity()}, cache {folder}")
        started_utc = utc_now()
        try:
            done, cached, failures = execute(
                keys, settings, folder, args.jobs,
                allow_dirty=args.allow_dirty, rerun_stale=args.rerun_stale,
            )  # fmt: skip
        except ProvenanceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        state = code_state()
        update_manifest(
            folder,
            {
                "command": command,
                "started_utc": started_utc,
                "finished_utc": utc_now(),
                "wall_time_s": time.perf_counter() - started,
                "jobs": args.jobs,
                "trained": done,
                "cached": cached,
                "failed": [f"{k.label()}: {msg}" for k, msg in failures],
                "host": platform.node(),
                "cpu_model": cpu_model(),
                "commit": state["commit"],
                "code_id": state["code_id"],
                "dirty": state["dirty"],
            },
            settings,
        )
        print(f"trained {done}, cached {cached}, failed {len(failures)} in "
              f"{(time.perf_counter() - started) / 60:.1f} min")  # fmt: skip
    if not args.no_report:
        from benchmarks.study.report import write_report

        out = args.report if args.report is not None else REPO / REPORTS[profile]
        # The command that trained the runs (a --report-only call only re-renders them).
        shown = "" if args.report_only else command
        try:
            write_report(
                folder, out, keys=None if args.plan is not None else keys,
                profile=profile, command=shown,
                allow_dirty=args.allow_dirty,
            )  # fmt: skip
        except ProvenanceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
