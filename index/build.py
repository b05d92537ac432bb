"""The index job, KB (canonical format) + model -> index folder: what runs in which order.

``build`` encodes this shard of the KB (reader -> encoder -> writer, :mod:`index.runner`) into
``<out>/chunks`` and, for a 1-shard build, finalizes the folder (:mod:`index.assemble`); ``add``
encodes new entities the same way and appends them to an existing folder. The command line
(``mel-index``) is :mod:`index.cli`; user errors are raised as :mod:`index.errors`.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from index.ann import AnnSpec
from index.assemble import RETRIEVAL_VECTOR, extend_index, finalize, retrieval_keys
from index.encode import ChunkEncoder, has_drin_fields
from index.errors import (
    EncoderRuntimeError,
    InvalidShardError,
    KBNotFoundError,
    ModelMismatchError,
    UnknownEngineError,
)
from index.lexical import rebuild_lexical
from index.ray_engine import RayOptions
from index.reader import KBReader, kb_file
from index.runner import Runner
from index.shards import SHARD_FILE, claim, same_kb, shard_record
from index.store import FAISS_FILE, IndexMismatchError, Manifest
from index.writer import CHUNKS_DIR, ChunkWriter
from models.device import resolve_device
from models.model import LinkingModel
from models.onnx_encoders import (
    OnnxRuntimeError,
    check_runtime,
    default_cache_dir,
    resolve_runtime,
    use_runtime,
)

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
    # mel-train's raw feature cache: entities it already encoded with the same frozen backbone
    # (and encoder runtime) are not encoded again (their features are read, then projected)
    feature_cache: str | None = None
    # How the encoder towers run (models/onnx_encoders.py): torch, onnx or onnx-int8; None =
    # the backend's default (onnx for minilm-effnet, torch for clip). The manifest records the
    # one used and the server must encode mentions the same way.
    encoder_runtime: str | None = None
    # Where the ONNX exports are cached (None: <model>/onnx); made here when missing.
    onnx_cache: str | None = None
    # Who runs the chunk plan (ENGINES): "local", this process; "ray", a Ray actor pool
    # (index/ray_engine.py; the same chunk folders, so the same index bytes).
    engine: str = "local"
    ray: RayOptions = field(default_factory=RayOptions)
    # index/ann.py's options over the FAISS factory: index the MIPS-to-L2 transformed keys
    # (IVF then clusters in the geometry it is made for), and rescore FAISS's top `refine`
    # exactly from the store (0 = FAISS's own scores)
    mips_l2: bool = False
    refine: int = 0

    def __post_init__(self) -> None:
        if self.encoder_runtime is not None:
            check_runtime(self.encoder_runtime)
        if not 0 <= self.shard_id < self.num_shards:
            raise InvalidShardError(
                f"shard_id {self.shard_id} is outside [0, num_shards={self.num_shards})"
            )
        if self.engine not in ENGINES:
            raise UnknownEngineError(
                f"engine {self.engine!r} is not one of {', '.join(sorted(ENGINES))}"
            )


@dataclass
class ShardPlan:
    """A shard's chunk plan, opened the same way by every engine: the KB file, the output
    folder's writer, this shard's chunks (``done``: those already complete), the shard
    record it claimed, and the encoder runtime its features are encoded with."""

    kb: Path
    out: Path
    writer: ChunkWriter
    reader: KBReader
    done: set[int]
    shard: dict[str, Any]
    runtime: str


def open_shard(cfg: BuildConfig, model: LinkingModel) -> ShardPlan:
    """Check the KB, claim ``<out>`` for this shard (refusing another build's folder) and
    list the chunks still to encode."""
    kb = kb_file(cfg.kb)
    if not kb.is_file():
        raise KBNotFoundError(f"no KB file at {kb}")
    out = Path(cfg.out)
    runtime = resolve_runtime(cfg.encoder_runtime, model.config.encoder.backend)
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
        encoder_runtime=runtime,
    )
    claim(out, shard)
    if done:
        logger.info(
            "resuming: %d of %d chunks of this shard already done", len(done), len(reader.chunks)
        )
    return ShardPlan(kb, out, writer, reader, done, shard, runtime)


def activate_runtime(
    model: LinkingModel,
    runtime: str,
    model_folder: str | Path,
    onnx_cache: str | None,
    threads: int,
    device: torch.device,
) -> None:
    """Switch the model's frozen towers to ``runtime`` (exporting them into the ONNX cache
    on first use), as the server does: the index and the mentions must agree on it."""
    try:
        use_runtime(
            model.encoder, runtime, default_cache_dir(model_folder, onnx_cache), threads, device
        )
    except OnnxRuntimeError as exc:
        raise EncoderRuntimeError(str(exc)) from exc


def encode_shard(cfg: BuildConfig, model: LinkingModel) -> dict[str, Any]:
    """Encode this shard's chunks into ``<out>/chunks`` (skipping finished ones)."""
    plan = open_shard(cfg, model)
    kb, writer, reader, done, shard = plan.kb, plan.writer, plan.reader, plan.done, plan.shard
    device = resolve_device(cfg.device)
    # torch.get_num_threads(): what the job's thread setting gave torch (index/cli.py)
    activate_runtime(
        model, plan.runtime, cfg.model, cfg.onnx_cache, torch.get_num_threads(), device
    )
    encoder = ChunkEncoder(
        model,
        kb.parent,
        cfg.batch_size,
        cfg.workers,
        device,
        cfg.drin_fields,
        _training_cache(cfg, model, kb),  # after the runtime switch: its features, cached
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
    if encoder.from_cache:
        logger.info(
            "%d entities' backbone features came from the training cache", encoder.from_cache
        )
    return {**shard, "encoded": stats.entities, "seconds": secs, "from_cache": encoder.from_cache}


def _training_cache(
    cfg: BuildConfig, model: LinkingModel, kb: Path
) -> tuple[Any, dict[str, int]] | None:
    """The KB's raw backbone features that ``mel-train`` cached (``--feature-cache``), when
    the KB is a canonical dataset folder's and the model's backbone is frozen and the same."""
    if not cfg.feature_cache:
        return None
    from models.data.schema import load_dataset
    from models.features import cached_entity_features

    try:
        ds = load_dataset(kb.parent)
    except (FileNotFoundError, ValueError) as exc:
        logger.info("no training cache for %s (%s): encoding", kb, exc)
        return None
    hit = cached_entity_features(model.encoder, ds, cfg.feature_cache)
    if hit is None:
        logger.info("no training cache of %s under %s: encoding", kb, cfg.feature_cache)
    return hit


def _encode_ray(cfg: BuildConfig, model: LinkingModel) -> dict[str, Any]:
    from index.ray_engine import encode_shard_ray  # imports Ray only when it runs

    return encode_shard_ray(cfg, model, cfg.ray)


# The engines that run a build's chunk plan, by name (``mel-index build --engine``).
ENGINES: dict[str, Callable[[BuildConfig, LinkingModel], dict[str, Any]]] = {
    "local": encode_shard,
    "ray": _encode_ray,
}


def build(cfg: BuildConfig, keep_chunks: bool = False) -> Manifest | dict[str, Any]:
    """Encode (this shard of) the KB; a 1-shard build also finalizes the index folder.

    A finished 1-shard folder built by the same model with the same factory is reused as is
    (gaining the lexical index if it was built before that existed).
    """
    t0 = time.perf_counter()
    model = LinkingModel.from_pretrained(cfg.model)
    out = Path(cfg.out)
    if cfg.num_shards == 1 and (out / FAISS_FILE).is_file() and not (out / CHUNKS_DIR).exists():
        old = Manifest.load(out)
        if (
            old.model_fingerprint == model.fingerprint()
            and old.factory == cfg.factory
            and (AnnSpec.from_json(old.ann).mips_l2, AnnSpec.from_json(old.ann).refine)
            == (cfg.mips_l2, cfg.refine)
            and same_kb(out, kb_file(cfg.kb))
            and has_drin_fields(old.store_fields) == cfg.drin_fields
            and old.encoder_runtime
            == resolve_runtime(cfg.encoder_runtime, model.config.encoder.backend)
        ):
            logger.info("index %s is complete for this model and KB: reusing it", out)
            if not old.lexical:  # built before the lexical channel: add it (no re-encoding)
                old = rebuild_lexical(out)
            return old
        # a different model, factory or KB: build afresh (the old shard record must not block)
        (out / SHARD_FILE).unlink(missing_ok=True)
    info = ENGINES[cfg.engine](cfg, model)
    if cfg.num_shards > 1:
        logger.info(
            "shard %d/%d done; run `mel-index merge` once every shard is built",
            cfg.shard_id,
            cfg.num_shards,
        )
        return info
    manifest = finalize(
        out,
        [out],
        model,
        cfg.factory,
        cfg.train_sample,
        cfg.device,
        time.perf_counter() - t0,
        AnnSpec(mips_l2=cfg.mips_l2, refine=cfg.refine),
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
    onnx_cache: str | None = None,
) -> Manifest:
    """Append the entities of ``kb`` to an existing index folder (old ones are not re-encoded).

    Ids already in the index are counted as duplicates and skipped. FAISS gets the new vectors
    with ``add`` (Flat, HNSW and trained IVF indexes support it); the lexical index of names
    and aliases is rebuilt by streaming ``entities.jsonl`` (O(N), simple, no re-encoding).
    The new entities are encoded with the folder's own encoder runtime (its manifest), whose
    ONNX exports are cached in ``onnx_cache`` (needed unless that runtime is torch)."""
    out = Path(index_dir)
    manifest = Manifest.load(out)
    try:
        manifest.check_model(model.fingerprint())
    except IndexMismatchError as exc:
        raise ModelMismatchError(str(exc)) from exc
    if manifest.encoder_runtime != "torch" and onnx_cache is None:
        raise EncoderRuntimeError(
            f"{out} was encoded with encoder runtime {manifest.encoder_runtime!r}: "
            f"say where its ONNX exports are cached (--onnx-cache; default <model>/onnx)"
        )
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
            encoder_runtime=manifest.encoder_runtime,
            onnx_cache=onnx_cache,
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


def main(argv: Sequence[str] | None = None) -> int:
    """``mel-index``, which lives in :mod:`index.cli`; kept for scripts installed before it
    moved there (they import ``index.build:main``)."""
    from index.cli import main as cli_main

    return cli_main(argv)


__all__ = [
    "CHUNKS_DIR",
    "ENGINES",
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
