"""Rerankers: one small interface, one class per strategy, looked up by name.

A reranker scores each mention's retrieved candidates, ``(B, K)``, and says why in a typed
explanation. The linker owns retrieval and never branches on a reranker's name; a new reranker
is one class here plus a line in :func:`load_rerankers`. MIMIC and DRIN compute exactly what
their released code computes (``models/mimic.py``, ``models/drin.py``); this module only
feeds them the stored entity records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, Protocol

import numpy as np
import torch

from index.encode import NAME_FIELD
from index.search import Candidates, IndexSearcher
from models.drin import EDGE_TYPES
from models.drin_features import DrinReranker as DrinModel
from models.drin_kernel import DrinKernel, EntityTable
from models.fusion import (
    CandidateInfo,
    CandidateSignals,
    FusionModel,
    MentionText,
    candidate_features,
)
from models.lexical import NameTable
from models.model import LinkingModel
from models.onnx_kernel import MimicKernel, TorchKernel
from service.primitives import Explain, MentionBatch

logger = logging.getLogger(__name__)

# DRIN's folded entity table (DrinGraphReranker): the default memory budget, and the rows
# folded at a time while it is built
DRIN_TABLE_MB = 1024.0
TABLE_CHUNK = 16384
# KBs up to this many entities have their candidate names read and analysed at load
# (CandidateInfoReader): half of what the analysis LRU (models.lexical.ANALYSED) keeps
INFO_PRELOAD = 1 << 15


class Explanation(Protocol):
    """Per-candidate reasons behind a score, for ``explain=true``."""

    def of(self, b: int, k: int) -> Explain:
        """The explanation of mention ``b``'s ``k``-th candidate (retrieval order)."""
        ...


@dataclass(frozen=True)
class UnitScores:
    """MIMIC's per-unit scores, each ``(B, K)``: TGLU, VDLU, CMFU (their sum is the score)."""

    tglu: np.ndarray
    vdlu: np.ndarray
    cmfu: np.ndarray

    def of(self, b: int, k: int) -> Explain:
        return {
            "tglu": float(self.tglu[b, k]),
            "vdlu": float(self.vdlu[b, k]),
            "cmfu": float(self.cmfu[b, k]),
        }


class EdgeWeights:
    """DRIN's edge weights before and after the graph layers, each ``(B, K, 4)`` in
    ``EDGE_TYPES`` order (tt, ti, it, ii). The rerank computes the scores alone; ``final``
    runs the whole graph the first time an explanation asks for it."""

    def __init__(self, initial: np.ndarray, final: Callable[[], np.ndarray]) -> None:
        self.initial = initial
        self._final = final
        self._final_edges: np.ndarray | None = None

    @property
    def final(self) -> np.ndarray:
        if self._final_edges is None:
            self._final_edges = self._final()
        return self._final_edges

    def of(self, b: int, k: int) -> Explain:
        return {
            "edges_initial": dict(zip(EDGE_TYPES, map(float, self.initial[b, k]), strict=True)),
            "edges_final": dict(zip(EDGE_TYPES, map(float, self.final[b, k]), strict=True)),
        }


@dataclass(frozen=True)
class RerankOutput:
    """scores: ``(B, K)`` float, higher is better; explanation: None when there is none;
    answer_confidence: ``(B,)`` probability that each list's best candidate is right (a
    reranker with a NIL verifier: fusion), else None; in_list: ``(B,)`` probability that the
    mention's entity is among the candidates (a verifier that estimates it), else None."""

    scores: np.ndarray
    explanation: Explanation | None = None
    answer_confidence: np.ndarray | None = None
    in_list: np.ndarray | None = None


class Reranker(Protocol):
    """Scores B mentions against their own K retrieved candidates. ``uses_lexical``: it
    wants the lexical channel's candidates merged into the dense ones."""

    name: ClassVar[str]
    uses_lexical: ClassVar[bool]

    def rerank(self, batch: MentionBatch, candidates: Candidates) -> RerankOutput: ...


class RetrievalOnly:
    """``none``: the FAISS inner product, unchanged."""

    name: ClassVar[str] = "none"
    uses_lexical: ClassVar[bool] = False

    def rerank(self, batch: MentionBatch, candidates: Candidates) -> RerankOutput:
        return RerankOutput(np.asarray(candidates.retrieval, dtype=np.float32))


class MimicReranker:
    """``mimic``: MIMIC's three units over the candidates' precomputed store records, through
    the batched serving kernel: ``models.rerank_kernel`` in torch, or its onnxruntime graph
    (``models.onnx_kernel``); both the scores of ``MimicMatcher.score_precomputed`` within
    float rounding. A kernel exported for the index's codecs gets the records as stored
    (gathered, not decoded: ``IndexSearcher.stored_records``) and decodes them itself."""

    name: ClassVar[str] = "mimic"
    uses_lexical: ClassVar[bool] = False

    def __init__(
        self, model: LinkingModel, searcher: IndexSearcher, kernel: MimicKernel | None = None
    ) -> None:
        self.model, self.searcher = model, searcher
        self.device = next(model.parameters()).device
        self.kernel = kernel if kernel is not None else TorchKernel(model.matcher)

    @torch.inference_mode()
    def rerank(self, batch: MentionBatch, candidates: Candidates) -> RerankOutput:
        rows = candidates.rows
        image_rows = self.searcher.image_rows(rows)  # None: a version 1 store
        # image record 0 is the no-image one: their VDLU once per mention
        no_image = (
            torch.from_numpy(image_rows == 0).to(self.device) if image_rows is not None else None
        )
        # a kernel that decodes the store's codes itself gets them as stored (a gather of a
        # quarter of the bytes, no numpy decode); live rows, or another kernel, float32 records
        stored = (
            self.searcher.stored_records(rows)
            if self.kernel.codecs is not None and self.kernel.codecs == self.searcher.record_codecs
            else None
        )
        if stored is not None:
            s = self.kernel.score_stored(batch.encoded.mimic, stored, no_image)
        else:
            records = self.searcher.records(rows).map(lambda t: t.to(self.device))
            s = self.kernel(batch.encoded.mimic, records, no_image)

        def np_(t: torch.Tensor) -> np.ndarray:
            return t.float().cpu().numpy()

        return RerankOutput(np_(s.score), UnitScores(np_(s.tglu), np_(s.vdlu), np_(s.cmfu)))


class DrinGraphReranker:
    """``drin``: DRIN's dynamic graph over each mention's candidates (stored entity parts).
    Scores through :class:`models.drin_kernel.DrinKernel` (the graph's scores with the first
    layer's entity products folded, each distinct image once), or ``kernel`` (its scores as
    one onnxruntime graph: ``models.onnx_drin_kernel``); with the base KB's products folded
    at load into an :class:`EntityTable` when they fit ``table_mb``, a request only gathers
    them. An explanation's final edges run the graph as released."""

    name: ClassVar[str] = "drin"
    uses_lexical: ClassVar[bool] = False

    def __init__(
        self,
        drin: DrinModel,
        searcher: IndexSearcher,
        table_mb: float = DRIN_TABLE_MB,
        kernel: DrinKernel | None = None,
    ) -> None:
        if not searcher.has_drin:
            raise ValueError(
                f"a DRIN model is configured but the index {searcher.folder} was built "
                f"with --no-drin (it holds no DRIN entity parts)"
            )
        self.drin, self.searcher = drin, searcher
        self.device = next(drin.parameters()).device
        self.kernel = kernel if kernel is not None else DrinKernel(drin)
        if self.kernel.reranker is not drin:
            raise ValueError("the DRIN kernel was built for another DRIN model")
        self.table = self._entity_table(table_mb)

    def _entity_table(self, table_mb: float) -> EntityTable | None:
        """The base KB's first-layer entity products, folded now when they fit ``table_mb``
        (a store with an image table only): a request then reads them instead of folding its
        candidates. Rows added live since the base are folded per request."""
        store, m = self.searcher.store, self.searcher.manifest
        if store.image_rows is None:
            return None
        cfg = self.drin.config.drin
        n, images = m.entity_count, m.image_count
        nbytes = EntityTable.nbytes_for(n, images, cfg.hidden, cfg.text_dim)
        if nbytes > table_mb * 2**20:
            logger.info(
                "DRIN entity table: %d rows + %d images need %.0f MB > MEL_DRIN_TABLE_MB=%g: "
                "folded per request",
                n,
                images,
                nbytes / 2**20,
                table_mb,
            )
            return None
        t0 = time.perf_counter()

        def chunks(field: str, count: int) -> Iterator[torch.Tensor]:
            for s in range(0, count, TABLE_CHUNK):
                rows = np.arange(s, min(count, s + TABLE_CHUNK))
                yield torch.from_numpy(store.fields[field].take(rows)).to(self.device)

        table = self.kernel.entity_table(chunks("drin_text", n), chunks("drin_image", images))
        logger.info(
            "DRIN entity table: %d rows + %d images, %.1f MB, folded in %.2f s",
            n,
            images,
            nbytes / 2**20,
            time.perf_counter() - t0,
        )
        return table

    @torch.inference_mode()
    def rerank(self, batch: MentionBatch, candidates: Candidates) -> RerankOutput:
        mentions = batch.encoded
        if mentions.drin is None:
            raise ValueError("mentions were encoded without DRIN parts")
        rows = candidates.rows
        ents = self.searcher.drin_parts(rows).map(lambda t: t.to(self.device))
        valid = torch.from_numpy(rows >= 0).to(self.device)
        # all candidates valid (the usual case): the released plain mean over candidates
        mask = None if bool(valid.all()) else valid
        image_rows = self.searcher.image_rows(rows)  # equal rows share the image parts
        groups = None if image_rows is None else torch.from_numpy(image_rows).to(self.device)
        drin_parts = mentions.drin
        scores, edges_initial = self.kernel(
            drin_parts, ents, mask, groups, torch.from_numpy(rows).to(self.device), self.table
        )

        def np_(t: torch.Tensor) -> np.ndarray:
            return t.float().cpu().numpy()

        @torch.inference_mode()
        def final() -> np.ndarray:  # only an explain request pays for the last layer's edges
            edges = self.drin(drin_parts, ents, mask).edges_final
            assert edges is not None
            return np_(edges)

        return RerankOutput(np_(scores), EdgeWeights(np_(edges_initial), final))


@dataclass(frozen=True)
class FeatureContributions:
    """The fusion ranker's features ``(B, K, F)`` and how much each moved the score (the
    trees' additive SHAP values, computed for the candidates that are returned)."""

    features: np.ndarray
    model: FusionModel

    def of(self, b: int, k: int) -> Explain:
        x = self.features[b, k][None, :]
        contrib = self.model.contributions(x)[0]
        names = self.model.config.features
        values = self.model.select(x)[0]
        return {
            "bias": float(contrib[-1]),
            "contributions": {n: float(c) for n, c in zip(names, contrib[:-1], strict=True)},
            "values": {n: float(v) for n, v in zip(names, values, strict=True) if not np.isnan(v)},
        }


class CandidateInfoReader:
    """What the store says of a candidate (id, name and aliases, popularity) for the string
    features, with an LRU in front: the same entities come back request after request, and a
    metadata read is a JSON parse.

    ``preload``: a base KB of at most that many entities is read whole when the reader is
    made, and every name and alias analysed then into a :class:`models.lexical.NameTable`
    (``table``), so no request pays a first sight of a name (8 us each) and the string
    features of a list are array operations; a larger KB, and rows added live, go through the
    LRU and the per-name string features as they come."""

    def __init__(
        self, searcher: IndexSearcher, size: int = 200_000, preload: int = INFO_PRELOAD
    ) -> None:
        self.searcher = searcher
        self.one = lru_cache(maxsize=size)(self._read)
        self.loaded: dict[int, CandidateInfo] = {}
        self.table: NameTable | None = None  # the preloaded rows' names, analysed into arrays
        n = searcher.manifest.entity_count
        if 0 < n <= preload:
            t0 = time.perf_counter()
            self.loaded = {row: self._read(row) for row in range(n)}
            self.table = NameTable.build([self.loaded[row].names for row in range(n)])
            logger.info(
                "candidate names: %d entities, %d names analysed at load in %.2f s",
                n,
                len(self.table.norm_strings),
                time.perf_counter() - t0,
            )

    def _read(self, row: int) -> CandidateInfo:
        e = self.searcher.entity(row)
        return CandidateInfo(e["id"], (e["name"], *e.get("aliases", ())), e.get("popularity"))

    def __call__(self, rows: np.ndarray) -> list[list[CandidateInfo | None]]:
        """Per list, per candidate (padding rows < 0 get None)."""
        loaded, one = self.loaded, self.one
        return [
            [(loaded.get(r) or one(r)) if r >= 0 else None for r in map(int, line)] for line in rows
        ]


def fusion_signals(
    batch: MentionBatch,
    candidates: Candidates,
    searcher: IndexSearcher,
    mimic: MimicReranker,
    drin: DrinGraphReranker | None,
    info: CandidateInfoReader | None = None,
) -> CandidateSignals:
    """Everything the fusion features read, from the stages before it: MIMIC's (and DRIN's)
    scores over the candidates, the retrieval channels' scores, the zero-shot cosine of the
    mention string with each stored name vector, and the candidates' names."""
    rows = candidates.rows
    m = mimic.rerank(batch, candidates)
    assert isinstance(m.explanation, UnitScores)
    u = m.explanation
    d = drin.rerank(batch, candidates).scores if drin is not None else None
    surface = batch.encoded.surface
    if surface is None:
        raise ValueError("mentions were encoded without their surface feature (fusion)")
    flat = np.where(rows < 0, 0, rows).reshape(-1)
    names = searcher.store.rows(NAME_FIELD, flat).reshape(*rows.shape, -1)
    name_cos = np.einsum("bd,bkd->bk", surface.float().cpu().numpy(), names)
    return CandidateSignals(
        rows=rows,
        dense=np.asarray(candidates.retrieval, dtype=np.float32),
        from_dense=candidates.from_dense,
        from_lexical=candidates.from_lexical,
        lexical=candidates.lexical,
        mimic=np.stack([m.scores, u.tglu, u.vdlu, u.cmfu], axis=-1).astype(np.float32),
        drin=d,
        name_cos=name_cos.astype(np.float32),
        info=(info or CandidateInfoReader(searcher))(rows),
    )


class FusionReranker:
    """``fusion``: the learned ranker over MIMIC (and DRIN) scores, retrieval scores, string
    features and priors (``models/fusion.py``), on the dense + lexical candidates."""

    name: ClassVar[str] = "fusion"
    uses_lexical: ClassVar[bool] = True

    def __init__(
        self,
        fusion: FusionModel,
        searcher: IndexSearcher,
        mimic: MimicReranker,
        drin: DrinGraphReranker | None,
    ) -> None:
        if NAME_FIELD not in searcher.manifest.store_fields:
            raise ValueError(
                f"the index {searcher.folder} has no {NAME_FIELD} field (built before the "
                "fusion stage existed): rebuild it with mel-index build"
            )
        wants_drin = any(f.startswith("drin") for f in fusion.config.features)
        if wants_drin and drin is None:
            raise ValueError("the fusion model reads DRIN scores: serve it with a DRIN model")
        self.fusion, self.searcher, self.mimic = fusion, searcher, mimic
        self.drin = drin if wants_drin else None
        self.info = CandidateInfoReader(searcher)

    def rerank(self, batch: MentionBatch, candidates: Candidates) -> RerankOutput:
        sig = fusion_signals(batch, candidates, self.searcher, self.mimic, self.drin, self.info)
        texts = [MentionText(it.mention, it.sentence, it.span) for it in batch.inputs]
        x = candidate_features(texts, sig, self.fusion.prior, table=self.info.table)
        scores = self.fusion.score(x)
        verdict = None
        cal = self.fusion.calibration(self.name)
        if cal is not None and self.fusion.verifier is not None:
            valid = candidates.rows >= 0
            verdict = self.fusion.verify(
                scores, cal.probabilities(scores, valid), x, valid, texts, sig.info
            )
        return RerankOutput(
            scores,
            FeatureContributions(x, self.fusion),
            verdict.answer if verdict is not None else None,
            verdict.in_list if verdict is not None else None,
        )


def load_rerankers(
    model: LinkingModel,
    searcher: IndexSearcher,
    drin: DrinModel | None = None,
    fusion: FusionModel | None = None,
    kernel: MimicKernel | None = None,
    drin_table_mb: float = DRIN_TABLE_MB,
    drin_kernel: DrinKernel | None = None,
) -> dict[str, Reranker]:
    """The rerankers this server offers, by name, in the order ``/readyz`` lists them
    (``kernel``: how MIMIC's scores are computed, None: the torch kernel; ``drin_table_mb``:
    the memory DRIN's folded entity table may take, :class:`DrinGraphReranker`;
    ``drin_kernel``: how DRIN's scores are computed, None: the torch kernel)."""
    mimic = MimicReranker(model, searcher, kernel)
    graph = (
        DrinGraphReranker(drin, searcher, drin_table_mb, drin_kernel) if drin is not None else None
    )
    out: list[Reranker] = []
    if fusion is not None:
        out.append(FusionReranker(fusion, searcher, mimic, graph))
    out.append(mimic)
    if graph is not None:
        out.append(graph)
    out.append(RetrievalOnly())
    return {r.name: r for r in out}


__all__ = [
    "CandidateInfoReader",
    "DrinGraphReranker",
    "EdgeWeights",
    "Explanation",
    "FeatureContributions",
    "FusionReranker",
    "MimicReranker",
    "RerankOutput",
    "Reranker",
    "RetrievalOnly",
    "UnitScores",
    "fusion_signals",
    "load_rerankers",
]
