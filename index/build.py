"""``mel-index``: the offline job, KB (canonical format) + model -> index folder.

    mel-index build --kb artifacts/demo-world/kb.jsonl --model artifacts/demo-model/best \\
                    --out artifacts/demo-index [--factory Flat|HNSW32|IVF1024,PQ32]
    # the same on N machines / processes, then one merge:
    mel-index build ... --num-shards 4 --shard-id 2 --out shards/2
    mel-index merge --out artifacts/index shards/0 shards/1 shards/2 shards/3
    # append new entities without re-encoding the old ones:
    mel-index add --index artifacts/demo-index --kb new_entities.jsonl

How it works. The KB is streamed in chunks of ``--chunk-size`` raw lines; chunk c belongs to
shard ``c % num_shards``. Each chunk is parsed (bad records counted), its images decoded by a
thread pool, encoded in batches (GPU when present), turned into MIMIC's per-entity records
(``MimicMatcher.precompute_entities``) and written atomically to ``<out>/chunks/cNNNNNN/``.
A killed build re-run with the same arguments skips finished chunks, so it resumes from the
last completed chunk with the same result. ``finalize`` (run by a 1-shard build, and by
``merge``) concatenates chunks in KB order into the float16 store, the metadata files and the
FAISS index, drops duplicate ids (counted), and writes the manifest.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from tqdm import tqdm

from index.ann import build_index
from index.store import (
    ENTITIES_FILE,
    FAISS_FILE,
    OFFSETS_FILE,
    STORE_DIR,
    EntityStore,
    Manifest,
    append_raw,
    id_hash,
    write_id_table,
)
from models.data.schema import Entity, RecordReport, parse_entity
from models.drin_features import STORE_FIELDS as DRIN_FIELDS
from models.drin_features import entity_parts
from models.mimic import MimicEntityRecord
from models.model import LinkingModel
from models.preprocess import entity_text, load_image_or_none

logger = logging.getLogger(__name__)

CHUNKS_DIR = "chunks"
SHARD_FILE = "shard.json"
RETRIEVAL_VECTOR = (
    "[LN(text_cls) ; h_e]: MIMIC's text_cls after its LayerNorm and the whole "
    "CMFU entity vector; query [LN(m.text_cls)/2 ; h_m], so query.key = "
    "g2g/2 + S_C, the exactly decomposable part of 3 x MIMIC's score"
)


@dataclass(frozen=True)
class BuildConfig:
    kb: str
    model: str
    out: str
    factory: str = "Flat"
    # KB lines per chunk: the unit of sharding, resume and progress (and of memory use).
    chunk_size: int = 1024
    batch_size: int = 64
    num_shards: int = 1
    shard_id: int = 0
    workers: int = 4  # image decoding threads
    train_sample: int = 100_000  # vectors used to train IVF / PQ
    device: str = "auto"  # "auto" (cuda when present), "cpu", "cuda"
    progress: bool = True
    # Store DRIN's per-entity parts too (models/drin_features.py): what the "drin" reranker
    # reads. Off saves ~3.3k float16 values per entity (EffNet widths) when DRIN is not served.
    drin_fields: bool = True


def _kb_file(kb: str | Path) -> Path:
    p = Path(kb)
    return p / "kb.jsonl" if p.is_dir() else p


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            n += block.count(b"\n")
    return n


def _iter_chunks(path: Path, chunk_size: int) -> Iterator[tuple[int, int, list[bytes]]]:
    """(chunk id, first line number, raw lines) in KB order."""
    with open(path, "rb") as f:
        c, lines, first = 0, [], 1
        for lineno, line in enumerate(f, start=1):
            lines.append(line)
            if len(lines) == chunk_size:
                yield c, first, lines
                c, lines, first = c + 1, [], lineno + 1
        if lines:
            yield c, first, lines


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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ChunkEncoder:
    """Parses, decodes and encodes KB chunks into per-entity MIMIC records."""

    def __init__(
        self,
        model: LinkingModel,
        image_root: Path,
        batch_size: int,
        workers: int,
        device: torch.device,
        drin_fields: bool = True,
    ) -> None:
        self.model = model.to(device).eval()
        self.drin_fields = drin_fields
        self.image_root = image_root
        self.batch_size = batch_size
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))
        self.device = device

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def parse(self, lines: list[bytes], first_line: int, report: RecordReport) -> list[Entity]:
        out = []
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            where = f"kb.jsonl:{first_line + i}"
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                report.add("entity.bad_json", f"{where}: {exc.msg}")
                continue
            ent = parse_entity(obj, report, where)
            if ent is not None:
                out.append(ent)
        return out

    def _image(self, ent: Entity, report: RecordReport) -> Any:
        if not ent.images:
            return None
        path = self.image_root / ent.images[0]  # the evaluation rule: an entity's first image
        return load_image_or_none(
            path,
            on_error=lambda p, why: report.add(
                "entity.unreadable_image", f"id={ent.id} {p}: {why}"
            ),
        )

    @torch.inference_mode()
    def encode(self, entities: list[Entity], report: RecordReport) -> dict[str, np.ndarray]:
        """float16 store fields (MIMIC records, DRIN parts), one row per entity."""
        parts: dict[str, list[torch.Tensor]] = {}
        encoder = self.model.encoder
        for s in range(0, len(entities), self.batch_size):
            batch = entities[s : s + self.batch_size]
            images = list(self.pool.map(lambda e: self._image(e, report), batch))
            text = encoder.text_features([entity_text(e.name, e.attributes) for e in batch])
            image = encoder.image_features(images)
            rec = self.model.matcher.precompute_entities(encoder.project(text, image))
            fields = {f: getattr(rec, f) for f in MimicEntityRecord.field_names()}
            if self.drin_fields:
                has = torch.tensor([im is not None for im in images], device=text.global_.device)
                fields.update(entity_parts(encoder.backbone, text, image, has).to_store())
            for f, t in fields.items():
                parts.setdefault(f, []).append(t)
        return {f: torch.cat(ts).float().cpu().numpy().astype("<f2") for f, ts in parts.items()}


def _write_chunk(
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
    (tmp / "report.json").write_text(json.dumps(report.to_json()))
    (tmp / "done").write_text(str(len(entities)))
    tmp.rename(folder)  # atomic: a chunk folder without ".tmp" is complete


def encode_shard(cfg: BuildConfig, model: LinkingModel) -> dict[str, Any]:
    """Encode this shard's chunks into ``<out>/chunks`` (skipping finished ones)."""
    kb = _kb_file(cfg.kb)
    if not kb.is_file():
        raise FileNotFoundError(f"no KB file at {kb}")
    out = Path(cfg.out)
    (out / CHUNKS_DIR).mkdir(parents=True, exist_ok=True)
    total_lines = _count_lines(kb)
    total_chunks = -(-total_lines // cfg.chunk_size)
    mine = [c for c in range(total_chunks) if c % cfg.num_shards == cfg.shard_id]
    done = {c for c in mine if (out / CHUNKS_DIR / f"c{c:07d}" / "done").is_file()}
    shard = {
        "num_shards": cfg.num_shards,
        "shard_id": cfg.shard_id,
        "chunk_size": cfg.chunk_size,
        "total_chunks": total_chunks,
        "kb": str(kb.resolve()),
        "kb_bytes": kb.stat().st_size,
        "kb_mtime_ns": kb.stat().st_mtime_ns,
        "model_fingerprint": model.fingerprint(),
        "image_root": str(kb.parent.resolve()),
        "drin_fields": cfg.drin_fields,
    }
    prev = out / SHARD_FILE
    if prev.is_file():
        old = json.loads(prev.read_text())
        if {k: old.get(k) for k in shard} != shard:
            raise SystemExit(f"{out} holds chunks of a different build ({old}); use a new --out")
    prev.write_text(json.dumps(shard, indent=1))
    if done:
        logger.info("resuming: %d of %d chunks of this shard already done", len(done), len(mine))
    enc = ChunkEncoder(
        model, kb.parent, cfg.batch_size, cfg.workers, _device(cfg.device), cfg.drin_fields
    )
    todo_lines = sum(
        min(cfg.chunk_size, total_lines - c * cfg.chunk_size) for c in mine if c not in done
    )
    bar = tqdm(
        total=todo_lines,
        desc=f"shard {cfg.shard_id}/{cfg.num_shards}",
        unit="ent",
        disable=not cfg.progress,
        smoothing=0.1,
    )
    t0, encoded = time.perf_counter(), 0
    try:
        for c, first, lines in _iter_chunks(kb, cfg.chunk_size):
            if c % cfg.num_shards != cfg.shard_id or c in done:
                continue
            report = RecordReport()
            entities = enc.parse(lines, first, report)
            fields = enc.encode(entities, report)
            _write_chunk(out / CHUNKS_DIR / f"c{c:07d}", entities, fields, report)
            encoded += len(entities)
            bar.update(len(lines))
    finally:
        bar.close()
        enc.close()
    secs = time.perf_counter() - t0
    logger.info(
        "shard %d/%d: encoded %d entities in %.1fs (%.1f entities/s)",
        cfg.shard_id,
        cfg.num_shards,
        encoded,
        secs,
        encoded / secs if secs else 0.0,
    )
    return {**shard, "encoded": encoded, "seconds": secs}


def _collect_chunks(shard_dirs: Sequence[Path]) -> tuple[list[Path], dict[str, Any]]:
    """Every chunk of a complete build, in KB order, from one or more shard folders."""
    infos = [json.loads((d / SHARD_FILE).read_text()) for d in shard_dirs]
    keys = (
        "chunk_size",
        "total_chunks",
        "kb_bytes",
        "model_fingerprint",
        "num_shards",
        "drin_fields",
    )
    for d, info in zip(shard_dirs, infos, strict=True):
        if any(info.get(k) != infos[0].get(k) for k in keys):
            raise SystemExit(f"{d} belongs to a different build than {shard_dirs[0]}")
    found: dict[int, Path] = {}
    for d in shard_dirs:
        for c in sorted((d / CHUNKS_DIR).glob("c*")):
            if c.name.endswith(".tmp") or not (c / "done").is_file():
                continue
            cid = int(c.name[1:])
            if cid in found:
                raise SystemExit(f"chunk {cid} appears in both {found[cid].parent.parent} and {d}")
            found[cid] = c
    missing = [c for c in range(infos[0]["total_chunks"]) if c not in found]
    if missing:
        raise SystemExit(
            f"incomplete build: {len(missing)} chunk(s) missing (e.g. {missing[:5]}); "
            f"run the remaining shards (or re-run a killed one) first"
        )
    return [found[c] for c in sorted(found)], infos[0]


def _chunk_ids(chunk: Path) -> list[str]:
    with open(chunk / ENTITIES_FILE, "rb") as f:
        return [json.loads(line)["id"] for line in f]


class _Deduper:
    """Finds duplicate entity ids among new chunks, and against an existing index, by 64-bit id
    hashes: 16 bytes per entity instead of a set of every id string (which would need ~10 GB at
    100M entities). Only ids whose hash is shared (true duplicates, or a rare collision) are
    compared as strings."""

    def __init__(self, chunks: Sequence[Path], store: EntityStore | None) -> None:
        per_chunk = [
            np.fromiter((id_hash(i) for i in _chunk_ids(c)), dtype=np.uint64) for c in chunks
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


def _append_chunks(
    out: Path,
    chunks: Sequence[Path],
    dedupe: _Deduper,
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
            report.merge(_chunk_report(chunk))
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
            kept_hashes.append(dedupe.hashes[int(dedupe.starts[ci]) + np.asarray(keep, dtype=int)])
            rows += len(keep)
    hashes = np.concatenate(kept_hashes) if kept_hashes else np.zeros(0, np.uint64)
    return rows, hashes


def _chunk_report(chunk: Path) -> RecordReport:
    r = RecordReport()
    data = json.loads((chunk / "report.json").read_text())
    for reason, n in data.get("counts", {}).items():
        r.counts[reason] += n
        r.examples[reason] = data.get("examples", {}).get(reason, [])[: r.max_examples]
    return r


def _store_fields(model: LinkingModel, drin_fields: bool) -> dict[str, list[int]]:
    cfg = model.config.mimic
    L = model.config.encoder.text_max_length
    d = {
        "text_cls": [cfg.dt],
        "tglu_cls": [cfg.tglu_hidden_dim],
        "tglu_query": [L, cfg.tglu_hidden_dim],
        "e2m_query": [cfg.idlu_hidden_dim],
        "m2e_key": [cfg.idlu_hidden_dim],
        "m2e_pooled": [cfg.idlu_hidden_dim],
        "cmfu": [cfg.cmfu_hidden_dim],
    }
    assert list(d) == list(MimicEntityRecord.field_names())
    if drin_fields:
        enc = model.config.encoder
        d.update(
            zip(
                DRIN_FIELDS,
                ([enc.text_dim], [enc.image_global_dim], [enc.image_token_dim], [1]),
                strict=True,
            )
        )
    return d


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
    out: Path, model: LinkingModel, factory: str, train_sample: int, use_gpu: bool
) -> None:
    store = EntityStore(out)
    try:
        index = build_index(
            model.matcher.retrieval_dim(),
            factory,
            len(store),
            lambda s, e: retrieval_keys(store, model, s, e),
            train_sample=train_sample,
            use_gpu=use_gpu,
        )
    finally:
        store.close()
    tmp = out / (FAISS_FILE + ".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(out / FAISS_FILE)


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


def finalize(
    out: Path,
    shard_dirs: Sequence[Path],
    model: LinkingModel,
    factory: str,
    train_sample: int = 100_000,
    device: str = "auto",
    build_seconds: float = 0.0,
) -> Manifest:
    """Concatenate a complete set of chunks into the index folder ``out``."""
    t0 = time.perf_counter()
    chunks, info = _collect_chunks(shard_dirs)
    if info["model_fingerprint"] != model.fingerprint():
        raise SystemExit(
            f"chunks were encoded by model {info['model_fingerprint']}, not {model.fingerprint()}"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in (ENTITIES_FILE, OFFSETS_FILE, FAISS_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / STORE_DIR, ignore_errors=True)
    report = RecordReport()
    fields = _store_fields(model, bool(info.get("drin_fields", False)))
    n, hashes = _append_chunks(out, chunks, _Deduper(chunks, None), 0, report, list(fields))
    write_id_table(out, hashes)
    per_entity = sum(2 * int(np.prod(s)) for s in fields.values())
    manifest = Manifest(
        model_fingerprint=model.fingerprint(),
        backbone=model.config.encoder.backend,
        metric="inner_product",
        factory=factory,
        retrieval_dim=model.matcher.retrieval_dim(),
        entity_count=n,
        store_fields=fields,
        retrieval_vector=RETRIEVAL_VECTOR,
        built_at=datetime.now(UTC).isoformat(timespec="seconds"),
        versions=_versions(),
        git_commit=_git_commit(),
        bad_entities=report.to_json(),
        store_bytes_per_entity=per_entity,
    )
    manifest.save(out)  # the store is readable from here on; FAISS comes next
    _build_faiss(out, model, factory, train_sample, use_gpu=device != "cpu")
    manifest.build_seconds = round(build_seconds + time.perf_counter() - t0, 2)
    manifest.save(out)
    report.log(f"index {out}")
    logger.info("index %s: %d entities, %s, %d store bytes/entity", out, n, factory, per_entity)
    return manifest


def _same_kb(out: Path, kb: Path) -> bool:
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


def build(cfg: BuildConfig, keep_chunks: bool = False) -> Manifest | dict[str, Any]:
    """Encode (this shard of) the KB; a 1-shard build also finalizes the index folder.

    A finished 1-shard folder built by the same model with the same factory is reused as is.
    """
    t0 = time.perf_counter()
    model = LinkingModel.from_pretrained(cfg.model)
    out = Path(cfg.out)
    if cfg.num_shards == 1 and (out / FAISS_FILE).is_file() and not (out / CHUNKS_DIR).exists():
        old = Manifest.load(out)
        same_kb = _same_kb(out, _kb_file(cfg.kb))
        same_fields = all(f in old.store_fields for f in DRIN_FIELDS) == cfg.drin_fields
        if (
            old.model_fingerprint == model.fingerprint()
            and old.factory == cfg.factory
            and same_kb
            and same_fields
        ):
            logger.info("index %s is complete for this model and KB: reusing it", out)
            return old
        # a different model, factory or KB: build afresh (the old shard record must not block)
        (out / SHARD_FILE).unlink(missing_ok=True)
    info = encode_shard(cfg, model)
    if cfg.num_shards > 1:
        logger.info(
            "shard %d/%d done; run `mel-index merge` once every shard is built",
            cfg.shard_id,
            cfg.num_shards,
        )
        return info
    manifest = finalize(
        out, [out], model, cfg.factory, cfg.train_sample, cfg.device, time.perf_counter() - t0
    )
    if not keep_chunks:  # the store now holds the same data; chunks would double the disk use
        shutil.rmtree(out / CHUNKS_DIR, ignore_errors=True)
    return manifest


def add(
    index_dir: str | Path,
    kb: str,
    model: LinkingModel,
    batch_size: int = 64,
    workers: int = 4,
    chunk_size: int = 1024,
    device: str = "auto",
    progress: bool = True,
) -> Manifest:
    """Append the entities of ``kb`` to an existing index folder (old ones are not re-encoded).

    Ids already in the index are counted as duplicates and skipped. FAISS gets the new vectors
    with ``add`` (Flat, HNSW and trained IVF indexes support it)."""
    out = Path(index_dir)
    manifest = Manifest.load(out)
    manifest.check_model(model.fingerprint())
    work = out / f"add-{len(manifest.history) + 1:03d}"
    t0 = time.perf_counter()
    encode_shard(
        BuildConfig(
            kb=kb,
            model="",
            out=str(work),
            chunk_size=chunk_size,
            batch_size=batch_size,
            workers=workers,
            device=device,
            progress=progress,
            drin_fields=all(f in manifest.store_fields for f in DRIN_FIELDS),
        ),
        model,
    )
    chunks, _ = _collect_chunks([work])
    report = RecordReport()
    start = manifest.entity_count
    store = EntityStore(out, manifest)
    try:
        added, new_hashes = _append_chunks(
            out, chunks, _Deduper(chunks, store), start, report, list(manifest.store_fields)
        )
        row_hashes = np.empty(start, dtype=np.uint64)  # the id table in row order
        row_hashes[np.asarray(store.id_rows)] = np.asarray(store.id_hashes)
    finally:
        store.close()
    write_id_table(out, np.concatenate([row_hashes, new_hashes]))
    manifest.entity_count = start + added
    index = faiss.read_index(str(out / FAISS_FILE))
    store = EntityStore(out, manifest)
    try:
        for s in range(start, start + added, 65_536):
            index.add(retrieval_keys(store, model, s, min(start + added, s + 65_536)))
    finally:
        store.close()
    tmp = out / (FAISS_FILE + ".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(out / FAISS_FILE)
    merged = _report_from_json(manifest.bad_entities)
    merged.merge(report)
    manifest.bad_entities = merged.to_json()
    manifest.history.append(
        {
            "added": added,
            "kb": str(Path(kb).resolve()),
            "seconds": round(time.perf_counter() - t0, 2),
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "bad_entities": report.to_json(),
        }
    )
    manifest.save(out)
    shutil.rmtree(work, ignore_errors=True)
    logger.info("added %d entities to %s (now %d)", added, out, manifest.entity_count)
    return manifest


def _report_from_json(d: dict[str, Any]) -> RecordReport:
    r = RecordReport()
    for reason, n in d.get("counts", {}).items():
        r.counts[reason] += n
        r.examples[reason] = list(d.get("examples", {}).get(reason, []))
    return r


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    p = argparse.ArgumentParser(
        prog="mel-index", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="encode a KB (or one shard of it) into an index folder")
    b.add_argument("--kb", required=True, help="kb.jsonl, or a canonical dataset folder")
    b.add_argument("--model", required=True, help="checkpoint folder")
    b.add_argument("--out", required=True)
    b.add_argument(
        "--factory", default="Flat", help="FAISS factory string (Flat, HNSW32, IVF1024,PQ32, ...)"
    )
    b.add_argument("--chunk-size", type=int, default=1024)
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--num-shards", type=int, default=1)
    b.add_argument("--shard-id", type=int, default=0)
    b.add_argument("--workers", type=int, default=4)
    b.add_argument("--train-sample", type=int, default=100_000)
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    b.add_argument("--no-progress", action="store_true")
    b.add_argument(
        "--no-drin",
        action="store_true",
        help="do not store DRIN's entity parts (the server then offers no 'drin' reranker)",
    )
    b.add_argument(
        "--keep-chunks",
        action="store_true",
        help="keep <out>/chunks after finalizing (default: delete, they double disk)",
    )
    m = sub.add_parser("merge", help="combine the shard folders of a sharded build")
    m.add_argument("--out", required=True)
    m.add_argument("--model", required=True)
    m.add_argument("--factory", default="Flat")
    m.add_argument("--train-sample", type=int, default=100_000)
    m.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    m.add_argument("shards", nargs="+")
    a_ = sub.add_parser("add", help="append new entities to an existing index folder")
    a_.add_argument("--index", required=True)
    a_.add_argument("--kb", required=True)
    a_.add_argument("--model", required=True, help="the checkpoint the index was built with")
    a_.add_argument("--batch-size", type=int, default=64)
    a_.add_argument("--workers", type=int, default=4)
    a_.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a = p.parse_args(argv)
    if a.command == "build":
        if not 0 <= a.shard_id < a.num_shards:
            p.error("--shard-id must be in [0, --num-shards)")
        res = build(
            BuildConfig(
                kb=a.kb,
                model=a.model,
                out=a.out,
                factory=a.factory,
                chunk_size=a.chunk_size,
                batch_size=a.batch_size,
                num_shards=a.num_shards,
                shard_id=a.shard_id,
                workers=a.workers,
                train_sample=a.train_sample,
                device=a.device,
                progress=not a.no_progress,
                drin_fields=not a.no_drin,
            ),
            keep_chunks=a.keep_chunks,
        )
    elif a.command == "merge":
        model = LinkingModel.from_pretrained(a.model)
        res = finalize(
            Path(a.out), [Path(s) for s in a.shards], model, a.factory, a.train_sample, a.device
        )
    else:
        res = add(
            a.index,
            a.kb,
            LinkingModel.from_pretrained(a.model),
            a.batch_size,
            a.workers,
            device=a.device,
        )
    print(
        json.dumps(
            res
            if isinstance(res, dict)
            else {
                "entities": res.entity_count,
                "factory": res.factory,
                "store_bytes_per_entity": res.store_bytes_per_entity,
                "bad_entities": res.bad_entities.get("total", 0),
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
