"""Shard bookkeeping: which build a folder's chunks belong to, and a merge's complete chunk set.

Every build folder holds ``shard.json``: the KB (path, size, mtime), the model fingerprint, the
chunking and the shard. A re-run into the same folder must match it (then it resumes), a merge
takes shard folders of one build only, and a finished 1-shard folder is reused only for the
very KB it was built from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from index.errors import (
    DuplicateChunkError,
    ForeignChunksError,
    IncompleteBuildError,
    ShardMismatchError,
)
from index.writer import finished_chunks

SHARD_FILE = "shard.json"
# what shard folders of one build share (their kb path may differ: one machine each)
SAME_BUILD_KEYS = (
    "chunk_size",
    "total_chunks",
    "kb_bytes",
    "model_fingerprint",
    "num_shards",
    "drin_fields",
    "encoder_runtime",
)


def shard_record(
    kb: Path,
    *,
    num_shards: int,
    shard_id: int,
    chunk_size: int,
    total_chunks: int,
    model_fingerprint: str,
    drin_fields: bool,
    encoder_runtime: str = "torch",
) -> dict[str, Any]:
    """The ``shard.json`` of one shard's build (key order is the file's)."""
    st = kb.stat()
    return {
        "num_shards": num_shards,
        "shard_id": shard_id,
        "chunk_size": chunk_size,
        "total_chunks": total_chunks,
        "kb": str(kb.resolve()),
        "kb_bytes": st.st_size,
        "kb_mtime_ns": st.st_mtime_ns,
        "model_fingerprint": model_fingerprint,
        "image_root": str(kb.parent.resolve()),
        "drin_fields": drin_fields,
        "encoder_runtime": encoder_runtime,
    }


def claim(out: Path, shard: dict[str, Any]) -> None:
    """Record ``shard`` as the build of ``out``; refuse a folder holding another build's chunks."""
    prev = out / SHARD_FILE
    if prev.is_file():
        old = json.loads(prev.read_text())
        if {k: old.get(k) for k in shard} != shard:
            raise ForeignChunksError(
                f"{out} holds chunks of a different build ({old}); use a new --out"
            )
    prev.write_text(json.dumps(shard, indent=1))


def collect_chunks(shard_dirs: Sequence[Path]) -> tuple[list[Path], dict[str, Any]]:
    """Every chunk of a complete build, in KB order, from one or more shard folders, and the
    build's ``shard.json``."""
    infos = [json.loads((d / SHARD_FILE).read_text()) for d in shard_dirs]
    for d, info in zip(shard_dirs, infos, strict=True):
        if any(info.get(k) != infos[0].get(k) for k in SAME_BUILD_KEYS):
            raise ShardMismatchError(f"{d} belongs to a different build than {shard_dirs[0]}")
    found: dict[int, Path] = {}
    for d in shard_dirs:
        for cid, c in finished_chunks(d):
            if cid in found:
                raise DuplicateChunkError(
                    f"chunk {cid} appears in both {found[cid].parent.parent} and {d}"
                )
            found[cid] = c
    missing = [c for c in range(infos[0]["total_chunks"]) if c not in found]
    if missing:
        raise IncompleteBuildError(
            f"incomplete build: {len(missing)} chunk(s) missing (e.g. {missing[:5]}); "
            f"run the remaining shards (or re-run a killed one) first"
        )
    return [found[c] for c in sorted(found)], infos[0]


def same_kb(out: Path, kb: Path) -> bool:
    """Whether ``out`` was built from this very KB file (path, size and modification time)."""
    shard = out / SHARD_FILE
    if not shard.is_file() or not kb.is_file():
        return False
    info = json.loads(shard.read_text())
    st = kb.stat()
    return (
        info.get("kb") == str(kb.resolve())
        and info.get("kb_bytes") == st.st_size
        and info.get("kb_mtime_ns") == st.st_mtime_ns
    )


__all__ = ["SAME_BUILD_KEYS", "SHARD_FILE", "claim", "collect_chunks", "same_kb", "shard_record"]
