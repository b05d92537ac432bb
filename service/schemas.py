"""Wire schemas (pydantic): what clients send and receive. Internal types stay in models/."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Reranker = Literal["mimic", "drin", "none"]


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
    image: str | None = Field(None, description="base64 image or data:image/...;base64, URI")
    image_url: str | None = Field(
        None, description="http(s) image URL (when the server allows URL fetching; off by default)"
    )
    top_k: int | None = Field(None, ge=1, description="candidates returned (default 10)")
    candidates_k: int | None = Field(
        None, ge=1, description="retrieved candidates reranked (default 100)"
    )
    reranker: Reranker = Field(
        "mimic", description="mimic (default), drin or none (retrieval only)"
    )
    explain: bool = Field(
        False,
        description="include why: MIMIC's per-unit scores (tglu/vdlu/cmfu), or DRIN's initial "
        "and final edge weights (tt/ti/it/ii) per candidate",
    )


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
    explain: dict[str, float | dict[str, float]] | None = Field(
        None,
        description="mimic: {tglu, vdlu, cmfu}; drin: {edges_initial: {tt, ti, it, ii}, "
        "edges_final: {...}}",
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
    nil: bool = Field(..., description="true when the best score is under the NIL threshold")
    reranker: str
    model_version: str
    index_version: str
    timings: Timings


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


class Entity(BaseModel):
    id: str
    name: str
    attributes: str
    images: list[str]
    row: int


__all__ = [
    "BatchItemResult",
    "BatchRequest",
    "BatchResponse",
    "Candidate",
    "Entity",
    "ErrorBody",
    "ErrorResponse",
    "LinkRequest",
    "LinkResponse",
    "Reranker",
    "Timings",
]
