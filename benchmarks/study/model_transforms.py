"""Changes to a built model that the PUB paper's released code makes and the integration's
models do not, applied right after the (seeded) model is built.

* ``"batchnorm"``: ``BatchNorm1d`` after every ``Linear`` of the expert and tower MLPs (before
  the activation), as MTReclib's ``MultiLayerPerceptron`` (``Linear -> BatchNorm1d -> ReLU ->
  Dropout``) that the paper's code builds on. Gates and output heads keep none.
* ``"xavier-embedding"``: the embedding table re-initialised with Xavier (Glorot) uniform, as
  MTReclib's ``EmbeddingLayer``, instead of the integration's normal(0, 0.05).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from integrations.moe_ranking.models import MultiTaskModel
from integrations.moe_ranking.models.inputs import InputLayer

TRANSFORMS = ("batchnorm", "xavier-embedding")


def add_batchnorm(model: nn.Module) -> int:
    """Insert ``BatchNorm1d`` after each ``Linear`` of every ``nn.Sequential``; returns how many."""
    added = 0
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        layers = list(module)
        if not any(isinstance(layer, nn.Linear) for layer in layers):
            continue
        rebuilt: list[nn.Module] = []
        for i, layer in enumerate(layers):
            rebuilt.append(layer)
            following = layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(layer, nn.Linear) and not isinstance(following, nn.BatchNorm1d):
                rebuilt.append(nn.BatchNorm1d(layer.out_features))
                added += 1
        for key in list(module._modules):
            del module._modules[key]
        for i, layer in enumerate(rebuilt):
            module.add_module(str(i), layer)
    return added


def xavier_embedding(model: nn.Module) -> int:
    """Xavier-uniform re-initialisation of every input embedding table; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, InputLayer) and module.embedding is not None:
            with torch.no_grad():
                nn.init.xavier_uniform_(module.embedding.weight)
            count += 1
    return count


def apply_transforms(model: MultiTaskModel, transforms: Sequence[str]) -> MultiTaskModel:
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown model transform(s) {unknown}; choose from {list(TRANSFORMS)}")
    if "batchnorm" in transforms and add_batchnorm(model) == 0:
        raise ValueError(f"{type(model).__name__} has no MLP to add BatchNorm to")
    if "xavier-embedding" in transforms and xavier_embedding(model) == 0:
        raise ValueError(f"{type(model).__name__} has no embedding table to re-initialise")
    return model
