"""Writer stage of the index job, and every file it writes: chunk folders, the store, FAISS.

A chunk folder ``<out>/chunks/cNNNNNNN/`` holds one encoded chunk: ``<field>.npy`` (float16
store fields, one row per entity), ``has_image.npy``, ``blank.<field>.npy`` (the no-image
record of the image fields), ``entities.jsonl``, ``report.json`` (its bad records) and
``done``. It is written under a ``.tmp`` name and renamed, so a folder without ``.tmp`` is
complete and a killed build resumes from the last finished chunk. Finished chunks are
appended, in KB order and without duplicate ids, to the store files of an index folder
(:mod:`index.store`), as the folder's :class:`StoreLayout` says.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index.dedupe import IdDeduper
from index.reader import KBChunk
from index.store import (
    ENTITIES_FILE,
    FAISS_FILE,
    IMAGE_DIR,
    IMAGE_ROW_FILE,
    OFFSETS_FILE,
    STORE_DIR,
    append_raw,
    encode_rows,
    field_files,
)
from models.data.schema import Entity, RecordReport

CHUNKS_DIR = "chunks"
# Per-chunk extras beside the fields (index/encode.py writes them): which entities have an
# image (bool per entity), and the "no image" record of each image field (one row).
HAS_IMAGE = "has_image"
BLANK_PREFIX = "blank."
DONE_FILE = "done"
REPORT_FILE = "report.json"


def chunk_folder(out: Path, chunk: int) -> Path:
    return out / CHUNKS_DIR / f"c{chunk:07d}"


def is_complete(folder: Path) -> bool:
    return (folder / DONE_FILE).is_file()


def write_chunk(
    folder: Path, entities: list[Entity], fields: dict[str, np.ndarray], report: RecordReport
) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, arr in fields.items():
        np.save(tmp / f"{name}.npy", arr)
    with open(tmp / ENTITIES_FILE, "w", encoding="utf-8") as f:
        for e in entities:
            f.write(json.dumps(e.to_json(), ensure_ascii=False) + "\n")
    (tmp / REPORT_FILE).write_text(json.dumps(report.to_json()))
    (tmp / DONE_FILE).write_text(str(len(entities)))
    tmp.rename(folder)  # atomic: a chunk folder without ".tmp" is complete


class ChunkWriter:
    """Writes each encoded chunk to its folder under ``<out>/chunks``."""

    def __init__(self, out: Path) -> None:
        self.out = out
        (out / CHUNKS_DIR).mkdir(parents=True, exist_ok=True)

    def finished(self, chunks: Sequence[int]) -> set[int]:
        """Which of ``chunks`` an earlier run already wrote completely."""
        return {c for c in chunks if is_complete(chunk_folder(self.out, c))}

    def write(self, chunk: KBChunk, fields: dict[str, np.ndarray]) -> None:
        write_chunk(chunk_folder(self.out, chunk.index), chunk.entities, fields, chunk.report)


def finished_chunks(shard_dir: Path) -> list[tuple[int, Path]]:
    """(chunk id, folder) of every complete chunk folder under ``shard_dir``, by name."""
    return [
        (int(c.name[1:]), c)
        for c in sorted((shard_dir / CHUNKS_DIR).glob("c*"))
        if not c.name.endswith(".tmp") and is_complete(c)
    ]


def report_from_json(d: dict[str, Any]) -> RecordReport:
    """A :class:`RecordReport` back from its ``to_json()`` (a chunk's report, a manifest's)."""
    r = RecordReport()
    for reason, n in d.get("counts", {}).items():
        r.counts[reason] += n
        r.examples[reason] = d.get("examples", {}).get(reason, [])[: r.max_examples]
    return r


def chunk_report(chunk: Path) -> RecordReport:
    return report_from_json(json.loads((chunk / REPORT_FILE).read_text()))


@dataclass(frozen=True)
class StoreLayout:
    """How the store of a folder lays its fields out (index/store.py): ``image_fields`` are
    kept once per image record (none: a version 1 store, every field per entity), each field
    coded by ``codecs`` (absent: f16); ``image_count`` records are there already."""

    fields: tuple[str, ...]
    image_fields: tuple[str, ...] = ()
    codecs: dict[str, str] = field(default_factory=dict)
    image_count: int = 0


def _append_field(folder: Path, name: str, values: np.ndarray, codec: str) -> None:
    for fname, arr in zip(field_files(name, codec), encode_rows(values, codec), strict=True):
        append_raw(folder / fname, arr)


def append_chunks(
    out: Path,
    chunks: Sequence[Path],
    dedupe: IdDeduper,
    start_row: int,
    report: RecordReport,
    layout: StoreLayout,
) -> tuple[int, np.ndarray, int]:
    """Append chunk contents to the store/metadata files; returns (new rows, their id hashes,
    new image records).

    With image fields, an entity with an image appends its image fields as a new record of
    ``store/image/``; one without points at record 0, the "no image" record, written from the
    first chunk when the table is started."""
    store = out / STORE_DIR
    store.mkdir(exist_ok=True)
    images = set(layout.image_fields)
    image_store = store / IMAGE_DIR
    next_image = layout.image_count
    if images and next_image == 0 and chunks:
        image_store.mkdir(exist_ok=True)
        for name in layout.image_fields:  # record 0: the no-image record
            blank = np.load(chunks[0] / f"{BLANK_PREFIX}{name}.npy")
            _append_field(image_store, name, blank, layout.codecs.get(name, "f16"))
        next_image = 1
    offset = (out / ENTITIES_FILE).stat().st_size if (out / ENTITIES_FILE).exists() else 0
    if start_row == 0:
        append_raw(out / OFFSETS_FILE, np.zeros(1, dtype="<u8"))
    kept_hashes: list[np.ndarray] = []
    rows = 0
    with open(out / ENTITIES_FILE, "ab") as meta:
        for ci, chunk in enumerate(chunks):
            report.merge(chunk_report(chunk))
            lines = (chunk / ENTITIES_FILE).read_bytes().splitlines(keepends=True)
            keep = []
            for i, line in enumerate(lines):
                eid = json.loads(line)["id"]
                if dedupe.duplicate(ci, i, eid):
                    report.add("entity.duplicate_id", f"id={eid}")
                    continue
                keep.append(i)
            if not lines:
                continue
            has = np.load(chunk / f"{HAS_IMAGE}.npy")[keep] if images else None
            for name in layout.fields:
                values = np.load(chunk / f"{name}.npy")[keep]
                codec = layout.codecs.get(name, "f16")
                if name in images:
                    _append_field(image_store, name, values[has], codec)
                else:
                    _append_field(store, name, values, codec)
            if has is not None:
                image_rows = np.zeros(len(keep), dtype="<i4")
                image_rows[has] = next_image + np.arange(int(has.sum()))
                next_image += int(has.sum())
                append_raw(store / IMAGE_ROW_FILE, image_rows)
            sizes = np.array([len(lines[i]) for i in keep], dtype=np.int64)
            append_raw(out / OFFSETS_FILE, (offset + np.cumsum(sizes)).astype("<u8"))
            offset += int(sizes.sum())
            meta.write(b"".join(lines[i] for i in keep))
            kept_hashes.append(dedupe.hashes_of(ci, keep))
            rows += len(keep)
    hashes = np.concatenate(kept_hashes) if kept_hashes else np.zeros(0, np.uint64)
    return rows, hashes, next_image - layout.image_count


def write_faiss(index: Any, folder: Path) -> None:
    """Replace ``<folder>/faiss.index`` atomically: a reader sees the old index or the new one."""
    tmp = folder / (FAISS_FILE + ".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(folder / FAISS_FILE)


__all__ = [
    "BLANK_PREFIX",
    "CHUNKS_DIR",
    "HAS_IMAGE",
    "ChunkWriter",
    "StoreLayout",
    "append_chunks",
    "chunk_folder",
    "chunk_report",
    "finished_chunks",
    "is_complete",
    "report_from_json",
    "write_chunk",
    "write_faiss",
]
