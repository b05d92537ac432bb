"""The linker: model, index and rerankers loaded once; encode -> retrieve -> rerank.

Pure synchronous model work (no HTTP, no asyncio): the batcher runs it on a worker thread.
Retrieval is the model's query vector searched in the index; reranking is whichever
:class:`~service.rerankers.Reranker` each mention asked for, looked up by name.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from PIL import Image

from index.live import LiveSearcher
from index.search import Candidates
from index.shards import SHARD_FILE
from models.device import resolve_device
from models.drin_features import (
    MENTION_REGIONS,
    DrinMentionParts,
    check_compatible,
    mention_parts,
    span_token_mask,
)
from models.drin_features import DrinReranker as DrinModel
from models.fusion import Calibration, FusionModel
from models.fusion import check_compatible as check_fusion
from models.mimic import MimicFeatures
from models.model import LinkingModel
from models.onnx_drin_kernel import load_drin_kernel
from models.onnx_encoders import default_cache_dir, resolve_runtime, use_runtime
from models.onnx_kernel import load_kernel
from models.threads import configure_threads, pin_numpy_blas
from models.towers import TowerRunner
from service.primitives import (
    CandidateResult,
    EncodedMentions,
    LinkParams,
    LinkResult,
    LinkTimes,
    MentionBatch,
    MentionInput,
)
from service.rerankers import Reranker, RerankOutput, load_rerankers
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)


class Linker:
    """Everything the server needs to answer a link request, loaded once."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.threads = configure_threads(settings.intra_op_threads, settings.thread_reserve)
        pin_numpy_blas(1)  # its pool's spinning threads cost a one-mention link more than it saves
        # FAISS's OpenMP searches too: several model workers each searching with every core
        # would oversubscribe them
        faiss.omp_set_num_threads(self.threads)
        # a batch's image tower beside its text tower when a core of the planned budget is
        # free (models/towers.py); the budget is every worker's threads
        workers = settings.model_workers or 1
        budget = TowerRunner(workers * self.threads, self.threads)
        self.towers: TowerRunner | None = (
            budget
            if settings.towers_beside and self.device.type == "cpu" and budget.enabled
            else None
        )
        if self.towers is None:
            budget.close()
        t0 = time.perf_counter()
        self.model = LinkingModel.from_pretrained(settings.model_path).to(self.device).eval()
        self.fingerprint = self.model.fingerprint()
        self.encoder_runtime = resolve_runtime(
            settings.encoder_runtime, self.model.config.encoder.backend
        )
        self.searcher = LiveSearcher(
            settings.index_path,
            self.fingerprint,
            use_gpu=settings.use_faiss_gpu,
            ef_search=settings.hnsw_ef_search,
            nprobe=settings.ivf_nprobe,
            refine=settings.refine_k,
            encoder_runtime=self.encoder_runtime,
        )
        # after the index check, so a mismatch is refused before any export work
        use_runtime(
            self.model.encoder,
            self.encoder_runtime,
            default_cache_dir(settings.model_path, settings.onnx_cache),
            self.threads,
            self.device,
        )
        m = self.searcher.manifest
        self.index_version = self.searcher.base_version  # live updates add ".<segment>"
        self.drin: DrinModel | None = None
        self.drin_fingerprint: str | None = None
        if settings.drin_model_path:
            self.drin = DrinModel.from_pretrained(settings.drin_model_path).to(self.device)
            check_compatible(self.drin, self.model)
            self.drin_fingerprint = self.drin.fingerprint()
        self.fusion: FusionModel | None = None
        self.fusion_fingerprint: str | None = None
        if settings.fusion_model_path:
            self.fusion = FusionModel.from_pretrained(settings.fusion_model_path)
            check_fusion(self.fusion, self.fingerprint, self.drin_fingerprint)
            self.fusion.use_tree_runtime(
                settings.fusion_trees,
                default_cache_dir(settings.model_path, settings.onnx_cache),
            )
            if not self.searcher.has_lexical:
                raise ValueError(
                    f"the fusion model merges lexical candidates but the index "
                    f"{settings.index_path} has no lexical channel (mel-index lexical)"
                )
            self.fusion_fingerprint = self.fusion.fingerprint()
        self.kernel = load_kernel(
            self.model.matcher,
            settings.kernel_runtime,
            default_cache_dir(settings.model_path, settings.onnx_cache),
            self.threads,
            self.device,
            codecs=self.searcher.record_codecs,
        )
        self.drin_kernel = (
            load_drin_kernel(
                self.drin,
                settings.kernel_runtime,
                default_cache_dir(settings.model_path, settings.onnx_cache),
                self.threads,
            )
            if self.drin is not None
            else None
        )
        self.rerankers: dict[str, Reranker] = load_rerankers(
            self.model,
            self.searcher,
            self.drin,
            self.fusion,
            self.kernel,
            settings.drin_table_mb,
            self.drin_kernel,
        )
        # calibrated confidences, per reranker, when a fusion model brought them
        self.calibrations: dict[str, Calibration] = {}
        if self.fusion is not None:
            for name in self.rerankers:
                cal = self.fusion.calibration(name)
                if cal is not None:
                    self.calibrations[name] = cal
        self.lexical_k = (
            settings.lexical_k
            if settings.lexical_k is not None
            else (self.fusion.config.lexical_k if self.fusion is not None else 0)
        )
        self.nil_threshold = (
            settings.nil_threshold
            if settings.nil_threshold is not None
            else (self.fusion.config.nil_threshold if self.fusion is not None else None)
        )
        logger.info(
            "linker ready in %.1fs: model %s, index %s (%d entities, %s) on %s, encoder "
            "runtime %s, kernel %s, %d threads, image tower %s",
            time.perf_counter() - t0,
            self.fingerprint,
            self.index_version,
            len(self.searcher),
            m.factory,
            self.device,
            self.encoder_runtime,
            self.kernel.runtime,
            self.threads,
            "beside the text tower when a core is free" if self.towers else "after the text tower",
        )

    @property
    def drin_table_rows(self) -> int | None:
        """Base rows in the DRIN reranker's folded entity table (None: no DRIN or no table)."""
        drin = self.rerankers.get("drin")
        table = getattr(drin, "table", None)
        return None if table is None else int(table.text.shape[0])

    @property
    def cache_version(self) -> str:
        """Identity of everything a cached encoding or result depends on."""
        return (
            f"{self.fingerprint}:{self.drin_fingerprint or '-'}:"
            f"{self.fusion_fingerprint or '-'}:{self.index_version}:{self.encoder_runtime}"
        )

    @property
    def default_reranker(self) -> str:
        """What a request that names no reranker gets: the setting, else fusion when it is
        loaded (it is the most accurate here), else MIMIC."""
        wanted = self.settings.default_reranker
        if wanted is not None:
            return wanted
        return "fusion" if "fusion" in self.rerankers else "mimic"

    # ------------------------------------------------------------------ encoding
    @torch.inference_mode()
    def encode(self, items: Sequence[MentionInput], beside: bool = True) -> EncodedMentions:
        """The items' features. ``beside``: the image tower may run beside the text tower when
        the tower budget has a free core (False: the caller knows every core is taken, e.g.
        the batcher starting a batch on every worker at once)."""
        enc = self.model.encoder
        texts = [it.text() for it in items]
        images = [it.model_image() for it in items]
        if self.towers is not None:
            text, image = self.towers.run(
                lambda: enc.text_features(texts),
                lambda: enc.image_features(images),
                beside=beside and any(im is not None for im in images),
            )
        else:
            text, image = enc.text_features(texts), enc.image_features(images)
        mimic = enc.project(text, image)
        surface = None
        if self.fusion is not None:  # the mention's vector of the zero-shot name cosine
            surface = self.zero_shot_vectors(items, text.tokens, self.fusion.config.zero_shot)
        if self.drin is None:
            return EncodedMentions(mimic, None, surface)
        backbone = enc.backbone
        mask = span_token_mask(
            backbone.tokenizer,
            [it.mention for it in items],
            [it.sentence for it in items],
            [it.span for it in items],
        )
        has_image = torch.tensor([it.image is not None for it in items], device=self.device)
        drin = mention_parts(backbone, text, image, mask, has_image)
        return EncodedMentions(mimic, drin, surface)

    def zero_shot_vectors(
        self, items: Sequence[MentionInput], text_tokens: torch.Tensor, source: str
    ) -> torch.Tensor:
        """(B, dt) mention vectors of the zero-shot name cosine (``models.fusion.ZERO_SHOT_SOURCES``):
        from the mention-text pass's token states (``mention_pass``, no encoder work) or the
        mention string encoded alone (``surface``, what models trained before it read)."""
        enc = self.model.encoder
        mentions = [it.mention for it in items]
        if source == "surface":
            return enc.surface_features(mentions)
        return enc.lead_features(text_tokens, mentions)

    def _layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """(field, per-mention shape) of a cache blob, in order: MIMIC's, then DRIN's."""
        cfg = self.model.config
        L, dt = cfg.encoder.text_max_length, cfg.mimic.dt
        P, dv = cfg.encoder.num_image_tokens, cfg.encoder.dv
        out: list[tuple[str, tuple[int, ...]]] = [
            ("text_cls", (dt,)),
            ("text_tokens", (L, dt)),
            ("image_cls", (dv,)),
            ("image_tokens", (P, dv)),
        ]
        if self.drin is not None:
            d = self.drin.config
            R = min(MENTION_REGIONS, cfg.encoder.num_image_tokens)
            out += [
                ("span_text", (d.drin.text_dim,)),
                ("text", (d.drin.text_dim,)),
                ("image", (d.drin.image_dim,)),
                ("regions", (R, d.region_dim)),
                ("region_scores", (R,)),
            ]
        if self.fusion is not None:
            out.append(("surface", (cfg.encoder.text_dim,)))
        return out

    def pack(self, feats: EncodedMentions) -> list[bytes]:
        """One float16 blob per mention (the encoding cache's value)."""
        n = len(feats)
        tensors = {**vars(feats.mimic), **(vars(feats.drin) if feats.drin is not None else {})}
        if feats.surface is not None:
            tensors["surface"] = feats.surface
        parts = [tensors[name].reshape(n, -1) for name, _ in self._layout()]
        flat = torch.cat(parts, dim=1).to(torch.float16).cpu().numpy()
        return [row.tobytes() for row in flat]

    def unpack(self, blobs: Sequence[bytes]) -> EncodedMentions:
        """The inverse of :meth:`pack` (to float16 precision), on the serving device."""
        layout = self._layout()
        arr = np.stack([np.frombuffer(b, dtype=np.float16) for b in blobs]).astype(np.float32)
        t = torch.from_numpy(arr).to(self.device)
        n = len(blobs)
        sizes = [int(np.prod(shape)) for _, shape in layout]
        pieces = {
            name: x.reshape(n, *shape)
            for (name, shape), x in zip(layout, torch.split(t, sizes, dim=1), strict=True)
        }
        mimic = MimicFeatures(*(pieces[f] for f in MimicFeatures.__dataclass_fields__))
        drin = None
        if self.drin is not None:
            drin = DrinMentionParts(*(pieces[f] for f in DrinMentionParts.__dataclass_fields__))
        return EncodedMentions(mimic, drin, pieces.get("surface"))

    # ------------------------------------------------------------------ link
    @torch.inference_mode()
    def retrieve(
        self, encoded: EncodedMentions, k: int, queries: torch.Tensor | None = None
    ) -> Candidates:
        """The top ``k`` entities of each mention by the model's retrieval vectors
        (``queries``: those vectors when the caller already has them)."""
        if queries is None:
            queries = self.model.matcher.retrieval_queries(encoded.mimic)
        return self.searcher.search(queries.float().cpu().numpy(), k)

    @torch.inference_mode()
    def merge_lexical(
        self,
        batch: MentionBatch,
        dense: Candidates,
        k: int,
        queries: torch.Tensor | None = None,
    ) -> Candidates:
        """The dense lists plus the lexical channel's top ``k`` by name (deduplicated, dense
        first, padded with -1 to ``K + k``). A lexical-only candidate's dense score is
        computed exactly from its stored record, so every candidate has one."""
        if k <= 0 or not self.searcher.has_lexical:
            return dense
        hits = self.searcher.lexical([it.mention for it in batch.inputs], k)
        B, K = dense.rows.shape
        rows = np.full((B, K + k), -1, dtype=np.int64)
        lexical = np.zeros((B, K + k), dtype=np.float32)
        from_lexical = np.zeros((B, K + k), dtype=bool)
        rows[:, :K] = dense.rows
        for b in range(B):
            pos = {r: j for j, r in enumerate(dense.rows[b].tolist()) if r >= 0}
            n = K
            for r, sc in zip(hits.rows[b].tolist(), hits.scores[b].tolist(), strict=True):
                if r < 0:
                    continue
                j = pos.get(r)
                if j is None:
                    j, n = n, n + 1
                    rows[b, j] = r
                lexical[b, j], from_lexical[b, j] = sc, True
        retrieval = np.zeros((B, K + k), dtype=np.float32)
        retrieval[:, :K] = dense.retrieval
        extra = rows[:, K:]
        if (extra >= 0).any():
            # only the two fields a retrieval key is made of, not the whole record
            text_cls, cmfu = (
                t.to(self.device) for t in self.searcher.fields(extra, ("text_cls", "cmfu"))
            )
            keys = self.model.matcher.retrieval_keys_of(text_cls, cmfu)
            q = (
                queries
                if queries is not None
                else self.model.matcher.retrieval_queries(batch.encoded.mimic)
            )
            scores = torch.einsum("bd,bkd->bk", q.float(), keys.float()).cpu().numpy()
            retrieval[:, K:] = np.where(extra >= 0, scores, 0.0)
        from_dense = np.zeros((B, K + k), dtype=bool)
        from_dense[:, :K] = dense.from_dense
        return Candidates(rows, retrieval, from_dense, from_lexical, lexical)

    def link(
        self, batch: MentionBatch, params: Sequence[LinkParams]
    ) -> tuple[list[LinkResult], LinkTimes]:
        """Retrieve + rerank for B mentions; one result per mention, in order."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            queries = self.model.matcher.retrieval_queries(batch.encoded.mimic)
        cand = self.retrieve(batch.encoded, max(p.candidates_k for p in params), queries)
        retrieve = time.perf_counter() - t0
        groups: dict[tuple[str, int], list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault((p.reranker, p.candidates_k), []).append(i)
        results: list[LinkResult | None] = [None] * len(params)
        per: dict[str, float] = {}
        t1 = time.perf_counter()
        for (name, k), idx in groups.items():
            tg = time.perf_counter()
            reranker = self.rerankers[name]
            sub = cand.take(idx, k)
            mentions = batch.select(idx)
            if reranker.uses_lexical:
                sub = self.merge_lexical(mentions, sub, self.lexical_k, queries[idx])
            out = reranker.rerank(mentions, sub)
            cal = self.calibrations.get(name)
            conf = cal.probabilities(out.scores, sub.rows >= 0) if cal is not None else None
            for j, i in enumerate(idx):
                results[i] = self._assemble(sub, j, out, params[i], conf)
            per[name] = per.get(name, 0.0) + time.perf_counter() - tg
        times = LinkTimes(retrieve=retrieve, rerank=time.perf_counter() - t1, per_reranker=per)
        return [r for r in results if r is not None], times

    def _assemble(
        self,
        cand: Candidates,
        j: int,
        out: RerankOutput,
        p: LinkParams,
        confidence: np.ndarray | None,
    ) -> LinkResult:
        """Mention ``j``'s top ``p.top_k`` candidates by score, with their metadata."""
        rows, retr, final = cand.rows[j], cand.retrieval[j], out.scores[j]
        valid = rows >= 0
        order = np.argsort(-np.where(valid, final, -np.inf), kind="stable")[: p.top_k]
        explain = out.explanation if p.explain else None
        cands: list[CandidateResult] = []
        for rank, k in enumerate(order, start=1):
            if not valid[k]:
                break
            meta = self.searcher.entity(int(rows[k]))
            cands.append(
                CandidateResult(
                    entity_id=meta["id"],
                    name=meta["name"],
                    score=float(final[k]),
                    retrieval_score=float(retr[k]),
                    rank=rank,
                    confidence=float(confidence[j, k]) if confidence is not None else None,
                    explain=explain.of(j, int(k)) if explain is not None else None,
                )
            )
        answer = in_kb = None
        if out.answer_confidence is not None and cands:
            answer = float(out.answer_confidence[j])
        if out.in_list is not None and cands:
            in_kb = float(out.in_list[j])
        return LinkResult(
            candidates=tuple(cands),
            nil=self._nil(cands, answer, in_kb),
            reranker=p.reranker,
            answer_confidence=answer,
            in_kb_probability=in_kb,
        )

    def _nil(self, cands: list[CandidateResult], answer: float | None, in_kb: float | None) -> bool:
        """No candidate, or a probability under the NIL threshold: fusion's probability that
        the entity is among the candidates (a verifier trained for it), else its verified
        answer confidence (older fusion models), else the best candidate's confidence (a
        reranker without calibrated confidences compares its raw score)."""
        thr = self.nil_threshold
        if not cands:
            return True
        if thr is None:
            return False
        if in_kb is not None:
            return in_kb < thr
        if answer is not None:
            return answer < thr
        best = cands[0].confidence if cands[0].confidence is not None else cands[0].score
        return best < thr

    def entity(self, entity_id: str) -> dict[str, Any] | None:
        row = self.searcher.row_of(entity_id)
        return None if row is None else {**self.searcher.entity(row), "row": row}

    def image_path(self, entity_id: str) -> Path | None:
        """The file of an entity's first image: an upload (``uploads/...``, relative to the
        index folder) or a KB image (relative to the KB's folder: ``MEL_IMAGE_ROOT``, else the
        one the index job recorded). None when it has none or the file is gone."""
        ent = self.entity(entity_id)
        if ent is None or not ent.get("images"):
            return None
        rel = str(ent["images"][0])
        roots = [self.searcher.folder]
        if self.settings.image_root:
            roots.append(Path(self.settings.image_root))
        shard = self.searcher.folder / SHARD_FILE
        if shard.is_file():
            roots.append(Path(json.loads(shard.read_text())["image_root"]))
        for root in roots:
            path = (root / rel).resolve()
            # never outside its root: an entity's path is data, not a way out of the folder
            if path.is_relative_to(root.resolve()) and path.is_file():
                return path
        return None

    def warmup(self) -> None:
        """One full pass (with and without an image) through every reranker, so first
        requests pay no lazy setup."""
        img = Image.new("RGB", (64, 64), (128, 64, 32))
        items = (
            MentionInput("warm up", "warm up the model", img, "warm"),
            MentionInput("warm up", "warm up the model"),
        )
        feats = self.encode(items)
        names = list(self.rerankers)
        self.link(
            MentionBatch(items * len(names), EncodedMentions.cat([feats] * len(names))),
            [LinkParams(reranker=n) for n in names for _ in range(2)],
        )

    def close(self) -> None:
        self.searcher.close()
        if self.towers is not None:
            self.towers.close()


__all__ = ["Linker"]
