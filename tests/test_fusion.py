"""The fusion stage's parts on hand-made inputs: priors, features, calibration, the ranker's
persistence, metrics and the NIL rule."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from models.fusion import (
    AnswerContext,
    Calibration,
    CandidateInfo,
    CandidateSignals,
    CandidateTable,
    EntityPrior,
    FusionConfig,
    FusionModel,
    MentionText,
    all_features,
    answer_features,
    candidate_features,
    feature_groups,
    verdict,
)
from models.fusion_train import (
    calibration_error,
    choose_threshold,
    cross_fit,
    fit_calibration,
    fit_ranker,
    fit_verifier,
    nil_decisions,
    predict,
    ranking_metrics,
    refit,
    shared_sentence,
)


def _signals(
    names: list[list[str]], rng: np.random.Generator, drin: bool = False
) -> CandidateSignals:
    B, K = 1, len(names)
    rows = np.arange(K, dtype=np.int64)[None, :]
    return CandidateSignals(
        rows=rows,
        dense=rng.standard_normal((B, K)).astype(np.float32),
        from_dense=np.ones((B, K), bool),
        from_lexical=np.zeros((B, K), bool),
        lexical=np.zeros((B, K), np.float32),
        mimic=rng.standard_normal((B, K, 4)).astype(np.float32),
        drin=rng.standard_normal((B, K)).astype(np.float32) if drin else None,
        name_cos=rng.uniform(0, 1, (B, K)).astype(np.float32),
        info=[[CandidateInfo(f"Q{k}", tuple(n), None) for k, n in enumerate(names)]],
    )


def test_prior_counts_and_leave_one_out() -> None:
    prior = EntityPrior.fit([("Biden", "Q6279"), ("Biden", "Q6279"), ("Jill", "Q235349")])
    f = prior.features("biden", ["Q6279", "Q235349", "Q0", None])
    assert f[0, 0] == pytest.approx(math.log1p(2)) and f[1, 0] == pytest.approx(math.log1p(1))
    assert f[0, 1] == pytest.approx(2 / 3) and f[1, 1] == 0 and f[2].tolist() == [0, 0]
    # a training mention's own link does not count for itself
    own = prior.features("Biden", ["Q6279"], exclude="Q6279")
    assert own[0, 0] == pytest.approx(math.log1p(1)) and own[0, 1] == pytest.approx(1 / 2)
    back = EntityPrior.from_json(prior.to_json())
    assert back.features("Biden", ["Q6279"]).tolist() == prior.features("Biden", ["Q6279"]).tolist()


def test_features_shape_ranks_and_missing_values() -> None:
    rng = np.random.default_rng(0)
    names = [["Joe Biden"], ["Jill Biden"], ["Hunter Biden", "R. H. Biden"], ["George Bush"]]
    sig = _signals(names, rng)
    sig.rows[0, 3] = -1  # padding
    sig.info[0][3] = None
    m = [MentionText("Biden", "Biden's official Senate photo", (0, 5))]
    x = candidate_features(m, sig, EntityPrior())
    cols = list(all_features())
    assert x.shape == (1, 4, len(cols))
    assert np.isnan(x[0, 3]).all()  # padding
    assert np.isnan(x[0, :3, cols.index("drin")]).all()  # no DRIN model: unknown, not 0
    ranks = x[0, :3, cols.index("mimic_rank")]
    assert sorted(ranks.tolist()) == [1, 2, 3]
    best = int(np.argmax(sig.mimic[0, :3, 0]))
    assert ranks[best] == 1 and x[0, best, cols.index("mimic_gap")] == 0
    assert (x[0, :3, cols.index("mimic_gap")] <= 0).all()
    # every name holds "biden": three candidates share the mention's words
    assert x[0, :3, cols.index("ambiguity")].tolist() == [3, 3, 3]
    groups = feature_groups()
    assert [f for g in groups.values() for f in g] == cols


def test_calibration_is_a_monotone_probability() -> None:
    cal = Calibration(temperature=2.0, none_logit=1.0)
    s = np.array([[3.0, 1.0, -1.0, 0.0]])
    v = np.array([[True, True, True, False]])
    p = cal.probabilities(s, v)
    assert ((p >= 0) & (p <= 1)).all() and p[0, 3] == 0
    assert p.sum() < 1  # the rest is "none of these"
    assert p[0, 0] > p[0, 1] > p[0, 2]  # monotone in the score
    grid = np.linspace(-10, 10, 50)[None, :]
    q = Calibration(1.5, 0.0).probabilities(grid, np.ones_like(grid, bool))
    assert (np.diff(q[0]) > 0).all()


def test_fit_calibration_recovers_a_temperature() -> None:
    rng = np.random.default_rng(1)
    B, K, T = 4000, 8, 2.5
    s = rng.standard_normal((B, K)) * 3
    logits = np.concatenate([s / T, np.full((B, 1), -1.0 / T)], axis=1)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    label = np.array([rng.choice(K + 1, p=row) for row in p])
    pos = np.where(label == K, -1, label)
    cal = fit_calibration(s, np.ones((B, K), bool), pos)
    assert cal.temperature == pytest.approx(T, rel=0.1)
    assert cal.none_logit == pytest.approx(-1.0, abs=0.5)


def test_ranking_metrics_and_ece_by_hand() -> None:
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.5, 0.4, 0.3]])
    valid = np.ones_like(scores, bool)
    pos = np.array([0, 0, -1])  # right, second, gold not in the list
    m = ranking_metrics(scores, valid, pos)
    assert m["H@1"] == pytest.approx(1 / 3) and m["H@3"] == pytest.approx(2 / 3)
    assert m["MRR"] == pytest.approx((1 + 0.5 + 0) / 3) and m["recall"] == pytest.approx(2 / 3)
    conf = np.array([0.95, 0.95, 0.25, 0.25])
    correct = np.array([True, False, False, False])
    e = calibration_error(conf, correct)
    # two bins: |0.5 - 0.95| and |0 - 0.25|, half the predictions each
    assert e["ece"] == pytest.approx(0.5 * 0.45 + 0.5 * 0.25)
    assert sum(b["n"] for b in e["bins"]) == 4


def test_nil_flips_at_the_threshold() -> None:
    conf = np.array([0.9, 0.3, 0.6])
    k = np.array([0, 0, 0])  # each list's answer
    pos = np.array([0, -1, 1])  # right; NIL; the gold is another candidate
    low = nil_decisions(conf, k, pos, 0.25)  # nothing is NIL
    assert low["nil_recall"] == 0 and low["accuracy"] == pytest.approx(1 / 3)
    mid = nil_decisions(conf, k, pos, 0.5)  # the 0.3 one is NIL
    assert mid["nil_precision"] == 1 and mid["nil_recall"] == 1
    assert mid["accuracy"] == pytest.approx(2 / 3)
    t = choose_threshold(conf, k, pos)
    assert 0.3 < t <= 0.6 or t == pytest.approx(0.6)
    assert nil_decisions(conf, k, pos, t)["accuracy"] == pytest.approx(2 / 3)


def test_answer_features_pick_the_best_candidate() -> None:
    scores = np.array([[1.0, 3.0, 2.0], [0.5, 0.0, 0.0]])
    valid = np.array([[True, True, True], [True, False, False]])
    probs = np.array([[0.1, 0.6, 0.2], [0.7, 0.0, 0.0]])
    x = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    f, k = answer_features(scores, probs, x, valid)
    assert k.tolist() == [1, 0]
    assert f[0, :4].tolist() == pytest.approx([3.0, 1.0, 0.6, 3])
    assert f[1, 1] == 10.0  # a one-candidate list: no second, a large margin
    assert f[0, 4:].tolist() == x[0, 1].tolist()


def test_answer_context_counts_the_surface_links_the_list_covers() -> None:
    # "Biden" was linked 3 times in training: twice to Joe, once to Jill. With Joe gone from
    # the KB (the NIL case) the list covers a third of those links; with Joe in it, all.
    prior = EntityPrior.fit([("Biden", "Joe"), ("biden", "Joe"), ("Biden", "Jill")])
    m = [MentionText("Biden", "Biden spoke"), MentionText("Harris", "Harris spoke")]
    jill, joe = CandidateInfo("Jill", ("Jill Biden",)), CandidateInfo("Joe", ("Joe Biden",))
    ctx = AnswerContext.of(prior, m, [[jill, None], [joe, jill]])
    assert ctx.surface_links.tolist() == pytest.approx([math.log1p(3), 0.0])
    assert ctx.prior_in_list.tolist() == pytest.approx([1 / 3, 0.0])  # Harris: never seen
    full = AnswerContext.of(prior, m[:1], [[jill, joe]])
    assert full.prior_in_list.tolist() == pytest.approx([1.0])


def test_answer_features_v2_add_the_list_and_surface_columns() -> None:
    scores = np.array([[1.0, 3.0, 2.0]])
    valid = np.array([[True, True, True]])
    probs = np.array([[0.1, 0.6, 0.2]])
    x = np.zeros((1, 3, 2), dtype=np.float32)
    ctx = AnswerContext(np.array([2.0], np.float32), np.array([0.25], np.float32))
    v1, _ = answer_features(scores, probs, x, valid)
    v2, k = answer_features(scores, probs, x, valid, ctx)
    assert v2.shape[1] == v1.shape[1] + 4 and k.tolist() == [1]
    assert v2[0, : v1.shape[1]].tolist() == v1[0].tolist()
    assert v2[0, v1.shape[1] :].tolist() == pytest.approx([0.1, 0.2, 2.0, 0.25])  # none, p2


def test_a_v1_config_keeps_its_verifier_inputs() -> None:
    doc = FusionConfig(features=("mimic",), mimic_fingerprint="m").to_dict()
    doc.pop("verifier_inputs")  # a model saved before v2
    assert FusionConfig.from_dict(doc).verifier_inputs == 1


def test_a_config_before_v3_keeps_its_answer_verifier() -> None:
    doc = FusionConfig(features=("mimic",), mimic_fingerprint="m").to_dict()
    doc.pop("verifier_target")  # a model saved before v3
    assert FusionConfig.from_dict(doc).verifier_target == "answer"


def test_verdict_of_an_in_list_verifier() -> None:
    """In-list: the answer confidence is P(in the list) x the best's share of the candidates'
    calibrated probability; an "answer" verifier's output is the answer confidence itself."""
    q = np.array([0.8, 0.5, 0.9], dtype=np.float32)
    probs = np.array([[0.2, 0.6, 0.0], [0.3, 0.1, 0.1], [0.0, 0.0, 0.0]])
    best = np.array([1, 0, -1])  # the third list is empty
    v = verdict(q, probs, best, "in_list")
    assert v.in_list is not None and v.in_list.tolist() == pytest.approx([0.8, 0.5, 0.0])
    assert v.answer.tolist() == pytest.approx([0.8 * 0.6 / 0.8, 0.5 * 0.3 / 0.5, 0.0])
    assert v.nil_score is v.in_list
    assert (v.answer <= v.in_list + 1e-7).all()  # right answer => entity in the list
    a = verdict(q, probs, best, "answer")
    assert a.in_list is None and a.answer.tolist() == pytest.approx([0.8, 0.5, 0.0])
    assert a.nil_score is a.answer
    with pytest.raises(ValueError, match="verifier target"):
        verdict(q, probs, best, "nil")


def _table(n: int, k: int, seed: int) -> CandidateTable:
    """Synthetic lists whose gold has the best mimic score 70% of the time."""
    rng = np.random.default_rng(seed)
    sigs, mentions, gold = [], [], []
    for b in range(n):
        names = [[f"Name {b} {j}"] for j in range(k)]
        s = _signals(names, rng)
        s.rows += b * k  # one row per entity
        s.info = [[CandidateInfo(f"Q{b}-{j}", (f"Name {b} {j}",)) for j in range(k)]]
        g = int(rng.integers(k))
        if rng.random() < 0.7:
            s.mimic[0, g, 0] = s.mimic[0, :, 0].max() + 1
        sigs.append(s)
        mentions.append(MentionText(f"Name {b}", f"Name {b} spoke", None))
        gold.append(f"Q{b}-{g}")
    cat = CandidateSignals(
        np.concatenate([s.rows for s in sigs]),
        np.concatenate([s.dense for s in sigs]),
        np.concatenate([s.from_dense for s in sigs]),
        np.concatenate([s.from_lexical for s in sigs]),
        np.concatenate([s.lexical for s in sigs]),
        np.concatenate([s.mimic for s in sigs]),
        None,
        np.concatenate([s.name_cos for s in sigs]),
        [s.info[0] for s in sigs],
    )
    return CandidateTable([f"M{b}" for b in range(n)], mentions, gold, cat)


def test_ranker_learns_and_round_trips(tmp_path: Path) -> None:
    train, dev = _table(300, 6, 0), _table(100, 6, 1)
    names = [f for f in all_features() if not f.startswith("drin")]
    cols = [list(all_features()).index(f) for f in names]
    prior = EntityPrior()
    xt = candidate_features(train.mentions, train.signals, prior)
    xd = candidate_features(dev.mentions, dev.signals, prior)
    booster = fit_ranker(xt, train, xd, dev, cols, names, seed=0, threads=1, rounds=50)
    s = predict(booster, xd, cols, dev.signals.valid)
    h1 = ranking_metrics(s, dev.signals.valid, dev.gold_positions())["H@1"]
    assert h1 > 0.6  # it found the planted signal (chance is 1/6)
    cal = {"fusion": {"temperature": 1.3, "none_logit": -2.0}}
    other = fit_ranker(xd, dev, xt, train, cols, names, seed=1, threads=1, rounds=50)
    model = FusionModel(FusionConfig(tuple(names), "abc", calibration=cal), [booster, other], prior)
    # a cross-fitted model is the mean of its folds' boosters
    mean = (s + predict(other, xd, cols, dev.signals.valid)) / 2
    assert np.allclose(model.score(xd), mean, atol=1e-5)
    model.save_pretrained(tmp_path / "fusion")
    back = FusionModel.from_pretrained(tmp_path / "fusion")
    assert back.fingerprint() == model.fingerprint()
    assert np.array_equal(back.score(xd), model.score(xd))
    assert back.calibration("fusion") == Calibration(1.3, -2.0) and back.calibration("x") is None
    # contributions add up to the score (SHAP values of the trees)
    c = back.contributions(xd[0])
    assert np.allclose(c.sum(axis=1), back.score(xd[:1])[0], atol=1e-4)


def test_table_round_trip_and_removal(tmp_path: Path) -> None:
    t = _table(5, 4, 2)
    t.save(tmp_path / "t")
    back = CandidateTable.load(tmp_path / "t")
    assert back.ids == t.ids and back.gold == t.gold and back.mentions == t.mentions
    assert np.array_equal(back.signals.mimic, t.signals.mimic)
    assert back.signals.info == t.signals.info
    gone = t.without({"Q1-1", t.gold[2]})  # type: ignore[arg-type]
    assert all(c is None or c.id != "Q1-1" for line in gone.signals.info for c in line)
    assert gone.gold[2] is None and gone.gold[0] == t.gold[0]
    assert ((gone.signals.rows >= 0).sum()) == (t.signals.rows >= 0).sum() - 2
    assert gone.gold_positions()[2] == -1


def test_lists_without_their_own_gold() -> None:
    t = _table(6, 4, 3)
    own = t.without_own_gold()
    assert own.gold == [None] * 6
    for b, k in enumerate(t.gold_positions()):
        # only the mention's own gold left its list; the gold is still in every other list
        assert own.signals.rows[b, k] == -1 and own.signals.info[b][k] is None
        assert (own.signals.rows[b] >= 0).sum() == (t.signals.rows[b] >= 0).sum() - 1
    assert np.array_equal(own.signals.mimic, t.signals.mimic)


def test_verifier_learns_from_extra_nil_lists() -> None:
    # the verifier is fitted on the rows and the extra (all-wrong) rows; out-of-fold
    # predictions come back for the given rows only, and the extra rows pull them down
    rng = np.random.default_rng(0)
    n = 400
    feats = rng.normal(size=(n, 3)).astype(np.float32)
    right = feats[:, 0] + 0.5 * rng.normal(size=n) > 0
    fold = np.arange(n) % 4
    _, plain = fit_verifier(feats, right, fold, seed=0, threads=1)
    extra = (feats, np.zeros(n, dtype=bool), fold, 1.0)
    _, pulled = fit_verifier(feats, right, fold, seed=0, threads=1, extra=[extra])
    assert plain.shape == pulled.shape == (n,)
    assert pulled.mean() < plain.mean() - 0.1
    # it still ranks by the planted signal
    assert np.corrcoef(pulled, feats[:, 0])[0, 1] > 0.5
    # rows in no fold (-1: train-split lists) always train; weight 0 leaves a set out
    always = (feats, np.zeros(n, dtype=bool), np.full(n, -1), 1.0)
    _, pulled2 = fit_verifier(feats, right, fold, seed=0, threads=1, extra=[always])
    assert pulled2.mean() < plain.mean() - 0.1
    _, same = fit_verifier(feats, right, fold, 0, 1, extra=[(*always[:3], 0.0)])
    assert np.allclose(same, plain)


def test_answer_context_leaves_a_training_mentions_own_link_out() -> None:
    prior = EntityPrior.fit([("Biden", "Joe"), ("Biden", "Jill"), ("Solo", "Han")])
    jill, joe = CandidateInfo("Jill", ("Jill Biden",)), CandidateInfo("Joe", ("Joe Biden",))
    han = CandidateInfo("Han", ("Han Solo",))
    m = [MentionText("Biden", "Biden spoke"), MentionText("Solo", "Solo flew")]
    ctx = AnswerContext.of(prior, m, [[joe], [han]], exclude=["Joe", "Han"])
    # Biden: one other link (Jill), not in the list; Solo: no link but its own
    assert ctx.surface_links.tolist() == pytest.approx([math.log1p(1), 0.0])
    assert ctx.prior_in_list.tolist() == pytest.approx([0.0, 0.0])
    with_jill = AnswerContext.of(prior, m[:1], [[joe, jill]], exclude=["Joe"])
    assert with_jill.prior_in_list.tolist() == pytest.approx([1.0])


def test_cross_fit_folds_share_one_tree_count_and_refit_uses_it() -> None:
    dev = _table(200, 6, 4)
    names = [f for f in all_features() if not f.startswith("drin")]
    cols = [list(all_features()).index(f) for f in names]
    x = candidate_features(dev.mentions, dev.signals, EntityPrior())
    folded, fold_of = cross_fit(x, dev, cols, names, 4, seed=0, threads=1, rounds=60)
    trees = {b.current_iteration() for b in folded}
    assert len(trees) == 1 and 20 <= trees.pop() <= 60  # one count, at least min_rounds
    assert sorted(np.bincount(fold_of).tolist()) == [50, 50, 50, 50]
    one = refit(x, dev, cols, names, folded, seed=0, threads=1)
    assert one.current_iteration() == folded[0].current_iteration()
    s = predict(one, x, cols, dev.signals.valid)
    assert ranking_metrics(s, dev.signals.valid, dev.gold_positions())["H@1"] > 0.6


def test_shared_sentence_marks_the_mentions_of_one_caption() -> None:
    cap = "Reinfeldt with Bush at the White House."
    ms = [
        MentionText("Reinfeldt", cap, (0, 9)),
        MentionText("Bush", cap, (15, 19)),
        MentionText("Biden", "Biden's official Senate photo"),
    ]
    assert shared_sentence(ms).tolist() == [True, True, False]
    assert shared_sentence([]).shape == (0,)
