"""GRec: the Generalist Recommender of Wang et al., "Efficient Multi-Task Learning via Generalist
Recommender", CIKM 2023: the inputs of one example for one task become a short *task sentence* of
tokens, one attention block mixes them and a sparse Mixture-of-Experts layer with Switch routing
(Fedus, Zoph, Shazeer, "Switch Transformers", JMLR 2022) follows, then a tower per task.

Tokens of the sentence (``[B, T, d_model]``), each plus a learned position embedding:

* one token per categorical field (its embedding of the shared input layer, projected to
  ``d_model``) and one for the numeric features (the input layer's numeric projection, projected
  again): the wide & deep context and the candidate item;
* a behaviour-sequence token when the model has ``history_vocab``: the batch's ``history``
  (``[B, L]`` item ids in time order, newest last, 0 = padding) through item and position
  embeddings, one pre-norm self-attention layer with a padding mask, mean over the non-padding
  positions (zeros for an empty history);
* a text token when the model has ``text_buckets``: the batch's ``text`` (``[B, T]`` hashed n-gram
  ids, 0 = padding) through an ``nn.EmbeddingBag`` mean (no pre-trained language model);
* the task token: one learned embedding per task.

Block: ``x = s + MHA(RMSNorm(s))``, then ``y = x + MoE(RMSNorm(x))``, the mean of ``y`` over the
tokens, an RMSNorm, the task's tower. Each task's sentence is a separate forward pass through the
block, so ``forward(batch, tasks=[t])`` computes exactly task ``t``'s part of the full forward.

Routing (``routing``): ``"token"`` routes every token of every sentence (GRec's released code);
``"sentence"`` routes each sentence as a whole on its mean (normalised) token, the chosen experts
process all its tokens; ``"task"`` routes on the task token alone (the learned task embedding), so
all sentences of a task go to the same experts, a fixed function of the task after training, and
serving one task runs only those experts. Top-1 keeps the raw router probability as the weight
(Switch); top-k renormalises the ``k`` weights by default. Optional: an expert capacity of
``ceil(capacity_factor * N * k / E)`` routed units per expert and task (units beyond it, in batch
order, are dropped: their expert output is zero and the residual passes them on; default dropless)
and the multiplicative router jitter of Switch (router input times uniform noise in
``[1 - eps, 1 + eps]``, training only; default off; for task routing one draw per forward pass).

Auxiliary losses per task: Switch load balancing and the router z-loss of ST-MoE (Zoph et al.
2022) over that task's routed units, both with coefficient 1e-4 as in GRec's code. All gating goes
through :func:`integrations.moe_ranking.gating.topk_gating` (torch on CPU, Triton on CUDA).

Experts run only on the units routed to them. While autograd records, an expert nobody picked is
still called on an empty group (no arithmetic), so that the set of parameters each task's loss
reaches does not depend on the batch (what the balancers' shared-parameter partition relies on);
under ``torch.no_grad()`` (evaluation, serving) it is not called at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..data.base import Batch
from ..gating import GatingOutput, topk_gating
from ..gating.dispatch import Backend
from .base import MultiTaskModel, Tower, mlp, task_group
from .inputs import InputLayer

ROUTINGS = ("token", "sentence", "task")
#: Defaults of :class:`GRec` (also what the command line checks ``--top-k`` against).
NUM_EXPERTS, TOP_K = 4, 1


def expert_capacity(units: int, k: int, num_experts: int, capacity_factor: float | None) -> int:
    """Routed (unit, slot) pairs each expert accepts: ``ceil(factor * units * k / E)``, at least 1;
    every pair (``units * k``) without a factor (dropless)."""
    if capacity_factor is None:
        return units * k
    return max(1, math.ceil(capacity_factor * units * k / num_experts))


def dispatch_selected(
    units: Tensor,
    gating: GatingOutput,
    experts: nn.ModuleList,
    capacity: int,
    call_unpicked: bool,
) -> tuple[Tensor, int]:
    """``sum_slot weight[n, slot] * expert[id[n, slot]](units[n])`` for every unit ``n``.

    ``units`` is ``[N, ..., d]`` (a unit is a token ``[d]`` or a sentence ``[T, d]``; experts act
    on the last dimension). Each expert runs once on the units routed to it, at most ``capacity``
    of them (the first in batch order); the pairs beyond are dropped and contribute nothing. An
    expert without units is called on an empty group only if ``call_unpicked``.

    Returns the combined expert output (shape of ``units``) and the number of dropped pairs.
    """
    k = gating.weights.shape[1]
    flat_weights = gating.weights.reshape(-1).to(units.dtype)
    order = gating.dispatch_order
    offsets = gating.expert_offsets.tolist()
    pieces, targets, dropped = [], [], 0
    for e, expert in enumerate(experts):
        pairs = order[offsets[e] : offsets[e + 1]]
        if pairs.numel() > capacity:
            dropped += int(pairs.numel()) - capacity
            pairs = pairs[:capacity]
        if pairs.numel() == 0 and not call_unpicked:
            continue
        weight = flat_weights[pairs].reshape(-1, *([1] * (units.dim() - 1)))
        pieces.append(expert(units[pairs // k]) * weight)
        targets.append(pairs // k)
    out = units.new_zeros(units.shape)
    if not pieces:
        return out, dropped
    return out.index_add(0, torch.cat(targets), torch.cat(pieces)), dropped


class HistoryEncoder(nn.Module):
    """Behaviour sequence ``[B, L]`` (item ids, 0 = padding) -> one token ``[B, d]``.

    Histories are right-aligned (oldest first, the newest last, padding 0 in front). Item
    embeddings plus position embeddings counted from the newest entry, one pre-norm
    self-attention layer with a key padding mask and a residual, then the mean over the
    non-padding positions; an empty history gives zeros.
    """

    def __init__(self, vocab: int, max_len: int, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        if vocab < 2 or max_len < 1:
            raise ValueError(f"history needs vocab >= 2 and max_len >= 1, got {vocab}, {max_len}")
        self.vocab, self.max_len = vocab, max_len
        self.items = nn.Embedding(vocab, d, padding_idx=0)
        nn.init.normal_(self.items.weight, std=0.05)
        with torch.no_grad():
            self.items.weight[0].zero_()
        self.positions = nn.Parameter(0.02 * torch.randn(max_len, d))
        self.norm = nn.RMSNorm(d)
        self.attention = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)

    def forward(self, history: Tensor) -> Tensor:
        if history.dim() != 2 or history.shape[1] > self.max_len:
            raise ValueError(
                f"history must be [B, L] with L <= {self.max_len}, got {tuple(history.shape)}"
            )
        if history.numel() and (int(history.min()) < 0 or int(history.max()) >= self.vocab):
            raise ValueError(f"history ids must be in [0, {self.vocab}), 0 meaning padding")
        pad = history == 0
        # Position 0 is the newest (last) entry: the token does not depend on the padding length.
        x = self.items(history) + self.positions[: history.shape[1]].flip(0)
        # A row that is all padding would give NaN attention weights: it attends to its first
        # position instead, and its output is masked out below anyway.
        mask = pad.clone()
        mask[:, 0] &= ~pad.all(dim=1)
        normed = self.norm(x)
        x = x + self.attention(normed, normed, normed, key_padding_mask=mask, need_weights=False)[0]
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


class GRec(MultiTaskModel):
    """Generalist Recommender (see the module docstring).

    Partition: everything is shared (input layer, token projections, history and text encoders,
    position embeddings, attention block, router, experts, norms) except task ``t``'s task
    embedding and tower. ``expert_usage()``: routed (unit, slot) pairs per expert in the last
    forward pass, in total (``grec``) and per task (``grec@<task>``); a unit is a token for
    ``routing="token"`` and a sentence otherwise. ``last_gating`` and ``last_dropped`` (dropped
    pairs) per task describe the last forward pass.

    Args:
        inputs: the shared input layer.
        task_names: the tasks.
        num_experts: ``E``.
        top_k: experts per routed unit (1: Switch routing).
        routing: ``"token"``, ``"sentence"`` or ``"task"`` (default).
        d_model: token width.
        num_heads: attention heads (divides ``d_model``).
        expert_hidden: hidden widths inside each expert.
        tower_hidden: hidden widths of each task tower.
        capacity_factor: expert capacity factor (``None``: dropless, the default).
        router_jitter: ``eps`` of the multiplicative router jitter, in ``[0, 1)`` (0: off).
        lb_coef: weight of the load-balancing loss (GRec: 1e-4).
        z_coef: weight of the router z-loss (GRec: 1e-4).
        renormalize: rescale the ``k`` selected weights to sum to 1; default ``top_k > 1``.
        history_vocab: item-id vocabulary of ``batch["history"]`` incl. padding id 0 (``None``:
            no behaviour-sequence token).
        history_len: longest history the position embeddings cover.
        text_buckets: number of hashed n-gram buckets of ``batch["text"]``, ids ``1..buckets``
            (``None``: no text token).
        gating_backend: ``backend`` argument of ``topk_gating``.
        dropout: dropout in attention, experts and towers.
    """

    def __init__(
        self,
        inputs: InputLayer,
        task_names: Sequence[str],
        num_experts: int = NUM_EXPERTS,
        top_k: int = TOP_K,
        routing: str = "task",
        d_model: int = 32,
        num_heads: int = 2,
        expert_hidden: Sequence[int] = (64,),
        tower_hidden: Sequence[int] = (16,),
        capacity_factor: float | None = None,
        router_jitter: float = 0.0,
        lb_coef: float = 1e-4,
        z_coef: float = 1e-4,
        renormalize: bool | None = None,
        history_vocab: int | None = None,
        history_len: int = 20,
        text_buckets: int | None = None,
        gating_backend: Backend = "auto",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(task_names)
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        if num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ValueError(
                f"need num_experts >= 1 and top_k in [1, num_experts={num_experts}], got {top_k}"
            )
        if capacity_factor is not None and not 0 < capacity_factor < math.inf:
            raise ValueError(
                f"capacity_factor must be finite and > 0 (or None), got {capacity_factor}"
            )
        if not 0.0 <= router_jitter < 1.0:
            raise ValueError(f"router_jitter must be in [0, 1), got {router_jitter}")
        if d_model < 1 or num_heads < 1 or d_model % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide d_model={d_model}")
        if text_buckets is not None and text_buckets < 1:
            raise ValueError(f"text_buckets must be >= 1, got {text_buckets}")
        self.inputs = inputs
        self.routing, self.num_experts, self.top_k = routing, num_experts, top_k
        self.capacity_factor, self.router_jitter = capacity_factor, router_jitter
        self.lb_coef, self.z_coef = lb_coef, z_coef
        self.renormalize = top_k > 1 if renormalize is None else renormalize
        self.gating_backend = gating_backend

        num_tokens = 1  # the task token
        self.field_proj: nn.Linear | None = None
        if inputs.embedding is not None:
            self.field_proj = nn.Linear(inputs.embedding.embedding_dim, d_model)
            num_tokens += len(inputs.cardinalities)
        self.numeric_proj: nn.Linear | None = None
        if inputs.numeric is not None:
            self.numeric_proj = nn.Linear(inputs.numeric.out_features, d_model)
            num_tokens += 1
        self.history: HistoryEncoder | None = None
        if history_vocab is not None:
            self.history = HistoryEncoder(history_vocab, history_len, d_model, num_heads, dropout)
            num_tokens += 1
        self.text: nn.EmbeddingBag | None = None
        if text_buckets is not None:
            self.text = nn.EmbeddingBag(text_buckets + 1, d_model, mode="mean", padding_idx=0)
            nn.init.normal_(self.text.weight, std=0.05)
            with torch.no_grad():
                self.text.weight[0].zero_()
            num_tokens += 1
        self.num_tokens = num_tokens
        self.positions = nn.Parameter(0.02 * torch.randn(num_tokens, d_model))
        self.task_embeddings = nn.ParameterDict(
            {t: nn.Parameter(0.1 * torch.randn(d_model)) for t in self.task_names}
        )
        self.attn_norm = nn.RMSNorm(d_model)
        self.attention = nn.MultiheadAttention(
            d_model, num_heads, dropout=dropout, batch_first=True
        )
        self.moe_norm = nn.RMSNorm(d_model)
        self.router = nn.Linear(d_model, num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)
        self.experts = nn.ModuleList(
            mlp(d_model, (*expert_hidden, d_model), dropout, final_activation=False)
            for _ in range(num_experts)
        )
        self.out_norm = nn.RMSNorm(d_model)
        self.towers = nn.ModuleDict(
            {t: Tower(d_model, tower_hidden, dropout) for t in self.task_names}
        )
        self._aux: dict[str, Tensor] = {}
        self._usage: dict[str, Tensor] = {}
        self.last_gating: dict[str, GatingOutput] = {}
        self.last_dropped: dict[str, int] = {}

    # --- partition -------------------------------------------------------------------------------
    def shared_modules(self) -> list[nn.Module | nn.Parameter]:
        items: list[nn.Module | nn.Parameter | None] = [
            self.inputs, self.field_proj, self.numeric_proj, self.history, self.text,
            self.positions, self.attn_norm, self.attention, self.moe_norm, self.router,
            self.experts, self.out_norm,
        ]  # fmt: skip
        return [item for item in items if item is not None]

    def task_modules(self, task: str) -> list[nn.Module | nn.Parameter]:
        return [self.task_embeddings[task], self.towers[task]]

    # --- forward ---------------------------------------------------------------------------------
    def context_tokens(self, batch: Batch) -> Tensor:
        """The task-independent tokens ``[B, T - 1, d_model]`` (positions not yet added)."""
        fields, numeric = self.inputs.parts(batch)
        tokens = []
        if fields is not None and self.field_proj is not None:
            tokens.append(self.field_proj(fields))
        if numeric is not None and self.numeric_proj is not None:
            tokens.append(self.numeric_proj(numeric).unsqueeze(1))
        if self.history is not None:
            if "history" not in batch:
                raise ValueError(
                    "this GRec model has a behaviour-sequence token (history_vocab is set) but "
                    "the batch has no 'history'; build it with history_vocab=None for such data"
                )
            tokens.append(self.history(batch["history"]).unsqueeze(1))
        if self.text is not None:
            if "text" not in batch:
                raise ValueError(
                    "this GRec model has a text token (text_buckets is set) but the batch has no "
                    "'text'; build it with text_buckets=None for such data"
                )
            text = batch["text"]
            buckets = self.text.num_embeddings - 1
            if text.numel() and (int(text.min()) < 0 or int(text.max()) > buckets):
                raise ValueError(f"text ids must be in [0, {buckets}], 0 meaning padding")
            tokens.append(self.text(text).unsqueeze(1))
        return torch.cat(tokens, dim=1)

    def task_sentence(self, context: Tensor, task: str) -> Tensor:
        """``[B, T, d_model]``: the context tokens and ``task``'s token, plus positions."""
        token = self.task_embeddings[task].expand(context.shape[0], 1, -1)
        return torch.cat([context, token], dim=1) + self.positions

    def _jitter(self, x: Tensor) -> Tensor:
        if not (self.training and self.router_jitter > 0):
            return x
        noise = torch.empty_like(x).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
        return x * noise

    def route(self, normed: Tensor, task: str) -> tuple[Tensor, GatingOutput, int]:
        """The MoE output ``[B, T, d]`` for one task's normalised sentences ``[B, T, d]``."""
        b, t, d = normed.shape
        if self.routing == "token":
            units = normed.reshape(b * t, d)
            router_logits = self.router(self._jitter(units))
        else:
            units = normed
            if self.routing == "sentence":
                router_logits = self.router(self._jitter(normed.mean(dim=1)))
            else:  # task: the router sees the task token only
                task_logits = self.router(self._jitter(self.task_embeddings[task]))
                router_logits = task_logits.expand(b, self.num_experts)
        gating = topk_gating(
            router_logits, self.top_k, renormalize=self.renormalize, backend=self.gating_backend
        )
        capacity = expert_capacity(
            units.shape[0], self.top_k, self.num_experts, self.capacity_factor
        )
        out, dropped = dispatch_selected(
            units, gating, self.experts, capacity, call_unpicked=torch.is_grad_enabled()
        )
        return out.reshape(b, t, d), gating, dropped

    def forward(self, batch: Batch, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Logits of ``tasks`` (default all); only those tasks' sentences are computed."""
        selected = self.select_tasks(tasks)
        context = self.context_tokens(batch)
        logits, aux, gatings, dropped = {}, {}, {}, {}
        usage: dict[str, Tensor] = {}
        total = torch.zeros(self.num_experts, dtype=torch.float32, device=context.device)
        for task in selected:
            s = self.task_sentence(context, task)
            normed = self.attn_norm(s)
            x = s + self.attention(normed, normed, normed, need_weights=False)[0]
            moe, gating, dropped[task] = self.route(self.moe_norm(x), task)
            pooled = self.out_norm((x + moe).mean(dim=1))
            logits[task] = self.towers[task](pooled)
            aux[task] = self.lb_coef * gating.load_balancing_loss + self.z_coef * gating.z_loss
            counts = gating.expert_counts.detach().to(torch.float32)
            usage[task_group("grec", task)] = counts
            total = total + counts
            gatings[task] = gating
        self._aux, self.last_gating, self.last_dropped = aux, gatings, dropped
        self._usage = {"grec": total, **usage}
        return logits

    def aux_losses(self) -> dict[str, Tensor]:
        return dict(self._aux)

    def expert_usage(self) -> dict[str, Tensor]:
        return dict(self._usage)

    def task_experts(self, task: str) -> list[int]:
        """The experts ``task`` routes to under ``routing="task"`` (independent of the input)."""
        if self.routing != "task":
            raise ValueError(f"task_experts needs routing='task', not {self.routing!r}")
        with torch.no_grad():
            logits = self.router(self.task_embeddings[task]).unsqueeze(0)
            gating = topk_gating(logits, self.top_k, backend="torch")
        return sorted(int(e) for e in gating.expert_ids[0])
