"""The report's statistics on hand-made cached runs: Delta-m, the paired t-test, Holm."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.study.report import Comparison, build_cells, compare, holm, load_runs, write_report
from benchmarks.study.train import RunKey, Settings, write_json_atomic

stats = pytest.importorskip("scipy.stats")

AUCS = {
    "equal": {0: [0.80, 0.70], 1: [0.82, 0.71], 2: [0.81, 0.69]},
    "pub-pareto": {0: [0.81, 0.71], 1: [0.82, 0.73], 2: [0.83, 0.70]},
    "mgda": {0: [0.79, 0.70], 1: [0.80, 0.70], 2: [0.81, 0.68]},
}


PROVENANCE = {
    "commit": "a" * 40,
    "dirty": False,
    "dirty_files": [],
    "code_id": "c0de",
    "versions": {"python": "3", "torch": "2", "pytorch_lightning": "2", "numpy": "1",
                 "pub_optim": "0.1"},
    "cpu_model": "Toy CPU",
}  # fmt: skip


def fake_run(key: RunKey, aucs: list[float]) -> dict:
    tasks = ["a", "b"]
    return {
        "schema": 1,
        "key": {"dataset": key.dataset, "model": key.model, "method": key.method, "seed": key.seed},
        "settings_id": Settings().identity(),
        "settings": Settings().to_json(),
        "task_names": tasks,
        "test": {f"test/auc/{t}": v for t, v in zip(tasks, aucs, strict=True)},
        "wall_time_s": 1.0,
        "epochs_run": 1,
        "weights": {"every": 1, "rows": [[0.0, 0.5, 0.5], [1.0, 0.6, 0.4]]},
        "environment": {"torch": "x"},
        "provenance": dict(PROVENANCE),
    }


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for method, by_seed in AUCS.items():
        for seed, aucs in by_seed.items():
            key = RunKey("toy", "mmoe", method, seed)
            write_json_atomic(key.path(tmp_path), fake_run(key, aucs))
    return tmp_path


def test_delta_m_and_paired_test(folder: Path) -> None:
    cells = build_cells(load_runs(folder))
    c = compare(cells[("toy", "mmoe", "pub-pareto")], cells[("toy", "mmoe", "equal")])
    # Delta-m on the seed means: task a 0.82 vs 0.81, task b 0.71333 vs 0.70
    expected = 100 / 2 * ((0.82 - 0.81) / 0.81 + (0.72 + 0.71 + 0.71 - 0.7 * 3) / 3 / 0.70)
    assert c.delta_m == pytest.approx(expected, rel=1e-9)
    # per-seed mean-over-tasks differences 0.01, 0.01, 0.015: t = mean / (sd / sqrt 3)
    diffs = [0.01, 0.01, 0.015]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    t = mean / (sd / math.sqrt(3))
    assert c.t == pytest.approx(t, rel=1e-6)
    assert c.p == pytest.approx(2 * stats.t.sf(t, df=2), rel=1e-6)
    assert c.n == 3 and c.diff_mean == pytest.approx(mean)
    worse = compare(cells[("toy", "mmoe", "mgda")], cells[("toy", "mmoe", "equal")])
    assert worse.delta_m < 0 and worse.diff_mean < 0


def test_holm() -> None:
    cs = [Comparison(0, 0, 0, 0, p, 5) for p in (0.01, 0.04, 0.03, math.nan)]
    holm(cs)
    # sorted p: 0.01 (x3), 0.03 (x2), 0.04 (x1), monotone
    assert [c.p_holm for c in cs[:3]] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(cs[3].p_holm)


def test_report_files(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "docs" / "study_quick.md"
    text = write_report(folder, out, profile="quick", command="python -m x --quick")
    assert "Quick smoke run, not the study" in text
    assert "python -m x --quick" in text
    assert "| mmoe | **PUB pareto** | 0.8200 ± 0.0100 |" in text
    assert out.with_name("study_quick_toy_auc.png").stat().st_size > 0
    assert out.with_name("study_quick_weights.png").stat().st_size > 0
    assert json.loads((folder / "toy" / "mmoe" / "equal" / "seed0.json").read_text())["key"]


def test_report_command_of_the_docstring_runs(folder: Path, tmp_path: Path) -> None:
    """``python -m benchmarks.study.report`` (the command in its docstring) writes the report."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "out" / "study.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.study.report", "--run-dir", str(folder),
         "--out", str(out)],
        cwd=repo, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "| mmoe | **PUB pareto** |" in out.read_text()


def _rewrite(folder: Path, method: str, seed: int, **changes: object) -> None:
    path = RunKey("toy", "mmoe", method, seed).path(folder)
    record = json.loads(path.read_text())
    record["provenance"].update(changes)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"code_id": "other"}, "mix 2 code states"),
        ({"cpu_model": "Other CPU"}, "mix 2 CPU models"),
        ({"dirty": True, "dirty_files": ["pub_optim/wrapper.py"]}, "uncommitted code changes"),
    ],
)
def test_report_refuses_records_of_more_than_one_code_state(
    folder: Path, tmp_path: Path, changes: dict, message: str
) -> None:
    from benchmarks.study.provenance import ProvenanceError

    _rewrite(folder, "mgda", 1, **changes)
    out = tmp_path / "refused.md"
    with pytest.raises(ProvenanceError, match=message):
        write_report(folder, out)
    assert not out.exists()


def test_report_refuses_records_without_provenance(folder: Path, tmp_path: Path) -> None:
    from benchmarks.study.provenance import ProvenanceError
    from benchmarks.study.report import main

    path = RunKey("toy", "mmoe", "equal", 0).path(folder)
    record = json.loads(path.read_text())
    del record["provenance"]
    path.write_text(json.dumps(record))
    with pytest.raises(ProvenanceError, match="carry no provenance"):
        write_report(folder, tmp_path / "x.md")
    assert main(["--run-dir", str(folder), "--out", str(tmp_path / "x.md")]) == 2


def test_report_refuses_a_hand_edited_manifest(folder: Path, tmp_path: Path) -> None:
    from benchmarks.study.provenance import ProvenanceError
    from benchmarks.study.run_study import update_manifest

    update_manifest(folder, {"command": "python -m x", "wall_time_s": 60.0, "jobs": 1}, Settings())
    text = write_report(folder, tmp_path / "ok.md")
    assert "Wall time: 1.0 min" in text and "`aaaaaaaaaaaa`" in text and "Toy CPU" in text
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["invocations"][0]["wall_time_s"] = 9000.0
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ProvenanceError, match="not written by the runner"):
        write_report(folder, tmp_path / "edited.md")


def test_verdict_first_with_ci_and_detectable_effect(folder: Path, tmp_path: Path) -> None:
    # PUB equal-magnitude identical to PUB pareto on every seed (K = 2): reported once.
    for seed, aucs in AUCS["pub-pareto"].items():
        key = RunKey("toy", "mmoe", "pub-equal-magnitude", seed)
        write_json_atomic(key.path(folder), fake_run(key, aucs))
    out = tmp_path / "study.md"
    text = write_report(folder, out)
    assert text.index("## Verdict") < text.index("## How it was run") < text.index("## toy")
    assert "PUB equal-mag." not in text.split("## How it was run")[0].split("Reported once")[0]
    assert "PUB equal-mag. = PUB pareto in every setting" in text
    # one primary comparison (PUB pareto): diffs 0.01, 0.01, 0.015
    diffs = [0.01, 0.01, 0.015]
    mean = sum(diffs) / 3
    half = stats.t.ppf(0.975, 2) * stats.tstd(diffs) / math.sqrt(3)
    row = next(r for r in text.splitlines() if r.startswith("| toy / mmoe | PUB pareto |"))
    assert f"| {mean:+.4f} | [{mean - half:+.4f}, {mean + half:+.4f}] |" in row
    assert "**better**" in row and row.rstrip().endswith(" |") and "±" in row
    assert "Primary comparisons: 1 " in text
    mgda = next(r for r in text.splitlines() if r.startswith("| toy / mmoe | MGDA |"))
    assert "no difference detected" in mgda or "**worse**" in mgda
    assert out.with_name("study_differences.png").stat().st_size > 0
