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
from models.mimic import MimicFeatures
from models.model import LinkingModel
from models.preprocess import mention_text
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)

RERANKERS = ("mimic", "none")


@dataclass(frozen=True)
class MentionInput:
    """One decoded mention. ``image_sha`` identifies the image bytes (cache keys)."""

    mention: str
    sentence: str
    image: Image.Image | None = None
    image_sha: str | None = None

    def text(self) -> str:
        return mention_text(self.mention, self.sentence)

    def encoding_key(self) -> str:
        h = hashlib.sha256()
        for part in (self.mention, self.sentence, self.image_sha or "-"):
            h.update(part.encode("utf-8"))
            h.update(b"\x00")
        return h.hexdigest()


@dataclass(frozen=True)
class LinkParams:
    top_k: int = 10
    candidates_k: int = 100
    reranker: str = "mimic"
    explain: bool = False


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
    @torch.inference_mode()
    def encode(self, items: Sequence[MentionInput]) -> MimicFeatures:
        return self.model.encoder.encode([it.text() for it in items], [it.image for it in items])

    def pack(self, feats: MimicFeatures) -> list[bytes]:
        """One float16 blob per mention (the encoding cache's value)."""
        parts = [
            t.reshape(len(feats), -1)
            for t in (feats.text_cls, feats.text_tokens, feats.image_cls, feats.image_tokens)
        ]
        flat = torch.cat(parts, dim=1).to(torch.float16).cpu().numpy()
        return [row.tobytes() for row in flat]

    def unpack(self, blobs: Sequence[bytes]) -> MimicFeatures:
        cfg = self.model.config
        L, dt = cfg.encoder.text_max_length, cfg.mimic.dt
        P, dv = cfg.encoder.num_image_tokens, cfg.encoder.dv
        arr = np.stack([np.frombuffer(b, dtype=np.float16) for b in blobs]).astype(np.float32)
        t = torch.from_numpy(arr).to(self.device)
        sizes = [dt, L * dt, dv, P * dv]
        a, b, c, d = torch.split(t, sizes, dim=1)
        n = len(blobs)
        return MimicFeatures(a, b.reshape(n, L, dt), c, d.reshape(n, P, dv))

    # ------------------------------------------------------------------ link
    @torch.inference_mode()
    def link(
        self,
        feats: MimicFeatures,
        params: Sequence[LinkParams],
    ) -> tuple[list[dict[str, Any]], StageTimes]:
        """Retrieve + rerank for B encoded mentions; one result dict per mention."""
        times = StageTimes()
        t0 = time.perf_counter()
        k_max = max(p.candidates_k for p in params)
        cand = self.searcher.retrieve(feats, k_max)
        times.retrieve = time.perf_counter() - t0
        results: list[dict[str, Any]] = [{} for _ in params]
        groups: dict[tuple[str, int], list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault((p.reranker, p.candidates_k), []).append(i)
        t1 = time.perf_counter()
        for (reranker, k), idx in groups.items():
            rows = cand.rows[idx, :k]
            retr = cand.retrieval[idx, :k]
            sub = Candidates(rows=rows, retrieval=retr)
            if reranker == "mimic":
                sel = torch.tensor(idx, device=self.device)
                scores = self.searcher.rerank(feats.map(lambda t, sel=sel: t[sel]), sub)
                final = scores.score.float().cpu().numpy()
                units = {
                    u: getattr(scores, u).float().cpu().numpy() for u in ("tglu", "vdlu", "cmfu")
                }
            else:
                final, units = retr, {}
            for j, i in enumerate(idx):
                results[i] = self._assemble(
                    rows[j], retr[j], final[j], {u: v[j] for u, v in units.items()}, params[i]
                )
        times.rerank = time.perf_counter() - t1
        return results, times

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
                c["explain"] = {u: float(v[j]) for u, v in units.items()}
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
        self.link(feats, [LinkParams(), LinkParams(reranker="none")])

    def close(self) -> None:
        self.searcher.close()


__all__ = ["RERANKERS", "LinkParams", "Linker", "MentionInput", "StageTimes"]
