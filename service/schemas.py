"""Wire schemas (pydantic): what clients send and receive. Internal types stay in models/."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

Reranker = Literal["fusion", "mimic", "drin", "none"]

# Request rules a validator below enforces, each answered 422 with its own error code.
VALIDATION_CODES = frozenset({"empty_mention", "bad_span", "two_images"})


class LinkRequest(BaseModel):
    """One mention to link."""

    model_config = ConfigDict(extra="forbid")

    mention: str = Field(
        ..., min_length=1, description="the mention's surface words", examples=["Jordan"]
    )
    sentence: str = Field(
        ...,
        description="the sentence around the mention",
        examples=["Jordan scored 40 points for the Bulls."],
    )
    span: tuple[int, int] | None = Field(
        None,
        description="[start, end) char offsets of the mention in the sentence (DRIN's mention "
        "vertex); when absent the first case-insensitive occurrence is used",
        examples=[[0, 6]],
    )
    image: str | None = Field(
        None,
        description="base64 image or data:image/...;base64, URI (line breaks, e.g. MIME's "
        "76-column wrapping, are ignored)",
    )
    image_url: str | None = Field(
        None, description="http(s) image URL (when the server allows URL fetching; off by default)"
    )
    top_k: int | None = Field(None, ge=1, description="candidates returned (default 10)")
    candidates_k: int | None = Field(
        None, ge=1, description="retrieved candidates reranked (default 100)"
    )
    reranker: Reranker | None = Field(
        None,
        description="fusion (the learned ranker over every signal), mimic, drin or none "
        "(retrieval only); default: the server's (MEL_DEFAULT_RERANKER; fusion when loaded)",
    )
    explain: bool = Field(
        False,
        description="include why: fusion's per-feature contributions (and values), MIMIC's "
        "per-unit scores (tglu/vdlu/cmfu), or DRIN's initial and final edge weights "
        "(tt/ti/it/ii) per candidate",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        """Rules that need more than one field (settings-dependent bounds are checked by
        ``LinkService.params``, the other half of request validation)."""
        if not self.mention.strip():
            raise PydanticCustomError("empty_mention", "mention is blank")
        if self.image is not None and self.image_url is not None:
            raise PydanticCustomError("two_images", "give image or image_url, not both")
        if self.span is not None:
            a, b = self.span
            if not 0 <= a < b <= len(self.sentence):
                raise PydanticCustomError(
                    "bad_span",
                    "span must be [start, end) char offsets with 0 <= start < end <= "
                    "len(sentence) = {n}",
                    {"n": len(self.sentence)},
                )
        return self


class BatchRequest(BaseModel):
    items: list[dict[str, object]] = Field(
        ..., description="LinkRequest objects; each is validated on its own, a bad one fails alone"
    )


class Candidate(BaseModel):
    entity_id: str
    name: str
    score: float = Field(..., description="final score (the reranker's, or retrieval's)")
    retrieval_score: float = Field(..., description="the FAISS inner product")
    rank: int
    confidence: float | None = Field(
        None,
        description="calibrated probability that this is the right entity (calibrated on dev "
        "by the fusion model's training; null when the server has no fusion model)",
    )
    explain: dict[str, float | dict[str, float]] | None = Field(
        None,
        description="fusion: {bias, contributions: {feature: share of the score}, values: "
        "{feature: value}}; mimic: {tglu, vdlu, cmfu}; drin: {edges_initial: {tt, ti, it, "
        "ii}, edges_final: {...}}",
    )


class Timings(BaseModel):
    decode_ms: float = 0.0
    queue_ms: float = 0.0
    encode_ms: float = 0.0
    retrieve_ms: float = 0.0
    rerank_ms: float = 0.0
    total_ms: float = 0.0
    batch_size: int = 1
    cached: bool = False


class LinkResponse(BaseModel):
    candidates: list[Candidate]
    nil: bool = Field(
        ...,
        description="true when there is no candidate, or a probability is under the NIL "
        "threshold (MEL_NIL_THRESHOLD, or the fusion model's dev-chosen one): "
        "in_kb_probability when given, else answer_confidence, else the best candidate's "
        "confidence",
    )
    answer_confidence: float | None = Field(
        None,
        description="probability that the first candidate is the right entity, allowing for "
        "entities the KB does not hold (fusion's NIL verifier, trained on dev with entities "
        "removed). Null for other rerankers",
    )
    in_kb_probability: float | None = Field(
        None,
        description="probability that the mention's entity is among the candidates, i.e. "
        "that the KB holds it and retrieval found it (fusion models trained since v3); "
        "nil = in_kb_probability < the NIL threshold. Null for other rerankers",
    )
    reranker: str
    model_version: str
    index_version: str
    timings: Timings = Field(default_factory=Timings)


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class BatchItemResult(BaseModel):
    result: LinkResponse | None = None
    error: ErrorBody | None = None


class BatchResponse(BaseModel):
    results: list[BatchItemResult]


class RedisStatus(BaseModel):
    configured: bool
    up: bool | None = Field(None, description="answered a ping just now (when configured)")


class LiveStatus(BaseModel):
    segments: int = Field(..., description="updates committed since the base was built")
    live_entities: int = Field(..., description="entities added or replaced since then")
    tombstones: int = Field(..., description="rows deleted or superseded (mel-index compact)")


class PendingModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    path: str
    state: str = Field(..., description="waiting, training, failed, ... (the job's status.json)")


class Readiness(BaseModel):
    """``/readyz``: 200 when ready, 503 with the same shape while loading or draining."""

    ready: bool
    redis: RedisStatus
    model_version: str | None = None
    index_version: str | None = None
    entities: int | None = None
    rerankers: list[str] | None = Field(None, description="rerankers this server offers")
    drin_version: str | None = None
    fusion_version: str | None = None
    default_reranker: str | None = None
    intra_op_threads: int | None = Field(
        None, description="torch / onnxruntime intra-op threads of each model worker"
    )
    model_workers: int | None = Field(None, description="model threads running batches at once")
    kernel_runtime: str | None = Field(None, description="how the MIMIC kernel runs: torch | onnx")
    drin_kernel_runtime: str | None = Field(
        None, description="how the DRIN kernel runs (with a DRIN model): torch | onnx"
    )
    towers_beside: bool | None = Field(
        None,
        description="whether a batch's image tower may run beside its text tower on a free "
        "core (MEL_TOWERS_BESIDE and the core budget: model_workers x intra_op_threads >= 2 "
        "x intra_op_threads)",
    )
    fusion_trees: str | None = Field(
        None, description="how the fusion trees run: lightgbm | compiled; null: no fusion model"
    )
    drin_table_rows: int | None = Field(
        None,
        description="KB rows whose DRIN first-layer products were folded when the DRIN model "
        "loaded (MEL_DRIN_TABLE_MB); null: no DRIN model, or folded per request",
    )
    live: LiveStatus | None = Field(None, description="live KB updates applied since the build")
    pending: dict[str, PendingModel] = Field(
        {}, description="rerankers configured but still training (loaded once complete)"
    )
    error: str | None = Field(None, description="why loading failed, if it did")
    swap_error: str | None = Field(None, description="why the last hot swap failed, if it did")


class EntityBody(BaseModel):
    """An entity to add or replace (``PUT /v1/admin/entities/{id}``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=1000, examples=["Jo Ames"])
    attributes: str = Field(
        "", max_length=20_000, description="free text, as kb.jsonl's", examples=["Painter."]
    )
    aliases: list[str] = Field([], max_length=100, description="other names it goes by")
    popularity: float | None = Field(None, ge=0, description="any non-negative prior")
    image: str | None = Field(
        None, description="base64 image or data:image/...;base64, URI (its KB image)"
    )


class EntityIn(EntityBody):
    """An entity with its id (``POST /v1/admin/entities``)."""

    id: str = Field(..., min_length=1, max_length=512, examples=["Q42"])


class UpsertRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entities: list[EntityIn] = Field(..., min_length=1)


class UpdateResponse(BaseModel):
    """What a live update changed; visible to every request from now on."""

    added: list[str] = []
    replaced: list[str] = []
    deleted: list[str] = []
    entities: int = Field(..., description="entities the index holds now")
    index_version: str = Field(..., description="the version answering from now on")


class SwapRequest(BaseModel):
    """Folders to load instead of the current ones (omitted = the same path, re-read)."""

    model_config = ConfigDict(extra="forbid")

    model_path: str | None = None
    index_path: str | None = None
    drin_model_path: str | None = None
    fusion_model_path: str | None = None


class SwapResponse(BaseModel):
    model_version: str
    index_version: str
    rerankers: list[str]
    previous_index_version: str
    seconds: float


class Entity(BaseModel):
    id: str
    name: str
    attributes: str
    images: list[str]
    aliases: list[str] = Field([], description="other names (kb.jsonl's optional aliases)")
    popularity: float | None = Field(None, description="kb.jsonl's optional popularity")
    row: int


__all__ = [
    "VALIDATION_CODES",
    "BatchItemResult",
    "BatchRequest",
    "BatchResponse",
    "Candidate",
    "Entity",
    "EntityBody",
    "EntityIn",
    "ErrorBody",
    "ErrorResponse",
    "LinkRequest",
    "LinkResponse",
    "LiveStatus",
    "PendingModel",
    "Readiness",
    "RedisStatus",
    "Reranker",
    "SwapRequest",
    "SwapResponse",
    "Timings",
    "UpdateResponse",
    "UpsertRequest",
]
