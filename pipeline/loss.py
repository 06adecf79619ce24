"""The training loss, one definition for every stage, reference and scheme: cross entropy, each sample's the
mean over its positions (one for a classifier: N x classes scores; one per token for a language model:
N x context x vocab), summed over the samples (a caller divides by the step's batch)."""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def summed(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int | float]:
    """(the summed loss, a tensor in the graph; the samples predicted right, each counting the fraction of
    its positions whose top score is the label)."""
    positions = math.prod(labels.shape[1:])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum") / positions
    hits = int((logits.detach().argmax(-1) == labels).sum())
    return loss, hits if positions == 1 else hits / positions   # (a classifier's: an int, as messages carry it)
