"""Ranking metrics as MIMIC's released code computes them (paper appendix A.3).

rank starts at 1; H@k = mean(rank <= k) (the paper prints ``rank < k``, the code uses ``<=``,
which is what produced the published numbers); MRR = mean(1 / rank); MR = mean(rank).
Ties: the released code ranks by a double argsort (order among equal scores is arbitrary);
here the gold is ranked after every strictly higher score and after equal scores of entities
with a lower row id, i.e. a stable descending sort: deterministic and reproducible.
Metrics are fractions in [0, 1]; reports multiply by 100 only when printing.

Retrieve-then-rerank (the server's two stages, DRIN): :func:`candidate_ranks` ranks the gold
among a mention's K retrieved candidates (0 = not retrieved) and :func:`candidate_metrics`
scores those ranks; :func:`drin_candidate_metrics` gives the same numbers under the DRIN
paper's column names (Top-k, recall@K).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

HITS_AT = (1, 3, 5, 10, 20)
DRIN_TOP = (1, 5, 10, 20)  # the DRIN paper's Top-k columns


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


def candidate_ranks(scores: Tensor, rows: Tensor, gold: Tensor) -> Tensor:
    """Rank (from 1) of ``gold[b]`` among its candidates ``rows[b]`` by ``scores`` (B, K).

    0 = the gold is not among the candidates (a miss). Ties go to the earlier candidate (the
    stable descending order of :func:`gold_ranks`, over candidate positions).
    """
    hit = rows == gold.unsqueeze(1)  # (B, K)
    found = hit.any(dim=1)
    pos = hit.float().argmax(dim=1)
    g = scores.gather(1, pos.unsqueeze(1))
    cols = torch.arange(scores.shape[1]).unsqueeze(0)
    higher = (scores > g).sum(dim=1)
    tied_before = ((scores == g) & (cols < pos.unsqueeze(1))).sum(dim=1)
    return torch.where(found, higher + tied_before + 1, torch.zeros_like(higher))


def candidate_metrics(ranks: Tensor, k: int, hits_at: Sequence[int] = HITS_AT) -> dict[str, float]:
    """Metrics of a retrieve-then-rerank ranking from :func:`candidate_ranks` (0 = miss).

    H@j for each j of ``hits_at``, MRR, MR, count and ``recall@candidates`` (the share
    retrieved). A miss counts as a miss at every H@j and as 0 in MRR (its true rank is unknown,
    beyond ``k``); MR counts it as ``k + 1``, a lower bound.
    """
    miss = ranks == 0
    out = ranking_metrics(torch.where(miss, torch.full_like(ranks, k + 1), ranks), hits_at)
    out.update(
        {
            h: float(((ranks >= 1) & (ranks <= int(h[2:]))).double().mean())
            for h in out
            if h.startswith("H@")
        }
    )
    out["MRR"] = float(torch.where(miss, 0.0, 1.0 / ranks.clamp_min(1).double()).mean())
    out["recall@candidates"] = float((~miss).double().mean())
    return out


def drin_candidate_metrics(ranks: Tensor, k: int) -> dict[str, float]:
    """:func:`candidate_metrics` under the DRIN paper's names, what ``mel-eval-drin`` reports:
    ``Top-j`` for each j of :data:`DRIN_TOP` up to ``k``, ``MRR`` and ``recall@<k>``."""
    m = candidate_metrics(ranks, k, DRIN_TOP)
    return {
        **{f"Top-{j}": m[f"H@{j}"] for j in DRIN_TOP if j <= k},
        "MRR": m["MRR"],
        f"recall@{k}": m["recall@candidates"],
    }


__all__ = [
    "DRIN_TOP",
    "HITS_AT",
    "candidate_metrics",
    "candidate_ranks",
    "drin_candidate_metrics",
    "gold_ranks",
    "ranking_metrics",
]
