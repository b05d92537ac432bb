"""models/towers.py: a batch's image tower beside its text tower, only on a free core."""

from __future__ import annotations

import threading

import pytest
import torch

from models.towers import TowerRunner


def test_image_runs_on_a_helper_thread_when_a_core_is_free() -> None:
    runner = TowerRunner(cores=2, threads=1)
    me = threading.get_ident()
    seen: dict[str, object] = {}

    def image() -> str:
        seen["thread"] = threading.get_ident()
        seen["inference"] = torch.is_inference_mode_enabled()
        return "image"

    with torch.inference_mode():
        assert runner.run(lambda: "text", image) == ("text", "image")
    assert seen["thread"] != me and seen["inference"] is True
    assert (runner.beside, runner.in_turn) == (1, 0)
    runner.close()


def test_towers_in_turn_without_a_spare_core() -> None:
    me = threading.get_ident()
    for cores, threads in ((1, 1), (2, 2), (3, 2)):  # no room for a second tower of `threads`
        runner = TowerRunner(cores=cores, threads=threads)
        assert not runner.enabled
        assert runner.run(lambda: 1, threading.get_ident) == (1, me)
        runner.close()
    runner = TowerRunner(cores=2, threads=1)
    # nothing to encode in the image tower: the caller says so, nothing is lent
    assert runner.run(lambda: 1, threading.get_ident, beside=False) == (1, me)
    assert (runner.beside, runner.in_turn) == (0, 1)
    runner.close()


def test_a_second_batch_gets_no_core_that_is_lent() -> None:
    """Two workers on 2 cores: while one batch's towers hold both cores, the other worker's
    batch runs its towers in turn on its own thread (never waits, never takes a third)."""
    runner = TowerRunner(cores=2, threads=1)
    inside, release = threading.Event(), threading.Event()

    def slow_image() -> str:
        inside.set()
        release.wait(10)
        return "slow"

    first: list[object] = []
    t = threading.Thread(target=lambda: first.append(runner.run(lambda: "a", slow_image)))
    t.start()
    assert inside.wait(10)
    worker = threading.get_ident()
    assert runner.run(lambda: "b", threading.get_ident) == ("b", worker)
    release.set()
    t.join(10)
    assert first == [("a", "slow")]
    assert (runner.beside, runner.in_turn) == (1, 1)
    # both done: the budget is whole again
    assert runner.run(lambda: "c", lambda: "d") == ("c", "d") and runner.beside == 2
    runner.close()


def test_errors_of_either_tower_reach_the_caller_and_free_the_core() -> None:
    runner = TowerRunner(cores=2, threads=1)
    finished = threading.Event()

    def image_ok() -> str:
        finished.set()
        return "image"

    def text_fails() -> str:
        raise RuntimeError("text tower")

    def image_fails() -> str:
        raise ValueError("image tower")

    with pytest.raises(RuntimeError, match="text tower"):
        runner.run(text_fails, image_ok)
    assert finished.is_set()  # the helper was waited for, not left running
    with pytest.raises(ValueError, match="image tower"):
        runner.run(lambda: "text", image_fails)
    assert runner.run(lambda: 1, lambda: 2) == (1, 2) and runner.beside == 3
    runner.close()


def test_budget_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        TowerRunner(cores=0, threads=1)
