"""Encoded chunks -> an index folder: the store, the id table, the manifest and FAISS.

``finalize`` concatenates a complete set of chunks (from one build folder, or from the shard
folders of a sharded build) in KB order into a fresh folder, dropping duplicate ids (counted).
``extend_index`` appends chunks to an existing folder without touching the old rows, and adds
their vectors to its FAISS index. Both then (re)build the folder's lexical index of names and
aliases (:mod:`index.lexical`) from its ``entities.jsonl``.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
import torch

from index.ann import AnnSpec, build_index, max_key_norm, mips_to_l2
from index.dedupe import IdDeduper
from index.encode import store_fields, store_layout
from index.errors import ModelMismatchError
from index.lexical import build_lexical
from index.shards import collect_chunks
from index.store import (
    ENTITIES_FILE,
    FAISS_FILE,
    OFFSETS_FILE,
    RETRIEVAL_FILE,
    STORE_DIR,
    EntityStore,
    Manifest,
    append_raw,
    write_id_table,
)
from index.writer import StoreLayout, append_chunks, report_from_json, write_faiss
from models.data.schema import RecordReport
from models.mimic import MimicEntityRecord
from models.model import LinkingModel

logger = logging.getLogger(__name__)

RETRIEVAL_VECTOR = (
    "[LN(text_cls) ; h_e]: MIMIC's text_cls after its LayerNorm and the whole "
    "CMFU entity vector; query [LN(m.text_cls)/2 ; h_m], so query.key = "
    "g2g/2 + S_C, the exactly decomposable part of 3 x MIMIC's score"
)
ADD_BLOCK = 65_536  # retrieval vectors derived and added to FAISS at a time


def retrieval_keys(store: EntityStore, model: LinkingModel, start: int, end: int) -> np.ndarray:
    """float32 retrieval vectors of store rows [start, end) (derived, not stored twice)."""
    rec = MimicEntityRecord(
        *(
            torch.from_numpy(store.rows(f, np.arange(start, end))).float()
            for f in MimicEntityRecord.field_names()
        )
    )
    with torch.inference_mode():
        return model.matcher.retrieval_keys(rec).numpy()


def _build_faiss(
    out: Path,
    model: LinkingModel,
    factory: str,
    train_sample: int,
    use_gpu: bool,
    ann: AnnSpec,
) -> AnnSpec:
    """Build and write ``faiss.index``; returns the spec it was built with (M filled in)."""
    store = EntityStore(out)
    try:

        def read(s: int, e: int) -> np.ndarray:
            return retrieval_keys(store, model, s, e)

        (out / RETRIEVAL_FILE).unlink(missing_ok=True)
        if ann.refine:  # the exact vectors a refining searcher rescores with
            for s in range(0, len(store), ADD_BLOCK):
                append_raw(out / RETRIEVAL_FILE, read(s, min(len(store), s + ADD_BLOCK)))
        norm = None
        if ann.mips_l2:
            norm = max_key_norm(len(store), read, ADD_BLOCK)
            ann = replace(ann, max_norm=norm)
        index = build_index(
            model.matcher.retrieval_dim(),
            factory,
            len(store),
            read,
            train_sample=train_sample,
            use_gpu=use_gpu,
            mips_l2_norm=norm,
        )
    finally:
        store.close()
    write_faiss(index, out)
    return ann


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _versions() -> dict[str, str]:
    import transformers

    from index import __version__ as ours

    return {
        "mel-service": ours,
        "faiss": faiss.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def finalize(
    out: Path,
    shard_dirs: Sequence[Path],
    model: LinkingModel,
    factory: str,
    train_sample: int = 100_000,
    device: str = "auto",
    build_seconds: float = 0.0,
    ann: AnnSpec | None = None,
) -> Manifest:
    """Concatenate a complete set of chunks into the index folder ``out``; ``ann`` asks for
    the MIPS-to-L2 transform and / or exact refining (:class:`index.ann.AnnSpec`)."""
    ann = ann or AnnSpec()
    t0 = time.perf_counter()
    chunks, info = collect_chunks(shard_dirs)
    if info["model_fingerprint"] != model.fingerprint():
        raise ModelMismatchError(
            f"chunks were encoded by model {info['model_fingerprint']}, not {model.fingerprint()}"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in (ENTITIES_FILE, OFFSETS_FILE, FAISS_FILE):
        (out / name).unlink(missing_ok=True)
    live = out / "live"  # index.live.LIVE_DIR: updates written against the base replaced here
    if live.is_dir():
        logger.warning("%s: a new base replaces the old one; its live updates are dropped", out)
        shutil.rmtree(live)
    shutil.rmtree(out / STORE_DIR, ignore_errors=True)
    report = RecordReport()
    fields = store_fields(model, bool(info.get("drin_fields", False)))
    image_fields, codecs, sizes = store_layout(fields)
    layout = StoreLayout(tuple(fields), tuple(image_fields), codecs)
    n, hashes, images = append_chunks(out, chunks, IdDeduper(chunks, None), 0, report, layout)
    write_id_table(out, hashes)
    per_entity = _bytes_per_entity(sizes, n, images)
    manifest = Manifest(
        model_fingerprint=model.fingerprint(),
        backbone=model.config.encoder.backend,
        metric="inner_product",
        factory=factory,
        retrieval_dim=model.matcher.retrieval_dim(),
        entity_count=n,
        store_fields=fields,
        retrieval_vector=RETRIEVAL_VECTOR,
        built_at=_now(),
        versions=_versions(),
        git_commit=_git_commit(),
        bad_entities=report.to_json(),
        store_bytes_per_entity=per_entity,
        image_fields=image_fields,
        image_count=images,
        field_codecs=codecs,
        store_layout=sizes,
        # shard records from before the setting: their chunks were encoded by torch
        encoder_runtime=str(info.get("encoder_runtime", "torch")),
    )
    manifest.save(out)  # the store is readable from here on; FAISS comes next
    ann = _build_faiss(out, model, factory, train_sample, device != "cpu", ann)
    manifest.ann = ann.to_json()
    manifest.lexical = build_lexical(out, n)
    manifest.build_seconds = round(build_seconds + time.perf_counter() - t0, 2)
    manifest.save(out)
    report.log(f"index {out}")
    logger.info(
        "index %s: %d entities (%d image records), %s, %d store bytes/entity",
        out,
        n,
        images,
        factory,
        per_entity,
    )
    return manifest


def _bytes_per_entity(sizes: dict[str, int], entities: int, images: int) -> int:
    """What the store takes per entity: every entity's own bytes, plus the image records
    (stored once each; the no-image record once in all) shared out over the entities."""
    total = sizes["entity_bytes"] * entities + sizes["image_bytes"] * images
    return round(total / entities) if entities else sizes["entity_bytes"]


def extend_index(
    out: Path,
    manifest: Manifest,
    shard_dir: Path,
    model: LinkingModel,
    kb: str,
    encode_seconds: float = 0.0,
) -> Manifest:
    """Append the chunks of ``shard_dir`` (encoded by ``model``) to the index folder ``out``.

    Ids already in the index, or repeated among the new entities, are counted as duplicates and
    skipped. FAISS gets the new vectors with ``add`` (Flat, HNSW and trained IVF support it);
    the lexical index is rebuilt over all rows (:func:`index.lexical.build_lexical`). The
    manifest's count, bad entities and history are updated and saved."""
    t0 = time.perf_counter()
    chunks, _ = collect_chunks([shard_dir])
    report = RecordReport()
    start = manifest.entity_count
    store = EntityStore(out, manifest)
    try:
        layout = StoreLayout(
            tuple(manifest.store_fields),
            tuple(manifest.image_fields),  # none: a version 1 folder, appended as such
            dict(manifest.field_codecs),
            manifest.image_count,
        )
        added, new_hashes, new_images = append_chunks(
            out, chunks, IdDeduper(chunks, store), start, report, layout
        )
        row_hashes = np.empty(start, dtype=np.uint64)  # the id table in row order
        row_hashes[np.asarray(store.id_rows)] = np.asarray(store.id_hashes)
    finally:
        store.close()
    write_id_table(out, np.concatenate([row_hashes, new_hashes]))
    manifest.entity_count = start + added
    manifest.image_count += new_images
    if manifest.store_layout:
        manifest.store_bytes_per_entity = _bytes_per_entity(
            manifest.store_layout, manifest.entity_count, manifest.image_count
        )
    index = faiss.read_index(str(out / FAISS_FILE))
    ann = AnnSpec.from_json(manifest.ann)
    store = EntityStore(out, manifest)
    over = 0
    try:
        for s in range(start, start + added, ADD_BLOCK):
            keys = retrieval_keys(store, model, s, min(start + added, s + ADD_BLOCK))
            if ann.refine:
                append_raw(out / RETRIEVAL_FILE, keys)
            if ann.mips_l2:  # the transform of the build (its M): new keys are ranked alike
                over += int((np.linalg.norm(keys, axis=1) > ann.max_norm).sum())
                keys = mips_to_l2(keys, ann.max_norm, index.d)
            index.add(keys)
    finally:
        store.close()
    if over:
        logger.warning(
            "%d added vectors are longer than the index's M = %.3f: FAISS under-ranks them "
            "slightly (refine rescores exactly); rebuild to reset M",
            over,
            ann.max_norm,
        )
    write_faiss(index, out)
    # the lexical index is rebuilt from entities.jsonl (streamed, nothing re-encoded): simple,
    # and the idf of every gram stays exact
    manifest.lexical = build_lexical(out, manifest.entity_count)
    merged = report_from_json(manifest.bad_entities)
    merged.merge(report)
    manifest.bad_entities = merged.to_json()
    manifest.history.append(
        {
            "added": added,
            "kb": str(Path(kb).resolve()),
            "seconds": round(encode_seconds + time.perf_counter() - t0, 2),
            "at": _now(),
            "bad_entities": report.to_json(),
        }
    )
    manifest.save(out)
    return manifest


__all__ = [
    "RETRIEVAL_VECTOR",
    "extend_index",
    "finalize",
    "retrieval_keys",
]
