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
from tqdm import tqdm

from models.data.schema import MelDataset, load_dataset
from models.features import DatasetFeatures, FeatureTable, dataset_features
from models.metrics import gold_ranks, ranking_metrics
from models.mimic import UNITS, MimicEntityRecord
from models.model import LinkingModel

logger = logging.getLogger(__name__)

# Upper bound on TGLU attention elements (B x K x L x L) materialised at once (~128 MB fp32).
PAIR_BUDGET = 1 << 25


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
        text, image = ent.gather(rows, ent.first_image_rows(rows))
        parts.append(model.matcher.precompute_entities(model.encoder.project(text, image)))
    return MimicEntityRecord(
        *(torch.cat([getattr(p, f) for p in parts]) for f in MimicEntityRecord.field_names())
    )


@torch.inference_mode()
def score_all(
    model: LinkingModel,
    records: MimicEntityRecord,
    men: FeatureTable,
    rows: torch.Tensor,
    units: tuple[str, ...] | None = None,
    batch_size: int = 32,
    desc: str = "rank",
) -> torch.Tensor:
    """(len(rows), N) MIMIC scores of the given mentions against every entity record."""
    n_ent = records.text_cls.shape[0]
    L = records.tglu_query.shape[-2]
    out = torch.empty(len(rows), n_ent)
    for s in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", leave=False):
        r = rows[s : s + batch_size]
        text, image = men.gather(r, men.first_image_rows(r))
        m = model.encoder.project(text, image)
        chunk = max(1, PAIR_BUDGET // (len(r) * L * L))
        for c in range(0, n_ent, chunk):
            rec = records.map(lambda t, c=c, chunk=chunk: t[c : c + chunk])
            out[s : s + len(r), c : c + chunk] = model.matcher.score_precomputed(
                m, rec, units
            ).score
    return out


def evaluate_split(
    model: LinkingModel,
    ds: MelDataset,
    feats: DatasetFeatures,
    split: str,
    units: tuple[str, ...] | None = None,
    batch_size: int = 32,
    records: MimicEntityRecord | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Full-KB metrics of one split; ``records`` may be passed to reuse entity precomputation."""
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
    out: dict[str, Any] = ranking_metrics(ranks)
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
    p.add_argument("--cache-dir", default="artifacts/cache", help="raw feature cache ('' = off)")
    p.add_argument("--out", help="write the metrics JSON here")
    a = p.parse_args(argv)
    model = LinkingModel.from_pretrained(a.model)
    units = tuple(u for u in model.config.mimic.units if u not in a.drop_unit)
    if not units:
        p.error("every unit dropped")
    ds = load_dataset(a.data)
    feats = dataset_features(model.encoder, ds, a.cache_dir or None)
    metrics = evaluate_split(model, ds, feats, a.split, units, a.batch_size)
    metrics["model"] = str(a.model)
    metrics["fingerprint"] = model.fingerprint()
    logger.info("%s: %s", a.split, format_metrics(metrics))
    text = json.dumps(metrics, indent=1)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
