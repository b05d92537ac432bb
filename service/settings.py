"""Service settings, read from the environment (prefix ``MEL_``) or passed to ``create_app``.

Every limit has a reason beside it; the README's settings table is generated from the same
field descriptions (``mel-serve --print-settings``).
"""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEL_", env_file=None, extra="ignore")

    # ---- what to serve
    model_path: str = Field("artifacts/demo-model/best", description="checkpoint folder")
    index_path: str = Field("artifacts/demo-index", description="index folder built by mel-index")
    drin_model_path: str | None = Field(
        None,
        description="DRIN checkpoint folder (mel-train-drin) for reranker=drin; None = no DRIN",
    )
    drin_table_mb: float = Field(
        1024.0,
        ge=0,
        description="memory for DRIN's folded entity table: the first layer's entity products "
        "of the whole base KB, computed when the DRIN model loads, when they fit (4 bytes x "
        "(entities x 768 + images x 1152) at the default widths); else, and for rows added "
        "live, they are folded per request (same scores); 0 = never",
    )
    fusion_model_path: str | None = Field(
        None,
        description="fusion model folder (mel-train-fusion) for reranker=fusion and calibrated "
        "confidences; None = no fusion",
    )
    default_reranker: str | None = Field(
        None,
        description="reranker of requests that name none (None: fusion when loaded, else mimic)",
    )
    lexical_k: int | None = Field(
        None,
        description="lexical-channel candidates merged into the dense ones for rerankers that "
        "use them (None: the fusion model's own setting)",
    )
    image_root: str | None = Field(
        None,
        description="folder the KB's image paths are relative to, for "
        "GET /v1/entities/{id}/image (None: the one mel-index build recorded)",
    )
    device: str = Field("auto", description="auto (cuda when present), cpu or cuda")
    encoder_runtime: str | None = Field(
        None,
        description="how the encoder towers run: torch, onnx (onnxruntime fp32) or onnx-int8 "
        "(int8 text tower); None: the backend's default, onnx for minilm-effnet (measured "
        "faster, same quality), torch for clip; must be the one the index was built with "
        "(its manifest says)",
    )
    kernel_runtime: str | None = Field(
        None,
        description="how the MIMIC and DRIN rerank kernels run: torch (eager ops) or onnx "
        "(one onnxruntime graph each, exported on first start into onnx_cache; equal within "
        "float rounding, measured faster); None: onnx on the CPU, torch on a GPU",
    )
    fusion_trees: str | None = Field(
        None,
        description="how the fusion model's trees run: lightgbm (Booster.predict) or compiled "
        "(lleaves: native code made on first start and cached in onnx_cache; equal to "
        "float64 rounding, 4.7x faster on WikiMEL lists); None: compiled when lleaves is installed",
    )
    onnx_cache: str | None = Field(
        None,
        description="folder for what the server compiles on first start (never downloaded): "
        "the ONNX exports of the encoder and the MIMIC kernel, the compiled fusion trees; "
        "None: the onnx/ folder inside model_path",
    )
    intra_op_threads: int | None = Field(
        None,
        description="torch, onnxruntime and FAISS threads of each model worker (numpy's BLAS "
        "always runs 1: see the one-query flat search); None: the "
        "cores free at start (CPU affinity, capped by a cgroup quota, minus the cores other "
        "processes keep busy, minus thread_reserve) divided by model_workers, 1 when neither "
        "is set; on a GPU the free cores",
    )
    model_workers: int | None = Field(
        None,
        ge=1,
        description="model threads, each running whole batches; None: on CPU the cores free "
        "at start divided by intra_op_threads (one single-threaded worker per free core when "
        "neither is set), on a GPU 1",
    )
    towers_beside: bool = Field(
        True,
        description="encode a batch's images on a helper thread beside its texts when a "
        "core of the model_workers x intra_op_threads budget is free (low load: the other "
        "workers idle), else in turn; identical features, 1.6-1.8x faster encoding of a lone "
        "request on 2 cores (bench/results/towers.md); CPU only",
    )
    thread_reserve: int = Field(
        0,
        description="cores left to neighbours on top of those measured busy, when "
        "intra_op_threads is None (a thread on a busy core stalls every op it is part of)",
    )
    use_faiss_gpu: bool = Field(True, description="search on GPU when faiss-gpu sees one")
    hnsw_ef_search: int | None = Field(None, description="HNSW efSearch (None = index default)")
    ivf_nprobe: int | None = Field(None, description="IVF nprobe (None = index default)")
    refine_k: int | None = Field(
        None,
        description="rescore FAISS's top N exactly from the store (None = the index's "
        "mel-index build --refine; 0 = off)",
    )

    # ---- request defaults and bounds
    top_k_default: int = Field(10, description="candidates returned when top_k is not given")
    top_k_max: int = Field(100, description="largest top_k accepted")
    candidates_k_default: int = Field(100, description="retrieved candidates reranked")
    candidates_k_max: int = Field(1000, description="largest candidates_k accepted")
    nil_threshold: float | None = Field(
        None,
        description="a probability below this -> nil=true: fusion's `in_kb_probability` "
        "(its `answer_confidence` for fusion models before v3), else the best candidate's "
        "confidence; None: the fusion model's dev-chosen threshold, or never NIL without one "
        "(a reranker without confidences compares its raw score)",
    )
    max_mention_chars: int = Field(300, description="longest mention surface accepted")
    max_sentence_chars: int = Field(5000, description="longest sentence accepted")
    max_batch_items: int = Field(64, description="items per /v1/link/batch call (413 above)")
    max_body_bytes: int = Field(32 * 1024 * 1024, description="request body limit (413 above)")
    max_image_bytes: int = Field(8 * 1024 * 1024, description="encoded image limit (413 above)")
    max_image_pixels: int = Field(
        25_000_000, description="decoded pixel limit: decompression-bomb guard (422 above)"
    )
    max_request_pixels: int = Field(
        50_000_000,
        description="decoded pixels over all images of one request, a batch's items "
        "together (413 pixel_budget_exceeded above): bounds the memory and CPU one call "
        "can take",
    )
    image_formats: list[str] = Field(
        ["JPEG", "PNG", "WEBP", "GIF", "BMP"], description="accepted image formats"
    )

    # ---- image URLs (off by default: a server that fetches URLs is an SSRF vector)
    allow_image_urls: bool = Field(False, description="accept image_url (http/https only)")
    url_timeout_s: float = Field(5.0, description="total time for one image fetch")
    url_max_redirects: int = Field(3, description="redirects followed (each target re-checked)")
    url_allow_private: bool = Field(
        False,
        description="also fetch from private/loopback addresses (intranet deployments "
        "only: this re-opens SSRF to internal services)",
    )

    # ---- engine
    max_batch_size: int = Field(32, description="mentions encoded together (micro-batching)")
    max_wait_ms: float = Field(
        0.0,
        ge=0.0,
        description="how long a batch waits to fill up once a model worker is free (0: it "
        "takes what is queued; under load batches form from what queued meanwhile)",
    )
    queue_size: int = Field(256, description="queued mentions before 429 Too Many Requests")
    request_timeout_s: float = Field(30.0, description="per-request deadline (504 after)")
    warmup: bool = Field(True, description="run a warm-up batch before reporting ready")

    # ---- cache
    redis_url: str | None = Field(None, description="redis://host:port/db; None = in-process LRU")
    cache_ttl_s: int = Field(3600, description="cache entry lifetime")
    lru_size: int = Field(10_000, description="in-process cache entries when Redis is off")
    redis_timeout_s: float = Field(
        0.05, description="Redis socket timeout: a slow Redis is bypassed, never waited for"
    )
    redis_retry_s: float = Field(2.0, description="after a Redis error, bypass it this long")
    redis_health_interval_s: float = Field(
        5.0,
        description="ping Redis this often so mel_redis_up and the breaker follow it "
        "between requests",
    )

    # ---- auth
    api_keys: list[str] = Field([], description="accepted X-API-Key values; empty = no auth")
    admin_keys: list[str] = Field(
        [],
        description="keys of the admin routes (/v1/admin: live KB updates, hot swap), sent as "
        "X-Admin-Key or Bearer; empty = admin routes refused (403)",
    )

    # ---- live updates and reloads
    max_admin_entities: int = Field(256, description="entities per admin upsert call (413 above)")
    live_poll_s: float = Field(
        2.0,
        description="look for index updates written by another process (a replica sharing "
        "the folder) this often; 0 = never",
    )
    reload_poll_s: float = Field(
        5.0,
        description="look this often for configured reranker folders that are still being "
        "trained (they are loaded, by a hot swap, once complete); 0 = never",
    )
    lock_timeout_s: float = Field(
        10.0, description="wait this long for the index folder's write lock (503 after)"
    )

    @field_validator("encoder_runtime")
    @classmethod
    def _runtime(cls, v: str | None) -> str | None:
        # models.onnx_encoders.ENCODER_RUNTIMES, spelled out so settings import no torch
        runtimes = ("torch", "onnx", "onnx-int8")
        if v is not None and v not in runtimes:
            raise ValueError(f"encoder_runtime must be one of {runtimes}, got {v!r}")
        return v

    @field_validator("fusion_trees")
    @classmethod
    def _fusion_trees(cls, v: str | None) -> str | None:
        runtimes = ("lightgbm", "compiled")  # models.compiled_trees.TREE_RUNTIMES
        if v is not None and v not in runtimes:
            raise ValueError(f"fusion_trees must be one of {runtimes}, got {v!r}")
        return v

    @field_validator("kernel_runtime")
    @classmethod
    def _kernel_runtime(cls, v: str | None) -> str | None:
        runtimes = ("torch", "onnx")  # models.onnx_kernel.KERNEL_RUNTIMES
        if v is not None and v not in runtimes:
            raise ValueError(f"kernel_runtime must be one of {runtimes}, got {v!r}")
        return v

    @field_validator("image_formats")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        return [f.upper() for f in v]

    def with_worker_plan(self) -> ServiceSettings:
        """These settings with ``model_workers`` and ``intra_op_threads`` fixed from the cores
        free now (:func:`models.threads.plan_workers`; it samples /proc/stat for 0.25 s). The
        server and ``mel-link`` both call it once at start."""
        from models.device import resolve_device  # torch: not for --print-settings
        from models.threads import plan_workers

        cuda = resolve_device(self.device).type == "cuda"
        workers, threads = plan_workers(
            self.model_workers, self.intra_op_threads, cuda, self.thread_reserve
        )
        return self.model_copy(update={"model_workers": workers, "intra_op_threads": threads})


__all__ = ["ServiceSettings"]
