"""Intra-op thread counts (models/threads.py): the setting wins, else free cores - reserve."""

from __future__ import annotations

import pytest
import torch

import models.threads as threads


def test_default_is_the_affinity_set_minus_the_reserve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    assert threads.available_cores() == 6
    assert threads.default_threads() == 6 - threads.THREAD_RESERVE
    assert threads.default_threads(reserve=2) == 4
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {3})
    assert threads.default_threads() == 1  # never below one
    assert threads.resolve_threads(None, reserve=0) == 1


def test_a_set_count_wins_and_is_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    assert threads.resolve_threads(3) == 3
    with pytest.raises(ValueError, match=">= 1"):
        threads.resolve_threads(0)
    before = torch.get_num_threads()
    try:
        assert threads.configure_threads(None, reserve=0) == 2
        assert torch.get_num_threads() == 2
        assert threads.configure_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
