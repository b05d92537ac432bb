"""Rerankers: one small interface, one class per strategy, looked up by name.

A reranker scores each mention's retrieved candidates, ``(B, K)``, and says why in a typed
explanation. The linker owns retrieval and never branches on a reranker's name; a new reranker
is one class here plus a line in :func:`load_rerankers`. MIMIC and DRIN compute exactly what
their released code computes (``models/mimic.py``, ``models/drin.py``); this module only
feeds them the stored entity records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch

from index.search import Candidates, IndexSearcher
from models.drin import EDGE_TYPES
from models.drin_features import DrinReranker as DrinModel
from models.model import LinkingModel
from service.primitives import EncodedMentions, Explain


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


@dataclass(frozen=True)
class EdgeWeights:
    """DRIN's edge weights before and after the graph layers, each ``(B, K, 4)`` in
    ``EDGE_TYPES`` order (tt, ti, it, ii)."""

    initial: np.ndarray
    final: np.ndarray

    def of(self, b: int, k: int) -> Explain:
        return {
            "edges_initial": dict(zip(EDGE_TYPES, map(float, self.initial[b, k]), strict=True)),
            "edges_final": dict(zip(EDGE_TYPES, map(float, self.final[b, k]), strict=True)),
        }


@dataclass(frozen=True)
class RerankOutput:
    """scores: ``(B, K)`` float, higher is better; explanation: None when there is none."""

    scores: np.ndarray
    explanation: Explanation | None = None


class Reranker(Protocol):
    """Scores B mentions against their own K retrieved candidates."""

    name: ClassVar[str]

    def rerank(self, mentions: EncodedMentions, candidates: Candidates) -> RerankOutput: ...


class RetrievalOnly:
    """``none``: the FAISS inner product, unchanged."""

    name: ClassVar[str] = "none"

    def rerank(self, mentions: EncodedMentions, candidates: Candidates) -> RerankOutput:
        return RerankOutput(np.asarray(candidates.retrieval, dtype=np.float32))


class MimicReranker:
    """``mimic``: MIMIC's three units over the candidates' precomputed store records."""

    name: ClassVar[str] = "mimic"

    def __init__(self, model: LinkingModel, searcher: IndexSearcher) -> None:
        self.model, self.searcher = model, searcher
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def rerank(self, mentions: EncodedMentions, candidates: Candidates) -> RerankOutput:
        records = self.searcher.records(candidates.rows).map(lambda t: t.to(self.device))
        s = self.model.matcher.score_precomputed(mentions.mimic, records)

        def np_(t: torch.Tensor) -> np.ndarray:
            return t.float().cpu().numpy()

        return RerankOutput(np_(s.score), UnitScores(np_(s.tglu), np_(s.vdlu), np_(s.cmfu)))


class DrinGraphReranker:
    """``drin``: DRIN's dynamic graph over each mention's candidates (stored entity parts)."""

    name: ClassVar[str] = "drin"

    def __init__(self, drin: DrinModel, searcher: IndexSearcher) -> None:
        if not searcher.has_drin:
            raise ValueError(
                f"a DRIN model is configured but the index {searcher.folder} was built "
                f"with --no-drin (it holds no DRIN entity parts)"
            )
        self.drin, self.searcher = drin, searcher
        self.device = next(drin.parameters()).device

    @torch.inference_mode()
    def rerank(self, mentions: EncodedMentions, candidates: Candidates) -> RerankOutput:
        if mentions.drin is None:
            raise ValueError("mentions were encoded without DRIN parts")
        rows = candidates.rows
        ents = self.searcher.drin_parts(rows).map(lambda t: t.to(self.device))
        valid = torch.from_numpy(rows >= 0).to(self.device)
        # all candidates valid (the usual case): the released plain mean over candidates
        out = self.drin(mentions.drin, ents, None if bool(valid.all()) else valid)

        def np_(t: torch.Tensor) -> np.ndarray:
            return t.float().cpu().numpy()

        return RerankOutput(
            np_(out.scores), EdgeWeights(np_(out.edges_initial), np_(out.edges_final))
        )


def load_rerankers(
    model: LinkingModel, searcher: IndexSearcher, drin: DrinModel | None = None
) -> dict[str, Reranker]:
    """The rerankers this server offers, by name, in the order ``/readyz`` lists them."""
    out: list[Reranker] = [MimicReranker(model, searcher)]
    if drin is not None:
        out.append(DrinGraphReranker(drin, searcher))
    out.append(RetrievalOnly())
    return {r.name: r for r in out}


__all__ = [
    "DrinGraphReranker",
    "EdgeWeights",
    "Explanation",
    "MimicReranker",
    "RerankOutput",
    "Reranker",
    "RetrievalOnly",
    "UnitScores",
    "load_rerankers",
]
