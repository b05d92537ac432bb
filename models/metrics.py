"""Ranking metrics as MIMIC's released code computes them (paper appendix A.3).

rank starts at 1; H@k = mean(rank <= k) (the paper prints ``rank < k``, the code uses ``<=``,
which is what produced the published numbers); MRR = mean(1 / rank); MR = mean(rank).
Ties: the released code ranks by a double argsort (order among equal scores is arbitrary);
here the gold is ranked after every strictly higher score and after equal scores of entities
with a lower row id, i.e. a stable descending sort: deterministic and reproducible.
Metrics are fractions in [0, 1]; reports multiply by 100 only when printing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

HITS_AT = (1, 3, 5, 10, 20)


def gold_ranks(scores: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Rank (from 1) of ``gold[b]`` in row b of ``scores`` (B, N), stable descending order."""
    if scores.dim() != 2 or gold.shape != (scores.shape[0],):
        raise ValueError(f"scores {tuple(scores.shape)} and gold {tuple(gold.shape)} do not fit")
    rows = torch.arange(scores.shape[0], device=scores.device)
    g = scores[rows, gold].unsqueeze(1)
    higher = (scores > g).sum(dim=1)
    cols = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0)
    tied_before = ((scores == g) & (cols < gold.unsqueeze(1))).sum(dim=1)
    return higher + tied_before + 1


def ranking_metrics(
    ranks: Sequence[int] | np.ndarray | torch.Tensor, hits_at: Sequence[int] = HITS_AT
) -> dict[str, float]:
    """H@k for each k, MRR and MR from gold ranks (each >= 1)."""
    r = np.asarray(ranks.cpu() if isinstance(ranks, torch.Tensor) else ranks, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no ranks to score")
    if (r < 1).any():
        raise ValueError("ranks start at 1")
    out = {f"H@{k}": float((r <= k).mean()) for k in hits_at}
    out["MRR"] = float((1.0 / r).mean())
    out["MR"] = float(r.mean())
    out["count"] = float(r.size)
    return out


__all__ = ["HITS_AT", "gold_ranks", "ranking_metrics"]
