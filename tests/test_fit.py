"""The shared epoch loop (models/fit.py) on scripted losses and validation scores, and its
batching and optimiser-step helpers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.fit import FitState, Validation, fit, optimizer_step, shuffled_batches


class Script:
    """A fake trainer: epoch e has loss 10 - e and the validation score ``scores[e]``."""

    def __init__(self, scores: dict[int, tuple[float, ...]]) -> None:
        self.scores = scores
        self.trained: list[int] = []
        self.validated: list[int] = []
        self.best: list[int] = []
        self.after: list[int] = []

    def train_epoch(self, epoch: int) -> float:
        self.trained.append(epoch)
        return 10.0 - epoch

    def validate(self, epoch: int) -> Validation:
        self.validated.append(epoch)
        s = self.scores[epoch]
        return Validation(s, {"all": s[0], "more": 1}, {"all": s[0]}, f"score {s}")

    def on_best(self, epoch: int, val: Validation) -> None:
        assert val.metrics["more"] == 1
        self.best.append(epoch)

    def after_epoch(self, state: FitState) -> None:
        self.after.append(state.epoch)

    def run(self, state: FitState, epochs: int, **kw: object) -> FitState:
        return fit(
            state,
            epochs,
            self.train_epoch,
            self.validate,
            self.on_best,
            after_epoch=self.after_epoch,
            **kw,  # type: ignore[arg-type]
        )


def test_validates_every_n_and_after_the_last_epoch_and_keeps_the_best(tmp_path: Path) -> None:
    sc = Script({1: (0.2,), 3: (0.5,), 5: (0.4,), 6: (0.5,)})
    hist = tmp_path / "history.json"
    state = sc.run(FitState(best=(-1.0,)), 7, patience=5, val_every=2, history_file=hist)
    assert sc.trained == list(range(7)) and sc.validated == [1, 3, 5, 6]
    assert sc.best == [1, 3]  # a tie (epoch 6) is not better
    assert state.best == (0.5,) and state.bad == 2 and not state.stopped_early
    assert sc.after == [1, 2, 3, 4, 5, 6, 7] and state.epoch == 7
    assert [list(r) for r in state.history[:2]] == [
        ["epoch", "loss", "seconds"],
        ["epoch", "loss", "seconds", "val"],
    ]
    assert [r["loss"] for r in state.history] == [10.0 - e for e in range(7)]
    assert state.history[3]["val"] == {"all": 0.5}
    assert json.loads(hist.read_text()) == state.history


def test_early_stop_after_patience_validations_without_a_better_score() -> None:
    sc = Script({0: (0.3, 0.1), 1: (0.3, 0.2), 2: (0.3, 0.2), 3: (0.2, 0.9), 4: (0.9, 0.0)})
    state = sc.run(FitState(best=(-1.0, -1.0)), 10, patience=2)
    assert sc.best == [0, 1]  # compared as tuples: same Top-1, better MRR wins
    assert sc.trained == [0, 1, 2, 3] and state.stopped_early and state.bad == 2
    assert len(state.history) == 4 and state.best == (0.3, 0.2)


def test_resuming_from_a_state_continues_where_it_stopped() -> None:
    scores = {e: (s,) for e, s in enumerate([0.1, 0.4, 0.3, 0.2, 0.6, 0.1])}
    whole = Script(scores)
    a = whole.run(FitState(best=(-1.0,)), 6, patience=3)
    first, second = Script(scores), Script(scores)
    b = first.run(FitState(best=(-1.0,)), 3, patience=3)
    b = second.run(FitState(b.best, b.bad, b.epoch, list(b.history)), 6, patience=3)
    assert second.trained == [3, 4, 5]
    assert first.best + second.best == whole.best == [0, 1, 4]
    assert (a.best, a.bad, a.epoch, a.stopped_early) == (b.best, b.bad, b.epoch, b.stopped_early)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]


def test_nothing_to_do_when_every_epoch_is_done() -> None:
    sc = Script({})
    state = sc.run(FitState((0.5,), 1, 4, [{"epoch": 4}]), 4, patience=3)
    assert sc.trained == [] and state.history == [{"epoch": 4}] and not state.stopped_early


def test_shuffled_batches_slice_one_permutation_drawn_from_the_generator() -> None:
    losses: list[float] = []
    got = list(shuffled_batches(10, 4, torch.Generator().manual_seed(3), "t", False, losses))
    want = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    assert [len(b) for b in got] == [4, 4, 2]
    assert torch.equal(torch.cat(got), want)


def test_optimizer_step_descends_and_returns_the_loss() -> None:
    w = torch.nn.Parameter(torch.tensor([2.0]))
    opt = torch.optim.SGD([w], lr=0.25)
    assert optimizer_step(opt, (w**2).sum()) == 4.0
    assert w.item() == 2.0 - 0.25 * 4.0  # one step along the gradient 2w
    assert optimizer_step(opt, (w**2).sum()) == 1.0
