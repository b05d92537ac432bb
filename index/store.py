"""The index folder: entity feature store, entity metadata, id table, manifest.

One build = one self-describing folder::

    <index>/manifest.json          see :class:`Manifest`
    <index>/faiss.index            FAISS index over the retrieval vectors (row = entity row)
    <index>/store/<field>.f16      raw little-endian float16, shape (N, *field_shape) from the
                                   manifest; memory-mapped at serving time; appendable
    <index>/entities.jsonl         entity metadata, one line per row (id, name, attributes, images)
    <index>/entities.offsets       uint64 (N + 1,) byte offsets into entities.jsonl (O(1) row reads)
    <index>/ids.u64                uint64 (N,) sorted 64-bit hashes of entity ids ...
    <index>/ids.rows               int64 (N,) ... and the row of each, for id -> row lookups
    <index>/lexical/               trigram tf-idf index of names and aliases (index/lexical.py)
    <index>/retrieval.f32          float32 (N, d) retrieval vectors, when the index refines

Raw files (not .npy) so that incremental adds append in place without rewriting a header.
Nothing here needs the whole KB in RAM: readers memory-map, writers stream.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_FILE = "manifest.json"
FAISS_FILE = "faiss.index"
STORE_DIR = "store"
ENTITIES_FILE = "entities.jsonl"
OFFSETS_FILE = "entities.offsets"
IDS_HASH_FILE = "ids.u64"
IDS_ROWS_FILE = "ids.rows"
# float32 (N, retrieval_dim): each row's retrieval vector, written when the index refines
# (index/ann.py): the exact rescoring reads it memory-mapped. float32, not float16: this CPU
# has no fast float16 conversion (measured: 22 ns per value, 330 ms for one batch of 32 x 1000)
RETRIEVAL_FILE = "retrieval.f32"
INDEX_FORMAT = "mel-index"
INDEX_VERSION = 1


class IndexMismatchError(RuntimeError):
    """An index folder that does not belong to the model it is opened with."""


@dataclass
class Manifest:
    model_fingerprint: str
    backbone: str
    metric: str
    factory: str
    retrieval_dim: int
    entity_count: int
    store_fields: dict[str, list[int]]  # field -> per-entity shape
    retrieval_vector: str
    build_seconds: float = 0.0
    built_at: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    git_commit: str = ""
    bad_entities: dict[str, Any] = field(default_factory=dict)
    store_bytes_per_entity: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    # {"entries", "grams", "postings"} of <index>/lexical/ (index/lexical.py); {} = none (a
    # folder built before the lexical channel: `mel-index lexical --index DIR` adds it)
    lexical: dict[str, int] = field(default_factory=dict)
    # how faiss.index is searched (index.ann.AnnSpec: MIPS-to-L2 transform, refine); {} = plain
    ann: dict[str, Any] = field(default_factory=dict)
    format: str = INDEX_FORMAT
    version: int = INDEX_VERSION

    def save(self, folder: Path) -> None:
        tmp = folder / (MANIFEST_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")
        tmp.replace(folder / MANIFEST_FILE)

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not an index folder (no {MANIFEST_FILE})")
        d = json.loads(path.read_text(encoding="utf-8"))
        if d.get("format") != INDEX_FORMAT or d.get("version", 0) > INDEX_VERSION:
            raise ValueError(f"{path}: not a {INDEX_FORMAT} v<={INDEX_VERSION} manifest")
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})

    def check_model(self, fingerprint: str) -> None:
        if fingerprint != self.model_fingerprint:
            raise IndexMismatchError(
                f"index was built by model {self.model_fingerprint}, but the loaded model is "
                f"{fingerprint}: rebuild the index with this model (mel-index build) or load "
                f"the model it was built with"
            )


def id_hash(entity_id: str) -> int:
    """Stable 64-bit hash of an entity id (blake2b; Python's hash() is salted per process)."""
    return int.from_bytes(
        hashlib.blake2b(entity_id.encode("utf-8"), digest_size=8).digest(), "little"
    )


def append_raw(path: Path, array: np.ndarray) -> None:
    """Append rows to a raw little-endian file (float16 store fields, int/uint tables)."""
    with open(path, "ab") as f:
        f.write(np.ascontiguousarray(array).tobytes())


def raw_memmap(path: Path, dtype: Any, shape: Sequence[int]) -> np.ndarray:
    n = int(shape[0])
    if n == 0:
        return np.zeros(tuple(shape), dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=tuple(shape))


def write_id_table(folder: Path, hashes: np.ndarray) -> None:
    """Sorted (id hash, row) table for id -> row lookups, from the id hashes in row order."""
    hashes = np.asarray(hashes, dtype="<u8")
    order = np.argsort(hashes, kind="stable")
    tmp_h, tmp_r = folder / (IDS_HASH_FILE + ".tmp"), folder / (IDS_ROWS_FILE + ".tmp")
    tmp_h.write_bytes(hashes[order].tobytes())
    tmp_r.write_bytes(order.astype("<i8").tobytes())
    tmp_h.replace(folder / IDS_HASH_FILE)
    tmp_r.replace(folder / IDS_ROWS_FILE)


class EntityStore:
    """Read side of an index folder: memory-mapped features, metadata rows, id lookups."""

    def __init__(self, folder: str | os.PathLike[str], manifest: Manifest | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = manifest or Manifest.load(self.folder)
        n = self.manifest.entity_count
        self.fields: dict[str, np.ndarray] = {
            name: raw_memmap(self.folder / STORE_DIR / f"{name}.f16", "<f2", (n, *shape))
            for name, shape in self.manifest.store_fields.items()
        }
        self.offsets = raw_memmap(self.folder / OFFSETS_FILE, "<u8", (n + 1,))
        self.id_hashes = raw_memmap(self.folder / IDS_HASH_FILE, "<u8", (n,))
        self.id_rows = raw_memmap(self.folder / IDS_ROWS_FILE, "<i8", (n,))
        self._meta = open(self.folder / ENTITIES_FILE, "rb")  # noqa: SIM115 (held open)

    def __len__(self) -> int:
        return self.manifest.entity_count

    def close(self) -> None:
        self._meta.close()

    def rows(self, name: str, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """float16 rows of one store field (fancy-indexed from the memory map)."""
        return np.asarray(self.fields[name][np.asarray(rows, dtype=np.int64)])

    def entity(self, row: int) -> dict[str, Any]:
        """Metadata of one row: {"id", "name", "attributes", "images"}."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} outside 0..{len(self) - 1}")
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        line = os.pread(self._meta.fileno(), end - start, start)
        return dict(json.loads(line))

    def row_of(self, entity_id: str) -> int | None:
        """Row of an entity id, or None (verified against the metadata, so hash collisions
        between distinct ids cannot return a wrong row)."""
        h = np.uint64(id_hash(entity_id))
        i = int(np.searchsorted(self.id_hashes, h))
        while i < len(self.id_hashes) and self.id_hashes[i] == h:
            row = int(self.id_rows[i])
            if self.entity(row)["id"] == entity_id:
                return row
            i += 1
        return None


__all__ = [
    "ENTITIES_FILE",
    "FAISS_FILE",
    "MANIFEST_FILE",
    "OFFSETS_FILE",
    "RETRIEVAL_FILE",
    "STORE_DIR",
    "EntityStore",
    "IndexMismatchError",
    "Manifest",
    "append_raw",
    "id_hash",
    "raw_memmap",
    "write_id_table",
]
