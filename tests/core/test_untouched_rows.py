"""Dense-gradient tables with untouched rows: the eager pass takes the rows no task reached once
(their look-ahead is the drift, the same for every task) instead of once per task. Reference:
the full per-task computation (``untouched_rows`` off) and torch's own optimizers."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from pub_optim import PUB
from pub_optim.exact_step import UNTOUCHED_MIN_ROWS

ROWS = UNTOUCHED_MIN_ROWS * 2


class Table(nn.Module):
    def __init__(self, num_tasks: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(ROWS, 4)  # dense gradients
        self.trunk = nn.Linear(4, 6)
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(num_tasks))

    def losses(self, step: int, identical: bool = False) -> list[Tensor]:
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, ROWS, (32,), generator=g)
        y = torch.randn(32, len(self.heads), generator=g)
        z = torch.tanh(self.trunk(self.table(ids)))
        return [
            (self.heads[0 if identical else k](z).squeeze(-1) - y[:, 0 if identical else k])
            .pow(2)
            .mean()
            for k in range(len(self.heads))
        ]


OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "adam-l2": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.05),
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01
    ),
    "rmsprop-centered": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
}


@pytest.mark.parametrize("space", ["update", "marginal"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_untouched_rows_once_equal_the_full_computation(name: str, space: str) -> None:
    runs = {}
    for shortcut in (False, True):
        model = Table()
        pub = PUB(
            OPTIMIZERS[name](list(model.parameters())),
            "pareto",
            space=space,  # type: ignore[arg-type]
            fused=False,
            diagnostics=True,
        )
        assert pub._engine is not None
        pub._engine.untouched_rows = shortcut
        history = []
        for step in range(6):
            pub.zero_grad()
            pub.backward(model.losses(step))
            pub.step()
            assert pub.weights is not None and pub.last_stats is not None
            history.append((pub.weights.clone(), pub.last_stats))
        runs[shortcut] = (model, history)
    (full_model, full), (short_model, short) = runs[False], runs[True]
    for (w_full, s_full), (w_short, s_short) in zip(full, short, strict=True):
        torch.testing.assert_close(w_short, w_full, rtol=1e-5, atol=1e-7)
        # float32 products summed in another order (touched rows, then the drift once, against
        # whole-table blocks): about sqrt(n) * 6e-8 ~ 5e-6 relative for n ~ 8e3 terms per block.
        torch.testing.assert_close(s_short.gram, s_full.gram, rtol=1e-4, atol=1e-12)
        d_full, d_short = s_full.diagnostics, s_short.diagnostics
        assert d_full is not None and d_short is not None
        for field in ("drift_cosine", "attributable", "drift_norm", "gradient_norms"):
            torch.testing.assert_close(
                getattr(d_short, field), getattr(d_full, field), rtol=1e-4, atol=1e-9
            )
    for p, q in zip(full_model.parameters(), short_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    # the tasks differ: the weights moved by more than the tolerance of the comparison above
    assert abs(float(full[-1][0][0]) - 0.5) > 1e-5


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_identical_tasks_with_the_shortcut_equal_the_plain_optimizer(name: str) -> None:
    reference, model = Table(1), Table(1)
    ref_opt = OPTIMIZERS[name](list(reference.parameters()))
    pub = PUB(OPTIMIZERS[name](list(model.parameters())), "pareto", fused=False)
    for step in range(6):
        ref_opt.zero_grad()
        reference.losses(step)[0].backward()
        ref_opt.step()
        pub.zero_grad()
        loss = model.losses(step)[0]
        pub.backward([loss, loss * 1.0])
        pub.step()
    for p, q in zip(reference.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_the_shortcut_is_taken_for_a_mostly_untouched_table_only() -> None:
    model = Table()
    pub = PUB(torch.optim.Adam(model.parameters(), lr=1e-2), fused=False)
    engine = pub._engine
    assert engine is not None
    built: list[int] = []
    original = engine._table

    def spy(ctxs, buf):  # type: ignore[no-untyped-def]
        table = original(ctxs, buf)
        if table is not None:
            built.append(int(ctxs[0].param.shape[0]))
        return table

    engine._table = spy  # type: ignore[method-assign]
    pub.zero_grad()
    pub.backward(model.losses(0))
    pub.step()
    assert built and set(built) == {ROWS}  # the table, not the trunk's weight
