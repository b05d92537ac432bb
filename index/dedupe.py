"""Duplicate entity ids among encoded chunks, and against an existing index, by id hashes.

64-bit id hashes take 16 bytes per entity instead of a set of every id string (which would need
~10 GB at 100M entities). Only ids whose hash is shared (true duplicates, or a rare collision)
are compared as strings; the first occurrence of an id is kept.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from index.store import ENTITIES_FILE, EntityStore, id_hash


def chunk_ids(chunk: Path) -> list[str]:
    """Entity ids of one chunk folder, in row order."""
    with open(chunk / ENTITIES_FILE, "rb") as f:
        return [json.loads(line)["id"] for line in f]


class IdDeduper:
    """Answers, row by row in chunk order, whether an entity id was seen before."""

    def __init__(self, chunks: Sequence[Path], store: EntityStore | None) -> None:
        per_chunk = [
            np.fromiter((id_hash(i) for i in chunk_ids(c)), dtype=np.uint64) for c in chunks
        ]
        self.hashes = np.concatenate(per_chunk) if per_chunk else np.zeros(0, np.uint64)
        self.starts = np.cumsum([0] + [len(h) for h in per_chunk])
        order = np.argsort(self.hashes, kind="stable")
        ordered = self.hashes[order]
        same = np.flatnonzero(ordered[1:] == ordered[:-1])
        suspect = np.zeros(len(self.hashes), dtype=bool)
        suspect[order[same]] = True
        suspect[order[same + 1]] = True
        self.store = store if store is not None and len(store) else None
        if self.store is not None and len(self.hashes):
            known = self.store.id_hashes
            pos = np.searchsorted(known, self.hashes).clip(max=len(known) - 1)
            suspect |= np.asarray(known[pos]) == self.hashes
        self.suspect = suspect
        self.seen: dict[int, list[str]] = {}

    def duplicate(self, chunk_index: int, line: int, entity_id: str) -> bool:
        """Whether row ``line`` of chunk ``chunk_index`` repeats an id (asked once per row)."""
        g = int(self.starts[chunk_index]) + line
        if not self.suspect[g]:
            return False
        if self.store is not None and self.store.row_of(entity_id) is not None:
            return True
        seen = self.seen.setdefault(int(self.hashes[g]), [])
        if entity_id in seen:
            return True
        seen.append(entity_id)
        return False

    def hashes_of(self, chunk_index: int, lines: Sequence[int]) -> np.ndarray:
        """uint64 id hashes of some rows of one chunk."""
        return self.hashes[int(self.starts[chunk_index]) + np.asarray(lines, dtype=int)]


__all__ = ["IdDeduper", "chunk_ids"]
