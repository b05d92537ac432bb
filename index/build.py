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
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from index.assemble import RETRIEVAL_VECTOR, extend_index, finalize, retrieval_keys
from index.encode import ChunkEncoder, has_drin_fields
from index.errors import IndexBuildError, InvalidShardError, KBNotFoundError, ModelMismatchError
from index.reader import KBReader, kb_file
from index.runner import Runner
from index.shards import SHARD_FILE, claim, same_kb, shard_record
from index.store import FAISS_FILE, IndexMismatchError, Manifest
from index.writer import CHUNKS_DIR, ChunkWriter
from models.device import resolve_device
from models.model import LinkingModel

logger = logging.getLogger(__name__)


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

    def __post_init__(self) -> None:
        if not 0 <= self.shard_id < self.num_shards:
            raise InvalidShardError(
                f"shard_id {self.shard_id} is outside [0, num_shards={self.num_shards})"
            )


def encode_shard(cfg: BuildConfig, model: LinkingModel) -> dict[str, Any]:
    """Encode this shard's chunks into ``<out>/chunks`` (skipping finished ones)."""
    kb = kb_file(cfg.kb)
    if not kb.is_file():
        raise KBNotFoundError(f"no KB file at {kb}")
    out = Path(cfg.out)
    writer = ChunkWriter(out)
    reader = KBReader(kb, cfg.chunk_size, cfg.num_shards, cfg.shard_id)
    done = writer.finished(reader.chunks)
    shard = shard_record(
        kb,
        num_shards=cfg.num_shards,
        shard_id=cfg.shard_id,
        chunk_size=cfg.chunk_size,
        total_chunks=reader.total_chunks,
        model_fingerprint=model.fingerprint(),
        drin_fields=cfg.drin_fields,
    )
    claim(out, shard)
    if done:
        logger.info(
            "resuming: %d of %d chunks of this shard already done", len(done), len(reader.chunks)
        )
    encoder = ChunkEncoder(
        model, kb.parent, cfg.batch_size, cfg.workers, resolve_device(cfg.device), cfg.drin_fields
    )
    bar = tqdm(
        total=sum(reader.chunk_lines(c) for c in reader.chunks if c not in done),
        desc=f"shard {cfg.shard_id}/{cfg.num_shards}",
        unit="ent",
        disable=not cfg.progress,
        smoothing=0.1,
    )
    t0 = time.perf_counter()
    try:
        stats = Runner(reader.read(skip=done), encoder, writer)(lambda c: bar.update(c.lines))
    finally:
        bar.close()
        encoder.close()
    secs = time.perf_counter() - t0
    logger.info(
        "shard %d/%d: encoded %d entities in %.1fs (%.1f entities/s; read %.1fs, encode %.1fs, "
        "write %.1fs)",
        cfg.shard_id,
        cfg.num_shards,
        stats.entities,
        secs,
        stats.entities / secs if secs else 0.0,
        stats.read_s,
        stats.encode_s,
        stats.write_s,
    )
    return {**shard, "encoded": stats.entities, "seconds": secs}


def build(cfg: BuildConfig, keep_chunks: bool = False) -> Manifest | dict[str, Any]:
    """Encode (this shard of) the KB; a 1-shard build also finalizes the index folder.

    A finished 1-shard folder built by the same model with the same factory is reused as is.
    """
    t0 = time.perf_counter()
    model = LinkingModel.from_pretrained(cfg.model)
    out = Path(cfg.out)
    if cfg.num_shards == 1 and (out / FAISS_FILE).is_file() and not (out / CHUNKS_DIR).exists():
        old = Manifest.load(out)
        if (
            old.model_fingerprint == model.fingerprint()
            and old.factory == cfg.factory
            and same_kb(out, kb_file(cfg.kb))
            and has_drin_fields(old.store_fields) == cfg.drin_fields
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
    try:
        manifest.check_model(model.fingerprint())
    except IndexMismatchError as exc:
        raise ModelMismatchError(str(exc)) from exc
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
            drin_fields=has_drin_fields(manifest.store_fields),
        ),
        model,
    )
    manifest = extend_index(out, manifest, work, model, kb, time.perf_counter() - t0)
    shutil.rmtree(work, ignore_errors=True)
    logger.info(
        "added %d entities to %s (now %d)",
        manifest.history[-1]["added"],
        out,
        manifest.entity_count,
    )
    return manifest


# Exit codes: 0 done; 1 a user error (the message says what to do; what `raise SystemExit(msg)`
# gave before the errors were typed); 2 a bad command line (argparse's own code).
EXIT_USER_ERROR = 1


def _parser() -> argparse.ArgumentParser:
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
    return p


def _summary(res: Manifest | dict[str, Any]) -> dict[str, Any]:
    """What the command prints: a shard build's record, or the finished index's key figures."""
    if isinstance(res, dict):
        return res
    return {
        "entities": res.entity_count,
        "factory": res.factory,
        "store_bytes_per_entity": res.store_bytes_per_entity,
        "bad_entities": res.bad_entities.get("total", 0),
    }


def _run(p: argparse.ArgumentParser, a: argparse.Namespace) -> Manifest | dict[str, Any]:
    if a.command == "build":
        try:
            cfg = BuildConfig(
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
            )
        except InvalidShardError:
            p.error("--shard-id must be in [0, --num-shards)")  # exits 2, like any bad flag
        return build(cfg, keep_chunks=a.keep_chunks)
    if a.command == "merge":
        model = LinkingModel.from_pretrained(a.model)
        return finalize(
            Path(a.out), [Path(s) for s in a.shards], model, a.factory, a.train_sample, a.device
        )
    return add(
        a.index,
        a.kb,
        LinkingModel.from_pretrained(a.model),
        a.batch_size,
        a.workers,
        device=a.device,
    )


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    p = _parser()
    a = p.parse_args(argv)
    try:
        res = _run(p, a)
    except IndexBuildError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USER_ERROR
    print(json.dumps(_summary(res), indent=1))
    return 0


__all__ = [
    "CHUNKS_DIR",
    "RETRIEVAL_VECTOR",
    "SHARD_FILE",
    "BuildConfig",
    "ChunkEncoder",
    "add",
    "build",
    "encode_shard",
    "finalize",
    "main",
    "retrieval_keys",
]

if __name__ == "__main__":
    sys.exit(main())
