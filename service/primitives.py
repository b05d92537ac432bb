"""Typed values that flow through the request path: route -> LinkService -> batcher -> Linker.

Internal dataclasses (no pydantic, no HTTP): the wire schemas in :mod:`service.schemas` are
built from them at the edge, in one place (:func:`service.pipeline.to_response`).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from models.drin_features import DrinMentionParts
from models.mimic import MimicFeatures
from models.preprocess import ModelImage, mention_text

Explain = dict[str, float | dict[str, float]]


@dataclass(frozen=True)
class MentionInput:
    """One decoded mention. ``image_sha`` identifies the image bytes (cache keys).

    ``pixels``: ``image`` through the encoder's transform (``MimicEncoder.pixels``), when the
    caller ran it on its own thread (the server's decode threads when the image tower runs
    after the text tower; ``mel-link``'s reader); the model then skips the resize. It belongs
    to one encoder: drop it before handing the item to another.
    """

    mention: str
    sentence: str
    image: Image.Image | None = None
    image_sha: str | None = None
    span: tuple[int, int] | None = None  # char offsets of the mention in the sentence (DRIN)
    pixels: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def model_image(self) -> ModelImage | None:
        """What the encoder reads: the pixels when ready, else the decoded image."""
        return self.pixels if self.pixels is not None else self.image

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
    """What a request asks of the linker (validated against the settings' bounds)."""

    top_k: int = 10
    candidates_k: int = 100
    reranker: str = "mimic"
    explain: bool = False


@dataclass(frozen=True)
class EncodedMentions:
    """What a request's mentions are encoded into once (and cached): MIMIC's features, DRIN's
    mention parts when the server has a DRIN reranker, and the mention string's own text
    feature (``surface``, (B, dt)) when it has a fusion model. Every tensor is ``(B, ...)``."""

    mimic: MimicFeatures
    drin: DrinMentionParts | None = None
    surface: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.mimic)

    def select(self, idx: Sequence[int]) -> EncodedMentions:
        sel = torch.tensor(list(idx), dtype=torch.long, device=self.mimic.text_cls.device)
        return EncodedMentions(
            self.mimic.map(lambda t: t[sel]),
            self.drin.map(lambda t: t[sel]) if self.drin is not None else None,
            self.surface[sel] if self.surface is not None else None,
        )

    @staticmethod
    def cat(parts: Sequence[EncodedMentions]) -> EncodedMentions:
        def cat_fields(objs: Sequence[Any]) -> list[torch.Tensor]:
            names = list(objs[0].__dataclass_fields__)
            return [torch.cat([getattr(o, n) for o in objs]) for n in names]

        drin = [p.drin for p in parts]
        surface = [p.surface for p in parts]
        return EncodedMentions(
            MimicFeatures(*cat_fields([p.mimic for p in parts])),
            DrinMentionParts(*cat_fields(drin)) if all(d is not None for d in drin) else None,
            torch.cat(surface) if all(x is not None for x in surface) else None,  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class MentionBatch:
    """B mentions as a reranker sees them: their words and their encodings, in one order."""

    inputs: tuple[MentionInput, ...]
    encoded: EncodedMentions

    def __len__(self) -> int:
        return len(self.inputs)

    def select(self, idx: Sequence[int]) -> MentionBatch:
        return MentionBatch(tuple(self.inputs[i] for i in idx), self.encoded.select(idx))


@dataclass(frozen=True)
class CandidateResult:
    """One ranked entity of an answer."""

    entity_id: str
    name: str
    score: float  # the reranker's score (retrieval's for reranker=none)
    retrieval_score: float  # the FAISS inner product
    rank: int  # 1-based
    confidence: float | None = None  # calibrated P(this is the right entity), when known
    explain: Explain | None = None


@dataclass(frozen=True)
class LinkResult:
    """The linker's answer for one mention."""

    candidates: tuple[CandidateResult, ...]
    nil: bool
    reranker: str
    answer_confidence: float | None = None  # P(the first candidate is right), NIL-aware
    in_kb_probability: float | None = None  # P(the entity is among the candidates)


@dataclass(frozen=True)
class LinkTimes:
    """Seconds the linker spent on one batch: retrieval, reranking, and per reranker."""

    retrieve: float = 0.0
    rerank: float = 0.0
    per_reranker: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchTimes:
    """Milliseconds of one model batch, shared by its mentions."""

    encode_ms: float
    retrieve_ms: float
    rerank_ms: float
    batch_size: int
    finished: float  # time.perf_counter() when the batch's model work ended

    @property
    def work_ms(self) -> float:
        return self.encode_ms + self.retrieve_ms + self.rerank_ms


@dataclass(frozen=True)
class LinkedMention:
    """What the batcher hands back to a request: the answer and how long each stage took."""

    result: LinkResult
    times: BatchTimes
    queue_ms: float  # waiting before the batch's model work started


@dataclass
class LinkJob:
    """A queued mention that carries its own future (infinity's habit): the batcher completes
    or fails it; the request awaits it."""

    item: MentionInput
    params: LinkParams
    future: asyncio.Future[LinkedMention]
    enqueued: float = field(default_factory=time.perf_counter)

    def complete(self, result: LinkResult, times: BatchTimes) -> None:
        if not self.future.done():
            waited = max(0.0, 1000 * (times.finished - self.enqueued) - times.work_ms)
            self.future.set_result(LinkedMention(result, times, waited))

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


__all__ = [
    "BatchTimes",
    "CandidateResult",
    "EncodedMentions",
    "Explain",
    "LinkJob",
    "LinkParams",
    "LinkResult",
    "LinkTimes",
    "LinkedMention",
    "MentionBatch",
    "MentionInput",
]
