"""The linker: model + index loaded once; encode -> retrieve -> rerank for a batch of mentions.

Pure synchronous model work (no HTTP, no asyncio): the batcher runs it on a worker thread.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from index.search import Candidates, IndexSearcher
from models.drin import EDGE_TYPES
from models.drin_features import (
    DrinMentionParts,
    DrinReranker,
    check_compatible,
    mention_parts,
    span_token_mask,
)
from models.mimic import MimicFeatures
from models.model import LinkingModel
from models.preprocess import mention_text
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)

RERANKERS = ("mimic", "drin", "none")


@dataclass(frozen=True)
class MentionInput:
    """One decoded mention. ``image_sha`` identifies the image bytes (cache keys)."""

    mention: str
    sentence: str
    image: Image.Image | None = None
    image_sha: str | None = None
    span: tuple[int, int] | None = None  # char offsets of the mention in the sentence (DRIN)

    def text(self) -> str:
        return mention_text(self.mention, self.sentence)

    def encoding_key(self) -> str:
        h = hashlib.sha256()
        span = f"{self.span[0]}:{self.span[1]}" if self.span else "-"
        for part in (self.mention, self.sentence, self.image_sha or "-", span):
            h.update(part.encode("utf-8"))
            h.update(b"\x00")
        return h.hexdigest()


@dataclass(frozen=True)
class LinkParams:
    top_k: int = 10
    candidates_k: int = 100
    reranker: str = "mimic"
    explain: bool = False


@dataclass(frozen=True)
class EncodedMentions:
    """What a request's mentions are encoded into once (and cached): MIMIC's features, plus
    DRIN's mention parts when the server has a DRIN reranker."""

    mimic: MimicFeatures
    drin: DrinMentionParts | None = None

    def __len__(self) -> int:
        return len(self.mimic)

    def select(self, idx: Sequence[int]) -> EncodedMentions:
        sel = torch.tensor(list(idx), dtype=torch.long, device=self.mimic.text_cls.device)
        return EncodedMentions(
            self.mimic.map(lambda t: t[sel]),
            self.drin.map(lambda t: t[sel]) if self.drin is not None else None,
        )

    @staticmethod
    def cat(parts: Sequence[EncodedMentions]) -> EncodedMentions:
        def cat_fields(objs: Sequence[Any]) -> list[torch.Tensor]:
            names = list(objs[0].__dataclass_fields__)
            return [torch.cat([getattr(o, n) for o in objs]) for n in names]

        drin = [p.drin for p in parts]
        return EncodedMentions(
            MimicFeatures(*cat_fields([p.mimic for p in parts])),
            DrinMentionParts(*cat_fields(drin)) if all(d is not None for d in drin) else None,
        )


@dataclass
class StageTimes:
    encode: float = 0.0
    retrieve: float = 0.0
    rerank: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


class Linker:
    """Everything the server needs to answer a link request, loaded once."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        dev = settings.device
        self.device = torch.device(
            "cuda"
            if dev == "auto" and torch.cuda.is_available()
            else ("cpu" if dev == "auto" else dev)
        )
        t0 = time.perf_counter()
        self.model = LinkingModel.from_pretrained(settings.model_path).to(self.device).eval()
        self.fingerprint = self.model.fingerprint()
        self.searcher = IndexSearcher(
            settings.index_path,
            self.model,
            use_gpu=settings.use_faiss_gpu,
            ef_search=settings.hnsw_ef_search,
            nprobe=settings.ivf_nprobe,
        )
        m = self.searcher.manifest
        self.index_version = hashlib.sha256(
            f"{m.model_fingerprint}:{m.entity_count}:{m.built_at}:{len(m.history)}".encode()
        ).hexdigest()[:16]
        self.dims = self.model.config
        self.drin: DrinReranker | None = None
        self.drin_fingerprint: str | None = None
        if settings.drin_model_path:
            self.drin = DrinReranker.from_pretrained(settings.drin_model_path).to(self.device)
            check_compatible(self.drin, self.model)
            if not self.searcher.has_drin:
                raise ValueError(
                    f"a DRIN model is configured but the index {settings.index_path} was built "
                    f"with --no-drin (it holds no DRIN entity parts)"
                )
            self.drin_fingerprint = self.drin.fingerprint()
        self.rerankers = tuple(r for r in RERANKERS if r != "drin" or self.drin is not None)
        logger.info(
            "linker ready in %.1fs: model %s, index %s (%d entities, %s) on %s",
            time.perf_counter() - t0,
            self.fingerprint,
            self.index_version,
            len(self.searcher),
            m.factory,
            self.device,
        )

    # ------------------------------------------------------------------ encoding
    @property
    def cache_version(self) -> str:
        """Identity of everything a cached encoding or result depends on."""
        return f"{self.fingerprint}:{self.drin_fingerprint or '-'}:{self.index_version}"

    @torch.inference_mode()
    def encode(self, items: Sequence[MentionInput]) -> EncodedMentions:
        enc = self.model.encoder
        text = enc.text_features([it.text() for it in items])
        image = enc.image_features([it.image for it in items])
        mimic = enc.project(text, image)
        if self.drin is None:
            return EncodedMentions(mimic)
        backbone = enc.backbone
        mask = span_token_mask(
            backbone.tokenizer,
            [it.mention for it in items],
            [it.sentence for it in items],
            [it.span for it in items],
        )
        has_image = torch.tensor([it.image is not None for it in items], device=self.device)
        return EncodedMentions(mimic, mention_parts(backbone, text, image, mask, has_image))

    def _layout(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(group, field, per-mention shape) of a cache blob, in order."""
        cfg = self.model.config
        L, dt = cfg.encoder.text_max_length, cfg.mimic.dt
        P, dv = cfg.encoder.num_image_tokens, cfg.encoder.dv
        out = [
            ("mimic", "text_cls", (dt,)),
            ("mimic", "text_tokens", (L, dt)),
            ("mimic", "image_cls", (dv,)),
            ("mimic", "image_tokens", (P, dv)),
        ]
        if self.drin is not None:
            d = self.drin.config
            R = self.drin_regions
            out += [
                ("drin", "span_text", (d.drin.text_dim,)),
                ("drin", "text", (d.drin.text_dim,)),
                ("drin", "image", (d.drin.image_dim,)),
                ("drin", "regions", (R, d.region_dim)),
                ("drin", "region_scores", (R,)),
            ]
        return out

    @property
    def drin_regions(self) -> int:
        from models.drin_features import MENTION_REGIONS

        return min(MENTION_REGIONS, self.model.config.encoder.num_image_tokens)

    def pack(self, feats: EncodedMentions) -> list[bytes]:
        """One float16 blob per mention (the encoding cache's value)."""
        n = len(feats)
        parts = [
            getattr(getattr(feats, group), name).reshape(n, -1) for group, name, _ in self._layout()
        ]
        flat = torch.cat(parts, dim=1).to(torch.float16).cpu().numpy()
        return [row.tobytes() for row in flat]

    def unpack(self, blobs: Sequence[bytes]) -> EncodedMentions:
        layout = self._layout()
        arr = np.stack([np.frombuffer(b, dtype=np.float16) for b in blobs]).astype(np.float32)
        t = torch.from_numpy(arr).to(self.device)
        n = len(blobs)
        sizes = [int(np.prod(shape)) for _, _, shape in layout]
        pieces = {
            name: x.reshape(n, *shape)
            for (_, name, shape), x in zip(layout, torch.split(t, sizes, dim=1), strict=True)
        }
        mimic = MimicFeatures(*(pieces[f] for f in MimicFeatures.__dataclass_fields__))
        drin = None
        if self.drin is not None:
            drin = DrinMentionParts(*(pieces[f] for f in DrinMentionParts.__dataclass_fields__))
        return EncodedMentions(mimic, drin)

    # ------------------------------------------------------------------ link
    @torch.inference_mode()
    def link(
        self,
        encoded: EncodedMentions,
        params: Sequence[LinkParams],
    ) -> tuple[list[dict[str, Any]], StageTimes]:
        """Retrieve + rerank for B encoded mentions; one result dict per mention."""
        times = StageTimes()
        t0 = time.perf_counter()
        feats = encoded.mimic
        k_max = max(p.candidates_k for p in params)
        cand = self.searcher.retrieve(feats, k_max)
        times.retrieve = time.perf_counter() - t0
        results: list[dict[str, Any]] = [{} for _ in params]
        groups: dict[tuple[str, int], list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault((p.reranker, p.candidates_k), []).append(i)
        t1 = time.perf_counter()
        for (reranker, k), idx in groups.items():
            tg = time.perf_counter()
            rows = cand.rows[idx, :k]
            retr = cand.retrieval[idx, :k]
            sub = Candidates(rows=rows, retrieval=retr)
            units: dict[str, np.ndarray]  # explain: per-unit scores or per-edge weights
            if reranker == "drin":
                final, units = self._drin(encoded.select(idx), rows)
            elif reranker == "mimic":
                sel = torch.tensor(idx, device=self.device)
                scores = self.searcher.rerank(feats.map(lambda t, sel=sel: t[sel]), sub)
                final = scores.score.float().cpu().numpy()
                units = {
                    u: getattr(scores, u).float().cpu().numpy() for u in ("tglu", "vdlu", "cmfu")
                }
            else:
                final, units = retr, {}
            for j, i in enumerate(idx):
                per = {u: v[j] for u, v in units.items()}
                results[i] = self._assemble(rows[j], retr[j], final[j], per, params[i])
            times.extra[reranker] = times.extra.get(reranker, 0.0) + time.perf_counter() - tg
        times.rerank = time.perf_counter() - t1
        return results, times

    def _drin(
        self, m: EncodedMentions, rows: np.ndarray
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """DRIN over each mention's retrieved candidates: scores (B, K) and the initial /
        final edge weights (B, K, 4) for ``explain``."""
        assert self.drin is not None and m.drin is not None
        ents = self.searcher.drin_parts(rows).map(lambda t: t.to(self.device))
        valid = torch.from_numpy(rows >= 0).to(self.device)
        # all candidates valid (the usual case): the released plain mean over candidates
        out = self.drin(m.drin, ents, None if bool(valid.all()) else valid)
        return out.scores.float().cpu().numpy(), {
            "edges_initial": out.edges_initial.float().cpu().numpy(),
            "edges_final": out.edges_final.float().cpu().numpy(),
        }

    def _assemble(
        self,
        rows: np.ndarray,
        retr: np.ndarray,
        final: np.ndarray,
        units: dict[str, np.ndarray],
        p: LinkParams,
    ) -> dict[str, Any]:
        valid = rows >= 0
        order = np.argsort(-np.where(valid, final, -np.inf), kind="stable")[: p.top_k]
        cands = []
        for rank, j in enumerate(order, start=1):
            if not valid[j]:
                break
            meta = self.searcher.entity(int(rows[j]))
            c: dict[str, Any] = {
                "entity_id": meta["id"],
                "name": meta["name"],
                "score": float(final[j]),
                "retrieval_score": float(retr[j]),
                "rank": rank,
            }
            if p.explain and units:
                c["explain"] = {
                    u: (
                        float(v[j])
                        if v.ndim == 1
                        else {e: float(x) for e, x in zip(EDGE_TYPES, v[j], strict=True)}
                    )
                    for u, v in units.items()
                }
            cands.append(c)
        best = cands[0]["score"] if cands else None
        thr = self.settings.nil_threshold
        nil = best is None or (thr is not None and best < thr)
        return {"candidates": cands, "nil": bool(nil)}

    def entity(self, entity_id: str) -> dict[str, Any] | None:
        row = self.searcher.store.row_of(entity_id)
        return None if row is None else {**self.searcher.entity(row), "row": row}

    def warmup(self) -> None:
        """One full pass (with and without an image) so first requests pay no lazy setup."""
        img = Image.new("RGB", (64, 64), (128, 64, 32))
        feats = self.encode(
            [
                MentionInput("warm up", "warm up the model", img, "warm"),
                MentionInput("warm up", "warm up the model"),
            ]
        )
        params = [LinkParams(), LinkParams(reranker="none")]
        if self.drin is not None:
            feats = EncodedMentions.cat([feats, feats])
            params += [LinkParams(reranker="drin"), LinkParams(reranker="drin")]
        self.link(feats, params)

    def close(self) -> None:
        self.searcher.close()


__all__ = ["RERANKERS", "EncodedMentions", "LinkParams", "Linker", "MentionInput", "StageTimes"]
