"""The evidence study (issue 6): quality of PUB against the multi-task baselines, the paper's
AliExpress protocol, and the cost of every method.

* ``run_study.py``: one command, resumable, parallel; one JSON per run (full profile: under
  ``benchmarks/study/records/``, committed, so the study resumes across machines).
* ``report.py``: aggregates the cached runs into ``docs/results/study*.md`` and PNGs.
* ``paper_protocol.py``: the PUB paper's AliExpress protocol, for anyone who has the data.
* ``cost.py``: time per step and peak memory of every method, as ratios to equal weighting.
"""
