"""``mel-index``: the offline job, KB (canonical format) + model -> index folder.

    mel-index build --kb artifacts/demo-world/kb.jsonl --model artifacts/demo-model/best \\
                    --out artifacts/demo-index [--factory Flat|HNSW32|IVF1024,PQ32]
    # 1M+ entities in 1/10 of Flat's RAM: compressed IVF over MIPS-to-L2 vectors, the top 1000
    # rescored exactly from the store (bench/results/retrieval-scale.md):
    mel-index build ... --factory IVF4096,PQ96 --mips-l2 --refine 1000
    # the same on N machines / processes, then one merge:
    mel-index build ... --num-shards 4 --shard-id 2 --out shards/2
    # the chunks encoded by a Ray actor pool (a local Ray, or the cluster at $RAY_ADDRESS):
    mel-index build ... --engine ray [--ray-address auto] [--ray-actors 8]
    mel-index merge --out artifacts/index shards/0 shards/1 shards/2 shards/3
    # append new entities without re-encoding the old ones:
    mel-index add --index artifacts/demo-index --kb new_entities.jsonl
    # fold live updates (the server's admin API) into a new base, dropping tombstones:
    mel-index compact --index artifacts/demo-index --model artifacts/demo-model/best
    # (re)build the lexical channel (trigram index of names + aliases) of an existing folder:
    mel-index lexical --index artifacts/demo-index
    # the encoder towers through onnxruntime (the server must then use the same runtime):
    mel-index build ... --encoder-runtime onnx [--onnx-cache DIR] [--threads N]

How it works. The KB is streamed in chunks of ``--chunk-size`` raw lines; chunk c belongs to
shard ``c % num_shards``. Each chunk is parsed (bad records counted), its images decoded by a
thread pool, encoded in batches (GPU when present), turned into MIMIC's per-entity records
(``MimicMatcher.precompute_entities``) and written atomically to ``<out>/chunks/cNNNNNN/``.
A killed build re-run with the same arguments skips finished chunks, so it resumes from the
last completed chunk with the same result. ``finalize`` (run by a 1-shard build, and by
``merge``) concatenates chunks in KB order into the float16 store, the metadata files and the
FAISS index, drops duplicate ids (counted), and writes the manifest. Every build and ``add``
also (re)builds ``<index>/lexical/``, a character-trigram tf-idf index of entity names and
aliases (:mod:`index.lexical`); ``lexical`` builds it for a folder made before it existed.

``--encoder-runtime`` (torch, onnx, onnx-int8; models/onnx_encoders.py) says how the encoder
towers run; the manifest records it, ``add`` reuses the folder's own, and the server refuses a
folder encoded by another runtime. ``--threads`` sets torch / onnxruntime intra-op threads
(default: $MEL_INTRA_OP_THREADS, else the cores free when it starts, at least 1;
models/threads.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from index.ann import AnnSpec
from index.build import ENGINES, BuildConfig, add, build, finalize
from index.errors import IndexBuildError, InvalidShardError
from index.lexical import rebuild_lexical
from index.live import LiveUpdateError, compact
from index.ray_engine import add_ray_arguments, ray_options
from index.store import Manifest
from models.model import LinkingModel
from models.onnx_encoders import ENCODER_RUNTIMES, default_cache_dir
from models.threads import configure_threads

# Exit codes: 0 done; 1 a user error (the message says what to do; what `raise SystemExit(msg)`
# gave before the errors were typed); 2 a bad command line (argparse's own code).
EXIT_USER_ERROR = 1


def _ann_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mips-l2",
        action="store_true",
        help="index the MIPS-to-L2 transformed vectors (for IVF: see index/ann.py)",
    )
    p.add_argument(
        "--refine",
        type=int,
        default=0,
        help="the server rescores FAISS's top N exactly from the store (0 = FAISS's scores)",
    )


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
    _ann_args(b)
    b.add_argument(
        "--engine",
        default="local",
        choices=sorted(ENGINES),
        help="who encodes the chunks: this process, or a Ray actor pool (pip install '.[ray]')",
    )
    add_ray_arguments(b)
    b.add_argument(
        "--feature-cache",
        help="mel-train's feature cache folder (--cache-dir): reuse the backbone features it "
        "holds for this KB instead of encoding them again (frozen-backbone models)",
    )
    b.add_argument(
        "--keep-chunks",
        action="store_true",
        help="keep <out>/chunks after finalizing (default: delete, they double disk)",
    )
    b.add_argument(
        "--encoder-runtime",
        default=None,
        choices=ENCODER_RUNTIMES,
        help="how the encoder towers run (onnx: onnxruntime fp32; onnx-int8: int8 text "
        "tower; default: onnx for minilm-effnet, torch for clip); recorded in the manifest, "
        "and the server must use the same",
    )
    b.add_argument(
        "--onnx-cache",
        default=os.environ.get("MEL_ONNX_CACHE"),
        help="folder for the ONNX exports (default: $MEL_ONNX_CACHE, else <model>/onnx)",
    )
    m = sub.add_parser("merge", help="combine the shard folders of a sharded build")
    m.add_argument("--out", required=True)
    m.add_argument("--model", required=True)
    m.add_argument("--factory", default="Flat")
    m.add_argument("--train-sample", type=int, default=100_000)
    _ann_args(m)
    m.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    m.add_argument("shards", nargs="+")
    a_ = sub.add_parser("add", help="append new entities to an existing index folder")
    a_.add_argument("--index", required=True)
    a_.add_argument("--kb", required=True)
    a_.add_argument("--model", required=True, help="the checkpoint the index was built with")
    a_.add_argument("--batch-size", type=int, default=64)
    a_.add_argument("--workers", type=int, default=4)
    a_.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a_.add_argument(
        "--onnx-cache",
        default=os.environ.get("MEL_ONNX_CACHE"),
        help="folder of the ONNX exports, for a folder built with an onnx encoder runtime "
        "(default: $MEL_ONNX_CACHE, else <model>/onnx)",
    )
    c_ = sub.add_parser(
        "compact",
        help="fold live updates (admin API segments, tombstones) into a new base folder",
    )
    c_.add_argument("--index", required=True)
    c_.add_argument("--model", required=True, help="the checkpoint the index was built with")
    c_.add_argument(
        "--out",
        help="write the compacted folder here (default: in place, built beside and renamed "
        "over; refused while a server writes to the folder)",
    )
    lx = sub.add_parser(
        "lexical",
        help="(re)build the lexical index (trigram tf-idf of names and aliases) of a folder",
    )
    lx.add_argument("--index", required=True)
    for sp in (b, m, a_):
        sp.add_argument(
            "--threads",
            type=int,
            default=int(os.environ["MEL_INTRA_OP_THREADS"])
            if os.environ.get("MEL_INTRA_OP_THREADS")
            else None,
            help="torch / onnxruntime intra-op threads (default: $MEL_INTRA_OP_THREADS, else "
            "the cores free when it starts, at least 1: models/threads.py)",
        )
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
        "lexical": res.lexical,
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
                feature_cache=a.feature_cache,
                encoder_runtime=a.encoder_runtime,
                onnx_cache=a.onnx_cache,
                mips_l2=a.mips_l2,
                refine=a.refine,
                engine=a.engine,
                ray=ray_options(a),
            )
        except InvalidShardError:
            p.error("--shard-id must be in [0, --num-shards)")  # exits 2, like any bad flag
        except ValueError as exc:  # a --ray-* count below 1
            p.error(str(exc))
        return build(cfg, keep_chunks=a.keep_chunks)
    if a.command == "merge":
        model = LinkingModel.from_pretrained(a.model)
        return finalize(
            Path(a.out),
            [Path(s) for s in a.shards],
            model,
            a.factory,
            a.train_sample,
            a.device,
            ann=AnnSpec(mips_l2=a.mips_l2, refine=a.refine),
        )
    if a.command == "lexical":
        return rebuild_lexical(a.index)
    if a.command == "compact":
        model = LinkingModel.from_pretrained(a.model)
        Manifest.load(Path(a.index)).check_model(model.fingerprint())

        def keys_of(text_cls: torch.Tensor, cmfu: torch.Tensor) -> np.ndarray:
            with torch.inference_mode():
                return model.matcher.retrieval_keys_of(text_cls, cmfu).float().numpy()

        try:
            return compact(a.index, keys_of, a.out)
        except LiveUpdateError as exc:
            raise IndexBuildError(str(exc)) from exc
    return add(
        a.index,
        a.kb,
        LinkingModel.from_pretrained(a.model),
        a.batch_size,
        a.workers,
        device=a.device,
        onnx_cache=str(default_cache_dir(a.model, a.onnx_cache)),
    )


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    p = _parser()
    a = p.parse_args(argv)
    if a.command != "lexical":  # the only command without model work
        try:
            configure_threads(a.threads)
        except ValueError as exc:
            p.error(str(exc))
    try:
        res = _run(p, a)
    except IndexBuildError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USER_ERROR
    print(json.dumps(_summary(res), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
