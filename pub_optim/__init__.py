"""pub-optim: Parameter Update Balancing for multi-task training in PyTorch.

Balance the tasks on the parameter updates that the optimizer actually applies, not on the raw
gradients (Yuan, Cai, Dong, arXiv:2410.05806).

>>> import torch
>>> from pub_optim import PUB
>>> model = torch.nn.Linear(3, 2)
>>> opt = PUB(torch.optim.Adam(model.parameters(), lr=1e-2), strategy="pareto")
>>> out = model(torch.randn(8, 3))
>>> opt.zero_grad()
>>> opt.backward({"a": out[:, 0].pow(2).mean(), "b": (out[:, 1] - 1).pow(2).mean()})
>>> opt.step()
>>> opt.last_stats.task_names
('a', 'b')
>>> abs(float(opt.weights.sum()) - 1.0) < 1e-12
True
"""

from .combined import CombinedOptimizer
from .stats import BalanceDiagnostics, BalanceStats
from .strategies import (
    STRATEGIES,
    Equal,
    EqualMagnitude,
    Fixed,
    MinNorm,
    Pareto,
    UpdateBalancer,
    get_strategy,
)
from .wrapper import PUB

__version__ = "0.1.0"

__all__ = [
    "PUB",
    "STRATEGIES",
    "BalanceDiagnostics",
    "BalanceStats",
    "CombinedOptimizer",
    "Equal",
    "EqualMagnitude",
    "Fixed",
    "MinNorm",
    "Pareto",
    "UpdateBalancer",
    "__version__",
    "get_strategy",
]
