"""Fusion: a learned ranker over MIMIC / DRIN / retrieval scores, string features and priors.

A separate stage on top of the released models (MIMIC and DRIN are not changed): for each
(mention, candidate) it builds a feature vector from what the earlier stages computed and
what the strings say, scores it with gradient-boosted trees trained with a ranking objective
(LightGBM lambdarank; ``models/fusion_train.py``), and turns the scores of a mention's list
into calibrated probabilities (temperature scaling with a "none of these" option, fitted on
dev), so ``confidence`` means what it says and NIL is a threshold on it.

Production linkers combine the same kinds of evidence (ReFinED, REL, BLINK): the neural
scores, surface-form features (character n-grams, token containment, edit similarity, the
"another name of the sentence" signal), and entity priors learned from the training links.
Nothing here knows any dataset: every feature is defined on strings, scores and counts.

Inputs are plain arrays (:class:`CandidateSignals`), so the server, the bulk job and the
trainer compute features the same way; this module never imports the index or the service.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.lexical import NAME_FEATURES, NameTable, name_features, norm_name

FUSION_FORMAT = "mel-fusion"
FUSION_VERSION = 3  # 2: verifier_inputs and zero_shot; 3: verifier_target (older code refuses)
CONFIG_FILE = "config.json"
BOOSTER_FILE = "booster-{}.txt"  # one per cross-fitting fold; the model is their mean
PRIOR_FILE = "prior.json"
VERIFIER_FILE = "verifier.txt"
# What a new verifier reads (models trained before v2 keep v1: their config says 1)
VERIFIER_INPUTS = 2
# What the NIL verifier estimates. "answer": P(the best candidate is right) (models before v3);
# "in_list": P(the mention's entity is among the candidates), i.e. not NIL and not missed by
# retrieval. A mention whose entity is in the list but ranked second is no evidence of NIL,
# yet "answer" learns it as one: on the names-only WikiMEL KB, 4 NIL seeds, "in_list" took
# test NIL F1 from 82.4-85.3 to 88.3-89.3, and accuracy with NIL as a class up in every seed.
VERIFIER_TARGETS = ("answer", "in_list")
VERIFIER_TARGET = "in_list"
# Where the mention's vector of the zero-shot name cosine comes from: "surface" = the mention
# string encoded alone (a second encoder pass per request; models trained before
# "mention_pass" existed), "mention_pass" = the leading mention tokens of the mention-text
# pass MIMIC already runs (MimicEncoder.lead_features: no extra pass). New tables and models:
ZERO_SHOT_SOURCES = ("surface", "mention_pass")
ZERO_SHOT = "mention_pass"

# Feature groups (the ablation drops one group at a time). Each name is one column.
SCORE_FEATURES = {
    "dense": ("dense", "dense_rank", "dense_gap", "from_dense", "lexical", "from_lexical"),
    "mimic": ("mimic", "mimic_tglu", "mimic_vdlu", "mimic_cmfu", "mimic_rank", "mimic_gap"),
    "drin": ("drin", "drin_rank", "drin_gap"),
    "zero_shot": ("name_cos", "name_cos_rank", "name_cos_gap"),
    "prior": ("prior_entity", "prior_surface", "popularity"),
}
CONTEXT_FEATURES = ("other_in_sentence",)
AMBIGUITY_FEATURES = ("ambiguity", "ambiguity_share")


def feature_groups() -> dict[str, tuple[str, ...]]:
    """Every feature by group, in column order (``name`` = the string features)."""
    string = tuple(f for f in NAME_FEATURES if f not in CONTEXT_FEATURES + AMBIGUITY_FEATURES)
    return {
        **{k: SCORE_FEATURES[k] for k in ("dense", "mimic", "drin", "zero_shot")},
        "name": string,
        "context": CONTEXT_FEATURES,
        "ambiguity": AMBIGUITY_FEATURES,
        "prior": SCORE_FEATURES["prior"],
    }


def all_features() -> tuple[str, ...]:
    return tuple(f for g in feature_groups().values() for f in g)


@dataclass(frozen=True)
class MentionText:
    """The words of a mention: surface, sentence, optional [start, end) span in it."""

    mention: str
    sentence: str
    span: tuple[int, int] | None = None


@dataclass(frozen=True)
class CandidateInfo:
    """What the KB says about one candidate: id, name first then aliases, popularity."""

    id: str
    names: tuple[str, ...]
    popularity: float | None = None


@dataclass
class CandidateSignals:
    """What the earlier stages computed for B mentions x K candidates (rows < 0: padding).

    rows: (B, K) int64 KB rows; dense: (B, K) retrieval inner product; from_dense /
    from_lexical: (B, K) bool, which channel found it; lexical: (B, K) the lexical channel's
    cosine (0 where it did not find it); mimic: (B, K, 4) MIMIC score, tglu, vdlu, cmfu;
    drin: (B, K) or None; name_cos: (B, K) zero-shot cosine of the mention string and the
    entity name; info: per mention, per candidate, the entity's :class:`CandidateInfo`.
    """

    rows: np.ndarray
    dense: np.ndarray
    from_dense: np.ndarray
    from_lexical: np.ndarray
    lexical: np.ndarray
    mimic: np.ndarray
    drin: np.ndarray | None
    name_cos: np.ndarray
    info: list[list[CandidateInfo | None]]

    @property
    def valid(self) -> np.ndarray:
        return self.rows >= 0

    def take(self, b: Sequence[int]) -> CandidateSignals:
        idx = list(b)
        return CandidateSignals(
            self.rows[idx],
            self.dense[idx],
            self.from_dense[idx],
            self.from_lexical[idx],
            self.lexical[idx],
            self.mimic[idx],
            None if self.drin is None else self.drin[idx],
            self.name_cos[idx],
            [self.info[i] for i in idx],
        )


# ---------------------------------------------------------------------------------- prior
@dataclass
class EntityPrior:
    """Link counts from the training split: how often each entity is the gold (``entity``),
    and each (normalised surface, entity) pair (``surface``). Leave-one-out (``exclude``)
    removes a training mention's own link when its features are computed for training."""

    entity: Counter[str] = field(default_factory=Counter)
    surface: dict[str, Counter[str]] = field(default_factory=dict)

    @classmethod
    def fit(cls, links: Sequence[tuple[str, str]]) -> EntityPrior:
        """``links``: (mention surface, gold entity id) of the training mentions."""
        prior = cls()
        for surface, eid in links:
            prior.entity[eid] += 1
            prior.surface.setdefault(norm_name(surface), Counter())[eid] += 1
        return prior

    def features(
        self, surface: str, ids: Sequence[str | None], exclude: str | None = None
    ) -> np.ndarray:
        """(K, 2): log(1 + entity count), smoothed P(entity | surface); ``exclude`` = the
        mention's own gold when it is a training mention (its link is not counted)."""
        key = norm_name(surface)
        counts = self.surface.get(key, Counter())
        total = sum(counts.values()) - (1 if exclude is not None and exclude in counts else 0)
        denom = total + 1.0
        if exclude is None:  # serving: no link to leave out, one dict read per candidate
            logs = self._log_counts()
            first = [logs.get(eid, 0.0) if eid is not None else 0.0 for eid in ids]
            second = [counts.get(eid, 0) / denom if eid is not None else 0.0 for eid in ids]
            out = np.empty((len(ids), 2), dtype=np.float32)
            out[:, 0], out[:, 1] = first, second
            return out
        entity = self.entity
        # one list of Python floats per column, then one array: element-wise assignment into
        # a numpy array was most of this function's time
        rows = [
            (
                math.log1p(max(0, entity.get(eid, 0) - (eid == exclude))),
                max(0, counts.get(eid, 0) - (eid == exclude)) / denom,
            )
            if eid is not None
            else (0.0, 0.0)
            for eid in ids
        ]
        return np.array(rows, dtype=np.float32).reshape(len(ids), 2)

    def _log_counts(self) -> dict[str, float]:
        """log(1 + count) of every linked entity, computed once (the counts do not change
        after :meth:`fit` / :meth:`from_json`; a changed ``entity`` is noticed by its size)."""
        cached = self.__dict__.get("_logs")
        if cached is None or cached[0] != len(self.entity):
            cached = (len(self.entity), {e: math.log1p(n) for e, n in self.entity.items()})
            self.__dict__["_logs"] = cached
        return cached[1]

    def to_json(self) -> dict[str, Any]:
        return {
            "entity": dict(self.entity),
            "surface": {s: dict(c) for s, c in self.surface.items()},
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> EntityPrior:
        return cls(
            Counter(doc.get("entity", {})),
            {s: Counter(c) for s, c in doc.get("surface", {}).items()},
        )


# ------------------------------------------------------------------------------- features
def _rank_and_gap(x: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: 1-based rank by descending value among valid entries, and value - row max."""
    masked = np.where(valid, x, -np.inf)
    order = np.argsort(-masked, axis=1, kind="stable")
    rank = np.empty_like(order)
    rank[np.arange(x.shape[0])[:, None], order] = np.arange(1, x.shape[1] + 1)
    best = masked.max(axis=1, keepdims=True)
    gap = np.where(valid, x - np.where(np.isfinite(best), best, 0.0), 0.0)
    return rank.astype(np.float32), gap.astype(np.float32)


_FEATURES: tuple[str, ...] | None = None
_COLUMN: dict[str, int] = {}


def _columns() -> dict[str, int]:
    """Each feature's column in :func:`all_features` order (computed once)."""
    global _FEATURES
    if _FEATURES is None:
        _FEATURES = all_features()
        _COLUMN.update({f: j for j, f in enumerate(_FEATURES)})
    return _COLUMN


def candidate_features(
    mentions: Sequence[MentionText],
    sig: CandidateSignals,
    prior: EntityPrior,
    exclude: Sequence[str | None] | None = None,
    table: NameTable | None = None,
) -> np.ndarray:
    """(B, K, F) float32 in :func:`all_features` order (NaN where a value is unknown: DRIN
    without a DRIN model, popularity the KB does not give). ``exclude``: per mention, its own
    gold when it is a training mention (leave-one-out priors). ``table``: the KB's names
    analysed into arrays (:class:`models.lexical.NameTable`, rows = ``sig.rows``), for the
    string features of a list whose rows it all holds: the same values, faster."""
    B, K = sig.rows.shape
    col = _columns()
    valid = sig.valid
    x = np.empty((B, K, len(col)), dtype=np.float32)  # written column by column, in place
    x[..., col["dense"]] = sig.dense
    x[..., col["from_dense"]] = sig.from_dense
    x[..., col["lexical"]] = sig.lexical
    x[..., col["from_lexical"]] = sig.from_lexical
    for j, name in enumerate(("mimic", "mimic_tglu", "mimic_vdlu", "mimic_cmfu")):
        x[..., col[name]] = sig.mimic[..., j]
    x[..., col["name_cos"]] = sig.name_cos
    # the ranks and gaps of every scored signal in one sort over the stacked lists
    scored = [("dense", sig.dense), ("mimic", sig.mimic[..., 0]), ("name_cos", sig.name_cos)]
    if sig.drin is not None:
        x[..., col["drin"]] = sig.drin
        scored.append(("drin", sig.drin))
    else:
        for name in SCORE_FEATURES["drin"]:
            x[..., col[name]] = np.nan
    stacked = np.concatenate([v for _, v in scored], axis=0)
    rank, gap = _rank_and_gap(stacked, np.tile(valid, (len(scored), 1)))
    for i, (name, _) in enumerate(scored):
        x[..., col[f"{name}_rank"]] = rank[i * B : (i + 1) * B]
        x[..., col[f"{name}_gap"]] = gap[i * B : (i + 1) * B]
    string_cols = np.array([col[f] for f in NAME_FEATURES])
    x[..., string_cols] = 0.0
    x[..., col["prior_entity"]] = 0.0
    x[..., col["prior_surface"]] = 0.0
    x[..., col["popularity"]] = np.nan
    prior_cols = np.array([col["prior_entity"], col["prior_surface"]])
    for b, m in enumerate(mentions):
        info = sig.info[b]
        listed = zip(valid[b].tolist(), info, strict=True)
        ks = [k for k, (v, c) in enumerate(listed) if v and c is not None]
        if not ks:
            continue
        cands: list[CandidateInfo] = [info[k] for k in ks]  # type: ignore[misc]
        names = [c.names for c in cands]
        xb = x[b]
        if table is not None and int(sig.rows[b, ks].max()) < len(table):
            feats = table.features(m.mention, m.sentence, m.span, sig.rows[b, ks])
        else:
            feats = name_features(m.mention, m.sentence, m.span, names)
        own = exclude[b] if exclude is not None else None
        pri = prior.features(m.mention, [c.id for c in cands], own)
        if len(ks) == K:  # the usual full list: plain slices
            xb[:, string_cols] = feats
            xb[:, prior_cols] = pri
        else:
            kk = np.array(ks)
            xb[np.ix_(kk, string_cols)] = feats
            xb[np.ix_(kk, prior_cols)] = pri
        pops = [c.popularity for c in cands]
        if any(p is not None for p in pops):
            pc = col["popularity"]
            for k, p in zip(ks, pops, strict=True):
                if p is not None:
                    xb[k, pc] = math.log1p(max(0.0, p))
    x[~valid] = np.nan
    return x


# ---------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class Calibration:
    """Temperature scaling with a "none of the candidates" option: for a list of scores s,
    P(candidate j) = exp(s_j / T) / (sum_k exp(s_k / T) + exp(b / T)), P(none) the rest.
    The "none" mass is what a retrieval miss or an entity outside the KB gets."""

    temperature: float = 1.0
    none_logit: float = -30.0

    def probabilities(self, scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """(B, K) probabilities (0 at padding) for (B, K) scores."""
        z = np.where(valid, scores / self.temperature, -np.inf)
        none = np.full((z.shape[0], 1), self.none_logit / self.temperature)
        full = np.concatenate([z, none], axis=1)
        full = full - full.max(axis=1, keepdims=True)
        e = np.exp(full)
        p = e / e.sum(axis=1, keepdims=True)
        return p[:, :-1]


# ------------------------------------------------------------------------------- verifier
def answer_features(
    scores: np.ndarray,
    probs: np.ndarray,
    x: np.ndarray,
    valid: np.ndarray,
    context: AnswerContext | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per list, what the NIL verifier reads: the best score, its margin over the second,
    its calibrated probability, the list length and the best candidate's own features
    (absolute values: a lone namesake can top a list whose real referent left the KB).
    With a ``context`` (verifier inputs v2, :data:`VERIFIER_INPUTS`) also the list's "none"
    probability, the second-best probability, how often the mention's surface was linked in
    the training split and the share of those links whose entity is in this list (a surface
    seen often and linked to none of the candidates points at an entity the KB lacks).
    Returns (B, 4 + F [+ 4]) and the best candidate's position (B,) (-1 for an empty list)."""
    s = np.where(valid, scores, -np.inf)
    k = s.argmax(axis=1)
    srt = -np.sort(-s, axis=1)
    top = np.where(np.isfinite(srt[:, 0]), srt[:, 0], 0.0)
    second = srt[:, 1] if s.shape[1] > 1 else np.full(len(s), -np.inf)
    margin = np.where(np.isfinite(second), top - second, 10.0)
    conf = np.take_along_axis(probs, k[:, None], axis=1)[:, 0]
    best = x[np.arange(len(k)), k]
    cols = [top, margin, conf, valid.sum(axis=1), best]
    if context is not None:
        p = np.where(valid, probs, 0.0)
        p_sorted = -np.sort(-p, axis=1)
        p2 = p_sorted[:, 1] if p.shape[1] > 1 else np.zeros(len(p))
        cols += [1.0 - p.sum(axis=1), p2, context.surface_links, context.prior_in_list]
    feats = np.column_stack(cols).astype(np.float32)
    empty = ~valid.any(axis=1)
    return feats, np.where(empty, -1, k)


@dataclass(frozen=True)
class AnswerContext:
    """Per list, what the verifier (inputs v2) reads beyond the candidates' features:
    log(1 + training links of the mention's surface) and the share of those links whose
    entity is in the list (0 for a surface never seen)."""

    surface_links: np.ndarray
    prior_in_list: np.ndarray

    @classmethod
    def of(
        cls,
        prior: EntityPrior,
        mentions: Sequence[MentionText],
        info: Sequence[Sequence[CandidateInfo | None]],
        exclude: Sequence[str | None] | None = None,
    ) -> AnswerContext:
        """``exclude``: per mention, its own gold when it is a training mention (its own link
        is not counted, as in :meth:`EntityPrior.features`)."""
        links = np.zeros(len(mentions), dtype=np.float32)
        share = np.zeros(len(mentions), dtype=np.float32)
        for b, m in enumerate(mentions):
            counts = prior.surface.get(norm_name(m.mention))
            if not counts:
                continue
            own = exclude[b] if exclude is not None else None
            ids = {c.id for c in info[b] if c is not None}
            total = sum(counts.values()) - (1 if own is not None and own in counts else 0)
            if total <= 0:
                continue
            inside = sum(n - (1 if e == own else 0) for e, n in counts.items() if e in ids)
            links[b] = math.log1p(total)
            share[b] = inside / total
        return cls(links, share)


@dataclass(frozen=True)
class Verdict:
    """The NIL verifier's reading of B lists: ``answer`` (B,) P(the best candidate is the
    right entity); ``in_list`` (B,) P(the mention's entity is among the candidates), None from
    an "answer" verifier (:data:`VERIFIER_TARGETS`), which estimates ``answer`` directly.
    Both 0 for an empty list."""

    answer: np.ndarray
    in_list: np.ndarray | None = None

    @property
    def nil_score(self) -> np.ndarray:
        """What the NIL threshold is compared with: ``in_list`` when there is one."""
        return self.in_list if self.in_list is not None else self.answer


def verdict(q: np.ndarray, probs: np.ndarray, best: np.ndarray, target: str) -> Verdict:
    """A :class:`Verdict` from the verifier's outputs ``q`` (B,), the calibrated candidate
    probabilities (B, K) and each list's best position (B,) (-1: empty). An "in_list"
    verifier's answer confidence is q x P(the best | the entity is in the list), the latter
    the calibrated probabilities renormalised over the candidates."""
    if target not in VERIFIER_TARGETS:
        raise ValueError(f"verifier target must be one of {VERIFIER_TARGETS}, got {target!r}")
    empty = best < 0
    q = np.where(empty, 0.0, q).astype(np.float32)
    if target == "answer":
        return Verdict(q)
    p = np.maximum(probs, 0.0)
    top = np.take_along_axis(p, np.maximum(best, 0)[:, None], axis=1)[:, 0]
    total = p.sum(axis=1)
    share = np.where(total > 0, top / np.where(total > 0, total, 1.0), 0.0)
    return Verdict((q * share).astype(np.float32), q)


# ---------------------------------------------------------------------------------- model
class _LightGBM:
    """A booster behind the one-argument ``predict`` :class:`CompiledTrees` has."""

    def __init__(self, booster: Any) -> None:
        self.booster = booster

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.booster.predict(x, num_threads=1), dtype=np.float64)


@dataclass(frozen=True)
class FusionConfig:
    """What a fusion model was trained on; checked against what the server loads."""

    features: tuple[str, ...]
    mimic_fingerprint: str
    drin_fingerprint: str | None = None
    lexical_k: int = 20  # lexical candidates merged into the dense top-k
    calibration: dict[str, dict[str, float]] = field(default_factory=dict)  # by reranker
    nil_threshold: float | None = None  # on Verdict.nil_score, chosen on dev (NIL protocol)
    verifier_inputs: int = 1  # which answer_features the verifier reads (VERIFIER_INPUTS)
    verifier_target: str = "answer"  # what the verifier estimates (VERIFIER_TARGETS)
    zero_shot: str = "surface"  # the mention vector of name_cos (ZERO_SHOT_SOURCES)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = list(self.features)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FusionConfig:
        return cls(
            features=tuple(d["features"]),
            mimic_fingerprint=d["mimic_fingerprint"],
            drin_fingerprint=d.get("drin_fingerprint"),
            lexical_k=int(d.get("lexical_k", 20)),
            calibration=dict(d.get("calibration", {})),
            nil_threshold=d.get("nil_threshold"),
            verifier_inputs=int(d.get("verifier_inputs", 1)),
            verifier_target=str(d.get("verifier_target", "answer")),
            zero_shot=str(d.get("zero_shot", "surface")),
            meta=dict(d.get("meta", {})),
        )


class FusionModel:
    """Trained boosters (the folds of a cross-fit; the score is their mean), the features
    they read, the priors and the calibrations."""

    def __init__(
        self,
        config: FusionConfig,
        boosters: Sequence[Any],
        prior: EntityPrior,
        verifier: Any | None = None,
    ) -> None:
        if not boosters:
            raise ValueError("a fusion model needs at least one booster")
        self.config, self.boosters, self.prior = config, list(boosters), prior
        self.verifier = verifier  # trained under NIL; what it estimates: config.verifier_target
        names = list(all_features())
        self.columns = np.array([names.index(f) for f in config.features])
        # what predicts: the boosters themselves, or their compiled form (use_tree_runtime)
        self.tree_runtime = "lightgbm"
        self._rankers: list[Any] = [_LightGBM(b) for b in self.boosters]
        self._verifier: Any | None = _LightGBM(verifier) if verifier is not None else None

    def use_tree_runtime(
        self, runtime: str | None = None, cache_dir: str | os.PathLike[str] | None = None
    ) -> str:
        """Run the trees in ``runtime`` (``models.compiled_trees.TREE_RUNTIMES``; None: compiled
        when lleaves is installed), compiled objects cached in ``cache_dir``. Scores equal
        LightGBM's to float64 rounding either way; returns the runtime chosen."""
        from models.compiled_trees import CompiledTrees, resolve_tree_runtime

        runtime = resolve_tree_runtime(runtime)
        if runtime == "compiled":
            self._rankers = [CompiledTrees(b.model_to_string(), cache_dir) for b in self.boosters]
            self._verifier = (
                CompiledTrees(self.verifier.model_to_string(), cache_dir)
                if self.verifier is not None
                else None
            )
        else:
            self._rankers = [_LightGBM(b) for b in self.boosters]
            self._verifier = _LightGBM(self.verifier) if self.verifier is not None else None
        self.tree_runtime = runtime
        return runtime

    def calibration(self, reranker: str) -> Calibration | None:
        c = self.config.calibration.get(reranker)
        return Calibration(**c) if c else None

    def select(self, x: np.ndarray) -> np.ndarray:
        """(N, F_all) -> (N, F_model): the model's columns, in its order."""
        return x[:, self.columns]

    def score(self, x: np.ndarray) -> np.ndarray:
        """(B, K, F_all) features -> (B, K) scores (NaN rows, i.e. padding, score -inf)."""
        B, K, F = x.shape
        flat = self.select(x.reshape(B * K, F))
        if len(self._rankers) == 1:
            out = self._rankers[0].predict(flat)
        else:
            out = np.mean([r.predict(flat) for r in self._rankers], axis=0)
        out = np.asarray(out, dtype=np.float32).reshape(B, K)
        return np.where(np.isnan(x[..., 0]), -np.inf, out)

    def verify(
        self,
        scores: np.ndarray,
        probs: np.ndarray,
        x: np.ndarray,
        valid: np.ndarray,
        mentions: Sequence[MentionText] | None = None,
        info: Sequence[Sequence[CandidateInfo | None]] | None = None,
    ) -> Verdict | None:
        """The NIL verifier's :class:`Verdict` on B lists (None without a verifier). A v2
        verifier also reads the mentions' surfaces and the lists' entities
        (:class:`AnswerContext`)."""
        if self.verifier is None:
            return None
        context = None
        if self.config.verifier_inputs >= 2:
            if mentions is None or info is None:
                raise ValueError("this fusion model's verifier reads the mentions and lists")
            context = AnswerContext.of(self.prior, mentions, info)
        feats, k = answer_features(scores, probs, self.select_lists(x), valid, context)
        assert self._verifier is not None
        q = np.asarray(self._verifier.predict(feats), dtype=np.float32)
        return verdict(q, probs, k, self.config.verifier_target)

    def select_lists(self, x: np.ndarray) -> np.ndarray:
        """(B, K, F_all) -> (B, K, F_model)."""
        return x[..., self.columns]

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """(N, F_all) -> (N, F_model + 1): each feature's additive share of the score (SHAP
        values from the trees) and the bias last."""
        x = self.select(x)
        parts = [b.predict(x, pred_contrib=True, num_threads=1) for b in self.boosters]
        return np.asarray(np.mean(parts, axis=0), dtype=np.float32)  # SHAP is additive

    # -------------------------------------------------------------- persistence
    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files = [(BOOSTER_FILE.format(i), b.model_to_string()) for i, b in enumerate(self.boosters)]
        files.append((PRIOR_FILE, json.dumps(self.prior.to_json(), ensure_ascii=False)))
        if self.verifier is not None:
            files.append((VERIFIER_FILE, self.verifier.model_to_string()))
        for name, text in files:
            tmp = folder / (name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(folder / name)
        doc = {
            "format": FUSION_FORMAT,
            "version": FUSION_VERSION,
            "boosters": len(self.boosters),
            **self.config.to_dict(),
        }
        tmp = folder / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
        tmp.replace(folder / CONFIG_FILE)  # last: a folder with a config is complete
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str]) -> FusionModel:
        import lightgbm as lgb

        folder = Path(folder)
        path = folder / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a fusion model (no {CONFIG_FILE})")
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != FUSION_FORMAT or doc.get("version", 0) > FUSION_VERSION:
            raise ValueError(f"{folder}: not a {FUSION_FORMAT} v<={FUSION_VERSION} model")
        config = FusionConfig.from_dict(doc)
        if config.verifier_target not in VERIFIER_TARGETS:
            raise ValueError(f"{folder}: unknown verifier_target {config.verifier_target!r}")
        if config.zero_shot not in ZERO_SHOT_SOURCES:
            raise ValueError(f"{folder}: unknown zero_shot source {config.zero_shot!r}")
        unknown = set(config.features) - set(all_features())
        if unknown:
            raise ValueError(f"{folder}: features this code does not compute: {sorted(unknown)}")
        boosters = [
            lgb.Booster(model_str=(folder / BOOSTER_FILE.format(i)).read_text(encoding="utf-8"))
            for i in range(int(doc.get("boosters", 1)))
        ]
        prior = EntityPrior.from_json(json.loads((folder / PRIOR_FILE).read_text("utf-8")))
        verifier = None
        if (folder / VERIFIER_FILE).is_file():
            verifier = lgb.Booster(model_str=(folder / VERIFIER_FILE).read_text(encoding="utf-8"))
        return cls(config, boosters, prior, verifier)

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for b in [*self.boosters, *([self.verifier] if self.verifier is not None else [])]:
            h.update(b.model_to_string().encode())
        h.update(json.dumps(self.prior.to_json(), sort_keys=True).encode())
        return h.hexdigest()[:16]


def check_compatible(
    fusion: FusionModel, mimic_fingerprint: str, drin_fingerprint: str | None
) -> None:
    """Refuse a fusion model trained on other MIMIC / DRIN scores than the ones served."""
    c = fusion.config
    if c.mimic_fingerprint != mimic_fingerprint:
        raise ValueError(
            f"fusion model was trained on MIMIC model {c.mimic_fingerprint}, the server runs "
            f"{mimic_fingerprint}: retrain it (mel-train-fusion)"
        )
    if c.drin_fingerprint is not None and c.drin_fingerprint != drin_fingerprint:
        raise ValueError(
            f"fusion model reads DRIN scores of {c.drin_fingerprint}; the server has "
            f"{drin_fingerprint or 'no DRIN model'}"
        )


__all__ = [
    "FUSION_FORMAT",
    "VERIFIER_INPUTS",
    "VERIFIER_TARGET",
    "VERIFIER_TARGETS",
    "ZERO_SHOT",
    "ZERO_SHOT_SOURCES",
    "AnswerContext",
    "Calibration",
    "CandidateInfo",
    "CandidateSignals",
    "CandidateTable",
    "EntityPrior",
    "FusionConfig",
    "FusionModel",
    "MentionText",
    "Verdict",
    "all_features",
    "answer_features",
    "candidate_features",
    "check_compatible",
    "feature_groups",
    "verdict",
]


# ---------------------------------------------------------------------------------- tables
@dataclass
class CandidateTable:
    """A dataset split run through the serving path up to the fusion stage: per mention its
    words, gold (None = NIL) and :class:`CandidateSignals`. What ``mel-candidates`` writes and
    ``mel-train-fusion`` reads (a folder: ``signals.npz``, ``mentions.jsonl``,
    ``entities.jsonl``)."""

    ids: list[str]
    mentions: list[MentionText]
    gold: list[str | None]
    signals: CandidateSignals

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx: Sequence[int]) -> CandidateTable:
        """The mentions ``idx`` (in that order)."""
        ii = list(idx)
        return CandidateTable(
            [self.ids[i] for i in ii],
            [self.mentions[i] for i in ii],
            [self.gold[i] for i in ii],
            self.signals.take(ii),
        )

    def gold_positions(self) -> np.ndarray:
        """(B,) index of the gold in each list, -1 when it is not there (or NIL)."""
        out = np.full(len(self), -1, dtype=np.int64)
        for b, g in enumerate(self.gold):
            if g is None:
                continue
            for k, info in enumerate(self.signals.info[b]):
                if info is not None and info.id == g:
                    out[b] = k
                    break
        return out

    def without(self, removed: set[str]) -> CandidateTable:
        """The table as if the ``removed`` entities were not in the KB: they leave every
        list (a list may then hold fewer candidates), and mentions whose gold they were
        become NIL."""
        drop = [
            [k for k, c in enumerate(line) if c is not None and c.id in removed]
            for line in self.signals.info
        ]
        return self._dropping(drop, [None if g in removed else g for g in self.gold])

    def without_own_gold(self) -> CandidateTable:
        """Each list without its own gold: what the mention would get if its referent were
        not in the KB (every mention becomes NIL; other lists are not touched). The NIL
        verifier learns from these, many more NIL examples than a removal split gives."""
        drop = [[int(k)] if k >= 0 else [] for k in self.gold_positions()]
        return self._dropping(drop, [None] * len(self))

    def _dropping(self, drop: list[list[int]], gold: list[str | None]) -> CandidateTable:
        """The table with candidates ``drop[b]`` out of list b, and the given golds."""
        sig = self.signals
        rows = sig.rows.copy()
        info = [list(line) for line in sig.info]
        for b, ks in enumerate(drop):
            for k in ks:
                rows[b, k], info[b][k] = -1, None
        new = CandidateSignals(
            rows,
            sig.dense,
            sig.from_dense & (rows >= 0),
            sig.from_lexical & (rows >= 0),
            sig.lexical,
            sig.mimic,
            sig.drin,
            sig.name_cos,
            info,
        )
        return CandidateTable(self.ids, self.mentions, gold, new)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        s = self.signals
        arrays = {
            "rows": s.rows,
            "dense": s.dense,
            "from_dense": s.from_dense,
            "from_lexical": s.from_lexical,
            "lexical": s.lexical,
            "mimic": s.mimic,
            "name_cos": s.name_cos,
        }
        if s.drin is not None:
            arrays["drin"] = s.drin
        np.savez(folder / "signals.npz", **arrays)  # type: ignore[arg-type]
        with open(folder / "mentions.jsonl", "w", encoding="utf-8") as f:
            for i, m, g in zip(self.ids, self.mentions, self.gold, strict=True):
                span = list(m.span) if m.span else None
                doc = {"id": i, "mention": m.mention, "sentence": m.sentence, "span": span}
                doc["gold"] = g
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        seen: dict[int, CandidateInfo] = {}
        for b, line in enumerate(s.info):
            for k, c in enumerate(line):
                if c is not None:
                    seen.setdefault(int(s.rows[b, k]), c)
        with open(folder / "entities.jsonl", "w", encoding="utf-8") as f:
            for row, c in sorted(seen.items()):
                doc2 = {"row": row, "id": c.id, "names": list(c.names), "popularity": c.popularity}
                f.write(json.dumps(doc2, ensure_ascii=False) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> CandidateTable:
        folder = Path(folder)
        z = np.load(folder / "signals.npz")
        infos: dict[int, CandidateInfo] = {}
        with open(folder / "entities.jsonl", encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                infos[int(d["row"])] = CandidateInfo(d["id"], tuple(d["names"]), d["popularity"])
        ids, mentions, gold = [], [], []
        with open(folder / "mentions.jsonl", encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                ids.append(d["id"])
                span = (int(d["span"][0]), int(d["span"][1])) if d.get("span") else None
                mentions.append(MentionText(d["mention"], d["sentence"], span))
                gold.append(d["gold"])
        rows = z["rows"]
        info = [[infos.get(int(r)) if r >= 0 else None for r in line] for line in rows]
        sig = CandidateSignals(
            rows,
            z["dense"],
            z["from_dense"],
            z["from_lexical"],
            z["lexical"],
            z["mimic"],
            z["drin"] if "drin" in z.files else None,
            z["name_cos"],
            info,
        )
        return cls(ids, mentions, gold, sig)
