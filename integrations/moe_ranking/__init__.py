"""Reference integration: multi-task ranking models (Shared-Bottom, MMoE, PLE, a GRec-style sparse
MoE, ESMM) trained on real data with and without Parameter Update Balancing.

Entry points::

    python -m integrations.moe_ranking demo     # the main job: Adult, equal vs pareto
    python -m integrations.moe_ranking fit --data adult --model mmoe --balancer pareto

Importing this package imports neither Lightning nor Triton; the subpackages ``data`` and ``models``
need only torch, numpy, pandas and pyarrow. ``training`` (Lightning) and ``plots`` (matplotlib) are
imported on demand.
"""
