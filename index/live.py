"""Live updates of an index folder: entities added, replaced and deleted while it is served.

The folder ``mel-index build`` wrote is the *base*; every acknowledged update is one *segment*
under ``<index>/live/``, applied in order on top of it (an LSM tree's habit: the base is never
rewritten in place, so an update costs what it adds, not what the KB holds)::

    <index>/live/s00000001/
        entities.jsonl   the added or replacing entities (the store's metadata lines)
        <field>.npy      float16 store fields of those entities, one row each (the base's fields)
        retrieval.npy    float32 retrieval vectors of those rows (the FAISS keys)
        deletes.json     ids this update deleted
        meta.json        {"seq", "base", "model_fingerprint", "added", "deleted", "at"}
    <index>/uploads/<sha256>.<ext>   image bytes sent with live entities (their ``images``)

A segment is written under a ``.tmp`` name, every file fsynced, then renamed into place and the
directory fsynced: a folder named ``sNNNNNNNN`` is complete, and the rename is the commit point.
A writer killed before it leaves only a ``.tmp`` folder (ignored, then removed), so nothing
acknowledged is lost and no entity is half written. Two writers racing for one sequence number
cannot both win the rename; the loser re-reads and takes the next.

Row numbers: base rows are ``0 .. N-1``; the ``j``-th entity added by the applied segments is row
``N + j``. A replaced or deleted entity's old row becomes a *tombstone*: filtered out of every
search before ranking, never returned again. ``mel-index compact`` folds segments and tombstones
into a new base (:func:`compact`); a rebuild (``mel-index build``) starts a new base, and segments
written against another base are ignored (logged).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import torch

from index.lexical import Postings, build_lexical
from index.search import Candidates, IndexSearcher, LexicalHits
from index.store import (
    ENTITIES_FILE,
    OFFSETS_FILE,
    STORE_DIR,
    Manifest,
    append_raw,
    id_hash,
    write_id_table,
)

if TYPE_CHECKING:
    from models.onnx_kernel import StoredRecords

logger = logging.getLogger(__name__)

LIVE_DIR = "live"
UPLOADS_DIR = "uploads"
LOCK_FILE = ".live.lock"
RETRIEVAL_FILE = "retrieval.npy"
DELETES_FILE = "deletes.json"
SEGMENT_META = "meta.json"
_SEGMENT = re.compile(r"^s(\d{8})$")
_BLOCK = 65_536  # base rows copied at a time by compact


KeysOf = Callable[[torch.Tensor, torch.Tensor], np.ndarray]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class LiveUpdateError(RuntimeError):
    """An update that cannot be applied (another writer holds the folder, bad segment)."""


def base_version(m: Manifest) -> str:
    """Identity of a base folder: what segments are written against (and the index_version)."""
    key = f"{m.model_fingerprint}:{m.entity_count}:{m.built_at}:{len(m.history)}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def folder_lock(folder: Path, timeout_s: float = 10.0) -> Iterator[None]:
    """Exclusive lock of an index folder's live part (``<index>/.live.lock``): one writer or
    one compaction at a time, across processes. Raises :class:`LiveUpdateError` on timeout."""
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LiveUpdateError(
                        f"{folder} is locked by another writer or a compaction"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def segments(folder: Path) -> list[tuple[int, Path]]:
    """Complete segments of an index folder, by sequence number."""
    live = folder / LIVE_DIR
    if not live.is_dir():
        return []
    out = []
    for p in live.iterdir():
        m = _SEGMENT.match(p.name)
        if m and (p / SEGMENT_META).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def save_upload(folder: Path, data: bytes, fmt: str) -> str:
    """Store an uploaded image (content-addressed, fsynced); its path relative to ``folder``."""
    up = folder / UPLOADS_DIR
    up.mkdir(exist_ok=True)
    name = f"{hashlib.sha256(data).hexdigest()}.{fmt.lower()}"
    if not (up / name).is_file():
        tmp = up / f".{name}.{os.getpid()}.tmp"
        _write_durable(tmp, data)
        tmp.replace(up / name)
        _fsync_dir(up)
    return f"{UPLOADS_DIR}/{name}"


def write_segment(
    folder: Path,
    base: str,
    model_fingerprint: str,
    entities: Sequence[dict[str, Any]],
    fields: dict[str, np.ndarray],
    retrieval: np.ndarray,
    deletes: Sequence[str],
) -> int:
    """Commit one update (call it holding :func:`folder_lock`); returns its sequence number.

    ``entities``: metadata of the added / replacing entities; ``fields``: their float16 store
    fields, ``(n, *shape)``; ``retrieval``: their float32 retrieval vectors ``(n, dim)``."""
    n = len(entities)
    if any(len(a) != n for a in fields.values()) or len(retrieval) != n:
        raise ValueError("every field needs one row per entity")
    live = folder / LIVE_DIR
    live.mkdir(exist_ok=True)
    for p in live.glob(".s*.tmp"):  # left by a killed writer (we hold the lock: none is live)
        shutil.rmtree(p, ignore_errors=True)
    seq = (segments(folder)[-1][0] if segments(folder) else 0) + 1
    tmp = live / f".s{seq:08d}.{os.getpid()}.tmp"
    tmp.mkdir()
    lines = b"".join((json.dumps(e, ensure_ascii=False) + "\n").encode("utf-8") for e in entities)
    _write_durable(tmp / ENTITIES_FILE, lines)
    for name, arr in fields.items():
        _save_npy(tmp / f"{name}.npy", np.ascontiguousarray(arr, dtype="<f2"))
    _save_npy(tmp / RETRIEVAL_FILE, np.ascontiguousarray(retrieval, dtype=np.float32))
    _write_durable(tmp / DELETES_FILE, json.dumps(list(deletes)).encode())
    meta = {
        "seq": seq,
        "base": base,
        "model_fingerprint": model_fingerprint,
        "added": n,
        "deleted": len(deletes),
        "at": _now(),
    }
    _write_durable(tmp / SEGMENT_META, json.dumps(meta).encode())
    _fsync_dir(tmp)
    try:
        tmp.rename(live / f"s{seq:08d}")  # the commit point
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LiveUpdateError(f"segment {seq} of {folder} was written by another writer") from exc
    _fsync_dir(live)
    return seq


@dataclass(frozen=True)
class Segment:
    seq: int
    entities: list[dict[str, Any]]
    fields: dict[str, np.ndarray]
    retrieval: np.ndarray
    deletes: list[str]


def read_segment(path: Path, manifest: Manifest) -> Segment | None:
    """A complete segment, checked against the base; None if written against another base."""
    meta = json.loads((path / SEGMENT_META).read_text(encoding="utf-8"))
    if meta["base"] != base_version(manifest):
        logger.warning("%s was written against another base (%s): ignored", path, meta["base"])
        return None
    if meta["model_fingerprint"] != manifest.model_fingerprint:
        raise LiveUpdateError(f"{path} was encoded by model {meta['model_fingerprint']}")
    lines = (path / ENTITIES_FILE).read_bytes().splitlines()
    entities = [json.loads(x) for x in lines]
    fields = {f: np.load(path / f"{f}.npy") for f in manifest.store_fields}
    retrieval = np.load(path / RETRIEVAL_FILE)
    n = int(meta["added"])
    shapes_ok = all(
        a.shape == (n, *manifest.store_fields[f]) for f, a in fields.items()
    ) and retrieval.shape == (n, manifest.retrieval_dim)
    if len(entities) != n or not shapes_ok:
        raise LiveUpdateError(f"{path}: rows disagree with its meta.json (corrupt segment)")
    deletes = json.loads((path / DELETES_FILE).read_text(encoding="utf-8"))
    return Segment(int(meta["seq"]), entities, fields, retrieval, list(deletes))


def _pad(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    B = rows.shape[0]
    r = np.full((B, k), -1, dtype=np.int64)
    s = np.zeros((B, k), dtype=np.float32)
    n = min(k, rows.shape[1])
    r[:, :n], s[:, :n] = rows[:, :n], scores[:, :n]
    return r, s


def _merge(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the best ``k`` of two (rows, scores) lists (-1 rows are padding)."""
    rows = np.concatenate([a[0], b[0]], axis=1)
    scores = np.concatenate([a[1], b[1]], axis=1).astype(np.float32)
    key = np.where(rows >= 0, scores, -np.inf)
    order = np.argsort(-key, axis=1, kind="stable")[:, :k]
    rows = np.take_along_axis(rows, order, axis=1)
    scores = np.take_along_axis(scores, order, axis=1)
    scores[rows < 0] = 0.0
    return _pad(rows, scores, k)


class LiveSearcher(IndexSearcher):
    """An index folder's base plus its live segments, as one :class:`IndexSearcher`.

    Reads are the base's where a row is a base row and the segments' (held in memory; compact
    when they grow) otherwise. Tombstoned rows never leave :meth:`search` or :meth:`lexical`:
    the base is asked for ``k`` + (tombstones) and the dead filtered before anything ranks them.
    Not thread-safe against :meth:`refresh`: the server applies updates on its model thread.
    """

    def __init__(self, folder: str | os.PathLike[str], model_fingerprint: str, **kw: Any) -> None:
        super().__init__(folder, model_fingerprint, **kw)
        self.base_n = self.manifest.entity_count
        self.base_version = base_version(self.manifest)
        self.generation = 0  # sequence number of the last applied segment
        self._last_segment = ""
        self._meta: list[dict[str, Any]] = []
        self._live: dict[str, np.ndarray] = {
            f: np.zeros((0, *shape), dtype="<f2") for f, shape in self.manifest.store_fields.items()
        }
        self._retrieval = np.zeros((0, self.manifest.retrieval_dim), dtype=np.float32)
        self._alive = np.zeros(0, dtype=bool)
        self._live_row: dict[str, int] = {}  # id -> row of its live version
        self._dead_base: set[int] = set()
        self._dead_sorted = np.zeros(0, dtype=np.int64)
        self._flat: Any = None
        self._flat_rows = np.zeros(0, dtype=np.int64)
        self._names: Postings | None = None
        self.refresh()

    # ------------------------------------------------------------------ updates
    def refresh(self) -> int:
        """Apply the segments written since the last call (by this or another process);
        returns how many were applied."""
        new = [(s, p) for s, p in segments(self.folder) if s > self.generation]
        applied = 0
        for seq, path in new:
            seg = read_segment(path, self.manifest)
            if seg is not None:
                self._apply(seg)
                applied += 1
            self.generation = seq
            meta = (path / SEGMENT_META).read_bytes()
            self._last_segment = hashlib.sha256(meta).hexdigest()[:8]
        if applied:
            self._reindex()
        return applied

    def _kill(self, entity_id: str) -> bool:
        row = self._live_row.pop(entity_id, None)
        if row is not None:
            self._alive[row - self.base_n] = False
            return True
        base = super().row_of(entity_id)
        if base is not None and base not in self._dead_base:
            self._dead_base.add(base)
            return True
        return False

    def _apply(self, seg: Segment) -> None:
        start = self.base_n + len(self._meta)
        # the rows first, then the ids that point at them (a reader on another thread never
        # finds an id whose row is not there yet)
        self._meta.extend(seg.entities)
        for f, arr in seg.fields.items():
            self._live[f] = np.concatenate([self._live[f], arr])
        self._retrieval = np.concatenate([self._retrieval, seg.retrieval.astype(np.float32)])
        self._alive = np.concatenate([self._alive, np.ones(len(seg.entities), dtype=bool)])
        for eid in seg.deletes:
            self._kill(eid)
        for j, ent in enumerate(seg.entities):
            self._kill(ent["id"])
            self._live_row[ent["id"]] = start + j

    def _reindex(self) -> None:
        """Derived state after updates: the sorted tombstones, the exact inner-product index
        of the live rows and their name postings (scored on the base's idf, so a live name and a
        base name with the same grams score alike)."""
        self._dead_sorted = np.array(sorted(self._dead_base), dtype=np.int64)
        alive = np.flatnonzero(self._alive)
        self._flat_rows = alive + self.base_n
        self._flat = faiss.IndexFlatIP(self.manifest.retrieval_dim)
        if len(alive):
            self._flat.add(np.ascontiguousarray(self._retrieval[alive]))
        if self._lexical is not None:
            names = [
                (
                    int(r),
                    [
                        self._meta[r - self.base_n]["name"],
                        *self._meta[r - self.base_n].get("aliases", ()),
                    ],
                )
                for r in self._flat_rows
            ]
            self._names = Postings.of_names(names, self._lexical.idf_of)

    def contains(self, entity_id: str) -> bool:
        return self.row_of(entity_id) is not None

    # ------------------------------------------------------------------ reads
    def __len__(self) -> int:
        return self.base_n - len(self._dead_base) + int(self._alive.sum())

    @property
    def live_entities(self) -> int:
        """Entities added or replaced since the base was built (alive ones)."""
        return int(self._alive.sum())

    @property
    def tombstones(self) -> int:
        return len(self._dead_base) + int((~self._alive).sum())

    @property
    def version(self) -> str:
        """The base's identity, plus the last applied segment (its number and a hash of its
        meta.json: two copies of one base updated apart never share a version)."""
        if not self.generation:
            return self.base_version
        return f"{self.base_version}.{self.generation}-{self._last_segment}"

    def _drop_dead(
        self, rows: np.ndarray, scores: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        if len(self._dead_sorted):
            dead = np.isin(rows, self._dead_sorted)
            rows = np.where(dead, -1, rows)
            key = np.where(rows >= 0, scores, -np.inf)
            order = np.argsort(-key, axis=1, kind="stable")
            rows = np.take_along_axis(rows, order, axis=1)
            scores = np.take_along_axis(scores, order, axis=1)
            scores = np.where(rows >= 0, scores, 0.0)
        return _pad(rows, scores, k)

    def search(self, queries: np.ndarray, k: int) -> Candidates:
        base = super().search(queries, k + len(self._dead_base))
        kept = self._drop_dead(base.rows, base.retrieval, k)
        if self._flat is not None and self._flat.ntotal:
            s, i = self._flat.search(
                np.ascontiguousarray(queries, dtype=np.float32), min(k, self._flat.ntotal)
            )
            live = (np.where(i >= 0, self._flat_rows[np.maximum(i, 0)], -1), s)
            kept = _merge(kept, live, k)
        return Candidates.dense(*kept)

    def lexical(self, queries: list[str], k: int) -> LexicalHits:
        hits = super().lexical(queries, k + len(self._dead_base))
        rows, scores = self._drop_dead(hits.rows, hits.scores, k)
        if self._names is not None and len(self._names.entry_row):
            assert self._lexical is not None
            lr = np.full((len(queries), k), -1, dtype=np.int64)
            ls = np.zeros((len(queries), k), dtype=np.float32)
            for b, q in enumerate(queries):
                keys, qw = self._lexical.query(q)
                r, s = self._names.top(keys, qw, k, np.inf)
                lr[b, : len(r)], ls[b, : len(s)] = r, s
            rows, scores = _merge((rows, scores), (lr, ls), k)
        return LexicalHits(rows=rows, scores=scores)

    def _fields(self, rows: np.ndarray, names: tuple[str, ...]) -> list[torch.Tensor]:
        flat = np.where(rows < 0, 0, rows).reshape(-1)
        live = flat >= self.base_n
        if not live.any():
            return super()._fields(rows, names)
        out = []
        for f in names:
            shape = self.manifest.store_fields[f]
            arr = np.empty((len(flat), *shape), dtype=np.float32)
            arr[~live] = self.store.rows(f, flat[~live])  # decoded by the base's codec
            arr[live] = self._live[f][flat[live] - self.base_n]
            out.append(torch.from_numpy(arr).reshape(*rows.shape, *shape))
        return out

    def stored_records(self, rows: np.ndarray) -> StoredRecords | None:
        """The base's stored records, or None once a live row is among ``rows``: live rows
        are kept as float16 per entity, not coded as the base."""
        if (rows >= self.base_n).any():
            return None
        return super().stored_records(rows)

    def image_rows(self, rows: np.ndarray) -> np.ndarray | None:
        """The base's image-record rows (shared image fields), or None once a live row is
        among ``rows``: live entities store every field per entity, so nothing is shared."""
        if (rows >= self.base_n).any():
            return None
        return super().image_rows(rows)

    def entity(self, row: int) -> dict[str, Any]:
        if row >= self.base_n:
            return dict(self._meta[row - self.base_n])
        return self.store.entity(row)

    def row_of(self, entity_id: str) -> int | None:
        """Row of an entity's current version, or None (never a tombstone)."""
        row = self._live_row.get(entity_id)
        if row is not None:
            return row
        base = super().row_of(entity_id)
        return None if base is None or base in self._dead_base else base

    def alive_rows(self) -> Iterator[tuple[int, bool]]:
        """(row, live?) of every alive entity, base rows first, in row order."""
        dead = self._dead_base
        for r in range(self.base_n):
            if r not in dead:
                yield r, False
        for j in np.flatnonzero(self._alive).tolist():
            yield j + self.base_n, True


def compact(
    folder: str | os.PathLike[str],
    keys_of: KeysOf,
    out: str | os.PathLike[str] | None = None,
) -> Manifest:
    """Fold the live segments and tombstones of ``folder`` into a new base (``out``, or in
    place: built beside, then renamed over ``folder``). The FAISS index keeps the base's
    factory; it is rebuilt from the stored records by ``keys_of(text_cls, cmfu)``, the model's
    retrieval keys (nothing is re-encoded). Holds the folder's
    lock throughout, so no update is written meanwhile and none is lost."""
    from index.ann import AnnSpec, build_index
    from index.writer import write_faiss

    src = Path(folder)
    dst = Path(out) if out is not None else src.with_name(src.name + ".compact.tmp")
    if dst.exists():
        raise LiveUpdateError(f"{dst} exists: choose another --out or remove it")
    t0 = time.perf_counter()
    with folder_lock(src, timeout_s=60):
        m = Manifest.load(src)
        spec = AnnSpec.from_json(m.ann)
        if spec.mips_l2 or spec.refine:  # the transform / refine vectors: the index job's
            raise LiveUpdateError(
                f"{src} was built with ANN options {m.ann}: compaction rebuilds plain "
                "indexes only; rebuild it with mel-index build (same options)"
            )
        searcher = LiveSearcher(src, m.model_fingerprint)
        try:
            dst.mkdir(parents=True)
            (dst / STORE_DIR).mkdir()
            alive = list(searcher.alive_rows())
            n = len(alive)
            append_raw(dst / OFFSETS_FILE, np.zeros(1, dtype="<u8"))
            offset, hashes = 0, np.zeros(n, dtype=np.uint64)
            keys = np.zeros((n, m.retrieval_dim), dtype=np.float32)
            with open(dst / ENTITIES_FILE, "wb") as meta:
                for s in range(0, n, _BLOCK):
                    block = np.array([r for r, _ in alive[s : s + _BLOCK]], dtype=np.int64)
                    for f in m.store_fields:
                        (part,) = searcher.fields(block[None, :], (f,))
                        append_raw(dst / STORE_DIR / f"{f}.f16", part[0].numpy().astype("<f2"))
                    text_cls, cmfu = searcher.fields(block[None, :], ("text_cls", "cmfu"))
                    keys[s : s + len(block)] = keys_of(text_cls[0], cmfu[0])
                    lines = []
                    for j, r in enumerate(block):
                        ent = searcher.entity(int(r))
                        hashes[s + j] = id_hash(ent["id"])
                        lines.append((json.dumps(ent, ensure_ascii=False) + "\n").encode())
                    sizes = np.array([len(x) for x in lines], dtype=np.int64)
                    append_raw(dst / OFFSETS_FILE, (offset + np.cumsum(sizes)).astype("<u8"))
                    offset += int(sizes.sum())
                    meta.write(b"".join(lines))
            write_id_table(dst, hashes)
            src_up = src / UPLOADS_DIR
            if src_up.is_dir():  # only the images an alive entity still points at
                (dst / UPLOADS_DIR).mkdir()
                for r, live in alive:
                    if not live:
                        continue
                    for p in searcher.entity(r).get("images", ()):
                        if p.startswith(UPLOADS_DIR + "/") and (src / p).is_file():
                            shutil.copy2(src / p, dst / p)
            index = build_index(
                m.retrieval_dim, m.factory, n, lambda a, b: keys[a:b], use_gpu=False
            )
            write_faiss(index, dst)
            # the version 1 layout (every field per entity, float16): what this writer makes
            new = dataclasses.replace(
                m,
                entity_count=n,
                built_at=_now(),
                version=1,
                image_fields=[],
                image_count=0,
                field_codecs={},
                store_layout={},
                store_bytes_per_entity=sum(
                    2 * int(np.prod(shape)) for shape in m.store_fields.values()
                ),
            )
            new.history = [
                *m.history,
                {
                    "compacted": {
                        "from": str(src.resolve()),
                        "segments": searcher.generation,
                        "live_entities": searcher.live_entities,
                        "tombstones": searcher.tombstones,
                    },
                    "seconds": round(time.perf_counter() - t0, 2),
                    "at": _now(),
                },
            ]
            new.save(dst)
            new.lexical = build_lexical(dst, n)
            new.save(dst)
        finally:
            searcher.close()
        if out is None:  # swap the folders: the old one is removed once the new one is in place
            old = src.with_name(src.name + f".old-{os.getpid()}")
            src.rename(old)
            dst.rename(src)
            shutil.rmtree(old, ignore_errors=True)
            dst = src
    logger.info(
        "compacted %s -> %s: %d entities (%d live folded in, %d tombstones dropped)",
        folder,
        dst,
        n,
        searcher.live_entities,
        searcher.tombstones,
    )
    return Manifest.load(dst)


__all__ = [
    "LIVE_DIR",
    "UPLOADS_DIR",
    "LiveSearcher",
    "LiveUpdateError",
    "Segment",
    "base_version",
    "compact",
    "folder_lock",
    "read_segment",
    "save_upload",
    "segments",
    "write_segment",
]
