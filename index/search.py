"""Open an index folder with its model: retrieve candidates, fetch their reranking records.

This is the serving-side reader (no training code): the server builds one ``IndexSearcher``
at start-up and calls it per request batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from index.ann import search, set_search_params, to_search_device
from index.store import FAISS_FILE, EntityStore, Manifest
from models.drin_features import STORE_FIELDS as DRIN_FIELDS
from models.drin_features import DrinEntityParts
from models.mimic import MimicEntityRecord, MimicFeatures, MimicScores
from models.model import LinkingModel


@dataclass(frozen=True)
class Candidates:
    """rows: (B, K) entity rows (-1 = none); retrieval: (B, K) retrieval scores."""

    rows: np.ndarray
    retrieval: np.ndarray


class IndexSearcher:
    def __init__(
        self,
        folder: str | os.PathLike[str],
        model: LinkingModel,
        use_gpu: bool = False,
        ef_search: int | None = None,
        nprobe: int | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder)
        self.manifest.check_model(model.fingerprint())
        self.model = model
        self.store = EntityStore(self.folder, self.manifest)
        index = faiss.read_index(str(self.folder / FAISS_FILE))
        if index.ntotal != self.manifest.entity_count:
            raise ValueError(
                f"{self.folder}: FAISS holds {index.ntotal} vectors but the store "
                f"{self.manifest.entity_count} entities (interrupted build?)"
            )
        set_search_params(index, ef_search=ef_search, nprobe=nprobe)
        self.index: Any = to_search_device(index, use_gpu)

    def __len__(self) -> int:
        return len(self.store)

    @torch.inference_mode()
    def retrieve(self, mentions: MimicFeatures, k: int) -> Candidates:
        queries = self.model.matcher.retrieval_queries(mentions).float().cpu().numpy()
        scores, rows = search(self.index, queries, k)
        return Candidates(rows=rows, retrieval=scores)

    def _fields(self, rows: np.ndarray, names: tuple[str, ...]) -> list[torch.Tensor]:
        """(B, K, ...) float32 store fields of the given rows (rows < 0 read row 0)."""
        flat = np.where(rows < 0, 0, rows).reshape(-1)
        return [
            torch.from_numpy(self.store.rows(f, flat).astype(np.float32)).reshape(
                *rows.shape, *self.manifest.store_fields[f]
            )
            for f in names
        ]

    def records(self, rows: np.ndarray) -> MimicEntityRecord:
        """(B, K, ...) float32 MIMIC records of the given rows (rows < 0 read row 0)."""
        return MimicEntityRecord(*self._fields(rows, MimicEntityRecord.field_names()))

    @property
    def has_drin(self) -> bool:
        """Whether the store holds DRIN's entity parts (built without ``--no-drin``)."""
        return all(f in self.manifest.store_fields for f in DRIN_FIELDS)

    def drin_parts(self, rows: np.ndarray) -> DrinEntityParts:
        """(B, K, ...) float32 DRIN entity parts of the given rows (rows < 0 read row 0)."""
        if not self.has_drin:
            raise ValueError(f"{self.folder} was built without DRIN fields (--no-drin)")
        return DrinEntityParts(*self._fields(rows, DRIN_FIELDS))

    @torch.inference_mode()
    def rerank(
        self, mentions: MimicFeatures, cand: Candidates, units: tuple[str, ...] | None = None
    ) -> MimicScores:
        """MIMIC scores (B, K) of each mention against its own retrieved candidates."""
        return self.model.matcher.score_precomputed(mentions, self.records(cand.rows), units)

    def entity(self, row: int) -> dict[str, Any]:
        return self.store.entity(row)

    def close(self) -> None:
        self.store.close()


__all__ = ["Candidates", "IndexSearcher"]
