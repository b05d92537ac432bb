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
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.data.schema import MelDataset, load_dataset
from models.features import DatasetFeatures, dataset_features, default_runtime
from models.metrics import candidate_metrics, candidate_ranks, gold_ranks, ranking_metrics
from models.mimic import UNITS, MimicEntityRecord
from models.model import LinkingModel

# Re-exported: bench/score_speed.py, bench/demo_quality.py and bench/wikimel.py import the
# scoring kernels and candidate metrics from here (they live in models/scoring.py and
# models/metrics.py).
from models.scoring import (
    BLOCK_ELEMENTS,
    PAIR_BUDGET,
    entity_records,
    retrieve_and_rerank,
    score_all_units,
    score_block,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BLOCK_ELEMENTS",
    "PAIR_BUDGET",
    "candidate_metrics",
    "candidate_ranks",
    "emit_json",
    "entity_records",
    "evaluate_split",
    "format_metrics",
    "main",
    "retrieve_and_rerank",
    "score_all_units",
    "score_block",
]


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
            scores = score_all_units(
                model,
                records,
                feats.mentions,
                rows[s : s + 256],
                units,
                batch_size,
                desc=f"rank {split}",
            ).score
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
    feats = dataset_features(
        model.encoder, ds, a.cache_dir or None, runtime=default_runtime(model.encoder)
    )
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
