"""Cross-modal attention mass (ToDRE, arXiv 2505.18757, Eq. 8)."""

from __future__ import annotations

import torch


def modality_mass(received: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(B,) share of the query rows' attention that lands on `keys` (B, L): alpha_{t->v} with
    instruction queries and visual keys, alpha_{v->t} with visual queries and instruction keys.

    received: (B, L) attention each row receives, already the mean over heads and query rows
    (`received_from_queries`); each query row's attention sums to 1, so the share is a sum.
    """
    return (received * keys.to(received.device)).sum(1)
