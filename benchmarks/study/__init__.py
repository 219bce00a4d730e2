"""The evidence study: quality of PUB against the multi-task baselines, the paper's AliExpress
protocol, and the cost of every method.

* ``plan.py``: the study's design: settings, seeds per setting from the measured paired spread
  (``protocol.py``: primary / secondary comparisons, K = 2 duplicates, power), and tranches of at
  most about two hours of compute (``plan.json``).
* ``run_study.py``: one command, resumable, parallel; one JSON per run (full profile: under
  ``benchmarks/study/records/``, committed, so the study resumes across machines);
  ``--plan plan.json --tranche N`` runs one tranche.
* ``provenance.py``: every record names its commit, code id, versions and CPU model; one report
  covers one code state only.
* ``scenarios.py``: data sets and settings where balancing should matter (loss scales, three
  tasks, many-task MovieLens, the synthetic conflict sweep).
* ``report.py`` / ``verdict.py``: the report, verdict first, into ``docs/results/study*.md``.
* ``paper_protocol.py``: the PUB paper's AliExpress protocol, for anyone who has the data, with
  switches for the released code's choices (``model_transforms.py``).
* ``cost.py``: time per step and peak memory of every method, as ratios to equal weighting.

Running the study: ``python -m benchmarks.study.plan`` (re-plan from the records), then for each
tranche ``nice -n 10 python -m benchmarks.study.run_study --plan benchmarks/study/plan.json
--tranche N --jobs 2`` from a clean checkout at one commit, committing the records and the report
after each. A change to the code the study runs (``pub_optim``, ``integrations``,
``benchmarks/study``) makes the earlier records stale: run every tranche from one pinned commit.
"""
