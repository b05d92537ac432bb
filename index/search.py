"""Open an index folder: nearest-neighbour search over FAISS and reads of the entity store.

A pure reader (no model work, no training code): the server builds one ``IndexSearcher`` at
start-up; the linker turns mentions into query vectors and hands them here, then reads the
candidates' stored records for its reranker. Folders that have it also answer the lexical
channel: mention strings against entity names and aliases (:mod:`index.lexical`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import torch

from index.ann import AnnSpec, search, set_search_params, to_search_device
from index.lexical import LexicalIndex, has_lexical
from index.store import (
    FAISS_FILE,
    RETRIEVAL_FILE,
    EntityStore,
    Manifest,
    codec_of,
    raw_memmap,
)
from models.drin_features import STORE_FIELDS as DRIN_FIELDS
from models.drin_features import DrinEntityParts
from models.mimic import MimicEntityRecord

if TYPE_CHECKING:
    from models.onnx_kernel import StoredRecords


@dataclass(frozen=True)
class Candidates:
    """Each mention's candidate list, (B, K) arrays: ``rows`` entity rows (-1 = none);
    ``retrieval`` the dense retrieval score; ``from_dense`` / ``from_lexical`` which channel
    found each; ``lexical`` the lexical channel's score (0 where it did not find it)."""

    rows: np.ndarray
    retrieval: np.ndarray
    from_dense: np.ndarray
    from_lexical: np.ndarray
    lexical: np.ndarray

    @classmethod
    def dense(cls, rows: np.ndarray, retrieval: np.ndarray) -> Candidates:
        """A list found by the dense channel alone."""
        return cls(
            rows,
            retrieval,
            rows >= 0,
            np.zeros(rows.shape, dtype=bool),
            np.zeros(rows.shape, dtype=np.float32),
        )

    def take(self, idx: list[int], k: int) -> Candidates:
        """The first ``k`` candidates of the mentions ``idx``: (len(idx), k)."""
        return Candidates(
            self.rows[idx, :k],
            self.retrieval[idx, :k],
            self.from_dense[idx, :k],
            self.from_lexical[idx, :k],
            self.lexical[idx, :k],
        )


@dataclass(frozen=True)
class LexicalHits:
    """rows: (B, K) entity rows (-1 = none); scores: (B, K) trigram tf-idf cosines of the
    mention against each entity's best name or alias, in [0, 1] (0 at the padding)."""

    rows: np.ndarray
    scores: np.ndarray


def refine_rows(
    queries: np.ndarray, rows: np.ndarray, read_keys: Callable[[np.ndarray], np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The exact top ``k`` of candidate ``rows`` (B, R) (-1 = none): their keys are read with
    ``read_keys(flat rows) -> (B * R, d)`` and scored by inner product with ``queries`` (B, d).

    Returns (scores, rows), (B, min(k, R)), in exact score order (ties by candidate order)."""
    B, R = rows.shape
    if B == 0 or R == 0:
        return np.zeros((B, 0), np.float32), np.zeros((B, 0), rows.dtype)
    safe = np.where(rows < 0, 0, rows)
    keys = np.asarray(read_keys(safe.reshape(-1)), dtype=np.float32).reshape(B, R, -1)
    exact = np.einsum("bd,brd->br", np.asarray(queries, dtype=np.float32), keys)
    exact = np.where(rows >= 0, exact, np.finfo(np.float32).min)
    order = np.argsort(-exact, axis=1, kind="stable")[:, : min(k, R)]
    return np.take_along_axis(exact, order, 1), np.take_along_axis(rows, order, 1)


class IndexSearcher:
    """FAISS + entity store of one index folder, checked against the serving model and the
    encoder runtime that encodes its mentions (``encoder_runtime``).

    The manifest's ``ann`` (:class:`index.ann.AnnSpec`) says how to search it: MIPS-to-L2
    indexes get the query transform, and ``refine`` > 0 rescores FAISS's top ``refine`` exactly
    from the memory-mapped float32 retrieval vectors (``retrieval.f32``)."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        model_fingerprint: str,
        use_gpu: bool = False,
        ef_search: int | None = None,
        nprobe: int | None = None,
        encoder_runtime: str = "torch",
        refine: int | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder)
        self.manifest.check_model(model_fingerprint)
        self.manifest.check_encoder_runtime(encoder_runtime)
        self.store = EntityStore(self.folder, self.manifest)
        index = faiss.read_index(str(self.folder / FAISS_FILE))
        if index.ntotal != self.manifest.entity_count:
            raise ValueError(
                f"{self.folder}: FAISS holds {index.ntotal} vectors but the store "
                f"{self.manifest.entity_count} entities (interrupted build?)"
            )
        set_search_params(index, ef_search=ef_search, nprobe=nprobe)
        self.index: Any = to_search_device(index, use_gpu)
        self.ann = AnnSpec.from_json(self.manifest.ann)
        self.refine = self.ann.refine if refine is None else refine
        self._vectors: np.ndarray | None = None
        if self.refine:
            path = self.folder / RETRIEVAL_FILE
            if not path.is_file():
                raise ValueError(
                    f"{self.folder}: refine needs {RETRIEVAL_FILE}, written by "
                    f"`mel-index build --refine N`; this folder has none"
                )
            dim = self.manifest.retrieval_dim
            self._vectors = raw_memmap(path, "<f4", (self.manifest.entity_count, dim))
        self._lexical: LexicalIndex | None = None
        if has_lexical(self.folder):  # folders built before the lexical channel have none
            self._lexical = LexicalIndex(self.folder)
            if self._lexical.entities != self.manifest.entity_count:
                raise ValueError(
                    f"{self.folder}: the lexical index covers {self._lexical.entities} "
                    f"entities but the store {self.manifest.entity_count} (interrupted add?): "
                    f"rebuild it with `mel-index lexical --index {self.folder}`"
                )

    def __len__(self) -> int:
        return len(self.store)

    def search(self, queries: np.ndarray, k: int) -> Candidates:
        """Top ``k`` rows by inner product for float32 queries ``(B, dim)`` (rescored exactly
        from the store when the folder refines)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        norm = self.ann.max_norm if self.ann.mips_l2 else None
        if not self.refine:
            scores, rows = search(self.index, q, k, norm)
            return Candidates.dense(rows, scores)
        _, cand = search(self.index, q, max(k, self.refine), norm)
        scores, rows = refine_rows(q, cand, self.retrieval_vectors, k)
        return Candidates.dense(rows, scores)

    def retrieval_vectors(self, rows: np.ndarray) -> np.ndarray:
        """(n, dim) float32 retrieval vectors of rows (``retrieval.f32``, memory-mapped): the
        very vectors FAISS was built from."""
        if self._vectors is None:
            raise ValueError(f"{self.folder} does not refine (no {RETRIEVAL_FILE} loaded)")
        return np.take(self._vectors, np.asarray(rows, dtype=np.int64), axis=0)

    @property
    def has_lexical(self) -> bool:
        """Whether the folder holds the lexical index (``<index>/lexical/``)."""
        return self._lexical is not None

    def lexical(self, queries: list[str], k: int) -> LexicalHits:
        """Top ``k`` rows by trigram tf-idf cosine of each query string (a mention) against the
        entities' names and aliases: (len(queries), k)."""
        if self._lexical is None:
            raise ValueError(
                f"{self.folder} has no lexical index: build it with "
                f"`mel-index lexical --index {self.folder}`"
            )
        rows, scores = self._lexical.search(queries, k)
        return LexicalHits(rows=rows, scores=scores)

    def _fields(self, rows: np.ndarray, names: tuple[str, ...]) -> list[torch.Tensor]:
        """(B, K, ...) float32 store fields of the given rows (rows < 0 read row 0)."""
        flat = np.where(rows < 0, 0, rows).reshape(-1)
        return [
            torch.from_numpy(self.store.rows(f, flat)).reshape(
                *rows.shape, *self.manifest.store_fields[f]
            )
            for f in names
        ]

    def fields(self, rows: np.ndarray, names: tuple[str, ...]) -> list[torch.Tensor]:
        """(B, K, ...) float32 of the named store fields only (rows < 0 read row 0)."""
        return self._fields(rows, names)

    def image_rows(self, rows: np.ndarray) -> np.ndarray | None:
        """(B, K) image-record row of each entity row (rows < 0 read row 0): equal values
        share their image fields. None for a version 1 folder (no image table)."""
        table = self.store.image_rows
        if table is None:
            return None
        flat = np.where(rows < 0, 0, rows).reshape(-1)
        return np.asarray(table[flat], dtype=np.int64).reshape(rows.shape)

    def records(self, rows: np.ndarray) -> MimicEntityRecord:
        """(B, K, ...) float32 MIMIC records of the given rows (rows < 0 read row 0)."""
        return MimicEntityRecord(*self._fields(rows, MimicEntityRecord.field_names()))

    @functools.cached_property
    def record_codecs(self) -> dict[str, str]:
        """How the store codes each MIMIC record field (``f16`` or ``q8``)."""
        return {f: codec_of(self.manifest, f) for f in MimicEntityRecord.field_names()}

    def stored_records(self, rows: np.ndarray) -> StoredRecords | None:
        """(B, K, ...) MIMIC records of the given rows as the store holds them, not decoded
        (rows < 0 read row 0): per field, the values and the ``q8`` scales (None for
        float16), coded as :attr:`record_codecs` says. A kernel that decodes them itself
        (``OnnxKernel.score_stored``) reads a quarter of the bytes of :meth:`records` and
        skips numpy's decode. None where some rows are not stored so (live rows)."""
        flat = np.where(rows < 0, 0, rows).reshape(-1)
        out = {}
        for f in MimicEntityRecord.field_names():
            value, scale = self.store.stored_rows(f, flat)
            out[f] = (
                value.reshape(*rows.shape, *value.shape[1:]),
                None if scale is None else scale.reshape(*rows.shape, *scale.shape[1:]),
            )
        return out

    @property
    def has_drin(self) -> bool:
        """Whether the store holds DRIN's entity parts (built without ``--no-drin``)."""
        return all(f in self.manifest.store_fields for f in DRIN_FIELDS)

    def drin_parts(self, rows: np.ndarray) -> DrinEntityParts:
        """(B, K, ...) float32 DRIN entity parts of the given rows (rows < 0 read row 0)."""
        if not self.has_drin:
            raise ValueError(f"{self.folder} was built without DRIN fields (--no-drin)")
        return DrinEntityParts(*self._fields(rows, DRIN_FIELDS))

    def entity(self, row: int) -> dict[str, Any]:
        return self.store.entity(row)

    def row_of(self, entity_id: str) -> int | None:
        """Row of an entity id, or None."""
        return self.store.row_of(entity_id)

    def close(self) -> None:
        self.store.close()


__all__ = ["Candidates", "IndexSearcher", "LexicalHits", "refine_rows"]
