"""``mel-train``: train MIMIC on a canonical dataset.

    mel-train --data artifacts/demo-world --out artifacts/demo-model --lr 1e-3 --epochs 20

Defaults are the released recipe (``config/wikimel.yaml`` + ``lightning_mimic.py``): in-batch
contrastive loss CE(S) + CE(S_T) + CE(S_V) + CE(S_C) with labels = arange(batch), batch 128,
AdamW lr 1e-5, betas (0.9, 0.999), eps 1e-4, weight decay 1e-4 on every parameter whose name
contains none of "bias", "LayerNorm.bias", "LayerNorm.weight" (the released substring rule:
in practice every bias is exempt and every LayerNorm *weight* decays, since no parameter name
contains "LayerNorm"); 20 epochs, validate every 2 with full-KB ranking, keep the best
validation MRR, early stop after 3 validations without improvement. ``--val-candidates 100``
validates the way the server links instead (top 100 by the retrieval vector, reranked; a gold
outside them is a miss): seconds rather than minutes per validation on an 18k-entity KB.
``--hard-negatives K`` (default 0, the released recipe) adds K negatives of each mention's own,
drawn from its top ``--hard-negative-pool`` entities by the current retrieval vector (gold
excluded; re-mined before every epoch): columns after the B in-batch ones in every CE term.

Scores in training go through ``models.scoring.score_block`` (TGLU as large matrix products),
equal to ``MimicMatcher.score`` within float rounding, values and gradients (tested), ~3x faster.

Modes: ``--mode frozen`` (default) encodes the dataset once with the frozen backbone (cached,
see models/features.py) and trains image_cls_fc / image_tokens_fc / the matcher: minutes on a
CPU. ``--mode full`` fine-tunes the backbone too, encoding every batch (the released setting).
Note the released lr 1e-5 is tuned for fine-tuning a pretrained CLIP; training fresh
interaction layers on frozen features wants a larger one (the demo recipe uses 1e-3).

Output folder: ``best/`` (checkpoint with the best validation MRR), ``last/``, ``history.json``,
``train_state.pt`` (optimiser, epoch, RNG: ``--resume`` continues an interrupted run exactly).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.data.schema import MelDataset, Mention, load_dataset
from models.encoders import ClipBackbone, MiniLmEffNetBackbone
from models.evaluate import evaluate_split, format_metrics
from models.features import (
    DatasetFeatures,
    dataset_features,
    default_runtime,
    encode_items,
    entity_inputs,
    mention_inputs,
)
from models.fit import FitState, Validation, fit, optimizer_step, reproducible, shuffled_batches
from models.mimic import UNITS, MimicFeatures, MimicScores, in_batch_loss
from models.model import LinkingModel
from models.preprocess import IMAGE_SIZE, entity_text, load_image_or_none, mention_text
from models.scoring import entity_records, project_rows, score_block

logger = logging.getLogger(__name__)

NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")  # the released substring rule
SCORE_FIELDS = ("score", "tglu", "vdlu", "cmfu")


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    # Start from this checkpoint; default: fresh heads on the chosen backbone.
    init: str | None = None
    backend: str = "minilm-effnet"
    clip_path: str | None = None
    units: tuple[str, ...] = UNITS  # train an ablation with fewer units (and their losses)
    mode: str = "frozen"  # "frozen": cached backbone features; "full": fine-tune the backbone
    dv: int = 96
    hidden: int = 96
    # Side the image tower sees (minilm-effnet; CLIP fixes its own). 224 is EfficientNet's
    # training size; smaller images cost quadratically less to encode and give fewer tokens.
    image_size: int = IMAGE_SIZE
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-5
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-4
    val_every: int = 2
    patience: int = 3
    seed: int = 43  # the released wikimel.yaml seed
    val_split: str = "dev"
    val_limit: int | None = None  # score only the first N dev mentions (faster validation)
    # Validate retrieval-restricted: rerank the top K by the retrieval vector (exact, whole KB),
    # a gold outside them is a miss; the server's two-stage path, seconds instead of the
    # minutes a full-KB ranking costs on a large KB. None: full-KB ranking (the paper's).
    val_candidates: int | None = None
    # Hard negatives (0 = the released recipe, in-batch negatives only): each mention is also
    # scored against K negatives of its own, drawn from its top ``hard_negative_pool`` entities
    # by the current model's retrieval vector (gold excluded), re-mined before every epoch.
    # In-batch negatives are mostly easy; the errors on a real KB are same-name entities.
    hard_negatives: int = 0
    hard_negative_pool: int = 16
    eval_batch_size: int = 32
    cache_dir: str | None = "artifacts/cache"
    # how the frozen towers encode the feature cache (None: the backend's default, what the
    # index job and the server run; models/onnx_encoders.py)
    encoder_runtime: str | None = None
    workers: int = 4
    resume: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(nd in name for nd in NO_DECAY) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_model(cfg: TrainConfig) -> LinkingModel:
    if cfg.init:
        model = LinkingModel.from_pretrained(cfg.init)
        if tuple(cfg.units) != tuple(model.config.mimic.units):
            logger.warning(
                "--units ignored: the init checkpoint fixes units=%s", model.config.mimic.units
            )
        return model
    torch.manual_seed(cfg.seed)
    if cfg.backend == "clip":
        if not cfg.clip_path:
            raise SystemExit("--backend clip needs --clip-path (a local CLIPModel folder)")
        backbone: Any = ClipBackbone.from_folder(cfg.clip_path)
    else:
        backbone = MiniLmEffNetBackbone.from_packages(image_size=cfg.image_size)
    return LinkingModel.for_backbone(backbone, dv=cfg.dv, hidden=cfg.hidden, units=cfg.units)


class _FullModeBatches:
    """Encode raw inputs per batch (backbone trainable): the released fine-tuning setting."""

    def __init__(self, model: LinkingModel, ds: MelDataset, workers: int) -> None:
        self.model, self.ds = model, ds
        self.pool = ThreadPoolExecutor(max_workers=workers)

    def features(
        self,
        mentions: Sequence[Mention],
        gen: torch.Generator,
    ) -> tuple[MimicFeatures, MimicFeatures]:
        ds = self.ds
        ents = [ds.entities[ds.entity_row[m.entity_id]] for m in mentions if m.entity_id]
        m_imgs = list(
            self.pool.map(
                lambda m: load_image_or_none(ds.resolve(m.image) if m.image else None), mentions
            )
        )

        def ent_img(e: Any) -> Any:
            if not e.images:
                return None
            pick = int(torch.randint(len(e.images), (1,), generator=gen))
            return load_image_or_none(ds.resolve(e.images[pick]))

        e_imgs = [ent_img(e) for e in ents]
        enc = self.model.encoder
        return (
            enc.encode([mention_text(m.mention, m.sentence) for m in mentions], m_imgs),
            enc.encode([entity_text(e.name, e.attributes) for e in ents], e_imgs),
        )


@torch.inference_mode()
def mine_hard_negatives(
    model: LinkingModel,
    feats: DatasetFeatures,
    mentions: Sequence[Mention],
    gold_row: torch.Tensor,
    pool: int,
    chunk: int = 1024,
) -> torch.Tensor:
    """(len(mentions), pool) entity rows: each mention's top entities by the model's retrieval
    vector (exact inner product over the whole KB), its gold excluded, best first."""
    was_training = model.training
    model.eval()
    keys = model.matcher.retrieval_keys(entity_records(model, feats.entities))
    pool = min(pool, keys.shape[0] - 1)
    rows = feats.mention_rows(mentions)
    out = torch.empty(len(rows), pool, dtype=torch.long)
    for s in range(0, len(rows), chunk):
        r = rows[s : s + chunk]
        m = project_rows(model.encoder, feats.mentions, r, feats.mentions.first_image_rows(r))
        sc = model.matcher.retrieval_queries(m) @ keys.t()
        sc[torch.arange(len(r)), gold_row[s : s + chunk]] = -torch.inf
        out[s : s + len(r)] = sc.topk(pool, dim=1).indices
    model.train(was_training)
    return out


def _hard_negative_scores(
    model: LinkingModel,
    feats: DatasetFeatures,
    men: MimicFeatures,
    candidates: torch.Tensor,
    k: int,
    gen: torch.Generator,
) -> MimicScores:
    """(B, k) scores of each mention against k of its own mined negatives (random, distinct)."""
    b, pool = candidates.shape
    pick = torch.rand(b, pool, generator=gen).argsort(dim=1)[:, :k]
    rows = candidates.gather(1, pick).reshape(-1)
    ent = project_rows(
        model.encoder, feats.entities, rows, feats.entities.random_image_rows(rows, gen)
    ).map(lambda t: t.reshape(b, k, *t.shape[1:]))
    return model.matcher.score(men, ent)


def train(cfg: TrainConfig) -> dict[str, Any]:
    with reproducible(cfg.seed) as gen:
        return _train(cfg, gen)


def _train(cfg: TrainConfig, gen: torch.Generator) -> dict[str, Any]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(cfg.data)
    model = build_model(cfg)
    frozen = cfg.mode == "frozen"
    if cfg.mode not in ("frozen", "full"):
        raise ValueError(f"mode must be frozen or full, got {cfg.mode!r}")
    for p in model.encoder.backbone.parameters():
        p.requires_grad_(not frozen)
    if not frozen:
        model.config = type(model.config)(
            type(model.config.encoder)(
                **{**model.config.encoder.to_dict(), "backbone_in_checkpoint": True}
            ),
            model.config.mimic,
        )
        model.encoder.config = model.config.encoder
    units = model.config.mimic.units
    train_mentions = [m for m in ds.split("train") if m.entity_id is not None]
    if not train_mentions:
        raise SystemExit(f"{cfg.data}: no training mention with a gold entity")
    opt = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps
    )
    state_file = out / "train_state.pt"
    state = FitState(best=(-1.0,))  # best dev MRR
    if cfg.resume and state_file.is_file():
        st = torch.load(state_file, map_location="cpu", weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        gen.set_state(st["generator"])
        torch.set_rng_state(st["torch_rng"])
        state = FitState((st["best_mrr"],), st["bad_vals"], st["epoch"], st["history"])
        logger.info("resumed at epoch %d (best dev MRR %.4f)", state.epoch, state.best[0])

    feats: DatasetFeatures | None = None
    full: _FullModeBatches | None = None
    if frozen:
        feats = dataset_features(
            model.encoder,
            ds,
            cfg.cache_dir,
            workers=cfg.workers,
            runtime=default_runtime(model.encoder, cfg.encoder_runtime),
        )
    else:
        full = _FullModeBatches(model, ds, cfg.workers)
    gold_row = torch.tensor([ds.entity_row[m.entity_id] for m in train_mentions if m.entity_id])
    if cfg.hard_negatives and feats is None:
        raise SystemExit("--hard-negatives needs --mode frozen (mined from cached features)")

    def train_epoch(epoch: int) -> float:
        model.train()
        negatives = None
        if cfg.hard_negatives and feats is not None:
            t_mine = time.perf_counter()
            negatives = mine_hard_negatives(
                model, feats, train_mentions, gold_row, cfg.hard_negative_pool
            )
            logger.info("hard negatives mined in %.1fs", time.perf_counter() - t_mine)
        losses: list[float] = []
        desc = f"epoch {epoch + 1}/{cfg.epochs}"
        n = len(train_mentions)
        for idx in shuffled_batches(n, cfg.batch_size, gen, desc, cfg.progress, losses):
            if len(idx) < 2:
                continue  # in-batch negatives need at least two mentions
            if feats is not None:
                m_rows = feats.mention_rows([train_mentions[int(i)] for i in idx])
                e_rows = gold_row[idx]
                m_img = feats.mentions.first_image_rows(m_rows)
                e_img = feats.entities.random_image_rows(e_rows, gen)
                men = project_rows(model.encoder, feats.mentions, m_rows, m_img)
                ent = project_rows(model.encoder, feats.entities, e_rows, e_img)
            else:
                assert full is not None
                men, ent = full.features([train_mentions[int(i)] for i in idx], gen)
            # == model.matcher.score(men, ent) within float rounding, ~3x faster (GEMM TGLU)
            scores = score_block(model.matcher, men, model.matcher.precompute_entities(ent))
            if negatives is not None and feats is not None:
                k = min(cfg.hard_negatives, negatives.shape[1])
                own = _hard_negative_scores(model, feats, men, negatives[idx], k, gen)
                # columns: the B in-batch entities (gold on the diagonal), then k own negatives
                scores = MimicScores(
                    *(torch.cat([getattr(scores, f), getattr(own, f)], dim=1) for f in SCORE_FIELDS)
                )
            losses.append(optimizer_step(opt, in_batch_loss(scores, units)))
        return float(np.mean(losses))

    def validate(epoch: int) -> Validation:
        val_feats = feats if feats is not None else _encode_eval(model, ds, cfg)
        metrics = evaluate_split(
            model,
            ds,
            val_feats,
            cfg.val_split,
            batch_size=cfg.eval_batch_size,
            limit=cfg.val_limit,
            candidates=cfg.val_candidates,
        )
        summary = f"{cfg.val_split} {format_metrics(metrics)}"
        return Validation((metrics["MRR"],), metrics, metrics, summary)

    def save_best(epoch: int, val: Validation) -> None:
        meta = {"epoch": epoch + 1, "val": val.metrics, "train_config": _jsonable(cfg)}
        model.save_pretrained(out / "best", meta=meta)

    def save_state(state: FitState) -> None:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "epoch": state.epoch,
                "best_mrr": state.best[0],
                "bad_vals": state.bad,
                "history": state.history,
            },
            state_file,
        )

    t_start = time.perf_counter()
    fit(
        state,
        cfg.epochs,
        train_epoch,
        validate,
        save_best,
        patience=cfg.patience,
        val_every=cfg.val_every,
        criterion=f"{cfg.val_split} MRR",
        history_file=out / "history.json",
        after_epoch=save_state,
        started=t_start,
    )
    model.save_pretrained(out / "last", meta={"train_config": _jsonable(cfg)})
    summary = {
        "best_val_mrr": state.best[0],
        "epochs_run": len(state.history),
        "stopped_early": state.stopped_early,
        "seconds": round(time.perf_counter() - t_start, 1),
        "history": state.history,
    }
    (out / "history.json").write_text(json.dumps(state.history, indent=1))
    return summary


def _encode_eval(model: LinkingModel, ds: MelDataset, cfg: TrainConfig) -> DatasetFeatures:
    """Full mode: the backbone changed, so encode KB + mentions afresh (no cache)."""
    mentions = list(ds.mentions.values())
    ent = encode_items(model.encoder, *entity_inputs(ds), workers=cfg.workers, desc="entities")
    men = encode_items(
        model.encoder, *mention_inputs(ds, mentions), workers=cfg.workers, desc="mentions"
    )
    model.train()
    return DatasetFeatures(ent, men, {m.id: i for i, m in enumerate(mentions)})


def _jsonable(cfg: TrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["units"] = list(cfg.units)
    d["betas"] = list(cfg.betas)
    return d


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(data="", out="")
    p = argparse.ArgumentParser(
        prog="mel-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, help="canonical dataset folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--init", help="start from this checkpoint folder")
    p.add_argument("--backend", default=d.backend, choices=["minilm-effnet", "clip"])
    p.add_argument("--clip-path", help="local CLIPModel folder (backend clip)")
    p.add_argument(
        "--units",
        nargs="+",
        default=list(d.units),
        choices=UNITS,
        help="units scored and trained (ablations: e.g. --units tglu)",
    )
    p.add_argument("--mode", default=d.mode, choices=["frozen", "full"])
    p.add_argument("--dv", type=int, default=d.dv)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument(
        "--image-size",
        type=int,
        default=d.image_size,
        help="side of the images the minilm-effnet image tower sees (a multiple of 32)",
    )
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--eps", type=float, default=d.eps)
    p.add_argument("--val-every", type=int, default=d.val_every)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--val-split", default=d.val_split)
    p.add_argument("--val-limit", type=int, help="validate on the first N mentions only")
    p.add_argument(
        "--val-candidates",
        type=int,
        help="validate on the top K by the retrieval vector, reranked (default: full KB)",
    )
    p.add_argument(
        "--hard-negatives",
        type=int,
        default=d.hard_negatives,
        help="K own negatives per mention from its retrieval top (0 = in-batch only, released)",
    )
    p.add_argument(
        "--hard-negative-pool",
        type=int,
        default=d.hard_negative_pool,
        help="draw them from the top P by the retrieval vector, re-mined every epoch",
    )
    p.add_argument("--cache-dir", default=d.cache_dir, help="raw feature cache ('' = off)")
    p.add_argument(
        "--encoder-runtime",
        choices=["torch", "onnx", "onnx-int8"],
        help="how the frozen towers encode the feature cache (default: the backend's, as "
        "mel-index build and the server)",
    )
    p.add_argument("--workers", type=int, default=d.workers, help="image decoding threads")
    p.add_argument("--resume", action="store_true", help="continue from <out>/train_state.pt")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    a = build_parser().parse_args(argv)
    cfg = TrainConfig(
        data=a.data,
        out=a.out,
        init=a.init,
        backend=a.backend,
        clip_path=a.clip_path,
        units=tuple(a.units),
        mode=a.mode,
        dv=a.dv,
        hidden=a.hidden,
        image_size=a.image_size,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        weight_decay=a.weight_decay,
        eps=a.eps,
        val_every=a.val_every,
        patience=a.patience,
        seed=a.seed,
        val_split=a.val_split,
        val_limit=a.val_limit,
        val_candidates=a.val_candidates,
        hard_negatives=a.hard_negatives,
        hard_negative_pool=a.hard_negative_pool,
        cache_dir=a.cache_dir or None,
        encoder_runtime=a.encoder_runtime,
        workers=a.workers,
        resume=a.resume,
        progress=not a.no_progress,
    )
    summary = train(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
