"""Reference integration: multi-task ranking models (Shared-Bottom, MMoE, PLE, a GRec-style sparse
MoE, ESMM) trained on real data with and without Parameter Update Balancing.

Entry points::

    python -m integrations.moe_ranking demo     # the main job: Adult, equal vs pareto
    python -m integrations.moe_ranking fit --data adult --model mmoe --balancer pareto
    python -m integrations.moe_ranking predict --run outputs/adult-mmoe-pareto-seed0 \
        --task income --out scores.csv             # one task's scores from the run's model.pt

Importing this package imports neither Lightning nor Triton; the subpackages ``data`` and ``models``
need only torch, numpy, pandas and pyarrow; ``serving`` (model.pt, ``load_model``, ``predict``)
needs no Lightning either. ``training`` (Lightning) and ``plots`` (matplotlib) are imported on
demand. The package runs from a checkout (the wheel ships ``pub_optim`` only); a missing optional
dependency raises an ``ImportError`` naming the extra ``pub-optim[integrations]``.
"""
