"""Writer stage of the index job, and every file it writes: chunk folders, the store, FAISS.

A chunk folder ``<out>/chunks/cNNNNNNN/`` holds one encoded chunk: ``<field>.npy`` (float16
store fields), ``entities.jsonl``, ``report.json`` (its bad records) and ``done``. It is
written under a ``.tmp`` name and renamed, so a folder without ``.tmp`` is complete and a killed
build resumes from the last finished chunk. Finished chunks are appended, in KB order and without
duplicate ids, to the store files of an index folder (:mod:`index.store`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index.dedupe import IdDeduper
from index.reader import KBChunk
from index.store import ENTITIES_FILE, FAISS_FILE, OFFSETS_FILE, STORE_DIR, append_raw
from models.data.schema import Entity, RecordReport

CHUNKS_DIR = "chunks"
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


def append_chunks(
    out: Path,
    chunks: Sequence[Path],
    dedupe: IdDeduper,
    start_row: int,
    report: RecordReport,
    field_names: Sequence[str],
) -> tuple[int, np.ndarray]:
    """Append chunk contents to the store/metadata files; returns (new rows, their id hashes)."""
    store = out / STORE_DIR
    store.mkdir(exist_ok=True)
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
            for name in field_names:
                append_raw(store / f"{name}.f16", np.load(chunk / f"{name}.npy")[keep])
            sizes = np.array([len(lines[i]) for i in keep], dtype=np.int64)
            append_raw(out / OFFSETS_FILE, (offset + np.cumsum(sizes)).astype("<u8"))
            offset += int(sizes.sum())
            meta.write(b"".join(lines[i] for i in keep))
            kept_hashes.append(dedupe.hashes_of(ci, keep))
            rows += len(keep)
    hashes = np.concatenate(kept_hashes) if kept_hashes else np.zeros(0, np.uint64)
    return rows, hashes


def write_faiss(index: Any, folder: Path) -> None:
    """Replace ``<folder>/faiss.index`` atomically: a reader sees the old index or the new one."""
    tmp = folder / (FAISS_FILE + ".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(folder / FAISS_FILE)


__all__ = [
    "CHUNKS_DIR",
    "ChunkWriter",
    "append_chunks",
    "chunk_folder",
    "chunk_report",
    "finished_chunks",
    "is_complete",
    "report_from_json",
    "write_chunk",
    "write_faiss",
]
