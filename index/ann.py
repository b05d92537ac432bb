"""FAISS: build from a memory-mapped vector source, GPU when present, save/load, search.

Metric: inner product (MIMIC's decomposable score part is an inner product, see
``MimicMatcher.retrieval_queries``). The index type is a FAISS factory string: ``Flat``
(exact, default), ``HNSW32`` (graph), ``IVF1024,PQ32`` (compressed; trained on a sample).
When FAISS sees a GPU (``faiss-gpu`` extra) Flat / IVF indexes are built on it and moved back
to CPU for saving, so the same folder loads anywhere; HNSW has no GPU build in FAISS.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from index.errors import EmptyTrainingSetError

logger = logging.getLogger(__name__)

# Batched searches go through BLAS at any batch size (measured: 64 queries on 110k vectors,
# 543 ms with FAISS's default threshold vs 69 ms with 0; ../shared/reference/machine-baselines).
faiss.cvar.distance_compute_blas_threshold = 0


def gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def needs_training(factory: str) -> bool:
    return factory.split(",")[0].startswith(("IVF", "PQ", "OPQ")) or "PQ" in factory


def build_index(
    dim: int,
    factory: str,
    n: int,
    read: Callable[[int, int], np.ndarray],
    train_sample: int = 100_000,
    block: int = 65_536,
    use_gpu: bool = True,
    seed: int = 0,
) -> Any:
    """Build an inner-product index over ``n`` vectors given by ``read(start, end)`` (float32).

    Rows are added in order, so FAISS ids are entity rows. Training (IVF/PQ) uses an evenly
    strided sample of ``train_sample`` rows (deterministic for a given n).
    """
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    on_gpu = False
    if use_gpu and gpu_count() > 0 and "HNSW" not in factory:
        index = faiss.index_cpu_to_all_gpus(index)
        on_gpu = True
        logger.info("building %s on %d GPU(s)", factory, gpu_count())
    if not index.is_trained:
        if n == 0:
            raise EmptyTrainingSetError(f"{factory} needs training vectors, but the index is empty")
        take = min(n, train_sample)
        rows = np.linspace(0, n - 1, take).astype(np.int64)
        sample = (
            np.concatenate([read(int(r), int(r) + 1) for r in rows]) if take < n else read(0, n)
        )
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    for s in range(0, n, block):
        index.add(np.ascontiguousarray(read(s, min(n, s + block)), dtype=np.float32))
    if on_gpu:
        index = faiss.index_gpu_to_cpu(index)
    return index


def to_search_device(index: Any, use_gpu: bool) -> Any:
    if use_gpu and gpu_count() > 0 and not isinstance(index, faiss.IndexHNSW):
        return faiss.index_cpu_to_all_gpus(index)
    return index


def set_search_params(index: Any, ef_search: int | None = None, nprobe: int | None = None) -> None:
    base = faiss.downcast_index(index)
    if ef_search is not None and hasattr(base, "hnsw"):
        base.hnsw.efSearch = ef_search
    if nprobe is not None:
        ivf = faiss.try_extract_index_ivf(base) if hasattr(faiss, "try_extract_index_ivf") else None
        if ivf is not None:
            ivf.nprobe = nprobe


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of the top ``k`` by inner product; rows are -1 past the index size."""
    k = max(1, min(k, index.ntotal)) if index.ntotal else 1
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, rows


__all__ = [
    "build_index",
    "gpu_count",
    "needs_training",
    "search",
    "set_search_params",
    "to_search_device",
]
