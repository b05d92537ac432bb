"""``mel-train-drin`` / ``mel-eval-drin``: DRIN over our own retrieval stage's candidates.

    mel-train-drin --data artifacts/demo-world --model artifacts/demo-model/best \\
        --out artifacts/demo-drin
    mel-eval-drin --data artifacts/demo-world --model artifacts/demo-model/best \\
        --drin artifacts/demo-drin/best --split test --candidates 100

Candidates are what the server's first stage returns: the MIMIC retrieval vectors
(``retrieval_queries . retrieval_keys``) searched with an exact FAISS inner-product index over
the whole KB, the same ranking a Flat index gives the server. Training takes the top
``--candidates`` (hard negatives) and, when the gold entity is not among them, puts it in place
of the last one: training only. Validation and evaluation never insert the gold: a gold outside
the retrieved top-K is a miss, so the figures are what a user of the server gets.

Training follows the released recipe (``train.py``, ``common/args.py``): margin ranking loss
(margin 0.25, mean over all candidates), Adam lr 1e-3, batch 64; the released 30 epochs are the
default ``--epochs`` (the demo uses fewer). The best epoch by dev H@1 (then MRR) is kept.

Evaluation reports DRIN over the retrieved top-K next to MIMIC and retrieval-only on the SAME
candidates: Top-1/5/10/20 (the DRIN paper's columns), MRR (a miss contributes 0) and the
retrieval recall@K (the ceiling of every reranker).

Inputs come from the raw backbone feature cache of models/features.py; see
models/drin_features.py for which feature plays which role.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from models.data.schema import MelDataset, Mention, load_dataset
from models.drin import margin_ranking_loss
from models.drin_features import (
    DrinEntityParts,
    DrinMentionParts,
    DrinReranker,
    DrinRerankerConfig,
    check_compatible,
    entity_parts,
    mention_parts,
    span_token_mask,
)
from models.evaluate import emit_json
from models.features import DatasetFeatures, FeatureTable, dataset_features, default_runtime
from models.fit import FitState, Validation, fit, optimizer_step, reproducible, shuffled_batches
from models.metrics import candidate_ranks, drin_candidate_metrics
from models.mimic import MimicEntityRecord
from models.model import LinkingModel
from models.scoring import entity_records

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- parts of a dataset
@torch.inference_mode()
def table_entity_parts(
    model: LinkingModel, table: FeatureTable, chunk: int = 1024
) -> DrinEntityParts:
    """DRIN parts of every item of a feature table (first image = the store's rule)."""
    backbone = model.encoder.backbone
    parts = []
    for s in range(0, len(table), chunk):
        rows = torch.arange(s, min(s + chunk, len(table)))
        img_rows = table.first_image_rows(rows)
        text, image = table.gather(rows, img_rows)
        parts.append(entity_parts(backbone, text, image, img_rows > 0))
    return DrinEntityParts(*(torch.cat(t) for t in zip(*(_tensors(p) for p in parts), strict=True)))


def _tensors(p: Any) -> list[torch.Tensor]:
    return [getattr(p, f) for f in p.__dataclass_fields__]


@torch.inference_mode()
def table_mention_parts(
    model: LinkingModel,
    table: FeatureTable,
    rows: torch.Tensor,
    mentions: Sequence[Mention],
    chunk: int = 512,
) -> DrinMentionParts:
    """DRIN parts of the given mentions (rows of the mention feature table)."""
    backbone = model.encoder.backbone
    tok = backbone.tokenizer
    parts = []
    for s in range(0, len(rows), chunk):
        r = rows[s : s + chunk]
        ms = mentions[s : s + chunk]
        mask = span_token_mask(
            tok, [m.mention for m in ms], [m.sentence for m in ms], [m.span for m in ms]
        )
        img_rows = table.first_image_rows(r)
        text, image = table.gather(r, img_rows)
        parts.append(mention_parts(backbone, text, image, mask, img_rows > 0))
    return DrinMentionParts(
        *(torch.cat(t) for t in zip(*(_tensors(p) for p in parts), strict=True))
    )


@dataclass
class SplitData:
    """One split's mentions with a gold entity: parts, gold rows, retrieved candidates."""

    mentions: list[Mention]
    parts: DrinMentionParts
    gold: torch.Tensor  # (M,) entity rows
    candidates: torch.Tensor  # (M, K) entity rows, retrieval order
    retrieval: torch.Tensor  # (M, K) retrieval scores
    mention_rows: torch.Tensor  # rows in the mention feature table

    def __len__(self) -> int:
        return len(self.mentions)


class DrinData:
    """Everything DRIN training / evaluation reads, computed once from the feature cache."""

    def __init__(
        self,
        model: LinkingModel,
        ds: MelDataset,
        feats: DatasetFeatures,
        records: MimicEntityRecord | None = None,
    ) -> None:
        self.model, self.ds, self.feats = model.eval(), ds, feats
        t0 = time.perf_counter()
        self.records = records if records is not None else entity_records(model, feats.entities)
        with torch.inference_mode():
            keys = model.matcher.retrieval_keys(self.records).float().numpy()
        self.index = faiss.IndexFlatIP(keys.shape[1])
        self.index.add(np.ascontiguousarray(keys))
        self.entities = table_entity_parts(model, feats.entities)
        logger.info("DRIN entity parts + retrieval index: %.1fs", time.perf_counter() - t0)

    @torch.inference_mode()
    def split(self, name: str, k: int, limit: int | None = None) -> SplitData:
        mentions = [m for m in self.ds.split(name) if m.entity_id is not None]
        if limit is not None:
            mentions = mentions[:limit]
        if not mentions:
            raise ValueError(f"split {name!r} has no mention with a gold entity")
        rows = self.feats.mention_rows(mentions)
        parts = table_mention_parts(self.model, self.feats.mentions, rows, mentions)
        cand, retr = self.retrieve(rows, k)
        gold = torch.tensor([self.ds.entity_row[m.entity_id] for m in mentions if m.entity_id])
        return SplitData(mentions, parts, gold, cand, retr, rows)

    @torch.inference_mode()
    def retrieve(self, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        men = self.feats.mentions
        out_rows, out_scores = [], []
        k = min(k, self.index.ntotal)
        for s in range(0, len(rows), 1024):
            r = rows[s : s + 1024]
            text, image = men.gather(r, men.first_image_rows(r))
            q = self.model.matcher.retrieval_queries(self.model.encoder.project(text, image))
            scores, idx = self.index.search(np.ascontiguousarray(q.float().numpy()), k)
            out_rows.append(torch.from_numpy(idx))
            out_scores.append(torch.from_numpy(scores))
        return torch.cat(out_rows).long(), torch.cat(out_scores)

    def gather(self, rows: torch.Tensor) -> DrinEntityParts:
        return self.entities.map(lambda t: t[rows])


def insert_gold(candidates: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training lists: the gold replaces the last candidate when retrieval missed it.
    Returns the (M, K) lists and the gold column of each."""
    cand = candidates.clone()
    hit = cand == gold.unsqueeze(1)
    missed = ~hit.any(dim=1)
    cand[missed, -1] = gold[missed]
    col = (cand == gold.unsqueeze(1)).float().argmax(dim=1)
    return cand, col


# ---------------------------------------------------------------------- metrics
# bench/drin_quality.py imports ``candidate_metrics`` (the DRIN columns) and
# ``candidate_ranks`` from here; both live in models/metrics.py.
candidate_metrics = drin_candidate_metrics


@torch.inference_mode()
def drin_scores(
    drin: DrinReranker, data: DrinData, split: SplitData, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DRIN scores (M, K) and initial / final edges (M, K, 4) of a split's candidates."""
    drin.eval()
    s_out, e0, e1 = [], [], []
    for s in range(0, len(split), batch_size):
        sl = slice(s, s + batch_size)
        out = drin(split.parts.map(lambda t, sl=sl: t[sl]), data.gather(split.candidates[sl]))
        s_out.append(out.scores)
        e0.append(out.edges_initial)
        assert out.edges_final is not None
        e1.append(out.edges_final)
    return torch.cat(s_out), torch.cat(e0), torch.cat(e1)


@torch.inference_mode()
def mimic_scores(data: DrinData, split: SplitData, batch_size: int = 64) -> torch.Tensor:
    """MIMIC scores (M, K) of the same candidates (the server's two-stage rerank)."""
    model, men = data.model, data.feats.mentions
    out = []
    for s in range(0, len(split), batch_size):
        r = split.mention_rows[s : s + batch_size]
        text, image = men.gather(r, men.first_image_rows(r))
        rows = split.candidates[s : s + batch_size]
        rec = data.records.map(lambda t, rows=rows: t[rows])
        out.append(model.matcher.score_precomputed(model.encoder.project(text, image), rec).score)
    return torch.cat(out)


def evaluate_drin(
    drin: DrinReranker, data: DrinData, split: SplitData, with_mimic: bool = True
) -> dict[str, Any]:
    """DRIN vs MIMIC vs retrieval-only on the same retrieved candidates."""
    k = split.candidates.shape[1]
    t0 = time.perf_counter()
    d_scores, e0, e1 = drin_scores(drin, data, split)
    d_secs = time.perf_counter() - t0
    out: dict[str, Any] = {
        "candidates": k,
        "mentions": len(split),
        "drin": drin_candidate_metrics(candidate_ranks(d_scores, split.candidates, split.gold), k),
        "retrieval": drin_candidate_metrics(
            candidate_ranks(split.retrieval, split.candidates, split.gold), k
        ),
        "drin_seconds": round(d_secs, 2),
        "mean_edges_initial": dict(
            zip(("tt", "ti", "it", "ii"), e0.mean((0, 1)).tolist(), strict=True)
        ),
        "mean_edges_final": dict(
            zip(("tt", "ti", "it", "ii"), e1.mean((0, 1)).tolist(), strict=True)
        ),
    }
    if with_mimic:
        m_scores = mimic_scores(data, split)
        out["mimic"] = drin_candidate_metrics(
            candidate_ranks(m_scores, split.candidates, split.gold), k
        )
    return out


# ---------------------------------------------------------------------- training
@dataclass(frozen=True)
class DrinTrainConfig:
    data: str
    model: str
    out: str
    candidates: int = 20
    eval_candidates: int = 100
    hidden: int = 768
    layers: int = 2
    margin: float = 0.25
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    ridge: float = 1.0
    patience: int = 3
    seed: int = 0
    val_split: str = "dev"
    val_limit: int | None = None
    cache_dir: str | None = "artifacts/cache"
    progress: bool = True


def fit_alignment(drin: DrinReranker, data: DrinData, train: SplitData, ridge: float) -> int:
    """Fit the image -> text map on KB entities with an image + training mentions with one."""
    e = data.entities
    e_has = e.has_image()
    m_has = train.parts.has_image()
    image = torch.cat([e.image[e_has], train.parts.image[m_has]])
    text = torch.cat([e.text[e_has], train.parts.text[m_has]])
    n = drin.align.fit(image, text, ridge)
    logger.info(
        "alignment (%s): %d pairs (%d entities, %d mentions)",
        drin.config.alignment,
        n,
        int(e_has.sum()),
        int(m_has.sum()),
    )
    return n


def train_drin(cfg: DrinTrainConfig, data: DrinData | None = None) -> dict[str, Any]:
    """Train DRIN; ``data`` (built for ``cfg.data`` / ``cfg.model``) may be passed to reuse it
    for evaluation afterwards (benchmarks)."""
    with reproducible(cfg.seed) as gen:
        return _train_drin(cfg, data, gen)


def _train_drin(
    cfg: DrinTrainConfig, data: DrinData | None, gen: torch.Generator
) -> dict[str, Any]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if data is None:
        ds = load_dataset(cfg.data)
        model = LinkingModel.from_pretrained(cfg.model)
        feats = dataset_features(
            model.encoder, ds, cfg.cache_dir, runtime=default_runtime(model.encoder)
        )
        data = DrinData(model, ds, feats)
    model = data.model
    train = data.split("train", cfg.candidates)
    val = data.split(cfg.val_split, cfg.eval_candidates, cfg.val_limit)
    cand, gold_col = insert_gold(train.candidates, train.gold)
    logger.info(
        "train: %d mentions x %d candidates (retrieval recall %.4f; gold inserted for the rest)",
        len(train),
        cfg.candidates,
        float((train.candidates == train.gold.unsqueeze(1)).any(1).float().mean()),
    )
    rcfg = DrinRerankerConfig.for_backbone(
        model.encoder.backbone, hidden=cfg.hidden, layers=cfg.layers, margin=cfg.margin
    )
    drin = DrinReranker(rcfg)
    fit_alignment(drin, data, train, cfg.ridge)
    params = [p for n, p in drin.named_parameters() if not n.startswith("align.")]
    for p in drin.align.parameters():
        p.requires_grad_(False)  # fitted in closed form, fixed like the released CLIP edges
    opt = torch.optim.Adam(params, lr=cfg.lr)
    meta = {
        "mimic_model": str(cfg.model),
        "mimic_fingerprint": model.fingerprint(),
        "backbone_weights": model.encoder.backbone.weights_fingerprint(),
        "train_config": asdict(cfg),
    }

    def train_epoch(epoch: int) -> float:
        drin.train()
        losses: list[float] = []
        desc = f"drin epoch {epoch + 1}/{cfg.epochs}"
        for idx in shuffled_batches(len(train), cfg.batch_size, gen, desc, cfg.progress, losses):
            # the scores alone: the last layer's edges and image vertices reach no loss
            outp = drin(
                train.parts.map(lambda t, idx=idx: t[idx]),
                data.gather(cand[idx]),
                final_edges=False,
            )
            loss = margin_ranking_loss(outp.scores, gold_col[idx], cfg.margin)
            losses.append(optimizer_step(opt, loss))
        return float(np.mean(losses))

    def validate(epoch: int) -> Validation:
        metrics = evaluate_drin(drin, data, val, with_mimic=False)
        d, r = metrics["drin"], metrics["retrieval"]
        summary = (
            f"{cfg.val_split} Top-1 {100 * d['Top-1']:.2f} MRR {100 * d['MRR']:.2f} "
            f"(retrieval Top-1 {100 * r['Top-1']:.2f})"
        )
        return Validation((d["Top-1"], d["MRR"]), metrics, d, summary)

    def save_best(epoch: int, val: Validation) -> None:
        drin.save_pretrained(out / "best", meta={**meta, "epoch": epoch + 1, "val": val.metrics})

    state = fit(
        FitState(best=(-1.0, -1.0)),  # best dev (Top-1, MRR)
        cfg.epochs,
        train_epoch,
        validate,
        save_best,
        patience=cfg.patience,
        criterion=f"{cfg.val_split} Top-1",
        history_file=out / "history.json",
        started=t_start,
        label="drin epoch",
    )
    drin.save_pretrained(out / "last", meta=meta)
    return {
        "best_val_top1": state.best[0],
        "best_val_mrr": state.best[1],
        "epochs_run": len(state.history),
        "seconds": round(time.perf_counter() - t_start, 1),
    }


# ---------------------------------------------------------------------- CLIs
def _logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def train_main(argv: Sequence[str] | None = None) -> int:
    _logging()
    d = DrinTrainConfig(data="", model="", out="")
    p = argparse.ArgumentParser(
        prog="mel-train-drin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="canonical dataset folder")
    p.add_argument("--model", required=True, help="MIMIC checkpoint (encoder + retrieval)")
    p.add_argument("--out", required=True, help="output folder (best/, last/, history.json)")
    p.add_argument("--candidates", type=int, default=d.candidates, help="training list size")
    p.add_argument("--eval-candidates", type=int, default=d.eval_candidates)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--margin", type=float, default=d.margin)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--ridge", type=float, default=d.ridge, help="alignment L2 penalty")
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--val-split", default=d.val_split)
    p.add_argument("--val-limit", type=int)
    p.add_argument("--cache-dir", default=d.cache_dir, help="raw feature cache ('' = off)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.candidates < 1 or a.eval_candidates < 1:
        p.error("--candidates and --eval-candidates must be >= 1")
    cfg = DrinTrainConfig(
        data=a.data,
        model=a.model,
        out=a.out,
        candidates=a.candidates,
        eval_candidates=a.eval_candidates,
        hidden=a.hidden,
        layers=a.layers,
        margin=a.margin,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        ridge=a.ridge,
        patience=a.patience,
        seed=a.seed,
        val_split=a.val_split,
        val_limit=a.val_limit,
        cache_dir=a.cache_dir or None,
        progress=not a.no_progress,
    )
    print(json.dumps(train_drin(cfg), indent=1))
    return 0


def eval_main(argv: Sequence[str] | None = None) -> int:
    _logging()
    p = argparse.ArgumentParser(
        prog="mel-eval-drin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True, help="MIMIC checkpoint (encoder + retrieval)")
    p.add_argument("--drin", required=True, help="DRIN checkpoint folder")
    p.add_argument("--split", default="test")
    p.add_argument("--candidates", type=int, default=100, help="retrieved top-K reranked")
    p.add_argument("--limit", type=int)
    p.add_argument("--cache-dir", default="artifacts/cache")
    p.add_argument("--out", help="write the metrics JSON here")
    a = p.parse_args(argv)
    ds = load_dataset(a.data)
    model = LinkingModel.from_pretrained(a.model)
    drin = DrinReranker.from_pretrained(a.drin)
    check_compatible(drin, model)
    feats = dataset_features(
        model.encoder, ds, a.cache_dir or None, runtime=default_runtime(model.encoder)
    )
    data = DrinData(model, ds, feats)
    split = data.split(a.split, a.candidates, a.limit)
    metrics = evaluate_drin(drin, data, split)
    metrics.update({"split": a.split, "model": a.model, "drin_checkpoint": a.drin})
    for name in ("drin", "mimic", "retrieval"):
        logger.info(
            "%s over top-%d: %s",
            name,
            a.candidates,
            " ".join(f"{k}={100 * v:.2f}" for k, v in metrics[name].items()),
        )
    emit_json(metrics, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
