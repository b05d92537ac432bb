"""Ranking metrics on hand-made ranks (MIMIC appendix A.3, released code's `<=`), and the
retrieve-then-rerank metrics both the MIMIC and the DRIN CLIs report."""

from __future__ import annotations

import pytest
import torch

from models.metrics import (
    candidate_metrics,
    candidate_ranks,
    drin_candidate_metrics,
    gold_ranks,
    ranking_metrics,
)


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


# 8 mentions over K = 10 retrieved candidates; 0 = the gold was not retrieved
CANDIDATE_RANKS = torch.tensor([1, 1, 2, 3, 7, 10, 0, 0])


def test_candidate_metrics_on_hand_made_ranks() -> None:
    m = candidate_metrics(CANDIDATE_RANKS, 10)
    assert set(m) == {"H@1", "H@3", "H@5", "H@10", "H@20", "MRR", "MR", "count"} | {
        "recall@candidates"
    }
    assert m["H@1"] == 2 / 8 and m["H@3"] == 4 / 8 and m["H@5"] == 4 / 8
    assert m["H@10"] == m["H@20"] == m["recall@candidates"] == 6 / 8  # a miss never hits
    assert m["MRR"] == pytest.approx((1 + 1 + 1 / 2 + 1 / 3 + 1 / 7 + 1 / 10) / 8)  # miss: 0
    assert m["MR"] == pytest.approx((1 + 1 + 2 + 3 + 7 + 10 + 11 + 11) / 8)  # miss: K + 1
    assert m["count"] == 8
    assert set(candidate_metrics(CANDIDATE_RANKS, 10, hits_at=(2,))) == {
        "H@2",
        "MRR",
        "MR",
        "count",
        "recall@candidates",
    }


def test_drin_candidate_metrics_are_the_same_numbers_under_the_drin_names() -> None:
    m = candidate_metrics(CANDIDATE_RANKS, 10)
    d = drin_candidate_metrics(CANDIDATE_RANKS, 10)
    assert d == {
        "Top-1": m["H@1"],
        "Top-5": m["H@5"],
        "Top-10": m["H@10"],
        "MRR": m["MRR"],
        "recall@10": m["recall@candidates"],
    }
    # Top-k only up to the K candidates; every rank <= K then
    assert set(drin_candidate_metrics(torch.tensor([1, 0, 3]), 3)) == {"Top-1", "MRR", "recall@3"}
    assert set(drin_candidate_metrics(CANDIDATE_RANKS, 100)) == {
        "Top-1",
        "Top-5",
        "Top-10",
        "Top-20",
        "MRR",
        "recall@100",
    }


def test_candidate_metrics_keep_the_names_bench_imports() -> None:
    from models import drin_train, evaluate

    assert evaluate.candidate_metrics is candidate_metrics  # bench/wikimel.py
    assert evaluate.candidate_ranks is candidate_ranks
    assert drin_train.candidate_metrics is drin_candidate_metrics  # bench/drin_quality.py
    assert drin_train.candidate_ranks is candidate_ranks


def test_candidate_ranks_equal_gold_ranks_when_every_entity_is_a_candidate() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 12, generator=gen)
    scores[:, ::3] = 0.0  # ties
    gold = torch.randint(0, 12, (5,), generator=gen)
    rows = torch.arange(12).expand(5, 12)
    assert candidate_ranks(scores, rows, gold).tolist() == gold_ranks(scores, gold).tolist()
