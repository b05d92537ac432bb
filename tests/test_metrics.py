"""Ranking metrics on hand-made ranks (MIMIC appendix A.3, released code's `<=`)."""

from __future__ import annotations

import pytest
import torch

from models.metrics import gold_ranks, ranking_metrics


def test_metrics_on_hand_made_ranks() -> None:
    m = ranking_metrics([1, 2, 4, 10, 30])
    assert m["H@1"] == pytest.approx(0.2)
    assert m["H@3"] == pytest.approx(0.4)
    assert m["H@5"] == pytest.approx(0.6)
    assert m["H@10"] == pytest.approx(0.8)  # rank 10 counts for H@10: rank <= k
    assert m["H@20"] == pytest.approx(0.8)
    assert m["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 10 + 1 / 30) / 5)
    assert m["MR"] == pytest.approx(47 / 5)
    assert m["count"] == 5


def test_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        ranking_metrics([])
    with pytest.raises(ValueError):
        ranking_metrics([0, 1])  # ranks start at 1


def test_gold_ranks_and_ties() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9], [3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # row 0: gold 3 ties with entity 1 (lower id) -> rank 2; row 1: gold 3 is last -> 4;
    # row 2: all tie, gold 2 -> after entities 0 and 1 -> 3
    assert gold_ranks(scores, torch.tensor([3, 3, 2])).tolist() == [2, 4, 3]
    assert gold_ranks(scores, torch.tensor([1, 0, 0])).tolist() == [1, 1, 1]
    # equals a stable descending argsort position + 1
    r = torch.randn(6, 50)
    r[:, ::7] = 0.0  # plenty of ties
    gold = torch.randint(0, 50, (6,))
    order = torch.argsort(r, dim=1, descending=True, stable=True)
    want = (order == gold[:, None]).float().argmax(dim=1) + 1
    assert gold_ranks(r, gold).tolist() == want.tolist()
    with pytest.raises(ValueError):
        gold_ranks(scores, torch.tensor([0, 1]))
