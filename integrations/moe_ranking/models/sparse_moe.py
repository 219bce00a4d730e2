"""A sparse, task-routed Mixture-of-Experts in the spirit of GRec (Wang et al., "Efficient
Multi-Task Learning via Generalist Recommender", CIKM 2023) with Switch-style routing (Fedus, Zoph,
Shazeer, "Switch Transformers", JMLR 2022) and the router z-loss of ST-MoE (Zoph et al. 2022).

Every (example, task) pair is one token: the shared encoding of the example plus a learned task
embedding. A router that sees that token picks the top-``k`` of ``E`` shared experts; only those run
on the token (dropless: no capacity limit). Because the router is linear, its logits split into an
example part and a task part, ``W (h + e_t) = W h + W e_t``: the example part is computed once and
the task part enters the gating function as its ``task_bias``. A residual connection adds the expert
mixture to the token, and the task's tower reads the result.

Auxiliary losses, per task (so the per-task losses still sum to the total): the Switch
load-balancing loss and the router z-loss of that task's tokens, with coefficients ``lb_coef`` and
``z_coef``. All gating (softmax, top-k, renormalisation, dispatch metadata, load statistics) goes
through :func:`integrations.moe_ranking.gating.topk_gating`: the pure-torch path on CPU, the fused
Triton kernel on CUDA when available.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..data.base import Batch
from ..gating import GatingOutput, topk_gating
from .base import MultiTaskModel, Tower, mlp, task_group
from .inputs import InputLayer


def dispatch_combine(tokens: Tensor, gating: GatingOutput, experts: nn.ModuleList) -> Tensor:
    """``sum_slot weight[n, slot] * expert[id[n, slot]](tokens[n])`` for every token ``n``.

    Tokens are gathered per expert with the gating's ``dispatch_order`` / ``expert_offsets``, each
    expert runs once on its contiguous group, and the weighted outputs are scattered back with
    ``index_add`` (deterministic on CPU). Every expert is called, on an empty group if nobody picked
    it, so the set of parameters a loss reaches does not depend on the batch.
    """
    k = gating.weights.shape[1]
    flat_weights = gating.weights.reshape(-1).to(tokens.dtype)
    order = gating.dispatch_order
    offsets = gating.expert_offsets.tolist()
    pieces = []
    for e, expert in enumerate(experts):
        pairs = order[offsets[e] : offsets[e + 1]]
        pieces.append(expert(tokens[pairs // k]) * flat_weights[pairs].unsqueeze(1))
    combined = torch.cat(pieces, dim=0)
    out = tokens.new_zeros(tokens.shape[0], combined.shape[1])
    return out.index_add(0, order // k, combined)


class SparseMoE(MultiTaskModel):
    """Task-routed sparse MoE (GRec-style): top-``k`` of ``num_experts`` per (example, task).

    Partition: the input layer, encoder, router and experts are shared; task ``t`` owns its task
    embedding and its tower. ``expert_usage()`` gives, per expert, how many (example, task, slot)
    routings picked it in the last forward pass (``sparse``, and per task ``sparse@<task>``);
    ``aux_losses()`` the weighted auxiliary losses.

    Args:
        inputs: the shared input layer.
        task_names: the tasks.
        num_experts: ``E``.
        top_k: experts per token (1 is Switch routing).
        d_model: token width (encoder output, task embedding and expert output).
        encoder_hidden: hidden widths of the shared encoder before the tokens.
        expert_hidden: hidden widths inside each expert.
        tower_hidden: hidden widths of each task tower.
        lb_coef: weight of the load-balancing loss (Switch: 1e-2).
        z_coef: weight of the router z-loss (ST-MoE: 1e-3).
        renormalize: rescale the ``k`` selected weights to sum to 1; default ``top_k > 1``. With
            ``top_k=1`` renormalised weights are constant 1 and the task loss would not train the
            router, so Switch routing keeps the raw probability.
        gating_backend: ``backend`` argument of ``topk_gating``.
    """

    def __init__(
        self,
        inputs: InputLayer,
        task_names: Sequence[str],
        num_experts: int = 8,
        top_k: int = 2,
        d_model: int = 32,
        encoder_hidden: Sequence[int] = (64,),
        expert_hidden: Sequence[int] = (64,),
        tower_hidden: Sequence[int] = (16,),
        lb_coef: float = 1e-2,
        z_coef: float = 1e-3,
        renormalize: bool | None = None,
        gating_backend: str = "auto",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(task_names)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.inputs = inputs
        self.encoder = mlp(inputs.output_dim, (*encoder_hidden, d_model), dropout)
        self.task_embeddings = nn.ParameterDict(
            {t: nn.Parameter(0.1 * torch.randn(d_model)) for t in self.task_names}
        )
        self.router = nn.Linear(d_model, num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)
        self.experts = nn.ModuleList(
            mlp(d_model, (*expert_hidden, d_model), dropout, final_activation=False)
            for _ in range(num_experts)
        )
        self.towers = nn.ModuleDict(
            {t: Tower(d_model, tower_hidden, dropout) for t in self.task_names}
        )
        self.num_experts, self.top_k = num_experts, top_k
        self.lb_coef, self.z_coef = lb_coef, z_coef
        self.renormalize = top_k > 1 if renormalize is None else renormalize
        self.gating_backend = gating_backend
        self._aux: dict[str, Tensor] = {}
        self._usage: dict[str, Tensor] = {}
        self.last_gating: dict[str, GatingOutput] = {}

    def shared_modules(self) -> list[nn.Module | nn.Parameter]:
        return [self.inputs, self.encoder, self.router, self.experts]

    def task_modules(self, task: str) -> list[nn.Module | nn.Parameter]:
        return [self.task_embeddings[task], self.towers[task]]

    def forward(self, batch: Batch, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Logits of ``tasks`` (default all); only those tasks' tokens are routed."""
        h = self.encoder(self.inputs(batch))
        example_logits = self.router(h)  # [B, E], shared by every task
        logits, aux, gatings = {}, {}, {}
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=h.device)
        per_task = {}
        for t in self.select_tasks(tasks):
            task_embedding = self.task_embeddings[t]
            tokens = h + task_embedding
            gating = topk_gating(
                example_logits,
                self.top_k,
                task_bias=self.router(task_embedding),
                renormalize=self.renormalize,
                backend=self.gating_backend,
            )
            mixed = tokens + dispatch_combine(tokens, gating, self.experts)
            logits[t] = self.towers[t](mixed)
            aux[t] = self.lb_coef * gating.load_balancing_loss + self.z_coef * gating.z_loss
            counts += gating.expert_counts
            per_task[task_group("sparse", t)] = gating.expert_counts.detach().to(torch.float32)
            gatings[t] = gating
        self._aux, self.last_gating = aux, gatings
        self._usage = {"sparse": counts.detach().to(torch.float32), **per_task}
        return logits

    def aux_losses(self) -> dict[str, Tensor]:
        return dict(self._aux)

    def expert_usage(self) -> dict[str, Tensor]:
        return dict(self._usage)
