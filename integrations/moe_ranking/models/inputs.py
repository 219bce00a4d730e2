"""The input layer all models share: categorical embeddings and a linear map of numeric inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..data.base import Batch


class InputLayer(nn.Module):
    """Embed each categorical field and project the numeric features, then concatenate.

    All fields live in one embedding table (a per-field offset is added to the ids), which is one
    parameter tensor and one lookup per batch. Output: ``[B, F * embed_dim + numeric_dim]``.

    Args:
        cardinalities: embedding rows per categorical field (vocabulary incl. OOV and missing).
        num_numeric: number of numeric features (may be 0).
        embed_dim: embedding width per field.
        numeric_dim: output width of the numeric projection (default: ``2 * embed_dim``).
    """

    def __init__(
        self,
        cardinalities: Sequence[int],
        num_numeric: int,
        embed_dim: int = 8,
        numeric_dim: int | None = None,
    ) -> None:
        super().__init__()
        if any(c < 1 for c in cardinalities):
            raise ValueError(f"every cardinality must be >= 1, got {list(cardinalities)}")
        if not cardinalities and num_numeric == 0:
            raise ValueError("the input layer needs at least one categorical or numeric feature")
        self.cardinalities = tuple(int(c) for c in cardinalities)
        self.num_numeric = int(num_numeric)
        offsets = torch.tensor([0, *self.cardinalities[:-1]], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets[: len(self.cardinalities)], persistent=False)
        self.embedding = (
            nn.Embedding(sum(self.cardinalities), embed_dim) if self.cardinalities else None
        )
        if self.embedding is not None:
            nn.init.normal_(self.embedding.weight, std=0.05)
        numeric_dim = 2 * embed_dim if numeric_dim is None else numeric_dim
        self.numeric = nn.Linear(num_numeric, numeric_dim) if num_numeric > 0 else None
        self.output_dim = len(self.cardinalities) * embed_dim + (numeric_dim if num_numeric else 0)

    def parts(self, batch: Batch) -> tuple[Tensor | None, Tensor | None]:
        """The field embeddings ``[B, F, embed_dim]`` and the projected numeric features
        ``[B, numeric_dim]`` separately (``None`` where the data has no such feature)."""
        fields = numeric = None
        if self.embedding is not None:
            cat = batch["cat"]
            if cat.shape[1] != len(self.cardinalities):
                raise ValueError(
                    f"expected {len(self.cardinalities)} categorical fields, got {cat.shape[1]}"
                )
            fields = self.embedding(cat + self.offsets)
        if self.numeric is not None:
            numeric = self.numeric(batch["num"])
        return fields, numeric

    def forward(self, batch: Batch) -> Tensor:
        fields, numeric = self.parts(batch)
        parts = [] if fields is None else [fields.flatten(1)]
        if numeric is not None:
            parts.append(numeric)
        return torch.cat(parts, dim=1)
