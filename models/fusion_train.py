"""``mel-train-fusion``: learn the fusion ranker, calibrate it, choose the NIL threshold.

    mel-candidates --data D --model M --index I --out T            # tables of train/dev/test
    mel-train-fusion --tables T --out artifacts/fusion [--report R.json --plot R.png]

1. Features (``models/fusion.py``) for every (mention, candidate) of the train / dev / test
   tables; the entity priors are counted on the train links, leave-one-out on train itself.
2. LightGBM lambdarank (one group per mention whose gold is in its list) cross-fitted on dev
   in ``--folds`` folds (MIMIC was fitted on train, so its train scores are optimistic). The
   folds share one tree count, the one with the best held-out NDCG@1 averaged over them
   (one temperature can then calibrate them all); the served ranker is one model on all of
   dev with that count, saved with its feature list and the priors.
3. Calibration on dev, per reranker (fusion over the merged lists; MIMIC, DRIN and retrieval
   over the dense lists they are served on): temperature and a "none of these" logit fitted
   by maximum likelihood on the out-of-fold scores (the label is the gold's position, or
   "none" when the gold is not in the list). Reported on test: expected calibration error (15 bins) of the top-1 confidence
   and a reliability diagram.
4. NIL protocol: the gold entities of a seeded share of the dev and test mentions leave the KB
   (every mention whose gold left becomes NIL). A verifier (LightGBM binary on the best
   candidate's score, margin, probability and own features, and with ``--verifier-inputs 2``
   the list's none / second-best probabilities and the surface's training links) learns the
   probability that the mention's entity is among the candidates (``--nil-target in_list``;
   ``answer``: that the best candidate is right, as models before v3 did) on dev's
   out-of-fold lists plus more NIL examples than the split gives: every dev list once more
   without its own gold (weight ``--nil-augment``) and the train split's lists, as the
   protocol leaves them and without their own gold (weight ``--nil-train``); the weights
   with the best dev accuracy win. The threshold on that probability that maximises dev
   accuracy (NIL counted as a class) is saved; test NIL precision / recall / F1 and accuracy
   are reported, next to a threshold on the softmax confidence alone. The *answer
   confidence* the server returns is P(in the list) x P(the best | in the list), the latter
   the calibrated probabilities renormalised over the candidates.
5. ``--ablation``: the ranker retrained without each feature group, test H@1 / MRR.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.fusion import (
    VERIFIER_INPUTS,
    VERIFIER_TARGET,
    VERIFIER_TARGETS,
    AnswerContext,
    Calibration,
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

logger = logging.getLogger(__name__)

HITS = (1, 3, 5, 10)
# The NIL verifier's extra training rows: the weights tried, the best dev accuracy (NIL as a
# class) kept. Own-gold-removed dev lists, and the train split's lists (0: not used).
NIL_AUGMENT = (0.3, 1.0)
NIL_TRAIN = (0.3, 1.0)
ECE_BINS = 15


# ---------------------------------------------------------------------------------- data
def table_features(table: CandidateTable, prior: EntityPrior, training: bool) -> np.ndarray:
    """(B, K, F_all); ``training``: leave each mention's own link out of the priors."""
    exclude = table.gold if training else None
    return candidate_features(table.mentions, table.signals, prior, exclude)


def _flat(x: np.ndarray, valid: np.ndarray, pos: np.ndarray, keep: np.ndarray) -> tuple[Any, ...]:
    """Rows of the mentions ``keep`` (valid candidates only), labels, group sizes."""
    xs, ys, groups = [], [], []
    for b in np.flatnonzero(keep):
        ks = np.flatnonzero(valid[b])
        xs.append(x[b, ks])
        ys.append((ks == pos[b]).astype(np.float32))
        groups.append(len(ks))
    return np.concatenate(xs), np.concatenate(ys), np.asarray(groups)


def fit_ranker(
    x_train: np.ndarray,
    train: CandidateTable,
    x_dev: np.ndarray,
    dev: CandidateTable,
    columns: Sequence[int],
    names: Sequence[str],
    seed: int,
    threads: int,
    rounds: int = 600,
    curve: list[float] | None = None,
) -> Any:
    """LightGBM lambdarank on the train lists that hold their gold; early stop on dev, or,
    given ``curve``, all ``rounds`` with dev NDCG@1 after each appended to it."""
    import lightgbm as lgb

    data = []
    for x, t in ((x_train, train), (x_dev, dev)):
        pos = t.gold_positions()
        xs, ys, g = _flat(x[..., list(columns)], t.signals.valid, pos, pos >= 0)
        data.append((xs, ys, g))
    (xt, yt, gt), (xd, yd, gd) = data
    params = {
        "objective": "lambdarank",
        "metric": "ndcg",
        "ndcg_eval_at": [1],
        "learning_rate": 0.05,
        "num_leaves": 31,
        "min_data_in_leaf": 20,
        "feature_fraction": 0.8,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambdarank_truncation_level": 20,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": threads,
        "verbose": -1,
    }
    ds_train = lgb.Dataset(xt, yt, group=gt, feature_name=list(names), free_raw_data=True)
    ds_dev = lgb.Dataset(xd, yd, group=gd, reference=ds_train)
    callbacks: list[Any]
    if curve is None:
        callbacks = [lgb.early_stopping(50, verbose=False)]
    else:
        evals: dict[str, Any] = {}
        callbacks = [lgb.record_evaluation(evals)]
    booster = lgb.train(
        params,
        ds_train,
        num_boost_round=rounds,
        valid_sets=[ds_dev],
        callbacks=callbacks,
    )
    if curve is not None:
        curve.extend(next(iter(evals.values()))["ndcg@1"])
    return booster


def predict(booster: Any, x: np.ndarray, columns: Sequence[int], valid: np.ndarray) -> np.ndarray:
    B, K, _ = x.shape
    out = np.full((B, K), -np.inf, dtype=np.float32)
    flat = x[..., list(columns)][valid]
    out[valid] = booster.predict(flat, num_threads=os.cpu_count() or 1)
    return out


# ------------------------------------------------------------------------------- metrics
def ranking_metrics(scores: np.ndarray, valid: np.ndarray, pos: np.ndarray) -> dict[str, float]:
    """Over mentions with a gold: H@k and MRR (a gold not in the list is a miss: rank
    infinite, 0 in MRR), and the share of lists that hold the gold (recall)."""
    has = pos >= 0
    s = np.where(valid, scores, -np.inf)
    gold_score = np.take_along_axis(s, np.maximum(pos, 0)[:, None], axis=1)[:, 0]
    # stable: ties are broken by list order, as the server's argsort does
    k_idx = np.arange(s.shape[1])[None, :]
    before = (s > gold_score[:, None]) | ((s == gold_score[:, None]) & (k_idx < pos[:, None]))
    rank = np.where(has, before.sum(axis=1) + 1, np.inf)
    out = {f"H@{k}": float((rank <= k).mean()) for k in HITS}
    out["MRR"] = float(np.where(np.isfinite(rank), 1.0 / rank, 0.0).mean())
    out["recall"] = float(has.mean())
    out["mentions"] = len(pos)
    return out


def shared_sentence(mentions: Sequence[MentionText]) -> np.ndarray:
    """(N,) bool: the mention's sentence holds other mentions of the same table too (a caption
    naming several people: the text must say which one each mention is)."""
    counts = Counter(m.sentence for m in mentions)
    return np.array([counts[m.sentence] > 1 for m in mentions], dtype=bool)


def fit_calibration(scores: np.ndarray, valid: np.ndarray, pos: np.ndarray) -> Calibration:
    """Temperature T and "none" logit b maximising the likelihood of the gold's position
    (or "none" when the gold is not in the list)."""
    from scipy.optimize import minimize

    keep = valid.any(axis=1)
    s, v, p = scores[keep], valid[keep], pos[keep]
    s = np.where(v, s, 0.0).astype(np.float64)
    label = np.where(p >= 0, p, s.shape[1])

    def nll(theta: np.ndarray) -> float:
        t, b = float(np.exp(theta[0])), float(theta[1])
        z = np.where(v, s / t, -np.inf)
        full = np.concatenate([z, np.full((len(z), 1), b / t)], axis=1)
        m = full.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(full - m).sum(axis=1))).astype(np.float64)
        picked = np.take_along_axis(full, label[:, None], axis=1)[:, 0]
        return float((lse - picked).mean())

    top = np.where(v, s, -np.inf).max(axis=1)
    start = np.array([np.log(max(1e-3, float(np.std(top)) or 1.0)), float(np.min(top)) - 1])
    res = minimize(nll, start, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-7})
    return Calibration(temperature=float(np.exp(res.x[0])), none_logit=float(res.x[1]))


def top1(probs: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B,) position and confidence of each list's best candidate (-1, 0 for empty lists)."""
    p = np.where(valid, probs, -1.0)
    k = p.argmax(axis=1)
    conf = np.take_along_axis(probs, k[:, None], axis=1)[:, 0]
    empty = ~valid.any(axis=1)
    return np.where(empty, -1, k), np.where(empty, 0.0, conf)


def calibration_error(conf: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Expected calibration error over equal-width confidence bins, and each bin's counts."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for i in range(bins):
        m = which == i
        n = int(m.sum())
        acc = float(correct[m].mean()) if n else 0.0
        mean_conf = float(conf[m].mean()) if n else 0.0
        ece += n / max(1, len(conf)) * abs(acc - mean_conf)
        rows.append(
            {
                "lo": float(edges[i]),
                "hi": float(edges[i + 1]),
                "n": n,
                "accuracy": acc,
                "confidence": mean_conf,
            }
        )
    return {"ece": float(ece), "bins": rows}


def reliability_png(bins: list[dict[str, Any]], title: str, path: Path) -> None:
    """A reliability diagram (accuracy per confidence bin against the diagonal), with Pillow."""
    from PIL import Image, ImageDraw

    w = h = 480
    pad = 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)

    def xy(x: float, y: float) -> tuple[float, float]:
        return pad + x * (w - 2 * pad), h - pad - y * (h - 2 * pad)

    d.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    d.line([xy(0, 0), xy(1, 1)], fill=(160, 160, 160), width=1)
    total = max(1, sum(b["n"] for b in bins))
    for b in bins:
        if not b["n"]:
            continue
        d.rectangle(
            [xy(b["lo"], b["accuracy"]), xy(b["hi"], 0)], fill=(70, 110, 200), outline="white"
        )
        share = b["n"] / total  # how many predictions fall in the bin: a bar at the bottom
        d.rectangle([xy(b["lo"], 0.06 * share**0.5), xy(b["hi"], 0)], fill=(240, 150, 40))
    for t in (0.0, 0.5, 1.0):
        d.text((xy(t, 0)[0] - 8, h - pad + 6), f"{t:.1f}", fill="black")
        d.text((pad - 30, xy(0, t)[1] - 6), f"{t:.1f}", fill="black")
    d.text((pad, 12), title, fill="black")
    d.text((w // 2 - 60, h - 22), "confidence of the top-1", fill="black")
    d.text((4, pad - 22), "accuracy", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def nil_split(tables: Sequence[CandidateTable], share: float, seed: int) -> set[str]:
    """The gold entities of a seeded ``share`` of the tables' mentions that have one."""
    rng = random.Random(seed)
    golds = [g for t in tables for g in t.gold if g is not None]
    picked = rng.sample(range(len(golds)), max(1, round(share * len(golds))))
    return {golds[i] for i in picked}


def nil_decisions(
    conf: np.ndarray, k: np.ndarray, pos: np.ndarray, threshold: float
) -> dict[str, float]:
    """NIL = the answer's confidence under the threshold. NIL precision / recall / F1, and
    accuracy with NIL as a class (a non-NIL mention is right when its gold is the answer)."""
    said_nil = conf < threshold
    is_nil = pos < 0
    right_entity = (~is_nil) & (~said_nil) & (k == pos)
    tp = float((said_nil & is_nil).sum())
    prec = tp / max(1.0, float(said_nil.sum()))
    rec = tp / max(1.0, float(is_nil.sum()))
    f1 = 2 * prec * rec / max(1e-12, prec + rec)
    acc = float(((said_nil & is_nil) | right_entity).mean())
    return {
        "threshold": threshold,
        "nil_precision": prec,
        "nil_recall": rec,
        "nil_f1": f1,
        "accuracy": acc,
        "nil_mentions": int(is_nil.sum()),
        "mentions": len(pos),
    }


def choose_threshold(conf: np.ndarray, k: np.ndarray, pos: np.ndarray) -> float:
    """The confidence threshold that maximises accuracy with NIL as a class."""
    grid = np.unique(np.concatenate([[0.0], conf, [1.0]]))
    best, best_acc = 0.0, -1.0
    for t in grid[:: max(1, len(grid) // 2000)]:
        acc = nil_decisions(conf, k, pos, float(t))["accuracy"]
        if acc > best_acc:
            best, best_acc = float(t), acc
    return best


def fit_verifier(
    feats: np.ndarray,
    right: np.ndarray,
    fold_of: np.ndarray,
    seed: int,
    threads: int,
    extra: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, float]] = (),
) -> tuple[Any, np.ndarray]:
    """P(the answer is right) from :func:`~models.fusion.answer_features`: LightGBM binary,
    its rounds chosen by cross-fitting (out-of-fold predictions of ``feats`` returned for the
    threshold), then one model on all rows (fold models averaged would blunt the
    probabilities). ``extra``: more training rows, each set (features, right, fold, weight),
    e.g. the lists with their own gold removed; they train but are not returned (fold -1:
    in every fold's training rows, never held out)."""
    import lightgbm as lgb

    n = len(feats)
    w = np.ones(n, dtype=np.float32)
    fold_all = fold_of
    for fx, rx, ox, wx in extra:
        if not len(fx) or wx <= 0:
            continue
        feats = np.concatenate([feats, fx])
        right = np.concatenate([right, rx])
        fold_all = np.concatenate([fold_all, ox])
        w = np.concatenate([w, np.full(len(fx), wx, dtype=np.float32)])

    params = {
        "objective": "binary",
        "learning_rate": 0.05,
        "num_leaves": 15,
        "min_data_in_leaf": 20,
        "feature_fraction": 0.8,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": threads,
        "verbose": -1,
    }
    y = right.astype(np.float32)
    oof = np.zeros(n, dtype=np.float32)
    rounds = []
    for f in np.unique(fold_of):
        tr, va = fold_all != f, fold_all == f
        b = lgb.train(
            params,
            lgb.Dataset(feats[tr], y[tr], weight=w[tr]),
            500,
            valid_sets=[lgb.Dataset(feats[va], y[va], weight=w[va])],
            callbacks=[lgb.early_stopping(30, verbose=False)],
        )
        rounds.append(b.best_iteration)
        mine = np.flatnonzero(fold_of == f)
        oof[mine] = b.predict(feats[mine], num_iteration=b.best_iteration)
    final = lgb.train(params, lgb.Dataset(feats, y, weight=w), max(10, int(np.median(rounds))))
    return final, oof


# --------------------------------------------------------------------------------- train
def _dense_valid(t: CandidateTable) -> np.ndarray:
    """The lists MIMIC, DRIN and retrieval are served on: the dense channel's."""
    return t.signals.valid & t.signals.from_dense


def cross_fit(
    x: np.ndarray,
    table: CandidateTable,
    columns: Sequence[int],
    names: Sequence[str],
    folds: int,
    seed: int,
    threads: int,
    rounds: int = 300,
    min_rounds: int = 20,
) -> tuple[list[Any], np.ndarray]:
    """``folds`` rankers, each fitted on the other folds of ``table``, all with the same
    number of trees: the one that maximises the held-out NDCG@1 averaged over the folds.
    (Early stopping each fold on its own quarter picked 8 trees for one and 118 for another;
    their scores then live on different scales and one temperature cannot calibrate them.)
    Returns them and which fold each mention was held out in (for out-of-fold scores)."""
    import lightgbm as lgb

    order = np.random.default_rng(seed).permutation(len(table))
    fold_of = np.empty(len(table), dtype=np.int64)
    for f, part in enumerate(np.array_split(order, folds)):
        fold_of[part] = f
    boosters, curves = [], []
    for f in range(folds):
        held = np.flatnonzero(fold_of == f).tolist()
        rest = np.flatnonzero(fold_of != f).tolist()
        curve: list[float] = []
        boosters.append(
            fit_ranker(
                x[rest],
                table.take(rest),
                x[held],
                table.take(held),
                columns,
                names,
                seed,
                threads,
                rounds=rounds,
                curve=curve,
            )
        )
        curves.append(curve)
    n = min(len(c) for c in curves)
    mean = np.mean([c[:n] for c in curves], axis=0)
    best = max(min_rounds, int(np.argmax(mean)) + 1)
    cut = [lgb.Booster(model_str=b.model_to_string(num_iteration=best)) for b in boosters]
    return cut, fold_of


def refit(
    x: np.ndarray,
    table: CandidateTable,
    columns: Sequence[int],
    names: Sequence[str],
    folded: Sequence[Any],
    seed: int,
    threads: int,
) -> Any:
    """The served ranker: one model on all of ``table`` with the folds' number of trees.
    A quarter of the trees of the folds' mean at serving time, as well calibrated by the
    out-of-fold temperature (WikiMEL test ECE 0.008 / 0.007 / 0.012 against the mean's
    0.013 / 0.012 / 0.011 at seeds 0-2, H@1 within 0.3)."""
    rounds = folded[0].current_iteration()
    return fit_ranker(x, table, x, table, columns, names, seed, threads, rounds=rounds, curve=[])


def ensemble(
    boosters: Sequence[Any], x: np.ndarray, cols: Sequence[int], valid: np.ndarray
) -> np.ndarray:
    return np.mean([predict(b, x, cols, valid) for b in boosters], axis=0)


def out_of_fold(
    boosters: Sequence[Any],
    fold_of: np.ndarray,
    x: np.ndarray,
    cols: Sequence[int],
    valid: np.ndarray,
) -> np.ndarray:
    """Each mention scored by the fold model that did not see it."""
    out = np.full(valid.shape, -np.inf, dtype=np.float32)
    for f, b in enumerate(boosters):
        m = fold_of == f
        out[m] = predict(b, x[m], cols, valid[m])
    return out


def train_fusion(
    tables: Path,
    out: Path,
    seed: int = 0,
    use_drin: bool | None = None,
    nil_share: float = 0.1,
    ablation: bool = False,
    lexical_k: int = 20,
    plot: Path | None = None,
    threads: int | None = None,
    folds: int = 4,
    compare_train_fit: bool = True,
    nil_augment: Sequence[float] = NIL_AUGMENT,
    verifier_inputs: int = VERIFIER_INPUTS,
    nil_train: Sequence[float] = NIL_TRAIN,
    nil_target: str = VERIFIER_TARGET,
) -> dict[str, Any]:
    """Fit on dev, cross-fitted in ``folds`` (the folds share one tree count, chosen on
    their held-out NDCG@1; their out-of-fold scores calibrate the served model and choose
    the NIL threshold; the served model is one ranker on all of dev with that tree count);
    report on test.

    Why dev and not train: the stages before fusion (MIMIC, DRIN) were fitted on train, so
    their scores on train mentions are optimistic, and a ranker fitted there learns to trust
    them more than they deserve on new text (``compare_train_fit`` measures it)."""
    threads = threads or os.cpu_count() or 1
    t0 = time.perf_counter()
    train, dev, test = (CandidateTable.load(tables / s) for s in ("train", "dev", "test"))
    meta_file = tables / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    has_drin = train.signals.drin is not None
    use_drin = has_drin if use_drin is None else use_drin and has_drin
    # the priors are counted on train: dev and test mentions never see their own link
    prior = EntityPrior.fit(
        [(m.mention, g) for m, g in zip(train.mentions, train.gold, strict=True) if g]
    )
    names_all = list(all_features())
    groups = feature_groups()
    if not use_drin:
        groups.pop("drin")
    features = [f for g in groups.values() for f in g]
    columns = [names_all.index(f) for f in features]
    x_dev = table_features(dev, prior, training=False)
    x_test = table_features(test, prior, training=False)
    t_feat = time.perf_counter() - t0
    folded, fold_of = cross_fit(x_dev, dev, columns, features, folds, seed, threads)
    boosters = [refit(x_dev, dev, columns, features, folded, seed, threads)]
    t_fit = time.perf_counter() - t0 - t_feat
    trees = [b.current_iteration() for b in boosters]
    report: dict[str, Any] = {"features": features, "trees": trees, "folds": folds, "fit_on": "dev"}

    def scores_of(
        name: str, t: CandidateTable, x: np.ndarray, oof: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        s = t.signals
        if name == "fusion":
            if oof:
                return out_of_fold(folded, fold_of, x, columns, s.valid), s.valid
            return ensemble(boosters, x, columns, s.valid), s.valid
        col = {"mimic": s.mimic[..., 0], "none": s.dense, "drin": s.drin}[name]
        assert col is not None
        return col, _dense_valid(t)

    rerankers = ["fusion", "mimic", *(["drin"] if has_drin else []), "none"]
    calibration: dict[str, dict[str, float]] = {}
    for name in rerankers:
        sd, vd = scores_of(name, dev, x_dev, oof=True)
        cal = fit_calibration(sd, vd, _positions_in(vd, dev.gold_positions()))
        calibration[name] = {"temperature": cal.temperature, "none_logit": cal.none_logit}
        st, vt = scores_of(name, test, x_test, oof=False)
        pos = _positions_in(vt, test.gold_positions())
        k, conf = top1(cal.probabilities(st, vt), vt)
        has_gold = np.array([g is not None for g in test.gold])
        ce = calibration_error(conf[has_gold], (k == pos)[has_gold])
        shared = shared_sentence(test.mentions)
        report[name] = {
            "test": ranking_metrics(st, vt, pos),
            # several annotated mentions in one sentence: which one is meant is the question
            "test_by_sentence": {
                part: ranking_metrics(st[sel], vt[sel], pos[sel])
                for part, sel in (("shared", shared), ("alone", ~shared))
                if sel.any()
            },
            "dev_out_of_fold" if name == "fusion" else "dev": ranking_metrics(
                sd, vd, _positions_in(vd, dev.gold_positions())
            ),
            "ece": ce["ece"],
            "bins": ce["bins"],
        }
    # NIL protocol: a verifier of the answer, fitted on dev's out-of-fold lists, reported
    # on test; and, for comparison, a threshold on the softmax confidence alone
    removed = nil_split([dev, test], nil_share, seed)
    nil: dict[str, Any] = {"removed_entities": len(removed), "share": nil_share, "seed": seed}
    fusion_cal = Calibration(**calibration["fusion"])
    lists = {}

    def verifier_rows(
        t: CandidateTable, oof: bool, training: bool = False, gold: Sequence[str | None] = ()
    ) -> tuple[np.ndarray, ...]:
        """Answer features of ``t``'s lists (``training``: train mentions, leave-one-out
        priors; ``gold``: their own golds, which ``t`` may have dropped), the answer's
        position, the gold's, the softmax confidence."""
        xn = candidate_features(t.mentions, t.signals, prior, list(gold) if training else None)
        sn, vn = scores_of("fusion", t, xn, oof=oof)
        probs = fusion_cal.probabilities(sn, vn)
        ctx = None
        if verifier_inputs >= 2:
            own = list(gold) if training else None
            ctx = AnswerContext.of(prior, t.mentions, t.signals.info, own)
        feats, k = answer_features(sn, probs, xn[..., columns], vn, ctx)
        return feats, k, t.gold_positions(), top1(probs, vn)[1]

    for split, t in (("dev", dev), ("test", test)):
        lists[split] = verifier_rows(t.without(removed), oof=split == "dev")
    fd, kd, pd_, cd = lists["dev"]
    # more NIL examples than a 10% split gives: every dev list that holds its gold, once
    # more without it (weight nil_augment); and the train split's lists, as the protocol
    # leaves them and once more without their own gold (weight nil_train; the ranker never
    # saw train, its priors there leave each mention's own link out)
    dn = dev.without(removed)
    keep = np.flatnonzero(dn.gold_positions() >= 0)
    fa, *_ = verifier_rows(dn.without_own_gold(), oof=True)
    dev_aug = (fa[keep], np.zeros(len(keep), dtype=bool), fold_of[keep])
    nil["augmented_lists"] = len(keep)
    train_sets: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    if any(w > 0 for w in nil_train):
        tn = train.without(removed)
        ftr, ktr, ptr, _ = verifier_rows(tn, oof=False, training=True, gold=train.gold)
        held = np.flatnonzero(tn.gold_positions() >= 0)
        fto, *_ = verifier_rows(tn.without_own_gold(), oof=False, training=True, gold=train.gold)
        rows = np.concatenate([ftr, fto[held]])
        hit_t = (ktr == ptr) & (ktr >= 0) if nil_target == "answer" else ptr >= 0
        right_t = np.concatenate([hit_t, np.zeros(len(held), dtype=bool)])
        train_sets.append((rows, right_t, np.full(len(rows), -1, dtype=np.int64)))
        nil["train_lists"] = len(rows)
    # what the verifier learns: the best candidate is right ("answer"), or the gold is in the
    # list at all ("in_list": a gold ranked second is no evidence of NIL)
    right_d = (kd == pd_) & (kd >= 0) if nil_target == "answer" else pd_ >= 0
    choices = []  # (dev accuracy, augment weight, train weight, model, out-of-fold dev)
    for wa in nil_augment:
        for wt in nil_train if train_sets else (0.0,):
            extra = [(*dev_aug, wa), *[(*t_, wt) for t_ in train_sets]]
            model, q = fit_verifier(fd, right_d, fold_of, seed, threads, extra)
            acc = nil_decisions(q, kd, pd_, choose_threshold(q, kd, pd_))["accuracy"]
            choices.append((acc, wa, wt, model, q))
    acc, wa, wt, verifier_model, q_dev = max(choices, key=lambda c: c[0])
    nil["weights_tried"] = [{"augment": c[1], "train": c[2], "dev_accuracy": c[0]} for c in choices]
    nil["augment_weight"], nil["train_weight"] = wa, wt
    nil["verifier_inputs"] = verifier_inputs
    nil["verifier_target"] = nil_target
    threshold = choose_threshold(q_dev, kd, pd_)
    ft, kt, pt, ct = lists["test"]
    q_test = np.where(kt >= 0, verifier_model.predict(ft), 0.0)
    nil["dev"] = nil_decisions(q_dev, kd, pd_, threshold)
    nil["test"] = nil_decisions(q_test, kt, pt, threshold)
    softmax_t = choose_threshold(cd, kd, pd_)
    nil["softmax_only"] = {"test": nil_decisions(ct, kt, pt, softmax_t)}
    # the answer confidence on the full KB too (what nil reads when nothing was removed)
    s_full = ensemble(boosters, x_test, columns, test.signals.valid)
    p_full = fusion_cal.probabilities(s_full, test.signals.valid)
    ctx_full = AnswerContext.of(prior, test.mentions, test.signals.info)
    f_full, k_full = answer_features(
        s_full,
        p_full,
        x_test[..., columns],
        test.signals.valid,
        ctx_full if verifier_inputs >= 2 else None,
    )
    q_full = verdict(verifier_model.predict(f_full), p_full, k_full, nil_target).answer
    right = k_full == test.gold_positions()
    has_gold = np.array([g is not None for g in test.gold])
    nil["answer_confidence_ece_full_kb"] = calibration_error(q_full[has_gold], right[has_gold])[
        "ece"
    ]
    report["nil"] = nil
    if plot is not None:
        title = f"fusion on test: ECE {report['fusion']['ece']:.4f} (15 bins)"
        reliability_png(report["fusion"]["bins"], title, plot)
    config = FusionConfig(
        features=tuple(features),
        mimic_fingerprint=meta.get("mimic_fingerprint", ""),
        drin_fingerprint=meta.get("drin_fingerprint") if use_drin else None,
        lexical_k=int(meta.get("lexical", lexical_k)),
        calibration=calibration,
        nil_threshold=threshold,
        verifier_inputs=verifier_inputs,
        verifier_target=nil_target,
        zero_shot=str(meta.get("zero_shot", "surface")),  # what the tables' name_cos read
        meta={"trees": trees, "folds": folds, "fit_on": "dev", "seed": seed, "tables": str(tables)},
    )
    FusionModel(config, boosters, prior, verifier_model).save_pretrained(out)
    if compare_train_fit:  # the same ranker fitted on train, early-stopped on dev
        x_train = table_features(train, prior, training=True)
        b = fit_ranker(x_train, train, x_dev, dev, columns, features, seed, threads)
        st = predict(b, x_test, columns, test.signals.valid)
        report["fit_on_train"] = {
            "test": ranking_metrics(st, test.signals.valid, test.gold_positions()),
            "trees": b.current_iteration(),
        }
    if ablation:
        report["ablation"] = {}
        for g, gcols in groups.items():
            kept = [f for f in features if f not in gcols]
            kc = [names_all.index(f) for f in kept]
            bs, _ = cross_fit(x_dev, dev, kc, kept, folds, seed, threads)
            one = refit(x_dev, dev, kc, kept, bs, seed, threads)
            st = ensemble([one], x_test, kc, test.signals.valid)
            report["ablation"][g] = ranking_metrics(st, test.signals.valid, test.gold_positions())
            logger.info("without %s: test H@1 %.2f", g, 100 * report["ablation"][g]["H@1"])
    report["seconds"] = {
        "features": round(t_feat, 1),
        "fit": round(t_fit, 1),
        "total": round(time.perf_counter() - t0, 1),
    }
    return report


def _positions_in(valid: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Gold positions, -1 where the gold's slot is not in the given lists."""
    ok = (pos >= 0) & np.take_along_axis(valid, np.maximum(pos, 0)[:, None], axis=1)[:, 0]
    return np.where(ok, pos, -1)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mel-train-fusion",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tables", required=True, type=Path, help="mel-candidates output folder")
    p.add_argument("--out", required=True, type=Path, help="fusion model folder")
    p.add_argument("--report", type=Path, help="write the metrics JSON here")
    p.add_argument("--plot", type=Path, help="write the test reliability diagram (PNG) here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-drin", action="store_true", help="ignore DRIN scores in the tables")
    p.add_argument("--nil-share", type=float, default=0.1)
    p.add_argument("--ablation", action="store_true", help="retrain without each group")
    p.add_argument("--threads", type=int)
    p.add_argument("--folds", type=int, default=4, help="cross-fitting folds over dev")
    p.add_argument(
        "--nil-augment",
        type=float,
        nargs="+",
        default=list(NIL_AUGMENT),
        help="weights tried for the dev lists with their own gold removed in the NIL "
        "verifier's training (the best dev accuracy wins; 0: the removal split only)",
    )
    p.add_argument(
        "--nil-train",
        type=float,
        nargs="+",
        default=list(NIL_TRAIN),
        help="weights tried for the train split's lists in the NIL verifier's training "
        "(as the protocol leaves them, and without their own gold; 0: not used)",
    )
    p.add_argument(
        "--verifier-inputs",
        type=int,
        choices=(1, 2),
        default=VERIFIER_INPUTS,
        help="what the NIL verifier reads: 1 = the best candidate's score, margin, probability "
        "and features; 2 = also the none / second-best probabilities and the surface's "
        "training links (how many, and the share to entities in the list)",
    )
    p.add_argument(
        "--nil-target",
        choices=VERIFIER_TARGETS,
        default=VERIFIER_TARGET,
        help="what the NIL verifier estimates: in_list = P(the mention's entity is among the "
        "candidates), NIL when under the threshold; answer = P(the best candidate is right) "
        "(models before v3)",
    )
    p.add_argument("--no-train-fit", action="store_true", help="skip the fit-on-train comparison")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    report = train_fusion(
        a.tables,
        a.out,
        a.seed,
        None if not a.no_drin else False,
        a.nil_share,
        a.ablation,
        plot=a.plot,
        threads=a.threads,
        folds=a.folds,
        compare_train_fit=not a.no_train_fit,
        nil_augment=a.nil_augment,
        verifier_inputs=a.verifier_inputs,
        nil_train=a.nil_train,
        nil_target=a.nil_target,
    )
    text = json.dumps(report, indent=1)
    if a.report:
        a.report.parent.mkdir(parents=True, exist_ok=True)
        a.report.write_text(text)
    summary = {k: report[k]["test"] for k in ("fusion", "mimic", "none")}
    print(
        json.dumps(
            {"test": summary, "ece": report["fusion"]["ece"], "nil": report["nil"]["test"]},
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "calibration_error",
    "choose_threshold",
    "fit_calibration",
    "fit_ranker",
    "main",
    "nil_decisions",
    "ranking_metrics",
    "train_fusion",
]
