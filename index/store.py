"""The index folder: entity feature store, entity metadata, id table, manifest.

One build = one self-describing folder::

    <index>/manifest.json          see :class:`Manifest`
    <index>/faiss.index            FAISS index over the retrieval vectors (row = entity row)
    <index>/store/<field>.f16      raw little-endian float16, shape (N, *field_shape) from the
                                   manifest; memory-mapped at serving time; appendable
    <index>/store/<field>.q8       (fields the manifest codes ``q8``) int8 values, with
    <index>/store/<field>.q8s.f16  one float16 scale per last-axis row: value = q x scale
    <index>/store/image/<field>.*  (v2) the fields that depend on the entity's image alone,
                                   one row per stored image record; row 0 is the "no image"
                                   record, shared by every entity without an image
    <index>/store/image_row.i32    (v2) int32 (N,) each entity's row in store/image/
    <index>/entities.jsonl         entity metadata, one line per row (id, name, attributes, images)
    <index>/entities.offsets       uint64 (N + 1,) byte offsets into entities.jsonl (O(1) row reads)
    <index>/ids.u64                uint64 (N,) sorted 64-bit hashes of entity ids ...
    <index>/ids.rows               int64 (N,) ... and the row of each, for id -> row lookups
    <index>/lexical/               trigram tf-idf index of names and aliases (index/lexical.py)
    <index>/retrieval.f32          float32 (N, d) retrieval vectors, when the index refines

Raw files (not .npy) so that incremental adds append in place without rewriting a header.
Nothing here needs the whole KB in RAM: readers memory-map, writers stream.

Version 1 folders (every field per entity, float16) stay readable; a version 2 folder is
refused by code from before it with "not a mel-index v<=1 manifest".
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
IMAGE_DIR = "image"  # under STORE_DIR
IMAGE_ROW_FILE = "image_row.i32"  # under STORE_DIR
# float32 (N, retrieval_dim): each row's retrieval vector, written when the index refines
# (index/ann.py): the exact rescoring reads it memory-mapped. float32, not float16: this CPU
# has no fast float16 conversion (measured: 22 ns per value, 330 ms for one batch of 32 x 1000)
RETRIEVAL_FILE = "retrieval.f32"
INDEX_FORMAT = "mel-index"
INDEX_VERSION = 2  # 2: the image table and per-field codecs; 1 is still read
CODECS = ("f16", "q8")


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
    # How the encoder's frozen towers ran when the entities were encoded
    # (models/onnx_encoders.py: torch, onnx, onnx-int8); the server must encode mentions the
    # same way. Folders from before the setting were all encoded by torch.
    encoder_runtime: str = "torch"
    # (v2) fields stored once per image record (store/image/) instead of once per entity,
    # how many image records there are, and each field's codec (absent: f16)
    image_fields: list[str] = field(default_factory=list)
    image_count: int = 0
    field_codecs: dict[str, str] = field(default_factory=dict)
    # (v2) {"entity_bytes": bytes every entity has, "image_bytes": bytes per image record}
    store_layout: dict[str, int] = field(default_factory=dict)
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

    def check_encoder_runtime(self, runtime: str) -> None:
        if runtime != self.encoder_runtime:
            raise IndexMismatchError(
                f"index entities were encoded with encoder runtime {self.encoder_runtime!r}, "
                f"but mentions would be encoded with {runtime!r}: set encoder_runtime="
                f"{self.encoder_runtime} (MEL_ENCODER_RUNTIME) or rebuild the index with "
                f"`mel-index build --encoder-runtime {runtime}`"
            )


def codec_of(manifest: Manifest, name: str) -> str:
    return manifest.field_codecs.get(name, "f16")


def field_files(name: str, codec: str) -> tuple[str, ...]:
    """The files (under the store folder) of one field: values, then the scales of ``q8``."""
    if codec == "f16":
        return (f"{name}.f16",)
    if codec == "q8":
        return (f"{name}.q8", f"{name}.q8s.f16")
    raise ValueError(f"unknown store codec {codec!r} (known: {CODECS})")


def row_bytes(shape: Sequence[int], codec: str) -> int:
    """Bytes one row of a field of per-row ``shape`` takes with ``codec``."""
    n = int(np.prod(shape))
    if codec == "f16":
        return 2 * n
    return n + 2 * int(np.prod(shape[:-1]))  # int8 values + a float16 scale per last-axis row


def encode_rows(values: np.ndarray, codec: str) -> list[np.ndarray]:
    """Rows (n, *shape) coded for storage, one array per file of :func:`field_files`.

    ``q8``: symmetric int8 per last-axis row, scale = max |x| / 127 rounded to float16 first
    (so the decoded value is exactly q x the stored scale; |error| <= scale / 2).
    """
    if codec == "f16":
        return [np.asarray(values, dtype="<f2")]
    if codec != "q8":
        raise ValueError(f"unknown store codec {codec!r} (known: {CODECS})")
    x = np.asarray(values, dtype=np.float32)
    scale = (np.abs(x).max(axis=-1) / 127.0).astype("<f2")
    s32 = scale.astype(np.float32)[..., None]
    q = np.divide(x, s32, out=np.zeros_like(x), where=s32 > 0)
    return [np.clip(np.rint(q), -127, 127).astype(np.int8), scale]


def half_to_float(values: np.ndarray) -> np.ndarray:
    """float16 -> float32, exactly (every float16 is a float32), through torch: numpy's
    conversion is scalar, ~10x slower (0.056 against 0.006 ms for 100 rows of 384 here)."""
    import torch  # loaded by every reader of a store; imported here to keep this module light

    return torch.from_numpy(np.ascontiguousarray(values, dtype="<f2")).float().numpy()


class StoredField:
    """Read side of one field (per entity, or per image record): float32 rows by index."""

    def __init__(self, folder: Path, name: str, shape: Sequence[int], n: int, codec: str) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.codec = codec
        files = field_files(name, codec)
        if codec == "f16":
            self.values = raw_memmap(folder / files[0], "<f2", (n, *self.shape))
            self.scales: np.ndarray | None = None
        else:
            self.values = raw_memmap(folder / files[0], np.int8, (n, *self.shape))
            self.scales = raw_memmap(folder / files[1], "<f2", (n, *self.shape[:-1]))

    def take_stored(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows ``idx`` as stored: the values (float16, or int8 for ``q8``) and the ``q8``
        scales (float16, one per last-axis row; None for float16). :meth:`take` decodes
        them: ``values.astype(float32) * scales.astype(float32)[..., None]``."""
        v = np.asarray(self.values[idx])
        return v, (None if self.scales is None else np.asarray(self.scales[idx]))

    def take(self, idx: np.ndarray) -> np.ndarray:
        """float32 rows ``idx`` (decoded)."""
        v = np.asarray(self.values[idx])
        if self.scales is None:
            return half_to_float(v)
        out = v.astype(np.float32)
        out *= np.asarray(self.scales[idx]).astype(np.float32)[..., None]
        return out


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
    # a plain ndarray over the mapping: np.memmap's Python-level __getitem__ and
    # __array_finalize__ ran on every row read (~70 per fused request), for nothing it offers
    return np.memmap(path, dtype=dtype, mode="r", shape=tuple(shape)).view(np.ndarray)


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
        m = self.manifest
        n = m.entity_count
        store = self.folder / STORE_DIR
        images = set(m.image_fields)
        self.fields: dict[str, StoredField] = {
            name: StoredField(
                store / IMAGE_DIR if name in images else store,
                name,
                shape,
                m.image_count if name in images else n,
                codec_of(m, name),
            )
            for name, shape in m.store_fields.items()
        }
        self.image_rows = (
            raw_memmap(store / IMAGE_ROW_FILE, "<i4", (n,)) if m.image_fields else None
        )
        self.offsets = raw_memmap(self.folder / OFFSETS_FILE, "<u8", (n + 1,))
        self.id_hashes = raw_memmap(self.folder / IDS_HASH_FILE, "<u8", (n,))
        self.id_rows = raw_memmap(self.folder / IDS_ROWS_FILE, "<i8", (n,))
        self._meta = open(self.folder / ENTITIES_FILE, "rb")  # noqa: SIM115 (held open)

    def __len__(self) -> int:
        return self.manifest.entity_count

    def close(self) -> None:
        self._meta.close()

    def _index(self, name: str, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        idx = np.asarray(rows, dtype=np.int64)
        if self.image_rows is not None and name in self.manifest.image_fields:
            idx = np.asarray(self.image_rows[idx], dtype=np.int64)
        return idx

    def rows(self, name: str, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """float32 rows of one store field, by entity row (fancy-indexed from the memory map,
        through the image table for the fields stored once per image)."""
        return self.fields[name].take(self._index(name, rows))

    def stored_rows(
        self, name: str, rows: np.ndarray | Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`rows` as stored, not decoded (:meth:`StoredField.take_stored`)."""
        return self.fields[name].take_stored(self._index(name, rows))

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
    "CODECS",
    "ENTITIES_FILE",
    "FAISS_FILE",
    "IMAGE_DIR",
    "IMAGE_ROW_FILE",
    "MANIFEST_FILE",
    "OFFSETS_FILE",
    "RETRIEVAL_FILE",
    "STORE_DIR",
    "EntityStore",
    "IndexMismatchError",
    "Manifest",
    "StoredField",
    "append_raw",
    "codec_of",
    "encode_rows",
    "field_files",
    "half_to_float",
    "id_hash",
    "raw_memmap",
    "row_bytes",
    "write_id_table",
]
