"""PUB under plain ``torch.distributed`` / ``DistributedDataParallel`` (2 gloo processes, CPU).

Each module-scoped fixture starts one pair of processes and runs several scenarios in it (process
start-up dominates the cost on 2 CPU cores); the tests then check the scenarios one by one.
"""

from __future__ import annotations

from typing import Any

import ddp_workers as w
import pytest
import torch

pytestmark = pytest.mark.distributed

F64 = torch.float64


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return w.spawn(w.equivalence, tmp_path_factory.mktemp("equivalence"))


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return w.spawn(w.edge_cases, tmp_path_factory.mktemp("edge"))


@pytest.mark.parametrize("config", list(w.CONFIGS))
def test_two_ranks_match_one_process_on_the_double_batch(
    equivalence: list[dict[str, Any]], config: str
) -> None:
    r0, r1 = equivalence[0][config], equivalence[1][config]
    # bit-identical across ranks
    assert torch.equal(r0["ddp"], r1["ddp"])
    assert torch.equal(r0["weights"], r1["weights"])
    # equal to one process on the whole batch, up to float64 rounding
    torch.testing.assert_close(r0["ddp"], r0["ref"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r0["weights"], r0["ref_weights"], rtol=1e-9, atol=1e-12)
    # one synchronisation per optimizer step, one collective each (the float64 flags ride along)
    assert r0["calls"] == 4
    assert r0["collectives"] == 4
    # a parameter that no task reaches keeps no gradient on any rank
    assert r0["unused_grad"] is None and r1["unused_grad"] is None


def test_payload_is_k_shared_copies_plus_task_specific_plus_flags(
    equivalence: list[dict[str, Any]],
) -> None:
    shared = 6 * 16 + 16 + 16 * 8 + 8
    others = (8 + 1) * 2 + (2 * 2 + 2)  # two heads, the unused layer (zeros, flagged absent)
    flags = 4 + 6
    assert equivalence[0]["every-step"]["bytes"] == 8 * (2 * shared + others + flags)


@pytest.mark.parametrize("find_unused_parameters", [False, True])
def test_ddp_reducer_does_not_fire_on_per_task_backward(
    edge: list[dict[str, Any]], find_unused_parameters: bool
) -> None:
    """Without the hook the gradients stay rank-local: DDP's reducer never all-reduced them (so
    with the hook nothing is reduced twice), and three iterations raise no reducer error."""
    g0 = edge[0]["idle"][find_unused_parameters]["grads"]
    g1 = edge[1]["idle"][find_unused_parameters]["grads"]
    assert g0.shape == (3, 16, 6)
    assert not torch.equal(g0[0], g1[0])


def test_gradients_present_on_one_rank_only_are_averaged_everywhere(
    edge: list[dict[str, Any]],
) -> None:
    r0, r1 = edge[0]["presence"], edge[1]["presence"]
    for r in (r0, r1):
        torch.testing.assert_close(r["extra_a"], torch.tensor([0.5, 1.0, 1.5], dtype=F64))
        # per-task grads of extra_shared: a -> 1/2 (rank 1 only), b -> 3/2; .grad is their sum
        torch.testing.assert_close(r["extra_shared"], torch.tensor([2.0, 2.0], dtype=F64))
        torch.testing.assert_close(r["extra_a_after"], -r["extra_a"])
    assert torch.equal(r0["extra_shared_after"], r1["extra_shared_after"])
    assert bool((r0["extra_shared_after"] < 0).all())
    assert torch.equal(r0["all"], r1["all"])


def test_ranks_balancing_different_parameters_get_a_clear_error(
    edge: list[dict[str, Any]],
) -> None:
    for r in edge:
        assert r["mismatch"]["error"] is not None
        assert "pass shared_params" in r["mismatch"]["error"]


def test_nonfinite_loss_on_one_rank_raises_on_every_rank_without_check_finite(
    edge: list[dict[str, Any]],
) -> None:
    for r in edge:
        assert r["nan"]["error"] is not None and "non-finite" in r["nan"]["error"]
        assert r["nan"]["unchanged"] is True
        assert r["nan"]["state"] == 0
