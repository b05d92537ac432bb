"""``mel-eval``: full-KB ranking of a dataset split with a checkpoint.

    mel-eval --model artifacts/demo-model --data artifacts/demo-world --split test
    mel-eval ... --drop-unit cmfu        # ablation: score without CMFU (repeatable)

Every mention with a gold entity is scored against ALL KB entities (MIMIC's protocol), and
H@1/3/5/10/20, MRR and MR (rank from 1, see models/metrics.py) are printed / written as JSON.
NIL mentions (no gold) are counted and left out of the metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from models.data.schema import MelDataset, load_dataset
from models.encoders import MimicEncoder
from models.features import DatasetFeatures, FeatureTable, dataset_features
from models.metrics import candidate_metrics, candidate_ranks, gold_ranks, ranking_metrics
from models.mimic import (
    UNITS,
    MimicEntityRecord,
    MimicFeatures,
    MimicMatcher,
    MimicScores,
    TextGlobalLocalUnit,
)
from models.model import LinkingModel

logger = logging.getLogger(__name__)

# candidate_metrics and candidate_ranks live in models/metrics.py; bench/wikimel.py imports
# them from here.
__all__ = ["candidate_metrics", "candidate_ranks"]

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
def score_all(
    model: LinkingModel,
    records: MimicEntityRecord,
    men: FeatureTable,
    rows: torch.Tensor,
    units: tuple[str, ...] | None = None,
    batch_size: int = 32,
    desc: str = "rank",
    progress: bool = True,
) -> torch.Tensor:
    """(len(rows), N) MIMIC scores of the given mentions against every entity record."""
    return score_all_units(model, records, men, rows, units, batch_size, desc, progress).score


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
    """Like :func:`score_all`, with every unit's (len(rows), N) matrix too (ablations)."""
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


def evaluate_split(
    model: LinkingModel,
    ds: MelDataset,
    feats: DatasetFeatures,
    split: str,
    units: tuple[str, ...] | None = None,
    batch_size: int = 32,
    records: MimicEntityRecord | None = None,
    limit: int | None = None,
    candidates: int | None = None,
) -> dict[str, Any]:
    """Metrics of one split; ``records`` may be passed to reuse entity precomputation.

    ``candidates=None``: every mention is ranked against the whole KB (MIMIC's protocol).
    ``candidates=K``: retrieval-restricted, as the server works: the top K entities by MIMIC's
    retrieval vector (exact inner product over the whole KB), reranked by MIMIC; a gold outside
    them is a miss (see :func:`candidate_metrics`). Far cheaper on a large KB.
    """
    mentions = [m for m in ds.split(split) if m.entity_id is not None]
    nil = len(ds.split(split)) - len(mentions)
    if limit is not None:
        mentions = mentions[:limit]
    if not mentions:
        raise ValueError(f"split {split!r} has no mention with a gold entity")
    model.eval()
    t0 = time.perf_counter()
    if records is None:
        records = entity_records(model, feats.entities)
    rows = feats.mention_rows(mentions)
    gold = torch.tensor([ds.entity_row[m.entity_id] for m in mentions if m.entity_id])
    out: dict[str, Any] = {}
    if candidates is not None:
        cand, scores = retrieve_and_rerank(model, records, feats.mentions, rows, candidates, units)
        out.update(candidate_metrics(candidate_ranks(scores, cand, gold), cand.shape[1]))
        out["candidates"] = int(cand.shape[1])
    else:
        ranks = torch.empty(len(mentions), dtype=torch.long)
        for s in range(0, len(mentions), 256):  # bound the (B, N) score matrix held at once
            scores = score_all(
                model,
                records,
                feats.mentions,
                rows[s : s + 256],
                units,
                batch_size,
                desc=f"rank {split}",
            )
            ranks[s : s + 256] = gold_ranks(scores, gold[s : s + 256])
        out.update(ranking_metrics(ranks))
    out.update(
        {
            "split": split,
            "units": list(units or model.config.mimic.units),
            "entities": len(ds.entities),
            "nil_skipped": nil,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    )
    return out


def emit_json(metrics: dict[str, Any], out: str | None) -> None:
    """Print a CLI's metrics JSON and write it to ``out`` when given (the eval CLIs' output)."""
    text = json.dumps(metrics, indent=1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text)


def format_metrics(m: dict[str, Any]) -> str:
    keys = [k for k in m if k.startswith("H@")] + ["MRR"]
    return " ".join(f"{k}={100 * m[k]:.2f}" for k in keys) + f" MR={m['MR']:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    p = argparse.ArgumentParser(
        prog="mel-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--data", required=True, help="canonical dataset folder")
    p.add_argument("--split", default="test")
    p.add_argument(
        "--drop-unit",
        action="append",
        default=[],
        choices=UNITS,
        help="score without this unit (ablation); repeatable",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--candidates",
        type=int,
        help="rerank only the top K by the retrieval vector (the two-stage path), not the KB",
    )
    p.add_argument("--cache-dir", default="artifacts/cache", help="raw feature cache ('' = off)")
    p.add_argument("--out", help="write the metrics JSON here")
    a = p.parse_args(argv)
    model = LinkingModel.from_pretrained(a.model)
    units = tuple(u for u in model.config.mimic.units if u not in a.drop_unit)
    if not units:
        p.error("every unit dropped")
    ds = load_dataset(a.data)
    feats = dataset_features(model.encoder, ds, a.cache_dir or None)
    metrics = evaluate_split(
        model, ds, feats, a.split, units, a.batch_size, candidates=a.candidates
    )
    metrics["model"] = str(a.model)
    metrics["fingerprint"] = model.fingerprint()
    logger.info("%s: %s", a.split, format_metrics(metrics))
    emit_json(metrics, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
