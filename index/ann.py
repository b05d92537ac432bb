"""FAISS: build from a memory-mapped vector source, GPU when present, save/load, search.

Metric: inner product (MIMIC's decomposable score part is an inner product, see
``MimicMatcher.retrieval_queries``). The index type is a FAISS factory string: ``Flat``
(exact, default), ``HNSW32`` (graph), ``IVF1024,PQ32`` (compressed; trained on a sample),
plus two options of our own (:class:`AnnSpec`, stored in the manifest):

* ``mips_l2``: the MIPS-to-L2 transform (Bachrach et al., RecSys'14). Keys are indexed as
  ``[k ; sqrt(M^2 - |k|^2)]`` under L2 (M = the largest key norm), queries searched as
  ``[q ; 0]``: then ``|q' - k'|^2 = |q|^2 + M^2 - 2 q.k``, so the L2 order is the inner-product
  order, but IVF's k-means and its coarse assignment work in the geometry they are made for.
  :func:`search` turns the distances back into inner products.
* ``refine``: FAISS proposes the top ``refine`` rows and the searcher rescores them exactly
  from the vectors in the memory-mapped store (:class:`index.search.IndexSearcher`), so a
  compressed index (PQ codes in RAM) returns exact scores, in exact order, of what it found.

When FAISS sees a GPU (``faiss-gpu`` extra) Flat / IVF indexes are built on it and moved back
to CPU for saving, so the same folder loads anywhere; HNSW has no GPU build in FAISS.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np

from index.errors import EmptyTrainingSetError

logger = logging.getLogger(__name__)

# Batched searches go through BLAS at any batch size (measured: 64 queries on 110k vectors,
# 543 ms with FAISS's default threshold vs 69 ms with 0; ../shared/reference/machine-baselines).
faiss.cvar.distance_compute_blas_threshold = 0


@dataclass(frozen=True)
class AnnSpec:
    """How a folder's FAISS index was built and is searched (the manifest's ``ann``)."""

    mips_l2: bool = False  # keys [k ; sqrt(M^2 - |k|^2)] under L2, queries [q ; 0]
    max_norm: float = 0.0  # M, the largest key norm at build time (mips_l2 only)
    refine: int = 0  # 0: FAISS's scores; R > 0: top max(R, k) from FAISS, rescored exactly

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> AnnSpec:
        return cls(**(d or {}))


def mips_l2_dim(dim: int) -> int:
    """Width of MIPS-to-L2 vectors of ``dim``-d keys: d + 1 rounded up to a multiple of 32
    (zero columns), so PQ / OPQ sub-quantizer counts such as 64 or 128 divide it."""
    return -(-(dim + 1) // 32) * 32


def mips_to_l2(keys: np.ndarray, max_norm: float, width: int | None = None) -> np.ndarray:
    """(n, d) keys -> (n, width) ``[k ; sqrt(M^2 - |k|^2) ; 0 ...]`` float32 (width defaults to
    :func:`mips_l2_dim`). Norms above M clip to 0: a key added later with a larger norm is
    slightly under-ranked by FAISS (``refine`` rescores exactly)."""
    k = np.ascontiguousarray(keys, dtype=np.float32)
    n, d = k.shape
    out = np.zeros((n, width or mips_l2_dim(d)), dtype=np.float32)
    out[:, :d] = k
    out[:, d] = np.sqrt(np.maximum(max_norm**2 - np.einsum("nd,nd->n", k, k), 0.0))
    return out


def max_key_norm(n: int, read: Callable[[int, int], np.ndarray], block: int = 65_536) -> float:
    """The largest L2 norm of ``n`` vectors given by ``read(start, end)`` (one streamed pass)."""
    m = 0.0
    for s in range(0, n, block):
        x = np.asarray(read(s, min(n, s + block)), dtype=np.float32)
        if len(x):
            m = max(m, float(np.sqrt(np.einsum("nd,nd->n", x, x).max())))
    return m


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
    mips_l2_norm: float | None = None,
) -> Any:
    """Build an inner-product index over ``n`` vectors given by ``read(start, end)`` (float32).

    Rows are added in order, so FAISS ids are entity rows. Training (IVF/PQ) uses an evenly
    strided sample of ``train_sample`` rows (deterministic for a given n). With
    ``mips_l2_norm`` (M) the index holds the MIPS-to-L2 transformed keys (d + 1, L2 metric).
    """
    if mips_l2_norm is not None:
        raw, dim, norm = read, mips_l2_dim(dim), mips_l2_norm

        def read(s: int, e: int) -> np.ndarray:
            return mips_to_l2(raw(s, e), norm, dim)

    metric = faiss.METRIC_L2 if mips_l2_norm is not None else faiss.METRIC_INNER_PRODUCT
    index = faiss.index_factory(dim, factory, metric)
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


def flat_ip_vectors(index: Any) -> np.ndarray | None:
    """The (n, d) vectors of a CPU ``IndexFlatIP``, a view of FAISS's own memory (not a
    copy); None for any other index (GPU, HNSW, IVF, shards) or an empty one."""
    if type(index) is not faiss.IndexFlatIP or index.ntotal == 0:
        return None
    n, d = index.ntotal, index.d
    return faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d)


def one_query_flat(xb: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top ``k`` of one query (1, d) over ``xb`` (n, d) by inner product: one BLAS
    matrix-vector product and a partial sort, best first, ties by row. ``IndexFlat.search``
    takes 2x as long for a single query here (bench/flat_search.py); from two queries on
    FAISS's blocked product wins, so only one query comes here."""
    s = xb @ q[0]
    k = min(k, len(s))
    top = np.argpartition(-s, k - 1)[:k] if k < len(s) else np.arange(len(s))
    rows = top[np.lexsort((top, -s[top]))]
    return s[rows][None].astype(np.float32), rows[None].astype(np.int64)


def search(
    index: Any, queries: np.ndarray, k: int, mips_l2_norm: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of the top ``k`` by inner product; rows are -1 past the index size.

    For a MIPS-to-L2 index (``mips_l2_norm`` = its M) the queries get zero coordinates up to
    the index's width and the L2 distances are turned back into inner products:
    q.k = (|q|^2 + M^2 - dist) / 2.
    """
    k = max(1, min(k, index.ntotal)) if index.ntotal else 1
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if mips_l2_norm is None:
        xb = flat_ip_vectors(index) if len(q) == 1 else None
        if xb is not None:
            return one_query_flat(xb, q, k)
        scores, rows = index.search(q, k)
        return scores, rows
    padded = np.zeros((len(q), index.d), dtype=np.float32)
    padded[:, : q.shape[1]] = q
    dist, rows = index.search(padded, k)
    qq = np.einsum("bd,bd->b", q, q)[:, None]
    lowest = np.finfo(np.float32).min  # what FAISS gives an IP index's missing rows
    scores = np.where(rows >= 0, (qq + mips_l2_norm**2 - dist) / 2, lowest).astype(np.float32)
    return scores, rows


__all__ = [
    "AnnSpec",
    "build_index",
    "flat_ip_vectors",
    "gpu_count",
    "max_key_norm",
    "mips_l2_dim",
    "mips_to_l2",
    "needs_training",
    "one_query_flat",
    "search",
    "set_search_params",
    "to_search_device",
]
