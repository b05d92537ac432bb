"""Scoring kernels shared by training, evaluation and the benchmarks.

Projection of cached backbone features (:func:`project_rows`), entity precomputation
(:func:`entity_records`), full-KB MIMIC scoring as large matrix products (:func:`score_block`,
:func:`tglu_shared`, :func:`score_all_units`) and the exact two-stage path
(:func:`retrieve_and_rerank`). ``mel-train`` trains through :func:`score_block` and mines
hard negatives with :func:`project_rows`; ``mel-eval`` (models/evaluate.py, the CLI) ranks
with the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from models.encoders import MimicEncoder
from models.features import FeatureTable
from models.mimic import (
    MimicEntityRecord,
    MimicFeatures,
    MimicMatcher,
    MimicScores,
    TextGlobalLocalUnit,
)
from models.model import LinkingModel

# Upper bound on TGLU attention elements (B x K x L x L) materialised at once (~128 MB fp32)
# by the per-pair path (``MimicMatcher.score_precomputed``); bench/demo_quality.py uses it too.
PAIR_BUDGET = 1 << 25
# Full-KB scoring (:func:`score_block`) materialises one (entities x L) x (mentions x L)
# attention block at a time; 4M fp32 elements (16 MB) measured fastest on a 2-core EPYC
# (bench/score_speed.py): large enough for an efficient GEMM, small enough to stay in cache.
BLOCK_ELEMENTS = 1 << 22


def project_rows(
    encoder: MimicEncoder, table: FeatureTable, rows: Tensor, image_rows: Tensor
) -> MimicFeatures:
    """``encoder.project(*table.gather(rows, image_rows))``, projecting each distinct image once.

    Most items of a real dataset share the "no image" row, and ``image_tokens_fc`` over 49
    tokens per item would otherwise be the biggest cost of encoding a batch (and of
    :func:`entity_records`). Equal values and gradients: the same rows, gathered.
    """
    uniq, inverse = torch.unique(image_rows, return_inverse=True)
    text, image = table.gather(rows, uniq)
    return MimicFeatures(
        text_cls=text.global_,
        text_tokens=text.tokens,
        image_cls=encoder.image_cls_fc(image.global_)[inverse],
        image_tokens=encoder.image_tokens_fc(image.tokens)[inverse],
    )


@torch.inference_mode()
def entity_records(
    model: LinkingModel,
    ent: FeatureTable,
    chunk: int = 1024,
) -> MimicEntityRecord:
    """Precomputed MIMIC records of every entity of a feature table (eval image = first)."""
    parts = []
    for s in range(0, len(ent), chunk):
        rows = torch.arange(s, min(s + chunk, len(ent)))
        feats = project_rows(model.encoder, ent, rows, ent.first_image_rows(rows))
        parts.append(model.matcher.precompute_entities(feats))
    return MimicEntityRecord(
        *(torch.cat([getattr(p, f) for p in parts]) for f in MimicEntityRecord.field_names())
    )


def tglu_shared(
    tglu: TextGlobalLocalUnit,
    m_cls: Tensor,
    m_tokens: Tensor,
    e_text_cls: Tensor,
    e_cls_fc: Tensor,
    e_query: Tensor,
    block_elements: int = BLOCK_ELEMENTS,
) -> Tensor:
    """TGLU scores (B, N) of B mentions against N shared entities, as big GEMMs.

    Same computation as ``TextGlobalLocalUnit.score(..., shared=True)`` (inputs already
    LayerNorm'd), rearranged: the entity queries of a chunk of entities are flattened to
    (n L, h) and multiplied with every mention's keys (h, B L) in ONE matrix product, instead
    of B n products of (L, h) x (h, L). The softmax runs over each mention's L keys, the
    mean over the entity's L query positions, then one (n, L) x (L, h) product per mention.
    Entities go in chunks of ``block_elements / (B L^2)`` so memory stays bounded.
    """
    b, length = m_tokens.shape[:2]
    n = e_query.shape[0]
    key = tglu.fc_key(m_tokens)  # (B, L, h)
    value = tglu.fc_value(m_tokens)  # (B, L, h)
    key_t = (key / math.sqrt(tglu.hidden)).reshape(b * length, -1).t()  # (h, B L)
    g2g = m_cls @ e_text_cls.t()  # (B, N)
    g2l = torch.empty(b, n, dtype=g2g.dtype)
    step = max(1, block_elements // (b * length * length))
    grad = torch.is_grad_enabled() and (e_query.requires_grad or key_t.requires_grad)
    for s in range(0, n, step):
        q = e_query[s : s + step]  # (n, L, h)
        c = q.shape[0]
        att = (q.reshape(c * length, -1) @ key_t).view(c, length, b, length)
        if grad:
            probs = att.softmax(dim=-1)
        else:  # the same softmax in place: one (n L, B L) buffer, ~15% faster
            probs = att.sub_(att.amax(dim=-1, keepdim=True)).exp_()
            probs.div_(probs.sum(dim=-1, keepdim=True))
        probs = probs.mean(dim=1)  # (n, B, L): mean over the entity's query positions
        ctx = torch.bmm(probs.transpose(0, 1), value)  # (B, n, L) @ (B, L, h) -> (B, n, h)
        ctx = tglu.layer_norm(ctx)
        g2l[:, s : s + c] = (ctx * e_cls_fc[s : s + c].unsqueeze(0)).sum(-1)
    return (g2l + g2g) / 2


@dataclass(frozen=True)
class VdluGroups:
    """Entities with equal VDLU inputs (e.g. every entity without an image) share one VDLU
    score, so VDLU runs once per group.

    rows:    (U,) one entity row per group (the first)
    inverse: (N,) the group of each entity
    """

    rows: Tensor
    inverse: Tensor


def vdlu_groups(records: MimicEntityRecord) -> VdluGroups:
    """Group shared (N, ...) records by their exact VDLU fields (e2m_query, m2e_key, m2e_pooled)."""
    key = torch.cat([records.e2m_query, records.m2e_key, records.m2e_pooled], dim=-1).detach()
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    n = len(inverse)
    rows = torch.full((int(inverse.max()) + 1 if n else 0,), n, dtype=torch.long)
    rows = rows.scatter_reduce(0, inverse, torch.arange(n), "amin")
    return VdluGroups(rows, inverse)


def score_block(
    matcher: MimicMatcher,
    mentions: MimicFeatures,
    records: MimicEntityRecord,
    units: tuple[str, ...] | None = None,
    block_elements: int = BLOCK_ELEMENTS,
    groups: VdluGroups | None = None,
) -> MimicScores:
    """``matcher.score_precomputed(mentions, records, units)`` for shared (N, ...) records.

    Equal to it within float rounding (tests/test_evaluate.py), and differentiable (training
    uses it). TGLU, which dominates the cost, goes through :func:`tglu_shared`; VDLU is the
    matcher's own code run once per group of equal VDLU records (``groups``, computed here
    when not given: pass them when scoring the same records repeatedly), in entity chunks;
    CMFU is one matrix product. Only the units of ``units`` (default: the matcher's) are
    computed; the fields of the others are zeros (an ablation w/o TGLU skips its cost).
    """
    if records.text_cls.dim() != mentions.text_cls.dim():
        raise ValueError("score_block scores against shared (N, ...) entity records only")
    m = matcher._normalise(mentions)
    records = records.map(lambda t: t.to(m.text_cls.dtype))
    needed = set(units if units is not None else matcher.config.units)
    zeros = torch.zeros(m.text_cls.shape[0], records.text_cls.shape[0], dtype=m.text_cls.dtype)
    s_t, s_v, s_c = zeros, zeros, zeros
    if "tglu" in needed:
        s_t = tglu_shared(
            matcher.tglu,
            m.text_cls,
            m.text_tokens,
            records.text_cls,
            records.tglu_cls,
            records.tglu_query,
            block_elements,
        )
    if "vdlu" in needed:
        if groups is None:
            groups = vdlu_groups(records)
        b, h = m.image_cls.shape[0], records.e2m_query.shape[-1]
        step = max(1, 4 * block_elements // (b * h))  # bound the (B, n, h) VDLU intermediates
        parts = []
        for s in range(0, len(groups.rows), step):
            r = groups.rows[s : s + step]
            parts.append(
                matcher.vdlu.score(
                    m.image_cls,
                    m.image_tokens,
                    records.e2m_query[r],
                    records.m2e_key[r],
                    records.m2e_pooled[r],
                    True,
                )
            )
        s_v = torch.cat(parts, dim=1)[:, groups.inverse]  # (B, U) -> (B, N)
    if "cmfu" in needed:
        s_c = matcher.cmfu.fuse(m.text_cls, m.image_tokens) @ records.cmfu.t()
    return matcher._combine(s_t, s_v, s_c, units)


@torch.inference_mode()
def score_all_units(
    model: LinkingModel,
    records: MimicEntityRecord,
    men: FeatureTable,
    rows: torch.Tensor,
    units: tuple[str, ...] | None = None,
    batch_size: int = 32,
    desc: str = "rank",
    progress: bool = True,
) -> MimicScores:
    """(len(rows), N) MIMIC scores of the given mentions against every entity record: the
    combined ``score`` and each unit's matrix (ablations), in batches of ``batch_size``."""
    n_ent = records.text_cls.shape[0]
    out = MimicScores(*(torch.empty(len(rows), n_ent) for _ in range(4)))
    groups = vdlu_groups(records)
    bar = tqdm(
        range(0, len(rows), batch_size), desc=desc, unit="batch", leave=False, disable=not progress
    )
    for s in bar:
        r = rows[s : s + batch_size]
        m = project_rows(model.encoder, men, r, men.first_image_rows(r))
        sc = score_block(model.matcher, m, records, units, groups=groups)
        for f in ("score", "tglu", "vdlu", "cmfu"):
            getattr(out, f)[s : s + len(r)] = getattr(sc, f)
    return out


@torch.inference_mode()
def retrieve_and_rerank(
    model: LinkingModel,
    records: MimicEntityRecord,
    men: FeatureTable,
    rows: Tensor,
    k: int,
    units: tuple[str, ...] | None = None,
    keys: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` by MIMIC's retrieval vector over all records, then MIMIC on those.

    The server's two-stage path (retrieve with FAISS, rerank), with an exact inner product in
    place of the index. Returns (candidate rows (B, k), MIMIC scores (B, k)).
    """
    matcher = model.matcher
    if keys is None:
        keys = matcher.retrieval_keys(records)
    k = min(k, keys.shape[0])
    L = records.tglu_query.shape[-2]
    step = max(1, PAIR_BUDGET // (k * L * L))  # bound the per-pair (B, k, L, L) attention
    cand = torch.empty(len(rows), k, dtype=torch.long)
    scores = torch.empty(len(rows), k)
    for s in range(0, len(rows), step):
        r = rows[s : s + step]
        m = project_rows(model.encoder, men, r, men.first_image_rows(r))
        top = (matcher.retrieval_queries(m) @ keys.t()).topk(k, dim=1).indices
        cand[s : s + len(r)] = top
        scores[s : s + len(r)] = matcher.score_precomputed(
            m, records.map(lambda t, top=top: t[top]), units
        ).score
    return cand, scores


__all__ = [
    "BLOCK_ELEMENTS",
    "PAIR_BUDGET",
    "VdluGroups",
    "entity_records",
    "project_rows",
    "retrieve_and_rerank",
    "score_all_units",
    "score_block",
    "tglu_shared",
    "vdlu_groups",
]
