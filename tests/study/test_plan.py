"""The study planner: seeds from the measured spread, run times from the records, tranches that
cover every run once within the budget, and the runner's --plan / --tranche."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.study import plan, protocol, run_study

pytest.importorskip("scipy")


def rec(dataset: str, model: str, method: str, seed: int, auc: float, wall: float) -> dict:
    return {"key": {"dataset": dataset, "model": model, "method": method, "seed": seed},
            "test": {"test/mean_auc": auc}, "wall_time_s": wall}  # fmt: skip


RECORDS = [
    *(rec("adult", "mmoe", "equal", s, 0.8, 10.0) for s in range(5)),
    *(rec("adult", "mmoe", "pub-pareto", s, 0.8 + d, 20.0)
      for s, d in enumerate((0.001, -0.0005, 0.0, 0.0012, 0.0003))),
]  # fmt: skip
SETTINGS = (("adult", ("mmoe",)), ("adult-x100", ("mmoe",)), ("adult3-scaled", ("mmoe",)))
METHODS = ("equal", "pub-pareto", "pub-equal-magnitude", "nash-mtl")


def test_seeds_and_times_follow_the_records() -> None:
    plans, m, alpha = plan.make_plan(RECORDS, SETTINGS, METHODS)
    # primary: pub-pareto at K = 2 (x2 settings), pub-pareto + pub-equal-magnitude at K = 3
    assert m == 4 and alpha == pytest.approx(0.05 / 4)
    adult, scaled, three = plans
    assert adult.sd_basis == "measured" and scaled.sd_basis == "from adult"
    assert adult.sd == pytest.approx(protocol.paired_spread(RECORDS)[("adult", "mmoe")])
    assert adult.seeds == protocol.seeds_needed(adult.sd, alpha)
    assert adult.methods == ["equal", "pub-pareto", "nash-mtl"]  # IMTL-G/equal-mag. duplicates
    assert "pub-equal-magnitude" in three.methods
    assert adult.run_s["equal"] == 10.0 and adult.run_s["pub-pareto"] == 20.0
    # no records of nash-mtl: PUB pareto's time x 1.3; adult3 is 1.5 x Adult's size
    assert adult.run_s["nash-mtl"] == pytest.approx(26.0)
    assert three.run_s["equal"] == pytest.approx(15.0)


@pytest.mark.parametrize("budget", [100.0, 400.0, 10_000.0])
def test_tranches_cover_every_run_once_within_budget(budget: float) -> None:
    plans, _, _ = plan.make_plan(RECORDS, SETTINGS, METHODS)
    payload = plan.plan_json(plans, 4, 0.0125, budget)
    keys = [k for t in payload["tranches"] for k in plan.tranche_keys(payload, t["tranche"])]
    expected = Counter(
        (p.scenario, p.model, m, s) for p in plans for m in p.methods for s in range(p.seeds)
    )
    assert Counter((k.dataset, k.model, k.method, k.seed) for k in keys) == expected
    per_seed = max(sum(p.run_s.values()) for p in plans)
    for t in payload["tranches"]:
        assert t["estimated_compute_s"] <= max(budget, per_seed) + 1
    with pytest.raises(ValueError, match="no tranche 999"):
        plan.tranche_keys(payload, 999)


def test_runner_takes_a_tranche(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plan.json"
    path.write_text(
        json.dumps(
            {
                "tranches": [
                    {
                        "tranche": 1,
                        "parts": [
                            {
                                "scenario": "adult",
                                "model": "mmoe",
                                "methods": ["equal"],
                                "seeds": [0],
                            }
                        ],
                    }
                ]
            }
        )
    )
    assert run_study.main(["--plan", str(path), "--tranche", "2", "--cache", str(tmp_path)]) == 2
    assert "no tranche 2" in capsys.readouterr().err
    assert run_study.main(["--plan", str(path), "--cache", str(tmp_path)]) == 2
    assert "go together" in capsys.readouterr().err


def test_cli_writes_the_plan(tmp_path: Path) -> None:
    for r in RECORDS:
        k = r["key"]
        path = (
            tmp_path / "full-x" / k["dataset"] / k["model"] / k["method"] / f"seed{k['seed']}.json"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    out = tmp_path / "plan.json"
    assert plan.main(["--records", str(tmp_path), "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["tranches"] and payload["primary_comparisons"] > 0
    assert plan.main(["--records", str(tmp_path), "--out", str(out), "--budget", "0"]) == 2


def test_cli_available_only_leaves_out_what_cannot_run(tmp_path: Path) -> None:
    from benchmarks.study.methods import METHODS, unavailable

    out = tmp_path / "plan.json"
    assert plan.main(["--records", str(tmp_path), "--out", str(out), "--available-only"]) == 0
    planned = {m for s in json.loads(out.read_text())["settings"] for m in s["methods"]}
    assert planned and all(unavailable(METHODS[m]) is None for m in planned)
